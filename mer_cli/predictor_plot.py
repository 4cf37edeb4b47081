"""Pictures of routing and predictors (optional extra: ``pip install 'mer-cli[plot]'``).

``mer train-predictor --plot PNG`` draws, side by side, how often each expert
of each layer is used in the traces (a layer x expert heatmap) and each
predictor's held-out recall@k against the lookahead distance. matplotlib is
imported only here, on a bare ``Figure`` with the Agg canvas (as
:mod:`mer_cli.plot` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mer_cli.formats.trace import Trace
from mer_cli.plot import require_matplotlib, save_figure
from mer_cli.predictors import multi_hot


def usage(trace: Trace) -> np.ndarray:
    """f64 ``[L, E]``: share of the tokens that use each expert of each layer."""
    return multi_hot(trace.experts, trace.meta["num_experts"]).mean(0)


def plot_predictors(trace: Trace, report, path: str | os.PathLike) -> Path:
    """Write the heatmap of :func:`usage` and the recall curves of ``report``
    (a :class:`mer_cli.train_predictor.Report`) to the PNG ``path``
    atomically; returns the path."""
    require_matplotlib()
    from matplotlib.figure import Figure

    u = usage(trace)
    L, E = u.shape
    K = report.top_k
    fig = Figure(figsize=(12, 4.8), dpi=120, layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[1.2, 1])
    im = ax.imshow(u, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(
        f"expert usage: share of {trace.num_tokens} tokens (uniform = {K / E:.3f})",
        fontsize=10,
    )
    if E <= 32:
        ax.set_xticks(range(E))
    if L <= 32:
        ax.set_yticks(range(L))
    fig.colorbar(im, ax=ax, shrink=0.9, label="share of tokens")
    dists = np.arange(1, report.max_distance + 1)
    for name, q in report.quality.items():
        rec = np.asarray(q[K]["recall"]) * 100
        style = "--" if name in ("router", "frequency") else "-"
        bx.plot(dists, rec, style, marker="o", label=name)
    bx.axhline(100 * K / E, color="0.6", linestyle=":", label="chance")
    bx.set_xticks(dists)
    bx.set_xlabel("lookahead distance (layers)")
    bx.set_ylabel(f"held-out recall@{K} (%)")
    bx.set_ylim(0, 100)
    bx.grid(True, alpha=0.3)
    bx.legend(loc="lower left", fontsize=9)
    bx.set_title(
        f"{report.test_tokens} held-out tokens of {report.test_prompts} prompts",
        fontsize=10,
    )
    return save_figure(fig, path)
