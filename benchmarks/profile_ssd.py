"""Our sequential O_DIRECT figures beside fio's, on the same file in the same run.

For each (block size, threads) cell, ``mer profile-ssd``'s reader (threads
sharing one sequential cursor, ``os.preadv`` into page-aligned buffers) and fio
(``--ioengine=libaio --iodepth=T --direct=1 --rw=read``: one sequential stream
with T reads in flight, the same access pattern) read the same file for the same
time, in ABBA order (ours/fio, fio/ours, ...) so that drift in a noisy drive
hits both; the table gives every figure and the ratio of the medians.
The target is within 10% of fio.

    python benchmarks/profile_ssd.py --dir /work/scratch/profile-ssd --size 4GiB
    python benchmarks/profile_ssd.py --file /data/big.bin --seconds 5

With ``--dir`` a test file is written first and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from mer_cli.profile_ssd import measure_sequential, open_target
from mer_cli.units import format_size, parse_size

MiB = 1 << 20
CELLS = [(4 * MiB, 1), (1 * MiB, 4), (4 * MiB, 8), (16 * MiB, 4)]


def fio_gbps(path: str, block: int, threads: int, seconds: float, start: int) -> float:
    """fio's sequential O_DIRECT read GB/s (1e9 bytes/s) for one cell."""
    cmd = [
        "fio",
        "--name=seq",
        f"--filename={path}",
        "--readonly",
        "--rw=read",
        f"--bs={block}",
        "--direct=1",
        "--ioengine=libaio",
        f"--iodepth={threads}",
        f"--offset={start}",  # start where ours does; fio wraps to the end
        f"--runtime={seconds}",
        "--time_based",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    return job["io_bytes"] / (job["runtime"] / 1000) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--file", help="existing file to read (a few GiB)")
    where.add_argument("--dir", help="directory for a temporary test file")
    ap.add_argument("--size", default="4GiB", help="test file size with --dir")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="ours/fio pairs per cell")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("fio is not installed (apt-get install fio); nothing to compare")
        return 1

    target_path = args.file or args.dir
    size = parse_size(args.size) if args.dir else None
    rows = []
    with open_target(target_path, size=size, progress=sys.stderr.isatty()) as t:
        print(
            f"target {t.read_path} ({t.kind}, {format_size(t.span)}), "
            f"{args.seconds:g} s per measurement, {args.repeats} ours/fio pairs "
            "per cell, ABBA order"
        )
        for i, (block, threads) in enumerate(CELLS):
            ours, theirs = [], []
            sec = args.seconds
            for r in range(args.repeats):
                frac = ((i * args.repeats + r) * 0.6180339887498949) % 1.0
                start = int(frac * (t.span // block)) * block
                order = ("mer", "fio") if r % 2 == 0 else ("fio", "mer")  # ABBA
                for who in order:
                    if who == "mer":
                        ours.append(measure_sequential(t, block, threads, sec, frac))
                    else:
                        theirs.append(fio_gbps(t.read_path, block, threads, sec, start))
            rows.append((block, threads, ours, theirs))

    print()
    print(f"{'cell':>14s} {'mer GB/s':>16s} {'fio GB/s':>16s} {'mer/fio':>8s}")
    ratios = []
    for block, threads, ours, theirs in rows:
        ratio = statistics.median(ours) / statistics.median(theirs)
        ratios.append(ratio)
        print(
            f"{format_size(block):>9s} x {threads:<2d} "
            f"{' '.join(f'{g:.2f}' for g in ours):>16s} "
            f"{' '.join(f'{g:.2f}' for g in theirs):>16s} {ratio:>8.2f}"
        )
    print(
        f"\nmedian ratio {statistics.median(ratios):.2f}; cells within 10% of fio: "
        f"{sum(abs(1 - x) <= 0.10 for x in ratios)}/{len(ratios)}. The drive may "
        "be shared and noisy: compare only figures from one run."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
