"""Continuous batching under a memory limit: aggregate decode tok/s and expert
bytes read per token at several batch sizes, experts streamed from the drive.

Usage (as root; cgroup v1 memory controller)::

    python benchmarks/batch.py --store mixtral-8l.mer --limit 2GiB \\
        --batches 1,4,16 --tokens 8
    python benchmarks/batch.py --store tiny.mer --no-cgroup --batches 1,2   # dry run

One configuration per batch size, each a child process placed in a cgroup v1
memory group limited to ``--limit`` (the harness of ``benchmarks/stream.py``:
page cache dropped before each, the child's page cache charged to the group).
Each child streams the experts (``StreamedExperts``, O_DIRECT reads into
``--ram-budget`` of slots, default: limit - dense - KV - 512 MiB) and runs
:class:`mer_cli.batch.BatchGeneration` over ``max(batch, --min-prompts)``
prompts of ``--tokens`` greedy tokens each, so every configuration decodes at
least ``min-prompts x (tokens - 1)`` tokens and a batch of B is full for all
its steps. Prompts are short and distinct; prompt i is the same text in every
configuration.

Reported in one table: decode tokens and steps, aggregate decode tok/s (tokens
decoded in batched steps / their wall time) and its ratio to batch 1, expert
bytes read from the drive per decoded token and how many times fewer than
batch 1, expert fetches per token (a fetch: one (layer, expert) of a step's
union), the cache hit rate, decode read GB/s over decode wall time, and the
cgroup's peak memory. The prompts that every configuration ran must give the
same text in each (a batch result equals its single run). The machine may be
shared: compare only figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream import (  # noqa: E402  (benchmarks/ is not a package)
    CHILD_FLAG,
    Cgroup,
    _warm_up,
    ceiling_reader,
    drop_caches,
    expert_budget,
    fmt,
    make_warm_store,
    run_child,
)

WORDS = (
    "river", "castle", "winter", "engine", "garden", "market", "signal", "forest",
    "harbor", "planet", "letter", "silver", "bridge", "candle", "desert", "mirror",
    "thunder", "orchard", "lantern", "meadow", "glacier", "compass", "velvet", "canyon",
    "quarry", "falcon", "harvest", "copper", "island", "temple", "voyage", "marble",
)  # fmt: skip


def prompts(n: int) -> list[str]:
    """``n`` short distinct prompts; prompt i is the same for every ``n``."""
    return [f"The {WORDS[i % len(WORDS)]} {i}" for i in range(n)]


# ---------------------------------------------------------------- child side


def child(cfg: dict) -> dict:
    from mer_cli.batch import BatchGeneration
    from mer_cli.generate import GenerateOptions, load
    from mer_cli.memory import peak_rss_bytes
    from mer_cli.streaming import StreamedExperts

    _warm_up(cfg.get("warm"), cfg.get("threads"))

    def make(store):
        return StreamedExperts(
            store,
            cfg["ram_budget"],
            io_threads=cfg["io_threads"],
            prefetch=cfg["prefetch"],
        )

    t0 = time.perf_counter()
    eng, tok = load(
        cfg["store"], ctx=cfg["ctx"], threads=cfg.get("threads"), source=make
    )
    load_s = time.perf_counter() - t0
    try:
        run = BatchGeneration(
            eng,
            tok,
            prompts(cfg["prompts"]),
            GenerateOptions(max_tokens=cfg["tokens"]),
            cfg["batch"],
        )
        results = list(run)
        src = eng.source.stats()
    finally:
        eng.close()
    s = run.stats.as_dict()
    return {
        "config": cfg["name"],
        "batch": cfg["batch"],
        "load_s": round(load_s, 3),
        "texts": [r.completion for r in results],
        "stats": s,
        "hit_rate": src.get("hit_rate"),
        "slots": src.get("slots"),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def child_main(arg: str) -> None:
    out = child(json.loads(arg))
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent side


def main() -> None:
    from mer_cli.batch import kv_bytes_per_position
    from mer_cli.formats.store import Store
    from mer_cli.io.reader import DEFAULT_CHUNK, DEFAULT_THREADS
    from mer_cli.sources import largest_experts_file
    from mer_cli.units import format_size, parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="mer store to stream")
    ap.add_argument("--limit", default="2GiB", help="cgroup memory limit")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per prompt")
    ap.add_argument("--min-prompts", type=int, default=4, help="prompts per config")
    ap.add_argument("--ram-budget", help="expert slots [default: see the docstring]")
    ap.add_argument("--io-threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--threads", type=int, help="compute threads [default: all]")
    ap.add_argument("--no-prefetch", action="store_true", help="demand reads only")
    ap.add_argument("--ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per config")
    ap.add_argument("--no-cgroup", action="store_true", help="dry run: no memory limit")
    ap.add_argument("--json", help="also write every result to this file")
    args = ap.parse_args()

    root = os.geteuid() == 0
    if not args.no_cgroup and not root:
        sys.exit(
            "benchmarks/batch.py needs root: it creates a cgroup v1 memory group and "
            "drops the page cache. Run it with sudo, or pass --no-cgroup"
        )
    batches = [int(b) for b in args.batches.split(",")]
    store = Store.open(args.store)
    limit = parse_size(args.limit, what="--limit")
    cfg = store.model
    ctx = 32 + args.tokens  # the prompts are a few tokens
    kv = max(batches) * ctx * kv_bytes_per_position(cfg, "f32")
    dense = store.dense_bytes_total
    budget = expert_budget(store, limit, args.limit, kv, args.ram_budget)
    files = list(store.file_paths)
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(
        f"store {args.store}: {format_size(store.expert_bytes_total)} of experts "
        f"({len(store.experts)} x {format_size(store.extent_nbytes)}), dense "
        f"{format_size(dense)}; limit {format_size(limit)}, expert budget "
        f"{format_size(budget)} ({budget // store.extent_nbytes} slots), KV at most "
        f"{format_size(kv)}; {args.tokens} tokens per prompt",
        flush=True,
    )
    drop_all = root and not args.no_cgroup
    tmp = Path(tempfile.mkdtemp(prefix="mer-batch-bench-"))
    results: list[dict] = []
    cgroup = None
    ceil = None
    try:
        warm = make_warm_store(store.quantization, tmp)
        base = {
            "store": str(args.store),
            "tokens": args.tokens,
            "ctx": ctx,
            "threads": args.threads,
            "warm": warm,
            "io_threads": args.io_threads,
            "ram_budget": budget,
            "prefetch": not args.no_prefetch,
        }
        drop_caches(files, drop_all)
        ceil = ceiling_reader(
            largest_experts_file(store), DEFAULT_CHUNK, args.ceiling_seconds
        )
        print(f"ceiling: {ceil:.3f} GB/s (mer reader, 8 threads)", flush=True)
        if not args.no_cgroup:
            cgroup = Cgroup(f"mer-batch-bench-{os.getpid()}", limit)
        for b in batches:
            c = {
                **base,
                "batch": b,
                "prompts": max(b, args.min_prompts),
                "name": f"batch {b}",
            }
            drop_caches(files, drop_all)
            print(f"running batch {b} ({c['prompts']} prompts) ...", flush=True)
            results.append(run_child(c, cgroup, args.timeout, __file__))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, ceil)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def report(results: list[dict], ceil: float | None) -> None:
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["batch"] == 1), None)
    print()
    head = (
        f"{'config':9} {'tokens':>6} {'steps':>5} {'tok/s':>8} {'x b1':>6} "
        f"{'GB/tok':>7} {'fewer':>6} {'fetch/tok':>9} {'hit':>5} {'wall GB/s':>9} "
        f"{'peak MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['config']:9} error: {r['error']}")
            continue
        s = r["stats"]
        tps = s["decode_tok_s"]
        gbt = s["decode_bytes_read_per_token"]
        gbt = gbt / 1e9 if gbt is not None else None
        b_tps = base["stats"]["decode_tok_s"] if base else None
        b_gbt = base["stats"]["decode_bytes_read_per_token"] if base else None
        speed = tps / b_tps if tps and b_tps else None
        fewer = b_gbt / 1e9 / gbt if gbt and b_gbt else None
        fetch = s["expert_fetches"] / s["decode_tokens"] if s["decode_tokens"] else None
        wall = s["decode_bytes_read"] / s["decode_s"] / 1e9 if s["decode_s"] else None
        peak = r.get("cgroup_max_usage_bytes") or r.get("peak_rss_bytes")
        print(
            f"{r['config']:9} {s['decode_tokens']:>6} {s['steps']:>5} "
            f"{fmt(tps, '.3f'):>8} {fmt(speed, '.2f', 'x'):>6} {fmt(gbt, '.3f'):>7} "
            f"{fmt(fewer, '.2f', 'x'):>6} {fmt(fetch, '.2f'):>9} "
            f"{fmt(r['hit_rate'] and 100 * r['hit_rate'], '.0f', '%'):>5} "
            f"{fmt(wall):>9} {fmt(peak and peak / 2**20, '.0f'):>8}"
        )
    print()
    print(
        f"ceiling {fmt(ceil)} GB/s. tok/s: tokens decoded in batched steps / their "
        "wall time (prefill excluded); GB/tok: expert bytes read from the drive "
        "during decode per decoded token; fetch/tok: (layer, expert) fetches per "
        "token (one-token steps: layers x top-k); hit: expert cache hit rate; wall "
        "GB/s: decode bytes / decode time; peak: cgroup peak usage (else peak RSS)"
    )
    n = min((len(r["texts"]) for r in ok), default=0)
    firsts = {r["config"]: tuple(r["texts"][:n]) for r in ok}
    if len(set(firsts.values())) > 1:
        print(f"WARNING: the first {n} prompts gave different texts:", firsts)
    elif n:
        print(f"the first {n} prompts gave the same text in every configuration")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        child_main(sys.argv[2])
    else:
        main()
