"""Pictures of I/O profiles (optional extra: ``pip install 'mer-cli[plot]'``).

matplotlib is imported only here and only when a picture is asked for; it draws
on a bare ``Figure`` with the Agg canvas, so no GUI backend or global pyplot
state is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from mer_cli.errors import UnsupportedError
from mer_cli.io_profile import Profile


def require_matplotlib() -> None:
    """Raise a clear error now, before a long measurement, if matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed; install it with "
            "`pip install 'mer-cli[plot]'` (or `pip install matplotlib`), or drop "
            "--plot"
        ) from None


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` to ``path`` under a temporary name and rename it into place;
    the format follows the suffix (PNG when there is none)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _size_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def plot_sequential(profile: Profile, path: str | os.PathLike) -> Path:
    """Draw sequential GB/s against block size, one line per thread count.

    The x axis is log2 (one tick per block size); the chosen reader setting is
    starred, and buffered and random-read figures are given in the caption.
    The PNG is written atomically.
    """
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    blocks = sorted({c.block_bytes for c in profile.sequential})
    threads = sorted({c.threads for c in profile.sequential})
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(8, 5.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for j, t in enumerate(threads):
        cells = sorted(
            (c for c in profile.sequential if c.threads == t),
            key=lambda c: c.block_bytes,
        )
        ax.plot(
            [c.block_bytes for c in cells],
            [c.gbps for c in cells],
            marker="o",
            markersize=4,
            color=cmap(0.05 + 0.8 * j / max(1, len(threads) - 1)),
            label=f"{t} thread{'s' if t > 1 else ''}",
        )
    r = profile.reader
    chosen = [
        c.gbps
        for c in profile.sequential
        if c.block_bytes == r.chunk_bytes and c.threads == r.threads
    ]
    if chosen:
        ax.plot(
            [r.chunk_bytes],
            chosen[:1],
            marker="*",
            markersize=15,
            color="crimson",
            linestyle="none",
            label=f"reader: {r.threads} x {_size_label(r.chunk_bytes)}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(blocks, [_size_label(b) for b in blocks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0, top=max(c.gbps for c in profile.sequential) * 1.12)
    ax.set_xlabel("block size (bytes per read)")
    ax.set_ylabel("GB/s (O_DIRECT, sequential)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="parallel reads", loc="best", fontsize=9)
    d = profile.device
    model = f" ({d.model})" if d.model else ""
    fig.suptitle(
        f"{d.name or 'device'}{model} [{d.id}]: {d.kind} {d.target}", fontsize=11
    )
    rnd, buf = profile.random, profile.buffered
    ax.set_title(
        f"random 4 KiB: {rnd.qd1_iops:,.0f} IOPS at QD1 "
        f"(p99 {rnd.qd1_p99_us:,.0f} us), {rnd.qd16_iops:,.0f} IOPS at QD16;  "
        f"buffered {buf.gbps:.2f} vs direct {buf.direct_gbps:.2f} GB/s;  "
        f"{d.measured_at}",
        fontsize=8,
        color="0.3",
    )
    return save_figure(fig, path)
