"""Synthetic Hugging Face checkpoints with random weights that route like a real model.

A preset names an architecture and its shapes (tiny ones for tests, real ones such
as ``mixtral-8x7b`` for I/O benchmarks). :func:`write_checkpoint` writes a
directory that transformers and ``mer quantize`` both load: ``config.json`` and
``generation_config.json`` byte for byte as transformers 4.51.3 saves them, sharded ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` (per-expert tensor names, as transformers saves
MoE checkpoints), a real byte-level BPE ``tokenizer.json`` (see
:mod:`mer_cli.tokenizer_build`; smaller than ``vocab_size``) and
``tokenizer_config.json`` with a chat template.

Weights (shapes legend: D model, F expert FFN, E experts, V vocabulary):

* every projection ``[out, in]`` is Gaussian with std ``1/sqrt(in)``, so each
  output coordinate of a unit-RMS input has variance about 1 and the residual
  stream grows only like ``sqrt(layers)``; router weights ``[E, D]`` likewise, so
  router logits have std about 1 and no expert is favoured -- per-layer usage over
  a few hundred tokens is near uniform (``tests/test_synth.py`` checks it);
* ``o_proj`` is scaled down by ``ATTN_OUT_SCALE`` (see there);
* norm weights are ``1 + N(0, 0.1)``: about 1, but wrong-norm bugs still show;
* Qwen2-MoE q/k/v biases ``N(0, 0.1)``; embeddings ``N(0, 1)``.

Each tensor draws from its own generator seeded by ``(seed, crc32(name))``, so a
tensor does not depend on the shard size, the thread count or ``--layers`` (a
2-layer model is the first 2 layers of the 4-layer one). Tensors are generated
in chunks by a small thread pool while the main thread writes them in order; at
most ``workers + 2`` tensors are in memory at once.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mer_cli import interrupt
from mer_cli.errors import ResourceError, UsageError
from mer_cli.formats.quant import f32_to_bf16
from mer_cli.formats.safetensors import SafetensorsWriter
from mer_cli.models.config import ModelConfig, from_hf_config

# config.json is byte for byte what transformers 4.51.3 saves (torch_dtype and a
# top-level rope_theta, as on the Hub); transformers 5 loads it too
TRANSFORMERS_VERSION = "4.51.3"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # transformers' default max_shard_size "5GB"
CHUNK = 1 << 22  # elements generated per step: 16 MiB of float32
NORM_NOISE = 0.1
# Attention at random init averages v over the context, so its output is mostly
# one vector shared by all positions (the frequency-weighted mean of the context),
# which shifts every router logit the same way and skews expert usage; scaling
# o_proj down keeps that shared part small next to the token-specific residual.
ATTN_OUT_SCALE = 0.25
BIAS_STD = 0.1

# --dtype -> (safetensors dtype, config torch_dtype)
DTYPES = {
    "bf16": ("BF16", "bfloat16"),
    "f16": ("F16", "float16"),
    "f32": ("F32", "float32"),
}
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

_MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_OLMO_CHAT = (
    "{{ eos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokens:
    """Special tokens of a preset's tokenizer; they get ids 0, 1, ... in order."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    chat_template: str = _CHATML

    def id(self, token: str | None) -> int | None:
        return None if token is None else self.specials.index(token)


_MISTRAL_TOKENS = Tokens(
    ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", True, _MISTRAL_CHAT
)
_QWEN_TOKENS = Tokens(
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    None,
    "<|im_end|>",
    "<|endoftext|>",
)
_OLMO_TOKENS = Tokens(
    ("<|endoftext|>", "<|padding|>"),
    None,
    "<|endoftext|>",
    "<|padding|>",
    chat_template=_OLMO_CHAT,
)


@dataclass(frozen=True)
class Preset:
    """A named architecture + shape. ``config`` holds the hyperparameters in
    transformers' names; token ids, dtype and layer count are filled in later."""

    name: str
    model_type: str
    summary: str
    config: dict[str, Any]
    tokens: Tokens
    tokenizer_vocab: int  # BPE vocabulary actually trained (<= config vocab_size)
    tiny: bool = False


def _mixtral(**kw: Any) -> dict[str, Any]:
    cfg = dict(
        attention_dropout=0.0,
        hidden_act="silu",
        initializer_range=0.02,
        output_router_logits=False,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
        sliding_window=None,
        tie_word_embeddings=False,
        use_cache=True,
    )
    cfg.update(kw)
    return cfg


def _qwen2_moe(**kw: Any) -> dict[str, Any]:
    cfg = dict(
        attention_dropout=0.0,
        decoder_sparse_step=1,
        hidden_act="silu",
        initializer_range=0.02,
        mlp_only_layers=[],
        norm_topk_prob=False,
        output_router_logits=False,
        qkv_bias=True,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        rope_theta=1e6,
        router_aux_loss_coef=0.001,
        sliding_window=None,
        tie_word_embeddings=False,
        use_cache=True,
        use_sliding_window=False,
    )
    cfg.update(kw)
    return cfg


def _qwen3_moe(**kw: Any) -> dict[str, Any]:
    cfg = _qwen2_moe(attention_bias=False, norm_topk_prob=True)
    del cfg["qkv_bias"]
    cfg.update(kw)
    return cfg


def _olmoe(**kw: Any) -> dict[str, Any]:
    cfg = dict(
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        hidden_act="silu",
        initializer_range=0.02,
        norm_topk_prob=False,
        output_router_logits=False,
        rms_norm_eps=1e-5,
        rope_scaling=None,
        rope_theta=10000.0,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        use_cache=True,
    )
    cfg.update(kw)
    return cfg


_TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-mixtral",
            "mixtral",
            "Mixtral, D=256, 8 experts x F=384, top-2, 2 layers (~11 MB)",
            _mixtral(
                **_TINY,
                intermediate_size=384,
                num_hidden_layers=2,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=512,
                max_position_embeddings=4096,
            ),
            _MISTRAL_TOKENS,
            512,
            tiny=True,
        ),
        Preset(
            "tiny-qwen2-moe",
            "qwen2_moe",
            "Qwen2-MoE with shared expert and q/k/v biases, D=256, 8 experts x "
            "F=384, top-2, 2 layers (~13 MB)",
            _qwen2_moe(
                **_TINY,
                intermediate_size=512,
                moe_intermediate_size=384,
                shared_expert_intermediate_size=512,
                num_hidden_layers=2,
                max_window_layers=2,
                num_experts=8,
                num_experts_per_tok=2,
                vocab_size=512,
                max_position_embeddings=4096,
            ),
            _QWEN_TOKENS,
            512,
            tiny=True,
        ),
        Preset(
            "tiny-qwen3-moe",
            "qwen3_moe",
            "Qwen3-MoE with per-head q/k norm, head_dim 128 != D/H, tied embeddings, "
            "D=256, 16 experts x F=256, top-4, 2 layers (~13 MB)",
            _qwen3_moe(
                **_TINY,
                head_dim=128,
                intermediate_size=768,
                moe_intermediate_size=256,
                num_hidden_layers=2,
                max_window_layers=2,
                num_experts=16,
                num_experts_per_tok=4,
                vocab_size=512,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
            ),
            _QWEN_TOKENS,
            512,
            tiny=True,
        ),
        Preset(
            "tiny-olmoe",
            "olmoe",
            "OLMoE with full-width q/k norm, D=256, 8 experts x F=384, top-2, "
            "2 layers (~11 MB)",
            _olmoe(
                **_TINY,
                intermediate_size=384,
                num_hidden_layers=2,
                num_experts=8,
                num_experts_per_tok=2,
                vocab_size=512,
                max_position_embeddings=4096,
            ),
            _OLMO_TOKENS,
            512,
            tiny=True,
        ),
        Preset(
            "mixtral-8x7b",
            "mixtral",
            "Mixtral-8x7B shapes: D=4096, 8 experts x F=14336, top-2, 32 layers "
            "(46.7 B parameters, 93 GB in bf16)",
            _mixtral(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=32000,
                max_position_embeddings=32768,
            ),
            _MISTRAL_TOKENS,
            4096,
        ),
        Preset(
            "mixtral-8x22b",
            "mixtral",
            "Mixtral-8x22B shapes: D=6144, 8 experts x F=16384, top-2, 56 layers "
            "(141 B parameters, 281 GB in bf16)",
            _mixtral(
                hidden_size=6144,
                intermediate_size=16384,
                num_hidden_layers=56,
                num_attention_heads=48,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                vocab_size=32768,
                max_position_embeddings=65536,
            ),
            _MISTRAL_TOKENS,
            4096,
        ),
        Preset(
            "qwen3-30b-a3b",
            "qwen3_moe",
            "Qwen3-30B-A3B shapes: D=2048, 128 experts x F=768, top-8, 48 layers "
            "(30.5 B parameters, 61 GB in bf16)",
            _qwen3_moe(
                hidden_size=2048,
                head_dim=128,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                max_window_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                num_experts=128,
                num_experts_per_tok=8,
                vocab_size=151936,
                max_position_embeddings=40960,
            ),
            _QWEN_TOKENS,
            4096,
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`UsageError` listing all of them if unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None


def hf_config(
    preset: Preset | str, layers: int | None = None, dtype: str = "bf16"
) -> dict[str, Any]:
    """The ``config.json`` dict of a preset, keys sorted as transformers writes them.

    Parameters
    ----------
    preset : Preset or str
    layers : int, optional
        Overrides ``num_hidden_layers`` (and Qwen's ``max_window_layers``).
    dtype : {"bf16", "f16", "f32"}
        Recorded as ``torch_dtype``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = dict(p.config)
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers is {layers}; a model needs at least 1 layer")
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = layers
    if p.model_type == "mixtral":  # MixtralConfig writes the head_dim it derives
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    t = p.tokens
    cfg.update(
        architectures=[ARCHITECTURES[p.model_type]],
        model_type=p.model_type,
        torch_dtype=DTYPES[dtype][1],
        transformers_version=TRANSFORMERS_VERSION,
        eos_token_id=t.id(t.eos),
    )
    # like transformers, leave out token ids that are None (the base default)
    for key, token in (("bos_token_id", t.bos), ("pad_token_id", t.pad)):
        if token is not None:
            cfg[key] = t.id(token)
    return dict(sorted(cfg.items()))


class TensorSpec(NamedTuple):
    """One checkpoint tensor and how its values are drawn."""

    name: str  # Hugging Face name
    shape: tuple[int, ...]
    kind: str  # "normal" (N(0, std^2)) | "norm" (1 + N(0, std^2))
    std: float


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint ``config`` describes, in file order.

    Names follow transformers' saved checkpoints with one tensor per expert:
    Mixtral ``model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight``,
    the others ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``.
    """
    mc = from_hf_config(config)
    D, V = mc.hidden_size, mc.vocab_size

    def lin(name: str, rows: int, cols: int) -> TensorSpec:
        return TensorSpec(name, (rows, cols), "normal", 1.0 / np.sqrt(cols))

    def norm(name: str, n: int) -> TensorSpec:
        return TensorSpec(name, (n,), "norm", NORM_NOISE)

    specs = [TensorSpec("model.embed_tokens.weight", (V, D), "normal", 1.0)]
    for layer in range(mc.num_layers):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        specs += [
            lin(a + "q_proj.weight", mc.q_dim, D),
            lin(a + "k_proj.weight", mc.kv_dim, D),
            lin(a + "v_proj.weight", mc.kv_dim, D),
            lin(a + "o_proj.weight", D, mc.q_dim)._replace(
                std=ATTN_OUT_SCALE / np.sqrt(mc.q_dim)
            ),
        ]
        if mc.attn_bias:
            specs += [
                TensorSpec(a + f"{x}_proj.bias", (n,), "normal", BIAS_STD)
                for x, n in (("q", mc.q_dim), ("k", mc.kv_dim), ("v", mc.kv_dim))
            ]
        if mc.qk_norm == "head":
            specs += [norm(a + "q_norm.weight", mc.head_dim)]
            specs += [norm(a + "k_norm.weight", mc.head_dim)]
        elif mc.qk_norm == "full":
            specs += [norm(a + "q_norm.weight", mc.q_dim)]
            specs += [norm(a + "k_norm.weight", mc.kv_dim)]
        E, F = mc.num_experts, mc.expert_ffn
        if mc.arch == "mixtral":
            m = p + "block_sparse_moe."
            specs.append(lin(m + "gate.weight", E, D))
            for e in range(E):
                x = f"{m}experts.{e}."
                specs += [
                    lin(x + "w1.weight", F, D),
                    lin(x + "w2.weight", D, F),
                    lin(x + "w3.weight", F, D),
                ]
        else:
            m = p + "mlp."
            specs.append(lin(m + "gate.weight", E, D))
            for e in range(E):
                x = f"{m}experts.{e}."
                specs += [
                    lin(x + "gate_proj.weight", F, D),
                    lin(x + "up_proj.weight", F, D),
                    lin(x + "down_proj.weight", D, F),
                ]
            if mc.shared_expert_ffn:
                Fs, s = mc.shared_expert_ffn, m + "shared_expert."
                specs += [
                    lin(s + "gate_proj.weight", Fs, D),
                    lin(s + "up_proj.weight", Fs, D),
                    lin(s + "down_proj.weight", D, Fs),
                    lin(m + "shared_expert_gate.weight", 1, D),
                ]
        specs += [norm(p + "input_layernorm.weight", D)]
        specs += [norm(p + "post_attention_layernorm.weight", D)]
    specs.append(norm("model.norm.weight", D))
    if not mc.tie_word_embeddings:
        specs.append(lin("lm_head.weight", V, D))
    return specs


class Plan(NamedTuple):
    """What :func:`write_checkpoint` will write, computed without generating data."""

    config: dict[str, Any]
    model: ModelConfig
    tensors: list[TensorSpec]
    st_dtype: str  # safetensors dtype of every tensor
    shards: list[list[TensorSpec]]  # tensors of model-0000i-of-0000N, in order
    nbytes: int  # total tensor bytes

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"


def plan(
    preset: Preset | str,
    layers: int | None = None,
    dtype: str = "bf16",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Plan:
    """Config, tensor list (names, shapes, bytes) and sharding of a synthetic checkpoint.

    Shards are filled greedily in file order as transformers does: a new shard
    starts when the next tensor would push the current one past ``shard_size``
    (a tensor bigger than ``shard_size`` gets a shard of its own).
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size is {shard_size}; it must be positive")
    config = hf_config(preset, layers, dtype)
    tensors = tensor_specs(config)
    st_dtype = DTYPES[dtype][0]
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[st_dtype]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        n = int(np.prod(t.shape)) * itemsize
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    total = sum(int(np.prod(t.shape)) for t in tensors) * itemsize
    return Plan(config, from_hf_config(config), tensors, st_dtype, shards, total)


def generate_tensor(spec: TensorSpec, seed: int, st_dtype: str) -> np.ndarray:
    """Draw one tensor, chunk by chunk, straight into its storage dtype.

    Returns
    -------
    numpy.ndarray
        ``spec.shape``; ``uint16`` bfloat16 bits for ``BF16``, else float16/float32.
    """
    # SFC64: its float32 ziggurat runs about 1.8x faster than the default PCG64
    rng = np.random.Generator(np.random.SFC64([seed, zlib.crc32(spec.name.encode())]))
    out = np.empty(
        spec.shape, {"BF16": np.uint16, "F16": np.float16}.get(st_dtype, np.float32)
    )
    flat = out.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        x = rng.standard_normal(min(CHUNK, flat.size - start), dtype=np.float32)
        x *= np.float32(spec.std)
        if spec.kind == "norm":
            x += np.float32(1.0)
        stop = start + x.size
        flat[start:stop] = f32_to_bf16(x) if st_dtype == "BF16" else x
    return out


def write_checkpoint(
    preset: Preset | str,
    out: str | os.PathLike,
    *,
    layers: int | None = None,
    seed: int = 0,
    dtype: str = "bf16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    workers: int = 2,
    progress: bool = False,
    gguf: str | os.PathLike | None = None,
) -> Path:
    """Write a synthetic Hugging Face checkpoint directory at ``out``.

    Everything goes into ``.<name>.tmp-<pid>`` beside ``out`` and is renamed into
    place at the end, so an interrupted run never leaves a checkpoint that looks
    complete. With ``gguf``, the same model is then also written as a GGUF Q4_0
    file by :func:`mer_cli.gguf_export.export_gguf`.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    p = plan(preset, layers, dtype, shard_size)
    out = Path(out)
    if gguf is not None and Path(gguf).exists() and not force:
        raise UsageError(
            f"{gguf}: output already exists; choose another --gguf or pass --force "
            "to replace it"
        )
    tmp = _prepare_output(out, force, p.nbytes)
    try:
        _write_tokenizer(
            get_preset(preset) if isinstance(preset, str) else preset, p, tmp
        )
        _write_tensors(p, tmp, seed, workers, progress)
        old = None
        if out.exists():  # --force: move the old output aside, then drop it
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if gguf is not None:
        from mer_cli.gguf_export import export_gguf

        export_gguf(out, gguf, progress=progress, threads=workers)
    return out


def _prepare_output(out: Path, force: bool, nbytes: int) -> Path:
    if out.exists() and not force:
        raise UsageError(
            f"{out}: output already exists; choose another -o or pass --force to "
            "replace it"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{out}: parent {parent} is not a directory")
    if not parent.is_dir():
        raise UsageError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ResourceError(
            f"{out}: cannot write into {parent} (permission denied); choose a "
            "writable -o"
        )
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise ResourceError(
            f"{out}: the checkpoint needs {nbytes / 1e9:.1f} GB but {parent} has "
            f"{free / 1e9:.1f} GB free; pass fewer --layers or another -o"
        )
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_tokenizer(preset: Preset, p: Plan, d: Path) -> None:
    from mer_cli.tokenizer_build import build_tokenizer, tokenizer_config

    t = preset.tokens
    vocab = min(preset.tokenizer_vocab, p.model.vocab_size)
    tok = build_tokenizer(list(t.specials), vocab, t.bos if t.add_bos else None)
    tok.save(str(d / "tokenizer.json"))
    tcfg = tokenizer_config(
        tok,
        bos_token=t.bos,
        eos_token=t.eos,
        pad_token=t.pad,
        unk_token=t.unk,
        chat_template=t.chat_template,
        model_max_length=p.model.max_position,
    )
    tcfg["add_bos_token"] = t.add_bos
    _write_json(d / "tokenizer_config.json", tcfg)
    gen: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in p.config:
            gen[key] = p.config[key]
    gen["transformers_version"] = TRANSFORMERS_VERSION
    _write_json(d / "generation_config.json", gen)
    _write_json(d / "config.json", p.config)


def _write_tensors(p: Plan, d: Path, seed: int, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    jobs = [(i, t) for i, shard in enumerate(p.shards) for t in shard]
    itemsize = 4 if p.st_dtype == "F32" else 2
    writer: SafetensorsWriter | None = None
    current = -1

    def write(i: int, t: TensorSpec, arr: np.ndarray) -> None:
        nonlocal writer, current
        if i != current:  # first tensor of the next shard
            if writer is not None:
                writer.close()
            specs = [(s.name, p.st_dtype, s.shape) for s in p.shards[i]]
            writer = SafetensorsWriter(d / p.shard_name(i), specs, {"format": "pt"})
            current = i
        writer.write(t.name, arr)

    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(
            total=p.nbytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="synth",
            disable=not progress,
        ) as bar,
    ):
        # `workers + 1` tensors generate ahead while the main thread writes
        pending: deque = deque()
        try:
            for n, (i, t) in enumerate(jobs):
                fut = pool.submit(generate_tensor, t, seed, p.st_dtype)
                pending.append((i, t, fut))
                while len(pending) > workers + 1 or (pending and n == len(jobs) - 1):
                    j, s, fut = pending.popleft()
                    write(j, s, interrupt.result(fut))
                    bar.update(int(np.prod(s.shape)) * itemsize)
        except BaseException:
            for *_, fut in pending:  # do not generate what will never be written
                fut.cancel()
            raise
    if writer is not None:
        writer.close()
    weight_map = {t.name: p.shard_name(i) for i, t in jobs}
    _write_json(
        d / "model.safetensors.index.json",
        {"metadata": {"total_size": p.nbytes}, "weight_map": weight_map},
    )
