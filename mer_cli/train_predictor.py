"""Fit expert predictors on routing traces and score them on held-out prompts.

::

    from mer_cli.train_predictor import train_predictor, format_report
    report = train_predictor(["a.trace.npz"], "a.pred.npz", holdout=0.2)
    print(format_report(report))

The traces' prompts are split (seeded) into training and held-out prompts --
by prompt, never by token, so no held-out token's neighbours were seen in
training. On the held-out tokens every predictor (router lookahead from the
trace, per-layer frequency, Markov, MLP) is scored by recall@k and
precision@k per lookahead distance, and the request sequence is replayed
through LRU, the three-signal cache policy (:mod:`mer_cli.cache`: without
predictions, with each predictor's scores steering eviction, and with them
also prefetching as the live controller does) and Belady's MIN under several
byte budgets, reporting hit rates and extents read per token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import UsageError
from mer_cli.formats.trace import Trace, has_preview, lookahead_depth, merge
from mer_cli.predictors import (
    FORMAT,
    MAX_DISTANCE,
    VERSION,
    MarkovPredictor,
    MLPPredictor,
    Predictor,
    context_keys,
    mlp_forward,
    mlp_inputs,
    multi_hot,
    set_codes,
    trace_lookahead,
    trace_preview,
)

DEFAULT_BUDGETS = (0.10, 0.25, 0.50)
KINDS = ("best", "markov", "mlp", "mlp+router", "mlp+preview", "shadow")

# ======================================================================= data


def split_by_prompt(
    trace: Trace, holdout: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """bool ``[N]`` masks of training and held-out tokens: a seeded random
    ``holdout`` share of the prompts (at least one, never all) is held out."""
    P = trace.num_prompts
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout {holdout}: expected a share between 0 and 1")
    if P < 2:
        raise UsageError(
            f"{trace.path or 'trace'}: holds {P} prompt(s); a held-out split needs "
            "at least 2: trace more prompts (mer trace --prompts FILE)"
        )
    n = min(P - 1, max(1, round(holdout * P)))
    held = np.random.default_rng(seed).permutation(P)[:n]
    test = np.isin(trace.prompt, held)
    return ~test, test


def subset(trace: Trace, mask: np.ndarray) -> Trace:
    """The tokens of ``trace`` where ``mask`` (bool ``[N]``), same meta."""
    arrays = {k: v[mask] for k, v in trace.arrays().items() if k != "projection"}
    # prompts renumbered 0.. in order of appearance
    arrays["prompt"] = np.unique(arrays["prompt"], return_inverse=True)[1].astype(
        np.int32
    )
    return Trace(meta=dict(trace.meta), projection=trace.projection, **arrays)


def has_previous(trace: Trace) -> np.ndarray:
    """bool ``[N]``: the token before is of the same sequence."""
    hp = np.zeros(trace.num_tokens, bool)
    hp[1:] = (trace.positions[1:] != 0) & (trace.prompt[1:] == trace.prompt[:-1])
    return hp


def predictor_meta(trace: Trace, kind: str, max_distance: int) -> dict[str, Any]:
    """meta.json of a predictor fitted on ``trace`` (its model fields)."""
    from mer_cli import __version__

    m = trace.meta
    keys = ("store_id", "arch", "num_layers", "num_experts", "top_k")
    keys += ("hidden_size", "sketch_dim", "sketch_seed")
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        **{k: m[k] for k in keys},
        "max_distance": max_distance,
        "created_by": f"mer-cli {__version__}",
        "training": {"tokens": trace.num_tokens, "prompts": trace.num_prompts},
    }


# ===================================================================== markov


def fit_markov(
    trace: Trace, max_distance: int = MAX_DISTANCE, beta: float = 2.0
) -> MarkovPredictor:
    """Count expert-set transitions in ``trace`` and fit the combiner.

    Tables: for every source layer ``l`` and distance ``d`` (``l+d < L``),
    how often each expert was in ``E[l+d]`` after the context ``E[l]``
    (first order) and ``(E[l], E[l-1])`` (second order); per-layer
    frequencies; the temporal table P(e in E[l](t) | e in / not in
    E[l](t-1)). The logistic combiner of the four estimates is then fitted per
    distance on the same tokens with leave-one-out counts.
    """
    L, E = trace.meta["num_layers"], trace.meta["num_experts"]
    A = max_distance
    X = multi_hot(trace.experts, E)  # [N, L, E]
    N = X.shape[0]
    freq = (X.sum(0) + 0.5) / (N + 1.0)  # [L, E]
    hp = has_previous(trace)
    prev, cur = X[:-1][hp[1:]], X[1:][hp[1:]]  # [M, L, E]
    temporal = np.empty((L, 2, E))
    for bit, sel in ((1, prev), (0, ~prev)):
        hits = (cur & sel).sum(0)
        temporal[:, bit] = (hits + freq) / (sel.sum(0) + 1.0)
    codes = set_codes(X)  # [N, L]
    tables = {}
    for order in (1, 2):
        keys, ys = [], []
        for layer in range(order - 1, L - 1):
            below = codes[:, layer - 1] if order == 2 else None
            for d in range(1, min(A, L - 1 - layer) + 1):
                keys.append(context_keys(layer, d, codes[:, layer], below))
                ys.append(X[:, layer + d])
        if keys:
            k, inv = np.unique(np.concatenate(keys), return_inverse=True)
            y = np.concatenate(ys)
            n = np.bincount(inv, minlength=len(k))
            c = np.stack(
                [np.bincount(inv, y[:, e], minlength=len(k)) for e in range(E)], 1
            )
        else:
            k, n, c = np.empty(0, np.uint64), np.empty(0), np.empty((0, E))
        tables[f"o{order}_keys"] = k.astype(np.uint64)
        tables[f"o{order}_n"] = n.astype(np.int32)
        tables[f"o{order}_counts"] = c.astype(np.int32)
    arrays = {
        "freq": freq.astype(np.float32),
        "temporal": temporal.astype(np.float32),
        **tables,
        "mix": np.zeros((A, 5), np.float32),
        "beta": np.array(beta, np.float32),
    }
    pred = MarkovPredictor(predictor_meta(trace, "markov", A), arrays)
    # combiner: per distance, on up to 4000 tokens, leave-one-out counts
    rows = np.random.default_rng(0).permutation(N)[: min(N, 4000)]
    for d in range(1, A + 1):
        fs, ys = [], []
        for layer in range(L - d):
            xl = X[rows, layer]
            below = X[rows, layer - 1] if layer else None
            y = X[rows, layer + d]
            pv = np.zeros_like(y)
            ok = hp[rows]
            pv[ok] = X[rows[ok] - 1, layer + d]
            fs.append(pred.features(layer, d, xl, below, pv, ok, exclude=y))
            ys.append(y)
        if fs:
            f = np.concatenate(fs).reshape(-1, 5)
            arrays["mix"][d - 1] = _logistic(f, np.concatenate(ys).reshape(-1))
        else:  # no layer that far ahead: plain second-order estimate
            arrays["mix"][d - 1] = [1, 0, 0, 0, 0]
    return pred


def _logistic(f: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights ``[F]`` of a logistic regression of bool ``y`` ``[n]`` on ``f``
    ``[n, F]`` (Newton's method, a little L2 against separable data)."""
    w = np.zeros(f.shape[1])
    w[0] = 1.0  # start from the second-order estimate alone
    y = y.astype(np.float64)
    for _ in range(30):
        p = 0.5 * (1 + np.tanh(0.5 * (f @ w)))
        g = f.T @ (p - y) + l2 * w
        h = (f * (p * (1 - p))[:, None]).T @ f + l2 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w


# ======================================================================== mlp


def _mlp_data(
    trace: Trace,
    A: int,
    mu: np.ndarray,
    sd: np.ndarray,
    router: bool = False,
    preview: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs f32 ``[L, N, F]``, targets f32 ``[L, N, A*E]`` and their mask
    (``l + d < L``) ``[L, 1, A*E]``, every token with its previous one known
    (``router``: the trace's router lookahead is an input too; ``preview``
    = (mean, sd) ``[L, S]``: the trace's preview sketch, standardised, too)."""
    L, E = trace.meta["num_layers"], trace.meta["num_experts"]
    X = multi_hot(trace.experts, E)
    N = X.shape[0]
    hp = has_previous(trace)
    zs, ys = [], []
    mask = np.zeros((L, 1, A * E), np.float32)
    for layer in range(L):
        n = min(A, L - 1 - layer)
        prev = np.zeros((N, A, E), bool)
        y = np.zeros((N, A, E), bool)
        for d in range(1, n + 1):
            prev[1:, d - 1] = X[:-1, layer + d]
            y[:, d - 1] = X[:, layer + d]
        mask[layer, 0, : n * E] = 1
        has = np.repeat(hp[:, None], A, 1)
        has[:, n:] = False
        below = X[:, layer - 1] if layer else None
        sk = (trace.sketch[:, layer].astype(np.float32) - mu[layer]) / sd[layer]
        look = trace_lookahead(trace, layer, A) if router else None
        pv = None
        if preview is not None:
            pv = trace_preview(trace)[:, layer].astype(np.float32)
            pv = (pv - preview[0][layer]) / preview[1][layer]
        zs.append(mlp_inputs(sk, X[:, layer], below, prev, has, look, pv))
        ys.append(y.reshape(N, A * E))
    return np.stack(zs), np.stack(ys).astype(np.float32), mask


def fit_mlp(
    train: Trace,
    valid: Trace | None = None,
    *,
    max_distance: int = MAX_DISTANCE,
    hidden: int = 128,
    epochs: int = 60,
    batch: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    patience: int = 8,
    seed: int = 0,
    routers: tuple[np.ndarray, np.ndarray, float] | None = None,
    preview: bool = False,
    progress: bool = True,
) -> MLPPredictor:
    """Train the per-layer MLPs with Adam on binary cross-entropy.

    One ReLU layer of ``hidden`` units per source layer; the epoch with the
    lowest loss on ``valid`` (when given; else the last) is kept, and
    training stops after ``patience`` epochs without improvement.
    ``routers`` = (f32 ``[L, E, D]`` routers, f32 ``[L, D]`` their norms'
    weights, the norm's eps) of the traced model makes the router lookahead
    an input (from the traces' ``lookahead`` member in training, computed
    from the hidden state live); the weights go into the file. ``preview``
    makes the sketch of the attention preview an input (the traces'
    ``preview_sketch`` member in training; :meth:`Predictor.observe`'s
    ``preview`` live).
    """
    L, E = train.meta["num_layers"], train.meta["num_experts"]
    A = max_distance
    sk = train.sketch.astype(np.float32)  # [N, L, S]
    mu = sk.mean(0)
    sd = np.maximum(sk.std(0), 1e-3 * max(float(sk.std()), 1e-12))
    sd = np.maximum(sd, 1e-12)
    use_router = routers is not None
    pv_norm = None
    if preview:
        pv = trace_preview(train).astype(np.float32)  # [N, L, S]
        pv_sd = np.maximum(pv.std(0), 1e-3 * max(float(pv.std()), 1e-12))
        pv_norm = (pv.mean(0), np.maximum(pv_sd, 1e-12))
        del pv
    Z, Y, M = _mlp_data(train, A, mu, sd, use_router, pv_norm)
    F = Z.shape[2]
    rng = np.random.default_rng(seed)
    w = {
        "w1": (rng.standard_normal((L, F, hidden)) * np.sqrt(2.0 / F)),
        "b1": np.zeros((L, hidden)),
        "w2": (rng.standard_normal((L, hidden, A * E)) * np.sqrt(1.0 / hidden)),
        "b2": _logit_of(Y.mean(1)),  # [L, A*E]: start from the base rates
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    vdata = None
    if valid is not None:
        vdata = _mlp_data(valid, A, mu, sd, use_router, pv_norm)
    adam = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in w.items()}
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    N = Z.shape[1]
    best, best_w, stale, step = np.inf, None, 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, unit="epoch", desc="mlp", leave=False)
    for _epoch in range(epochs):
        order = rng.permutation(N)
        for i in range(0, N, batch):
            idx = order[i : i + batch]
            grads = _mlp_grads(w, Z[:, idx], Y[:, idx], M)
            step += 1
            for k, g in grads.items():
                m, v = adam[k]
                m *= b1_
                m += (1 - b1_) * g
                v *= b2_
                v += (1 - b2_) * g * g
                mh = m / (1 - b1_**step)
                vh = v / (1 - b2_**step)
                w[k] -= lr * (mh / (np.sqrt(vh) + eps) + weight_decay * w[k])
        if vdata is not None:
            loss = _mlp_loss(w, *vdata)
            if loss < best - 1e-5:
                best, best_w, stale = loss, {k: v.copy() for k, v in w.items()}, 0
            else:
                stale += 1
        if bar is not None:
            bar.set_postfix(valid_loss=f"{best:.4f}" if vdata else "-")
            bar.update(1)
        if stale >= patience:
            break
    if bar is not None:
        bar.close()
    w = best_w or w
    arrays = {
        "projection": train.projection.astype(np.float32),
        "mu": mu.astype(np.float32),
        "sd": sd.astype(np.float32),
        **{k: v.astype(np.float32) for k, v in w.items()},
    }
    meta = predictor_meta(train, "mlp", A)
    if routers is not None:
        arrays["routers"] = np.ascontiguousarray(routers[0], np.float32)
        arrays["router_norms"] = np.ascontiguousarray(routers[1], np.float32)
        meta["router_inputs"] = True
        meta["rms_norm_eps"] = float(routers[2])
    if pv_norm is not None:
        arrays["preview_mu"] = pv_norm[0].astype(np.float32)
        arrays["preview_sd"] = pv_norm[1].astype(np.float32)
        meta["preview_inputs"] = True
    meta["training"] |= {"hidden": hidden, "epochs": _epoch + 1, "valid_loss": best}
    if not np.isfinite(best):
        meta["training"]["valid_loss"] = None
    return MLPPredictor(meta, arrays)


def _logit_of(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def _mlp_loss(w: dict, Z: np.ndarray, Y: np.ndarray, M: np.ndarray) -> float:
    """Mean masked binary cross-entropy of the MLPs on ``Z`` ``[L, N, F]``."""
    total = 0.0
    for layer in range(Z.shape[0]):
        o = mlp_forward(w, layer, Z[layer])[0]
        bce = np.logaddexp(0, o) - Y[layer] * o
        total += float((bce * M[layer]).sum())
    return total / max(float(M.sum()) * Z.shape[1], 1.0)


def _mlp_grads(w: dict, Z: np.ndarray, Y: np.ndarray, M: np.ndarray) -> dict:
    """Gradients of the mean masked BCE for a batch (``[L, B, ...]``)."""
    H = np.maximum(Z @ w["w1"] + w["b1"][:, None], 0.0)  # [L, B, H]
    logits = H @ w["w2"] + w["b2"][:, None]  # [L, B, A*E]
    P = 0.5 * (1 + np.tanh(0.5 * logits))
    dO = (P - Y) * M / max(float(M.sum()) * Z.shape[1], 1.0)
    dH = (dO @ w["w2"].transpose(0, 2, 1)) * (H > 0)
    return {
        "w2": H.transpose(0, 2, 1) @ dO,
        "b2": dO.sum(1),
        "w1": Z.transpose(0, 2, 1) @ dH,
        "b1": dH.sum(1),
    }


# ================================================================= evaluation


def recall_precision(
    scores: np.ndarray, experts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """recall@k and precision@k per distance.

    Parameters
    ----------
    scores : f32 ``[N, L, A, E]`` -- ``scores[n, l, d-1]`` predicts layer
        ``l+d`` of token ``n``.
    experts : int ``[N, L, K]`` -- what the router selected.
    k : experts predicted (the top k of the scores).

    Returns
    -------
    recall, precision : f64 ``[A]`` -- over all (n, l) with ``l + d < L``:
        hits / (K * count) and hits / (k * count), hits = |top-k & actual|.
    """
    N, L, A, E = scores.shape
    K = experts.shape[-1]
    X = multi_hot(experts, E)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # [N, L, A, k]
    rec, prec = np.full(A, np.nan), np.full(A, np.nan)
    for d in range(1, A + 1):
        if L - d <= 0 or N == 0:
            continue
        actual = X[:, d:]  # [N, L-d, E]
        hits = np.take_along_axis(actual, top[:, : L - d, d - 1], -1).sum()
        count = N * (L - d)
        rec[d - 1] = hits / (K * count)
        prec[d - 1] = hits / (k * count)
    return rec, prec


def requests_of(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[N*L*K]`` cache keys ``layer * E + expert`` in compute order."""
    N, L, K = experts.shape
    return (np.arange(L)[None, :, None] * num_experts + experts).reshape(-1)


def predictions_of(scores: np.ndarray, K: int) -> list[dict[int, np.ndarray] | None]:
    """Per request (aligned with :func:`requests_of`): the predictions made
    when the visit of (token, layer) begins -- ``{l+d: scores[n, l, d-1]}``."""
    N, L, A, E = scores.shape
    out: list[dict[int, np.ndarray] | None] = []
    for n in range(N):
        for layer in range(L):
            out.append(
                {
                    layer + d: scores[n, layer, d - 1]
                    for d in range(1, min(A, L - 1 - layer) + 1)
                }
            )
            out.extend([None] * (K - 1))
    return out


def hit_rates(
    experts: np.ndarray,
    num_experts: int,
    budgets: Sequence[float],
    predicted: dict[str, np.ndarray],
    progress: bool = False,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Simulated hit rates and reads per budget (a share of all expert bytes;
    experts are equal-sized extents, so a share of bytes is a share of slots).

    ``experts`` int ``[N, L, K]`` are the held-out tokens' experts,
    ``predicted`` name -> scores f32 ``[N, L, A, E]``. Each row has ``budget``,
    ``slots`` and the hit rate (demand requests found in DRAM) of

    * ``lru``: least recently used, demand only;
    * ``policy``: the three-signal eviction, demand only;
    * ``policy+NAME``: eviction steered by NAME's scores, nothing read ahead
      (:func:`~mer_cli.cache.simulate_policy`);
    * ``prefetch+NAME``: the live controller -- NAME's hints also read experts
      of the next layers ahead of demand, throttled
      (:func:`~mer_cli.cache.simulate_prefetch` at ``threshold``, default
      :data:`~mer_cli.cache.PREFETCH_THRESHOLD`);
    * ``belady``: Belady's MIN, the optimum of demand paging (no prefetch).

    ``reads`` maps each of them to extents read per token (demand misses,
    plus the prefetch reads for ``prefetch+``: what the hit rate costs), and
    ``wasted`` each ``prefetch+NAME`` to the share of its prefetch reads not
    used (evicted first, or their layer came without them).
    """
    from mer_cli.cache import (
        PREFETCH_THRESHOLD,
        simulate_belady,
        simulate_lru,
        simulate_policy,
        simulate_prefetch,
    )
    from mer_cli.cache_sim import policy_hints, prefetch_hints

    if threshold is None:
        threshold = PREFETCH_THRESHOLD
    N, L, K = experts.shape
    reqs = requests_of(experts, num_experts).tolist()
    n = len(reqs)
    preds = {name: predictions_of(s, K) for name, s in predicted.items()}
    # packed once, replayed at every budget
    packed = {
        name: (
            policy_hints(p, n, L, num_experts),
            prefetch_hints(reqs, p, L, num_experts, K),
        )
        for name, p in preds.items()
    }
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(budgets) * (3 + 2 * len(preds))
        bar = tqdm(total=total, unit="run", desc="simulate", leave=False)

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    for share in budgets:
        slots = max(1, round(share * L * num_experts))
        row: dict[str, Any] = {"budget": share, "slots": slots}
        reads: dict[str, float] = {}
        wasted: dict[str, float] = {}
        demand: list[tuple[str, Any, tuple]] = [
            ("lru", simulate_lru, (reqs, slots)),
            ("policy", simulate_policy, (reqs, slots, L, num_experts)),
        ]
        for name, (p, _) in packed.items():
            args = (reqs, slots, L, num_experts, p)
            demand.append((f"policy+{name}", simulate_policy, args))
        for name, fn, args in demand:
            row[name] = fn(*args)
            reads[name] = (1 - row[name]) * n / N if N else 0.0
            tick()
        for name, (_, p) in packed.items():
            run = simulate_prefetch(
                reqs, slots, L, num_experts, p, top_k=K, threshold=threshold
            )
            row[f"prefetch+{name}"] = run.hit_rate
            reads[f"prefetch+{name}"] = run.reads / N if N else 0.0
            wasted[f"prefetch+{name}"] = run.wasted_share
            tick()
        row["belady"] = simulate_belady(reqs, slots)
        reads["belady"] = (1 - row["belady"]) * n / N if N else 0.0
        tick()
        row["reads"], row["wasted"] = reads, wasted
        rows.append(row)
    if bar is not None:
        bar.close()
    return rows


@dataclass
class Report:
    """What :func:`train_predictor` measured (held-out figures)."""

    traces: list[str]
    train_tokens: int
    train_prompts: int
    test_tokens: int
    test_prompts: int
    top_k: int
    num_experts: int
    max_distance: int
    chosen: str
    output: str
    # name -> k -> {"recall": [A], "precision": [A]}
    quality: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)
    hit_rates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    test: Trace, predictors: dict[str, np.ndarray], ks: Sequence[int]
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """recall@k / precision@k of each predictor's scores on ``test``."""
    out: dict[str, dict[int, dict[str, list[float]]]] = {}
    for name, s in predictors.items():
        out[name] = {}
        for k in ks:
            r, p = recall_precision(s, test.experts, k)
            out[name][k] = {"recall": r.tolist(), "precision": p.tolist()}
    return out


def frequency_scores(train: Trace, test: Trace, A: int) -> np.ndarray:
    """The per-layer frequency baseline: f32 ``[N, L, A, E]``."""
    L, E = train.meta["num_layers"], train.meta["num_experts"]
    f = multi_hot(train.experts, E).mean(0)  # [L, E]
    out = np.zeros((test.num_tokens, L, A, E), np.float32)
    for d in range(1, A + 1):
        out[:, : L - d, d - 1] = f[d:]
    return out


def router_scores(test: Trace, A: int) -> np.ndarray | None:
    """Router lookahead from the trace's ``lookahead`` member (None without)."""
    depth = lookahead_depth(test.meta)
    if not depth:
        return None
    L, E = test.meta["num_layers"], test.meta["num_experts"]
    out = np.zeros((test.num_tokens, L, A, E), np.float32)
    n = min(A, depth)
    out[:, :, :n] = test.lookahead[:, :, :n].astype(np.float32)
    return out


def preview_scores(test: Trace, A: int) -> np.ndarray | None:
    """Layer ``l+1``'s router on the attention preview (the trace's
    ``preview_probs``), f32 ``[N, L, A, E]`` with only ``d = 1`` filled
    (None without a preview)."""
    if not has_preview(test.meta):
        return None
    L, E = test.meta["num_layers"], test.meta["num_experts"]
    out = np.zeros((test.num_tokens, L, A, E), np.float32)
    out[:, :, 0] = test.preview_probs.astype(np.float32)
    return out


def train_predictor(
    traces: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    holdout: float = 0.2,
    kind: str = "best",
    max_distance: int = MAX_DISTANCE,
    hidden: int = 128,
    epochs: int = 60,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    seed: int = 0,
    model: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    progress: bool = True,
) -> Report:
    """Fit the Markov and MLP predictors on the training prompts of
    ``traces``, score every predictor on the held-out prompts, and save one
    predictor to ``output`` (``kind``: ``markov``, ``mlp``, ``mlp+router``,
    ``mlp+preview`` or ``best`` -- the highest held-out recall@K one layer
    ahead).

    Traces recorded with the attention preview (``mer trace``'s default) add
    ``mlp+preview``, an MLP that also takes the preview's sketch, and the
    training-free ``preview`` row (layer ``l+1``'s router on the preview,
    one layer ahead only).

    With ``model`` (the store the traces were recorded from, traces recorded
    with router lookahead) a second MLP, ``mlp+router``, also takes the router
    lookahead as input (:func:`fit_mlp` ``routers``).

    Returns the :class:`Report` (held-out figures); ``plot`` also draws the
    expert-usage heatmap and recall-vs-distance curves to a PNG.
    """
    if kind not in KINDS:
        raise UsageError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if kind in ("mlp+router", "shadow") and model is None:
        raise UsageError(
            f"--kind {kind} needs --model STORE (the store the traces were "
            "recorded from: the routers are copied from it"
            + (
                ", and the prompts are replayed through it)"
                if kind == "shadow"
                else ")"
            )
        )
    if not 1 <= max_distance <= MAX_DISTANCE:
        raise UsageError(f"--distance {max_distance}: expected 1..{MAX_DISTANCE}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise UsageError(f"--budgets {list(budgets)}: expected shares in (0, 1]")
    if plot is not None:
        from mer_cli.plot import require_matplotlib

        require_matplotlib()
    loaded = [Trace.load(t) for t in traces]
    trace = merge(loaded) if len(loaded) > 1 else loaded[0]
    if trace.meta["num_layers"] < 2:
        raise UsageError(
            f"{traces[0]}: the model has 1 MoE layer; predictors guess later layers"
        )
    if kind == "mlp+preview" and not has_preview(trace.meta):
        raise UsageError(
            f"--kind mlp+preview: {traces[0]} records no attention preview; "
            "record the traces again with mer trace (--preview is the default)"
        )
    A = min(max_distance, trace.meta["num_layers"] - 1)
    routers = None
    if model is not None and kind in ("best", "mlp+router"):
        routers = load_routers(model, trace, A)
    tr_mask, te_mask = split_by_prompt(trace, holdout, seed)
    train, test = subset(trace, tr_mask), subset(trace, te_mask)
    # a validation share of the training prompts for the MLP's early stopping
    fit, valid = train, None
    if train.num_prompts >= 5:
        f_mask, v_mask = split_by_prompt(train, 0.1, seed + 1)
        fit, valid = subset(train, f_mask), subset(train, v_mask)
    markov = fit_markov(train, A)
    fitted: dict[str, Predictor] = {"markov": markov}
    fitted["mlp"] = fit_mlp(
        fit, valid, max_distance=A, hidden=hidden, epochs=epochs, seed=seed,
        progress=progress,
    )  # fmt: skip
    if routers is not None:
        fitted["mlp+router"] = fit_mlp(
            fit, valid, max_distance=A, hidden=hidden, epochs=epochs, seed=seed,
            routers=routers, progress=progress,
        )  # fmt: skip
    if has_preview(trace.meta) and kind in ("best", "mlp+preview"):
        fitted["mlp+preview"] = fit_mlp(
            fit, valid, max_distance=A, hidden=hidden, epochs=epochs, seed=seed,
            preview=True, progress=progress,
        )  # fmt: skip
    shadow_store = None
    if model is not None and kind in ("best", "shadow"):
        from mer_cli.formats.store import Store
        from mer_cli.shadow import fit_shadow

        shadow_store = Store.open(model)
        fitted["shadow"] = fit_shadow(
            shadow_store, train, predictor_meta(train, "shadow", 1), progress=progress
        )
    K, E = trace.meta["top_k"], trace.meta["num_experts"]
    scores: dict[str, np.ndarray] = {}
    router = router_scores(test, A)
    if router is not None:
        scores["router"] = router
    preview = preview_scores(test, A)
    if preview is not None:
        scores["preview"] = preview
    scores["frequency"] = frequency_scores(train, test, A)
    for name, p in fitted.items():
        if name == "shadow":  # scored by replaying the model
            from mer_cli.shadow import shadow_scores

            s1 = shadow_scores(shadow_store, test, p, progress)
            scores[name] = np.zeros((test.num_tokens, s1.shape[1], A, E), np.float32)
            scores[name][:, :, :1] = s1
        else:
            scores[name] = p.predict_trace(test)
    ks = [K] + ([2 * K] if 2 * K < E else [])
    quality = evaluate(test, scores, ks)
    for name in ("preview", "shadow"):  # one layer ahead only
        for q in quality.get(name, {}).values():
            for m in q.values():
                m[1:] = [float("nan")] * (len(m) - 1)
    if kind == "best":
        kind = max(fitted, key=lambda n: quality[n][K]["recall"][0])
    chosen = fitted[kind]
    sim = {n: scores[n] for n in ("router", *fitted) if n in scores}
    rates = hit_rates(test.experts, E, budgets, sim, progress)
    chosen.meta["training"] |= {
        "traces": [str(t) for t in traces],
        "holdout_prompts": test.num_prompts,
        "holdout_recall_at_k": quality[kind][K]["recall"],
    }
    chosen.save(Path(output))
    report = Report(
        traces=[str(t) for t in traces],
        train_tokens=train.num_tokens,
        train_prompts=train.num_prompts,
        test_tokens=test.num_tokens,
        test_prompts=test.num_prompts,
        top_k=K,
        num_experts=E,
        max_distance=A,
        chosen=kind,
        output=str(output),
        quality=quality,
        hit_rates=rates,
    )
    if plot is not None:
        from mer_cli.predictor_plot import plot_predictors

        plot_predictors(trace, report, plot)
    return report


def load_routers(
    model: str | os.PathLike, trace: Trace, A: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Every layer's router f32 ``[L, E, D]`` and norm weight ``[L, D]`` from
    the store ``model``, and its RMS-norm eps; :class:`UsageError` unless the
    traces come from this store and recorded A distances of router lookahead."""
    from mer_cli.formats.store import Store

    store = Store.open(model)
    check_traced_store(store, trace)
    depth = lookahead_depth(trace.meta)
    if depth < A:
        raise UsageError(
            f"the traces record router lookahead for {depth} layer(s) ahead, "
            f"--model needs {A}: record them with mer trace --lookahead {A} "
            f"(or use --distance {depth})" if depth else
            "the traces record no router lookahead, which --model needs: record "
            f"them with mer trace --lookahead {A}"
        )  # fmt: skip
    return (*store_routers(store), float(store.model.rms_norm_eps))


def check_traced_store(store, trace: Trace) -> None:
    """:class:`UsageError` unless ``trace`` was recorded from ``store``."""
    if store.store_id.hex() != trace.meta["store_id"]:
        raise UsageError(
            f"--model {store.path}: is store {store.store_id.hex()}, but the "
            f"traces were recorded from store {trace.meta['store_id']}; give the "
            "store they were recorded from"
        )


def store_routers(store) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's router f32 ``[L, E, D]`` and ffn norm weight ``[L, D]``."""
    L = store.model.num_layers
    R = np.stack([store.tensor_f32(f"layers.{j}.router") for j in range(L)])
    W = np.stack(
        [store.tensor_f32(f"layers.{j}.ffn_norm").reshape(-1) for j in range(L)]
    )
    return R.astype(np.float32), W.astype(np.float32)


def format_report(r: Report) -> str:
    """The tables: quality per predictor and distance; :func:`hit_rate_table`."""
    K = r.top_k
    lines = [
        f"held out: {r.test_tokens} tokens of {r.test_prompts} prompts "
        f"(trained on {r.train_tokens} tokens of {r.train_prompts} prompts)",
        "",
    ]
    ks = sorted({int(k) for q in r.quality.values() for k in q})
    head = f"{'predictor':<11} {'d':>2}"
    for k in ks:
        head += f" {f'recall@{k}':>10} {f'prec@{k}':>8}"
    lines.append(head)
    for name, q in r.quality.items():
        for d in range(1, r.max_distance + 1):
            row = f"{name:<11} {d:>2}"
            for k in ks:
                rec, prec = q[k]["recall"][d - 1], q[k]["precision"][d - 1]
                if rec != rec:  # NaN: not measured at this distance
                    row += f" {'-':>10} {'-':>8}"
                    continue
                row += f" {100 * rec:>9.1f}% {100 * prec:>7.1f}%"
            lines.append(row)
    lines += ["", f"(top-k = {K}; the saved predictor is {r.chosen}: {r.output})", ""]
    lines += hit_rate_table(r.hit_rates, r.chosen)
    return "\n".join(lines)


def hit_rate_table(rows: list[dict[str, Any]], chosen: str) -> list[str]:
    """:func:`hit_rates`' rows as lines: per cache policy and budget the hit
    rate and the extents read per token (and the wasted share of prefetch
    reads), then, per budget, ``chosen`` against Belady's MIN."""
    names = list(rows[0]["reads"])
    head = [f"{100 * r['budget']:.0f}% ({r['slots']} slots)" for r in rows]
    lines = [
        "simulated cache: hit rate, extents read per token, share of the "
        "prefetch reads wasted",
        f"{'budget':<20}" + "".join(f"{h:>23}" for h in head),
        f"{'':<20}" + f"{'hit':>8} {'reads':>6} {'wasted':>7}" * len(rows),
    ]
    for name in names:
        line = f"{'belady (MIN)' if name == 'belady' else name:<20}"
        for r in rows:
            w = r["wasted"].get(name)
            w = "" if w is None else f"{100 * w:.0f}%"
            line += f"{100 * r[name]:>7.1f}% {r['reads'][name]:>6.2f} {w:>7}"
        lines.append(line.rstrip())
    lines += [
        "(policy+NAME: NAME's predictions steer eviction only; prefetch+NAME: "
        "they also read experts ahead, as the live controller does; "
        "MIN: the optimum without prefetch)",
        "",
    ]
    best, pf = f"policy+{chosen}", f"prefetch+{chosen}"
    for r in rows:
        m, mr = r["belady"], r["reads"]["belady"]
        if m <= 0:
            continue
        line = (
            f"budget {100 * r['budget']:.0f}%: {best} reaches "
            f"{100 * r[best] / m:.1f}% of Belady's MIN "
            f"(LRU {100 * r['lru'] / m:.1f}%)"
        )
        if pf in r:
            cost = f"{r['reads'][pf] / mr:.2f}x" if mr > 0 else "n/a"
            line += (
                f"; {pf} {100 * r[pf] / m:.1f}% of MIN's hit rate at {cost} "
                f"MIN's reads ({r['reads'][pf]:.2f} vs {mr:.2f} per token)"
            )
        lines.append(line)
    return lines
