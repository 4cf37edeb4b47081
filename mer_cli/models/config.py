"""The model description every part of mer shares, built from a checkpoint.

Shapes legend used across the code: T tokens, D model width, H query heads,
KV key/value heads, hd head dim, E experts, K active experts, F expert FFN width,
Fs shared-expert FFN width, V vocabulary, L layers.

Canonical tensor names inside a store (HF names are mapped onto these)::

    embed [V, D]          final_norm [D]          lm_head [V, D] (absent if tied)
    layers.{l}.attn_norm [D]      layers.{l}.ffn_norm [D]
    layers.{l}.q [H*hd, D]  .k [KV*hd, D]  .v [KV*hd, D]  .o [D, H*hd]
    layers.{l}.q_bias / k_bias / v_bias              (Qwen2-MoE)
    layers.{l}.q_norm / k_norm  [hd] (Qwen3-MoE) or [H*hd] / [KV*hd] (OLMoE)
    layers.{l}.router [E, D]
    layers.{l}.shared.gate_up [2*Fs, D]  .shared.down [D, Fs]  .shared.gate [1, D]

Each routed expert (l, e) is one extent holding ``gate_up`` [2F, D] (rows 0..F-1
are the gate projection w1/gate_proj, rows F..2F-1 the up projection
w3/up_proj) and ``down`` [D, F].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mer_cli.errors import FormatError, UnsupportedError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of SUPPORTED
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # KV
    head_dim: int  # hd
    num_experts: int  # E
    top_k: int  # K
    expert_ffn: int  # F
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    shared_expert_ffn: int = 0  # Fs, 0 = no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert
    attn_bias: bool = False  # q/k/v projections have biases
    qk_norm: str = "none"  # "none" | "head" (per head) | "full" (whole projection)
    routing: str = "topk_softmax"  # "topk_softmax" (Mixtral) | "softmax_topk"
    norm_topk_prob: bool = True  # renormalize the top-k probabilities
    sliding_window: int | None = None
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest.json") -> ModelConfig:
        """Build from a store manifest's ``model`` table (all fields explicit)."""
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d and _required(f)]
        if missing:
            raise FormatError(
                f"{where}: model is missing {', '.join(missing)}; re-run mer quantize"
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _get(cfg: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise FormatError(
            f"{where}: field {key!r} is missing; the checkpoint is incomplete"
        )
    return default


def _num_experts(cfg: dict, where: str) -> int:
    # transformers 5 writes num_local_experts for Qwen3-MoE; Hub configs say num_experts
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise FormatError(
        f"{where}: field 'num_experts' is missing; the checkpoint is incomplete"
    )


def from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Map a Hugging Face ``config.json`` onto :class:`ModelConfig`.

    Raises :class:`UnsupportedError` naming the supported ``model_type`` values.
    """
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise UnsupportedError(
            f"{where}: model_type is {mt!r}; mer supports {', '.join(SUPPORTED)}"
        )
    rope = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")  # transformers 5 moves rope_theta in here
    if isinstance(params, dict) and cfg.get("rope_theta") is None:
        cfg = {**cfg, "rope_theta": params.get("rope_theta")}
        rope = rope or params
    g = lambda k, d=...: _get(cfg, k, where, d)  # noqa: E731
    D, H = int(g("hidden_size")), int(g("num_attention_heads"))
    common = dict(
        arch=mt,
        vocab_size=int(g("vocab_size")),
        hidden_size=D,
        num_layers=int(g("num_hidden_layers")),
        num_heads=H,
        num_kv_heads=int(g("num_key_value_heads", H)),
        head_dim=int(g("head_dim", D // H)),
        rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
        rope_theta=float(g("rope_theta", 10000.0)),
        max_position=int(g("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
    )
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise UnsupportedError(
            f"{where}: rope_scaling {rope!r} is not supported; mer implements plain RoPE"
        )
    if mt == "mixtral":
        return ModelConfig(
            **common,
            num_experts=int(g("num_local_experts")),
            top_k=int(g("num_experts_per_tok")),
            expert_ffn=int(g("intermediate_size")),
            routing="topk_softmax",
            norm_topk_prob=True,
            sliding_window=cfg.get("sliding_window") or None,
        )
    if mt in ("qwen2_moe", "qwen3_moe"):
        if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
            raise UnsupportedError(
                f"{where}: decoder_sparse_step={cfg.get('decoder_sparse_step')} / "
                f"mlp_only_layers={cfg.get('mlp_only_layers')} mix dense and MoE layers; "
                "mer supports checkpoints where every layer is MoE"
            )
        shared = (
            int(g("shared_expert_intermediate_size", 0)) if mt == "qwen2_moe" else 0
        )
        sw = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        return ModelConfig(
            **common,
            num_experts=_num_experts(cfg, where),
            top_k=int(g("num_experts_per_tok")),
            expert_ffn=int(g("moe_intermediate_size")),
            shared_expert_ffn=shared,
            shared_expert_gate=shared > 0,
            attn_bias=(mt == "qwen2_moe") or bool(g("attention_bias", False)),
            qk_norm="head" if mt == "qwen3_moe" else "none",
            routing="softmax_topk",
            # transformers' Qwen2/Qwen3-MoE configs default to False when the key is absent
            norm_topk_prob=bool(g("norm_topk_prob", False)),
            sliding_window=sw,
        )
    # olmoe
    return ModelConfig(
        **common,
        num_experts=_num_experts(cfg, where),
        top_k=int(g("num_experts_per_tok")),
        expert_ffn=int(g("intermediate_size")),
        attn_bias=bool(g("attention_bias", False)),
        qk_norm="full",
        routing="softmax_topk",
        norm_topk_prob=bool(g("norm_topk_prob", False)),
        clip_qkv=cfg.get("clip_qkv"),
    )
