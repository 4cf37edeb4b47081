"""``mer generate`` with experts streamed under a DRAM budget: the same tokens as
the all-in-RAM run for any budget (one extent up to all, prefetch on and off),
the source chosen from the options, the stats, the RSS bound, and the failures
(budget below the minimum, a file truncated during the run, a checksum
mismatch) through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli.cli import cli
from mer_cli.config import Config
from mer_cli.formats.store import Store
from mer_cli.generate import GenerateOptions, generate, load
from mer_cli.quantize import quantize
from mer_cli.sources import (
    SourceOptions,
    open_source,
    plan_source,
    quick_ceiling,
    read_ceiling,
)

PROMPT = "The quick brown fox jumps"
N_TOKENS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Tiny Mixtral store, q4 experts: 2 layers x 4 experts, top-2."""
    d = tmp_path_factory.mktemp("streamgen")
    ck = make_hf_checkpoint(d / "ck", "mixtral", seed=5)
    return quantize(ck, d / "tiny.mer", experts="q4", dense="q8", progress=False)


@pytest.fixture(scope="module")
def geometry(store):
    s = Store.open(store)
    return s.extent_nbytes, len(s.experts), s.model.top_k


@pytest.fixture(scope="module")
def resident_tokens(store):
    eng, tok = load(store, ctx=128)
    try:
        c = generate(eng, tok, PROMPT, GenerateOptions(max_tokens=N_TOKENS))
    finally:
        eng.close()
    assert c.completion_tokens == N_TOKENS
    return c


def within(seconds, fn):
    """Run ``fn`` on a thread; fail (instead of hanging) if it takes too long."""
    out: dict = {}

    def go():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised on the test thread
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no result within {seconds} s (deadlock?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_streamed(store, budget, prefetch=True, stream=True):
    opts = SourceOptions(ram_budget=budget, stream=stream, prefetch=prefetch)
    plans = []

    def make(st):
        plans.append(plan_source(st, opts, Config(), profile=None))
        return open_source(st, plans[-1])

    eng, tok = load(store, ctx=128, source=make)
    try:
        from mer_cli.generate import Completion

        c = Completion(eng, tok, PROMPT, GenerateOptions(max_tokens=N_TOKENS))
        return within(60, c.run), plans[0]
    finally:
        eng.close()


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)


# ------------------------------------------------------------------ same output


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("slots", ["one", "three", "half", "all"])
def test_same_tokens_as_resident_for_every_budget(
    store, geometry, resident_tokens, slots, prefetch
):
    ext, n, k = geometry
    count = {"one": 1, "three": 3, "half": n // 2, "all": n}[slots]
    assert count < k or slots != "one"  # one extent is less than a token's top-k
    res, plan = run_streamed(store, count * ext, prefetch=prefetch)
    assert plan.kind == "streamed"
    assert res.completion == resident_tokens.completion
    assert res.completion_tokens == N_TOKENS
    src = res.stats["source"]
    assert src["source"] == "streamed" and src["slots"] == count
    io = res.stats["io"]
    # a budget below one token's experts must re-read extents
    assert io["bytes_read"] % ext == 0 and io["bytes_read"] >= ext
    if count < k:
        assert io["bytes_read"] > n * ext
    if not prefetch:
        assert src["prefetch_issued"] == 0


def test_cli_streamed_json_matches_resident_and_carries_stats(store, geometry):
    ext, n, _ = geometry
    base = ["--model", str(store), "--prompt", PROMPT, "--max-tokens", "10", "--json"]
    a = run_cli(*base, "--no-stream")
    b = run_cli(*base, "--ram-budget", str(2 * ext), "--no-io-measure")
    c = run_cli(
        *base, "--ram-budget", str(3 * ext), "--no-prefetch", "--io-threads", "2"
    )
    assert a.exit_code == b.exit_code == c.exit_code == 0, (a.output, b.output)
    ra, rb, rc = (json.loads(x.output) for x in (a, b, c))
    assert ra["completion"] == rb["completion"] == rc["completion"]
    assert ra["stats"]["source"]["source"] == "resident" and "io" not in ra["stats"]
    io = rb["stats"]["io"]
    for key in (
        "bytes_read",
        "read_gbps",
        "stall_share",
        "decode_read_gbps",
        "decode_stall_share",
        "hit_rate",
        "hit_rate_lru",
        "hit_rate_belady",
        "prefetch_precision",
        "prefetch_recall",
    ):
        assert key in io, key
    assert io["ceiling_gbps"] is None  # --no-io-measure, no profile
    assert 0 <= io["hit_rate_lru"] <= io["hit_rate_belady"] <= 1
    assert rb["stats"]["peak_rss_bytes"] > 0
    assert rc["stats"]["source"]["prefetch_issued"] == 0


def test_cli_stats_lines_with_quick_measurement(store, geometry):
    ext, _, _ = geometry
    r = CliRunner().invoke(
        cli,
        ["generate", "--model", str(store), "--prompt", PROMPT, "--max-tokens", "4"]
        + ["--ram-budget", str(3 * ext), "--stats"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "experts streamed: 3 slots" in err
    assert "quick measurement" in err
    assert "Belady MIN" in err and "prefetch precision" in err
    assert "peak RSS" in err


# ------------------------------------------------------------------ choosing


def test_budget_decides_resident_or_streamed(store, geometry):
    ext, n, _ = geometry
    s = Store.open(store)
    cfg = Config()
    assert plan_source(
        s, SourceOptions(ram_budget=n * ext), cfg, profile=None
    ).kind == ("resident")
    p = plan_source(s, SourceOptions(ram_budget=n * ext - 1), cfg, profile=None)
    assert p.kind == "streamed" and p.ram_budget == n * ext - 1
    p = plan_source(s, SourceOptions(stream=False, ram_budget=ext), cfg, profile=None)
    assert p.kind == "resident"
    # the config's budget is the default
    p = plan_source(s, SourceOptions(), Config(ram_budget=2 * ext), profile=None)
    assert p.kind == "streamed" and p.ram_budget == 2 * ext


def test_reader_settings_profile_then_config_then_option(store):
    s = Store.open(store)
    prof = SimpleNamespace(
        reader=SimpleNamespace(threads=3, chunk_bytes=1 << 20, best_read_gbps=2.5),
        path="/p.toml",
    )
    o = SourceOptions(ram_budget="64KiB", stream=True)
    p = plan_source(s, o, Config(), profile=prof)
    assert (p.io_threads, p.chunk_size, p.best_read_gbps) == (3, 1 << 20, 2.5)
    assert read_ceiling(s, p).origin == "profile /p.toml"
    p = plan_source(s, o, Config(io_threads=5), profile=prof)
    assert p.io_threads == 5 and p.chunk_size == 1 << 20
    o2 = SourceOptions(ram_budget="64KiB", stream=True, io_threads=2)
    assert plan_source(s, o2, Config(io_threads=5), profile=prof).io_threads == 2
    p = plan_source(s, o, Config(), profile=None)
    assert p.io_threads == 8 and p.best_read_gbps is None


def test_quick_ceiling_reads_the_experts_file(store):
    s = Store.open(store)
    c = quick_ceiling(s, threads=2, chunk=1 << 20, seconds=0.1)
    assert c is not None and c.gbps > 0
    assert c.origin.startswith("quick measurement") and "experts-" in c.origin


# ------------------------------------------------------------------ failures


def test_budget_below_one_extent_states_the_minimum(store, geometry):
    ext, _, _ = geometry
    r = run_cli("--model", str(store), "--prompt", "x", "--ram-budget", str(ext - 1))
    assert r.exit_code == 1
    assert f"the minimum budget is {ext} bytes" in r.stderr


def test_io_threads_zero_is_a_usage_error(store):
    r = run_cli("--model", str(store), "--prompt", "x", "--io-threads", "0")
    assert r.exit_code == 2 and "--io-threads" in r.stderr


def _copy(store: Path, dst: Path) -> Path:
    shutil.copytree(store, dst)
    return dst


def test_file_truncated_during_the_run(store, geometry, tmp_path, monkeypatch):
    ext, _, _ = geometry
    st = _copy(store, tmp_path / "cut.mer")
    data = next(st.glob("experts-*.bin"))
    import mer_cli.generate as G

    real = G.generate_many

    def truncate_then_generate(*a, **kw):
        os.truncate(data, 4096)  # after load, before the first expert read
        return real(*a, **kw)

    monkeypatch.setattr(G, "generate_many", truncate_then_generate)
    r = within(
        60,
        lambda: run_cli(
            "--model", str(st), "--prompt", PROMPT, "--ram-budget", str(2 * ext)
        ),
    )
    assert r.exit_code == 1
    assert str(data) in r.stderr and "at offset" in r.stderr
    assert "truncated" in r.stderr


def test_checksum_mismatch_names_the_expert(store, geometry, tmp_path):
    ext, _, _ = geometry
    st = _copy(store, tmp_path / "bad.mer")
    s = Store.open(st)
    ent = next(x for x in s.experts if (x.layer, x.expert) == (1, 2))
    path = s.file_paths[ent.file]
    del s
    with open(path, "r+b") as f:
        f.seek(ent.offset + 100)
        b = f.read(1)
        f.seek(ent.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    args = ["--model", str(st), "--prompt", PROMPT, "--max-tokens", "30"]
    r = run_cli(*args, "--ram-budget", str(ext), "--verify-checksums")
    assert r.exit_code == 1, r.output
    assert "layer 1, expert 2" in r.stderr
    # resident + --verify-checksums checks the whole store before starting
    r = run_cli(*args, "--no-stream", "--verify-checksums")
    assert r.exit_code == 1 and "checksum" in r.stderr


# ------------------------------------------------------------------ memory

RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from mer_cli.generate import GenerateOptions, generate, load
    from mer_cli.memory import peak_rss_bytes, rss_bytes
    from mer_cli.streaming import StreamedExperts

    store, budget = sys.argv[1], int(sys.argv[2])
    # warm up the kernels (JIT) on a resident run, then measure a streamed one
    eng, tok = load(store, ctx=128)
    generate(eng, tok, "warm up", GenerateOptions(max_tokens=3))
    eng.close()
    del eng
    gc.collect()
    base = rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    eng, tok = load(store, ctx=128, source=lambda s: StreamedExperts(s, budget))
    r = generate(eng, tok, "The quick brown fox", GenerateOptions(max_tokens=16))
    print(json.dumps({
        "base": base, "peak": peak_rss_bytes() if reset else rss_bytes(),
        "dense": eng.dense_nbytes, "kv": eng.cache.nbytes, "budget": budget,
        "tokens": r.completion_tokens, "reset": reset,
    }))
    """
)


def test_rss_stays_within_budget_dense_kv_and_overhead(store, geometry):
    ext, n, _ = geometry
    budget = 3 * ext
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(store), str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["tokens"] == 16
    overhead = m["peak"] - m["base"] - (m["budget"] + m["dense"] + m["kv"])
    # generous bound on a noisy shared machine; measured ~1-3 MiB here
    assert overhead < 32 * 2**20, m


def _mapped_rss_kib(path_part: str) -> int:
    """RSS (KiB) of this process's mappings of files whose path contains
    ``path_part``, from /proc/self/smaps."""
    total, cur = 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and not parts[0].endswith(":"):
                cur = parts[5] if len(parts) >= 6 else ""
            elif parts[0] == "Rss:" and path_part in cur:
                total += int(parts[1])
    return total


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "resident"])
def test_store_maps_do_not_stay_in_rss(store, geometry, stream):
    """The engine copies dense weights (and resident experts) out of the store's
    memory maps; the mapped pages must not stay counted in the RSS too."""
    ext, _, _ = geometry
    opts = SourceOptions(ram_budget=2 * ext, stream=stream)
    eng, tok = load(
        store,
        ctx=64,
        source=lambda s: open_source(s, plan_source(s, opts, Config(), profile=None)),
    )
    try:
        assert eng.store._maps  # the dense weights came through a map
        generate(eng, tok, PROMPT, GenerateOptions(max_tokens=4))
        # norms may be views into the map: at most a few pages come back
        assert _mapped_rss_kib(str(store)) <= 16
    finally:
        eng.close()


def test_cli_uses_the_drive_profile_from_the_config(store, geometry, tmp_path):
    from mer_cli.io_profile import (
        BufferedReads,
        DeviceInfo,
        Profile,
        RandomReads,
        ReaderSettings,
        SequentialCell,
        save_profile,
    )

    ext, _, _ = geometry
    prof = Profile(
        device=DeviceInfo(id="0:0", kind="file", span_bytes=1 << 30, duration_s=1.0),
        reader=ReaderSettings(threads=3, chunk_bytes=1 << 20, best_read_gbps=2.5),
        sequential=[SequentialCell(1 << 20, 3, 2.5)],
        random=RandomReads(1e4, 50.0, 100.0, 5e4, 200.0, 600.0),
        buffered=BufferedReads(1.0, 2.5, 1 << 20, 3),
    )
    ppath = save_profile(prof, tmp_path / "drive.toml")
    conf = tmp_path / "config.toml"
    conf.write_text(f'io_profile = "{ppath}"\n')
    r = run_cli(
        "--model", str(store), "--prompt", PROMPT, "--max-tokens", "4", "--json",
        "--ram-budget", str(2 * ext), "--config", str(conf),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    io = json.loads(r.output)["stats"]["io"]
    assert io["ceiling_gbps"] == 2.5 and io["ceiling_from"] == f"profile {ppath}"
    assert io["read_share_of_ceiling"] == pytest.approx(
        io["read_gbps"] / 2.5, rel=1e-2, abs=2e-4
    )
