"""``mer train-predictor TRACE... -o PRED``: fit and score expert predictors."""

from __future__ import annotations

import click


def _budgets(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    out = []
    for part in value.split(","):
        s = part.strip().rstrip("%")
        try:
            v = float(s)
        except ValueError:
            v = -1.0
        if not 0 < v <= 100:
            raise click.BadParameter(
                f"{part.strip()!r} is not a percentage in (0, 100]; "
                "e.g. --budgets 10,25,50"
            )
        out.append(v / 100)
    return out


@click.command("train-predictor")
@click.argument("traces", nargs=-1, required=True, metavar="TRACE...")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="PRED",
    help="Predictor file to write (.npz, see mer-predictor(5)).",
)
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    help="Share of the prompts held out for scoring (split by prompt, seeded).",
)
@click.option(
    "--kind",
    type=click.Choice(["best", "markov", "mlp", "mlp+router", "mlp+preview", "shadow"]),
    default="best",
    show_default=True,
    help="Predictor to save; best = highest held-out recall one layer ahead.",
)
@click.option(
    "--model",
    "model",
    metavar="STORE",
    help="The store the traces were recorded from ('builtin': the built-in "
    "model): also fit mlp+router, an MLP that takes the router lookahead too "
    "(routers copied from STORE), and shadow (prompts replayed through STORE).",
)
@click.option(
    "--distance",
    default=3,
    show_default=True,
    help="Layers ahead to predict (1-3).",
)
@click.option("--hidden", default=128, show_default=True, help="MLP hidden units.")
@click.option(
    "--epochs", default=60, show_default=True, help="Most MLP training epochs."
)
@click.option(
    "--budgets",
    default="10,25,50",
    show_default=True,
    callback=_budgets,
    metavar="PERCENTS",
    help="Cache sizes to simulate, in percent of all expert bytes.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of split and MLP.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    metavar="PNG",
    help="Also draw the expert-usage heatmap and recall against lookahead "
    "distance (needs matplotlib: pip install 'mer-cli[plot]').",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    traces: tuple[str, ...],
    output: str,
    holdout: float,
    kind: str,
    model: str | None,
    distance: int,
    hidden: int,
    epochs: int,
    budgets: list[float],
    seed: int,
    plot_path: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Fit expert predictors on routing traces and report held-out quality.

    The traces' prompts are split into training and held-out prompts
    (--holdout, by prompt). On the training prompts a second-order Markov
    predictor over expert sets (backed off to first order and per-layer
    frequency, with the previous token's experts at the same layer) and a
    small MLP (hidden-state sketch and current experts to the experts of the
    next --distance layers) are fitted; with --model, a second MLP that also
    takes the router lookahead (mlp+router); on traces recorded with the
    attention preview (mer trace's default), an MLP that also takes the
    preview's sketch (mlp+preview: layer l+1's attention run on the hidden
    state entering layer l's MoE block, computed live by mer generate
    --predictor). With --model, also shadow, one layer ahead: a rank-32
    linear surrogate of every expert is fitted by least squares on the
    experts' real inputs and outputs (the training prompts replayed through
    STORE); after layer l's routing, the surrogates of its selected experts
    stand in for its MoE output, layer l+1's attention preview is taken of
    the residual plus that, and layer l+1's router applied to it (the
    held-out prompts are replayed to score it). On the held-out prompts every
    predictor -- and the router lookahead the trace recorded, the
    training-free baseline -- is scored by recall@k and precision@k per
    lookahead distance, and the expert requests are replayed at each of
    --budgets. The hit-rate table gives, per budget, the hit rate and the
    extents read per token of: lru; policy (the three-signal cache policy,
    demand only); policy+NAME (NAME's predictions steer eviction, nothing is
    read ahead); prefetch+NAME (they also read the next layers' experts ahead
    of demand, throttled, as mer generate --predictor does; timing is not
    modelled, so every read lands in time) with the share of those reads
    wasted; and Belady's MIN, the best any cache can do WITHOUT prefetch. A
    prefetching policy can beat MIN's hit rate, but only by reading more:
    compare the reads. The predictor chosen by --kind is written to PRED (a
    versioned .npz, see mer-predictor(5)); use it with
    mer generate --predictor PRED.

    \b
    Examples:
      mer train-predictor run.trace.npz -o run.pred.npz
      mer train-predictor a.npz b.npz -o p.npz --holdout 0.25 --plot p.png
      mer train-predictor run.trace.npz -o run.pred.npz --model m.mer
    """
    from mer_cli.train_predictor import format_report, train_predictor

    if model is not None:
        from mer_cli import builtin

        model = builtin.resolve(model, progress=not quiet)

    report = train_predictor(
        traces,
        output,
        holdout=holdout,
        kind=kind,
        max_distance=distance,
        hidden=hidden,
        epochs=epochs,
        budgets=budgets,
        seed=seed,
        model=model,
        plot=plot_path,
        progress=not quiet,
    )
    if as_json:
        import json

        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    if plot_path is not None and not as_json:
        click.echo(f"plot written to {plot_path}")
