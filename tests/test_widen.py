"""mer_cli.widen: a store padded to larger widths computes its source's function."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from mer_cli import builtin
from mer_cli.cli import cli
from mer_cli.errors import FormatError, UnsupportedError, UsageError
from mer_cli.formats import quant
from mer_cli.formats.store import Store
from mer_cli.generate import load
from mer_cli.hf_import import quantize_hf
from mer_cli.predictors import load_predictor
from mer_cli.widen import _kind, widen_predictor, widen_store


def logits(path, ids):
    eng, _ = load(str(path), ctx=128)
    try:
        return eng.prefill(ids, all_logits=True)
    finally:
        eng.close()


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab, n - 1).tolist()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_widened_f32_store_computes_the_same_logits(tmp_path, hf_checkpoint, arch):
    """f32 stores: the only difference is summation order (about 1e-6)."""
    ckpt = hf_checkpoint(arch)
    src = quantize_hf(ckpt, tmp_path / "s.mer", experts="f32", dense="f32",
                      progress=False)  # fmt: skip
    cfg = Store.open(src).model
    D, F = cfg.hidden_size, cfg.expert_ffn
    out = widen_store(src, tmp_path / "w.mer", hidden=2 * D, ffn=F + 64,
                      progress=False)  # fmt: skip
    w = Store.open(out).model
    assert (w.hidden_size, w.expert_ffn) == (2 * D, F + 64)
    assert w.rms_norm_eps == pytest.approx(cfg.rms_norm_eps / 2)
    assert (w.num_heads, w.head_dim, w.num_experts) == (
        cfg.num_heads, cfg.head_dim, cfg.num_experts)  # fmt: skip
    ids = random_ids(40, cfg.vocab_size)
    a, b = logits(src, ids), logits(out, ids)
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()


def test_widened_builtin_keeps_every_quantized_group(tmp_path):
    """q4 experts / q8 dense: each original group keeps its bytes and scale, the
    padding dequantizes to exact zeros, and the logits agree to rounding."""
    src = quantize_hf(builtin.checkpoint_dir(), tmp_path / "b.mer", progress=False)
    s = Store.open(src)
    D, F = s.model.hidden_size, s.model.expert_ffn
    out = widen_store(src, tmp_path / "w.mer", hidden=256, ffn=512, progress=False)
    w = Store.open(out)
    assert w.quantization == s.quantization
    for layer, x in ((0, 0), (5, 15)):
        a = s.expert_parts(s.expert_bytes(layer, x))
        b = w.expert_parts(w.expert_bytes(layer, x))
        gu_a, gu_b = a["gate_up"].dequantize(), b["gate_up"].dequantize()
        want = np.zeros((1024, 256), np.float32)
        want[:F, :D], want[512 : 512 + F, :D] = gu_a[:F], gu_a[F:]
        np.testing.assert_array_equal(gu_b, want)
        want = np.zeros((256, 512), np.float32)
        want[:D, :F] = a["down"].dequantize()
        np.testing.assert_array_equal(b["down"].dequantize(), want)
    q_a, q_b = s.tensor("layers.2.q"), w.tensor("layers.2.q")
    assert q_a.dtype == q_b.dtype == "q8"
    np.testing.assert_array_equal(q_b.packed[:, :D], q_a.packed)
    np.testing.assert_array_equal(q_b.scales[:, : D // 32], q_a.scales)
    assert not q_b.packed[:, D:].any() and not q_b.scales[:, D // 32 :].any()
    o = quant.to_float(w.tensor("layers.2.o"), "q8")
    np.testing.assert_array_equal(o[D:], 0)
    np.testing.assert_array_equal(o[:D], quant.to_float(s.tensor("layers.2.o"), "q8"))
    g = w.tensor_f32("final_norm")
    np.testing.assert_allclose(g[:D], s.tensor_f32("final_norm") * np.sqrt(0.5),
                               rtol=1e-6)  # fmt: skip
    assert not g[D:].any()
    eng, tok = load(str(src), ctx=64)
    ids = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    eng.close()
    a, b = logits(src, ids), logits(out, ids)
    # summation order differs, and a 1e-7 change can flip one q8 activation's
    # rounding, which then moves later positions by up to ~0.1 (it depends on
    # the BLAS build): most positions agree to 1e-3, all to well under a logit
    diff = np.abs(a - b).max(-1)
    assert np.median(diff) < 1e-3 and diff.max() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_widen_refuses_a_tensor_it_cannot_place():
    with pytest.raises(UnsupportedError, match="'layers.0.mystery': widen does not"):
        _kind("layers.0.mystery")
    assert [_kind(n) for n in ("embed", "layers.3.o", "layers.1.ffn_norm")] == [
        "cols", "rows", "norm"]  # fmt: skip


def test_widen_refuses_bad_widths_and_existing_output(tmp_path, hf_checkpoint):
    src = quantize_hf(hf_checkpoint("mixtral"), tmp_path / "s.mer", progress=False)
    D = Store.open(src).model.hidden_size
    with pytest.raises(UsageError, match=f"--hidden {D // 2}: must be at least"):
        widen_store(src, tmp_path / "w.mer", hidden=D // 2, ffn=1024, progress=False)
    with pytest.raises(UsageError, match="--ffn 1000: .* multiple of 32"):
        widen_store(src, tmp_path / "w.mer", hidden=D, ffn=1000, progress=False)
    assert not (tmp_path / "w.mer").exists()
    with pytest.raises(UsageError, match="already exists"):
        widen_store(src, src, hidden=D, ffn=1024, progress=False)


def test_widened_predictor_scores_like_the_source(tmp_path):
    """A predictor fitted on the source's traces, widened, is accepted by the
    widened store and gives the source's scores for the padded hidden state."""
    src = quantize_hf(builtin.checkpoint_dir(), tmp_path / "b.mer", experts="f32",
                      dense="f32", progress=False)  # fmt: skip
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n\nimport os\n\nclass A:\n\nfor i in range(3):\n")
    runner = CliRunner()
    r = runner.invoke(cli, ["trace", "--model", str(src), "--prompts", str(prompts),
                             "-o", str(tmp_path / "t.npz"), "--max-tokens", "8",
                             "--sketch-dim", "16", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pred = tmp_path / "p.npz"
    r = runner.invoke(cli, ["train-predictor", str(tmp_path / "t.npz"), "-o", str(pred),
                             "--kind", "mlp+router", "--model", str(src), "--epochs",
                             "2", "--hidden", "8", "--holdout", "0.4", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = widen_store(src, tmp_path / "w.mer", hidden=256, ffn=512, progress=False)
    wpred = widen_predictor(pred, tmp_path / "wp.npz", out)
    a, b = load_predictor(pred, src), load_predictor(wpred, out)
    assert b.meta["hidden_size"] == 256
    with pytest.raises(UsageError, match="width 128 is below the predictor's 256"):
        widen_predictor(wpred, tmp_path / "x.npz", src)
    with pytest.raises(
        FormatError, match="hidden_size 256, but this model has hidden_size 128"
    ):
        load_predictor(wpred, src)
    rng = np.random.default_rng(1)
    for layer in range(3):
        h = rng.standard_normal(128).astype(np.float32)
        experts = np.array([layer, layer + 3])
        sa = a.observe(layer, experts, h)
        sb = b.observe(layer, experts, np.concatenate([h, np.zeros(128, np.float32)]))
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_allclose(sb[k], sa[k], atol=1e-5)
