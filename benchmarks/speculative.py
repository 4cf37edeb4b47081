"""Speculative decoding on and off, streaming experts under a memory limit.

Usage (as root; cgroup v1 memory controller)::

    python benchmarks/speculative.py --store m8.mer --limit 4GiB --tokens 32
    python benchmarks/speculative.py --store tiny.mer --no-cgroup --tokens 16  # dry

One run, one child process per configuration, each placed in a cgroup v1 memory
group limited to ``--limit`` (page cache included; the harness of
``benchmarks/stream.py``), with the page cache dropped before each. Every child
streams experts with O_DIRECT reads into ``limit - dense - KV - 512 MiB`` of
slots and completes the same repetitive prompt set: code-editing requests
whose answer repeats the input (rename a variable, add a field, reformat a
table, repeat a list with one change), as an agent produces them.
Configurations:

``plain``
    One token per forward pass (the reference).
``lookup``
    ``--speculative lookup`` with ``--draft-tokens`` drafts.
``draft``
    ``--speculative draft`` with ``--draft STORE`` (only when given).
``replay``
    The verification pass at a known acceptance: an oracle drafter proposes
    the ``plain`` run's own next tokens (each replaced by a wrong one with
    probability ``--replay-miss``). Not a drafter users have: it shows what
    the batched pass gains under the memory limit when drafts are right, as
    prompt lookup's are when a trained model copies its input.

Reported per configuration: decode tok/s over all prompts, expert bytes read
per generated token (during decode), hit rate, acceptance rate and tokens per
forward pass; ratios against ``plain``; and a check that every configuration
produced exactly the same tokens as ``plain``. The machine may be shared:
compare only figures of one run. ``--rounds 2`` runs the configurations twice,
alternated, to show the drift.

A random-weight store does not copy its prompt the way a trained model does:
its acceptance says how often its greedy text repeats itself (loops) or the
prompt, not what a real model would reach; the per-prompt lines show it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream import (  # noqa: E402  (benchmarks/ is not a package)
    Cgroup,
    drop_caches,
    expert_budget,
    fmt,
    make_warm_store,
)

CHILD_FLAG = "--child"

PROMPTS = [
    "Rename the variable total to acc in this function.\n\n"
    "def sum_list(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
    "    return total\n\nThe function with total renamed to acc:\n\n"
    "def sum_list(xs):\n",
    "Add a field email: str to this dataclass and keep everything else.\n\n"
    "@dataclass\nclass User:\n    id: int\n    name: str\n    age: int\n"
    "    active: bool = True\n\nUpdated code:\n\n@dataclass\nclass User:\n",
    "Change the port from 8080 to 9090 in this config and print it in full.\n\n"
    "server:\n  host: 0.0.0.0\n  port: 8080\n  workers: 4\n  timeout: 30\n"
    "  log_level: info\n\nUpdated config:\n\nserver:\n  host: 0.0.0.0\n",
    "Repeat this list, replacing the third item with pears.\n\n"
    "- apples\n- bananas\n- cherries\n- dates\n- figs\n- grapes\n\n"
    "Updated list:\n\n- apples\n- bananas\n",
]


# Python code-editing prompts whose answer repeats the input (same function
# renamed, a class extended, a dict or list copied with a change, a test
# method repeated): for a model trained on code, such as the built-in one
CODE_PROMPTS = [
    # func
    """\
def parse_header(line):
    name, _, value = line.partition(":")
    name = name.strip().lower()
    value = value.strip()
    if not name:
        raise ValueError("empty header name")
    return name, value


# The same function, with line renamed to text:

def parse_header(text):
""",
    # class
    """\
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return "Point(%r, %r)" % (self.x, self.y)

    def __eq__(self, other):
        return self.x == other.x and self.y == other.y


class Point3:
    def __init__(self, x, y, z):
        self.x = x
        self.y = y
""",
    # dict
    """\
DEFAULTS = {
    "host": "localhost",
    "port": 8080,
    "workers": 4,
    "timeout": 30,
    "log_level": "info",
    "debug": False,
}

TEST_DEFAULTS = {
    "host": "localhost",
    "port": 9090,
""",
    # all
    """\
__all__ = [
    "parse",
    "parse_args",
    "format_usage",
    "format_help",
    "print_usage",
    "print_help",
    "error",
    "exit",
]


__all__ = [
    "parse",
""",
    # loop
    """\
def total(items):
    result = 0
    for item in items:
        if item is None:
            continue
        result += item.price * item.count
    return result


def total_weight(items):
    result = 0
    for item in items:
        if item is None:
            continue
""",
    # tests
    """\
    def test_add(self):
        self.assertEqual(add(1, 2), 3)
        self.assertEqual(add(0, 0), 0)
        self.assertEqual(add(-1, 1), 0)

    def test_sub(self):
        self.assertEqual(sub(3, 2), 1)
        self.assertEqual(sub(0, 0), 0)
""",
]
PROMPT_SETS = {"agent": PROMPTS, "code": CODE_PROMPTS}


# ---------------------------------------------------------------- child side


class ReplayDrafter:
    """Oracle drafts: the reference run's next tokens after the prompt, each
    replaced by another token with probability ``miss`` (seeded)."""

    name = "replay"

    def __init__(self, reference: list[list[int]], miss: float, vocab: int) -> None:
        import numpy as np

        self.reference = reference
        self.miss = miss
        self.vocab = vocab
        self.rng = np.random.default_rng(0)
        self.prompt = -1
        self.start = 0

    def begin(self, prompt_index: int, prompt_tokens: int) -> None:
        self.prompt, self.start = prompt_index, prompt_tokens

    def reset(self) -> None:
        pass

    def propose(self, context, k: int) -> list[int]:
        ref = self.reference[self.prompt]
        done = len(context) - self.start  # generated so far, the last included
        out = list(ref[done : done + k])
        for i, t in enumerate(out):
            if self.rng.random() < self.miss:
                out[i] = (t + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
        return out

    def close(self) -> None:
        pass


def child(cfg: dict) -> dict:
    from mer_cli.generate import Completion, GenerateOptions, generate, load
    from mer_cli.memory import peak_rss_bytes
    from mer_cli.speculative import DraftModel, DraftPolicy
    from mer_cli.streaming import StreamedExperts

    method = cfg["speculative"]

    def options(max_tokens: int, method=method) -> GenerateOptions:
        return GenerateOptions(
            max_tokens=max_tokens,
            speculative="draft" if method == "replay" else method,
            draft_tokens=cfg["draft_tokens"],
        )

    # JIT warm-up on a tiny store, so the measured store stays cold
    weng, wtok = load(cfg["warm"], ctx=64, threads=cfg.get("threads"))
    try:
        generate(weng, wtok, "warm up warm up", options(6, "lookup"))
        generate(weng, wtok, "warm up warm up", GenerateOptions(max_tokens=6))
    finally:
        weng.close()

    def make(store):
        return StreamedExperts(
            store, cfg["ram_budget"], io_threads=cfg["io_threads"], prefetch=True
        )

    t0 = time.perf_counter()
    eng, tok = load(cfg["store"], ctx=cfg["ctx"], threads=cfg.get("threads"),
                    source=make)  # fmt: skip
    drafter = None
    if method == "draft":
        drafter = DraftModel.open(cfg["draft"], eng.store, ctx=cfg["ctx"],
                                  threads=cfg.get("threads"))  # fmt: skip
    elif method == "replay":
        drafter = ReplayDrafter(cfg["reference"], cfg["replay_miss"],
                                eng.cfg.vocab_size)  # fmt: skip
    load_s = time.perf_counter() - t0
    policy = None  # shared by the prompts, as in mer generate --prompts-file
    if method:
        policy = DraftPolicy(cfg["draft_tokens"], eng.cfg.num_experts, eng.cfg.top_k)
    per_prompt = []
    try:
        for i, p in enumerate(cfg["prompts"]):
            if method == "replay":
                drafter.begin(i, len(tok.encode(p)))
            c = Completion(eng, tok, p, options(cfg["tokens"]), drafter=drafter,
                           policy=policy)  # fmt: skip
            r = c.run()
            s = r.stats
            io = s.get("io") or {}
            per_prompt.append(
                {
                    "prompt_tokens": r.prompt_tokens,
                    "tokens": list(c.tokens),
                    "text": r.completion,
                    "finish": r.finish_reason,
                    "decode_tokens": s["decode_tokens"],
                    "decode_s": s["decode_s"],
                    "prefill_s": s["prefill_s"],
                    "decode_bytes": io.get("decode_bytes_read", 0),
                    "hit_rate": io.get("hit_rate"),
                    "speculative": s.get("speculative"),
                    "copied": _copied_share(tok.encode(p), c.tokens),
                }
            )
    finally:
        eng.close()
        if drafter is not None:
            drafter.close()
    return {
        "config": cfg["name"],
        "load_s": round(load_s, 3),
        "prompts": per_prompt,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _copied_share(prompt: list[int], out: list[int], n: int = 3) -> float | None:
    """Share of output tokens that continue an n-gram seen before them (in the
    prompt or earlier output): what prompt lookup can hope to draft."""
    if len(out) <= n:
        return None
    seen = set()
    ctx = list(prompt)
    for i in range(len(ctx) - n):
        seen.add(tuple(ctx[i : i + n + 1]))
    hits = 0
    for t in out:
        if tuple(ctx[-n:] + [t]) in seen:
            hits += 1
        ctx.append(t)
        seen.add(tuple(ctx[-n - 1 :]))
    return round(hits / len(out), 3)


# ---------------------------------------------------------------- parent side


def run_child(cfg: dict, cgroup: Cgroup | None, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(cfg)]
    if cgroup is not None:
        cgroup.reset_max()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout,
            preexec_fn=cgroup.add_self if cgroup is not None else None,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"config": cfg["name"], "error": f"timed out after {timeout:g} s"}
    line = next(
        (x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None
    )
    if p.returncode != 0 or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory in the cgroup?)" if p.returncode < 0 else ""
        return {"config": cfg["name"], "error": f"exit {p.returncode} {why} "
                + " | ".join(tail)}  # fmt: skip
    out = json.loads(line[len("RESULT ") :])
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if cgroup is not None:
        out["cgroup_max_usage_bytes"] = cgroup.usage_max()
    return out


def totals(r: dict) -> dict:
    ps = r["prompts"]
    dec_tok = sum(p["decode_tokens"] for p in ps)
    dec_s = sum(p["decode_s"] for p in ps)
    dec_b = sum(p["decode_bytes"] for p in ps)
    sp = [p["speculative"] for p in ps if p["speculative"]]
    drafted = sum(s["drafted"] for s in sp)
    accepted = sum(s["accepted"] for s in sp)
    passes = sum(s["verify_passes"] + s["plain_steps"] for s in sp)
    produced = sum(s["tokens"] for s in sp)
    hits = [p["hit_rate"] for p in ps if p["hit_rate"] is not None]
    return {
        "tok_s": dec_tok / dec_s if dec_s else None,
        "gb_tok": dec_b / dec_tok / 1e9 if dec_tok else None,
        "acceptance": accepted / drafted if drafted else None,
        "per_pass": produced / passes if passes else (1.0 if dec_tok else None),
        "hit": hits[-1] if hits else None,
        "tokens": sum(len(p["tokens"]) for p in ps),
    }


def report(results: list[dict]) -> None:
    print()
    head = (
        f"{'config':10} {'tok/s':>8} {'x plain':>8} {'GB/tok':>8} {'x plain':>8} "
        f"{'accept':>7} {'tok/pass':>8} {'hit':>6} {'tokens':>6} {'same':>5}"
    )
    print(head)
    print("-" * len(head))
    ref = next((r for r in results if r.get("config") == "plain" and "error"
                not in r), None)  # fmt: skip
    ref_t = totals(ref) if ref else {}
    ref_tokens = [p["tokens"] for p in ref["prompts"]] if ref else None
    all_same = True
    for r in results:
        if "error" in r:
            print(f"{r['config']:10} error: {r['error']}")
            continue
        t = totals(r)
        same = [p["tokens"] for p in r["prompts"]] == ref_tokens
        all_same &= same

        def x(a, b):
            return fmt(a / b, ".2f", "x") if a and b else "-"

        print(
            f"{r['config']:10} {fmt(t['tok_s'], '.3f'):>8} "
            f"{x(t['tok_s'], ref_t.get('tok_s')):>8} {fmt(t['gb_tok'], '.3f'):>8} "
            f"{x(t['gb_tok'], ref_t.get('gb_tok')):>8} "
            f"{fmt(t['acceptance'] and 100 * t['acceptance'], '.1f', '%'):>7} "
            f"{fmt(t['per_pass'], '.2f'):>8} "
            f"{fmt(t['hit'] and 100 * t['hit'], '.0f', '%'):>6} {t['tokens']:>6} "
            f"{'yes' if same else 'NO':>5}"
        )
    print()
    print("per prompt (config: generated tokens, acceptance, tokens/pass, share of "
          "output continuing an earlier 3-gram):")  # fmt: skip
    for r in results:
        if "error" in r:
            continue
        cells = []
        for p in r["prompts"]:
            s = p["speculative"] or {}
            acc = s.get("acceptance_rate")
            cells.append(
                f"{len(p['tokens'])} tok, "
                f"{fmt(acc and 100 * acc, '.0f', '%')}, "
                f"{fmt(s.get('tokens_per_pass'), '.2f')}, "
                f"copy {fmt(p['copied'], '.2f')}"
            )
        print(f"  {r['config']:8} " + " | ".join(cells))
    if ref:
        print()
        for i, p in enumerate(ref["prompts"]):
            print(f"  plain text {i}: {p['text'][:100]!r}")
    print()
    print(
        "tok/s: decode tokens / decode time over all prompts (drafting included); "
        "GB/tok: expert bytes read during decode per token; accept: accepted / "
        "drafted; tok/pass: tokens per forward pass after the prompt; hit: expert "
        "cache hit rate (cumulative, last prompt); same: tokens identical to plain"
    )
    if not all_same:
        print("WARNING: a configuration produced different tokens from plain")


def main() -> None:
    from mer_cli.formats.store import Store
    from mer_cli.io.reader import DEFAULT_THREADS
    from mer_cli.units import format_size, parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="mer store to stream")
    ap.add_argument("--draft", help="draft store (same tokenizer) for a draft run")
    ap.add_argument("--limit", default="4GiB", help="cgroup memory limit")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="agent",
                    help="agent: English code-editing requests; code: Python "
                    "edits for a code model (the built-in one)")  # fmt: skip
    ap.add_argument("--prompts", type=int,
                    help="how many of the set's prompts [default: all]")  # fmt: skip
    ap.add_argument("--draft-tokens", default="5",
                    help="most drafts per pass; a comma list (5,12) runs lookup "
                    "and draft once per value, replay with the largest")  # fmt: skip
    ap.add_argument("--no-lookup", action="store_true", help="skip prompt lookup")
    ap.add_argument("--replay-miss", type=float, default=0.0,
                    help="share of wrong oracle drafts in the replay run")  # fmt: skip
    ap.add_argument("--no-replay", action="store_true", help="skip the replay run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per config")
    ap.add_argument("--ram-budget", help="expert slots [default: from --limit]")
    ap.add_argument("--io-threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--threads", type=int, help="compute threads [default: all]")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--no-cgroup", action="store_true", help="dry run, no limit")
    ap.add_argument("--json", help="also write every result to this file")
    args = ap.parse_args()
    try:
        ks = [int(k) for k in str(args.draft_tokens).split(",")]
    except ValueError:
        sys.exit(f"--draft-tokens {args.draft_tokens}: expected numbers like 5,12")

    root = os.geteuid() == 0
    if not args.no_cgroup and not root:
        sys.exit("needs root for the cgroup and drop_caches; or pass --no-cgroup")
    store = Store.open(args.store)
    limit = parse_size(args.limit, what="--limit")
    cfg = store.model
    kv = 2 * cfg.num_layers * args.ctx * cfg.num_kv_heads * cfg.head_dim * 4
    dense = store.dense_bytes_total
    draft_bytes = 0
    if args.draft:  # the draft model is held in RAM inside the same limit
        d = Store.open(args.draft)
        draft_bytes = d.dense_bytes_total + d.expert_bytes_total
    budget = expert_budget(store, limit, args.limit, kv, args.ram_budget, draft_bytes)
    n_prompts = len(PROMPT_SETS[args.prompt_set][: args.prompts])
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(
        f"store {args.store}: {format_size(store.expert_bytes_total)} of experts "
        f"({len(store.experts)} x {format_size(store.extent_nbytes)}), dense "
        f"{format_size(dense)}; limit {format_size(limit)}, expert budget "
        f"{format_size(budget)}; {n_prompts} {args.prompt_set} prompts x "
        f"{args.tokens} tokens",
        flush=True,
    )
    files = list(store.file_paths)
    tmp = Path(tempfile.mkdtemp(prefix="mer-spec-bench-"))
    cgroup = None
    results: list[dict] = []
    try:
        warm = make_warm_store(store.quantization, tmp)
        base = {
            "store": str(args.store),
            "warm": warm,
            "prompts": PROMPT_SETS[args.prompt_set][: args.prompts],
            "tokens": args.tokens,
            "ctx": args.ctx,
            "threads": args.threads,
            "io_threads": args.io_threads,
            "ram_budget": budget,
            "draft_tokens": max(ks),
            "draft": args.draft,
            "replay_miss": args.replay_miss,
        }
        configs = [{**base, "name": "plain", "speculative": None}]
        methods = ([] if args.no_lookup else ["lookup"]) + (
            ["draft"] if args.draft else []
        )
        for m in methods:
            for k in ks:
                name = m if len(ks) == 1 else f"{m}-k{k}"
                configs.append(
                    {**base, "name": name, "speculative": m, "draft_tokens": k}
                )
        if not args.no_cgroup:
            cgroup = Cgroup(f"mer-spec-bench-{os.getpid()}", limit)
        for rnd in range(args.rounds):
            for c in configs:
                drop_caches(files, root and not args.no_cgroup)
                name = c["name"] if rnd == 0 else f"{c['name']}#{rnd + 1}"
                print(f"running {name} ...", flush=True)
                results.append(run_child({**c, "name": name}, cgroup, args.timeout))
            ref = results[-len(configs)]
            if not args.no_replay and "error" not in ref:
                name = "replay" if rnd == 0 else f"replay#{rnd + 1}"
                reference = [p["tokens"] for p in ref["prompts"]]
                drop_caches(files, root and not args.no_cgroup)
                print(f"running {name} ...", flush=True)
                results.append(run_child(
                    {**base, "name": name, "speculative": "replay",
                     "reference": reference}, cgroup, args.timeout))  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
