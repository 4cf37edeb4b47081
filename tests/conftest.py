"""Shared fixtures: tiny Hugging Face checkpoints written the way transformers does.

``make_hf_checkpoint(dir, arch)`` writes ``config.json``, safetensors weights
(optionally sharded with ``model.safetensors.index.json``), a byte-level BPE
``tokenizer.json`` built with the ``tokenizers`` library,
``tokenizer_config.json`` and ``generation_config.json``. Tensor names and
shapes are written out here from the transformers checkpoint layout, not taken
from mer's importer, so the importer is tested against an independent spec.
Other test files import it; keep the signature stable.
"""

from __future__ import annotations

import os

# tiny matrices: multi-threaded BLAS only adds contention on the 2-core machines
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import signal  # noqa: E402
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mer_cli.formats.quant import f32_to_bf16
from mer_cli.formats.safetensors import SafetensorsWriter

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
BOS, EOS, IM_START, IM_END, ENDOFTEXT = range(256, 256 + len(SPECIAL_TOKENS))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

# config.json of each tiny preset (real checkpoints' keys, tiny values)
BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 512,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 512,
        "use_sliding_window": False,
        "sliding_window": 512,
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": ENDOFTEXT,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # H*hd = 128 != hidden_size, as in Qwen3-30B-A3B
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": ENDOFTEXT,
    },
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "attention_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": ENDOFTEXT,
    },
}

TOKENIZER_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": MISTRAL_TEMPLATE,
    },
    "qwen2_moe": {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "chat_template": CHATML,
    },
    "qwen3_moe": {
        "bos_token": None,
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": CHATML,
    },
    "olmoe": {
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "chat_template": CHATML,
    },
}

GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"bos_token_id": BOS, "eos_token_id": EOS},
    "qwen2_moe": {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT]},
    "qwen3_moe": {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT]},
    "olmoe": {"eos_token_id": ENDOFTEXT},
}


def hf_config(arch: str, layers: int = 2, **overrides: Any) -> dict[str, Any]:
    """The tiny ``config.json`` of ``arch`` with ``overrides`` applied."""
    cfg = dict(BASE_CONFIGS[arch], num_hidden_layers=layers)
    cfg.update(overrides)
    return cfg


def hf_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a checkpoint with config ``cfg`` (per-expert)."""
    arch = cfg["model_type"]
    D, V, H = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    if arch == "mixtral":
        E, F = cfg["num_local_experts"], cfg["intermediate_size"]
    elif arch == "olmoe":
        E, F = cfg["num_experts"], cfg["intermediate_size"]
    else:
        E, F = cfg["num_experts"], cfg["moe_intermediate_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, D))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.append((p + "input_layernorm.weight", (D,)))
        for nm, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
            out.append((f"{p}self_attn.{nm}_proj.weight", (rows, D)))
            if arch == "qwen2_moe" or cfg.get("attention_bias"):
                out.append((f"{p}self_attn.{nm}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (D, H * hd)))
        if arch == "qwen3_moe":
            out += [(p + "self_attn.q_norm.weight", (hd,))]
            out += [(p + "self_attn.k_norm.weight", (hd,))]
        if arch == "olmoe":
            out += [(p + "self_attn.q_norm.weight", (H * hd,))]
            out += [(p + "self_attn.k_norm.weight", (KV * hd,))]
        out.append((p + "post_attention_layernorm.weight", (D,)))
        moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
        out.append((f"{p}{moe}.gate.weight", (E, D)))
        names = (
            ("w1", "w3", "w2")
            if arch == "mixtral"
            else ("gate_proj", "up_proj", "down_proj")
        )
        for e in range(E):
            base = f"{p}{moe}.experts.{e}."
            out.append((f"{base}{names[0]}.weight", (F, D)))
            out.append((f"{base}{names[1]}.weight", (F, D)))
            out.append((f"{base}{names[2]}.weight", (D, F)))
        if arch == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
            Fs = cfg["shared_expert_intermediate_size"]
            s = p + "mlp.shared_expert."
            out += [(s + "gate_proj.weight", (Fs, D)), (s + "up_proj.weight", (Fs, D))]
            out += [(s + "down_proj.weight", (D, Fs))]
            out += [(p + "mlp.shared_expert_gate.weight", (1, D))]
    out.append(("model.norm.weight", (D,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (V, D)))
    return out


def hf_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 values for every tensor of :func:`hf_tensors`.

    Matrices are Gaussian with std 1/sqrt(fan_in) (so routing spreads over the
    experts), norm weights 1 + N(0, 0.1), biases N(0, 0.1).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_tensors(cfg):
        if len(shape) == 1:
            base = 0.0 if name.endswith(".bias") else 1.0
            a = base + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            if "embed_tokens" not in name:
                a *= np.float32(1 / np.sqrt(shape[1]))
        out[name] = a.astype(np.float32)
    return out


def stack_experts(
    cfg: dict[str, Any], weights: dict[str, np.ndarray]
) -> list[tuple[str, np.ndarray]]:
    """The tensors in transformers' stacked layout: ``mlp.experts.gate_up_proj``
    ``[E, 2F, D]`` (gate rows first) and ``mlp.experts.down_proj`` ``[E, D, F]``."""
    mixtral = cfg["model_type"] == "mixtral"
    g, u, d = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out: list[tuple[str, Any]] = []
    per_layer: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for name, a in weights.items():
        if ".experts." not in name:
            out.append((name, a))
            continue
        parts = name.split(".")  # model.layers.L.<moe>.experts.E.<proj>.weight
        layer, e = int(parts[2]), int(parts[5])
        if layer not in per_layer:
            per_layer[layer] = {}
            out.append(("", layer))  # placeholder where the layer's experts go
        per_layer[layer].setdefault(e, {})[parts[6]] = a
    result = []
    for name, a in out:
        if name:
            result.append((name, a))
            continue
        per = per_layer[a]
        E = len(per)
        p = f"model.layers.{a}.mlp.experts."
        gu = np.stack([np.concatenate([per[i][g], per[i][u]]) for i in range(E)])
        dn = np.stack([per[i][d] for i in range(E)])
        result += [(p + "gate_up_proj", gu), (p + "down_proj", dn)]
    return result


def make_tokenizer_json(path: Path, arch: str) -> Path:
    """A byte-level BPE tokenizer (256 byte tokens + the special tokens) built with
    the ``tokenizers`` library; Mixtral's prepends ``<s>`` like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if arch == "mixtral":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
        )
    tok.save(str(path))
    return path


def make_hf_checkpoint(
    dir: str | Path,
    arch: str,
    *,
    seed: int = 0,
    dtype: str = "F32",
    layers: int = 2,
    shards: int = 1,
    stacked_experts: bool = False,
    **overrides: Any,
) -> Path:
    """Write a tiny Hugging Face checkpoint of ``arch`` into ``dir`` (created).

    Parameters
    ----------
    dir
        Output directory.
    arch
        One of ``ARCHS``.
    seed
        Seed of the weights (:func:`hf_weights`).
    dtype
        Safetensors dtype of every tensor: ``F32``, ``F16`` or ``BF16``.
    layers
        ``num_hidden_layers``.
    shards
        Number of safetensors files; more than one adds
        ``model.safetensors.index.json``.
    stacked_experts
        Write experts as ``mlp.experts.gate_up_proj``/``down_proj`` stacks.
    overrides
        ``config.json`` fields to set (e.g. ``hidden_size=128``,
        ``tie_word_embeddings=True``).

    Returns
    -------
    Path
        ``dir``.
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(arch, layers, **overrides)
    cfg["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    weights = hf_weights(cfg, seed)
    items = stack_experts(cfg, weights) if stacked_experts else list(weights.items())
    n = len(items)
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    weight_map = {}
    for s in range(shards):
        fname = (
            "model.safetensors"
            if shards == 1
            else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        )
        chunk = items[bounds[s] : bounds[s + 1]]
        w = SafetensorsWriter(
            d / fname, [(nm, dtype, a.shape) for nm, a in chunk], {"format": "pt"}
        )
        for nm, a in chunk:
            if dtype == "BF16":
                a = f32_to_bf16(a)
            elif dtype == "F16":
                a = a.astype(np.float16)
            w.write(nm, a)
            weight_map[nm] = fname
        w.close()
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIGS[arch], indent=2)
    )
    (d / "generation_config.json").write_text(
        json.dumps(GENERATION_CONFIGS[arch], indent=2)
    )
    make_tokenizer_json(d / "tokenizer.json", arch)
    return d


@pytest.fixture
def hf_checkpoint(tmp_path):
    """``hf_checkpoint(arch, **kw)`` -> a checkpoint dir under ``tmp_path``."""
    counter = iter(range(1000))

    def make(arch: str, **kw: Any) -> Path:
        return make_hf_checkpoint(tmp_path / f"{arch}-{next(counter)}", arch, **kw)

    return make


def default_sigint() -> None:
    """``preexec_fn`` for CLI subprocesses that a test interrupts with SIGINT.

    A shell without job control starts background commands with SIGINT
    ignored, and Python keeps an ignored SIGINT ignored; CI may run us that way.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
