"""Fitting and scoring the ``shadow`` predictor (:class:`~mer_cli.predictors.ShadowPredictor`).

A shadow predictor holds, for every expert ``e`` of every layer ``l``, a
rank-R linear surrogate ``S(xn) = shadow_out @ (shadow_in @ [xn, 1])`` of the
expert's output on its normed input ``xn``. The surrogates are fitted by
ridge least squares on the experts' real inputs and outputs, which
:func:`fit_shadow` collects by replaying the training prompts of a trace
through the store (one prefill per prompt, the trace's tokens in order): the
sums ``[xn, 1]^T [xn, 1]`` and ``[xn, 1]^T y`` per expert are all it keeps.
The rank-R fit is the reduced-rank regression: the full least-squares map
projected on the top R principal directions of its fitted outputs.

Traces hold no hidden states, so a shadow predictor is scored by replaying
the held-out prompts too, token by token (:func:`shadow_scores`): at each layer the surrogate
MoE output is added to the residual, layer ``l+1``'s attention preview taken
of it, and layer ``l+1``'s router applied, as ``mer generate --predictor``
does at each decode step (:func:`mer_cli.prefetch.prefetch_hint`).

On the built-in model (16 experts, width 128, FFN 256) a rank-32 surrogate is
8% of an expert's parameters; at Mixtral-8x7B's shapes (4096, 14336) it would
be 0.15%. The fit statistics are ``(D + 1) (2 D + 1)`` f64 per expert, which
:func:`fit_shadow` refuses above :data:`MAX_FIT_BYTES` in all (a Mixtral-wide
fit would need a layer-by-layer pass; not written).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mer_cli.errors import UsageError
from mer_cli.predictors import ShadowPredictor
from mer_cli.units import format_size

RANK = 32  # surrogate rank (clipped to the model width)
RIDGE = 1e-3  # ridge strength per sample (relative to the identity)
MAX_FIT_BYTES = 4 << 30  # fit statistics held at once


def reduced_rank_fit(
    xtx: np.ndarray, xty: np.ndarray, n: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` ridge least squares from the sums of ``n`` samples:
    ``xtx`` = ``X^T X`` ``[P, P]`` and ``xty`` = ``X^T Y`` ``[P, D]`` (f64).

    Returns ``(A, B)``, f32 ``[R, P]`` and ``[D, R]``, with ``X @ A.T @ B.T``
    the full fit ``X @ W`` (``W = (X^T X + ridge n I)^-1 X^T Y``) projected on
    the top ``R`` principal directions of its outputs (the eigenvectors of
    ``W^T X^T X W``): the reduced-rank regression.
    """
    P = xtx.shape[0]
    W = np.linalg.solve(xtx + RIDGE * max(n, 1) * np.eye(P), xty)  # [P, D]
    R = min(rank, W.shape[1], P)
    vals, vecs = np.linalg.eigh(W.T @ xtx @ W)  # ascending
    V = vecs[:, ::-1][:, :R]  # [D, R]
    return (W @ V).T.astype(np.float32), V.astype(np.float32)


def _expert_fn(store: Any, layer: int, expert: int) -> Callable[[np.ndarray], Any]:
    """The expert's f32 output ``[n, D]`` for normed inputs ``[n, D]``."""
    parts = store.expert_parts(store.expert_bytes(layer, expert))

    def f32(a) -> np.ndarray:  # q4/q8 tensors dequantize, f32 ones are arrays
        return np.asarray(a.dequantize() if hasattr(a, "dequantize") else a, np.float32)

    gu = f32(parts["gate_up"])  # [2F, D]: gate rows, then up rows
    dn = f32(parts["down"])  # [D, F]
    F = gu.shape[0] // 2

    def f(xn: np.ndarray) -> np.ndarray:
        h = xn @ gu.T
        g = h[:, :F]
        return (g / (1 + np.exp(-g)) * h[:, F:]) @ dn.T

    return f


def _replay(
    engine: Any,
    trace: Any,
    hook: Callable,
    progress: bool,
    what: str,
    one_by_one: bool = False,
):
    """Feed each prompt's tokens of ``trace`` (position order) to ``engine``
    with ``hook`` as its ``moe_hook``: in one prefill, or ``one_by_one`` as
    decode steps (each position's attention preview then sees the earlier
    positions' real keys and values, as at a live decode step); yields the
    trace rows of each prompt after its passes."""
    from tqdm import tqdm

    engine.moe_hook = hook
    try:
        for p in tqdm(
            range(trace.num_prompts), desc=what, unit="prompt", disable=not progress
        ):
            rows = np.nonzero(trace.prompt == p)[0]
            rows = rows[np.argsort(trace.positions[rows], kind="stable")]
            ids = trace.tokens[rows].astype(np.int64)
            engine.reset()
            if one_by_one:
                engine.prefill(ids[:1])
                for t in ids[1:]:
                    engine.decode_step(int(t))
            else:
                engine.prefill(ids)
            yield rows
    finally:
        engine.moe_hook = None


def _check_model(store: Any, trace: Any) -> None:
    from mer_cli.train_predictor import check_traced_store

    check_traced_store(store, trace)
    cfg = store.model
    if cfg.shared_expert_ffn or cfg.routing != "topk_softmax":
        raise UsageError(
            f"--kind shadow: {store.path} routes with {cfg.routing}"
            f"{' and a shared expert' if cfg.shared_expert_ffn else ''}; the "
            "shadow predictor models top-k softmax routing without a shared "
            "expert (Mixtral's): use --kind mlp+preview"
        )


def fit_shadow(
    store: Any,
    train: Any,
    meta: dict[str, Any],
    *,
    rank: int = RANK,
    progress: bool = True,
) -> ShadowPredictor:
    """Fit a shadow predictor on the training prompts ``train`` (a Trace of
    ``store``) by replaying them; ``meta`` is the predictor meta to extend."""
    from mer_cli.runtime import Engine

    _check_model(store, train)
    cfg = store.model
    L, E, D = cfg.num_layers, cfg.num_experts, cfg.hidden_size
    need = L * E * (D + 1) * (2 * D + 1) * 8
    if need > MAX_FIT_BYTES:
        raise UsageError(
            f"--kind shadow: fitting {L * E} experts of width {D} holds "
            f"{format_size(need)} of statistics, over the "
            f"{format_size(MAX_FIT_BYTES)} this fit allows (a layer-by-layer fit "
            "is not written yet); use --kind mlp+preview for a model this wide"
        )
    xtx = np.zeros((L, E, D + 1, D + 1))
    xty = np.zeros((L, E, D + 1, D))
    n = np.zeros((L, E), np.int64)
    fns: dict[tuple[int, int], Callable] = {}

    def hook(ev) -> None:
        for e in np.unique(ev.ids):
            e = int(e)
            rows = np.nonzero((ev.ids == e).any(-1))[0]
            xn = ev.normed[rows]
            f = fns.get((ev.layer, e))
            if f is None:
                f = fns[(ev.layer, e)] = _expert_fn(store, ev.layer, e)
            xb = np.concatenate([xn, np.ones((len(rows), 1), np.float32)], 1)
            xb = xb.astype(np.float64)
            xtx[ev.layer, e] += xb.T @ xb
            xty[ev.layer, e] += xb.T @ f(xn)
            n[ev.layer, e] += len(rows)

    engine = Engine(store, ctx=cfg.max_position)
    try:
        for _ in _replay(engine, train, hook, progress, "shadow fit"):
            pass
    finally:
        engine.close()
    R = min(rank, D)
    a_in = np.zeros((L, E, R, D + 1), np.float32)
    a_out = np.zeros((L, E, D, R), np.float32)
    for la in range(L):
        for e in range(E):
            if n[la, e]:  # an expert never routed to keeps a zero surrogate
                a_in[la, e], a_out[la, e] = reduced_rank_fit(
                    xtx[la, e], xty[la, e], int(n[la, e]), R
                )
    from mer_cli.train_predictor import store_routers

    routers, norms = store_routers(store)
    meta = {
        **meta,
        "kind": "shadow",
        "max_distance": 1,
        "rms_norm_eps": float(cfg.rms_norm_eps),
    }
    meta["training"] = {**meta.get("training", {}), "rank": R, "ridge": RIDGE}
    arrays = {
        "shadow_in": a_in,
        "shadow_out": a_out,
        "routers": routers,
        "router_norms": norms,
    }
    return ShadowPredictor(meta, arrays)


def shadow_scores(
    store: Any, test: Any, pred: ShadowPredictor, progress: bool = True
) -> np.ndarray:
    """f32 ``[N, L, 1, E]``: ``pred``'s scores for every token of the trace
    ``test``, computed by replaying its prompts through ``store``: at each
    layer the surrogate MoE output is added to the residual, layer ``l+1``'s
    attention preview is taken of it (:func:`attention_preview`) and scored
    (rows of the last layer are 0)."""
    from mer_cli.models.layers import attention_preview
    from mer_cli.runtime import Engine

    _check_model(store, test)
    L, E = store.model.num_layers, store.model.num_experts
    out = np.zeros((test.num_tokens, L, 1, E), np.float32)
    engine = Engine(store, ctx=store.model.max_position)
    cur: dict[int, list[np.ndarray]] = {}

    def hook(ev) -> None:
        if ev.layer + 1 >= L:
            return
        xp = pred.preview_residual(ev.layer, ev.ids, ev.residual)
        nw = engine.layers[ev.layer + 1]
        pv = attention_preview(
            engine.arch, nw, ev.layer + 1, xp, engine.cache, ev.start
        )
        cur.setdefault(ev.layer, []).append(pred.router_probs(ev.layer + 1, pv))

    try:
        for rows in _replay(engine, test, hook, progress, "shadow scores", True):
            for la, s in cur.items():
                out[rows, la, 0] = np.concatenate(s)
            cur.clear()
    finally:
        engine.close()
    return out
