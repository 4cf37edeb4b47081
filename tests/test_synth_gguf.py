"""``mer synth --format gguf``: GGUF Q4_0 models written straight from random blocks.

Checked against the converter path (``mer synth`` + ``export_gguf``: same
metadata, tensor names, shapes and types), against gguf's own dequantization
(``mer quantize --dense q4`` transcodes every matrix exactly), against llama.cpp
as an independent implementation (it loads the file; its logits equal mer's on
the transcoded store up to int8 activation rounding), and for routing.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_synth import MIN_ENTROPY, SHARE_HI, SHARE_LO, expert_usage, routing_ids

from mer_cli import synth, synth_gguf
from mer_cli.cli import cli
from mer_cli.formats.store import Store
from mer_cli.gguf_import import unpermute_rows
from mer_cli.quantize import quantize
from mer_cli.runtime import Engine

gguf = pytest.importorskip("gguf")

TINY = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]
# llama.cpp's OLMoE sizes attn_k_norm as n_embd, i.e. it assumes no GQA; the tiny
# OLMoE preset has 2 KV heads for 4 query heads (transformers allows it), so
# llama.cpp refuses that file: "attn_k_norm.weight has wrong shape"
LLAMA_CPP_TINY = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_gguf")
    return {n: synth_gguf.write_gguf(n, root / f"{n}.gguf") for n in TINY}


@pytest.fixture(scope="module")
def stores(files, tmp_path_factory):
    """Each tiny GGUF transcoded with ``--dense q4`` (every matrix bit for bit)."""
    root = tmp_path_factory.mktemp("synth_gguf_stores")
    return {
        n: quantize(files[n], root / f"{n}.mer", dense="q4", progress=False)
        for n in TINY
    }


def _fields(r) -> dict:
    return {k: (f.types, f.contents()) for k, f in r.fields.items()}


def _tensors(r) -> list:
    return [(t.name, t.tensor_type, tuple(map(int, t.shape))) for t in r.tensors]


@pytest.mark.parametrize("name", TINY)
def test_layout_and_metadata_equal_the_converter_path(files, tmp_path, name):
    """Same metadata and tensor table as ``mer synth -o DIR --gguf FILE``."""
    from mer_cli.gguf_export import export_gguf

    ck = synth.write_checkpoint(name, tmp_path / name)
    ref = export_gguf(ck, tmp_path / "ref.gguf", progress=False)
    a, b = gguf.GGUFReader(ref), gguf.GGUFReader(files[name])
    assert _fields(b) == _fields(a)  # general.name is the file stem = the dir name
    assert _tensors(b) == _tensors(a)
    T = gguf.GGMLQuantizationType
    for t in b.tensors:
        if "ffn_gate_inp" in t.name or len(t.shape) == 1:
            assert t.tensor_type == T.F32, t.name
        else:
            assert t.tensor_type == T.Q4_0, t.name


def test_weight_statistics(files):
    r = gguf.GGUFReader(files["tiny-qwen2-moe"])
    t = {x.name: x for x in r.tensors}

    def deq(name):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type)

    for name, std in [
        ("token_embd.weight", 1.0),
        ("blk.1.attn_q.weight", 1 / 16),
        ("blk.1.attn_output.weight", synth.ATTN_OUT_SCALE / 16),
        ("blk.0.ffn_down_exps.weight", 1 / np.sqrt(384)),
        ("blk.0.ffn_gate_shexp.weight", 1 / 16),
    ]:
        w = deq(name)
        assert abs(w.std() / std - 1) < 0.02, name
        assert abs(w.mean()) < 0.02 * std, name
    # every block's scale has the same magnitude and a random sign
    raw = t["blk.0.ffn_up_exps.weight"].data.reshape(-1, 18)
    d = raw[:, :2].copy().view("<f2").ravel().astype(np.float32)
    assert np.allclose(np.abs(d), abs(d[0])) and 0.48 < (d < 0).mean() < 0.52
    norm = deq("blk.0.attn_norm.weight")
    assert abs(norm.mean() - 1) < 0.03 and 0.05 < norm.std() < 0.15
    router = deq("blk.0.ffn_gate_inp.weight")
    assert abs(router.std() * 16 - 1) < 0.05
    assert 0.05 < deq("blk.0.attn_k.bias").std() < 0.15


def test_seeded_and_independent_of_chunking(files, tmp_path, monkeypatch):
    monkeypatch.setattr(synth_gguf, "CHUNK_BLOCKS", 4 * 7)  # chunks end mid-row
    small = synth_gguf.write_gguf("tiny-mixtral", tmp_path / "tiny-mixtral.gguf")
    assert small.read_bytes() == files["tiny-mixtral"].read_bytes()
    one = gguf.GGUFReader(
        synth_gguf.write_gguf("tiny-mixtral", tmp_path / "l1.gguf", layers=1)
    )
    other = gguf.GGUFReader(
        synth_gguf.write_gguf("tiny-mixtral", tmp_path / "s1.gguf", seed=1)
    )
    full = {t.name: t for t in gguf.GGUFReader(files["tiny-mixtral"]).tensors}
    for t in one.tensors:  # fewer layers: a prefix of the model
        assert np.array_equal(t.data, full[t.name].data), t.name
    assert len(one.tensors) < len(full)
    diff = {
        t.name: not np.array_equal(t.data, full[t.name].data) for t in other.tensors
    }
    assert all(diff.values())


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_dense_q4_store_equals_gguf_dequantization(files, stores, name):
    r = gguf.GGUFReader(files[name])
    t = {x.name: x for x in r.tensors}
    st = Store.open(stores[name])
    cfg = st.model
    assert st.manifest["quantization"]["dense"] == "q4"

    def deq(n):
        return gguf.quants.dequantize(t[n].data, t[n].tensor_type)

    assert np.array_equal(st.tensor_f32("embed"), deq("token_embd.weight"))
    assert np.array_equal(st.tensor_f32("lm_head"), deq("output.weight"))
    for layer in range(cfg.num_layers):
        b, c = f"blk.{layer}.", f"layers.{layer}."
        q, k = deq(b + "attn_q.weight"), deq(b + "attn_k.weight")
        if cfg.arch == "mixtral":  # llama's permuted Q/K rows, undone on import
            q = q[unpermute_rows(cfg.q_dim, cfg.num_heads)]
            k = k[unpermute_rows(cfg.kv_dim, cfg.num_kv_heads)]
        assert np.array_equal(st.tensor_f32(c + "q"), q)
        assert np.array_equal(st.tensor_f32(c + "k"), k)
        assert np.array_equal(st.tensor_f32(c + "o"), deq(b + "attn_output.weight"))
        assert np.array_equal(
            st.tensor_f32(c + "router"), deq(b + "ffn_gate_inp.weight")
        )
        if cfg.shared_expert_ffn:
            gu = np.concatenate(
                [deq(b + "ffn_gate_shexp.weight"), deq(b + "ffn_up_shexp.weight")]
            )
            assert np.array_equal(st.tensor_f32(c + "shared.gate_up"), gu)
        gate, up = deq(b + "ffn_gate_exps.weight"), deq(b + "ffn_up_exps.weight")
        down = deq(b + "ffn_down_exps.weight")
        for e in range(cfg.num_experts):
            parts = st.expert_parts(st.expert_bytes(layer, e))
            assert np.array_equal(
                parts["gate_up"].dequantize(), np.concatenate([gate[e], up[e]])
            )
            assert np.array_equal(parts["down"].dequantize(), down[e])


@pytest.mark.parametrize("name", TINY)
def test_routing_is_near_uniform(stores, name):
    """Random-sign Q4_0 scales route like the Gaussian checkpoints do."""
    eng = Engine(Store.open(stores[name]), ctx=512, record_routing=True)
    ids = routing_ids(stores[name])
    eng.prefill(ids)
    ((_, rec, _),) = eng.routing  # [L, T, K]
    shares, ent = expert_usage(list(rec), eng.cfg.num_experts)
    assert shares.min() >= SHARE_LO and shares.max() <= SHARE_HI, shares.round(2)
    assert ent.min() >= MIN_ENTROPY, ent


@pytest.mark.parametrize("name", LLAMA_CPP_TINY)
def test_llama_cpp_logits_equal_mer(files, stores, name):
    """llama.cpp (an independent implementation) on the GGUF vs mer's Engine on
    the store transcoded from it: the same weights bit for bit, so logits differ
    only by rounding of activations (both round them to int8 per group of 32 for
    the Q4_0 products, at slightly different points). Validates the exporter's
    metadata (rope layout, Q/K permutation, tokenizer-free ids) and the forward
    pass. Measured: max |diff| / max |logit| 0.010 (Mixtral), 0.008 (Qwen2-MoE),
    0.0023 (Qwen3-MoE), greedy tokens equal."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed"
    )
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 500, 16)]
    llm = llama_cpp.Llama(
        str(files[name]),
        n_threads=2,
        n_ctx=128,
        logits_all=True,
        verbose=False,
        type_k=0,  # GGML_TYPE_F32 KV cache, as mer's default
        type_v=0,
    )
    llm.eval(ids)
    want = np.array(llm.scores[: len(ids)], np.float32)
    eng = Engine(Store.open(stores[name]), ctx=128)
    got = eng.prefill(ids, all_logits=True)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.03 * scale
    # a few decode steps through both KV caches, fed the same tokens
    for _ in range(4):
        tok = int(want[-1].argmax())
        llm.eval([tok])
        want = np.array(llm.scores[llm.n_tokens - 1 : llm.n_tokens], np.float32)
        got = eng.decode_step(tok)[None]
        assert np.abs(got - want).max() < 0.03 * scale
    top2 = np.sort(want[-1])[-2:]
    if top2[1] - top2[0] > 0.06 * scale:  # greedy choice not a near tie
        assert got[-1].argmax() == want[-1].argmax()


def test_cli_writes_gguf_and_refuses_bad_options(tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(
        cli, ["synth", "tiny-mixtral", "--format", "gguf", "--layers", "1", "-o", out]
    )
    assert r.exit_code == 0, r.output
    assert "GGUF Q4_0" in r.output
    assert gguf.GGUFReader(out).fields["llama.block_count"].contents() == 1
    r = CliRunner().invoke(
        cli, ["synth", "tiny-mixtral", "--format", "gguf", "-o", out]
    )
    assert r.exit_code == 2 and f"{out}: output already exists" in r.output
    r = CliRunner().invoke(
        cli,
        ["synth", "tiny-mixtral", "--format", "gguf", "-o", out, "--gguf", "x.gguf"],
    )
    assert r.exit_code == 2 and "--gguf does not apply to --format gguf" in r.output
    r = CliRunner().invoke(
        cli, ["synth", "tiny-mixtral", "--format", "gguf", "-o", tmp_path]
    )
    assert r.exit_code == 2 and "is a directory" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp left


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = synth_gguf.q4_0_blocks
    monkeypatch.setattr(synth_gguf, "q4_0_blocks", fail_third)
    with pytest.raises(KeyboardInterrupt):
        synth_gguf.write_gguf("tiny-mixtral", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
