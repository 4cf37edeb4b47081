"""q4/q8 encodings: ggml-exact quantizers, error bounds, layouts, refusals.

The reference quantizers below are written block by block from ggml's C
(``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``), in float32 scalars as C
does, independently of ``mer_cli.formats.quant``'s vectorized code.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer_cli.errors import UnsupportedError
from mer_cli.formats import quant

F32 = np.float32


def ref_q4_block(x: np.ndarray) -> tuple[np.ndarray, np.float16]:
    """ggml quantize_row_q4_0_ref for one block of 32: (16 bytes, fp16 scale)."""
    amax, vmax = F32(0), F32(0)
    for v in x:
        if amax < abs(v):
            amax, vmax = abs(v), v
    d = F32(vmax / F32(-8))
    inv = F32(1) / d if d else F32(0)
    out = np.zeros(16, np.uint8)
    for j in range(16):
        x0 = F32(x[j] * inv)
        x1 = F32(x[16 + j] * inv)
        q0 = min(15, int(F32(x0 + F32(8.5))))  # (int8_t) truncates toward zero
        q1 = min(15, int(F32(x1 + F32(8.5))))
        out[j] = q0 | (q1 << 4)
    return out, np.float16(d)


def ref_q8_block(x: np.ndarray) -> tuple[np.ndarray, np.float16]:
    """ggml quantize_row_q8_0_ref for one block of 32: (32 int8, fp16 scale)."""
    amax = max((abs(v) for v in x), default=F32(0))
    d = F32(amax / F32(127))
    inv = F32(1) / d if d else F32(0)
    q = np.array([int(np.round(F32(v * inv))) for v in x])  # roundf: half away
    # np.round is half-to-even; fix the exact halves to C's roundf
    for i, v in enumerate(x):
        t = F32(v * inv)
        if abs(t - np.trunc(t)) == 0.5:
            q[i] = int(np.trunc(t) + np.sign(t))
    return q.astype(np.int8), np.float16(d)


def ref_quantize(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = w.shape
    per = 16 if dtype == "q4" else 32
    packed = np.zeros((rows, cols // 32 * per), np.uint8 if dtype == "q4" else np.int8)
    scales = np.zeros((rows, cols // 32), np.float16)
    for r in range(rows):
        for g in range(cols // 32):
            blk = w[r, 32 * g : 32 * g + 32]
            p, d = ref_q4_block(blk) if dtype == "q4" else ref_q8_block(blk)
            packed[r, per * g : per * g + per] = p
            scales[r, g] = d
    return packed, scales


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=F32)


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (16, 256)])
def test_q4_matches_the_ggml_reference_bit_for_bit(shape):
    w = gaussian(*shape, seed=shape[1])
    w[0, :32] = 0  # an all-zero group
    if shape[0] > 1:
        w[1, 5] = -w[1, :32].__abs__().max() * 3  # negative extreme sets the sign
    if shape[0] > 4:
        w[2, :32], w[3, :32], w[4, :32] = 0.25, -0.25, -0.0
        w[2, 3], w[2, 9] = 2, -2  # +a and -a tie: the first one wins
        w[3, 3], w[3, 9] = -2, 2
    packed, scales = quant.quantize_q4(w)
    rp, rs = ref_quantize(w, "q4")
    np.testing.assert_array_equal(packed, rp)
    np.testing.assert_array_equal(scales.view(np.uint16), rs.view(np.uint16))


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (16, 256)])
def test_q8_matches_the_ggml_reference_bit_for_bit(shape):
    w = gaussian(*shape, seed=shape[1] + 1)
    w[-1, -32:] = 0
    if shape[0] > 2:
        w[1, :32] = -0.0
    # exact halves after scaling exercise roundf's half-away-from-zero
    w[0, :4] = [127.0, 0.5, -0.5, 2.5]
    q, scales = quant.quantize_q8(w)
    rq, rs = ref_quantize(w, "q8")
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(scales.view(np.uint16), rs.view(np.uint16))


def test_q4_q8_agree_with_gguf_package():
    """gguf-py's own Q4_0/Q8_0 quantizer gives the same blocks (d, then data)."""
    from gguf import GGMLQuantizationType, quants

    w = gaussian(8, 128, seed=5)
    for dtype, qt, per in (
        ("q4", GGMLQuantizationType.Q4_0, 16),
        ("q8", GGMLQuantizationType.Q8_0, 32),
    ):
        packed, scales = quant.quantize_q4(w) if dtype == "q4" else quant.quantize_q8(w)
        blocks = quants.quantize(w, qt).reshape(8, 4, 2 + per)
        np.testing.assert_array_equal(
            blocks[..., :2].copy().view("<f2")[..., 0].view(np.uint16),
            scales.view(np.uint16),
        )
        np.testing.assert_array_equal(
            blocks[..., 2:].reshape(8, -1), packed.view(np.uint8)
        )


# ------------------------------------------------------------------ error bounds


def test_q4_round_trip_error_bound_on_gaussian_weights():
    w = gaussian(64, 512, seed=1)
    packed, scales = quant.quantize_q4(w)
    back = quant.dequantize_q4(packed, scales)
    g = w.reshape(64, 16, 32)
    idx = np.abs(g).argmax(axis=2)
    d = np.take_along_axis(g, idx[..., None], axis=2)[..., 0] / F32(-8)  # f32 scale
    d16 = scales.astype(F32)
    # fp16 rounding of the scale: relative error <= 2^-11, times |q - 8| <= 8
    fp16_term = np.abs(d - d16)[..., None] * 8
    assert np.all(np.abs(d - d16) <= np.abs(d) * 2.0**-11)
    err = np.abs(back.reshape(g.shape) - g)
    t = g / d[..., None]  # in [-8, 8]
    # rounding error |scale|/2; values with t > 7.5 clamp to q = 15 (the value
    # opposite the extreme, Q4_0's known asymmetry) and err up to |scale|
    bound = np.abs(d)[..., None] * np.maximum(0.5, t - 7) + fp16_term + 1e-6
    assert np.all(err <= bound)
    plain = t <= 7.5
    half = np.broadcast_to(np.abs(d)[..., None] / 2 + fp16_term + 1e-6, err.shape)
    assert np.all(err[plain] <= half[plain])
    assert plain.mean() > 0.99
    # and the overall quality one expects from 4 bits on a Gaussian
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert 0.05 < rel < 0.15


def test_q8_round_trip_error_bound_on_gaussian_weights():
    w = gaussian(64, 512, seed=2)
    q, scales = quant.quantize_q8(w)
    back = quant.dequantize_q8(q, scales)
    g = w.reshape(64, 16, 32)
    d = np.abs(g).max(axis=2) / F32(127)
    d16 = scales.astype(F32)
    assert np.all(np.abs(d - d16) <= d * 2.0**-11)
    err = np.abs(back.reshape(g.shape) - g)
    bound = d[..., None] / 2 + np.abs(d - d16)[..., None] * 127 + 1e-6
    assert np.all(err <= bound)
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < 0.01


def test_all_zero_groups_give_zero_scales_and_values():
    w = np.zeros((3, 64), F32)
    w[1, 32:] = gaussian(1, 32)[0]
    for dtype in ("q4", "q8"):
        t = quant.view(quant.encode(w, dtype), dtype, w.shape)
        assert t.scales[0, 0] == 0 and t.scales[2, 1] == 0 and t.scales[1, 1] != 0
        back = t.dequantize()
        assert (
            np.all(back[0] == 0) and np.all(back[2] == 0) and np.all(back[1, :32] == 0)
        )
        assert np.all(np.isfinite(back))
    p, _ = quant.quantize_q4(np.zeros((1, 32), F32))
    assert np.all(p == 0x88)  # q = 8 in both nibbles: value 0


# ------------------------------------------------------------------ layout, dtypes


@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_encode_layout_and_view_round_trip(dtype):
    w = gaussian(5, 96, seed=9)
    buf = quant.encode(w, dtype)
    lay = quant.qlayout(dtype, w.shape)
    packed_n = 5 * 96 // (2 if dtype == "q4" else 1)
    assert lay.packed_nbytes == packed_n
    assert lay.scales_offset == -(-packed_n // 64) * 64
    assert buf.nbytes == lay.nbytes == quant.tensor_nbytes(dtype, w.shape)
    assert lay.nbytes == lay.scales_offset + 5 * 3 * 2
    assert not buf[packed_n : lay.scales_offset].any()  # padding is zero
    t = quant.view(buf, dtype, w.shape)
    assert t.shape == w.shape
    p, s = quant.quantize_q4(w) if dtype == "q4" else quant.quantize_q8(w)
    np.testing.assert_array_equal(t.packed, p)
    np.testing.assert_array_equal(t.scales, s)
    np.testing.assert_array_equal(
        quant.to_float(t, dtype),
        (quant.dequantize_q4 if dtype == "q4" else quant.dequantize_q8)(p, s),
    )


def test_q4_nibble_order_is_ggml():
    # column j in the low nibble of byte j, column j+16 in the high nibble
    w = np.zeros((1, 32), F32)
    w[0, 0] = -8.0  # the extreme: scale 1, q = 0
    w[0, 16] = 7.0  # q = 15
    w[0, 1] = 1.0  # q = 9
    packed, scales = quant.quantize_q4(w)
    assert scales[0, 0] == 1.0
    assert packed[0, 0] == 0x00 | (15 << 4)
    assert packed[0, 1] == 9 | (8 << 4)


def test_float_encodings_round_trip():
    w = gaussian(4, 40, seed=4)
    f32 = quant.view(quant.encode(w, "f32"), "f32", w.shape)
    np.testing.assert_array_equal(f32, w)
    f16 = quant.view(quant.encode(w, "f16"), "f16", w.shape)
    np.testing.assert_array_equal(f16, w.astype(np.float16))
    bf = quant.view(quant.encode(w, "bf16"), "bf16", w.shape)
    back = quant.to_float(bf, "bf16")
    assert np.all(np.abs(back - w) <= np.abs(w) * 2.0**-8)
    # round to nearest even on the bit pattern
    x = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, np.nan, -0.0], F32)
    bits = quant.f32_to_bf16(x)
    assert list(bits[:3]) == [0x3F80, 0x3F80, 0x3F82]
    assert bits[3] == 0x7FC0 and bits[4] == 0x8000


def test_columns_not_a_multiple_of_32_are_refused():
    w = np.zeros((4, 48), F32)
    for dtype in ("q4", "q8"):
        with pytest.raises(UnsupportedError) as e:
            quant.encode(w, dtype, "layers.0.q")
        assert str(e.value) == (
            "layers.0.q: shape [4, 48] has 48 columns, not a multiple of the group "
            "size 32; store it as f16/f32 (--experts f16 / --dense f16)"
        )
    with pytest.raises(UnsupportedError, match="q4 needs a 2-D tensor, got shape"):
        quant.encode(np.zeros(64, F32), "q4", "final_norm")
    with pytest.raises(UnsupportedError, match="dtype 'q3' is not one of"):
        quant.check_shape("q3", (4, 32), "x")
    # float encodings take any shape
    assert quant.encode(w, "f16").nbytes == 4 * 48 * 2
