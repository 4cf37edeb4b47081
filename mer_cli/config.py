"""User configuration shared by the commands.

Defaults come from, in increasing priority: built-in values, the TOML file
(``--config FILE``, else ``$MER_CONFIG``, else ``$XDG_CONFIG_HOME/mer/config.toml``),
and ``MER_*`` environment variables (``MER_RAM_BUDGET=6GiB``, ``MER_THREADS=2``,
``MER_IO_PROFILE=path``, ``MER_CACHE_DIR=path``). Command-line options override all.

Example ``config.toml``::

    ram_budget = "6GiB"
    threads = 2
    io_profile = "~/.config/mer/io-profile.toml"
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from mer_cli.errors import FormatError
from mer_cli.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def config_dir() -> Path:
    """Directory holding ``config.toml`` and the I/O profiles."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "mer"


def cache_dir() -> Path:
    """Directory for derived data (converted built-in model, JIT caches)."""
    if os.environ.get("MER_CACHE_DIR"):
        return Path(os.environ["MER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mer"


@dataclass
class Config:
    """Defaults shared by the commands; ``None`` means "decide at run time"."""

    ram_budget: int | None = None  # bytes for the expert cache
    threads: int | None = None  # compute threads
    io_profile: str | None = None  # TOML written by ``mer profile-ssd``
    io_threads: int | None = None  # reader threads (overrides the profile)
    source: str | None = None  # file the values came from, for messages


_ENV = {
    "ram_budget": "MER_RAM_BUDGET",
    "threads": "MER_THREADS",
    "io_profile": "MER_IO_PROFILE",
    "io_threads": "MER_IO_THREADS",
}


def _coerce(name: str, value: object, where: str) -> object:
    if name == "ram_budget":
        return parse_size(value, what=f"{where}: ram_budget")
    if name in ("threads", "io_threads"):
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise FormatError(
                f"{where}: {name} is {value!r}, expected a whole number >= 1"
            )
        return n
    if name == "io_profile":
        return os.path.expanduser(str(value))
    return value


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read the configuration file (if any) and apply ``MER_*`` overrides."""
    explicit = path is not None or "MER_CONFIG" in os.environ
    p = Path(path or os.environ.get("MER_CONFIG") or config_dir() / "config.toml")
    cfg = Config()
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FormatError(
                f"{p}: not valid TOML ({e}); fix or remove the file"
            ) from e
        known = {f.name for f in fields(Config)} - {"source"}
        for key, value in data.items():
            if key not in known:
                raise FormatError(
                    f"{p}: unknown setting {key!r}; known settings are "
                    + ", ".join(sorted(known))
                )
            setattr(cfg, key, _coerce(key, value, str(p)))
        cfg.source = str(p)
    elif explicit:
        raise FormatError(
            f"{p}: configuration file not found; check --config/MER_CONFIG"
        )
    for key, env in _ENV.items():
        if os.environ.get(env):
            setattr(cfg, key, _coerce(key, os.environ[env], env))
    return cfg
