"""Routing traces: what ``mer trace`` records against the engine's own routing
record and the independent numpy model, the file format (round trip, merge,
validation errors) and the CLI (``mer trace``, ``mer generate --trace-out``)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import naive_model
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint
from naive_model import NaiveModel

from mer_cli.cli import cli
from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.trace import ARRAYS, Trace, bytes_per_token, merge
from mer_cli.generate import GenerateOptions, generate_many, load
from mer_cli.quantize import quantize
from mer_cli.trace import trace

PROMPTS = ["Once upon a time", "The cat sat"]
N_NEW = 4


def _store(d: Path, arch: str, seed: int = 0, **overrides) -> Path:
    ck = make_hf_checkpoint(d / "ck", arch, seed=seed, **overrides)
    return quantize(ck, d / "s.mer", experts="f32", dense="f32", progress=False)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="module")
def mixtral_trace(mixtral, tmp_path_factory) -> Trace:
    out = tmp_path_factory.mktemp("t") / "a.npz"
    return trace(mixtral, PROMPTS, out, max_tokens=N_NEW, progress=False)


def _engine_routing(store: Path, prompts, max_tokens):
    """The engine's own ``record_routing`` output for the same greedy runs:
    positions [N], experts [N, L, K], weights [N, L, K]."""
    engine, tok = load(store)
    engine.record_routing = True
    for c in generate_many(engine, tok, prompts, GenerateOptions(max_tokens)):
        c.run()
    pos = np.concatenate([r[0] for r in engine.routing])
    ids = np.concatenate([r[1].transpose(1, 0, 2) for r in engine.routing])
    w = np.concatenate([r[2].transpose(1, 0, 2) for r in engine.routing])
    return pos, ids, w


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("mixtral", {}),
        ("qwen2_moe", {}),
        ("qwen2_moe", {"norm_topk_prob": True}),
        ("olmoe", {}),
    ],
)
def test_trace_equals_engine_routing(tmp_path, arch, overrides):
    store = _store(tmp_path, arch, **overrides)
    t = trace(store, PROMPTS, tmp_path / "t.npz", max_tokens=N_NEW, progress=False)
    pos, ids, w = _engine_routing(store, PROMPTS, N_NEW)
    np.testing.assert_array_equal(t.positions, pos)
    np.testing.assert_array_equal(t.experts, ids)
    np.testing.assert_array_equal(t.weights, w.astype(np.float16))
    # prompt 0 then prompt 1, each from position 0
    starts = np.flatnonzero(t.positions == 0)
    assert starts.tolist() == [0, int((t.prompt == 0).sum())]
    assert t.prompt.tolist() == sorted(t.prompt.tolist()) and t.num_prompts == 2
    # the router probabilities: a distribution whose top-k are the selected experts
    p = t.probs.astype(np.float32)  # [N, L, E]
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=5e-3)
    K = t.meta["top_k"]
    top = np.argsort(-p, axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(t.experts, -1))
    # the weights follow from them by the architecture's rule
    chosen = np.take_along_axis(p, t.experts.astype(np.int64), -1)
    renorm = arch == "mixtral" or overrides.get("norm_topk_prob", False)
    want = chosen / chosen.sum(-1, keepdims=True) if renorm else chosen
    np.testing.assert_allclose(t.weights.astype(np.float32), want, atol=3e-3)


def test_streamed_experts_and_prompt_only(mixtral, mixtral_trace, tmp_path):
    """Experts streamed through a small --ram-budget give the same trace; with
    max_tokens=0 the trace holds the prompts alone."""
    from mer_cli.config import Config
    from mer_cli.formats.store import Store
    from mer_cli.sources import SourceOptions, plan_source

    budget = Store.open(mixtral).expert_bytes_total // 3
    plan = plan_source(Store.open(mixtral), SourceOptions(ram_budget=budget), Config())
    assert plan.kind == "streamed"
    s = trace(mixtral, PROMPTS, tmp_path / "s.npz", max_tokens=N_NEW,
              ram_budget=budget, progress=False)  # fmt: skip
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(s, name), getattr(mixtral_trace, name))
    p = trace(mixtral, PROMPTS, tmp_path / "p.npz", max_tokens=0, progress=False)
    assert p.num_prompts == 2 and p.num_tokens == mixtral_trace.num_tokens - 2 * (
        N_NEW - 1
    )
    first = mixtral_trace.positions < np.repeat(
        np.bincount(p.prompt), np.bincount(mixtral_trace.prompt)
    )
    np.testing.assert_array_equal(p.experts, mixtral_trace.experts[first])
    np.testing.assert_array_equal(p.sketch, mixtral_trace.sketch[first])


def test_sketch_is_projection_of_residual(mixtral, mixtral_trace, monkeypatch):
    """The sketch against the residual stream the independent numpy model
    computes (the input of each layer's post-attention RMS norm)."""
    t = mixtral_trace
    D, S, seed = (t.meta[k] for k in ("hidden_size", "sketch_dim", "sketch_seed"))
    g = np.random.default_rng(seed).standard_normal((D, S)) / np.sqrt(S)
    np.testing.assert_allclose(t.projection, g, rtol=1e-6)
    seen = []
    plain = naive_model.rms_norm

    def spy(x, w, eps):
        seen.append(x)
        return plain(x, w, eps)

    monkeypatch.setattr(naive_model, "rms_norm", spy)
    first = t.prompt == 0
    ck = mixtral.parent / "ck"
    NaiveModel(ck).run(t.tokens[first])
    for layer in range(t.meta["num_layers"]):
        residual = seen[2 * layer + 1]  # [T, D] entering the MoE block
        want = residual @ g
        got = t.sketch[first, layer].astype(np.float64)
        assert np.abs(got - want).max() / np.abs(want).max() < 3e-3


def test_round_trip_and_plain_numpy(mixtral_trace, tmp_path):
    t = mixtral_trace
    back = Trace.load(t.path)
    assert back.meta == t.meta
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
        assert getattr(back, name).dtype == ARRAYS[name][0]
    with np.load(t.path, allow_pickle=False) as z:
        meta = json.loads(z["meta.json"].tobytes())
        assert meta["format"] == "mer-trace" and meta["version"] == 1
        assert z["experts"].shape == (t.num_tokens, 2, meta["top_k"])
    L, E, K, S = (
        t.meta[k] for k in ("num_layers", "num_experts", "top_k", "sketch_dim")
    )
    fixed = t.projection.nbytes
    size = t.path.stat().st_size
    A, pv = t.meta["lookahead_depth"], t.meta["preview"]
    per_token = bytes_per_token(L, E, K, S, A, pv)
    assert 0 <= size - fixed - t.num_tokens * per_token < 4096
    assert bytes_per_token(32, 8, 2, 64) == 4876  # Mixtral, see mer-trace(5)
    assert bytes_per_token(32, 8, 2, 64, 3, True) == 4876 + 1536 + 4608


def test_merge(mixtral, mixtral_trace, tmp_path):
    b = trace(mixtral, ["Hello"], tmp_path / "b.npz", max_tokens=2, progress=False)
    m = merge([mixtral_trace, b])
    n = mixtral_trace.num_tokens
    assert m.num_tokens == n + b.num_tokens and m.num_prompts == 3
    np.testing.assert_array_equal(m.tokens[n:], b.tokens)
    np.testing.assert_array_equal(m.sketch[:n], mixtral_trace.sketch)
    assert m.prompt[n:].tolist() == [2] * b.num_tokens
    m.save(tmp_path / "m.npz")
    assert Trace.load(tmp_path / "m.npz").num_prompts == 3


def test_merge_refuses_other_model_or_projection(mixtral, mixtral_trace, tmp_path):
    other = _store(tmp_path / "o", "mixtral", seed=5)
    b = trace(other, ["Hello"], tmp_path / "b.npz", max_tokens=1, progress=False)
    with pytest.raises(UsageError, match="store_id"):
        merge([mixtral_trace, b])
    c = trace(mixtral, ["Hi"], tmp_path / "c.npz", max_tokens=1, seed=7, progress=False)
    with pytest.raises(UsageError, match="sketch_seed 7 but .* has 0"):
        merge([mixtral_trace, c])


def _rewrite(src: Trace, dst: Path, meta=None, drop=(), **arrays) -> Path:
    members = {"meta.json": np.frombuffer(json.dumps(meta or src.meta).encode(), "u1")}
    members |= {k: v for k, v in src.arrays().items() if k not in drop}
    members |= arrays
    with open(dst, "wb") as f:
        np.savez(f, **members)
    return dst


def test_load_errors(mixtral_trace, tmp_path):
    t = mixtral_trace
    bad = _rewrite(t, tmp_path / "v.npz", meta=dict(t.meta, version=2))
    with pytest.raises(FormatError, match=r"v\.npz: meta.json: version is 2, this mer"):
        Trace.load(bad)
    meta = dict(t.meta)
    del meta["arch"]
    bad = _rewrite(t, tmp_path / "f.npz", meta=meta)
    with pytest.raises(FormatError, match="field arch is missing"):
        Trace.load(bad)
    bad = _rewrite(t, tmp_path / "m.npz", drop=("probs",))
    with pytest.raises(FormatError, match="member probs is missing"):
        Trace.load(bad)
    wrong = t.probs[:, :, :3]
    bad = _rewrite(t, tmp_path / "s.npz", probs=wrong)
    with pytest.raises(FormatError, match=r"probs is float16\[\d+, 2, 3\], expected"):
        Trace.load(bad)
    bad = _rewrite(t, tmp_path / "e.npz", meta=dict(t.meta, format="x"))
    with pytest.raises(FormatError, match="format is 'x', expected 'mer-trace'"):
        Trace.load(bad)
    # a flipped byte inside a member: the zip's CRC-32 catches it
    data = bytearray(t.path.read_bytes())
    with zipfile.ZipFile(t.path) as z:
        info = z.getinfo("sketch.npy")
    data[info.header_offset + 30 + len("sketch.npy") + 200] ^= 0xFF
    (tmp_path / "c.npz").write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"c\.npz: corrupt or truncated"):
        Trace.load(tmp_path / "c.npz")
    (tmp_path / "t.npz").write_bytes(t.path.read_bytes()[: len(data) // 2])
    with pytest.raises(FormatError, match=r"t\.npz: corrupt or truncated"):
        Trace.load(tmp_path / "t.npz")
    (tmp_path / "x.npz").write_bytes(b"not a trace at all")
    with pytest.raises(FormatError, match="not a mer-trace file"):
        Trace.load(tmp_path / "x.npz")


def test_preview_is_next_layers_input_when_the_moe_adds_nothing(
    mixtral, mixtral_trace, tmp_path, monkeypatch
):
    """The attention preview of layer l+1 is exactly what layer l+1's MoE sees
    when layer l's MoE adds nothing (an independent check: the engine's own
    pass); with the real MoE it differs, and recording it perturbs nothing."""
    import mer_cli.runtime as runtime

    t = mixtral_trace
    assert t.meta["preview"] is True and t.preview_sketch.shape == t.sketch.shape
    assert not t.preview_sketch[:, -1].any() and not t.preview_probs[:, -1].any()
    off = trace(mixtral, PROMPTS, tmp_path / "o.npz", max_tokens=N_NEW,
                preview=False, progress=False)  # fmt: skip
    assert off.meta["preview"] is False and off.preview_sketch is None
    for name in ARRAYS:  # the preview's cache writes change nothing
        np.testing.assert_array_equal(getattr(off, name), getattr(t, name))
    assert not np.allclose(t.preview_sketch[:, 0], t.sketch[:, 1], atol=1e-2)
    real = runtime.moe_block

    def silent_layer0(arch, w, x, i, source, hint=None):
        y, ids, wts = real(arch, w, x, i, source, hint)
        return (np.zeros_like(y) if i == 0 else y), ids, wts

    monkeypatch.setattr(runtime, "moe_block", silent_layer0)
    z = trace(mixtral, PROMPTS, tmp_path / "z.npz", max_tokens=N_NEW, progress=False)
    np.testing.assert_array_equal(z.preview_sketch[:, 0], z.sketch[:, 1])
    np.testing.assert_array_equal(z.preview_probs[:, 0], z.probs[:, 1])


def test_preview_members_optional_and_checked(mixtral_trace, tmp_path):
    t = mixtral_trace
    meta = {k: v for k, v in t.meta.items() if k != "preview"}
    old = _rewrite(t, tmp_path / "old.npz", meta=meta,
                   drop=("preview_sketch", "preview_probs"))  # fmt: skip
    back = Trace.load(old)  # a trace from before the preview: no preview
    assert back.preview_sketch is None and "preview" not in back.meta
    m = merge([Trace.load(t.path), back])
    assert m.meta["preview"] is False and m.preview_probs is None
    m = merge([Trace.load(t.path), Trace.load(t.path)])
    assert m.preview_sketch.shape[0] == 2 * t.num_tokens
    bad = _rewrite(t, tmp_path / "m.npz", drop=("preview_probs",))
    with pytest.raises(FormatError, match="preview_probs is missing but preview"):
        Trace.load(bad)
    bad = _rewrite(t, tmp_path / "s.npz", preview_sketch=t.preview_sketch[:, :, :3])
    with pytest.raises(FormatError, match=r"preview_sketch is float16\[\d+, 2, 3\]"):
        Trace.load(bad)
    bad = _rewrite(t, tmp_path / "b.npz", meta=dict(t.meta, preview="yes"))
    with pytest.raises(FormatError, match="preview is 'yes', expected true or false"):
        Trace.load(bad)


def test_cli_trace_and_generate_trace_out_agree(mixtral, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    r = CliRunner().invoke(
        cli,
        ["trace", "--model", str(mixtral), "--prompts", str(tmp_path / "p.txt")]
        + ["-o", str(tmp_path / "a.npz"), "--max-tokens", "3", "-q"],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        cli,
        ["generate", "--model", str(mixtral), "--prompt", PROMPTS[0]]
        + ["--max-tokens", "3", "--trace-out", str(tmp_path / "g.npz")],
    )
    assert r.exit_code == 0, r.output
    a, g = Trace.load(tmp_path / "a.npz"), Trace.load(tmp_path / "g.npz")
    assert a.meta == g.meta and a.num_tokens > 3
    for name in [*ARRAYS, "preview_sketch", "preview_probs"]:
        np.testing.assert_array_equal(getattr(a, name), getattr(g, name))


def test_cli_errors(mixtral, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["trace", "--model", str(mixtral), "--prompts", str(tmp_path / "nope.txt")]
        + ["-o", str(tmp_path / "a.npz")],
    )
    assert r.exit_code == 2
    assert f"--prompts {tmp_path / 'nope.txt'}: no such file" in r.output
    assert not (tmp_path / "a.npz").exists()
    (tmp_path / "p.txt").write_text("hi\n")
    r = CliRunner().invoke(
        cli,
        ["trace", "--model", str(mixtral), "--prompts", str(tmp_path / "p.txt")]
        + ["-o", str(tmp_path / "a.npz"), "--sketch-dim", "0"],
    )
    assert r.exit_code == 2 and "--sketch-dim 0: expected" in r.output
