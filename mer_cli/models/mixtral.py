"""Mixtral: top-k over the router logits, softmax over the k kept logits
(= softmax over all, top-k, renormalize), optional sliding-window attention, no
biases or q/k norms."""

from __future__ import annotations

import numpy as np

from mer_cli import kernels as K
from mer_cli.models.layers import Architecture


class Mixtral(Architecture):
    name = "mixtral"

    @property
    def window(self) -> int | None:
        return self.cfg.sliding_window

    def route(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, top = K.topk(np.asarray(logits, np.float32), self.cfg.top_k)  # [T, K]
        return np.asarray(ids, np.int64), K.softmax(np.asarray(top, np.float32))
