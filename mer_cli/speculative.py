"""Speculative decoding for greedy generation: cheap drafts, verified in one
batched forward pass of the model.

::

    drafter = PromptLookup()                        # or DraftModel.open(...)
    for token in speculative_greedy(engine, drafter, ids, draft_tokens=5,
                                    max_tokens=64, stats=SpeculativeStats()):
        ...

Each round a drafter proposes up to ``k`` tokens that follow the text so far;
the model runs the last token and the ``k`` drafts as one batch
(:meth:`~mer_cli.runtime.Engine.verify`), so every routed expert is fetched and
read once for all ``k + 1`` tokens instead of once per token. Drafts are
accepted while they equal the model's own greedy choice; the first choice that
differs (or the one after the last draft) comes free with the same pass. The
rejected drafts' KV positions are dropped (:meth:`Engine.truncate`). Because the
kernels give bit-identical rows for one token or a batch, the output is exactly
plain greedy decoding's; only the number of forward passes changes.

Drafters:

:class:`PromptLookup`
    Prompt lookup (n-gram copying): find the most recent earlier occurrence of
    the text's last ``n`` tokens (``n`` from 3 down to 1) and propose what
    followed it. No model, nearly free; it pays off when the output repeats the
    input (code editing, summaries that quote, agent transcripts).
:class:`DraftModel`
    A smaller store with the same tokenizer decodes ``k`` greedy tokens; its KV
    cache is kept in step with the accepted text and rolled back after misses.

Sampling (temperature > 0) would need rejection sampling to keep the output
distribution; only greedy decoding is speculative here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mer_cli.errors import FormatError, UsageError
from mer_cli.kernels import ROW_INVARIANT_ROWS

METHODS = ("lookup", "draft")
# the k + 1 rows of a verification pass stay within the rows that the kernels
# compute bit-identically to one-token steps
MAX_DRAFT_TOKENS = ROW_INVARIANT_ROWS - 1
LOOKUP_MAX_NGRAM = 3
# most drafts per pass, by method (--draft-tokens); DraftPolicy picks how many
# of them a pass verifies. Measured on the widened built-in store (16 experts,
# 4 GiB limit, 6 code prompts x 32 tokens, benchmarks/speculative.py): the
# draft model at 16 gave 1.45-1.68x plain (1.60x on average over five rounds)
# against 1.38-1.40x at 5; prompt
# lookup, whose long wrong n-gram drafts fetch many experts, read 6% more
# bytes than plain at 16 and 3% at 5.
DEFAULT_DRAFT_TOKENS = {"lookup": 5, "draft": 16}


class Drafter(Protocol):
    """Proposes tokens that may follow ``context`` (prompt + accepted output)."""

    name: str

    def reset(self) -> None:
        """Forget the previous prompt."""

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` token ids expected after ``context`` (may be empty)."""

    def close(self) -> None: ...


@dataclass
class SpeculativeStats:
    """Counters of one completion (``stats["speculative"]`` in ``--json``).

    ``acceptance_rate`` = accepted / drafted; ``tokens_per_pass`` = tokens the
    model produced after the prompt / its forward passes after the prompt
    (plain decoding: 1).
    """

    method: str = ""
    draft_tokens: int = 0  # k, the most drafts per pass
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0  # batched passes over [last token + drafts]
    plain_steps: int = 0  # one-token passes (no draft proposed)
    tokens: int = 0  # tokens produced by those passes
    draft_s: float = 0.0  # time spent proposing

    def as_dict(self) -> dict[str, Any]:
        passes = self.verify_passes + self.plain_steps
        return {
            "method": self.method,
            "draft_tokens": self.draft_tokens,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": (
                round(self.accepted / self.drafted, 4) if self.drafted else None
            ),
            "verify_passes": self.verify_passes,
            "plain_steps": self.plain_steps,
            "tokens": self.tokens,
            "tokens_per_pass": round(self.tokens / passes, 4) if passes else None,
            "draft_s": round(self.draft_s, 6),
        }


# ================================================================ drafters


class PromptLookup:
    """Drafts by copying what followed the last occurrence of the context's
    final n-gram (``n = max_ngram .. 1``, longest match first).

    An index ``n-gram -> position of the token after it`` is extended as the
    context grows (O(n) per new token). A match that runs into the end of the
    context continues periodically through the draft itself, so a repeating
    cycle shorter than ``k`` still yields ``k`` drafts.
    """

    name = "lookup"

    def __init__(self, max_ngram: int = LOOKUP_MAX_NGRAM) -> None:
        if max_ngram < 1:
            raise ValueError(f"max_ngram {max_ngram}: expected >= 1")
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self._index: list[dict[tuple[int, ...], int]] = [
            {} for _ in range(self.max_ngram + 1)
        ]
        self._seen = 0  # context positions whose preceding n-grams are indexed
        self._context: list[int] = []

    def _extend(self, context: Sequence[int]) -> None:
        L = len(context)
        s = self._seen
        if s > L or (s and self._context[s - 1] != context[s - 1]):
            self.reset()  # a different text: start over
        ctx = self._context
        ctx[self._seen :] = context[self._seen :]
        for p in range(max(self._seen, 1), L):  # p: the token after the n-gram
            for n in range(1, min(self.max_ngram, p) + 1):
                self._index[n][tuple(ctx[p - n : p])] = p
        self._seen = L

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        self._extend(context)
        ctx, L = self._context, len(self._context)
        if k < 1 or L < 2:
            return []
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            start = self._index[n].get(tuple(ctx[L - n :]))
            if start is None:
                continue
            out: list[int] = []
            for i in range(k):
                j = start + i
                out.append(ctx[j] if j < L else out[j - L])
            return out
        return []

    def close(self) -> None:
        pass


class DraftModel:
    """A smaller model drafts greedily; its KV cache follows the accepted text.

    Parameters
    ----------
    engine : Engine
        The draft store's engine (same tokenizer as the target).
    vocab_limit : int
        The target's vocabulary size: a draft token at or past it ends the draft.
    """

    name = "draft"

    def __init__(self, engine: Any, vocab_limit: int) -> None:
        self.engine = engine
        self.vocab_limit = vocab_limit
        self._fed: list[int] = []  # the tokens in the draft's KV cache
        self._known = 0  # len(context) at the last call: that prefix is unchanged

    @classmethod
    def open(
        cls,
        path: str | Path,
        target_store: Any,
        *,
        ctx: int | None = None,
        kv_dtype: str = "f32",
        threads: int | None = None,
    ) -> DraftModel:
        """Check that the store at ``path`` can draft for ``target_store``
        (:func:`check_draft_compatible`), then load it with every expert in RAM.
        ``ctx`` is capped at the draft model's ``max_position``."""
        from mer_cli.formats.store import Store
        from mer_cli.generate import release_mapped_pages
        from mer_cli.runtime import Engine

        draft = Store.open(path)
        check_draft_compatible(target_store, draft)
        if ctx is not None:
            ctx = min(ctx, draft.model.max_position)
        engine = Engine(draft, ctx=ctx, kv_dtype=kv_dtype, threads=threads)
        release_mapped_pages(draft)
        return cls(engine, target_store.model.vocab_size)

    def reset(self) -> None:
        self.engine.reset()
        self._fed = []
        self._known = 0

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        eng = self.engine
        # keep the longest prefix of what the cache holds that is still the
        # text; at least the context's last token is fed again (its logits).
        # The text only grows: what it was at the last call still matches.
        n = min(len(self._fed), len(context) - 1)
        keep = min(self._known, n)
        if keep and self._fed[keep - 1] != context[keep - 1]:
            keep = 0  # another text
        while keep < n and self._fed[keep] == context[keep]:
            keep += 1
        self._known = len(context)
        k = min(k, eng.ctx - len(context) + 1)
        if k < 1 or max(context[keep:]) >= eng.cfg.vocab_size:
            return []  # no room, or a token the draft has no embedding for
        eng.truncate(keep)
        logits = eng.prefill(context[keep:])
        self._fed = list(context)
        out: list[int] = []
        while True:
            t = int(np.argmax(logits))
            if t >= self.vocab_limit:
                break
            out.append(t)
            if len(out) == k:
                break
            logits = eng.decode_step(t)
            self._fed.append(t)
        return out

    def close(self) -> None:
        self.engine.close()


# ================================================================ tokenizer check


def _tokenizer_json(store: Any) -> tuple[Path | None, bytes | None]:
    name = (store.tokenizer or {}).get("file")
    if not name:
        return None, None
    path = store.path / name
    try:
        return path, path.read_bytes()
    except OSError:
        return path, None


def _first_difference(a: bytes, b: bytes) -> str:
    """What differs between two tokenizer.json files, in words."""
    try:
        ja, jb = json.loads(a), json.loads(b)
    except (ValueError, UnicodeDecodeError):
        return "their tokenizer.json files differ"
    va = dict((ja.get("model") or {}).get("vocab") or {})
    vb = dict((jb.get("model") or {}).get("vocab") or {})
    for t in ja.get("added_tokens") or []:
        va[t.get("content")] = t.get("id")
    for t in jb.get("added_tokens") or []:
        vb[t.get("content")] = t.get("id")
    if len(va) != len(vb):
        return f"the vocabularies have {len(va)} and {len(vb)} tokens"
    for tok, i in sorted(va.items(), key=lambda kv: (kv[1] is None, kv[1])):
        if vb.get(tok) != i:
            return f"token {tok!r} is id {i} in one and {vb.get(tok)} in the other"
    for key in ("model", "normalizer", "pre_tokenizer", "post_processor"):
        if ja.get(key) != jb.get(key):
            return f'their tokenizer.json "{key}" sections differ'
    return ""


def check_draft_compatible(target: Any, draft: Any) -> None:
    """Refuse a draft store whose tokens do not mean the target's tokens.

    The tokenizers must be the same (identical ``tokenizer.json``, or files
    that differ only in formatting or unused sections) and the draft's
    vocabulary must cover the tokenizer's.

    Raises
    ------
    UsageError
        The stores' tokenizers differ (the message names both stores and the
        first difference).
    FormatError
        A store has no tokenizer file.
    """
    tp, tb = _tokenizer_json(target)
    dp, db = _tokenizer_json(draft)
    for store, p, b in ((target, tp, tb), (draft, dp, db)):
        if b is None:
            where = p if p is not None else f"{store.path}/manifest.json tokenizer.file"
            raise FormatError(
                f"{where}: the store has no readable tokenizer.json, so mer cannot "
                "check that the draft store's tokens mean the same text as the "
                "model's; re-run mer quantize on a checkpoint with tokenizer.json"
            )
    why = ""
    if hashlib.sha256(tb).digest() != hashlib.sha256(db).digest():
        why = _first_difference(tb, db)
    if not why:
        tv, dv = target.model.vocab_size, draft.model.vocab_size
        n_tok = _vocab_count(tb)
        if n_tok is not None and dv < n_tok:
            why = (
                f"the draft model's vocab_size is {dv}, fewer than the tokenizer's "
                f"{n_tok} tokens (the model's is {tv})"
            )
    if why:
        raise UsageError(
            f"--draft {draft.path}: it cannot draft for --model {target.path}: "
            f"the two stores use different tokenizers ({why}; compared {dp} with "
            f"{tp}). A draft model must share the model's tokenizer, e.g. a "
            "smaller model of the same family; or use --speculative lookup, which "
            "needs no draft model"
        )


def _vocab_count(raw: bytes) -> int | None:
    try:
        j = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    ids = list(((j.get("model") or {}).get("vocab") or {}).values())
    ids += [t.get("id", 0) for t in j.get("added_tokens") or []]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


# ================================================================ decoding


def check_options(method: str | None, draft_tokens: int, temperature: float) -> None:
    """Usage checks shared by the CLI and the library."""
    if method is None:
        return
    if method not in METHODS:
        raise UsageError(
            f"--speculative {method!r}: expected one of " + ", ".join(METHODS)
        )
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UsageError(
            f"--draft-tokens {draft_tokens}: expected 1..{MAX_DRAFT_TOKENS}"
        )
    if temperature > 0:
        raise UsageError(
            f"--speculative {method} with --temperature {temperature:g}: speculative "
            "decoding is greedy only (its output equals plain greedy decoding); "
            "use --temperature 0, or drop --speculative to sample"
        )


class DraftPolicy:
    """How many drafts to verify: the number that maximizes expected tokens
    per expert fetch.

    A pass over ``1 + k`` tokens fetches the union of their experts, so in an
    MoE its cost grows with ``k`` (up to all experts of each layer), while a
    dense model's barely does. With per-draft acceptance ``p`` a pass yields
    ``1 + p + ... + p**k`` tokens for ``cost(k)`` one-token passes' worth of
    fetches; ``k = 0`` is a plain step. ``cost(k)`` starts from independent
    routing (``E (1 - (1 - K/E)**(k+1)) / K``) and its excess over 1 is scaled
    by the ratio observed in real passes (routing of neighbouring tokens is
    correlated); ``p`` is a running mean over verified drafts and over plain
    steps whose proposal could be checked for free. Fetches stand for the
    cost: they are the reads of a streamed model and most of the compute of a
    resident one.

    Parameters
    ----------
    max_k : the most drafts per pass.
    experts, top_k : the model's routed experts per layer and experts per token.
    """

    # optimistic: the first proposals are verified, and one miss brings p
    # below break-even (then plain steps check the proposals for free)
    P_PRIOR = 0.8
    RATE = 0.1  # weight of one observation in the running means

    def __init__(self, max_k: int, experts: int, top_k: int) -> None:
        self.p = self.P_PRIOR
        self.scale = 1.0  # observed / independent-routing excess cost
        self.base = [
            experts * (1 - (1 - top_k / experts) ** (k + 1)) / top_k
            for k in range(max_k + 1)
        ]

    def cost(self, k: int) -> float:
        return 1 + self.scale * (self.base[k] - 1)

    def choose(self, available: int) -> int:
        """Drafts to verify out of ``available`` proposed (0: a plain step)."""
        best, best_k, gain = 1.0, 0, 1.0
        for k in range(1, min(available, len(self.base) - 1) + 1):
            gain = gain * self.p + 1  # 1 + p + ... + p**k
            if gain / self.cost(k) > best + 1e-9:
                best, best_k = gain / self.cost(k), k
        return best_k

    def observe(self, hits: int, missed: bool) -> None:
        """``hits`` drafts accepted in a row, then a rejected one if ``missed``."""
        for x in [1.0] * hits + ([0.0] if missed else []):
            self.p += self.RATE * (x - self.p)

    def observe_cost(self, k: int, fetch_ratio: float) -> None:
        """A pass with ``k`` drafts fetched ``fetch_ratio`` times a plain step's."""
        expected = self.base[k] - 1
        if k > 0 and expected > 0:
            seen = max(0.0, fetch_ratio - 1) / expected
            self.scale += self.RATE * (seen - self.scale)


def speculative_greedy(
    engine: Any,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    *,
    draft_tokens: int,
    max_tokens: int,
    stats: SpeculativeStats,
    policy: DraftPolicy | None = None,
) -> Iterator[int]:
    """Greedy tokens after ``prompt_ids``, exactly those of plain greedy
    decoding, produced with verified drafts.

    The engine must be empty (``reset``). Yields one token at a time; the
    consumer stops when it likes (EOS, a stop string, ``max_tokens``): drafts
    are limited so no pass computes past ``max_tokens`` or the context. Ends on
    its own when the KV cache is full (the last token cannot be fed).

    Parameters
    ----------
    engine : Engine
    drafter : PromptLookup or DraftModel
    prompt_ids : the prompt's token ids (non-empty).
    draft_tokens : k, the most drafts verified per pass; :class:`DraftPolicy`
        picks how many of the proposed ones are worth their experts' fetches.
    max_tokens : tokens the consumer will take at most.
    stats : updated in place.
    policy : the draft policy to consult and update (shared across prompts by
        :func:`mer_cli.generate.generate_many`); None: a fresh one.

    The drafter's time (a draft model's forward passes, its prompt included)
    is added to the engine's decode time, so ``decode_tok_s`` is what a user
    gets.
    """
    stats.method = drafter.name
    stats.draft_tokens = draft_tokens
    drafter.reset()
    context = [int(t) for t in prompt_ids]
    token = int(np.argmax(engine.prefill(context)))
    n = 0
    cfg = engine.cfg
    if policy is None:
        policy = DraftPolicy(draft_tokens, cfg.num_experts, cfg.top_k)
    one_pass = cfg.num_layers * cfg.top_k  # fetches of a one-token pass
    while True:
        context.append(token)
        n += 1
        yield token
        if engine.pos >= engine.ctx:
            return
        k = min(draft_tokens, engine.ctx - engine.pos - 1, max_tokens - n - 1)
        proposal: list[int] = []
        if k > 0:
            # no more than the policy would verify out of k (the best of a
            # longer proposal is the best of this prefix), at least one, whose
            # check against the next token is free on a plain step
            k = max(1, policy.choose(k))
            t0 = time.perf_counter()
            proposal = drafter.propose(context, k)[:k]
            dt = time.perf_counter() - t0
            stats.draft_s += dt
            engine.timing.decode_s += dt  # decode tok/s pays for the drafting
        drafts = proposal[: policy.choose(len(proposal))]
        if not drafts:
            token = int(np.argmax(engine.decode_step(token)))
            stats.plain_steps += 1
            stats.tokens += 1
            if proposal:  # was the first proposed token right? (free to check)
                policy.observe(int(proposal[0] == token), proposal[0] != token)
            continue
        pos0, f0 = engine.pos, engine.fetches
        best = np.argmax(engine.verify([token, *drafts]), axis=-1)  # [k+1]
        a = 0
        while a < len(drafts) and int(best[a]) == drafts[a]:
            a += 1
        engine.truncate(pos0 + 1 + a)  # keep token and the accepted drafts
        policy.observe(a, a < len(drafts))
        policy.observe_cost(len(drafts), (engine.fetches - f0) / one_pass)
        stats.verify_passes += 1
        stats.drafted += len(drafts)
        stats.accepted += a
        stats.tokens += a + 1
        for d in drafts[:a]:
            context.append(d)
            n += 1
            yield d
        token = int(best[a])
