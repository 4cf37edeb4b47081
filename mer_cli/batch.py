"""Continuous batching: several prompts decode together, sharing expert reads.

::

    from mer_cli.batch import BatchGeneration
    from mer_cli.generate import GenerateOptions, load
    engine, tok = load("m.mer")
    run = BatchGeneration(engine, tok, prompts, GenerateOptions(max_tokens=64), 16)
    for result in run:            # GenerateResult, in input order
        print(result.completion)
    run.stats.as_dict()           # aggregate tok/s, expert bytes per token, KV memory

Up to ``batch`` sequences are in flight. Each decode step runs one token of
every sequence through the model at once (:func:`decode_step_batch`): the
dense products (q/k/v/o, routers, lm_head) and each routed expert run once over
all the rows, and every layer fetches the union of the experts the rows chose
once, so an expert read from the drive serves every token routed to it.
Attention runs per sequence over its own KV cache. A sequence that finishes
leaves the batch and the next prompt joins; its prompt is prefilled alone (the
same forward passes a single run makes).

Every result is identical to what :class:`~mer_cli.generate.Completion` gives
for that prompt alone: the kernels give bit-identical rows whether a row is
computed alone or beside others (``mer_cli.kernels.ROW_INVARIANT_ROWS``), the
MoE block sums each token's experts in expert order, and each sequence has its
own sampler seeded as a single run seeds it.

KV memory: each sequence gets a cache of exactly the positions it can use
(``min(ctx, prompt + max_tokens - 1)``); the sum over the sequences in flight
stays within ``kv_budget`` bytes (a prompt waits for room). It is reported
beside the expert cache's budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mer_cli import kernels as K
from mer_cli.errors import ResourceError, UsageError
from mer_cli.generate import (
    FINISH_CONTEXT,
    FINISH_EOS,
    FINISH_INTERRUPTED,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateOptions,
    GenerateResult,
    _StopMatcher,
)
from mer_cli.memory import available_memory
from mer_cli.models.layers import (
    ContextFullError,
    KVCache,
    attend,
    embed_rows,
    moe_block,
)
from mer_cli.prefetch import prefetch_hint
from mer_cli.sampling import Sampler
from mer_cli.units import format_size


def max_batch() -> int:
    """Largest ``--batch``: the rows up to which every kernel is row-invariant."""
    return int(K.ROW_INVARIANT_ROWS)


def kv_bytes_per_position(cfg: Any, kv_dtype: str) -> int:
    """Bytes one position takes in a :class:`KVCache` (keys and values, all layers)."""
    item = 4 if kv_dtype == "f32" else 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item


# ---------------------------------------------------------------- the batched step


def decode_step_batch(
    engine: Any, tokens: Sequence[int], caches: Sequence[KVCache]
) -> tuple[np.ndarray, int]:
    """One token for each of ``B`` sequences through ``engine``'s model.

    Parameters
    ----------
    engine : Engine
        Its weights, architecture and expert source are used; its own KV cache
        is not.
    tokens : B token ids, ``tokens[b]`` at position ``caches[b].length``.
    caches : B KV caches (one per sequence); each grows by one position.

    Returns
    -------
    logits : f32 ``[B, V]``
        Row ``b`` bit-identical to ``engine.decode_step(tokens[b])`` on a cache
        holding what ``caches[b]`` holds.
    fetches : int
        ``(layer, expert)`` pairs fetched from the source: the union of the
        rows' choices in each layer, each fetched once.
    """
    cfg, arch = engine.cfg, engine.arch
    ids = np.asarray(tokens, np.int64).reshape(-1)
    B, V = ids.size, cfg.vocab_size
    if B != len(caches) or not 1 <= B <= max_batch():
        raise ValueError(
            f"decode_step_batch: {B} tokens for {len(caches)} caches; expected "
            f"1..{max_batch()} of each"
        )
    if ids.min() < 0 or ids.max() >= V:
        bad = int(ids[(ids < 0) | (ids >= V)][0])
        raise UsageError(f"token id {bad} is outside the vocabulary 0..{V - 1}")
    for c in caches:
        c.check_room(1)
    t0 = time.perf_counter()
    starts = [c.length for c in caches]
    pos = min(starts)  # > 0: no sequence starts in a decode step
    eps = cfg.rms_norm_eps
    x = embed_rows(engine.embed, ids)  # [B, D]
    fetches = 0
    for i, w in enumerate(engine.layers):
        q, k, v = arch.project_qkv(w, K.rms_norm(x, w.attn_norm, eps))
        heads = np.concatenate(  # [B, H*hd]: each sequence over its own cache
            [
                attend(arch, q[b : b + 1], k[b : b + 1], v[b : b + 1], c, i, s)
                for b, (c, s) in enumerate(zip(caches, starts))
            ]
        )
        x = x + K.linear(w.o, heads)
        # prefetch: the next layer's router over every row (union of guesses)
        hint = None if engine.resident_experts else prefetch_hint(engine, i, x, pos)
        t1 = time.perf_counter()
        y, chosen, _ = moe_block(
            arch, w, K.rms_norm(x, w.ffn_norm, eps), i, engine.source, hint
        )
        engine.timing.layer_moe_s[i] += time.perf_counter() - t1
        fetches += np.unique(chosen).size
        x = x + y
    for c, s in zip(caches, starts):
        c.length = s + 1
    logits = K.linear(engine.lm_head, K.rms_norm(x, engine.final_norm, eps))
    engine.timing.decode_tokens += B
    engine.timing.decode_s += time.perf_counter() - t0
    return logits, fetches


# ---------------------------------------------------------------- sequences


@dataclass
class _Sequence:
    """One prompt's state while it waits, runs and finishes."""

    index: int
    ids: list[int]
    capacity: int  # KV positions it can use
    result: GenerateResult
    cache: KVCache | None = None
    sampler: Sampler | None = None
    stops: _StopMatcher | None = None
    dec: Any = None
    tokens: list[int] = field(default_factory=list)
    next_token: int = -1  # fed at the next decode step
    t_join: float = 0.0
    ttft: float | None = None
    decode_steps: int = 0
    decode_s: float = 0.0  # wall time of the batch steps it took part in
    prefill_s: float = 0.0


@dataclass
class BatchStats:
    """Aggregate figures of a batched run (``--stats``; ``as_dict`` for JSON)."""

    batch: int
    prompts: int = 0
    steps: int = 0  # batched decode steps
    rows: int = 0  # sequence-tokens decoded in those steps (sum of batch sizes)
    completion_tokens: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float = 0.0
    expert_fetches: int = 0  # (layer, expert) fetches of the decode steps
    expert_fetches_unshared: int = 0  # what one-token steps would have fetched
    extent_nbytes: int = 0
    decode_bytes_read: int = 0  # from the drive, during decode steps
    bytes_read: int = 0  # from the drive, whole run
    kv_budget: int = 0
    kv_peak_nbytes: int = 0
    kv_dtype: str = "f32"
    expert_cache_nbytes: int = 0  # the expert source's budget (resident: all)
    expert_source: str = "resident"

    def as_dict(self) -> dict[str, Any]:
        def rate(n: float, s: float) -> float | None:
            return round(n / s, 3) if s > 0 and n else None

        def per(n: float, d: float) -> float | None:
            return round(n / d, 1) if d else None

        return {
            "batch": self.batch,
            "prompts": self.prompts,
            "steps": self.steps,
            "mean_batch": round(self.rows / self.steps, 3) if self.steps else None,
            "completion_tokens": self.completion_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "prefill_tok_s": rate(self.prefill_tokens, self.prefill_s),
            "decode_tokens": self.rows,
            "decode_s": round(self.decode_s, 6),
            "decode_tok_s": rate(self.rows, self.decode_s),
            "wall_s": round(self.wall_s, 6),
            "tok_s": rate(self.completion_tokens, self.wall_s),
            "expert_fetches": self.expert_fetches,
            "expert_fetches_unshared": self.expert_fetches_unshared,
            "expert_bytes_per_token": per(
                self.expert_fetches * self.extent_nbytes, self.rows
            ),
            "expert_bytes_per_token_unshared": per(
                self.expert_fetches_unshared * self.extent_nbytes, self.rows
            ),
            "decode_bytes_read": self.decode_bytes_read,
            "decode_bytes_read_per_token": per(self.decode_bytes_read, self.rows),
            "bytes_read": self.bytes_read,
            "kv_cache": {
                "dtype": self.kv_dtype,
                "budget": self.kv_budget,
                "peak_nbytes": self.kv_peak_nbytes,
            },
            "expert_cache_nbytes": self.expert_cache_nbytes,
            "expert_source": self.expert_source,
        }


def _bytes_read(source: Any) -> int:
    reader = getattr(source, "reader", None)
    return int(reader.stats()["bytes_read"]) if reader is not None else 0


class BatchGeneration:
    """Generate completions of ``prompts`` with up to ``batch`` decoding together.

    Iterate for the :class:`~mer_cli.generate.GenerateResult` of each prompt in
    input order, each as soon as it and every earlier prompt are done.
    ``stats`` holds the aggregate figures (complete once iteration ends).

    Parameters
    ----------
    engine : Engine
    tokenizer : Tokenizer
    prompts : the prompt texts (the user message when ``options.chat``).
    options : GenerateOptions
        Shared by every prompt; each sequence gets its own sampler seeded as a
        single run's (same seed, same tokens).
    batch : int
        Most sequences in flight, ``1..max_batch()``.
    kv_budget : int, optional
        Bytes for the KV caches of the sequences in flight; default: what
        ``batch`` of the longest prompts need. A prompt whose cache alone
        exceeds it is refused (ResourceError).

    Raises
    ------
    UsageError
        ``batch`` out of range, or a prompt empty after tokenization.
    ContextFullError
        A prompt longer than the engine's context (``--ctx``).
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        options: GenerateOptions,
        batch: int,
        kv_budget: int | None = None,
    ) -> None:
        options.check()
        if not 1 <= batch <= max_batch():
            raise UsageError(
                f"--batch {batch}: expected a whole number in 1..{max_batch()} "
                "(rows the kernels compute bit-identically to one-token steps)"
            )
        self.engine, self.tok, self.options, self.batch = (
            engine,
            tokenizer,
            options,
            batch,
        )
        self.kv_dtype = engine.cache.dtype
        self.per_position = kv_bytes_per_position(engine.cfg, self.kv_dtype)
        self.pending = [self._sequence(i, p) for i, p in enumerate(prompts)]
        need = max((s.capacity for s in self.pending), default=0)
        one = need * self.per_position
        if kv_budget is None:
            kv_budget = batch * one
        elif kv_budget < one:
            raise ResourceError(
                f"--kv-budget {format_size(kv_budget)} ({kv_budget} bytes) is "
                f"smaller than the KV cache of the longest prompt ({need} positions "
                f"x {self.per_position} bytes = {format_size(one)}); raise "
                "--kv-budget, or lower --max-tokens or --ctx"
            )
        self.kv_budget = int(kv_budget)
        # the expert slots and dense weights are allocated by now: what is left
        # must hold the caches of the sequences that can be in flight at once
        kv_max = min(self.kv_budget, batch * one)
        avail = available_memory()
        if kv_max > avail:
            raise ResourceError(
                f"the KV caches of up to {batch} sequences need "
                f"{format_size(kv_max)} but {format_size(avail)} of memory is left "
                "beside the expert cache and the dense weights; lower --kv-budget, "
                "--batch, --max-tokens or --ram-budget"
            )
        self._started: dict[int, _Sequence] = {}  # joined, not yet yielded
        src = engine.source.stats()
        self.stats = BatchStats(
            batch=batch,
            prompts=len(self.pending),
            extent_nbytes=int(engine.store.extent_nbytes),
            kv_budget=self.kv_budget,
            kv_dtype=self.kv_dtype,
            expert_cache_nbytes=int(
                src.get(
                    "ram_budget", engine.store.extent_nbytes * len(engine.store.experts)
                )
            ),
            expert_source=str(src.get("source", "resident")),
        )

    def _sequence(self, index: int, prompt: str) -> _Sequence:
        o, tok = self.options, self.tok
        text = prompt
        if o.chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}])
        ids = tok.encode(text)
        if not ids:
            raise UsageError(
                f"prompt {index + 1} is empty (no tokens after tokenization); give "
                "some text"
            )
        ctx = self.engine.ctx
        if len(ids) > ctx:
            raise ContextFullError(
                f"prompt {index + 1} has {len(ids)} tokens > --ctx {ctx}; raise "
                "--ctx (the model allows up to its max_position) or shorten the "
                "prompt"
            )
        cap = min(ctx, len(ids) + max(o.max_tokens - 1, 0))
        res = GenerateResult(prompt=prompt, prompt_tokens=len(ids))
        return _Sequence(index, ids, cap, res)

    # ------------------------------------------------------------ scheduling

    def __iter__(self) -> Iterator[GenerateResult]:
        eng, st = self.engine, self.stats
        t_start = time.perf_counter()
        read0 = _bytes_read(eng.source)
        active: list[_Sequence] = []
        done: dict[int, GenerateResult] = {}
        queue = list(self.pending)
        next_out = 0
        try:
            while queue or active:
                # join: the next prompts, while a slot and their KV memory are free
                while queue and len(active) < self.batch:
                    used = sum(a.cache.nbytes for a in active)
                    if used + queue[0].capacity * self.per_position > self.kv_budget:
                        break
                    s = queue.pop(0)
                    self._started[s.index] = s
                    if self._join(s):
                        active.append(s)
                        st.kv_peak_nbytes = max(
                            st.kv_peak_nbytes, used + s.cache.nbytes
                        )
                    else:
                        done[s.index] = self._finish(s)
                if active:
                    self._step(active)
                    for s in [s for s in active if s.result.finish_reason != _RUNNING]:
                        active.remove(s)
                        done[s.index] = self._finish(s)
                while next_out in done:
                    del self._started[next_out]
                    yield done.pop(next_out)
                    next_out += 1
        finally:
            st.wall_s = time.perf_counter() - t_start
            st.bytes_read = _bytes_read(eng.source) - read0

    def unfinished(self) -> list[GenerateResult]:
        """After an interrupted iteration: the results of the prompts that had
        started and were not yielded, in input order; those still decoding end
        with ``finish_reason`` "interrupted" and the text they had."""
        out = []
        for i in sorted(self._started):
            s = self._started.pop(i)
            if s.result.finish_reason == _RUNNING:
                s.result.finish_reason = FINISH_INTERRUPTED
                self._finish(s)
            out.append(s.result)
        return out

    def _join(self, s: _Sequence) -> bool:
        """Prefill ``s`` alone and take its first token; False if it is done."""
        o, eng = self.options, self.engine
        s.t_join = time.perf_counter()
        s.result.finish_reason = _RUNNING
        s.sampler = Sampler(o.sampling())
        s.stops = _StopMatcher(o.stop)
        s.dec = self.tok.decoder(s.ids)
        if o.max_tokens == 0:
            s.result.finish_reason = FINISH_LENGTH
            return False
        s.cache = KVCache(eng.cfg, s.capacity, self.kv_dtype)
        own = eng.cache
        eng.cache = s.cache  # Engine.prefill runs on the engine's cache
        try:
            logits = eng.prefill(s.ids)
        finally:
            eng.cache = own
        s.prefill_s = time.perf_counter() - s.t_join
        self.stats.prefill_tokens += len(s.ids)
        self.stats.prefill_s += s.prefill_s
        return self._accept(s, logits)

    def _step(self, active: list[_Sequence]) -> None:
        """One batched decode step of every active sequence."""
        eng, st = self.engine, self.stats
        read0 = _bytes_read(eng.source)
        t0 = time.perf_counter()
        logits, fetches = decode_step_batch(
            eng, [s.next_token for s in active], [s.cache for s in active]
        )
        dt = time.perf_counter() - t0
        st.steps += 1
        st.rows += len(active)
        st.decode_s += dt
        st.expert_fetches += fetches
        st.expert_fetches_unshared += len(active) * eng.cfg.num_layers * eng.cfg.top_k
        st.decode_bytes_read += _bytes_read(eng.source) - read0
        for b, s in enumerate(active):
            s.decode_steps += 1
            s.decode_s += dt
            self._accept(s, logits[b])

    def _accept(self, s: _Sequence, logits: np.ndarray) -> bool:
        """Take the next token from ``logits``, as Completion's loop does; True
        while ``s`` continues (``s.next_token`` is fed at the next step)."""
        o, res = self.options, s.result
        token = s.sampler(logits)
        if s.ttft is None:
            s.ttft = time.perf_counter() - s.t_join
        if self.tok.is_eos(token):
            res.finish_reason = FINISH_EOS
            self._flush(s)
            return False
        s.tokens.append(token)
        res.completion_tokens = len(s.tokens)
        piece, hit = s.stops.feed(s.dec.push(token))
        res.completion += piece
        if hit:
            res.finish_reason = FINISH_STOP
            return False
        if len(s.tokens) >= o.max_tokens:
            res.finish_reason = FINISH_LENGTH
            self._flush(s)
            return False
        if s.cache.length >= self.engine.ctx:
            res.finish_reason = FINISH_CONTEXT
            self._flush(s)
            return False
        s.next_token = token
        return True

    @staticmethod
    def _flush(s: _Sequence) -> None:
        piece, hit = s.stops.feed(s.dec.flush(), final=True)
        if hit:
            s.result.finish_reason = FINISH_STOP
        s.result.completion += piece

    def _finish(self, s: _Sequence) -> GenerateResult:
        """Fill ``s``'s stats, free its cache, count it; its result."""
        from mer_cli.memory import peak_rss_bytes

        res, st = s.result, self.stats
        st.completion_tokens += res.completion_tokens
        res.stats = {
            "prefill_tokens": len(s.ids) if s.cache is not None else 0,
            "prefill_s": round(s.prefill_s, 6),
            "prefill_tok_s": (
                round(len(s.ids) / s.prefill_s, 3) if s.prefill_s > 0 else None
            ),
            "decode_tokens": s.decode_steps,
            "decode_s": round(s.decode_s, 6),
            "decode_tok_s": (
                round(s.decode_steps / s.decode_s, 3) if s.decode_s > 0 else None
            ),
            "time_to_first_token_s": round(s.ttft, 6) if s.ttft is not None else None,
            "seed": s.sampler.seed if self.options.temperature > 0 else None,
            "batch": self.batch,
            "kv_cache": {
                "dtype": self.kv_dtype,
                "ctx": s.capacity,
                "nbytes": s.cache.nbytes if s.cache is not None else 0,
                "budget": self.kv_budget,
            },
            "expert_cache_nbytes": self.stats.expert_cache_nbytes,
            "source": self.engine.source.stats(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        s.cache = None
        return res


_RUNNING = "running"  # finish_reason while a sequence is in the batch
