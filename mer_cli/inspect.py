"""Library side of ``mer inspect``: a summary of a store as a plain dict."""

from __future__ import annotations

import os
from typing import Any

from mer_cli.formats.quant import PAGE
from mer_cli.formats.store import Store


def count_parameters(store: Store) -> tuple[int, int]:
    """Total and per-token active parameter counts of the stored model."""
    import numpy as np

    cfg = store.model
    dense = sum(int(np.prod(e.shape)) for e in store.dense.values())
    per_expert = sum(int(np.prod(p.shape)) for p in store.parts.values())
    total = dense + per_expert * len(store.experts)
    embed = int(np.prod(store.dense["embed"].shape)) if "embed" in store.dense else 0
    active = dense - embed + per_expert * cfg.top_k * cfg.num_layers
    return total, active


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    store = Store.open(path)
    total, active = count_parameters(store)
    per_file = [0] * len(store.file_paths)
    for e in store.experts:
        per_file[e.file] += 1
    files = []
    for i, (p, size) in enumerate(zip(store.file_paths, store.file_sizes)):
        files.append(
            {
                "path": str(store.manifest["files"][i]["path"]),
                "role": store.manifest["files"][i]["role"],
                "nbytes": size,
                "extents": per_file[i],
                "device": os.stat(p).st_dev,
            }
        )
    return {
        "path": str(store.path),
        "version": store.manifest["version"],
        "created_by": store.manifest.get("created_by", "?"),
        "source": store.manifest.get("source", {}),
        "model": store.model.to_dict(),
        "quantization": store.quantization,
        "parameters": total,
        "active_parameters": active,
        "dense_tensors": len(store.dense),
        "dense_bytes": store.dense_bytes_total,
        "num_extents": len(store.experts),
        "bytes_per_expert": store.extent_nbytes,
        "expert_bytes": store.expert_bytes_total,
        "extent_alignment": PAGE,
        "extents_aligned": all(
            e.offset % PAGE == 0 and e.nbytes % PAGE == 0 for e in store.experts
        ),
        "total_bytes": sum(store.file_sizes),
        "files": files,
    }
