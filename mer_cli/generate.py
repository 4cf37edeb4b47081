"""Text generation over an :class:`~mer_cli.runtime.Engine`: prompt in, text
pieces out as tokens come, and a result with token counts and timings.

::

    from mer_cli.generate import GenerateOptions, load, Completion
    engine, tok = load("tiny.mer")
    c = Completion(engine, tok, "Once upon a time", GenerateOptions(max_tokens=20))
    for piece in c:
        print(piece, end="", flush=True)
    c.result.completion_tokens, c.result.stats["decode_tok_s"]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mer_cli.errors import UsageError
from mer_cli.sampling import Sampler, SamplingOptions

# why generation ended
FINISH_EOS = "eos"  # the model produced an end-of-sequence token
FINISH_STOP = "stop"  # a --stop string appeared (it is not part of the text)
FINISH_LENGTH = "length"  # --max-tokens reached
FINISH_CONTEXT = "context"  # the KV cache (--ctx) is full
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C or the consumer stopped early


@dataclass(frozen=True)
class GenerateOptions:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False
    # greedy speculative decoding (mer_cli.speculative): "lookup" or "draft"
    speculative: str | None = None
    # most drafted tokens verified per forward pass (None: the method's
    # default, mer_cli.speculative.DEFAULT_DRAFT_TOKENS)
    draft_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.draft_tokens is None:
            from mer_cli.speculative import DEFAULT_DRAFT_TOKENS

            default = DEFAULT_DRAFT_TOKENS.get(self.speculative, 5)
            object.__setattr__(self, "draft_tokens", default)  # frozen

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.temperature, self.top_p, self.top_k, self.seed)

    def check(self) -> None:
        if self.max_tokens < 0:
            raise UsageError(f"--max-tokens {self.max_tokens}: expected >= 0")
        if any(s == "" for s in self.stop):
            raise UsageError("--stop: an empty stop string would stop at once")
        self.sampling().check()
        from mer_cli.speculative import check_options

        check_options(self.speculative, self.draft_tokens, self.temperature)


@dataclass
class GenerateResult:
    """One prompt's outcome (the shape of a ``--json`` line)."""

    prompt: str
    completion: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = FINISH_INTERRUPTED
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(
    model: str | Path,
    *,
    ctx: int | None = None,
    kv_dtype: str = "f32",
    threads: int | None = None,
    source: Any = None,
):
    """Open a store and build its :class:`Engine` and :class:`Tokenizer`.

    ``source`` is an :class:`~mer_cli.experts.ExpertSource`, or a callable that
    makes one from the opened :class:`Store`; default: all experts in RAM.
    """
    from mer_cli.formats.store import Store
    from mer_cli.runtime import Engine
    from mer_cli.text import Tokenizer

    store = Store.open(model)
    tok = Tokenizer.from_store(store)
    if callable(source):
        source = source(store)
    engine = Engine(store, source, ctx=ctx, kv_dtype=kv_dtype, threads=threads)
    release_mapped_pages(store)
    return engine, tok


def release_mapped_pages(store) -> int:
    """Drop the pages of ``store``'s memory maps from this process's RSS.

    The engine copies dense weights (and a resident source its experts) out of
    the maps; without this the mapped file pages stay counted in the RSS next to
    the copies (measured: dense.bin fully resident twice). ``MADV_DONTNEED`` on a
    read-only file mapping only unmaps the pages: a later access faults them in
    again from the page cache, so views into the maps stay valid.

    Returns the number of maps advised.
    """
    import mmap

    n = 0
    for m in list(store._maps.values()):
        mm = getattr(m, "base", None)
        mm = getattr(mm, "obj", mm)  # np.frombuffer(mmap) keeps a memoryview
        if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
                n += 1
            except (OSError, ValueError):
                pass  # advisory only
    return n


class Completion:
    """Generate a completion of one prompt; iterate for the text pieces.

    After the iteration ends (or is abandoned: ``close()``, an exception,
    Ctrl-C), ``result`` holds the text produced so far and the counters.

    Parameters
    ----------
    engine : Engine
        Reset before the prompt runs.
    tokenizer : Tokenizer
    prompt : str
        Raw text, or the user message when ``options.chat`` is set.
    options : GenerateOptions
    read_ceiling : ReadCeiling, optional
        The drive's best read GB/s (:mod:`mer_cli.sources`), for the share of it
        the expert reads reached (``stats["io"]``).
    drafter : DraftModel, optional
        The draft model for ``options.speculative == "draft"``
        (:mod:`mer_cli.speculative`); prompt lookup needs none.
    policy : DraftPolicy, optional
        What speculative decoding learned so far about acceptance and the cost
        of a pass (``mer_cli.speculative.DraftPolicy``); share one across the
        prompts of a run so each prompt starts from what the previous ones
        measured. None: a fresh one.
    """

    def __init__(
        self,
        engine,
        tokenizer,
        prompt: str,
        options: GenerateOptions,
        read_ceiling: Any = None,
        drafter: Any = None,
        policy: Any = None,
    ):
        options.check()
        if options.speculative == "draft" and drafter is None:
            raise UsageError(
                "--speculative draft needs a draft model: give --draft STORE"
            )
        self.engine, self.tok, self.options = engine, tokenizer, options
        self.read_ceiling = read_ceiling
        self.drafter = drafter
        self.policy = policy
        self.result = GenerateResult(prompt=prompt)
        self.tokens: list[int] = []  # generated ids (EOS excluded)
        self.started = False  # the prompt was accepted and generation began

    def __iter__(self) -> Iterator[str]:
        o, eng, tok, res = self.options, self.engine, self.tok, self.result
        t_start = time.perf_counter()
        text = res.prompt
        if o.chat:
            text = tok.apply_chat_template([{"role": "user", "content": res.prompt}])
        ids = tok.encode(text)
        if not ids:
            raise UsageError(
                "the prompt is empty (no tokens after tokenization); give some text"
            )
        res.prompt_tokens = len(ids)
        eng.reset()
        eng.cache.check_room(len(ids))
        sampler = Sampler(o.sampling())
        t0 = eng.timing.as_dict()
        io0 = io1 = _io_snapshot(eng.source)
        stops = _StopMatcher(o.stop)
        dec = tok.decoder(ids)
        ttft = None
        spec = None
        self.started = True
        try:
            if o.max_tokens == 0:
                res.finish_reason = FINISH_LENGTH
                return
            if o.speculative:
                from mer_cli.speculative import (
                    PromptLookup,
                    SpeculativeStats,
                    speculative_greedy,
                )

                spec = SpeculativeStats()
                steps = speculative_greedy(
                    eng,
                    self.drafter if o.speculative == "draft" else PromptLookup(),
                    ids,
                    draft_tokens=o.draft_tokens,
                    max_tokens=o.max_tokens,
                    stats=spec,
                    policy=self.policy,
                )
            else:
                steps = _plain_tokens(eng, sampler, ids)
            for token in steps:
                if ttft is None:
                    ttft = time.perf_counter() - t_start
                    io1 = _io_snapshot(eng.source)
                if tok.is_eos(token):
                    res.finish_reason = FINISH_EOS
                    break
                self.tokens.append(token)
                res.completion_tokens = len(self.tokens)
                piece, hit = stops.feed(dec.push(token))
                if piece:
                    res.completion += piece
                    yield piece
                if hit:
                    res.finish_reason = FINISH_STOP
                    return
                if len(self.tokens) >= o.max_tokens:
                    res.finish_reason = FINISH_LENGTH
                    break
            else:  # the steps end when the KV cache cannot take the last token
                res.finish_reason = FINISH_CONTEXT
            piece, hit = stops.feed(dec.flush(), final=True)
            if hit:
                res.finish_reason = FINISH_STOP
            if piece:
                res.completion += piece
                yield piece
        finally:
            res.stats = _delta(t0, eng.timing.as_dict())
            res.stats["time_to_first_token_s"] = (
                round(ttft, 6) if ttft is not None else None
            )
            res.stats["seed"] = sampler.seed if o.temperature > 0 else None
            if spec is not None:
                res.stats["speculative"] = spec.as_dict()
            src = eng.source.stats()
            res.stats["source"] = src
            if io0 is not None:
                res.stats["io"] = _io_stats(
                    res.stats,
                    src,
                    io0,
                    io1,
                    _io_snapshot(eng.source),
                    self.read_ceiling,
                )
            from mer_cli.memory import peak_rss_bytes

            res.stats["peak_rss_bytes"] = peak_rss_bytes()

    def run(self) -> GenerateResult:
        """Generate to the end and return the result."""
        for _ in self:
            pass
        return self.result


def _plain_tokens(eng, sampler, ids: Sequence[int]) -> Iterator[int]:
    """Prefill ``ids``, then one sampled token per forward pass; ends when the
    KV cache cannot take the last token."""
    logits = eng.prefill(ids)
    while True:
        token = sampler(logits)
        yield token
        if eng.pos >= eng.ctx:
            return
        logits = eng.decode_step(token)


def generate(
    engine,
    tokenizer,
    prompt: str,
    options: GenerateOptions | None = None,
    drafter: Any = None,
) -> GenerateResult:
    """Complete one prompt (no streaming); see :class:`Completion`."""
    options = options or GenerateOptions()
    return Completion(engine, tokenizer, prompt, options, drafter=drafter).run()


def generate_many(
    engine,
    tokenizer,
    prompts: Iterable[str],
    options: GenerateOptions | None = None,
    read_ceiling: Any = None,
    drafter: Any = None,
) -> Iterator[Completion]:
    """One :class:`Completion` per prompt, run one after another (iterate each
    before taking the next). Speculative runs share one draft policy, so the
    acceptance and pass cost measured on earlier prompts carry over."""
    options = options or GenerateOptions()
    policy = None
    if options.speculative:
        from mer_cli.speculative import DraftPolicy

        cfg = engine.cfg
        policy = DraftPolicy(options.draft_tokens, cfg.num_experts, cfg.top_k)
    for p in prompts:
        yield Completion(engine, tokenizer, p, options, read_ceiling, drafter, policy)


def _io_snapshot(source) -> dict[str, float] | None:
    """Cumulative read counters of a streaming source (None: nothing is read)."""
    reader = getattr(source, "reader", None)
    if reader is None:
        return None
    r = reader.stats()
    return {
        "bytes_read": r["bytes_read"],
        "read_s": r["read_seconds"],
        "stall_s": float(getattr(source, "stall_seconds", 0.0)),
    }


def _io_stats(
    timing: dict[str, Any],
    src: dict[str, Any],
    before: dict[str, float],
    mid: dict[str, float],
    after: dict[str, float],
    ceiling: Any,
) -> dict[str, Any]:
    """One prompt's expert I/O: whole run and decode only (``decode_*``).

    ``read_gbps`` is bytes over the time at least one read was in flight;
    ``decode_read_gbps_wall`` is decode bytes over decode wall time.
    ``stall_share`` is the part of the forward passes' time the compute thread
    waited for a read. Hit rates and prefetch figures cover all prompts so far.
    """

    def rate(b: float, s: float) -> float | None:
        return round(b / s / 1e9, 4) if s > 0 and b else None

    def share(a: float, b: float) -> float | None:
        return round(a / b, 4) if b > 0 else None

    run_s = timing["prefill_s"] + timing["decode_s"]
    nbytes = after["bytes_read"] - before["bytes_read"]
    read_s = after["read_s"] - before["read_s"]
    dec_bytes = after["bytes_read"] - mid["bytes_read"]
    dec_read_s = after["read_s"] - mid["read_s"]
    dec_stall = after["stall_s"] - mid["stall_s"]
    gbps = rate(nbytes, read_s)
    d: dict[str, Any] = {
        "bytes_read": int(nbytes),
        "read_s": round(read_s, 6),
        "read_gbps": gbps,
        "stall_s": round(after["stall_s"] - before["stall_s"], 6),
        "stall_share": share(after["stall_s"] - before["stall_s"], run_s),
        "decode_bytes_read": int(dec_bytes),
        "decode_read_gbps": rate(dec_bytes, dec_read_s),
        "decode_read_gbps_wall": rate(dec_bytes, timing["decode_s"]),
        "decode_stall_s": round(dec_stall, 6),
        "decode_stall_share": share(dec_stall, timing["decode_s"]),
        "ceiling_gbps": None,
        "ceiling_from": None,
        "read_share_of_ceiling": None,
    }
    if ceiling is not None:
        d["ceiling_gbps"] = round(ceiling.gbps, 4)
        d["ceiling_from"] = ceiling.origin
        d["read_share_of_ceiling"] = share(gbps or 0.0, ceiling.gbps)
    for k in (
        "hit_rate",
        "hit_rate_lru",
        "hit_rate_belady",
        "prefetch_precision",
        "prefetch_recall",
    ):
        if k in src:
            d[k] = round(float(src[k]), 4)
    return d


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-prompt timing from the engine's cumulative counters."""
    d = {}
    for k in ("prefill_tokens", "prefill_s", "decode_tokens", "decode_s"):
        d[k] = after[k] - before[k]
    d["prefill_s"] = round(d["prefill_s"], 6)
    d["decode_s"] = round(d["decode_s"], 6)
    d["prefill_tok_s"] = (
        round(d["prefill_tokens"] / d["prefill_s"], 3) if d["prefill_s"] > 0 else None
    )
    d["decode_tok_s"] = (
        round(d["decode_tokens"] / d["decode_s"], 3) if d["decode_s"] > 0 else None
    )
    return d


class _StopMatcher:
    """Cut streamed text at the first stop string; hold back a tail that could
    still become one, so no stop text is ever emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        if final:
            self.held = ""
            return buf, False
        keep = 0  # longest suffix of buf that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False


def read_prompts(path: str | Path, option: str = "--prompts-file") -> list[str]:
    """Prompts from a file: one per line, or JSON Lines with a ``"prompt"`` field
    (a file whose first non-blank line starts with ``{`` is read as JSONL).
    Blank lines are skipped. ``option`` names the file in error messages."""
    import json

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{option} {p}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {p}: not UTF-8 text ({e})") from None
    nonblank = [(i, s) for i, s in enumerate(lines, 1) if s.strip()]
    if not nonblank:
        raise UsageError(f"{option} {p}: the file has no prompts")
    if not nonblank[0][1].lstrip().startswith("{"):
        return [s for _, s in nonblank]
    out = []
    for i, s in nonblank:
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{option} {p}: line {i} is not valid JSON ({e.msg}); "
                'write one {"prompt": "..."} object per line, or plain lines'
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UsageError(
                f"{option} {p}: line {i} has no string field 'prompt'; "
                'write one {"prompt": "..."} object per line'
            )
        out.append(obj["prompt"])
    return out
