"""The O_DIRECT extent reader and the slab pool, on real files under tmp_path.

tmp_path is on the test machine's disk (ext4 here: misaligned O_DIRECT reads
fail there); the alignment tests check our own checks, which must fire on any
filesystem (tmpfs accepts misaligned O_DIRECT).
"""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from mer_cli.errors import FormatError, ReadError
from mer_cli.io import (
    DEMAND,
    PREFETCH,
    AlignmentError,
    BufferedFallbackWarning,
    ExtentReader,
    SlabPool,
)
from mer_cli.io import reader as reader_mod

PAGE = 4096
CHUNK = 2 * PAGE


@pytest.fixture
def data_file(tmp_path):
    """A 64-page file of seeded random bytes; returns (path, bytes)."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 64 * PAGE, dtype=np.uint8)
    p = tmp_path / "experts-00001-of-00001.bin"
    data.tofile(p)
    return p, data


class GatedReader(ExtentReader):
    """Records every chunk read (offset order); the first read waits for ``gate``."""

    def __init__(self, *a, **kw):
        self.order: list[int] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        super().__init__(*a, **kw)

    def _preadv(self, fd, buf, offset):
        self.order.append(offset)
        self.started.set()
        self.gate.wait(10)
        return super()._preadv(fd, buf, offset)


def test_slab_pool_is_page_aligned_and_fixed():
    pool = SlabPool(3 * PAGE, 5)
    try:
        assert pool.nbytes == 15 * PAGE and len(pool.slabs) == 5
        for i in range(5):
            assert pool.address(i) % PAGE == 0
            assert pool.slabs[i].ctypes.data == pool.address(i)
            assert pool.slabs[i].nbytes == 3 * PAGE
        pool.slabs[2][:] = 9
        v = pool.view(2)
        assert not v.flags.writeable and (v == 9).all() and (pool.view(1) == 0).all()
    finally:
        pool.close()
    with pytest.raises(ValueError, match="multiple of 4096"):
        SlabPool(1000, 1)


@pytest.mark.parametrize("direct", [True, False])
def test_reads_land_the_file_bytes(data_file, direct):
    path, data = data_file
    pool = SlabPool(8 * PAGE, 4)
    with ExtentReader([path], threads=4, chunk_size=CHUNK, direct=direct) as r:
        reqs = [
            r.submit(0, off * PAGE, 8 * PAGE, pool.slabs[i], label=f"extent {i}")
            for i, off in enumerate((1, 9, 40, 56))
        ]
        for req in reqs:
            req.result(10)
            assert req.ok and req.bytes_done == 8 * PAGE
        for i, off in enumerate((1, 9, 40, 56)):
            assert np.array_equal(pool.slabs[i], data[off * PAGE : (off + 8) * PAGE])
        st = r.stats()
        assert st["bytes_read"] == 4 * 8 * PAGE and st["chunks_read"] == 16
        assert st["read_seconds"] > 0 and st["read_gbps"] > 0
        if direct:
            # ext4/xfs honour O_DIRECT; a filesystem that refuses it falls back
            assert r.files[0].direct or st["buffered_files"] == 1
    pool.close()


def test_alignment_is_checked_in_our_code(data_file):
    path, _ = data_file
    pool = SlabPool(4 * PAGE, 1)
    buf = pool.slabs[0]
    for direct in (True, False):
        with ExtentReader([path], threads=1, chunk_size=PAGE, direct=direct) as r:
            with pytest.raises(AlignmentError, match=rf"{path}.*offset .* is 100"):
                r.submit(0, 100, PAGE, buf, label="expert (layer 0, expert 1)")
            with pytest.raises(AlignmentError, match="length .* is 1000"):
                r.submit(0, PAGE, 1000, buf)
            with pytest.raises(AlignmentError, match="starts at address"):
                r.submit(0, PAGE, PAGE, buf[512 : 512 + PAGE])
    pool.close()
    with pytest.raises(ValueError, match="chunk size"):
        ExtentReader([path], chunk_size=PAGE + 512)


def test_demand_reads_go_before_prefetches(data_file):
    path, data = data_file
    pool = SlabPool(8 * PAGE, 3)
    r = GatedReader([path], threads=1, chunk_size=PAGE)
    try:
        first = r.submit(0, 0, 8 * PAGE, pool.slabs[0], priority=PREFETCH)
        assert r.started.wait(5)  # the worker is inside the first chunk
        pf = r.submit(0, 16 * PAGE, 8 * PAGE, pool.slabs[1], priority=PREFETCH + 1)
        dm = r.submit(0, 32 * PAGE, 8 * PAGE, pool.slabs[2], priority=DEMAND)
        r.gate.set()
        for q in (first, pf, dm):
            q.result(10)
        # after the chunk in flight, all of the demand read, then the prefetches
        assert r.order[1:9] == [32 * PAGE + i * PAGE for i in range(8)]
        assert r.order[9:16] == [i * PAGE for i in range(1, 8)]
        assert r.order[16:] == [16 * PAGE + i * PAGE for i in range(8)]
        assert np.array_equal(pool.slabs[2], data[32 * PAGE : 40 * PAGE])
    finally:
        r.gate.set()
        r.close()
        pool.close()


def test_promoted_prefetch_jumps_the_queue(data_file):
    path, _ = data_file
    pool = SlabPool(4 * PAGE, 3)
    r = GatedReader([path], threads=1, chunk_size=PAGE)
    try:
        a = r.submit(0, 0, 4 * PAGE, pool.slabs[0], priority=PREFETCH)
        assert r.started.wait(5)
        b = r.submit(0, 8 * PAGE, 4 * PAGE, pool.slabs[1], priority=PREFETCH)
        r.promote(b, DEMAND)
        r.gate.set()
        a.result(10)
        b.result(10)
        assert r.order[1:5] == [8 * PAGE + i * PAGE for i in range(4)]
    finally:
        r.gate.set()
        r.close()
        pool.close()


def test_cancel_drops_unstarted_chunks_and_waits_for_the_one_in_flight(data_file):
    path, _ = data_file
    pool = SlabPool(8 * PAGE, 2)
    r = GatedReader([path], threads=1, chunk_size=PAGE)
    seen = []
    try:
        a = r.submit(
            0, 0, 8 * PAGE, pool.slabs[0], priority=PREFETCH, on_done=seen.append
        )
        assert r.started.wait(5)
        assert r.cancel(a) is True
        assert not a.done.is_set()  # one chunk still lands in the buffer
        r.gate.set()
        assert a.wait(10) and a.cancelled and not a.ok
        assert seen == [a]
        assert r.order == [0] and a.bytes_done == PAGE
        with pytest.raises(ReadError, match="cancelled"):
            a.result()
        b = r.submit(0, 0, 8 * PAGE, pool.slabs[1])
        b.result(10)
        assert r.cancel(b) is False  # finished: its data stays valid
        assert r.stats()["reads_cancelled"] == 1
    finally:
        r.gate.set()
        r.close()
        pool.close()


class FlakyReader(ExtentReader):
    """Fails the first ``fails`` read calls with ``err``."""

    def __init__(self, *a, fails=0, err=errno.EIO, **kw):
        self.fails, self.err = fails, err
        super().__init__(*a, **kw)

    def _preadv(self, fd, buf, offset):
        if self.fails:
            self.fails -= 1
            raise OSError(self.err, os.strerror(self.err))
        return super()._preadv(fd, buf, offset)


def test_io_errors_are_retried_then_reported_with_file_and_offset(data_file):
    path, data = data_file
    pool = SlabPool(PAGE, 1)
    with FlakyReader([path], threads=1, chunk_size=PAGE, retries=3, fails=2) as r:
        r.retry_delay = 0.001
        r.submit(0, 5 * PAGE, PAGE, pool.slabs[0]).result(10)
        assert r.stats()["retries"] == 2
        assert np.array_equal(pool.slabs[0], data[5 * PAGE : 6 * PAGE])
    with FlakyReader([path], threads=1, chunk_size=PAGE, retries=2, fails=99) as r:
        r.retry_delay = 0.001
        req = r.submit(
            0, 5 * PAGE, PAGE, pool.slabs[0], label="expert (layer 2, expert 3)"
        )
        with pytest.raises(ReadError) as ei:
            req.result(10)
        msg = str(ei.value)
        assert str(path) in msg and f"offset {5 * PAGE}" in msg
        assert "expert (layer 2, expert 3)" in msg and "after 3 attempts" in msg
    pool.close()


def test_filesystem_refusing_o_direct_falls_back_with_a_warning(data_file, monkeypatch):
    path, data = data_file
    pool = SlabPool(4 * PAGE, 1)
    # EINVAL on an aligned O_DIRECT read (some FUSE/network filesystems)
    with FlakyReader(
        [path], threads=1, chunk_size=PAGE, fails=1, err=errno.EINVAL
    ) as r:
        r.files[0].direct = True  # fail while the file counts as O_DIRECT
        with pytest.warns(BufferedFallbackWarning, match="refused O_DIRECT"):
            r.submit(0, 0, 4 * PAGE, pool.slabs[0]).result(10)
        assert np.array_equal(pool.slabs[0], data[: 4 * PAGE])
        assert not r.files[0].direct and r.stats()["buffered_files"] == 1
    # EINVAL at open (tmpfs before Linux 6.6)
    real_open = os.open

    def no_direct(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(reader_mod.os, "open", no_direct)
    with ExtentReader([path], threads=1, chunk_size=PAGE) as r:
        with pytest.warns(BufferedFallbackWarning, match="EINVAL at open"):
            r.submit(0, 8 * PAGE, 4 * PAGE, pool.slabs[0]).result(10)
        assert np.array_equal(pool.slabs[0], data[8 * PAGE : 12 * PAGE])
    pool.close()


def test_truncated_file_is_an_error_naming_file_and_offset(data_file):
    path, _ = data_file
    pool = SlabPool(8 * PAGE, 1)
    with ExtentReader([path], threads=2, chunk_size=PAGE) as r:
        r.submit(0, 0, 8 * PAGE, pool.slabs[0]).result(10)  # file opened
        os.truncate(path, 20 * PAGE + 100)  # cut during the run
        req = r.submit(
            0, 16 * PAGE, 8 * PAGE, pool.slabs[0], label="expert (layer 1, expert 0)"
        )
        with pytest.raises(ReadError) as ei:
            req.result(10)
        msg = str(ei.value)
        assert str(path) in msg and f"offset {16 * PAGE}" in msg and "truncated" in msg
    pool.close()


def test_deleted_file(data_file):
    path, data = data_file
    pool = SlabPool(PAGE, 1)
    with ExtentReader([path], threads=1, chunk_size=PAGE) as r:
        path.unlink()  # before the first read opened it
        req = r.submit(
            0, 3 * PAGE, PAGE, pool.slabs[0], label="expert (layer 0, expert 2)"
        )
        with pytest.raises(ReadError) as ei:
            req.result(10)
        msg = str(ei.value)
        assert str(path) in msg and f"offset {3 * PAGE}" in msg and "removed" in msg
    data.tofile(path)
    with ExtentReader([path], threads=1, chunk_size=PAGE) as r:
        r.submit(0, 0, PAGE, pool.slabs[0]).result(10)
        path.unlink()  # once open, the descriptor keeps the bytes readable
        r.submit(0, 3 * PAGE, PAGE, pool.slabs[0]).result(10)
        assert np.array_equal(pool.slabs[0], data[3 * PAGE : 4 * PAGE])
    pool.close()


def test_checksum_checked_by_the_reader(data_file):
    import zlib

    path, data = data_file
    pool = SlabPool(2 * PAGE, 1)
    good = zlib.crc32(data[2 * PAGE : 4 * PAGE].tobytes())
    with ExtentReader([path], threads=2, chunk_size=PAGE) as r:
        r.submit(0, 2 * PAGE, 2 * PAGE, pool.slabs[0], crc32=good).result(10)
        req = r.submit(
            0,
            2 * PAGE,
            2 * PAGE,
            pool.slabs[0],
            crc32=good ^ 1,
            label="expert (layer 0, expert 0)",
        )
        with pytest.raises(
            FormatError,
            match=rf"{path}: expert \(layer 0, expert 0\) at offset {2 * PAGE}",
        ):
            req.result(10)
    pool.close()


def test_slabs_are_resident_from_the_start_and_do_not_grow():
    from mer_cli.memory import rss_bytes

    before = rss_bytes()
    pool = SlabPool(4 << 20, 8)  # 32 MiB, faulted in now
    grown = rss_bytes() - before
    assert 28 << 20 < grown < 40 << 20, grown
    pool.slabs[3][:] = 1  # writing into a slab allocates nothing new
    assert rss_bytes() - before < 40 << 20
    pool.close()
    mid = rss_bytes()
    lazy = SlabPool(4 << 20, 8, populate=False)  # pages come on first touch
    assert rss_bytes() - mid < 4 << 20
    lazy.slabs[0][:] = 1
    assert rss_bytes() - mid >= 4 << 20
    lazy.close()
