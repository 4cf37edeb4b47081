"""Compute kernels used by the forward pass. Installed as ``mer_cli.kernels``.

This module is the stable API the models call. Shapes: T tokens, C input
columns, R output rows, H heads, KV kv-heads, hd head dim, S cache length.

* ``linear(w, x)``: ``x`` f32 ``[T, C]`` times ``w`` ``[R, C]`` (a store view:
  ``QTensor`` q4/q8, or ndarray f32/f16, or bf16 bits as ``uint16``) -> f32
  ``[T, R]``. For q4/q8 weights the activations are first quantized to int8 per
  group of 32 (as llama.cpp's Q8_0 does) and the dot products are integer.
* ``rms_norm(x, weight, eps)``: ``[T, N]`` -> ``[T, N]``.
* ``rope(x, positions, theta)``: rotate-half (GPT-NeoX) RoPE on ``[T, nh, hd]``.
* ``attention(q, k_cache, v_cache, start, window)``: causal grouped-query
  attention for ``q`` ``[T, H, hd]`` at positions ``start..start+T-1``;
  ``k_cache``/``v_cache`` ``[S, KV, hd]`` hold positions ``0..start+T-1``.
  ``window`` (or None): a query at position p sees keys at positions > p-window.
* ``silu_mul(gate_up)``: ``[T, 2F]`` -> ``silu(gate) * up`` ``[T, F]``.
* ``softmax(x)`` over the last axis; ``topk(x, k)`` -> (indices, values) sorted
  by value descending, ties to the lower index.

The bodies here are the plain-numpy versions; faster paths replace them.
"""

from __future__ import annotations

import numpy as np

from mer_cli.formats.quant import GROUP, QTensor, bf16_to_f32


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0-quantize activations per group of 32: int8 ``[T, C]``, f32 ``[T, C/32]``."""
    T, C = x.shape
    g = x.reshape(T, C // GROUP, GROUP)
    d = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = g * inv[..., None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int8)
    return q.reshape(T, C), d


def _weight_ints(w: QTensor) -> np.ndarray:
    """Integer weight values ``[R, C]`` (q4: nibble - 8; q8: as stored)."""
    if w.dtype == "q8":
        return w.packed.astype(np.int32)
    R, half = w.packed.shape
    p = w.packed.reshape(R, half // 16, 16)
    q = np.concatenate([p & 15, p >> 4], axis=2).astype(np.int32) - 8
    return q.reshape(R, half * 2)


def linear(w, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        return linear(w, x[None])[0]
    if isinstance(w, QTensor):
        R, C = w.shape
        xq, dx = quantize_activation(x)  # [T, C], [T, G]
        wi = _weight_ints(w).reshape(R, C // GROUP, GROUP)
        xi = xq.astype(np.int32).reshape(x.shape[0], C // GROUP, GROUP)
        dots = np.einsum("rgj,tgj->trg", wi, xi).astype(np.float32)  # exact ints
        scale = w.scales.astype(np.float32)[None] * dx[:, None, :]
        return (dots * scale).sum(axis=2, dtype=np.float32)
    wf = bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, np.float32)
    return x @ wf.T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * weight


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.asarray(positions, np.float64)[:, None] * inv[None]  # [T, hd/2]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k_cache, v_cache, start: int, window: int | None = None) -> np.ndarray:
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
    return (g / (np.float32(1) + np.exp(-g))) * u


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(x, idx, axis=-1)
