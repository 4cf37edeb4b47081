"""The DRAM budget for experts: parsing ``--ram-budget``, defaults, checks, RSS.

``--ram-budget`` is the memory for expert slots only. Dense weights (embeddings,
attention, norms, routers, shared experts), the KV cache and the interpreter are
separate; the process RSS should stay within budget + those + a small overhead,
which :func:`rss_bytes` lets a run measure.
"""

from __future__ import annotations

import os
from pathlib import Path

from mer_cli.errors import ResourceError, UsageError
from mer_cli.units import format_size, parse_size

DEFAULT_FRACTION = 0.5  # of available memory, when neither option nor config says
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_CGROUP_V2 = Path("/sys/fs/cgroup")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _cgroup_free() -> int | None:
    """Memory left under this process's cgroup limit (v1 or v2), if limited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):
            d = _CGROUP_V1 / rel
            limit = _read_int(d / "memory.limit_in_bytes")
            usage = _read_int(d / "memory.usage_in_bytes")
        elif controllers == "":
            d = _CGROUP_V2 / rel
            limit = _read_int(d / "memory.max")
            usage = _read_int(d / "memory.current")
        else:
            continue
        # v1 reports "no limit" as a huge number
        if limit is not None and usage is not None and limit < 1 << 60:
            # usage counts page cache; inactive file pages are reclaimed first
            usage -= _stat_field(
                d / "memory.stat", ("total_inactive_file", "inactive_file")
            )
            return max(limit - usage, 0)
    return None


def _stat_field(p: Path, names: tuple[str, ...]) -> int:
    """The first of ``names`` found in a cgroup ``memory.stat`` file, else 0."""
    try:
        fields = dict(line.split() for line in p.read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return next((int(fields[n]) for n in names if n in fields), 0)


def available_memory() -> int:
    """Bytes the process can still use: ``MemAvailable``, or less under a cgroup."""
    avail = _meminfo("MemAvailable")
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cg = _cgroup_free()
    return min(avail, cg) if cg is not None else avail


def resolve_ram_budget(
    option: str | int | None,
    config: int | None = None,
    *,
    fraction: float = DEFAULT_FRACTION,
) -> int:
    """The expert budget in bytes: ``--ram-budget``, else the config file's
    ``ram_budget``, else ``fraction`` (default 0.5) of available memory.

    ``option`` accepts sizes such as ``6GiB``, ``512MiB``, ``8GB``.
    """
    if option is not None:
        n = parse_size(option, what="--ram-budget")
    elif config is not None:
        n = int(config)
    else:
        return int(available_memory() * fraction)
    if n <= 0:
        raise UsageError(f"--ram-budget {option!r} must be larger than 0")
    return n


def check_budget(budget: int, extent_nbytes: int, where: str = "the store") -> int:
    """Number of expert slots ``budget`` holds; at least one, or ResourceError.

    One slot is the minimum: the streaming source then reads the selected
    experts one after another into it (slow, but correct).
    """
    slots = budget // extent_nbytes
    if slots < 1:
        raise ResourceError(
            f"--ram-budget {format_size(budget)} ({budget} bytes) is smaller than one "
            f"expert extent of {where} ({format_size(extent_nbytes)}, {extent_nbytes} "
            f"bytes); the minimum budget is {extent_nbytes} bytes (dense weights and "
            "the KV cache are held separately); raise --ram-budget"
        )
    return slots


def check_fits(
    budget: int,
    dense_nbytes: int,
    available: int | None = None,
    what: str = "the model",
) -> None:
    """Refuse a budget that cannot fit next to the dense weights in memory.

    Raises ResourceError naming the budget, the dense size, what is available
    and the largest budget that would fit.
    """
    avail = available_memory() if available is None else available
    if budget + dense_nbytes > avail:
        room = max(avail - dense_nbytes, 0)
        raise ResourceError(
            f"--ram-budget {format_size(budget)} plus the dense weights of {what} "
            f"({format_size(dense_nbytes)}) exceed the available memory "
            f"({format_size(avail)}); use --ram-budget {format_size(room)} or less"
        )


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Largest resident set size so far (``VmHWM``)."""
    return _status("VmHWM")
