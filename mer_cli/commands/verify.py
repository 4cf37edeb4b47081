"""``mer verify STORE``: every checksum, alignment and bound."""

from __future__ import annotations

import click


@click.command("verify")
@click.argument("store", type=click.Path(file_okay=False, path_type=str))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(store: str, quiet: bool) -> None:
    """Check every checksum, alignment and bound of STORE.

    Exits 0 when the store is sound, 1 listing every problem found.

    \b
    Example:
      mer verify mixtral.mer
    """
    from tqdm import tqdm

    from mer_cli.formats.store import Store

    s = Store.open(store)
    total = s.dense_bytes_total + s.expert_bytes_total
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verify",
        disable=quiet,
        leave=False,
    ) as bar:
        problems = s.verify(progress=bar.update)
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        click.echo(f"{store}: {len(problems)} problem(s) found", err=True)
        raise SystemExit(1)
    click.echo(
        f"{store}: OK ({len(s.dense)} dense tensors, {len(s.experts)} expert extents, "
        f"{total} bytes checked)"
    )
