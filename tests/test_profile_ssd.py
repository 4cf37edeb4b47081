"""`mer profile-ssd`: targets, measurements, the TOML profile and its lookup.

Runs use tiny targets and durations (a few tenths of a second), so the figures
themselves are noise; the tests check what was measured, where, and what is left
behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import default_sigint

from mer_cli.cli import cli
from mer_cli.config import Config
from mer_cli.errors import (
    FormatError,
    MerError,
    ReadError,
    ResourceError,
    UsageError,
)
from mer_cli.io_profile import (
    BufferedReads,
    DeviceInfo,
    Profile,
    RandomReads,
    SequentialCell,
    default_profile_path,
    device_id,
    device_of,
    load_profile,
    load_profile_for,
    profile_to_toml,
    save_profile,
)
from mer_cli.profile_ssd import (
    MIN_TARGET_BYTES,
    NEAR_BEST,
    TEST_FILE_PREFIX,
    choose_reader,
    open_target,
    plan_grid,
    profile_target,
)

MiB = 1 << 20
FAST = dict(duration=0.3, quick=True)


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """Profiles go to a temporary config dir; no io_profile setting leaks in."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("MER_CONFIG", "MER_IO_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def _data_file(path: Path, nbytes: int = 16 * MiB) -> Path:
    path.write_bytes(os.urandom(nbytes))  # real data: no sparse holes
    return path


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEST_FILE_PREFIX)]


def _sample_profile(**device) -> Profile:
    gbps = {  # GB/s by block size (rows) and 1, 4, 16 threads (columns)
        131072: (0.4, 1.2, 2.6),
        1048576: (1.1, 2.9, 3.0),
        4194304: (1.5, 3.1, 3.2),
    }
    cells = [
        SequentialCell(b, t, g)
        for b, row in gbps.items()
        for t, g in zip((1, 4, 16), row)
    ]
    return Profile(
        device=DeviceInfo(
            id=device.get("id", "259:0"),
            name=device.get("name", "nvme0n1"),
            model=device.get("model", 'Model "X" \\ 2TB'),
            target="/dev/nvme0n1",
            kind="device",
            span_bytes=2 * 10**12,
            measured_at="2026-11-29T15:00:00Z",
            duration_s=60.0,
        ),
        reader=choose_reader(cells),
        sequential=cells,
        random=RandomReads(20100.5, 45.25, 120.0, 70300.0, 201.5, 612.0),
        buffered=BufferedReads(1.25, 3.0, 4194304, 8),
    )


# ---------------------------------------------------------------- measuring


def test_file_target_measures_the_grid_on_the_right_device(tmp_path):
    f = _data_file(tmp_path / "data.bin")
    notes = []
    p = profile_target(f, log=notes.append, **FAST)

    st = os.stat(f)
    assert p.device.kind == "file"
    assert p.device.id == device_id(device_of(f))
    assert p.device.id == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" or (
        os.major(st.st_dev) == 0  # anonymous st_dev: resolved through mountinfo
    )
    assert p.device.target == str(f)
    assert p.device.span_bytes == 16 * MiB
    # blocks above a quarter of the span are left out: 128K, 1M, 4M x 1, 4, 16
    want = plan_grid(16 * MiB, quick=True)
    assert want == [(b, t) for b in (131072, MiB, 4 * MiB) for t in (1, 4, 16)]
    assert [(c.block_bytes, c.threads) for c in p.sequential] == want
    assert all(c.gbps > 0 for c in p.sequential)
    assert p.random.qd1_iops > 0 and p.random.qd16_iops > 0
    assert 0 < p.random.qd1_p50_us <= p.random.qd1_p99_us
    assert 0 < p.random.qd16_p50_us <= p.random.qd16_p99_us
    assert p.buffered.gbps > 0 and p.buffered.direct_gbps > 0
    assert (p.buffered.block_bytes, p.buffered.threads) == (
        p.reader.chunk_bytes,
        p.reader.threads,
    )
    assert p.reader.best_read_gbps == max(c.gbps for c in p.sequential)
    assert any("drive's own cache" in n for n in notes)  # 16 MiB is small
    assert f.read_bytes() != b""  # the file was only read


def test_choose_reader_takes_least_in_flight_within_ten_percent():
    cells = [
        SequentialCell(4 * MiB, 1, 1.5),
        SequentialCell(1 * MiB, 4, 2.9),  # 4 MiB in flight, 97% of best
        SequentialCell(4 * MiB, 4, 3.0),  # best, 16 MiB in flight
        SequentialCell(128 * 1024, 16, 2.75),  # 2 MiB in flight but 92% of best
        SequentialCell(512 * 1024, 4, 2.6),  # 2 MiB in flight, 87%: too slow
        SequentialCell(2 * MiB, 1, 2.75),  # 2 MiB in flight too, fewer threads
    ]
    r = choose_reader(cells)
    assert NEAR_BEST == 0.90
    assert (r.threads, r.chunk_bytes, r.best_read_gbps) == (1, 2 * MiB, 3.0)


def test_directory_target_writes_then_removes_the_test_file(tmp_path):
    d = tmp_path / "drive"
    d.mkdir()
    seen = {}

    with open_target(d, size=12 * MiB + 1) as t:
        test_file = Path(t.read_path)
        seen["size"] = test_file.stat().st_size
        seen["blocks"] = test_file.stat().st_blocks * 512
        with open(test_file, "rb") as fh:
            pages = [fh.read(4096) for _ in range(3)]
    assert t.kind == "directory" and test_file.parent == d
    assert seen["size"] == t.span == 12 * MiB + 4096  # rounded up to 4 KiB
    assert seen["blocks"] >= seen["size"]  # written out, not sparse
    assert len(set(pages)) == 3  # every page differs (no dedup shortcut)
    assert not test_file.exists() and _leftovers(d) == []


def test_directory_target_cleans_up_when_the_run_fails(tmp_path):
    d = tmp_path / "drive"
    d.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with open_target(d, size=MIN_TARGET_BYTES):
            assert len(_leftovers(d)) == 1
            raise RuntimeError("boom")
    assert _leftovers(d) == []


def test_stale_test_files_of_dead_runs_are_removed(tmp_path):
    d = tmp_path / "drive"
    d.mkdir()
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer runs
    stale = d / f"{TEST_FILE_PREFIX}{proc.pid}.tmp"
    alive = d / f"{TEST_FILE_PREFIX}1.tmp"  # init is alive: not ours to delete
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    notes = []
    with open_target(d, size=MIN_TARGET_BYTES, log=notes.append):
        pass
    assert not stale.exists() and alive.exists()
    assert any("interrupted run" in n for n in notes)


# ---------------------------------------------------------------- CLI


def test_cli_directory_json_and_default_profile_path(tmp_path):
    d = tmp_path / "drive"
    d.mkdir()
    res = CliRunner().invoke(
        cli,
        ["profile-ssd", str(d), "--size", "16MiB", "--duration", "0.3", "--quick"]
        + ["--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    dev = device_of(d)
    path = default_profile_path(dev)
    assert out["profile_path"] == str(path)
    assert path.parent == tmp_path / "config" / "mer" / "io-profiles"
    assert path.name == f"{os.major(dev)}-{os.minor(dev)}.toml"
    loaded = load_profile(path)
    assert loaded.device.kind == "directory" and out["device"]["kind"] == "directory"
    assert loaded.reader.threads == out["reader"]["threads"]
    assert loaded.reader.chunk_bytes == out["reader"]["chunk_bytes"]
    assert len(loaded.sequential) == len(out["sequential"]) == 9
    assert _leftovers(d) == []
    # the reader finds it for any file on that drive
    assert load_profile_for(d).device.kind == "directory"


def test_cli_file_table_and_output_option(tmp_path):
    f = _data_file(tmp_path / "data.bin")
    out = tmp_path / "p" / "mine.toml"
    res = CliRunner().invoke(
        cli, ["profile-ssd", str(f), "-o", str(out), "--duration", "0.3", "--quick"]
    )
    assert res.exit_code == 0, res.output
    assert "sequential reads, GB/s" in res.stdout
    assert "QD16 (16 threads)" in res.stdout
    assert f"profile written to {out}" in res.stdout
    p = load_profile(out)
    assert f"{p.reader.threads} threads x" in res.stdout
    assert not default_profile_path(device_of(f)).exists()


def _fifo(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return str(p), 2, "is a FIFO (named pipe)"


def _socket(tmp_path):
    p = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return str(p), 2, "is a socket"


def _chardev(tmp_path):
    return "/dev/null", 2, "is a character device"


def _missing(tmp_path):
    return str(tmp_path / "nope"), 2, "no such file, directory or device"


def _small_file(tmp_path):
    return str(_data_file(tmp_path / "small.bin", MiB)), 2, "needs at least 8.0 MiB"


@pytest.mark.parametrize("make", [_fifo, _socket, _chardev, _missing, _small_file])
def test_cli_bad_targets(tmp_path, make):
    target, code, message = make(tmp_path)
    res = CliRunner().invoke(cli, ["profile-ssd", target, "--duration", "0.1"])
    assert res.exit_code == code, res.output
    assert message in res.stderr and target in res.stderr
    assert "Traceback" not in res.output


def test_cli_not_enough_free_space(tmp_path):
    res = CliRunner().invoke(cli, ["profile-ssd", str(tmp_path), "--size", "1000TiB"])
    assert res.exit_code == 1
    assert "not enough free space" in res.stderr and "--size" in res.stderr
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_cli_bad_duration_fails_before_writing(tmp_path, value):
    res = CliRunner().invoke(cli, ["profile-ssd", str(tmp_path), "--duration", value])
    assert res.exit_code == 2
    assert "must be a number of seconds > 0" in res.stderr
    assert _leftovers(tmp_path) == []


def test_cli_size_needs_a_directory(tmp_path):
    f = _data_file(tmp_path / "data.bin")
    res = CliRunner().invoke(cli, ["profile-ssd", str(f), "--size", "1GiB"])
    assert res.exit_code == 2
    assert "--size applies to a directory target only" in res.stderr


def test_cli_plot_without_matplotlib_fails_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises
    f = _data_file(tmp_path / "data.bin")
    res = CliRunner().invoke(cli, ["profile-ssd", str(f), "--plot", "x.png"])
    assert res.exit_code == 1
    assert "pip install 'mer-cli[plot]'" in res.stderr
    assert not default_profile_path(device_of(f)).exists()  # nothing measured


def _as_nobody(fn) -> str:
    """Run ``fn`` in a forked child with uid/gid 65534; its MerError as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        msg = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except MerError as e:
            msg = f"{e.exit_code}:{e}"
        except BaseException as e:  # report anything, then leave the child
            msg = f"unexpected {type(e).__name__}: {e}"
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


def test_no_permission_file_and_directory(tmp_path):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="mer-profile-perm-"))
    try:
        base.chmod(0o755)
        f = _data_file(base / "secret.bin")
        f.chmod(0o000)
        ro = base / "readonly"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)

        def run(target):
            with open_target(target, size=None):
                pass

        if os.geteuid() == 0:
            file_msg = _as_nobody(lambda: run(f))
            dir_msg = _as_nobody(lambda: run(ro))
        else:
            file_msg = dir_msg = ""
            for target in (f, ro):
                try:
                    run(target)
                except ResourceError as e:
                    if target == f:
                        file_msg = f"{e.exit_code}:{e}"
                    else:
                        dir_msg = f"{e.exit_code}:{e}"
        assert file_msg.startswith("1:") and "permission denied opening the file" in (
            file_msg
        )
        assert dir_msg.startswith(
            "1:"
        ) and "permission denied creating a test file" in (dir_msg)
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- block devices


def _loop_device_reason() -> str | None:
    if sys.platform != "linux":
        return "loop devices are Linux only"
    if os.geteuid() != 0:
        return "attaching a loop device needs root"
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    return None


@pytest.fixture
def loop_device(tmp_path):
    reason = _loop_device_reason()
    if reason:
        pytest.skip(reason)
    backing = _data_file(tmp_path / "disk.img", 16 * MiB)
    res = subprocess.run(
        ["losetup", "-r", "-f", "--show", str(backing)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"losetup -r failed here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_is_detected_and_read_only(loop_device):
    dev, backing = loop_device
    before = backing.read_bytes()
    p = profile_target(dev, **FAST)
    rdev = os.stat(dev).st_rdev
    assert p.device.kind == "device"
    assert p.device.id == f"{os.major(rdev)}:{os.minor(rdev)}"
    assert p.device.name == Path(dev).name
    assert p.device.span_bytes == 16 * MiB  # the device's size, not more
    assert len(p.sequential) == 9
    assert backing.read_bytes() == before
    with pytest.raises(UsageError, match="--size applies to a directory"):
        with open_target(dev, size=16 * MiB):
            pass
    msg = _as_nobody(lambda: open_target(dev).__enter__())
    assert msg.startswith("1:") and "permission denied opening the device" in msg
    assert "sudo" in msg and "file or directory" in msg


# ---------------------------------------------------------------- interruption


@pytest.mark.parametrize(
    "sig, phase, code",
    # SIGINT while the test file is being written is not tested: in about one run
    # in six (only when the suite itself runs with SIGINT ignored) it went
    # unanswered; that is an open issue, see the closing note of session 1
    [(signal.SIGINT, "measuring", 130), (signal.SIGTERM, "measuring", 143)],
)
def test_interrupted_run_removes_the_test_file(tmp_path, sig, phase, code):
    d = tmp_path / "drive"
    d.mkdir()
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mer_cli", "profile-ssd", str(d)]
        + ["--size", "64MiB", "--duration", "60"],
        env=env,
        preexec_fn=default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _leftovers(d):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the test file never appeared"
            time.sleep(0.01)
        if phase == "measuring":  # the test file is complete: reads have begun
            while (d / _leftovers(d)[0]).stat().st_size < 64 * MiB:
                assert time.monotonic() < deadline, "the test file never filled"
                time.sleep(0.01)
            time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert _leftovers(d) == []
    assert "Traceback" not in err


# ---------------------------------------------------------------- profile files


def test_profile_round_trip_is_exact(tmp_path):
    p = _sample_profile()
    path = save_profile(p, tmp_path / "sub" / "x.toml")
    assert load_profile(path) == p
    assert load_profile(path).path == str(path)
    assert [q.name for q in path.parent.iterdir()] == ["x.toml"]  # no temp left


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("version = 1", "version = 7"), "version is 7, expected 1"),
        (
            lambda t: t.replace("chunk_bytes = 1048576", "chunk_bytes = 1000"),
            "reader.chunk_bytes is 1000, expected a positive multiple of 4096",
        ),
        (
            lambda t: t.replace('kind = "device"', 'kind = "tape"'),
            "device.kind is 'tape', expected device or file or directory",
        ),
        (
            lambda t: t.replace("threads = 16\ngbps", 'threads = "16"\ngbps', 1),
            "sequential[2].threads is '16', expected an integer",
        ),
        (lambda t: t.replace("[random]", "[randomness]"), "table [random] is missing"),
        (lambda t: t + "\n[[[", "not valid TOML"),
    ],
)
def test_profile_validation_names_file_and_field(tmp_path, edit, message):
    path = save_profile(_sample_profile(), tmp_path / "x.toml")
    text = path.read_text()
    assert "threads = 4\nchunk_bytes = 1048576" in text  # reader: 4 x 1 MiB
    path.write_text(edit(text))
    with pytest.raises(FormatError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_profile_toml_escapes_strings(tmp_path):
    p = _sample_profile(model='quote " backslash \\ tab \t end')
    text = profile_to_toml(p)
    assert 'model = "quote \\" backslash \\\\ tab \\u0009 end"' in text
    assert load_profile(save_profile(p, tmp_path / "x.toml")).device.model == (
        p.device.model
    )


def test_lookup_by_device_config_override_and_model_check(tmp_path, monkeypatch):
    import mer_cli.io_profile as iop

    here = device_of(tmp_path)
    sample = _sample_profile()
    mine = replace(sample, device=replace(sample.device, id=device_id(here), model=""))
    path = save_profile(mine, default_profile_path(here))

    (tmp_path / "store.mer").mkdir()
    found = load_profile_for(tmp_path / "store.mer")
    assert found == mine and found.path == str(path)

    other = Path("/proc/self")  # procfs: a different (anonymous) device
    assert device_of(other) != here
    assert load_profile_for(other) is None

    explicit = save_profile(_sample_profile(), tmp_path / "explicit.toml")
    assert load_profile_for(other, Config(io_profile=str(explicit))).device.id == (
        "259:0"
    )
    monkeypatch.setenv("MER_IO_PROFILE", str(explicit))
    assert load_profile_for(tmp_path).path == str(explicit)
    monkeypatch.setenv("MER_IO_PROFILE", str(tmp_path / "missing.toml"))
    with pytest.raises(FormatError, match="I/O profile not found"):
        load_profile_for(tmp_path)
    monkeypatch.delenv("MER_IO_PROFILE")
    with pytest.raises(ReadError, match="cannot find the drive that holds it"):
        load_profile_for(tmp_path / "missing.mer")

    # a profile recorded for another model at the same device number is ignored
    save_profile(
        replace(mine, device=replace(mine.device, model="Old SSD")),
        default_profile_path(here),
    )
    monkeypatch.setattr(iop, "describe_device", lambda dev: ("nvme0n1", "New SSD"))
    assert load_profile_for(tmp_path) is None


# ---------------------------------------------------------------- picture


def test_plot_png(tmp_path):
    pytest.importorskip(
        "matplotlib", reason="matplotlib (the `plot` extra) is not installed"
    )
    from matplotlib.image import imread

    from mer_cli.plot import plot_sequential

    out = plot_sequential(_sample_profile(), tmp_path / "seq.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(out)
    assert img.shape[0] > 400 and img.shape[1] > 700
    assert img[..., :3].std() > 0.05  # not blank
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seq.png")]
