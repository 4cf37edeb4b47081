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
    """All experts in RAM: the store's data files are read into anonymous memory
    (``preload=True``) or used through the memory map (``preload=False``)."""

    def __init__(self, store: Store, preload: bool = True) -> None:
        self.store = store
        self._extents: dict[int, np.ndarray] = {}
        if preload:
            for i, e in enumerate(store.experts):
                self._extents[i] = np.array(store.expert_bytes(e.layer, e.expert))
        self.requests = 0

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
