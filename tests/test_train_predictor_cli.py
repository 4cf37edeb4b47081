"""``mer train-predictor``: the report's figures against an independent
computation on the same held-out split, the file it writes, the picture, and
its error paths (exit code and message)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_predictors import chain_trace

from mer_cli.cache import simulate_belady, simulate_lru
from mer_cli.cli import cli
from mer_cli.predictors import load_predictor, multi_hot
from mer_cli.train_predictor import split_by_prompt, subset


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    t = chain_trace(P=10, T=24, L=4, E=6)
    return t.save(tmp_path_factory.mktemp("t") / "chain.npz")


def run(*args: str):
    return CliRunner().invoke(cli, ["train-predictor", *args])


def test_report_and_predictor(trace_file, tmp_path):
    out = tmp_path / "p.npz"
    r = run(str(trace_file), "-o", str(out), "--json", "-q", "--holdout", "0.3")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    from mer_cli.formats.trace import Trace

    t = Trace.load(trace_file)
    train_mask, test_mask = split_by_prompt(t, 0.3, 0)
    test = subset(t, test_mask)
    assert rep["test_tokens"] == int(test_mask.sum()) == test.num_tokens
    assert rep["test_prompts"] == 3 and rep["train_prompts"] == 7
    # the chain is a function of the two previous layers: Markov is exact;
    # frequency recall recomputed by hand from the training tokens
    assert rep["quality"]["markov"]["1"]["recall"] == [1.0, 1.0, 1.0]
    X = multi_hot(t.experts, 6)
    freq = X[train_mask].mean(0)  # [L, E]
    hits = count = 0
    for n in np.flatnonzero(test_mask):
        for layer in range(3):
            top = int(np.argsort(-freq[layer + 1], kind="stable")[0])
            hits += int(X[n, layer + 1, top])
            count += 1
    assert rep["quality"]["frequency"]["1"]["recall"][0] == pytest.approx(hits / count)
    # hit rates: LRU and MIN on the held-out request sequence, by hand
    reqs = [
        layer * 6 + int(e)
        for n in np.flatnonzero(test_mask)
        for layer in range(4)
        for e in t.experts[n, layer]
    ]
    rows = {row["budget"]: row for row in rep["hit_rates"]}
    assert sorted(rows) == [0.1, 0.25, 0.5]
    assert rows[0.25]["slots"] == 6
    assert rows[0.25]["lru"] == pytest.approx(simulate_lru(reqs, 6))
    assert rows[0.25]["belady"] == pytest.approx(simulate_belady(reqs, 6))
    for row in rep["hit_rates"]:
        for name in ("lru", "policy", "policy+markov", "policy+mlp"):
            assert 0 <= row[name] <= row["belady"] + 1e-12
    # the better predictor one layer ahead was saved
    assert rep["chosen"] == "markov"
    p = load_predictor(out)
    assert p.kind == "markov" and p.max_distance == 3
    assert p.meta["training"]["holdout_recall_at_k"] == [1.0, 1.0, 1.0]
    # the table
    r = run(str(trace_file), "-o", str(out), "-q", "--kind", "mlp", "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert "markov       1     100.0%" in r.output
    assert "saved predictor is mlp" in r.output
    assert load_predictor(out).kind == "mlp"


def test_plot(trace_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = run(str(trace_file), "-o", str(tmp_path / "p.npz"), "-q", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in r.output


def test_errors(trace_file, tmp_path):
    out = tmp_path / "p.npz"
    r = run(str(tmp_path / "nope.npz"), "-o", str(out))
    assert r.exit_code == 2 and "no such trace file" in r.output
    r = run(str(trace_file), "-o", str(out), "--budgets", "10,abc")
    assert r.exit_code == 2 and "'abc' is not a percentage" in r.output
    r = run(str(trace_file), "-o", str(out), "--holdout", "1.5")
    assert r.exit_code == 2 and "--holdout 1.5: expected a share" in r.output
    r = run(str(trace_file), "-o", str(out), "--distance", "4")
    assert r.exit_code == 2 and "--distance 4: expected 1..3" in r.output
    one = chain_trace(P=1, T=10).save(tmp_path / "one.npz")
    r = run(str(one), "-o", str(out))
    assert r.exit_code == 2 and "holds 1 prompt(s); a held-out split" in r.output
    (tmp_path / "bad.npz").write_bytes(b"junk")
    r = run(str(tmp_path / "bad.npz"), "-o", str(out))
    assert r.exit_code == 1 and "not a mer-trace file" in r.output
    assert not out.exists()


def test_interrupt_leaves_old_predictor(trace_file, tmp_path, monkeypatch):
    """Ctrl-C while training: PRED keeps what it held, no temp file is left."""
    out = tmp_path / "p.npz"
    assert run(str(trace_file), "-o", str(out), "-q", "--kind", "markov").exit_code == 0
    before = out.read_bytes()
    import mer_cli.train_predictor as tp

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tp, "fit_mlp", interrupted)
    r = run(str(trace_file), "-o", str(out), "-q")
    assert r.exit_code == 130 and "Interrupted" in r.output
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]


def test_model_adds_router_input_mlp(tmp_path):
    """--model: the MLP that also takes the router lookahead; its routers are
    the store's, and live scoring from hidden states matches the report's."""
    from conftest import make_hf_checkpoint

    from mer_cli.quantize import quantize
    from mer_cli.trace import trace

    ck = make_hf_checkpoint(tmp_path / "ck", "mixtral", layers=3)
    store = quantize(ck, tmp_path / "s.mer", experts="f32", dense="f32", progress=False)
    prompts = [f"the cat {i} sat" for i in range(6)]
    t = trace(store, prompts, tmp_path / "t.npz", max_tokens=4, progress=False)
    out = tmp_path / "p.npz"
    r = run(str(t.path), "-o", str(out), "-q", "--json", "--model", str(store),
            "--kind", "mlp+router", "--epochs", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    names = {"router", "preview", "frequency", "markov", "mlp", "mlp+router"}
    assert set(rep["quality"]) == names
    assert "policy+mlp+router" in rep["hit_rates"][0]
    p = load_predictor(out, store)
    assert p.router_inputs and p.arrays["routers"].shape == (3, 4, 64)
    from mer_cli.formats.store import Store

    want = Store.open(store).tensor_f32("layers.2.router")
    np.testing.assert_array_equal(p.arrays["routers"][2], want)
    # errors: no --model for mlp+router; another store; a trace without lookahead
    r = run(str(t.path), "-o", str(out), "--kind", "mlp+router")
    assert r.exit_code == 2 and "--kind mlp+router needs --model STORE" in r.output
    other = make_hf_checkpoint(tmp_path / "ck2", "mixtral", layers=3, seed=4)
    other = quantize(other, tmp_path / "o.mer", experts="f32", dense="f32",
                     progress=False)  # fmt: skip
    r = run(str(t.path), "-o", str(out), "--model", str(other))
    assert r.exit_code == 2 and "but the traces were recorded from store" in r.output
    bare = trace(store, prompts, tmp_path / "b.npz", max_tokens=2, lookahead=0,
                 progress=False)  # fmt: skip
    r = run(str(bare.path), "-o", str(out), "--model", str(store))
    assert r.exit_code == 2 and "record no router lookahead" in r.output
