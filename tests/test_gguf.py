"""GGUF import (``mer quantize FILE.gguf``) and export (``export_gguf``).

References independent of mer's code: GGUF files are written here with the
``gguf`` package's own writer, quantizer (``gguf.quants.quantize``) and
HF -> GGUF name table (``gguf.get_tensor_name_map``), with llama.cpp's Q/K
permutation written out as its converter does; values are compared against
``gguf.quants.dequantize`` and the Hugging Face weights they came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hf_config, hf_weights, make_hf_checkpoint

from mer_cli.cli import cli
from mer_cli.errors import FormatError, UnsupportedError
from mer_cli.formats import quant
from mer_cli.formats.store import Store
from mer_cli.gguf_export import export_gguf
from mer_cli.gguf_import import quantize_gguf
from mer_cli.gguf_tokenizer import gguf_tokenizer_metadata, tokenizer_from_gguf

T = gguf.GGMLQuantizationType
GGUF_ARCH = {
    "mixtral": gguf.MODEL_ARCH.LLAMA,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "olmoe": gguf.MODEL_ARCH.OLMOE,
}
ARCHS = tuple(GGUF_ARCH)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_layout(cfg: dict) -> tuple[int, int, int, int]:
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    E = cfg.get("num_local_experts") or cfg["num_experts"]
    F = (
        cfg["intermediate_size"]
        if cfg["model_type"] in ("mixtral", "olmoe")
        else cfg["moe_intermediate_size"]
    )
    return H, KV, E, F


def write_gguf(
    path: Path,
    arch: str,
    *,
    expert_type=T.Q4_0,
    matrix_type=T.F32,
    per_expert: bool = False,
    layers: int = 2,
    seed: int = 0,
    arch_name: str | None = None,
    **overrides,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Write a tiny GGUF of ``arch`` the way llama.cpp's converter lays it out.

    Returns the HF ``config.json`` dict and the HF weights it was made from.
    """
    cfg = hf_config(arch, layers, **overrides)
    w = hf_weights(cfg, seed)
    H, KV, E, F = hf_layout(cfg)
    a = arch_name or gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]]
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], layers)
    wr = gguf.GGUFWriter(path, a)
    wr.add_block_count(layers)
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(H)
    wr.add_head_count_kv(KV)
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_expert_count(E)
    wr.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim"):
        wr.add_key_length(cfg["head_dim"])
        wr.add_value_length(cfg["head_dim"])
    if arch in ("qwen2_moe", "qwen3_moe"):
        wr.add_expert_feed_forward_length(F)
    if arch == "qwen2_moe":
        wr.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    alphabet = sorted(gguf_bytes_alphabet())
    tokens = alphabet + ["<|endoftext|>", "<|im_end|>", "Ġt", "he"]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(tokens)
    wr.add_token_types([1] * 256 + [3, 3, 1, 1] + [5] * (len(tokens) - 260))
    wr.add_token_merges(["Ġ t", "h e"])
    wr.add_eos_token_id(257)
    wr.add_chat_template("{{ messages }}")

    def put(hf_name: str, a: np.ndarray, qtype) -> None:
        base = hf_name.removesuffix(".weight").removesuffix(".bias")
        suffix = hf_name[len(base) :]
        name = names.get_name(base) + suffix
        if a.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            qtype = T.F32
        if qtype == T.Q6_K:  # gguf cannot quantize K-quants: random valid blocks
            data = random_q6_k(a.shape, seed)
        else:
            data = gguf.quants.quantize(a.astype(np.float32), qtype)
        wr.add_tensor(name, data, raw_dtype=qtype)

    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    gnames = (
        ("w1", "w3", "w2")
        if arch == "mixtral"
        else ("gate_proj", "up_proj", "down_proj")
    )
    for hf_name, a in w.items():
        if ".experts." in hf_name:
            layer, e, proj = re.match(
                r"model\.layers\.(\d+)\..*experts\.(\d+)\.(\w+)\.", hf_name
            ).groups()
            if per_expert:  # older Mixtral conversions: blk.L.ffn_gate.E.weight
                kind = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}[proj]
                data = gguf.quants.quantize(a, expert_type)
                wr.add_tensor(
                    f"blk.{layer}.{kind}.{e}.weight", data, raw_dtype=expert_type
                )
            elif e == str(E - 1) and proj == gnames[2]:  # stack once all are seen
                p = f"model.layers.{layer}.{moe}.experts."
                for g in gnames:
                    stack = np.stack([w[f"{p}{i}.{g}.weight"] for i in range(E)])
                    put(f"{p}{g}.weight", stack, expert_type)
            continue
        if arch == "mixtral" and "q_proj" in hf_name:
            a = llama_permute(a, H)
        if arch == "mixtral" and "k_proj" in hf_name:
            a = llama_permute(a, KV)
        put(hf_name, a, matrix_type)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return cfg, w


def random_q6_k(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random Q6_K blocks (ql[128] qh[64] scales[16] d) with a sane fp16 ``d``."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // 256, 210), np.uint8)
    d = rng.uniform(1e-4, 1e-3, blocks.shape[:-1]).astype("<f2")
    blocks[..., 208:] = d.view(np.uint8).reshape(*d.shape, 2)
    return blocks.reshape(*shape[:-1], -1)


def gguf_bytes_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def expert_f32(store: Store, layer: int, e: int) -> dict[str, np.ndarray]:
    parts = store.expert_parts(store.expert_bytes(layer, e))
    return {k: quant.to_float(v, store.parts[k].dtype) for k, v in parts.items()}


def quantize_cli(*args: str):
    return CliRunner().invoke(cli, ["quantize", *args, "-q"])


# ================================================================ import


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("gtype,target", [(T.Q4_0, "q4"), (T.Q8_0, "q8")])
def test_quantized_experts_transcode_bit_exact(tmp_path, arch, gtype, target):
    path = tmp_path / "m.gguf"
    cfg, w = write_gguf(path, arch, expert_type=gtype)
    st = Store.open(
        quantize_gguf(path, tmp_path / "s", experts=target, dense="f32", progress=False)
    )
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    H, KV, E, F = hf_layout(cfg)
    D = cfg["hidden_size"]
    per = 16 if gtype == T.Q4_0 else 32
    for layer in range(cfg["num_hidden_layers"]):
        raw = {
            k: tensors[f"blk.{layer}.ffn_{k}_exps.weight"].data
            for k in ("gate", "up", "down")
        }
        deq = {k: gguf.quants.dequantize(v, gtype) for k, v in raw.items()}
        for e in range(E):
            got = expert_f32(st, layer, e)
            want_gu = np.concatenate([deq["gate"][e], deq["up"][e]])
            np.testing.assert_array_equal(got["gate_up"], want_gu)
            np.testing.assert_array_equal(got["down"], deq["down"][e])
            # the very bytes: ggml blocks [d][qs] split into planar nibbles + scales
            parts = st.expert_parts(st.expert_bytes(layer, e))
            blocks = raw["gate"][e].reshape(F, D // 32, 2 + per)
            packed = parts["gate_up"].packed[:F].view(np.uint8)
            assert packed.tobytes() == blocks[:, :, 2:].tobytes()
            scales = parts["gate_up"].scales[:F]
            assert scales.tobytes() == blocks[:, :, :2].tobytes()
    # llama's Q/K rows come back in Hugging Face order; other archs are unpermuted
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.self_attn."
        for nm in "qkv":
            np.testing.assert_array_equal(
                st.tensor_f32(f"layers.{layer}.{nm}"), w[f"{p}{nm}_proj.weight"]
            )
    from mer_cli.models.config import from_hf_config

    assert st.model == from_hf_config(cfg)
    assert st.tokenizer["eos_token_ids"] == [257]
    assert st.tokenizer["chat_template"] == "{{ messages }}"
    assert st.tokenizer["add_bos_token"] is False


def test_old_per_expert_mixtral_layout(tmp_path):
    path = tmp_path / "m.gguf"
    cfg, w = write_gguf(path, "mixtral", per_expert=True)
    st = Store.open(quantize_gguf(path, tmp_path / "s", progress=False))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for e in range(4):
        gate = gguf.quants.dequantize(
            tensors[f"blk.1.ffn_gate.{e}.weight"].data, T.Q4_0
        )
        up = gguf.quants.dequantize(tensors[f"blk.1.ffn_up.{e}.weight"].data, T.Q4_0)
        got = expert_f32(st, 1, e)
        np.testing.assert_array_equal(got["gate_up"], np.concatenate([gate, up]))


def test_k_quant_experts_are_requantized_with_a_warning(tmp_path):
    path = tmp_path / "m.gguf"
    cfg, _ = write_gguf(
        path, "mixtral", expert_type=T.Q6_K, hidden_size=256, intermediate_size=256
    )
    with pytest.warns(UserWarning, match=r"Q6_K.*second quantization error"):
        r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 0, r.output
    st = Store.open(tmp_path / "s")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = gguf.quants.dequantize(tensors["blk.0.ffn_down_exps.weight"].data, T.Q6_K)
    packed, scales = quant.quantize_q4(down[2])
    parts = st.expert_parts(st.expert_bytes(0, 2))
    np.testing.assert_array_equal(parts["down"].packed, packed)
    np.testing.assert_array_equal(parts["down"].scales, scales)


# ================================================================ export


def test_export_layout_is_llama_cpp_converters(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "mixtral")
    cfg = json.loads((src / "config.json").read_text())
    w = hf_weights(cfg)
    out = export_gguf(src, tmp_path / "m.gguf", qtype="q4_0", progress=False)
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    want = set()
    for hf_name in w:
        base = re.sub(r"experts\.\d+\.", "experts.", hf_name).removesuffix(".weight")
        want.add(names.get_name(base) + ".weight")
    assert set(t) == want
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2
    assert field("llama.expert_count") == 4
    assert field("llama.expert_used_count") == 2
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.bos_token_id") == 256
    assert field("tokenizer.ggml.add_bos_token") is True
    # 2-D weights Q4_0 exactly as gguf's quantizer (ggml's reference) makes them,
    # Q/K rows permuted as the converter does, norms and router in F32
    p = "model.layers.1."
    gate = np.stack([w[f"{p}block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)])
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type == T.Q4_0
    assert t["blk.1.ffn_gate_exps.weight"].data.tobytes() == (
        gguf.quants.quantize(gate, T.Q4_0).tobytes()
    )
    q = llama_permute(w[p + "self_attn.q_proj.weight"], 4)
    assert t["blk.1.attn_q.weight"].data.tobytes() == (
        gguf.quants.quantize(q, T.Q4_0).tobytes()
    )
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight"):
        assert t[name].tensor_type == T.F32
    np.testing.assert_array_equal(
        t["blk.1.ffn_gate_inp.weight"].data, w[p + "block_sparse_moe.gate.weight"]
    )
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_import_equals_hf_import(tmp_path, arch):
    from mer_cli.hf_import import quantize_hf

    src = make_hf_checkpoint(tmp_path / "hf", arch, dtype="BF16")
    ref = Store.open(quantize_hf(src, tmp_path / "hf.mer", progress=False))
    # Q4_0 GGUF: every expert extent is byte-identical to the HF import's
    g = export_gguf(src, tmp_path / "q4.gguf", qtype="q4_0", progress=False)
    st = Store.open(quantize_gguf(g, tmp_path / "q4.mer", progress=False))
    for e in ref.manifest["experts"]:
        a = st.expert_bytes(e["layer"], e["expert"])
        assert a.tobytes() == ref.expert_bytes(e["layer"], e["expert"]).tobytes()
    # F32 GGUF: the whole store holds the same model, tokenizer and tensors
    g = export_gguf(src, tmp_path / "f32.gguf", qtype="f32", progress=False)
    st = Store.open(quantize_gguf(g, tmp_path / "f32.mer", progress=False))
    assert st.model == ref.model
    assert st.tokenizer == ref.tokenizer
    dense = st.manifest["dense"]
    assert {k: v["crc32"] for k, v in dense.items()} == {
        k: v["crc32"] for k, v in ref.manifest["dense"].items()
    }


# ================================================================ tokenizer

CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Simple is better than complex. Complex is better than complicated.",
    "The quick brown fox jumps over the lazy dog 1234567 times.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
] * 4
SAMPLES = [
    "Hello world",
    "  leading spaces\tand tabs\n\nnew lines",
    "Explicit is better than implicit. 3.14159",
    "ünïcödé → 😀 中文",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>special</s> inside",
]


def spm_tokenizer():
    """A Llama-style tokenizer: SentencePiece BPE with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tr = trainers.BpeTrainer(
        vocab_size=450, special_tokens=specials + byte_tokens, show_progress=False
    )
    t.train_from_iterator(CORPUS, tr)
    j = json.loads(t.to_str())  # byte tokens are vocabulary, not added tokens
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] in specials]
    t = Tokenizer.from_str(json.dumps(j))
    t.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return t


def bpe_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer with its split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, trainers
    from tokenizers import pre_tokenizers as pt

    from mer_cli.gguf_tokenizer import QWEN2_RE

    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pt.Sequence(
        [
            pt.Split(Regex(QWEN2_RE), behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pt.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(CORPUS, tr)
    return t


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tokenizer_round_trip_through_gguf_metadata(tmp_path, kind):
    from tokenizers import Tokenizer

    tok = spm_tokenizer() if kind == "llama" else bpe_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    n = tok.get_vocab_size() + 5  # the embedding has spare rows: [PAD] tokens
    meta = gguf_tokenizer_metadata(tmp_path, "qwen3moe", n)
    assert meta["tokenizer.ggml.model"] == kind
    assert len(meta["tokenizer.ggml.tokens"]) == n
    if kind == "gpt2":
        assert meta["tokenizer.ggml.pre"] == "qwen2"
    else:
        assert meta["tokenizer.ggml.token_type"][3 + 0x41] == 6  # <0x41> is a byte
    # through a real GGUF file, read back with the importer's reader
    wr = gguf.GGUFWriter(tmp_path / "t.gguf", "qwen3moe")
    for k, v in meta.items():
        if isinstance(v, list):
            wr.add_array(k, v)
        elif isinstance(v, bool):
            wr.add_bool(k, v)
        else:
            wr.add_string(k, v)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    from mer_cli.gguf_import import GGUFFile

    data, info = tokenizer_from_gguf(GGUFFile(tmp_path / "t.gguf").get, "t.gguf")
    back = Tokenizer.from_str(data.decode())
    for s in SAMPLES + CORPUS[:4]:
        want = tok.encode(s, add_special_tokens=False).ids
        assert back.encode(s, add_special_tokens=False).ids == want, s
        assert back.decode(want) == tok.decode(want)


# ================================================================ bad input


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3_moe", arch_name="gemma2")
    r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert (
        f"{path}: general.architecture is 'gemma2'; mer supports llama (mixtral), "
        in r.output
    )
    assert "qwen2moe (qwen2_moe), qwen3moe (qwen3_moe), olmoe (olmoe)" in r.output
    assert not (tmp_path / "s").exists()


def test_dense_llama_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_block_count(2)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(UnsupportedError, match="expert_count is missing or 0: a dense"):
        quantize_gguf(path, tmp_path / "s", progress=False)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "olmoe")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert re.search(
        rf"{re.escape(str(path))}: tensor 'output.weight' \(F32, shape \[320, 64\]\) "
        rf"ends at byte \d+ but the file has {len(data) - 1000} bytes; the file is "
        "truncated",
        r.output,
    ), r.output
    path.write_bytes(data[:100])  # cut inside the metadata
    r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert "cannot parse the GGUF metadata or tensor table" in r.output
    assert "truncated or corrupt" in r.output
    assert not (tmp_path / "s").exists()


def test_unknown_tensor_type(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2_moe")
    ti = next(
        t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_k.weight"
    )
    off = ti.field.offset + sum(int(p.nbytes) for p in ti.field.parts[:4])
    raw = bytearray(path.read_bytes())
    assert int.from_bytes(raw[off : off + 4], "little") == T.F32
    raw[off : off + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert (
        "tensor 'blk.0.attn_k.weight' has ggml type id 99, which the installed gguf "
        "package does not know" in r.output
    )


def test_not_gguf_and_existing_output(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3_moe")
    (tmp_path / "s").mkdir()
    r = quantize_cli(str(path), "-o", str(tmp_path / "s"))
    assert r.exit_code == 2
    assert "output already exists; choose another -o or pass --force" in r.output
    from mer_cli.gguf_import import GGUFFile

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(40))
    with pytest.raises(UnsupportedError, match="GGUF version is 7"):
        GGUFFile(bad)
    bad.write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="shorter than a GGUF header"):
        GGUFFile(bad)


def test_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3_moe")
    tensors = gguf.GGUFReader(path).tensors
    t = next(x for x in tensors if x.name == "blk.1.attn_v.weight")
    raw = bytearray(path.read_bytes())
    at = t.data_offset + 4 * (3 * 64 + 5)  # row 3, column 5 of an F32 [64, 64]
    raw[at : at + 4] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as e:
        quantize_gguf(path, tmp_path / "s", progress=False)
    assert str(e.value) == (
        f"{path}: tensor 'blk.1.attn_v.weight': row 3, column 5 is nan; the file "
        "holds non-finite weights, convert the model again"
    )
    assert not (tmp_path / "s").exists()


def test_export_refuses_a_missing_directory(tmp_path):
    from mer_cli.errors import UsageError

    src = make_hf_checkpoint(tmp_path / "hf", "olmoe", layers=1)
    with pytest.raises(UsageError, match="no such parent directory"):
        export_gguf(src, tmp_path / "nope" / "m.gguf", progress=False)
    with pytest.raises(UsageError, match="GGUF type is 'q3_k', expected one of q4_0"):
        export_gguf(src, tmp_path / "m.gguf", qtype="q3_k", progress=False)
