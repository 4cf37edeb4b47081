"""The cache replay with prefetch (``simulate_prefetch``) and the hit-rate table
that reports it beside LRU, the demand-only policy and Belady's MIN."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mer_cli.cache import (
    NO_SLOT,
    simulate_belady,
    simulate_lru,
    simulate_policy,
    simulate_prefetch,
)
from mer_cli.train_predictor import (
    hit_rate_table,
    hit_rates,
    predictions_of,
    requests_of,
)


def routing(N, L, E, K, seed, skew=1.0, never=()):
    """int64 ``[N, L, K]`` distinct experts per (token, layer) from a skewed
    per-layer popularity; experts in ``never`` are never chosen."""
    rng = np.random.default_rng(seed)
    allowed = np.array([e for e in range(E) if e not in never])
    out = np.zeros((N, L, K), np.int64)
    for layer in range(L):
        pop = rng.dirichlet(np.full(len(allowed), skew))
        for n in range(N):
            out[n, layer] = rng.choice(allowed, K, replace=False, p=pop)
    return out


def next_visit_predictions(experts, E, scores=None):
    """Per request: the next visit's experts (layer l+1, or layer 0 of the next
    token) with probability 1 -- or ``scores(n, layer)`` ``[E]`` -- on the
    first request of each visit; nothing after the last visit."""
    N, L, K = experts.shape
    out = []
    for n in range(N):
        for layer in range(L):
            j, m = (layer + 1) % L, n + (layer + 1) // L
            if m < N:
                p = np.zeros(E, np.float32)
                p[experts[m, j]] = 1.0
                out.append({j: p if scores is None else scores(m, j)})
            else:
                out.append(None)
            out.extend([None] * (K - 1))
    return out


def check_log(log, slots, K, E, depth, run):
    """Replay the event log with a plain set: residency, slot count, what may
    be evicted, and an independent recount of every counter of ``run``."""
    resident: set[int] = set()
    pending: set[int] = set()  # prefetched, not yet resolved
    hits = misses = used = wasted = reads = 0
    visit: tuple = ()
    issued = 0
    for ev in log:
        if ev[0] == "visit":
            _, layer, visit = ev
            assert len(visit) == K and all(k // E == layer for k in visit)
            for k in [k for k in pending if k // E == layer]:
                pending.discard(k)
                used += k in visit
                wasted += k not in visit
            issued = 0
            continue
        kind, key, old = ev
        if kind == "hit":
            assert key in resident and key in visit
            hits += 1
            continue
        assert key not in resident
        if old != NO_SLOT:
            assert old in resident and old not in visit, ev  # held by the compute
            resident.discard(old)
            if old in pending:
                pending.discard(old)
                wasted += 1
        else:
            assert len(resident) < slots
        resident.add(key)
        assert len(resident) <= slots
        if kind == "miss":
            assert key in visit
            misses += 1
        else:
            assert kind == "prefetch" and key // E != visit[0] // E
            pending.add(key)
            reads += 1
            issued += 1
            assert issued <= depth
    assert (run.hits, run.misses) == (hits, misses)
    assert (run.prefetch_reads, run.prefetch_used, run.prefetch_wasted) == (
        reads,
        used,
        wasted,
    )
    assert run.reads == misses + reads


def test_hand_worked_perfect_predictions():
    # L 3, E 2, K 1, two slots; token 0 uses expert 0 of every layer, token 1
    # expert 1: keys 0 2 4 1 3 5, all distinct, so MIN hits nothing. With the
    # next visit predicted, the first visit misses and every later expert is
    # prefetched one visit ahead over the expert of the visit before.
    ex = np.array([[[0], [0], [0]], [[1], [1], [1]]])
    reqs = requests_of(ex, 2).tolist()
    assert reqs == [0, 2, 4, 1, 3, 5]
    log: list = []
    r = simulate_prefetch(
        reqs, 2, 3, 2, next_visit_predictions(ex, 2), top_k=1, log=log
    )
    assert [e for e in log if e[0] != "visit"] == [
        ("miss", 0, NO_SLOT),
        ("prefetch", 2, NO_SLOT),
        ("hit", 2, NO_SLOT),
        ("prefetch", 4, 0),
        ("hit", 4, NO_SLOT),
        ("prefetch", 1, 2),
        ("hit", 1, NO_SLOT),
        ("prefetch", 3, 4),
        ("hit", 3, NO_SLOT),
        ("prefetch", 5, 1),
        ("hit", 5, NO_SLOT),
    ]
    assert (r.hits, r.misses, r.prefetch_reads, r.prefetch_used) == (5, 1, 5, 5)
    assert (r.prefetch_wasted, r.tokens, r.reads) == (0, 2, 6)
    assert r.reads_per_token == 3.0 and r.wasted_share == 0.0
    assert simulate_belady(reqs, 2) == 0.0  # prefetch beats the demand optimum


@pytest.mark.parametrize("calibrate", [True, False])
def test_perfect_predictions_ample_slots_read_each_expert_once(calibrate):
    N, L, E, K = 40, 4, 6, 2
    ex = routing(N, L, E, K, seed=0)
    reqs = requests_of(ex, E).tolist()
    r = simulate_prefetch(
        reqs, L * E, L, E, next_visit_predictions(ex, E), top_k=K, calibrate=calibrate
    )
    # only the first visit misses; every expert is read once, never wasted
    assert r.misses == K and r.hit_rate == pytest.approx(1 - K / len(reqs))
    assert r.reads == len(set(reqs))
    assert r.prefetch_wasted == 0 and r.prefetch_used == r.prefetch_reads
    assert r.tokens == N


def test_perfect_predictions_two_visits_of_slots_read_every_request():
    # 2K slots hold the visit being computed and the one prefetched for next;
    # with L >= 3 no expert survives to be asked again, so every request is
    # one read, and all but the first visit's are prefetched hits
    N, L, E, K = 30, 4, 6, 2
    ex = routing(N, L, E, K, seed=1)
    reqs = requests_of(ex, E).tolist()
    log: list = []
    preds = next_visit_predictions(ex, E)
    r = simulate_prefetch(reqs, 2 * K, L, E, preds, top_k=K, log=log)
    check_log(log, 2 * K, K, E, K, r)
    assert r.misses == K and r.reads == len(reqs)
    assert r.prefetch_used == len(reqs) - K and r.prefetch_wasted == 0
    # the demand optimum with the same slots does far worse
    assert simulate_belady(reqs, 2 * K) < r.hit_rate - 0.3


def test_wrong_predictions_cost_exactly_their_reads():
    # expert E-1 is never used but predicted with certainty for the next
    # layer at every visit; with every expert fitting, demand is untouched
    # (each used expert misses once) and each (layer, E-1) is read once,
    # wasted at its layer's next visit -- except the last visit's prediction
    # for layer 0, never made (no next token)
    N, L, E, K = 25, 4, 6, 2
    ex = routing(N, L, E, K, seed=2, never=(E - 1,))
    reqs = requests_of(ex, E).tolist()

    def wrong(m, j):
        p = np.zeros(E, np.float32)
        p[E - 1] = 1.0
        return p

    preds = next_visit_predictions(ex, E, wrong)
    log: list = []
    r = simulate_prefetch(
        reqs, L * E, L, E, preds, top_k=K, threshold=0.0, calibrate=False, log=log
    )
    check_log(log, L * E, K, E, K, r)
    demand = simulate_prefetch(reqs, L * E, L, E, None, top_k=K)
    assert r.hits == demand.hits and r.misses == len(set(reqs))
    assert r.prefetch_reads == r.prefetch_wasted == L and r.prefetch_used == 0
    assert r.reads == len(set(reqs)) + L and r.wasted_share == 1.0


def test_calibration_turns_wrong_predictions_off():
    # the live throttle's calibration learns that these hints are never used:
    # after a first read per layer only probes (at most one per 32 demand
    # misses, the interval doubling after each wasted probe) are read
    N, L, E, K = 200, 4, 8, 2
    ex = routing(N, L, E, K, seed=3, never=(E - 1,))
    reqs = requests_of(ex, E).tolist()

    def wrong(m, j):
        p = np.zeros(E, np.float32)
        p[E - 1] = 0.9
        return p

    slots = 8
    r = simulate_prefetch(
        reqs, slots, L, E, next_visit_predictions(ex, E, wrong), top_k=K
    )
    assert r.prefetch_used == 0
    assert r.prefetch_reads - r.probes <= L  # once per layer, then refused
    assert r.probes <= r.misses // 32
    # the demand figures barely move: the probes evicted a handful of experts
    demand = simulate_prefetch(reqs, slots, L, E, None, top_k=K)
    assert abs(r.hit_rate - demand.hit_rate) <= 0.01


@pytest.mark.parametrize(
    "slots, threshold, depth", [(3, 0.5, 2), (5, 0.0, 1), (9, 0.3, 4), (20, 0.6, 2)]
)
def test_noisy_predictions_accounting_and_slots(slots, threshold, depth):
    N, L, E, K = 60, 4, 8, 2
    ex = routing(N, L, E, K, seed=4, skew=0.5)
    rng = np.random.default_rng(5)

    def noisy(m, j):  # the true experts often, plus noise
        p = rng.random(E).astype(np.float32) * 0.6
        p[ex[m, j]] += rng.random(K).astype(np.float32) * 0.6
        return np.minimum(p, 1.0)

    reqs = requests_of(ex, E).tolist()
    log: list = []
    preds = next_visit_predictions(ex, E, noisy)
    r = simulate_prefetch(
        reqs, slots, L, E, preds, top_k=K, threshold=threshold, depth=depth, log=log
    )
    check_log(log, slots, K, E, depth, r)
    assert r.prefetch_reads > 0 and r.requests == len(reqs) and r.tokens == N


def optimal_hits(requests, slots):
    """Most hits any demand-paging policy gets: exhaustive over evictions
    (memoized on position and cache contents)."""

    @functools.cache
    def go(i, cache):
        if i == len(requests):
            return 0
        k = requests[i]
        if k in cache:
            return 1 + go(i + 1, cache)
        if len(cache) < slots:
            return go(i + 1, cache | {k})
        return max(go(i + 1, (cache - {v}) | {k}) for v in cache)

    return go(0, frozenset())


def test_without_hints_it_is_a_demand_pager_below_min():
    # no predictions: nothing is read ahead, so the exhaustive demand optimum
    # (and MIN, which equals it) bounds the hits; one slot with top-2 works
    # by giving up the expert served first
    rng = np.random.default_rng(6)
    L, E, K = 3, 3, 2
    for _ in range(25):
        N = int(rng.integers(1, 4))
        ex = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K)
        reqs = requests_of(ex, E).tolist()
        slots = int(rng.integers(1, 5))
        log: list = []
        r = simulate_prefetch(reqs, slots, L, E, None, top_k=K, log=log)
        best = optimal_hits(reqs, slots)
        assert r.hits <= best == round(simulate_belady(reqs, slots) * len(reqs))
        assert r.prefetch_reads == 0 and r.reads == r.misses
        resident: set[int] = set()
        for ev in log:
            if ev[0] in ("miss", "hit"):
                resident.discard(ev[2])
                resident.add(ev[1])
                assert len(resident) <= slots


def test_requests_must_come_in_visits_of_top_k():
    with pytest.raises(ValueError, match="expected top_k=2 distinct experts"):
        simulate_prefetch([0, 0, 1, 2], 4, 2, 4, None, top_k=2)
    with pytest.raises(ValueError, match="one layer per visit"):
        simulate_prefetch([0, 5], 4, 2, 4, None, top_k=2)


def test_hit_rates_rows_and_table():
    N, L, E, K = 50, 4, 6, 2
    ex = routing(N, L, E, K, seed=7)
    reqs = requests_of(ex, E).tolist()
    scores = np.zeros((N, L, 3, E), np.float32)  # perfect, next 1..3 layers
    for layer in range(L):
        for d in range(1, L - layer):
            scores[np.arange(N)[:, None], layer, d - 1, ex[:, layer + d]] = 1.0
    rows = hit_rates(ex, E, [0.25, 0.5], {"oracle": scores}, threshold=0.5)
    preds = predictions_of(scores, K)
    for row in rows:
        slots = row["slots"]
        assert row["lru"] == pytest.approx(simulate_lru(reqs, slots))
        assert row["belady"] == pytest.approx(simulate_belady(reqs, slots))
        assert row["policy+oracle"] == simulate_policy(reqs, slots, L, E, preds)
        run = simulate_prefetch(reqs, slots, L, E, preds, top_k=K)
        assert row["prefetch+oracle"] == run.hit_rate
        assert row["reads"]["prefetch+oracle"] == pytest.approx(run.reads / N)
        assert row["wasted"] == {"prefetch+oracle": run.wasted_share}
        # a demand-only row reads exactly its misses
        misses = len(reqs) - round(row["belady"] * len(reqs))
        assert row["reads"]["belady"] == pytest.approx(misses / N)
        assert row["prefetch+oracle"] > row["policy+oracle"]
    text = "\n".join(hit_rate_table(rows, "oracle"))
    r = rows[0]
    line = next(x for x in text.splitlines() if x.startswith("prefetch+oracle"))
    assert f"{100 * r['prefetch+oracle']:.1f}%" in line
    assert f"{r['reads']['prefetch+oracle']:.2f}" in line
    assert "belady (MIN)" in text
    share = 100 * r["prefetch+oracle"] / r["belady"]
    assert f"prefetch+oracle {share:.1f}% of MIN's hit rate" in text
