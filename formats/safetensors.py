"""Read and write safetensors files tensor by tensor, without holding a model in RAM.

Format: ``u64`` little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the data; offsets are relative to the end of the header.
Reading memory-maps the file and hands out zero-copy views; ``BF16`` comes back
as ``uint16`` bit patterns (numpy has no bfloat16) -- use :func:`to_f32`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mer_cli.errors import FormatError, UnsupportedError
from mer_cli.formats.quant import bf16_to_f32

# safetensors dtype -> numpy dtype (BF16 as raw bits)
DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "u1",
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 * 1024 * 1024


class TensorInfo(NamedTuple):
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from e
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise FormatError(
                    f"{self.path}: file is {size} bytes, too short for the 8-byte "
                    "header length; the download is truncated, fetch it again"
                )
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{self.path}: header length is {n} bytes but the file has only "
                    f"{size - 8} after it; the file is truncated or not safetensors"
                )
            try:
                header = json.loads(os.pread(fd, n, 8))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FormatError(f"{self.path}: header is not valid JSON ({e})") from e
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        self.size = size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, d in header.items():
            where = f"{self.path}: tensor {name!r}"
            try:
                dtype, shape, (b, e) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise FormatError(
                    f"{where}: header entry is malformed ({d!r})"
                ) from err
            if dtype not in DTYPES:
                raise UnsupportedError(
                    f"{where}: dtype {dtype!r} is not supported; mer reads "
                    + ", ".join(DTYPES)
                )
            want = (
                int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            )
            if not (isinstance(b, int) and isinstance(e, int)) or b < 0:
                raise FormatError(
                    f"{where}: data_offsets {[b, e]} are not offsets into the data; "
                    "the file is corrupt"
                )
            if e - b != want:
                raise FormatError(
                    f"{where}: data_offsets {[b, e]} hold {e - b} bytes, expected {want} "
                    f"for {dtype}{list(shape)}"
                )
            if base + e > size:
                raise FormatError(
                    f"{where}: data ends at byte {base + e} but the file has {size} bytes; "
                    "the file is truncated, fetch it again"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)
        self._buf = np.frombuffer(self._mm, np.uint8) if self._mm is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view in the file's own dtype (BF16 as ``uint16`` bits)."""
        t = self.tensors[name]
        return self._buf[t.begin : t.end].view(DTYPES[t.dtype]).reshape(t.shape)

    def f32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy unless it already is F32)."""
        return to_f32(self.raw(name), self.tensors[name].dtype)

    def release(self, name: str, index: int | None = None) -> None:
        """Drop the mapped pages of a tensor (or of ``tensor[index]``) once consumed.

        Pages of a file mapping stay in the process's resident set once touched;
        ``MADV_DONTNEED`` unmaps them (the page cache keeps the data, and a later
        access simply faults them in again), so reading a checkpoint tensor by
        tensor keeps peak RSS near one tensor instead of the whole file.
        """
        t = self.tensors[name]
        begin, end = t.begin, t.end
        if index is not None:  # one slice of a stacked tensor
            per = (t.end - t.begin) // t.shape[0]
            begin += index * per
            end = begin + per
        self._release_range(begin, end)

    def release_array(self, a: np.ndarray) -> bool:
        """Drop the pages under ``a``, a contiguous view from :meth:`raw`.

        Returns False (and does nothing) when ``a`` does not lie in this file.
        """
        if self._buf is None or not a.flags.c_contiguous:
            return False
        begin = a.ctypes.data - self._buf.ctypes.data
        if not 0 <= begin <= begin + a.nbytes <= self.size:
            return False
        self._release_range(begin, begin + a.nbytes)
        return True

    def _release_range(self, begin: int, end: int) -> None:
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-begin // page) * page  # only pages wholly inside the range
        stop = end // page * page
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a raw view of safetensors ``dtype`` to float32."""
    if dtype == "BF16":
        return bf16_to_f32(a)
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"dtype {dtype} is not a float type")
    return np.asarray(a, dtype=np.float32)


class Checkpoint:
    """All ``*.safetensors`` files of a Hugging Face checkpoint directory.

    Uses ``model.safetensors.index.json`` when present (every listed file must
    exist), else every ``*.safetensors`` file in the directory.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: not a valid index ({e})") from e
            names = sorted(set(weight_map.values()))
            for nm in names:
                if not (self.dir / nm).is_file():
                    raise FormatError(
                        f"{index}: lists {nm}, which is missing from {self.dir}; "
                        "the download is incomplete"
                    )
        else:
            names = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not names:
            raise FormatError(f"{self.dir}: no *.safetensors files found")
        self.files = [SafetensorsFile(self.dir / nm) for nm in names]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.tensors:
                self.where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> TensorInfo:
        return self._file(name).tensors[name]

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self.where[name]
        except KeyError:
            raise FormatError(
                f"{self.dir}: tensor {name!r} is missing from the checkpoint; the "
                "download is incomplete or the architecture does not match config.json"
            ) from None

    def f32(self, name: str) -> np.ndarray:
        return self._file(name).f32(name)

    def raw(self, name: str) -> np.ndarray:
        return self._file(name).raw(name)

    def release(self, name: str, index: int | None = None) -> None:
        """Drop the resident pages of a consumed tensor (see ``SafetensorsFile``)."""
        self._file(name).release(name, index)

    def release_array(self, a: np.ndarray) -> None:
        """Drop the resident pages under a view ``a`` of one of the files."""
        for f in self.files:
            if f.release_array(a):
                return

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front.

    The header (with every offset) is written first; tensors then go in the
    declared order, one ``write`` each, so a model never sits in RAM whole::

        w = SafetensorsWriter(path, [("a", "F32", (4, 8)), ...], metadata)
        w.write("a", array)
        w.close()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = metadata
        off = 0
        self._order = []
        for name, dtype, shape in tensors:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [off, off + n],
            }
            self._order.append((name, dtype, tuple(shape), n))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor; ``array`` must already have the declared dtype."""
        want, dtype, shape, n = self._order[self._next]
        if name != want or tuple(array.shape) != shape or array.nbytes != n:
            raise ValueError(
                f"expected {want} {dtype}{list(shape)}, got {name} {array.shape}"
            )
        arr = np.ascontiguousarray(array, dtype=DTYPES[dtype])
        self._f.write(memoryview(arr).cast("B"))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors written")
        self._f.close()
