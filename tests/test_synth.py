"""``mer synth``: synthetic checkpoints that load, match their preset, and route
like a real model (checked with the independent numpy model)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from naive_model import NaiveModel

from mer_cli import synth
from mer_cli.cli import cli
from mer_cli.formats.safetensors import Checkpoint
from mer_cli.models.config import from_hf_config

TINY = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]

# ~600 tokens of varied prose and code for the routing check (the first 300 are used)
TEXT = (
    "The river town wakes before the sun. Bakers pull the first loaves from "
    "brick ovens while fishermen check their nets by lantern light. A mixture "
    "of experts model sends each token to a few specialists chosen by a small "
    "router, so most of its weights sit idle on any single step. Quantum "
    "physics, medieval poetry and the price of copper rarely meet in one "
    "sentence, yet a library holds all three on neighbouring shelves. She "
    "asked whether the 7:45 train to Zurich still stops at Basel; the clerk "
    "said yes, platform 12, but only on weekdays. Jazz drummers keep time "
    "with brushes, violinists with their bows, and children with sticks on "
    "iron railings. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) "
    "+ fibonacci(n - 2). Vivid purple crocuses pushed through the frozen "
    "ground in early March, surprising every gardener on the street. Kayaks, "
    "canoes and one enormous wooden raft drifted past the old mill. "
    "Hydrogen bonds explain why ice floats; without them lakes would freeze "
    "from the bottom up. The committee voted 9 to 4 to extend the budget "
    "through August."
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every tiny preset, default options but small shards (several files each)."""
    root = tmp_path_factory.mktemp("synth")
    return {n: synth.write_checkpoint(n, root / n, shard_size=4_000_000) for n in TINY}


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_a_complete_checkpoint(tiny, name):
    d = tiny[name]
    p = synth.plan(name, shard_size=4_000_000)
    config = json.loads((d / "config.json").read_text())
    assert config == p.config
    assert config["model_type"] == synth.PRESETS[name].model_type
    assert config["architectures"] == [synth.ARCHITECTURES[config["model_type"]]]
    assert config["torch_dtype"] == "bfloat16"
    mc = from_hf_config(config)
    pc = synth.PRESETS[name].config
    assert mc.hidden_size == pc["hidden_size"] == 256
    assert mc.num_layers == pc["num_hidden_layers"]
    assert mc.top_k == pc["num_experts_per_tok"]

    index = json.loads((d / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(d)
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(ckpt.where) == {t.name for t in p.tensors}
    for t in p.tensors:
        info = ckpt.info(t.name)
        assert (info.dtype, info.shape) == ("BF16", t.shape)
        assert ckpt.where[t.name].path.name == index["weight_map"][t.name]
    assert index["metadata"]["total_size"] == p.nbytes
    assert sum(f.size for f in ckpt.files) > p.nbytes  # data + headers
    if mc.tie_word_embeddings:
        assert "lm_head.weight" not in ckpt


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_files_agree_with_config(tiny, name):
    from jinja2 import Template
    from tokenizers import Tokenizer

    d = tiny[name]
    config = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    assert 300 < tok.get_vocab_size() <= config["vocab_size"]
    assert tok.token_to_id(tcfg["eos_token"]) == config["eos_token_id"]
    assert gen["eos_token_id"] == config["eos_token_id"]
    if tcfg["bos_token"] is not None:
        assert tok.token_to_id(tcfg["bos_token"]) == config["bos_token_id"]
    ids = tok.encode("Héllo wörld 😀").ids  # byte-level: anything encodes
    assert tok.decode(ids) == "Héllo wörld 😀"
    assert (ids[0] == config.get("bos_token_id")) == tcfg["add_bos_token"]
    chat = Template(tcfg["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        bos_token=tcfg["bos_token"],
        eos_token=tcfg["eos_token"],
    )
    assert "Hi" in chat and chat != "Hi"


@pytest.mark.parametrize("name", TINY)
def test_transformers_reads_the_config(tiny, name):
    """When transformers is installed (dev extra), its AutoConfig sees our numbers."""
    transformers = pytest.importorskip("transformers")
    c = transformers.AutoConfig.from_pretrained(tiny[name])
    want = synth.PRESETS[name].config
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    assert rope["rope_theta"] == want["rope_theta"]
    assert c.num_hidden_layers == want["num_hidden_layers"]
    assert c.hidden_size == want["hidden_size"]
    assert c.num_experts_per_tok == want["num_experts_per_tok"]
    assert c.tie_word_embeddings == want["tie_word_embeddings"]


def test_weights_are_seeded_per_tensor(tiny, tmp_path):
    one = synth.write_checkpoint("tiny-mixtral", tmp_path / "a", layers=1)
    a, full = Checkpoint(one), Checkpoint(tiny["tiny-mixtral"])
    tok = (one / "tokenizer.json").read_text()
    assert tok == (tiny["tiny-mixtral"] / "tokenizer.json").read_text()
    # --layers 1 is the first layer of the 2-layer model, whatever the sharding
    for name in a.where:
        np.testing.assert_array_equal(a.raw(name), full.raw(name))
    other = Checkpoint(synth.write_checkpoint("tiny-mixtral", tmp_path / "b", seed=1))
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert not np.array_equal(other.raw(name), full.raw(name))


def test_weight_scales(tiny):
    ckpt = Checkpoint(tiny["tiny-qwen2-moe"])
    q = ckpt.f32("model.layers.1.self_attn.q_proj.weight")  # [H*hd, D]
    assert abs(q.std() * np.sqrt(256) - 1) < 0.02
    o = ckpt.f32("model.layers.1.self_attn.o_proj.weight")
    assert abs(o.std() * np.sqrt(256) - synth.ATTN_OUT_SCALE) < 0.01
    down = ckpt.f32("model.layers.0.mlp.experts.5.down_proj.weight")  # [D, F]
    assert abs(down.std() * np.sqrt(384) - 1) < 0.02 and abs(down.mean()) < 0.01
    norm = ckpt.f32("model.layers.0.input_layernorm.weight")
    assert abs(norm.mean() - 1) < 0.03 and 0.05 < norm.std() < 0.15
    bias = ckpt.f32("model.layers.0.self_attn.k_proj.bias")
    assert 0.05 < bias.std() < 0.15


def expert_usage(routing: list[np.ndarray], E: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: each expert's share of selections over the uniform share ``[L, E]``,
    and the usage entropy over ``log(E)`` ``[L]``."""
    counts = np.stack([np.bincount(r.ravel(), minlength=E) for r in routing])
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1) / np.log(E)
    return p * E, ent


# Bounds for 300 tokens. Even ideal random routing of real text is uneven: this
# text has only ~120 distinct tokens in its first 300 (a 512-token BPE), and
# routing the bare embeddings through a random router already spreads experts
# over 0.56-1.40x; over seeds 0-3 the tiny presets measured 0.43-1.69x with
# entropy >= 0.977 (0.47-1.47x, >= 0.987 for the default seed 0 tested here). Collapse (DESIGN.md: 2-3 experts take everything) gives
# shares near 0 and >= 2.7x, entropy <= log(3)/log(8) = 0.53.
SHARE_LO, SHARE_HI, MIN_ENTROPY = 0.4, 1.75, 0.95


def routing_ids(d) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(TEXT).ids
    assert len(ids) >= 300
    return np.asarray(ids[:300])


@pytest.mark.parametrize("name", TINY)
def test_routing_is_near_uniform(tiny, name):
    m = NaiveModel(tiny[name], np.float32)
    shares, ent = expert_usage(m.routing(routing_ids(tiny[name])), m.cfg.num_experts)
    assert shares.min() >= SHARE_LO and shares.max() <= SHARE_HI, shares.round(2)
    assert ent.min() >= MIN_ENTROPY, ent


def test_routing_check_catches_drifting_weights(tiny):
    """Negative control: give every layer matrix a shared negative mean, the bias
    that random Q4_0 blocks with all-positive scales have (-0.11 std there, which
    needs more layers to compound; -0.3 std collapses 2 layers). Hidden states
    then drift one way and the same check must fail."""
    d = tiny["tiny-mixtral"]
    m = NaiveModel(d, np.float32)
    for name in m.ckpt.where:
        if ".layers." in name and len(m.ckpt.info(name).shape) == 2:
            w = m.ckpt.f32(name)
            m._cache[name] = w - 0.3 * w.std()
    shares, ent = expert_usage(m.routing(routing_ids(d)), m.cfg.num_experts)
    assert shares[-1].min() < SHARE_LO and shares[-1].max() > 2.5, shares.round(2)
    assert ent[-1] < MIN_ENTROPY, ent


def test_real_presets_plan_without_writing():
    p = synth.plan("mixtral-8x7b")
    assert p.parameters == 46_702_792_704  # Mixtral-8x7B-v0.1's published count
    assert p.config["rope_theta"] == 1e6 and p.config["rms_norm_eps"] == 1e-5
    assert p.config["vocab_size"] == 32000 and p.config["sliding_window"] is None
    assert len(p.shards) == 19 and p.nbytes == 2 * p.parameters

    one = synth.plan("mixtral-8x7b", layers=1)
    shapes = {t.name: t.shape for t in one.tensors}
    assert len(shapes) == 1 + 4 + 1 + 8 * 3 + 2 + 1 + 1
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == (
        14336,
        4096,
    )
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (
        4096,
        14336,
    )
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["lm_head.weight"] == (32000, 4096)
    expert_bytes = 3 * 14336 * 4096 * 2  # one expert in bf16: 336 MiB
    assert expert_bytes == 336 * 2**20
    dense = 2 * 32000 * 4096 + (2 * 4096 * 4096 + 2 * 1024 * 4096) + 8 * 4096
    assert one.nbytes == 8 * expert_bytes + 2 * (dense + 3 * 4096)

    big = synth.plan("mixtral-8x22b", layers=1)
    mc = big.model
    assert (mc.hidden_size, mc.expert_ffn, mc.num_heads, mc.num_kv_heads) == (
        6144,
        16384,
        48,
        8,
    )
    assert mc.vocab_size == 32768 and synth.plan("mixtral-8x22b").model.num_layers == 56

    q = synth.plan("qwen3-30b-a3b")
    assert q.parameters == 30_532_122_624  # Qwen3-30B-A3B's published count
    qc = q.model
    assert (qc.num_experts, qc.top_k, qc.expert_ffn, qc.head_dim) == (128, 8, 768, 128)
    assert qc.norm_topk_prob and qc.qk_norm == "head" and qc.num_layers == 48
    names = {t.name: t.shape for t in synth.plan("qwen3-30b-a3b", layers=1).tensors}
    assert names["model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert names["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)
    assert names["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)


# ---------------------------------------------------------------- CLI


def test_cli_writes_and_replaces_with_force(tmp_path):
    out = tmp_path / "olmoe"
    r = CliRunner().invoke(cli, ["synth", "tiny-olmoe", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "olmoe"
    r = CliRunner().invoke(cli, ["synth", "tiny-olmoe", "-o", str(out), "-q"])
    assert r.exit_code == 2
    assert "output already exists; choose another -o or pass --force" in r.output
    (out / "marker").write_text("old")
    args = ["synth", "tiny-mixtral", "-o", str(out), "--force", "--layers", "1"]
    r = CliRunner().invoke(cli, args + ["--dtype", "f32", "--shard-size", "1MB"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "mixtral, 1 layers" in r.output
    assert not (out / "marker").exists()
    assert Checkpoint(out).info("model.norm.weight").dtype == "F32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_unknown_preset_lists_presets(tmp_path):
    r = CliRunner().invoke(cli, ["synth", "mixtral-9x9b", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "unknown preset 'mixtral-9x9b'; choose one of: tiny-mixtral," in r.output
    assert "qwen3-30b-a3b" in r.output


def test_cli_bad_paths_and_options(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    r = CliRunner().invoke(cli, ["synth", "tiny-olmoe", "-o", str(f / "x")])
    assert r.exit_code == 2
    assert f"{f / 'x'}: parent {f} is not a directory" in r.output
    r = CliRunner().invoke(
        cli, ["synth", "tiny-olmoe", "-o", "x", "--shard-size", "3XB"]
    )
    assert r.exit_code == 2 and "--shard-size '3XB' is not a size" in r.output
    r = CliRunner().invoke(cli, ["synth", "tiny-olmoe", "-o", "x", "--layers", "0"])
    assert r.exit_code == 2 and "--layers" in r.output


@pytest.mark.skipif(os.access("/proc/1", os.W_OK), reason="/proc/1 is writable here")
def test_cli_unwritable_parent(tmp_path):
    r = CliRunner().invoke(cli, ["synth", "tiny-olmoe", "-o", "/proc/1/ckpt"])
    assert r.exit_code == 1
    assert "/proc/1/ckpt: cannot write into /proc/1 (permission denied)" in r.output


def test_gguf_q4_0_holds_the_same_model(tmp_path):
    import gguf

    out, path = tmp_path / "ck", tmp_path / "m.gguf"
    synth.write_checkpoint("tiny-mixtral", out, layers=1, gguf=path)
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    t = {x.name: x for x in r.tensors}["blk.0.ffn_down_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    got = gguf.quants.dequantize(t.data, t.tensor_type)  # [E, D, F]
    assert got.shape == (8, 256, 384)
    want = Checkpoint(out).f32("model.layers.0.block_sparse_moe.experts.3.w2.weight")
    # Q4_0: 32-weight groups, scale amax/8, so no weight moves more than amax/8
    amax = np.abs(want.reshape(256, 12, 32)).max(-1, keepdims=True)
    err = np.abs(got[3] - want).reshape(256, 12, 32)
    assert (err <= amax / 8 * 1.001).all() and err.mean() < 0.15 * np.abs(want).mean()
    r = CliRunner().invoke(
        cli, ["synth", "tiny-mixtral", "-o", str(tmp_path / "c2"), "--gguf", str(path)]
    )
    assert r.exit_code == 2 and f"{path}: output already exists" in r.output


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real, calls = synth.generate_tensor, []

    def failing(spec, *args):
        calls.append(spec.name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(spec, *args)

    monkeypatch.setattr(synth, "generate_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.write_checkpoint("tiny-mixtral", tmp_path / "ck", shard_size=1_000_000)
    assert list(tmp_path.iterdir()) == []
