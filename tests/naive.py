"""Slow numpy twins of :mod:`mer_cli.kernels`: the semantics the kernels must keep.

Written for clarity, not speed; tests compare every kernel path against these.
Shapes: T tokens, C input columns, R output rows, H heads, KV kv-heads, hd head
dim, S cache length.
"""

from __future__ import annotations

import numpy as np

from mer_cli.formats.quant import GROUP, QTensor, bf16_to_f32


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 per group of 32: int8 ``[T, C]`` and f32 scales ``[T, C/32]``."""
    T, C = x.shape
    g = x.reshape(T, C // GROUP, GROUP)
    d = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = g * inv[..., None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int8)
    return q.reshape(T, C), d


def weight_ints(w: QTensor) -> np.ndarray:
    """Integer weight values ``[R, C]`` (q4: nibble - 8; q8: as stored)."""
    if w.dtype == "q8":
        return w.packed.astype(np.int32)
    R, half = w.packed.shape
    p = w.packed.reshape(R, half // 16, 16)
    q = np.concatenate([p & 15, p >> 4], axis=2).astype(np.int32) - 8
    return q.reshape(R, half * 2)


def linear_terms(w: QTensor, x: np.ndarray) -> np.ndarray:
    """Per-group float terms ``[T, R, G]`` whose sum is ``linear(w, x)``."""
    x = np.asarray(x, np.float32)
    R, C = w.shape
    xq, dx = quantize_activation(x)
    wi = weight_ints(w).reshape(R, C // GROUP, GROUP)
    xi = xq.astype(np.int32).reshape(x.shape[0], C // GROUP, GROUP)
    dots = np.einsum("rgj,tgj->trg", wi, xi).astype(np.float32)  # exact ints
    return dots * (w.scales.astype(np.float32)[None] * dx[:, None, :])


def linear(w, x: np.ndarray) -> np.ndarray:
    """``x [T, C] @ w[R, C].T`` -> f32 ``[T, R]`` (q4/q8 via int8 activations)."""
    x = np.asarray(x, np.float32)
    if isinstance(w, QTensor):
        return linear_terms(w, x).sum(axis=2, dtype=np.float32)
    wf = bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, np.float32)
    return x @ wf.T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * weight


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half (GPT-NeoX) RoPE on ``[T, nh, hd]``."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.asarray(positions, np.float64)[:, None] * inv[None]  # [T, hd/2]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def attention(q, k_cache, v_cache, start: int, window: int | None = None) -> np.ndarray:
    """Causal GQA attention of ``q [T, H, hd]`` at positions ``start..start+T-1``."""
    T, H, hd = q.shape
    KV = k_cache.shape[1]
    S = start + T
    k = k_cache[:S].astype(np.float32)
    v = v_cache[:S].astype(np.float32)
    rep = H // KV
    out = np.empty((T, H, hd), np.float32)
    qpos = start + np.arange(T)[:, None]
    kpos = np.arange(S)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    for h in range(H):
        s = (q[:, h, :] @ k[:, h // rep, :].T) / np.float32(np.sqrt(hd))
        s = np.where(mask, s, -np.inf)
        s = softmax(s)
        out[:, h, :] = s @ v[:, h // rep, :]
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    F = gate_up.shape[-1] // 2
    g, u = gate_up[..., :F], gate_up[..., F:]
    with np.errstate(over="ignore"):  # exp(-g) = inf gives silu = -0, as wanted
        return (g / (np.float32(1) + np.exp(-g))) * u


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` along the last axis, by value descending, ties to the lower index."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(x, idx, axis=-1)
