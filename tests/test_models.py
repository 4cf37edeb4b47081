"""The forward pass of all four architectures against the independent numpy model
(``tests/naive_model.py``), and the engine's own contracts: batch prefill equals
token-by-token decode, the MoE layer's use of the expert source, routing
records, embeddings, the KV cache and its limits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import make_hf_checkpoint
from naive_model import NaiveModel

from mer_cli.errors import UsageError
from mer_cli.experts import ResidentExperts
from mer_cli.formats.quant import QTensor
from mer_cli.formats.store import Store
from mer_cli.models.layers import ContextFullError, embed_rows
from mer_cli.quantize import quantize
from mer_cli.runtime import Engine, architecture

N_PROMPT = N_DECODE = 16

# (arch, config.json overrides): every feature the architectures differ in
VARIANTS = {
    "mixtral": ("mixtral", {}),
    "mixtral-swa": ("mixtral", {"sliding_window": 6}),
    "mixtral-tied": ("mixtral", {"tie_word_embeddings": True}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-norm": ("qwen2_moe", {"norm_topk_prob": True}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.5, "num_key_value_heads": 2}),
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest deviation relative to the reference's scale."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def make_store(tmp_path, arch, experts="f32", dense="f32", seed=0, **overrides):
    ck = make_hf_checkpoint(tmp_path / "ck", arch, seed=seed, **overrides)
    st = quantize(ck, tmp_path / "s.mer", experts=experts, dense=dense, progress=False)
    return ck, Store.open(st)


def greedy(engine: Engine, prompt, n: int):
    """Prefill ``prompt`` then decode ``n`` greedy tokens; all logits [T+n-1, V]."""
    rows = list(engine.prefill(prompt, all_logits=True))
    tokens = []
    for i in range(n):
        tokens.append(int(np.argmax(rows[-1])))
        if i < n - 1:
            rows.append(engine.decode_step(tokens[-1]))
    return np.array(rows), tokens


def prompt_ids(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, N_PROMPT)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_store_matches_naive_model(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    ck, store = make_store(tmp_path, arch, **overrides)
    if overrides.get("tie_word_embeddings"):
        assert not store.has("lm_head")
    engine = Engine(store, record_routing=True)
    prompt = prompt_ids(store.model)
    logits, tokens = greedy(engine, prompt, N_DECODE)
    ref = NaiveModel(ck).run(np.concatenate([prompt, tokens[:-1]]))
    assert logits.shape == ref.logits.shape == (N_PROMPT + N_DECODE - 1, 320)
    assert rel_err(logits, ref.logits) < 1e-4
    assert tokens == [int(t) for t in np.argmax(ref.logits[N_PROMPT - 1 :], axis=1)]
    # routing: the prefill, then each decode step, per layer
    ids = np.concatenate([r[1] for r in engine.routing], axis=1)  # [L, T+n-1, K]
    for layer in range(store.model.num_layers):
        np.testing.assert_array_equal(
            np.sort(ids[layer], axis=1), np.sort(ref.routing[layer], axis=1)
        )


def test_features_are_live(tmp_path):
    """The variants above really change the output (so the test can fail)."""
    base = make_store(tmp_path / "a", "mixtral")[1]
    swa = make_store(tmp_path / "b", "mixtral", sliding_window=6)[1]
    prompt = prompt_ids(base.model)
    a = Engine(base).prefill(prompt, all_logits=True)
    b = Engine(swa).prefill(prompt, all_logits=True)
    np.testing.assert_allclose(a[:6], b[:6], rtol=1e-5, atol=1e-5)
    assert rel_err(b[6:], a[6:]) > 1e-2
    plain = make_store(tmp_path / "c", "olmoe")[1]
    clip = make_store(tmp_path / "d", "olmoe", clip_qkv=0.5)[1]
    assert rel_err(Engine(clip).prefill(prompt), Engine(plain).prefill(prompt)) > 1e-2


@pytest.mark.parametrize("experts,dense", [("q4", "q8"), ("q8", "q8"), ("f16", "bf16")])
def test_prefill_equals_token_by_token(tmp_path, experts, dense):
    _, store = make_store(tmp_path, "qwen2_moe", experts, dense)
    prompt = prompt_ids(store.model)
    batch = Engine(store).prefill(prompt, all_logits=True)
    eng = Engine(store)
    steps = [eng.decode_step(int(t)) for t in prompt]
    assert rel_err(np.array(steps), batch) < 1e-5
    assert eng.timing.decode_tokens == N_PROMPT and eng.pos == N_PROMPT
    chunked = Engine(store)
    chunked.prefill_chunk = 5  # batches of 5, 5, 5 and 1 tokens
    assert rel_err(chunked.prefill(prompt, all_logits=True), batch) < 1e-5
    assert chunked.timing.prefill_tokens == N_PROMPT


class RecordingSource:
    """A non-resident source over the store that records the MoE layer's calls
    and yields experts in reverse order (as a cache would: whatever is ready)."""

    resident = False

    def __init__(self, store):
        self.inner = ResidentExperts(store)
        self.fetches, self.prefetches, self.yielded = [], [], []

    def fetch(self, layer, experts):
        self.fetches.append((layer, list(experts)))
        for e in reversed(list(experts)):
            self.yielded.append((layer, e))
            yield from self.inner.fetch(layer, [e])

    def prefetch(self, layer, experts, scores=None, kind="hint"):
        self.prefetches.append((layer, list(experts), list(scores)))

    def stats(self):
        return {"source": "recording"}

    def close(self):
        pass


def test_moe_uses_the_source_contract(tmp_path):
    _, store = make_store(tmp_path, "olmoe", "q4", "q8")
    cfg = store.model
    prompt = prompt_ids(cfg)
    src = RecordingSource(store)
    eng = Engine(store, src, record_routing=True)
    got = eng.prefill(prompt, all_logits=True)
    got = np.vstack([got, eng.decode_step(5)])
    ref = Engine(store)  # resident: no prefetch hints
    want = np.vstack([ref.prefill(prompt, all_logits=True), ref.decode_step(5)])
    # experts arrive in another order, but are summed in expert order: identical
    np.testing.assert_array_equal(got, want)
    # one fetch per layer per forward, for exactly the union of routed experts
    L = cfg.num_layers
    assert [f[0] for f in src.fetches] == list(range(L)) * 2
    for i, (layer, experts) in enumerate(src.fetches):
        ids = eng.routing[i // L][1][layer]  # [T, K] of that forward pass
        assert experts == sorted(set(ids.ravel().tolist()))
    assert len(src.yielded) == sum(len(e) for _, e in src.fetches)
    # router lookahead: a hint for layer l+1 while layer l runs
    assert [p[0] for p in src.prefetches] == list(range(1, L)) * 2
    for _layer, experts, scores in src.prefetches:
        assert 0 < len(experts) <= cfg.num_experts
        assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores)[::-1]
    # for the prefill the hint covers the next layer's union of top-k picks here
    hint = set(src.prefetches[0][1])
    actual = set(eng.routing[0][1][1].ravel().tolist())
    assert len(hint & actual) >= len(actual) // 2


def test_resident_source_gets_no_hints(tmp_path):
    _, store = make_store(tmp_path, "mixtral", "q4", "q8")
    src = RecordingSource(store)
    src.resident = True
    Engine(store, src).prefill([1, 2, 3])
    assert src.prefetches == [] and len(src.fetches) == store.model.num_layers


def test_routing_record_and_hook(tmp_path):
    _, store = make_store(tmp_path, "qwen3_moe")
    seen = []
    eng = Engine(
        store,
        record_routing=True,
        route_hook=lambda layer, h, ids, w: seen.append((layer, h.shape, ids, w)),
    )
    eng.prefill([5, 6, 7])
    eng.decode_step(8)
    assert [r[0].tolist() for r in eng.routing] == [[0, 1, 2], [3]]
    pos, ids, w = eng.routing[0]
    assert ids.shape == w.shape == (2, 3, store.model.top_k)
    np.testing.assert_allclose(w.sum(axis=2), 1, rtol=1e-6)  # norm_topk_prob
    assert [s[0] for s in seen] == [0, 1, 0, 1] and seen[0][1] == (3, 64)
    np.testing.assert_array_equal(seen[1][2], ids[1])


def test_routing_rules(tmp_path):
    _, store = make_store(tmp_path, "mixtral")
    logits = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-p, axis=1)[:, :2]
    pk = np.take_along_axis(p, top, 1)
    ids, w = architecture(store.model).route(logits)
    np.testing.assert_array_equal(ids, top)
    np.testing.assert_allclose(w, pk / pk.sum(1, keepdims=True), rtol=1e-6)
    cfg = replace(store.model, arch="qwen2_moe", norm_topk_prob=False)
    ids, w = architecture(cfg).route(logits)
    np.testing.assert_allclose(w, pk, rtol=1e-6)  # raw probabilities
    with pytest.raises(UsageError, match="no forward pass"):
        architecture(replace(store.model, arch="deepseek_v3"))


def test_q8_embedding_rows(tmp_path):
    _, store = make_store(tmp_path, "mixtral", "q4", "q8")
    table = store.tensor("embed")
    assert isinstance(table, QTensor)
    ids = np.array([3, 0, 319, 3])
    np.testing.assert_array_equal(embed_rows(table, ids), table.dequantize()[ids])


def test_kv_cache_f16_and_limits(tmp_path):
    _, store = make_store(tmp_path, "qwen3_moe")
    prompt = prompt_ids(store.model)
    a = Engine(store, ctx=32).prefill(prompt, all_logits=True)
    half = Engine(store, ctx=32, kv_dtype="f16")
    assert half.cache.k.dtype == np.float16
    assert rel_err(half.prefill(prompt, all_logits=True), a) < 1e-2
    eng = Engine(store, ctx=17)
    assert eng.cache.k.shape == (2, 17, 2, 32)
    eng.prefill(prompt)
    eng.decode_step(1)
    with pytest.raises(
        ContextFullError, match=r"17 positions used \+ 1 new tokens > --ctx 17"
    ):
        eng.decode_step(2)
    assert eng.pos == 17
    eng.reset()
    with pytest.raises(ContextFullError):
        eng.prefill(np.arange(18))
    with pytest.raises(UsageError, match="max_position"):
        Engine(store, ctx=513)
    assert Engine(store).ctx == 512  # min(max_position, 4096)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        eng.prefill([320])


def test_stats_count_tokens(tmp_path):
    _, store = make_store(tmp_path, "olmoe", "q4", "q8")
    eng = Engine(store)
    eng.prefill(np.arange(10))
    for t in range(4):
        eng.decode_step(t)
    s = eng.stats()
    assert s["prefill_tokens"] == 10 and s["decode_tokens"] == 4
    assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0
    assert s["source"]["expert_requests"] > 0
    eng.reset_stats()
    assert eng.stats()["decode_tokens"] == 0 and eng.stats()["decode_tok_s"] is None
