"""Sequential read throughput: our O_DIRECT reader vs plain buffered reads.

Usage::

    python benchmarks/reader.py [--file PATH] [--size 2GiB] [--chunk 4MiB]

Writes a file of random bytes (once; reused if it exists with the right size),
then in one run measures, cold each time (the file's pages are dropped from the
page cache with posix_fadvise(DONTNEED) before every pass):

* buffered ``os.preadv`` of ``--chunk`` bytes, one thread (the naive baseline);
* ``ExtentReader`` (O_DIRECT, ``--chunk`` chunks) at queue depth 1, 4 and 8;
* queue depth 8 again while the main thread runs pure-Python code, with the
  default 5 ms thread switch interval and with 0.5 ms: reader threads need the
  GIL briefly between reads, and a busy Python thread makes them wait.

Prints GB/s and the ratio to the buffered baseline. The drive and the CPUs may
be shared with other work: compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

from mer_cli.io import ExtentReader, SlabPool
from mer_cli.units import format_size, parse_size

EXTENT = 64 << 20  # bytes per request: a large expert extent


def make_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for off in range(0, size, block.nbytes):
            f.write(memoryview(block[: min(block.nbytes, size - off)]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def buffered(path: str, size: int, chunk: int) -> float:
    drop_cache(path)
    buf = bytearray(chunk)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    off = 0
    while off < size:
        off += os.preadv(fd, [mv], off)
    dt = time.perf_counter() - t0
    os.close(fd)
    return size / dt / 1e9


def direct(path: str, size: int, chunk: int, threads: int, busy: float | None) -> float:
    """GB/s of our reader; ``busy`` = switch interval with a busy Python thread."""
    drop_cache(path)
    nslab = 4
    pool = SlabPool(EXTENT, nslab)
    stop = threading.Event()
    old = sys.getswitchinterval()
    if busy is not None:
        sys.setswitchinterval(busy)

        def spin():  # Python-heavy compute holding the GIL
            x = 0
            while not stop.is_set():
                for i in range(1000):
                    x += i * i

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
    try:
        with ExtentReader([path], threads=threads, chunk_size=chunk) as r:
            t0 = time.perf_counter()
            inflight = []
            for i, off in enumerate(range(0, size - EXTENT + 1, EXTENT)):
                if len(inflight) == nslab:
                    inflight.pop(0).result(60)
                inflight.append(r.submit(0, off, EXTENT, pool.slabs[i % nslab]))
            for q in inflight:
                q.result(60)
            dt = time.perf_counter() - t0
            if not r.files[0].direct:
                sys.exit(
                    f"{path}: the filesystem refused O_DIRECT; pick a file elsewhere"
                )
            n = r.stats()["bytes_read"]
    finally:
        stop.set()
        sys.setswitchinterval(old)
        pool.close()
    return n / dt / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", default="/work/scratch/streaming/reader-bench.bin")
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--chunk", default="4MiB")
    a = ap.parse_args()
    size = parse_size(a.size) // EXTENT * EXTENT
    chunk = parse_size(a.chunk)
    os.makedirs(os.path.dirname(os.path.abspath(a.file)), exist_ok=True)
    make_file(a.file, size)
    print(f"file {a.file}, {format_size(size)}, chunk {format_size(chunk)}")
    base = buffered(a.file, size, chunk)
    rows = [("buffered preadv, 1 thread", base)]
    for qd in (1, 4, 8):
        rows.append(
            (
                f"O_DIRECT reader, queue depth {qd}",
                direct(a.file, size, chunk, qd, None),
            )
        )
    small = 256 << 10  # small chunks: one GIL hand-off per 256 KiB
    for c in (chunk, small):
        rows.append((f"qd 8, {format_size(c)} chunks, idle main thread", None, c))
        for sw in (0.005, 0.0005):
            rows.append(
                (
                    f"qd 8, {format_size(c)} chunks, busy Python, switch {sw * 1e3:g} ms",
                    sw,
                    c,
                )
            )
    out = []
    for row in rows:
        if len(row) == 3:
            name, sw, c = row
            row = (name, direct(a.file, size, c, 8, sw))
        out.append(row)
    print(f"{'':56s} {'GB/s':>6s} {'x buffered':>10s}")
    for name, gbps in out:
        print(f"{name:56s} {gbps:6.2f} {gbps / base:10.2f}")


if __name__ == "__main__":
    main()
