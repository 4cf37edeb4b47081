"""Text in, text out: sampling, streaming detokenization, stop strings, EOS, the
``mer generate`` command (JSON shape, error paths) and its behaviour in
pipelines (``| head``, Ctrl-C) as a real subprocess."""

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
from conftest import EOS, default_sigint, make_hf_checkpoint

from mer_cli.cli import cli
from mer_cli.generate import (
    Completion,
    GenerateOptions,
    _StopMatcher,
    generate,
    load,
    read_prompts,
)
from mer_cli.quantize import quantize
from mer_cli.sampling import Sampler, SamplingOptions
from mer_cli.text import Tokenizer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tiny Mixtral store (q8 dense, q4 experts) with BOS, EOS and a chat
    template."""
    d = tmp_path_factory.mktemp("gen")
    ck = make_hf_checkpoint(d / "ck", "mixtral", seed=3)
    return quantize(ck, d / "tiny.mer", experts="q4", dense="q8", progress=False)


@pytest.fixture(scope="module")
def model(store):
    return load(store, ctx=256)


def _edit_manifest(src: Path, dst: Path, **tokenizer) -> Path:
    """A copy of store ``src`` at ``dst`` with fields of its tokenizer table
    replaced (the data files are linked, not copied)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, dst / f.name)
    m = json.loads((src / "manifest.json").read_text())
    m["tokenizer"].update(tokenizer)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


# ------------------------------------------------------------------ sampling


def test_greedy_is_argmax_and_filters_reduce_to_it():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        best = int(np.argmax(logits))
        assert Sampler(SamplingOptions())(logits) == best
        assert (
            Sampler(SamplingOptions(temperature=2.0, top_k=1, seed=1))(logits) == best
        )
        assert (
            Sampler(SamplingOptions(temperature=2.0, top_p=1e-6, seed=1))(logits)
            == best
        )


def test_sampling_follows_the_filtered_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))
    n = 6000
    s = Sampler(SamplingOptions(temperature=1.0, seed=7))
    counts = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    # top-p 0.7: the smallest prefix reaching 0.7 is {0, 1}, renormalized
    s = Sampler(SamplingOptions(temperature=1.0, top_p=0.7, seed=7))
    counts = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(counts, [2 / 3, 1 / 3, 0, 0], atol=0.03)
    # top-k 3, temperature 0.5 squares the probabilities
    s = Sampler(SamplingOptions(temperature=0.5, top_k=3, seed=7))
    counts = np.bincount([s(logits) for _ in range(n)], minlength=4) / n
    p = np.array([0.25, 0.0625, 0.0225, 0])
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)


def test_same_seed_same_draws():
    logits = np.random.default_rng(1).standard_normal(100)
    a = Sampler(SamplingOptions(temperature=1.0, seed=5))
    b = Sampler(SamplingOptions(temperature=1.0, seed=5))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]


# ------------------------------------------------------------------ text


def test_stream_decoder_emits_only_complete_utf8(model):
    _, tok = model
    text = "héllo wörld ✓ 🙂 ok"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte
    dec = tok.decoder(tok.encode("prefix "))
    pieces = [dec.push(t) for t in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # the 4-byte emoji arrives as one piece, after its last byte
    assert "🙂" in pieces


def test_bos_added_once(model):
    _, tok = model
    assert tok.bos_token_id == 256 and tok.add_bos_token
    ids = tok.encode("hi")
    assert ids[0] == 256 and len(ids) == 3 and 256 not in ids[1:]
    assert tok.encode("<s>hi") == ids  # template text that starts with BOS


def test_stop_matcher_holds_back_partial_stop():
    m = _StopMatcher(["END"])
    assert m.feed("abcE") == ("abc", False)  # "E" may start "END"
    assert m.feed("N") == ("", False)
    assert m.feed("Dxyz") == ("", True)
    m = _StopMatcher(["END"])
    assert m.feed("abE") == ("ab", False)
    assert m.feed("x") == ("Ex", False)  # not a stop after all
    assert m.feed("tail", final=True) == ("tail", False)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("one\n\ntwo two\n")
    assert read_prompts(p) == ["one", "two two"]
    p.write_text('{"prompt": "a"}\n{"prompt": "b\\nc", "id": 2}\n')
    assert read_prompts(p) == ["a", "b\nc"]
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(Exception, match="line 2 has no string field 'prompt'"):
        read_prompts(p)


# ------------------------------------------------------------------ generation


def test_same_seed_same_text_and_pieces_add_up(model):
    engine, tok = model
    o = GenerateOptions(max_tokens=24, temperature=1.0, seed=11)
    c = Completion(engine, tok, "Once upon", o)
    pieces = list(c)
    assert "".join(pieces) == c.result.completion
    again = generate(engine, tok, "Once upon", o)
    assert again.completion == c.result.completion
    other = generate(engine, tok, "Once upon", GenerateOptions(24, 1.0, seed=12))
    assert other.completion != c.result.completion
    assert c.result.completion_tokens == 24 and c.result.finish_reason == "length"


def test_greedy_matches_engine_argmax(model):
    engine, tok = model
    r = Completion(engine, tok, "abc", GenerateOptions(max_tokens=8))
    r.run()
    engine.reset()
    ids = tok.encode("abc")
    logits = engine.prefill(ids)
    want = []
    for _ in range(8):
        t = int(np.argmax(logits))
        want.append(t)
        logits = engine.decode_step(t)
    assert r.tokens == want
    assert r.result.prompt_tokens == len(ids)


def test_stop_string_cuts_the_text(model):
    engine, tok = model
    full = generate(engine, tok, "The end", GenerateOptions(max_tokens=40)).completion
    assert len(full) > 6
    stop = full[4:6]
    want = full[: full.find(stop)]
    r = Completion(engine, tok, "The end", GenerateOptions(max_tokens=40, stop=(stop,)))
    streamed = "".join(r)
    assert streamed == r.result.completion == want
    assert r.result.finish_reason == "stop"


def test_eos_stops(model):
    engine, tok = model
    free = Completion(engine, tok, "xyz", GenerateOptions(max_tokens=6))
    free.run()
    eos = free.tokens[3]
    first = free.tokens.index(eos)
    t2 = Tokenizer(tok.tok, bos_token_id=256, eos_token_ids=[eos], add_bos_token=True)
    c = Completion(engine, t2, "xyz", GenerateOptions(max_tokens=6))
    c.run()
    assert c.result.finish_reason == "eos"
    assert c.tokens == free.tokens[:first]
    assert c.result.completion_tokens == first


def test_context_full_ends_generation(store):
    engine, tok = load(store, ctx=12)
    r = generate(engine, tok, "abc", GenerateOptions(max_tokens=100))
    assert r.finish_reason == "context"
    assert r.prompt_tokens + r.completion_tokens == 13  # last token is sampled
    assert engine.pos == 12


# ------------------------------------------------------------------ CLI


def test_cli_json_shape(store, tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "Hello"}\n{"prompt": "Bye"}\n')
    r = run_cli(
        "generate", "--model", str(store), "--prompts-file", str(pf), "--json",
        "--max-tokens", "5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "Bye"]
    for x in lines:
        assert set(x) == {
            "prompt",
            "completion",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "stats",
        }
        assert x["completion_tokens"] == 5 and x["finish_reason"] == "length"
        assert x["prompt_tokens"] == 1 + len(x["prompt"])  # BOS + bytes
        s = x["stats"]
        assert s["prefill_tokens"] == x["prompt_tokens"]
        assert s["decode_tokens"] == 4  # the first token comes from the prefill
        assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0
        assert s["time_to_first_token_s"] > 0
        assert s["source"]["source"] == "resident"


def test_cli_text_stdin_seed_and_stats(store):
    args = ["generate", "--model", str(store), "--prompt", "-", "--max-tokens", "12"]
    a = run_cli(*args, "--temperature", "0.9", "--seed", "3", "--stats", input="Hi\n")
    b = run_cli(*args, "--temperature", "0.9", "--seed", "3", input="Hi")
    assert a.exit_code == 0 and b.exit_code == 0
    assert a.stdout == b.stdout and a.stdout.endswith("\n")
    assert "prefill" in a.stderr and "tok/s" in a.stderr and "first token" in a.stderr
    engine, tok = load(store)
    want = generate(engine, tok, "Hi", GenerateOptions(12, 0.9, seed=3)).completion
    assert a.stdout == want + "\n"


def test_cli_chat_uses_template(store):
    r = run_cli(
        "generate", "--model", str(store), "--prompt", "Hi", "--chat", "--json",
        "--max-tokens", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    x = json.loads(r.stdout)
    # "<s>[INST] Hi [/INST]" -> BOS + 17 bytes
    assert x["prompt_tokens"] == 1 + len("[INST] Hi [/INST]")


def test_cli_errors(store, tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.exit_code == 1 and "no such store" in r.stderr
    r = run_cli("generate", "--model", str(store))
    assert r.exit_code == 2 and "exactly one of --prompt" in r.stderr
    bare = _edit_manifest(store, tmp_path / "bare.mer", chat_template=None)
    r = run_cli("generate", "--model", str(bare), "--prompt", "x", "--chat")
    assert r.exit_code == 2 and "has no chat template" in r.stderr
    r = run_cli("generate", "--model", str(store), "--prompt", "x" * 40, "--ctx", "16")
    assert r.exit_code == 1 and "context is full" in r.stderr and "--ctx 16" in r.stderr
    r = run_cli("generate", "--model", str(store), "--prompt", "x", "--ctx", "100000")
    assert r.exit_code == 2 and "max_position" in r.stderr
    r = run_cli("generate", "--model", str(store), "--prompt", "x", "--top-p", "0")
    assert r.exit_code == 2 and "--top-p" in r.stderr
    r = run_cli("generate", "--model", str(store), "--prompt", "x", "--threads", "0")
    assert r.exit_code == 2 and "--threads 0" in r.stderr
    cfg = tmp_path / "none.toml"
    r = run_cli(
        "generate", "--model", str(store), "--prompt", "x", "--config", str(cfg)
    )
    assert r.exit_code == 1 and "configuration file not found" in r.stderr


def test_cli_threads_and_config(store, tmp_path):
    from mer_cli import kernels

    cfg = tmp_path / "mer.toml"
    cfg.write_text("threads = 1\n")
    args = ["generate", "--model", str(store), "--prompt", "ab", "--max-tokens", "3"]
    before = kernels.get_threads()
    try:
        r = run_cli(*args, "--config", str(cfg))
        assert r.exit_code == 0 and kernels.get_threads() == 1
        r = run_cli(*args, "--threads", "2")
        assert r.exit_code == 0 and kernels.get_threads() == min(2, before)
    finally:
        kernels.set_threads(before)


def test_cli_eos_from_manifest(store, tmp_path):
    engine, tok = load(store)
    free = Completion(engine, tok, "q", GenerateOptions(max_tokens=5))
    free.run()
    eos = free.tokens[2]
    st = _edit_manifest(store, tmp_path / "eos.mer", eos_token_ids=[EOS, eos])
    r = run_cli(
        "generate", "--model", str(st), "--prompt", "q", "--json", "--max-tokens", "5"
    )
    x = json.loads(r.stdout)
    assert x["finish_reason"] == "eos"
    assert x["completion_tokens"] == free.tokens.index(eos)


# ------------------------------------------------------------------ pipelines


def _mer(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mer_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
        **kw,
    )


@pytest.fixture
def many_prompts(tmp_path) -> Path:
    p = tmp_path / "many.txt"
    p.write_text("".join(f"prompt number {i}\n" for i in range(400)))
    return p


def test_head_ends_quietly(store, many_prompts):
    p = _mer(
        "generate", "--model", str(store), "--prompts-file", str(many_prompts),
        "--max-tokens", "4", "--json",
    )  # fmt: skip
    first = p.stdout.readline()  # what `head -n 1` does: read a line, go away
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0
    assert json.loads(first)["prompt"] == "prompt number 0"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_shell_pipe_to_head(store, many_prompts):
    cmd = (
        f"{sys.executable} -m mer_cli generate --model {store} "
        f"--prompts-file {many_prompts} --max-tokens 3 --json | head -n 1"
    )
    r = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert json.loads(r.stdout)["completion_tokens"] == 3


def test_ctrl_c_flushes_and_exits_130(store, many_prompts):
    p = _mer(
        "generate", "--model", str(store), "--prompts-file", str(many_prompts),
        "--max-tokens", "60", "--json",
    )  # fmt: skip
    first = p.stdout.readline()
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 130
    lines = [json.loads(x) for x in (first + rest).splitlines()]
    assert lines[0]["finish_reason"] in ("length", "context")
    assert len(lines) < 400
    # the prompt that was running reports what it had, marked interrupted
    assert lines[-1]["finish_reason"] in ("interrupted", "length", "context")
    assert "Interrupted." in err and "Traceback" not in err, err


def test_engine_keeps_blas_on_one_thread(store):
    """numpy's BLAS workers spin after a call, on the kernels' cores: the
    engine sets BLAS to one thread (measured cost in kernels.config)."""
    code = (
        "import json, sys\n"
        "from threadpoolctl import threadpool_info\n"
        "from mer_cli.generate import load\n"
        "def n(): return [i['num_threads'] for i in threadpool_info()"
        " if i['user_api'] == 'blas']\n"
        "before = n()\n"
        "load(sys.argv[1])\n"
        "print(json.dumps([before, n()]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(store)],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "2"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout)
    assert 2 in before  # numpy's BLAS started with two threads
    assert after == [1] * len(before)
