"""The MER store: a directory with ``manifest.json`` and page-aligned data files.

Layout (``man/mer-store.5`` documents every field)::

    STORE/manifest.json                 format, version, model, tokenizer, tables
    STORE/tokenizer.json                the Hugging Face tokenizer
    STORE/dense.bin                     resident tensors
    STORE/experts-00001-of-0000N.bin    one extent per routed expert

Every data file starts with a 4096-byte header (``MERDATA\\0``, format version,
file index, the store's 16-byte id) so a file from another store is caught.
Dense tensors start on 64-byte boundaries; each expert extent starts on a
4096-byte boundary and its length is a multiple of 4096, so one O_DIRECT read
lands it in a page-aligned slab. All integers are little-endian.

``StoreWriter`` builds a store in a temporary directory next to the target and
renames it into place on :meth:`StoreWriter.commit`; ``Store`` opens and checks
one.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import FormatError, MerError, ResourceError, UsageError
from mer_cli.formats import quant
from mer_cli.formats.quant import PAGE, SUBALIGN, align
from mer_cli.models.config import ModelConfig

FORMAT = "mer-store"
VERSION = 1
# optional features a manifest may use without a version bump (a reader that
# does not know them still reads the store correctly): 1 = expert files outside
# the store directory (mer shard), "replicas" of experts, the "layout" object
MINOR_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.bin"
DATA_MAGIC = b"MERDATA\0"
HEADER = struct.Struct("<8sII16s")  # magic, format version, file index, store id
EXPERT_PARTS = ("gate_up", "down")


def checksum(buf: np.ndarray | bytes | memoryview) -> int:
    """CRC-32 (zlib) of a byte buffer, as stored in the manifest."""
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


@dataclass(frozen=True)
class TensorEntry:
    """Where a dense tensor lives: ``file`` indexes the manifest's ``files``."""

    name: str
    file: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    crc32: int


@dataclass(frozen=True)
class ExpertEntry:
    """One routed expert's extent.

    ``replicas`` holds ``(file, offset)`` of byte-identical copies on other
    files (``mer shard`` copies the hottest experts onto several drives); the
    reader may take any copy.
    """

    layer: int
    expert: int
    file: int
    offset: int
    nbytes: int
    crc32: int
    replicas: tuple[tuple[int, int], ...] = ()

    @property
    def copies(self) -> tuple[tuple[int, int], ...]:
        """``(file, offset)`` of every copy, the primary first."""
        return ((self.file, self.offset), *self.replicas)


@dataclass(frozen=True)
class PartLayout:
    """A sub-tensor inside every expert extent (same for all experts)."""

    dtype: str
    shape: tuple[int, int]
    offset: int
    nbytes: int


def expert_layout(cfg: ModelConfig, dtype: str) -> tuple[dict[str, PartLayout], int]:
    """Sub-tensor layout of one expert extent and the extent's padded size."""
    D, F = cfg.hidden_size, cfg.expert_ffn
    parts, off = {}, 0
    for name, shape in (("gate_up", (2 * F, D)), ("down", (D, F))):
        quant.check_shape(dtype, shape, f"expert {name}")
        n = quant.tensor_nbytes(dtype, shape)
        parts[name] = PartLayout(dtype, shape, off, n)
        off = align(off + n, SUBALIGN)
    return parts, align(off, PAGE)


def _header(index: int, store_id: bytes) -> bytes:
    return HEADER.pack(DATA_MAGIC, VERSION, index, store_id).ljust(PAGE, b"\0")


# =================================================================== writer


class StoreWriter:
    """Write a store into ``path`` atomically.

    Use as a context manager; an exception (or Ctrl-C) inside the block removes
    the temporary directory, so no half-written store can look valid::

        with StoreWriter(out, cfg, expert_dtype="q4", dense_dtype="q8",
                         tokenizer=tok_info) as w:
            w.add_dense("embed", quant.encode(emb, "q8"), "q8", emb.shape)
            w.add_expert(0, 0, {"gate_up": gu_bytes, "down": down_bytes})
            ...
            w.add_file("tokenizer.json", tokenizer_bytes)
            w.commit()

    Not thread-safe: quantize in parallel, write from one thread.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: ModelConfig,
        *,
        expert_dtype: str = "q4",
        dense_dtype: str = "q8",
        tokenizer: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        force: bool = False,
        max_file_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not force:
            raise UsageError(
                f"{self.path}: output already exists; choose another -o or pass --force "
                "to replace it"
            )
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"{self.path}: parent directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ResourceError(
                f"{self.path}: cannot write into {parent} (permission denied); "
                "choose a writable -o"
            )
        self.model = model
        self.expert_dtype, self.dense_dtype = expert_dtype, dense_dtype
        self.parts, self.extent_nbytes = expert_layout(model, expert_dtype)
        if max_file_size is not None and max_file_size < self.extent_nbytes + PAGE:
            raise UsageError(
                f"max file size {max_file_size} is smaller than one expert extent "
                f"({self.extent_nbytes} bytes) plus the header"
            )
        self.max_file_size = max_file_size
        self.tokenizer = dict(tokenizer or {})
        self.source = dict(source or {})
        self.store_id = uuid.uuid4().bytes
        _remove_stale_temporaries(parent, self.path.name)
        self.tmp = parent / f".{self.path.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._dense_f = open(self.tmp / DENSE_FILE, "wb")
        self._dense_f.write(_header(0, self.store_id))
        self.dense: dict[str, TensorEntry] = {}
        self.experts: dict[tuple[int, int], ExpertEntry] = {}
        self._expert_files: list[Any] = []  # open file objects, index i -> file i+1
        self._extra_files: list[str] = []
        self._committed = False

    # -------------------------------------------------------------- adding data

    def add_dense(self, name: str, data: np.ndarray, dtype: str, shape) -> None:
        """Append an encoded dense tensor (``uint8`` bytes from ``quant.encode``)."""
        shape = tuple(int(s) for s in shape)
        want = quant.tensor_nbytes(dtype, shape)
        if data.nbytes != want:
            raise ValueError(
                f"{name}: {data.nbytes} bytes for {dtype}{list(shape)}, expected {want}"
            )
        if name in self.dense:
            raise ValueError(f"dense tensor {name} added twice")
        f = self._dense_f
        off = align(f.tell(), SUBALIGN)
        f.write(b"\0" * (off - f.tell()))
        f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.dense[name] = TensorEntry(name, 0, off, want, dtype, shape, checksum(data))

    def add_expert(self, layer: int, expert: int, parts: dict[str, np.ndarray]) -> None:
        """Append one expert extent from its encoded parts (``gate_up``, ``down``)."""
        if (layer, expert) in self.experts:
            raise ValueError(f"expert ({layer}, {expert}) added twice")
        extent = np.zeros(self.extent_nbytes, np.uint8)
        for name, lay in self.parts.items():
            data = parts[name]
            if data.nbytes != lay.nbytes:
                raise ValueError(
                    f"expert part {name}: {data.nbytes} bytes, expected {lay.nbytes}"
                )
            extent[lay.offset : lay.offset + lay.nbytes] = data.reshape(-1).view(
                np.uint8
            )
        f = self._expert_file_for(self.extent_nbytes)
        off = f.tell()
        f.write(memoryview(extent))
        index = len(self._expert_files)  # file 0 is dense.bin
        self.experts[(layer, expert)] = ExpertEntry(
            layer, expert, index, off, self.extent_nbytes, checksum(extent)
        )

    def _expert_file_for(self, nbytes: int):
        files = self._expert_files
        if not files or (
            self.max_file_size is not None
            and files[-1].tell() + nbytes > self.max_file_size
        ):
            index = len(files) + 1
            f = open(self.tmp / f"experts-{index:05d}.part", "wb")
            f.write(_header(index, self.store_id))
            files.append(f)
        return files[-1]

    def add_file(self, name: str, data: bytes) -> None:
        """Copy a side file (``tokenizer.json``) into the store."""
        (self.tmp / name).write_bytes(data)
        self._extra_files.append(name)

    # -------------------------------------------------------------- finishing

    def _check_complete(self) -> None:
        cfg = self.model
        missing = [
            (layer, e)
            for layer in range(cfg.num_layers)
            for e in range(cfg.num_experts)
            if (layer, e) not in self.experts
        ]
        if missing:
            raise ValueError(
                f"{len(missing)} experts were never added, first {missing[0]}"
            )

    def commit(self) -> Path:
        """Write the manifest, sync, and rename the store into place."""
        self._check_complete()
        n = len(self._expert_files)
        names = [DENSE_FILE] + [
            f"experts-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)
        ]
        for f in [self._dense_f, *self._expert_files]:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for i in range(1, n + 1):
            os.replace(self.tmp / f"experts-{i:05d}.part", self.tmp / names[i])
        files = [
            {
                "path": nm,
                "role": "dense" if i == 0 else "experts",
                "nbytes": (self.tmp / nm).stat().st_size,
            }
            for i, nm in enumerate(names)
        ]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "store_id": self.store_id.hex(),
            "created_by": _created_by(),
            "source": self.source,
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer,
            "quantization": {
                "experts": self.expert_dtype,
                "dense": self.dense_dtype,
                "group_size": quant.GROUP,
                "scale_dtype": "f16",
                "q4_offset": 8,
                "symmetric": True,
            },
            "files": files,
            "dense": {
                e.name: {
                    "file": e.file,
                    "offset": e.offset,
                    "nbytes": e.nbytes,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "crc32": e.crc32,
                }
                for e in self.dense.values()
            },
            "expert_layout": {
                "nbytes": self.extent_nbytes,
                "parts": {
                    k: {
                        "dtype": p.dtype,
                        "shape": list(p.shape),
                        "offset": p.offset,
                        "nbytes": p.nbytes,
                    }
                    for k, p in self.parts.items()
                },
            },
            "experts": [
                {
                    "layer": e.layer,
                    "expert": e.expert,
                    "file": e.file,
                    "offset": e.offset,
                    "nbytes": e.nbytes,
                    "crc32": e.crc32,
                }
                for _, e in sorted(self.experts.items())
            ],
        }
        mpath = self.tmp / MANIFEST
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.path.exists():  # --force: move the old store aside, then drop it
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        self._committed = True
        return self.path

    def abort(self) -> None:
        """Remove everything written so far."""
        for f in [self._dense_f, *self._expert_files]:
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete ``.NAME.tmp-PID`` directories whose writer process is gone.

    A writer killed with SIGKILL cannot clean up; its temporary directory can be
    as large as the model, so the next writer of the same store removes it.
    """
    for tmp in parent.glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _created_by() -> str:
    from mer_cli import __version__

    return f"mer-cli {__version__}"


# =================================================================== reader


class Store:
    """An opened, checked store. Data files are memory-mapped read-only.

    ``store.tensor("layers.0.q")`` gives a zero-copy view (ndarray or
    :class:`~mer_cli.formats.quant.QTensor`); ``store.expert_bytes(l, e)`` the
    raw extent and ``store.expert_parts(buf)`` its sub-tensors.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        where = str(path / MANIFEST)
        self.model = ModelConfig.from_dict(manifest["model"], where)
        self.tokenizer: dict[str, Any] = manifest.get("tokenizer", {})
        self.quantization: dict[str, Any] = manifest["quantization"]
        self.store_id = bytes.fromhex(manifest["store_id"])
        self.file_paths = [self._resolve(f["path"]) for f in manifest["files"]]
        self.file_sizes = [int(f["nbytes"]) for f in manifest["files"]]
        self.dense = {
            name: TensorEntry(
                name,
                int(d["file"]),
                int(d["offset"]),
                int(d["nbytes"]),
                d["dtype"],
                tuple(d["shape"]),
                int(d["crc32"]),
            )
            for name, d in manifest["dense"].items()
        }
        lay = manifest["expert_layout"]
        self.extent_nbytes = int(lay["nbytes"])
        self.parts = {
            k: PartLayout(
                p["dtype"], tuple(p["shape"]), int(p["offset"]), int(p["nbytes"])
            )
            for k, p in lay["parts"].items()
        }
        E = self.model.num_experts
        self.experts: list[ExpertEntry | None] = [None] * (self.model.num_layers * E)
        for e in manifest["experts"]:
            ent = ExpertEntry(
                int(e["layer"]),
                int(e["expert"]),
                int(e["file"]),
                int(e["offset"]),
                int(e["nbytes"]),
                int(e["crc32"]),
                tuple(
                    (int(r["file"]), int(r["offset"])) for r in e.get("replicas", ())
                ),
            )
            if 0 <= ent.layer < self.model.num_layers and 0 <= ent.expert < E:
                self.experts[ent.layer * E + ent.expert] = ent
        self._maps: dict[int, np.ndarray] = {}

    def _resolve(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.path / q

    # -------------------------------------------------------------- open/check

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Open a store, checking its manifest and data files (not checksums)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.exists():
            raise FormatError(f"{path}: no such store; create one with mer quantize")
        if not mpath.is_file():
            raise FormatError(
                f"{path}: not a mer store (no {MANIFEST}); create one with mer quantize"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(
                f"{mpath}: not valid JSON ({e}); re-run mer quantize"
            ) from e
        problems = check_manifest(path, manifest)
        if problems:
            raise FormatError(
                problems[0]
                + (
                    f" (and {len(problems) - 1} more problems; run mer verify)"
                    if len(problems) > 1
                    else ""
                )
            )
        store = cls(path, manifest)
        problems = store.check_files()
        if problems:
            raise FormatError(problems[0])
        return store

    def check_files(self) -> list[str]:
        """Check that data files exist, have the recorded size and our header."""
        problems = []
        for i, (p, size) in enumerate(zip(self.file_paths, self.file_sizes)):
            if not p.is_file():
                problems.append(
                    f"{p}: data file missing (files[{i}] in {MANIFEST}; "
                    f"{self.describe_file(i)}); "
                    + (
                        "mount the drive or directory it was sharded to (mer "
                        "shard), or restore the file; if it is lost, re-run mer "
                        "quantize"
                        if self._outside(p)
                        else "restore it or re-run mer quantize"
                    )
                )
                continue
            actual = p.stat().st_size
            if actual != size:
                problems.append(
                    f"{p}: size is {actual} bytes, manifest files[{i}].nbytes "
                    f"says {size}; the file is truncated or replaced, re-run mer quantize"
                )
                continue
            with open(p, "rb") as f:
                magic, ver, index, sid = HEADER.unpack(f.read(HEADER.size))
            if magic != DATA_MAGIC:
                problems.append(
                    f"{p}: header magic is {magic!r}, expected {DATA_MAGIC!r}; "
                    "not a mer data file"
                )
            elif index != i or sid != self.store_id:
                problems.append(
                    f"{p}: header says file {index} of store {sid.hex()}, "
                    f"expected file {i} of store {self.store_id.hex()}; "
                    "a data file from another store was copied in"
                )
        return problems

    def _outside(self, p: Path) -> bool:
        return self.path.resolve() not in p.resolve().parents

    def file_experts(self, index: int) -> list[tuple[int, int]]:
        """``(layer, expert)`` of every extent in data file ``index`` (copies too)."""
        return [
            (e.layer, e.expert)
            for e in self.experts
            if e is not None and any(f == index for f, _ in e.copies)
        ]

    def describe_file(self, index: int) -> str:
        """What data file ``index`` holds, for messages: its role and expert range."""
        held = self.file_experts(index)
        dense = sum(1 for d in self.dense.values() if d.file == index)
        out = []
        if dense:
            out.append(f"it holds {dense} dense tensors")
        if held:
            first, last = held[0], held[-1]
            out.append(
                f"it holds {len(held)} expert extents, from (layer {first[0]}, "
                f"expert {first[1]}) to (layer {last[0]}, expert {last[1]})"
            )
        return "; ".join(out) or "it holds no tensors"

    # -------------------------------------------------------------- data access

    def file_map(self, index: int) -> np.ndarray:
        """Read-only ``uint8`` memory map of data file ``index``."""
        m = self._maps.get(index)
        if m is None:
            with open(self.file_paths[index], "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            m = np.frombuffer(mm, dtype=np.uint8)
            self._maps[index] = m
        return m

    def dense_bytes(self, name: str) -> np.ndarray:
        e = self._dense_entry(name)
        return self.file_map(e.file)[e.offset : e.offset + e.nbytes]

    def _dense_entry(self, name: str) -> TensorEntry:
        try:
            return self.dense[name]
        except KeyError:
            raise FormatError(
                f"{self.path / MANIFEST}: dense tensor {name!r} is missing; re-run mer quantize"
            ) from None

    def has(self, name: str) -> bool:
        return name in self.dense

    def tensor(self, name: str):
        """Zero-copy view of a dense tensor (ndarray, or QTensor for q4/q8)."""
        e = self._dense_entry(name)
        return quant.view(self.dense_bytes(name), e.dtype, e.shape)

    def tensor_f32(self, name: str) -> np.ndarray:
        """A dense tensor widened/dequantized to float32 (a copy)."""
        e = self._dense_entry(name)
        return np.array(quant.to_float(self.tensor(name), e.dtype), dtype=np.float32)

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        return self.experts[layer * self.model.num_experts + expert]

    def expert_bytes(self, layer: int, expert: int) -> np.ndarray:
        """The extent of expert ``(layer, expert)`` from the memory map."""
        e = self.expert(layer, expert)
        return self.file_map(e.file)[e.offset : e.offset + e.nbytes]

    def expert_parts(self, extent: np.ndarray) -> dict[str, Any]:
        """Zero-copy views of ``gate_up`` and ``down`` inside an extent buffer."""
        return {
            k: quant.view(extent[p.offset : p.offset + p.nbytes], p.dtype, p.shape)
            for k, p in self.parts.items()
        }

    # -------------------------------------------------------------- summaries

    @property
    def expert_bytes_total(self) -> int:
        return self.extent_nbytes * len(self.experts)

    @property
    def dense_bytes_total(self) -> int:
        return sum(e.nbytes for e in self.dense.values())

    def verify(self, progress=None) -> list[str]:
        """Every check: manifest, files, and the checksum of every tensor and extent.

        ``progress`` (optional) is called with the number of bytes checked.
        """
        problems = check_manifest(self.path, self.manifest) + self.check_files()
        if problems:
            return problems
        for name, e in self.dense.items():
            if checksum(self.dense_bytes(name)) != e.crc32:
                problems.append(
                    f"{self.file_paths[e.file]}: dense tensor {name} at offset "
                    f"{e.offset} fails its checksum (crc32 {e.crc32:08x}); "
                    "the file is corrupt, re-run mer quantize"
                )
            if progress:
                progress(e.nbytes)
        for i, e in enumerate(self.experts):
            for f, off in e.copies:
                extent = self.file_map(f)[off : off + e.nbytes]
                if checksum(extent) != e.crc32:
                    problems.append(
                        f"{self.file_paths[f]}: expert (layer {e.layer}, expert "
                        f"{e.expert}) = experts[{i}] at offset {off} fails its "
                        f"checksum (crc32 {e.crc32:08x}); the file is corrupt, "
                        "re-run mer quantize"
                    )
                if progress:
                    progress(e.nbytes)
        return problems


def _bad_fields(
    entry: Any, keys: tuple[str, ...], label: str, where: str
) -> str | None:
    """A message when ``entry`` is not an object whose ``keys`` are integers >= 0."""
    if not isinstance(entry, dict):
        return f"{where}: {label} is {entry!r}, expected an object; re-run mer quantize"
    for k in keys:
        v = entry.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return (
                f"{where}: {label}.{k} is {v!r}, expected a whole number >= 0; "
                "re-run mer quantize"
            )
    return None


def check_manifest(path: Path, m: Any) -> list[str]:
    """Structural checks of a manifest; returns messages (empty when fine)."""
    where = str(path / MANIFEST)
    if not isinstance(m, dict):
        return [f"{where}: top level is not an object; re-run mer quantize"]
    if m.get("format") != FORMAT:
        return [
            f"{where}: format is {m.get('format')!r}, expected {FORMAT!r}; not a mer store"
        ]
    v = m.get("version")
    if not isinstance(v, int) or v > VERSION:
        return [
            f"{where}: version is {v!r}, this mer reads version {VERSION}; "
            "upgrade mer (pip install -U mer-cli) or re-run mer quantize"
        ]
    if v < 1:
        return [f"{where}: version is {v!r}, expected {VERSION}; re-run mer quantize"]
    minor = m.get("minor_version", 0)
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        return [
            f"{where}: minor_version is {minor!r}, expected a whole number >= 0; "
            "re-run mer quantize"
        ]
    for key in (
        "store_id",
        "model",
        "quantization",
        "files",
        "dense",
        "expert_layout",
        "experts",
    ):
        if key not in m:
            return [f"{where}: field {key!r} is missing; re-run mer quantize"]
    try:
        cfg = ModelConfig.from_dict(m["model"], where)
        bytes.fromhex(m["store_id"])
    except (MerError, TypeError, ValueError) as e:
        return [
            str(e)
            if isinstance(e, MerError)
            else f"{where}: model/store_id invalid ({e})"
        ]
    problems: list[str] = []
    for key, kind in (
        ("files", list),
        ("dense", dict),
        ("experts", list),
        ("expert_layout", dict),
        ("quantization", dict),
    ):
        if not isinstance(m[key], kind):
            return [
                f"{where}: {key} is a {type(m[key]).__name__}, expected a "
                f"{kind.__name__}; re-run mer quantize"
            ]
    files = m["files"]
    nfiles = len(files)
    for i, f in enumerate(files):
        bad = _bad_fields(f, ("nbytes",), f"files[{i}]", where)
        if bad is None and not isinstance(f.get("path"), str):
            bad = f"{where}: files[{i}].path is {f.get('path')!r}, expected a string"
        if bad:
            return [bad]
    sizes = [f["nbytes"] for f in files]
    for name, d in m["dense"].items():
        bad = _bad_fields(
            d, ("file", "offset", "nbytes", "crc32"), f"dense[{name!r}]", where
        )
        if bad is None and not (
            isinstance(d.get("shape"), list)
            and all(isinstance(x, int) and x > 0 for x in d["shape"])
        ):
            bad = (
                f"{where}: dense[{name!r}].shape is {d.get('shape')!r}, expected a "
                "list of positive integers; re-run mer quantize"
            )
        if bad:
            problems.append(bad)
            continue
        f = d.get("file")
        if not isinstance(f, int) or not 0 <= f < nfiles:
            problems.append(
                f"{where}: dense[{name!r}].file is {f!r}, expected 0..{nfiles - 1}"
            )
            continue
        if d.get("dtype") not in quant.DTYPES:
            problems.append(
                f"{where}: dense[{name!r}].dtype is {d.get('dtype')!r}, "
                f"expected one of {', '.join(quant.DTYPES)}"
            )
            continue
        want = quant.tensor_nbytes(d["dtype"], tuple(d["shape"]))
        if d["nbytes"] != want:
            problems.append(
                f"{where}: dense[{name!r}].nbytes is {d['nbytes']}, expected {want} "
                f"for {d['dtype']}{d['shape']}"
            )
        if d["offset"] < PAGE or d["offset"] % SUBALIGN:
            problems.append(
                f"{where}: dense[{name!r}].offset is {d['offset']}, expected a "
                f"multiple of {SUBALIGN} past the {PAGE}-byte header"
            )
        if d["offset"] + d["nbytes"] > sizes[f]:
            problems.append(
                f"{where}: dense[{name!r}] ends at {d['offset'] + d['nbytes']}, past "
                f"the end of files[{f}] ({sizes[f]} bytes)"
            )
    lay = m["expert_layout"]
    qe = m["quantization"].get("experts")
    if qe not in quant.DTYPES:
        return problems + [
            f"{where}: quantization.experts is {qe!r}, expected one of "
            f"{', '.join(quant.DTYPES)}; re-run mer quantize"
        ]
    try:
        _, ext = expert_layout(cfg, m["quantization"]["experts"])
    except MerError as e:
        return problems + [str(e)]
    if lay.get("nbytes") != ext:
        problems.append(
            f"{where}: expert_layout.nbytes is {lay.get('nbytes')}, expected {ext}"
        )
    parts, _ = expert_layout(cfg, m["quantization"]["experts"])
    want_parts = {
        k: {
            "dtype": p.dtype,
            "shape": list(p.shape),
            "offset": p.offset,
            "nbytes": p.nbytes,
        }
        for k, p in parts.items()
    }
    if lay.get("parts") != want_parts:
        problems.append(
            f"{where}: expert_layout.parts is {lay.get('parts')!r}, expected "
            f"{want_parts!r}; re-run mer quantize"
        )
    seen = set()
    for i, e in enumerate(m["experts"]):
        bad = _bad_fields(
            e,
            ("layer", "expert", "file", "offset", "nbytes", "crc32"),
            f"experts[{i}]",
            where,
        )
        if bad:
            problems.append(bad)
            continue
        f = e.get("file")
        key = (e.get("layer"), e.get("expert"))
        if key in seen:
            problems.append(f"{where}: experts[{i}] repeats (layer, expert) {key}")
        seen.add(key)
        if not isinstance(f, int) or not 0 <= f < nfiles:
            problems.append(
                f"{where}: experts[{i}].file is {f!r}, expected 0..{nfiles - 1}"
            )
            continue
        if e["offset"] % PAGE or e["offset"] < PAGE:
            problems.append(
                f"{where}: experts[{i}].offset is {e['offset']}, expected a "
                f"multiple of {PAGE} past the header; re-run mer quantize"
            )
        if e["nbytes"] != ext:
            problems.append(
                f"{where}: experts[{i}].nbytes is {e['nbytes']}, expected {ext}"
            )
        if e["offset"] + e["nbytes"] > sizes[f]:
            problems.append(
                f"{where}: experts[{i}] ends at {e['offset'] + e['nbytes']}, past "
                f"the end of files[{f}] ({sizes[f]} bytes)"
            )
        problems += _check_replicas(e, i, f, sizes, where)
    want = {(la, ex) for la in range(cfg.num_layers) for ex in range(cfg.num_experts)}
    if seen != want:
        missing = sorted(want - seen)
        problems.append(
            f"{where}: experts table has {len(seen)} entries, expected "
            f"{len(want)}" + (f"; first missing {missing[0]}" if missing else "")
        )
    return problems


def _check_replicas(e: dict, i: int, primary: int, sizes: list[int], where: str):
    """Messages about ``experts[i].replicas`` (optional: copies on other files)."""
    reps = e.get("replicas", [])
    if not isinstance(reps, list):
        return [f"{where}: experts[{i}].replicas is {reps!r}, expected a list"]
    problems, used = [], {primary}
    for j, r in enumerate(reps):
        label = f"experts[{i}].replicas[{j}]"
        bad = _bad_fields(r, ("file", "offset"), label, where)
        if bad:
            problems.append(bad)
            continue
        f, off = r["file"], r["offset"]
        if not f < len(sizes):
            problems.append(
                f"{where}: {label}.file is {f}, expected 0..{len(sizes) - 1}"
            )
        elif f in used:
            problems.append(
                f"{where}: {label}.file is {f}, which already holds a copy of "
                "this expert; expected another file"
            )
        elif off % PAGE or off < PAGE:
            problems.append(
                f"{where}: {label}.offset is {off}, expected a multiple of "
                f"{PAGE} past the header; re-run mer shard"
            )
        elif off + e["nbytes"] > sizes[f]:
            problems.append(
                f"{where}: {label} ends at {off + e['nbytes']}, past the end of "
                f"files[{f}] ({sizes[f]} bytes)"
            )
        used.add(f)
    return problems
