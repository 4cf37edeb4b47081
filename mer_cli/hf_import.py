"""Hugging Face checkpoint directory -> MER store.

The checkpoint is read through memory maps, one tensor at a time: a pool of
threads converts/quantizes tensors (numpy releases the GIL in its big loops)
while the calling thread writes the results in order, with a bounded number of
tensors in flight, and drops each tensor's mapped pages once written. Peak RSS
is therefore a few tensors, not the model.

HF names are mapped onto the store's canonical names
(``mer_cli.models.config``); each routed expert becomes one extent holding
``gate_up`` = rows of gate (w1/gate_proj) then up (w3/up_proj), ``[2F, D]``,
and ``down`` ``[D, F]``. Both the per-expert layout
(``...experts.E.gate_proj.weight``) and the stacked one transformers keeps in
memory (``...experts.gate_up_proj`` ``[E, 2F, D]``, ``...experts.down_proj``
``[E, D, F]``) are read.

Encodings: 1-D tensors, routers and the shared-expert gate are f32 (routing
must not flip, as llama.cpp keeps ``ffn_gate_inp`` in f32); other 2-D dense
tensors use ``dense``; routed experts use ``experts``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.convert import write_store
from mer_cli.errors import FormatError, UnsupportedError
from mer_cli.formats import quant
from mer_cli.formats.safetensors import FLOAT_DTYPES, Checkpoint, to_f32
from mer_cli.kernels.quantize import quantize_rows
from mer_cli.models.config import ModelConfig, from_hf_config
from mer_cli.quantize import check_options

# Elements converted per step: bounds the f32 temporaries of one job (16 MiB).
CHUNK_ELEMS = 1 << 22
# Encoded bytes allowed in flight between the quantizer threads and the writer.
# Tensors some checkpoints carry that the model does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Piece:
    """Rows of an output tensor taken from one checkpoint tensor.

    ``index`` selects ``tensor[index]`` of a stacked ``[E, ...]`` tensor.
    """

    name: str
    index: int | None = None


@dataclass(frozen=True)
class DenseSpec:
    """One store tensor: canonical ``name``, its ``pieces`` stacked by rows."""

    name: str
    pieces: tuple[Piece, ...]
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ExpertSpec:
    layer: int
    expert: int
    gate_up: tuple[Piece, ...]  # gate rows then up rows: [2F, D]
    down: tuple[Piece, ...]  # [D, F]


# ================================================================ config, tokenizer


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise FormatError(
                f"{path}: missing; a Hugging Face checkpoint directory needs "
                "config.json, *.safetensors and tokenizer.json"
            )
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: top level is not a JSON object")
    return data


def read_config(src: Path) -> tuple[dict[str, Any], ModelConfig]:
    """``config.json`` as a dict and as a :class:`ModelConfig`."""
    path = src / "config.json"
    hf = _read_json(path, required=True)
    try:
        return hf, from_hf_config(hf, str(path))
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: a hyperparameter has a bad value ({e})") from e


def _token_string(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json (str or AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


def _chat_template(src: Path, tc: dict[str, Any]) -> str | None:
    jinja = src / "chat_template.jinja"  # transformers >= 4.43 saves it apart
    if jinja.is_file():
        return jinja.read_text()
    tpl = tc.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _template_adds(tokenizer_json: dict[str, Any], token: str) -> bool:
    """Whether tokenizer.json's post-processor puts ``token`` before the text."""
    post = tokenizer_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") != "TemplateProcessing":
            continue
        single = p.get("single") or []
        if single and single[0].get("SpecialToken", {}).get("id") == token:
            return True
    return False


def read_tokenizer(src: Path, hf: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The manifest's ``tokenizer`` table and the bytes of ``tokenizer.json``.

    ``bos_token_id``: tokenizer_config.json's bos_token, else generation_config's
    or config.json's bos_token_id. ``eos_token_ids``: generation_config's
    eos_token_id (int or list; config.json's when absent) plus tokenizer_config's
    eos_token. ``add_bos_token``: tokenizer_config's flag, else whether
    tokenizer.json's post-processor prepends the BOS token. Engines encode with
    ``add_special_tokens=False`` and prepend ``bos_token_id`` when
    ``add_bos_token`` is true.
    """
    path = src / "tokenizer.json"
    if not path.is_file():
        raise FormatError(
            f"{path}: missing; mer needs the checkpoint's fast tokenizer file "
            "(download tokenizer.json with the weights)"
        )
    data = path.read_bytes()
    from tokenizers import Tokenizer

    try:
        tj = json.loads(data)
        tok = Tokenizer.from_str(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    except Exception as e:  # tokenizers raises plain Exception on bad input
        raise FormatError(f"{path}: the tokenizers library cannot load it ({e})") from e
    tc_path = src / "tokenizer_config.json"
    tc = _read_json(tc_path) or {}
    gc = _read_json(src / "generation_config.json") or {}

    def token_id(field: str) -> int | None:
        s = _token_string(tc.get(field))
        if s is None:
            return None
        i = tok.token_to_id(s)
        if i is None:
            raise FormatError(
                f"{tc_path}: {field} is {s!r}, which is not a token of {path}; "
                "the tokenizer files do not belong together"
            )
        return i

    bos = token_id("bos_token")
    if bos is None:
        ids = _id_list(gc.get("bos_token_id")) or _id_list(hf.get("bos_token_id"))
        bos = ids[0] if ids else None
    eos = _id_list(gc.get("eos_token_id")) or _id_list(hf.get("eos_token_id"))
    tc_eos = token_id("eos_token")
    if tc_eos is not None and tc_eos not in eos:
        eos.append(tc_eos)
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        bos_str = _token_string(tc.get("bos_token"))
        if bos_str is None and bos is not None:
            bos_str = tok.id_to_token(bos)
        add_bos = bos_str is not None and _template_adds(tj, bos_str)
    info = {
        "file": "tokenizer.json",
        "chat_template": _chat_template(src, tc),
        "bos_token_id": bos,
        "eos_token_ids": eos,
        "add_bos_token": add_bos,
    }
    return info, data


# ================================================================ name mapping


class Planner:
    """Resolve the checkpoint's tensors for every store tensor and check shapes."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, dense: str) -> None:
        self.cfg, self.ckpt, self.dense_dtype = cfg, ckpt, dense
        self.used: set[str] = set()

    def _missing(self, hf_name: str, canonical: str) -> FormatError:
        return FormatError(
            f"{self.ckpt.dir}: tensor {hf_name!r} (store tensor {canonical}) is "
            "missing from the checkpoint; the download is incomplete or the weights "
            f"do not match config.json (model_type {self.cfg.arch})"
        )

    @property
    def moe_prefixes(self) -> tuple[str, ...]:
        # transformers 5 may name Mixtral's MoE block "mlp" like the others
        return ("block_sparse_moe", "mlp") if self.cfg.arch == "mixtral" else ("mlp",)

    def _check(self, name: str, want: tuple[int, ...]) -> None:
        info = self.ckpt.info(name)
        if tuple(info.shape) != tuple(want):
            raise FormatError(
                f"{info_path(self.ckpt, name)}: tensor {name!r} has shape "
                f"{list(info.shape)}, expected {list(want)} from config.json; "
                "the weights do not match config.json"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{info_path(self.ckpt, name)}: tensor {name!r} has dtype "
                f"{info.dtype}, expected one of {', '.join(FLOAT_DTYPES)}"
            )
        self.used.add(name)

    def _one(self, candidates: tuple[str, ...], canonical: str, want) -> Piece:
        for c in candidates:
            if c in self.ckpt:
                self._check(c, want)
                return Piece(c)
        raise self._missing(candidates[0], canonical)

    def dense(self, canonical: str, candidates, want, dtype=None) -> DenseSpec:
        if isinstance(candidates, str):
            candidates = (candidates,)
        piece = self._one(tuple(candidates), canonical, want)
        if dtype is None:
            dtype = "f32" if len(want) == 1 else self.dense_dtype
        return DenseSpec(canonical, (piece,), tuple(want), dtype)

    def layer_dense(self, layer: int) -> list[DenseSpec]:
        cfg, p = self.cfg, f"model.layers.{layer}."
        D, hd = cfg.hidden_size, cfg.head_dim
        out = [
            self.dense(f"layers.{layer}.attn_norm", p + "input_layernorm.weight", (D,))
        ]
        for nm, rows in (("q", cfg.q_dim), ("k", cfg.kv_dim), ("v", cfg.kv_dim)):
            hf = f"{p}self_attn.{nm}_proj"
            out.append(self.dense(f"layers.{layer}.{nm}", hf + ".weight", (rows, D)))
            if cfg.attn_bias:
                out.append(
                    self.dense(f"layers.{layer}.{nm}_bias", hf + ".bias", (rows,))
                )
        out.append(
            self.dense(
                f"layers.{layer}.o", p + "self_attn.o_proj.weight", (D, cfg.q_dim)
            )
        )
        if cfg.qk_norm != "none":
            for nm, full in (("q", cfg.q_dim), ("k", cfg.kv_dim)):
                n = hd if cfg.qk_norm == "head" else full
                out.append(
                    self.dense(
                        f"layers.{layer}.{nm}_norm",
                        f"{p}self_attn.{nm}_norm.weight",
                        (n,),
                    )
                )
        out.append(
            self.dense(
                f"layers.{layer}.ffn_norm", p + "post_attention_layernorm.weight", (D,)
            )
        )
        out.append(
            self.dense(
                f"layers.{layer}.router",
                tuple(f"{p}{moe}.gate.weight" for moe in self.moe_prefixes),
                (cfg.num_experts, D),
                dtype="f32",
            )
        )
        if cfg.shared_expert_ffn:
            Fs, s = cfg.shared_expert_ffn, p + "mlp.shared_expert."
            gate = self._one(
                (s + "gate_proj.weight",), f"layers.{layer}.shared.gate_up", (Fs, D)
            )
            up = self._one(
                (s + "up_proj.weight",), f"layers.{layer}.shared.gate_up", (Fs, D)
            )
            out.append(
                DenseSpec(
                    f"layers.{layer}.shared.gate_up",
                    (gate, up),
                    (2 * Fs, D),
                    self.dense_dtype,
                )
            )
            out.append(
                self.dense(
                    f"layers.{layer}.shared.down", s + "down_proj.weight", (D, Fs)
                )
            )
            if cfg.shared_expert_gate:
                out.append(
                    self.dense(
                        f"layers.{layer}.shared.gate",
                        p + "mlp.shared_expert_gate.weight",
                        (1, D),
                        dtype="f32",
                    )
                )
        return out

    def layer_experts(self, layer: int) -> list[ExpertSpec]:
        cfg, p = self.cfg, f"model.layers.{layer}."
        D, F, E = cfg.hidden_size, cfg.expert_ffn, cfg.num_experts
        names = {"block_sparse_moe": ("w1", "w3", "w2")}
        default = ("gate_proj", "up_proj", "down_proj")
        styles = [(moe, names.get(moe, default)) for moe in self.moe_prefixes]
        for moe, (g, u, d) in styles:  # per-expert tensors
            first = f"{p}{moe}.experts.0.{g}.weight"
            if first not in self.ckpt:
                continue
            specs = []
            for e in range(E):
                base = f"{p}{moe}.experts.{e}."
                canon = f"expert ({layer}, {e})"
                gp = self._one((f"{base}{g}.weight",), canon + " gate_up", (F, D))
                up = self._one((f"{base}{u}.weight",), canon + " gate_up", (F, D))
                dp = self._one((f"{base}{d}.weight",), canon + " down", (D, F))
                specs.append(ExpertSpec(layer, e, (gp, up), (dp,)))
            return specs
        for moe, _ in styles:  # stacked [E, 2F, D] / [E, D, F]
            gu, dn = f"{p}{moe}.experts.gate_up_proj", f"{p}{moe}.experts.down_proj"
            if gu not in self.ckpt:
                continue
            if dn not in self.ckpt:
                raise self._missing(dn, f"experts of layer {layer}")
            self._check(gu, (E, 2 * F, D))
            self._check(dn, (E, D, F))
            return [
                ExpertSpec(layer, e, (Piece(gu, e),), (Piece(dn, e),)) for e in range(E)
            ]
        moe, (g, _, _) = styles[0]
        raise self._missing(f"{p}{moe}.experts.0.{g}.weight", f"expert ({layer}, 0)")

    def unused(self) -> list[str]:
        ignored = {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()
        return sorted(
            n
            for n in self.ckpt.where
            if n not in self.used
            and n not in ignored
            and not n.endswith(IGNORED_SUFFIXES)
        )


def info_path(ckpt: Checkpoint, name: str) -> Path:
    return ckpt.where[name].path


def plan(
    cfg: ModelConfig, ckpt: Checkpoint, dense: str
) -> list[DenseSpec | ExpertSpec]:
    """Every store tensor and expert, in writing order, with its checkpoint sources.

    Raises :class:`FormatError` for a missing tensor or a shape that does not
    match ``config.json``, and :class:`UnsupportedError` when the checkpoint
    holds tensors the architecture does not use (weights would be dropped).
    """
    pl = Planner(cfg, ckpt, dense)
    D, V = cfg.hidden_size, cfg.vocab_size
    items: list[DenseSpec | ExpertSpec] = [
        pl.dense("embed", "model.embed_tokens.weight", (V, D))
    ]
    for layer in range(cfg.num_layers):
        items += pl.layer_dense(layer)
        items += pl.layer_experts(layer)
    items.append(pl.dense("final_norm", "model.norm.weight", (D,)))
    if not cfg.tie_word_embeddings:
        items.append(pl.dense("lm_head", "lm_head.weight", (V, D)))
    extra = pl.unused()
    if extra:
        raise UnsupportedError(
            f"{ckpt.dir}: {len(extra)} tensors are not part of the {cfg.arch} layout "
            f"mer reads, e.g. {extra[:3]}; the checkpoint does not match config.json "
            "or uses an unsupported variant"
        )
    for it in items:  # refuse shapes a quantized encoding cannot hold, up front
        if isinstance(it, DenseSpec):
            quant.check_shape(it.dtype, it.shape, f"{ckpt.dir}: {it.name}")
    return items


# ================================================================ encoding


def _source(ckpt: Checkpoint, piece: Piece) -> tuple[np.ndarray, str]:
    raw = ckpt.raw(piece.name)
    if piece.index is not None:
        raw = raw[piece.index]
    return raw, ckpt.info(piece.name).dtype


def encode_pieces(
    sources: list[tuple[np.ndarray, str]],
    dtype: str,
    shape: tuple[int, ...],
    release: Callable[[np.ndarray], None] | None = None,
    labels: list[str] | None = None,
) -> np.ndarray:
    """Encode checkpoint tensors stacked by rows as store bytes of ``dtype``.

    Parameters
    ----------
    sources
        ``(raw, st_dtype)`` pairs: zero-copy views in a safetensors dtype (BF16 as
        ``uint16`` bits), each ``[rows_i, cols]`` (or ``[n]`` for one 1-D tensor).
    dtype
        Store encoding (``q4``, ``q8``, ``f16``, ``bf16``, ``f32``).
    shape
        The output shape, ``(sum rows_i, cols)`` or ``(n,)``.
    release
        Called with each source chunk once it is encoded (drops its mapped
        pages, so a running job keeps one chunk of input resident).
    labels
        What each source is, for the error message about non-finite values.

    Returns
    -------
    numpy.ndarray
        ``uint8`` bytes identical to ``quant.encode`` of the concatenated f32
        tensor; converted ``CHUNK_ELEMS`` elements at a time so temporaries
        stay small.

    Raises
    ------
    FormatError
        When a value is NaN or infinite (a q4/q8 group would silently turn
        into garbage).
    """
    labels = labels or [f"source {i}" for i in range(len(sources))]
    out = np.empty(quant.tensor_nbytes(dtype, shape), np.uint8)
    if len(shape) == 1:
        ((raw, st),) = sources
        w = to_f32(raw, st)
        _check_finite(w, labels[0], 0)
        out[:] = quant.encode(w, dtype)
        return out
    rows, cols = shape
    step = max(1, CHUNK_ELEMS // cols)
    if dtype in quant.QUANTIZED:
        lay = quant.qlayout(dtype, shape)
        packed = out[: lay.packed_nbytes]
        packed = (packed if dtype == "q4" else packed.view(np.int8)).reshape(rows, -1)
        scales = out[lay.scales_offset :].view("<f2").reshape(rows, cols // quant.GROUP)
        out[lay.packed_nbytes : lay.scales_offset] = 0
        fn = quant.quantize_q4 if dtype == "q4" else quant.quantize_q8
    else:
        target = out.view({"f32": "<f4", "f16": "<f2", "bf16": "<u2"}[dtype])
        target = target.reshape(rows, cols)
    r = 0
    for (raw, st), label in zip(sources, labels):
        for a in range(0, raw.shape[0], step):
            chunk = raw[a : a + step]
            b = r + a + chunk.shape[0]
            if dtype in quant.QUANTIZED and st in ("F32", "BF16"):
                # one pass per row from the raw bytes (same bytes as ``fn``)
                bad = quantize_rows(chunk, dtype, packed[r + a : b], scales[r + a : b])
                if bad is not None:
                    _check_finite(to_f32(chunk, st), label, a)
                if release is not None:
                    release(chunk)
                continue
            w = to_f32(chunk, st)
            _check_finite(w, label, a)
            if dtype in quant.QUANTIZED:
                packed[r + a : b], scales[r + a : b] = fn(w)
            elif dtype == "bf16":
                target[r + a : b] = quant.f32_to_bf16(w)
            else:
                target[r + a : b] = w
            if release is not None:
                release(chunk)
        r += raw.shape[0]
    return out


def _check_finite(w: np.ndarray, label: str, row0: int) -> None:
    """Refuse NaN/inf: one would turn a whole q4/q8 group into garbage."""
    if np.isfinite(w).all():
        return
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
    at = f"row {row0 + bad[0]}, column {bad[1]}" if w.ndim == 2 else f"element {bad[0]}"
    raise FormatError(
        f"{label}: {at} is {w[bad]}; the checkpoint holds non-finite weights, "
        "fetch or export it again"
    )


def _job(ckpt: Checkpoint, item: DenseSpec | ExpertSpec, experts: str, parts):
    """A callable that produces the encoded bytes of one plan item."""
    rel = ckpt.release_array

    def labels(pieces: tuple[Piece, ...]) -> list[str]:
        return [
            f"{ckpt.where[p.name].path}: tensor {p.name!r}"
            + (f"[{p.index}]" if p.index is not None else "")
            for p in pieces
        ]

    if isinstance(item, DenseSpec):
        return lambda: encode_pieces(
            [_source(ckpt, p) for p in item.pieces],
            item.dtype,
            item.shape,
            rel,
            labels(item.pieces),
        )

    def expert() -> dict[str, np.ndarray]:
        return {
            "gate_up": encode_pieces(
                [_source(ckpt, p) for p in item.gate_up],
                experts,
                parts["gate_up"].shape,
                rel,
                labels(item.gate_up),
            ),
            "down": encode_pieces(
                [_source(ckpt, p) for p in item.down],
                experts,
                parts["down"].shape,
                rel,
                labels(item.down),
            ),
        }

    return expert


def _pieces(item: DenseSpec | ExpertSpec) -> tuple[Piece, ...]:
    return item.pieces if isinstance(item, DenseSpec) else item.gate_up + item.down


def _input_nbytes(ckpt: Checkpoint, piece: Piece) -> int:
    info = ckpt.info(piece.name)
    n = info.end - info.begin
    return n // info.shape[0] if piece.index is not None else n


# ================================================================ entry point


def quantize_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: str = "q4",
    dense: str = "q8",
    force: bool = False,
    threads: int | None = None,
    progress: bool = True,
    max_file_size: int | None = None,
) -> Path:
    """Convert the Hugging Face checkpoint directory ``src`` into a store at ``out``.

    See :func:`mer_cli.quantize.quantize` for the parameters. The store is built
    in a temporary directory next to ``out`` and renamed into place at the end;
    an error or Ctrl-C removes the temporary directory.
    """
    check_options(
        out,
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        max_file_size=max_file_size,
    )
    src = Path(src)
    hf, cfg = read_config(src)
    tok_info, tok_bytes = read_tokenizer(src, hf)
    ckpt = Checkpoint(src)
    items = plan(cfg, ckpt, dense)
    threads = threads or os.cpu_count() or 1
    total = sum(_input_nbytes(ckpt, p) for it in items for p in _pieces(it))
    source = {
        "kind": "hf",
        "path": str(src.resolve()),
        "model_type": cfg.arch,
        "dtypes": sorted(
            {ckpt.info(p.name).dtype for it in items for p in _pieces(it)}
        ),
    }

    def finished(item: DenseSpec | ExpertSpec) -> int:
        n = 0
        for p in _pieces(item):
            ckpt.release(p.name, p.index)
            n += _input_nbytes(ckpt, p)
        return n

    return write_store(
        out,
        cfg,
        items,
        encode=lambda it, parts: _job(ckpt, it, experts, parts),
        finished=finished,
        total_bytes=total,
        tokenizer=tok_info,
        tokenizer_json=tok_bytes,
        source=source,
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        progress=progress,
        max_file_size=max_file_size,
    )
