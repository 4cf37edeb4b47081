#!/usr/bin/env python3
"""Expert predictors on held-out prompts: recall beside the router-lookahead
baseline, and the cache hit rate and reads beside LRU and Belady's MIN.

::

    mer trace --model STORE --prompts prompts.txt -o run.trace.npz --max-tokens 64
    python benchmarks/predictors.py run.trace.npz --seeds 0,1,2 --model STORE

For each seed the traces' prompts are split into training and held-out prompts
(``--holdout``, by prompt) and ``mer_cli.train_predictor.train_predictor``
fits the Markov and MLP predictors on the training prompts (the predictor
files go to a temporary directory). The first seed's full report (recall@k
and precision@k per distance; per budget the hit rate and extents read per
token of LRU, the three-signal policy demand only, with each predictor
steering eviction only, with each predictor's hints also prefetching as the
live controller does, and Belady's MIN -- the optimum of demand paging) is
printed, then one line per seed: recall@K one layer ahead of each predictor,
and at each budget the saved predictor's policy (eviction only, then with
prefetch) and LRU as a share of MIN's hit rate, and the prefetching run's
reads as a multiple of MIN's -- the spread over seeds shows how much the
split alone moves the figures.

Then, for the first seed, the saved predictor's prefetching run at each
``--thresholds`` probability (the throttle's benefit-vs-cost threshold
``u t / (g + u t)``, a constant in the replay: 0.5 when every miss stalls a
full read and the drive is always busy, lower when the drive idles), and last
the policy with *perfect* predictions (the experts actually used) of the next
1..3 layers and of every layer's next visit, eviction only and prefetching:
the most any predictor can bring through this controller.
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
    ap.add_argument(
        "--thresholds",
        default="0.5,0.25,0.1,0",
        help="prefetch thresholds to sweep for the saved predictor (the report "
        "uses mer_cli.cache.PREFETCH_THRESHOLD; the ceiling the first one)",
    )
    args = ap.parse_args(argv)
    from mer_cli.errors import MerError
    from mer_cli.train_predictor import format_report, train_predictor

    if args.model is not None:
        from mer_cli import builtin

        args.model = builtin.resolve(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) / 100 for b in args.budgets.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
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
            sys.stdout.flush()
        K = rows[0][1].top_k
        names = list(rows[0][1].quality)
        head = f"{'seed':>4} {'held-out':>8} " + " ".join(f"{n:>9}" for n in names)
        for b in budgets:
            p = f"{100 * b:.0f}%"
            head += f" {f'pol/MIN@{p}':>11} {f'pf/MIN@{p}':>10} {f'reads@{p}':>9}"
            head += f" {f'LRU/MIN@{p}':>11}"
        print(
            f"recall@{K} one layer ahead; hit rate as a share of Belady's MIN "
            "(pol: eviction only, pf: with prefetch); reads: the prefetching "
            "run's extents read as a multiple of MIN's"
        )
        print(head + f" {'fit s':>6}")
        for seed, r, dt in rows:
            line = f"{seed:>4} {r.test_tokens:>8} "
            line += " ".join(
                f"{100 * r.quality[n][K]['recall'][0]:>8.1f}%" for n in names
            )
            for row in r.hit_rates:
                m, mr = row["belady"], row["reads"]["belady"]
                pf = f"prefetch+{r.chosen}"
                pol = row[f"policy+{r.chosen}"] / m if m else 0
                share = row[pf] / m if m else 0
                cost = row["reads"][pf] / mr if mr else 0
                lru = row["lru"] / m if m else 0
                line += f" {100 * pol:>10.1f}% {100 * share:>9.1f}% {cost:>8.2f}x"
                line += f" {100 * lru:>10.1f}%"
            print(line + f" {dt:>6.1f}")
        sys.stdout.flush()
        first = rows[0][1]
        print(
            f"\nseed {seeds[0]}, {first.chosen} prefetching at each threshold "
            "(hit rate, share of MIN's; extents read per token, multiple of "
            "MIN's; prefetch reads wasted):"
        )
        for line in threshold_sweep(
            args.traces, args.holdout, seeds[0], budgets, Path(first.output),
            thresholds, args.model,
        ):  # fmt: skip
            print(line)
    print(
        f"\nseed {seeds[0]}, the three-signal policy with perfect predictions "
        "(the experts actually used), hit rate as a share of MIN's "
        "(eviction only; prefetching at the first threshold, with its reads "
        "as a multiple of MIN's):"
    )
    for b, horizon, share, pf_share, cost in oracle_ceiling(
        args.traces, args.holdout, seeds[0], budgets, thresholds[0]
    ):
        print(
            f"  budget {100 * b:.0f}%: next {horizon} layer(s) {100 * share:.1f}%; "
            f"prefetching {100 * pf_share:.1f}% at {cost:.2f}x MIN's reads"
        )
    return 0


def held_out(traces, holdout: float, seed: int):
    """The held-out prompts' trace of ``seed``'s split (as train_predictor)."""
    from mer_cli.formats.trace import Trace, merge
    from mer_cli.train_predictor import split_by_prompt, subset

    loaded = [Trace.load(t) for t in traces]
    t = merge(loaded) if len(loaded) > 1 else loaded[0]
    return subset(t, split_by_prompt(t, holdout, seed)[1])


def threshold_sweep(
    traces, holdout, seed, budgets, pred_path, thresholds, model=None
) -> list:
    """The saved predictor's prefetching replay at each threshold, per budget."""
    from mer_cli.cache import simulate_belady, simulate_prefetch
    from mer_cli.predictors import load_predictor
    from mer_cli.train_predictor import predictions_of, requests_of

    t = held_out(traces, holdout, seed)
    N, L, K = t.experts.shape
    E = t.meta["num_experts"]
    pred = load_predictor(pred_path)
    if pred.kind == "shadow":  # scored by replaying the model (--model)
        from mer_cli.formats.store import Store
        from mer_cli.shadow import shadow_scores

        scores = shadow_scores(Store.open(model), t, pred, progress=False)
    else:
        scores = pred.predict_trace(t)
    preds = predictions_of(scores, K)
    reqs = requests_of(t.experts, E).tolist()
    out = []
    for b in budgets:
        slots = max(1, round(b * L * E))
        mn = simulate_belady(reqs, slots)
        mr = (1 - mn) * len(reqs) / N
        for th in thresholds:
            r = simulate_prefetch(reqs, slots, L, E, preds, top_k=K, threshold=th)
            out.append(
                f"  budget {100 * b:.0f}% threshold {th:<5g} hit {100 * r.hit_rate:.1f}%"
                f" ({100 * r.hit_rate / mn:.1f}% of MIN's {100 * mn:.1f}%), "
                f"reads {r.reads_per_token:.2f}/token ({r.reads_per_token / mr:.2f}x "
                f"MIN's {mr:.2f}), {100 * r.wasted_share:.0f}% of "
                f"{r.prefetch_reads / N:.2f} prefetches/token wasted"
            )
    return out


def oracle_ceiling(traces, holdout: float, seed: int, budgets, threshold) -> list:
    """What any predictor can bring through the cache policy: its hit rate,
    as a share of MIN, when the predictions of the next 1..A layers (A = 3,
    as the predictors) and of every layer's next visit (A = L - 1 and the
    same layer at the next token) are the experts actually used; eviction
    only, and prefetching (with the reads as a multiple of MIN's)."""
    import numpy as np

    from mer_cli.cache import simulate_belady, simulate_policy, simulate_prefetch
    from mer_cli.predictors import multi_hot
    from mer_cli.train_predictor import requests_of

    t = held_out(traces, holdout, seed)
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
            r = simulate_prefetch(
                reqs, slots, L, E, preds, top_k=K, threshold=threshold
            )
            cost = r.reads / ((1 - mn) * len(reqs)) if mn < 1 else 0.0
            out.append((b, horizon, hit / mn if mn else 0.0, r.hit_rate / mn, cost))
    return out


if __name__ == "__main__":
    sys.exit(main())
