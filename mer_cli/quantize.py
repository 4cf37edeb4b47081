"""``mer quantize``: turn a Hugging Face checkpoint directory or a GGUF file into a store.

:func:`quantize` looks at ``src`` and hands it to the importer that reads it:
a directory goes to :func:`mer_cli.hf_import.quantize_hf`, a file that starts
with the GGUF magic to :func:`mer_cli.gguf_import.quantize_gguf`. Both take the
same keyword arguments and return the path of the finished store.
"""

from __future__ import annotations

import os
from pathlib import Path

from mer_cli.errors import FormatError, UsageError

EXPERT_DTYPES = ("q4", "q8", "f16", "f32")
DENSE_DTYPES = ("q4", "q8", "f16", "bf16", "f32")
GGUF_MAGIC = b"GGUF"


def check_options(
    out: str | os.PathLike,
    *,
    experts: str,
    dense: str,
    force: bool,
    threads: int | None,
    max_file_size: int | None,
) -> None:
    """Refuse bad options before any input is read (shared by both importers)."""
    if experts not in EXPERT_DTYPES:
        raise UsageError(
            f"--experts is {experts!r}, expected one of {', '.join(EXPERT_DTYPES)}"
        )
    if dense not in DENSE_DTYPES:
        raise UsageError(
            f"--dense is {dense!r}, expected one of {', '.join(DENSE_DTYPES)}"
        )
    if threads is not None and threads < 1:
        raise UsageError(f"--threads is {threads}, expected a whole number >= 1")
    if max_file_size is not None and max_file_size <= 0:
        raise UsageError(f"--max-file-size is {max_file_size}, expected a size > 0")
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(
            f"{out}: output already exists; choose another -o or pass --force "
            "to replace it"
        )


def quantize(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: str = "q4",
    dense: str = "q8",
    force: bool = False,
    threads: int | None = None,
    progress: bool = True,
    max_file_size: int | None = None,
) -> Path:
    """Convert ``src`` into a store at ``out`` and return ``out``.

    Parameters
    ----------
    src
        A Hugging Face checkpoint directory (``config.json``, ``*.safetensors``,
        ``tokenizer.json``) or a ``.gguf`` file.
    out
        The store directory to create; written under a temporary name next to
        it and renamed into place, so an interrupted run leaves no store.
    experts, dense
        Encodings of routed experts (q4, q8, f16, f32) and of 2-D dense tensors
        (q4, q8, f16, bf16, f32; q4 transcodes a GGUF Q4_0 model's dense
        tensors bit for bit, so mer runs the very weights llama.cpp runs). 1-D tensors, routers and the shared-expert gate
        are always f32.
    force
        Replace an existing ``out``.
    threads
        Quantizer threads (default: ``os.cpu_count()``).
    progress
        Show a tqdm progress bar (bytes of input, bytes/s) on stderr.
    max_file_size
        Largest size in bytes of one experts file; more files are written when
        the experts do not fit (default: one file).

    Raises
    ------
    MerError
        ``UsageError`` for bad options or an existing output, ``FormatError``
        and ``UnsupportedError`` for input that cannot be read or converted.
    """
    kwargs = dict(
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        progress=progress,
        max_file_size=max_file_size,
    )
    check_options(
        out,
        experts=experts,
        dense=dense,
        force=force,
        threads=threads,
        max_file_size=max_file_size,
    )
    src = Path(src)
    if src.is_dir():
        from mer_cli.hf_import import quantize_hf

        return quantize_hf(src, out, **kwargs)
    if not src.exists():
        raise FormatError(
            f"{src}: no such file or directory; expected a Hugging Face checkpoint "
            "directory or a .gguf file"
        )
    try:
        with open(src, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise FormatError(f"{src}: cannot read ({e.strerror})") from e
    if magic == GGUF_MAGIC:
        from mer_cli.gguf_import import quantize_gguf

        return quantize_gguf(src, out, **kwargs)
    hint = (
        f"; pass the directory that holds it ({src.parent})"
        if src.suffix == ".safetensors" or src.name == "config.json"
        else ""
    )
    raise FormatError(
        f"{src}: starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}, and is "
        "not a directory; expected a Hugging Face checkpoint directory "
        f"(config.json + *.safetensors + tokenizer.json) or a .gguf file{hint}"
    )
