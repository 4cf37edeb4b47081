"""Self-checks of the committed transformers reference fixtures (no torch needed).

They guard the fixtures themselves: files present, shapes agreeing with
``config.json``, greedy tokens being the argmax of their logits, the routing
arrays agreeing with the documented routing rule of each architecture, and the
checkpoint using the per-expert tensor names that ``mer quantize`` reads.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from parity_fixtures import (
    PARITY_DIR,
    REFERENCE_ARRAYS,
    fixture_dirs,
    load_config,
    load_reference,
)

from mer_cli.formats.safetensors import SafetensorsFile
from mer_cli.models.config import SUPPORTED

DIRS = fixture_dirs()
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "reference.npz",
    "tokenizer.json",
    "tokenizer_config.json",
)
T = N = 16


def dims(cfg: dict) -> dict[str, int]:
    """V, L, E, K, F, D, H, KV, hd of a transformers config.json."""
    mt = cfg["model_type"]
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    F = (
        cfg["moe_intermediate_size"]
        if mt.startswith("qwen")
        else cfg["intermediate_size"]
    )
    H = cfg["num_attention_heads"]
    return dict(
        V=cfg["vocab_size"],
        L=cfg["num_hidden_layers"],
        E=E,
        K=cfg["num_experts_per_tok"],
        F=F,
        D=cfg["hidden_size"],
        H=H,
        KV=cfg["num_key_value_heads"],
        hd=cfg.get("head_dim") or cfg["hidden_size"] // H,
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_every_supported_architecture_has_a_fixture():
    archs = {load_config(d)["model_type"] for d in DIRS}
    assert archs == set(SUPPORTED), f"fixtures in {PARITY_DIR} cover {archs}"
    assert any(load_config(d).get("sliding_window") for d in DIRS)


def test_metadata_records_versions_and_seeds():
    meta = json.loads((PARITY_DIR / "fixtures.json").read_text())
    assert meta["torch"] and meta["transformers"]
    assert set(meta["fixtures"]) == {d.name for d in DIRS}
    for name, f in meta["fixtures"].items():
        assert isinstance(f["seed"], int), name
        assert f["checks"]["greedy_is_argmax"], name


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_files_present_and_small(d):
    missing = [f for f in FILES if not (d / f).is_file()]
    assert not missing, f"{d} lacks {missing}"
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size < 1_500_000, f"{d} is {size} bytes"


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_reference_shapes_match_config(d):
    ref = load_reference(d)
    n = dims(load_config(d))
    V, L, E, K = n["V"], n["L"], n["E"], n["K"]
    want = {
        "input_ids": (T,),
        "prompt_logits": (T, V),
        "greedy_tokens": (N,),
        "decode_logits": (N, V),
        "routing": (L, T, K),
        "routing_weights": (L, T, K),
        "router_logits": (L, T, E),
        "decode_routing": (L, N - 1, K),
    }
    for name, (dtype, _legend) in REFERENCE_ARRAYS.items():
        assert ref[name].dtype == np.dtype(dtype), name
        assert ref[name].shape == want[name], name
    for name in ("input_ids", "greedy_tokens"):
        assert ref[name].min() >= 0 and ref[name].max() < V, name
    for name in ("routing", "decode_routing"):
        r = ref[name]
        assert r.min() >= 0 and r.max() < E, name
        # K distinct experts per token
        assert (np.sort(r, -1)[..., 1:] != np.sort(r, -1)[..., :-1]).all(), name
    for name in ("prompt_logits", "decode_logits"):
        assert np.isfinite(ref[name]).all() and ref[name].std() > 0.5, name


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_greedy_tokens_are_argmax_of_decode_logits(d):
    ref = load_reference(d)
    assert np.array_equal(ref["decode_logits"].argmax(-1), ref["greedy_tokens"])
    # The first greedy token is chosen at the prompt's last position.
    np.testing.assert_allclose(
        ref["decode_logits"][0], ref["prompt_logits"][-1], rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_routing_follows_the_architecture_rule(d):
    """routing/routing_weights re-derived from router_logits in numpy."""
    cfg, ref = load_config(d), load_reference(d)
    K = cfg["num_experts_per_tok"]
    logits = ref["router_logits"].astype(np.float64)  # [L, T, E]
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :K]
    assert np.array_equal(order, ref["routing"])
    top = np.take_along_axis(logits, order, -1)
    if cfg["model_type"] == "mixtral":
        w = softmax(top)  # softmax over the top-k logits
    else:
        w = np.take_along_axis(softmax(logits), order, -1)  # softmax, then top-k
        if cfg["norm_topk_prob"]:
            w = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref["routing_weights"], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_prompt_is_the_tokenizer_encoding_of_prompt_text(d):
    from tokenizers import Tokenizer

    ref = load_reference(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.encode(ref["prompt_text"]).ids == ref["input_ids"].tolist()
    assert tok.get_vocab_size() <= load_config(d)["vocab_size"]


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_checkpoint_uses_per_expert_names(d):
    cfg = load_config(d)
    n = dims(cfg)
    D, F, E, L = n["D"], n["F"], n["E"], n["L"]
    tensors = SafetensorsFile(d / "model.safetensors").tensors
    assert {t.dtype for t in tensors.values()} == {"F32"}
    if cfg["model_type"] == "mixtral":
        pat = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"
        down = "w2"
        router = "model.layers.{}.block_sparse_moe.gate.weight"
    else:
        pat = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight"
        down = "down"
        router = "model.layers.{}.mlp.gate.weight"
    experts = [nm for nm in tensors if ".experts." in nm]
    found = set()
    for nm in experts:
        m = re.fullmatch(pat, nm)
        assert m, f"{nm} is not a per-expert name"
        layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        found.add((layer, e, proj))
        assert tensors[nm].shape == ((D, F) if proj == down else (F, D)), nm
    assert len(found) == L * E * 3
    for layer in range(L):
        assert tensors[router.format(layer)].shape == (E, D)
    assert tensors["model.embed_tokens.weight"].shape == (n["V"], D)
    assert tensors["lm_head.weight"].shape == (n["V"], D)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (n["H"] * n["hd"], D)
