"""Hugging Face checkpoint directory -> GGUF file, as llama.cpp's converter writes it.

The output is what ``convert_hf_to_gguf.py`` followed by
``llama-quantize --pure ... Q4_0`` would produce, so llama.cpp can run the very
model mer runs: the same architecture names (``llama`` for Mixtral,
``qwen2moe``, ``qwen3moe``, ``olmoe``), metadata keys, tensor names, experts
stacked per layer (``blk.L.ffn_{gate,up}_exps`` ``[E, F, D]``,
``ffn_down_exps`` ``[E, D, F]``), the Q/K row permutation of the ``llama``
architecture, and the tokenizer as ``tokenizer.ggml.*`` metadata.

Types: with ``qtype="q4_0"`` every 2-D weight is Q4_0 (``q8_0``: Q8_0; ``f16``,
``bf16``, ``f32`` likewise); 1-D tensors, biases, the router ``ffn_gate_inp``
and the shared-expert gate ``ffn_gate_inp_shexp`` stay F32. Q4_0/Q8_0 use
:func:`mer_cli.formats.quant.quantize_q4`/``quantize_q8``, ggml's reference
quantizers, so a Q4_0 expert here and a q4 expert of ``mer quantize`` on the
same checkpoint hold the same bytes.

The file is written tensor by tensor, a few MiB of rows at a time, under a
temporary name that is renamed into place at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import UsageError
from mer_cli.formats import quant
from mer_cli.formats.safetensors import Checkpoint, to_f32
from mer_cli.models.config import ModelConfig

GGUF_ARCH = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
}
QTYPES = ("q4_0", "q8_0", "f16", "bf16", "f32")
CHUNK_ELEMS = 1 << 22  # f32 elements converted per write (16 MiB)
GGML_QUANT_VERSION = 2


def _gtype(qtype: str):
    from gguf import GGMLQuantizationType as T

    return {"q4_0": T.Q4_0, "q8_0": T.Q8_0, "f16": T.F16, "bf16": T.BF16, "f32": T.F32}[
        qtype
    ]


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType as F

    return {
        "q4_0": F.MOSTLY_Q4_0,
        "q8_0": F.MOSTLY_Q8_0,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "f32": F.ALL_F32,
    }[qtype]


# ================================================================ what to write


@dataclass(frozen=True)
class Segment:
    """Rows ``start .. start+rows`` of HF pieces stacked by rows.

    ``heads > 0`` writes them in llama.cpp's permuted Q/K order.
    """

    pieces: tuple[Any, ...]  # mer_cli.hf_import.Piece
    start: int
    rows: int
    heads: int = 0


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: numpy-order ``shape``, ggml type, rows from ``segments``."""

    name: str
    shape: tuple[int, ...]
    gtype: Any
    segments: tuple[Segment, ...]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.gtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` as a row order: ``gguf = hf[idx]``.

    ``w.reshape(n_head, 2, hd // 2, D).swapaxes(1, 2).reshape(w.shape)`` applied
    to row numbers.
    """
    return (
        np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2)
    ).reshape(-1)


def _out_type(name: str, shape: tuple[int, ...], qtype: str):
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or name.endswith(
        (".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
    ):
        return T.F32
    if qtype in ("q4_0", "q8_0") and shape[-1] % quant.GROUP:
        return T.F16  # as llama-quantize: rows not a multiple of 32 fall back
    return _gtype(qtype)


def tensor_plan(cfg: ModelConfig, ckpt: Checkpoint, qtype: str) -> list[OutTensor]:
    """Every GGUF tensor with its HF sources, in llama.cpp's naming.

    Uses :func:`mer_cli.hf_import.plan` to find and check the HF tensors, so the
    exporter reads exactly what ``mer quantize`` reads.
    """
    from mer_cli.hf_import import DenseSpec, plan

    llama = cfg.arch == "mixtral"
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_ffn
    items = plan(cfg, ckpt, "f32")
    out: list[OutTensor] = []

    def add(name: str, shape, segments) -> None:
        shape = tuple(shape)
        out.append(
            OutTensor(name, shape, _out_type(name, shape, qtype), tuple(segments))
        )

    dense_names = {
        "embed": "token_embd.weight",
        "final_norm": "output_norm.weight",
        "lm_head": "output.weight",
        "attn_norm": "attn_norm.weight",
        "ffn_norm": "ffn_norm.weight",
        "q": "attn_q.weight",
        "k": "attn_k.weight",
        "v": "attn_v.weight",
        "o": "attn_output.weight",
        "q_bias": "attn_q.bias",
        "k_bias": "attn_k.bias",
        "v_bias": "attn_v.bias",
        "q_norm": "attn_q_norm.weight",
        "k_norm": "attn_k_norm.weight",
        "router": "ffn_gate_inp.weight",
        "shared.down": "ffn_down_shexp.weight",
        "shared.gate": "ffn_gate_inp_shexp.weight",
    }
    experts: dict[int, list[Any]] = {}
    for it in items:
        if not isinstance(it, DenseSpec):
            experts.setdefault(it.layer, []).append(it)
            if len(experts[it.layer]) == E:
                out.extend(_stacked(it.layer, experts.pop(it.layer), F, D, qtype))
            continue
        parts = it.name.split(".", 2)
        rows = it.shape[0] if len(it.shape) == 2 else 1
        if parts[0] != "layers":
            add(dense_names[it.name], it.shape, [Segment(it.pieces, 0, rows)])
            continue
        layer, local = int(parts[1]), parts[2]
        prefix = f"blk.{layer}."
        if local == "shared.gate_up":
            Fs = it.shape[0] // 2
            add(prefix + "ffn_gate_shexp.weight", (Fs, D), [Segment(it.pieces, 0, Fs)])
            add(prefix + "ffn_up_shexp.weight", (Fs, D), [Segment(it.pieces, Fs, Fs)])
            continue
        heads = 0
        if llama and local in ("q", "q_bias"):
            heads = cfg.num_heads
        elif llama and local in ("k", "k_bias"):
            heads = cfg.num_kv_heads
        add(
            prefix + dense_names[local],
            it.shape,
            [Segment(it.pieces, 0, rows, heads)],
        )
    return out


def _stacked(
    layer: int, specs: list[Any], F: int, D: int, qtype: str
) -> list[OutTensor]:
    """``ffn_{gate,up}_exps`` ``[E, F, D]`` and ``ffn_down_exps`` ``[E, D, F]``."""
    specs = sorted(specs, key=lambda s: s.expert)
    E, b = len(specs), f"blk.{layer}."
    mk = lambda name, shape, segs: OutTensor(  # noqa: E731
        b + name, shape, _out_type(b + name, shape, qtype), tuple(segs)
    )
    return [
        mk(
            "ffn_gate_exps.weight", (E, F, D), [Segment(s.gate_up, 0, F) for s in specs]
        ),
        mk("ffn_up_exps.weight", (E, F, D), [Segment(s.gate_up, F, F) for s in specs]),
        mk("ffn_down_exps.weight", (E, D, F), [Segment(s.down, 0, D) for s in specs]),
    ]


# ================================================================ reading rows


def segment_rows(ckpt: Checkpoint, seg: Segment, a: int, b: int) -> np.ndarray:
    """Rows ``a .. b`` of ``seg`` (in GGUF order) as ``float32 [b-a, cols]``."""
    views = []
    for p in seg.pieces:
        raw = ckpt.raw(p.name)
        views.append(
            (raw[p.index] if p.index is not None else raw, ckpt.info(p.name).dtype)
        )
    if views[0][0].ndim == 1:  # norms, biases: one row
        ((raw, st),) = views
        v = to_f32(raw, st)
        return (v[permute_rows(v.shape[0], seg.heads)] if seg.heads else v)[None]
    if seg.heads:
        ((raw, st),) = views  # Q/K come from one tensor
        idx = permute_rows(seg.rows, seg.heads)[a:b] + seg.start
        return to_f32(raw[idx], st).reshape(b - a, -1)
    lo, hi, parts, r0 = seg.start + a, seg.start + b, [], 0
    for raw, st in views:
        raw2 = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        r1 = r0 + raw2.shape[0]
        s, e = max(lo, r0), min(hi, r1)
        if s < e:
            parts.append(to_f32(raw2[s - r0 : e - r0], st))
        r0 = r1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def encode_rows(w: np.ndarray, gtype: Any) -> np.ndarray:
    """``float32 [rows, cols]`` -> ggml bytes ``uint8 [rows, row_nbytes]``.

    Q4_0 blocks are ``[fp16 d][16 bytes: element j low nibble, j+16 high]``, Q8_0
    ``[fp16 d][32 x int8]``, from the reference quantizers in ``formats.quant``.
    """
    from gguf import GGMLQuantizationType as T

    rows, cols = w.shape
    if gtype in (T.Q4_0, T.Q8_0):
        q4 = gtype == T.Q4_0
        packed, scales = quant.quantize_q4(w) if q4 else quant.quantize_q8(w)
        per = 16 if q4 else 32
        nb = cols // quant.GROUP
        blocks = np.empty((rows, nb, 2 + per), np.uint8)
        blocks[:, :, :2] = scales.astype("<f2").view(np.uint8).reshape(rows, nb, 2)
        blocks[:, :, 2:] = packed.view(np.uint8).reshape(rows, nb, per)
        return blocks.reshape(rows, -1)
    if gtype == T.F32:
        return w.astype("<f4").view(np.uint8)
    if gtype == T.F16:
        return w.astype("<f2").view(np.uint8)
    if gtype == T.BF16:
        return quant.f32_to_bf16(w).view(np.uint8)
    raise ValueError(f"cannot write ggml type {gtype.name}")


def _chunk_jobs(ckpt: Checkpoint, tensors: list[OutTensor]):
    """``(key, job)`` per chunk of rows, in file order; ``job()`` gives its bytes."""
    for t in tensors:
        step = max(1, CHUNK_ELEMS // t.cols)
        for i, seg in enumerate(t.segments):
            for a in range(0, seg.rows, step):
                b = min(seg.rows, a + step)
                last = b == seg.rows
                key = (t, seg, last, last and i == len(t.segments) - 1)
                yield key, _job(ckpt, seg, a, b, t.gtype)


def _job(ckpt: Checkpoint, seg: Segment, a: int, b: int, gtype: Any):
    def run() -> np.ndarray:
        w = segment_rows(ckpt, seg, a, b)
        if not np.isfinite(w).all():  # one NaN turns a whole Q4_0 block to garbage
            from mer_cli.gguf_import import check_finite

            names = ", ".join(repr(p.name) for p in seg.pieces)
            check_finite(w, f"{ckpt.dir}: {names} (rows from {seg.start})", a)
        return encode_rows(w, gtype)

    return run


# ================================================================ metadata


def model_metadata(hf: dict[str, Any], cfg: ModelConfig, name: str, qtype: str):
    """``(key, value, kind)`` rows of the model metadata the converter writes.

    ``kind`` is ``u32``, ``f32``, ``bool`` or ``str``.
    """
    from mer_cli.gguf_import import NORM_TOPK

    a = GGUF_ARCH[cfg.arch]
    rows: list[tuple[str, Any, str]] = [
        ("general.type", "model", "str"),
        ("general.name", name, "str"),
        (f"{a}.block_count", cfg.num_layers, "u32"),
        (f"{a}.context_length", cfg.max_position, "u32"),
        (f"{a}.embedding_length", cfg.hidden_size, "u32"),
    ]
    if "intermediate_size" in hf:
        rows.append((f"{a}.feed_forward_length", int(hf["intermediate_size"]), "u32"))
    rows += [
        (f"{a}.attention.head_count", cfg.num_heads, "u32"),
        (f"{a}.attention.head_count_kv", cfg.num_kv_heads, "u32"),
        (f"{a}.rope.freq_base", cfg.rope_theta, "f32"),
        (f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps, "f32"),
        (f"{a}.expert_count", cfg.num_experts, "u32"),
        (f"{a}.expert_used_count", cfg.top_k, "u32"),
    ]
    if hf.get("head_dim") is not None:
        rows.append((f"{a}.attention.key_length", cfg.head_dim, "u32"))
        rows.append((f"{a}.attention.value_length", cfg.head_dim, "u32"))
    rows.append(("general.file_type", int(_file_type(qtype)), "u32"))
    if a == "llama":
        rows.append((f"{a}.vocab_size", cfg.vocab_size, "u32"))
        rows.append((f"{a}.rope.dimension_count", cfg.head_dim, "u32"))
    if a in ("qwen2moe", "qwen3moe"):
        rows.append((f"{a}.expert_feed_forward_length", cfg.expert_ffn, "u32"))
        if cfg.shared_expert_ffn:
            rows.append(
                (f"{a}.expert_shared_feed_forward_length", cfg.shared_expert_ffn, "u32")
            )
    # what llama.cpp fixes per architecture but this checkpoint sets otherwise
    if cfg.norm_topk_prob != NORM_TOPK[a]:
        rows.append((f"{a}.expert_weights_norm", cfg.norm_topk_prob, "bool"))
    if cfg.sliding_window:
        rows.append((f"{a}.attention.sliding_window", cfg.sliding_window, "u32"))
    if cfg.clip_qkv:
        rows.append((f"{a}.attention.clamp_kqv", cfg.clip_qkv, "f32"))
    rows.append(("general.quantization_version", GGML_QUANT_VERSION, "u32"))
    return rows


def _add(w, key: str, value: Any, kind: str | None = None) -> None:
    if kind is None:
        if isinstance(value, bool):
            kind = "bool"
        elif isinstance(value, str):
            kind = "str"
        elif isinstance(value, list):
            kind = "array"
        else:
            kind = "u32"
    if kind == "u32":
        w.add_uint32(key, int(value))
    elif kind == "f32":
        w.add_float32(key, float(value))
    elif kind == "bool":
        w.add_bool(key, bool(value))
    elif kind == "str":
        w.add_string(key, value)
    else:
        w.add_array(key, value)


# ================================================================ entry point


def export_gguf(
    hf_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    qtype: str = "q4_0",
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Write the Hugging Face checkpoint ``hf_dir`` as a GGUF file for llama.cpp.

    Parameters
    ----------
    hf_dir
        Checkpoint directory (``config.json``, ``*.safetensors``,
        ``tokenizer.json``) of a supported architecture.
    out_path
        The ``.gguf`` file to write (replaced if it exists); written under a
        temporary name next to it and renamed into place.
    qtype
        Type of the 2-D weights: ``q4_0`` (default), ``q8_0``, ``f16``, ``bf16``
        or ``f32``.
    progress
        Show a tqdm bar of bytes written.
    threads
        Quantizer threads (default: ``os.cpu_count()``); the file is still
        written in order by the calling thread.

    Returns
    -------
    Path
        ``out_path``.
    """
    import gguf
    from tqdm import tqdm

    from mer_cli.convert import run_ordered
    from mer_cli.gguf_tokenizer import gguf_tokenizer_metadata
    from mer_cli.hf_import import read_config

    if qtype not in QTYPES:
        raise UsageError(f"GGUF type is {qtype!r}, expected one of {', '.join(QTYPES)}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads is {threads}, expected a whole number >= 1")
    threads = threads or os.cpu_count() or 1
    src, out = Path(hf_dir), Path(out_path)
    if not out.parent.is_dir() or out.is_dir():
        raise UsageError(
            f"{out}: cannot write a GGUF file there ("
            + ("it is a directory" if out.is_dir() else "no such parent directory")
            + "); give a file path in an existing directory"
        )
    hf, cfg = read_config(src)
    ckpt = Checkpoint(src)
    tensors = tensor_plan(cfg, ckpt, qtype)
    arch = GGUF_ARCH[cfg.arch]
    tok = gguf_tokenizer_metadata(src, arch, cfg.vocab_size)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value, kind in model_metadata(hf, cfg, src.resolve().name, qtype):
            _add(w, key, value, kind)
        for key, value in tok.items():
            _add(w, key, value, "u32" if key.endswith("_token_id") else None)
        for t in tensors:
            byte_shape = (
                *t.shape[:-1],
                t.nbytes // int(np.prod(t.shape[:-1], dtype=np.int64)),
            )
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, t.gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        (f,) = w.fout
        align = w.data_alignment
        f.write(b"\0" * (-f.tell() % align))
        with tqdm(
            total=sum(t.nbytes for t in tensors),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="gguf",
            disable=not progress,
        ) as bar:
            written = [0]

            def consume(key: tuple[OutTensor, Segment, bool, bool], data) -> None:
                t, seg, seg_done, tensor_done = key
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                written[0] += data.nbytes
                bar.update(data.nbytes)
                if seg_done:
                    for p in seg.pieces:
                        ckpt.release(p.name, p.index)
                if tensor_done:
                    if written[0] != t.nbytes:
                        raise RuntimeError(
                            f"{t.name}: wrote {written[0]} of {t.nbytes} bytes"
                        )
                    f.write(b"\0" * (-written[0] % align))
                    written[0] = 0

            run_ordered(_chunk_jobs(ckpt, tensors), consume, threads, 2 * threads)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
