"""Prefetch hints (router lookahead or a trained predictor) and the throttle that
decides, from live measurements, whether a hinted read is worth its bytes.

Hints. :func:`prefetch_hint` gives ``Engine.forward`` the callable that
``moe_block`` calls once the layer's demand reads are queued: with no predictor
it applies the next layer's router to the hidden state (router lookahead);
with a predictor (``mer generate --predictor PRED``) decode steps feed the
routing just made to ``Predictor.observe`` and hint every layer it returns
scores for (1..``max_distance`` ahead); a predictor that ``wants_preview``
(``mlp+preview``, ``shadow``) also gets the attention preview of the next
layer, computed here at decode steps (a ``shadow`` predictor's of the residual
plus its surrogate MoE output) (one more attention per layer, timed with the hint by
the compute gate). Forward passes over several tokens
(prefill) keep router lookahead, which sees every token; the predictor still
observes the last token, so its state is right for the first decode step.

Throttle. :class:`PrefetchThrottle` turns a hint's score into a probability of
use and issues a read only when the expected stall it saves exceeds the demand
time it is expected to cost. Nothing is left for the user to tune:

* **calibration**: every candidate (hinted and not in DRAM) is checked when
  its layer is next computed, whether it was read or not (a free shadow
  measurement); over the last ``window`` of them per hint kind (prefill's
  router lookahead, the predictor) and lookahead distance,
  ``c = (1 + sum used) / (1 + sum score)`` and ``p = min(1, c * score)``. The
  cache's third eviction signal gets these calibrated probabilities, so an
  overconfident predictor cannot push useful experts out either;
* **live precision**: over the last ``window`` issued prefetches, how many were
  used when their layer came (``used / issued``), compared with the ``p`` they
  were issued at: ``r = (1 + sum used) / (1 + sum p)`` scales ``p`` down when
  reads land too late or are cancelled;
* **benefit vs cost**: a used prefetch saves what a demand miss costs, ``g``
  = the measured stall per demand miss (small when reads overlap compute),
  or less: what used prefetches were measured to save, ``s`` (a read still in
  flight when its layer comes saved a miss's stall less the wait for it that
  followed; one issued a layer ahead of a read that takes several layers, or
  queued behind demand reads, saves little), which replaces ``g`` below when
  smaller; a wasted one takes ``t`` = one extent's read time from the drive, and delays
  demand reads in proportion to how busy the drive is, ``u`` = its measured
  busy share (moving averages per layer). Issue when ``p g > (1 - p) u t``,
  i.e. ``p > u t / (g + u t)``: an idle drive makes reads nearly free, a busy
  one with stalling compute makes only likely ones pay (``p > 1/2`` when
  every miss stalls a full read and the drive is never idle);
* **spare bandwidth**: at most ``rate * gap / extent`` prefetches in flight
  (at least one), where ``rate`` is the measured read rate and ``gap`` the
  compute time between two layers' demand waits: what the drive can read
  before the next demand comes;
* **off and probing**: when precision collapses no candidate passes and
  prefetch is off; the shadow calibration keeps measuring for free, and once
  ``PROBE_EVERY`` demand reads have gone by since the last probe, a refused
  candidate is read anyway (a probe, so ``r`` is measured again): at most one
  extra read per 32 demand reads, the interval doubling after each wasted
  probe (up to 16x) and back to 32 after a used one;
* **compute**: computing decode hints costs time too (a predictor's
  ``observe`` is comparable to a small model's whole layer). Per hint kind, a
  gate (:class:`_Gate`) compares the stall its used prefetches saved with the
  time spent computing and acting on the hints, and while they do not pay,
  computes them only in rare probe windows (the predictor is reset before
  one, its state being stale);
* **trial**: whatever the rule lets through, decode itself decides
  (:class:`_Trial`): windows of a few decode tokens alternate between
  prefetch allowed and not, and prefetch stays on only while the "on"
  windows are measured faster, with a checking pair now and then. This catches
  the costs no per-read formula sees (reads slowing the compute threads on a
  small machine, a drive that queues badly).

Demand reads win regardless: the reader (:mod:`mer_cli.io.reader`) starts no
prefetch chunk while a demand chunk is queued, a prefetch the compute needs is
promoted to demand, and stale ones are cancelled (:mod:`mer_cli.streaming`).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

WINDOW = 32  # outcomes remembered per signal
PRIOR = 1.0  # pseudo-outcome (score 1, used) behind each ratio
PROBE_EVERY = 32  # demand reads between probes: they add at most 1/32 to reads
PROBE_MAX = 16  # the probe interval grows to at most PROBE_EVERY * this
OFF_AFTER = 8  # refusals in a row after which the throttle reports "off"
EMA = 0.05  # weight of one layer in the stall share and compute gap averages
MAX_DISTANCE = 3  # lookahead distances calibrated separately (further: pooled)
CANDIDATES_PER_K = 2  # a predictor's candidates per target layer: 2 x top-k
TRIAL_TOKENS = 4  # decode tokens per trial window
TRIAL_PAIRS = 8  # on/off pairs of windows measured before a verdict is forced
TRIAL_MIN_PAIRS = 3  # pairs before an early verdict (a difference of 2 s.e.)
TRIAL_WARMUP = 2  # windows after the prompt not measured (the cache fills)
TRIAL_EVERY = 8  # after it: a checking pair after this many verdict windows
TRIAL_MEMORY = 16  # pairs the verdict averages


class _Window:
    """The last ``n`` pairs ``(a, b)`` with running sums (O(1) per update)."""

    __slots__ = ("pairs", "a", "b")

    def __init__(self, n: int) -> None:
        self.pairs: deque[tuple[float, float]] = deque(maxlen=n)
        self.a = self.b = 0.0

    def add(self, a: float, b: float) -> None:
        if len(self.pairs) == self.pairs.maxlen:
            oa, ob = self.pairs[0]
            self.a -= oa
            self.b -= ob
        self.pairs.append((a, b))
        self.a += a
        self.b += b

    def __len__(self) -> int:
        return len(self.pairs)


class _Gate:
    """Whether computing one kind of decode hint pays for its compute time.

    Open while the stall its used prefetches saved (moving average per hint,
    about four tokens, judged from the second token on) is at least what
    computing the hints (and acting on them) cost. Closed, hints are computed
    only in probe windows of ``2 L`` hints: the first after ``16 L`` skipped
    ones, the gap doubling (up to ``256 L``) after each window whose savings
    did not cover its cost; a window that paid opens the gate again. The
    windows cost at most 1/8 of the hints' compute, falling to under 1%.
    """

    def __init__(self, num_layers: int) -> None:
        self.L = num_layers
        self.cost = self.saved = 0.0  # moving averages per hint, seconds
        self.pending = 0.0  # stall saved since the last computed hint
        self.n = 0  # hints computed
        self.open = True
        self.stale = False  # hints were skipped: a predictor's state is old
        self.skip = 0  # hints to skip before the next probe window
        self.gap = 16 * num_layers
        self.window = 0  # hints left in the current probe window
        self.win_cost = self.win_saved = 0.0
        self.skipped = self.closed = 0

    def wanted(self) -> bool:
        """Compute this hint? (Counts a skipped one.)"""
        if self.open or self.window:
            return True
        if self.skip > 0:
            self.skip -= 1
            self.skipped += 1
            self.stale = True
            return False
        self.window, self.win_cost, self.win_saved = 2 * self.L, 0.0, 0.0
        return True

    def credit(self, seconds: float) -> None:
        """A prefetch of this kind was used: it saved about ``seconds`` of stall."""
        self.pending += seconds

    def computed(self, seconds: float) -> None:
        """A hint was computed in ``seconds`` (hint plus acting on it)."""
        saved, self.pending = self.pending, 0.0
        self.n += 1
        if self.open:
            a = 1.0 / (4 * self.L)
            self.cost += a * (seconds - self.cost)
            self.saved += a * (saved - self.saved)
            if self.n >= 2 * self.L and self.saved < self.cost:
                self.open, self.skip = False, self.gap
                self.closed += 1
            return
        self.win_cost += seconds
        self.win_saved += saved
        self.window -= 1
        if self.window == 0:
            if self.win_saved >= self.win_cost:  # paid: open, averages reseeded
                self.open, self.gap = True, 16 * self.L
                self.cost = self.win_cost / (2 * self.L)
                self.saved = self.win_saved / (2 * self.L)
            else:
                self.gap = min(2 * self.gap, 256 * self.L)
                self.skip = self.gap

    def stats(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "hints_computed": self.n,
            "hints_skipped": self.skipped,
            "closed": self.closed,
            "hint_ms": round(1000 * self.cost, 4),
            "saved_ms": round(1000 * self.saved, 4),
        }


class _Trial:
    """Whether prefetching makes decode faster, measured on the decode itself.

    The throttle's rule weighs what it can see per read (use, stall per miss,
    drive busy time); a machine adds costs it cannot see. On the 2-core
    development VM, reads that overlap compute slow the kernels (its DMA goes
    through software bounce buffers, and a preempted numba worker holds up
    its whole parallel region): prefetch with every hint kind ran at
    0.74-0.93x of prefetch off there while the rule let its reads through.
    The trial has the last word. Single-token forward passes are grouped in
    windows of ``TRIAL_TOKENS``, run with prefetch allowed (hints computed,
    reads issued) or not (nothing computed or read), in pairs whose order is
    drawn at random, after ``TRIAL_WARMUP`` windows not measured. A fixed
    order (on-off, off-on, ...) measured identical arms 2-10% apart: the
    same text puts its costly tokens (the cache filling after the prompt, a
    burst of misses) in the same arm every run. Each pair gives the
    difference of mean token time, on minus off. After ``TRIAL_PAIRS`` pairs
    (``TRIAL_MIN_PAIRS`` when the difference is already clear: the
    exploration costs the "on" half of its windows' slowdown), prefetch stays
    allowed only while the mean difference over the last
    ``TRIAL_MEMORY`` pairs is negative, and a checking pair after every
    ``TRIAL_EVERY`` verdict windows keeps measuring, so the verdict follows
    the run. Passes of several tokens (prefill, speculative checks, batches)
    are not timed and do not end a window.
    """

    def __init__(
        self, rng: random.Random | None = None, warmup: int = TRIAL_WARMUP
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._warmup = warmup  # windows still to skip
        self.allowed = True  # the current window's arm
        self._mark: float | None = None  # start of the previous timed pass
        self._times: list[float] = []  # token times of the current window
        self._plan: deque[bool] = deque()  # arms left in this pair
        if not warmup:
            self._start_pair()
        self._pair: dict[bool, float] = {}  # arm -> mean token time, this pair
        self.pairs: deque[tuple[float, float]] = deque(maxlen=TRIAL_MEMORY)
        self.n_pairs = 0
        self._since_check = 0

    @property
    def verdict(self) -> bool | None:
        """Prefetch pays (True), does not (False), or still measuring (None):
        the sign of the mean difference, from ``TRIAL_MIN_PAIRS`` pairs on
        when it is over twice its standard error, from ``TRIAL_PAIRS`` on in
        any case."""
        n = len(self.pairs)
        if self.n_pairs < TRIAL_MIN_PAIRS:
            return None
        d = [on - off for on, off in self.pairs]
        mean = sum(d) / n
        if self.n_pairs >= TRIAL_PAIRS:
            return mean < 0
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
        return mean < 0 if abs(mean) > 2 * se else None

    def step(self, tokens: int, now: float) -> None:
        """A forward pass over ``tokens`` tokens starts at ``now``."""
        if tokens != 1:
            self._mark = None  # its time is not a decode token's
            return
        if self._mark is not None:
            self._times.append(now - self._mark)
        self._mark = now
        if len(self._times) < TRIAL_TOKENS:
            return
        mean = sum(self._times) / len(self._times)
        self._times.clear()
        if self._warmup:
            self._warmup -= 1
            if not self._warmup:
                self._start_pair()
            return
        if self._pair or self._plan:  # this window was half of a pair
            self._pair[self.allowed] = mean
            if len(self._pair) == 2:
                self.pairs.append((self._pair[True], self._pair[False]))
                self.n_pairs += 1
                self._pair = {}
        if not self._plan:
            verdict = self.verdict
            if verdict is None or self._since_check >= TRIAL_EVERY:
                self._start_pair()
                self._since_check = 0
                return
            self._since_check += 1
            self.allowed = verdict
            return
        self.allowed = self._plan.popleft()

    def _start_pair(self) -> None:
        """The next two windows: on and off, in random order."""
        first = self._rng.random() < 0.5
        self.allowed = first
        self._plan.append(not first)

    def stats(self) -> dict[str, Any]:
        n = len(self.pairs)
        on = sum(p[0] for p in self.pairs) / n if n else None
        off = sum(p[1] for p in self.pairs) / n if n else None
        v = self.verdict
        return {
            "verdict": "measuring" if v is None else "on" if v else "off",
            "pairs": self.n_pairs,
            "on_ms_per_token": None if on is None else round(1000 * on, 3),
            "off_ms_per_token": None if off is None else round(1000 * off, 3),
            "speedup": None if not on else round(off / on, 4),
        }


class PrefetchThrottle:
    """Live calibration, precision and bandwidth state behind prefetch decisions.

    Driven by :class:`~mer_cli.streaming.StreamedExperts` from the compute
    thread: :meth:`interval` once per fetch, :meth:`candidates` for each hint,
    :meth:`visit` when a layer's experts are asked for, :meth:`outcome` when
    an issued prefetch is resolved.

    Parameters
    ----------
    num_layers
        Layers of the model (lookahead distances wrap around a token).
    extent_nbytes
        Bytes of one expert read.
    window
        Outcomes remembered per signal.
    """

    def __init__(
        self, num_layers: int, extent_nbytes: int, window: int = WINDOW
    ) -> None:
        self.L = num_layers
        self.extent_nbytes = extent_nbytes
        self.window = window
        # shadow outcomes (score, used) per (hint kind, distance); issued
        # outcomes (p, used)
        self._shadow: dict[tuple[str, int], _Window] = {}
        self._issued = _Window(window)
        self._gates: dict[str, _Gate] = {}
        self.trial = _Trial()
        self._hint_time: dict[str, float] = {}  # acting on hints, per kind
        # candidates awaiting their layer: layer -> (kind, distance) -> scores
        self._pending: dict[int, dict[tuple[str, int], dict[int, float]]] = {}
        # moving averages per layer: stall, wall, compute gap, drive busy, misses
        self._stall = 0.0
        self._wall = 0.0
        self._gap: float | None = None
        self._busy = 0.0
        self._misses = 0.0
        self._rate: float | None = None  # bytes/s while reading
        self._saving: float | None = None  # stall saved per used prefetch
        self._refused = 0  # refusals in a row
        self._since_probe = 0  # demand reads since the last probe (answer)
        self._probe_interval = PROBE_EVERY
        self._probe_pending = 0  # probes issued, not yet resolved
        self.issued = self.probes = 0
        self.skipped_benefit = self.skipped_bandwidth = 0
        self.shadow_used = self.shadow_total = 0

    # ------------------------------------------------------------ measurements

    def interval(
        self,
        wall_s: float,
        stall_s: float,
        rate: float | None,
        busy_s: float = 0.0,
        misses: int = 0,
    ) -> None:
        """One layer's interval since the previous fetch: wall time, the part
        stalled on reads, the reader's bytes/s while busy (None: unknown), the
        time the drive had reads in flight, and the demand misses."""
        if wall_s <= 0:
            return
        self._wall += EMA * (wall_s - self._wall)
        self._stall += EMA * (min(stall_s, wall_s) - self._stall)
        self._busy += EMA * (min(busy_s, wall_s) - self._busy)
        self._misses += EMA * (misses - self._misses)
        self._since_probe += misses
        gap = max(wall_s - stall_s, 0.0)
        self._gap = gap if self._gap is None else self._gap + EMA * (gap - self._gap)
        if rate:
            self._rate = rate

    @property
    def stall_share(self) -> float:
        """Moving-average share of time the compute waited for reads."""
        return self._stall / self._wall if self._wall > 0 else 0.0

    @property
    def read_seconds(self) -> float | None:
        """``t``: one extent's read time at the measured rate (None: unknown)."""
        return self.extent_nbytes / self._rate if self._rate else None

    @property
    def busy_share(self) -> float:
        """``u``: moving-average share of time the drive had reads in flight."""
        return min(self._busy / self._wall, 1.0) if self._wall > 0 else 0.0

    @property
    def stall_per_miss(self) -> float | None:
        """``g``: moving-average stall per demand miss, seconds (None: no miss)."""
        return self._stall / self._misses if self._misses > 1e-9 else None

    @property
    def saving_per_use(self) -> float | None:
        """``s``: moving average of the stall a used prefetch saved, seconds
        (None: none used yet)."""
        return self._saving

    @property
    def threshold(self) -> float:
        """Least probability of use at which a prefetch pays, ``u t / (s + u t)``
        (0 until measured). ``s`` is what a used prefetch saved, measured, at
        most ``g``; ``g = t`` until a miss was seen."""
        t = self.read_seconds
        if t is None:
            return 0.0
        g = self.stall_per_miss
        g = t if g is None else g
        if self._saving is not None:
            g = min(g, self._saving)
        cost = self.busy_share * t
        return cost / (g + cost) if g + cost > 0 else 0.0

    def calibration(self, distance: int, kind: str = "hint") -> float:
        """``(1 + used) / (1 + sum of scores)`` of the shadow window of hints of
        ``kind`` at ``distance``."""
        w = self._shadow.get((kind, min(distance, MAX_DISTANCE)))
        if not w:
            return 1.0
        return (PRIOR + w.b) / (PRIOR + w.a)

    @property
    def realized(self) -> float:
        """``(1 + used) / (1 + sum of p)`` over the issued prefetches' window."""
        w = self._issued
        return (PRIOR + w.b) / (PRIOR + w.a)

    @property
    def live_precision(self) -> float | None:
        """Used / issued over the window of issued prefetches (None: none yet)."""
        w = self._issued
        return w.b / len(w) if len(w) else None

    def hint_precision(self) -> dict[str, float]:
        """Share of candidates used, per hint kind, over its windows."""
        out: dict[str, list[float]] = {}
        for (kind, _), w in self._shadow.items():
            acc = out.setdefault(kind, [0.0, 0.0])
            acc[0] += w.b
            acc[1] += len(w)
        return {k: u / n for k, (u, n) in out.items() if n}

    def factor(self, distance: int, kind: str = "hint") -> float:
        """What scores of ``kind`` at ``distance`` are multiplied by."""
        return self.calibration(distance, kind) * min(self.realized, 1.0)

    def probability(self, score: float, distance: int, kind: str = "hint") -> float:
        """Calibrated probability that a candidate of ``score`` is used."""
        return min(1.0, max(0.0, float(score)) * self.factor(distance, kind))

    def gate(self, kind: str) -> _Gate:
        """The compute-cost gate of decode hints of ``kind``."""
        g = self._gates.get(kind)
        if g is None:
            g = self._gates[kind] = _Gate(self.L)
        return g

    def acted(self, kind: str, seconds: float) -> None:
        """Time spent acting on a hint of ``kind`` (charged to its next one)."""
        self._hint_time[kind] = self._hint_time.get(kind, 0.0) + seconds

    def hint_computed(self, kind: str, seconds: float) -> None:
        """A decode hint of ``kind`` took ``seconds`` to compute."""
        self.gate(kind).computed(seconds + self._hint_time.pop(kind, 0.0))

    def inflight_cap(self, extent_nbytes: int, depth: int) -> int:
        """Prefetches allowed in flight: what the drive reads in one compute
        gap (at least 1, at most ``depth``; ``depth`` until measured)."""
        if self._gap is None or not self._rate:
            return depth
        n = int(self._rate * self._gap / max(extent_nbytes, 1))
        return max(1, min(depth, n))

    # ------------------------------------------------------------ outcomes

    def candidates(
        self, layer: int, distance: int, scores: dict[int, float], kind: str = "hint"
    ) -> None:
        """Remember ``layer``'s absent hinted experts ``{expert: score}`` for the
        shadow check; replaces earlier ones of the same kind and distance."""
        key = (kind, min(distance, MAX_DISTANCE))
        self._pending.setdefault(layer, {})[key] = dict(scores)

    def visit(self, layer: int, used: Sequence[int]) -> None:
        """``layer``'s experts ``used`` are asked for: resolve its candidates."""
        used_set = {int(e) for e in used}
        for key, cand in self._pending.pop(layer, {}).items():
            w = self._shadow.get(key)
            if w is None:
                w = self._shadow[key] = _Window(self.window)
            for e, s in cand.items():
                u = 1.0 if e in used_set else 0.0
                w.add(min(max(s, 0.0), 1.0), u)
                self.shadow_used += int(u)
                self.shadow_total += 1

    def outcome(
        self,
        p: float,
        used: bool,
        probe: bool,
        kind: str | None = None,
        late: bool = False,
        saved: float | None = None,
    ) -> None:
        """An issued prefetch (issued at probability ``p``) was used or not.

        A used one saved the stall of a demand miss ``g`` if it had landed;
        one still ``late`` (being read) saved ``saved`` seconds, measured by
        the caller as ``g`` less the time the compute then waited for it
        (None: half a miss). That saving feeds ``s`` (:attr:`threshold`) and
        credits the gate of its ``kind``: a prefetch that sat behind demand
        reads, or was issued one layer ahead of a read several layers long,
        saves little of a miss.
        """
        self._issued.add(p, 1.0 if used else 0.0)
        if used:
            g = self.stall_per_miss or self.read_seconds or 0.0
            if late:
                saved = g / 2 if saved is None else min(g, max(saved, 0.0))
            else:
                saved = g
            a = 1.0 / self.window
            self._saving = (
                saved
                if self._saving is None
                else self._saving + a * (saved - self._saving)
            )
            if kind is not None:
                self.gate(kind).credit(saved)
        if probe:  # the next probe comes an interval after this answer
            self._probe_pending = max(0, self._probe_pending - 1)
            self._since_probe = 0
            if used:
                self._probe_interval = PROBE_EVERY
            else:
                self._probe_interval = min(
                    self._probe_interval * 2, PROBE_EVERY * PROBE_MAX
                )

    # ------------------------------------------------------------ decisions

    def decide(self, p: float, room: bool) -> str | None:
        """``"issue"``, ``"probe"`` or None (skip, counted) for a candidate of
        calibrated probability ``p``; ``room``: below the in-flight cap. The
        caller reports a read it then starts with :meth:`started`."""
        if p > self.threshold:
            self._refused = 0
            if not room:
                self.skipped_bandwidth += 1
                return None
            return "issue"
        self._refused += 1
        if self._since_probe >= self._probe_interval and not self._probe_pending:
            return "probe"
        self.skipped_benefit += 1
        return None

    def started(self, how: str) -> None:
        """A read decided by :meth:`decide` was started."""
        self.issued += 1
        self._since_probe = 0  # issued reads measure precision: no probe needed
        if how == "probe":
            self._probe_pending += 1
            self.probes += 1

    @property
    def state(self) -> str:
        """``"on"`` while recent candidates pass, ``"off"`` after a run of
        refusals (only probes are read then)."""
        return "off" if self._refused >= OFF_AFTER or self._probe_pending else "on"

    def stats(self) -> dict[str, Any]:
        """Counters for ``--stats``/``--json``."""

        def r4(v):
            return None if v is None else round(float(v), 4)

        return {
            "state": self.state,
            "issued": self.issued,
            "probes": self.probes,
            "skipped_benefit": self.skipped_benefit,
            "skipped_bandwidth": self.skipped_bandwidth,
            "live_precision": r4(self.live_precision),
            "hints_used": {k: r4(v) for k, v in self.hint_precision().items()},
            "candidates_checked": self.shadow_total,
            "threshold": r4(self.threshold),
            "stall_share": r4(self.stall_share),
            "stall_per_miss_s": r4(self.stall_per_miss),
            "saved_per_use_s": r4(self.saving_per_use),
            "drive_busy_share": r4(self.busy_share),
            "read_s_per_extent": r4(self.read_seconds),
            "realized_factor": r4(self.realized),
            "hint_gates": {k: g.stats() for k, g in self._gates.items()},
            "trial": self.trial.stats(),
        }


# ====================================================================== hints


def use_predictor(engine, predictor) -> None:
    """Rank ``engine``'s prefetches with ``predictor`` (None: router lookahead);
    a streamed source reports the kind in its stats (``prefetch_hints``)."""
    engine.predictor = predictor
    src = engine.source
    if hasattr(src, "hints") and getattr(src, "prefetch_enabled", False):
        src.hints = predictor.kind if predictor is not None else "lookahead"


def prefetch_hint(
    engine, layer: int, x: np.ndarray, start: int, cache: Any = None
) -> Callable[[np.ndarray], list[Any]] | None:
    """The hint callable ``moe_block`` calls with ``ids`` ``[T, K]`` once the
    demand reads of ``layer`` are queued; None when there is nothing to hint.

    ``x`` ``[T, D]`` f32 is the residual entering ``layer``'s MoE block;
    ``start`` the position of its first token (0: a new sequence). Decode
    hints (T = 1) go through the source throttle's compute gate of their kind:
    skipped (None) while computing them does not pay. ``cache``: the
    sequence's KV cache, given by ``Engine.forward``, whose layer ``layer+1``
    has not run yet in this pass; with it, a predictor that
    ``wants_preview`` gets the attention preview of layer ``layer+1``
    (:func:`mer_cli.models.layers.attention_preview`) at decode steps.
    """
    from mer_cli.models.layers import attention_preview, lookahead

    if not getattr(engine.source, "prefetch_enabled", True):
        return None  # --no-prefetch: nothing is read ahead, nothing computed
    pred = getattr(engine, "predictor", None)
    L = engine.cfg.num_layers
    T = x.shape[0]
    th = getattr(engine.source, "throttle", None)
    if layer == 0 and th is not None:
        th.trial.step(T, time.perf_counter())
    nxt = layer + 1 if layer + 1 < L else None
    if T > 1:  # prefill: router lookahead over every token

        def prefill_hint(ids: np.ndarray) -> list[Any]:
            if pred is not None:
                observe(engine, pred, layer, ids, x, start)
            if nxt is None:
                return []
            return [lookahead(engine.arch, engine.layers[nxt], nxt, x)]

        return prefill_hint if pred is not None or nxt is not None else None

    kind = pred.kind if pred is not None else "lookahead"
    gate = th.gate(kind) if th is not None else None
    if th is not None and not th.trial.allowed:  # an off window of the trial
        if gate is not None:
            gate.stale = True
        return None
    if pred is None and nxt is None:
        return None
    if gate is not None and not gate.wanted():
        return None

    def decode_hint(ids: np.ndarray) -> list[Any]:
        t0 = time.perf_counter()
        if pred is None:
            hints = [lookahead(engine.arch, engine.layers[nxt], nxt, x)]
        else:
            if gate is not None and gate.stale:  # steps were skipped
                pred.reset()
                gate.stale = False
            pv = None
            wants = getattr(pred, "wants_preview", False)
            if cache is not None and nxt is not None and wants:
                nw = engine.layers[nxt]
                xp = pred.preview_residual(layer, ids[-1:], x[-1:])
                pv = attention_preview(engine.arch, nw, nxt, xp, cache, start)
            out = observe(engine, pred, layer, ids, x, start, pv)
            hints = predicted(pred, out, layer, L, CANDIDATES_PER_K * ids.shape[-1])
        if th is not None:
            th.hint_computed(kind, time.perf_counter() - t0)
        return hints

    return decode_hint


def ranked(
    out: dict[int, Any], layer: int, L: int, n: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(target, experts, scores)`` of a predictor's ``{target_layer: scores
    [E]}`` made at ``layer``, nearest target first, each with its ``n`` best
    experts of nonzero score (best first); targets without one are left out.
    The live hints and the cache simulation choose candidates with this."""
    picked = []
    for target in sorted(out, key=lambda t: (t - layer) % L):
        if target == layer or not 0 <= target < L:
            continue
        scores = np.asarray(out[target], np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")[:n]
        order = order[scores[order] > 0]
        if len(order):
            picked.append((target, order, scores[order]))
    return picked


def predicted(
    pred, out: dict[int, np.ndarray], layer: int, L: int, n: int
) -> list[Any]:
    """A predictor's ``{target_layer: scores [E]}`` as hints (:func:`ranked`)."""
    from mer_cli.models.layers import Lookahead

    return [
        Lookahead(target, ids.tolist(), scores.tolist(), pred.kind)
        for target, ids, scores in ranked(out, layer, L, n)
    ]


def observe(
    engine,
    pred,
    layer: int,
    ids: np.ndarray,
    x: np.ndarray,
    start: int,
    preview: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Feed the last token's routing at ``layer`` (and the attention preview
    ``[T, D]`` of layer ``layer+1``, if computed) to ``pred`` (reset first at
    the start of a sequence); its ``{target_layer: scores [E]}``."""
    if layer == 0 and start == 0:
        pred.reset()
    kw = {}
    if preview is not None:
        kw["preview"] = np.array(preview[-1], np.float32)
    # copies: the engine keeps using ids and x after the hint
    return pred.observe(
        layer, np.array(ids[-1], np.int64), np.array(x[-1], np.float32), **kw
    )
