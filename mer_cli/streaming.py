"""Experts streamed from the store into a DRAM cache under a byte budget.

:class:`StreamedExperts` is the :class:`~mer_cli.experts.ExpertSource` for
models larger than memory: ``ram_budget // extent_nbytes`` fixed slots (one
anonymous mapping, allocated once), O_DIRECT reads on a thread pool
(``mer_cli.io.reader``; one queue per drive when ``mer shard`` spread the
store over several), and the three-signal eviction of
:class:`~mer_cli.cache.ExpertCache`. An expert stored on several drives is
read from the copy whose drive has the fewest requests outstanding.

``fetch(layer, ids)`` yields the experts already in DRAM first, then each
missing one the moment its read completes, so the MoE layer computes while the
drive works. A yielded expert's slot is held only until the generator is
resumed; after that it may be reused, which is why a budget of ONE slot still
works with any top-k (reads then happen one after another). Prefetches
(``prefetch(layer, ids, scores)``) go only into empty slots or over experts worth
less than what they bring, are queued behind every demand read, are issued only
when :class:`~mer_cli.prefetch.PrefetchThrottle` finds their expected benefit
above their cost (calibrated probability of use x measured stall per miss
against the drive time a wasted read takes; spare bandwidth), and are
cancelled when stale: a fetch of the layer that does not ask for them, or a
newer prefetch hint for that layer. A prefetch counts as used when the next
fetch of its layer asks for it, and as wasted otherwise (it stays cached).

Not thread-safe: one compute thread calls fetch/prefetch/stats; only the reader
threads run alongside, and they touch nothing here but a completion queue.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mer_cli import interrupt
from mer_cli.cache import LOADING, READY, ExpertCache, simulate_belady, simulate_lru
from mer_cli.errors import ReadError, ResourceError
from mer_cli.formats.store import Store
from mer_cli.io.reader import (
    DEFAULT_CHUNK,
    DEFAULT_THREADS,
    DEMAND,
    PREFETCH,
    ExtentReader,
    ReadRequest,
)
from mer_cli.io.slabs import SlabPool
from mer_cli.memory import check_budget
from mer_cli.prefetch import PrefetchThrottle
from mer_cli.units import format_size


class StreamedExperts:
    """Stream routed experts from ``store`` through a cache of ``ram_budget`` bytes.

    Parameters
    ----------
    store
        An opened :class:`~mer_cli.formats.store.Store`.
    ram_budget
        Bytes for expert slots; at least one extent (``store.extent_nbytes``).
    io_threads
        Reader threads, i.e. the I/O queue depth.
    chunk_size
        Bytes per read call; one extent is read as several chunks in parallel.
    verify_checksums
        Check the CRC-32 of every extent read against the manifest.
    prefetch
        Act on :meth:`prefetch` hints (False: ignore them, demand reads only).
    prefetch_depth
        Most prefetch reads in flight at once (default: the model's top-k); the
        throttle allows fewer when the drive cannot read them before the next
        layer's demand reads.
    pinned
        ``(layer, expert)`` pairs loaded at start and never evicted (the hot set
        from trace statistics); must leave at least one slot free.
    direct
        Use O_DIRECT reads (False: buffered reads + ``fadvise(DONTNEED)``).
    switch_interval
        If given, ``sys.setswitchinterval`` while the source is open (restored
        by :meth:`close`): a Python-heavy compute thread otherwise holds the GIL
        for up to 5 ms at a time before a reader thread can queue its next read.
    """

    def __init__(
        self,
        store: Store,
        ram_budget: int,
        *,
        io_threads: int = DEFAULT_THREADS,
        chunk_size: int = DEFAULT_CHUNK,
        verify_checksums: bool = False,
        prefetch: bool = True,
        prefetch_depth: int | None = None,
        pinned: Iterable[tuple[int, int]] = (),
        direct: bool = True,
        populate: bool = True,
        switch_interval: float | None = None,
    ) -> None:
        cfg = store.model
        self.store = store
        self.L, self.E = cfg.num_layers, cfg.num_experts
        self.ram_budget = int(ram_budget)
        slots = check_budget(self.ram_budget, store.extent_nbytes, str(store.path))
        slots = min(slots, self.L * self.E)
        pinned = sorted({(int(la), int(e)) for la, e in pinned})
        if pinned and len(pinned) >= slots:
            raise ResourceError(
                f"pinning {len(pinned)} experts needs at least {len(pinned) + 1} slots "
                f"({format_size((len(pinned) + 1) * store.extent_nbytes)}), but "
                f"--ram-budget {format_size(self.ram_budget)} holds {slots}; raise "
                "--ram-budget or pin fewer experts"
            )
        self.slots = slots
        self.verify = verify_checksums
        self.prefetch_enabled = prefetch
        self.prefetch_depth = prefetch_depth or cfg.top_k
        self.slabs = SlabPool(store.extent_nbytes, slots, populate=populate)
        self.cache = ExpertCache(slots, self.L, self.E)
        self.reader = ExtentReader(
            store.file_paths, threads=io_threads, chunk_size=chunk_size, direct=direct
        )
        self._done: queue.SimpleQueue[ReadRequest] = queue.SimpleQueue()
        self._reqs: dict[int, ReadRequest] = {}  # slot -> read in flight into it
        # slots filled by prefetch, not yet resolved -> (probability, probe, kind)
        self._prefetched: dict[int, tuple[float, bool, str]] = {}
        # used prefetches still being read -> (probability, probe, kind, asked at)
        self._pf_late: dict[int, tuple[float, bool, str, float]] = {}
        self.throttle = PrefetchThrottle(self.L, store.extent_nbytes)
        self.hints = "lookahead" if prefetch else "off"  # set by use_predictor
        self._t_fetch: float | None = None  # when the previous fetch began
        self._marks = (0.0, 0.0, 0)  # stall, drive busy seconds, misses then
        self._landed: list[ReadRequest] = []  # finished reads a fetch waits for
        self.sequence: list[int] = []  # demanded keys, in order
        self.hits = self.misses = 0
        self.stall_seconds = 0.0
        self.fetches = 0
        self.pf_issued = self.pf_used = self.pf_late = 0
        self.pf_wasted = self.pf_cancelled = self.pf_failed = 0
        self._old_switch = None
        if switch_interval is not None:
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(switch_interval)
        try:
            self._load_pinned(pinned)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- helpers

    def _label(self, key: int) -> str:
        return f"expert (layer {key // self.E}, expert {key % self.E})"

    def _submit(self, slot: int, key: int, priority: int) -> ReadRequest:
        ent = self.store.experts[key]
        file, offset = ent.file, ent.offset
        if ent.replicas:  # copies on several drives: the least busy one
            file, offset = min(ent.copies, key=lambda c: self.reader.pending(c[0]))
        req = self.reader.submit(
            file,
            offset,
            ent.nbytes,
            self.slabs.slabs[slot],
            priority=priority,
            key=slot,
            label=self._label(key),
            crc32=ent.crc32 if self.verify else None,
            on_done=self._done.put,
        )
        self._reqs[slot] = req
        return req

    def _evict_into(self, slot: int, key: int) -> None:
        """Give ``slot`` (empty or evictable) to ``key``, which starts loading."""
        if slot in self._prefetched:  # its prefetched expert was never used
            self.pf_wasted += 1
            self._pf_resolve(slot, False)
        self.cache.assign(slot, key, LOADING)

    def _pf_resolve(self, slot: int, used: bool, late: bool = False) -> None:
        """The prefetch into ``slot`` was used, or will not be: tell the throttle.
        A used one still being read is told when it lands (:meth:`_pf_landed`),
        with the stall it saved."""
        p, probe, kind = self._prefetched.pop(slot)
        if used and late:
            self._pf_late[slot] = (p, probe, kind, time.perf_counter())
            return
        self.throttle.outcome(p, used, probe, kind, late)

    def _pf_landed(self, slot: int) -> None:
        """A prefetch that was still being read when asked for has landed: it
        saved a miss's stall less the time the compute waited for it since."""
        p, probe, kind, t_ask = self._pf_late.pop(slot)
        th = self.throttle
        g = th.stall_per_miss or th.read_seconds or 0.0
        saved = max(0.0, g - (time.perf_counter() - t_ask))
        th.outcome(p, True, probe, kind, late=True, saved=saved)

    def _complete(self, req: ReadRequest) -> None:
        """Apply a finished read to the slot table (compute thread only)."""
        slot = req.key
        if self._reqs.get(slot) is not req:
            return
        del self._reqs[slot]
        if self.cache.users[slot] > 0:  # a fetch is waiting for this slot
            self._landed.append(req)
        if req.ok:
            self.cache.mark_ready(slot)
            return
        if slot in self._prefetched:
            self.pf_failed += 1  # a demand read of it will report the error
            self._pf_resolve(slot, False)
        self.cache.clear(slot)

    def _cancel(self, slot: int) -> None:
        """Cancel the prefetch read into ``slot``; its expert counts as absent at
        once, the slot comes back when the chunks in flight have landed."""
        if self.reader.cancel(self._reqs[slot]):
            self.pf_cancelled += 1
            self._pf_resolve(slot, False)
            self.cache.detach(slot)

    def _drain(self) -> None:
        while True:
            try:
                req = self._done.get_nowait()
            except queue.Empty:
                return
            self._complete(req)

    def _wait(self) -> ReadRequest:
        """Block until some read finishes (time counted as stall), apply it."""
        t0 = time.perf_counter()
        req = interrupt.get(self._done)
        self.stall_seconds += time.perf_counter() - t0
        self._complete(req)
        return req

    def _parts(self, slot: int) -> dict[str, Any]:
        return self.store.expert_parts(self.slabs.view(slot))

    def _cancel_stale(self, layer: int, keep: set[int]) -> None:
        """Cancel prefetch reads for ``layer`` whose experts are not in ``keep``."""
        lo, hi = layer * self.E, (layer + 1) * self.E
        for slot in list(self._reqs):
            key = int(self.cache.key[slot])
            if slot in self._prefetched and lo <= key < hi and key not in keep:
                self._cancel(slot)

    def _resolve_layer(self, layer: int, keys: set[int]) -> None:
        """``layer`` is computed now with ``keys``: its prefetched experts not
        asked for were wasted (reads not yet started are cancelled; what
        lands stays cached as an ordinary entry)."""
        self._cancel_stale(layer, keys)
        lo, hi = layer * self.E, (layer + 1) * self.E
        for slot in list(self._prefetched):
            key = int(self.cache.key[slot])
            if lo <= key < hi and key not in keys:
                self.pf_wasted += 1
                self._pf_resolve(slot, False)

    def _measure_interval(self) -> None:
        """Feed the throttle the time since the previous fetch, the part of it
        stalled on reads, the drive's busy time and rate, and the misses."""
        now = time.perf_counter()
        r = self.reader.stats()
        marks = (self.stall_seconds, r["read_seconds"], self.misses)
        if self._t_fetch is not None:
            rate = r["bytes_read"] / r["read_seconds"] if r["read_seconds"] else None
            self.throttle.interval(
                now - self._t_fetch,
                marks[0] - self._marks[0],
                rate,
                busy_s=marks[1] - self._marks[1],
                misses=marks[2] - self._marks[2],
            )
        self._t_fetch, self._marks = now, marks

    def _load_pinned(self, pinned: list[tuple[int, int]]) -> None:
        for la, e in pinned:
            key = la * self.E + e
            slot = self.cache.victim()
            self.cache.assign(slot, key, LOADING)
            self.cache.pin(key)
            self._submit(slot, key, DEMAND)
        while self._reqs:
            req = self._wait()
            if req.error is not None:
                raise req.error

    # -------------------------------------------------------------- ExpertSource

    def fetch(
        self, layer: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(expert_id, parts)`` for each id, cached ones first, then each
        missing one as soon as its read completes.

        ``parts`` maps ``"gate_up"``/``"down"`` to read-only zero-copy views into
        a slab, valid until the generator is resumed or closed.

        Raises
        ------
        ReadError
            A read failed (file truncated, removed, I/O error after retries).
        FormatError
            ``verify_checksums`` is on and an extent's CRC-32 does not match.
        """
        E, cache = self.E, self.cache
        keys = [layer * E + int(e) for e in experts]
        if not 0 <= layer < self.L or any(not 0 <= int(e) < E for e in experts):
            raise ValueError(
                f"fetch(layer {layer}, experts {list(experts)}): expected layer in "
                f"0..{self.L - 1} and experts in 0..{E - 1}"
            )
        if len(set(keys)) != len(keys):
            raise ValueError(f"fetch(layer {layer}): repeated expert ids {experts}")
        self.fetches += 1
        self._measure_interval()
        cache.begin_layer(layer)
        for k in keys:
            cache.on_request(k)
        self.sequence.extend(keys)
        self.throttle.visit(layer, [int(e) for e in experts])
        self._drain()
        self._resolve_layer(layer, set(keys))
        self._drain()

        ready: list[int] = []  # slots to yield at once
        mine: set[int] = set()  # slots loading for this fetch
        waiting: list[int] = []  # keys still without a slot
        for k in keys:
            s = cache.find(k)
            if s is None:
                self.misses += 1
                waiting.append(k)
                continue
            if s in self._prefetched:
                self.pf_used += 1
                self._pf_resolve(s, True, late=cache.state[s] != READY)
            cache.acquire(s)
            if cache.state[s] == READY:
                self.hits += 1
                ready.append(s)
            else:  # a prefetch still in flight: now a demand read
                self.misses += 1
                self.pf_late += 1
                self.reader.promote(self._reqs[s], DEMAND)
                mine.add(s)
        held: set[int] = set(ready) | mine  # slots this fetch has acquired
        try:
            waiting = self._start(waiting, held, mine)
            for s in ready:
                yield int(cache.key[s]) % E, self._parts(s)
                held.discard(s)
                cache.release(s)
                waiting = self._start(waiting, held, mine)
            while mine or waiting:
                req = next((r for r in self._landed if r.key in mine), None)
                if req is None:
                    if waiting and not mine:
                        self._make_room()
                        waiting = self._start(waiting, held, mine)
                        if mine:
                            continue
                    self._wait()
                    waiting = self._start(waiting, held, mine)
                    continue
                self._landed.remove(req)
                s = req.key
                mine.discard(s)
                if s in self._pf_late:
                    self._pf_landed(s)
                if req.error is not None:
                    raise req.error
                if not req.ok:
                    raise ReadError(f"read of {req.label} was cancelled")
                yield int(cache.key[s]) % E, self._parts(s)
                held.discard(s)
                cache.release(s)
                waiting = self._start(waiting, held, mine)
        finally:
            for s in held:
                cache.release(s)
                if s in self._pf_late:  # left before it landed: saving unknown
                    p, probe, kind, _ = self._pf_late.pop(s)
                    self.throttle.outcome(p, True, probe, kind, late=True)
            self._landed = [r for r in self._landed if r.key not in held]

    def _start(self, waiting: list[int], held: set[int], mine: set[int]) -> list[int]:
        """Start demand reads for ``waiting`` keys while slots can be had."""
        self._drain()
        while waiting:
            s = self.cache.victim()
            if s is None:
                break
            key = waiting.pop(0)
            self._evict_into(s, key)
            self.cache.acquire(s)
            held.add(s)
            mine.add(s)
            self._submit(s, key, DEMAND)
        return waiting

    def _make_room(self) -> None:
        """No slot is free and nothing of this fetch is loading: cancel prefetch
        reads so their slots come back (or fail loudly rather than hang)."""
        self._drain()
        if self.cache.victim() is not None:
            return
        pf = [s for s in self._reqs if s in self._prefetched]
        for s in pf:
            self._cancel(s)
        if not self._reqs:
            raise ResourceError(
                f"all {self.slots} expert slots are in use by the compute or pinned; "
                "close earlier fetch() generators before starting another, or "
                "raise --ram-budget"
            )

    def prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        scores: Sequence[float] | None = None,
        kind: str = "hint",
    ) -> None:
        """Consider reading ``layer``'s ``experts`` (best first) into spare slots.

        ``scores`` (the hint's probabilities of use; None: 1 each) are
        calibrated by the throttle's live measurements of hints of the same
        ``kind`` (router lookahead, a predictor) and distance; the calibrated
        values feed the cache's predictor signal (when ``scores`` is given) and
        decide which candidates are read
        (:class:`~mer_cli.prefetch.PrefetchThrottle`).
        Never evicts an expert worth more than the one it would bring, never
        touches slots in use, and queues behind every demand read. A hint for
        a layer past the last is ignored.
        """
        if not 0 <= layer < self.L:
            return
        t0 = time.perf_counter()
        try:
            self._prefetch(layer, experts, scores, kind)
        finally:
            self.throttle.acted(kind, time.perf_counter() - t0)

    def _prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        scores: Sequence[float] | None,
        kind: str,
    ) -> None:
        E, cache, th = self.E, self.cache, self.throttle
        ids = [int(e) for e in experts]
        if any(not 0 <= e < E for e in ids):
            raise ValueError(
                f"prefetch(layer {layer}): experts {ids} not in 0..{E - 1}"
            )
        raw = [1.0] * len(ids) if scores is None else [float(x) for x in scores]
        dist = (layer - cache.layer) % self.L or self.L  # layers ahead
        f = th.factor(dist, kind)
        probs = [min(1.0, max(0.0, x) * f) for x in raw]
        if scores is not None:
            cache.set_predictions(layer, ids, probs)
        if not self.prefetch_enabled or self.slots < 2:
            return  # one slot: the fetch itself needs it, a prefetch only wastes
        self._drain()
        self._cancel_stale(layer, {layer * E + e for e in ids})
        absent = [
            (p, e, x)
            for e, x, p in zip(ids, raw, probs)
            if cache.find(layer * E + e) is None
        ]
        th.candidates(layer, dist, {e: x for _, e, x in absent}, kind)
        cap = th.inflight_cap(self.store.extent_nbytes, self.prefetch_depth)
        inflight = sum(1 for s in self._reqs if s in self._prefetched)
        for p, e, _ in sorted(absent, key=lambda t: -t[0]):
            key = layer * E + e
            how = th.decide(p, inflight < cap)
            if how is None:
                continue
            s = cache.victim(below=float(cache.value(key)))
            if s is None:
                break  # everything held is worth more than these candidates
            self._evict_into(s, key)
            self._prefetched[s] = (p, how == "probe", kind)
            self._submit(s, key, PREFETCH)
            th.started(how)
            self.pf_issued += 1
            inflight += 1

    def stats(self) -> dict[str, Any]:
        """Counters for ``--stats``/``--json``.

        ``hit_rate`` counts experts found in DRAM when asked for (prefetched or
        kept); ``hit_rate_lru`` and ``hit_rate_belady`` replay the same request
        sequence through LRU and Belady's MIN with the same number of slots
        (demand caching without prefetch; MIN is its offline optimum).
        """
        self._drain()
        r = self.reader.stats()
        n = len(self.sequence)
        resolved = self.pf_used + self.pf_wasted + self.pf_cancelled + self.pf_failed
        return {
            "source": "streamed",
            "ram_budget": self.ram_budget,
            "slots": self.slots,
            "slot_nbytes": self.slabs.slab_nbytes,
            "expert_requests": n,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / n if n else 0.0,
            "hit_rate_lru": simulate_lru(self.sequence, self.slots),
            "hit_rate_belady": simulate_belady(self.sequence, self.slots),
            "bytes_read": r["bytes_read"],
            "read_seconds": r["read_seconds"],
            "read_gbps": r["read_gbps"],
            "stall_seconds": self.stall_seconds,
            "read_retries": r["retries"],
            "buffered_files": r["buffered_files"],
            "read_devices": r["devices"],
            "prefetch_issued": self.pf_issued,
            "prefetch_used": self.pf_used,
            "prefetch_late": self.pf_late,
            "prefetch_wasted": self.pf_wasted,
            "prefetch_cancelled": self.pf_cancelled,
            "prefetch_precision": self.pf_used / resolved if resolved else 0.0,
            "prefetch_hints": self.hints,
            "prefetch_throttle": self.throttle.stats(),
            "prefetch_recall": (
                self.pf_used / (self.pf_used + self.misses - self.pf_late)
                if self.pf_used + self.misses - self.pf_late
                else 0.0
            ),
        }

    def close(self) -> None:
        """Stop the reader threads and free the slabs (views become invalid)."""
        self.reader.close()
        self._drain()
        self.slabs.close()
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def __enter__(self) -> StreamedExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
