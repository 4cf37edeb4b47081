"""Synthetic models written straight to a GGUF Q4_0 file, from random Q4_0 blocks.

:func:`write_gguf` writes what ``mer synth PRESET -o DIR --gguf FILE`` would
(metadata and tokenizer from :mod:`mer_cli.gguf_export` and the preset's
tokenizer, the same tensor names, shapes, types and order) without the Hugging
Face checkpoint in between and without drawing floats for the big tensors: each
Q4_0 block ``[fp16 d][16 bytes of nibbles]`` is random bytes whose scale is then
set to ``+-m``, the sign taken from a random bit.

Scale signs must be random: with all-positive scales every block of ``q - 8``
(``q`` uniform in 0..15, mean -0.5) has a negative mean, hidden states drift
one way and routing collapses onto 2-3 experts (DESIGN.md). The magnitude
``m = std / sqrt(21.5)`` (``E[(q - 8)^2] = 21.5``) gives each matrix the std of
:mod:`mer_cli.synth`: ``1/sqrt(fan_in)``, ``ATTN_OUT_SCALE`` times that for the
attention output, 1 for the embedding. Norms (``1 + N(0, 0.1^2)``), biases,
the router ``ffn_gate_inp`` and the shared-expert gate are F32 Gaussians drawn
as :func:`mer_cli.synth.generate_tensor` draws them.

Random bytes come from a counter-based generator (splitmix64 of the tensor's
key and the word index) in a numba kernel, so a tensor does not depend on the
chunking or the thread count, and a model with fewer ``--layers`` is a prefix
of the bigger one. Chunks are generated on ``workers`` threads into a few
reused buffers (fresh pages cost more than the generator) while the calling
thread writes them in order to ``.<name>.tmp-<pid>``, renamed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np

from mer_cli.errors import ResourceError, UsageError
from mer_cli.synth import ATTN_OUT_SCALE, BIAS_STD, NORM_NOISE, TensorSpec

Q4_BLOCK = 18  # bytes: fp16 scale + 16 bytes of 32 nibbles
Q4_NIBBLE_RMS = float(np.sqrt(21.5))  # rms of q - 8 for q uniform in 0..15
CHUNK_BLOCKS = 4 * (1 << 19)  # 2 Mi blocks = 36 MiB per chunk (multiple of 4)


class GGUFTensorSpec(NamedTuple):
    """One tensor of the synthetic GGUF file.

    ``shape`` is numpy order (``[rows, cols]``, experts ``[E, rows, cols]``);
    ``kind`` is ``"q4_0"`` (random blocks, weights of std ``std``), ``"normal"``
    or ``"norm"`` (F32, as in :class:`mer_cli.synth.TensorSpec`).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    std: float

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // 32 * Q4_BLOCK if self.kind == "q4_0" else 4 * n


def gguf_tensor_specs(cfg: Any) -> list[GGUFTensorSpec]:
    """Every tensor in the order :func:`mer_cli.gguf_export.export_gguf` writes it.

    Parameters
    ----------
    cfg : ModelConfig
    """
    D, V, E, F = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.expert_ffn
    S = GGUFTensorSpec

    def q4(name: str, shape: tuple[int, ...], std: float | None = None) -> S:
        return S(name, shape, "q4_0", 1.0 / np.sqrt(shape[-1]) if std is None else std)

    def norm(name: str, n: int) -> S:
        return S(name, (n,), "norm", NORM_NOISE)

    out = [q4("token_embd.weight", (V, D), 1.0)]
    for layer in range(cfg.num_layers):
        b = f"blk.{layer}."
        out.append(norm(b + "attn_norm.weight", D))
        for nm, rows in (("q", cfg.q_dim), ("k", cfg.kv_dim), ("v", cfg.kv_dim)):
            out.append(q4(f"{b}attn_{nm}.weight", (rows, D)))
            if cfg.attn_bias:
                out.append(S(f"{b}attn_{nm}.bias", (rows,), "normal", BIAS_STD))
        o_std = ATTN_OUT_SCALE / np.sqrt(cfg.q_dim)
        out.append(q4(b + "attn_output.weight", (D, cfg.q_dim), o_std))
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            out.append(
                norm(b + "attn_q_norm.weight", cfg.q_dim if full else cfg.head_dim)
            )
            out.append(
                norm(b + "attn_k_norm.weight", cfg.kv_dim if full else cfg.head_dim)
            )
        out.append(norm(b + "ffn_norm.weight", D))
        out.append(S(b + "ffn_gate_inp.weight", (E, D), "normal", 1.0 / np.sqrt(D)))
        if cfg.shared_expert_ffn:
            Fs = cfg.shared_expert_ffn
            out.append(q4(b + "ffn_gate_shexp.weight", (Fs, D)))
            out.append(q4(b + "ffn_up_shexp.weight", (Fs, D)))
            out.append(q4(b + "ffn_down_shexp.weight", (D, Fs)))
            if cfg.shared_expert_gate:
                out.append(
                    S(b + "ffn_gate_inp_shexp.weight", (1, D), "normal", 1 / np.sqrt(D))
                )
        out.append(q4(b + "ffn_gate_exps.weight", (E, F, D)))
        out.append(q4(b + "ffn_up_exps.weight", (E, F, D)))
        out.append(q4(b + "ffn_down_exps.weight", (E, D, F)))
    out.append(norm("output_norm.weight", D))
    if not cfg.tie_word_embeddings:
        out.append(q4("output.weight", (V, D)))
    return out


# ================================================================ random blocks


@numba.njit(nogil=True, cache=True)
def _fill_q4_0(out, key, word0, mag_lo, mag_hi):  # pragma: no cover - numba
    """Random Q4_0 blocks into ``out`` (uint8, a multiple of 72 bytes).

    Word ``i`` of ``out`` is splitmix64 of ``key + (word0 + i + 1) * golden``;
    then each block's fp16 scale becomes the magnitude ``mag`` with the sign
    bit the block's second byte already holds.
    """
    words = out.view(np.uint64)
    g = np.uint64(0x9E3779B97F4A7C15)
    base = np.uint64(key)
    for i in range(words.size):
        z = base + np.uint64(word0 + i + 1) * g
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        words[i] = z ^ (z >> np.uint64(31))
    for b in range(0, out.size, 18):
        out[b] = mag_lo
        out[b + 1] = mag_hi | (out[b + 1] & np.uint8(0x80))


def q4_0_magnitude(std: float) -> tuple[int, int]:
    """fp16 bytes (low, high) of the block scale that gives weights of ``std``."""
    bits = int(np.array(std / Q4_NIBBLE_RMS, "<f2").view("<u2"))
    return bits & 0xFF, bits >> 8


def tensor_key(seed: int, name: str) -> int:
    """The generator key of one tensor: mixes ``seed`` and ``crc32(name)``."""
    return ((seed & 0xFFFFFFFF) << 32 | zlib.crc32(name.encode())) & (2**64 - 1)


def q4_0_blocks(spec: GGUFTensorSpec, seed: int, start: int, buf: np.ndarray) -> None:
    """Blocks ``start ..`` of ``spec`` into ``buf`` (``uint8 [n * 18]``, n % 4 == 0
    or the tensor's last blocks); ``start`` is a multiple of 4."""
    lo, hi = q4_0_magnitude(spec.std)
    pad = -buf.size % 8  # the tensor's last chunk: fill whole words, keep the rest
    work = buf if not pad else np.empty(buf.size + pad, np.uint8)
    _fill_q4_0(work, tensor_key(seed, spec.name), start * Q4_BLOCK // 8, lo, hi)
    if pad:
        buf[:] = work[: buf.size]


def f32_tensor(spec: GGUFTensorSpec, seed: int) -> np.ndarray:
    """An F32 tensor (norm, bias, router) drawn like :func:`synth.generate_tensor`."""
    from mer_cli.synth import generate_tensor

    t = TensorSpec(spec.name, spec.shape, spec.kind, spec.std)
    return generate_tensor(t, seed, "F32")


# ================================================================ writing


def write_gguf(
    preset: Any,
    out: str | os.PathLike,
    *,
    layers: int | None = None,
    seed: int = 0,
    force: bool = False,
    workers: int = 2,
    progress: bool = False,
) -> Path:
    """Write preset ``preset`` as a GGUF Q4_0 file ``out`` from random blocks.

    Parameters
    ----------
    preset : Preset or str
        A :data:`mer_cli.synth.PRESETS` entry or its name.
    out
        The ``.gguf`` file; written as ``.<name>.tmp-<pid>`` beside it and
        renamed into place.
    layers, seed
        As for :func:`mer_cli.synth.write_checkpoint`.
    force
        Replace an existing ``out``.
    workers
        Generator threads; the calling thread writes.
    progress
        A tqdm bar of bytes written on stderr.

    Returns
    -------
    Path
        ``out``.
    """
    import gguf
    from tqdm import tqdm

    from mer_cli.convert import run_ordered
    from mer_cli.gguf_export import GGUF_ARCH, _add, model_metadata
    from mer_cli.gguf_tokenizer import gguf_tokenizer_metadata
    from mer_cli.synth import _write_tokenizer, get_preset, plan

    p = get_preset(preset) if isinstance(preset, str) else preset
    if workers < 1:
        raise UsageError(f"workers is {workers}, expected a whole number >= 1")
    pl = plan(p, layers)
    cfg = pl.model
    specs = gguf_tensor_specs(cfg)
    total = sum(s.nbytes for s in specs)
    out = Path(out)
    _check_output(out, force, total)
    arch = GGUF_ARCH[cfg.arch]
    with tempfile.TemporaryDirectory(prefix="mer-synth-tok-") as d:
        _write_tokenizer(p, pl, Path(d))
        tok = gguf_tokenizer_metadata(d, arch, cfg.vocab_size)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch)
    T = gguf.GGMLQuantizationType
    try:
        for key, value, kind in model_metadata(pl.config, cfg, out.stem, "q4_0"):
            _add(w, key, value, kind)
        for key, value in tok.items():
            _add(w, key, value, "u32" if key.endswith("_token_id") else None)
        for s in specs:
            q = s.kind == "q4_0"
            byte_shape = (
                *s.shape[:-1],
                s.shape[-1] // 32 * Q4_BLOCK if q else 4 * s.shape[-1],
            )
            w.add_tensor_info(
                s.name, byte_shape, np.dtype(np.uint8), s.nbytes, T.Q4_0 if q else T.F32
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        (f,) = w.fout
        align = w.data_alignment
        f.write(b"\0" * (-f.tell() % align))
        inflight = workers + 1
        bufs = [np.empty(CHUNK_BLOCKS * Q4_BLOCK, np.uint8) for _ in range(inflight)]
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="gguf",
            disable=not progress,
        ) as bar:

            def consume(key: tuple[GGUFTensorSpec, bool], data: np.ndarray) -> None:
                s, last = key
                f.write(memoryview(data))
                bar.update(data.nbytes)
                if last:
                    f.write(b"\0" * (-s.nbytes % align))

            run_ordered(_jobs(specs, seed, bufs), consume, workers, inflight)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _jobs(specs: list[GGUFTensorSpec], seed: int, bufs: list[np.ndarray]):
    """``((spec, last_chunk), job)`` in file order; job ``k`` fills ``bufs[k % n]``
    (``run_ordered`` with ``inflight == len(bufs)`` has written job ``k - n``)."""
    k = 0
    for s in specs:
        if s.kind != "q4_0":
            yield (s, True), (lambda s=s: f32_tensor(s, seed).view(np.uint8))
            k += 1
            continue
        nblocks = s.nbytes // Q4_BLOCK
        for a in range(0, nblocks, CHUNK_BLOCKS):
            n = min(CHUNK_BLOCKS, nblocks - a)
            buf = bufs[k % len(bufs)][: n * Q4_BLOCK]

            def job(s=s, a=a, buf=buf) -> np.ndarray:
                q4_0_blocks(s, seed, a, buf)
                return buf

            yield (s, a + n == nblocks), job
            k += 1


def _check_output(out: Path, force: bool, nbytes: int) -> None:
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; --format gguf writes one .gguf file")
    if out.exists() and not force:
        raise UsageError(
            f"{out}: output already exists; choose another -o or pass --force to "
            "replace it"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ResourceError(
            f"{out}: cannot write into {parent} (permission denied); choose a "
            "writable -o"
        )
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise ResourceError(
            f"{out}: the GGUF file needs {nbytes / 1e9:.1f} GB but {parent} has "
            f"{free / 1e9:.1f} GB free; pass fewer --layers or another -o"
        )
