#!/usr/bin/env python3
"""Expert predictors on held-out prompts: recall beside the router-lookahead
baseline, and the cache hit rate beside LRU and Belady's MIN.

::

    mer trace --model STORE --prompts prompts.txt -o run.trace.npz --max-tokens 64
    python benchmarks/predictors.py run.trace.npz --seeds 0,1,2

For each seed the traces' prompts are split into training and held-out prompts
(``--holdout``, by prompt) and ``mer_cli.train_predictor.train_predictor``
fits the Markov and MLP predictors on the training prompts (the predictor
files go to a temporary directory). The first seed's full report (recall@k
and precision@k per distance, hit rates per budget) is printed, then one line
per seed: recall@K one layer ahead of each predictor, and at each budget the
three-signal policy with the saved predictor and LRU as a share of Belady's
MIN -- the spread over seeds shows how much the split alone moves the figures.
Everything runs in this process; fit times are wall-clock on a possibly
shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices, see the CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", metavar="TRACE")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seeds", default="0", help="comma-separated split seeds")
    ap.add_argument("--budgets", default="10,25,50", help="percent of expert bytes")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args(argv)
    from mer_cli.errors import MerError
    from mer_cli.train_predictor import format_report, train_predictor

    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) / 100 for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(seeds):
            t0 = time.perf_counter()
            try:
                r = train_predictor(
                    args.traces,
                    Path(tmp) / f"p{seed}.npz",
                    holdout=args.holdout,
                    budgets=budgets,
                    seed=seed,
                    epochs=args.epochs,
                    hidden=args.hidden,
                    progress=False,
                )
            except MerError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            dt = time.perf_counter() - t0
            if i == 0:
                print(format_report(r))
                print()
            rows.append((seed, r, dt))
    K = rows[0][1].top_k
    names = list(rows[0][1].quality)
    head = f"{'seed':>4} {'held-out':>8} " + " ".join(f"{n:>9}" for n in names)
    for b in budgets:
        head += f" {f'pol/MIN@{100 * b:.0f}%':>12} {f'LRU/MIN@{100 * b:.0f}%':>12}"
    print(f"recall@{K} one layer ahead; hit rate as a share of Belady's MIN")
    print(head + f" {'fit s':>6}")
    for seed, r, dt in rows:
        line = f"{seed:>4} {r.test_tokens:>8} "
        line += " ".join(f"{100 * r.quality[n][K]['recall'][0]:>8.1f}%" for n in names)
        for row in r.hit_rates:
            best = row[f"policy+{r.chosen}"] / row["belady"] if row["belady"] else 0
            lru = row["lru"] / row["belady"] if row["belady"] else 0
            line += f" {100 * best:>11.1f}% {100 * lru:>11.1f}%"
        print(line + f" {dt:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
