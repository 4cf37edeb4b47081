"""Train mer's built-in model: a small Mixtral-architecture MoE on Python's stdlib.

Dev-only (needs the ``dev`` extra: torch, transformers, safetensors, and
matplotlib for the loss curve). Nothing here runs at mer's run time.

Stages (each is resumable and writes atomically into ``--work``)::

    python scripts/dev/train_builtin.py corpus      # pick + hash the text, split by file
    python scripts/dev/train_builtin.py tokenizer   # byte-fallback BPE (Llama style)
    python scripts/dev/train_builtin.py train       # seeded; resumes from work/ckpt.pt
    python scripts/dev/train_builtin.py export      # HF checkpoint -> mer_cli/data/builtin
    python scripts/dev/train_builtin.py all         # the four in order

The corpus is the interpreter's own standard library: every ``*.py`` under
``sysconfig.get_paths()["stdlib"]`` except ``site-packages``/``dist-packages``
and test suites (``test/``, ``tests/``, ``idle_test/``). ``pydoc_data/topics.py``
(the language reference's text) and the modules' docstrings are its
documentation. Files are split into train / held-out by a hash of their
relative path (5% held out), so held-out perplexity is on unseen files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORK = ROOT.parent / "scratch" / "builtin"
OUT_DIR = ROOT / "mer_cli" / "data" / "builtin"

SEED = 1234
VOCAB = 4096
HELDOUT_PERMILLE = 50  # 5% of files

# Model shape: Mixtral architecture, small enough to ship (< 32 MB in f16).
MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    router_aux_loss_coef=0.02,
    tie_word_embeddings=False,
)
TRAIN = dict(
    ctx=256,
    batch=16,
    steps=1600,
    lr=3e-3,
    min_lr=3e-4,
    warmup=100,
    weight_decay=0.05,
    grad_clip=1.0,
    eval_every=250,
    ckpt_every=100,
    eval_windows=48,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- corpus


def stdlib_files() -> tuple[Path, list[Path]]:
    base = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = []
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base)
        if skip.intersection(rel.parts[:-1]):
            continue
        files.append(p)
    return base, files


def is_heldout(rel: str) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "little")
    return h % 1000 < HELDOUT_PERMILLE


def stage_corpus(work: Path) -> None:
    base, files = stdlib_files()
    entries, total = [], hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        rel = str(p.relative_to(base))
        digest = hashlib.sha256(data).hexdigest()
        total.update(rel.encode() + b"\0" + digest.encode() + b"\n")
        entries.append(
            {"path": rel, "bytes": len(data), "sha256": digest, "heldout": is_heldout(rel)}
        )
    manifest = {
        "source": "Python standard library sources (*.py) of the training interpreter",
        "python": sys.version.split()[0],
        "stdlib": str(base),
        "excluded_dirs": ["site-packages", "dist-packages", "test", "tests", "idle_test"],
        "files": len(entries),
        "bytes": sum(e["bytes"] for e in entries),
        "train_bytes": sum(e["bytes"] for e in entries if not e["heldout"]),
        "heldout_bytes": sum(e["bytes"] for e in entries if e["heldout"]),
        "heldout_files": sum(e["heldout"] for e in entries),
        "sha256": total.hexdigest(),
        "split": f"held out when sha256(relative path)[:4] (LE) % 1000 < {HELDOUT_PERMILLE}",
        "entries": entries,
    }
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / "corpus.json", json.dumps(manifest, indent=1).encode())
    log(
        f"corpus: {manifest['files']} files, {manifest['bytes'] / 1e6:.2f} MB "
        f"(train {manifest['train_bytes'] / 1e6:.2f}, held-out "
        f"{manifest['heldout_bytes'] / 1e6:.2f} MB in {manifest['heldout_files']} files), "
        f"sha256 {manifest['sha256'][:16]}"
    )


def corpus_texts(work: Path, heldout: bool) -> list[str]:
    manifest = json.loads((work / "corpus.json").read_text())
    base = Path(manifest["stdlib"])
    out = []
    for e in manifest["entries"]:
        if e["heldout"] != heldout:
            continue
        data = (base / e["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise SystemExit(f"{base / e['path']} changed since the corpus stage (sha256)")
        out.append(data.decode("utf-8"))
    return out


# -------------------------------------------------------------------------- tokenizer


SPECIALS = ["<unk>", "<s>", "</s>"]


def stage_tokenizer(work: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = corpus_texts(work, heldout=False)
    # Train on lines (each line one "word": merges may cross spaces, so indentation and
    # " = " become single tokens, as in sentencepiece with split_by_whitespace=false).
    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    n_bytes = 256
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - n_bytes,
        special_tokens=SPECIALS,
        limit_alphabet=160,
        show_progress=False,
    )

    def lines():
        for t in texts:
            yield from t.splitlines(keepends=True)

    tok.train_from_iterator(lines(), trainer=trainer)
    trained = json.loads(tok.to_str())
    old_vocab = trained["model"]["vocab"]
    merges = trained["model"]["merges"]
    # Llama layout: <unk> <s> </s>, then <0x00>..<0xFF>, then the learned pieces.
    vocab: dict[str, int] = {}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(old_vocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    assert len(vocab) <= VOCAB, len(vocab)
    # pad to exactly VOCAB so the embedding has a fixed size
    i = 0
    while len(vocab) < VOCAB:
        vocab[f"<pad{i}>"] = len(vocab)
        i += 1
    merges_t = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    final = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges_t, unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    )
    final.pre_tokenizer = meta
    final.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    final.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    from tokenizers import AddedToken

    final.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    atomic_write_bytes(work / "tokenizer.json", final.to_str(pretty=True).encode())
    # round trip + compression check on held-out text
    held = corpus_texts(work, heldout=True)
    n_tok = n_chr = 0
    bad = 0
    for t in held:
        ids = final.encode(t, add_special_tokens=False).ids
        n_tok += len(ids)
        n_chr += len(t)
        if final.decode(ids) != t:
            bad += 1
    log(
        f"tokenizer: {len(vocab)} tokens, {len(merges_t)} merges; held-out "
        f"{n_chr / n_tok:.2f} chars/token; round-trip failures {bad}/{len(held)}"
    )


def encode_split(work: Path, heldout: bool) -> np.ndarray:
    """All files of a split as one uint16 stream: <s> file </s> <s> file </s> ..."""
    name = "heldout.npy" if heldout else "train.npy"
    path = work / name
    if path.exists():
        return np.load(path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    texts = corpus_texts(work, heldout)
    enc = tok.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in enc:
        parts.append(np.array([1, *e.ids, 2], dtype=np.uint16))
    arr = np.concatenate(parts)
    tmp = path.with_name(name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    log(f"encoded {'held-out' if heldout else 'train'}: {arr.size} tokens")
    return arr


# ------------------------------------------------------------------------------ model


def build_model():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    c = MODEL
    D, FF, H, KV = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    hd = D // H
    E, K = c["num_local_experts"], c["num_experts_per_tok"]

    class RMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + c["rms_norm_eps"]))

    def rope_tables(T, device):
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        t = torch.arange(T, dtype=torch.float32)
        f = torch.outer(t, inv)
        emb = torch.cat([f, f], dim=-1)
        return emb.cos().to(device), emb.sin().to(device)

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([-x2, x1], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(D, H * hd, bias=False)
            self.k_proj = nn.Linear(D, KV * hd, bias=False)
            self.v_proj = nn.Linear(D, KV * hd, bias=False)
            self.o_proj = nn.Linear(H * hd, D, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, E, bias=False)
            s = 1.0 / math.sqrt(D)
            self.w1 = nn.Parameter(torch.randn(E, FF, D) * s)
            self.w3 = nn.Parameter(torch.randn(E, FF, D) * s)
            self.w2 = nn.Parameter(torch.randn(E, D, FF) * (1.0 / math.sqrt(FF)))

        def forward(self, x):
            shape = x.shape
            x = x.reshape(-1, D)
            logits = self.gate(x)
            probs = logits.softmax(-1)
            topw, topi = probs.topk(K, dim=-1)
            topw = topw / topw.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            flat = topi.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=E).tolist()
            tok = order // K
            wts = topw.reshape(-1)[order]
            start = 0
            for e in range(E):
                n = counts[e]
                if n == 0:
                    continue
                idx = tok[start : start + n]
                xe = x[idx]
                h = F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())
                ye = (h @ self.w2[e].t()) * wts[start : start + n, None]
                out.index_add_(0, idx, ye)
                start += n
            # Switch-style load balancing: E * sum_e f_e * P_e (f counts top-k picks)
            f = torch.bincount(flat, minlength=E).float() / flat.numel()
            aux = E * (f * probs.mean(0)).sum()
            return out.reshape(shape), aux, topi.detach()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(D)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(D)
            self.moe = MoE()

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            m, aux, sel = self.moe(self.post_attention_layernorm(x))
            return x + m, aux, sel

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(c["vocab_size"], D)
            self.layers = nn.ModuleList([Block() for _ in range(c["num_hidden_layers"])])
            self.norm = RMSNorm(D)
            self.lm_head = nn.Linear(D, c["vocab_size"], bias=False)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
            # scale residual outputs down with depth (GPT-2 style)
            for b in self.layers:
                nn.init.normal_(b.self_attn.o_proj.weight, std=0.02 / math.sqrt(2 * len(self.layers)))
                with torch.no_grad():
                    b.moe.w2.mul_(0.5 / math.sqrt(2 * len(self.layers)))

        def forward(self, ids, routing=False):
            T = ids.shape[1]
            cos, sin = rope_tables(T, ids.device)
            x = self.embed_tokens(ids)
            aux = 0.0
            sels = []
            for b in self.layers:
                x, a, s = b(x, cos, sin)
                aux = aux + a
                sels.append(s)
            logits = self.lm_head(self.norm(x))
            return (logits, aux / len(self.layers), sels) if routing else (logits, aux / len(self.layers))

    return Model()


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's weights under Mixtral's Hugging Face names (classic per-expert layout)."""
    sd = {}
    sd["model.embed_tokens.weight"] = model.embed_tokens.weight
    sd["model.norm.weight"] = model.norm.weight
    sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = b.post_attention_layernorm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.self_attn, n).weight
        sd[p + "block_sparse_moe.gate.weight"] = b.moe.gate.weight
        for e in range(b.moe.w1.shape[0]):
            for w in ("w1", "w2", "w3"):
                sd[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = getattr(b.moe, w)[e]
    return {k: v.detach().float().cpu().numpy() for k, v in sd.items()}


# ------------------------------------------------------------------------------ train


def lr_at(step: int) -> float:
    t = TRAIN
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    frac = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * min(1.0, frac)))


def batch_at(data: np.ndarray, step: int, batch: int, ctx: int):
    import torch

    rng = np.random.default_rng([SEED, step])
    starts = rng.integers(0, data.size - ctx - 1, size=batch)
    x = np.stack([data[s : s + ctx + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(x)
    return x[:, :-1], x[:, 1:]


def heldout_loss(model, held: np.ndarray, windows: int, ctx: int) -> float:
    import torch
    import torch.nn.functional as F

    n = min(windows, (held.size - 1) // ctx)
    stride = (held.size - 1 - ctx) // max(1, n - 1) if n > 1 else 0
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for j in range(0, n, 8):
            rows = [held[(j + i) * stride : (j + i) * stride + ctx + 1] for i in range(min(8, n - j))]
            x = torch.from_numpy(np.stack(rows).astype(np.int64))
            logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot += float(loss)
            cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def stage_train(work: Path, threads: int, max_minutes: float | None) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    data = encode_split(work, heldout=False)
    held = encode_split(work, heldout=True)
    model = build_model()
    nparams = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=TRAIN["lr"],
        betas=(0.9, 0.95),
    )
    ckpt = work / "ckpt.pt"
    hist_path = work / "history.json"
    step, elapsed, cpu = 0, 0.0, 0.0
    history = {"train": [], "heldout": []}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, cpu = state["step"], state["elapsed"], state["cpu"]
        history = state["history"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained so far)")
    else:
        log(f"model: {nparams / 1e6:.2f} M parameters; {data.size} train tokens, {held.size} held-out")
    t0, c0 = time.time(), time.process_time()
    base_elapsed, base_cpu = elapsed, cpu
    ema = None
    tokens_per_step = TRAIN["batch"] * TRAIN["ctx"]

    def save():
        state = {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": base_elapsed + time.time() - t0,
            "cpu": base_cpu + time.process_time() - c0,
            "history": history,
            "threads": threads,
            "config": {"model": MODEL, "train": TRAIN, "seed": SEED},
        }
        tmp = ckpt.with_name("ckpt.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt)
        atomic_write_bytes(hist_path, json.dumps(history).encode())

    try:
        while step < TRAIN["steps"]:
            if max_minutes is not None and (time.time() - t0) / 60 > max_minutes:
                log(f"stopping after {max_minutes} min this run (resume to continue)")
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x, y = batch_at(data, step, TRAIN["batch"], TRAIN["ctx"])
            logits, aux = model(x)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss = ce + MODEL["router_aux_loss_coef"] * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
            opt.step()
            step += 1
            ce_v, aux_v = float(ce.detach()), float(aux.detach())
            ema = ce_v if ema is None else 0.98 * ema + 0.02 * ce_v
            history["train"].append([step, ce_v, aux_v])
            if step % 20 == 0:
                dt = time.time() - t0
                log(
                    f"step {step}/{TRAIN['steps']} ce {ce_v:.3f} (ema {ema:.3f}) aux {aux_v:.3f} "
                    f"lr {lr_at(step):.2e} {dt:.0f}s this run"
                )
            if step % TRAIN["eval_every"] == 0 or step == TRAIN["steps"]:
                hl = heldout_loss(model, held, TRAIN["eval_windows"], TRAIN["ctx"])
                history["heldout"].append([step, hl])
                log(f"held-out loss {hl:.3f} (ppl {math.exp(hl):.2f}) at step {step}")
            if step % TRAIN["ckpt_every"] == 0:
                save()
    except KeyboardInterrupt:
        log("interrupted: saving checkpoint")
        save()
        raise SystemExit(130)
    save()
    total = base_elapsed + time.time() - t0
    log(f"trained {step} steps, {step * tokens_per_step / 1e6:.2f} M tokens, {total / 60:.1f} min wall")


# ----------------------------------------------------------------------------- export


def stage_export(work: Path, out: Path) -> None:
    import torch
    from safetensors.numpy import save_file

    state = torch.load(work / "ckpt.pt", weights_only=False)
    if state["step"] < TRAIN["steps"]:
        raise SystemExit(f"training not finished: step {state['step']} of {TRAIN['steps']}")
    model = build_model()
    model.load_state_dict(state["model"])
    sd = {k: v.astype(np.float16) for k, v in hf_state_dict(model).items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **{k: v for k, v in MODEL.items()},
        "head_dim": MODEL["hidden_size"] // MODEL["num_attention_heads"],
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "use_cache": True,
    }
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    import shutil

    shutil.copy(work / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": MODEL["max_position_embeddings"],
            },
            indent=2,
        )
        + "\n"
    )
    corpus = json.loads((work / "corpus.json").read_text())
    # the file list goes with the model (compressed: it is the exact data record)
    import gzip

    (tmp / "corpus.json.gz").write_bytes(gzip.compress(json.dumps(corpus, indent=0).encode(), 9, mtime=0))
    hist = state["history"]
    plot_loss(hist, tmp / "loss.png")
    final_held = hist["heldout"][-1][1]
    train_tail = np.mean([h[1] for h in hist["train"][-50:]])
    info = {
        "steps": state["step"],
        "tokens_seen": state["step"] * TRAIN["batch"] * TRAIN["ctx"],
        "train_minutes_wall": round(state["elapsed"] / 60, 1),
        "train_minutes_cpu": round(state["cpu"] / 60, 1),
        "final_train_ce_last50": round(float(train_tail), 4),
        "final_heldout_ce": round(final_held, 4),
        "final_heldout_ppl": round(math.exp(final_held), 3),
        "threads": state["threads"],
        "torch": torch.__version__,
        "params": int(sum(v.size for v in sd.values())),
    }
    (tmp / "training.json").write_text(json.dumps({"model": MODEL, "train": TRAIN, "seed": SEED, **info}, indent=2) + "\n")
    write_card(tmp / "README.md", corpus, info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    total = sum(f.stat().st_size for f in out.iterdir())
    log(f"exported to {out}: {total / 1e6:.2f} MB")


def plot_loss(hist, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = np.array(hist["train"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    k = 25
    if len(tr) > k:
        sm = np.convolve(tr[:, 1], np.ones(k) / k, mode="valid")
        ax.plot(tr[k - 1 :, 0], sm, label="train (25-step mean)")
    else:
        ax.plot(tr[:, 0], tr[:, 1], label="train")
    if hist["heldout"]:
        ho = np.array(hist["heldout"])
        ax.plot(ho[:, 0], ho[:, 1], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("mer built-in model: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(path: Path, corpus: dict, info: dict) -> None:
    m = MODEL
    text = f"""# mer built-in model (`mer-builtin-stdlib`)

A small Mixture-of-Experts language model in the Mixtral architecture, trained by
`scripts/dev/train_builtin.py` so that `mer generate` has a real model to run out
of the box, and so that routing traces, predictors and cache policies are measured
on learned routing rather than on random weights. It writes Python-flavoured text;
it is not a useful assistant.

## Architecture
MixtralForCausalLM: {m['num_hidden_layers']} layers, hidden {m['hidden_size']},
{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV heads, head dim
{m['hidden_size'] // m['num_attention_heads']}), {m['num_local_experts']} experts per layer of
intermediate size {m['intermediate_size']}, top-{m['num_experts_per_tok']} routing, RoPE
theta {m['rope_theta']:g}, vocabulary {m['vocab_size']}, untied embeddings;
{info['params'] / 1e6:.2f} M parameters stored in float16.

## Data
The Python {corpus['python']} standard library sources of the training
interpreter: every `*.py` file under its stdlib directory except
`site-packages`, `dist-packages` and test suites (`test/`, `tests/`,
`idle_test/`). Docstrings and `pydoc_data/topics.py` (the language
reference text) are its documentation. {corpus['files']} files,
{corpus['bytes']:,} bytes; corpus hash (sha256 over "path\\0sha256\\n" lines)
`{corpus['sha256']}`. Split by file: {corpus['split']}:
{corpus['heldout_files']} held-out files ({corpus['heldout_bytes']:,} bytes).
The exact file list with per-file hashes is `corpus.json.gz`.

## Tokenizer
Byte-fallback BPE trained with `tokenizers` on the training files' lines
(Llama layout: `<unk>`, `<s>`, `</s>`, `<0x00>`..`<0xFF>`, then merges;
Metaspace pre-tokenizer without splitting, so merges may cross spaces).

## Training
Seed {SEED}; AdamW (betas 0.9/0.95, weight decay {TRAIN['weight_decay']}), peak LR
{TRAIN['lr']} with {TRAIN['warmup']} warm-up steps and cosine decay to
{TRAIN['min_lr']}; batch {TRAIN['batch']} x {TRAIN['ctx']} tokens; load-balancing loss
coefficient {m['router_aux_loss_coef']}. {info['steps']} steps =
{info['tokens_seen'] / 1e6:.2f} M tokens in {info['train_minutes_wall']} minutes wall
({info['train_minutes_cpu']} CPU minutes) on {info['threads']} CPU threads, torch
{info['torch']}.

Final training cross-entropy (mean of the last 50 steps)
{info['final_train_ce_last50']} nats/token; held-out cross-entropy
{info['final_heldout_ce']} (perplexity {info['final_heldout_ppl']}) on
{TRAIN['eval_windows']} windows of {TRAIN['ctx']} tokens.

![loss curve](loss.png)

Perplexity through mer's f32 / q8 / q4 stores: `python scripts/dev/eval_builtin.py`.
"""
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["corpus", "tokenizer", "train", "export", "all"])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, and not stalled by other load)")
    ap.add_argument("--steps", type=int, default=None, help="override the step count (smoke tests)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop this run after N minutes")
    a = ap.parse_args()
    if a.steps is not None:
        TRAIN["steps"] = a.steps
    a.work.mkdir(parents=True, exist_ok=True)
    if a.stage in ("corpus", "all"):
        stage_corpus(a.work)
    if a.stage in ("tokenizer", "all"):
        stage_tokenizer(a.work)
    if a.stage in ("train", "all"):
        stage_train(a.work, a.threads, a.max_minutes)
    if a.stage in ("export", "all"):
        stage_export(a.work, a.out)


if __name__ == "__main__":
    main()
