"""The inference engine: a store's dense weights in RAM, a KV cache, routed
experts from an :class:`~mer_cli.experts.ExpertSource`, and timing counters.

::

    engine = Engine(Store.open("tiny.mer"), ctx=512)
    logits = engine.prefill([1, 15, 27])   # f32 [V], the last position
    logits = engine.decode_step(42)        # one token through the KV cache
    engine.stats()                         # prefill/decode tok/s, source stats
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mer_cli import kernels as K
from mer_cli.errors import UsageError
from mer_cli.experts import ExpertSource, ResidentExperts
from mer_cli.formats import quant
from mer_cli.formats.store import Store
from mer_cli.models.config import ModelConfig
from mer_cli.models.layers import (
    Architecture,
    KVCache,
    LayerWeights,
    attention_block,
    embed_rows,
    moe_block,
)
from mer_cli.models.mixtral import Mixtral
from mer_cli.models.olmoe import Olmoe
from mer_cli.models.qwen2_moe import Qwen2Moe
from mer_cli.models.qwen3_moe import Qwen3Moe
from mer_cli.prefetch import prefetch_hint

ARCHITECTURES: dict[str, type[Architecture]] = {
    "mixtral": Mixtral,
    "qwen2_moe": Qwen2Moe,
    "qwen3_moe": Qwen3Moe,
    "olmoe": Olmoe,
}

DEFAULT_CTX = 4096
PREFILL_CHUNK = 2048  # most prompt tokens in one batched forward pass

# (layer, hidden [T, D] entering the MoE block, ids [T, K], weights [T, K])
RouteHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class MoeEvent(NamedTuple):
    """What ``Engine.moe_hook`` receives after each MoE router (T tokens, D
    model, K active experts)."""

    layer: int
    start: int  # position of tokens[0]
    tokens: np.ndarray  # int64 [T], the token ids of this forward pass
    residual: np.ndarray  # f32 [T, D], the residual stream entering the MoE block
    normed: np.ndarray  # f32 [T, D], after ffn_norm: what the router sees
    ids: np.ndarray  # int64 [T, K], selected experts
    weights: np.ndarray  # f32 [T, K], their mixing weights


def architecture(cfg: ModelConfig) -> Architecture:
    """The :class:`Architecture` for ``cfg.arch``."""
    try:
        return ARCHITECTURES[cfg.arch](cfg)
    except KeyError:
        raise UsageError(
            f"architecture {cfg.arch!r} has no forward pass; mer runs "
            + ", ".join(ARCHITECTURES)
        ) from None


@dataclass
class Timing:
    """Counters for tokens/s. Prefill = forward passes over more than one token."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    layer_moe_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "prefill_tok_s": _rate(self.prefill_tokens, self.prefill_s),
            "decode_tokens": self.decode_tokens,
            "decode_s": round(self.decode_s, 6),
            "decode_tok_s": _rate(self.decode_tokens, self.decode_s),
        }


def _rate(n: int, s: float) -> float | None:
    return round(n / s, 3) if s > 0 and n else None


class Engine:
    """Runs one sequence at a time over a store.

    Parameters
    ----------
    store : Store
        An opened store; its dense tensors are copied into RAM (resident).
    source : ExpertSource, optional
        Where routed experts come from; default: :class:`ResidentExperts`
        (every extent read into RAM).
    ctx : int, optional
        KV cache length in positions; default ``min(max_position, 4096)``.
    kv_dtype : {"f32", "f16"}
        KV cache element type (f32 by default).
    threads : int, optional
        Compute threads for the numba kernels.
    record_routing : bool
        Keep the experts each layer chose, per forward pass, in ``routing``.
    route_hook : callable, optional
        Called as ``hook(layer, hidden, ids, weights)`` after each MoE router.
    moe_hook : callable, optional
        Called as ``hook(MoeEvent(...))`` after each MoE router (``mer trace``).
    predictor : Predictor, optional
        Ranks prefetches of a streamed source (``mer_cli.predictors``); None:
        router lookahead (:func:`mer_cli.prefetch.prefetch_hint`).
    """

    def __init__(
        self,
        store: Store,
        source: ExpertSource | None = None,
        *,
        ctx: int | None = None,
        kv_dtype: str = "f32",
        threads: int | None = None,
        record_routing: bool = False,
        route_hook: RouteHook | None = None,
        moe_hook: Callable[[MoeEvent], None] | None = None,
        predictor: Any = None,
    ) -> None:
        self.store = store
        self.cfg = cfg = store.model
        self.arch = architecture(cfg)
        K.config.single_blas_thread()
        if threads is not None:
            set_threads(threads)
        if ctx is None:
            ctx = min(cfg.max_position, DEFAULT_CTX)
        if ctx < 1 or ctx > cfg.max_position:
            raise UsageError(
                f"--ctx {ctx} is outside 1..{cfg.max_position} (the model's "
                f"max_position in {store.path}/manifest.json)"
            )
        self.source = source if source is not None else ResidentExperts(store)
        self.resident_experts = getattr(
            self.source, "resident", isinstance(self.source, ResidentExperts)
        )
        self._dense: dict[str, Any] = {}
        self.embed = self._tensor("embed")
        self.final_norm = self._vector("final_norm")
        self.lm_head = (
            self._tensor("lm_head") if store.has("lm_head") else self.embed
        )  # tied embeddings: no lm_head tensor
        self.layers = [self._layer(i) for i in range(cfg.num_layers)]
        self.cache = KVCache(cfg, ctx, kv_dtype)
        self.record_routing = record_routing
        self.route_hook = route_hook
        self.moe_hook = moe_hook
        self.predictor = predictor
        self.routing: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.timing = Timing(layer_moe_s=[0.0] * cfg.num_layers)
        self.fetches = 0  # (layer, expert) pairs fetched by forward passes so far
        self.prefill_chunk = PREFILL_CHUNK

    # ------------------------------------------------------------------ weights

    def _tensor(self, name: str) -> Any:
        """A dense tensor copied out of the memory map into RAM (same dtype)."""
        e = self.store._dense_entry(name)
        buf = np.array(self.store.dense_bytes(name))  # resident copy
        self._dense[name] = buf
        return quant.view(buf, e.dtype, e.shape)

    def _vector(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.store.tensor_f32(name).reshape(-1))

    def _layer(self, i: int) -> LayerWeights:
        cfg, has = self.cfg, self.store.has
        p = f"layers.{i}."
        w = LayerWeights(
            attn_norm=self._vector(p + "attn_norm"),
            ffn_norm=self._vector(p + "ffn_norm"),
            q=self._tensor(p + "q"),
            k=self._tensor(p + "k"),
            v=self._tensor(p + "v"),
            o=self._tensor(p + "o"),
            router=self._tensor(p + "router"),
        )
        if cfg.attn_bias:
            w.q_bias, w.k_bias, w.v_bias = (
                self._vector(p + n) for n in ("q_bias", "k_bias", "v_bias")
            )
        if cfg.qk_norm != "none":
            w.q_norm, w.k_norm = self._vector(p + "q_norm"), self._vector(p + "k_norm")
        if cfg.shared_expert_ffn:
            w.shared_gate_up = self._tensor(p + "shared.gate_up")
            w.shared_down = self._tensor(p + "shared.down")
            if cfg.shared_expert_gate or has(p + "shared.gate"):
                w.shared_gate = self._tensor(p + "shared.gate")
        return w

    @property
    def dense_nbytes(self) -> int:
        return sum(b.nbytes for b in self._dense.values())

    # ------------------------------------------------------------------ running

    @property
    def pos(self) -> int:
        """Number of positions in the KV cache (the next token's position)."""
        return self.cache.length

    @property
    def ctx(self) -> int:
        return self.cache.ctx

    def reset(self) -> None:
        """Forget the sequence (the cache memory is reused)."""
        self.cache.length = 0

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run the prompt ``ids`` as one batch after what the cache holds.

        Prompts longer than ``prefill_chunk`` run as consecutive batches of that
        many tokens (bounded activation memory; each chunk still loads every
        expert it needs once per layer).

        Returns f32 logits ``[V]`` of the last position, or ``[T, V]`` of every
        position with ``all_logits``.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size == 0:
            raise UsageError("the prompt is empty after tokenization; give some text")
        self.cache.check_room(ids.size)
        t0 = time.perf_counter()
        n = self.prefill_chunk
        parts = [
            self.forward(ids[i : i + n], all_logits=all_logits)
            for i in range(0, ids.size, n)
        ]
        logits = np.concatenate(parts) if all_logits else parts[-1]
        dt = time.perf_counter() - t0
        if ids.size > 1:
            self.timing.prefill_tokens += ids.size
            self.timing.prefill_s += dt
        else:
            self.timing.decode_tokens += 1
            self.timing.decode_s += dt
        return logits if all_logits else logits[-1]

    def decode_step(self, token: int) -> np.ndarray:
        """One token through the KV cache; f32 logits ``[V]`` of the next token."""
        t0 = time.perf_counter()
        logits = self.forward(np.array([token], np.int64))[-1]
        self.timing.decode_tokens += 1
        self.timing.decode_s += time.perf_counter() - t0
        return logits

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        """Speculative decoding: the last token and ``k`` drafted ones, ``ids``
        ``[k+1]``, in ONE forward pass (each expert is fetched once for all of
        them); f32 logits ``[k+1, V]``, row ``i`` predicting the token after
        ``ids[i]``. Timed as decode. Every row is bit-identical to what
        :meth:`decode_step` would give at that position (the kernels are
        row-invariant), so greedy acceptance reproduces plain greedy decoding.
        Follow with :meth:`truncate` to drop the rejected drafts."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        t0 = time.perf_counter()
        logits = self.forward(ids, all_logits=True)
        self.timing.decode_tokens += ids.size
        self.timing.decode_s += time.perf_counter() - t0
        return logits

    def truncate(self, pos: int) -> None:
        """Forget positions ``pos..`` of the KV cache (rejected drafts).

        Positions dropped are taken off the decode token count: ``decode_tok_s``
        stays tokens kept per second of decode time.
        """
        n = self.cache.length
        if not 0 <= pos <= n:
            raise ValueError(f"truncate({pos}): the cache holds {n} positions")
        self.cache.length = pos
        self.timing.decode_tokens -= min(n - pos, self.timing.decode_tokens)

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Tokens ``ids`` ``[T]`` at positions ``pos..pos+T-1``; f32 logits
        ``[T, V]`` (only the last row unless ``all_logits``: ``[1, V]``)."""
        cfg, arch, cache = self.cfg, self.arch, self.cache
        V = cfg.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise UsageError(f"token id {bad} is outside the vocabulary 0..{V - 1}")
        T, start = ids.size, cache.length
        cache.check_room(T)
        eps = cfg.rms_norm_eps
        x = embed_rows(self.embed, ids)  # [T, D]
        L = cfg.num_layers
        rec_ids = np.empty((L, T, cfg.top_k), np.int16) if self.record_routing else None
        rec_w = np.empty((L, T, cfg.top_k), np.float32) if self.record_routing else None
        for i, w in enumerate(self.layers):
            x = x + attention_block(
                arch, w, K.rms_norm(x, w.attn_norm, eps), cache, i, start
            )
            hint = None
            if not self.resident_experts:
                hint = prefetch_hint(self, i, x, start, cache)
            t0 = time.perf_counter()
            xn = K.rms_norm(x, w.ffn_norm, eps)
            y, e_ids, e_w = moe_block(arch, w, xn, i, self.source, hint)
            self.fetches += np.unique(e_ids).size  # each fetched once per pass
            self.timing.layer_moe_s[i] += time.perf_counter() - t0
            if rec_ids is not None:
                rec_ids[i], rec_w[i] = e_ids, e_w
            if self.route_hook is not None:
                self.route_hook(i, xn, e_ids, e_w)
            if self.moe_hook is not None:
                self.moe_hook(MoeEvent(i, start, ids, x, xn, e_ids, e_w))
            x = x + y
        cache.length = start + T
        if rec_ids is not None:
            self.routing.append((np.arange(start, start + T), rec_ids, rec_w))
        if not all_logits:
            x = x[-1:]
        return K.linear(self.lm_head, K.rms_norm(x, self.final_norm, eps))

    def reset_stats(self) -> None:
        """Zero the timing counters (e.g. after a warm-up run in a benchmark)."""
        self.timing = Timing(layer_moe_s=[0.0] * self.cfg.num_layers)

    def stats(self) -> dict[str, Any]:
        """Timing counters plus the expert source's own stats."""
        d: dict[str, Any] = self.timing.as_dict()
        d["kv_cache"] = {
            "dtype": self.cache.dtype,
            "ctx": self.cache.ctx,
            "nbytes": self.cache.nbytes,
        }
        d["source"] = self.source.stats()
        return d

    def close(self) -> None:
        self.source.close()


def set_threads(n: int) -> int:
    """Use ``n`` compute threads (capped at what numba started with); returns it."""
    if n < 1:
        raise UsageError(f"--threads {n}: expected a whole number >= 1")
    return K.set_threads(n)
