"""Held-out perplexity and routing statistics of the built-in model through mer.

The built-in model (``mer_cli/data/builtin``) is quantized into f32, q8 and q4
stores in a temporary directory and each one scores the held-out part of its
training corpus (the files ``corpus.json.gz`` marks ``heldout``, read from this
interpreter's standard library and checked against their recorded hashes).
The windows are those the training script evaluated: ``--windows`` evenly
spaced windows of ``--ctx`` tokens over the held-out token stream
(``<s> file </s> <s> file </s> ...``). When torch and transformers are
installed, transformers' f32 perplexity on the same windows is printed beside.

Routing statistics (from the f32 store on the same windows), per layer:

* usage entropy: entropy of the share of (token, slot) picks each expert got,
  divided by log(E) (1 = perfectly even use, 0 = one expert takes all);
* used: share of experts picked at all, and picked for at least 1% of picks;
* repeat: share of a token's experts that the previous token also picked at the
  same layer, beside what independent draws from the usage shares would give.

Usage::

    python benchmarks/eval_builtin.py                 # 48 windows of 256 tokens
    python benchmarks/eval_builtin.py --windows 96 --json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from mer_cli.builtin import checkpoint_dir
from mer_cli.formats.store import Store
from mer_cli.quantize import quantize
from mer_cli.runtime import Engine

ENCODINGS = {  # label -> (experts, dense)
    "f32": ("f32", "f32"),
    "q8": ("q8", "q8"),
    "q4": ("q4", "q8"),  # what `mer generate` runs by default
    "q4 (dense q4)": ("q4", "q4"),
}


def heldout_stream(src: Path) -> tuple[np.ndarray, dict]:
    """The held-out token stream and a record of which files it came from."""
    from tokenizers import Tokenizer

    corpus = json.loads(gzip.decompress((src / "corpus.json.gz").read_bytes()))
    base = Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    parts, used, missing = [], 0, []
    for e in corpus["entries"]:
        if not e["heldout"]:
            continue
        path = base / e["path"]
        try:
            data = path.read_bytes()
        except OSError:
            missing.append(e["path"])
            continue
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            missing.append(e["path"])
            continue
        ids = tok.encode(data.decode("utf-8"), add_special_tokens=False).ids
        parts.append(np.array([1, *ids, 2], dtype=np.int64))
        used += 1
    if not parts:
        sys.exit(
            f"none of the held-out files of {src / 'corpus.json.gz'} is in {base} "
            f"unchanged (trained on Python {corpus['python']}); run with that Python"
        )
    info = {
        "files": used,
        "files_missing_or_changed": missing,
        "python": corpus["python"],
    }
    return np.concatenate(parts), info


def windows(stream: np.ndarray, n: int, ctx: int) -> list[np.ndarray]:
    """Evenly spaced windows of ctx+1 tokens (the training script's held-out windows)."""
    n = min(n, (stream.size - 1) // ctx)
    stride = (stream.size - 1 - ctx) // max(1, n - 1) if n > 1 else 0
    return [stream[i * stride : i * stride + ctx + 1] for i in range(n)]


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of targets under logits [T, V] (float64)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1))).astype(np.float64)
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def mer_eval(store: Store, wins: list[np.ndarray], routing: bool = False):
    eng = Engine(store, ctx=len(wins[0]), record_routing=routing)
    tot, cnt, picks = 0.0, 0, []
    for w in wins:
        eng.reset()
        eng.routing.clear()
        logits = eng.prefill(w[:-1].tolist(), all_logits=True)
        tot += nll(logits, w[1:])
        cnt += len(w) - 1
        if routing:
            picks.append(eng.routing[0][1].astype(np.int64))  # [L, T, K]
    return tot / cnt, picks


def hf_eval(src: Path, wins: list[np.ndarray]) -> float | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for w in wins:
            x = torch.from_numpy(w[None, :-1])
            logits = model(x).logits[0].numpy()
            tot += nll(logits, w[1:])
            cnt += len(w) - 1
    return tot / cnt


def routing_stats(picks: list[np.ndarray], num_experts: int) -> list[dict]:
    """Per-layer usage entropy, experts used, and consecutive-token repeats."""
    L = picks[0].shape[0]
    out = []
    for layer in range(L):
        counts = np.zeros(num_experts)
        rep, rep_n = 0, 0
        for p in picks:
            sel = p[layer]  # [T, K]
            counts += np.bincount(sel.ravel(), minlength=num_experts)
            for t in range(1, sel.shape[0]):
                rep += len(set(sel[t].tolist()) & set(sel[t - 1].tolist()))
                rep_n += sel.shape[1]
        share = counts / counts.sum()
        nz = share[share > 0]
        entropy = float(-(nz * np.log(nz)).sum() / math.log(num_experts))
        K = picks[0].shape[2]
        # independent draws: P(expert of token t in token t-1's set) ~ sum_e s_e * (K s_e)
        chance = float(min(1.0, (share * np.minimum(1.0, K * share)).sum()))
        out.append(
            {
                "layer": layer,
                "usage_entropy": round(entropy, 4),
                "experts_used": round(float((counts > 0).mean()), 4),
                "experts_over_1pct": round(float((share >= 0.01).mean()), 4),
                "top_expert_share": round(float(share.max()), 4),
                "repeat_rate": round(rep / rep_n, 4),
                "repeat_if_independent": round(chance, 4),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()

    src = checkpoint_dir()
    stream, info = heldout_stream(src)
    wins = windows(stream, a.windows, a.ctx)
    results: dict = {
        "heldout": {
            **info,
            "tokens": int(stream.size),
            "windows": len(wins),
            "ctx": a.ctx,
        }
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="mer-eval-") as tmp:
        routing = None
        for label, (experts, dense) in ENCODINGS.items():
            out = quantize(
                src,
                Path(tmp) / f"{experts}-{dense}.mer",
                experts=experts,
                dense=dense,
                progress=False,
            )
            store = Store.open(out)
            ce, picks = mer_eval(store, wins, routing=label == "f32")
            if label == "f32":
                routing = routing_stats(picks, store.model.num_experts)
                f32_ce = ce
            rows.append((f"mer {label}", ce, math.exp(ce) / math.exp(f32_ce) - 1))
    hf = None if a.no_transformers else hf_eval(src, wins)
    if hf is not None:
        rows.append(("transformers f32", hf, math.exp(hf) / math.exp(f32_ce) - 1))
    results["perplexity"] = [
        {
            "run": r,
            "nll": round(ce, 5),
            "ppl": round(math.exp(ce), 4),
            "vs_f32": round(d, 5),
        }
        for r, ce, d in rows
    ]
    results["routing"] = routing
    if a.json:
        print(json.dumps(results, indent=2))
        return
    h = results["heldout"]
    print(
        f"held-out: {h['files']} files, {h['tokens']} tokens; {h['windows']} windows "
        f"of {h['ctx']} tokens"
        + (
            f"; {len(h['files_missing_or_changed'])} files missing/changed"
            if h["files_missing_or_changed"]
            else ""
        )
    )
    print(f"{'run':<22} {'nll/token':>10} {'ppl':>9} {'vs mer f32':>11}")
    for r in results["perplexity"]:
        print(
            f"{r['run']:<22} {r['nll']:>10.4f} {r['ppl']:>9.3f} {r['vs_f32'] * 100:>+10.2f}%"
        )
    print()
    print("routing (mer f32, held-out windows):")
    print(
        f"{'layer':>5} {'entropy/logE':>12} {'used':>6} {'>=1%':>6} {'top share':>9} "
        f"{'repeat':>7} {'if indep.':>9}"
    )
    for s in routing:
        print(
            f"{s['layer']:>5} {s['usage_entropy']:>12.3f} {s['experts_used']:>6.2f} "
            f"{s['experts_over_1pct']:>6.2f} {s['top_expert_share']:>9.3f} "
            f"{s['repeat_rate']:>7.3f} {s['repeat_if_independent']:>9.3f}"
        )


if __name__ == "__main__":
    main()
