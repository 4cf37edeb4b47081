"""``mer shard STORE --to PATH ...``: spread expert extents over several drives."""

from __future__ import annotations

import json

import click


@click.command("shard")
@click.argument("store", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="PATH",
    help="Directory to put expert files in (repeat: normally one per drive).",
)
@click.option(
    "--policy",
    type=click.Choice(["stripe", "balanced"]),
    default="stripe",
    show_default=True,
    help="stripe: experts round robin over the targets; balanced: by a trace's "
    "expert frequencies, so each drive serves the same expected bytes per token.",
)
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, path_type=str),
    metavar="TRACE",
    help="Routing trace (mer trace) giving expert frequencies; needed by "
    "--policy balanced and --hot-copies, and reports the expected split.",
)
@click.option(
    "--max-file-size",
    metavar="SIZE",
    help="Largest shard file, e.g. 4GiB (for filesystems with a file size "
    "limit) [default: one file per target].",
)
@click.option(
    "--hot-copies",
    type=int,
    default=0,
    show_default=True,
    metavar="N",
    help="Copy the N most used experts (by --trace) onto every target; the "
    "reader takes the copy on the least busy drive.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of text."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    store: str,
    targets: tuple[str, ...],
    policy: str,
    trace: str | None,
    max_file_size: str | None,
    hot_copies: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Move the expert extents of STORE into files under each --to PATH and
    switch the manifest to them atomically.

    Free space on every target is checked before anything is written. Each
    extent is copied, synced and read back against its checksum before the
    manifest changes; the old expert files are removed only after the new
    manifest is on disk. The store stays usable throughout, and a run that was
    interrupted is finished by running the same command again (the plan is
    kept in STORE/shard-journal.json). Running it again after it finished does
    nothing; another policy or set of targets moves the experts again.

    \b
    Examples:
      mer shard mixtral.mer --to /mnt/nvme0/mer --to /mnt/nvme1/mer
      mer trace --model mixtral.mer --prompts prompts.txt -o mixtral.trace
      mer shard mixtral.mer --to /mnt/nvme0/mer --to /mnt/nvme1/mer \\
          --policy balanced --trace mixtral.trace --hot-copies 16
      mer shard mixtral.mer --to /mnt/usb --max-file-size 4GiB
      mer shard mixtral.mer --to mixtral.mer        # back into the store
    """
    from mer_cli.shard import ShardOptions, shard
    from mer_cli.units import format_size as fs
    from mer_cli.units import parse_size

    limit = parse_size(max_file_size, "--max-file-size") if max_file_size else None
    res = shard(
        store,
        ShardOptions(
            targets=targets,
            policy=policy,
            trace=trace,
            max_file_size=limit,
            hot_copies=hot_copies,
        ),
        progress=not quiet and not as_json,
    )
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=1))
        return
    if res.unchanged:
        click.echo(
            f"{store}: already sharded this way (layout generation "
            f"{res.generation}); nothing to do"
        )
    else:
        click.echo(
            f"{store}: layout generation {res.generation}, policy {res.policy}"
            + (", finished an interrupted run" if res.resumed else "")
            + f"; copied {fs(res.copied_bytes)}, removed {len(res.removed)} old "
            "file(s)"
        )
    for t in res.targets:
        share = (
            f"  {100 * t.expected_share:5.1f}% of expected reads"
            if t.expected_share is not None
            else ""
        )
        click.echo(
            f"  {t.path:40s} {t.files} file(s) {t.extents:6d} extents "
            f"{fs(t.nbytes):>11s}  device {t.device}{share}"
        )
    if res.expected_bytes_per_token is not None:
        click.echo(
            f"expected expert bytes per token (trace, no cache): "
            f"{fs(res.expected_bytes_per_token)}"
        )
