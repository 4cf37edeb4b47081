"""Speculative greedy decoding gives exactly plain greedy decoding's tokens.

The reference is the plain decoder (one token per forward pass) on the same
store; speculative runs (prompt lookup, a draft store) must match it token for
token, with experts in RAM and streamed under a small budget, and stop exactly
at --max-tokens, a stop string or a full context. Underneath: a batched
verification pass gives bit-identical logits to one-token steps (float weights
included), prompt lookup proposes what a brute-force search finds, and a draft
model rolled back after misses drafts what a fresh copy of it would. A draft
store with another tokenizer is refused through the CLI.

``compare_greedy(store, prompts, ...)`` is the reusable check: point it at any
store (e.g. the built-in model) to assert the same property there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli import kernels as K
from mer_cli.cli import cli
from mer_cli.config import Config
from mer_cli.errors import UsageError
from mer_cli.formats.store import Store
from mer_cli.generate import GenerateOptions, generate, generate_many, load
from mer_cli.quantize import quantize
from mer_cli.sources import SourceOptions, open_source, plan_source
from mer_cli.speculative import (
    DraftModel,
    DraftPolicy,
    PromptLookup,
    SpeculativeStats,
    check_draft_compatible,
    speculative_greedy,
)

PROMPTS = (
    "The quick brown fox",
    "abc abc abc abc abc",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "x = x + 1\nx = x + 1\nx = x + 1\n",  # tiny qwen2_moe loops on it: all accepted
)
REPETITIVE = PROMPTS[3]


# ------------------------------------------------------------------ helpers


def compare_greedy(
    store: str | Path,
    prompts: tuple[str, ...] | list[str],
    *,
    method: str = "lookup",
    draft: str | Path | None = None,
    max_tokens: int = 40,
    draft_tokens: int = 5,
    ctx: int = 256,
    ram_budget: int | None = None,
    stop: tuple[str, ...] = (),
) -> list[dict]:
    """Run every prompt with plain and with speculative greedy decoding on
    ``store`` (experts streamed through ``ram_budget`` bytes when given) and
    assert identical tokens, text and finish reason. Returns each prompt's
    ``stats["speculative"]``."""
    source = None
    if ram_budget is not None:
        opts = SourceOptions(ram_budget=ram_budget, stream=True)

        def source(st):
            return open_source(st, plan_source(st, opts, Config(), profile=None))

    eng, tok = load(store, ctx=ctx, source=source)
    drafter = DraftModel.open(draft, eng.store, ctx=ctx) if draft else None
    out = []
    try:
        for p in prompts:
            base = GenerateOptions(max_tokens=max_tokens, stop=stop)
            plain = generate(eng, tok, p, base)
            spec_opts = GenerateOptions(
                max_tokens=max_tokens,
                stop=stop,
                speculative=method,
                draft_tokens=draft_tokens,
            )
            spec = generate(eng, tok, p, spec_opts, drafter=drafter)
            assert spec.completion == plain.completion, p
            assert spec.completion_tokens == plain.completion_tokens, p
            assert spec.finish_reason == plain.finish_reason, p
            assert "speculative" not in plain.stats
            s = spec.stats["speculative"]
            assert s["accepted"] <= s["drafted"]
            assert s["method"] == method
            out.append(s)
    finally:
        eng.close()
        if drafter is not None:
            drafter.close()
    return out


def tokens_of(store, prompt: str, max_tokens: int, ctx: int = 256, **kw):
    """Plain greedy result (the reference)."""
    eng, tok = load(store, ctx=ctx)
    try:
        return generate(eng, tok, prompt, GenerateOptions(max_tokens=max_tokens, **kw))
    finally:
        eng.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Tiny seeded stores: two targets (q8 and f32 dense weights), a smaller
    draft with the same tokenizer, and a store whose tokenizer differs."""
    d = tmp_path_factory.mktemp("spec")
    out = {}
    ck = make_hf_checkpoint(d / "mx", "mixtral", seed=5)
    out["mixtral"] = quantize(ck, d / "mixtral.mer", experts="q4", progress=False)
    ck = make_hf_checkpoint(d / "qw", "qwen2_moe", seed=3)
    out["qwen_f32"] = quantize(
        ck, d / "qwen_f32.mer", experts="q4", dense="f32", progress=False
    )
    ck = make_hf_checkpoint(d / "dr", "mixtral", seed=9, layers=1, hidden_size=32)
    out["draft"] = quantize(ck, d / "draft.mer", experts="q4", progress=False)
    # same tokenizer (261 tokens), a vocabulary without the target's padding ids
    ck = make_hf_checkpoint(d / "dv", "mixtral", seed=9, layers=1, vocab_size=264)
    out["draft_264"] = quantize(ck, d / "draft_264.mer", progress=False)
    ck = make_hf_checkpoint(d / "ds", "mixtral", seed=9, layers=1, vocab_size=200)
    out["draft_200"] = quantize(ck, d / "draft_200.mer", progress=False)
    ck = make_hf_checkpoint(d / "ot", "mixtral", seed=9, layers=1)
    tj = json.loads((ck / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["content"] = "<|end_of_text|>"
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    out["other_tokenizer"] = quantize(ck, d / "other.mer", progress=False)
    return out


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_float_linear_rows_are_bit_identical_to_single_rows(dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    if dtype == "f16":
        w = w.astype(np.float16)
    elif dtype == "bf16":
        w = (w.view(np.uint32) >> 16).astype(np.uint16)
    for T in (2, 3, 7, 32):
        x = rng.standard_normal((T, 96)).astype(np.float32)
        full = K.linear(w, x)
        for t in range(T):
            assert np.array_equal(full[t], K.linear(w, x[t])), (dtype, T, t)
            assert np.array_equal(full[t], K.linear(w, x[t : t + 1])[0])


@pytest.mark.parametrize("rows", [7, 32])  # 32: the most a pass may verify
@pytest.mark.parametrize("name", ["mixtral", "qwen_f32"])
def test_verify_logits_equal_decode_steps_bit_for_bit(stores, name, rows):
    eng, _ = load(stores[name], ctx=64)
    try:
        ids = np.random.default_rng(1).integers(0, 256, 9 + rows).tolist()
        end = len(ids)
        eng.prefill(ids[:9])
        steps = [eng.decode_step(t) for t in ids[9:]]
        assert eng.pos == end
        eng.truncate(9)
        assert eng.pos == 9
        got = eng.verify(ids[9:])
        assert got.shape == (rows, eng.cfg.vocab_size) and eng.pos == end
        for a, b in zip(steps, got):
            assert np.array_equal(a, b)
        with pytest.raises(ValueError, match="truncate"):
            eng.truncate(end + 1)
    finally:
        eng.close()


# ------------------------------------------------------------------ drafters


def lookup_reference(context: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Brute force: the latest earlier occurrence of the longest suffix n-gram,
    continued periodically past the end."""
    L = len(context)
    for n in range(min(max_ngram, L - 1), 0, -1):
        suffix = context[L - n :]
        for s in range(L - n - 1, -1, -1):  # occurrences ending before L
            if context[s : s + n] == suffix:
                seq = list(context)
                start = s + n
                for i in range(k):
                    seq.append(seq[start + i])
                return seq[L:]
    return []


def test_prompt_lookup_matches_a_brute_force_search():
    rng = np.random.default_rng(2)
    look = PromptLookup()
    for _ in range(30):
        context = rng.integers(0, 6, int(rng.integers(1, 40))).tolist()
        look.reset()
        for m in range(1, len(context) + 1):  # grows like a generation
            for k in (1, 4):
                assert look.propose(context[:m], k) == lookup_reference(
                    context[:m], k
                ), (context[:m], k)
    look.reset()
    assert look.propose([7, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # periodic
    assert look.propose([5, 6, 7], 3) == []  # another text: started over, no match


def test_draft_model_drafts_what_a_fresh_copy_would(stores):
    """After rollbacks (drafts partly accepted, text diverging) the draft's
    proposals equal greedy decoding of the context from scratch."""
    dm = DraftModel.open(stores["draft"], Store.open(stores["mixtral"]), ctx=128)
    fresh, _ = load(stores["draft"], ctx=128)
    rng = np.random.default_rng(3)
    try:
        dm.reset()
        context = rng.integers(0, 256, 6).tolist()
        for _ in range(8):
            k = int(rng.integers(1, 6))
            got = dm.propose(context, k)
            fresh.reset()
            logits = fresh.prefill(context)
            want = []
            for _ in range(k):
                want.append(int(np.argmax(logits)))
                logits = fresh.decode_step(want[-1])
            assert got == want
            keep = int(rng.integers(0, k + 1))  # accept some, then a new token
            context += got[:keep] + [int(rng.integers(0, 256))]
    finally:
        dm.close()
        fresh.close()


def test_draft_policy_maximizes_expected_tokens_per_fetch():
    pol = DraftPolicy(5, experts=8, top_k=2)
    for p in (0.3, 0.6, 0.75, 0.8, 0.95):
        pol.p = p
        # brute force: expected tokens / fetches, independent routing
        rate = [
            sum(p**i for i in range(k + 1)) * 2 / (8 * (1 - 0.75 ** (k + 1)))
            for k in range(6)
        ]
        want = max(range(6), key=lambda k: rate[k] - 1e-9 * k)
        assert pol.choose(5) == want, p
        assert pol.choose(2) == max(range(3), key=lambda k: rate[k] - 1e-9 * k)
    pol.p = 0.6
    assert pol.choose(5) == 0  # not worth 1.75x the fetches of a step
    for _ in range(50):  # routing fully shared by the drafts: no extra fetches
        pol.observe_cost(3, 1.0)
    assert pol.choose(5) == 5
    pol.observe(0, True)
    assert pol.p < 0.6
    pol.observe(4, False)
    assert pol.p > 0.5


class WrongDrafter:
    """Proposes tokens the model will not choose (its own plus one)."""

    name = "wrong"

    def __init__(self, reference: list[int], start: int, vocab: int) -> None:
        self.ref, self.start, self.vocab = reference, start, vocab
        self.asked: list[int] = []  # k of each propose call

    def reset(self) -> None:
        pass

    def propose(self, context, k):
        self.asked.append(k)
        done = len(context) - self.start
        return [(t + 1) % self.vocab for t in self.ref[done : done + k]]

    def close(self) -> None:
        pass


def test_wrong_drafts_are_soon_no_longer_verified(stores):
    eng, tok = load(stores["mixtral"], ctx=256)
    try:
        ids = tok.encode(PROMPTS[0])
        ref = tokens_of(stores["mixtral"], PROMPTS[0], 40)
        plain = [int(t) for t in tok.encode(ref.completion, add_bos=False)]
        eng.reset()
        st = SpeculativeStats()
        drafter = WrongDrafter(plain, len(ids), eng.cfg.vocab_size)
        gen = speculative_greedy(eng, drafter, ids, draft_tokens=5, max_tokens=40,
                                 stats=st)  # fmt: skip
        got = [t for _, t in zip(range(40), gen)]
        assert tok.decode(got) == ref.completion
        # each miss lowers the estimated acceptance; with 4 experts (cost of
        # a pass at most 2 steps' fetches) it is below break-even after ~6
        assert st.accepted == 0 and st.verify_passes <= 7
        assert st.plain_steps >= 32
        # the drafter is asked only for what the policy would verify: one
        # token (checked for free) once the drafts stopped paying
        assert drafter.asked[-20:] == [1] * 20 and max(drafter.asked) <= 5
    finally:
        eng.close()


def test_draft_tokens_default_by_method():
    assert GenerateOptions(speculative="draft").draft_tokens == 16
    assert GenerateOptions(speculative="lookup").draft_tokens == 5
    assert GenerateOptions(speculative="draft", draft_tokens=3).draft_tokens == 3


# ------------------------------------------------------------------ same tokens


@pytest.mark.parametrize("name", ["mixtral", "qwen_f32"])
def test_lookup_equals_plain_greedy(stores, name):
    stats = compare_greedy(stores[name], PROMPTS)
    assert sum(s["drafted"] for s in stats) > 0
    if name == "qwen_f32":  # it repeats itself on the repetitive prompt
        rep = stats[PROMPTS.index(REPETITIVE)]
        assert rep["acceptance_rate"] > 0.5 and rep["tokens_per_pass"] > 2


def test_draft_store_equals_plain_greedy(stores):
    stats = compare_greedy(stores["mixtral"], PROMPTS, method="draft",
                           draft=stores["draft"], draft_tokens=4)  # fmt: skip
    assert all(s["verify_passes"] > 0 for s in stats)


def test_draft_vocabulary_must_cover_the_tokenizer(stores):
    """A draft whose vocabulary lacks the target's padding ids still drafts
    (it stops drafting past such a token); one smaller than the tokenizer is
    refused."""
    compare_greedy(stores["mixtral"], PROMPTS[:2], method="draft",
                   draft=stores["draft_264"], max_tokens=24)  # fmt: skip
    with pytest.raises(UsageError, match="vocab_size is 200, fewer than"):
        check_draft_compatible(
            Store.open(stores["mixtral"]), Store.open(stores["draft_200"])
        )


def test_target_as_its_own_draft_accepts_everything(stores):
    """The same model drafting: every draft is its own greedy choice."""
    stats = compare_greedy(stores["mixtral"], PROMPTS[:2], method="draft",
                           draft=stores["mixtral"], max_tokens=30)  # fmt: skip
    for s in stats:
        assert s["drafted"] > 0 and s["acceptance_rate"] == 1.0
        assert s["tokens_per_pass"] > 3


@pytest.mark.parametrize("method", ["lookup", "draft"])
def test_streamed_under_a_small_budget_equals_plain_greedy(stores, method):
    ext = Store.open(stores["mixtral"]).extent_nbytes
    draft = stores["draft"] if method == "draft" else None
    compare_greedy(stores["mixtral"], PROMPTS[1:3], method=method, draft=draft,
                   ram_budget=3 * ext, max_tokens=24)  # fmt: skip


# ------------------------------------------------------------------ stopping


def test_max_tokens_is_exact(stores):
    for n in (1, 2, 3, 7, 16):
        for s in compare_greedy(
            stores["qwen_f32"], [REPETITIVE], max_tokens=n, draft_tokens=6
        ):
            # the first token comes from the prompt's pass; no pass computed
            # tokens past --max-tokens
            assert s["tokens"] <= n - 1


def test_stop_string_and_full_context_are_exact(stores):
    prompt = PROMPTS[1]
    text = tokens_of(stores["mixtral"], prompt, 40).completion
    # a stop string whose first occurrence is in the second half of the text
    stop = next(
        text[i : i + 2] for i in range(len(text) // 2, len(text) - 2)
        if text.find(text[i : i + 2]) == i
    )  # fmt: skip
    stats = compare_greedy(stores["mixtral"], [prompt], stop=(stop,))
    assert stats[0]["accepted"] > 0
    short = tokens_of(stores["mixtral"], prompt, 40, stop=(stop,))
    assert short.finish_reason == "stop" and stop not in short.completion
    ref = tokens_of(stores["qwen_f32"], REPETITIVE, 30)
    n_prompt = ref.prompt_tokens
    for room in (1, 2, 5, 9):  # the cache fills after `room` generated tokens
        compare_greedy(stores["qwen_f32"], [REPETITIVE], ctx=n_prompt + room)
    res = tokens_of(stores["qwen_f32"], REPETITIVE, 30, ctx=n_prompt + 4)
    assert res.finish_reason == "context"


# ------------------------------------------------------------------ refusals


def test_draft_with_another_tokenizer_is_refused(stores):
    r = CliRunner().invoke(
        cli,
        ["generate", "--model", str(stores["mixtral"]), "--prompt", "hi",
         "--draft", str(stores["other_tokenizer"])],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "different tokenizers" in r.output
    assert "<|end_of_text|>" in r.output or "<|endoftext|>" in r.output
    assert str(stores["other_tokenizer"]) in r.output
    assert str(stores["mixtral"]) in r.output
    with pytest.raises(UsageError, match="different tokenizers"):
        check_draft_compatible(
            Store.open(stores["mixtral"]), Store.open(stores["qwen_f32"])
        )
    check_draft_compatible(Store.open(stores["mixtral"]), Store.open(stores["draft"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--speculative", "lookup", "--temperature", "0.7"], "greedy only"),
        (["--speculative", "draft"], "needs --draft STORE"),
        (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens 0"),
        (["--speculative", "lookup", "--draft-tokens", "40"], "expected 1..31"),
        (["--speculative", "lookup", "--trace-out", "t.npz"], "leave out --spec"),
        (["--speculative", "lookup", "--batch", "2"], "use one of them"),
    ],
)
def test_cli_usage_errors(stores, args, message):
    r = CliRunner().invoke(
        cli, ["generate", "--model", str(stores["mixtral"]), "--prompt", "hi", *args]
    )
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_json_carries_acceptance_and_same_text(stores, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[1:3]) + "\n")
    base = ["generate", "--model", str(stores["mixtral"]), "--prompts-file",
            str(prompts), "--max-tokens", "20", "--json"]  # fmt: skip
    plain = CliRunner().invoke(cli, base)
    spec = CliRunner().invoke(cli, [*base, "--speculative", "lookup", "--stats"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    a = [json.loads(x) for x in plain.stdout.splitlines()]
    b = [json.loads(x) for x in spec.stdout.splitlines()]
    assert [x["completion"] for x in a] == [x["completion"] for x in b]
    s = b[0]["stats"]["speculative"]
    assert set(s) >= {"acceptance_rate", "drafted", "accepted", "tokens_per_pass"}
    assert "drafted tokens accepted" in spec.stderr
    draft = CliRunner().invoke(cli, [*base, "--draft", str(stores["draft"])])
    assert draft.exit_code == 0, draft.output
    c = [json.loads(x) for x in draft.stdout.splitlines()]
    assert [x["completion"] for x in c] == [x["completion"] for x in a]
    assert c[0]["stats"]["speculative"]["method"] == "draft"


def test_missing_draft_tokenizer_is_a_clear_error(stores, tmp_path):
    broken = tmp_path / "broken.mer"
    shutil.copytree(stores["draft"], broken)
    (broken / "tokenizer.json").unlink()
    r = CliRunner().invoke(
        cli,
        ["generate", "--model", str(stores["mixtral"]), "--prompt", "hi",
         "--draft", str(broken)],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "tokenizer.json" in r.output


def test_prompts_of_a_run_share_one_draft_policy(stores):
    """generate_many (mer generate --prompts-file) hands every prompt the same
    DraftPolicy: what the first prompt measured is where the second starts, and
    the output still equals plain greedy."""
    eng, tok = load(stores["mixtral"], ctx=256)
    drafter = DraftModel.open(stores["mixtral"], eng.store, ctx=256)
    opts = GenerateOptions(max_tokens=20, speculative="draft", draft_tokens=4)
    try:
        done = []
        for c in generate_many(eng, tok, PROMPTS[:2], opts, drafter=drafter):
            c.run()
            done.append((c, c.policy.p))
    finally:
        eng.close()
        drafter.close()
    (first, p_first), (second, p_second) = done
    assert first.policy is second.policy
    assert DraftPolicy.P_PRIOR < p_first < p_second  # all drafts were accepted
    for c in (first, second):
        ref = tokens_of(stores["mixtral"], c.result.prompt, 20)
        assert c.result.completion == ref.completion
