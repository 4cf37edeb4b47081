"""q8 (int8, group 32, fp16 scales) products over a :class:`QuantizedActivation`.

``out[t, r] = sum_g s[r, g] * d[t, g] * sum_j w[r, 32g+j] * xq[t, 32g+j]`` with
exact integer inner sums. Paths as in :mod:`mer_cli.kernels.q4`: ``generic``
(float arithmetic on integer values, exact), ``avx2`` (|w| x sign(w)x with
``vpmaddubsw``, one group per step), ``vnni512`` (the same with ``vpdpbusd``,
two groups per step, the AVX2 step for an odd last group).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mer_cli.kernels.config import PFAST, PJIT
from mer_cli.kernels.llvm_simd import Q8_AVX2, Q8_VNNI

_A11, _A21, _A14, _A24 = (Q8_AVX2[k] for k in ((1, 1), (2, 1), (1, 4), (2, 4)))
_V11, _V21, _V14, _V24 = (Q8_VNNI[k] for k in ((1, 1), (2, 1), (1, 4), (2, 4)))


@njit(**PFAST)
def q8_generic(packed, scales, q, d, htab, out):
    """Portable q8 kernel: ``out[T, R]``."""
    R, C = packed.shape
    T = q.shape[0]
    G = C // 32
    for rb in prange((R + 1) // 2):
        r0 = 2 * rb
        r1 = min(r0 + 1, R - 1)  # odd R: the last row is computed twice
        for t in range(T):
            a0 = np.float32(0)
            a1 = np.float32(0)
            for g in range(G):
                s0 = np.float32(0)
                s1 = np.float32(0)
                for j in range(32 * g, 32 * g + 32):
                    x = np.float32(q[t, j])
                    s0 += np.float32(packed[r0, j]) * x
                    s1 += np.float32(packed[r1, j]) * x
                a0 += s0 * (htab[scales[r0, g]] * d[t, g])
                a1 += s1 * (htab[scales[r1, g]] * d[t, g])
            out[t, r0] = a0
            out[t, r1] = a1


@njit(**PJIT)
def q8_avx2(packed, scales, q, d, gblock, out):
    """AVX2 q8 kernel: ``out[T, R]``; columns ``gblock`` groups at a time (see
    :func:`mer_cli.kernels.q4.q4_avx2`)."""
    R = packed.shape[0]
    T = q.shape[0]
    G = scales.shape[1]
    out[:] = 0
    for g0 in range(0, G, gblock):
        n = min(g0 + gblock, G) - g0
        for rb in prange((R + 1) // 2):
            r = 2 * rb
            t = 0
            if r + 1 < R:
                while t + 4 <= T:
                    v = _A24(packed, scales, r, q, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v[u]
                        out[t + u, r + 1] += v[4 + u]
                    t += 4
                while t < T:
                    v2 = _A21(packed, scales, r, q, d, t, g0, n)
                    out[t, r] += v2[0]
                    out[t, r + 1] += v2[1]
                    t += 1
            else:
                while t + 4 <= T:
                    v4 = _A14(packed, scales, r, q, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v4[u]
                    t += 4
                while t < T:
                    out[t, r] += _A11(packed, scales, r, q, d, t, g0, n)[0]
                    t += 1


@njit(**PJIT)
def q8_vnni512(packed, scales, q, d, gblock, out):
    """AVX-512 VNNI q8 kernel: ``out[T, R]``; ``gblock`` even; an odd last
    group goes through the AVX2 step."""
    R = packed.shape[0]
    T = q.shape[0]
    G = scales.shape[1]
    G2 = G - G % 2
    out[:] = 0
    for g0 in range(0, G2, gblock):
        n = (min(g0 + gblock, G2) - g0) // 2
        for rb in prange((R + 1) // 2):
            r = 2 * rb
            t = 0
            if r + 1 < R:
                while t + 4 <= T:
                    v = _V24(packed, scales, r, q, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v[u]
                        out[t + u, r + 1] += v[4 + u]
                    t += 4
                while t < T:
                    v2 = _V21(packed, scales, r, q, d, t, g0, n)
                    out[t, r] += v2[0]
                    out[t, r + 1] += v2[1]
                    t += 1
            else:
                while t + 4 <= T:
                    v4 = _V14(packed, scales, r, q, d, t, g0, n)
                    for u in range(4):
                        out[t + u, r] += v4[u]
                    t += 4
                while t < T:
                    out[t, r] += _V11(packed, scales, r, q, d, t, g0, n)[0]
                    t += 1
    if G % 2:
        for r in prange(R):
            for t in range(T):
                out[t, r] += _A11(packed, scales, r, q, d, t, G - 1, 1)[0]
