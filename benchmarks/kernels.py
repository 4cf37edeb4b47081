#!/usr/bin/env python3
"""q4 matrix-vector / matrix-matrix speed against the memory-read ceiling.

For each Mixtral shape (14336x4096 = w1/w3, 4096x14336 = w2) it builds enough
distinct q4 matrices (random nibbles, random-sign fp16 scales) that, rotated
call after call, the weights stream from DRAM (> 8x the L3 cache), then times,
in the same run and alternating:

* ``read``: a pass that reads every packed and scale byte once (no maths),
  the ceiling numba code can reach on this machine at this moment;
* ``linear`` on each CPU path this machine can run, for T = 1, 8, 64 tokens
  (activations pre-quantized once, as the forward pass does).

It prints GB/s of weight bytes (packed + fp16 scales) per call, the ratio to
the read pass, and for T > 1 the effective GFLOP/s (2 x R x C x T per call).
Usage: ``python benchmarks/kernels.py [--threads N] [--iters 20] [--paths ...]``.
The machine may be shared: compare only figures from one run.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from mer_cli.formats.quant import QTensor
from mer_cli.kernels import (
    linear,
    quantize_input,
    set_threads,
    supported_paths,
)


@njit(parallel=True, nogil=True, cache=True)
def read_pass(p64, s64, out):
    """XOR-reduce every 8-byte word of each row: one read of the weight bytes."""
    R = p64.shape[0]
    for r in prange(R):
        acc = np.uint64(0)
        for j in range(p64.shape[1]):
            acc ^= p64[r, j]
        for j in range(s64.shape[1]):
            acc ^= s64[r, j]
        out[r] = acc


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
        return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 32 << 20


def make_mats(rng, n, R, C):
    mats = []
    for _ in range(n):
        packed = rng.integers(0, 256, size=(R, C // 2), dtype=np.uint8)
        sc = rng.standard_normal((R, C // 32)).astype(np.float32) * np.float32(0.002)
        mats.append(QTensor("q4", packed, sc.astype(np.float16)))
    return mats


def timed(fn, n_mat, iters, clock):
    """(median, best) time per call on ``clock`` (a ``time`` function)."""
    ts = []
    for i in range(iters):
        t = clock()
        fn(i % n_mat)
        ts.append(clock() - t)
    return float(np.median(ts)), float(np.min(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--iters", type=int, default=20, help="calls per measurement")
    ap.add_argument("--paths", default=",".join(supported_paths()))
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--shapes", default="14336x4096,4096x14336")
    ap.add_argument("--l3-factor", type=float, default=8.5, help="weights / L3 size")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU time of the calling thread (with --threads 1), for a "
        "machine shared with other work: time others hold the core is not "
        "counted (their cache and memory traffic still is)",
    )
    args = ap.parse_args()
    threads = set_threads(args.threads)
    if args.clock == "cpu" and threads != 1:
        ap.error("--clock cpu needs --threads 1 (it times the calling thread)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    paths = args.paths.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    print(
        f"numba {numba.__version__}, {threads} threads, paths {paths}, "
        f"L3 {l3_bytes() >> 20} MiB, {args.clock} clock"
    )
    rows = []
    for shp in args.shapes.split(","):
        R, C = map(int, shp.split("x"))
        nbytes = R * C // 2 + R * C // 32 * 2
        n_mat = max(2, int(np.ceil(args.l3_factor * l3_bytes() / nbytes)))
        mats = make_mats(rng, n_mat, R, C)
        print(
            f"\n{R}x{C}: {nbytes / 1e6:.1f} MB per matrix, {n_mat} matrices "
            f"({n_mat * nbytes / 1e6:.0f} MB rotated)",
            flush=True,
        )
        sink = np.zeros(R, np.uint64)
        p64 = [m.packed.view(np.uint64) for m in mats]
        s64 = [m.scales.view(np.uint64) for m in mats]
        read_pass(p64[0], s64[0], sink)

        def read(i, p64=p64, s64=s64, sink=sink):
            read_pass(p64[i], s64[i], sink)

        xs = {
            T: quantize_input(rng.standard_normal((T, C), dtype=np.float32))
            for T in tokens
        }
        outs = {T: np.empty((T, R), np.float32) for T in tokens}
        for path in paths:
            for T in tokens:
                qa, out = xs[T], outs[T]
                linear(mats[0], qa, out=out, path=path)  # compile + warm

                def run(i, qa=qa, out=out, path=path, mats=mats):
                    linear(mats[i], qa, out=out, path=path)

                iters = max(3, args.iters // max(1, T // 8))
                r1 = timed(read, n_mat, args.iters, clock)
                k = timed(run, n_mat, iters, clock)
                r2 = timed(read, n_mat, args.iters, clock)
                # median of the kernel against the better median of the two read
                # passes around it; "best" compares the fastest calls of each
                ceil = nbytes / min(r1[0], r2[0]) / 1e9
                ceil_b = nbytes / min(r1[1], r2[1]) / 1e9
                gbs, gbs_b = nbytes / k[0] / 1e9, nbytes / k[1] / 1e9
                gflops = 2 * R * C * T / k[0] / 1e9
                row = (shp, path, T, k[0] * 1e3, gbs, ceil, gbs / ceil)
                rows.append(row + (gbs_b, ceil_b, gbs_b / ceil_b, gflops))
                print(
                    f"  {path:8s} T={T:<3d} {k[0] * 1e3:8.2f} ms  {gbs:6.1f} GB/s  "
                    f"read {ceil:6.1f} GB/s  ratio {gbs / ceil:5.2f}  "
                    f"(best {gbs_b / ceil_b:4.2f})  {gflops:7.1f} GFLOP/s",
                    flush=True,
                )
        del mats, p64, s64
    print(
        "\nmedian call vs median read pass; best = fastest call vs fastest read"
        "\nshape        path      T    ms/call   GB/s  read GB/s  ratio"
        "  | best GB/s   read  ratio | GFLOP/s"
    )
    for shp, path, T, ms, gbs, ceil, ratio, gbs_b, ceil_b, ratio_b, gf in rows:
        print(
            f"{shp:12s} {path:8s} {T:3d} {ms:9.2f} {gbs:6.1f} {ceil:10.1f} "
            f"{ratio:6.2f}  | {gbs_b:9.1f} {ceil_b:6.1f} {ratio_b:6.2f} | {gf:7.1f}"
        )


if __name__ == "__main__":
    main()
