"""The numpy reference model (``tests/naive_model.py``) against transformers' own
outputs (``tests/fixtures/parity``), plus properties that hold whatever the weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from naive_model import NaiveModel, attention_mask
from parity_fixtures import fixture_dirs, load_reference

from mer_cli.synth import write_checkpoint

FIXTURES = fixture_dirs()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|: transformers' float32 noise is relative to the logits' scale."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.skipif(
    not FIXTURES, reason="no transformers fixtures under tests/fixtures/parity"
)
@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_transformers(fixture, dtype):
    ref = load_reference(fixture)
    prompt, greedy = ref["input_ids"], ref["greedy_tokens"]
    T = len(prompt)
    # one full-sequence pass over the prompt and the tokens fed back while decoding
    out = NaiveModel(fixture, dtype).run(np.concatenate([prompt, greedy[:-1]]))
    assert rel_err(out.logits[:T], ref["prompt_logits"]) < 1e-5
    assert rel_err(out.logits[T - 1 :], ref["decode_logits"]) < 1e-5
    assert np.array_equal(out.logits[T - 1 :].argmax(-1), greedy)
    routing = np.stack(out.routing)  # [L, T+N-1, K]
    assert np.array_equal(routing[:, :T], ref["routing"])
    assert np.array_equal(routing[:, T:], ref["decode_routing"])
    weights = np.stack(out.routing_weights)[:, :T]
    np.testing.assert_allclose(weights, ref["routing_weights"], atol=2e-6)
    logits = np.stack(out.router_logits)[:, :T]
    assert rel_err(logits, ref["router_logits"]) < 1e-5


# ---------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic tiny checkpoints (f32, so the reference reads exact weights)."""
    root = tmp_path_factory.mktemp("naive")
    out = {}
    for name in ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"):
        out[name] = write_checkpoint(name, root / name, dtype="f32", seed=7)
    return out


def with_config(src, dst, **changes):
    """A copy of checkpoint ``src`` whose config.json has ``changes`` applied."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


IDS = np.random.default_rng(0).integers(3, 500, size=24)


@pytest.mark.parametrize(
    "name", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]
)
def test_causal_and_routing_rule(tiny, name):
    m = NaiveModel(tiny[name])
    out = m.run(IDS)
    # causal: the first 10 positions ignore what follows them
    np.testing.assert_allclose(
        m.forward(IDS[:10]), out.logits[:10], rtol=1e-9, atol=1e-12
    )
    for sel, w, probs in zip(out.routing, out.routing_weights, out.router_probs):
        K = m.cfg.top_k
        top = np.sort(probs, axis=-1)[:, ::-1][:, :K]  # the K largest, descending
        np.testing.assert_array_equal(np.take_along_axis(probs, sel, -1), top)
        want = top / top.sum(-1, keepdims=True) if m.cfg.norm_topk_prob else top
        np.testing.assert_allclose(w, want, rtol=1e-9, atol=1e-12)
    # float32 compute stays close to float64
    assert rel_err(NaiveModel(tiny[name], np.float32).forward(IDS), out.logits) < 1e-4


def test_sliding_window_limits_what_a_position_sees(tiny, tmp_path):
    W, L = 4, 2
    ck = with_config(tiny["tiny-mixtral"], tmp_path / "swa", sliding_window=W)
    m = NaiveModel(ck)
    a = m.forward(IDS)
    changed = IDS.copy()
    changed[0] += 1
    b = m.forward(changed)
    # after L layers a position sees at most L*(W-1) tokens back
    reach = L * (W - 1)
    np.testing.assert_allclose(a[reach + 1 :], b[reach + 1 :], rtol=1e-9, atol=1e-12)
    assert np.abs(a[:W] - b[:W]).max() > 1e-3
    assert attention_mask(6, 3).sum(1).tolist() == [1, 2, 3, 3, 3, 3]
    # a window longer than the sequence changes nothing
    big = NaiveModel(
        with_config(tiny["tiny-mixtral"], tmp_path / "big", sliding_window=64)
    )
    np.testing.assert_allclose(
        big.forward(IDS), NaiveModel(tiny["tiny-mixtral"]).forward(IDS)
    )


def test_clip_qkv_and_norm_topk_prob_take_effect(tiny, tmp_path):
    base = NaiveModel(tiny["tiny-olmoe"]).forward(IDS)
    clipped = NaiveModel(with_config(tiny["tiny-olmoe"], tmp_path / "c", clip_qkv=0.5))
    assert np.abs(clipped.forward(IDS) - base).max() > 1e-2
    loose = NaiveModel(with_config(tiny["tiny-olmoe"], tmp_path / "c2", clip_qkv=1e6))
    np.testing.assert_allclose(loose.forward(IDS), base, rtol=1e-9, atol=1e-12)
    normed = NaiveModel(
        with_config(tiny["tiny-olmoe"], tmp_path / "n", norm_topk_prob=True)
    )
    w = np.stack(normed.run(IDS).routing_weights)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "name", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]
)
def test_synth_checkpoints_match_transformers(tiny, name):
    """Where torch and transformers are installed (dev extra): transformers loads
    the synthetic checkpoint (per-expert names, tied embeddings) and computes
    what the reference computes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny[name], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor(IDS)[None], output_router_logits=True)
    ref = NaiveModel(tiny[name]).run(IDS)
    assert rel_err(ref.logits, out.logits[0].numpy()) < 1e-5
    for mine, theirs in zip(ref.router_logits, out.router_logits):
        assert rel_err(mine, theirs.reshape(len(IDS), -1).numpy()) < 1e-5
