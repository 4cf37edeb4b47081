"""Compiled replays behind :func:`~mer_cli.cache.simulate_policy` and
:func:`~mer_cli.cache.simulate_prefetch`.

The replays drive :class:`~mer_cli.cache.ExpertCache` (and, with prefetch, a
:class:`~mer_cli.prefetch.PrefetchThrottle` at a fixed threshold) once per
request; done with the classes, ``mer train-predictor``'s table of a 6k-token
trace took 42 s, nearly all of it numpy's overhead on arrays of a few dozen
slots (3 s here). The kernels keep the same state in flat arrays and do the
same arithmetic in the same order, so every count equals the class-based
replay's (``mer_cli.cache._simulate_*_reference``, which the tests compare
them with):

* the eviction value is :meth:`ExpertCache.value`'s formula term by term; the
  numpy sum in :meth:`ExpertCache.begin_layer` is summed as numpy does
  (pairwise, eight accumulators from eight terms on);
* every power ``decay ** n`` is looked up in a table computed beforehand with
  the very expression the class evaluates (a Python float power in
  ``on_request``, a numpy array power in ``value`` of several keys, a numpy
  scalar power in ``value`` of one key): numpy may use a vectorized ``pow``
  whose last bit differs from the C library's;
* the throttle's calibration windows are ring buffers whose running sums take
  the same additions and subtractions as ``prefetch._Window``.

Predictions are packed once (:func:`policy_hints`, :func:`prefetch_hints`;
the prefetch candidates are chosen by :func:`mer_cli.prefetch.ranked`, as
live) and can be reused across cache sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from numba import njit

from mer_cli import prefetch
from mer_cli.kernels.config import JIT

#: ``ExpertCache.last_token`` of an expert never requested
NEVER = -(10**6)

EMPTY, READY = 0, 2  # ExpertCache slot states (a replay never has LOADING ones)

# int state, float state, parameters
_TOKEN, _LAYER = 0, 1
_PREV_N, _PREV_F, _REUSED = 0, 1, 2
_W_R, _W_F, _W_P, _DECAY, _ALPHA = 0, 1, 2, 3, 4
# power tables (rows): decay ** n as on_request, value of many keys, value of
# one key; recency_decay ** n as value of many keys, of one key (two rows
# each: n from 0, n from REC_HI)
_DEC_PY, _DEC_ARR, _DEC_ONE, _REC_ARR, _REC_ONE = 0, 1, 2, 3, 5
_REC_HI = -NEVER - 1  # recency exponents of never-requested experts start here

# log events
_EV_VISIT, _EV_HIT, _EV_MISS, _EV_PREFETCH = 0, 1, 2, 3
_EV_NAMES = ("visit", "hit", "miss", "prefetch")


# ===================================================================== tables


@functools.lru_cache(maxsize=4)
def _power_tables(
    decay: float, recency_decay: float, tokens: int, one_key: bool
) -> np.ndarray:
    """f64 ``[7, tokens + 2]``: the powers the replay of ``tokens`` tokens
    can ask for (exponents ``0..tokens+1``; recency also from ``_REC_HI``),
    each computed by the expression ``ExpertCache`` evaluates for it."""
    m = tokens + 2
    n = np.arange(m, dtype=np.int64)
    hi = n + _REC_HI
    t = np.zeros((7, m))
    t[_DEC_PY] = [decay ** int(i) for i in range(m)]
    t[_DEC_ARR] = decay**n
    t[_REC_ARR] = recency_decay**n
    t[_REC_ARR + 1] = recency_decay**hi
    if one_key:  # numpy scalar powers: only simulate_prefetch values one key
        t[_DEC_ONE] = [decay ** np.int64(i) for i in range(m)]
        t[_REC_ONE] = [recency_decay ** np.int64(i) for i in range(m)]
        t[_REC_ONE + 1] = [recency_decay ** np.int64(i) for i in hi.tolist()]
    t.flags.writeable = False
    return t


@njit(**JIT)
def _dec(tabs, row, n):
    if n < 0 or n >= tabs.shape[1]:
        raise IndexError("cache replay: decay exponent outside its table")
    return tabs[row, n]


@njit(**JIT)
def _rec(tabs, row, n):
    m = tabs.shape[1]
    if 0 <= n < m:
        return tabs[row, n]
    if 0 <= n - _REC_HI < m:
        return tabs[row + 1, n - _REC_HI]
    raise IndexError("cache replay: recency exponent outside its table")


@njit(**JIT)
def _sum_block(a, lo, hi):
    """numpy's pairwise sum of ``a[lo:hi]``, at most 128 terms: plain below
    8, else 8 accumulators added as a tree."""
    n = hi - lo
    if n < 8:
        res = 0.0
        for i in range(lo, hi):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = lo + 8
    end = lo + n - n % 8
    while i < end:
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < hi:
        res += a[i]
        i += 1
    return res


@njit(**JIT)
def _np_sum(a, lo, hi):
    """``float(np.sum(a[lo:hi]))`` for f64 ``a``: numpy's pairwise summation
    (blocks of at most 128 terms; above, the two halves' sums, the first half
    a multiple of 8 long). The recursion runs on an explicit stack: numba's
    cache does not load recursive functions safely."""
    if hi - lo <= 128:
        return _sum_block(a, lo, hi)
    # frames: range, stage (0: split, 1: left done, 2: right done), left sum
    f_lo = np.empty(64, np.int64)
    f_hi = np.empty(64, np.int64)
    stage = np.empty(64, np.int64)
    left = np.empty(64)
    f_lo[0], f_hi[0], stage[0] = lo, hi, 0
    sp = 1
    val = 0.0
    while True:
        top = sp - 1
        n = f_hi[top] - f_lo[top]
        if n <= 128 or stage[top] == 2:
            val = _sum_block(a, f_lo[top], f_hi[top]) if n <= 128 else left[top] + val
            sp -= 1
            if sp == 0:
                return val
            top = sp - 1
            if stage[top] == 0:
                stage[top] = 1
                left[top] = val
            else:
                stage[top] = 2
            continue
        n2 = n // 2
        n2 -= n2 % 8
        mid = f_lo[top] + n2
        if stage[top] == 0:
            f_lo[sp], f_hi[sp] = f_lo[top], mid
        else:
            f_lo[sp], f_hi[sp] = mid, f_hi[top]
        stage[sp] = 0
        sp += 1


# ============================================================== cache state


@njit(**JIT)
def _np_minimum(a, b):
    """``np.minimum`` of two floats (NaN propagates)."""
    if a != a or a <= b:
        return a
    return b


@njit(**JIT)
def _np_maximum(a, b):
    """``np.maximum`` of two floats (NaN propagates)."""
    if a != a or a >= b:
        return a
    return b


@njit(**JIT)
def _clamp01(p):
    """``min(max(p, 0.0), 1.0)`` with Python's ``min``/``max`` (NaN kept)."""
    if 0.0 > p:
        p = 0.0
    if 1.0 < p:
        p = 1.0
    return p


@njit(**JIT)
def _reuse_excess(fst):
    if fst[_PREV_N] <= 0:
        return 0.0
    x = (fst[_REUSED] - fst[_PREV_F]) / fst[_PREV_N]
    return x if x > 0.0 else 0.0  # max(0.0, x)


# The state of one replayed ExpertCache, a tuple ``c`` (numba passes it whole):
# per slot its key (-1: none), state and users; per key its slot (-1: none),
# last token, frequency, frequency's token and predicted probability; per layer
# the keys its predictions name (and how many); int [token, layer], float
# [prev_n, prev_f, reused]; scratch [E]; parameters; power tables; L; E.
(_SKEY, _SSTATE, _USERS, _WHERE, _LAST, _FREQ, _FTOK, _PRED, _PKEYS, _PCNT,
 _IST, _FST, _BUF, _PAR, _TABS, _NL, _NE) = range(17)  # fmt: skip


def _fresh(slots: int, cache, width: int, tabs: np.ndarray) -> tuple:
    """The state of ``cache`` (an empty ``ExpertCache``: token 0, last layer
    L-1) with ``slots``; ``width``: most experts a layer's predictions name."""
    L, E = cache.L, cache.E
    n = L * E
    par = [cache.w_r, cache.w_f, cache.w_p, cache.decay, cache._reuse_alpha]
    return (
        np.full(slots, -1, np.int64),
        np.zeros(slots, np.int8),
        np.zeros(slots, np.int32),
        np.full(n, -1, np.int64),
        np.full(n, NEVER, np.int64),
        np.zeros(n),
        np.zeros(n, np.int64),
        np.zeros(n),
        np.zeros((L, max(width, 1)), np.int64),
        np.zeros(L, np.int64),
        np.array([0, L - 1], np.int64),
        np.zeros(3),
        np.zeros(E),
        np.array(par),
        tabs,
        L,
        E,
    )


@njit(**JIT)
def _begin_layer(c, layer):
    """``ExpertCache.begin_layer``."""
    ist, fst, par, tabs = c[_IST], c[_FST], c[_PAR], c[_TABS]
    last_token, freq, freq_token, buf = c[_LAST], c[_FREQ], c[_FTOK], c[_BUF]
    E = c[_NE]
    if layer <= ist[_LAYER]:
        ist[_TOKEN] += 1
    ist[_LAYER] = layer
    _clear_predictions(c, layer)
    token = ist[_TOKEN]
    m = 0
    for k in range(layer * E, (layer + 1) * E):
        if last_token[k] == token - 1:
            buf[m] = freq[k] * _dec(tabs, _DEC_ARR, token - freq_token[k])
            m += 1
    if m:
        a = par[_ALPHA]
        fst[_PREV_N] = (1 - a) * fst[_PREV_N] + a * m
        fst[_PREV_F] = (1 - a) * fst[_PREV_F] + a * _np_sum(buf, 0, m)
        fst[_REUSED] = (1 - a) * fst[_REUSED]


@njit(**JIT)
def _clear_predictions(c, layer):
    """Zero the predicted signal of the keys ``layer``'s predictions named."""
    pred, pred_keys, pred_cnt = c[_PRED], c[_PKEYS], c[_PCNT]
    for j in range(pred_cnt[layer]):
        pred[pred_keys[layer, j]] = 0.0
    pred_cnt[layer] = 0


@njit(**JIT)
def _on_request(c, key):
    """``ExpertCache.on_request``."""
    ist, fst, par = c[_IST], c[_FST], c[_PAR]
    last_token, freq, freq_token = c[_LAST], c[_FREQ], c[_FTOK]
    t = ist[_TOKEN]
    if last_token[key] == t - 1:
        fst[_REUSED] += par[_ALPHA]
    d = _dec(c[_TABS], _DEC_PY, t - freq_token[key])
    freq[key] = freq[key] * d + (1.0 - par[_DECAY])
    freq_token[key] = t
    last_token[key] = t


@njit(**JIT)
def _value(c, key, one):
    """``ExpertCache.value`` of ``key`` (``one``: called with that key alone,
    else as one of an array of keys)."""
    ist, par, tabs = c[_IST], c[_PAR], c[_TABS]
    L, E = c[_NL], c[_NE]
    token, layer = ist[_TOKEN], ist[_LAYER]
    kl = key // E
    visit = token if kl > layer else token + 1
    age = visit - c[_LAST][key]
    drow = _DEC_ONE if one else _DEC_ARR
    rrow = _REC_ONE if one else _REC_ARR
    f = c[_FREQ][key] * _dec(tabs, drow, token - c[_FTOK][key])
    p = par[_W_R] * _reuse_excess(c[_FST]) * _rec(tabs, rrow, age - 1)
    p = p + par[_W_F] * f
    p = p + par[_W_P] * c[_PRED][key]
    p = _np_minimum(p, 1.0)
    dist = (kl - layer - 1) % L + 1
    wait = dist + (1.0 - p) * L / _np_maximum(f, 1e-3)
    return 1.0 / wait


@njit(**JIT)
def _victim(c, has_below, below):
    """``ExpertCache.victim(below)``: a free empty slot, else the free ready
    one of lowest value (first of equals, as ``np.argmin``); -1 for None."""
    skey, sstate, users = c[_SKEY], c[_SSTATE], c[_USERS]
    S = skey.shape[0]
    for s in range(S):
        if users[s] == 0 and sstate[s] == EMPTY:
            return s
    best = -1
    bv = 0.0
    for s in range(S):
        if users[s] != 0 or sstate[s] != READY:
            continue
        v = _value(c, skey[s], False)
        if v != v:  # np.argmin stops at the first NaN
            best, bv = s, v
            break
        if best < 0 or v < bv:
            best, bv = s, v
    if best < 0:
        return -1
    if has_below and bv >= below:
        return -1
    return best


@njit(**JIT)
def _assign(c, slot, key):
    """``ExpertCache.assign(slot, key, READY)``; returns the key it held."""
    skey, where = c[_SKEY], c[_WHERE]
    old = skey[slot]
    if old >= 0 and where[old] == slot:
        where[old] = -1
    skey[slot] = key
    c[_SSTATE][slot] = READY
    where[key] = slot
    return old


# =================================================================== policy


class PolicyHints(NamedTuple):
    """Predictions of :func:`~mer_cli.cache.simulate_policy`, packed.

    Request ``i``'s are entries ``ptr[i]:ptr[i+1]`` (int64 ``[n+1]``), handed
    to the cache in order: ``target`` int64 ``[H]`` layer, ``scores`` f64
    ``[H, E]`` (any dtype given, exactly).
    """

    ptr: np.ndarray
    target: np.ndarray
    scores: np.ndarray
    num_layers: int
    num_experts: int


def policy_hints(
    predictions: Sequence[Mapping[int, np.ndarray] | None],
    n: int,
    num_layers: int,
    num_experts: int,
) -> PolicyHints:
    """Pack ``predictions`` (aligned with ``n`` requests; entry ``i`` None or
    ``{target layer: scores [E]}``) for :func:`policy_run`."""
    ptr = np.zeros(n + 1, np.int64)
    targets: list[int] = []
    rows: list[np.ndarray] = []
    for i in range(n):
        p = predictions[i]
        if p is not None:
            for target, scores in p.items():
                row = np.asarray(scores, np.float64)
                if row.shape != (num_experts,) or not 0 <= target < num_layers:
                    raise ValueError(
                        f"predictions[{i}][{target}]: scores of shape "
                        f"{row.shape} for layer {target}; expected "
                        f"({num_experts},) for a layer in 0..{num_layers - 1}"
                    )
                targets.append(int(target))
                rows.append(row)
        ptr[i + 1] = len(targets)
    scores = np.stack(rows) if rows else np.zeros((0, num_experts))
    return PolicyHints(
        ptr, np.array(targets, np.int64), scores, num_layers, num_experts
    )


@njit(**JIT)
def _policy_tokens(reqs, L, E):
    """Tokens the replay of :func:`_policy_kernel` counts (for the tables)."""
    mark = np.zeros(L * E, np.int64)
    gen, layer, tokens = 1, L - 1, 0
    for i in range(reqs.shape[0]):
        k = reqs[i]
        kl = k // E
        if kl != layer or mark[k] == gen:
            if kl <= layer:
                tokens += 1
            layer = kl
            gen += 1
        mark[k] = gen
    return tokens


@njit(**JIT)
def _policy_kernel(c, reqs, ptr, target, scores):
    """The loop of ``_simulate_policy_reference``; returns the hits."""
    E = c[_NE]
    ist, where = c[_IST], c[_WHERE]
    pred, pred_keys, pred_cnt = c[_PRED], c[_PKEYS], c[_PCNT]
    mark = np.zeros(c[_NL] * E, np.int64)  # == gen: in the current group
    gen = 1
    hits = 0
    for i in range(reqs.shape[0]):
        k = reqs[i]
        layer = k // E
        if layer != ist[_LAYER] or mark[k] == gen:
            _begin_layer(c, layer)
            gen += 1
        for h in range(ptr[i], ptr[i + 1]):  # set_predictions(t, range(E), row)
            t = target[h]
            _clear_predictions(c, t)
            for e in range(E):
                pred[t * E + e] = _clamp01(scores[h, e])
                pred_keys[t, e] = t * E + e
            pred_cnt[t] = E
        mark[k] = gen
        _on_request(c, k)
        if where[k] >= 0:
            hits += 1
            continue
        _assign(c, _victim(c, False, 0.0), k)
    return hits


def policy_run(
    requests: np.ndarray, slots: int, hints: PolicyHints | None, cache
) -> int:
    """Hits of ``_simulate_policy_reference`` on int64 ``requests`` ``[n]``
    (keys in ``0..L*E-1``); ``cache``: an empty ``ExpertCache`` with the
    replay's shape and parameters."""
    L, E = cache.L, cache.E
    reqs = np.ascontiguousarray(requests, np.int64)
    if hints is None:
        z = np.zeros(0, np.int64)
        hints = PolicyHints(
            np.zeros(len(reqs) + 1, np.int64), z, np.zeros((0, E)), L, E
        )
    tokens = int(_policy_tokens(reqs, L, E))
    tabs = _power_tables(cache.decay, cache.recency_decay, tokens, False)
    c = _fresh(slots, cache, E, tabs)
    return int(_policy_kernel(c, reqs, hints.ptr, hints.target, hints.scores))


# ================================================================= prefetch


class PrefetchHints(NamedTuple):
    """Hints of :func:`~mer_cli.cache.simulate_prefetch`, packed: the
    candidates :func:`mer_cli.prefetch.ranked` picks from each visit's hint.

    Visit ``v``'s targets are entries ``vptr[v]:vptr[v+1]`` (int64
    ``[V+1]``), nearest first; entry ``h`` has ``target`` layer and the
    candidates ``cptr[h]:cptr[h+1]`` of ``expert`` int64 and ``score`` f64
    (the f32 scores, exactly), best first. ``top_k``, ``candidates``: what
    they were packed for.
    """

    vptr: np.ndarray
    target: np.ndarray
    cptr: np.ndarray
    expert: np.ndarray
    score: np.ndarray
    num_layers: int
    num_experts: int
    top_k: int
    candidates: int
    n: int


def prefetch_hints(
    requests: Sequence[int] | np.ndarray,
    predictions: Sequence[Mapping[int, np.ndarray] | None],
    num_layers: int,
    num_experts: int,
    top_k: int,
    candidates: int | None = None,
) -> PrefetchHints:
    """Pack ``predictions`` (aligned with ``requests``; visit ``v``'s hint is
    ``predictions[v * top_k]``) for :func:`prefetch_run`; ``candidates``
    per target (default ``2 * top_k``) as in ``simulate_prefetch``."""
    candidates = 2 * top_k if candidates is None else candidates
    reqs = np.asarray(requests, np.int64).reshape(-1)
    n, L = len(reqs), num_layers
    starts = range(0, n, top_k)
    vptr = np.zeros(len(starts) + 1, np.int64)
    targets, cptr = [], [0]
    experts: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for v, start in enumerate(starts):
        pred = predictions[start]
        if pred:
            layer = int(reqs[start]) // num_experts
            for target, order, sc in prefetch.ranked(pred, layer, L, candidates):
                targets.append(int(target))
                experts.append(np.asarray(order, np.int64))
                scores.append(np.asarray(sc, np.float32).astype(np.float64))
                cptr.append(cptr[-1] + len(order))
        vptr[v + 1] = len(targets)
    cat = np.concatenate
    return PrefetchHints(
        vptr,
        np.array(targets, np.int64),
        np.array(cptr, np.int64),
        cat(experts) if experts else np.zeros(0, np.int64),
        cat(scores) if scores else np.zeros(0),
        num_layers,
        num_experts,
        top_k,
        candidates,
        n,
    )


@njit(**JIT)
def _window_add(wa, wb, wn, whead, wsum, i, a, b):
    """``prefetch._Window.add`` on ring ``i`` of ``wa``/``wb`` ``[R, W]``
    (counts ``wn``, oldest ``whead``, sums ``wsum`` ``[R, 2]``)."""
    W = wa.shape[1]
    if wn[i] == W:
        j = whead[i]
        wsum[i, 0] -= wa[i, j]
        wsum[i, 1] -= wb[i, j]
        whead[i] = (j + 1) % W
    else:
        j = (whead[i] + wn[i]) % W
        wn[i] += 1
    wa[i, j] = a
    wb[i, j] = b
    wsum[i, 0] += a
    wsum[i, 1] += b


# throttle int state: demand reads since the last probe, probe interval,
# probes pending; its float constants
_SINCE, _INTERVAL, _PROBING = 0, 1, 2
_THRESHOLD, _PRIOR = 0, 1


@njit(**JIT)
def _outcome(p, used, probe, tst, wa, wb, wn, whead, wsum, ring, probe_every,
             probe_max):  # fmt: skip
    """``PrefetchThrottle.outcome`` (``ring``: the issued window)."""
    _window_add(wa, wb, wn, whead, wsum, ring, p, 1.0 if used else 0.0)
    if probe:
        tst[_PROBING] = max(0, tst[_PROBING] - 1)
        tst[_SINCE] = 0
        if used:
            tst[_INTERVAL] = probe_every
        else:
            tst[_INTERVAL] = min(tst[_INTERVAL] * 2, probe_every * probe_max)


@njit(**JIT)
def _prefetch_kernel(c, reqs, top_k, vptr, target, cptr, expert, score, tpar, depth,
                     calibrate, max_distance, probe_every, probe_max, window, log_on,
                     ev):  # fmt: skip
    """The loop of ``_simulate_prefetch_reference``. Returns int64 ``[8]``:
    requests, hits, tokens, prefetch reads, used, wasted, probes, events."""
    L, E = c[_NL], c[_NE]
    ist, users, where = c[_IST], c[_USERS], c[_WHERE]
    pred, pred_keys, pred_cnt = c[_PRED], c[_PKEYS], c[_PCNT]
    n = reqs.shape[0]
    S = users.shape[0]
    D = max_distance
    C = pred_keys.shape[1]
    out = np.zeros(8, np.int64)
    nev = 0
    # prefetched, unresolved: insertion number (-1: not pending), p, probe
    pend_seq = np.full(L * E, -1, np.int64)
    pend_p = np.zeros(L * E)
    pend_probe = np.zeros(L * E, np.bool_)
    seq = 0
    # throttle: rings 0..D-1 shadow windows per distance, D the issued one
    tst = np.array([0, probe_every, 0], np.int64)
    wa = np.zeros((D + 1, window))
    wb = np.zeros((D + 1, window))
    wn = np.zeros(D + 1, np.int64)
    whead = np.zeros(D + 1, np.int64)
    wsum = np.zeros((D + 1, 2))
    # shadow candidates awaiting their layer: distance rings in first-insertion
    # order, and per (layer, ring) the experts and scores
    sc_order = np.zeros((L, D), np.int64)
    sc_nkeys = np.zeros(L, np.int64)
    sc_n = np.full((L, D), -1, np.int64)  # -1: no entry
    sc_e = np.zeros((L, D, C), np.int64)
    sc_x = np.zeros((L, D, C))
    # per visit scratch
    inv = np.zeros(E, np.bool_)  # expert of the visit
    held = np.zeros(max(top_k, 1), np.int64)
    missing = np.zeros(max(top_k, 1), np.int64)
    res_k = np.zeros(E, np.int64)
    res_s = np.zeros(E, np.int64)
    probs = np.zeros(C)
    absent = np.zeros(C, np.int64)
    akey = np.zeros(C)

    V = vptr.shape[0] - 1
    for v in range(V):
        s0 = v * top_k
        nk = min(top_k, n - s0)
        layer = reqs[s0] // E
        _begin_layer(c, layer)
        for j in range(nk):
            _on_request(c, reqs[s0 + j])
        out[0] += nk
        if log_on:
            ev[nev, 0], ev[nev, 1], ev[nev, 2] = _EV_VISIT, layer, v
            nev += 1
        inv[:] = False
        for j in range(nk):
            inv[reqs[s0 + j] - layer * E] = True
        # prefetches of this layer resolve, in the order they were issued
        m = 0
        for k in range(layer * E, (layer + 1) * E):
            if pend_seq[k] >= 0:
                i = m
                while i > 0 and res_s[i - 1] > pend_seq[k]:
                    res_k[i], res_s[i] = res_k[i - 1], res_s[i - 1]
                    i -= 1
                res_k[i], res_s[i] = k, pend_seq[k]
                m += 1
        for i in range(m):
            k = res_k[i]
            used = inv[k - layer * E]
            pend_seq[k] = -1
            out[4] += used
            out[5] += not used
            _outcome(pend_p[k], used, pend_probe[k], tst, wa, wb, wn, whead, wsum,
                     D, probe_every, probe_max)  # fmt: skip
        # th.visit: the shadow candidates of this layer
        for j in range(sc_nkeys[layer]):
            r = sc_order[layer, j]
            for q in range(sc_n[layer, r]):
                u = 1.0 if inv[sc_e[layer, r, q]] else 0.0
                x = _clamp01(sc_x[layer, r, q])
                _window_add(wa, wb, wn, whead, wsum, r, x, u)
            sc_n[layer, r] = -1
        sc_nkeys[layer] = 0
        # serve: hits are held, misses read into the slot of lowest value
        nh = 0
        hs = 0
        nm = 0
        for j in range(nk):
            k = reqs[s0 + j]
            s = where[k]
            if s < 0:
                missing[nm] = k
                nm += 1
                continue
            out[1] += 1
            users[s] += 1
            held[nh] = s
            nh += 1
            if log_on:
                ev[nev, 0], ev[nev, 1], ev[nev, 2] = _EV_HIT, k, -1
                nev += 1
        for j in range(nm):
            k = missing[j]
            s = _victim(c, False, 0.0)
            while s < 0:  # every slot held: the first served is done with
                users[held[hs]] -= 1
                hs += 1
                s = _victim(c, False, 0.0)
            old = _assign(c, s, k)
            if old >= 0 and pend_seq[old] >= 0:
                pend_seq[old] = -1
                out[5] += 1
                _outcome(pend_p[old], False, pend_probe[old], tst, wa, wb, wn,
                         whead, wsum, D, probe_every, probe_max)  # fmt: skip
            if log_on:
                ev[nev, 0], ev[nev, 1], ev[nev, 2] = _EV_MISS, k, old
                nev += 1
            users[s] += 1
            held[nh] = s
            nh += 1
        tst[_SINCE] += nm  # th.interval(..., misses)
        # the hint (_prefetch)
        issued = 0
        for h in range(vptr[v], vptr[v + 1]):
            t = target[h]
            dist = (t - layer) % L
            if dist == 0:
                dist = L
            r = min(dist, D) - 1
            f = 1.0
            if calibrate:
                if wn[r] == 0:
                    cal = 1.0
                else:
                    cal = (tpar[_PRIOR] + wsum[r, 1]) / (tpar[_PRIOR] + wsum[r, 0])
                real = (tpar[_PRIOR] + wsum[D, 1]) / (tpar[_PRIOR] + wsum[D, 0])
                f = cal * (1.0 if 1.0 < real else real)
            c0, nc = cptr[h], cptr[h + 1] - cptr[h]
            _clear_predictions(c, t)  # set_predictions(t, experts, probs)
            for j in range(nc):
                x = score[c0 + j]
                y = (x if x > 0.0 else 0.0) * f  # max(0.0, x) * f
                probs[j] = y if y < 1.0 else 1.0  # min(1.0, y)
                pred[t * E + expert[c0 + j]] = _clamp01(probs[j])
                pred_keys[t, j] = t * E + expert[c0 + j]
            pred_cnt[t] = nc
            if S < 2:
                continue  # the live source never prefetches into one slot
            na = 0
            for j in range(nc):
                if where[t * E + expert[c0 + j]] < 0:
                    # stable sort by -p (sorted(absent, key=-p))
                    i = na
                    while i > 0 and akey[i - 1] > -probs[j]:
                        absent[i], akey[i] = absent[i - 1], akey[i - 1]
                        i -= 1
                    absent[i], akey[i] = j, -probs[j]
                    na += 1
            # th.candidates(t, dist, {e: x}): replaces, keeping its place
            if sc_n[t, r] < 0:
                sc_order[t, sc_nkeys[t]] = r
                sc_nkeys[t] += 1
            q = 0
            for j in range(nc):
                if where[t * E + expert[c0 + j]] < 0:
                    sc_e[t, r, q] = expert[c0 + j]
                    sc_x[t, r, q] = score[c0 + j]
                    q += 1
            sc_n[t, r] = q
            for i in range(na):
                j = absent[i]
                p = probs[j]
                # th.decide(p, issued < depth): 1 issue, 2 probe, 0 none
                how = 0
                if p > tpar[_THRESHOLD]:
                    if issued < depth:
                        how = 1
                elif tst[_SINCE] >= tst[_INTERVAL] and tst[_PROBING] == 0:
                    how = 2
                if how == 0:
                    continue
                key = t * E + expert[c0 + j]
                s = _victim(c, True, _value(c, key, True))
                if s < 0:
                    break  # everything held is worth more than these candidates
                old = _assign(c, s, key)
                if old >= 0 and pend_seq[old] >= 0:
                    pend_seq[old] = -1
                    out[5] += 1
                    _outcome(pend_p[old], False, pend_probe[old], tst, wa, wb, wn,
                             whead, wsum, D, probe_every, probe_max)  # fmt: skip
                if log_on:
                    ev[nev, 0], ev[nev, 1], ev[nev, 2] = _EV_PREFETCH, key, old
                    nev += 1
                pend_seq[key] = seq
                seq += 1
                pend_p[key] = p
                pend_probe[key] = how == 2
                tst[_SINCE] = 0  # th.started(how)
                if how == 2:
                    tst[_PROBING] += 1
                out[3] += 1
                out[6] += how == 2
                issued += 1
        for j in range(hs, nh):
            users[held[j]] -= 1
    out[2] = ist[_TOKEN]
    out[7] = nev
    return out


def prefetch_run(
    requests: np.ndarray,
    slots: int,
    hints: PrefetchHints | None,
    cache,
    *,
    top_k: int,
    threshold: float,
    depth: int,
    calibrate: bool,
    log: list | None = None,
) -> np.ndarray:
    """Counters of ``_simulate_prefetch_reference`` on int64 ``requests``
    ``[n]`` already checked to come in visits of ``top_k``; ``cache``: an
    empty ``ExpertCache`` with the replay's shape and parameters. Returns
    int64 ``[7]``: requests, hits, tokens, prefetch reads, used, wasted,
    probes; appends the reference's events to ``log``."""
    L, E = cache.L, cache.E
    reqs = np.ascontiguousarray(requests, np.int64)
    n = len(reqs)
    V = -(-n // top_k)
    if hints is None:
        z = np.zeros(0, np.int64)
        hints = PrefetchHints(
            np.zeros(V + 1, np.int64), z, np.zeros(1, np.int64), z,
            np.zeros(0), L, E, top_k, 1, n,
        )  # fmt: skip
    layers = reqs[::top_k] // E
    tokens = int(np.count_nonzero(np.diff(layers, prepend=L - 1) <= 0))
    tabs = _power_tables(cache.decay, cache.recency_decay, tokens, True)
    c = _fresh(slots, cache, min(E, hints.candidates), tabs)
    cap = V + n + len(hints.expert) if log is not None else 0
    ev = np.zeros((cap, 3), np.int64)
    th = prefetch.PrefetchThrottle(L, extent_nbytes=1)  # for its window length
    tpar = np.array([threshold, prefetch.PRIOR])
    out = _prefetch_kernel(
        c, reqs, top_k, hints.vptr, hints.target, hints.cptr, hints.expert,
        hints.score, tpar, depth, calibrate, prefetch.MAX_DISTANCE,
        prefetch.PROBE_EVERY, prefetch.PROBE_MAX, th.window, log is not None, ev,
    )  # fmt: skip
    if log is not None:
        for code, a, b in ev[: out[7]].tolist():
            if code == _EV_VISIT:
                keys = tuple(reqs[b * top_k : (b + 1) * top_k].tolist())
                log.append(("visit", a, keys))
            else:
                log.append((_EV_NAMES[code], a, b))
    return out[:7]
