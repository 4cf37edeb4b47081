"""``mer shard``: expert extents spread over several directories give exactly the
tokens of the unsharded store; a run interrupted at any step (exception or
SIGKILL) leaves a usable store and is finished by running it again; space is
checked before any write; a missing shard file is named with its experts; the
reader keeps one queue per device and reads them in parallel; duplicated hot
experts are read from the least busy drive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli import shard as shard_mod
from mer_cli.cli import cli
from mer_cli.config import Config
from mer_cli.errors import FormatError, ResourceError, UsageError
from mer_cli.formats.quant import PAGE
from mer_cli.formats.store import MANIFEST, Store
from mer_cli.generate import Completion, GenerateOptions, load
from mer_cli.io.reader import ExtentReader
from mer_cli.io.slabs import SlabPool
from mer_cli.quantize import quantize
from mer_cli.shard import JOURNAL, ShardOptions, assign, shard
from mer_cli.sources import SourceOptions, open_source, plan_source
from mer_cli.streaming import StreamedExperts

PROMPT = "The quick brown fox jumps"
N_TOKENS = 10


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Mixtral store (2 layers x 4 experts, top-2), its resident-run
    tokens, and a routing trace recorded on it."""
    from mer_cli.trace import trace

    d = tmp_path_factory.mktemp("shard")
    ck = make_hf_checkpoint(d / "ck", "mixtral", seed=5)
    store = quantize(ck, d / "tiny.mer", experts="q4", dense="q8", progress=False)
    tokens = run_tokens(store, stream=False)
    tr = d / "tiny.trace"
    trace(store, [PROMPT, "hello world"], tr, max_tokens=6, progress=False)
    return store, tokens, tr


@pytest.fixture
def store(base, tmp_path) -> Path:
    """A fresh copy of the base store (sharding moves its files)."""
    return Path(shutil.copytree(base[0], tmp_path / "tiny.mer"))


def targets(tmp_path, n=2) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"drive{i}"
        p.mkdir(exist_ok=True)
        out.append(p)
    return out


def run_tokens(store, stream=True, slots=3) -> str:
    """Greedy completion of PROMPT; streamed through ``slots`` extents (so every
    token reads experts from the files) or all in RAM."""
    st = Store.open(store)
    opts = SourceOptions(ram_budget=slots * st.extent_nbytes, stream=stream)
    plan = plan_source(st, opts, Config(), profile=None)
    eng, tok = load(store, ctx=128, source=lambda s: open_source(s, plan))
    try:
        c = Completion(eng, tok, PROMPT, GenerateOptions(max_tokens=N_TOKENS))
        return c.run().completion
    finally:
        eng.close()


def files_under(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*") if p.is_file())


def expert_files(store: Path) -> list[Path]:
    s = Store.open(store)
    return [
        p for p, f in zip(s.file_paths, s.manifest["files"]) if f["role"] == "experts"
    ]


def assert_clean(store: Path, dirs: list[Path]) -> None:
    """Finished: store verifies, no journal, no .part, no file it does not use."""
    s = Store.open(store)
    assert s.verify() == []
    assert not (store / JOURNAL).exists()
    used = {p.resolve() for p in s.file_paths}
    for p in [*store.iterdir(), *(q for d in dirs for q in d.iterdir())]:
        if p.name.endswith((".bin", ".part")):
            assert p.resolve() in used, f"left over: {p}"


# ------------------------------------------------------------------ same tokens


@pytest.mark.parametrize(
    "how",
    ["stripe", "balanced", "hot-copies", "max-file-size", "back-into-store"],
)
def test_sharded_store_generates_the_same_tokens(base, store, tmp_path, how):
    _, want, tr = base
    dirs = targets(tmp_path)
    ext = Store.open(store).extent_nbytes
    opts = {
        "stripe": ShardOptions(tuple(map(str, dirs))),
        "balanced": ShardOptions(tuple(map(str, dirs)), "balanced", str(tr)),
        "hot-copies": ShardOptions(
            tuple(map(str, dirs)), "balanced", str(tr), hot_copies=2
        ),
        "max-file-size": ShardOptions(
            tuple(map(str, dirs)), max_file_size=PAGE + 2 * ext
        ),
        "back-into-store": ShardOptions((str(store),)),
    }[how]
    res = shard(store, opts)
    assert res.generation == 1 and not res.resumed
    assert_clean(store, dirs)
    s = Store.open(store)
    files = expert_files(store)
    if how == "back-into-store":
        assert [p.parent for p in files] == [store]
        assert s.manifest["files"][1]["path"] == files[0].name  # relative
    else:
        assert {p.parent for p in files} == set(dirs)  # every drive used
        assert not list(store.glob("experts-*.bin"))  # the old file is gone
        assert all(Path(f["path"]).is_absolute() for f in s.manifest["files"][1:])
    if how == "max-file-size":
        assert len(files) == 4  # 8 extents, 2 per file
        assert all(p.stat().st_size <= PAGE + 2 * ext for p in files)
    if how == "hot-copies":
        copied = [e for e in s.experts if e.replicas]
        assert len(copied) == 2
        assert all(
            len({s.file_paths[f].parent for f, _ in e.copies}) == 2 for e in copied
        )
    assert s.manifest["layout"]["policy"] == opts.policy
    assert run_tokens(store) == want  # streamed, one extent read at a time
    assert run_tokens(store, stream=False) == want  # all in RAM (memory maps)


def test_second_run_does_nothing_and_another_policy_moves_again(base, store, tmp_path):
    _, want, tr = base
    dirs = targets(tmp_path, 3)
    shard(store, ShardOptions(tuple(map(str, dirs[:2]))))
    first = files_under(*dirs)
    again = shard(store, ShardOptions(tuple(map(str, dirs[:2]))))
    assert again.unchanged and again.copied_bytes == 0
    # a trace does not change where stripe puts experts: still nothing to do,
    # and the trace's expected split is reported
    again = shard(store, ShardOptions(tuple(map(str, dirs[:2])), trace=str(tr)))
    assert again.unchanged
    assert abs(sum(t.expected_share for t in again.targets) - 1) < 1e-9
    assert files_under(*dirs) == first
    res = shard(store, ShardOptions(tuple(map(str, dirs[1:])), "balanced", str(tr)))
    assert res.generation == 2 and sorted(res.removed) == first
    assert not list(dirs[0].iterdir())
    assert_clean(store, dirs)
    assert run_tokens(store) == want


# ------------------------------------------------------------------ placement


def expected_loads(placement, counts, T):
    load = [0.0] * T
    for k, ts in enumerate(placement):
        for t in ts:
            load[t] += counts[k] / len(ts)
    return load


def layer_peak(placement, counts, L, E, T):
    """Mean over layers of the busiest drive's load over the layer's mean."""
    out = []
    for layer in range(L):
        sub = [ts if k // E == layer else [] for k, ts in enumerate(placement)]
        per = expected_loads(sub, counts, T)
        out.append(max(per) / (sum(per) / T))
    return float(np.mean(out))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [2, 3])
def test_balanced_equalizes_expected_traffic_where_stripe_does_not(seed, T):
    rng = np.random.default_rng(seed)
    L, E = 8, 16
    # skewed routing: each layer's expert frequencies from a Dirichlet(0.5)
    counts = (rng.dirichlet([0.5] * E, L).reshape(-1) * 1000).round().tolist()
    bal = assign(counts, L, E, T, "balanced")
    st = assign(counts, L, E, T, "stripe")
    assert all(len(ts) == 1 for ts in bal + st)
    b, s = expected_loads(bal, counts, T), expected_loads(st, counts, T)
    spread = lambda x: (max(x) - min(x)) / (sum(x) / len(x))  # noqa: E731
    assert spread(b) < 0.02 and spread(b) <= spread(s)
    # and within each layer the reads spread over the drives better than stripe
    assert layer_peak(bal, counts, L, E, T) < layer_peak(st, counts, L, E, T)
    # stripe is round robin in (layer, expert) order
    assert [ts[0] for ts in st[: 2 * T]] == list(range(T)) * 2


def test_hot_copies_go_on_every_target_with_spread_primaries():
    counts = [1.0] * 12
    counts[5], counts[7], counts[9] = 50.0, 40.0, 30.0
    out = assign(counts, 2, 6, 3, "balanced", hot_copies=2)
    assert out[5] == [0, 1, 2] and out[7] == [1, 2, 0]  # primaries round robin
    assert len(out[9]) == 1


# ------------------------------------------------------------------ interruption


class Stop(Exception):
    pass


def stopper(kind: str, after: int = 1):
    seen = {"n": 0}

    def hook(what: str) -> None:
        if what == kind:
            seen["n"] += 1
            if seen["n"] >= after:
                raise Stop(what)

    return hook


@pytest.mark.parametrize("kind,after", [("extent", 3), ("copied", 1), ("switched", 1)])
def test_interrupted_run_keeps_the_store_usable_and_finishes_on_rerun(
    base, store, tmp_path, monkeypatch, kind, after
):
    _, want, _ = base
    dirs = targets(tmp_path)
    ext = Store.open(store).extent_nbytes
    opts = ShardOptions(tuple(map(str, dirs)), max_file_size=PAGE + 3 * ext)
    monkeypatch.setattr(shard_mod, "_checkpoint", stopper(kind, after))
    with pytest.raises(Stop):
        shard(store, opts)
    assert (store / JOURNAL).exists()
    s = Store.open(store)  # usable: old layout before the switch, new after
    switched = kind == "switched"
    assert ("layout" in s.manifest) == switched
    assert s.verify() == []
    assert run_tokens(store) == want
    if kind == "extent":
        assert list(dirs[0].glob("*.part")) or list(dirs[1].glob("*.part"))
    monkeypatch.setattr(shard_mod, "_checkpoint", None)
    res = shard(store, opts)
    if switched:
        assert res.unchanged and res.removed  # only the clean-up was left
    else:
        assert res.resumed
        if kind == "copied":
            assert res.copied_bytes == 0  # every file was complete
    assert_clean(store, dirs)
    assert not (store / "experts-00001-of-00001.bin").exists()
    assert run_tokens(store) == want


KILL_SCRIPT = """
import os, signal, sys
from mer_cli import shard as m
n = {"k": 0}
def hook(what):
    if what == "extent":
        n["k"] += 1
        if n["k"] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
m._checkpoint = hook
m.shard(sys.argv[1], m.ShardOptions(tuple(sys.argv[2].split(","))))
"""


def test_sigkill_between_extents_recovers_on_rerun(base, store, tmp_path):
    _, want, _ = base
    dirs = targets(tmp_path)
    p = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(store), ",".join(map(str, dirs)), "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (store / JOURNAL).exists()
    assert Store.open(store).verify() == []  # still the old layout
    r = CliRunner().invoke(
        cli, ["shard", str(store), "--to", str(dirs[0]), "--to", str(dirs[1]), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "finished an interrupted run" in r.output
    assert_clean(store, dirs)
    assert run_tokens(store) == want


def test_rerun_with_other_options_discards_the_unfinished_copy(
    base, store, tmp_path, monkeypatch
):
    _, want, _ = base
    dirs = targets(tmp_path, 3)
    monkeypatch.setattr(shard_mod, "_checkpoint", stopper("extent", 2))
    with pytest.raises(Stop):
        shard(store, ShardOptions((str(dirs[0]), str(dirs[1]))))
    assert files_under(dirs[0], dirs[1])
    monkeypatch.setattr(shard_mod, "_checkpoint", None)
    res = shard(store, ShardOptions((str(dirs[2]),)))
    assert not res.resumed and not files_under(dirs[0], dirs[1])
    assert_clean(store, dirs)
    assert run_tokens(store) == want


def test_a_bad_copy_is_caught_by_the_read_back_and_copied_again(
    base, store, tmp_path, monkeypatch
):
    """The read-back check compares the bytes on disk with the manifest's CRC:
    an extent written wrong (here: one byte flipped once) is written again."""
    _, want, _ = base
    dirs = targets(tmp_path)
    ext = Store.open(store).extent_nbytes
    real = os.pwrite
    flipped = []

    def pwrite(fd, data, off):
        if off == PAGE + ext and not flipped:  # the second extent of a file
            b = bytearray(data)
            b[7] ^= 0xFF
            flipped.append(off)
            return real(fd, bytes(b), off)
        return real(fd, data, off)

    monkeypatch.setattr(shard_mod.os, "pwrite", pwrite)
    shard(store, ShardOptions(tuple(map(str, dirs))))
    assert flipped
    assert_clean(store, dirs)
    assert run_tokens(store) == want


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("devices", ["one", "two"])
def test_not_enough_space_is_refused_before_any_write(
    store, tmp_path, monkeypatch, devices
):
    dirs = targets(tmp_path)
    before = (store / MANIFEST).read_bytes(), files_under(store)
    ext = Store.open(store).extent_nbytes
    if devices == "two":  # as if each dir were a drive of its own
        monkeypatch.setattr(shard_mod, "device_of", lambda p: str(p))
    roomy = str(dirs[0]) if devices == "two" else None
    monkeypatch.setattr(
        shard_mod, "free_bytes", lambda p: 1 << 40 if str(p) == roomy else 10_000
    )
    with pytest.raises(ResourceError) as ei:
        shard(store, ShardOptions(tuple(map(str, dirs))))
    msg = str(ei.value)
    assert "nothing was written" in msg and "has 9.8 KiB (10000 bytes) free" in msg
    if devices == "two":  # each target's own need: 4 extents and a header
        need = PAGE + 4 * ext
        assert f"{dirs[1]}: needs {need / 1024:.1f} KiB ({need} bytes)" in msg
        assert (
            f"{dirs[0]}: needs {need / 1024:.1f} KiB ({need} bytes), has 1.0 TiB" in msg
        )
    else:  # one filesystem holds both targets: their sum is needed
        need = 2 * PAGE + 8 * ext
        assert f"{dirs[0]} and {dirs[1]}: needs {need / 1024:.1f} KiB" in msg
    assert files_under(*dirs) == []
    assert ((store / MANIFEST).read_bytes(), files_under(store)) == before
    assert not (store / JOURNAL).exists()


def test_missing_shard_file_names_the_file_its_experts_and_the_fix(store, tmp_path):
    dirs = targets(tmp_path)
    ext = Store.open(store).extent_nbytes
    shard(store, ShardOptions(tuple(map(str, dirs)), max_file_size=PAGE + 3 * ext))
    s = Store.open(store)
    lost = s.file_paths[2]
    held = s.file_experts(2)
    lost.unlink()
    with pytest.raises(FormatError) as ei:
        Store.open(store)
    msg = str(ei.value)
    assert str(lost) in msg and "data file missing (files[2]" in msg
    first, last = held[0], held[-1]
    assert (
        f"{len(held)} expert extents, from (layer {first[0]}, expert {first[1]})" in msg
    )
    assert f"to (layer {last[0]}, expert {last[1]})" in msg
    assert "mount the drive or directory" in msg
    r = CliRunner().invoke(
        cli, ["generate", "--model", str(store), "--prompt", "hi", "--max-tokens", "2"]
    )
    assert r.exit_code == 1 and str(lost) in r.stderr and "Traceback" not in r.output


def test_cli_usage_errors_exit_2(store, tmp_path):
    dirs = targets(tmp_path)
    cases = [
        (["--to", str(tmp_path / "nope")], "no such directory"),
        (["--to", str(dirs[0]), "--to", str(dirs[0])], "given twice"),
        (["--to", str(dirs[0]), "--policy", "balanced"], "need --trace"),
        (["--to", str(dirs[0]), "--max-file-size", "8KiB"], "smaller than one"),
        (["--to", str(dirs[0]), "--max-file-size", "lots"], "is not a size"),
        (["--to", str(dirs[0]), "--policy", "spread"], "Invalid value"),
        ([], "Missing option '--to'"),
    ]
    for args, text in cases:
        r = CliRunner().invoke(cli, ["shard", str(store), *args])
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output, (args, r.output)
    assert files_under(*dirs) == [] and not (store / JOURNAL).exists()


def test_cli_not_a_store_and_no_space_exit_1(store, tmp_path, monkeypatch):
    dirs = targets(tmp_path)
    r = CliRunner().invoke(cli, ["shard", str(tmp_path / "x"), "--to", str(dirs[0])])
    assert r.exit_code == 1 and "no such store" in r.output
    monkeypatch.setattr(shard_mod, "free_bytes", lambda p: 0)
    r = CliRunner().invoke(cli, ["shard", str(store), "--to", str(dirs[0])])
    assert r.exit_code == 1 and "not enough free space" in r.output


def test_cli_json_and_inspect_show_the_placement(base, store, tmp_path):
    _, _, tr = base
    dirs = targets(tmp_path)
    args = ["shard", str(store), "--to", str(dirs[0]), "--to", str(dirs[1])]
    r = CliRunner().invoke(
        cli, [*args, "--policy", "balanced", "--trace", str(tr), "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["generation"] == 1 and out["policy"] == "balanced"
    shares = [t["expected_share"] for t in out["targets"]]
    assert abs(sum(shares) - 1) < 1e-9
    assert sum(t["extents"] for t in out["targets"]) == 8
    r = CliRunner().invoke(cli, ["inspect", str(store), "--json"])
    info = json.loads(r.stdout)
    (dev,) = info["placement"]  # both dirs are on one filesystem here
    assert dev["extents"] == 8 and sorted(dev["dirs"]) == sorted(map(str, dirs))
    assert info["layout"]["policy"] == "balanced"
    r = CliRunner().invoke(cli, ["inspect", str(store)])
    assert "placement" in r.output and "policy balanced" in r.output


# ------------------------------------------------------------------ the reader


class SlowReader(ExtentReader):
    """Each read takes 50 ms; records how many run at once per device."""

    def __init__(self, *a, **kw):
        self.lock = threading.Lock()
        self.now = {}
        self.peak = 0
        super().__init__(*a, **kw)

    def _preadv(self, fd, buf, offset):
        with self.lock:
            self.now[fd] = self.now.get(fd, 0) + 1
            self.peak = max(self.peak, sum(self.now.values()))
        time.sleep(0.05)
        try:
            return super()._preadv(fd, buf, offset)
        finally:
            with self.lock:
                self.now[fd] -= 1


@pytest.mark.parametrize("two_devices", [True, False])
def test_reader_reads_each_device_in_parallel(tmp_path, two_devices):
    paths = []
    for i in range(2):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i + 1]) * (8 * PAGE))
        paths.append(p)
    devices = ["a", "b"] if two_devices else ["a", "a"]
    pool = SlabPool(PAGE, 8, populate=False)
    with SlowReader(paths, threads=1, chunk_size=PAGE, devices=devices) as r:
        assert r.num_devices == (2 if two_devices else 1)
        reqs = [r.submit(i % 2, PAGE * (i // 2), PAGE, pool.slabs[i]) for i in range(8)]
        for q in reqs:
            q.result(10)
        st = r.stats()
    assert all((pool.slabs[i] == i % 2 + 1).all() for i in range(8))
    # one thread per device: two reads at once only when there are two devices
    assert r.peak == (2 if two_devices else 1)
    split = [d["bytes_read"] for d in st["devices"]]
    assert split == ([4 * PAGE, 4 * PAGE] if two_devices else [8 * PAGE])
    if two_devices:  # both busy the whole time: overlap = parallel reads
        busy = sum(d["read_seconds"] for d in st["devices"])
        assert busy > 1.5 * st["read_seconds"]
    pool.close()


def test_duplicated_expert_is_read_from_the_least_busy_device(base, store, tmp_path):
    _, _, tr = base
    dirs = targets(tmp_path)
    shard(store, ShardOptions(tuple(map(str, dirs)), "balanced", str(tr), hot_copies=8))
    s = Store.open(store)
    ent = next(e for e in s.experts if e.layer == 1 and e.replicas)
    assert len(ent.copies) == 2
    assert {s.file_paths[f].parent for f, _ in ent.copies} == set(dirs)
    x = ent.expert
    (fa, _), (fb, offb) = ent.copies
    with StreamedExperts(s, 2 * s.extent_nbytes) as src:
        busy = {fa: 5, fb: 0}
        src.reader.pending = lambda f: busy.get(f, 0)
        seen = []
        real = src.reader.submit
        src.reader.submit = lambda f, off, *a, **kw: (
            seen.append((f, off)) or real(f, off, *a, **kw)
        )
        got = {e: np.array(p["down"].packed) for e, p in src.fetch(1, [x])}
        assert seen == [(fb, offb)]
        want = s.expert_parts(s.expert_bytes(1, x))["down"].packed
        np.testing.assert_array_equal(got[x], want)
        busy[fa], busy[fb] = 0, 5
        list(src.fetch(0, [0, 1]))  # evicts the expert from the two slots
        seen.clear()
        list(src.fetch(1, [x]))
        assert seen == [ent.copies[0]]


def test_usage_errors_from_the_library(base, store, tmp_path):
    dirs = targets(tmp_path)
    with pytest.raises(UsageError, match="need --trace"):
        shard(store, ShardOptions((str(dirs[0]), str(dirs[1])), hot_copies=1))
    with pytest.raises(UsageError, match="needs at least two"):
        shard(store, ShardOptions((str(dirs[0]),), trace=str(base[2]), hot_copies=1))
    with pytest.raises(UsageError, match="expected one of"):
        shard(store, ShardOptions((str(dirs[0]),), policy="random"))


def test_a_second_shard_of_the_same_store_is_refused_while_one_runs(store, tmp_path):
    dirs = targets(tmp_path)
    with shard_mod._locked(store):
        with pytest.raises(ResourceError, match="another mer shard is running"):
            shard(store, ShardOptions(tuple(map(str, dirs))))
    assert files_under(*dirs) == []


def test_replicas_are_checked_by_open_and_verify(base, store, tmp_path):
    _, _, tr = base
    dirs = targets(tmp_path)
    shard(store, ShardOptions(tuple(map(str, dirs)), "balanced", str(tr), hot_copies=2))
    s = Store.open(store)
    i, ent = next((i, e) for i, e in enumerate(s.experts) if e.replicas)
    (f, off), (rf, roff) = ent.copies
    # a flipped byte in the copy (not the primary) is found by verify
    with open(s.file_paths[rf], "r+b") as fh:
        fh.seek(roff + 5)
        b = fh.read(1)
        fh.seek(roff + 5)
        fh.write(bytes([b[0] ^ 1]))
    (problem,) = Store.open(store).verify()
    assert str(s.file_paths[rf]) in problem and f"offset {roff}" in problem
    # a replica that is no copy at all is refused when the store is opened
    m = json.loads((store / MANIFEST).read_text())
    for bad, text in [
        ({"file": f, "offset": off}, "already holds a copy"),
        ({"file": rf, "offset": roff + 100}, "expected a multiple of 4096"),
        ({"file": 99, "offset": PAGE}, "expected 0.."),
    ]:
        m["experts"][i]["replicas"] = [bad]
        (store / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(FormatError, match=f"experts\\[{i}\\].replicas\\[0\\]"):
            Store.open(store)
        with pytest.raises(FormatError, match=text):
            Store.open(store)


def test_generate_stats_print_the_split_over_two_filesystems(store, tmp_path):
    """Sharded over two filesystems (the test dir and a tmpfs), `--stats` shows the
    bytes read from each device (tmpfs cannot do O_DIRECT: buffered, with a warning)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test directory")
    other = Path(tempfile.mkdtemp(prefix="mer-shard-", dir=shm))
    try:
        dirs = [targets(tmp_path, 1)[0], other]
        args = ["shard", str(store), "--to", str(dirs[0]), "--to", str(dirs[1]), "-q"]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        budget = str(3 * Store.open(store).extent_nbytes)
        r = CliRunner().invoke(
            cli,
            ["generate", "--model", str(store), "--prompt", PROMPT, "--max-tokens",
             "6", "--stream", "--ram-budget", budget, "--stats"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        (line,) = [
            x for x in r.stderr.splitlines() if x.startswith("reads per device:")
        ]
        assert line.count("device ") == 2 and line.count("busy") == 2
    finally:
        shutil.rmtree(other, ignore_errors=True)
