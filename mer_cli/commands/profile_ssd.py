"""``mer profile-ssd TARGET``: a read-only I/O profile used by the expert reader."""

from __future__ import annotations

import json
import sys

import click


@click.command("profile-ssd")
@click.argument("target", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=str),
    help="Profile file to write [default: CONFIG_DIR/io-profiles/MAJOR-MINOR.toml, "
    "where mer generate finds it for every store on that drive].",
)
@click.option(
    "--size",
    metavar="SIZE",
    help="Test file size for a directory TARGET, e.g. 4GiB [default: 8GiB, less "
    "when free space minus a margin of max(1GiB, 5%) is smaller].",
)
@click.option(
    "--duration",
    type=float,
    metavar="SECONDS",
    help="Seconds for all measurements together, split over the cells; each cell "
    "gets at least 0.05 s [default: 60, 20 with --quick].",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Smaller grid: 128K, 1M, 4M, 16M, 64M blocks x 1, 4, 16 threads.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the profile as one JSON object."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=str),
    metavar="FILE.png",
    help="Also draw GB/s against block size, one line per thread count "
    "(needs matplotlib: pip install 'mer-cli[plot]').",
)
def command(
    target: str,
    output: str | None,
    size: str | None,
    duration: float | None,
    quick: bool,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Measure how TARGET reads and save the settings mer's reader should use.

    TARGET is a block device (opened read-only with O_DIRECT; nothing is ever
    written to it, mounted devices are fine; usually needs sudo), a regular file
    of at least 8 MiB (read-only), or a directory on the drive, where a test file
    of --size is written first and removed afterwards, also on Ctrl-C.

    Measures sequential O_DIRECT reads over block sizes 128 KiB .. 64 MiB x 1, 2,
    4, 8, 16 threads, random 4 KiB reads (IOPS, p50/p99 latency) at QD1 and with
    16 threads, and buffered against direct reads. Prints a table, writes a TOML
    profile, and picks the reader's threads and chunk size: the fewest bytes in
    flight within 10% of the best GB/s. mer generate then uses the profile of the
    drive holding the store (or the io_profile setting, when set).

    \b
    Examples:
      sudo mer profile-ssd /dev/nvme0n1
      mer profile-ssd ~/models --size 16GiB --plot nvme.png
      mer profile-ssd ~/models/mixtral.mer/experts-00001-of-00004.bin --quick
    """
    from mer_cli.io_profile import default_profile_path, save_profile
    from mer_cli.profile_ssd import format_report, profile_target
    from mer_cli.units import parse_size

    nbytes = parse_size(size, what="--size") if size is not None else None
    if plot_path is not None:
        from mer_cli.plot import require_matplotlib

        require_matplotlib()  # fail now, not after the measurement
    seconds = duration if duration is not None else (20.0 if quick else 60.0)
    log = lambda msg: click.echo(f"note: {msg}", err=True)
    profile = profile_target(
        target,
        size=nbytes,
        duration=seconds,
        quick=quick,
        progress=sys.stderr.isatty() and not as_json,
        log=log,
    )
    saved = save_profile(profile, output or default_profile_path(profile.device.id))
    if plot_path is not None:
        from mer_cli.plot import plot_sequential

        plot_sequential(profile, plot_path)
    if as_json:
        click.echo(
            json.dumps(
                {**profile.to_dict(), "profile_path": str(saved), "plot": plot_path},
                indent=1,
            )
        )
        return
    click.echo(format_report(profile))
    click.echo(f"profile written to {saved}")
    if plot_path is not None:
        click.echo(f"plot written to {plot_path}")
