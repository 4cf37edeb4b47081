"""O_DIRECT extent reads on a pool of threads.

One extent read (a :class:`ReadRequest`) is split into chunks of ``chunk_size``
bytes; ``threads`` workers each issue one ``os.preadv`` at a time, so one extent
is read at queue depth up to ``threads`` (the drive needs 4-8 to reach its
ceiling). ``os.preadv`` releases the GIL for the whole read, and the Python work
per chunk is a few dictionary-free attribute updates.

Devices: files are grouped by the device they live on (``st_dev`` of the
file, as ``mer shard`` spreads a store over several drives), and each device
has its own queue and its own ``threads`` workers, so reads on different
drives run in parallel and a busy drive never holds up another.
:meth:`ExtentReader.pending` tells how many requests a file's device still has
queued or in flight (the streaming source reads a duplicated expert from the
least busy copy); :meth:`ExtentReader.stats` reports bytes and busy time per
device.

Scheduling (per device): a heap of requests ordered by ``(priority,
submission order)``; demand reads (``DEMAND`` = 0) always go before prefetches
(``PREFETCH`` = 1 and up). A worker takes the next chunk of the request at the
head of its device's heap, so once a demand read arrives no new prefetch chunk
starts on that device until it is fully issued. Prefetch chunks occupy at most
half of a device's workers (``prefetch_threads``), so a demand read arriving
while a prefetch is being read starts at once on the other half, never
waiting behind a full queue of prefetch chunks. A prefetch can be promoted to
demand (:meth:`ExtentReader.promote`) or cancelled
(:meth:`ExtentReader.cancel`): chunks not yet started are dropped and the
request finishes once the chunks already in flight land, so the caller knows
when its buffer is free again.

Alignment of the file offset, the length and the buffer address is checked here
for every request, whatever the filesystem: ext4 rejects a misaligned O_DIRECT
read with EINVAL but tmpfs accepts it, so relying on the kernel hides bugs.
Where a filesystem refuses O_DIRECT (EINVAL at open or on an aligned read) the
file falls back to buffered reads, with a :class:`BufferedFallbackWarning`, and
``posix_fadvise(DONTNEED)`` after each chunk so the page cache does not grow
behind the expert cache's back.

Transient I/O errors are retried ``retries`` times; then, as for a file that
ends early (truncated during the run) or disappears before it is opened, the
request fails with a :class:`~mer_cli.errors.ReadError` naming the file, what
was being read and the offset. Never are partial bytes handed out as data.
"""

from __future__ import annotations

import errno
import heapq
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import FormatError, ReadError
from mer_cli.formats.quant import PAGE

DEMAND = 0
PREFETCH = 1
DEFAULT_CHUNK = 4 << 20
DEFAULT_THREADS = 8
# errnos worth another try; anything else (ENOENT, EACCES, EISDIR...) fails at once
_TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT}


class AlignmentError(ReadError):
    """A read whose offset, length or buffer is not aligned for O_DIRECT."""


class BufferedFallbackWarning(UserWarning):
    """The filesystem refused O_DIRECT; reads of that file go through the page cache."""


class ReadRequest:
    """One extent read into a buffer; created by :meth:`ExtentReader.submit`.

    Attributes
    ----------
    key
        The caller's identifier (the cache uses the expert index).
    priority
        ``DEMAND`` (0) or a prefetch priority (>= ``PREFETCH``); lower goes first.
    cancelled
        True once :meth:`ExtentReader.cancel` succeeded: the buffer holds no
        valid data.
    error
        The exception that failed the request, or None.
    """

    __slots__ = (
        "key",
        "file",
        "offset",
        "nbytes",
        "view",
        "priority",
        "label",
        "crc32",
        "nchunks",
        "next_chunk",
        "inflight",
        "cancelled",
        "finished",
        "error",
        "bytes_done",
        "done",
        "callbacks",
        "t_submit",
        "t_done",
    )

    def __init__(self, key, file, offset, nbytes, view, priority, label, crc32):
        self.key = key
        self.file = file
        self.offset = offset
        self.nbytes = nbytes
        self.view = view
        self.priority = priority
        self.label = label
        self.crc32 = crc32
        self.nchunks = 0
        self.next_chunk = 0
        self.inflight = 0
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self.bytes_done = 0
        self.done = threading.Event()
        self.callbacks: list[Callable[[ReadRequest], None]] = []
        self.t_submit = time.perf_counter()
        self.t_done = 0.0

    @property
    def ok(self) -> bool:
        """Finished with every byte read (and the checksum matching, if given)."""
        return self.finished and not self.cancelled and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def result(self, timeout: float | None = None) -> None:
        """Wait for the read; raise its error, or ``ReadError`` if cancelled."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"read of {self.label} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise ReadError(f"read of {self.label} was cancelled")

    def __repr__(self) -> str:
        state = (
            "cancelled"
            if self.cancelled
            else "failed"
            if self.error
            else "done"
            if self.finished
            else "pending"
        )
        return (
            f"ReadRequest({self.label}, {self.nbytes} B, prio {self.priority}, {state})"
        )


class _File:
    """An open data file: descriptor, whether it is O_DIRECT, a lock for reopening."""

    __slots__ = ("path", "fd", "direct", "lock")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.direct = False
        self.lock = threading.Lock()


class _Device:
    """One device's queue: its heap of requests, its workers and counters.

    Every device's condition shares the reader's one lock, so counters that
    span devices stay consistent; workers wait only on their own device.
    """

    __slots__ = (
        "key",
        "files",
        "heap",
        "cond",
        "pending",
        "active",
        "busy_since",
        "busy_seconds",
        "bytes_read",
        "chunks_read",
        "prefetch_active",
    )

    def __init__(self, key: object, lock: threading.Lock) -> None:
        self.key = key
        self.files: list[int] = []
        self.heap: list[tuple[int, int, ReadRequest]] = []
        self.cond = threading.Condition(lock)
        self.pending = 0  # requests submitted and not finished
        self.active = 0  # chunks being read now
        self.busy_since = 0.0
        self.busy_seconds = 0.0
        self.bytes_read = 0
        self.chunks_read = 0
        self.prefetch_active = 0  # of them, chunks taken as prefetch


def device_of(path: str | os.PathLike) -> object:
    """The key reads of ``path`` are queued under: its filesystem's ``st_dev``.

    A file that cannot be stat'ed gets a key of its own (its read fails later
    with a message naming it).
    """
    try:
        return os.stat(path).st_dev
    except OSError:
        return ("missing", str(path))


class ExtentReader:
    """Reads extents of a fixed set of files into caller-owned aligned buffers.

    Parameters
    ----------
    paths
        The data files; requests name a file by its index in this list.
    threads
        Worker threads per device = the most chunks in flight at once on one
        device (its queue depth).
    chunk_size
        Bytes per ``preadv``; a multiple of ``alignment``.
    direct
        Use O_DIRECT (False: buffered reads followed by ``fadvise(DONTNEED)``).
    retries
        Further attempts after a transient I/O error before the request fails.
    alignment
        Required alignment of offsets, lengths and buffer addresses (4096 covers
        every drive's logical block size).
    devices
        One key per file naming the queue its reads go to (default: the
        file's ``st_dev``, :func:`device_of`). Files with equal keys share a
        queue and its workers.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        threads: int = DEFAULT_THREADS,
        chunk_size: int = DEFAULT_CHUNK,
        direct: bool = True,
        retries: int = 3,
        retry_delay: float = 0.01,
        alignment: int = PAGE,
        devices: Sequence[object] | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"reader threads is {threads}, expected at least 1")
        if chunk_size < alignment or chunk_size % alignment:
            raise ValueError(
                f"chunk size {chunk_size} is not a positive multiple of {alignment}"
            )
        self.files = [_File(Path(p)) for p in paths]
        self.threads = threads
        # workers of a device that may read prefetch chunks at once: the other
        # half is free the moment a demand read arrives
        self.prefetch_threads = max(1, threads // 2)
        self.chunk_size = chunk_size
        self.direct = direct
        self.retries = retries
        self.retry_delay = retry_delay
        self.alignment = alignment
        if devices is None:
            devices = [device_of(f.path) for f in self.files]
        elif len(devices) != len(self.files):
            raise ValueError(f"{len(devices)} device keys for {len(self.files)} files")
        self._seq = 0
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # guards all state and counters
        self._devices: list[_Device] = []
        self._file_dev: list[_Device] = []
        by_key: dict[object, _Device] = {}
        for i, key in enumerate(devices):
            dev = by_key.get(key)
            if dev is None:
                dev = by_key[key] = _Device(key, lock)
                self._devices.append(dev)
            dev.files.append(i)
            self._file_dev.append(dev)
        self._closed = False
        self._retired: list[int] = []
        # counters (under _cond)
        self.bytes_read = 0
        self.chunks_read = 0
        self.retried = 0
        self.cancelled = 0
        self._active = 0
        self._busy_since = 0.0
        self.busy_seconds = 0.0  # wall time with at least one read in flight
        self._workers = [
            threading.Thread(
                target=self._work, args=(dev,), name=f"mer-reader-{d}.{i}", daemon=True
            )
            for d, dev in enumerate(self._devices)
            for i in range(threads)
        ]
        for t in self._workers:
            t.start()

    # -------------------------------------------------------------- requests

    def submit(
        self,
        file: int,
        offset: int,
        nbytes: int,
        buf: np.ndarray,
        *,
        priority: int = DEMAND,
        key: object = None,
        label: str | None = None,
        crc32: int | None = None,
        on_done: Callable[[ReadRequest], None] | None = None,
    ) -> ReadRequest:
        """Queue a read of ``nbytes`` at ``offset`` of file ``file`` into ``buf``.

        Parameters
        ----------
        buf
            Writable ``uint8`` array of at least ``nbytes``, its address aligned.
        crc32
            When given, the worker that completes the read checks the CRC-32 of
            the bytes and fails the request on a mismatch.
        on_done
            Called once (from a worker thread, or from :meth:`cancel`) when the
            request finishes, whatever the outcome. Keep it short.

        Raises
        ------
        AlignmentError
            Offset, length or buffer address not a multiple of ``alignment``.
        """
        if self._closed:
            raise ReadError("the reader is closed")
        path = self.files[file].path
        label = label or f"{nbytes} bytes"
        a = self.alignment
        if offset % a or offset < 0:
            raise AlignmentError(
                f"{path}: offset of {label} is {offset}, expected a multiple of {a}; "
                "the store's extent table is wrong, re-run mer quantize"
            )
        if nbytes % a or nbytes <= 0:
            raise AlignmentError(
                f"{path}: length of {label} at offset {offset} is {nbytes}, "
                f"expected a positive multiple of {a}; re-run mer quantize"
            )
        if buf.nbytes < nbytes or buf.dtype != np.uint8 or not buf.flags.c_contiguous:
            raise ValueError(
                f"buffer for {label}: {buf.nbytes} bytes {buf.dtype}, expected "
                f"{nbytes} contiguous uint8"
            )
        addr = buf.ctypes.data
        if addr % a:
            raise AlignmentError(
                f"{path}: buffer for {label} at offset {offset} starts at address "
                f"{addr:#x}, expected a multiple of {a} (a bug in mer: slabs must "
                "come from SlabPool)"
            )
        view = memoryview(buf[:nbytes])
        req = ReadRequest(key, file, offset, nbytes, view, priority, label, crc32)
        req.nchunks = -(-nbytes // self.chunk_size)
        if on_done is not None:
            req.callbacks.append(on_done)
        dev = self._file_dev[file]
        with self._cond:
            dev.pending += 1
            self._push(req)
            dev.cond.notify(min(req.nchunks, self.threads))
        return req

    def _push(self, req: ReadRequest) -> None:
        self._seq += 1
        heapq.heappush(self._file_dev[req.file].heap, (req.priority, self._seq, req))

    def _finished(self, req: ReadRequest) -> None:
        """Mark ``req`` finished (under the lock); :meth:`_finish` runs after."""
        req.finished = True
        self._file_dev[req.file].pending -= 1

    def promote(self, req: ReadRequest, priority: int = DEMAND) -> None:
        """Raise a queued request's priority (a prefetch the compute now needs)."""
        with self._cond:
            if priority >= req.priority or req.finished or req.cancelled:
                return
            req.priority = priority
            if req.next_chunk < req.nchunks:
                self._push(req)  # the old heap entry is skipped as stale
                self._file_dev[req.file].cond.notify(
                    min(req.nchunks - req.next_chunk, self.threads)
                )

    def cancel(self, req: ReadRequest) -> bool:
        """Drop the chunks of ``req`` not yet started.

        Returns False if the read had already finished (its data is valid),
        True if it is now cancelled; ``req.done`` is set once no chunk of it is
        in flight any more, and only then may its buffer be reused.
        """
        with self._cond:
            if req.finished or req.cancelled:
                return False if req.finished and not req.cancelled else True
            if req.next_chunk >= req.nchunks and req.error is None:
                # everything is in flight: let it land and keep the data
                return False
            req.cancelled = True
            self.cancelled += 1
            finish = req.inflight == 0 and not req.finished
            if finish:
                self._finished(req)
        if finish:
            self._finish(req)
        return True

    def queue_depth(self) -> int:
        """Requests queued or in flight (an estimate, for throttling)."""
        with self._cond:
            return sum(len(d.heap) for d in self._devices) + self._active

    def pending(self, file: int) -> int:
        """Requests submitted and not yet finished on the device of ``file``."""
        return self._file_dev[file].pending

    @property
    def num_devices(self) -> int:
        """Number of device queues (distinct device keys of the files)."""
        return len(self._devices)

    # -------------------------------------------------------------- workers

    def _take(self, dev: _Device) -> tuple[ReadRequest, int, bool] | None:
        """Next chunk to read and whether it is a prefetch's, under the lock;
        None when the heap is empty or holds only prefetches while
        ``prefetch_threads`` workers already read prefetch chunks."""
        heap = dev.heap
        while heap:
            prio, _, req = heap[0]
            if (
                req.cancelled
                or req.error is not None
                or prio != req.priority
                or req.next_chunk >= req.nchunks
            ):
                heapq.heappop(heap)
                continue
            pf = prio >= PREFETCH
            if pf and dev.prefetch_active >= self.prefetch_threads:
                return None  # the rest of the heap is prefetches too
            idx = req.next_chunk
            req.next_chunk += 1
            if req.next_chunk >= req.nchunks:
                heapq.heappop(heap)
            req.inflight += 1
            dev.prefetch_active += pf
            return req, idx, pf
        return None

    def _work(self, dev: _Device) -> None:
        cond = dev.cond
        while True:
            with cond:
                job = self._take(dev)
                while job is None:
                    if self._closed:
                        return
                    cond.wait()
                    job = self._take(dev)
                now = time.perf_counter()
                if self._active == 0:
                    self._busy_since = now
                if dev.active == 0:
                    dev.busy_since = now
                self._active += 1
                dev.active += 1
            req, idx, pf = job
            err: BaseException | None = None
            n = 0
            try:
                n = self._read_chunk(req, idx)
            except ReadError as e:
                err = e
            except Exception as e:  # a bug must fail the request, not kill the worker
                err = e
            with cond:
                now = time.perf_counter()
                self._active -= 1
                dev.active -= 1
                dev.prefetch_active -= pf
                if self._active == 0:
                    self.busy_seconds += now - self._busy_since
                if dev.active == 0:
                    dev.busy_seconds += now - dev.busy_since
                self.bytes_read += n
                self.chunks_read += 1
                dev.bytes_read += n
                dev.chunks_read += 1
                req.bytes_done += n
                req.inflight -= 1
                if err is not None and req.error is None:
                    req.error = err
                finish = (
                    req.inflight == 0
                    and not req.finished
                    and (
                        req.next_chunk >= req.nchunks
                        or req.cancelled
                        or req.error is not None
                    )
                )
                if finish:
                    self._finished(req)
            if finish:
                self._finish(req)

    def _finish(self, req: ReadRequest) -> None:
        if req.crc32 is not None and req.error is None and not req.cancelled:
            # zlib.crc32 releases the GIL on large buffers
            got = zlib.crc32(req.view) & 0xFFFFFFFF
            if got != req.crc32:
                req.error = FormatError(
                    f"{self.files[req.file].path}: {req.label} at offset {req.offset} "
                    f"({req.nbytes} bytes) has crc32 {got:08x}, the manifest says "
                    f"{req.crc32:08x}; the file is corrupt, run mer verify and "
                    "re-run mer quantize"
                )
        req.t_done = time.perf_counter()
        req.done.set()
        for cb in req.callbacks:
            cb(req)

    # -------------------------------------------------------------- the read

    def _open(self, f: _File, req: ReadRequest, off: int) -> int:
        with f.lock:
            if f.fd >= 0:
                return f.fd
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
            try:
                if self.direct and hasattr(os, "O_DIRECT"):
                    try:
                        f.fd = os.open(f.path, flags | os.O_DIRECT)
                        f.direct = True
                        return f.fd
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self._warn_fallback(f, "open")
                f.fd = os.open(f.path, flags)
                f.direct = False
                return f.fd
            except OSError as e:
                raise ReadError(
                    f"{f.path}: cannot open it to read {req.label} at offset {off} "
                    f"({e.strerror}); the data file was removed, moved or made "
                    "unreadable during the run; restore it (mer verify checks a store)"
                ) from e

    def _warn_fallback(self, f: _File, where: str) -> None:
        warnings.warn(
            f"{f.path}: the filesystem refused O_DIRECT (EINVAL at {where}); reading "
            "it through the page cache instead, which is slower and uses more memory",
            BufferedFallbackWarning,
            stacklevel=2,
        )

    def _to_buffered(self, f: _File, fd: int) -> int:
        """Reopen ``f`` without O_DIRECT (after an EINVAL on an aligned read)."""
        with f.lock:
            if f.fd == fd and f.direct:
                try:
                    new = os.open(f.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise ReadError(
                        f"{f.path}: cannot reopen it without O_DIRECT ({e.strerror}); "
                        "the data file was removed or moved during the run"
                    ) from e
                # other threads may still be inside a read on the old descriptor;
                # it is closed with the reader
                self._retired.append(f.fd)
                f.fd, f.direct = new, False
                self._warn_fallback(f, "read")
            return f.fd

    def _preadv(self, fd: int, buf: memoryview, offset: int) -> int:
        # the single system call of a chunk; tests wrap it to inject faults
        return os.preadv(fd, [buf], offset)

    def _read_chunk(self, req: ReadRequest, idx: int) -> int:
        """Read chunk ``idx`` of ``req`` completely; return the bytes read."""
        f = self.files[req.file]
        start = idx * self.chunk_size
        n = min(self.chunk_size, req.nbytes - start)
        off = req.offset + start
        fd = f.fd if f.fd >= 0 else self._open(f, req, off)
        pos = 0
        attempt = 0
        while pos < n:
            try:
                got = self._preadv(fd, req.view[start + pos : start + n], off + pos)
            except OSError as e:
                if e.errno == errno.EINVAL and f.direct:
                    fd = self._to_buffered(f, fd)
                    continue
                if e.errno in _TRANSIENT and attempt < self.retries:
                    attempt += 1
                    with self._cond:
                        self.retried += 1
                    time.sleep(self.retry_delay * attempt)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise ReadError(
                    f"{f.path}: I/O error reading {req.label} at offset {off + pos} "
                    f"({n - pos} bytes){tries}: {e.strerror} (errno {e.errno}); "
                    "check the drive (dmesg) and run mer verify"
                ) from e
            if got <= 0 or (got < n - pos and self._file_size(fd) < off + n):
                raise ReadError(
                    f"{f.path}: file ends at byte {self._file_size(fd)} but "
                    f"{req.label} at offset {req.offset} needs bytes up to "
                    f"{req.offset + req.nbytes}; the file was truncated or replaced "
                    "during the run; restore the store (mer verify) and run again"
                )
            pos += got
            if pos < n and f.direct and pos % self.alignment:
                fd = self._to_buffered(f, fd)  # an odd short read: finish buffered
        if not f.direct:
            try:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                pass  # advisory only
        return n

    @staticmethod
    def _file_size(fd: int) -> int:
        try:
            return os.fstat(fd).st_size
        except OSError:
            return -1

    # -------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, Any]:
        """Counters: bytes and chunks read, busy seconds, GB/s while busy, retries.

        ``devices`` lists one entry per device queue: its key, file indices,
        bytes and chunks read and busy seconds (time with a read in flight on
        that device). Busy seconds of the devices adding up to more than the
        overall ``read_seconds`` means the devices were read in parallel.
        """
        with self._cond:
            now = time.perf_counter()
            busy = self.busy_seconds
            if self._active:
                busy += now - self._busy_since
            devices = [
                {
                    "device": d.key,
                    "files": list(d.files),
                    "bytes_read": d.bytes_read,
                    "chunks_read": d.chunks_read,
                    "read_seconds": d.busy_seconds
                    + (now - d.busy_since if d.active else 0.0),
                }
                for d in self._devices
            ]
            return {
                "bytes_read": self.bytes_read,
                "chunks_read": self.chunks_read,
                "read_seconds": busy,
                "read_gbps": self.bytes_read / busy / 1e9 if busy > 0 else 0.0,
                "retries": self.retried,
                "reads_cancelled": self.cancelled,
                "buffered_files": sum(
                    1 for f in self.files if f.fd >= 0 and not f.direct
                ),
                "devices": devices,
            }

    def close(self) -> None:
        """Stop the workers (queued reads are dropped) and close the files."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [r for d in self._devices for _, _, r in d.heap]
            for d in self._devices:
                d.heap.clear()
                d.cond.notify_all()
        for t in self._workers:
            t.join()
        for req in pending:
            if not req.finished:
                self.cancel(req)
        for f in self.files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def __enter__(self) -> ExtentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
