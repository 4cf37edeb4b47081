#!/usr/bin/env python3
"""Expert predictors on held-out prompts: recall beside the router-lookahead
baseline, and the cache hit rate beside LRU and Belady's MIN.

::

    mer trace --model STORE --prompts prompts.txt -o run.trace.npz --max-tokens 64
    python benchmarks/predictors.py run.trace.npz --seeds 0,1,2 --model STORE

For each seed the traces' prompts are split into training and held-out prompts
(``--holdout``, by prompt) and ``mer_cli.train_predictor.train_predictor``
fits the Markov and MLP predictors on the training prompts (the predictor
files go to a temporary directory). The first seed's full report (recall@k
and precision@k per distance, hit rates per budget) is printed, then one line
per seed: recall@K one layer ahead of each predictor, and at each budget the
three-signal policy with the saved predictor and LRU as a share of Belady's
MIN -- the spread over seeds shows how much the split alone moves the figures.
Last, the policy's hit rate with *perfect* predictions (the experts actually
used) of the next 1..3 layers and of every layer's next visit: the most any
predictor can bring through the cache's predicted signal.
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
    ap.add_argument("--model", help="the traced store (or builtin): adds mlp+router")
    args = ap.parse_args(argv)
    from mer_cli.errors import MerError
    from mer_cli.train_predictor import format_report, train_predictor

    if args.model is not None:
        from mer_cli import builtin

        args.model = builtin.resolve(args.model)
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
                    model=args.model,
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
    ceiling = oracle_ceiling(args.traces, args.holdout, seeds[0], budgets)
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
    print(
        f"\nseed {seeds[0]}, the three-signal policy with perfect predictions "
        "(the experts actually used) as a share of MIN:"
    )
    for b, (horizon, share) in ceiling:
        print(f"  budget {100 * b:.0f}%: next {horizon} layer(s) {100 * share:.1f}%")
    return 0


def oracle_ceiling(traces, holdout: float, seed: int, budgets) -> list:
    """What any predictor can bring through the cache policy: its hit rate,
    as a share of MIN, when the predictions of the next 1..A layers (A = 3,
    as the predictors) and of every layer's next visit (A = L - 1 and the
    same layer at the next token) are the experts actually used."""
    import numpy as np

    from mer_cli.cache import simulate_belady, simulate_policy
    from mer_cli.formats.trace import Trace, merge
    from mer_cli.predictors import multi_hot
    from mer_cli.train_predictor import requests_of, split_by_prompt, subset

    loaded = [Trace.load(t) for t in traces]
    t = merge(loaded) if len(loaded) > 1 else loaded[0]
    t = subset(t, split_by_prompt(t, holdout, seed)[1])
    N, L, K = t.experts.shape
    E = t.meta["num_experts"]
    X = multi_hot(t.experts, E).astype(np.float32)
    reqs = requests_of(t.experts, E).tolist()
    out = []
    for horizon in (min(3, L - 1), L):
        preds: list = []
        for n in range(N):
            for layer in range(L):
                d = {}
                for h in range(1, horizon + 1):  # h = L: this layer, next token
                    j, m = (layer + h) % L, n + (layer + h) // L
                    if m < N and t.prompt[m] == t.prompt[n]:
                        d[j] = X[m, j]
                preds.append(d)
                preds.extend([None] * (K - 1))
        for b in budgets:
            slots = max(1, round(b * L * E))
            mn = simulate_belady(reqs, slots)
            hit = simulate_policy(reqs, slots, L, E, preds)
            out.append((b, (horizon, hit / mn if mn else 0.0)))
    return out


if __name__ == "__main__":
    sys.exit(main())
