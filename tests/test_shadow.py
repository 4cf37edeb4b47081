"""The ``shadow`` predictor: rank-R surrogates of the experts fitted on their
real inputs and outputs, layer ``l+1``'s router on the attention preview of
``x + y~``. Checked: the reduced-rank fit against numpy's least squares and
SVD, the fitted surrogates against the experts they stand for, held-out
recall above the plain preview's, live decode scores equal to the offline
replay's, the widened copy, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli.cli import cli
from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.store import Store
from mer_cli.formats.trace import Trace
from mer_cli.predictors import load_predictor
from mer_cli.shadow import RIDGE, _expert_fn, reduced_rank_fit, shadow_scores
from mer_cli.train_predictor import split_by_prompt, subset, train_predictor

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "Once upon a time there was a king",
    "import numpy as np\nx = np.zeros(3)",
    "The river flows to the sea, and the sea",
    "for i in range(10):\n    print(i)",
    "A stitch in time saves nine, they say",
    "class Point:\n    def __init__(self, x, y):",
    "Mary had a little lamb whose fleece was white",
    "while True:\n    line = input()",
    "Four score and seven years ago our fathers",
    "SELECT name FROM users WHERE id = 1",
]


def test_reduced_rank_fit_is_least_squares_then_projection():
    rng = np.random.default_rng(0)
    n, P, D = 400, 9, 6
    X = np.concatenate([rng.standard_normal((n, P - 1)), np.ones((n, 1))], 1)
    Y = X @ rng.standard_normal((P, D)) + 0.1 * rng.standard_normal((n, D))
    xtx, xty = X.T @ X, X.T @ Y
    W = np.linalg.solve(xtx + RIDGE * n * np.eye(P), xty)
    A, B = reduced_rank_fit(xtx, xty, n, rank=D)  # full rank: the ridge fit
    np.testing.assert_allclose(X @ A.T @ B.T, X @ W, rtol=1e-4, atol=1e-4)
    A, B = reduced_rank_fit(xtx, xty, n, rank=2)
    # rank 2: the fit's outputs projected on their top 2 principal directions
    _, _, Vt = np.linalg.svd(X @ W, full_matrices=False)
    want = X @ W @ Vt[:2].T @ Vt[:2]
    np.testing.assert_allclose(X @ A.T @ B.T, want, rtol=1e-4, atol=1e-4)
    assert A.shape == (2, P) and B.shape == (D, 2) and A.dtype == np.float32


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny f32 Mixtral store, a trace of PROMPTS, the report of
    train-predictor --kind best --model on it, and the shadow predictor
    (--kind shadow, same split)."""
    from mer_cli.quantize import quantize
    from mer_cli.trace import trace

    d = tmp_path_factory.mktemp("shadow")
    ck = make_hf_checkpoint(d / "ck", "mixtral", seed=5, layers=3, num_local_experts=6)
    store = quantize(ck, d / "m.mer", experts="f32", dense="f32", progress=False)
    trace(store, PROMPTS, d / "t.npz", max_tokens=24, progress=False)
    rep = train_predictor(
        [d / "t.npz"], d / "best.npz", model=store, epochs=5, progress=False,
        holdout=0.25,
    )  # fmt: skip
    out = d / "shadow.npz"
    train_predictor(
        [d / "t.npz"], out, model=store, kind="shadow", epochs=5, progress=False,
        holdout=0.25,
    )  # fmt: skip
    return store, Trace.load(d / "t.npz"), out, rep


def test_expert_outputs_are_the_moe_blocks(fitted):
    """The fit's targets: the experts as the engine computes them."""
    from mer_cli.generate import load
    from mer_cli.models.layers import moe_block

    store = fitted[0]
    eng, _ = load(store)
    try:
        st, w = eng.store, eng.layers[1]
        xn = np.random.default_rng(3).standard_normal((4, st.model.hidden_size))
        xn = xn.astype(np.float32)
        y, ids, wts = moe_block(eng.arch, w, xn, 1, eng.source)
        want = np.zeros_like(y)
        for t in range(4):
            for e, a in zip(ids[t], wts[t]):
                want[t] += a * _expert_fn(st, 1, int(e))(xn[t : t + 1])[0]
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    finally:
        eng.close()


def test_surrogates_stand_for_the_experts(fitted):
    store, t, out, rep = fitted
    st = Store.open(store)
    pred = load_predictor(out, st)
    assert pred.kind == "shadow" and pred.max_distance == 1
    # on a new prompt's real inputs, each selected expert's surrogate explains
    # much of its output (a linear map cannot explain all of a SwiGLU)
    from mer_cli.generate import load

    eng, tok = load(store)
    seen = []
    eng.moe_hook = lambda ev: seen.append((ev.layer, ev.normed.copy(), ev.ids))
    try:
        eng.prefill(tok.encode("Twinkle twinkle little star, how I wonder"))
    finally:
        eng.close()
    err = tot = 0.0
    for layer, xn, ids in seen:
        xb = np.concatenate([xn, np.ones((len(xn), 1), np.float32)], 1)
        for e in np.unique(ids):
            rows = np.nonzero((ids == e).any(-1))[0]
            y = _expert_fn(st, layer, int(e))(xn[rows])
            a_in = pred.arrays["shadow_in"][layer, e]
            sur = xb[rows] @ a_in.T @ pred.arrays["shadow_out"][layer, e].T
            err += ((sur - y) ** 2).sum()
            tot += (y**2).sum()
    # 0.57 here, from ~100 samples per expert (0.18-0.35 on the built-in
    # model's ~2000, full rank); no surrogate at all leaves 1.0
    assert err < 0.75 * tot


def test_held_out_recall_beats_the_plain_preview(fitted):
    store, t, out, rep = fitted
    q = rep.quality
    k = rep.top_k
    assert q["shadow"][k]["recall"][0] > q["preview"][k]["recall"][0]
    assert np.isnan(q["shadow"][k]["recall"][1])  # one layer ahead only
    # recomputed from the replayed scores on the same held-out split
    st = Store.open(store)
    _, te = split_by_prompt(t, 0.25, 0)
    test = subset(t, te)
    s = shadow_scores(st, test, load_predictor(out, st), progress=False)
    top = np.argsort(-s[:, :-1, 0], -1, kind="stable")[..., :k]  # [N, L-1, k]
    X = np.zeros((test.num_tokens, st.model.num_layers, st.model.num_experts))
    np.put_along_axis(X, test.experts.astype(np.int64), 1, -1)
    rec = np.take_along_axis(X[:, 1:], top, -1).sum() / (
        k * top.shape[0] * top.shape[1]
    )
    assert q["shadow"][k]["recall"][0] == pytest.approx(rec)


def test_live_decode_scores_equal_the_replay(fitted, tmp_path):
    """mer generate --predictor: the scores each decode step gets equal the
    offline replay's for the same tokens (one pass per prompt, so up to
    batched-versus-single rounding)."""
    from mer_cli.generate import Completion, GenerateOptions, load
    from mer_cli.prefetch import use_predictor
    from mer_cli.streaming import StreamedExperts
    from mer_cli.trace import trace

    store, t, out, rep = fitted
    st = Store.open(store)
    pred = load_predictor(out, st)
    seen = []
    real = pred.observe

    def spy(layer, experts, hidden=None, preview=None):
        r = real(layer, experts, hidden, preview)
        if preview is not None and np.ndim(experts) == 1:
            seen.append((layer, r[layer + 1].copy()))
        return r

    pred.observe = spy
    eng, tok = load(
        store, ctx=128, source=lambda s: StreamedExperts(s, 8 * s.extent_nbytes)
    )
    try:
        use_predictor(eng, pred)
        th = eng.source.throttle
        th.trial.step = lambda tokens, now: None  # no off windows
        th.hint_computed = lambda kind, seconds: None  # the gate stays open
        c = Completion(eng, tok, PROMPTS[0], GenerateOptions(max_tokens=8))
        c.run()
    finally:
        eng.close()
    assert len(seen) == 7 * (st.model.num_layers - 1)  # 7 steps, 2 layers each
    trace(store, [PROMPTS[0]], tmp_path / "one.npz", max_tokens=8, progress=False)
    one = Trace.load(tmp_path / "one.npz")
    off = shadow_scores(st, one, load_predictor(out, st), progress=False)
    # decode steps feed the last positions; match each live call to a row
    n0 = one.num_tokens - 8
    by_layer: dict[int, list] = {}
    for layer, s in seen:
        by_layer.setdefault(layer, []).append(s)
    for layer, got in by_layer.items():
        want = off[n0 + 1 : n0 + 1 + 8, layer, 0]
        matched = [np.abs(want - g).max(-1).min() for g in got]
        assert max(matched) < 1e-4


def test_widened_shadow_computes_the_same_surrogates(fitted, tmp_path):
    from mer_cli.widen import widen_predictor, widen_store

    store, t, out, rep = fitted
    st = Store.open(store)
    D = st.model.hidden_size
    F = st.model.expert_ffn
    wide = widen_store(store, tmp_path / "w.mer", hidden=2 * D, ffn=F, progress=False)
    wp = load_predictor(widen_predictor(out, tmp_path / "w.npz", wide), wide)
    p = load_predictor(out, st)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, D)).astype(np.float32)
    ids = rng.integers(0, st.model.num_experts, (5, st.model.top_k))
    y = p.shadow_output(1, ids, x)
    yw = wp.shadow_output(1, ids, np.concatenate([x, np.zeros_like(x)], 1))
    np.testing.assert_allclose(yw[:, :D], y, rtol=1e-4, atol=1e-5)
    assert not yw[:, D:].any()


def test_refusals(fitted, tmp_path):
    store, t, out, rep = fitted
    r = CliRunner().invoke(
        cli, ["train-predictor", str(t.path), "-o", str(tmp_path / "x.npz"),
              "--kind", "shadow"],
    )  # fmt: skip
    assert r.exit_code == 2 and "--kind shadow needs --model STORE" in r.output
    p = load_predictor(out)
    meta = dict(p.meta)
    p.meta = {**meta, "max_distance": 2}
    p.save(tmp_path / "bad.npz")
    with pytest.raises(FormatError, match="max_distance is 2 for a shadow"):
        load_predictor(tmp_path / "bad.npz")
    p.meta = {k: v for k, v in meta.items() if k != "rms_norm_eps"}
    p.save(tmp_path / "bad2.npz")
    with pytest.raises(FormatError, match="rms_norm_eps is None"):
        load_predictor(tmp_path / "bad2.npz")
    with pytest.raises(UsageError, match="hidden states"):
        load_predictor(out).predict_trace(t)


def test_fit_refusals(fitted, monkeypatch):
    import dataclasses

    import mer_cli.shadow as sh

    store, t, out, rep = fitted
    st = Store.open(store)
    meta = load_predictor(out).meta
    other = subset(t, np.ones(t.num_tokens, bool))
    other.meta["store_id"] = "ab" * 16
    with pytest.raises(UsageError, match="traces were recorded from store abab"):
        sh.fit_shadow(st, other, meta, progress=False)
    monkeypatch.setattr(sh, "MAX_FIT_BYTES", 1 << 20)
    with pytest.raises(UsageError, match="MiB of statistics, over the 1.0 MiB"):
        sh.fit_shadow(st, t, meta, progress=False)
    st.model = dataclasses.replace(st.model, routing="sigmoid")
    with pytest.raises(UsageError, match="routes with sigmoid.*--kind mlp\\+preview"):
        sh.fit_shadow(st, t, meta, progress=False)
