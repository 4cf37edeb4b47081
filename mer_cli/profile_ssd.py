"""Measure how a drive reads: the library behind ``mer profile-ssd``.

Every measurement reads with ``O_DIRECT`` into page-aligned buffers (anonymous
mmap) from a pool of threads calling ``os.preadv``, which releases the GIL, the
same way mer's expert reader does:

* sequential reads over a grid of block sizes (128 KiB .. 64 MiB) x threads
  (1, 2, 4, 8, 16); the threads share one cursor that walks the target, so a cell
  with T threads keeps T consecutive blocks in flight, like one expert read split
  into chunks;
* random 4 KiB reads at uniformly random offsets, one thread (QD1) and 16 threads
  (QD16), with per-read latency percentiles;
* buffered reads (through the page cache, the target's pages dropped first)
  against O_DIRECT at the chosen reader settings.

Each cell starts at a different place in the target so that one cell does not
find what the previous one left in the drive's cache. A target is a block device
(opened read-only: this module has no write path for devices), a regular file
(read-only), or a directory, where a test file is written first and always
removed afterwards, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import math
import mmap
import os
import random
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mer_cli import interrupt
from mer_cli.errors import ReadError, ResourceError, UnsupportedError, UsageError
from mer_cli.io_profile import (
    BufferedReads,
    DeviceInfo,
    Profile,
    RandomReads,
    ReaderSettings,
    SequentialCell,
    backing_device,
    describe_device,
    device_id,
    load_profile_for,
)
from mer_cli.units import format_size

__all__ = [
    "BLOCK_SIZES",
    "THREAD_COUNTS",
    "Target",
    "choose_reader",
    "load_profile_for",
    "measure",
    "measure_sequential",
    "open_target",
    "profile_target",
]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BLOCK_SIZES = tuple(128 * KiB << i for i in range(10))  # 128 KiB .. 64 MiB
THREAD_COUNTS = (1, 2, 4, 8, 16)
QUICK_BLOCK_SIZES = (128 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
QUICK_THREAD_COUNTS = (1, 4, 16)
RANDOM_BLOCK = 4096
RANDOM_THREADS = 16
ALIGN = 4096  # O_DIRECT offset, length and buffer alignment we always keep
MIN_CELL_SECONDS = 0.05  # below this a cell is mostly thread start-up
MIN_TARGET_BYTES = 8 * MiB
CACHE_DEFEAT_BYTES = 1 * GiB  # smaller targets may be served from the drive's cache
# O_DIRECT skips the page cache and the buffered cell drops the file's pages first,
# so the test file only has to outgrow the drive's own DRAM cache (~1 GB per TB).
DEFAULT_TEST_FILE_BYTES = 8 * GiB
NEAR_BEST = 0.90  # reader settings: the cheapest cell within 10% of the best
TEST_FILE_PREFIX = ".mer-profile-ssd-"
WRITE_CHUNK = 64 * MiB
ARENA_BYTES = 256 * MiB  # read buffers for all threads together
BLKGETSIZE64 = 0x80081272  # <linux/fs.h>: _IOR(0x12, 114, size_t)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """What is read: the device, the file, or the test file in a directory."""

    path: str  # as the user named it
    read_path: str  # the file or device node actually read
    kind: str  # "device" | "file" | "directory"
    span: int  # bytes that may be read, from offset 0; a multiple of ALIGN
    dev: int  # device number of the drive (st_rdev or the backing st_dev)


# ---------------------------------------------------------------- targets


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise UsageError(
            f"{path}: no such file, directory or device; give a block device "
            "(e.g. /dev/nvme0n1), a large file, or a directory on the drive"
        ) from None
    except PermissionError:
        raise ResourceError(
            f"{path}: permission denied while looking it up; run with sudo or "
            "choose a file or directory you can read"
        ) from None


def _open_direct(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except PermissionError:
        if what != "device":
            hint = "check its permissions or choose a file you can read"
        elif os.geteuid() == 0:  # a container's device cgroup or an LSM said no
            hint = (
                "even root may not read it here (container or security policy); "
                "profile a file or directory on the same drive instead"
            )
        else:
            hint = (
                "run `sudo mer profile-ssd ...`, or profile a file or directory on "
                "the same drive instead"
            )
        raise ResourceError(
            f"{path}: permission denied opening the {what}; {hint}"
        ) from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise UnsupportedError(
                f"{path}: the file system refuses O_DIRECT reads, so its figures "
                "would measure the page cache; profile a file or directory on "
                "the drive itself"
            ) from None
        raise ReadError(f"{path}: cannot open the {what} ({e.strerror})") from None


def _device_bytes(fd: int, path: str, dev: int) -> int:
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
        return struct.unpack("Q", buf)[0]
    except OSError:
        pass
    size_file = Path(f"/sys/dev/block/{device_id(dev)}/size")
    try:
        return int(size_file.read_text()) * 512  # always 512-byte sectors
    except (OSError, ValueError):
        raise ReadError(
            f"{path}: cannot find the device's size (ioctl BLKGETSIZE64 and "
            f"{size_file} both failed)"
        ) from None


def _check_logical_block(dev: int, path: str) -> None:
    lbs = Path(f"/sys/dev/block/{device_id(dev)}/queue/logical_block_size")
    try:
        size = int(lbs.read_text())
    except (OSError, ValueError):
        return
    if size > ALIGN:
        raise UnsupportedError(
            f"{path}: logical block size is {size} bytes; profile-ssd reads "
            f"{ALIGN}-byte aligned blocks and supports logical blocks up to {ALIGN}"
        )


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "not a regular file, directory or block device"


def _free_space(directory: str) -> tuple[int, int]:
    vfs = os.statvfs(directory)
    return vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize


def test_file_size(directory: str, size: int | None) -> int:
    """Bytes of the test file for ``directory``; checks free space up front.

    ``size=None`` picks ``DEFAULT_TEST_FILE_BYTES`` or less when the file system
    has less room. A margin of max(1 GiB, 5% of the file system) stays free.
    """
    free, total = _free_space(directory)
    margin = max(1 * GiB, total // 20)
    room = (free - margin) // ALIGN * ALIGN
    if size is None:
        want = min(DEFAULT_TEST_FILE_BYTES, room) // MiB * MiB
        if want < MIN_TARGET_BYTES:
            raise ResourceError(
                f"{directory}: not enough free space for a test file: "
                f"{format_size(free)} free, {format_size(margin)} kept free, "
                f"at least {format_size(MIN_TARGET_BYTES)} needed; free some space "
                "or choose a directory on another file system"
            )
        return want
    if size < MIN_TARGET_BYTES:
        raise UsageError(
            f"--size {format_size(size)} is too small; a test file needs at "
            f"least {format_size(MIN_TARGET_BYTES)} (a few GiB for figures that "
            "beat the drive's cache)"
        )
    size = -(-size // ALIGN) * ALIGN
    if size > room:
        raise ResourceError(
            f"{directory}: not enough free space for a {format_size(size)} test "
            f"file: {format_size(free)} free and {format_size(margin)} must stay "
            f"free; pass --size {format_size(max(room, 0))} or less, or choose "
            "another directory"
        )
    return size


def _remove_stale_test_files(directory: str, log: Log | None) -> None:
    """Delete test files left by runs that were killed (SIGKILL, power loss)."""
    for p in Path(directory).glob(f"{TEST_FILE_PREFIX}*.tmp"):
        try:
            pid = int(p.name[len(TEST_FILE_PREFIX) : -len(".tmp")])
            os.kill(pid, 0)
            continue  # that run is still going
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        try:
            p.unlink()
            if log:
                log(f"removed {p}, a test file left by an interrupted run")
        except OSError:
            pass


def _write_test_file(path: Path, size: int, progress: bool) -> None:
    """Fill ``path`` with ``size`` bytes of incompressible, non-repeating data."""
    import numpy as np
    from tqdm import tqdm

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise UnsupportedError(
            f"{path.parent}: the file system refuses O_DIRECT, so its figures "
            "would measure the page cache; choose a directory on the drive itself"
        ) from None
    buf = mmap.mmap(-1, min(WRITE_CHUNK, size))
    words = view = None
    try:
        words = np.frombuffer(buf, dtype=np.uint64)
        words[:] = np.random.default_rng(0x5EED).integers(
            0, 2**63, words.size, dtype=np.uint64
        )
        per_page = ALIGN // 8
        stamps = np.arange(words.size // per_page, dtype=np.uint64)
        view = memoryview(buf)
        written = 0
        with tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc="writing test file",
            disable=not progress,
            leave=False,
        ) as bar:
            while written < size:
                # a distinct stamp per 4 KiB page: nothing for dedup to fold
                words[::per_page] = stamps + written // ALIGN
                n = min(len(buf), size - written)
                done = 0
                while done < n:
                    done += os.write(fd, view[done:n])
                written += n
                bar.update(n)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(
                f"{path.parent}: ran out of space writing the test file "
                f"({format_size(size)}); pass a smaller --size"
            ) from None
        raise
    finally:
        words = view = None  # drop the exports so the mmap can close
        buf.close()
        os.close(fd)


@contextmanager
def open_target(
    path: str | os.PathLike,
    size: int | None = None,
    progress: bool = False,
    log: Log | None = None,
) -> Iterator[Target]:
    """Check ``path`` and yield what to read; a directory's test file is removed
    when the block exits, whatever the reason.

    Parameters
    ----------
    path : block device, regular file or directory.
    size : test file bytes for a directory (``None``: default, bounded by space).
    progress : show a progress bar while writing a test file.
    log : receives notes for the user.
    """
    path = os.fspath(path)
    st = _stat(path)
    if stat.S_ISBLK(st.st_mode):
        if size is not None:
            raise UsageError("--size applies to a directory target only")
        fd = _open_direct(path, "device")
        try:
            span = _device_bytes(fd, path, st.st_rdev) // ALIGN * ALIGN
        finally:
            os.close(fd)
        _check_logical_block(st.st_rdev, path)
        if span < MIN_TARGET_BYTES:
            raise UsageError(
                f"{path}: the device holds {format_size(span)}; profile-ssd needs "
                f"at least {format_size(MIN_TARGET_BYTES)} to read"
            )
        yield Target(path, path, "device", span, st.st_rdev)
    elif stat.S_ISREG(st.st_mode):
        if size is not None:
            raise UsageError(
                "--size applies to a directory target only; a file is read as it is"
            )
        os.close(_open_direct(path, "file"))
        span = st.st_size // ALIGN * ALIGN
        if span < MIN_TARGET_BYTES:
            raise UsageError(
                f"{path}: the file holds {format_size(st.st_size)}; profile-ssd "
                f"needs at least {format_size(MIN_TARGET_BYTES)} (a few GiB for "
                "figures that beat the drive's cache); give a bigger file or a "
                "directory, where a test file is written"
            )
        if log and st.st_blocks * 512 < 0.9 * st.st_size:
            log(
                f"{path} is sparse: reading its holes does not touch the drive, "
                "so its figures are too high; use a file with data in it"
            )
        dev = backing_device(st.st_dev)
        _check_logical_block(dev, path)
        yield Target(path, path, "file", span, dev)
    elif stat.S_ISDIR(st.st_mode):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise ResourceError(
                f"{path}: the file system is mounted read-only, so no test file "
                "can be written; give a large file on it or its block device"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ResourceError(
                f"{path}: permission denied creating a test file in the directory; "
                "choose a directory you can write to, or run with sudo"
            )
        _remove_stale_test_files(path, log)
        nbytes = test_file_size(path, size)
        test_file = Path(path) / f"{TEST_FILE_PREFIX}{os.getpid()}.tmp"
        try:
            _write_test_file(test_file, nbytes, progress)
            dev = backing_device(os.stat(test_file).st_dev)
            _check_logical_block(dev, path)
            yield Target(path, str(test_file), "directory", nbytes, dev)
        finally:
            try:
                test_file.unlink()
            except FileNotFoundError:
                pass
    else:
        raise UsageError(
            f"{path}: is {_kind_name(st.st_mode)}; give a block device, a regular "
            "file or a directory"
        )


@contextmanager
def _signals_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- measuring


class _Bench:
    """Threads, page-aligned buffers and a stop flag shared by all cells.

    The buffers are one arena of at most ``ARENA_BYTES``, populated once (page
    faults are slow in VMs). When threads x block exceeds it, threads share
    buffers: the data is thrown away and the drive's DMA does not care.
    """

    def __init__(self, path: str, fd: int, span: int, max_block: int, max_threads: int):
        self.path = path
        self.fd = fd
        self.span = span
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_threads, thread_name_prefix="profile")
        size = max(max_block, min(ARENA_BYTES, max_block * max_threads))
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.arena = mmap.mmap(-1, size, flags=flags)  # page-aligned

    def buffers(self, block: int, threads: int) -> list[memoryview]:
        slots = len(self.arena) // block
        mv = memoryview(self.arena)
        return [
            mv[(i % slots) * block : (i % slots + 1) * block] for i in range(threads)
        ]

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.arena.close()

    def _run(self, work: Callable[[int, memoryview], object], bufs: list) -> list:
        futures = [self.pool.submit(work, i, buf) for i, buf in enumerate(bufs)]
        try:
            return [interrupt.result(f) for f in futures]
        except BaseException:
            self.stop.set()  # the other threads finish their current read
            wait(futures)
            raise
        finally:
            for buf in bufs:
                buf.release()  # the arena can only close without exports

    def _check(self, got: int, want: int, offset: int) -> None:
        if got != want:
            raise ReadError(
                f"{self.path}: short read, {got} of {want} bytes at offset "
                f"{offset}; did the target shrink during the run?"
            )

    def sequential(
        self,
        block: int,
        threads: int,
        seconds: float,
        start: float,
        fd: int = -1,
        one_pass: bool = False,
    ) -> float:
        """GB/s of ``threads`` threads reading ``block``-byte blocks in order.

        The shared cursor starts at fraction ``start`` of the span and wraps
        around; ``one_pass`` stops at the first block read twice instead (for
        buffered reads, whose second pass would come from the page cache).
        """
        fd = self.fd if fd < 0 else fd
        nblocks = self.span // block
        first = int(start * nblocks)
        cursor = itertools.count()  # next() is atomic under the GIL
        bufs = self.buffers(block, threads)
        t0 = time.perf_counter()
        deadline = t0 + seconds

        def work(i: int, buf: memoryview) -> tuple[int, float]:
            total = 0
            while True:
                k = next(cursor)
                if one_pass and k >= nblocks:
                    return total, time.perf_counter()
                off = (first + k) % nblocks * block
                got = os.preadv(fd, [buf], off)
                self._check(got, block, off)
                total += got
                now = time.perf_counter()
                if now >= deadline or self.stop.is_set():
                    return total, now

        results = self._run(work, bufs)
        elapsed = max(end for _, end in results) - t0
        return sum(n for n, _ in results) / elapsed / 1e9

    def random(
        self, threads: int, seconds: float, seed: int
    ) -> tuple[float, float, float]:
        """(IOPS, p50 us, p99 us) of 4 KiB reads at uniformly random offsets."""
        nblocks = self.span // RANDOM_BLOCK
        bufs = self.buffers(RANDOM_BLOCK, threads)
        t0 = time.perf_counter_ns()
        deadline = t0 + int(seconds * 1e9)

        def work(i: int, buf: memoryview) -> tuple[list[int], int]:
            rng = random.Random(seed * 1009 + i)
            lat = []
            while True:
                off = rng.randrange(nblocks) * RANDOM_BLOCK
                t = time.perf_counter_ns()
                got = os.preadv(self.fd, [buf], off)
                now = time.perf_counter_ns()
                self._check(got, RANDOM_BLOCK, off)
                lat.append(now - t)
                if now >= deadline or self.stop.is_set():
                    return lat, now

        results = self._run(work, bufs)
        lat = sorted(x for lats, _ in results for x in lats)
        elapsed = (max(end for _, end in results) - t0) / 1e9
        return len(lat) / elapsed, _percentile(lat, 0.50), _percentile(lat, 0.99)


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile of nanosecond latencies, in microseconds."""
    k = max(1, math.ceil(q * len(sorted_ns)))
    return sorted_ns[k - 1] / 1000


def choose_reader(cells: list[SequentialCell]) -> ReaderSettings:
    """Reader settings: among cells within ``NEAR_BEST`` of the best GB/s, the one
    with the fewest bytes in flight (threads x block), then the fewest threads.

    Fewer bytes in flight reach full speed on smaller experts and hold less
    memory; fewer threads cost less CPU.
    """
    best = max(c.gbps for c in cells)
    near = [c for c in cells if c.gbps >= NEAR_BEST * best]
    pick = min(near, key=lambda c: (c.threads * c.block_bytes, c.threads))
    return ReaderSettings(
        threads=pick.threads, chunk_bytes=pick.block_bytes, best_read_gbps=best
    )


def plan_grid(span: int, quick: bool) -> list[tuple[int, int]]:
    """(block bytes, threads) cells; blocks bigger than a quarter of the target
    are left out so that each cell walks over several blocks."""
    blocks = QUICK_BLOCK_SIZES if quick else BLOCK_SIZES
    threads = QUICK_THREAD_COUNTS if quick else THREAD_COUNTS
    return [(b, t) for b in blocks if 4 * b <= span for t in threads]


def _spread(i: int) -> float:
    """Start of cell ``i`` as a fraction of the target (golden-ratio sequence)."""
    return (i * 0.6180339887498949) % 1.0


def _check_duration(duration: float) -> None:
    if not (duration > 0 and math.isfinite(duration)):
        raise UsageError(f"--duration {duration:g} must be a number of seconds > 0")


def measure(
    target: Target,
    duration: float = 60.0,
    quick: bool = False,
    progress: bool = False,
    log: Log | None = None,
    seed: int = 0,
) -> Profile:
    """Run every cell on ``target`` and return the profile (not yet saved).

    ``duration`` seconds are split evenly over the cells; each cell gets at least
    ``MIN_CELL_SECONDS`` and at least one read per thread.
    """
    from tqdm import tqdm

    _check_duration(duration)
    grid = plan_grid(target.span, quick)
    ncells = len(grid) + 4  # + random QD1 and QD16, buffered and its direct twin
    cell_s = max(duration / ncells, MIN_CELL_SECONDS)
    if log and cell_s * ncells > duration * 1.01:
        log(
            f"--duration {duration:g} s is short for {ncells} cells; each gets "
            f"{MIN_CELL_SECONDS} s, {cell_s * ncells:.1f} s in all"
        )
    if log and target.span < CACHE_DEFEAT_BYTES:
        log(
            f"only {format_size(target.span)} to read: figures may come from the "
            "drive's own cache; use a target of a few GiB for real figures"
        )
    max_block = max([b for b, _ in grid] + [RANDOM_BLOCK])
    max_threads = max([t for _, t in grid] + [RANDOM_THREADS])
    fd = _open_direct(target.read_path, "device" if target.kind == "device" else "file")
    bench = _Bench(target.read_path, fd, target.span, max_block, max_threads)
    cells: list[SequentialCell] = []
    try:
        with tqdm(
            total=ncells, unit="cell", desc="profile", disable=not progress
        ) as bar:
            for i, (block, threads) in enumerate(grid):
                bar.set_postfix_str(f"seq {format_size(block)} x {threads}")
                gbps = bench.sequential(block, threads, cell_s, _spread(i))
                cells.append(SequentialCell(block, threads, gbps))
                bar.update(1)
            bar.set_postfix_str("random 4 KiB QD1")
            qd1 = bench.random(1, cell_s, seed)
            bar.update(1)
            bar.set_postfix_str(f"random 4 KiB x {RANDOM_THREADS}")
            qd16 = bench.random(RANDOM_THREADS, cell_s, seed + 1)
            bar.update(1)
            reader = choose_reader(cells)
            bar.set_postfix_str("buffered")
            buffered = _buffered(bench, target, reader, cell_s, _spread(len(grid)))
            bar.update(2)
    finally:
        bench.close()
        os.close(fd)
    name, model = describe_device(target.dev)
    device = DeviceInfo(
        id=device_id(target.dev),
        name=name,
        model=model,
        target=os.path.abspath(target.path),
        kind=target.kind,
        span_bytes=target.span,
        measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        duration_s=round(cell_s * ncells, 3),
    )
    return Profile(
        device=device,
        reader=reader,
        sequential=cells,
        random=RandomReads(*qd1, *qd16),
        buffered=buffered,
    )


def measure_sequential(
    target: Target, block: int, threads: int, seconds: float, start: float = 0.0
) -> float:
    """GB/s of one sequential O_DIRECT cell on ``target`` (as in the grid).

    ``threads`` threads share a cursor that starts at fraction ``start`` of the
    span, so ``threads`` consecutive ``block``-byte reads are in flight.
    """
    if block % ALIGN or not ALIGN <= block <= target.span:
        raise UsageError(
            f"block size {block} must be a multiple of {ALIGN} and at most "
            f"the target's {target.span} bytes"
        )
    fd = _open_direct(target.read_path, "device" if target.kind == "device" else "file")
    bench = _Bench(target.read_path, fd, target.span, block, threads)
    try:
        return bench.sequential(block, threads, seconds, start)
    finally:
        bench.close()
        os.close(fd)


def _buffered(
    bench: _Bench, target: Target, reader: ReaderSettings, seconds: float, start: float
) -> BufferedReads:
    """Buffered GB/s at the reader settings, beside the O_DIRECT cell's figure."""
    fd = os.open(target.read_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # drop the target's cached pages before and after: measure the drive,
        # and leave the page cache as we found it
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        gbps = bench.sequential(
            reader.chunk_bytes, reader.threads, seconds, start, fd, one_pass=True
        )
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    direct = bench.sequential(
        reader.chunk_bytes, reader.threads, seconds, (start + 0.5) % 1.0
    )
    return BufferedReads(
        gbps=gbps,
        direct_gbps=direct,
        block_bytes=reader.chunk_bytes,
        threads=reader.threads,
    )


def profile_target(
    path: str | os.PathLike,
    size: int | None = None,
    duration: float = 60.0,
    quick: bool = False,
    progress: bool = False,
    log: Log | None = None,
) -> Profile:
    """Profile the drive behind ``path`` (device, file or directory).

    A directory's test file is written first (outside ``duration``) and removed
    afterwards, also when the run is interrupted (Ctrl-C, SIGTERM, SIGHUP) or
    fails. Nothing is ever written to a device or a given file.

    Parameters
    ----------
    path : block device, regular file or directory.
    size : test file bytes for a directory target; ``None`` for the default.
    duration : seconds for all measurements together (split across cells).
    quick : a smaller grid (5 block sizes x 1, 4, 16 threads).
    progress : show progress bars on stderr.
    log : receives notes for the user (small target, short duration, ...).

    Returns
    -------
    Profile : the measurements and chosen reader settings (not saved).
    """
    _check_duration(duration)  # before a test file is written
    with _signals_exit(), open_target(path, size, progress, log) as target:
        return measure(target, duration, quick, progress, log)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= MiB else f"{n >> 10} KiB"


def format_report(profile: Profile) -> str:
    """A readable table of ``profile`` (what ``mer profile-ssd`` prints)."""
    d, r = profile.device, profile.reader
    model = f", {d.model}" if d.model else ""
    lines = [
        f"{d.kind} {d.target}: device {d.name or '?'} [{d.id}{model}], "
        f"span {format_size(d.span_bytes)}, {d.duration_s:.1f} s of reads",
        "",
        "sequential reads, GB/s (O_DIRECT; R reader settings, * best if not R)",
    ]
    blocks = sorted({c.block_bytes for c in profile.sequential})
    threads = sorted({c.threads for c in profile.sequential})
    gbps = {(c.block_bytes, c.threads): c.gbps for c in profile.sequential}
    lines.append("  block   " + "".join(f"{f'{t} thr':>10s}" for t in threads))
    for b in blocks:
        row = f"  {_size(b):>7s} "
        for t in threads:
            g = gbps.get((b, t))
            mark = " "
            if g is not None and g == r.best_read_gbps:
                mark = "*"
            if (b, t) == (r.chunk_bytes, r.threads):
                mark = "R"
            row += f"{'-' if g is None else f'{g:.2f}':>9s}{mark}"
        lines.append(row)
    rnd, buf = profile.random, profile.buffered
    lines += [
        "",
        "random 4 KiB reads          IOPS     p50 us     p99 us",
        f"  QD1  (1 thread)    {rnd.qd1_iops:>12,.0f} {rnd.qd1_p50_us:>10,.0f} "
        f"{rnd.qd1_p99_us:>10,.0f}",
        f"  QD16 (16 threads)  {rnd.qd16_iops:>12,.0f} {rnd.qd16_p50_us:>10,.0f} "
        f"{rnd.qd16_p99_us:>10,.0f}",
        "",
        f"buffered vs O_DIRECT at {buf.threads} x {_size(buf.block_bytes)}: "
        f"{buf.gbps:.2f} vs {buf.direct_gbps:.2f} GB/s",
        f"reader settings: {r.threads} threads x {_size(r.chunk_bytes)} chunks "
        f"(the least in flight within {100 - NEAR_BEST * 100:.0f}% of the best, "
        f"{r.best_read_gbps:.2f} GB/s)",
    ]
    return "\n".join(lines)
