"""Where ``mer shard`` puts each expert: placement policies and the new manifest.

:func:`assign` chooses the target directories of every expert (``stripe`` or
``balanced`` by a routing trace's frequencies, hot experts copied onto every
target); :func:`plan_files` cuts each target's extents into files;
:func:`build_manifest` is the manifest that describes them. Nothing here touches
the disk except reading the trace.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer_cli.errors import FormatError
from mer_cli.formats.quant import PAGE
from mer_cli.formats.store import MINOR_VERSION, Store


def trace_counts(trace_path: str | os.PathLike, store: Store):
    """Selections per expert in a routing trace, and the number of tokens.

    Returns
    -------
    counts : list of int [L * E], index ``layer * E + expert``.
    tokens : int, the trace's N.
    digest : int, CRC-32 of the trace's experts array (identifies the trace).
    """
    import numpy as np

    from mer_cli.formats.trace import Trace

    t = Trace.load(trace_path)
    L, E = store.model.num_layers, store.model.num_experts
    tl, te = t.meta["num_layers"], t.meta["num_experts"]
    if (tl, te) != (L, E):
        raise FormatError(
            f"{trace_path}: trace has {tl} layers x {te} experts, the store "
            f"{store.path} has {L} x {E}; record a trace of this model with "
            "mer trace"
        )
    if t.meta.get("store_id") != store.store_id.hex():
        warnings.warn(
            f"{trace_path}: recorded on store {t.meta.get('store_id')}, not "
            f"{store.store_id.hex()} ({store.path}); using its frequencies anyway "
            "(same model shape)",
            stacklevel=2,
        )
    ex = t.experts.astype(np.int64)  # [N, L, K]
    keys = ex + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    counts = np.bincount(keys.reshape(-1), minlength=L * E)
    digest = zlib.crc32(np.ascontiguousarray(t.experts).tobytes()) & 0xFFFFFFFF
    return counts.tolist(), t.num_tokens, digest


def assign(
    counts: Sequence[float] | None,
    L: int,
    E: int,
    T: int,
    policy: str,
    hot_copies: int = 0,
) -> list[list[int]]:
    """Targets holding each expert, the primary copy's target first.

    Parameters
    ----------
    counts : uses of each expert (index ``layer * E + expert``) in a trace;
        needed by ``balanced`` and ``hot_copies``.
    L, E, T : layers, experts per layer, targets.
    policy : ``stripe`` (round robin over (layer, expert)) or ``balanced``
        (most used first, each onto the target with the least expected traffic
        in its layer plus overall; unused experts onto the target with the
        fewest extents).
    hot_copies : the most used experts to copy onto every target.

    Returns
    -------
    list of ``L * E`` lists of target indices.
    """
    n = L * E
    hot: set[int] = set()
    out: list[list[int]] = [[] for _ in range(n)]
    if hot_copies and T > 1:
        order = sorted(range(n), key=lambda k: (-counts[k], k))
        for i, k in enumerate(k for k in order[:hot_copies] if counts[k] > 0):
            hot.add(k)  # primaries round robin: a reader that ignores the
            out[k] = [(i + j) % T for j in range(T)]  # copies uses every drive
    if policy == "stripe":
        i = 0
        for k in range(n):
            if k not in hot:
                out[k] = [i % T]
                i += 1
        return out
    # greedy, most used first, onto the drive with the least traffic in this
    # layer plus overall: overall the drives serve equal expected bytes per
    # token (within about 1% on skewed traces), and per layer the top-k reads
    # spread over the drives nearly as well as balancing each layer alone
    total = [0.0] * T
    extents = [0] * T
    layer_load = [[0.0] * T for _ in range(L)]
    for k in hot:
        for t in range(T):
            total[t] += counts[k] / T
            layer_load[k // E][t] += counts[k] / T
            extents[t] += 1
    for k in sorted(range(n), key=lambda k: (-counts[k], k)):
        if k in hot or counts[k] <= 0:
            continue
        ll = layer_load[k // E]
        t = min(range(T), key=lambda t: (ll[t] + total[t], extents[t], t))
        out[k] = [t]
        ll[t] += counts[k]
        total[t] += counts[k]
        extents[t] += 1
    for k in range(n):  # never used in the trace: where there are fewest extents
        if not out[k]:
            t = min(range(T), key=lambda t: (extents[t], t))
            out[k] = [t]
            extents[t] += 1
    return out


@dataclass
class ShardFile:
    index: int  # position in the new manifest's files
    target: int
    path: Path  # final absolute path
    keys: list[int]  # expert keys in file order (extent j at PAGE + j * ext)


def plan_files(
    placement: list[list[int]],
    targets: list[Path],
    ext: int,
    max_file_size: int | None,
    first_index: int,
    stem: str,
) -> list[ShardFile]:
    """The new expert files: each target's extents (copies included) in key
    order, cut every ``max_file_size`` bytes; manifest indices from
    ``first_index``; named ``STEM-IIIII-of-NNNNN.bin`` (manifest index, last
    index)."""
    per_target: list[list[int]] = [[] for _ in targets]
    for k, ts in enumerate(placement):
        for t in ts:
            per_target[t].append(k)
    cap = (max_file_size - PAGE) // ext if max_file_size else None
    files: list[ShardFile] = []
    for t, keys in enumerate(per_target):
        step = cap or max(1, len(keys))
        for i in range(0, len(keys), step):
            files.append(ShardFile(0, t, Path(), keys[i : i + step]))
    last = first_index + len(files) - 1
    for j, f in enumerate(files):
        f.index = first_index + j
        f.path = targets[f.target] / f"{stem}-{f.index:05d}-of-{last:05d}.bin"
    return files


def manifest_path(store_dir: Path, p: Path) -> str:
    """How the manifest names ``p``: relative inside the store, else absolute."""
    try:
        return str(p.relative_to(store_dir))
    except ValueError:
        return str(p)


def build_manifest(
    store: Store,
    placement: list[list[int]],
    files: list[ShardFile],
    kept: int,
    layout: dict[str, Any],
) -> dict[str, Any]:
    """``store``'s manifest with its expert files replaced by ``files``.

    The first ``kept`` files (dense) stay; every expert points at its copy on
    its first target in ``placement``, other copies go to ``replicas``; the
    ``layout`` object is set and ``minor_version`` raised to 1.
    """
    ext = store.extent_nbytes
    m = json.loads(json.dumps(store.manifest))  # a deep copy
    store_dir = store.path.resolve()
    m["minor_version"] = max(int(m.get("minor_version", 0)), MINOR_VERSION)
    m["files"] = m["files"][:kept] + [
        {
            "path": manifest_path(store_dir, f.path),
            "role": "experts",
            "nbytes": PAGE + len(f.keys) * ext,
        }
        for f in files
    ]
    copies: dict[int, list[dict[str, int]]] = {}
    for f in files:
        for j, k in enumerate(f.keys):
            copies.setdefault(k, []).append({"file": f.index, "offset": PAGE + j * ext})
    target_of = {f.index: f.target for f in files}
    E = store.model.num_experts
    experts = []
    for e in m["experts"]:
        k = e["layer"] * E + e["expert"]
        first = placement[k][0]  # the primary: the copy on the first target
        cs = sorted(copies[k], key=lambda c: target_of[c["file"]] != first)
        e = dict(e, file=cs[0]["file"], offset=cs[0]["offset"])
        e.pop("replicas", None)
        if len(cs) > 1:
            e["replicas"] = cs[1:]
        experts.append(e)
    m["experts"] = experts
    m["layout"] = layout
    return m


def files_of(
    manifest: dict[str, Any], kept: int, targets: list[Path], store_dir: Path
) -> list[ShardFile]:
    """The new files a (planned or journaled) manifest names, with their keys."""
    E = manifest["model"]["num_experts"]
    keys: dict[int, list[tuple[int, int]]] = {}
    for e in manifest["experts"]:
        for c in [e, *e.get("replicas", [])]:
            keys.setdefault(c["file"], []).append(
                (c["offset"], e["layer"] * E + e["expert"])
            )
    out = []
    for i in range(kept, len(manifest["files"])):
        p = Path(manifest["files"][i]["path"])
        p = p if p.is_absolute() else store_dir.resolve() / p
        t = targets.index(p.parent) if p.parent in targets else 0
        out.append(ShardFile(i, t, p, [k for _, k in sorted(keys.get(i, []))]))
    return out
