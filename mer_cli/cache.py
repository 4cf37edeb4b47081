"""The expert cache: which experts occupy the fixed DRAM slots, and who goes.

Keys are expert indices ``layer * E + expert``. :class:`ExpertCache` is the
bookkeeping only (the bytes live in ``mer_cli.io.slabs.SlabPool``, the reads in
``mer_cli.io.reader``); it is driven from one thread by ``StreamedExperts``.

Eviction evicts the resident expert expected to wait longest for its next use
(Belady's rule with expectations in place of the unknown future)::

    p_next = w_r * recency + w_f * frequency + w_p * predicted      (capped at 1)
    wait   = distance + (1 - p_next) * L / frequency               (in layers)

* ``distance`` = layers until the expert's layer is computed again (1..L): the
  forward pass visits the layers cyclically, so an expert of the layer just
  computed waits a whole token for its next chance while one of the next layer
  may be needed now;
* ``frequency`` = an exponentially decayed usage rate per token (decay
  ``freq_decay``): an expert used in a share ``p`` of tokens tends to ``p``;
  if it is not used at its next visit it waits about ``L / p`` more layers;
* ``recency`` = ``reuse_excess * recency_decay ** (tokens between its last use
  and its next visit - 1)``: routing is correlated from one token to the next;
  ``reuse_excess`` (how much more often an expert used at its layer's previous
  visit is used again than its frequency alone says) is measured online, so
  the signal switches itself off on routing without that correlation;
* ``predicted`` = the predictor's probability that the expert is used when its
  layer comes next (:meth:`ExpertCache.set_predictions`); 0 for every expert
  until a predictor provides one, which leaves the ranking to the other two.

Slots in use by the compute (``acquire``/``release``), slots being read into,
and the pinned hot set are never evicted.

Replays of a request sequence, to compare policies offline:
:func:`simulate_lru`; :func:`simulate_belady`, Belady's MIN, the optimum of
demand paging (nothing read before it is asked for); :func:`simulate_policy`,
this policy on demand, predictions steering eviction only; and
:func:`simulate_prefetch`, the live controller (``StreamedExperts``): this
policy plus the prefetch reads a predictor's hints start through
:class:`~mer_cli.prefetch.PrefetchThrottle`, counted as reads beside the hits
(:class:`CacheRun`). Prefetch can beat MIN's hit rate -- MIN does not
prefetch -- but only by reading more, which is why reads are reported too.
The last two run compiled (:mod:`mer_cli.cache_sim`), counting exactly what
their replays with the classes themselves (``_simulate_policy_reference``,
``_simulate_prefetch_reference``) count.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mer_cli.prefetch import PrefetchThrottle, ranked

if TYPE_CHECKING:
    from mer_cli.cache_sim import PolicyHints, PrefetchHints

EMPTY, LOADING, READY = 0, 1, 2
NO_SLOT = -1


class ExpertCache:
    """Slot table of a fixed number of expert slots.

    Parameters
    ----------
    slots
        Number of slots (``ram_budget // extent_nbytes``).
    num_layers, num_experts
        Model shape; keys are ``layer * num_experts + expert``.
    freq_decay
        Per-token decay ``d`` of the frequency signal (0.97: half-life ~23 tokens).
    recency_decay
        Factor by which the recency signal shrinks per token since last use.
    weights
        ``(w_r, w_f, w_p)``: how recency, frequency and the predicted
        probability add up to the probability of use at the next visit. The
        defaults were chosen on synthetic routing traces (skewed and uniform
        popularity, token-to-token reuse 0-0.6) with :func:`simulate`.
    """

    def __init__(
        self,
        slots: int,
        num_layers: int,
        num_experts: int,
        *,
        freq_decay: float = 0.97,
        recency_decay: float = 0.2,
        weights: tuple[float, float, float] = (2.0, 1.0, 1.0),
    ) -> None:
        if slots < 1:
            raise ValueError(f"cache needs at least one slot, got {slots}")
        self.slots = slots
        self.L, self.E = num_layers, num_experts
        n = num_layers * num_experts
        self.decay = freq_decay
        self.w_r, self.w_f, self.w_p = weights
        # per slot
        self.key = np.full(slots, NO_SLOT, np.int64)
        self.state = np.zeros(slots, np.int8)  # EMPTY / LOADING / READY
        self.users = np.zeros(slots, np.int32)  # compute views not yet released
        self.hot_slot = np.zeros(slots, bool)
        # per key
        self.where: dict[int, int] = {}
        self.hot: set[int] = set()
        self.last_token = np.full(n, -(10**6), np.int64)
        self.freq = np.zeros(n)
        self.freq_token = np.zeros(n, np.int64)
        self.pred = np.zeros(n)
        self._pred_layers: dict[int, list[int]] = {}
        # clock
        self.token = 0
        self.layer = num_layers - 1  # the layer most recently requested
        self.requests = 0
        self.recency_decay = recency_decay
        self._reuse_alpha = 0.02
        self._prev_n = self._prev_f = self._reused = 0.0

    # -------------------------------------------------------------- signals

    def begin_layer(self, layer: int) -> None:
        """The compute asks for ``layer``'s experts; a layer at or below the
        previous one starts a new token. Predictions for ``layer`` are consumed."""
        if layer <= self.layer:
            self.token += 1
        self.layer = layer
        for k in self._pred_layers.pop(layer, ()):
            self.pred[k] = 0.0
        # the layer's experts used at its previous visit, and how often the
        # frequency signal alone expects them to be used again
        keys = np.arange(layer * self.E, (layer + 1) * self.E)
        prev = keys[self.last_token[keys] == self.token - 1]
        if len(prev):
            f = self.freq[prev] * self.decay ** (self.token - self.freq_token[prev])
            a = self._reuse_alpha
            self._prev_n = (1 - a) * self._prev_n + a * len(prev)
            self._prev_f = (1 - a) * self._prev_f + a * float(f.sum())
            self._reused = (1 - a) * self._reused

    def on_request(self, key: int) -> None:
        """Record a demand for ``key`` (once per expert the compute asks for)."""
        self.requests += 1
        t = self.token
        if self.last_token[key] == t - 1:
            self._reused += self._reuse_alpha
        d = self.decay ** int(t - self.freq_token[key])
        self.freq[key] = self.freq[key] * d + (1.0 - self.decay)
        self.freq_token[key] = t
        self.last_token[key] = t

    @property
    def reuse_excess(self) -> float:
        """How much more likely an expert used at its layer's previous visit is
        used again than its frequency says (routing's token-to-token
        correlation), estimated online; the weight of the recency signal."""
        if self._prev_n <= 0:
            return 0.0
        return max(0.0, (self._reused - self._prev_f) / self._prev_n)

    def set_predictions(
        self, layer: int, experts: Sequence[int], probs: Sequence[float]
    ) -> None:
        """Probability that each of ``experts`` is used when ``layer`` comes next.

        Replaces earlier predictions for ``layer``; they expire when the layer is
        requested. Experts not listed count as probability 0.
        """
        base = layer * self.E
        for k in self._pred_layers.pop(layer, ()):
            self.pred[k] = 0.0
        keys = []
        for e, p in zip(experts, probs):
            k = base + int(e)
            self.pred[k] = min(max(float(p), 0.0), 1.0)
            keys.append(k)
        self._pred_layers[layer] = keys

    def value(self, keys: np.ndarray | int) -> np.ndarray | float:
        """Reciprocal of the expected number of layers until ``keys`` are used next.

        ``keys``: int or ``int64 [n]``. The expected wait is the distance to the
        key's layer plus, if it is not used at that visit, about ``L / p_long``
        more layers; the lowest value is evicted first.
        """
        keys = np.asarray(keys)
        ahead = keys // self.E > self.layer  # visited later in this token
        visit = self.token + (~ahead)  # the token of the key's next visit
        age = visit - self.last_token[keys]  # >= 1
        f = self.freq[keys] * self.decay ** (self.token - self.freq_token[keys])
        p_next = np.minimum(
            self.w_r * self.reuse_excess * self.recency_decay ** (age - 1)
            + self.w_f * f
            + self.w_p * self.pred[keys],
            1.0,
        )
        dist = (keys // self.E - self.layer - 1) % self.L + 1
        wait = dist + (1.0 - p_next) * self.L / np.maximum(f, 1e-3)
        return 1.0 / wait

    # -------------------------------------------------------------- slots

    def find(self, key: int) -> int | None:
        """Slot holding ``key`` (ready or being read), or None."""
        return self.where.get(key)

    def is_ready(self, key: int) -> bool:
        s = self.where.get(key)
        return s is not None and self.state[s] == READY

    def evictable(self, slot: int) -> bool:
        return bool(
            self.users[slot] == 0
            and self.state[slot] != LOADING
            and not self.hot_slot[slot]
        )

    def victim(self, below: float | None = None) -> int | None:
        """The slot to reuse: an empty one, else the evictable one of lowest value.

        With ``below``, only a slot whose expert's value is lower than ``below``
        (a prefetch must not displace something worth more than what it brings).
        Returns None when no slot qualifies.
        """
        free = (self.users == 0) & ~self.hot_slot
        empty = np.flatnonzero(free & (self.state == EMPTY))
        if len(empty):
            return int(empty[0])
        cand = np.flatnonzero(free & (self.state == READY))
        if not len(cand):
            return None
        v = self.value(self.key[cand])
        i = int(np.argmin(v))
        if below is not None and v[i] >= below:
            return None
        return int(cand[i])

    def assign(self, slot: int, key: int, state: int = LOADING) -> int:
        """Put ``key`` into ``slot``; returns the key it held (or ``NO_SLOT``)."""
        old = int(self.key[slot])
        if old != NO_SLOT and self.where.get(old) == slot:
            del self.where[old]
        self.key[slot] = key
        self.state[slot] = state
        self.hot_slot[slot] = key in self.hot
        self.where[key] = slot
        return old

    def mark_ready(self, slot: int) -> None:
        self.state[slot] = READY

    def clear(self, slot: int) -> None:
        """Forget the slot's expert and free it (a failed or cancelled read)."""
        old = int(self.key[slot])
        if old != NO_SLOT and self.where.get(old) == slot:
            del self.where[old]
        self.key[slot] = NO_SLOT
        self.state[slot] = EMPTY
        self.hot_slot[slot] = False

    def detach(self, slot: int) -> None:
        """Forget the slot's expert but keep the slot busy (a cancelled read whose
        last chunks are still landing); :meth:`clear` frees it later."""
        old = int(self.key[slot])
        if old != NO_SLOT and self.where.get(old) == slot:
            del self.where[old]
        self.key[slot] = NO_SLOT

    def acquire(self, slot: int) -> None:
        self.users[slot] += 1

    def release(self, slot: int) -> None:
        self.users[slot] -= 1

    def pin(self, key: int) -> None:
        """Keep ``key`` resident for good (the hot set from trace statistics)."""
        self.hot.add(key)
        s = self.where.get(key)
        if s is not None:
            self.hot_slot[s] = True

    def resident(self) -> list[int]:
        """Keys with their bytes in a slot."""
        return [k for k, s in self.where.items() if self.state[s] == READY]


# =================================================================== simulators


def simulate_lru(requests: Iterable[int], slots: int) -> float:
    """Hit rate of LRU with ``slots`` entries on a request sequence."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = n = 0
    for k in requests:
        n += 1
        if k in cache:
            hits += 1
            cache.move_to_end(k)
            continue
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[k] = None
    return hits / n if n else 0.0


def simulate_belady(requests: Sequence[int], slots: int) -> float:
    """Hit rate of Belady's MIN (evict the entry used furthest in the future).

    The offline optimum for demand caching: no online policy without prefetch
    does better on the same sequence.
    """
    reqs = list(requests)
    n = len(reqs)
    nxt = [n] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = seen.get(reqs[i], n + i)  # never again: beyond the end, distinct
        seen[reqs[i]] = i
    resident: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily invalidated
    hits = 0
    for i, k in enumerate(reqs):
        if k in resident:
            hits += 1
        elif len(resident) >= slots:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        resident[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return hits / n if n else 0.0


def simulate_policy(
    requests: Iterable[int],
    slots: int,
    num_layers: int,
    num_experts: int,
    predictions: Sequence[Mapping[int, np.ndarray] | None] | PolicyHints | None = None,
    **kw,
) -> float:
    """Hit rate of :class:`ExpertCache`'s three-signal eviction.

    ``predictions`` (optional) is aligned with ``requests``: entry ``i``, when
    not None, maps a layer to f32 ``[E]`` probabilities of use and is handed to
    :meth:`ExpertCache.set_predictions` just before request ``i`` (after its
    layer visit began); without it the predicted signal stays 0. Predictions
    steer eviction only: nothing is read before it is asked for
    (:func:`simulate_prefetch` models the prefetching controller). They may
    come packed (:func:`mer_cli.cache_sim.policy_hints`), to reuse them
    across cache sizes. ``kw``: :class:`ExpertCache`'s parameters.

    Compiled (:mod:`mer_cli.cache_sim`); it counts exactly what the replay
    with :class:`ExpertCache` itself, ``_simulate_policy_reference``, does.
    """
    from mer_cli import cache_sim

    c = ExpertCache(slots, num_layers, num_experts, **kw)
    reqs = _keys(requests, num_layers, num_experts)
    if predictions is not None and not isinstance(predictions, cache_sim.PolicyHints):
        predictions = cache_sim.policy_hints(
            predictions, len(reqs), num_layers, num_experts
        )
    if predictions is not None and (
        len(predictions.ptr) != len(reqs) + 1
        or (predictions.num_layers, predictions.num_experts)
        != (num_layers, num_experts)
    ):
        raise ValueError(
            f"predictions packed for {len(predictions.ptr) - 1} requests of "
            f"{predictions.num_layers} x {predictions.num_experts} experts; "
            f"replaying {len(reqs)} of {num_layers} x {num_experts}: pack them "
            "for these requests"
        )
    hits = cache_sim.policy_run(reqs, slots, predictions, c)
    return hits / len(reqs) if len(reqs) else 0.0


def _keys(requests: Iterable[int], num_layers: int, num_experts: int) -> np.ndarray:
    """int64 ``[n]`` cache keys, each checked to be in ``0..L*E-1``."""
    reqs = np.asarray(
        requests if isinstance(requests, np.ndarray | Sequence) else list(requests),
        np.int64,
    ).reshape(-1)
    bad = np.flatnonzero((reqs < 0) | (reqs >= num_layers * num_experts))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"requests[{i}] = {int(reqs[i])}: expected a key layer * "
            f"{num_experts} + expert in 0..{num_layers * num_experts - 1}"
        )
    return reqs


def _simulate_policy_reference(
    requests: Iterable[int],
    slots: int,
    num_layers: int,
    num_experts: int,
    predictions: Sequence[Mapping[int, np.ndarray] | None] | None = None,
    **kw,
) -> float:
    """:func:`simulate_policy` replayed with :class:`ExpertCache` itself (the
    reference its compiled replay is tested against)."""
    c = ExpertCache(slots, num_layers, num_experts, **kw)
    hits = n = 0
    group: set[int] = set()  # keys of the current fetch (one layer of one token)
    everyone = range(num_experts)
    for i, k in enumerate(requests):
        n += 1
        layer = k // num_experts
        if layer != c.layer or k in group:
            c.begin_layer(layer)
            group.clear()
        if predictions is not None and predictions[i] is not None:
            for target, scores in predictions[i].items():
                c.set_predictions(target, everyone, scores)
        group.add(k)
        c.on_request(k)
        if c.find(k) is not None:
            hits += 1
            continue
        s = c.victim()
        c.assign(s, k, READY)
    return hits / n if n else 0.0


@dataclass
class CacheRun:
    """What one simulated run counted; every read is one expert extent.

    ``hits``/``requests`` are demand requests (one per expert the compute asks
    for) found in DRAM, a prefetched expert included. ``prefetch_reads`` are
    the reads issued ahead of demand (the throttle's probes included);
    ``prefetch_used`` of them were asked for at their layer's next visit,
    ``prefetch_wasted`` were not (or were evicted before it); the rest were
    still pending when the sequence ended.
    """

    requests: int = 0
    hits: int = 0
    tokens: int = 0
    prefetch_reads: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    probes: int = 0

    @property
    def misses(self) -> int:
        """Demand reads: requests not found in DRAM."""
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def reads(self) -> int:
        """Every extent read: demand misses plus prefetches."""
        return self.misses + self.prefetch_reads

    @property
    def reads_per_token(self) -> float:
        return self.reads / self.tokens if self.tokens else 0.0

    @property
    def wasted_share(self) -> float:
        """Share of prefetch reads that were wasted."""
        return (
            self.prefetch_wasted / self.prefetch_reads if self.prefetch_reads else 0.0
        )


class _FixedThrottle(PrefetchThrottle):
    """The live throttle with its benefit-vs-cost threshold held constant:
    there are no timings to measure in a replay."""

    def __init__(self, num_layers: int, threshold: float) -> None:
        super().__init__(num_layers, extent_nbytes=1)
        self._fixed = threshold

    @property
    def threshold(self) -> float:
        return self._fixed


def _visits(requests: Sequence[int], num_experts: int, top_k: int) -> Iterator:
    """``(index of its first request, layer, keys)`` per layer visit: runs of
    ``top_k`` distinct experts of one layer."""
    for i in range(0, len(requests), top_k):
        keys = [int(k) for k in requests[i : i + top_k]]
        layer = keys[0] // num_experts
        if any(k // num_experts != layer for k in keys) or len(set(keys)) < len(keys):
            raise ValueError(
                f"requests[{i}:{i + top_k}] = {keys}: expected top_k={top_k} "
                "distinct experts of one layer per visit"
            )
        yield i, layer, keys


PREFETCH_THRESHOLD = 0.5


def simulate_prefetch(
    requests: Sequence[int],
    slots: int,
    num_layers: int,
    num_experts: int,
    predictions: Sequence[Mapping[int, np.ndarray] | None] | PrefetchHints | None,
    *,
    top_k: int,
    threshold: float = PREFETCH_THRESHOLD,
    depth: int | None = None,
    candidates: int | None = None,
    calibrate: bool = True,
    log: list | None = None,
    **kw,
) -> CacheRun:
    """The live controller's cache with prefetch: three-signal eviction plus
    the reads a predictor's hints start ahead of demand.

    ``requests`` are replayed visit by visit -- runs of ``top_k`` (one layer of
    one token, as :func:`~mer_cli.train_predictor.requests_of` lays them out)
    -- as :class:`~mer_cli.streaming.StreamedExperts` serves a fetch: every
    request of the visit is recorded, the experts found are held, and each
    miss is read into the slot of lowest value (an expert of the visit is
    given up only when every slot is held, the first served first). Then the
    visit's hint ``predictions[i]`` (``i`` its first request; target layer ->
    f32 ``[E]`` scores, as in :func:`simulate_policy`) is acted on as
    ``StreamedExperts.prefetch`` does, nearest target first:

    * each target's ``candidates`` best experts of nonzero score (default
      ``2 * top_k``, the live ``CANDIDATES_PER_K``) are scored
      ``p = min(1, score * factor)``, ``factor`` the live
      :class:`~mer_cli.prefetch.PrefetchThrottle` calibration from the
      outcomes so far (``calibrate=False``: 1); ``p`` becomes the cache's
      predicted signal for them (the others' is 0);
    * an absent candidate is read when ``PrefetchThrottle.decide`` says so:
      ``p > threshold``, or a probe of a refused one (at most one per 32
      demand misses, the live rule). The live threshold is ``u t / (g + u t)``
      from measured timings; here it is a constant, by default 1/2: a miss
      stalls one full read (``g = t``) and the drive is always busy (``u = 1``);
    * at most ``depth`` reads per hint (default ``top_k``, the live
      ``prefetch_depth``), each into a slot whose expert is worth less than
      the candidate (``ExpertCache.victim(below=...)``), never one of the
      current visit (the compute holds them while the hint is acted on).

    Not modelled: timing. Every read lands before the next visit, so no
    prefetch is late or cancelled, and the throttle's bandwidth cap and the
    hint-compute gate never act: the hit rate is the most these decisions can
    give. A prefetched expert is used if its layer's next visit asks for it,
    otherwise wasted (it stays cached, as live). ``predictions`` None: demand
    paging only (no hint). ``log``, when given, receives ``("visit", layer,
    keys)``, ``("hit", key, -1)``, ``("miss", key, evicted)`` and
    ``("prefetch", key, evicted)`` events (``evicted`` -1: an empty slot).
    ``predictions`` may come packed (:func:`mer_cli.cache_sim.prefetch_hints`,
    with the same ``top_k`` and ``candidates``), to reuse them across cache
    sizes. ``kw``: :class:`ExpertCache`'s parameters.

    Compiled (:mod:`mer_cli.cache_sim`); it counts (and logs) exactly what the
    replay with :class:`ExpertCache` and the throttle class itself,
    ``_simulate_prefetch_reference``, does.

    Returns
    -------
    CacheRun
        Demand hits and misses, prefetch reads (used, wasted, probes), tokens.
    """
    from mer_cli import cache_sim

    if top_k < 1:
        raise ValueError(f"top_k {top_k}: expected at least 1")
    depth = top_k if depth is None else depth
    candidates = 2 * top_k if candidates is None else candidates
    c = ExpertCache(slots, num_layers, num_experts, **kw)
    reqs = np.asarray(requests, np.int64).reshape(-1)
    full = len(reqs) // top_k * top_k
    v = reqs[:full].reshape(-1, top_k)
    tail = reqs[full:]
    if (
        (v // num_experts != v[:, :1] // num_experts).any()
        or (np.diff(np.sort(v, axis=1), axis=1) == 0).any()
        or (tail // num_experts != tail[:1] // num_experts).any()
        or len(np.unique(tail)) < len(tail)
    ):
        for _ in _visits(requests, num_experts, top_k):  # raises, naming the visit
            pass
    reqs = _keys(reqs, num_layers, num_experts)
    hints = predictions
    if predictions is not None and not isinstance(predictions, cache_sim.PrefetchHints):
        hints = cache_sim.prefetch_hints(
            reqs, predictions, num_layers, num_experts, top_k, candidates
        )
    if hints is not None and (
        hints.n,
        hints.num_layers,
        hints.num_experts,
        hints.top_k,
        hints.candidates,
    ) != (len(reqs), num_layers, num_experts, top_k, candidates):
        raise ValueError(
            f"hints packed for {hints.n} requests of {hints.num_layers} x "
            f"{hints.num_experts} experts, top_k {hints.top_k}, "
            f"{hints.candidates} candidates; replaying {len(reqs)} of "
            f"{num_layers} x {num_experts}, top_k {top_k}, {candidates} "
            "candidates: pack them with these"
        )
    out = cache_sim.prefetch_run(
        reqs, slots, hints, c, top_k=top_k, threshold=threshold, depth=depth,
        calibrate=calibrate, log=log,
    )  # fmt: skip
    return CacheRun(*(int(x) for x in out))


def _simulate_prefetch_reference(
    requests: Sequence[int],
    slots: int,
    num_layers: int,
    num_experts: int,
    predictions: Sequence[Mapping[int, np.ndarray] | None] | None,
    *,
    top_k: int,
    threshold: float = PREFETCH_THRESHOLD,
    depth: int | None = None,
    candidates: int | None = None,
    calibrate: bool = True,
    log: list | None = None,
    **kw,
) -> CacheRun:
    """:func:`simulate_prefetch` replayed with :class:`ExpertCache` and
    :class:`_FixedThrottle` themselves (the reference its compiled replay is
    tested against)."""
    if top_k < 1:
        raise ValueError(f"top_k {top_k}: expected at least 1")
    depth = top_k if depth is None else depth
    candidates = 2 * top_k if candidates is None else candidates
    L, E = num_layers, num_experts
    c = ExpertCache(slots, L, E, **kw)
    th = _FixedThrottle(L, threshold)
    run = CacheRun()
    pending: dict[int, tuple[float, bool]] = {}  # prefetched key -> (p, probe)

    def resolve(key: int, used: bool) -> None:
        p, probe = pending.pop(key)
        run.prefetch_used += used
        run.prefetch_wasted += not used
        th.outcome(p, used, probe, _KIND)

    def evict_into(slot: int, key: int, event: str) -> None:
        old = c.assign(slot, key, READY)
        if old in pending:  # a prefetched expert evicted before its layer came
            resolve(old, False)
        if log is not None:
            log.append((event, key, old))

    for start, layer, keys in _visits(requests, E, top_k):
        c.begin_layer(layer)
        for k in keys:
            c.on_request(k)
        run.requests += len(keys)
        if log is not None:
            log.append(("visit", layer, tuple(keys)))
        for k in [k for k in pending if k // E == layer]:
            resolve(k, k in keys)
        th.visit(layer, [k - layer * E for k in keys])
        held: list[int] = []  # slots the compute holds, in serving order
        missing = []
        for k in keys:
            s = c.find(k)
            if s is None:
                missing.append(k)
                continue
            run.hits += 1
            c.acquire(s)
            held.append(s)
            if log is not None:
                log.append(("hit", k, NO_SLOT))
        for k in missing:
            s = c.victim()
            while s is None:  # every slot held: the first served is done with
                c.release(held.pop(0))
                s = c.victim()
            evict_into(s, k, "miss")
            c.acquire(s)
            held.append(s)
        th.interval(1.0, 0.0, None, 0.0, len(missing))  # the probe interval
        pred = predictions[start] if predictions is not None else None
        if pred:  # the hint, from this visit's routing
            _prefetch(c, th, pred, layer, depth, candidates, calibrate,
                      pending, run, evict_into)  # fmt: skip
        for s in held:
            c.release(s)
    run.tokens = c.token
    return run


_KIND = "predictor"  # the hint kind the simulated throttle calibrates


def _prefetch(
    c: ExpertCache,
    th: _FixedThrottle,
    pred: Mapping[int, np.ndarray],
    layer: int,
    depth: int,
    candidates: int,
    calibrate: bool,
    pending: dict[int, tuple[float, bool]],
    run: CacheRun,
    evict_into: Callable[[int, int, str], None],
) -> None:
    """One hint as ``StreamedExperts._prefetch`` acts on it, nearest layer first."""
    L, E = c.L, c.E
    issued = 0
    for target, order, scores in ranked(pred, layer, L, candidates):
        dist = (target - layer) % L or L
        f = th.factor(dist, _KIND) if calibrate else 1.0
        raw = [float(x) for x in scores]
        ids = [int(e) for e in order]
        probs = [min(1.0, max(0.0, x) * f) for x in raw]
        c.set_predictions(target, ids, probs)
        if c.slots < 2:
            continue  # the live source never prefetches into one slot
        absent = [
            (p, e, x)
            for e, x, p in zip(ids, raw, probs)
            if c.find(target * E + e) is None
        ]
        th.candidates(target, dist, {e: x for _, e, x in absent}, _KIND)
        for p, e, _ in sorted(absent, key=lambda t: -t[0]):
            how = th.decide(p, issued < depth)
            if how is None:
                continue
            key = target * E + e
            s = c.victim(below=float(c.value(key)))
            if s is None:
                break  # everything held is worth more than these candidates
            evict_into(s, key, "prefetch")
            pending[key] = (p, how == "probe")
            th.started(how)
            run.prefetch_reads += 1
            run.probes += how == "probe"
            issued += 1


def simulate(
    requests: Sequence[int], slots: int, num_layers: int, num_experts: int
) -> dict[str, float]:
    """Hit rates of LRU, the three-signal policy and Belady's MIN on ``requests``."""
    return {
        "lru": simulate_lru(requests, slots),
        "policy": simulate_policy(requests, slots, num_layers, num_experts),
        "belady": simulate_belady(requests, slots),
    }
