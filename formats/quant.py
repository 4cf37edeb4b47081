"""Tensor encodings of the store and their numpy (reference) quantizers.

Every 2-D quantized tensor of shape ``[rows, cols]`` is quantized along ``cols``
in groups of ``GROUP`` = 32 with one fp16 scale per group, and laid out planar:

* ``q4``: packed ``uint8 [rows, cols/2]`` -- for group ``g`` of a row, byte
  ``16*g + j`` holds column ``32*g + j`` in its low nibble and column
  ``32*g + 16 + j`` in its high nibble (ggml Q4_0 order); value
  ``= scale * (nibble - 8)``.
* ``q8``: ``int8 [rows, cols]``; value ``= scale * q``.

followed by the scales ``float16 [rows, cols/32]`` starting at the next multiple
of 64 bytes. ``f32``/``f16``/``bf16`` tensors are plain row-major little-endian.
Quantizers follow ggml's ``quantize_row_q4_0_ref`` / ``q8_0_ref`` exactly, so a
GGUF Q4_0/Q8_0 tensor and ours hold the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mer_cli.errors import UnsupportedError

GROUP = 32
SUBALIGN = 64  # alignment of sub-tensors inside an extent or tensor
PAGE = 4096  # alignment of expert extents and data sections

# dtype name -> (numpy dtype of the payload or None for quantized, bits per weight)
DTYPES = {"f32": 32, "f16": 16, "bf16": 16, "q8": 8, "q4": 4}
QUANTIZED = ("q4", "q8")


def align(n: int, a: int) -> int:
    """Round ``n`` up to a multiple of ``a``."""
    return (n + a - 1) // a * a


class QLayout(NamedTuple):
    """Byte layout of one quantized tensor: where its parts start inside it."""

    rows: int
    cols: int
    packed_nbytes: int
    scales_offset: int
    nbytes: int


def check_shape(dtype: str, shape: tuple[int, ...], name: str) -> None:
    """Refuse shapes a dtype cannot hold, with a message that names the tensor."""
    if dtype not in DTYPES:
        raise UnsupportedError(
            f"{name}: dtype {dtype!r} is not one of {', '.join(DTYPES)}"
        )
    if dtype in QUANTIZED:
        if len(shape) != 2:
            raise UnsupportedError(
                f"{name}: {dtype} needs a 2-D tensor, got shape {list(shape)}; "
                "1-D tensors are stored as f32"
            )
        if shape[1] % GROUP:
            raise UnsupportedError(
                f"{name}: shape {list(shape)} has {shape[1]} columns, not a multiple "
                f"of the group size {GROUP}; store it as f16/f32 "
                "(--experts f16 / --dense f16)"
            )


def qlayout(dtype: str, shape: tuple[int, ...]) -> QLayout:
    """Layout of a q4/q8 tensor of ``shape`` = ``(rows, cols)``."""
    rows, cols = shape
    packed = rows * cols // 2 if dtype == "q4" else rows * cols
    soff = align(packed, SUBALIGN)
    return QLayout(rows, cols, packed, soff, soff + rows * (cols // GROUP) * 2)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies in the store."""
    if dtype in QUANTIZED:
        return qlayout(dtype, shape).nbytes
    n = int(np.prod(shape, dtype=np.int64))
    return n * DTYPES[dtype] // 8


# ----------------------------------------------------------------- bf16 helpers


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (``uint16``) to ``float32``."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round ``float32`` to bfloat16 bits (``uint16``), round-to-nearest-even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


# ----------------------------------------------------------------- quantizers


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` (f32 ``[rows, cols]``) as ggml Q4_0 does.

    Returns ``packed`` (``uint8 [rows, cols/2]``) and ``scales``
    (``float16 [rows, cols/32]``).
    """
    rows, cols = w.shape
    g = np.asarray(w, dtype=np.float32).reshape(rows, cols // GROUP, GROUP)
    # the signed value of largest magnitude, the first one on ties as in ggml:
    # the larger of max and -min (two fast reductions instead of abs+argmax),
    # with a first-index search only in blocks where +a and -a tie
    mx, mn = g.max(axis=2), g.min(axis=2)
    vmax = np.where(-mn > mx, mn, mx)
    tie = (-mn == mx) & (mx > 0)
    if tie.any():
        sub = g[tie]
        vmax[tie] = sub[np.arange(len(sub)), np.abs(sub).argmax(axis=1)]
    vmax[(mx == 0) & (mn == 0)] = 0  # ggml starts from +0.0 (a -0.0 block too)
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = g * inv[..., None]  # in place from here: one temporary of w's size
    q += np.float32(8.5)
    np.trunc(q, out=q)
    np.minimum(q, 15, out=q)
    q = q.astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(rows, cols // 2), d.astype(np.float16)


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` (f32 ``[rows, cols]``) as ggml Q8_0 does.

    Returns ``q`` (``int8 [rows, cols]``) and ``scales`` (``float16 [rows, cols/32]``).
    """
    rows, cols = w.shape
    g = np.asarray(w, dtype=np.float32).reshape(rows, cols // GROUP, GROUP)
    # max |x| as max(max, -min): two fast reductions, no |g| temporary
    amax = np.abs(np.maximum(g.max(axis=2), -g.min(axis=2)))
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    x = g * inv[..., None]
    x += np.copysign(np.float32(0.5), x)  # roundf: half away from zero
    np.trunc(x, out=x)
    q = x.astype(np.int8)
    return q.reshape(rows, cols), d.astype(np.float16)


def dequantize_q4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_q4`: f32 ``[rows, cols]``."""
    rows, half = packed.shape
    p = packed.reshape(rows, half // 16, 16)
    q = np.concatenate([p & 15, p >> 4], axis=2).astype(np.float32) - 8
    return (q * scales.astype(np.float32)[..., None]).reshape(rows, half * 2)


def dequantize_q8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_q8`: f32 ``[rows, cols]``."""
    rows, cols = q.shape
    g = q.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
    return (g * scales.astype(np.float32)[..., None]).reshape(rows, cols)


# ----------------------------------------------------------------- encode/decode


def encode(w: np.ndarray, dtype: str, name: str = "tensor") -> np.ndarray:
    """Encode a float array as the store's bytes for ``dtype`` (``uint8`` 1-D)."""
    check_shape(dtype, w.shape, name)
    if dtype == "f32":
        return np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint8)
    if dtype == "f16":
        return np.ascontiguousarray(w, dtype="<f2").reshape(-1).view(np.uint8)
    if dtype == "bf16":
        return f32_to_bf16(np.asarray(w, np.float32)).reshape(-1).view(np.uint8)
    packed, scales = quantize_q4(w) if dtype == "q4" else quantize_q8(w)
    return assemble(dtype, packed, scales)


def assemble(dtype: str, packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Lay out already-quantized ``packed`` and fp16 ``scales`` as store bytes."""
    rows = packed.shape[0]
    cols = packed.shape[1] * (2 if dtype == "q4" else 1)
    lay = qlayout(dtype, (rows, cols))
    out = np.zeros(lay.nbytes, np.uint8)
    out[: lay.packed_nbytes] = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)
    out[lay.scales_offset :] = (
        np.ascontiguousarray(scales, dtype="<f2").reshape(-1).view(np.uint8)
    )
    return out


class QTensor(NamedTuple):
    """Zero-copy views of a quantized tensor inside a buffer."""

    dtype: str  # "q4" or "q8"
    packed: np.ndarray  # uint8 [rows, cols/2] (q4) or int8 [rows, cols] (q8)
    scales: np.ndarray  # float16 [rows, cols/32]

    @property
    def shape(self) -> tuple[int, int]:
        rows, n = self.packed.shape
        return (rows, n * 2 if self.dtype == "q4" else n)

    def dequantize(self) -> np.ndarray:
        if self.dtype == "q4":
            return dequantize_q4(self.packed, self.scales)
        return dequantize_q8(self.packed, self.scales)


def view(buf: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray | QTensor:
    """Zero-copy view of store bytes ``buf`` (``uint8``) as a tensor.

    Plain dtypes give an ndarray (``bf16`` gives ``uint16`` bit patterns); q4/q8
    give a :class:`QTensor`.
    """
    if dtype in QUANTIZED:
        lay = qlayout(dtype, shape)
        rows, cols = shape
        pk = buf[: lay.packed_nbytes]
        if dtype == "q4":
            packed = pk.reshape(rows, cols // 2)
        else:
            packed = pk.view(np.int8).reshape(rows, cols)
        scales = buf[lay.scales_offset : lay.nbytes].view("<f2")
        return QTensor(dtype, packed, scales.reshape(rows, cols // GROUP))
    np_dtype = {"f32": "<f4", "f16": "<f2", "bf16": "<u2"}[dtype]
    return buf[: tensor_nbytes(dtype, shape)].view(np_dtype).reshape(shape)


def to_float(t: np.ndarray | QTensor, dtype: str) -> np.ndarray:
    """Dequantize/widen a view from :func:`view` to f32."""
    if isinstance(t, QTensor):
        return t.dequantize()
    if dtype == "bf16":
        return bf16_to_f32(t)
    return t.astype(np.float32)
