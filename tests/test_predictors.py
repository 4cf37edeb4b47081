"""Expert predictors: Markov counts against a naive count, an MLP that learns
a planted mapping, recall/precision against a plain loop, live ``observe``
against whole-trace scoring, the predictor file (round trip, validation
errors), the router lookahead a trace records against the numpy model, and
the cache simulation with predictions."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import naive_model
import numpy as np
import pytest
from conftest import make_hf_checkpoint
from naive_model import NaiveModel

from mer_cli.cache import simulate_policy
from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.trace import FORMAT, VERSION, Trace, merge
from mer_cli.models.config import ModelConfig
from mer_cli.predictors import (
    MarkovPredictor,
    context_keys,
    load_predictor,
    multi_hot,
    router_lookahead,
    set_codes,
)
from mer_cli.train_predictor import (
    fit_markov,
    fit_mlp,
    predictions_of,
    recall_precision,
    requests_of,
    split_by_prompt,
    subset,
)


def synthetic_trace(experts: np.ndarray, prompt: np.ndarray, sketch=None, E=None):
    """A :class:`Trace` of hand-made routing ``experts`` int ``[N, L, K]``
    (no model behind it): probabilities one-hot-ish, sketch random unless
    given (``[N, L, S]``), projection orthonormal so hidden states exist."""
    N, L, K = experts.shape
    E = E or int(experts.max()) + 1
    S = 8 if sketch is None else sketch.shape[2]
    rng = np.random.default_rng(1)
    if sketch is None:
        sketch = rng.standard_normal((N, L, S))
    positions = np.zeros(N, np.int32)
    for i in range(1, N):
        positions[i] = positions[i - 1] + 1 if prompt[i] == prompt[i - 1] else 0
    probs = np.full((N, L, E), 0.1 / E)
    np.put_along_axis(probs, experts.astype(np.int64), 0.9 / K, -1)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "store_id": "00" * 16,
        "arch": "mixtral",
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "hidden_size": S,
        "sketch_dim": S,
        "sketch_seed": 0,
        "created_by": "test",
    }
    q, _ = np.linalg.qr(rng.standard_normal((S, S)))
    t = Trace(
        meta=meta,
        tokens=np.zeros(N, np.int32),
        positions=positions,
        prompt=prompt.astype(np.int32),
        experts=experts.astype(np.int16),
        weights=np.full((N, L, K), 1 / K, np.float16),
        probs=probs.astype(np.float16),
        sketch=sketch.astype(np.float16),
        projection=q.astype(np.float32),
    )
    t.check()
    return t


def prompts_of(P: int, T: int) -> np.ndarray:
    return np.repeat(np.arange(P), T)


def chain_trace(P=12, T=30, L=4, E=6, seed=0):
    """K=1 routing: layer 0 random, layer l+1 = (E[l] + E[l-1] + 1) % E
    (second order), layer 1 = (E[0] * 2) % E."""
    rng = np.random.default_rng(seed)
    N = P * T
    ex = np.zeros((N, L, 1), np.int64)
    ex[:, 0, 0] = rng.integers(0, E, N)
    ex[:, 1, 0] = (ex[:, 0, 0] * 2) % E
    for layer in range(2, L):
        ex[:, layer, 0] = (ex[:, layer - 1, 0] + ex[:, layer - 2, 0] + 1) % E
    return synthetic_trace(ex, prompts_of(P, T), E=E)


# ------------------------------------------------------------------ markov


def test_markov_tables_equal_naive_counts():
    rng = np.random.default_rng(3)
    N, L, E, K = 300, 3, 5, 2
    ex = np.stack([rng.choice(E, K, replace=False) for _ in range(N * L)])
    t = synthetic_trace(ex.reshape(N, L, K), prompts_of(10, 30), E=E)
    m = fit_markov(t, max_distance=2)
    o1, o2 = defaultdict(Counter), defaultdict(Counter)
    n1, n2 = Counter(), Counter()
    for n in range(N):
        sets = [frozenset(int(e) for e in t.experts[n, layer]) for layer in range(L)]
        for layer in range(L - 1):
            for d in (1, 2):
                if layer + d >= L:
                    continue
                n1[layer, d, sets[layer]] += 1
                o1[layer, d, sets[layer]].update(sets[layer + d])
                if layer:
                    c2 = (layer, d, sets[layer], sets[layer - 1])
                    n2[c2] += 1
                    o2[c2].update(sets[layer + d])
    assert len(m.arrays["o1_keys"]) == len(n1)
    assert len(m.arrays["o2_keys"]) == len(n2)

    def code(s):
        return set_codes(multi_hot(np.array([sorted(s)]), E))

    for (layer, d, s), cnt in o1.items():
        c, n = m._lookup(1, context_keys(layer, d, code(s)))
        assert n[0] == n1[layer, d, s]
        assert c[0].tolist() == [cnt[e] for e in range(E)]
    for (layer, d, s, b), cnt in o2.items():
        c, n = m._lookup(2, context_keys(layer, d, code(s), code(b)))
        assert n[0] == n2[layer, d, s, b]
        assert c[0].tolist() == [cnt[e] for e in range(E)]
    # per-layer frequency
    X = multi_hot(t.experts, E)
    np.testing.assert_allclose(m.arrays["freq"], (X.sum(0) + 0.5) / (N + 1), 1e-6)


def test_markov_learns_second_order_and_backs_off():
    t = chain_trace()
    train, test = (subset(t, m) for m in split_by_prompt(t, 0.25, 0))
    m = fit_markov(train, max_distance=2)
    s = m.predict_trace(test)
    rec, _ = recall_precision(s, test.experts, 1)
    # every transition is a function of the two previous layers
    assert rec[0] == 1.0 and rec[1] == 1.0
    # an unseen context backs off to first order, then to the frequency
    unseen = np.uint64(12345)
    c, n = m._lookup(2, np.array([unseen]))
    assert n[0] == 0 and c.sum() == 0


def test_markov_temporal_signal():
    """Each layer repeats its previous token's expert 90% of the time, layers
    independent: only the temporal signal can predict."""
    rng = np.random.default_rng(0)
    P, T, L, E = 16, 40, 3, 8
    ex = np.zeros((P * T, L, 1), np.int64)
    for n in range(P * T):
        for layer in range(L):
            stay = n % T and rng.random() < 0.9
            ex[n, layer, 0] = ex[n - 1, layer, 0] if stay else rng.integers(E)
    t = synthetic_trace(ex, prompts_of(P, T), E=E)
    train, test = (subset(t, m) for m in split_by_prompt(t, 0.25, 0))
    rec, _ = recall_precision(fit_markov(train, 2).predict_trace(test), test.experts, 1)
    assert rec[0] > 0.8 and rec[1] > 0.8
    assert (fit_markov(train, 2).arrays["mix"][:, 2] > 0.5).all()  # temporal used


# --------------------------------------------------------------------- mlp


def planted(P: int, T: int, L: int, E: int, S: int, seed: int = 0):
    """Random features ``[N, L, S]`` and top-1 experts ``[N, L, 1]``: layer 0's
    random, layer l's the argmax of layer l-1's features' first E dims."""
    rng = np.random.default_rng(seed)
    N = P * T
    feat = rng.standard_normal((N, L, S))
    ex = np.zeros((N, L, 1), np.int64)
    ex[:, 0, 0] = rng.integers(0, E, N)
    for layer in range(1, L):
        ex[:, layer, 0] = feat[:, layer - 1, :E].argmax(-1)
    return feat, ex


def test_mlp_learns_planted_mapping():
    """The next layer's expert is the argmax of the current sketch's first E
    dims (routing itself random): the MLP finds it, Markov cannot."""
    P, T, L, E, S = 20, 40, 3, 4, 8
    sk, ex = planted(P, T, L, E, S)
    t = synthetic_trace(ex, prompts_of(P, T), sketch=sk, E=E)
    train, test = (subset(t, m) for m in split_by_prompt(t, 0.2, 0))
    fit, valid = (subset(train, m) for m in split_by_prompt(train, 0.15, 1))
    mlp = fit_mlp(fit, valid, max_distance=1, hidden=32, epochs=40, progress=False)
    rec_mlp, _ = recall_precision(mlp.predict_trace(test), test.experts, 1)
    rec_mk, _ = recall_precision(
        fit_markov(train, 1).predict_trace(test), test.experts, 1
    )
    assert rec_mlp[0] > 0.9
    assert rec_mk[0] < 0.5  # chance is 0.25
    assert mlp.meta["training"]["epochs"] <= 40


def with_preview(t: Trace, preview_sketch: np.ndarray) -> Trace:
    """``t`` with an attention preview whose sketch is ``preview_sketch``
    ``[N, L, S]`` (row L-1 zeroed, as traces record it)."""
    pv = np.array(preview_sketch, np.float16)
    pv[:, -1] = 0
    E = t.meta["num_experts"]
    t.meta["preview"] = True
    t.preview_sketch = pv
    t.preview_probs = np.full(t.probs.shape, 1 / E, np.float16)
    t.check()
    return t


def test_mlp_preview_learns_planted_mapping():
    """The next layer's expert is the argmax of the attention preview's first
    E dims (sketch and routing random): only the preview MLP finds it."""
    P, T, L, E, S = 20, 40, 3, 4, 8
    pv, ex = planted(P, T, L, E, S)
    t = with_preview(synthetic_trace(ex, prompts_of(P, T), E=E), pv)
    train, test = (subset(t, m) for m in split_by_prompt(t, 0.2, 0))
    assert test.preview_sketch.shape == (test.num_tokens, L, S)
    fit, valid = (subset(train, m) for m in split_by_prompt(train, 0.15, 1))
    kw = {"max_distance": 1, "hidden": 32, "epochs": 40, "progress": False}
    mlp_pv = fit_mlp(fit, valid, preview=True, **kw)
    assert mlp_pv.wants_preview and mlp_pv.meta["preview_inputs"] is True
    rec_pv, _ = recall_precision(mlp_pv.predict_trace(test), test.experts, 1)
    mlp = fit_mlp(fit, valid, **kw)
    assert not mlp.wants_preview
    rec, _ = recall_precision(mlp.predict_trace(test), test.experts, 1)
    assert rec_pv[0] > 0.9
    assert rec[0] < 0.5  # chance is 0.25
    # a trace without the preview cannot feed it
    plain = synthetic_trace(ex, prompts_of(P, T), E=E)
    with pytest.raises(UsageError, match="records no attention preview"):
        mlp_pv.predict_trace(plain)


# -------------------------------------------------------------- evaluation


def test_recall_precision_against_loop():
    rng = np.random.default_rng(2)
    N, L, A, E, K = 40, 4, 3, 7, 2
    scores = rng.random((N, L, A, E)).astype(np.float32)
    ex = np.stack([rng.choice(E, K, replace=False) for _ in range(N * L)])
    ex = ex.reshape(N, L, K)
    for k in (1, 2, 4):
        rec, prec = recall_precision(scores, ex, k)
        for d in range(1, A + 1):
            hits = count = 0
            for n in range(N):
                for layer in range(L - d):
                    top = sorted(range(E), key=lambda e: -scores[n, layer, d - 1, e])
                    hits += len(set(top[:k]) & set(ex[n, layer + d].tolist()))
                    count += 1
            assert rec[d - 1] == pytest.approx(hits / (K * count))
            assert prec[d - 1] == pytest.approx(hits / (k * count))


def with_router_lookahead(t: Trace, seed: int = 0):
    """``t`` with a ``lookahead`` member made by random routers from the hidden
    states behind its sketches, and those routers ``(R, W, eps)``."""
    rng = np.random.default_rng(seed)
    L, E, S = (t.meta[k] for k in ("num_layers", "num_experts", "sketch_dim"))
    R = rng.standard_normal((L, E, S)).astype(np.float32)
    W = (1 + 0.1 * rng.standard_normal((L, S))).astype(np.float32)
    arrays = {"routers": R, "router_norms": W}
    look = np.zeros((t.num_tokens, L, 3, E), np.float16)
    for layer in range(L):
        hidden = t.sketch[:, layer].astype(np.float32) @ t.projection.T
        look[:, layer] = router_lookahead(arrays, layer, hidden, 3, 1e-5)
    t.meta["lookahead_depth"] = 3
    t.lookahead = look
    t.check()
    return t, (R, W, 1e-5)


def test_observe_equals_predict_trace(tmp_path):
    """Live use (token by token, hidden states) gives the scores the offline
    evaluation used; reset() separates sequences."""
    t, routers = with_router_lookahead(chain_trace(P=6, T=12, L=4, E=6))
    rng = np.random.default_rng(5)
    t = with_preview(t, rng.standard_normal(t.sketch.shape))
    mk = fit_markov(t, 3)
    mlp = fit_mlp(t, None, max_distance=3, hidden=16, epochs=2, progress=False)
    mlpr = fit_mlp(t, None, max_distance=3, hidden=16, epochs=2, routers=routers,
                   progress=False)  # fmt: skip
    mlpp = fit_mlp(t, None, max_distance=3, hidden=16, epochs=2, preview=True,
                   progress=False)  # fmt: skip
    assert mlpr.router_inputs and not mlp.router_inputs
    for pred in (mk, mlp, mlpr, mlpp):
        path = pred.save(tmp_path / f"{pred.kind}{pred.wants_preview}.npz")
        pred = load_predictor(path)
        full = pred.predict_trace(t)
        proj = pred.arrays["projection"] if pred.kind == "mlp" else None
        for n in range(t.num_tokens):
            if t.positions[n] == 0:
                pred.reset()
            for layer in range(4):
                h = pv = None
                if proj is not None:  # hidden whose projection is the sketch
                    h = t.sketch[n, layer].astype(np.float32) @ proj.T
                    pv = t.preview_sketch[n, layer].astype(np.float32) @ proj.T
                out = pred.observe(layer, t.experts[n, layer], h, preview=pv)
                assert sorted(out) == list(range(layer + 1, min(layer + 4, 4)))
                for target, s in out.items():
                    assert s.shape == (6,) and s.dtype == np.float32
                    assert ((0 <= s) & (s <= 1)).all()
                    np.testing.assert_allclose(
                        s, full[n, layer, target - layer - 1], atol=1e-4
                    )
    # a prefill chunk: [T, K] in, [T, E] out; the first row equals decode's
    mk.reset()
    out = mk.observe(0, t.experts[:5, 0])
    assert out[1].shape == (5, 6)
    np.testing.assert_allclose(out[1][0], mk.predict_trace(t)[0, 0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="mlp predictor needs hidden"):
        mlp.observe(0, t.experts[0, 0])
    with pytest.raises(ValueError, match="experts"):
        mk.observe(0, np.array([9]))


# ------------------------------------------------------------------- files


def _rewrite(src: Path, dst: Path, meta=None, drop=(), **arrays) -> Path:
    with np.load(src, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files if k not in drop}
    if meta is not None:
        members["meta.json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    members |= arrays
    with open(dst, "wb") as f:
        np.savez(f, **members)
    return dst


def test_predictor_file_errors(tmp_path):
    t = chain_trace(P=4, T=10)
    path = fit_markov(t, 2).save(tmp_path / "p.npz")
    p = load_predictor(path)
    assert isinstance(p, MarkovPredictor) and p.max_distance == 2
    meta = p.meta
    cfg = ModelConfig(
        arch="mixtral", vocab_size=10, hidden_size=8, num_layers=4, num_heads=1,
        num_kv_heads=1, head_dim=8, num_experts=6, top_k=1, expert_ffn=4,
        rms_norm_eps=1e-5, rope_theta=1e4, max_position=64,
    )  # fmt: skip
    load_predictor(path, cfg)  # the right model
    with pytest.raises(FormatError, match="made for a model with num_experts 6"):
        load_predictor(path, ModelConfig(**{**cfg.to_dict(), "num_experts": 8}))

    class FakeStore:
        model = cfg
        store_id = bytes(range(16))

    with pytest.raises(FormatError, match="traces of store 0000"):
        load_predictor(path, FakeStore())
    bad = _rewrite(path, tmp_path / "v.npz", meta=dict(meta, version=7))
    with pytest.raises(FormatError, match=r"v\.npz: meta.json: version is 7"):
        load_predictor(bad)
    bad = _rewrite(path, tmp_path / "k.npz", meta=dict(meta, kind="lstm"))
    with pytest.raises(FormatError, match="kind is 'lstm', expected one of"):
        load_predictor(bad)
    bad = _rewrite(path, tmp_path / "m.npz", drop=("o2_counts",))
    with pytest.raises(FormatError, match="member o2_counts is missing"):
        load_predictor(bad)
    bad = _rewrite(path, tmp_path / "s.npz", freq=np.zeros((4, 5), np.float32))
    with pytest.raises(FormatError, match=r"freq is float32\[4, 5\], expected"):
        load_predictor(bad)
    bad = _rewrite(path, tmp_path / "f.npz", mix=np.full((2, 5), np.nan, np.float32))
    with pytest.raises(FormatError, match="mix holds NaN"):
        load_predictor(bad)
    (tmp_path / "t.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"t\.npz: corrupt or truncated"):
        load_predictor(tmp_path / "t.npz")
    (tmp_path / "x.npz").write_bytes(b"hello")
    with pytest.raises(FormatError, match="not a mer-predictor file"):
        load_predictor(tmp_path / "x.npz")
    t.save(tmp_path / "trace.npz")  # a trace is not a predictor
    with pytest.raises(FormatError, match="format is 'mer-trace'"):
        load_predictor(tmp_path / "trace.npz")
    with pytest.raises(UsageError, match="no such predictor file"):
        load_predictor(tmp_path / "nope.npz")
    with np.load(path) as z:  # plain numpy reads it, no pickle
        assert json.loads(z["meta.json"].tobytes())["format"] == "mer-predictor"
    # preview inputs: a flag of mlps only, and their members must be there
    bad = _rewrite(path, tmp_path / "pk.npz", meta=dict(meta, preview_inputs=True))
    with pytest.raises(FormatError, match="preview_inputs is True for a markov"):
        load_predictor(bad)
    t = with_preview(t, np.ones(t.sketch.shape))
    kw = {"max_distance": 1, "hidden": 4, "epochs": 1, "progress": False}
    mp = fit_mlp(t, None, preview=True, **kw).save(tmp_path / "mp.npz")
    bad = _rewrite(mp, tmp_path / "pm.npz", drop=("preview_sd",))
    with pytest.raises(FormatError, match="member preview_sd is missing"):
        load_predictor(bad)
    with np.load(mp) as z:
        mmeta = json.loads(z["meta.json"].tobytes())
    bad = _rewrite(mp, tmp_path / "pf.npz", meta=dict(mmeta, preview_inputs=False))
    with pytest.raises(FormatError, match=r"w1 has \d+ inputs, expected S \+ 2E"):
        load_predictor(bad)


# ------------------------------------------------------ trace + simulation


def test_trace_records_router_lookahead(tmp_path, monkeypatch):
    """lookahead[n, l, d-1] = softmax(router_{l+d} @ rms_norm(residual_l,
    post_attention_layernorm_{l+d})), from the independent numpy model."""
    from mer_cli.quantize import quantize
    from mer_cli.trace import trace

    ck = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=4)
    store = quantize(ck, tmp_path / "s.mer", experts="f32", dense="f32", progress=False)
    t = trace(store, ["Once upon a time"], tmp_path / "t.npz", max_tokens=0,
              progress=False)  # fmt: skip
    assert t.meta["lookahead_depth"] == 3 and t.lookahead.shape[1:] == (4, 3, 4)
    seen = []
    plain = naive_model.rms_norm

    def spy(x, w, eps):
        seen.append(x)
        return plain(x, w, eps)

    monkeypatch.setattr(naive_model, "rms_norm", spy)
    nm = NaiveModel(ck)
    nm.run(t.tokens)
    eps = nm.cfg.rms_norm_eps
    for layer in range(4):
        residual = seen[2 * layer + 1]
        for d in (1, 2, 3):
            got = t.lookahead[:, layer, d - 1].astype(np.float64)
            if layer + d >= 4:
                assert not got.any()
                continue
            p = f"model.layers.{layer + d}."
            h = plain(residual, nm.w(p + "post_attention_layernorm.weight"), eps)
            want = naive_model.softmax(h @ nm.w(p + "block_sparse_moe.gate.weight").T)
            np.testing.assert_allclose(got, want, atol=2e-3)
    # a trace recorded without lookahead (as early version-1 files) still
    # loads and merges; the merge keeps the smaller depth
    bare = trace(store, ["Hi"], tmp_path / "b.npz", max_tokens=1, lookahead=0,
                 progress=False)  # fmt: skip
    back = Trace.load(tmp_path / "b.npz")
    assert back.lookahead is None and "lookahead" not in np.load(back.path).files
    m = merge([t, back])
    assert m.lookahead is None and m.meta["lookahead_depth"] == 0
    assert merge([t, t]).lookahead.shape == (2 * t.num_tokens, 4, 3, 4)
    meta = dict(bare.meta)
    del meta["lookahead_depth"]
    old = Trace(meta=meta, projection=bare.projection,
                **{k: v for k, v in bare.arrays().items() if k != "projection"})  # fmt: skip
    old.save(tmp_path / "old.npz")
    assert Trace.load(tmp_path / "old.npz").lookahead is None
    bad = Trace(meta=dict(t.meta), projection=t.projection,
                **{k: v for k, v in t.arrays().items() if k != "projection"})  # fmt: skip
    bad.lookahead = bad.lookahead[:, :, :2]
    with pytest.raises(FormatError, match="lookahead is float16"):
        bad.check()
    with pytest.raises(UsageError, match="--lookahead 4: expected"):
        trace(store, ["Hi"], tmp_path / "c.npz", lookahead=4, progress=False)


def test_simulation_uses_predictions():
    """Perfect predictions of the next three layers help the three-signal
    policy on random routing; none (or all-None entries) give the old figure."""
    E, L = 6, 4
    for seed in range(3):
        ex = np.random.default_rng(seed).integers(0, E, (300, L, 2))
        ex[:, :, 1] = (ex[:, :, 0] + 1) % E
        reqs = requests_of(ex, E).tolist()
        assert reqs[:3] == [int(ex[0, 0, 0]), int(ex[0, 0, 1]), E + int(ex[0, 1, 0])]
        oracle = np.zeros((300, L, 3, E), np.float32)
        for layer in range(L):
            for d in range(1, L - layer):
                oracle[:, layer, d - 1] = multi_hot(ex[:, layer + d], E)
        preds = predictions_of(oracle, 2)
        assert (
            len(preds) == len(reqs)
            and preds[1] is None
            and sorted(preds[0]) == [1, 2, 3]
        )
        base = simulate_policy(reqs, 6, L, E)
        assert simulate_policy(reqs, 6, L, E, [None] * len(reqs)) == base
        assert simulate_policy(reqs, 6, L, E, preds) > base + 0.01
