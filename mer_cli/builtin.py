"""The built-in model: a small trained Mixtral-architecture MoE shipped in the package.

``mer_cli/data/builtin/`` holds it as a Hugging Face checkpoint (config.json,
model.safetensors in f16, tokenizer.json, ...; made by
``scripts/dev/train_builtin.py``, described in its ``README.md``). Commands run
stores, so the first use converts it with the default encodings (q4 experts,
q8 dense) into the cache directory (``MER_CACHE_DIR``, else
``$XDG_CACHE_HOME/mer``, else ``~/.cache/mer``) under a name carrying a hash
of the checkpoint, and later uses open that store. Concurrent first runs (two
batch jobs started together) serialise on a lock file; the store itself is
written under a temporary name and renamed, so nothing half-written is seen.

``--model builtin`` names it explicitly; a command whose ``--model`` is
omitted uses it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

from mer_cli.config import cache_dir
from mer_cli.errors import FormatError, ResourceError

#: the name that selects the built-in model where a store path is expected
NAME = "builtin"

#: files of the packaged checkpoint that determine the converted store
_INPUTS = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def checkpoint_dir() -> Path:
    """Directory of the packaged Hugging Face checkpoint."""
    return Path(__file__).resolve().parent / "data" / "builtin"


def fingerprint(src: Path | None = None) -> str:
    """Hex digest (16 characters) of the checkpoint files that the store depends on."""
    src = checkpoint_dir() if src is None else src
    h = hashlib.sha256()
    for name in _INPUTS:
        path = src / name
        try:
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0")
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            raise FormatError(
                f"{path}: missing from the installed package, so the built-in model "
                "cannot be used; reinstall mer (pip install --force-reinstall mer-cli) "
                "or pass --model STORE"
            ) from None
    return h.hexdigest()[:16]


def store_path(src: Path | None = None) -> Path:
    """Where the converted built-in store lives (it may not exist yet)."""
    from mer_cli.formats.store import VERSION

    return cache_dir() / f"builtin-{fingerprint(src)}-v{VERSION}.mer"


def ensure_store(progress: bool = True) -> Path:
    """Path of the converted built-in store, converting it first if needed.

    Raises
    ------
    ResourceError
        The cache directory cannot be created or written (names the directory
        and the ``MER_CACHE_DIR`` fix).
    FormatError
        The packaged checkpoint is missing or damaged.
    """
    src = checkpoint_dir()
    out = store_path(src)
    if (out / "manifest.json").is_file():
        return out
    root = out.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".builtin.lock", "a+b")  # closed by the with below
    except OSError as e:
        raise ResourceError(
            f"{root}: cannot create the cache directory for the built-in model "
            f"({os.strerror(e.errno or errno.EIO)}); set MER_CACHE_DIR to a writable "
            "directory, or pass --model STORE"
        ) from e
    import fcntl

    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (out / "manifest.json").is_file():  # another process converted it
            return out
        from mer_cli.quantize import quantize

        if progress:
            print(
                f"mer: converting the built-in model into {out} (once)",
                file=sys.stderr,
                flush=True,
            )
        try:
            quantize(src, out, threads=1, progress=False)
        except PermissionError as e:
            raise ResourceError(
                f"{root}: cannot write the built-in model's store ({e.strerror}); "
                "set MER_CACHE_DIR to a writable directory, or pass --model STORE"
            ) from e
    return out


def resolve(model: str | os.PathLike | None, progress: bool = True) -> str:
    """``model`` unless it is None or ``"builtin"``; then the built-in store's path."""
    if model is None or str(model) == NAME:
        return str(ensure_store(progress=progress))
    return os.fspath(model)
