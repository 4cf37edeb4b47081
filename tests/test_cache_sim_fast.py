"""The compiled cache replays (``mer_cli.cache_sim``) against the replays with
``ExpertCache`` and ``PrefetchThrottle`` themselves: every counter and every
logged event equal, on random routing with random predictions."""

from __future__ import annotations

import numpy as np
import pytest

from mer_cli.cache import (
    CacheRun,
    ExpertCache,
    _simulate_policy_reference,
    _simulate_prefetch_reference,
    simulate_policy,
    simulate_prefetch,
)
from mer_cli.cache_sim import (
    NEVER,
    _np_sum,
    _power_tables,
    policy_hints,
    prefetch_hints,
)
from mer_cli.train_predictor import hit_rates, predictions_of, requests_of


def routing(N, L, E, K, rng, skew=0.7, reuse=0.4):
    """int64 ``[N, L, K]``: distinct experts per (token, layer) from a skewed
    popularity, half of them kept from the previous token with prob. ``reuse``."""
    pop = rng.dirichlet(np.full(E, skew), size=L)
    out = np.zeros((N, L, K), np.int64)
    for n in range(N):
        for layer in range(L):
            pick = rng.choice(E, K, replace=False, p=pop[layer])
            if n and rng.random() < reuse:
                keep = out[n - 1, layer, : K // 2]
                rest = [e for e in pick if e not in keep]
                pick = np.concatenate([keep, rest])[:K]
            out[n, layer] = pick
    return out


def random_predictions(ex, E, rng, zeros=0.6):
    """Per request, a dict {target layer: f32 [E]} on each visit's first
    request (some visits None or empty): coarse values (ties), many zeros,
    some negative or above 1, targets up to 3 ahead -- the same layer, and
    (wrapping) earlier ones, included."""
    N, L, K = ex.shape
    out = []
    for n in range(N):
        for layer in range(L):
            r = rng.random()
            if r < 0.1:
                out.append(None)
            elif r < 0.15:
                out.append({})
            else:
                d = {}
                for t in rng.permutation(L)[: rng.integers(1, min(L, 4) + 1)]:
                    s = rng.integers(-1, 6, E) / 4.0
                    s[rng.random(E) < zeros] = 0.0
                    if rng.random() < 0.5:  # the true experts, likely
                        m = n + (t <= layer)
                        if m < N:
                            s[ex[m, t]] = rng.choice([0.5, 0.75, 1.0, 1.5])
                    d[int(t)] = s.astype(np.float32)
                out.append(d)
            out.extend([None] * (K - 1))
    return out


def same_prefetch(reqs, slots, L, E, preds, **kw):
    log_fast: list = []
    log_ref: list = []
    fast = simulate_prefetch(reqs, slots, L, E, preds, log=log_fast, **kw)
    ref = _simulate_prefetch_reference(reqs, slots, L, E, preds, log=log_ref, **kw)
    assert fast == ref
    assert log_fast == log_ref
    return fast


# (L, E, K): tiny, K = 1, K = 8 (the pairwise sums of numpy past 7 terms),
# the built-in model's shape
SHAPES = [(3, 4, 1), (4, 8, 2), (2, 10, 8), (6, 16, 2)]


@pytest.mark.parametrize("L, E, K", SHAPES)
def test_prefetch_replay_equals_the_class_replay(L, E, K):
    rng = np.random.default_rng(L * 100 + E * 10 + K)
    ex = routing(40, L, E, K, rng)
    reqs = requests_of(ex, E).tolist()
    preds = random_predictions(ex, E, rng)
    runs = []
    for slots in sorted({1, 2, K, K + 1, L * E // 4, L * E // 2, L * E, L * E + 3}):
        slots = max(slots, 1)
        for threshold in (0.0, 0.5, 0.9):
            runs.append(same_prefetch(reqs, slots, L, E, preds, top_k=K,
                                      threshold=threshold))  # fmt: skip
        runs.append(same_prefetch(reqs, slots, L, E, preds, top_k=K, depth=1,
                                  candidates=E, calibrate=False))  # fmt: skip
        runs.append(same_prefetch(reqs, slots, L, E, None, top_k=K))
    # the comparison covered prefetches, wasted ones and evictions of them
    assert sum(r.prefetch_reads for r in runs) > 0
    assert sum(r.prefetch_used for r in runs) > 0
    assert sum(r.prefetch_wasted for r in runs) > 0


def test_probes_and_calibration_windows_equal():
    # confident wrong hints for one expert never used: calibration turns them
    # off after a window, then only probes are read, the interval doubling;
    # long enough for every window to wrap many times
    L, E, K = 4, 8, 2
    rng = np.random.default_rng(11)
    N = 300
    ex = routing(N, L, E - 1, K, rng)  # expert E-1 never used
    reqs = requests_of(ex, E).tolist()
    scores = np.zeros((N, L, 3, E), np.float32)
    scores[..., E - 1] = 0.9
    scores[..., 0] = rng.random((N, L, 3)).astype(np.float32)
    preds = predictions_of(scores, K)
    probes = 0
    for slots, threshold in [(6, 0.5), (8, 0.5), (12, 0.3), (8, 0.95)]:
        r = same_prefetch(reqs, slots, L, E, preds, top_k=K, threshold=threshold)
        probes += r.probes
    assert probes >= 4


def test_freq_and_recency_parameters_pass_through():
    L, E, K = 4, 8, 2
    rng = np.random.default_rng(12)
    ex = routing(60, L, E, K, rng)
    reqs = requests_of(ex, E).tolist()
    preds = random_predictions(ex, E, rng)
    kw = dict(freq_decay=0.9, recency_decay=0.5, weights=(1.0, 2.0, 0.5))
    same_prefetch(reqs, 9, L, E, preds, top_k=K, **kw)
    fast = simulate_policy(reqs, 9, L, E, preds, **kw)
    assert fast == _simulate_policy_reference(reqs, 9, L, E, preds, **kw)


@pytest.mark.parametrize("L, E, K", SHAPES)
def test_policy_replay_equals_the_class_replay(L, E, K):
    rng = np.random.default_rng(L * 7 + E + K)
    ex = routing(30, L, E, K, rng)
    reqs = requests_of(ex, E).tolist()
    preds = random_predictions(ex, E, rng)
    for slots in sorted({1, 2, K + 1, L * E // 4, L * E // 2, L * E}):
        slots = max(slots, 1)
        for p in (None, preds):
            fast = simulate_policy(reqs, slots, L, E, p)
            assert fast == _simulate_policy_reference(reqs, slots, L, E, p)


def test_policy_on_requests_not_in_visits():
    # any key sequence: repeats within a layer start a new token, layers out
    # of order too; predictions on arbitrary requests
    rng = np.random.default_rng(13)
    L, E = 3, 5
    for _ in range(6):
        reqs = rng.integers(0, L * E, 300).tolist()
        preds = [
            None
            if rng.random() < 0.7
            else {int(t): (rng.random(E) * 1.4 - 0.2) for t in rng.permutation(L)[:2]}
            for _ in reqs
        ]
        for slots in (1, 3, 8):
            fast = simulate_policy(reqs, slots, L, E, preds)
            assert fast == _simulate_policy_reference(reqs, slots, L, E, preds)


def test_packed_hints_are_what_the_sequence_gives():
    L, E, K = 4, 8, 2
    rng = np.random.default_rng(14)
    ex = routing(30, L, E, K, rng)
    reqs = requests_of(ex, E).tolist()
    preds = random_predictions(ex, E, rng)
    pol = policy_hints(preds, len(reqs), L, E)
    pre = prefetch_hints(reqs, preds, L, E, K)
    for slots in (3, 9, 16):
        assert simulate_policy(reqs, slots, L, E, pol) == simulate_policy(
            reqs, slots, L, E, preds
        )
        assert simulate_prefetch(reqs, slots, L, E, pre, top_k=K) == (
            _simulate_prefetch_reference(reqs, slots, L, E, preds, top_k=K)
        )


def test_hit_rates_equal_with_the_class_replays(monkeypatch):
    # the hit-rate table of train-predictor, with the reference replays
    # swapped in: the same rows to the last bit
    L, E, K, N = 4, 8, 2, 40
    rng = np.random.default_rng(15)
    ex = routing(N, L, E, K, rng)
    scores = {
        "a": rng.random((N, L, 3, E)).astype(np.float32) ** 4,
        "b": (rng.random((N, L, 2, E)) > 0.7).astype(np.float32),
    }
    fast = hit_rates(ex, E, [0.1, 0.25, 0.5], scores)
    import mer_cli.cache as cache
    from mer_cli import cache_sim

    packed_from = {}  # id of the packed hints -> the per-request dicts

    def remember(pack, arg):
        def packs(*a, **kw):
            h = pack(*a, **kw)
            packed_from[id(h)] = a[arg]
            return h

        return packs

    calls = []

    def ref_policy(reqs, slots, L, E, p=None, **kw):
        calls.append("policy")
        p = None if p is None else packed_from[id(p)]
        return _simulate_policy_reference(reqs, slots, L, E, p, **kw)

    def ref_prefetch(reqs, slots, L, E, p, **kw):
        calls.append("prefetch")
        p = packed_from[id(p)]
        return _simulate_prefetch_reference(reqs, slots, L, E, p, **kw)

    # policy_hints(predictions, ...), prefetch_hints(requests, predictions, ...)
    for name, arg in (("policy_hints", 0), ("prefetch_hints", 1)):
        monkeypatch.setattr(cache_sim, name, remember(getattr(cache_sim, name), arg))
    monkeypatch.setattr(cache, "simulate_policy", ref_policy)
    monkeypatch.setattr(cache, "simulate_prefetch", ref_prefetch)
    assert hit_rates(ex, E, [0.1, 0.25, 0.5], scores) == fast
    assert calls.count("policy") == 9 and calls.count("prefetch") == 6


def test_empty_and_one_slot():
    assert simulate_policy([], 2, 2, 2) == 0.0
    assert simulate_prefetch([], 2, 2, 2, None, top_k=1) == CacheRun()
    assert simulate_policy([0, 0, 1], 1, 1, 2) == _simulate_policy_reference(
        [0, 0, 1], 1, 1, 2
    )


def test_bad_requests_and_mismatched_hints_are_refused():
    with pytest.raises(ValueError, match="expected top_k=2 distinct experts"):
        simulate_prefetch([0, 0, 1, 2], 4, 2, 4, None, top_k=2)
    with pytest.raises(ValueError, match="one layer per visit"):
        simulate_prefetch([0, 1, 2, 5], 4, 2, 4, None, top_k=2)
    with pytest.raises(ValueError, match="one layer per visit"):
        simulate_prefetch([0, 1, 2, 5, 3], 4, 2, 4, None, top_k=2)  # a short tail
    with pytest.raises(ValueError, match=r"requests\[1\] = 8: expected a key"):
        simulate_policy([0, 8], 4, 2, 4)
    with pytest.raises(ValueError, match=r"requests\[2\] = -1"):
        simulate_prefetch([0, 1, -1], 4, 2, 4, None, top_k=1)
    with pytest.raises(ValueError, match="expected \\(4,\\) for a layer in 0..1"):
        simulate_policy([0, 1], 4, 2, 4, [{2: np.ones(4)}, None])
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        simulate_policy([0, 1], 4, 2, 4, [{1: np.ones(3)}, None])
    h = prefetch_hints([0, 1], [None, None], 2, 4, top_k=1)
    with pytest.raises(ValueError, match="pack them with these"):
        simulate_prefetch([0, 1], 4, 2, 4, h, top_k=1, candidates=3)
    p = policy_hints([None], 1, 2, 4)
    with pytest.raises(ValueError, match="pack them for these requests"):
        simulate_policy([0, 1], 4, 2, 4, p)
    with pytest.raises(ValueError, match="at least one slot"):
        simulate_policy([0], 0, 2, 4)


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(16)
    for n in list(range(0, 140)) + [255, 256, 257, 300, 1000, 1029]:
        a = rng.random(n + 3) * 10.0 ** rng.uniform(-6, 6, n + 3)
        assert _np_sum(a, 3, n + 3) == float(np.sum(a[3:]))


def test_tables_hold_the_class_powers():
    # the never-requested mark and every power the class computes
    assert (ExpertCache(2, 3, 4).last_token == NEVER).all()
    t = _power_tables(0.97, 0.2, 50, True)
    c = ExpertCache(2, 3, 4)
    for n in (0, 1, 7, 51):
        assert t[0, n] == c.decay ** int(n)
        assert t[1, n] == (c.decay ** np.array([n, n], np.int64))[0]
        assert t[2, n] == c.decay ** np.int64(n)
        assert t[3, n] == (c.recency_decay ** np.array([n], np.int64))[0]
        assert t[5, n] == c.recency_decay ** np.int64(n)
    big = -NEVER - 1 + 5
    assert t[6, 5] == c.recency_decay ** np.int64(big)
