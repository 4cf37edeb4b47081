"""``mer synth PRESET -o DIR``: a synthetic Hugging Face checkpoint with random weights."""

from __future__ import annotations

import time

import click

# kept here (not imported from mer_cli.synth) so `mer synth --help` loads no numpy
PRESET_HELP = """\
\b
Presets:
  tiny-mixtral     Mixtral, D=256, 8 experts x F=384, top-2, 2 layers
  tiny-qwen2-moe   Qwen2-MoE (shared expert, q/k/v biases), D=256, 8x384, top-2
  tiny-qwen3-moe   Qwen3-MoE (q/k norm, head_dim 128, tied), D=256, 16x256, top-4
  tiny-olmoe       OLMoE (full-width q/k norm), D=256, 8 experts x F=384, top-2
  mixtral-8x7b     D=4096, 8 experts x F=14336, top-2, 32 layers (93 GB bf16)
  mixtral-8x22b    D=6144, 8 experts x F=16384, top-2, 56 layers (281 GB bf16)
  qwen3-30b-a3b    D=2048, 128 experts x F=768, top-8, 48 layers (61 GB bf16)
"""


@click.command("synth", epilog=PRESET_HELP)
@click.argument("preset", metavar="PRESET")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="DIR|FILE",
    type=click.Path(path_type=str),
    help="Checkpoint directory to create (with --format gguf: the .gguf file).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: a Hugging Face checkpoint directory; gguf: a GGUF Q4_0 file "
    "written directly from random Q4_0 blocks (no checkpoint, no float weights).",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Number of layers  [default: the preset's]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "f16", "f32"]),
    default="bf16",
    show_default=True,
    help="Dtype of the safetensors data.",
)
@click.option(
    "--shard-size",
    metavar="SIZE",
    default="5GB",
    show_default=True,
    help="Largest safetensors shard (e.g. 2GiB, 500MB).",
)
@click.option(
    "--gguf",
    "gguf",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Also write the same model as a GGUF Q4_0 file here.",
)
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    preset: str,
    out: str,
    fmt: str,
    layers: int | None,
    seed: int,
    dtype: str,
    shard_size: str,
    gguf: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Write a synthetic Hugging Face checkpoint of PRESET's architecture and
    shapes to DIR: config.json, sharded model-0000i-of-0000N.safetensors with
    model.safetensors.index.json, a byte-level BPE tokenizer.json,
    tokenizer_config.json and generation_config.json.

    Weights are scaled Gaussians (std 1/sqrt(fan_in), norms near 1), so the
    model routes like a real one: every expert of every layer gets a near
    uniform share of tokens. The same --seed gives the same weights, whatever
    the shard size or --layers (fewer layers give a prefix of the model).
    Tensors are generated on two threads and written one at a time into a
    temporary directory renamed into place, so memory stays at a few tensors.

    --format gguf writes the model straight to a GGUF Q4_0 file (-o FILE),
    with the metadata, tokenizer and tensor layout that --gguf writes, for
    llama.cpp and `mer quantize`. Its Q4_0 blocks are random bytes with fp16
    scales of random sign, sized so each matrix has std 1/sqrt(fan_in); norms,
    biases and routers are F32. It runs at disk speed (no float generation):
    a 16-layer mixtral-8x7b (13 GB) in a few minutes. --dtype, --shard-size
    and --gguf do not apply.

    \b
    Examples:
      mer synth tiny-mixtral -o tiny-mixtral
      mer synth mixtral-8x7b --layers 4 -o mixtral-4l --gguf mixtral-4l.gguf
      mer synth mixtral-8x7b --layers 16 --format gguf -o mixtral-16l.gguf
      mer quantize tiny-mixtral -o tiny-mixtral.mer
    """
    from mer_cli.synth import plan, write_checkpoint
    from mer_cli.units import format_size, parse_size

    if fmt == "gguf":
        _write_gguf(preset, out, layers, seed, gguf, shard_size, dtype, force, quiet)
        return

    size = parse_size(shard_size, "--shard-size")
    p = plan(preset, layers, dtype, size)
    t0 = time.perf_counter()
    write_checkpoint(
        preset,
        out,
        layers=layers,
        seed=seed,
        dtype=dtype,
        shard_size=size,
        force=force,
        progress=not quiet,
        gguf=gguf,
    )
    if not quiet:
        dt = time.perf_counter() - t0
        m, n = p.model, p.parameters
        params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
        click.echo(
            f"wrote {out}: {m.arch}, {m.num_layers} layers, "
            f"{params} parameters, {format_size(p.nbytes)} in "
            f"{len(p.shards)} shard(s), {dt:.1f} s "
            f"({p.nbytes / max(dt, 1e-9) / 1e9:.2f} GB/s)"
            + (f"; GGUF {gguf}" if gguf else ""),
            err=True,
        )


def _write_gguf(
    preset: str,
    out: str,
    layers: int | None,
    seed: int,
    gguf: str | None,
    shard_size: str,
    dtype: str,
    force: bool,
    quiet: bool,
) -> None:
    from mer_cli.synth_gguf import write_gguf
    from mer_cli.units import format_size

    ctx = click.get_current_context()
    for opt, given in (
        ("--gguf", gguf is not None),
        ("--shard-size", shard_size != "5GB"),
        ("--dtype", dtype != "bf16"),
    ):
        if given:
            raise click.UsageError(
                f"{opt} does not apply to --format gguf (-o is the .gguf file, "
                "all matrices Q4_0); drop it",
                ctx,
            )
    t0 = time.perf_counter()
    path = write_gguf(
        preset, out, layers=layers, seed=seed, force=force, progress=not quiet
    )
    if not quiet:
        dt = time.perf_counter() - t0
        n = path.stat().st_size
        click.echo(
            f"wrote {out}: GGUF Q4_0, {format_size(n)} in {dt:.1f} s "
            f"({n / max(dt, 1e-9) / 1e9:.2f} GB/s)",
            err=True,
        )
