"""Every kernel path this CPU can run against the numpy twins in tests/naive.py.

Tolerances:

* Activation quantization is compared exactly (same f32 operations in the same
  order, no fastmath).
* q4/q8 products: the per-group integer dot products are exact on every path;
  only the float products ``dot * (s * d)`` and the sum over groups round, in a
  different order than numpy's. With unit roundoff u = 2**-24 and G groups the
  difference is at most about ``(G + 16) * 2u * A`` where ``A = sum_g |s_g d_g|
  sum_j |w_j x_j|`` (the sum of absolute terms); we assert that bound.
* Float ops (norm, rope, softmax, attention): relative 1e-5 / absolute 1e-6 --
  f32 evaluation with a different summation order than numpy's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import naive
import numpy as np
import pytest

from mer_cli import kernels as K
from mer_cli.errors import UnsupportedError
from mer_cli.formats.quant import (
    GROUP,
    QTensor,
    f32_to_bf16,
    quantize_q4,
    quantize_q8,
)
from mer_cli.kernels import cpu

RUNNABLE = cpu.supported_paths()
ALL = [
    pytest.param(
        p,
        marks=pytest.mark.skipif(
            p not in RUNNABLE,
            reason=f"CPU lacks {', '.join(cpu.missing_features(p))} for path {p}",
        ),
    )
    for p in cpu.PATHS
]


def readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


def make_q(dtype: str, w: np.ndarray) -> QTensor:
    p, s = quantize_q4(w) if dtype == "q4" else quantize_q8(w)
    return QTensor(dtype, readonly(p), readonly(s))


def awkward_x(rng, T: int, C: int) -> np.ndarray:
    """Activations with all-zero groups, amax ties and huge/tiny groups."""
    x = rng.standard_normal((T, C)).astype(np.float32)
    G = C // GROUP
    g = x.reshape(T, G, GROUP)
    g[:, 0] = 0  # zero group: d = 0, q = 0
    if G > 1:
        g[:, 1] *= np.float32(1e4)
    if G > 2:
        g[:, 2] *= np.float32(1e-6)
    if G > 3:
        g[:, 3] = np.float32(127)  # every value at amax: q = 127
        g[:, 3, ::2] = np.float32(-127)
    if G > 4:
        g[:, 4] = np.arange(GROUP) - np.float32(15.5)  # halves round away from 0
    return x


def assert_close_to_twin(y, w: QTensor, x: np.ndarray, what: str) -> None:
    """``y`` equals the twin's ``linear(w, x)`` within the bound in the docstring."""
    terms = naive.linear_terms(w, x)
    ref = terms.sum(axis=-1, dtype=np.float64)
    G = terms.shape[-1]
    bound = (G + 16) * 2.0**-23 * abs_terms(w, x).sum(axis=-1)
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound + 1e-30), (
        f"{what}: max err {err.max():.3e}, bound there {bound.flat[err.argmax()]:.3e}"
    )


def abs_terms(w: QTensor, x: np.ndarray) -> np.ndarray:
    """``|s d| * sum |w x|`` per group: the scale of the rounding error."""
    xq, dx = naive.quantize_activation(x)
    R, C = w.shape
    wi = np.abs(naive.weight_ints(w)).reshape(R, C // GROUP, GROUP)
    xi = np.abs(xq.astype(np.int64)).reshape(x.shape[0], C // GROUP, GROUP)
    dots = np.einsum("rgj,tgj->trg", wi, xi).astype(np.float64)
    return dots * np.abs(w.scales.astype(np.float64)[None] * dx[:, None, :])


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("C", [32, 96, 4128])
def test_quantize_input_matches_twin_exactly(C):
    rng = np.random.default_rng(C)
    x = awkward_x(rng, 5, C)
    qa = K.quantize_input(readonly(x))
    q, d = naive.quantize_activation(x)
    np.testing.assert_array_equal(qa.q, q)
    np.testing.assert_array_equal(qa.d, d)
    G = C // GROUP
    gq = q.reshape(5, G, GROUP).astype(np.int32)
    np.testing.assert_array_equal(qa.gsum, gq.sum(axis=2))
    np.testing.assert_array_equal(qa.lo.reshape(5, G, 16), gq[:, :, :16])
    np.testing.assert_array_equal(qa.hi.reshape(5, G, 16), gq[:, :, 16:])
    lanes = (gq[:, :, :16] + gq[:, :, 16:]).reshape(5, G, 4, 4).sum(axis=3)
    np.testing.assert_array_equal(qa.corr.reshape(5, G, 4), -8 * lanes)
    np.testing.assert_array_equal(qa.dl.reshape(5, G, 4), np.repeat(d[..., None], 4, 2))
    assert not qa.vector and K.quantize_input(x[0]).vector


def test_quantize_activation_api_is_the_twin():
    x = awkward_x(np.random.default_rng(1), 3, 160)
    for a, b in zip(K.quantize_activation(x), naive.quantize_activation(x)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- q4 / q8


SHAPES = [(1, 32), (2, 64), (5, 96), (7, 160), (33, 352), (3, 4128)]


@pytest.mark.parametrize("path", ALL)
@pytest.mark.parametrize("dtype", ["q4", "q8"])
@pytest.mark.parametrize("R,C", SHAPES)
def test_linear_quantized_matches_twin(path, dtype, R, C):
    rng = np.random.default_rng(R * 1000 + C)
    w = rng.standard_normal((R, C)).astype(np.float32)
    w[:, :GROUP] = 0  # an all-zero weight group (scale 0)
    W = make_q(dtype, w)
    for T in (1, 2, 3, 17):
        x = readonly(awkward_x(rng, T, C))
        y = K.linear(W, x, path=path)
        assert y.shape == (T, R) and y.dtype == np.float32
        assert_close_to_twin(y, W, x, f"{path} {dtype} R={R} C={C} T={T}")


@pytest.mark.parametrize("path", ALL)
@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_linear_extreme_values(path, dtype):
    """Largest integer products (|nibble-8| = 8, q8 -128/127, x = +-127) and
    fp16 scale extremes (65504, subnormal, negative, zero)."""
    R, C, T = 6, 224, 3
    G = C // GROUP
    rng = np.random.default_rng(7)
    if dtype == "q4":
        packed = np.zeros((R, C // 2), np.uint8)  # every nibble 0 -> weight -8
        packed[1] = 0xFF  # weight +7
        packed[2] = rng.integers(0, 256, C // 2, dtype=np.uint8)
        packed[3, ::2] = 0xF0
        packed[4] = 0x88  # weight 0
        packed[5] = rng.integers(0, 256, C // 2, dtype=np.uint8)
    else:
        packed = np.full((R, C), -128, np.int8)
        packed[1] = 127
        packed[2] = rng.integers(-128, 128, C, dtype=np.int8)
        packed[3, ::2] = -127
        packed[4] = 0
        packed[5] = rng.integers(-128, 128, C, dtype=np.int8)
    scales = np.ones((R, G), np.float16)
    scales[0, 0] = 65504
    scales[1, 1] = np.float16(6e-8)  # subnormal
    scales[2, :] = -np.float16(0.0123)
    scales[3, 2] = 0
    scales[5] = rng.standard_normal(G).astype(np.float16)
    W = QTensor(dtype, readonly(packed), readonly(scales))
    x = np.full((T, C), 127, np.float32)
    x[1] = -127
    x[2] = awkward_x(rng, 1, C)[0]
    y = K.linear(W, x, path=path)
    assert np.all(np.isfinite(y))
    assert_close_to_twin(y, W, x, f"{path} {dtype} extremes")


@pytest.mark.parametrize("path", ALL)
def test_linear_reuses_quantized_input_and_out(path):
    rng = np.random.default_rng(3)
    W1 = make_q("q4", rng.standard_normal((9, 128)).astype(np.float32))
    W2 = make_q("q8", rng.standard_normal((4, 128)).astype(np.float32))
    x = rng.standard_normal(128).astype(np.float32)
    qa = K.quantize_input(x)
    out = np.full(9, np.nan, np.float32)
    y1 = K.linear(W1, qa, out=out, path=path)
    assert y1 is out and y1.shape == (9,)
    np.testing.assert_array_equal(y1, K.linear(W1, x, path=path))
    y2 = K.linear(W2, qa, path=path)
    assert y2.shape == (4,)
    assert_close_to_twin(y2[None], W2, x[None], "q8 vector")


def test_paths_agree_with_each_other():
    """All runnable paths give the same numbers up to the summation order."""
    rng = np.random.default_rng(11)
    W = make_q("q4", rng.standard_normal((17, 4096 + 96)).astype(np.float32))
    x = rng.standard_normal((5, 4096 + 96)).astype(np.float32)
    ys = {p: K.linear(W, x, path=p) for p in RUNNABLE}
    for p, y in ys.items():
        assert_close_to_twin(y, W, x, p)


@pytest.mark.parametrize("enc", ["f32", "f16", "bf16"])
def test_linear_float_weights(enc):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((70, 48)).astype(np.float32)
    wt = {"f32": w, "f16": w.astype(np.float16), "bf16": f32_to_bf16(w)}[enc]
    wt = readonly(wt)
    x = rng.standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(
        K.linear(wt, x), naive.linear(wt, x), rtol=1e-5, atol=1e-5
    )
    out = np.empty(70, np.float32)
    assert K.linear(wt, x[0], out=out) is out
    np.testing.assert_allclose(out, naive.linear(wt, x[:1])[0], rtol=1e-5, atol=1e-5)


def test_linear_rejects_bad_out_and_shapes():
    W = make_q("q4", np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        K.linear(W, np.ones((2, 64), np.float32), out=np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="columns"):
        K.linear(W, np.ones((2, 96), np.float32))
    with pytest.raises(TypeError):
        K.linear(np.ones((4, 64), np.float32), K.quantize_input(np.ones(64)))


# ----------------------------------------------------------------------------- dispatch


def test_path_choice_and_override(monkeypatch):
    assert "generic" in RUNNABLE
    monkeypatch.delenv(cpu.ENV, raising=False)
    assert cpu.best_path() == RUNNABLE[0]
    monkeypatch.setenv(cpu.ENV, "generic")
    assert cpu.best_path() == "generic"
    monkeypatch.setenv(cpu.ENV, "sse9")
    with pytest.raises(UnsupportedError, match="MER_KERNEL_PATH='sse9'"):
        cpu.best_path()


@pytest.mark.skipif("vnni512" in RUNNABLE, reason="this CPU has AVX-512 VNNI")
def test_forcing_a_path_the_cpu_lacks_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "vnni512")
    with pytest.raises(UnsupportedError, match="avx512"):
        K.linear(make_q("q4", np.ones((2, 128), np.float32)), np.ones(128))


_VNNI_COMPILE = """
import numpy as np
from numba import typeof
from mer_cli.kernels import q4, q8
from mer_cli.kernels.q4 import QuantizedActivation
T, C, R = 3, 4128, 5  # 129 groups: VNNI chunks, an AVX2 chunk and a scalar group
z = np.zeros
qa = QuantizedActivation(z((T, C), np.int8), z((T, C // 32), np.float32),
    z((T, C // 32), np.int32), z((T, C // 2), np.int8), z((T, C // 2), np.int8),
    z((T, C // 8), np.int32), z((T, C // 8), np.float32))
s = z((R, C // 32), np.uint16)
out = z((T, R), np.float32)
a4 = (z((R, C // 2), np.uint8), s, qa.lo, qa.hi, qa.corr, qa.dl, qa.q, qa.d,
      qa.gsum, q4.HALF_TABLE, 8, out)
a8 = (z((R, C), np.int8), s, qa.q, qa.d, 8, out)
for fn, args in ((q4.q4_vnni512, a4), (q8.q8_vnni512, a8)):
    sig = tuple(typeof(a) for a in args)
    fn.compile(sig)  # compile only: this CPU may not run it
    print(fn.__name__, fn.inspect_asm(sig).count("vpdpbusd"))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MER_SLOW_TESTS"),
    reason="compiles for another CPU in a subprocess (~20 s); set MER_SLOW_TESTS=1",
)
@pytest.mark.skipif(
    "avx2" not in RUNNABLE, reason="needs an x86-64 host to cross-compile for"
)
def test_vnni_kernels_compile_for_an_avx512_cpu(tmp_path):
    """Where VNNI cannot run, at least LLVM must select the VNNI code for a CPU
    that has it (a bad intrinsic signature would abort at first use there)."""
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path),
        NUMBA_CPU_NAME="icelake-server",
        NUMBA_CPU_FEATURES="+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd,"
        "+avx512vnni,+avx2,+avx,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+lzcnt",
    )
    res = subprocess.run(
        [sys.executable, "-c", _VNNI_COMPILE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    counts = dict(line.split() for line in res.stdout.split("\n") if line.strip())
    assert int(counts["q4_vnni512"]) > 0 and int(counts["q8_vnni512"]) > 0


def test_set_threads():
    import numba

    n = numba.config.NUMBA_NUM_THREADS
    assert K.set_threads(1) == 1 and K.get_threads() == 1
    assert K.set_threads(None) == n


# ----------------------------------------------------------------------------- ops

RTOL, ATOL = 1e-5, 1e-6


def test_rms_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32) * 10
    x[0, 0] = 0  # zero row: eps keeps it finite
    w = readonly(rng.standard_normal(96).astype(np.float32))
    got = K.rms_norm(readonly(x), w, 1e-6)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, naive.rms_norm(x, w, 1e-6), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("hd", [2, 64, 128])
def test_rope(hd):
    rng = np.random.default_rng(hd)
    x = readonly(rng.standard_normal((6, 3, hd)).astype(np.float32))
    pos = np.array([0, 1, 2, 17, 4095, 100000])
    for theta in (10000.0, 1e6):
        np.testing.assert_allclose(
            K.rope(x, pos, theta), naive.rope(x, pos, theta), rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("T,start", [(1, 0), (1, 40), (7, 0), (5, 9), (17, 3)])
@pytest.mark.parametrize("window", [None, 1, 4, 100])
def test_attention_gqa_causal_window(T, start, window):
    rng = np.random.default_rng(T * 100 + start)
    H, KV, hd, S = 8, 2, 16, 64
    q = readonly(rng.standard_normal((T, H, hd)).astype(np.float32) * 3)
    k = readonly(rng.standard_normal((S, KV, hd)).astype(np.float32))
    v = readonly(rng.standard_normal((S, KV, hd)).astype(np.float32))
    got = K.attention(q, k, v, start, window)
    ref = naive.attention(q, k, v, start, window)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-5)
    k16, v16 = readonly(k.astype(np.float16)), readonly(v.astype(np.float16))
    got16 = K.attention(q, k16, v16, start, window)  # fp16 cache read in place
    ref16 = naive.attention(q, k16, v16, start, window)
    np.testing.assert_allclose(got16, ref16, rtol=RTOL, atol=1e-5)


def test_attention_rejects_short_cache():
    q = np.zeros((2, 4, 8), np.float32)
    kv = np.zeros((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="KV cache holds 3"):
        K.attention(q, kv, kv, 2)


def test_silu_mul_softmax():
    rng = np.random.default_rng(1)
    gu = rng.standard_normal((4, 2, 64)).astype(np.float32) * 5
    gu[0, 0, :3] = [-100, 100, 0]  # exp overflow side and saturation
    np.testing.assert_allclose(
        K.silu_mul(readonly(gu)), naive.silu_mul(gu), rtol=RTOL, atol=ATOL
    )
    x = rng.standard_normal((3, 60)).astype(np.float32) * 20
    x[0, :5] = -np.inf  # masked entries
    np.testing.assert_allclose(K.softmax(x), naive.softmax(x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(K.softmax(x[1]), naive.softmax(x[1]), rtol=RTOL)


def test_topk_order_and_ties():
    x = np.array([[0.5, 2.0, 2.0, -1.0, 2.0, 0.5], [1, 2, 3, 4, 5, 6]], np.float32)
    idx, val = K.topk(x, 4)
    np.testing.assert_array_equal(idx, [[1, 2, 4, 0], [5, 4, 3, 2]])
    np.testing.assert_array_equal(val, [[2, 2, 2, 0.5], [6, 5, 4, 3]])
    rng = np.random.default_rng(2)
    r = rng.integers(0, 5, (7, 3, 64)).astype(np.float32)  # many ties
    for k in (1, 2, 8, 64):
        gi, gv = K.topk(r, k)
        ni, nv = naive.topk(r, k)
        np.testing.assert_array_equal(gi, ni)
        np.testing.assert_array_equal(gv, nv)
    with pytest.raises(ValueError, match="k=0"):
        K.topk(r, 0)
