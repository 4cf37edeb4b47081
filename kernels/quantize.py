"""Weight quantizers for ``mer quantize``: ggml Q4_0/Q8_0 in one pass per row.

``formats/quant.py`` holds the numpy quantizers (the reference twins); these
produce the same bytes from the checkpoint's raw rows (f32, or bf16 bits as
``uint16``) without an f32 copy or per-group temporaries, and report the first
non-finite value instead of quantizing it. Serial and ``nogil``: the importer
runs one per thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mer_cli.kernels.config import JIT

_8 = np.float32(-8.0)
_85 = np.float32(8.5)
_127 = np.float32(127.0)
_half = np.float32(0.5)


def _load(raw, r, bits, buf):
    """Row ``r`` of ``raw`` as float32 (only called from numba code)."""
    raise NotImplementedError


# Chosen by raw's dtype at compile time. A jitted loader passed as an argument
# instead defeats numba's cache: each process's dispatcher is a new type, so
# every run recompiled and appended an entry, until the index itself failed to
# load ("underlying object has vanished").
@overload(_load)
def _load_impl(raw, r, bits, buf):
    if raw.dtype == types.uint16:

        def load_bf16(raw, r, bits, buf):
            # bf16 bits are the high half of an f32; buf is bits viewed as f32
            for j in range(raw.shape[1]):
                bits[j] = np.uint32(raw[r, j]) << np.uint32(16)
            return buf

        return load_bf16
    return lambda raw, r, bits, buf: raw[r]


@njit(**JIT)
def _first_bad(x):
    for j in range(x.shape[0]):
        if not np.isfinite(x[j]):
            return j
    return -1


@njit(**JIT)
def _q4_rows(raw, packed, d_out, bits, buf):
    n, C = raw.shape
    for r in range(n):
        x = _load(raw, r, bits, buf)
        bad = _first_bad(x)
        if bad >= 0:
            return r, bad
        for g in range(C // 32):
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(32):
                v = x[32 * g + j]
                if amax < abs(v):  # first of equal magnitudes wins, as in ggml
                    amax = abs(v)
                    vmax = v
            d = vmax / _8
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(16):
                lo = min(15, int(x[32 * g + j] * inv + _85))
                hi = min(15, int(x[32 * g + 16 + j] * inv + _85))
                packed[r, 16 * g + j] = np.uint8(lo | (hi << 4))
            d_out[r, g] = d
    return -1, -1


@njit(**JIT)
def _q8_rows(raw, q_out, d_out, bits, buf):
    n, C = raw.shape
    for r in range(n):
        x = _load(raw, r, bits, buf)
        bad = _first_bad(x)
        if bad >= 0:
            return r, bad
        for g in range(C // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[32 * g + j]))
            d = amax / _127
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(32):
                v = x[32 * g + j] * inv
                q_out[r, 32 * g + j] = np.int8(int(v + _half if v >= 0 else v - _half))
            d_out[r, g] = d
    return -1, -1


def quantize_rows(
    raw: np.ndarray, dtype: str, packed: np.ndarray, scales: np.ndarray
) -> tuple[int, int] | None:
    """Quantize ``raw`` rows into ``packed`` and ``scales`` (store layout).

    Parameters
    ----------
    raw : ndarray ``[n, C]``, float32, or uint16 holding bf16 bits
    dtype : ``"q4"`` or ``"q8"``
    packed : uint8 ``[n, C/2]`` (q4) or int8 ``[n, C]`` (q8), written
    scales : float16 ``[n, C/32]``, written

    Returns
    -------
    ``(row, column)`` of the first non-finite value (nothing written from that
    row on), or ``None`` when every value was finite.
    """
    raw = np.ascontiguousarray(raw)
    if raw.dtype not in (np.float32, np.uint16):
        raw = raw.astype(np.float32)
    bits = np.empty(raw.shape[1], np.uint32)
    d = np.zeros(scales.shape, np.float32)
    fn = _q4_rows if dtype == "q4" else _q8_rows
    r, c = fn(raw, packed, d, bits, bits.view(np.float32))
    scales[:] = d.astype(np.float16)  # round-to-nearest-even, as F16C
    return None if r < 0 else (int(r), int(c))
