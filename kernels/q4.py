"""q4 (ggml Q4_0 order, group 32, fp16 scales) products and activation quantization.

``x`` ``[T, C]`` is quantized once per call to int8 per group of 32 (Q8_0) into a
:class:`QuantizedActivation` that every q4/q8 kernel reads; then for each weight
row ``r`` and token ``t``::

    out[t, r] = sum_g  s[r, g] * d[t, g] * sum_j (nibble[r, 32g+j] - 8) * xq[t, 32g+j]

The inner sums are exact integers; only the per-group float products and their
sum round. Kernels (one per CPU path, see :mod:`mer_cli.kernels.cpu`):

* ``generic``: float arithmetic on the integer values (exact: every partial sum
  is an integer below 2**24), two rows per step, LLVM-vectorized;
* ``avx2``: :data:`~mer_cli.kernels.llvm_simd.Q4_AVX2_G8`, 256 weights per
  step, then the 64-weight step and a scalar group for the columns left over;
* ``vnni512``: :data:`~mer_cli.kernels.llvm_simd.Q4_VNNI`, 128 weights per step,
  the AVX2 step and a scalar group for the columns left over.

Rows are split over threads (``prange``); for ``T > 1`` each pair of rows meets
blocks of 4 tokens while its bytes are in L1, so weights stream from DRAM once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from mer_cli.formats.quant import GROUP
from mer_cli.kernels.config import JIT, PFAST, PJIT, frozen
from mer_cli.kernels.llvm_simd import Q4_AVX2, Q4_AVX2_G8, Q4_VNNI

#: fp16 bit pattern -> float32 (the generic path's scale decoder; 256 KiB)
HALF_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
HALF_TABLE = HALF_TABLE.astype(np.float32)
HALF_TABLE.flags.writeable = False


class QuantizedActivation(NamedTuple):
    """Activations ``[T, C]`` quantized to int8 per group of 32, in the layouts
    the kernels read. Build with :func:`quantize_input`; reuse it for every
    matrix that multiplies the same ``x``.

    Attributes
    ----------
    q : int8 ``[T, C]``
        ``roundf(x / d)``, natural column order.
    d : float32 ``[T, C/32]``
        Per-group scale ``max|x| / 127``.
    gsum : int32 ``[T, C/32]``
        Sum of ``q`` over each group (the q4 offset correction).
    lo, hi : int8 ``[T, C/2]``
        ``lo[t, 16g+j] = q[t, 32g+j]``, ``hi[t, 16g+j] = q[t, 32g+16+j]``: the
        values that meet the low / high nibbles of packed byte ``16g+j``.
    corr : int32 ``[T, C/8]``
        ``-8 *`` the sum of the 4 ``lo`` and 4 ``hi`` bytes of each int32 lane.
    dl : float32 ``[T, C/8]``
        ``d`` of the lane's group (4 lanes per group).
    vector : bool
        ``x`` was 1-D; :func:`~mer_cli.kernels.linear` then returns ``[R]``.
    """

    q: np.ndarray
    d: np.ndarray
    gsum: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    corr: np.ndarray
    dl: np.ndarray
    vector: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


@njit(**JIT)
def _quantize_token(x, t, q, d, gsum, lo, hi, corr, dl):
    # No fastmath: x*inv + 0.5 must round twice in f32, exactly like numpy.
    C = x.shape[1]
    for g in range(C // 32):
        c0 = 32 * g
        amax = np.float32(0)
        for j in range(32):
            a = abs(x[t, c0 + j])
            if a > amax:
                amax = a
        dg = amax / np.float32(127)
        inv = np.float32(1) / dg if dg > 0 else np.float32(0)
        s = 0
        for j in range(32):
            v = x[t, c0 + j] * inv
            h = np.float32(0.5) if v >= 0 else np.float32(-0.5)
            qi = math.trunc(v + h)
            q[t, c0 + j] = qi
            s += qi
        d[t, g] = dg
        gsum[t, g] = s
        for j in range(16):
            lo[t, 16 * g + j] = q[t, c0 + j]
            hi[t, 16 * g + j] = q[t, c0 + 16 + j]
        for lane in range(4):
            c = 0
            for k in range(4):
                c += np.int32(lo[t, 16 * g + 4 * lane + k])
                c += np.int32(hi[t, 16 * g + 4 * lane + k])
            corr[t, 4 * g + lane] = -8 * c
            dl[t, 4 * g + lane] = dg


@njit(**PJIT)
def _quantize_parallel(x, q, d, gsum, lo, hi, corr, dl):
    for t in prange(x.shape[0]):
        _quantize_token(x, t, q, d, gsum, lo, hi, corr, dl)


@njit(**JIT)
def _quantize_serial(x, q, d, gsum, lo, hi, corr, dl):
    # decode: a parallel launch costs more than quantizing one token
    for t in range(x.shape[0]):
        _quantize_token(x, t, q, d, gsum, lo, hi, corr, dl)


_MIN_PARALLEL_VALUES = 1 << 16  # activations quantized on one thread below this


def quantize_input(x: np.ndarray) -> QuantizedActivation:
    """Quantize activations for q4/q8 products (ggml Q8_0 rounding).

    Parameters
    ----------
    x : float ``[T, C]`` or ``[C]``, ``C`` a multiple of 32.

    Returns
    -------
    QuantizedActivation
    """
    vector = np.ndim(x) == 1
    x = frozen(np.atleast_2d(x), np.float32)
    T, C = x.shape
    if C % GROUP:
        raise ValueError(f"activation has {C} columns, not a multiple of {GROUP}")
    G = C // GROUP
    qa = QuantizedActivation(
        np.empty((T, C), np.int8),
        np.empty((T, G), np.float32),
        np.empty((T, G), np.int32),
        np.empty((T, C // 2), np.int8),
        np.empty((T, C // 2), np.int8),
        np.empty((T, C // 8), np.int32),
        np.empty((T, C // 8), np.float32),
        vector,
    )
    # a parallel launch costs more than a few tokens' quantization (ms on a busy
    # machine, measured: ~9 ms per call for 2-6 tokens of a tiny model)
    small = T * C < _MIN_PARALLEL_VALUES
    (_quantize_serial if small else _quantize_parallel)(x, *qa[:7])
    return qa


# ----------------------------------------------------------------------------- q4

# intrinsics as module globals (numba resolves globals, not dict lookups)
_A11, _A21, _A14, _A24 = (Q4_AVX2[k] for k in ((1, 1), (2, 1), (1, 4), (2, 4)))
_V11, _V21, _V14, _V24 = (Q4_VNNI[k] for k in ((1, 1), (2, 1), (1, 4), (2, 4)))
_W11, _W21, _W14, _W24 = (Q4_AVX2_G8[k] for k in ((1, 1), (2, 1), (1, 4), (2, 4)))


@njit(**JIT)
def _q4_group(packed, scales, r, qa_q, qa_d, gsum, t, g, htab):
    """One group's contribution (scalar; tails of the SIMD paths)."""
    s = 0
    for j in range(16):
        b = np.int32(packed[r, 16 * g + j])
        s += (b & 15) * np.int32(qa_q[t, 32 * g + j])
        s += (b >> 4) * np.int32(qa_q[t, 32 * g + 16 + j])
    s -= 8 * gsum[t, g]
    return np.float32(s) * (htab[scales[r, g]] * qa_d[t, g])


@njit(**PFAST)
def q4_generic(packed, scales, q, d, gsum, htab, out):
    """Portable q4 kernel: ``out[T, R]``; see the module docstring."""
    R, half = packed.shape
    T = q.shape[0]
    G = half // 16
    m15 = np.int32(15)
    s4 = np.int32(4)
    for rb in prange((R + 1) // 2):
        r0 = 2 * rb
        r1 = min(r0 + 1, R - 1)  # odd R: the last row is computed twice
        for t in range(T):
            a0 = np.float32(0)
            a1 = np.float32(0)
            for g in range(G):
                s0 = np.float32(0)
                s1 = np.float32(0)
                for j in range(16):
                    xl = np.float32(q[t, 32 * g + j])
                    xh = np.float32(q[t, 32 * g + 16 + j])
                    b0 = np.int32(packed[r0, 16 * g + j])
                    b1 = np.int32(packed[r1, 16 * g + j])
                    s0 += np.float32(b0 & m15) * xl + np.float32(b0 >> s4) * xh
                    s1 += np.float32(b1 & m15) * xl + np.float32(b1 >> s4) * xh
                c = np.float32(8 * gsum[t, g])
                a0 += (s0 - c) * (htab[scales[r0, g]] * d[t, g])
                a1 += (s1 - c) * (htab[scales[r1, g]] * d[t, g])
            out[t, r0] = a0
            out[t, r1] = a1


@njit(**PJIT)
def q4_avx2(packed, scales, lo, hi, corr, dl, q, d, gsum, htab, gblock, out):
    """AVX2 q4 kernel: ``out[T, R]``; see the module docstring.

    Columns are taken ``gblock`` groups at a time (a multiple of 8) so that
    the activations of all ``T`` tokens for one block stay in L2 while every
    row meets them; ``gblock >= G`` is one pass. Groups past the last multiple
    of 8 go through the 2-group step and the scalar step.
    """
    R = packed.shape[0]
    T = lo.shape[0]
    G = scales.shape[1]
    G8 = G - G % 8
    out[:] = 0
    for g0 in range(0, G8, gblock):
        n = (min(g0 + gblock, G8) - g0) // 8  # chunks of 8 groups
        if T < 4:  # decode: one row per step streams best from DRAM (measured)
            for r in prange(R):
                for t in range(T):
                    out[t, r] += _W11(packed, scales, r, lo, hi, gsum, d, t, g0, n)[0]
            continue
        for rb in prange((R + 1) // 2):
            r = 2 * rb
            t = 0
            if r + 1 < R:
                while t + 4 <= T:
                    v = _W24(packed, scales, r, lo, hi, gsum, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v[u]
                        out[t + u, r + 1] += v[4 + u]
                    t += 4
                while t < T:
                    v2 = _W21(packed, scales, r, lo, hi, gsum, d, t, g0, n)
                    out[t, r] += v2[0]
                    out[t, r + 1] += v2[1]
                    t += 1
            else:
                while t + 4 <= T:
                    v4 = _W14(packed, scales, r, lo, hi, gsum, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v4[u]
                    t += 4
                while t < T:
                    out[t, r] += _W11(packed, scales, r, lo, hi, gsum, d, t, g0, n)[0]
                    t += 1
    if G > G8:
        n2 = (G - G8) // 2
        for r in prange(R):
            for t in range(T):
                acc = np.float32(0)
                if n2:
                    acc += _A11(packed, scales, r, lo, hi, corr, dl, t, G8, n2)[0]
                if G % 2:
                    acc += _q4_group(packed, scales, r, q, d, gsum, t, G - 1, htab)
                out[t, r] += acc


@njit(**PJIT)
def q4_vnni512(packed, scales, lo, hi, corr, dl, q, d, gsum, htab, gblock, out):
    """AVX-512 VNNI q4 kernel: ``out[T, R]``; ``gblock`` (a multiple of 4) as
    in :func:`q4_avx2`. Groups past the last multiple of 4 go through the AVX2
    step (2 groups) and the scalar step (1 group)."""
    R = packed.shape[0]
    T = lo.shape[0]
    G = scales.shape[1]
    G4 = G - G % 4
    out[:] = 0
    for g0 in range(0, G4, gblock):
        n = (min(g0 + gblock, G4) - g0) // 4  # chunks of 4 groups
        if T < 4:  # decode: one row per step (the calibration's fastest variant)
            for r in prange(R):
                for t in range(T):
                    out[t, r] += _V11(packed, scales, r, lo, hi, corr, dl, t, g0, n)[0]
            continue
        for rb in prange((R + 1) // 2):
            r = 2 * rb
            t = 0
            if r + 1 < R:
                while t + 4 <= T:
                    v = _V24(packed, scales, r, lo, hi, corr, dl, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v[u]
                        out[t + u, r + 1] += v[4 + u]
                    t += 4
                while t < T:
                    v2 = _V21(packed, scales, r, lo, hi, corr, dl, t, g0, n)
                    out[t, r] += v2[0]
                    out[t, r + 1] += v2[1]
                    t += 1
            else:
                while t + 4 <= T:
                    v4 = _V14(packed, scales, r, lo, hi, corr, dl, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v4[u]
                    t += 4
                while t < T:
                    out[t, r] += _V11(packed, scales, r, lo, hi, corr, dl, t, g0, n)[0]
                    t += 1
    if G > G4:
        n2 = (G - G4) // 2
        for r in prange(R):
            for t in range(T):
                acc = np.float32(0)
                if n2:
                    acc += _A11(packed, scales, r, lo, hi, corr, dl, t, G4, n2)[0]
                if G % 2:
                    acc += _q4_group(packed, scales, r, q, d, gsum, t, G - 1, htab)
                out[t, r] += acc
