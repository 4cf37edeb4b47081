"""Embed a small store's model in larger shapes that compute the same function.

A benchmark needs a store that is both *read-bound* (experts as large as a real
big model's, so the drive decides the speed) and *real* (a trained router and
real text, so expert predictors and prompt lookup see the routing and the
copying a real model has). Random-weight stores at Mixtral shapes are the
first but not the second. :func:`widen_store` makes both from a small trained
store (the built-in model): every tensor is zero-padded to a wider model width
``D' >= D`` and expert width ``F' >= F``, and the RMSNorm weights and epsilon
are rescaled so the padded model computes the original one's function::

    x' = [x, 0]                      (the residual stream, D' wide)
    rms(x') = rms(x) * sqrt(D / D')  so with  g' = [g * sqrt(D / D'), 0]
    and eps' = eps * D / D':         norm'(x') = [norm(x), 0]

* ``embed``/``lm_head``/``q``/``k``/``v``/``router`` (and shared-expert inputs)
  gain zero columns: the padded inputs are zero, so the products are unchanged;
* ``o`` (and the shared expert's ``down``) gain zero rows: the padded residual
  coordinates stay exactly zero;
* expert ``gate_up`` ``[2F, D]`` becomes ``[2F', D']`` with the gate rows at
  ``0..F-1`` and the up rows at ``F'..F'+F-1``; ``down`` ``[D, F]`` becomes
  ``[D', F']``. The padded hidden units compute ``silu(0) * 0 = 0``;
* heads, head width, experts, layers, vocabulary and tokenizer are unchanged.

Quantized tensors are padded in their encoded form: q4/q8 groups run along
columns (32 at a time) and ``D``, ``F`` are multiples of 32, so every original
group keeps its exact bytes and scale, and the padding is whole groups of zeros
(scale 0). The result differs from the source only by floating-point summation
order in the kernels, and q8 activation roundings that order can flip
(tests check the logits agree).

What it costs and what it does not model: a widened expert is read and
multiplied at full size (the kernels do not skip zeros), so I/O and expert
compute per token are those of the wide shapes; attention stays as narrow as the
source's (its weights are dense and resident, not streamed).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import UnsupportedError, UsageError
from mer_cli.formats import quant
from mer_cli.formats.store import Store, StoreWriter
from mer_cli.models.config import ModelConfig

# canonical dense names (see mer_cli.models.config) by how they are padded
_PAD_COLS = (
    "embed",
    "lm_head",
    "q",
    "k",
    "v",
    "router",
    "shared.gate_up",
    "shared.gate",
)
_PAD_ROWS = ("o", "shared.down")
_NORMS = ("final_norm", "attn_norm", "ffn_norm")
_KEEP = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
Q4_ZERO = 0x88  # two nibbles of 8: what quantize_q4 writes for a block of zeros


def _kind(name: str) -> str:
    """How dense tensor ``name`` is padded: cols, rows, norm or keep."""
    base = name.split(".", 2)[2] if name.startswith("layers.") else name
    for kind, names in (
        ("cols", _PAD_COLS),
        ("rows", _PAD_ROWS),
        ("norm", _NORMS),
        ("keep", _KEEP),
    ):
        if base in names:
            return kind
    raise UnsupportedError(
        f"dense tensor {name!r}: widen does not know how this tensor depends on the "
        "model width; only the canonical tensors of mer's supported architectures "
        "can be widened"
    )


def pad_tensor(t: Any, dtype: str, shape: tuple[int, int], blocks) -> np.ndarray:
    """Encoded bytes of a zero-padded copy of the 2-D tensor ``t``.

    Parameters
    ----------
    t
        The source tensor as :meth:`Store.tensor` gives it (ndarray, or
        :class:`~mer_cli.formats.quant.QTensor` for q4/q8).
    dtype
        Its store encoding (``q4``, ``q8``, ``f16``, ``bf16``, ``f32``).
    shape
        The padded ``(rows, cols)``.
    blocks
        ``(src_row0, dst_row0, nrows)`` row blocks to copy; columns are copied
        to ``0..cols_src-1`` (the padded columns are zero).

    Returns
    -------
    numpy.ndarray
        ``uint8`` store bytes of ``dtype`` at ``shape``.
    """
    rows, cols = shape
    if dtype in quant.QUANTIZED:
        per = 2 if dtype == "q4" else 1
        packed = np.full(
            (rows, cols // per), Q4_ZERO if dtype == "q4" else 0, t.packed.dtype
        )
        scales = np.zeros((rows, cols // quant.GROUP), np.float16)
        pc, sc = t.packed.shape[1], t.scales.shape[1]
        for s, d, n in blocks:
            packed[d : d + n, :pc] = t.packed[s : s + n]
            scales[d : d + n, :sc] = t.scales[s : s + n]
        return quant.assemble(dtype, packed, scales)
    src = np.asarray(t)
    out = np.zeros((rows, cols), src.dtype)
    for s, d, n in blocks:
        out[d : d + n, : src.shape[1]] = src[s : s + n]
    return out.reshape(-1).view(np.uint8)


def widened_config(cfg: ModelConfig, hidden: int, ffn: int) -> ModelConfig:
    """``cfg`` at model width ``hidden`` and expert width ``ffn``.

    Raises
    ------
    UsageError
        When a width would shrink or is not a multiple of the q4/q8 group.
    """
    for what, new, old in (("--hidden", hidden, cfg.hidden_size),
                           ("--ffn", ffn, cfg.expert_ffn)):  # fmt: skip
        if new < old or new % quant.GROUP:
            raise UsageError(
                f"{what} {new}: must be at least the source's {old} and a multiple "
                f"of {quant.GROUP}"
            )
    return dataclasses.replace(
        cfg,
        hidden_size=hidden,
        expert_ffn=ffn,
        rms_norm_eps=cfg.rms_norm_eps * cfg.hidden_size / hidden,
    )


def widen_store(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    hidden: int,
    ffn: int,
    force: bool = False,
    progress: bool = True,
    max_file_size: int | None = None,
) -> Path:
    """Write a store at ``out`` computing ``src``'s model at widths ``hidden``/``ffn``.

    See the module docstring for the construction. The store is written under a
    temporary name and renamed into place (:class:`StoreWriter`), so an error or
    Ctrl-C leaves nothing that looks valid.

    Returns
    -------
    Path
        The new store.
    """
    from tqdm import tqdm

    store = Store.open(src)
    cfg = store.model
    new = widened_config(cfg, hidden, ffn)
    D, Dw, F, Fw = cfg.hidden_size, hidden, cfg.expert_ffn, ffn
    norm_scale = math.sqrt(D / Dw)
    q = store.quantization
    source = {
        "kind": "widened",
        "path": str(Path(src).resolve()),
        "hidden_size": D,
        "expert_ffn": F,
    }
    with StoreWriter(
        out,
        new,
        expert_dtype=q["experts"],
        dense_dtype=q["dense"],
        tokenizer=store.tokenizer,
        source=source,
        force=force,
        max_file_size=max_file_size,
    ) as w:
        tok = store.path / "tokenizer.json"
        if tok.exists():
            w.add_file("tokenizer.json", tok.read_bytes())
        for name, e in store.dense.items():
            t = store.tensor(name)
            kind = _kind(name)
            if kind == "keep":
                w.add_dense(name, store.dense_bytes(name), e.dtype, e.shape)
                continue
            if kind == "norm":
                g = np.zeros(Dw, np.float32)
                g[:D] = quant.to_float(t, e.dtype) * np.float32(norm_scale)
                w.add_dense(name, quant.encode(g, e.dtype, name), e.dtype, (Dw,))
                continue
            r, c = e.shape
            if kind == "cols":
                shape, blocks = (r, Dw), [(0, 0, r)]
            else:
                shape, blocks = (Dw, c), [(0, 0, r)]
            w.add_dense(name, pad_tensor(t, e.dtype, shape, blocks), e.dtype, shape)
        bar = tqdm(
            total=cfg.num_layers * cfg.num_experts,
            unit="expert",
            desc="widen",
            disable=not progress,
        )
        with bar:
            for layer in range(cfg.num_layers):
                for x in range(cfg.num_experts):
                    parts = store.expert_parts(store.expert_bytes(layer, x))
                    dt = w.parts["gate_up"].dtype
                    gate_up = pad_tensor(parts["gate_up"], dt, (2 * Fw, Dw),
                                         [(0, 0, F), (F, Fw, F)])  # fmt: skip
                    dt = w.parts["down"].dtype
                    down = pad_tensor(parts["down"], dt, (Dw, Fw), [(0, 0, D)])
                    w.add_expert(layer, x, {"gate_up": gate_up, "down": down})
                    bar.update(1)
        return w.commit()


def widen_predictor(
    src: str | os.PathLike, out: str | os.PathLike, store: str | os.PathLike
) -> Path:
    """Write predictor ``src`` (fitted on traces of a store) for its widened copy.

    A widened store routes exactly as its source (up to rounding), so a
    predictor fitted on the source's traces serves it once its model-width
    arrays are padded the way :func:`widen_store` pads the model: every member
    with a ``D`` axis in the predictor schema (the sketch projection, copied
    routers, shadow surrogates) gains zero rows/columns (before the constant
    column of a shadow's ``[x, 1]`` inputs), norm weights are scaled by
    ``sqrt(D / D')`` and ``rms_norm_eps`` by ``D / D'``. The sketch of a widened
    residual ``[x, 0]`` is then the source's sketch of ``x``. ``store`` is the
    widened store: its id and width go into the new file, so ``mer generate``
    accepts it there and refuses it elsewhere.
    """
    from mer_cli.predictors import ROUTER_SCHEMA, SCHEMAS, load_predictor

    pred = load_predictor(src)
    wide = Store.open(store)
    D, Dw = int(pred.meta["hidden_size"]), wide.model.hidden_size
    if Dw < D:
        raise UsageError(f"{store}: width {Dw} is below the predictor's {D}")
    schema = {**SCHEMAS[pred.kind], **ROUTER_SCHEMA}
    arrays = dict(pred.arrays)
    for name, a in pred.arrays.items():
        dims = schema.get(name, (None, ()))[1]
        if "D1" in dims:  # [x, 1] inputs (shadow): zero columns before the 1
            axis = dims.index("D1")
            zeros = list(a.shape)
            zeros[axis] = Dw - D
            cols = np.split(a, [D], axis=axis)
            arrays[name] = np.concatenate(
                [cols[0], np.zeros(zeros, a.dtype), cols[1]], axis=axis
            )
            continue
        if "D" not in dims:
            continue
        axis = dims.index("D")
        if "norm" in name:
            a = a * np.float32(math.sqrt(D / Dw))
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, Dw - D)
        arrays[name] = np.pad(a, pad).astype(a.dtype)
    pred.arrays = arrays
    pred.meta = {**pred.meta, "hidden_size": Dw, "store_id": wide.store_id.hex()}
    if "rms_norm_eps" in pred.meta:
        pred.meta["rms_norm_eps"] = float(pred.meta["rms_norm_eps"]) * D / Dw
    return pred.save(out)
