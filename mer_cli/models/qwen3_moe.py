"""Qwen3-MoE: RMSNorm over each head of q and k (weights ``[hd]``) before RoPE;
softmax over all experts, top-k, renormalized when ``norm_topk_prob``; no
shared expert."""

from __future__ import annotations

import numpy as np

from mer_cli import kernels as K
from mer_cli.models.layers import Architecture, LayerWeights


class Qwen3Moe(Architecture):
    name = "qwen3_moe"

    @property
    def window(self) -> int | None:
        return self.cfg.sliding_window

    def project_qkv(
        self, w: LayerWeights, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().project_qkv(w, x)
        T, hd, eps = x.shape[0], self.cfg.head_dim, self.cfg.rms_norm_eps
        q = K.rms_norm(q.reshape(-1, hd), w.q_norm, eps).reshape(T, -1)
        k = K.rms_norm(k.reshape(-1, hd), w.k_norm, eps).reshape(T, -1)
        return q, k, v
