"""Qwen2-MoE: q/k/v projections with biases; softmax over all experts, top-k,
renormalized only when ``norm_topk_prob``; a shared expert on every token whose
output is scaled by ``sigmoid(shared_expert_gate . x)``."""

from __future__ import annotations

import numpy as np

from mer_cli.models.layers import Architecture, LayerWeights, shared_expert_mlp


class Qwen2Moe(Architecture):
    name = "qwen2_moe"

    @property
    def window(self) -> int | None:
        return self.cfg.sliding_window

    def shared_expert(self, w: LayerWeights, x: np.ndarray) -> np.ndarray | None:
        if w.shared_gate_up is None:
            return None
        return shared_expert_mlp(w, x, gated=self.cfg.shared_expert_gate)
