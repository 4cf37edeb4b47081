"""mer's ``.npz`` files (routing traces, expert predictors): a ``meta.json``
member (JSON bytes as ``uint8``) beside plain ``.npy`` arrays, read with
``allow_pickle=False``. Installed as ``mer_cli.formats.npz``.

:func:`save_npz` writes one atomically; :func:`load_npz` opens one and turns
every way it can be broken (missing, not a zip, truncated, a pickled or
non-array member, no or bad ``meta.json``) into an error naming the file and
the fix; :func:`check_header` checks the JSON header's common fields.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.errors import FormatError, UsageError


@dataclass(frozen=True)
class Kind:
    """What a file is, for messages.

    ``fmt``: the ``format`` field (``"mer-trace"``); ``noun``: ``"trace"``;
    ``make``: how to make one (``"mer trace"``); ``redo``: the fix for a broken
    or outdated file (``"record the trace again"``); ``not_this``: said after a
    wrong ``format`` field.
    """

    fmt: str
    noun: str
    make: str
    redo: str
    not_this: str


def save_npz(path: str | os.PathLike, meta: dict, arrays: Mapping[str, Any]) -> Path:
    """Write ``meta`` and ``arrays`` to ``path`` under a temporary name, fsync,
    rename; an interrupted write leaves the old file (if any) untouched."""
    path = Path(path)
    blob = json.dumps(meta, sort_keys=True).encode()
    members = {"meta.json": np.frombuffer(blob, np.uint8), **arrays}
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or "."
    )
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz(
    path: str | os.PathLike,
    kind: Kind,
    check_meta: Callable[[Any, str], None],
    members: Callable[[dict, set[str]], list[str]],
) -> tuple[dict, dict[str, np.ndarray]]:
    """Open ``path`` and return ``(meta, arrays)``.

    ``check_meta(meta, where)`` validates the header; ``members(meta, names)``
    returns the array names to read (raising :class:`FormatError` when one the
    header calls for is missing from ``names``).

    Raises
    ------
    UsageError
        ``path`` does not exist.
    FormatError
        Anything else wrong with the file, naming it and ``kind``'s fix.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such {kind.noun} file; make one with {kind.make}")
    corrupt = f"{path}: corrupt or truncated {kind.noun} ({{}}); {kind.redo}"
    try:
        z = np.load(path, allow_pickle=False)
    except zipfile.BadZipFile as e:  # a zip whose end is missing or damaged
        raise FormatError(corrupt.format(e)) from None
    except (ValueError, OSError, EOFError) as e:  # not a zip, nor a .npy
        raise FormatError(
            f"{path}: not a {kind.fmt} file (expected an .npz zip archive: {e}); "
            f"make one with {kind.make}"
        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FormatError(
            f"{path}: holds a single .npy array, expected a {kind.fmt} .npz "
            f"archive; make one with {kind.make}"
        )
    try:
        with z:
            names = set(z.files)
            if "meta.json" not in names:
                raise FormatError(
                    f"{path}: no meta.json member; not a {kind.fmt} file "
                    f"(make one with {kind.make})"
                )
            where = f"{path}: meta.json"
            try:
                meta = json.loads(z["meta.json"].tobytes().decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FormatError(f"{where} is not JSON ({e})") from None
            check_meta(meta, where)
            arrays = {n: z[n] for n in members(meta, names)}
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise FormatError(corrupt.format(e)) from None
    except ValueError as e:  # a member that is not a valid .npy, or pickled
        raise FormatError(
            f"{path}: a member is not a plain .npy array ({e}); {kind.redo}"
        ) from None
    return meta, arrays


def check_header(
    meta: Any, where: str, kind: Kind, version: int, fields: dict[str, Any]
) -> None:
    """``meta`` is an object with ``format == kind.fmt``, ``version ==
    version`` and each of ``fields`` present with its type (bools are not
    ints); :class:`FormatError` naming ``where``, the field and the fix."""
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != kind.fmt:
        raise FormatError(
            f"{where}: format is {meta.get('format')!r}, expected {kind.fmt!r}; "
            f"{kind.not_this}"
        )
    if meta.get("version") != version:
        raise FormatError(
            f"{where}: version is {meta.get('version')!r}, this mer reads version "
            f"{version}; {kind.redo}"
        )
    for name, typ in fields.items():
        if name not in meta:
            raise FormatError(f"{where}: field {name} is missing; {kind.redo}")
        v = meta[name]
        if not isinstance(v, typ) or isinstance(v, bool):
            raise FormatError(
                f"{where}: {name} is {v!r}, expected a {typ.__name__}"  # type: ignore[union-attr]
            )
