"""The built-in model (``mer_cli/data/builtin``): shape, tokenizer, parity, defaults.

* the f32 store of the shipped checkpoint matches transformers' logits
  (``tests/fixtures/builtin/reference.npz``, made by
  ``scripts/dev/make_parity_fixtures.py --builtin``) within the parity bound of
  ``test_parity.py`` (1e-4 relative), with identical greedy tokens and routing;
* ``mer generate`` without ``--model`` converts it once into the cache directory
  and its greedy text for a fixed prompt equals ``greedy.json`` (regenerate with
  ``MER_REGEN_BUILTIN=1 pytest tests/test_builtin.py -k expectation`` after
  retraining, and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mer_cli import builtin
from mer_cli.cli import cli
from mer_cli.formats.store import Store
from mer_cli.quantize import quantize
from mer_cli.runtime import Engine

FIXTURE = Path(__file__).parent / "fixtures" / "builtin"
SRC = builtin.checkpoint_dir()
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 32


def rel_err(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MER_CACHE_DIR", str(d))
    return d


def test_shipped_checkpoint_is_a_small_mixtral_moe():
    cfg = json.loads((SRC / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_hidden_layers"] >= 6
    assert cfg["num_local_experts"] >= 16
    assert cfg["num_experts_per_tok"] == 2
    total = sum(p.stat().st_size for p in SRC.iterdir())
    assert total <= 32 * 1000 * 1000, f"{SRC} holds {total} bytes"
    for name in ("README.md", "loss.png", "training.json", "corpus.json.gz"):
        assert (SRC / name).is_file(), name
    assert (SRC / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_is_llama_style_byte_fallback_bpe():
    """What llama.cpp's converter (gguf's LlamaHfVocab) requires, and byte fallback
    that round-trips text no merge covers."""
    from tokenizers import Tokenizer

    tj = json.loads((SRC / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] is True
    assert tj["decoder"]["type"] == "Sequence"
    vocab = tj["model"]["vocab"]
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [vocab[f"<0x{b:02X}>"] for b in (0, 255)] == [3, 258]
    tok = Tokenizer.from_file(str(SRC / "tokenizer.json"))
    text = "def f(x):\n    return x  # \u00e9\u4e2d\U0001f600 \x00\ttab"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert 0 not in ids  # nothing became <unk>
    assert tok.decode(ids) == text
    assert any(3 <= i <= 258 for i in ids)  # the emoji went through byte tokens


def test_tokenizer_is_accepted_by_gguf_llama_hf_vocab():
    pytest.importorskip("transformers")
    from gguf.vocab import LlamaHfVocab

    vocab = LlamaHfVocab(SRC)
    toks = list(vocab.all_tokens())
    assert len(toks) == json.loads((SRC / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def f32_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "f32.mer"
    return Store.open(quantize(SRC, out, experts="f32", dense="f32", progress=False))


def test_f32_store_matches_transformers(f32_store):
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    digest = hashlib.sha256((SRC / "model.safetensors").read_bytes()).hexdigest()
    assert meta["model_safetensors_sha256"] == digest, (
        "tests/fixtures/builtin was made for another checkpoint: run "
        "scripts/dev/make_parity_fixtures.py --builtin"
    )
    with np.load(FIXTURE / "reference.npz", allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    eng = Engine(f32_store, record_routing=True)
    rows = list(eng.prefill(ref["input_ids"], all_logits=True))
    for t in ref["greedy_tokens"][:-1]:
        rows.append(eng.decode_step(int(t)))
    logits = np.array(rows)
    T = len(ref["input_ids"])
    assert rel_err(logits[:T], ref["prompt_logits"]) < 1e-4
    assert rel_err(logits[T - 1 :], ref["decode_logits"]) < 1e-4
    np.testing.assert_array_equal(eng.routing[0][1], ref["routing"])
    decode = eng.routing[1 : len(ref["greedy_tokens"])]
    np.testing.assert_array_equal(
        np.concatenate([d[1] for d in decode], axis=1), ref["decode_routing"]
    )
    eng.reset()
    tokens, out = [], eng.prefill(ref["input_ids"])
    for _ in range(len(ref["greedy_tokens"])):
        tokens.append(int(np.argmax(out)))
        out = eng.decode_step(tokens[-1])
    assert tokens == ref["greedy_tokens"].tolist()


def _generate(*extra: str):
    args = ["generate", "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"]
    return CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)


def test_generate_without_model_uses_the_builtin_model_and_greedy_expectation(cache):
    res = _generate()
    assert res.exit_code == 0, res.output
    assert "converting the built-in model" in res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    expected_path = FIXTURE / "greedy.json"
    if os.environ.get("MER_REGEN_BUILTIN"):
        expected_path.write_text(
            json.dumps(
                {
                    "prompt": PROMPT,
                    "max_tokens": MAX_TOKENS,
                    "completion": got["completion"],
                },
                indent=2,
            )
            + "\n"
        )
        pytest.skip(f"wrote {expected_path}")
    expected = json.loads(expected_path.read_text())
    assert expected["prompt"] == PROMPT and expected["max_tokens"] == MAX_TOKENS
    assert got["completion"] == expected["completion"]
    assert got["completion_tokens"] == MAX_TOKENS or got["finish_reason"] == "eos"
    (store,) = list(cache.glob("builtin-*.mer"))
    manifest = store / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    # second run: the converted store is reused, the text is the same
    res2 = _generate("--model", "builtin")
    assert res2.exit_code == 0, res2.output
    assert "converting" not in res2.stderr
    assert manifest.stat().st_mtime_ns == stamp
    assert (
        json.loads(res2.stdout.strip().splitlines()[-1])["completion"]
        == got["completion"]
    )
    assert not list(cache.glob("*.tmp*"))  # no leftovers of the conversion


def test_unwritable_cache_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MER_CACHE_DIR", str(blocker / "mer"))
    res = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--max-tokens", "1"])
    assert res.exit_code == 1
    assert "MER_CACHE_DIR" in res.output and str(blocker / "mer") in res.output
    assert "Traceback" not in res.output


def test_builtin_store_path_follows_the_checkpoint(tmp_path):
    """Another checkpoint (a retrained model) gets another cache entry."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(SRC, other)
    assert builtin.store_path(other) == builtin.store_path(SRC)
    with open(other / "config.json", "a") as f:
        f.write("\n")
    assert builtin.store_path(other) != builtin.store_path(SRC)
    (other / "model.safetensors").unlink()
    with pytest.raises(builtin.FormatError, match="model.safetensors"):
        builtin.store_path(other)


def test_llama_cpp_runs_the_builtin_model_as_mer_does(tmp_path):
    """Exported to GGUF Q4_0, llama.cpp tokenizes the prompt as mer does and its
    greedy tokens equal mer's on the same Q4_0 weights (a store transcoded from
    that GGUF, dense q4)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    from mer_cli.gguf_export import export_gguf

    gguf_path = export_gguf(SRC, tmp_path / "b.gguf", progress=False, threads=1)
    store = Store.open(
        quantize(gguf_path, tmp_path / "b.mer", dense="q4", progress=False, threads=1)
    )
    text = "def fibonacci(n):\n    if n < 2:\n"
    ids = Tokenizer.from_file(str(SRC / "tokenizer.json")).encode(text).ids
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=128,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    assert llm.tokenize(text.encode(), add_bos=True) == ids
    theirs, ours = [], []
    llm.eval(ids)
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    eng = Engine(store)
    logits = eng.prefill(ids)
    for _ in range(16):
        ours.append(int(np.argmax(logits)))
        logits = eng.decode_step(ours[-1])
    assert ours == theirs


BATCH_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(",
    '    """Return the number of items."""\n',
]


def _completions(cache, *extra: str) -> list[str]:
    prompts = cache.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in BATCH_PROMPTS))
    args = ["generate", "--prompts-file", str(prompts), "--max-tokens", "48", "--json"]
    res = CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    return [r["completion"] for r in rows], rows


def test_speculative_and_batched_greedy_equal_plain_greedy_on_the_builtin_model(cache):
    plain, _ = _completions(cache)
    lookup, rows = _completions(cache, "--speculative", "lookup", "--stats")
    assert lookup == plain
    spec = [r["stats"]["speculative"] for r in rows]
    assert sum(s["accepted"] for s in spec) > 0  # the model repeats itself: drafts land
    batched, _ = _completions(cache, "--batch", "3")
    assert batched == plain
    assert len(set(plain)) == len(plain)  # different prompts, different texts
