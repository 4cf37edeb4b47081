"""Routing trace format v1: what the router did for every token and layer.

A trace is one uncompressed ``.npz`` (a zip of ``.npy`` members), readable with
``np.load(path, allow_pickle=False)``; no pickled objects. A single file can be
written atomically (temp name + ``os.replace``), the zip's CRC-32 of every member
catches corruption, and a truncated file loses its central directory (the
reader says so). Uncompressed, so its size follows from the shapes:
:func:`bytes_per_token`.

Shape legend: N tokens, L MoE layers, K active experts, E experts, D model
width, S sketch width.

======================  ==========  =========================================
member                  dtype       shape / meaning
======================  ==========  =========================================
``meta.json``           uint8       UTF-8 JSON object (:data:`META_FIELDS`)
``tokens``              int32 [N]   token id fed at that position
``positions``           int32 [N]   position in its sequence (0 = first)
``prompt``              int32 [N]   index of the prompt the token belongs to
``experts``             int16 [N,L,K]  selected experts, in router order
``weights``             f16 [N,L,K] their mixing weights
``probs``               f16 [N,L,E] softmax of the router logits (all E)
``sketch``              f16 [N,L,S] ``residual @ projection``
``projection``          f32 [D,S]   the Gaussian random projection used
``lookahead``           f16 [N,L,A,E]  optional (``lookahead_depth`` A >= 1):
                                    router lookahead, see below
``preview_sketch``      f16 [N,L,S] optional (``preview`` true): sketch of
                                    the attention preview, see below
``preview_probs``       f16 [N,L,E] optional (``preview`` true): layer
                                    ``l+1``'s router on the preview
======================  ==========  =========================================

Tokens are those that went through the model: each prompt's tokens, then each
generated token that was fed back (the last sampled token is never run, so it
has no routing and is not in the trace). The residual stream is the hidden
state entering the MoE block, before its RMS norm.

``lookahead[n, l, d-1]`` is the softmax of layer ``l+d``'s router applied,
after layer ``l+d``'s RMS norm, to the residual entering layer ``l``'s MoE
block: the training-free "router lookahead" guess of layer ``l+d``'s experts
made ``d`` layers early (the engine's prefetch hint for ``d = 1``). Rows with
``l + d >= L`` are zero. The member and the meta field ``lookahead_depth``
are optional additions to version 1: files without them read as depth 0, and
readers that do not know them ignore them.

``preview_sketch[n, l]`` is the sketch of the *attention preview* of layer
``l+1`` (:func:`mer_cli.models.layers.attention_preview`): layer ``l+1``'s
attention run on the residual entering layer ``l``'s MoE block, added to it
-- what layer ``l+1``'s router would see if layer ``l``'s MoE added nothing,
computable while layer ``l``'s experts are read. ``preview_probs[n, l]`` is
the softmax of layer ``l+1``'s router on it (after its RMS norm). Row
``l = L-1`` is zero. Optional additions to version 1 like ``lookahead``
(meta field ``preview``, absent = false).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.npz import Kind, check_header, load_npz, save_npz

FORMAT = "mer-trace"
VERSION = 1
KIND = Kind(
    fmt=FORMAT,
    noun="trace",
    make="mer trace",
    redo="record it again with mer trace",
    not_this="not a mer trace",
)
DEFAULT_SKETCH_DIM = 64
DEFAULT_SKETCH_SEED = 0
DEFAULT_LOOKAHEAD = 3

# meta.json fields and their JSON types
META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "store_id": str,
    "arch": str,
    "num_layers": int,
    "num_experts": int,
    "top_k": int,
    "hidden_size": int,
    "sketch_dim": int,
    "sketch_seed": int,
    "created_by": str,
}
# optional meta fields (absent in early version-1 files) and their defaults
OPTIONAL_META: dict[str, int | bool] = {"lookahead_depth": 0, "preview": False}
MAX_LOOKAHEAD = 3
# array members: dtype and shape in terms of N and the meta fields
ARRAYS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "tokens": (np.dtype(np.int32), ("N",)),
    "positions": (np.dtype(np.int32), ("N",)),
    "prompt": (np.dtype(np.int32), ("N",)),
    "experts": (np.dtype(np.int16), ("N", "num_layers", "top_k")),
    "weights": (np.dtype(np.float16), ("N", "num_layers", "top_k")),
    "probs": (np.dtype(np.float16), ("N", "num_layers", "num_experts")),
    "sketch": (np.dtype(np.float16), ("N", "num_layers", "sketch_dim")),
    "projection": (np.dtype(np.float32), ("hidden_size", "sketch_dim")),
}
# members present when meta "preview" is true (attention preview)
PREVIEW_ARRAYS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "preview_sketch": (np.dtype(np.float16), ("N", "num_layers", "sketch_dim")),
    "preview_probs": (np.dtype(np.float16), ("N", "num_layers", "num_experts")),
}
# what two traces must share to be merged (same model, same projection)
MODEL_FIELDS = (
    "store_id",
    "arch",
    "num_layers",
    "num_experts",
    "top_k",
    "hidden_size",
    "sketch_dim",
    "sketch_seed",
)


def bytes_per_token(
    num_layers: int,
    num_experts: int,
    top_k: int,
    sketch: int,
    lookahead: int = 0,
    preview: bool = False,
) -> int:
    """Bytes one token adds to a trace: 3 int32 + L*K int16 + L*K f16 + L*E f16
    + L*S f16 + L*A*E f16 (+ L*S f16 + L*E f16 with ``preview``; the fixed part
    -- projection, meta, zip headers -- comes on top).

    Mixtral (L=32, E=8, K=2, S=64): 12 + 128 + 128 + 512 + 4096 = 4876 B, plus
    1536 B with ``lookahead`` A=3, plus 4608 B with ``preview``.
    """
    per_layer = 2 * top_k + 2 * top_k + 2 * num_experts + 2 * sketch
    per_layer += 2 * lookahead * num_experts
    if preview:
        per_layer += 2 * sketch + 2 * num_experts
    return 3 * 4 + num_layers * per_layer


def has_preview(meta: dict[str, Any]) -> bool:
    """Whether a trace holds the attention preview (meta ``preview``)."""
    return bool(meta.get("preview", OPTIONAL_META["preview"]))


def lookahead_depth(meta: dict[str, Any]) -> int:
    """A, the number of router-lookahead distances a trace holds (0: none)."""
    return int(meta.get("lookahead_depth", OPTIONAL_META["lookahead_depth"]))


def make_projection(hidden: int, sketch: int, seed: int) -> np.ndarray:
    """The f32 ``[D, S]`` Gaussian random projection: entries N(0, 1/S) drawn by
    ``np.random.default_rng(seed).standard_normal((D, S))`` (so a sketch's
    squared norm estimates the hidden state's)."""
    if sketch < 1:
        raise UsageError(f"--sketch-dim {sketch}: expected a whole number >= 1")
    g = np.random.default_rng(seed).standard_normal((hidden, sketch))
    return (g / np.sqrt(sketch)).astype(np.float32)


class Sketcher:
    """The sketch of a projection ``[D, S]``: f32 residual ``[T, D]`` (or ``[D]``)
    to ``residual @ projection`` in f32, rounded to f16 ``[T, S]``.

    The product runs against a C-contiguous copy of the transposed projection
    (``x @ pt.T``). numpy's ``x @ projection`` for one token is a BLAS
    matrix-vector product along the projection's columns that OpenBLAS splits
    over its threads; with the cores busy (the kernels, the reader) that took
    4-8 ms at D = 4096, S = 128 against 0.02-0.1 ms for this form, and the
    predictor computes one per layer of every decode step.
    """

    def __init__(self, projection: np.ndarray) -> None:
        self.pt = np.ascontiguousarray(np.asarray(projection, np.float32).T)

    def __call__(self, residual: np.ndarray) -> np.ndarray:
        return (np.asarray(residual, np.float32) @ self.pt.T).astype(np.float16)


@dataclass
class Trace:
    """A routing trace in memory (see the module docstring for the members)."""

    meta: dict[str, Any]
    tokens: np.ndarray
    positions: np.ndarray
    prompt: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    probs: np.ndarray
    sketch: np.ndarray
    projection: np.ndarray
    lookahead: np.ndarray | None = None
    preview_sketch: np.ndarray | None = None
    preview_probs: np.ndarray | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.prompt.max()) + 1 if self.prompt.size else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The array members (with ``lookahead`` when the trace has it)."""
        out = {name: getattr(self, name) for name in ARRAYS}
        if self.lookahead is not None:
            out["lookahead"] = self.lookahead
        for name in PREVIEW_ARRAYS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def check(self, where: str = "trace") -> None:
        """Raise :class:`FormatError` if the meta or any array is inconsistent."""
        _check_meta(self.meta, where)
        dims = dict(self.meta, N=self.num_tokens)
        for name, (dtype, shape) in ARRAYS.items():
            a = getattr(self, name)
            want = tuple(dims[d] for d in shape)
            if a.dtype != dtype or a.shape != want:
                raise FormatError(
                    f"{where}: {name} is {a.dtype}{list(a.shape)}, expected "
                    f"{dtype}{list(want)} (" + ", ".join(shape) + "); "
                    "the trace is inconsistent: record it again with mer trace"
                )
        A = lookahead_depth(self.meta)
        if A == 0 and self.lookahead is not None:
            raise FormatError(
                f"{where}: has a lookahead member but lookahead_depth is 0; "
                "record it again with mer trace"
            )
        if A > 0:
            want = (self.num_tokens, dims["num_layers"], A, dims["num_experts"])
            a = self.lookahead
            if a is None or a.dtype != np.float16 or a.shape != want:
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise FormatError(
                    f"{where}: lookahead is {got}, expected float16{list(want)} "
                    "(N, num_layers, lookahead_depth, num_experts); record the "
                    "trace again with mer trace"
                )
        for name, (dtype, shape) in PREVIEW_ARRAYS.items():
            a = getattr(self, name)
            if not has_preview(self.meta):
                if a is not None:
                    raise FormatError(
                        f"{where}: has a {name} member but preview is false; "
                        "record it again with mer trace"
                    )
                continue
            want = tuple(dims[d] for d in shape)
            if a is None or a.dtype != dtype or a.shape != want:
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise FormatError(
                    f"{where}: {name} is {got}, expected {dtype}{list(want)} ("
                    + ", ".join(shape)
                    + ") since preview is true; record the trace again with "
                    "mer trace"
                )
        E = self.meta["num_experts"]
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= E):
            bad = int(self.experts[(self.experts < 0) | (self.experts >= E)][0])
            raise FormatError(
                f"{where}: experts holds {bad}, expected 0..{E - 1} (num_experts)"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ``path`` atomically; returns the path."""
        self.check(str(path))
        path = Path(path)
        save_npz(path, self.meta, self.arrays())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read and validate a trace file; :class:`FormatError` names the file,
        the member and the value when something is wrong."""
        path = Path(path)

        def members(meta: dict, names: set[str]) -> list[str]:
            missing = [n for n in ARRAYS if n not in names]
            if missing:
                raise FormatError(
                    f"{path}: member {missing[0]} is missing (has "
                    f"{sorted(names)}); the trace is incomplete: record it again"
                )
            want = list(ARRAYS)
            if lookahead_depth(meta) > 0:
                if "lookahead" not in names:
                    raise FormatError(
                        f"{path}: member lookahead is missing but lookahead_depth "
                        f"is {lookahead_depth(meta)}; the trace is incomplete: "
                        "record it again"
                    )
                want.append("lookahead")
            if has_preview(meta):
                for name in PREVIEW_ARRAYS:
                    if name not in names:
                        raise FormatError(
                            f"{path}: member {name} is missing but preview is "
                            "true; the trace is incomplete: record it again"
                        )
                    want.append(name)
            return want

        meta, arrays = load_npz(path, KIND, _check_meta, members)
        t = cls(meta=meta, path=path, **arrays)
        t.check(str(path))
        return t


def _check_meta(meta: Any, where: str) -> None:
    check_header(meta, where, KIND, VERSION, META_FIELDS)
    for name, typ in META_FIELDS.items():
        if typ is int and name != "sketch_seed" and meta[name] < 1:
            raise FormatError(f"{where}: {name} is {meta[name]}, expected >= 1")
    depth = meta.get("lookahead_depth", 0)
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise FormatError(f"{where}: lookahead_depth is {depth!r}, expected an int")
    if not 0 <= depth <= MAX_LOOKAHEAD:
        raise FormatError(
            f"{where}: lookahead_depth is {depth}, expected 0..{MAX_LOOKAHEAD}"
        )
    preview = meta.get("preview", False)
    if not isinstance(preview, bool):
        raise FormatError(f"{where}: preview is {preview!r}, expected true or false")


def merge(traces: list[Trace]) -> Trace:
    """One trace holding ``traces`` one after another; prompt indices are
    renumbered so that each trace's prompts follow the previous one's. The
    router lookahead is kept to the smallest depth of the traces (none if one
    trace has none), the attention preview only if every trace has it.

    Raises :class:`UsageError` when the traces come from different models
    (store_id, arch, shapes) or used different projections.
    """
    if not traces:
        raise UsageError("merge: no traces given")
    first = traces[0]
    for t in traces[1:]:
        for f in MODEL_FIELDS:
            if t.meta[f] != first.meta[f]:
                raise UsageError(
                    f"merge: {t.path or 'trace'} has {f} {t.meta[f]!r} but "
                    f"{first.path or 'the first trace'} has {first.meta[f]!r}; "
                    "only traces of the same store and sketch settings merge"
                )
        if not np.array_equal(t.projection, first.projection):
            raise UsageError(
                f"merge: {t.path or 'trace'} has a different projection from "
                f"{first.path or 'the first trace'}; record both with one mer version"
            )
    offsets, n = [], 0
    for t in traces:
        offsets.append(n)
        n += t.num_prompts
    cat = {
        name: np.concatenate([getattr(t, name) for t in traces])
        for name in ARRAYS
        if name not in ("prompt", "projection")
    }
    prompt = np.concatenate(
        [t.prompt + np.int32(o) for t, o in zip(traces, offsets)]
    ).astype(np.int32)
    depth = min(lookahead_depth(t.meta) for t in traces)
    meta = dict(first.meta)
    if "lookahead_depth" in meta or depth:
        meta["lookahead_depth"] = depth
    look = None
    if depth:
        look = np.concatenate([t.lookahead[:, :, :depth] for t in traces])
    preview = all(has_preview(t.meta) for t in traces)
    if "preview" in meta or preview:
        meta["preview"] = preview
    if preview:
        for name in PREVIEW_ARRAYS:
            cat[name] = np.concatenate([getattr(t, name) for t in traces])
    out = Trace(
        meta=meta, prompt=prompt, projection=first.projection, lookahead=look, **cat
    )
    out.check("merged trace")
    return out
