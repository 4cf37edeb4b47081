"""The numba weight quantizer used by ``mer quantize`` against its numpy twin
(``formats/quant.py``, itself checked bit for bit against ggml's reference)."""

import numpy as np
import pytest

from mer_cli.formats import quant
from mer_cli.kernels.quantize import quantize_rows


def awkward_rows(rng, rows=24, cols=160):
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # all-zero group
    w[1, :32] = -0.0
    w[2, :32] = 0.5  # ties: +a and -a of the same magnitude, first one wins
    w[2, 7] = -0.5
    w[3, 32:64] = np.float32(60000.0)  # scale near the fp16 maximum
    w[4, 64:96] = np.float32(1e-30)  # scale underflows to an fp16 subnormal/zero
    w[5, ::3] *= -1000
    return w


@pytest.mark.parametrize("dtype", ["q4", "q8"])
@pytest.mark.parametrize("src", ["f32", "bf16"])
def test_matches_numpy_twin_bit_for_bit(dtype, src):
    w = awkward_rows(np.random.default_rng(3))
    raw = w if src == "f32" else quant.f32_to_bf16(w)
    wf = w if src == "f32" else quant.bf16_to_f32(raw)
    rows, cols = w.shape
    packed = np.empty((rows, cols // 2 if dtype == "q4" else cols), np.uint8)
    if dtype == "q8":
        packed = packed.view(np.int8)
    scales = np.empty((rows, cols // 32), np.float16)
    assert quantize_rows(raw, dtype, packed, scales) is None
    want_p, want_s = (quant.quantize_q4 if dtype == "q4" else quant.quantize_q8)(wf)
    np.testing.assert_array_equal(packed, want_p)
    np.testing.assert_array_equal(scales.view(np.uint16), want_s.view(np.uint16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_reports_the_first_non_finite_value(bad):
    w = np.ones((6, 64), np.float32)
    w[4, 40] = bad
    w[5, 1] = bad
    packed = np.empty((6, 32), np.uint8)
    scales = np.empty((6, 2), np.float16)
    assert quantize_rows(w, "q4", packed, scales) == (4, 40)
