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

q4/q8 products run on the fastest path the CPU has (``vnni512``, ``avx2``,
``generic``; :mod:`mer_cli.kernels.cpu`, override with ``MER_KERNEL_PATH``).
``quantize_input(x)`` quantizes activations once for several matrices
(``linear(w, qa)``). ``set_threads(n)`` sets the parallel kernels' thread count
(default: all cores). The numpy twins that define the semantics live in
``tests/naive.py``.
"""

from __future__ import annotations

import numpy as np

from mer_cli.formats.quant import QTensor, bf16_to_f32
from mer_cli.kernels import q4 as _q4
from mer_cli.kernels import q8 as _q8
from mer_cli.kernels.config import (
    MIN_PARALLEL_MACS,
    call_sized,
    frozen,
    get_threads,
    set_threads,
)
from mer_cli.kernels.cpu import best_path, check_path, supported_paths
from mer_cli.kernels.ops import attention, rms_norm, rope, silu_mul, softmax, topk
from mer_cli.kernels.q4 import QuantizedActivation, quantize_input

__all__ = [
    "QuantizedActivation",
    "attention",
    "best_path",
    "get_threads",
    "linear",
    "quantize_activation",
    "quantize_input",
    "rms_norm",
    "rope",
    "set_threads",
    "silu_mul",
    "softmax",
    "supported_paths",
    "topk",
]

_ROW_BLOCK_BYTES = 1 << 20  # f16/bf16 weights are widened this many f32 bytes at a time
# Up to this many rows, float weights multiply one row at a time (BLAS gemv) so
# that row t of linear(w, x) is bit-identical to linear(w, x[t]): a speculative
# verification pass (or a decode batch) gives exactly the logits of one-token
# steps. BLAS gemm sums in another order than gemv. Longer inputs (prefill) use
# gemm. q4/q8 kernels are row-invariant up to this many rows (_group_block).
ROW_INVARIANT_ROWS = 32


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0-quantize activations per group of 32: int8 ``[T, C]``, f32 ``[T, C/32]``.

    ``d = max|x| / 127`` and ``q = roundf(x / d)`` (ggml's ``quantize_row_q8_0``);
    :func:`quantize_input` returns the same numbers plus the kernels' layouts.
    """
    qa = quantize_input(np.atleast_2d(x))
    return qa.q, qa.d


#: activation bytes per group of 32 columns per token that a kernel streams
#: (q4: lo, hi, corr, dl = 64 B; q8: q, d = 36 B) and the L2 share they may use
_X_BYTES = {"q4": 64, "q8": 36}
_L2_BUDGET = 192 << 10


def _group_block(dtype: str, T: int, G: int, multiple: int) -> int:
    """Groups per column block so all ``T`` tokens' activations fit in L2.

    Up to ``ROW_INVARIANT_ROWS`` tokens all columns are one block: each block's
    partial sum is added to the row's total, so boundaries that moved with T
    would round differently and row t would depend on the rows beside it
    (measured: Mixtral's down projection, 14336 columns, from 7 rows on). One
    block measured no slower at 8-32 rows (2 threads, AVX2).
    """
    if T <= ROW_INVARIANT_ROWS:
        return max(G, multiple)
    gb = max(multiple, _L2_BUDGET // (_X_BYTES[dtype] * T))
    return min(gb - gb % multiple, max(G, multiple))


def _run_quantized(w: QTensor, qa: QuantizedActivation, out: np.ndarray, path: str):
    packed = frozen(w.packed)
    scales = frozen(w.scales).view(np.uint16)
    T, G = qa.d.shape
    work = T * G * 32 * packed.shape[0]  # multiply-adds
    if w.dtype == "q4":
        if path == "generic":
            args = (packed, scales, qa.q, qa.d, qa.gsum, _q4.HALF_TABLE, out)
            call_sized(work, MIN_PARALLEL_MACS, _q4.q4_generic, *args)
            return
        fn = _q4.q4_avx2 if path == "avx2" else _q4.q4_vnni512
        gb = _group_block("q4", T, G, 8 if path == "avx2" else 4)
        args = (packed, scales, qa.lo, qa.hi, qa.corr, qa.dl, qa.q, qa.d, qa.gsum,
                _q4.HALF_TABLE, gb, out)  # fmt: skip
    elif path == "generic":
        fn = _q8.q8_generic
        args = (packed, scales, qa.q, qa.d, _q4.HALF_TABLE, out)
    else:
        fn = _q8.q8_avx2 if path == "avx2" else _q8.q8_vnni512
        args = (packed, scales, qa.q, qa.d, _group_block("q8", T, G, 2), out)
    call_sized(work, MIN_PARALLEL_MACS, fn, *args)


def _out_array(out, T: int, R: int, vector: bool) -> np.ndarray:
    if out is None:
        return np.empty((T, R), np.float32)
    shape = (R,) if vector else (T, R)
    if (
        out.shape != shape
        or out.dtype != np.float32
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writeable C-contiguous float32 array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    return out.reshape(T, R)


def linear(w, x, out: np.ndarray | None = None, path: str | None = None) -> np.ndarray:
    """``x @ w.T``: activations times a weight matrix stored as in the store.

    Parameters
    ----------
    w : QTensor (q4/q8) ``[R, C]``, or ndarray ``[R, C]`` f32/f16, or ``uint16``
        bf16 bit patterns. Read-only buffers (memmaps, slabs) are fine.
    x : float ``[T, C]`` or ``[C]``, or a :class:`QuantizedActivation` from
        :func:`quantize_input` (q4/q8 only: quantize once, multiply by several
        matrices).
    out : float32 ``[T, R]`` (``[R]`` for a vector ``x``), optional; written and
        returned.
    path : ``"vnni512"``, ``"avx2"`` or ``"generic"``; default
        :func:`~mer_cli.kernels.cpu.best_path`.

    Returns
    -------
    float32 ``[T, R]`` (``[R]`` when ``x`` is 1-D).

    For q4/q8 weights the activations are quantized to int8 per group of 32
    (ggml Q8_0) and the group dot products are exact integers.
    """
    if isinstance(w, QTensor):
        qa = x if isinstance(x, QuantizedActivation) else quantize_input(x)
        R, C = w.shape
        T, Cx = qa.shape
        if Cx != C:
            raise ValueError(
                f"activation has {Cx} columns, weight [{R}, {C}] needs {C}"
            )
        res = _out_array(out, T, R, qa.vector)
        _run_quantized(w, qa, res, check_path(path) if path else best_path())
        return (
            res[0] if qa.vector and out is None else (out if out is not None else res)
        )
    if isinstance(x, QuantizedActivation):
        raise TypeError("a QuantizedActivation only multiplies q4/q8 weights")
    vector = np.ndim(x) == 1
    x2 = np.atleast_2d(np.asarray(x, np.float32))
    R, C = w.shape
    T = x2.shape[0]
    res = _out_array(out, T, R, vector)
    by_row = T <= ROW_INVARIANT_ROWS
    if w.dtype == np.float32:
        if by_row:
            for t in range(T):
                np.dot(w, x2[t], out=res[t])
        else:
            np.dot(x2, w.T, out=res)
    else:
        step = max(1, _ROW_BLOCK_BYTES // (4 * C))
        for r0 in range(0, R, step):
            blk = w[r0 : r0 + step]
            wf = bf16_to_f32(blk) if w.dtype == np.uint16 else blk.astype(np.float32)
            if by_row:
                for t in range(T):
                    res[t, r0 : r0 + step] = wf @ x2[t]
            else:
                res[:, r0 : r0 + step] = x2 @ wf.T
    if out is not None:
        return out
    return res[0] if vector else res
