"""Numba versions of the small per-token operations of the forward pass.

Each public function keeps the semantics of its numpy twin in ``tests/naive.py``
(f32 results; summation order may differ). Shapes: T tokens, N features,
H query heads, KV kv-heads, hd head dim, S cache length, E experts.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from mer_cli.kernels.config import (
    FAST,
    MIN_PARALLEL_MACS,
    PFAST,
    call_sized,
    frozen,
)
from mer_cli.kernels.q4 import HALF_TABLE


def _widen(v, htab):
    """A cache element as float32: f32 as is, fp16 bits (uint16) via ``htab``."""
    raise NotImplementedError  # only called from numba code (see the overload)


@overload(_widen)
def _widen_impl(v, htab):
    if isinstance(v, types.Float):
        return lambda v, htab: np.float32(v)
    return lambda v, htab: htab[v]


# ----------------------------------------------------------------------------- rms_norm


@njit(**FAST)
def _rms_norm(x, w, eps, out):
    # serial: even a long prompt is a few ms, less than a parallel launch can
    # cost on a busy machine
    T, N = x.shape
    for t in range(T):
        ss = np.float32(0)
        for i in range(N):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1) / np.float32(math.sqrt(ss / np.float32(N) + eps))
        for i in range(N):
            out[t, i] = (x[t, i] * inv) * w[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last axis.

    Parameters
    ----------
    x : float ``[..., N]``; weight : float ``[N]``; eps : float.

    Returns
    -------
    float32 ``[..., N]``
    """
    x = np.asarray(x, np.float32)
    x2 = frozen(x.reshape(-1, x.shape[-1]))
    out = np.empty(x2.shape, np.float32)
    w = frozen(weight, np.float32)
    _rms_norm(x2, w, np.float32(eps), out)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- rope


@njit(**FAST)
def _rope(x, positions, theta, out):
    T, nh, hd = x.shape
    h2 = hd // 2
    cos = np.empty(h2, np.float32)
    sin = np.empty(h2, np.float32)
    for t in range(T):
        for i in range(h2):
            inv = 1.0 / theta ** (np.float64(2 * i) / hd)
            a = np.float64(positions[t]) * inv
            cos[i] = np.float32(math.cos(a))
            sin[i] = np.float32(math.sin(a))
        for h in range(nh):
            for i in range(h2):
                x1 = x[t, h, i]
                x2 = x[t, h, h2 + i]
                out[t, h, i] = x1 * cos[i] - x2 * sin[i]
                out[t, h, h2 + i] = x2 * cos[i] + x1 * sin[i]


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half (GPT-NeoX) rotary embedding.

    Parameters
    ----------
    x : float ``[T, nh, hd]``; positions : int ``[T]``; theta : rope base.

    Returns
    -------
    float32 ``[T, nh, hd]``; angles are computed in float64 as the twin does.
    """
    x = frozen(x, np.float32)
    pos = frozen(np.asarray(positions, np.int64).reshape(-1))
    out = np.empty(x.shape, np.float32)
    _rope(x, pos, np.float64(theta), out)
    return out


# ----------------------------------------------------------------------------- attention


@njit(**PFAST)
def _attention(q, k, v, start, window, htab, out):
    T, H, hd = q.shape
    KV = k.shape[1]
    rep = H // KV
    scale = np.float32(math.sqrt(hd))
    for th in prange(T * H):
        t = th // H
        h = th % H
        kh = h // rep
        p = start + t  # this query's position; keys 0..p are visible
        lo = 0
        if window > 0:
            lo = max(0, p - window + 1)
        n = p + 1 - lo
        s = np.empty(n, np.float32)
        m = np.float32(-np.inf)
        for j in range(n):
            acc = np.float32(0)
            for i in range(hd):
                acc += q[t, h, i] * _widen(k[lo + j, kh, i], htab)
            acc = acc / scale
            s[j] = acc
            if acc > m:
                m = acc
        tot = np.float32(0)
        for j in range(n):
            e = np.float32(math.exp(s[j] - m))
            s[j] = e
            tot += e
        for i in range(hd):
            out[t, h, i] = 0
        for j in range(n):
            pj = s[j] / tot
            for i in range(hd):
                out[t, h, i] += pj * _widen(v[lo + j, kh, i], htab)


def _cache_view(c: np.ndarray) -> np.ndarray:
    if c.dtype == np.float16:
        return frozen(c).view(np.uint16)
    return frozen(c, np.float32)


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    window: int | None = None,
) -> np.ndarray:
    """Causal grouped-query attention over a KV cache.

    Parameters
    ----------
    q : float32 ``[T, H, hd]`` for positions ``start .. start+T-1``.
    k_cache, v_cache : ``[S, KV, hd]`` (``S >= start+T``; rows past that are
        ignored). float32 and float16 are read in place; other dtypes are
        widened to float32 first.
    start : position of ``q[0]``.
    window : a query at position ``p`` sees keys at positions ``> p - window``;
        ``None`` for no window.

    Returns
    -------
    float32 ``[T, H, hd]``
    """
    q = frozen(q, np.float32)
    T, H, hd = q.shape
    S = start + T
    k, v = _cache_view(k_cache[:S]), _cache_view(v_cache[:S])
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads is not a multiple of {k.shape[1]} kv heads")
    if k.shape[0] < S or v.shape[0] < S:
        raise ValueError(f"KV cache holds {k.shape[0]} positions, need {S}")
    out = np.empty((T, H, hd), np.float32)
    w = 0 if window is None else int(window)
    work = T * H * S * hd  # upper bound of the multiply-adds
    args = (q, k, v, int(start), w, HALF_TABLE, out)
    call_sized(work, MIN_PARALLEL_MACS, _attention, *args)
    return out


# ----------------------------------------------------------------------------- elementwise


@njit(**FAST)
def _silu_mul(gu, out):
    T, F = out.shape
    for t in range(T):
        for i in range(F):
            g = gu[t, i]
            out[t, i] = (g / (np.float32(1) + np.float32(math.exp(-g)))) * gu[t, F + i]


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[..., 2F]`` -> ``[..., F]``."""
    gu = np.asarray(gate_up, np.float32)
    F = gu.shape[-1] // 2
    g2 = frozen(gu.reshape(-1, 2 * F))
    out = np.empty((g2.shape[0], F), np.float32)
    with np.errstate(over="ignore"):
        _silu_mul(g2, out)
    return out.reshape(gu.shape[:-1] + (F,))


@njit(**FAST)
def _softmax(x, out):
    T, N = x.shape
    for t in range(T):
        m = x[t, 0]
        for i in range(1, N):
            if x[t, i] > m:
                m = x[t, i]
        tot = np.float32(0)
        for i in range(N):
            e = np.float32(math.exp(x[t, i] - m))
            out[t, i] = e
            tot += e
        for i in range(N):
            out[t, i] /= tot


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis: float32 of ``x``'s shape."""
    x = np.asarray(x, np.float32)
    x2 = frozen(x.reshape(-1, x.shape[-1]))
    out = np.empty(x2.shape, np.float32)
    _softmax(x2, out)
    return out.reshape(x.shape)


@njit(**FAST)
def _topk(x, k, idx, val):
    T, N = x.shape
    for t in range(T):
        for r in range(k):
            best = -1
            for i in range(N):
                taken = False
                for j in range(r):
                    if idx[t, j] == i:
                        taken = True
                if taken:
                    continue
                if best < 0 or x[t, i] > x[t, best]:  # strict: ties to the lower index
                    best = i
            idx[t, r] = best
            val[t, r] = x[t, best]


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest along the last axis, by value descending, ties to the
    lower index (a stable sort of ``-x``).

    Returns
    -------
    (int64 indices, values) each ``[..., k]``; values keep ``x``'s dtype.
    """
    x = np.asarray(x)
    N = x.shape[-1]
    if not 0 < k <= N:
        raise ValueError(f"top-k with k={k} over {N} values")
    x2 = frozen(x.reshape(-1, N))
    idx = np.empty((x2.shape[0], k), np.int64)
    val = np.empty((x2.shape[0], k), x.dtype)
    _topk(x2, k, idx, val)
    return idx.reshape(x.shape[:-1] + (k,)), val.reshape(x.shape[:-1] + (k,))
