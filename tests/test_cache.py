"""Expert cache bookkeeping, eviction signals, hit-rate simulators, and budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mer_cli.cache import (
    LOADING,
    READY,
    ExpertCache,
    simulate,
    simulate_belady,
    simulate_lru,
)
from mer_cli.errors import ResourceError, UsageError
from mer_cli.memory import check_budget, peak_rss_bytes, resolve_ram_budget, rss_bytes


def routing_trace(L, E, K, T, skew, reuse, seed=0):
    """Keys of T tokens: per layer a Dirichlet(skew) popularity; with probability
    ``reuse`` a layer repeats its previous token's experts."""
    rng = np.random.default_rng(seed)
    pops = [rng.dirichlet(np.full(E, skew)) for _ in range(L)]
    prev = [None] * L
    out = []
    for _ in range(T):
        for layer in range(L):
            if prev[layer] is not None and rng.random() < reuse:
                s = prev[layer]
            else:
                s = rng.choice(E, K, replace=False, p=pops[layer])
            prev[layer] = s
            out += [layer * E + int(e) for e in s]
    return out


def optimal_hits(requests, slots):
    """Most hits any demand-caching policy gets: exhaustive over evictions."""
    best = 0

    def go(i, cache, hits):
        nonlocal best
        if i == len(requests):
            best = max(best, hits)
            return
        k = requests[i]
        if k in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < slots:
            go(i + 1, cache | {k}, hits)
        else:
            for v in cache:
                go(i + 1, (cache - {v}) | {k}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_matches_exhaustive_search():
    rng = np.random.default_rng(3)
    for _ in range(30):
        reqs = [int(x) for x in rng.integers(0, 5, 10)]
        slots = int(rng.integers(1, 4))
        assert simulate_belady(reqs, slots) * len(reqs) == pytest.approx(
            optimal_hits(reqs, slots)
        )


def test_lru_by_hand():
    # slots 2: a b a c b a  -> hits: a(3rd); c evicts b; b evicts a; a evicts c
    assert simulate_lru([1, 2, 1, 3, 2, 1], 2) == pytest.approx(1 / 6)
    assert simulate_lru([1, 2, 1, 3, 2, 1], 3) == pytest.approx(3 / 6)
    assert simulate_lru([], 2) == 0.0


@pytest.mark.parametrize(
    "skew, reuse",
    [(100.0, 0.0), (1.0, 0.0), (0.3, 0.3), (1.0, 0.3)],
)
def test_policy_between_lru_and_belady_on_routing_traces(skew, reuse):
    L, E, K = 8, 8, 2
    reqs = routing_trace(L, E, K, 120, skew, reuse)
    r = simulate(reqs, L * E // 4, L, E)
    assert r["belady"] >= r["policy"] and r["belady"] >= r["lru"]
    assert r["policy"] >= r["lru"] - 0.02, r


def test_policy_beats_lru_on_skewed_routing():
    L, E, K = 8, 8, 2
    reqs = routing_trace(L, E, K, 150, 1.0, 0.0, seed=1)
    r = simulate(reqs, L * E // 4, L, E)
    assert r["policy"] > r["lru"] + 0.05, r


def test_reuse_excess_is_measured_online():
    L, E, K = 6, 8, 2
    for reuse, lo, hi in ((0.0, -1.0, 0.08), (0.6, 0.3, 1.0)):
        c = ExpertCache(4, L, E)
        keys = routing_trace(L, E, K, 200, 100.0, reuse, seed=2)
        for i in range(0, len(keys), K):
            c.begin_layer(keys[i] // E)
            for k in keys[i : i + K]:
                c.on_request(k)
        assert lo <= c.reuse_excess <= hi, (reuse, c.reuse_excess)


def test_slots_in_use_loading_or_pinned_are_never_evicted():
    c = ExpertCache(3, num_layers=2, num_experts=4)
    c.begin_layer(0)
    for k in (0, 1, 2):
        c.on_request(k)
        s = c.victim()
        assert c.state[s] == 0  # empty slots first
        c.assign(s, k, READY)
    assert c.victim() is not None
    c.acquire(c.find(0))
    c.assign(c.find(1), 1, LOADING)
    c.pin(2)
    assert c.victim() is None  # in use, being read, pinned
    c.release(c.find(0))
    assert c.victim() == c.find(0)
    c.mark_ready(c.find(1))
    assert c.victim() in (c.find(0), c.find(1))
    assert set(c.resident()) == {0, 1, 2}


def test_distance_and_predictions_steer_eviction():
    L, E = 4, 4
    c = ExpertCache(2, L, E)
    # token 0 uses expert 0 of every layer once
    for layer in range(L):
        c.begin_layer(layer)
        c.on_request(layer * E)
    c.begin_layer(0)  # token 1 starts: layer 1 comes next, layer 3 last
    c.assign(0, 1 * E, READY)
    c.assign(1, 3 * E, READY)
    # same history: the expert whose layer comes later waits longer
    assert c.victim() == 1
    # the predictor says layer 1's expert 0 will not be used, layer 3's will
    c.set_predictions(3, [0], [1.0])
    c.set_predictions(1, [1], [0.9])
    assert c.value(3 * E) > c.value(1 * E)
    assert c.victim() == 0
    # a prefetch must not displace something worth more than it brings
    assert c.victim(below=float(c.value(1 * E))) is None
    # predictions for a layer expire when it is requested
    c.begin_layer(3)
    assert c.pred[3 * E] == 0.0


def test_neutral_without_predictor():
    # with no predictions, set_predictions never called: all pred are 0
    c = ExpertCache(2, 2, 2)
    assert not c.pred.any()


def test_budget_minimum_and_parsing():
    assert check_budget(10 * 4096, 4096) == 10
    with pytest.raises(ResourceError) as ei:
        check_budget(4095, 8192, where="store/x")
    msg = str(ei.value)
    assert "minimum budget is 8192 bytes" in msg and "store/x" in msg
    assert "dense weights" in msg
    assert resolve_ram_budget("6GiB") == 6 << 30
    assert resolve_ram_budget(None, config=123 << 20) == 123 << 20
    default = resolve_ram_budget(None)
    assert 0 < default < 1 << 50
    with pytest.raises(UsageError, match="not a size"):
        resolve_ram_budget("lots")


def test_rss_is_measured():
    before = rss_bytes()
    a = np.ones(64 << 20, np.uint8)  # 64 MiB touched
    after = rss_bytes()
    assert after - before > 48 << 20
    assert peak_rss_bytes() >= after
    del a


def test_exhaustive_helper_agrees_with_small_cases():
    # sanity of the independent reference itself
    assert optimal_hits([1, 2, 1, 2], 1) == 0
    assert optimal_hits([1, 2, 1, 2], 2) == 2
    assert all(
        optimal_hits(list(p), 2) >= simulate_lru(list(p), 2) * 4
        for p in itertools.permutations([1, 2, 3, 1])
    )


def test_budget_must_fit_beside_dense_weights():
    from mer_cli.memory import check_fits

    check_fits(4 << 30, 1 << 30, available=8 << 30)
    with pytest.raises(ResourceError, match=r"use --ram-budget 7\.0 GiB or less"):
        check_fits(8 << 30, 1 << 30, available=8 << 30)
