"""Library side of ``mer shard``: spread a store's expert extents over several
directories (normally one per drive), crash-safely.

Steps of :func:`shard` (``man mer-store(5)``, SHARDING, has the on-disk view):

1. **Plan** (:mod:`mer_cli.shard_plan`). Every expert gets a target directory
   (``stripe``: round robin in (layer, expert) order; ``balanced``: the most
   used experts of a routing trace first, each onto the target with the least
   expected traffic in its layer plus overall, so every drive serves the same
   expected bytes per token and one layer's experts spread over the drives).
   ``hot_copies`` of the most used experts get a copy on every target; the
   reader takes the copy on the least busy drive. Each target's extents go
   into one file, or several of at most ``max_file_size`` bytes.
2. **Check space** on every target filesystem (``os.statvfs``) before anything
   is written; refuse with the needed and available bytes of each.
3. **Journal.** ``STORE/shard-journal.json`` records the new manifest, the
   files to write and the files to remove afterwards.
4. **Copy.** Each new file is written under ``NAME.part``: header, then each
   extent (its source checksum checked first), ``fsync``, its pages dropped
   from the page cache, then every extent
   read back with O_DIRECT and checked against the manifest's CRC-32 (a bad one
   is copied again once), then renamed to ``NAME`` and the directory synced.
   Drives are written in parallel, one thread per target device.
5. **Switch.** The new manifest replaces ``manifest.json`` atomically
   (``os.replace``, then the store directory is synced).
6. **Clean up.** Only then are the old expert files deleted, then the journal.

Until step 5 the store reads through the old manifest and old files, which are
untouched; from step 5 on through the new ones, all complete and verified. (A
process that already has the store open keeps reading the old files it has
open; one not yet opened when they are deleted fails with a message naming
it: stop ``mer generate`` before sharding its store.) A
run killed at any point is finished by running ``mer shard`` again with the same
options: written ``.part`` files are checked and continued, renamed files are
kept, and a switched manifest only needs its clean-up. With different options,
an unfinished copy (before the switch) is discarded and the new plan starts.

Shard files are named ``STORE_NAME.ID8-gG-IIIII-of-NNNNN.bin`` (ID8: the
first 8 hex digits of the store id, G: the layout generation, IIIII: the
file's index in the manifest, NNNNN the last index) so several stores and
successive layouts can share a target.
The manifest records them by absolute path, or relative to the store when the
file is inside the store directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mer_cli import interrupt
from mer_cli.errors import FormatError, ResourceError, UsageError
from mer_cli.formats.quant import PAGE
from mer_cli.formats.store import (
    DATA_MAGIC,
    HEADER,
    MANIFEST,
    VERSION,
    Store,
    check_manifest,
)
from mer_cli.io.reader import device_of
from mer_cli.shard_plan import (
    ShardFile,
    assign,
    build_manifest,
    files_of,
    plan_files,
    trace_counts,
)
from mer_cli.units import format_size

JOURNAL = "shard-journal.json"
JOURNAL_FORMAT = "mer-shard-journal"
POLICIES = ("stripe", "balanced")

#: test hook: called with "extent" after each extent is written, "copied" when
#: every new file is in place, "switched" once the new manifest is durable.
#: Tests raise or SIGKILL from it to interrupt a run at each step.
_checkpoint: Callable[[str], None] | None = None


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class ShardOptions:
    """What ``mer shard`` was asked to do.

    Attributes
    ----------
    targets : directories to spread the experts over (one per drive).
    policy : ``"stripe"`` or ``"balanced"`` (needs ``trace``).
    trace : a routing trace (``mer trace``) whose expert frequencies guide
        ``balanced`` and ``hot_copies``, and give the expected split reported.
    max_file_size : most bytes per shard file (header included); None: one
        file per target.
    hot_copies : how many of the most used experts get a copy on every target.
    """

    targets: tuple[str, ...]
    policy: str = "stripe"
    trace: str | None = None
    max_file_size: int | None = None
    hot_copies: int = 0


@dataclass
class TargetReport:
    """One target directory after the run."""

    path: str
    device: Any
    files: int = 0
    extents: int = 0
    nbytes: int = 0
    expected_share: float | None = None  # of the expected expert bytes per token


@dataclass
class ShardResult:
    """What :func:`shard` did."""

    store: str
    generation: int
    policy: str
    targets: list[TargetReport]
    copied_bytes: int = 0
    resumed: bool = False
    unchanged: bool = False
    removed: list[str] = field(default_factory=list)
    expected_bytes_per_token: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ================================================================== helpers


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically and durably."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _header(index: int, store_id: bytes) -> bytes:
    return HEADER.pack(DATA_MAGIC, VERSION, index, store_id).ljust(PAGE, b"\0")


def _read_header(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(PAGE)
    except OSError:
        return None


def _check(hook: str) -> None:
    if _checkpoint is not None:
        _checkpoint(hook)


@contextlib.contextmanager
def _locked(store_dir: Path):
    """Hold a lock on the store directory (``flock`` on the directory itself,
    so nothing is written) so two ``mer shard`` runs cannot interleave."""
    fd = os.open(store_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResourceError(
                f"{store_dir}: another mer shard is running on this store; wait "
                "for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


# ================================================================== copying


class _Copier:
    """Writes and verifies the new files of one journal (one thread per device)."""

    def __init__(self, store: Store, progress) -> None:
        self.store = store
        self.ext = store.extent_nbytes
        self.crc = {}  # key -> crc32
        self.src = {}  # key -> (file, offset) in the current store
        E = store.model.num_experts
        for e in store.experts:
            k = e.layer * E + e.expert
            self.crc[k] = e.crc32
            self.src[k] = (e.file, e.offset)
        self.progress = progress
        self.copied = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _source(self, key: int):
        f, off = self.src[key]
        buf = self.store.file_map(f)[off : off + self.ext]
        if zlib.crc32(buf) & 0xFFFFFFFF != self.crc[key]:
            E = self.store.model.num_experts
            raise FormatError(
                f"{self.store.file_paths[f]}: expert (layer {key // E}, expert "
                f"{key % E}) at offset {off} fails its checksum before copying; "
                "the store is corrupt (run mer verify), nothing was switched"
            )
        return buf

    def copy_file(self, new: ShardFile) -> None:
        """Make ``new`` exist at its final path, complete and verified."""
        final, keys = new.path, new.keys
        part = final.with_name(final.name + ".part")
        size = PAGE + len(keys) * self.ext
        header = _header(new.index, self.store.store_id)
        if final.is_file():
            if final.stat().st_size == size and _read_header(final) == header:
                self._count(size - PAGE, written=False)  # done by an earlier run
                return
            final.unlink()  # not what this plan writes: start it again
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            have = os.fstat(fd).st_size
            if have < PAGE or os.pread(fd, PAGE, 0) != header:
                have = 0
            done = max(0, min(len(keys), (have - PAGE) // self.ext)) if have else 0
            os.ftruncate(fd, PAGE + done * self.ext)
            if not done:
                os.pwrite(fd, header, 0)
            self._count(done * self.ext, written=False)
            for j in range(done, len(keys)):
                if self.stop.is_set():
                    return
                self._write(fd, j, keys[j])
                self._count(self.ext)
                _check("extent")
            os.fsync(fd)
            _drop_cache(fd)
        finally:
            os.close(fd)
        bad = self._verify(part, keys)
        if bad:  # copy those extents once more, then they must read back right
            fd = os.open(part, os.O_RDWR)
            try:
                for j in bad:
                    self._write(fd, j, keys[j])
                os.fsync(fd)
                _drop_cache(fd)
            finally:
                os.close(fd)
            bad = self._verify(part, keys)
            if bad:
                E = self.store.model.num_experts
                k = keys[bad[0]]
                raise ResourceError(
                    f"{part}: expert (layer {k // E}, expert {k % E}) at offset "
                    f"{PAGE + bad[0] * self.ext} reads back with the wrong checksum "
                    "twice; the drive or filesystem is faulty (check dmesg); the "
                    "store still uses its old files"
                )
        os.replace(part, final)
        _fsync_dir(final.parent)

    def _write(self, fd: int, j: int, key: int) -> None:
        buf = self._source(key)
        off = PAGE + j * self.ext
        view = memoryview(buf)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n

    def _count(self, n: int, written: bool = True) -> None:
        if written:
            with self._lock:
                self.copied += n
        if self.progress is not None:
            self.progress(n)

    def _verify(self, path: Path, keys: list[int]) -> list[int]:
        """Indices of extents of ``path`` whose bytes on disk fail their CRC-32."""
        from mer_cli.io.reader import ExtentReader
        from mer_cli.io.slabs import SlabPool

        depth = 4
        pool = SlabPool(self.ext, min(depth, max(1, len(keys))), populate=False)
        bad: list[int] = []
        try:
            with ExtentReader([path], threads=depth) as r:
                inflight: list[tuple[int, Any]] = []
                for j, k in enumerate(keys):
                    if len(inflight) == pool.count:
                        self._collect(inflight.pop(0), bad)
                    req = r.submit(
                        0,
                        PAGE + j * self.ext,
                        self.ext,
                        pool.slabs[j % pool.count],
                        crc32=self.crc[k],
                    )
                    inflight.append((j, req))
                for item in inflight:
                    self._collect(item, bad)
        finally:
            pool.close()
        return sorted(bad)

    @staticmethod
    def _collect(item, bad: list[int]) -> None:
        j, req = item
        req.wait()
        if req.error is not None:
            if not isinstance(req.error, FormatError):
                raise req.error
            bad.append(j)


def _drop_cache(fd: int) -> None:
    """Evict the file's pages so the read-back check reads the drive."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ================================================================== the job


def _targets(options: ShardOptions) -> list[Path]:
    if not options.targets:
        raise UsageError("no target: give at least one --to PATH")
    out: list[Path] = []
    for t in options.targets:
        p = Path(t)
        if not p.is_dir():
            raise UsageError(
                f"--to {t}: no such directory; create it (or mount the drive) first"
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise ResourceError(
                f"--to {t}: cannot write into it (permission denied); choose a "
                "writable directory"
            )
        p = p.resolve()
        if p in out:
            raise UsageError(f"--to {t}: given twice; name each target once")
        out.append(p)
    return out


def _params(options: ShardOptions, targets: list[Path], digest) -> dict[str, Any]:
    """What decides the layout (a finished run with equal ones is not redone).
    The trace counts only where it places experts (not for plain stripe)."""
    guided = options.policy == "balanced" or options.hot_copies > 0
    return {
        "targets": [str(t) for t in targets],
        "policy": options.policy,
        "max_file_size": options.max_file_size,
        "hot_copies": options.hot_copies,
        "trace_crc32": digest if guided else None,
    }


def _same_params(layout: dict[str, Any] | None, params: dict[str, Any]) -> bool:
    return bool(layout) and all(layout.get(k) == v for k, v in params.items())


def _check_space(
    files: list[ShardFile], targets: list[Path], ext: int, have: dict[Path, int]
) -> None:
    """Refuse (before any write) when a target filesystem lacks the room."""
    need: dict[Any, int] = {}
    names: dict[Any, list[str]] = {}
    for f in files:
        dev = device_of(targets[f.target])
        size = PAGE + len(f.keys) * ext
        need[dev] = need.get(dev, 0) + max(0, size - have.get(f.path, 0))
        names.setdefault(dev, [])
        if str(targets[f.target]) not in names[dev]:
            names[dev].append(str(targets[f.target]))
    short = []
    lines = []
    for dev, n in need.items():
        avail = free_bytes(names[dev][0])
        where = " and ".join(names[dev])
        lines.append(
            f"{where}: needs {format_size(n)} ({n} bytes), has "
            f"{format_size(avail)} ({avail} bytes) free"
        )
        if n > avail:
            short.append(where)
    if short:
        raise ResourceError(
            "not enough free space for mer shard, nothing was written: "
            + "; ".join(lines)
            + "; free some space, add another --to target, or choose other targets"
        )


def _existing_bytes(files: list[ShardFile], store_id: bytes) -> dict[Path, int]:
    """Bytes of each planned file already written by an interrupted run."""
    have = {}
    for f in files:
        for p in (f.path, f.path.with_name(f.path.name + ".part")):
            if p.is_file():
                have[f.path] = max(have.get(f.path, 0), p.stat().st_size)
    return have


def _clear_leftovers(files: list[ShardFile], store: Store) -> None:
    """Remove planned paths left by an abandoned run of this store; refuse to
    touch files that belong to something else."""
    ours = {p.resolve() for p in store.file_paths}
    for f in files:
        for p in (f.path, f.path.with_name(f.path.name + ".part")):
            if not p.exists():
                continue
            head = _read_header(p) or b""
            sid = head[16:32] if len(head) >= 32 else b""
            if p.resolve() in ours or head[:8] != DATA_MAGIC or sid != store.store_id:
                raise UsageError(
                    f"{p}: already exists and is not a leftover of this store's "
                    "mer shard; move it away or choose another --to"
                )
            p.unlink()


def _discard(journal: dict[str, Any], current: set[Path]) -> None:
    for s in journal.get("new_files", []):
        for p in (Path(s), Path(s + ".part")):
            if p.resolve() not in current:
                p.unlink(missing_ok=True)


def _finish_cleanup(store_dir: Path, journal: dict[str, Any], store: Store) -> list:
    """After the switch: delete old files the new manifest does not use."""
    keep = {p.resolve() for p in store.file_paths}
    removed = []
    for s in journal.get("old_files", []):
        p = Path(s)
        if p.resolve() in keep:
            continue
        if p.exists():
            p.unlink()
            _fsync_dir(p.parent)
            removed.append(str(p))
    (store_dir / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(store_dir)
    return removed


def _read_journal(store_dir: Path) -> dict[str, Any] | None:
    p = store_dir / JOURNAL
    if not p.is_file():
        return None
    try:
        j = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{p}: not valid JSON ({e}); it is written atomically, so something "
            "else changed it; compare manifest.json with it and remove it"
        ) from e
    if not isinstance(j, dict) or j.get("format") != JOURNAL_FORMAT:
        raise FormatError(f"{p}: not a {JOURNAL_FORMAT} file; remove it")
    return j


def shard(
    store_path: str | os.PathLike,
    options: ShardOptions,
    *,
    progress: bool = False,
) -> ShardResult:
    """Move the expert extents of ``store_path`` into files under the targets.

    See the module docstring for the steps and the crash guarantees.

    Raises
    ------
    UsageError
        Bad options: no or missing target, unknown policy, ``balanced`` or
        ``hot_copies`` without a trace, ``max_file_size`` below one extent.
    ResourceError
        Not enough free space (nothing written), a target not writable,
        another ``mer shard`` on the same store, a copy that reads back wrong.
    FormatError
        The store or the trace is malformed or corrupt.
    """
    if options.policy not in POLICIES:
        raise UsageError(
            f"--policy {options.policy}: expected one of {', '.join(POLICIES)}"
        )
    store_dir = Path(store_path)
    targets = _targets(options)
    if not (store_dir / MANIFEST).is_file():
        Store.open(store_dir)  # raises the usual "not a store" message
    with _locked(store_dir):
        for tmp in [
            *store_dir.glob(f".{MANIFEST}.tmp-*"),
            *store_dir.glob(f".{JOURNAL}.tmp-*"),
        ]:
            tmp.unlink(missing_ok=True)  # a run killed while writing one
        journal = _read_journal(store_dir)
        store = Store.open(store_dir)
        gen = int(store.manifest.get("layout", {}).get("generation", 0))
        result_removed: list[str] = []
        if journal is not None and journal.get("to_generation") == gen:
            # killed after the switch: only the clean-up is left
            result_removed = _finish_cleanup(store_dir, journal, store)
            journal = None
        ext = store.extent_nbytes
        if options.max_file_size is not None and options.max_file_size < PAGE + ext:
            raise UsageError(
                f"--max-file-size {options.max_file_size}: smaller than one expert "
                f"extent ({ext} bytes) plus the {PAGE}-byte header; use at least "
                f"{PAGE + ext}"
            )
        counts = tokens = digest = None
        if options.trace is not None:
            counts, tokens, digest = trace_counts(options.trace, store)
        elif options.policy == "balanced" or options.hot_copies:
            raise UsageError(
                "--policy balanced and --hot-copies need --trace TRACE (the expert "
                "frequencies); record one with mer trace"
            )
        if options.hot_copies < 0:
            raise UsageError(f"--hot-copies {options.hot_copies}: expected >= 0")
        if options.hot_copies and len(targets) < 2:
            raise UsageError("--hot-copies needs at least two --to targets")
        params = _params(options, targets, digest)
        L, E = store.model.num_layers, store.model.num_experts
        placement = assign(
            counts, L, E, len(targets), options.policy, options.hot_copies
        )
        if _same_params(store.manifest.get("layout"), params) and journal is None:
            return _report(
                store,
                targets,
                placement,
                counts,
                tokens,
                options,
                gen,
                unchanged=True,
                removed=result_removed,
            )
        kinds = [f.get("role") for f in store.manifest["files"]]
        kept = next((i for i, r in enumerate(kinds) if r == "experts"), len(kinds))
        if any(r != "experts" for r in kinds[kept:]):
            raise FormatError(
                f"{store_dir / MANIFEST}: files list has non-expert files after "
                "the first expert file; mer shard keeps dense files first; re-run "
                "mer quantize"
            )
        resumed = False
        if journal is not None:
            if (
                journal.get("from_generation") == gen
                and journal.get("store_id") == store.store_id.hex()
                and journal.get("params") == params
            ):
                resumed = True
                new_manifest = journal["manifest"]
            else:  # an unfinished copy with other options: drop it
                _discard(journal, {p.resolve() for p in store.file_paths})
                (store_dir / JOURNAL).unlink()
                journal = None
        if not resumed:
            stem = f"{store_dir.resolve().name}.{store.store_id.hex()[:8]}-g{gen + 1}"
            planned = plan_files(
                placement, targets, ext, options.max_file_size, kept, stem
            )
            layout = {
                "generation": gen + 1,
                **params,
                "trace": (
                    str(Path(options.trace).resolve())
                    if params["trace_crc32"] is not None
                    else None
                ),
            }
            new_manifest = build_manifest(store, placement, planned, kept, layout)
            problems = check_manifest(store_dir, new_manifest)
            if problems:  # a bug in the plan: never write it
                raise RuntimeError(f"mer shard planned a bad manifest: {problems[0]}")
        files = files_of(new_manifest, kept, targets, store_dir)
        have = _existing_bytes(files, store.store_id) if resumed else {}
        _check_space(files, targets, ext, have)
        if not resumed:
            _clear_leftovers(files, store)
            journal = {
                "format": JOURNAL_FORMAT,
                "version": 1,
                "store_id": store.store_id.hex(),
                "from_generation": gen,
                "to_generation": gen + 1,
                "params": params,
                "new_files": [str(f.path) for f in files],
                "old_files": [
                    str(p)
                    for p, f in zip(store.file_paths, store.manifest["files"])
                    if f.get("role") == "experts"
                ],
                "manifest": new_manifest,
            }
            _write_json(store_dir / JOURNAL, journal)
        copied = _copy_all(store, files, progress)
        _check("copied")
        new_store = Store(store_dir, new_manifest)
        problems = new_store.check_files()
        if problems:
            raise FormatError(
                problems[0] + " (before switching; the store is unchanged)"
            )
        _write_json(store_dir / MANIFEST, new_manifest)
        _check("switched")
        removed = result_removed + _finish_cleanup(store_dir, journal, new_store)
        return _report(
            new_store,
            targets,
            placement,
            counts,
            tokens,
            options,
            gen + 1,
            copied=copied,
            resumed=resumed,
            removed=removed,
        )


def _copy_all(store: Store, files: list[ShardFile], progress: bool) -> int:
    """Copy every new file, one thread per target device; returns bytes copied."""
    from tqdm import tqdm

    total = sum(len(f.keys) for f in files) * store.extent_nbytes
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="shard",
        disable=not progress,
        leave=False,
    ) as bar:
        lock = threading.Lock()

        def tick(n: int) -> None:
            with lock:
                bar.update(n)

        copier = _Copier(store, tick)
        groups: dict[Any, list[ShardFile]] = {}
        for f in files:
            groups.setdefault(device_of(f.path.parent), []).append(f)

        def run(group: list[ShardFile]) -> None:
            for f in group:
                if copier.stop.is_set():
                    return
                copier.copy_file(f)

        pool = ThreadPoolExecutor(len(groups), thread_name_prefix="mer-shard")
        futs = [pool.submit(run, g) for g in groups.values()]
        try:
            for fut in futs:
                interrupt.result(fut)
        finally:
            copier.stop.set()
            pool.shutdown(wait=True)
    return copier.copied


def _report(
    store: Store,
    targets: list[Path],
    placement: list[list[int]],
    counts,
    tokens,
    options: ShardOptions,
    gen: int,
    *,
    copied: int = 0,
    resumed: bool = False,
    unchanged: bool = False,
    removed: list[str] | None = None,
) -> ShardResult:
    ext = store.extent_nbytes
    reps = [TargetReport(str(t), device_of(t)) for t in targets]
    by_dir = {str(t): i for i, t in enumerate(targets)}
    for i, p in enumerate(store.file_paths):
        t = by_dir.get(str(p.resolve().parent))
        if t is None or store.manifest["files"][i].get("role") != "experts":
            continue
        reps[t].files += 1
        reps[t].nbytes += store.file_sizes[i]
        reps[t].extents += len(store.file_experts(i))
    per_token = None
    if counts is not None and tokens:
        load = [0.0] * len(targets)
        for k, ts in enumerate(placement):
            for t in ts:
                load[t] += counts[k] / len(ts)
        s = sum(load)
        for r, x in zip(reps, load):
            r.expected_share = x / s if s else None
        per_token = s * ext / tokens
    return ShardResult(
        store=str(store.path),
        generation=gen,
        policy=options.policy,
        targets=reps,
        copied_bytes=copied,
        resumed=resumed,
        unchanged=unchanged,
        removed=removed or [],
        expected_bytes_per_token=per_token,
    )
