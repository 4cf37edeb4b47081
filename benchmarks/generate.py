#!/usr/bin/env python3
"""Decode and prefill tokens/s of mer beside llama.cpp on the same model, in one run.

Give it a GGUF Q4_0 file and the store transcoded from it with ``--dense q4``
(so both run the very same 4-bit weights)::

    mer synth mixtral-8x7b --layers 4 --format gguf -o m4.gguf
    mer quantize m4.gguf -o m4.mer --dense q4
    python benchmarks/generate.py --gguf m4.gguf --store m4.mer --threads 2

Each side runs in its own child process, one after the other (mer first), so
the two never hold the model in RAM at the same time, never compete for the
cores, and one's idle spinning threads (llama.cpp's OpenMP pool) cannot slow
the other. Per side: load; warm up (one prompt + a few decode steps: JIT,
page faults, caches); then ``--repeats`` times: prefill the ``--prompt-tokens``
prompt (one batched forward pass), then ``--tokens`` greedy decode steps of
one token each, timed separately with ``time.perf_counter``. The median and
best of the repeats are printed with the ratios mer / llama.cpp.

* mer: :class:`mer_cli.runtime.Engine` with every expert in RAM
  (``ResidentExperts``), ``--threads`` compute threads.
* llama.cpp: ``llama_cpp.Llama`` (llama-cpp-python) with ``n_threads`` and
  ``n_threads_batch`` = ``--threads``, ``n_batch`` 512, ``use_mmap`` off
  (``--mmap`` turns it on; pages are faulted in by the warm-up); prefill is
  ``eval(prompt)``, decode ``eval([token])`` with the argmax of its last
  logits. Its load log is scanned for Q4_0 repacking (``repack tensor ... with
  q4_0_8x8`` on AVX2 machines): the table says which mode it ran in.

Both get the same token ids (random, seeded, no special tokens) and the same
KV cache type (``--kv``). The greedy tokens of both are compared as a check
that the same model ran (near ties may diverge late: activations are rounded
to int8 at slightly different points). The machine may be shared and noisy:
compare only figures from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time

KV_TYPES = {"f16": 1, "f32": 0}  # ggml_type ids for llama.cpp's type_k/type_v


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(min(16, vocab - 1), vocab, n)]


def summarize(runs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(runs), "best": max(runs)}


# ================================================================ mer


def run_mer(a: argparse.Namespace) -> dict:
    import numpy as np

    from mer_cli.formats.store import Store
    from mer_cli.kernels.cpu import best_path
    from mer_cli.runtime import Engine

    t0 = time.perf_counter()
    store = Store.open(a.store)
    eng = Engine(store, ctx=a.ctx, kv_dtype=a.kv, threads=a.threads)
    load_s = time.perf_counter() - t0
    cfg = store.model
    prompt = prompt_ids(cfg.vocab_size, a.prompt_tokens, a.seed)

    def once(n: int) -> tuple[float, float, list[int]]:
        eng.reset()
        t = time.perf_counter()
        logits = eng.prefill(prompt)
        pre = time.perf_counter() - t
        tokens = []
        t = time.perf_counter()
        for _ in range(n):
            tokens.append(int(np.argmax(logits)))
            logits = eng.decode_step(tokens[-1])
        return pre, time.perf_counter() - t, tokens

    t0 = time.perf_counter()
    once(a.warmup_tokens)
    warm_s = time.perf_counter() - t0
    pre, dec, tokens = [], [], []
    for _ in range(a.repeats):
        p, d, tokens = once(a.tokens)
        pre.append(a.prompt_tokens / p)
        dec.append(a.tokens / d)
    q = store.manifest["quantization"]
    return {
        "side": "mer",
        "load_s": load_s,
        "warmup_s": warm_s,
        "prefill_tok_s": summarize(pre),
        "decode_tok_s": summarize(dec),
        "tokens": tokens,
        "mode": f"kernel path {best_path()}, experts {q['experts']}, "
        f"dense {q['dense']}, experts resident in RAM",
        "model": {
            "arch": cfg.arch,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "vocab": cfg.vocab_size,
        },
        "dense": q["dense"],
    }


# ================================================================ llama.cpp


def run_llama(a: argparse.Namespace, vocab: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    log = io.StringIO()
    t0 = time.perf_counter()
    # verbose: llama-cpp-python prints llama.cpp's log through sys.stderr
    with contextlib.redirect_stderr(log):
        llm = Llama(
            a.gguf,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            n_ctx=a.ctx,
            n_batch=512,
            use_mmap=a.mmap,
            type_k=KV_TYPES[a.kv],
            type_v=KV_TYPES[a.kv],
            verbose=True,
        )
    load_s = time.perf_counter() - t0
    text = log.getvalue()
    if a.llama_log:
        with open(a.llama_log, "w") as f:
            f.write(text)
    if llm.n_vocab() != vocab:
        raise SystemExit(
            f"{a.gguf} has a vocabulary of {llm.n_vocab()} tokens but {a.store} "
            f"has {vocab}: they are not the same model"
        )
    repacked = re.findall(r"repack tensor \S+ with (\S+)", text)
    if repacked:
        kinds = ", ".join(sorted(set(repacked)))
        mode = f"Q4_0 repacked ({len(repacked)} tensors -> {kinds}, CPU_REPACK)"
    else:
        mode = "no repacking in its log (plain Q4_0 kernels)"
    mode += ", mmap" if a.mmap else ", no mmap"
    prompt = prompt_ids(vocab, a.prompt_tokens, a.seed)

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def once(n: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pre = time.perf_counter() - t
        tokens = []
        t = time.perf_counter()
        for _ in range(n):
            tokens.append(int(np.argmax(last_logits())))
            llm.eval([tokens[-1]])
        return pre, time.perf_counter() - t, tokens

    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        once(a.warmup_tokens)
    warm_s = time.perf_counter() - t0
    pre, dec, tokens = [], [], []
    with contextlib.redirect_stderr(io.StringIO()):
        for _ in range(a.repeats):
            p, d, tokens = once(a.tokens)
            pre.append(a.prompt_tokens / p)
            dec.append(a.tokens / d)
        llm.close()  # its teardown log goes to the discarded buffer
    return {
        "side": "llama.cpp",
        "load_s": load_s,
        "warmup_s": warm_s,
        "prefill_tok_s": summarize(pre),
        "decode_tok_s": summarize(dec),
        "tokens": tokens,
        "mode": mode,
    }


# ================================================================ driver


def child(a: argparse.Namespace, side: str, vocab: int = 0) -> dict:
    """Run one side in a fresh Python process; its result is the last stdout line."""
    args = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side]
    if vocab:
        args += ["--vocab", str(vocab)]
    r = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the {side} run failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cell(med: float, best: float) -> str:
    return f"{med:.2f} ({best:.2f})".rjust(22)


def table(a: argparse.Namespace, m: dict, ll: dict) -> str:
    mm = m["model"]
    rows = [
        f"model: {mm['arch']}, {mm['layers']} layers, D={mm['hidden']}, "
        f"{mm['experts']} experts, V={mm['vocab']}; GGUF "
        f"{os.path.getsize(a.gguf) / 1e9:.2f} GB",
        f"threads {a.threads}, prompt {a.prompt_tokens} tokens, decode "
        f"{a.tokens} tokens, KV {a.kv}, {a.repeats} repeats: median (best)",
        "",
        f"{'':14s}{'mer':>22s}{'llama.cpp':>22s}{'mer / llama.cpp':>22s}",
    ]
    for key, label in (
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
    ):
        x, y = m[key], ll[key]
        rows.append(
            f"{label:14s}{_cell(x['median'], x['best'])}"
            f"{_cell(y['median'], y['best'])}"
            f"{_cell(x['median'] / y['median'], x['best'] / y['best'])}"
        )
    rows.append(f"{'load s':14s}{m['load_s']:>22.1f}{ll['load_s']:>22.1f}")
    rows.append(f"{'warm-up s':14s}{m['warmup_s']:>22.1f}{ll['warmup_s']:>22.1f}")
    same = 0
    for x, y in zip(m["tokens"], ll["tokens"]):
        if x != y:
            break
        same += 1
    rows += [
        "",
        f"mer:       {m['mode']}",
        f"llama.cpp: {ll['mode']}",
        f"greedy tokens identical for the first {same} of {a.tokens}",
    ]
    if m["dense"] != "q4":
        rows.append(
            f"note: the store's dense tensors are {m['dense']}, not q4: the two do "
            "not run the same dense weights (mer quantize FILE.gguf --dense q4)"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--gguf", required=True, help="GGUF Q4_0 model file")
    ap.add_argument("--store", required=True, help="store transcoded from --gguf")
    ap.add_argument("--threads", type=int, default=2, help="threads for both")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="warm-up decode")
    ap.add_argument("--ctx", type=int, default=512, help="KV cache positions")
    ap.add_argument("--kv", choices=sorted(KV_TYPES), default="f16")
    ap.add_argument("--mmap", action="store_true", help="llama.cpp use_mmap=True")
    ap.add_argument("--seed", type=int, default=0, help="prompt token ids")
    ap.add_argument("--llama-log", help="save llama.cpp's load log here")
    ap.add_argument("--json", action="store_true", help="print JSON, not a table")
    ap.add_argument("--side", choices=["mer", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    for flag, v in (("--threads", a.threads), ("--tokens", a.tokens)):
        if v < 1:
            ap.error(f"{flag} is {v}, expected a whole number >= 1")
    if a.prompt_tokens < 2 or a.repeats < 1 or a.warmup_tokens < 1:
        ap.error("--prompt-tokens must be >= 2, --repeats and --warmup-tokens >= 1")
    if a.prompt_tokens + max(a.tokens, a.warmup_tokens) > a.ctx:
        ap.error(f"--ctx {a.ctx} is smaller than the prompt plus the decoded tokens")
    for path in (a.gguf, a.store):
        if not os.path.exists(path):
            ap.error(f"{path}: no such file or directory")
    if a.side == "mer":
        print(json.dumps(run_mer(a)))
        return
    if a.side == "llama":
        print(json.dumps(run_llama(a, a.vocab)))
        return
    m = child(a, "mer")
    ll = child(a, "llama", m["model"]["vocab"])
    if a.json:
        print(json.dumps({"args": vars(a), "mer": m, "llama.cpp": ll}, indent=2))
    else:
        print(table(a, m, ll))


if __name__ == "__main__":
    main()
