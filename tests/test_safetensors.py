"""Safetensors reading (mmap, zero copy, bf16) and writing, and every malformed-file error.

Files are checked against the format as the safetensors spec defines it: the
test builds some of them byte by byte rather than with our writer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from mer_cli.errors import FormatError, UnsupportedError
from mer_cli.formats import quant
from mer_cli.formats.safetensors import (
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    to_f32,
)


def raw_file(path: Path, header: dict, data: bytes = b"", length: int | None = None):
    """A safetensors file written by hand: u64 header length, JSON, data."""
    h = json.dumps(header).encode()
    n = len(h) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path


def test_writer_output_follows_the_spec_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float16)
    c = np.arange(6, dtype=np.int64).reshape(2, 3)
    bf = quant.f32_to_bf16(rng.standard_normal((2, 4)).astype(np.float32))
    p = tmp_path / "m.safetensors"
    tensors = [("a", "F32", a.shape), ("b", "F16", b.shape), ("c", "I64", c.shape)]
    w = SafetensorsWriter(p, tensors + [("bf", "BF16", bf.shape)], {"format": "pt"})
    for name, arr in (("a", a), ("b", b), ("c", c), ("bf", bf)):
        w.write(name, arr)
    w.close()
    # parse by hand: header length, JSON, data 8-byte aligned, offsets relative
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    b0, b1 = header["a"]["data_offsets"]
    np.testing.assert_array_equal(
        np.frombuffer(raw[8 + n + b0 : 8 + n + b1], "<f4").reshape(3, 5), a
    )
    f = SafetensorsFile(p)
    assert f.metadata == {"format": "pt"}
    np.testing.assert_array_equal(f.raw("a"), a)
    np.testing.assert_array_equal(f.raw("b"), b)
    np.testing.assert_array_equal(f.raw("c"), c)
    assert f.raw("bf").dtype == np.uint16
    np.testing.assert_array_equal(f.f32("bf"), quant.bf16_to_f32(bf))
    np.testing.assert_array_equal(f.f32("b"), b.astype(np.float32))
    # zero copy: views of the read-only map
    v = f.raw("a")
    assert not v.flags.writeable and not v.flags.owndata
    assert "a" in f and "zz" not in f


def test_writer_refuses_out_of_order_and_incomplete(tmp_path):
    w = SafetensorsWriter(
        tmp_path / "x.safetensors", [("a", "F32", (2,)), ("b", "F32", (3,))]
    )
    with pytest.raises(ValueError, match="expected a F32"):
        w.write("b", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="only 1 of 2 tensors written"):
        w.close()


def test_to_f32_refuses_integer_tensors():
    with pytest.raises(UnsupportedError, match="dtype I64 is not a float type"):
        to_f32(np.zeros(3, np.int64), "I64")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "file is 2 bytes, too short for the 8-byte header length"),
        (
            lambda p: raw_file(p, {}, length=1000),
            "header length is 1000 bytes but the file has only 2 after it; the file is truncated or not safetensors",
        ),
        (lambda p: raw_file(p, {}, length=2).write_bytes(b"\x02" + b"\0" * 7 + b"{x"), "header is not valid JSON"),
        (
            lambda p: raw_file(p, {"t": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"),
            "tensor 't': dtype 'F8_E5M2' is not supported; mer reads F64, F32, F16, BF16",
        ),
        (
            lambda p: raw_file(p, {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "tensor 't': data_offsets [0, 8] hold 8 bytes, expected 12 for F32[3]",
        ),
        (
            lambda p: raw_file(p, {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 10),
            "tensor 't': data ends at byte",
        ),
        (
            lambda p: raw_file(p, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 8),
            "tensor 't': data_offsets [-4, 0] are not offsets into the data",
        ),
        (lambda p: raw_file(p, {"t": {"dtype": "F32"}}), "tensor 't': header entry is malformed"),
    ],
    ids=["short", "header-past-end", "bad-json", "dtype", "size", "truncated", "negative", "malformed"],
)  # fmt: skip
def test_malformed_files_name_file_and_problem(tmp_path, make, message):
    p = tmp_path / "bad.safetensors"
    make(p)
    with pytest.raises((FormatError, UnsupportedError)) as e:
        SafetensorsFile(p)
    assert str(e.value).startswith(f"{p}: ")
    assert message in str(e.value)


def test_truncated_file_message_gives_sizes(tmp_path):
    p = tmp_path / "t.safetensors"
    w = SafetensorsWriter(p, [("a", "F32", (4, 4))])
    w.write("a", np.ones((4, 4), np.float32))
    w.close()
    size = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(FormatError) as e:
        SafetensorsFile(p)
    assert str(e.value) == (
        f"{p}: tensor 'a': data ends at byte {size} but the file has {size - 5} "
        "bytes; the file is truncated, fetch it again"
    )


def _shards(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    wm = {}
    for i, names in enumerate((["x", "y"], ["z"])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        w = SafetensorsWriter(d / fname, [(n, "F32", (2, 2)) for n in names])
        for k, n in enumerate(names):
            w.write(n, np.full((2, 2), 10 * i + k, np.float32))
            wm[n] = fname
        w.close()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return d


def test_checkpoint_reads_sharded_files_through_the_index(tmp_path):
    d = _shards(tmp_path)
    ck = Checkpoint(d)
    assert ck.f32("z")[0, 0] == 10 and ck.f32("y")[1, 1] == 1
    assert ck.info("z").shape == (2, 2)
    assert ck.nbytes == sum(p.stat().st_size for p in d.glob("*.safetensors"))
    with pytest.raises(FormatError) as e:
        ck.f32("w")
    assert str(e.value) == (
        f"{d}: tensor 'w' is missing from the checkpoint; the download is "
        "incomplete or the architecture does not match config.json"
    )


def test_checkpoint_errors(tmp_path):
    d = _shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FormatError, match="lists model-00002-of-00002.safetensors, which is missing"
    ):
        Checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(FormatError, match="not a valid index"):
        Checkpoint(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match=r"no \*.safetensors files found"):
        Checkpoint(empty)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_release_drops_resident_pages_and_data_stays_readable(tmp_path):
    p = tmp_path / "big.safetensors"
    n = 8 * 1024 * 1024  # 32 MiB of f32
    w = SafetensorsWriter(p, [("a", "F32", (n,)), ("b", "F32", (2, n // 2))])
    w.write("a", np.arange(n, dtype=np.float32))
    w.write("b", np.ones((2, n // 2), np.float32))
    w.close()
    f = SafetensorsFile(p)
    before = _rss_file_kib()
    assert float(f.raw("a").sum(dtype=np.float64)) == n * (n - 1) / 2
    touched = _rss_file_kib()
    assert touched - before > 24 * 1024
    f.release("a")
    assert touched - _rss_file_kib() > 24 * 1024
    assert f.raw("a")[12345] == 12345  # faults back in from the page cache
    # one row of a stacked tensor
    f.raw("b").sum()
    mid = _rss_file_kib()
    f.release("b", 0)
    assert mid - _rss_file_kib() > 12 * 1024
    assert f.raw("b")[0, 7] == 1


def test_release_array_drops_the_pages_under_a_view(tmp_path):
    p = tmp_path / "v.safetensors"
    n = 4 * 1024 * 1024  # 16 MiB of f32
    w = SafetensorsWriter(p, [("a", "F32", (n,))])
    w.write("a", np.ones(n, np.float32))
    w.close()
    f = SafetensorsFile(p)
    assert f.raw("a").sum() == n
    touched = _rss_file_kib()
    assert f.release_array(f.raw("a")[: n // 2])
    assert 6 * 1024 < touched - _rss_file_kib() < 10 * 1024  # about 8 MiB
    assert not f.release_array(np.ones(10, np.float32))  # not from this file
    assert not f.release_array(f.raw("a")[::2])  # not contiguous
