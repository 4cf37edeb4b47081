"""GGUF file (llama.cpp) -> MER store.

Architectures: llama.cpp's ``llama`` with experts (Mixtral), ``qwen2moe``,
``qwen3moe`` and ``olmoe``. Hyperparameters come from the ``{arch}.*`` metadata
and the tensor shapes, the tokenizer from ``tokenizer.ggml.*``
(:mod:`mer_cli.gguf_tokenizer`).

Tensor names (``blk.L.`` prefix per layer) and the store tensors they become::

    token_embd -> embed         output_norm -> final_norm    output -> lm_head
    attn_norm -> attn_norm      ffn_norm -> ffn_norm         ffn_gate_inp -> router
    attn_q/k/v/output -> q/k/v/o          attn_q/k/v.bias -> q_bias/k_bias/v_bias
    attn_q_norm/attn_k_norm -> q_norm/k_norm
    ffn_gate_shexp + ffn_up_shexp -> shared.gate_up   ffn_down_shexp -> shared.down
    ffn_gate_inp_shexp -> shared.gate
    ffn_gate_exps [E, F, D] + ffn_up_exps [E, F, D] -> expert gate_up [2F, D]
    ffn_down_exps [E, D, F] -> expert down [D, F]
    (older Mixtral files: per-expert ffn_gate.E / ffn_up.E / ffn_down.E)

Encodings: a Q4_0 tensor whose target is q4 (Q8_0 -> q8) is transcoded bit for
bit: a ggml block is ``[fp16 d][16 or 32 bytes]`` per 32 weights, the store keeps
the same nibbles/bytes per row followed by the scales (no dequantize). F32, F16
and BF16 are widened to f32 exactly and quantized like a Hugging Face
checkpoint. Any other type (Q4_K, Q6_K, IQ*, ...) and a Q4_0/Q8_0 tensor with a
different target are dequantized with ``gguf.quants`` and quantized again; the
former adds a second quantization error, so a warning names those tensors.

llama.cpp's converter permutes the rows of Q and K of the ``llama`` architecture
(HF's rotate-half RoPE -> ggml's interleaved RoPE); mer computes RoPE like HF, so
the importer undoes that permutation. It moves whole rows, which keeps Q4_0/Q8_0
rows bit-exact. qwen2moe, qwen3moe and olmoe use NEOX RoPE: no permutation.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mer_cli.errors import FormatError, UnsupportedError
from mer_cli.formats import quant
from mer_cli.models.config import ModelConfig

# llama.cpp architecture -> mer architecture
ARCHS = {
    "llama": "mixtral",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
}
# whether the top-k router weights are renormalized, as llama.cpp builds each arch
NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
CHUNK_ELEMS = 1 << 22  # elements decoded per step (16 MiB of f32)
_MISSING = object()


def _types():
    from gguf import GGMLQuantizationType as T

    return T


class GGUFTensor(NamedTuple):
    """One tensor of the file: numpy-order ``shape`` (``[E, F, D]``), file offset."""

    name: str
    gtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // int(np.prod(self.shape[:-1], dtype=np.int64))


# ================================================================ the file


class GGUFFile:
    """A GGUF file: decoded metadata, checked tensor table, mapped tensor rows.

    Metadata and the tensor table are parsed by ``gguf.GGUFReader``; tensor bytes
    are read through this object's own read-only memory map so that consumed
    tensors can be dropped from the resident set (:meth:`release`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        p = self.path
        try:
            size = p.stat().st_size
        except OSError as e:
            raise FormatError(f"{p}: cannot open ({e.strerror})") from e
        if size < 24:
            raise FormatError(
                f"{p}: file is {size} bytes, shorter than a GGUF header (24 bytes); "
                "the file is truncated, download or convert it again"
            )
        with open(p, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise FormatError(
                f"{p}: starts with {head[:4]!r}, not the GGUF magic b'GGUF'; not a "
                "GGUF file"
            )
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise UnsupportedError(
                f"{p}: GGUF version is {version}, mer reads versions 2 and 3; "
                "convert the model again with a current llama.cpp"
            )
        self.size = size
        self.reader = _open_reader(p, size)
        self.fields = self.reader.fields
        self.tensors: dict[str, GGUFTensor] = {}
        for t in self.reader.tensors:
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensor(
                t.name, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes)
            )
        fd = os.open(p, os.O_RDONLY)
        try:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._mm, np.uint8)
        self.arch = self.get("general.architecture", None)

    # -------------------------------------------------------------- metadata

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value as Python data (lists for arrays); ``default`` if absent."""
        f = self.fields.get(key)
        if f is None:
            if default is _MISSING:
                raise FormatError(
                    f"{self.path}: metadata key {key!r} is missing; the file is "
                    "incomplete, convert the model again with llama.cpp"
                )
            return default
        try:
            return f.contents()
        except UnicodeDecodeError as e:
            raise FormatError(
                f"{self.path}: metadata {key!r} holds a string that is not UTF-8 ({e})"
            ) from e

    def arch_int(self, key: str, default: Any = _MISSING) -> int:
        v = self.get(f"{self.arch}.{key}", default)
        if isinstance(v, list):  # per-layer arrays (head counts): must be uniform
            if len(set(v)) != 1:
                raise UnsupportedError(
                    f"{self.path}: {self.arch}.{key} varies per layer ({v[:4]}...); "
                    "mer supports models whose layers all have the same shape"
                )
            v = v[0]
        return v if v is None else int(v)

    # -------------------------------------------------------------- tensors

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(
                f"{self.path}: tensor {name!r} is missing; the file is incomplete or "
                f"not a {self.arch} model llama.cpp would load"
            ) from None

    def rows(self, t: GGUFTensor, index: int | None = None) -> np.ndarray:
        """Zero-copy ``uint8 [rows, row_nbytes]`` view of ``t`` (or of ``t[index]``)."""
        begin, n = t.offset, t.nbytes
        if index is not None:
            n //= t.shape[0]
            begin += index * n
        return self._buf[begin : begin + n].reshape(-1, t.row_nbytes)

    def release(self, t: GGUFTensor, index: int | None = None) -> None:
        """Drop the resident pages of a consumed tensor (the page cache keeps them)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, n = t.offset, t.nbytes
        if index is not None:
            n //= t.shape[0]
            begin += index * n
        page = mmap.PAGESIZE
        start, stop = -(-begin // page) * page, (begin + n) // page * page
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _open_reader(path: Path, size: int):
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """GGUFReader whose tensor table is checked before it builds views.

        ``_get`` slices a plain ndarray view of the map: the reader calls it once
        per metadata array element, and ``np.memmap`` slicing costs ~5x more.
        """

        def _get(self, offset, dtype, count=1, override_order=None):  # noqa: ANN001
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            itemsize = np.dtype(dtype).itemsize
            arr = plain[offset : offset + itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

        def _build_tensors(self, start_offs, fields):  # noqa: ANN001
            _check_tensor_fields(path, size, start_offs, fields)
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except (FormatError, UnsupportedError):
        raise
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise FormatError(
            f"{path}: cannot parse the GGUF metadata or tensor table ({e}); the file "
            f"({size} bytes) is truncated or corrupt, download or convert it again"
        ) from e


def _check_tensor_fields(path: Path, size: int, data_start: int, fields) -> None:
    """Each tensor's type must be known and its bytes inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for f in fields:
        _, name_data, _, dims, raw_type, offset = f.parts
        name = bytes(name_data).decode("utf-8", "replace")
        try:
            gtype = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise UnsupportedError(
                f"{path}: tensor {name!r} has ggml type id {int(raw_type[0])}, which "
                "the installed gguf package does not know; upgrade it "
                "(pip install -U gguf) or re-quantize the model to Q4_0/Q8_0 with "
                "llama-quantize"
            ) from None
        block, type_size = GGML_QUANT_SIZES[gtype]
        n = int(np.prod(dims.astype(np.int64)))
        if int(dims[0]) % block:
            raise FormatError(
                f"{path}: tensor {name!r} has {int(dims[0])} elements per row, not a "
                f"multiple of the {gtype.name} block size {block}; the file is corrupt"
            )
        end = data_start + int(offset[0]) + n // block * type_size
        if end > size:
            raise FormatError(
                f"{path}: tensor {name!r} ({gtype.name}, shape "
                f"{list(reversed(dims.tolist()))}) ends at byte {end} but the file "
                f"has {size} bytes; the file is truncated, download or convert it again"
            )


# ================================================================ rows -> values


def decode_rows(raw: np.ndarray, gtype: Any, cols: int) -> np.ndarray:
    """Dequantize GGUF rows (``uint8 [rows, row_nbytes]``) to ``f32 [rows, cols]``."""
    T = _types()
    if gtype == T.F32:
        return raw.view("<f4").reshape(-1, cols).copy()
    if gtype == T.F16:
        return raw.view("<f2").reshape(-1, cols).astype(np.float32)
    if gtype == T.BF16:
        return quant.bf16_to_f32(raw.view("<u2").reshape(-1, cols))
    if gtype in (T.Q4_0, T.Q8_0):  # same products as gguf.quants, faster
        packed, scales = split_blocks(raw, gtype)
        if gtype == T.Q4_0:
            return quant.dequantize_q4(packed, scales)
        return quant.dequantize_q8(packed, scales)
    import gguf.quants

    return np.asarray(gguf.quants.dequantize(raw, gtype), np.float32).reshape(-1, cols)


def split_blocks(raw: np.ndarray, gtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q8_0 rows -> the store's planar parts, bit for bit.

    Returns ``packed`` (``uint8 [rows, cols/2]`` for Q4_0, ``int8 [rows, cols]``
    for Q8_0) and ``scales`` (``float16 [rows, cols/32]``).
    """
    T = _types()
    per = 16 if gtype == T.Q4_0 else 32
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 2 + per)
    scales = np.ascontiguousarray(b[:, :, :2]).view("<f2").reshape(rows, -1)
    packed = b[:, :, 2:].reshape(rows, -1)
    return (packed if gtype == T.Q4_0 else packed.view(np.int8)), scales


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's ``LlamaModel.permute`` for Q/K.

    The converter writes ``w.reshape(n_head, 2, hd // 2, D).swapaxes(1, 2)``: GGUF
    row ``h*hd + 2*i + j`` is HF row ``h*hd + j*hd/2 + i``. Returns ``idx`` with
    ``hf_rows = gguf_rows[idx]``.
    """
    hd = n_rows // n_head
    r = np.arange(n_rows)
    h, within = r // hd, r % hd
    j, i = within // (hd // 2), within % (hd // 2)
    return h * hd + 2 * i + j


def check_finite(w: np.ndarray, label: str, row0: int = 0) -> None:
    """Refuse NaN/inf: one would turn a whole q4/q8 group into garbage."""
    if np.isfinite(w).all():
        return
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
    at = f"row {row0 + bad[0]}, column {bad[1]}" if w.ndim == 2 else f"element {bad[0]}"
    raise FormatError(
        f"{label}: {at} is {w[bad]}; the file holds non-finite weights, convert "
        "the model again"
    )


@dataclass(frozen=True)
class Src:
    """Rows of a store tensor taken from one GGUF tensor (``index``: one expert)."""

    tensor: GGUFTensor
    index: int | None = None
    heads: int = 0  # > 0: undo the llama Q/K permutation with this many heads

    @property
    def nbytes(self) -> int:
        n = self.tensor.nbytes
        return n // self.tensor.shape[0] if self.index is not None else n

    def label(self, g: GGUFFile) -> str:
        e = "" if self.index is None else f" (expert {self.index})"
        return f"{g.path}: tensor {self.tensor.name!r}{e}"


@dataclass(frozen=True)
class DenseItem:
    name: str
    srcs: tuple[Src, ...]
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ExpertItem:
    layer: int
    expert: int
    gate_up: tuple[Src, ...]
    down: tuple[Src, ...]


def encode_srcs(
    g: GGUFFile, srcs: tuple[Src, ...], dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """Encode GGUF rows stacked by rows as store bytes of ``dtype`` (``uint8``).

    Q4_0 -> q4 and Q8_0 -> q8 copy blocks; everything else is decoded to f32
    ``CHUNK_ELEMS`` elements at a time and encoded as ``quant.encode`` would.
    """
    T = _types()
    exact = {"q4": T.Q4_0, "q8": T.Q8_0}.get(dtype)
    if len(shape) == 1:
        (s,) = srcs
        v = decode_rows(g.rows(s.tensor, s.index), s.tensor.gtype, shape[0])[0]
        check_finite(v, s.label(g))
        if s.heads:
            v = v[unpermute_rows(shape[0], s.heads)]
        return quant.encode(v, dtype)
    rows, cols = shape
    out = np.empty(quant.tensor_nbytes(dtype, shape), np.uint8)
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
    step = max(1, CHUNK_ELEMS // cols)
    r = 0
    for s in srcs:
        raw = g.rows(s.tensor, s.index)
        n = raw.shape[0]
        order = unpermute_rows(n, s.heads) if s.heads else None
        for a in range(0, n, step):
            chunk = raw[a : a + step] if order is None else raw[order[a : a + step]]
            lo, hi = r + a, r + a + chunk.shape[0]
            if s.tensor.gtype == exact:
                packed[lo:hi], scales[lo:hi] = split_blocks(chunk, exact)
                check_finite(scales[lo:hi], s.label(g) + " block scales", a)
                continue
            w = decode_rows(chunk, s.tensor.gtype, cols)
            check_finite(w, s.label(g), a)
            if dtype in quant.QUANTIZED:
                packed[lo:hi], scales[lo:hi] = fn(w)
            elif dtype == "bf16":
                target[lo:hi] = quant.f32_to_bf16(w)
            else:
                target[lo:hi] = w
        r += n
    return out


# ================================================================ model config


def model_config(g: GGUFFile) -> ModelConfig:
    """Hyperparameters from the ``{arch}.*`` metadata and the tensor shapes."""
    a, where = g.arch, str(g.path)
    if a not in ARCHS:
        raise UnsupportedError(
            f"{where}: general.architecture is {a!r}; mer supports "
            + ", ".join(f"{k} ({v})" for k, v in ARCHS.items())
            + " -- llama only with experts (Mixtral)"
        )
    E = g.arch_int("expert_count", 0) or 0
    if E == 0:
        raise UnsupportedError(
            f"{where}: {a}.expert_count is missing or 0: a dense {a} model; mer runs "
            "Mixture-of-Experts models only"
        )
    L = g.arch_int("block_count")
    D = g.arch_int("embedding_length")
    H = g.arch_int("attention.head_count")
    KV = g.arch_int("attention.head_count_kv", H)
    hd = g.arch_int("attention.key_length", D // H)
    vd = g.arch_int("attention.value_length", hd)
    if vd != hd:
        raise UnsupportedError(
            f"{where}: {a}.attention.value_length is {vd} but key_length is {hd}; "
            "mer supports equal key and value head sizes"
        )
    rope_dim = g.arch_int("rope.dimension_count", hd)
    if rope_dim != hd:
        raise UnsupportedError(
            f"{where}: {a}.rope.dimension_count is {rope_dim}, head size {hd}; mer "
            "implements RoPE over the whole head only"
        )
    scaling = g.get(f"{a}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise UnsupportedError(
            f"{where}: {a}.rope.scaling.type is {scaling!r}; mer implements plain RoPE"
        )
    if g.arch_int("leading_dense_block_count", 0):
        raise UnsupportedError(
            f"{where}: {a}.leading_dense_block_count is set: some layers are dense; "
            "mer supports models where every layer is MoE"
        )
    embd = g.tensor("token_embd.weight")
    V = embd.shape[0]
    if embd.shape != (V, D):
        raise FormatError(
            f"{where}: token_embd.weight has shape {list(embd.shape)}, expected "
            f"[vocab, {D}] ({a}.embedding_length)"
        )
    F = _expert_ffn(g, E, D)
    Fs = 0
    if "blk.0.ffn_up_shexp.weight" in g.tensors:
        Fs = g.tensors["blk.0.ffn_up_shexp.weight"].shape[0]
    window = g.arch_int("attention.sliding_window", None)
    clamp = g.get(f"{a}.attention.clamp_kqv", None)
    norm = g.get(f"{a}.expert_weights_norm", NORM_TOPK[a])
    return ModelConfig(
        arch=ARCHS[a],
        vocab_size=V,
        hidden_size=D,
        num_layers=L,
        num_heads=H,
        num_kv_heads=KV,
        head_dim=hd,
        num_experts=E,
        top_k=g.arch_int("expert_used_count"),
        expert_ffn=F,
        rms_norm_eps=_f32(g.get(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(g.get(f"{a}.rope.freq_base", 10000.0)),
        max_position=g.arch_int("context_length", 4096),
        shared_expert_ffn=Fs,
        shared_expert_gate=Fs > 0 and "blk.0.ffn_gate_inp_shexp.weight" in g.tensors,
        attn_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm={"qwen3moe": "head", "olmoe": "full"}.get(a, "none"),
        routing="topk_softmax" if a == "llama" else "softmax_topk",
        norm_topk_prob=bool(norm),
        sliding_window=window or None,
        clip_qkv=_f32(clamp) if clamp else None,
        tie_word_embeddings="output.weight" not in g.tensors,
    )


def _f32(v: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not
    9.99999974e-06): the shortest repr that round-trips in float32."""
    return float(str(np.float32(v)))


def _expert_ffn(g: GGUFFile, E: int, D: int) -> int:
    t = g.tensors.get("blk.0.ffn_gate_exps.weight") or g.tensors.get(
        "blk.0.ffn_gate.0.weight"
    )
    if t is None:
        raise FormatError(
            f"{g.path}: blk.0.ffn_gate_exps.weight is missing; the file has no "
            "expert tensors where a Mixture-of-Experts model needs them"
        )
    return t.shape[-2]


# ================================================================ plan


class _Planner:
    def __init__(self, g: GGUFFile, cfg: ModelConfig, dense: str) -> None:
        self.g, self.cfg, self.dense_dtype = g, cfg, dense
        self.used: set[str] = set()

    def src(self, name: str, want: tuple[int, ...], heads: int = 0) -> Src:
        t = self.g.tensor(name)
        shape = t.shape
        if len(want) == 1 and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]  # [1, n] and [n] are the same to llama.cpp
        if len(want) == 2 and want[0] == 1 and len(shape) == 1:
            shape = (1, *shape)
        if tuple(shape) != tuple(want):
            raise FormatError(
                f"{self.g.path}: tensor {name!r} has shape {list(t.shape)}, expected "
                f"{list(want)} from the {self.g.arch}.* metadata; the file is corrupt "
                "or not a model llama.cpp would load"
            )
        self.used.add(name)
        return Src(t, None, heads)

    def dense(self, canon: str, srcs, shape, dtype=None) -> DenseItem:
        if dtype is None:
            dtype = "f32" if len(shape) == 1 else self.dense_dtype
        return DenseItem(canon, tuple(srcs), tuple(shape), dtype)

    def layer(self, layer: int) -> list[DenseItem | ExpertItem]:
        cfg, b = self.cfg, f"blk.{layer}."
        D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        llama = self.g.arch == "llama"
        c = f"layers.{layer}."
        out: list[DenseItem | ExpertItem] = [
            self.dense(c + "attn_norm", [self.src(b + "attn_norm.weight", (D,))], (D,))
        ]
        for nm, gname, rows, heads in (
            ("q", "attn_q", H * hd, H),
            ("k", "attn_k", KV * hd, KV),
            ("v", "attn_v", KV * hd, 0),
        ):
            h = heads if llama else 0
            out.append(
                self.dense(
                    c + nm, [self.src(f"{b}{gname}.weight", (rows, D), h)], (rows, D)
                )
            )
            if cfg.attn_bias:
                s = self.src(f"{b}{gname}.bias", (rows,), h)
                out.append(self.dense(c + nm + "_bias", [s], (rows,)))
        out.append(
            self.dense(
                c + "o", [self.src(b + "attn_output.weight", (D, H * hd))], (D, H * hd)
            )
        )
        if cfg.qk_norm != "none":
            for nm, full in (("q", H * hd), ("k", KV * hd)):
                n = hd if cfg.qk_norm == "head" else full
                s = self.src(f"{b}attn_{nm}_norm.weight", (n,))
                out.append(self.dense(c + nm + "_norm", [s], (n,)))
        out.append(
            self.dense(c + "ffn_norm", [self.src(b + "ffn_norm.weight", (D,))], (D,))
        )
        E, F = cfg.num_experts, cfg.expert_ffn
        router = self.src(b + "ffn_gate_inp.weight", (E, D))
        out.append(self.dense(c + "router", [router], (E, D), "f32"))
        if cfg.shared_expert_ffn:
            Fs = cfg.shared_expert_ffn
            gu = [
                self.src(b + "ffn_gate_shexp.weight", (Fs, D)),
                self.src(b + "ffn_up_shexp.weight", (Fs, D)),
            ]
            out.append(self.dense(c + "shared.gate_up", gu, (2 * Fs, D)))
            dn = self.src(b + "ffn_down_shexp.weight", (D, Fs))
            out.append(self.dense(c + "shared.down", [dn], (D, Fs)))
            if cfg.shared_expert_gate:
                s = self.src(b + "ffn_gate_inp_shexp.weight", (1, D))
                out.append(self.dense(c + "shared.gate", [s], (1, D), "f32"))
        out += self.experts(layer, E, F, D)
        return out

    def experts(self, layer: int, E: int, F: int, D: int) -> list[ExpertItem]:
        b = f"blk.{layer}."
        per_expert = b + "ffn_gate.0.weight" in self.g.tensors
        if b + "ffn_gate_exps.weight" in self.g.tensors or not per_expert:
            if b + "ffn_gate.weight" in self.g.tensors:
                raise UnsupportedError(
                    f"{self.g.path}: layer {layer} has a dense FFN "
                    f"({b}ffn_gate.weight) instead of experts; mer supports models "
                    "where every layer is MoE"
                )
            g = self.src(b + "ffn_gate_exps.weight", (E, F, D))
            u = self.src(b + "ffn_up_exps.weight", (E, F, D))
            d = self.src(b + "ffn_down_exps.weight", (E, D, F))
            return [
                ExpertItem(
                    layer,
                    e,
                    (Src(g.tensor, e), Src(u.tensor, e)),
                    (Src(d.tensor, e),),
                )
                for e in range(E)
            ]
        items = []  # older Mixtral conversions: one tensor per expert
        for e in range(E):
            items.append(
                ExpertItem(
                    layer,
                    e,
                    (
                        self.src(f"{b}ffn_gate.{e}.weight", (F, D)),
                        self.src(f"{b}ffn_up.{e}.weight", (F, D)),
                    ),
                    (self.src(f"{b}ffn_down.{e}.weight", (D, F)),),
                )
            )
        return items


def plan(g: GGUFFile, cfg: ModelConfig, dense: str) -> list[DenseItem | ExpertItem]:
    """Every store tensor and expert, in writing order, with its GGUF sources."""
    p = _Planner(g, cfg, dense)
    D, V = cfg.hidden_size, cfg.vocab_size
    items: list[DenseItem | ExpertItem] = [
        p.dense("embed", [p.src("token_embd.weight", (V, D))], (V, D))
    ]
    for layer in range(cfg.num_layers):
        items += p.layer(layer)
    items.append(p.dense("final_norm", [p.src("output_norm.weight", (D,))], (D,)))
    if not cfg.tie_word_embeddings:
        items.append(p.dense("lm_head", [p.src("output.weight", (V, D))], (V, D)))
    extra = sorted(
        n for n in g.tensors if n not in p.used and not n.endswith("rope_freqs.weight")
    )
    if extra:
        raise UnsupportedError(
            f"{g.path}: {len(extra)} tensors are not part of the {g.arch} MoE layout "
            f"mer reads, e.g. {extra[:3]}; the model uses a variant mer does not run"
        )
    for it in items:
        if isinstance(it, DenseItem):
            quant.check_shape(it.dtype, it.shape, f"{g.path}: {it.name}")
    return items


def _srcs(it: DenseItem | ExpertItem) -> tuple[Src, ...]:
    return it.srcs if isinstance(it, DenseItem) else it.gate_up + it.down


def check_types(
    g: GGUFFile, items: list[DenseItem | ExpertItem], experts: str
) -> list[str]:
    """Refuse types ``gguf.quants`` cannot decode; warn about lossy re-quantization.

    Returns the sorted names of the source types found.
    """
    import gguf.quants

    T = _types()
    native = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q8_0}
    lossy: Counter[str] = Counter()
    seen: set[Any] = set()
    for it in items:
        for s in _srcs(it):
            t = s.tensor
            if t.gtype not in seen:
                seen.add(t.gtype)
                if t.gtype not in native:
                    probe = np.zeros((1, t.row_nbytes), np.uint8)
                    try:
                        gguf.quants.dequantize(probe, t.gtype)
                    except NotImplementedError:
                        raise UnsupportedError(
                            f"{g.path}: tensor {t.name!r} is {t.gtype.name}, which "
                            "the gguf package cannot dequantize; re-quantize the model "
                            "to Q4_0, Q8_0 or F16 with llama-quantize"
                        ) from None
            if t.gtype not in native and s.index in (None, 0):
                lossy[t.gtype.name] += 1
    if lossy:
        kinds = ", ".join(f"{n} tensors of {k}" for k, n in sorted(lossy.items()))
        warnings.warn(
            f"{g.path}: {kinds}: mer dequantizes these and quantizes them again "
            f"(experts {experts}), which adds a second quantization error; for the "
            "best fidelity convert from a Q4_0/Q8_0/F16 GGUF or the original "
            "checkpoint",
            stacklevel=3,
        )
    return sorted(t.name for t in seen)


# ================================================================ entry point


def quantize_gguf(
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
    """Convert the GGUF file ``src`` into a store at ``out``.

    See :func:`mer_cli.quantize.quantize` for the parameters. Q4_0 experts become
    q4 extents bit for bit (Q8_0 -> q8); see the module docstring for the other
    types. The store is built in a temporary directory next to ``out`` and
    renamed into place at the end; an error or Ctrl-C leaves no store.

    Raises
    ------
    MerError
        ``UsageError`` for bad options or an existing output, ``FormatError`` for
        a truncated or malformed file, ``UnsupportedError`` for an architecture or
        tensor type mer does not read.
    """
    from mer_cli.convert import write_store
    from mer_cli.gguf_tokenizer import tokenizer_from_gguf
    from mer_cli.quantize import check_options

    check_options(
        out,
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        max_file_size=max_file_size,
    )
    g = GGUFFile(src)
    cfg = model_config(g)
    items = plan(g, cfg, dense)
    types = check_types(g, items, experts)
    tok_bytes, tok_info = tokenizer_from_gguf(g.get, str(g.path))
    threads = threads or os.cpu_count() or 1
    total = sum(s.nbytes for it in items for s in _srcs(it))
    source = {
        "kind": "gguf",
        "path": str(Path(src).resolve()),
        "architecture": g.arch,
        "file_type": g.get("general.file_type", None),
        "tensor_types": types,
    }

    def encode(it: DenseItem | ExpertItem, parts):
        if isinstance(it, DenseItem):
            return lambda: encode_srcs(g, it.srcs, it.dtype, it.shape)
        return lambda: {
            "gate_up": encode_srcs(g, it.gate_up, experts, parts["gate_up"].shape),
            "down": encode_srcs(g, it.down, experts, parts["down"].shape),
        }

    def finished(it: DenseItem | ExpertItem) -> int:
        for s in _srcs(it):
            g.release(s.tensor, s.index)
        return sum(s.nbytes for s in _srcs(it))

    return write_store(
        out,
        cfg,
        items,
        encode=encode,
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
