"""Continuous batching (``mer generate --batch N``): every prompt's result equals
its own single-sequence run (greedy and seeded sampling, sequences finishing at
different steps by length, stop string and context, resident and streamed
experts); a batched step's logits are bit-identical to one-token steps; expert
reads are shared (fewer bytes read per token than batch 1); the KV budget
bounds the sequences in flight; the CLI and its errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli import kernels as K
from mer_cli.batch import BatchGeneration, decode_step_batch, kv_bytes_per_position
from mer_cli.cli import cli
from mer_cli.errors import ResourceError, UsageError
from mer_cli.formats import quant
from mer_cli.generate import Completion, GenerateOptions, load
from mer_cli.models.layers import KVCache
from mer_cli.quantize import quantize
from mer_cli.streaming import StreamedExperts

# different lengths; with CTX the 30-byte one runs out of context mid-way
PROMPTS = (
    "a",
    "Hello there",
    "The quick brown fox jumps over",
    "x" * 30,
    "1 2 3 4 5 6",
    "zz top",
    "Once upon a time",
)
CTX = 38
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Tiny Mixtral (q4 experts, q8 dense; f32 routers) and Qwen2-MoE (f16
    dense: float products everywhere, a gated shared expert, q/k/v biases)."""
    d = tmp_path_factory.mktemp("batch")
    mix = make_hf_checkpoint(d / "mix", "mixtral", seed=5)
    qw = make_hf_checkpoint(d / "qw", "qwen2_moe", seed=6)
    return {
        "mixtral": quantize(
            mix, d / "mix.mer", experts="q4", dense="q8", progress=False
        ),
        "qwen2_moe": quantize(
            qw, d / "qw.mer", experts="q4", dense="f16", progress=False
        ),
    }


def open_engine(store: Path, kind: str, slots: int = 2, prefetch: bool = True):
    if kind == "resident":
        return load(store, ctx=CTX)

    def streamed(st):
        return StreamedExperts(st, slots * st.extent_nbytes, prefetch=prefetch)

    return load(store, ctx=CTX, source=streamed)


def single_runs(store: Path, kind: str, options: GenerateOptions):
    eng, tok = open_engine(store, kind)
    try:
        return [Completion(eng, tok, p, options).run() for p in PROMPTS]
    finally:
        eng.close()


def batch_run(store, kind, options, batch, kv_budget=None, prompts=PROMPTS, **kw):
    eng, tok = open_engine(store, kind, **kw)
    try:
        run = BatchGeneration(eng, tok, prompts, options, batch, kv_budget)
        return list(run), run.stats.as_dict()
    finally:
        eng.close()


def outcome(r) -> tuple:
    return (
        r.prompt,
        r.completion,
        r.prompt_tokens,
        r.completion_tokens,
        r.finish_reason,
    )


@pytest.fixture(scope="module")
def stop_options(stores) -> GenerateOptions:
    """Greedy options whose stop strings end two prompts early, at different
    steps: characters of the plain runs' texts that no other text contains."""
    plain = single_runs(stores["mixtral"], "resident", GenerateOptions(MAX_TOKENS))
    texts = [r.completion for r in plain]
    stops = []
    for j, t in enumerate(texts):
        others = [u for k, u in enumerate(texts) if k != j]
        piece = next(
            (
                c
                for c in t[2 + len(stops) :]
                if c != "\ufffd" and not any(c in u for u in others)
            ),
            None,
        )
        if piece is not None and plain[j].finish_reason == "length":
            stops.append(piece)
        if len(stops) == 2:
            break
    assert len(stops) == 2, texts
    return GenerateOptions(max_tokens=MAX_TOKENS, stop=tuple(stops))


@pytest.fixture(scope="module")
def references(stores, stop_options) -> dict:
    return {
        kind: single_runs(stores["mixtral"], kind, stop_options)
        for kind in ("resident", "streamed")
    }


def test_reference_runs_finish_at_different_steps(references):
    ref = references["resident"]
    reasons = {r.finish_reason for r in ref}
    assert {"length", "stop", "context"} <= reasons, reasons
    assert len({r.completion_tokens for r in ref}) >= 3
    assert [outcome(r) for r in references["streamed"]] == [outcome(r) for r in ref]


@pytest.mark.parametrize("kind", ["resident", "streamed"])
@pytest.mark.parametrize("batch", [2, 4])
def test_batch_equals_single_runs(stores, stop_options, references, kind, batch):
    results, stats = batch_run(stores["mixtral"], kind, stop_options, batch)
    assert [outcome(r) for r in results] == [outcome(r) for r in references[kind]]
    assert stats["prompts"] == len(PROMPTS)
    assert 1 < stats["mean_batch"] <= batch
    # the rows of a step share one fetch per (layer, expert)
    assert stats["expert_fetches"] < stats["expert_fetches_unshared"]
    for r in results:
        assert r.stats["batch"] == batch
        kv = r.stats["kv_cache"]
        assert kv["ctx"] == min(CTX, r.prompt_tokens + MAX_TOKENS - 1)


def test_float_dense_shared_expert_model_equals_single_runs(stores):
    """f16 dense matrices and f32 routers/shared-expert gate (BLAS products)."""
    opts = GenerateOptions(max_tokens=8)
    ref = single_runs(stores["qwen2_moe"], "resident", opts)
    results, _ = batch_run(stores["qwen2_moe"], "resident", opts, 4)
    assert [outcome(r) for r in results] == [outcome(r) for r in ref]


def test_seeded_sampling_equals_single_runs(stores):
    """Each sequence has its own sampler seeded like a single run's."""
    opts = GenerateOptions(max_tokens=8, temperature=0.9, top_k=40, seed=11)
    ref = single_runs(stores["mixtral"], "resident", opts)
    results, _ = batch_run(stores["mixtral"], "resident", opts, 3)
    assert [outcome(r) for r in results] == [outcome(r) for r in ref]
    assert all(r.stats["seed"] == 11 for r in results)


def test_interrupted_run_keeps_what_was_generated(stores, stop_options, references):
    eng, tok = open_engine(stores["mixtral"], "resident")
    try:
        run = BatchGeneration(eng, tok, PROMPTS, stop_options, 4)
        it = iter(run)
        first = next(it)
        it.close()  # as Ctrl-C does to the consumer
        rest = run.unfinished()
    finally:
        eng.close()
    ref = references["resident"]
    assert outcome(first) == outcome(ref[0])
    assert [r.prompt for r in rest] == list(PROMPTS[1 : 1 + len(rest)])
    cut = [r for r in rest if r.finish_reason == "interrupted"]
    assert cut, [r.finish_reason for r in rest]
    for r in rest:
        full = ref[PROMPTS.index(r.prompt)]
        if r.finish_reason == "interrupted":
            assert r.completion_tokens < full.completion_tokens
            assert full.completion.startswith(r.completion)
        else:
            assert outcome(r) == outcome(full)
    assert run.unfinished() == []


def test_max_tokens_zero(stores):
    opts = GenerateOptions(max_tokens=0)
    ref = single_runs(stores["mixtral"], "resident", opts)
    results, stats = batch_run(stores["mixtral"], "resident", opts, 4)
    assert [outcome(r) for r in results] == [outcome(r) for r in ref]
    assert stats["steps"] == 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_step_rows_bit_identical_to_single_steps(stores, arch):
    """decode_step_batch row b == Engine.decode_step on sequence b's cache,
    bit for bit, for sequences at different positions."""
    eng, _ = load(stores[arch], ctx=CTX)
    rng = np.random.default_rng(0)
    try:
        caches = []
        for n in (1, 4, 9, 17):
            c = KVCache(eng.cfg, CTX)
            eng.cache = c
            eng.prefill(rng.integers(0, 256, n).tolist())
            caches.append(c)
        for step in range(2):  # successive steps keep matching
            nxt = rng.integers(0, 256, len(caches)).tolist()
            ref = []
            for c, t in zip(copy.deepcopy(caches), nxt):
                eng.cache = c
                ref.append(eng.decode_step(t))
            logits, fetches = decode_step_batch(eng, nxt, caches)
            for b in range(len(nxt)):
                assert np.array_equal(logits[b], ref[b]), (arch, step, b)
            assert [c.length for c in caches] == [n + step + 1 for n in (1, 4, 9, 17)]
            assert 0 < fetches <= eng.cfg.num_layers * eng.cfg.num_experts
    finally:
        eng.close()


@pytest.mark.parametrize("path", K.supported_paths())
@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_quantized_rows_identical_at_mixtral_width(dtype, path):
    """Row t of a q4/q8 product over up to ROW_INVARIANT_ROWS rows equals the
    one-row product at a width whose column blocks once depended on the row
    count (14336 = Mixtral's expert ffn; the tiny models above have 1 block)."""
    rng = np.random.default_rng(3)
    C = 14336
    w = rng.standard_normal((12, C)).astype(np.float32)
    p, sc = quant.quantize_q4(w) if dtype == "q4" else quant.quantize_q8(w)
    W = quant.QTensor(dtype, p, sc)
    x = rng.standard_normal((K.ROW_INVARIANT_ROWS, C)).astype(np.float32)
    alone = np.concatenate(
        [K.linear(W, x[i : i + 1], path=path) for i in range(len(x))]
    )
    for T in (2, 4, 7, 9, 16, K.ROW_INVARIANT_ROWS):
        assert np.array_equal(K.linear(W, x[:T], path=path), alone[:T]), T


def test_shared_reads_cut_bytes_per_token(stores):
    """One slot, no prefetch: every fetch is a read, so bytes read per token are
    the fetches' extents; with 4 in flight a read serves several tokens."""
    opts = GenerateOptions(max_tokens=6)
    ext = quantize_extent(stores["mixtral"])
    kw = {"slots": 1, "prefetch": False, "prompts": PROMPTS[:4]}
    one, s1 = batch_run(stores["mixtral"], "streamed", opts, 1, **kw)
    four, s4 = batch_run(stores["mixtral"], "streamed", opts, 4, **kw)
    assert [outcome(r) for r in four] == [outcome(r) for r in one]
    for s in (s1, s4):
        assert s["decode_bytes_read"] == s["expert_fetches"] * ext
    assert s1["expert_fetches"] == s1["expert_fetches_unshared"]  # nothing shared
    assert s1["decode_tokens"] == s4["decode_tokens"]
    assert s4["decode_bytes_read_per_token"] < 0.8 * s1["decode_bytes_read_per_token"]


def quantize_extent(store: Path) -> int:
    from mer_cli.formats.store import Store

    return Store.open(store).extent_nbytes


def test_kv_budget_bounds_sequences_in_flight(stores, stop_options, references):
    eng, tok = load(stores["mixtral"], ctx=CTX)
    per = kv_bytes_per_position(eng.cfg, "f32")
    eng.close()
    budget = 2 * CTX * per  # room for two of the longest
    results, stats = batch_run(stores["mixtral"], "resident", stop_options, 4, budget)
    assert [outcome(r) for r in results] == [outcome(r) for r in references["resident"]]
    assert stats["kv_cache"]["budget"] == budget
    assert 0 < stats["kv_cache"]["peak_nbytes"] <= budget
    assert stats["mean_batch"] <= 4
    with pytest.raises(ResourceError, match="--kv-budget .* smaller than the KV cache"):
        batch_run(stores["mixtral"], "resident", stop_options, 4, CTX * per - 1)


def test_kv_caches_must_fit_in_memory(stores, monkeypatch):
    import mer_cli.batch

    monkeypatch.setattr(mer_cli.batch, "available_memory", lambda: 1000)
    with pytest.raises(ResourceError, match="KV caches of up to 4 sequences need"):
        batch_run(stores["mixtral"], "resident", GenerateOptions(), 4)


def test_batch_size_out_of_range(stores):
    eng, tok = load(stores["mixtral"], ctx=CTX)
    try:
        with pytest.raises(UsageError, match="--batch 0: expected"):
            BatchGeneration(eng, tok, PROMPTS, GenerateOptions(), 0)
    finally:
        eng.close()
    eng, tok = load(stores["qwen2_moe"], ctx=CTX)  # no BOS: "" has no tokens
    try:
        with pytest.raises(UsageError, match="prompt 2 is empty"):
            BatchGeneration(eng, tok, ["a", ""], GenerateOptions(), 2)
    finally:
        eng.close()


# ---------------------------------------------------------------- CLI


def mer(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("batchcli") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in PROMPTS))
    return p


def test_cli_batch_json_equals_single(stores, prompts_file):
    common = ["generate", "--model", str(stores["mixtral"]), "--prompts-file",
              str(prompts_file), "--max-tokens", "6", "--ctx", str(CTX), "--json"]  # fmt: skip
    single = mer(*common)
    batched = mer(*common, "--batch", "3", "--stats", "--stream", "--ram-budget",
                  "64KiB")  # fmt: skip
    assert single.exit_code == 0, single.output
    assert batched.exit_code == 0, batched.stderr
    a = [json.loads(x) for x in single.stdout.splitlines()]
    b = [json.loads(x) for x in batched.stdout.splitlines()]
    keys = (
        "prompt",
        "completion",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
    )
    assert [[d[k] for k in keys] for d in b] == [[d[k] for k in keys] for d in a]
    assert [d["prompt"] for d in b] == list(PROMPTS)  # input order
    assert all(d["stats"]["batch"] == 3 and d["stats"]["kv_cache"]["nbytes"] for d in b)
    assert all(d["stats"]["expert_cache_nbytes"] == 64 * 1024 for d in b)
    err = batched.stderr
    assert "batch 3: 7 prompts" in err and "tok/s" in err
    assert "read from the drive" in err and "KV caches" in err and "(streamed)" in err


def test_cli_batch_text_in_input_order(stores, tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("".join(p + "\n" for p in PROMPTS[:4]))
    common = ["generate", "--model", str(stores["mixtral"]), "--prompts-file",
              str(lines), "--max-tokens", "5"]  # fmt: skip
    single, batched = mer(*common), mer(*common, "--batch", "4")
    assert single.exit_code == 0 and batched.exit_code == 0, batched.output
    assert batched.stdout == single.stdout
    assert batched.stdout.count("\n") >= 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "--batch 0: expected a whole number in 1..32"),
        (["--batch", "33"], "--batch 33: expected"),
        (["--kv-budget", "1MiB"], "--kv-budget only applies with --batch"),
        (["--batch", "2", "--trace-out", "t.npz"], "--trace-out records one sequence"),
    ],
)
def test_cli_usage_errors(stores, prompts_file, extra, message):
    r = mer("generate", "--model", str(stores["mixtral"]), "--prompts-file",
            str(prompts_file), *extra)  # fmt: skip
    assert r.exit_code == 2, r.output
    assert message in r.stderr


def test_cli_kv_budget_too_small(stores, prompts_file):
    r = mer("generate", "--model", str(stores["mixtral"]), "--prompts-file",
            str(prompts_file), "--batch", "2", "--kv-budget", "1KiB")  # fmt: skip
    assert r.exit_code == 1
    assert "--kv-budget 1.0 KiB" in r.stderr and "raise --kv-budget" in r.stderr
