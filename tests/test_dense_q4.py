"""``mer quantize --dense q4``: 4-bit dense tensors from a checkpoint, run by the
engine (q4 embedding rows, q4 attention, shared expert and lm_head).

The GGUF side (Q4_0 dense tensors transcoded bit for bit, checked against gguf's
dequantization and against llama.cpp) is in ``tests/test_synth_gguf.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint
from naive_model import NaiveModel

from mer_cli.cli import cli
from mer_cli.formats import quant
from mer_cli.formats.safetensors import Checkpoint
from mer_cli.formats.store import Store
from mer_cli.models.layers import embed_rows
from mer_cli.quantize import quantize
from mer_cli.runtime import Engine

ROUTERS = ("gate.weight", "shared_expert_gate.weight")


def q4_round_trip(w: np.ndarray) -> np.ndarray:
    return quant.dequantize_q4(*quant.quantize_q4(np.asarray(w, np.float32)))


def dense_matrices(ck: Checkpoint) -> list[str]:
    """HF names of the 2-D tensors ``--dense`` applies to (not experts, routers)."""
    return [
        n
        for n in ck.where
        if len(ck.info(n).shape) == 2
        and ".experts." not in n
        and not n.endswith(ROUTERS)
    ]


@pytest.mark.parametrize(
    "arch,overrides",
    [("qwen2_moe", {}), ("mixtral", {"tie_word_embeddings": True})],
    ids=["qwen2_moe-shared-expert", "mixtral-tied"],
)
def test_dense_q4_store_runs_the_q4_weights(tmp_path, arch, overrides):
    ck_dir = make_hf_checkpoint(tmp_path / "ck", arch, **overrides)
    st = Store.open(
        quantize(ck_dir, tmp_path / "s.mer", experts="f32", dense="q4", progress=False)
    )
    assert st.manifest["quantization"]["dense"] == "q4"
    ck = Checkpoint(ck_dir)
    canon = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head"}
    for layer in range(st.model.num_layers):
        a = f"model.layers.{layer}.self_attn."
        canon[a + "q_proj.weight"] = f"layers.{layer}.q"
        canon[a + "o_proj.weight"] = f"layers.{layer}.o"
        assert st._dense_entry(f"layers.{layer}.router").dtype == "f32"
    checked = 0
    for name, c in canon.items():
        if st.has(c):  # no lm_head when tied
            assert st._dense_entry(c).dtype == "q4"
            np.testing.assert_array_equal(st.tensor_f32(c), q4_round_trip(ck.f32(name)))
            checked += 1
    assert checked >= 1 + 2 * st.model.num_layers

    # q4 embedding: only the requested rows, equal to the dequantized table's rows
    eng = Engine(st, ctx=64)
    assert isinstance(eng.embed, quant.QTensor) and eng.embed.dtype == "q4"
    ids = np.array([5, 0, 5, st.model.vocab_size - 1])
    np.testing.assert_array_equal(
        embed_rows(eng.embed, ids), st.tensor_f32("embed")[ids]
    )

    # reference: the numpy model with every dense matrix replaced by its q4
    # round trip (float64); the engine adds only int8 rounding of activations
    ref = NaiveModel(ck_dir)
    plain = NaiveModel(ck_dir)
    for name in dense_matrices(ck):
        ref._cache[name] = q4_round_trip(ck.f32(name)).astype(np.float64)
    prompt = np.random.default_rng(1).integers(0, st.model.vocab_size, 12)
    want, unquantized = ref.forward(prompt), plain.forward(prompt)
    got = eng.prefill(prompt, all_logits=True)
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err < 2e-2  # measured 1.1e-2 (qwen2_moe), 5.8e-3 (mixtral)
    # the reference really is the q4 model: q4 moved the logits more than that
    assert np.abs(unquantized - want).max() / scale > 2 * err


def test_cli_dense_q4_and_bad_choice(tmp_path):
    ck = make_hf_checkpoint(tmp_path / "ck", "olmoe", layers=1)
    out = tmp_path / "s.mer"
    r = CliRunner().invoke(cli, ["quantize", str(ck), "-o", str(out), "--dense", "q4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "dense q4" in r.output
    r = CliRunner().invoke(
        cli, ["quantize", str(ck), "-o", str(tmp_path / "t"), "--dense", "q3"]
    )
    assert r.exit_code == 2
    assert "'q3' is not one of 'q4', 'q8', 'f16', 'bf16', 'f32'" in r.output
