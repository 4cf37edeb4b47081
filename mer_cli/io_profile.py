"""I/O profiles written by ``mer profile-ssd`` and read by the expert reader.

A profile is a small TOML file, one per block device, kept by default in
``config_dir()/io-profiles/<major>-<minor>.toml``::

    version = 1

    [device]
    id = "259:0"             # major:minor of the device that holds the data
    name = "nvme0n1"         # from /sys/dev/block, "" when unknown
    model = "Samsung SSD 990 PRO 2TB"
    target = "/dev/nvme0n1"  # what was measured
    kind = "device"          # device | file | directory
    span_bytes = 2000398934016
    measured_at = "2026-11-29T15:00:00Z"
    duration_s = 60.0

    [reader]                 # the settings mer's reader uses on this device
    threads = 8
    chunk_bytes = 4194304
    best_read_gbps = 3.2     # best sequential figure of the grid below

    [[sequential]]           # one table per (block size, threads) cell, O_DIRECT
    block_bytes = 131072
    threads = 1
    gbps = 0.61

    [random]                 # 4 KiB O_DIRECT reads at uniformly random offsets
    qd1_iops = 20100.0
    qd1_p50_us = 45.1
    qd1_p99_us = 120.7
    qd16_iops = 70300.0
    qd16_p50_us = 201.3
    qd16_p99_us = 612.0

    [buffered]               # page-cache reads (cache dropped first) vs O_DIRECT
    gbps = 1.2
    direct_gbps = 3.1
    block_bytes = 4194304
    threads = 8

``load_profile_for(path)`` finds the profile of the drive that holds ``path``; the
``io_profile`` setting of :mod:`mer_cli.config` wins when set. GB/s means 10^9 bytes
per second throughout.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mer_cli.config import Config, config_dir, load_config
from mer_cli.errors import FormatError, ReadError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PROFILE_VERSION = 1
KINDS = ("device", "file", "directory")


@dataclass(frozen=True)
class DeviceInfo:
    """The block device a profile describes, and how it was measured."""

    id: str  # "major:minor"
    name: str = ""
    model: str = ""
    target: str = ""
    kind: str = "file"
    span_bytes: int = 0
    measured_at: str = ""
    duration_s: float = 0.0


@dataclass(frozen=True)
class ReaderSettings:
    """Settings chosen for mer's reader: thread count and chunk size per read."""

    threads: int
    chunk_bytes: int
    best_read_gbps: float


@dataclass(frozen=True)
class SequentialCell:
    """Sequential O_DIRECT read throughput for one block size and thread count."""

    block_bytes: int
    threads: int
    gbps: float


@dataclass(frozen=True)
class RandomReads:
    """Random 4 KiB O_DIRECT reads: one thread (QD1) and 16 threads (QD16)."""

    qd1_iops: float
    qd1_p50_us: float
    qd1_p99_us: float
    qd16_iops: float
    qd16_p50_us: float
    qd16_p99_us: float


@dataclass(frozen=True)
class BufferedReads:
    """Buffered (page cache, dropped first) against O_DIRECT at the same settings."""

    gbps: float
    direct_gbps: float
    block_bytes: int
    threads: int


@dataclass(frozen=True)
class Profile:
    """A whole I/O profile; ``path`` is the file it was loaded from, if any."""

    device: DeviceInfo
    reader: ReaderSettings
    sequential: list[SequentialCell]
    random: RandomReads
    buffered: BufferedReads
    version: int = PROFILE_VERSION
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """Plain dict in the TOML layout (without ``path``)."""
        d = asdict(self)
        d.pop("path")
        return {"version": d.pop("version"), **d}


# ---------------------------------------------------------------- devices


def _read_sys(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _mount_source(dev: int) -> str | None:
    """The source (e.g. ``/dev/sda2``) of the mount whose st_dev is ``dev``."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(" - ", 1)
        head = parts[0].split()
        if len(head) > 2 and head[2] == want and len(parts) == 2:
            tail = parts[1].split()
            if len(tail) >= 2 and tail[1].startswith("/dev/"):
                return tail[1]
    return None


def backing_device(st_dev: int) -> int:
    """The block device number behind a file system's ``st_dev``.

    File systems without a block device of their own in st_dev (btrfs, some
    overlays) report an anonymous ``0:N``; their mount source names the device.
    """
    if os.major(st_dev) != 0:
        return st_dev
    src = _mount_source(st_dev)
    if src is not None:
        try:
            st = os.stat(src)
        except OSError:
            return st_dev
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev
    return st_dev


def device_id(dev: int) -> str:
    """``"major:minor"`` for a device number."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def describe_device(dev: int) -> tuple[str, str]:
    """(name, model) of a block device from /sys; empty strings when unknown."""
    sysdir = Path(f"/sys/dev/block/{device_id(dev)}")
    if not sysdir.exists():
        return "", ""
    name = Path(os.path.realpath(sysdir)).name
    model = _read_sys(sysdir / "device" / "model")
    if not model and (sysdir / "partition").exists():
        # a partition: the model belongs to the whole disk one level up
        model = _read_sys(sysdir / ".." / "device" / "model")
    if not model:
        model = _read_sys(sysdir / "dm" / "name")
    return name, model


def parent_disk(dev: int) -> int | None:
    """The whole-disk device number of a partition, else ``None``."""
    sysdir = Path(f"/sys/dev/block/{device_id(dev)}")
    if not (sysdir / "partition").exists():
        return None
    text = _read_sys(Path(os.path.realpath(sysdir)).parent / "dev")
    try:
        major, minor = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return os.makedev(major, minor)


def device_of(path: str | os.PathLike) -> int:
    """Device number of the drive holding ``path`` (``st_rdev`` for a device node)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return st.st_rdev
    return backing_device(st.st_dev)


def default_profile_path(dev: int | str) -> Path:
    """Where ``mer profile-ssd`` writes the profile of a device by default.

    ``dev`` is a device number or its ``"major:minor"`` form (``DeviceInfo.id``).
    """
    key = (
        dev.replace(":", "-")
        if isinstance(dev, str)
        else device_id(dev).replace(":", "-")
    )
    return config_dir() / "io-profiles" / f"{key}.toml"


# ---------------------------------------------------------------- writing


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(round(v, 4))
    if isinstance(v, str):
        return _toml_str(v)
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _table(name: str, values: dict, array: bool = False) -> list[str]:
    lines = [f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return lines + [""]


def profile_to_toml(profile: Profile) -> str:
    """The TOML text of ``profile`` (the layout in this module's docstring)."""
    d = profile.to_dict()
    lines = [
        "# I/O profile written by `mer profile-ssd`; GB/s = 1e9 bytes/s",
        f"version = {d['version']}",
        "",
    ]
    lines += _table("device", d["device"])
    lines += _table("reader", d["reader"])
    for cell in d["sequential"]:
        lines += _table("sequential", cell, array=True)
    lines += _table("random", d["random"])
    lines += _table("buffered", d["buffered"])
    return "\n".join(lines)


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Write ``profile`` to ``path`` atomically (temporary name, then rename)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(profile_to_toml(profile))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


# ---------------------------------------------------------------- reading


_FIX = "re-run `mer profile-ssd` to write a fresh profile"


def _get(table: dict, key: str, kind: type, where: str, path: Path, check=None):
    if key not in table:
        raise FormatError(f"{path}: {where}.{key} is missing; {_FIX}")
    v = table[key]
    ok = isinstance(v, kind) and not isinstance(v, bool)
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        expected = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise FormatError(
            f"{path}: {where}.{key} is {v!r}, expected {expected}; {_FIX}"
        )
    if check is not None:
        expected = check(v)
        if expected:
            raise FormatError(
                f"{path}: {where}.{key} is {v!r}, expected {expected}; {_FIX}"
            )
    return v


def _positive(v) -> str | None:
    return None if v > 0 and math.isfinite(v) else "a finite number > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 and math.isfinite(v) else "a finite number >= 0"


def _aligned(v) -> str | None:
    return None if v > 0 and v % 4096 == 0 else "a positive multiple of 4096"


def _table_of(data: dict, key: str, path: Path) -> dict:
    t = data.get(key)
    if not isinstance(t, dict):
        raise FormatError(f"{path}: table [{key}] is missing; {_FIX}")
    return t


def profile_from_dict(data: dict, path: Path) -> Profile:
    """Validate a parsed profile; errors name ``path`` and the field."""
    version = data.get("version")
    if version != PROFILE_VERSION:
        raise FormatError(
            f"{path}: version is {version!r}, expected {PROFILE_VERSION}; {_FIX}"
        )
    d = _table_of(data, "device", path)
    device = DeviceInfo(
        id=_get(
            d,
            "id",
            str,
            "device",
            path,
            lambda v: None if v.count(":") == 1 else '"major:minor"',
        ),
        name=str(d.get("name", "")),
        model=str(d.get("model", "")),
        target=str(d.get("target", "")),
        kind=_get(
            d,
            "kind",
            str,
            "device",
            path,
            lambda v: None if v in KINDS else " or ".join(KINDS),
        ),
        span_bytes=_get(d, "span_bytes", int, "device", path, _positive),
        measured_at=str(d.get("measured_at", "")),
        duration_s=_get(d, "duration_s", float, "device", path, _non_negative),
    )
    r = _table_of(data, "reader", path)
    reader = ReaderSettings(
        threads=_get(r, "threads", int, "reader", path, _positive),
        chunk_bytes=_get(r, "chunk_bytes", int, "reader", path, _aligned),
        best_read_gbps=_get(r, "best_read_gbps", float, "reader", path, _positive),
    )
    seq_list = data.get("sequential")
    if not isinstance(seq_list, list) or not seq_list:
        raise FormatError(f"{path}: no [[sequential]] tables; {_FIX}")
    sequential = []
    for i, c in enumerate(seq_list):
        where = f"sequential[{i}]"
        if not isinstance(c, dict):
            raise FormatError(f"{path}: {where} is not a table; {_FIX}")
        sequential.append(
            SequentialCell(
                block_bytes=_get(c, "block_bytes", int, where, path, _aligned),
                threads=_get(c, "threads", int, where, path, _positive),
                gbps=_get(c, "gbps", float, where, path, _non_negative),
            )
        )
    rt = _table_of(data, "random", path)
    random_reads = RandomReads(
        **{
            k: _get(rt, k, float, "random", path, _non_negative)
            for k in (
                "qd1_iops",
                "qd1_p50_us",
                "qd1_p99_us",
                "qd16_iops",
                "qd16_p50_us",
                "qd16_p99_us",
            )
        }
    )
    b = _table_of(data, "buffered", path)
    buffered = BufferedReads(
        gbps=_get(b, "gbps", float, "buffered", path, _non_negative),
        direct_gbps=_get(b, "direct_gbps", float, "buffered", path, _non_negative),
        block_bytes=_get(b, "block_bytes", int, "buffered", path, _aligned),
        threads=_get(b, "threads", int, "buffered", path, _positive),
    )
    return Profile(
        device=device,
        reader=reader,
        sequential=sequential,
        random=random_reads,
        buffered=buffered,
        version=version,
        path=str(path),
    )


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate one profile file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        raise FormatError(
            f"{p}: I/O profile not found; run `mer profile-ssd` or fix the path"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: cannot read the I/O profile ({e})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{p}: not valid TOML ({e}); {_FIX}") from e
    return profile_from_dict(data, p)


def load_profile_for(
    path: str | os.PathLike, config: Config | None = None
) -> Profile | None:
    """The I/O profile for the drive that holds ``path``, or ``None``.

    The ``io_profile`` setting (config file or ``MER_IO_PROFILE``) wins when set
    and must name a valid profile. Otherwise the default profile of ``path``'s
    device is used, then that of its whole disk when ``path`` is on a partition.
    A profile whose recorded model differs from the device's current model (the
    device numbers were reassigned) is ignored.

    Parameters
    ----------
    path : file, directory or block device whose drive we read from.
    config : settings to use; ``load_config()`` when ``None``.
    """
    cfg = config if config is not None else load_config()
    if cfg.io_profile:
        return load_profile(cfg.io_profile)
    try:
        dev = device_of(path)
    except OSError as e:
        raise ReadError(
            f"{path}: cannot find the drive that holds it ({e.strerror})"
        ) from None
    candidates = [dev]
    parent = parent_disk(dev)
    if parent is not None:
        candidates.append(parent)
    for d in candidates:
        p = default_profile_path(d)
        if not p.is_file():
            continue
        profile = load_profile(p)
        _, model = describe_device(d)
        if profile.device.model and model and profile.device.model != model:
            continue
        return profile
    return None
