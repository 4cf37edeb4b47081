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
        for f, _ in e.copies:
            per_file[f] += 1
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
        "placement": placement(files, store),
        "layout": store.manifest.get("layout"),
    }


def placement(files: list[dict[str, Any]], store: Store) -> list[dict[str, Any]]:
    """Expert bytes and extents per device (``st_dev``), in file order.

    Each entry: ``device``, ``dirs`` (directories of its expert files),
    ``files``, ``extents`` (copies included), ``expert_bytes`` (extent bytes),
    ``share`` (of all expert extent bytes) and ``replicas`` (extents that are
    extra copies of an expert stored elsewhere too).
    """
    extra = [0] * len(files)
    for e in store.experts:
        for f, _ in e.replicas:
            extra[f] += 1
    out: dict[Any, dict[str, Any]] = {}
    for i, f in enumerate(files):
        if f["role"] != "experts":
            continue
        d = out.setdefault(
            f["device"],
            {
                "device": f["device"],
                "dirs": [],
                "files": 0,
                "extents": 0,
                "expert_bytes": 0,
                "replicas": 0,
            },
        )
        where = str(store.file_paths[i].parent)
        if where not in d["dirs"]:
            d["dirs"].append(where)
        d["files"] += 1
        d["extents"] += f["extents"]
        d["expert_bytes"] += f["extents"] * store.extent_nbytes
        d["replicas"] += extra[i]
    total = sum(d["expert_bytes"] for d in out.values())
    for d in out.values():
        d["share"] = d["expert_bytes"] / total if total else 0.0
    return list(out.values())
