"""``mer quantize SRC -o STORE``: a checkpoint directory or GGUF file -> a store."""

from __future__ import annotations

import time

import click


@click.command("quantize")
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="STORE",
    type=click.Path(path_type=str),
    help="Store directory to create.",
)
@click.option(
    "--experts",
    type=click.Choice(["q4", "q8", "f16", "f32"]),
    default="q4",
    show_default=True,
    help="Encoding of routed experts.",
)
@click.option(
    "--dense",
    type=click.Choice(["q4", "q8", "f16", "bf16", "f32"]),
    default="q8",
    show_default=True,
    help="Encoding of 2-D dense tensors (attention, embeddings, shared expert, "
    "lm_head). Norms, biases, routers and the shared-expert gate are always f32. "
    "q4 from a GGUF Q4_0 file copies its blocks bit for bit (the weights "
    "llama.cpp runs, e.g. for a comparison); from a checkpoint it adds q4's "
    "error to every dense matrix.",
)
@click.option("--force", is_flag=True, help="Replace STORE if it exists.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Quantizer threads  [default: all CPUs]",
)
@click.option(
    "--max-file-size",
    metavar="SIZE",
    default=None,
    help="Split experts over files of at most SIZE (e.g. 4GiB)  [default: one file]",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def command(
    src: str,
    out: str,
    experts: str,
    dense: str,
    force: bool,
    threads: int | None,
    max_file_size: str | None,
    quiet: bool,
) -> None:
    """Convert a checkpoint SRC into a store (-o STORE).

    SRC is a Hugging Face checkpoint directory (config.json, *.safetensors with
    model.safetensors.index.json when sharded, tokenizer.json, and when present
    tokenizer_config.json and generation_config.json) or a .gguf file.
    Architectures: mixtral, qwen2_moe, qwen3_moe, olmoe.

    Safetensors are read through a memory map one tensor at a time, so memory
    use stays far below the model's size. The store is written under a
    temporary name next to STORE and renamed into place when complete; an
    interrupted run leaves no store.

    GGUF files (llama.cpp architectures llama with experts, qwen2moe,
    qwen3moe, olmoe; hyperparameters and tokenizer from the metadata): Q4_0
    and Q8_0 tensors transcode bit-exactly into q4 and q8 (no
    dequantize/requantize); F32, F16 and BF16 are quantized as from a
    checkpoint; any other type (Q4_K, Q6_K, IQ4_XS, ...) is dequantized and
    quantized again with a printed warning, because that adds a second
    quantization error; types the gguf package cannot dequantize are refused.

    \b
    Examples:
      mer quantize ./Mixtral-8x7B-v0.1 -o mixtral.mer
      mer quantize ./Qwen3-30B-A3B -o qwen3.mer --dense f16 --threads 2
      mer quantize ./OLMoE-1B-7B -o olmoe-f32.mer --experts f32 --dense f32
      mer quantize mixtral-q4_0.gguf -o mixtral.mer --max-file-size 8GiB
    """
    from mer_cli.quantize import quantize
    from mer_cli.units import format_size, parse_size

    size = None
    if max_file_size is not None:
        size = parse_size(max_file_size, what="--max-file-size")
    t0 = time.perf_counter()
    path = quantize(
        src,
        out,
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        progress=not quiet,
        max_file_size=size,
    )
    if not quiet:
        total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        click.echo(
            f"{path}: store written, {format_size(total)} in "
            f"{time.perf_counter() - t0:.1f} s",
            err=True,
        )
