"""Where the forward pass gets routed experts from.

The MoE layer asks an :class:`ExpertSource` for the experts a layer selected and
computes each one as soon as it is yielded (cached ones first), so I/O and
compute overlap. Two implementations: :class:`ResidentExperts` (the whole store
in RAM, here) and the streaming source in ``mer_cli.streaming`` (O_DIRECT reads
into a DRAM cache under a byte budget). Both yield the same bytes, so a streamed
run produces exactly the tokens of the in-RAM run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from mer_cli.formats.store import Store


class ExpertSource(Protocol):
    """The contract between the MoE layer and expert storage."""

    def fetch(
        self, layer: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(expert_id, parts)`` once for each id in ``experts``, in the order
        they become available. ``parts`` maps ``"gate_up"``/``"down"`` to zero-copy
        views (``QTensor`` or ndarray, see ``Store.expert_parts``); they stay valid
        until the generator is resumed or closed."""
        ...

    def prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        scores: Sequence[float] | None = None,
        kind: str = "hint",
    ) -> None:
        """Hint that ``layer`` will soon need ``experts`` (best first; ``scores`` are
        probabilities of use when known; ``kind`` names who made the hint).
        Must never delay a ``fetch``."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for ``--stats``: bytes read, hits, misses, stall time, ..."""
        ...

    def close(self) -> None: ...


class ResidentExperts:
    """All experts in RAM: the store's extents are read into anonymous memory
    (``preload=True``) or used through the memory map (``preload=False``).

    The preload reads with the streaming reader (O_DIRECT, several requests in
    flight, every extent's CRC-32 checked) into one slab pool. Copying out of
    the memory map instead faulted the file in 4 KiB pages on one thread and
    left a second copy in the page cache: a 8.9 GiB store took about 50 s and
    peaked at 18 GiB RSS. The pool is not pre-faulted (``populate=False``): the
    reader threads fault its pages in while reads are in flight. Measured on
    this VM, 48 extents of 94.5 MiB: pre-faulted 15.3 s + 2.8 s of reads, lazy
    6.8 s in all.
    """

    def __init__(self, store: Store, preload: bool = True) -> None:
        self.store = store
        self._extents: dict[int, np.ndarray] = {}
        self._pool = None
        if preload and store.experts:
            self._preload()
        self.requests = 0

    def _preload(self) -> None:
        from mer_cli.io.reader import DEFAULT_THREADS, ExtentReader
        from mer_cli.io.slabs import SlabPool

        store = self.store
        self._pool = pool = SlabPool(
            store.extent_nbytes, len(store.experts), populate=False
        )
        with ExtentReader(store.file_paths, threads=DEFAULT_THREADS) as r:
            reqs = [
                r.submit(
                    e.file,
                    e.offset,
                    e.nbytes,
                    pool.slabs[i],
                    crc32=e.crc32,
                    label=f"expert (layer {e.layer}, expert {e.expert})",
                )  # fmt: skip
                for i, e in enumerate(store.experts)
            ]
            for req in reqs:
                req.result()
        self._extents = {i: pool.view(i) for i in range(len(store.experts))}

    def fetch(
        self, layer: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        E = self.store.model.num_experts
        for e in experts:
            self.requests += 1
            buf = self._extents.get(layer * E + e)
            if buf is None:
                buf = self.store.expert_bytes(layer, e)
            yield int(e), self.store.expert_parts(buf)

    def prefetch(
        self, layer: int, experts: Sequence[int], scores=None, kind: str = "hint"
    ) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"source": "resident", "expert_requests": self.requests, "bytes_read": 0}

    def close(self) -> None:
        self._extents.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
