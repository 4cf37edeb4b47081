"""The pieces every supported architecture shares: attention with a KV cache, the
routed MoE block and the shared expert.

# T tokens, D model, H heads, KV kv-heads, hd head dim, E experts, K active,
# F expert ffn, Fs shared-expert ffn, S cache length, L layers, V vocab

All four architectures are pre-norm decoders::

    h = x + o(attention(rope(q(norm(x))), rope(k(norm(x))), v(norm(x))))
    x = h + moe(norm(h))

and differ only in small hooks that :class:`Architecture` subclasses override
(one file per architecture): how q/k/v are post-processed (biases, q/k norms,
clipping), how router logits become expert weights, and whether a shared
expert adds its output. Every product with a weight goes through
``mer_cli.kernels`` so the fast kernels apply everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mer_cli import kernels as K
from mer_cli.errors import ResourceError
from mer_cli.formats.quant import QTensor, bf16_to_f32
from mer_cli.models.config import ModelConfig


@dataclass
class LayerWeights:
    """Resident weights of one decoder layer (store views; 1-D tensors in f32)."""

    attn_norm: np.ndarray  # [D]
    ffn_norm: np.ndarray  # [D]
    q: Any  # [H*hd, D]
    k: Any  # [KV*hd, D]
    v: Any  # [KV*hd, D]
    o: Any  # [D, H*hd]
    router: Any  # [E, D]
    q_bias: np.ndarray | None = None  # [H*hd]
    k_bias: np.ndarray | None = None  # [KV*hd]
    v_bias: np.ndarray | None = None  # [KV*hd]
    q_norm: np.ndarray | None = None  # [hd] (per head) or [H*hd] (full)
    k_norm: np.ndarray | None = None  # [hd] or [KV*hd]
    shared_gate_up: Any = None  # [2*Fs, D]
    shared_down: Any = None  # [D, Fs]
    shared_gate: Any = None  # [1, D]


class ContextFullError(ResourceError):
    """The KV cache has no room for more tokens."""


class KVCache:
    """Keys and values of every layer, preallocated for ``ctx`` positions.

    ``k``/``v`` are ``[L, S, KV, hd]`` in ``dtype`` (float32 by default; float16
    halves the memory at a small precision cost). Memory is only touched as
    positions are filled (``np.zeros`` maps zero pages lazily).
    """

    def __init__(self, cfg: ModelConfig, ctx: int, dtype: str = "f32") -> None:
        if dtype not in ("f32", "f16"):
            raise ValueError(f"KV cache dtype {dtype!r}, expected f32 or f16")
        npdt = np.float32 if dtype == "f32" else np.float16
        shape = (cfg.num_layers, ctx, cfg.num_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, npdt)
        self.v = np.zeros(shape, npdt)
        self.ctx = ctx
        self.dtype = dtype
        self.length = 0  # positions 0..length-1 are filled (in every layer)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_room(self, n: int) -> None:
        """Raise :class:`ContextFullError` unless ``n`` more positions fit."""
        if self.length + n > self.ctx:
            raise ContextFullError(
                f"context is full: {self.length} positions used + {n} new tokens > "
                f"--ctx {self.ctx}; raise --ctx (the model allows up to its "
                "max_position) or shorten the prompt"
            )


def embed_rows(table: Any, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of the embedding table as f32 ``[T, D]``.

    Only the requested rows are dequantized/widened (a q8 ``[V, D]`` table is
    never expanded as a whole).
    """
    ids = np.asarray(ids, np.int64)
    if isinstance(table, QTensor):
        return QTensor(table.dtype, table.packed[ids], table.scales[ids]).dequantize()
    rows = table[ids]
    if rows.dtype == np.uint16:  # bf16 bit patterns
        return bf16_to_f32(rows)
    return rows.astype(np.float32)


class Architecture:
    """Behaviour shared by the supported MoE decoders; subclasses override hooks.

    Parameters
    ----------
    cfg : ModelConfig
        The model description from the store's manifest.
    """

    name = "base"

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------ attention hooks

    @property
    def window(self) -> int | None:
        """Sliding attention window (None: full causal attention)."""
        return None

    def project_qkv(
        self, w: LayerWeights, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q ``[T, H*hd]``, k/v ``[T, KV*hd]`` from the normed input ``x`` ``[T, D]``,
        before RoPE. The base version adds biases when the layer has them."""
        if all(isinstance(t, QTensor) for t in (w.q, w.k, w.v)):
            x = K.quantize_input(x)  # quantize the activations once for all three
        q, k, v = K.linear(w.q, x), K.linear(w.k, x), K.linear(w.v, x)
        if w.q_bias is not None:
            q += w.q_bias
            k += w.k_bias
            v += w.v_bias
        return q, k, v

    # ------------------------------------------------------------ MoE hooks

    def route(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Router logits ``[T, E]`` -> expert ids ``[T, K]`` int64 and weights
        ``[T, K]`` f32: softmax over all experts, top-k, renormalized when the
        config says ``norm_topk_prob`` (Qwen2/3-MoE, OLMoE)."""
        probs = K.softmax(np.asarray(logits, np.float32))
        ids, weights = K.topk(probs, self.cfg.top_k)
        weights = np.asarray(weights, np.float32)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return np.asarray(ids, np.int64), weights

    def shared_expert(self, w: LayerWeights, x: np.ndarray) -> np.ndarray | None:
        """Output ``[T, D]`` of an always-active expert, or None."""
        return None


# ================================================================ attention


def attention_block(
    arch: Architecture,
    w: LayerWeights,
    x: np.ndarray,
    cache: KVCache,
    layer: int,
    start: int,
) -> np.ndarray:
    """Self-attention of ``x`` (normed, ``[T, D]``) at positions ``start..start+T-1``.

    Writes this layer's keys/values for those positions into ``cache`` and
    returns the output projection ``[T, D]``.
    """
    q, k, v = arch.project_qkv(w, x)
    return K.linear(w.o, attend(arch, q, k, v, cache, layer, start))


def attend(
    arch: Architecture,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cache: KVCache,
    layer: int,
    start: int,
) -> np.ndarray:
    """RoPE, the cache write and attention for projections ``q`` ``[T, H*hd]``,
    ``k``/``v`` ``[T, KV*hd]`` of one sequence at positions ``start..start+T-1``;
    returns the heads' outputs f32 ``[T, H*hd]`` (before the output projection).
    A decode batch calls this once per sequence, on that sequence's cache."""
    cfg = arch.cfg
    T = q.shape[0]
    H, KVh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = np.arange(start, start + T)
    q = K.rope(q.reshape(T, H, hd), pos, cfg.rope_theta)  # [T, H, hd]
    k = K.rope(k.reshape(T, KVh, hd), pos, cfg.rope_theta)  # [T, KV, hd]
    cache.k[layer, start : start + T] = k
    cache.v[layer, start : start + T] = v.reshape(T, KVh, hd)
    out = K.attention(q, cache.k[layer], cache.v[layer], start, arch.window)
    return np.ascontiguousarray(out.reshape(T, H * hd))


# ================================================================ MoE


def expert_mlp(gate_up: Any, down: Any, x: np.ndarray) -> np.ndarray:
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))`` for ``x`` ``[T, D]``.

    ``gate_up`` is ``[2F, D]`` (gate rows first), ``down`` ``[D, F]``.
    """
    return K.linear(down, K.silu_mul(K.linear(gate_up, x)))


@dataclass
class Lookahead:
    """A prefetch hint: ``layer``'s likely experts (router lookahead: the next
    layer's router on this layer's hidden state; or a predictor's scores)."""

    layer: int
    experts: list[int]  # best first
    scores: list[float]  # estimated probability of use
    kind: str = "lookahead"  # who made it (a predictor's kind): calibrated apart


def lookahead(
    arch: Architecture, nxt: LayerWeights, layer: int, h: np.ndarray
) -> Lookahead:
    """Guess layer ``layer``'s experts from the residual ``h`` ``[T, D]`` of the
    layer before: ``nxt``'s norm and router on ``h`` (E x D per token)."""
    cfg = arch.cfg
    probs = K.softmax(
        K.linear(nxt.router, K.rms_norm(h, nxt.ffn_norm, cfg.rms_norm_eps))
    )  # [T, E]
    ids, _ = K.topk(probs, cfg.top_k)
    chosen = np.unique(np.asarray(ids))
    # probability that some token uses the expert, estimated by its best token
    score = probs[:, chosen].max(axis=0)
    order = np.argsort(-score, kind="stable")
    return Lookahead(layer, chosen[order].tolist(), score[order].tolist())


def attention_preview(
    arch: Architecture,
    nxt: LayerWeights,
    layer: int,
    x: np.ndarray,
    cache: KVCache,
    start: int,
) -> np.ndarray:
    """Layer ``layer``'s attention run early, on ``x`` ``[T, D]`` (the residual
    entering the MoE block of the layer before): ``x + attention(norm(x))``
    f32 ``[T, D]``, what layer ``layer``'s router would see if the MoE block
    before it added nothing. Earlier positions attend with their real keys
    and values; positions ``start..start+T-1`` of ``layer`` get keys and
    values from ``x``, written into ``cache`` where the real ones land when
    ``layer``'s attention runs (call it only before that, in the same pass).
    """
    h = K.rms_norm(x, nxt.attn_norm, arch.cfg.rms_norm_eps)
    return x + attention_block(arch, nxt, h, cache, layer, start)


def moe_block(
    arch: Architecture,
    w: LayerWeights,
    x: np.ndarray,
    layer: int,
    source: Any,
    prefetch: Callable[[np.ndarray], Sequence[Lookahead]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routed experts (plus the shared expert) for ``x`` (normed, ``[T, D]``).

    The experts selected by any token (the union) are requested from
    ``source.fetch`` once; each is computed over the group of tokens routed to
    it as soon as the source yields it, and its weighted output accumulated.
    ``prefetch`` (optional) is called with ``ids`` after the first expert
    arrives -- the demand reads are queued by then -- and each
    :class:`Lookahead` it returns (nearest layer first) is passed on to
    ``source.prefetch``.

    Returns
    -------
    out : ndarray, f32 [T, D]
    ids : ndarray, int64 [T, K]   selected experts per token
    weights : ndarray, f32 [T, K] their mixing weights
    """
    T, D = x.shape
    ids, weights = arch.route(K.linear(w.router, x))  # [T, K], [T, K]
    out = np.zeros((T, D), np.float32)
    wanted: Sequence[int] = np.unique(ids).tolist()
    hinted = prefetch is None
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for e, parts in source.fetch(layer, wanted):
        tok, slot = np.nonzero(ids == e)  # the tokens routed to e, [n]
        xe = x if len(tok) == T else np.ascontiguousarray(x[tok])
        y = expert_mlp(parts["gate_up"], parts["down"], xe)  # [n, D]
        done[e] = (tok, weights[tok, slot, None] * y)
        if not hinted:
            hinted = True
            for hint in prefetch(ids):
                if hint.experts:
                    source.prefetch(hint.layer, hint.experts, hint.scores, hint.kind)
    # sum in expert order, not arrival order: float addition is not associative,
    # and a streamed run must give exactly the tokens of a resident one
    for e in sorted(done):
        tok, y = done[e]
        out[tok] += y
    shared = arch.shared_expert(w, x)
    if shared is not None:
        out += shared
    return out, ids, weights


def shared_expert_mlp(w: LayerWeights, x: np.ndarray, gated: bool) -> np.ndarray:
    """The shared expert ``[T, D]``, times ``sigmoid(gate . x)`` when ``gated``."""
    y = expert_mlp(w.shared_gate_up, w.shared_down, x)
    if gated:
        g = K.linear(w.shared_gate, x)  # [T, 1]
        y *= np.float32(1) / (np.float32(1) + np.exp(-g))
    return y
