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
and the pinned hot set are never evicted. :func:`simulate` replays a request
sequence through LRU, this policy and Belady's MIN (the offline optimum) to
report hit rates side by side.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

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
    predictions: Sequence[Mapping[int, np.ndarray] | None] | None = None,
    **kw,
) -> float:
    """Hit rate of :class:`ExpertCache`'s three-signal eviction.

    ``predictions`` (optional) is aligned with ``requests``: entry ``i``, when
    not None, maps a layer to f32 ``[E]`` probabilities of use and is handed to
    :meth:`ExpertCache.set_predictions` just before request ``i`` (after its
    layer visit began); without it the predicted signal stays 0.
    """
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


def simulate(
    requests: Sequence[int], slots: int, num_layers: int, num_experts: int
) -> dict[str, float]:
    """Hit rates of LRU, the three-signal policy and Belady's MIN on ``requests``."""
    return {
        "lru": simulate_lru(requests, slots),
        "policy": simulate_policy(requests, slots, num_layers, num_experts),
        "belady": simulate_belady(requests, slots),
    }
