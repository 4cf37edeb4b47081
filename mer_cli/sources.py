"""Choosing where ``mer generate`` gets routed experts from.

:func:`plan_source` turns the options (``--ram-budget``, ``--stream``,
``--io-threads``, ...), the configuration file and the drive's I/O profile into a
:class:`SourcePlan`; :func:`open_source` builds the source it describes:

- every expert fits in the budget (and ``--stream`` is not given): all experts
  are read into RAM once (:class:`~mer_cli.experts.ResidentExperts`). It decodes
  faster than a streamed source holding every expert, which also runs the next
  layer's router for prefetch hints and walks its slot table per layer for no
  gain once all is in. Measured (64 greedy tokens, same shared 2-core machine,
  runs alternated): tiny-mixtral store, resident 412-721 tok/s vs streamed
  230-594; a 4-layer D=1024 store with 4.9 MB extents, resident 176-235 vs
  streamed 95-161;
- otherwise experts stream through ``ram_budget // extent`` slots
  (:class:`~mer_cli.streaming.StreamedExperts`).

Reader settings: ``--io-threads``, else the config's ``io_threads``, else the
profile's ``reader.threads``, else the reader's default; the chunk size comes
from the profile (else the reader's default). The drive's best sequential read
(for the share ``--stats`` prints) is the profile's ``best_read_gbps``, else a
quick O_DIRECT measurement of the largest experts file (:func:`quick_ceiling`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mer_cli.config import Config
from mer_cli.errors import MerError, UsageError
from mer_cli.memory import check_budget, check_fits, resolve_ram_budget
from mer_cli.units import format_size

QUICK_SECONDS = 0.5  # duration of the quick read measurement
ALIGN = 4096
# sys.setswitchinterval while streaming; None leaves Python's 5 ms. Measured on a
# 4-layer D=1024 store (4.9 MB extents, half in the budget, 64 greedy tokens,
# --threads 1, 3 runs x 3 rounds alternated, shared 2-core machine): 5 ms 39-50
# tok/s (reads 1.0-1.35 GB/s), 1 ms 43-54 (1.2-1.7), 0.1 ms 33-57 (0.9-1.8): no
# consistent gain; run-to-run drift of the shared disk dominates. The kernels
# release the GIL, so reader threads rarely wait for it. benchmarks/stream.py
# --switch-interval measures it again on a large model.
SWITCH_INTERVAL: float | None = None


@dataclass(frozen=True)
class SourceOptions:
    """What the user asked for (``None``: decide from config, profile, defaults).

    Attributes
    ----------
    ram_budget : bytes or a size string (``"6GiB"``) for expert slots.
    stream : True forces streaming, False forces all experts in RAM.
    io_threads : reader threads (the I/O queue depth).
    prefetch : act on router-lookahead prefetch hints.
    verify_checksums : check every extent's CRC-32 as it is read.
    switch_interval : ``sys.setswitchinterval`` while streaming.
    """

    ram_budget: str | int | None = None
    stream: bool | None = None
    io_threads: int | None = None
    prefetch: bool = True
    verify_checksums: bool = False
    switch_interval: float | None = SWITCH_INTERVAL


@dataclass(frozen=True)
class SourcePlan:
    """The source to build, and why (shown by ``--stats``)."""

    kind: str  # "resident" | "streamed"
    ram_budget: int  # bytes for expert slots (resident: what the experts take)
    experts_nbytes: int  # all extents of the store
    io_threads: int
    chunk_size: int
    settings_from: str  # where io_threads/chunk_size came from
    best_read_gbps: float | None  # from the profile; None: measure or unknown
    profile_path: str | None
    prefetch: bool
    verify_checksums: bool
    switch_interval: float | None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ram_budget": self.ram_budget,
            "experts_nbytes": self.experts_nbytes,
            "io_threads": self.io_threads,
            "chunk_size": self.chunk_size,
            "settings_from": self.settings_from,
            "profile": self.profile_path,
        }


def plan_source(
    store, options: SourceOptions, config: Config, *, profile: Any = "auto"
) -> SourcePlan:
    """Decide the expert source for ``store``.

    Parameters
    ----------
    store : an opened :class:`~mer_cli.formats.store.Store`.
    options : what the command line asked for.
    config : the loaded configuration (``ram_budget``, ``io_threads``, ``io_profile``).
    profile : an :class:`~mer_cli.io_profile.Profile`, ``None`` for none, or
        ``"auto"`` to look up the profile of the drive holding the store.

    Raises
    ------
    ResourceError
        The budget holds no expert extent (the message states the minimum), or
        it does not fit next to the dense weights in available memory.
    """
    from mer_cli.io.reader import DEFAULT_CHUNK, DEFAULT_THREADS

    budget = resolve_ram_budget(options.ram_budget, config.ram_budget)
    ext = store.extent_nbytes
    total = ext * len(store.experts)
    if options.stream is False:
        kind = "resident"
    elif options.stream is True:
        kind = "streamed"
    else:
        kind = "resident" if budget >= total else "streamed"
    if kind == "streamed":
        check_budget(budget, ext, str(store.path))
    if options.ram_budget is not None or config.ram_budget is not None:
        # an explicit budget must fit beside the dense weights; the default is
        # a fraction of what is available, so it does by construction
        used = total if kind == "resident" else min(budget, total)
        check_fits(used, store.dense_bytes_total, what=str(store.path))

    if profile == "auto":
        from mer_cli.io_profile import load_profile_for

        profile = load_profile_for(store.path, config)
    threads, chunk, source = DEFAULT_THREADS, DEFAULT_CHUNK, "defaults"
    best = None
    ppath = None
    if profile is not None:
        threads, chunk = profile.reader.threads, profile.reader.chunk_bytes
        best = profile.reader.best_read_gbps
        ppath = getattr(profile, "path", None) or config.io_profile or "profile"
        source = "profile"
    if config.io_threads is not None:
        threads, source = config.io_threads, f"{source}, io_threads from config"
    if options.io_threads is not None:
        if options.io_threads < 1:
            raise UsageError(f"--io-threads {options.io_threads}: expected >= 1")
        threads, source = options.io_threads, f"{source}, --io-threads"
    return SourcePlan(
        kind=kind,
        ram_budget=total if kind == "resident" else budget,
        experts_nbytes=total,
        io_threads=threads,
        chunk_size=chunk,
        settings_from=source,
        best_read_gbps=best,
        profile_path=str(ppath) if ppath else None,
        prefetch=options.prefetch,
        verify_checksums=options.verify_checksums,
        switch_interval=options.switch_interval,
    )


def open_source(store, plan: SourcePlan):
    """Build the :class:`~mer_cli.experts.ExpertSource` ``plan`` describes."""
    if plan.kind == "resident":
        from mer_cli.experts import ResidentExperts

        if plan.verify_checksums:
            bad = store.verify()  # every checksum, before the experts are copied
            if bad:
                from mer_cli.errors import FormatError

                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise FormatError(f"{bad[0]}{more}; run mer verify for the full list")
        return ResidentExperts(store)
    from mer_cli.streaming import StreamedExperts

    return StreamedExperts(
        store,
        plan.ram_budget,
        io_threads=plan.io_threads,
        chunk_size=plan.chunk_size,
        verify_checksums=plan.verify_checksums,
        prefetch=plan.prefetch,
        switch_interval=plan.switch_interval,
    )


@dataclass(frozen=True)
class ReadCeiling:
    """The drive's best sequential read, the denominator of the read share."""

    gbps: float
    origin: str  # "profile PATH" or "quick measurement (...)"


def read_ceiling(store, plan: SourcePlan, measure: bool = True) -> ReadCeiling | None:
    """The profile's ``best_read_gbps``, else (``measure``) :func:`quick_ceiling`
    on the largest experts file; ``None`` when neither is available."""
    if plan.kind != "streamed":
        return None
    if plan.best_read_gbps:
        return ReadCeiling(plan.best_read_gbps, f"profile {plan.profile_path}")
    if not measure:
        return None
    return quick_ceiling(store, plan.io_threads, plan.chunk_size)


def largest_experts_file(store) -> str:
    """Path of the data file holding the most expert bytes."""
    per: dict[int, int] = {}
    for e in store.experts:
        per[e.file] = per.get(e.file, 0) + e.nbytes
    return str(store.file_paths[max(per, key=per.get)])


def quick_ceiling(
    store, threads: int, chunk: int, seconds: float = QUICK_SECONDS
) -> ReadCeiling | None:
    """Sequential O_DIRECT GB/s of the largest experts file at ``threads`` x
    ``chunk`` for ``seconds`` (chunk capped at the file size). ``None`` when the
    file cannot be read with O_DIRECT or is smaller than one page.

    A file smaller than the drive's cache, or read again soon, measures the
    cache rather than the flash: the label says this is a quick measurement.
    """
    from mer_cli.profile_ssd import Target, measure_sequential

    path = largest_experts_file(store)
    size = os.path.getsize(path) // ALIGN * ALIGN
    if size < ALIGN:
        return None
    block = min(chunk, size) // ALIGN * ALIGN
    target = Target(path, path, "file", size, os.stat(path).st_dev)
    try:
        gbps = measure_sequential(target, block, threads, seconds)
    except MerError:
        return None
    return ReadCeiling(
        gbps,
        f"quick measurement ({seconds:g} s of {threads} x {format_size(block)} "
        f"O_DIRECT reads of {os.path.basename(path)}, {format_size(size)})",
    )
