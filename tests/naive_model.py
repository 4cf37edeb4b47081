"""An independent, plain-numpy reference forward pass of mer's four architectures.

Reads a Hugging Face checkpoint directory by Hugging Face tensor names and
follows transformers' modeling code (``modeling_{mixtral,qwen2_moe,qwen3_moe,
olmoe}.py``) step by step, over the whole sequence at once (no KV cache), in
float64 by default. It shares nothing with mer's engine except the safetensors
reader and the ``config.json`` parser, so tests can check the engine, the store
and the synthetic weights against it, and check it against committed
transformers outputs (``tests/fixtures/parity``).

Shapes: T tokens, D model, H query heads, KV key/value heads, hd head dim,
E experts, K active experts, F expert FFN, V vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mer_cli.formats.safetensors import Checkpoint
from mer_cli.models.config import ModelConfig, from_hf_config


class NaiveOutput(NamedTuple):
    logits: np.ndarray  # [T, V]
    routing: list[np.ndarray]  # per layer, int64 [T, K], most probable first
    routing_weights: list[np.ndarray]  # per layer, [T, K] weights applied
    router_probs: list[np.ndarray]  # per layer, [T, E] softmax of router logits
    hidden: list[np.ndarray]  # residual stream [T, D]: embeddings, then per layer
    router_logits: list[np.ndarray]  # per layer, [T, E] raw ``x @ gate.weight.T``


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis (transformers' RMSNorm)."""
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_cos_sin(T: int, hd: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[T, hd]`` of rotate-half RoPE at positions ``0..T-1``."""
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([ang, ang], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [T, heads, hd]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_mask(T: int, window: int | None) -> np.ndarray:
    """bool ``[T, T]``: query t sees key s when ``s <= t`` and ``t - s < window``."""
    t = np.arange(T)[:, None]
    s = np.arange(T)[None, :]
    mask = s <= t
    if window:
        mask &= t - s < window
    return mask


class NaiveModel:
    """Full-sequence numpy forward pass of a checkpoint directory.

    Parameters
    ----------
    hf_dir : path
        ``config.json`` + ``*.safetensors`` (with or without an index).
    dtype : numpy dtype
        Compute dtype (float64 default; float32 to mimic a float32 engine).
    """

    def __init__(self, hf_dir: str | Path, dtype: type = np.float64) -> None:
        self.dir = Path(hf_dir)
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        self.cfg: ModelConfig = from_hf_config(self.hf_config)
        self.ckpt = Checkpoint(self.dir)
        self.dtype = dtype
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        """Tensor ``name`` (Hugging Face name) in the compute dtype, cached."""
        if name not in self._cache:
            self._cache[name] = self.ckpt.f32(name).astype(self.dtype)
        return self._cache[name]

    # ------------------------------------------------------------------ blocks

    def attention(self, layer: int, h: np.ndarray) -> np.ndarray:
        """Self-attention of layer ``layer`` on normed input ``h`` [T, D] -> [T, D]."""
        c = self.cfg
        p = f"model.layers.{layer}.self_attn."
        T, H, KV, hd = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        q = h @ self.w(p + "q_proj.weight").T  # [T, H*hd]
        k = h @ self.w(p + "k_proj.weight").T  # [T, KV*hd]
        v = h @ self.w(p + "v_proj.weight").T
        if c.attn_bias:
            q = q + self.w(p + "q_proj.bias")
            k = k + self.w(p + "k_proj.bias")
            v = v + self.w(p + "v_proj.bias")
        if c.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection
            q = rms_norm(q, self.w(p + "q_norm.weight"), c.rms_norm_eps)
            k = rms_norm(k, self.w(p + "k_norm.weight"), c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (np.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q = q.reshape(T, H, hd)
        k = k.reshape(T, KV, hd)
        v = v.reshape(T, KV, hd)
        if c.qk_norm == "head":  # Qwen3: RMSNorm over head_dim, per head
            q = rms_norm(q, self.w(p + "q_norm.weight"), c.rms_norm_eps)
            k = rms_norm(k, self.w(p + "k_norm.weight"), c.rms_norm_eps)
        cos, sin = rope_cos_sin(T, hd, c.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = H // KV  # query head i reads kv head i // group
        k = np.repeat(k, group, axis=1)  # [T, H, hd]
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)  # [H, T, T]
        scores = np.where(attention_mask(T, c.sliding_window), scores, -np.inf)
        out = np.einsum("hts,shd->thd", softmax(scores), v).reshape(T, H * hd)
        return out @ self.w(p + "o_proj.weight").T

    def _mlp(self, prefix: str, names: tuple[str, str, str], x: np.ndarray):
        g, u, d = (self.w(prefix + n + ".weight") for n in names)
        return (silu(x @ g.T) * (x @ u.T)) @ d.T

    def moe(self, layer: int, h: np.ndarray):
        """Routed (and shared) experts on normed ``h`` [T, D].

        Returns
        -------
        out : [T, D]
        selected : int64 [T, K], most probable expert first
        weights : [T, K]
        probs : [T, E] softmax over all router logits
        logits : [T, E] router logits
        """
        c = self.cfg
        if c.arch == "mixtral":
            m = f"model.layers.{layer}.block_sparse_moe."
            names = ("w1", "w3", "w2")  # gate, up, down
        else:
            m = f"model.layers.{layer}.mlp."
            names = ("gate_proj", "up_proj", "down_proj")
        logits = h @ self.w(m + "gate.weight").T  # [T, E]
        probs = softmax(logits)
        selected = np.argsort(-probs, axis=-1, kind="stable")[:, : c.top_k]
        weights = np.take_along_axis(probs, selected, axis=-1)  # [T, K]
        # Mixtral renormalizes always (softmax over the top-k logits); the others
        # only when norm_topk_prob (ModelConfig sets it True for Mixtral)
        if c.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for e in range(c.num_experts):
            rows, slot = np.nonzero(selected == e)
            if rows.size:
                y = self._mlp(f"{m}experts.{e}.", names, h[rows])
                out[rows] += weights[rows, slot][:, None] * y
        if c.shared_expert_ffn:
            gate = 1.0 / (
                1.0 + np.exp(-(h @ self.w(m + "shared_expert_gate.weight").T))
            )
            out += gate * self._mlp(m + "shared_expert.", names, h)
        return out, selected, weights, probs, logits

    # ------------------------------------------------------------------ model

    def run(self, token_ids) -> NaiveOutput:
        """Forward pass over ``token_ids`` (ints, length T) keeping every result."""
        c = self.cfg
        ids = np.asarray(token_ids, dtype=np.int64)
        x = self.w("model.embed_tokens.weight")[ids]  # [T, D]
        hidden, routing, weights, probs, logits = [x], [], [], [], []
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, self.w(p + "input_layernorm.weight"), c.rms_norm_eps)
            x = x + self.attention(layer, h)
            h = rms_norm(
                x, self.w(p + "post_attention_layernorm.weight"), c.rms_norm_eps
            )
            out, sel, wts, prb, lg = self.moe(layer, h)
            x = x + out
            hidden.append(x)
            routing.append(sel)
            weights.append(wts)
            probs.append(prb)
            logits.append(lg)
        x = rms_norm(x, self.w("model.norm.weight"), c.rms_norm_eps)
        head = (
            "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        )
        out = x @ self.w(head).T
        return NaiveOutput(out, routing, weights, probs, hidden, logits)

    def forward(self, token_ids) -> np.ndarray:
        """Logits ``[T, V]`` for every position of ``token_ids``."""
        return self.run(token_ids).logits

    def routing(self, token_ids) -> list[np.ndarray]:
        """Per layer, the selected experts ``int64 [T, K]`` (most probable first)."""
        return self.run(token_ids).routing
