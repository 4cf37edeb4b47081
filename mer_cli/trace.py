"""Record routing traces (:mod:`mer_cli.formats.trace`) while a model runs.

::

    from mer_cli.trace import trace
    t = trace("tiny.mer", ["Once upon a time"], "run.trace.npz", max_tokens=32)
    t.experts.shape  # [N, L, K]

:class:`TraceRecorder` is an ``Engine.moe_hook``: attach it to any engine
(``mer generate --trace-out`` does) and call :meth:`TraceRecorder.finish`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli import kernels as K
from mer_cli.errors import UsageError
from mer_cli.formats.trace import (
    DEFAULT_LOOKAHEAD,
    DEFAULT_SKETCH_DIM,
    DEFAULT_SKETCH_SEED,
    FORMAT,
    MAX_LOOKAHEAD,
    PREVIEW_ARRAYS,
    VERSION,
    Sketcher,
    Trace,
    make_projection,
)
from mer_cli.models.layers import attention_preview


class TraceRecorder:
    """Collects one :class:`~mer_cli.formats.trace.Trace` from an engine's
    MoE events; a new prompt starts whenever a forward pass starts at
    position 0 (the engine was reset).

    Parameters
    ----------
    engine : Engine
        The recorder installs itself as ``engine.moe_hook``.
    sketch_dim, seed : int
        Width and seed of the random projection of the residual stream.
    lookahead : int
        Router-lookahead distances to record (0..3): layer ``l+d``'s norm and
        router applied to the residual entering layer ``l``, ``d = 1..A``.
    preview : bool
        Also record the attention preview of layer ``l+1`` at every layer
        ``l`` (:func:`mer_cli.models.layers.attention_preview`; it runs layer
        ``l+1``'s attention once more, early, on the engine's KV cache, so the
        engine must be a single-sequence :class:`~mer_cli.runtime.Engine`).
    """

    def __init__(
        self,
        engine,
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        seed: int = DEFAULT_SKETCH_SEED,
        lookahead: int = DEFAULT_LOOKAHEAD,
        preview: bool = True,
    ) -> None:
        cfg = engine.cfg
        check_lookahead(lookahead)
        self.engine = engine
        self.depth = lookahead
        self.projection = make_projection(cfg.hidden_size, sketch_dim, seed)  # [D,S]
        self.sketch = Sketcher(self.projection)
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "store_id": engine.store.store_id.hex(),
            "arch": cfg.arch,
            "num_layers": cfg.num_layers,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "hidden_size": cfg.hidden_size,
            "sketch_dim": sketch_dim,
            "sketch_seed": seed,
            "created_by": _created_by(),
            "lookahead_depth": lookahead,
            "preview": preview,
        }
        self._parts: dict[str, list[np.ndarray]] = {
            n: [] for n in ("tokens", "positions", "prompt")
        }
        self._layers: dict[str, list[np.ndarray]] = {
            n: []
            for n in ("experts", "weights", "probs", "sketch", "lookahead")
            + tuple(PREVIEW_ARRAYS)
        }
        self._prompt = -1
        engine.moe_hook = self

    def __call__(self, ev) -> None:
        L, cfg = self.meta["num_layers"], self.engine.cfg
        T = ev.tokens.shape[0]
        if ev.layer == 0:
            if ev.start == 0:
                self._prompt += 1
            self._parts["tokens"].append(ev.tokens.astype(np.int32))
            self._parts["positions"].append(
                np.arange(ev.start, ev.start + T, dtype=np.int32)
            )
            self._parts["prompt"].append(np.full(T, self._prompt, np.int32))
            S = self.projection.shape[1]
            self._layers["experts"].append(np.empty((T, L, cfg.top_k), np.int16))
            self._layers["weights"].append(np.empty((T, L, cfg.top_k), np.float16))
            self._layers["probs"].append(np.empty((T, L, cfg.num_experts), np.float16))
            self._layers["sketch"].append(np.empty((T, L, S), np.float16))
            A, E = self.depth, cfg.num_experts
            self._layers["lookahead"].append(np.zeros((T, L, A, E), np.float16))
            if self.meta["preview"]:
                self._layers["preview_sketch"].append(np.zeros((T, L, S), np.float16))
                self._layers["preview_probs"].append(np.zeros((T, L, E), np.float16))
        i = ev.layer
        # the router logits again, as moe_block computed them (same kernel, input)
        router = self.engine.layers[i].router
        probs = K.softmax(np.asarray(K.linear(router, ev.normed), np.float32))
        self._layers["experts"][-1][:, i] = ev.ids
        self._layers["weights"][-1][:, i] = ev.weights
        self._layers["probs"][-1][:, i] = probs
        self._layers["sketch"][-1][:, i] = self.sketch(ev.residual)
        for d in range(1, min(self.depth, L - 1 - i) + 1):
            nxt = self.engine.layers[i + d]
            h = K.rms_norm(ev.residual, nxt.ffn_norm, cfg.rms_norm_eps)
            p = K.softmax(np.asarray(K.linear(nxt.router, h), np.float32))
            self._layers["lookahead"][-1][:, i, d - 1] = p
        if self.meta["preview"] and i + 1 < L:
            eng, nxt = self.engine, self.engine.layers[i + 1]
            h = attention_preview(
                eng.arch, nxt, i + 1, ev.residual, eng.cache, ev.start
            )
            self._layers["preview_sketch"][-1][:, i] = self.sketch(h)
            hn = K.rms_norm(h, nxt.ffn_norm, cfg.rms_norm_eps)
            p = K.softmax(np.asarray(K.linear(nxt.router, hn), np.float32))
            self._layers["preview_probs"][-1][:, i] = p

    def finish(self) -> Trace:
        """The trace of everything recorded so far (the engine stays hooked)."""
        cfg = self.engine.cfg
        L, S = cfg.num_layers, self.projection.shape[1]
        empty = {
            "tokens": (0,),
            "positions": (0,),
            "prompt": (0,),
            "experts": (0, L, cfg.top_k),
            "weights": (0, L, cfg.top_k),
            "probs": (0, L, cfg.num_experts),
            "sketch": (0, L, S),
            "lookahead": (0, L, self.depth, cfg.num_experts),
            "preview_sketch": (0, L, S),
            "preview_probs": (0, L, cfg.num_experts),
        }
        dtypes = {"tokens": np.int32, "positions": np.int32, "prompt": np.int32}
        dtypes |= {"experts": np.int16}
        arrays = {}
        for name, parts in {**self._parts, **self._layers}.items():
            if parts:
                arrays[name] = np.concatenate(parts)
            else:
                arrays[name] = np.empty(empty[name], dtypes.get(name, np.float16))
        if not self.depth:
            del arrays["lookahead"]
        if not self.meta["preview"]:
            for name in PREVIEW_ARRAYS:
                del arrays[name]
        return Trace(meta=dict(self.meta), projection=self.projection, **arrays)


def check_lookahead(depth: int) -> int:
    """``depth`` if it is a valid router-lookahead depth, else :class:`UsageError`."""
    if not 0 <= depth <= MAX_LOOKAHEAD:
        raise UsageError(
            f"--lookahead {depth}: expected a whole number 0..{MAX_LOOKAHEAD}"
        )
    return depth


def trace(
    model: str | os.PathLike,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    max_tokens: int = 64,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = DEFAULT_SKETCH_SEED,
    lookahead: int = DEFAULT_LOOKAHEAD,
    preview: bool = True,
    ram_budget: Any = None,
    ctx: int | None = None,
    threads: int | None = None,
    config: Any = None,
    progress: bool = True,
) -> Trace:
    """Run ``prompts`` through the store ``model`` with greedy decoding and
    write the routing trace of every token to ``out``.

    Parameters
    ----------
    model : path of a store.
    prompts : the prompt texts, one sequence each.
    out : the trace file to write (atomically).
    max_tokens : tokens to generate after each prompt (greedy); 0 traces the
        prompts alone.
    sketch_dim, seed : the residual-stream projection's width and seed.
    lookahead : router-lookahead distances to record (0..3, see mer-trace(5)).
    preview : record the attention preview (see mer-trace(5)).
    ram_budget : bytes or a size string for cached experts (streams above it).
    progress : show a tqdm bar (prompts) on stderr.

    Returns
    -------
    Trace : what was written.
    """
    from mer_cli.config import Config
    from mer_cli.formats.store import Store
    from mer_cli.generate import GenerateOptions, generate_many, load
    from mer_cli.sources import SourceOptions, open_source, plan_source

    options = GenerateOptions(max_tokens=max_tokens, temperature=0.0)
    options.check()
    make_projection(1, sketch_dim, seed)  # checks --sketch-dim before any work
    check_lookahead(lookahead)
    store = Store.open(model)
    plan = plan_source(store, SourceOptions(ram_budget=ram_budget), config or Config())
    engine, tok = load(
        model, ctx=ctx, threads=threads, source=lambda st: open_source(st, plan)
    )
    try:
        rec = TraceRecorder(engine, sketch_dim, seed, lookahead, preview)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="prompt", desc="trace", leave=False)
        for c in generate_many(engine, tok, prompts, options):
            if max_tokens == 0:  # the prompt alone (Completion would skip it)
                engine.reset()
                engine.prefill(tok.encode(c.result.prompt))
            else:
                c.run()
            if bar is not None:
                bar.set_postfix(tokens=sum(p.size for p in rec._parts["tokens"]))
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        engine.close()
    t = rec.finish()
    t.save(Path(out))
    return t


def _created_by() -> str:
    from mer_cli import __version__

    return f"mer-cli {__version__}"
