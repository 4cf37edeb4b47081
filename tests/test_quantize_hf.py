"""``mer quantize`` of Hugging Face checkpoint directories.

Checkpoints are the tiny seeded ones of ``conftest.make_hf_checkpoint``; the
expected store contents are computed here from the HF weights with the
canonical-name mapping written out independently of ``mer_cli.hf_import``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    ARCHS,
    BOS,
    ENDOFTEXT,
    EOS,
    IM_END,
    default_sigint,
    hf_config,
    hf_weights,
    make_hf_checkpoint,
)

from mer_cli import hf_import
from mer_cli.cli import cli
from mer_cli.errors import FormatError, UnsupportedError, UsageError
from mer_cli.formats import quant
from mer_cli.formats.safetensors import SafetensorsFile, SafetensorsWriter
from mer_cli.formats.store import Store
from mer_cli.quantize import quantize

REPO = Path(__file__).resolve().parent.parent


def expected_tensors(cfg: dict, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Store name -> f32 value, from DESIGN.md's HF name lists."""
    arch, L = cfg["model_type"], cfg["num_hidden_layers"]
    out = {
        "embed": w["model.embed_tokens.weight"],
        "final_norm": w["model.norm.weight"],
    }
    if not cfg.get("tie_word_embeddings"):
        out["lm_head"] = w["lm_head.weight"]
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for layer in range(L):
        p, c = f"model.layers.{layer}.", f"layers.{layer}."
        out[c + "attn_norm"] = w[p + "input_layernorm.weight"]
        out[c + "ffn_norm"] = w[p + "post_attention_layernorm.weight"]
        for x in "qkvo":
            out[c + x] = w[f"{p}self_attn.{x}_proj.weight"]
        if arch == "qwen2_moe":
            for x in "qkv":
                out[c + x + "_bias"] = w[f"{p}self_attn.{x}_proj.bias"]
        if arch in ("qwen3_moe", "olmoe"):
            out[c + "q_norm"] = w[p + "self_attn.q_norm.weight"]
            out[c + "k_norm"] = w[p + "self_attn.k_norm.weight"]
        out[c + "router"] = w[f"{p}{moe}.gate.weight"]
        if arch == "qwen2_moe":
            s = p + "mlp.shared_expert."
            out[c + "shared.gate_up"] = np.concatenate(
                [w[s + "gate_proj.weight"], w[s + "up_proj.weight"]]
            )
            out[c + "shared.down"] = w[s + "down_proj.weight"]
            out[c + "shared.gate"] = w[p + "mlp.shared_expert_gate.weight"]
    return out


def expected_experts(cfg: dict, w: dict[str, np.ndarray]):
    """(layer, expert) -> (gate_up [2F, D], down [D, F]) in f32."""
    arch = cfg["model_type"]
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    g, u, d = (
        ("w1", "w3", "w2")
        if arch == "mixtral"
        else ("gate_proj", "up_proj", "down_proj")
    )
    E = cfg.get("num_local_experts") or cfg["num_experts"]
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for e in range(E):
            b = f"model.layers.{layer}.{moe}.experts.{e}."
            gu = np.concatenate([w[b + g + ".weight"], w[b + u + ".weight"]])
            out[layer, e] = (gu, w[b + d + ".weight"])
    return out


def to_bf16_f32(a: np.ndarray) -> np.ndarray:
    return quant.bf16_to_f32(quant.f32_to_bf16(a))


# ------------------------------------------------------------------ exact round trip


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_store_holds_every_tensor_exactly(tmp_path, arch, stacked):
    src = make_hf_checkpoint(tmp_path / "ck", arch, seed=3, stacked_experts=stacked)
    out = quantize(src, tmp_path / "s.mer", experts="f32", dense="f32", progress=False)
    cfg = hf_config(arch)
    w = hf_weights(cfg, seed=3)
    s = Store.open(out)
    want = expected_tensors(cfg, w)
    assert set(s.dense) == set(want)
    for name, a in want.items():
        assert s.dense[name].dtype == "f32"
        np.testing.assert_array_equal(s.tensor(name), a.reshape(s.dense[name].shape))
    for (layer, e), (gu, dn) in expected_experts(cfg, w).items():
        parts = s.expert_parts(s.expert_bytes(layer, e))
        np.testing.assert_array_equal(parts["gate_up"], gu)
        np.testing.assert_array_equal(parts["down"], dn)
    assert s.verify() == []
    assert s.manifest["source"]["kind"] == "hf"
    assert s.manifest["source"]["model_type"] == arch
    assert s.manifest["source"]["path"] == str(src.resolve())


def test_model_hyperparameters_come_from_config_json(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "qwen3_moe", layers=3)
    m = Store.open(quantize(src, tmp_path / "s.mer", progress=False)).model
    assert (m.arch, m.num_layers, m.hidden_size, m.head_dim) == ("qwen3_moe", 3, 64, 32)
    assert (m.num_heads, m.num_kv_heads, m.num_experts, m.top_k) == (4, 2, 8, 2)
    assert (m.expert_ffn, m.qk_norm, m.routing, m.norm_topk_prob) == (
        64,
        "head",
        "softmax_topk",
        True,
    )
    assert m.rope_theta == 1e6 and m.rms_norm_eps == 1e-6
    src2 = make_hf_checkpoint(tmp_path / "q2", "qwen2_moe")
    m2 = Store.open(quantize(src2, tmp_path / "s2.mer", progress=False)).model
    assert (m2.shared_expert_ffn, m2.shared_expert_gate, m2.attn_bias) == (
        64,
        True,
        True,
    )


def test_bf16_checkpoint_to_bf16_dense_is_bit_exact(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", dtype="BF16")
    out = quantize(src, tmp_path / "s.mer", experts="f16", dense="bf16", progress=False)
    cfg = hf_config("mixtral")
    w = {k: to_bf16_f32(v) for k, v in hf_weights(cfg).items()}
    s = Store.open(out)
    q = s.tensor("layers.1.q")
    assert s.dense["layers.1.q"].dtype == "bf16"
    np.testing.assert_array_equal(
        q, quant.f32_to_bf16(w["model.layers.1.self_attn.q_proj.weight"])
    )
    # routers and norms stay f32 whatever --dense says
    assert s.dense["layers.1.router"].dtype == "f32"
    assert s.dense["final_norm"].dtype == "f32"
    np.testing.assert_array_equal(
        s.tensor("layers.1.router"), w["model.layers.1.block_sparse_moe.gate.weight"]
    )
    gu, dn = expected_experts(cfg, w)[1, 3]
    parts = s.expert_parts(s.expert_bytes(1, 3))
    np.testing.assert_array_equal(parts["gate_up"], gu.astype(np.float16))
    np.testing.assert_array_equal(parts["down"], dn.astype(np.float16))


def test_default_q4_experts_and_q8_dense_match_the_reference_encoder(
    tmp_path, monkeypatch
):
    # a tiny chunk forces the row-chunked path; the bytes must still equal
    # quant.encode of the whole tensor
    monkeypatch.setattr(hf_import, "CHUNK_ELEMS", 100)
    src = make_hf_checkpoint(tmp_path / "ck", "qwen2_moe", dtype="F16", shards=3)
    out = quantize(src, tmp_path / "s.mer", progress=False, threads=2)
    cfg = hf_config("qwen2_moe")
    w = {k: v.astype(np.float16).astype(np.float32) for k, v in hf_weights(cfg).items()}
    s = Store.open(out)
    assert s.quantization["experts"] == "q4" and s.quantization["dense"] == "q8"
    for name, a in expected_tensors(cfg, w).items():
        e = s.dense[name]
        want = (
            "f32" if a.ndim == 1 or name.endswith(("router", "shared.gate")) else "q8"
        )
        assert e.dtype == want, name
        np.testing.assert_array_equal(s.dense_bytes(name), quant.encode(a, want), name)
    for (layer, e), (gu, dn) in expected_experts(cfg, w).items():
        ext = s.expert_bytes(layer, e)
        lay = s.parts
        g = ext[lay["gate_up"].offset :][: lay["gate_up"].nbytes]
        np.testing.assert_array_equal(g, quant.encode(gu, "q4"))
        d = ext[lay["down"].offset :][: lay["down"].nbytes]
        np.testing.assert_array_equal(d, quant.encode(dn, "q4"))


def test_thread_count_does_not_change_the_bytes(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=3)
    a = Store.open(quantize(src, tmp_path / "a.mer", progress=False, threads=1))
    b = Store.open(quantize(src, tmp_path / "b.mer", progress=False, threads=3))
    assert [e.crc32 for e in a.experts] == [e.crc32 for e in b.experts]
    assert {k: v.crc32 for k, v in a.dense.items()} == {
        k: v.crc32 for k, v in b.dense.items()
    }


def test_tied_embeddings_store_no_lm_head(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", tie_word_embeddings=True)
    s = Store.open(quantize(src, tmp_path / "s.mer", progress=False))
    assert "lm_head" not in s.dense and s.model.tie_word_embeddings


def test_max_file_size_spreads_experts_over_files(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "qwen3_moe")
    s = Store.open(
        quantize(src, tmp_path / "s.mer", progress=False, max_file_size=4 * 4096 + 4096)
    )
    files = {e.file for e in s.experts}
    assert len(files) > 1
    assert all(e.offset % 4096 == 0 for e in s.experts)
    assert all(sz <= 5 * 4096 for sz in s.file_sizes[1:])
    assert s.verify() == []


# ------------------------------------------------------------------ tokenizer table


def test_tokenizer_table_per_architecture(tmp_path):
    got = {}
    for arch in ("mixtral", "qwen3_moe", "olmoe"):
        src = make_hf_checkpoint(tmp_path / arch, arch, layers=1)
        s = Store.open(quantize(src, tmp_path / f"{arch}.mer", progress=False))
        assert (s.path / "tokenizer.json").read_bytes() == (
            src / "tokenizer.json"
        ).read_bytes()
        got[arch] = s.tokenizer
    assert got["mixtral"]["bos_token_id"] == BOS
    assert got["mixtral"]["eos_token_ids"] == [EOS]
    assert got["mixtral"]["add_bos_token"] is True
    assert got["mixtral"]["chat_template"].startswith("{{ bos_token }}")
    # generation_config's list first, then tokenizer_config's eos_token (a dict)
    assert got["qwen3_moe"]["eos_token_ids"] == [IM_END, ENDOFTEXT]
    assert got["qwen3_moe"]["bos_token_id"] == ENDOFTEXT
    assert got["qwen3_moe"]["add_bos_token"] is False
    assert got["olmoe"]["bos_token_id"] is None
    assert got["olmoe"]["eos_token_ids"] == [ENDOFTEXT]
    assert got["olmoe"]["file"] == "tokenizer.json"
    assert "<|im_start|>" in got["olmoe"]["chat_template"]


def test_tokenizer_falls_back_to_config_json_and_tokenizer_json(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    (src / "generation_config.json").unlink()
    (src / "tokenizer_config.json").unlink()
    (src / "chat_template.jinja").write_text("{{ messages }}")
    t = Store.open(quantize(src, tmp_path / "s.mer", progress=False)).tokenizer
    assert t["bos_token_id"] == BOS and t["eos_token_ids"] == [EOS]
    # no add_bos_token key: tokenizer.json's post-processor prepends <s>
    assert t["add_bos_token"] is True
    assert t["chat_template"] == "{{ messages }}"


def test_unknown_special_token_is_an_error(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(
        FormatError, match=r"eos_token is '<nope>', which is not a token"
    ):
        quantize(src, tmp_path / "s.mer", progress=False)


# ------------------------------------------------------------------ CLI and errors


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_cli_quantize_then_inspect_and_verify(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral")
    out = tmp_path / "m.mer"
    r = run("quantize", str(src), "-o", str(out), "--threads", "2")
    assert r.exit_code == 0, r.output
    assert "B/s" in r.output  # the tqdm bar reports bytes per second
    assert "store written" in r.output
    r = run("inspect", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["model"]["arch"] == "mixtral"
    r = run("verify", str(out), "-q")
    assert r.exit_code == 0 and "OK" in r.output


def test_existing_output_needs_force(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1)
    out = tmp_path / "o.mer"
    out.mkdir()
    r = run("quantize", str(src), "-o", str(out), "-q")
    assert r.exit_code == 2
    assert (
        f"{out}: output already exists; choose another -o or pass --force" in r.output
    )
    r = run("quantize", str(src), "-o", str(out), "-q", "--force")
    assert r.exit_code == 0, r.output
    assert Store.open(out).model.arch == "olmoe"


def _rewrite(path: Path, drop: str = "", rename: tuple[str, str] | None = None) -> None:
    """Rewrite a safetensors file without tensor ``drop`` / with a tensor renamed."""
    f = SafetensorsFile(path)
    items = [(n, f.raw(n).copy(), f.tensors[n].dtype) for n in f.tensors if n != drop]
    if rename:
        items = [(rename[1] if n == rename[0] else n, a, d) for n, a, d in items]
    del f
    tmp = path.with_suffix(".tmp")
    w = SafetensorsWriter(tmp, [(n, d, a.shape) for n, a, d in items])
    for n, a, _ in items:
        w.write(n, a)
    w.close()
    os.replace(tmp, path)


def test_missing_tensor(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "qwen3_moe", layers=1)
    _rewrite(
        src / "model.safetensors", drop="model.layers.0.mlp.experts.5.up_proj.weight"
    )
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"Error: {src}: tensor 'model.layers.0.mlp.experts.5.up_proj.weight' "
        "(store tensor expert (0, 5) gate_up) is missing from the checkpoint"
    ) in r.output
    assert not (tmp_path / "s.mer").exists()


def test_unexpected_tensor_is_refused(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1)
    _rewrite(
        src / "model.safetensors",
        rename=("model.norm.weight", "model.layers.0.mlp.dense.weight"),
    )
    with pytest.raises(FormatError, match="'model.norm.weight'.*missing"):
        quantize(src, tmp_path / "s.mer", progress=False)
    _rewrite(src / "model.safetensors", rename=("model.layers.0.mlp.dense.weight", "x"))
    (src / "extra.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    _rewrite(src / "extra.safetensors", rename=("x", "model.norm.weight"))
    with pytest.raises(UnsupportedError, match=r"tensors are not part of the olmoe"):
        quantize(src, tmp_path / "s.mer", progress=False)


def test_non_finite_weights_are_refused(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1, dtype="BF16")
    name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    f = SafetensorsFile(src / "model.safetensors")
    begin = f.tensors[name].begin
    del f
    with open(src / "model.safetensors", "r+b") as fh:
        fh.seek(begin + 2 * (5 * 64 + 7))  # row 5, column 7 of a [96, 64] bf16
        fh.write(b"\xc0\x7f")  # NaN
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"Error: {src / 'model.safetensors'}: tensor '{name}': row 5, column 7 is "
        "nan; the checkpoint holds non-finite weights"
    ) in r.output
    assert list(tmp_path.iterdir()) == [src]


def test_shape_mismatch_names_tensor_and_expected_shape(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        "tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape "
        "[96, 64], expected [128, 64] from config.json"
    ) in r.output


def test_truncated_safetensors(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    p = src / "model.safetensors"
    size = p.stat().st_size
    os.truncate(p, size - 100)
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"data ends at byte {size} but the file has {size - 100} bytes; the file is truncated"
        in r.output
    )
    assert str(p) in r.output


def test_header_length_past_end_of_file(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    p = src / "model.safetensors"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.write((size * 2).to_bytes(8, "little"))
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"{p}: header length is {size * 2} bytes but the file has only {size - 8} "
        "after it; the file is truncated or not safetensors"
    ) in r.output


def test_unknown_dtype(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    p = src / "model.safetensors"
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E4M3"
    header["model.norm.weight"]["data_offsets"][1] -= 64 * 3  # 1 byte per element
    new = json.dumps(header, separators=(",", ":")).encode()
    p.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"{p}: tensor 'model.norm.weight': dtype 'F8_E4M3' is not supported; mer reads F64"
    ) in r.output


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"{src / 'config.json'}: model_type is 'llama'; mer supports mixtral, "
        "qwen2_moe, qwen3_moe, olmoe"
    ) in r.output


def test_missing_tokenizer_json(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1)
    (src / "tokenizer.json").unlink()
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert (
        f"{src / 'tokenizer.json'}: missing; mer needs the checkpoint's fast tokenizer"
        in r.output
    )


def test_missing_config_json_and_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1 and "config.json: missing" in r.output
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    r = run("quantize", str(junk), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert "not the GGUF magic b'GGUF', and is not a directory" in r.output
    assert f"pass the directory that holds it ({tmp_path})" in r.output
    r = run("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1 and "no such file or directory" in r.output


def test_columns_not_a_multiple_of_32_need_a_float_encoding(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1, hidden_size=48)
    r = run("quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q")
    assert r.exit_code == 1
    assert "has 48 columns, not a multiple of the group size 32" in r.output
    r = run(
        "quantize", str(src), "-o", str(tmp_path / "s.mer"), "-q",
        "--experts", "f16", "--dense", "f16",
    )  # fmt: skip
    assert r.exit_code == 0, r.output


def test_bad_options_are_usage_errors(tmp_path):
    src = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1)
    r = run("quantize", str(src), "-o", str(tmp_path / "s"), "--max-file-size", "lots")
    assert r.exit_code == 2 and "--max-file-size 'lots' is not a size" in r.output
    r = run("quantize", str(src), "-o", str(tmp_path / "s"), "--experts", "q2")
    assert r.exit_code == 2
    with pytest.raises(UsageError, match="--threads is 0"):
        quantize(src, tmp_path / "s", threads=0)


def test_gguf_files_go_to_the_gguf_importer(tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("mer_cli.gguf_import")
    fake.quantize_gguf = lambda src, out, **kw: (
        calls.append((src, out, kw)) or Path(out)
    )
    monkeypatch.setitem(sys.modules, "mer_cli.gguf_import", fake)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00")
    quantize(g, tmp_path / "s.mer", experts="q8", progress=False)
    assert calls == [
        (
            g,
            tmp_path / "s.mer",
            dict(
                experts="q8",
                dense="q8",
                force=False,
                threads=None,
                progress=False,
                max_file_size=None,
            ),
        )
    ]


# ------------------------------------------------------------------ memory, kill, Ctrl-C


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """About 100 MB of f32 weights: large enough to take a second to quantize."""
    d = tmp_path_factory.mktemp("big") / "ck"
    return make_hf_checkpoint(
        d, "qwen3_moe", layers=4, hidden_size=512, moe_intermediate_size=512,
        num_experts=8, num_attention_heads=8, head_dim=64,
    )  # fmt: skip


def _input_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def test_peak_rss_stays_far_below_the_checkpoint(big_checkpoint, tmp_path):
    code = (
        "import resource, sys\n"
        "from mer_cli import hf_import, quantize\n"
        "import numpy, tqdm, tokenizers\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "quantize.quantize(sys.argv[1], sys.argv[2], progress=False, threads=2)\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(big_checkpoint), str(tmp_path / "s.mer")],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = (int(x) * 1024 for x in r.stdout.split())
    # without dropping consumed pages the whole mapped file ends up resident
    assert peak - base < _input_bytes(big_checkpoint) / 2


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mer_cli", "quantize", str(src), "-o", str(out), "-q",
         "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )  # fmt: skip


def _wait_until_midway(proc: subprocess.Popen, out: Path) -> Path:
    """Wait until the temporary store holds some expert extents but not all."""
    tmp = out.parent / f".{out.name}.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        part = tmp / "experts-00001.part"
        if part.exists() and part.stat().st_size > 6 * 1024 * 1024:
            return tmp
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("quantize never got half way")


def test_killed_quantize_leaves_no_valid_store(big_checkpoint, tmp_path):
    out = tmp_path / "k.mer"
    proc = _start(big_checkpoint, out)
    tmp = _wait_until_midway(proc, out)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    for path in (out, tmp):
        r = run("inspect", str(path))
        assert r.exit_code == 1 and "Error:" in r.output
        r = run("verify", str(path), "-q")
        assert r.exit_code == 1
    assert "not a mer store (no manifest.json)" in run("verify", str(tmp)).output
    assert "no such store" in run("inspect", str(out)).output


def test_ctrl_c_removes_the_temporary_directory(big_checkpoint, tmp_path):
    out = tmp_path / "c.mer"
    proc = _start(big_checkpoint, out)
    tmp = _wait_until_midway(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted." in err
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == []
