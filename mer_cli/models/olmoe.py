"""OLMoE: RMSNorm over the whole q and k projections (weights ``[H*hd]`` and
``[KV*hd]``), then q, k and v clipped to ``[-clip_qkv, clip_qkv]`` when set;
softmax over all experts, top-k, renormalized only when ``norm_topk_prob``."""

from __future__ import annotations

import numpy as np

from mer_cli import kernels as K
from mer_cli.models.layers import Architecture, LayerWeights


class Olmoe(Architecture):
    name = "olmoe"

    def project_qkv(
        self, w: LayerWeights, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().project_qkv(w, x)
        eps = self.cfg.rms_norm_eps
        q = K.rms_norm(q, w.q_norm, eps)
        k = K.rms_norm(k, w.k_norm, eps)
        c = self.cfg.clip_qkv
        if c is not None:
            q, k, v = (np.clip(t, -c, c) for t in (q, k, v))
        return q, k, v
