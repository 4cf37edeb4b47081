"""``mer trace --model STORE --prompts FILE -o TRACE``: record routing traces."""

from __future__ import annotations

import click


@click.command("trace")
@click.option(
    "--model",
    "model",
    metavar="STORE",
    help="Store to run, or 'builtin' [default: the built-in model].",
)
@click.option(
    "--prompts",
    "prompts_file",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help='Prompts: one per line, or JSON Lines with a "prompt" field.',
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="TRACE",
    help="Trace file to write (.npz, see mer-trace(5)).",
)
@click.option(
    "--max-tokens",
    default=64,
    show_default=True,
    help="Tokens to generate (greedy) after each prompt.",
)
@click.option(
    "--sketch-dim",
    default=64,
    show_default=True,
    help="Width of the random projection of the residual stream.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the random projection."
)
@click.option(
    "--lookahead",
    default=3,
    show_default=True,
    help="Also record layers l+1..l+N's routers applied to the hidden state "
    "entering layer l (router lookahead, the predictor baseline); 0 to omit.",
)
@click.option(
    "--preview/--no-preview",
    default=True,
    show_default=True,
    help="Also record the attention preview: layer l+1's attention run early on "
    "the hidden state entering layer l's MoE block, and l+1's router on it "
    "(input of the mlp+preview predictor; costs one more attention per layer).",
)
@click.option(
    "--ram-budget",
    metavar="SIZE",
    help="DRAM for cached experts, e.g. 6GiB [default: config ram_budget, else "
    "half the available memory]; experts stream from the drive above it.",
)
@click.option("--threads", type=int, help="Compute threads [default: all cores].")
@click.option(
    "--ctx",
    type=int,
    help="Context length (KV cache positions) [default: min(max_position, 4096)].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Configuration file [default: $MER_CONFIG or ~/.config/mer/config.toml].",
)
def command(
    model: str | None,
    prompts_file: str,
    output: str,
    max_tokens: int,
    sketch_dim: int,
    seed: int,
    lookahead: int,
    preview: bool,
    ram_budget: str | None,
    threads: int | None,
    ctx: int | None,
    quiet: bool,
    config_path: str | None,
) -> None:
    """Record which experts the router picks for every token and layer.

    Each prompt runs through the model, then --max-tokens tokens are generated
    greedily; for every token that went through the model the trace keeps, per
    MoE layer, the selected experts and their weights, the router's
    probabilities over all experts, and a --sketch-dim wide random projection
    of the hidden state entering the MoE block. The format is described in
    mer-trace(5); read it with numpy (np.load(TRACE, allow_pickle=False)) or
    mer_cli.formats.trace.Trace.load.

    \b
    Examples:
      mer trace --model mixtral.mer --prompts prompts.txt -o run.trace.npz
      mer trace --model m.mer --prompts p.jsonl -o t.npz --max-tokens 128 \\
          --ram-budget 8GiB
    """
    from mer_cli import builtin
    from mer_cli.config import load_config
    from mer_cli.generate import read_prompts
    from mer_cli.trace import trace

    prompts = read_prompts(prompts_file, "--prompts")
    cfg = load_config(config_path)
    t = trace(
        builtin.resolve(model, progress=not quiet),
        prompts,
        output,
        max_tokens=max_tokens,
        sketch_dim=sketch_dim,
        seed=seed,
        lookahead=lookahead,
        preview=preview,
        ram_budget=ram_budget,
        ctx=ctx,
        threads=cfg.threads if threads is None else threads,
        config=cfg,
        progress=not quiet,
    )
    if not quiet:
        from mer_cli.units import format_size

        size = format_size(t.path.stat().st_size)
        click.echo(
            f"{t.path}: {t.num_tokens} tokens of {t.num_prompts} prompts, {size}",
            err=True,
        )
