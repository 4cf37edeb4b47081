"""``mer inspect STORE``: what a store holds."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("store", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of text."
)
def command(store: str, as_json: bool) -> None:
    """Show what STORE holds: architecture, parameter and byte counts, dense bytes,
    bytes per expert, data files and extent alignment.

    The placement lines give the expert bytes, extents and extra copies on each
    device (filesystem), as mer shard spread them.

    \b
    Example:
      mer inspect mixtral.mer
      mer inspect mixtral.mer --json | jq .bytes_per_expert
    """
    from mer_cli.inspect import summarize

    info = summarize(store)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    from mer_cli.units import format_size as fs

    m = info["model"]
    click.echo(
        f"store          {info['path']}  (format v{info['version']}, {info['created_by']})"
    )
    click.echo(
        f"architecture   {m['arch']}: {m['num_layers']} layers, D={m['hidden_size']}, "
        f"{m['num_heads']} heads / {m['num_kv_heads']} kv, "
        f"{m['num_experts']} experts x F={m['expert_ffn']}, top-{m['top_k']}"
        + (
            f", shared expert F={m['shared_expert_ffn']}"
            if m["shared_expert_ffn"]
            else ""
        )
    )
    click.echo(
        f"parameters     {_count(info['parameters'])} total, "
        f"{_count(info['active_parameters'])} active per token"
    )
    q = info["quantization"]
    click.echo(
        f"quantization   experts {q['experts']}, dense {q['dense']}, "
        f"group {q['group_size']}, {q['scale_dtype']} scales"
    )
    click.echo(
        f"dense          {fs(info['dense_bytes'])} in {info['dense_tensors']} tensors (resident)"
    )
    click.echo(
        f"experts        {info['num_extents']} extents x {fs(info['bytes_per_expert'])} "
        f"= {fs(info['expert_bytes'])}; aligned to {info['extent_alignment']} bytes: "
        f"{'yes' if info['extents_aligned'] else 'NO'}"
    )
    click.echo(f"total          {fs(info['total_bytes'])}")
    click.echo("files")
    for f in info["files"]:
        click.echo(
            f"  {f['path']:40s} {f['role']:8s} {fs(f['nbytes']):>12s}  "
            f"{f['extents']} extents  device {f['device']}"
        )
    lay = info.get("layout")
    click.echo(
        "placement"
        + (
            f"      (mer shard: policy {lay.get('policy')}, generation "
            f"{lay.get('generation')})"
            if lay
            else ""
        )
    )
    for d in info["placement"]:
        click.echo(
            f"  device {d['device']!s:10s} {d['files']} file(s) {d['extents']:6d} "
            f"extents {fs(d['expert_bytes']):>11s} ({100 * d['share']:.1f}%)"
            + (f", {d['replicas']} extra copies" if d["replicas"] else "")
            + f"  in {', '.join(d['dirs'])}"
        )


def _count(n: int) -> str:
    return (
        f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"
    )
