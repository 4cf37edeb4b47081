"""Choosing the next token from logits: greedy, or temperature / top-k / top-p
sampling with a seeded generator (same seed, same tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer_cli.errors import UsageError


@dataclass(frozen=True)
class SamplingOptions:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 disable those
    filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def check(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"--temperature {self.temperature}: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k}: expected >= 0 (0 = off)")


class Sampler:
    """Draws tokens per :class:`SamplingOptions`.

    Parameters
    ----------
    options : SamplingOptions
    seed : int, optional
        Overrides ``options.seed``; None draws a fresh seed (recorded in
        ``self.seed`` so a run can be repeated).
    """

    def __init__(self, options: SamplingOptions, seed: int | None = None) -> None:
        options.check()
        self.options = options
        s = options.seed if seed is None else seed
        if s is None:
            s = int(np.random.SeedSequence().generate_state(1)[0])
        self.seed = int(s)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Next token id from f32 logits ``[V]``."""
        o = self.options
        logits = np.asarray(logits)
        if o.temperature == 0:
            return int(np.argmax(logits))  # first index on ties
        z = logits.astype(np.float64) / o.temperature
        order = np.argsort(-z, kind="stable")  # best first
        if o.top_k:
            order = order[: o.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if o.top_p < 1:
            # smallest prefix whose probability reaches top_p (always >= 1 token)
            keep = int(np.searchsorted(np.cumsum(p), o.top_p)) + 1
            order, p = order[:keep], p[:keep]
            p /= p.sum()
        u = self.rng.random()
        i = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
        return int(order[i])
