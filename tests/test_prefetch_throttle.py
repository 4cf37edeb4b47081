"""Prefetch ranked by a predictor and throttled by live precision: an
always-wrong predictor is turned off by the throttle (bytes read close to
prefetch off), an always-right one stays on and raises the hit rate, tokens are
those of the all-in-RAM run with any predictor, demand reads overtake queued
prefetches, and ``mer generate --predictor`` refuses a predictor of another
model."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_hf_checkpoint

from mer_cli.cli import cli
from mer_cli.formats.store import Store
from mer_cli.formats.trace import Sketcher
from mer_cli.generate import Completion, GenerateOptions, load
from mer_cli.io.reader import ExtentReader
from mer_cli.io.slabs import SlabPool
from mer_cli.prefetch import (
    PROBE_EVERY,
    TRIAL_EVERY,
    TRIAL_MEMORY,
    TRIAL_MIN_PAIRS,
    TRIAL_PAIRS,
    TRIAL_TOKENS,
    TRIAL_WARMUP,
    PrefetchThrottle,
    _Trial,
    use_predictor,
)
from mer_cli.streaming import StreamedExperts

PROMPT = "The quick brown fox jumps over"
N_TOKENS = 24
L, E = 4, 8  # the test model: 4 layers x 8 experts, top-2
READ_DELAY = 0.002  # seconds added to every read: a drive reads take time on
PAGE = 4096


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from mer_cli.quantize import quantize

    d = tmp_path_factory.mktemp("throttle")
    ck = make_hf_checkpoint(d / "ck", "mixtral", seed=3, layers=L, num_local_experts=E)
    return quantize(ck, d / "m.mer", experts="q4", dense="q8", progress=False)


@pytest.fixture(scope="module")
def resident(store):
    """Text of the all-in-RAM run and the routing each forward pass made at
    each layer for its last token: ``{(position, layer): experts [K]}``."""
    eng, tok = load(store, ctx=128)
    seq: dict[tuple[int, int], np.ndarray] = {}

    def hook(layer, x, ids, w):  # the cache grows after the pass: pos = start
        seq[(eng.pos, layer)] = ids[-1].copy()

    eng.route_hook = hook
    try:
        c = Completion(eng, tok, PROMPT, GenerateOptions(max_tokens=N_TOKENS))
        c.run()
    finally:
        eng.close()
    assert c.result.completion_tokens == N_TOKENS
    return c.result.completion, seq


class Oracle:
    """A fake predictor replaying the resident run's routing: ``right`` scores
    the experts the next layer will use 1, else the ones it will not use 0.95.
    ``engine`` (set after loading) tells the position of the forward pass."""

    max_distance = 1

    def __init__(self, seq, right: bool) -> None:
        self.kind = "oracle" if right else "wrong"
        self.seq, self.right, self.engine = seq, right, None
        self.calls = 0

    def reset(self) -> None:
        pass

    def observe(self, layer, experts, hidden):
        pos = self.engine.pos
        # the streamed run routes exactly as the resident run did
        assert sorted(self.seq[(pos, layer)]) == sorted(experts)
        assert hidden is not None and hidden.dtype == np.float32
        self.calls += 1
        if layer + 1 >= L:
            return {}
        nxt = set(self.seq[(pos, layer + 1)].tolist())
        scores = np.zeros(E, np.float32)
        for e in range(E):
            if (e in nxt) == self.right:
                scores[e] = 1.0 if self.right else 0.95
        return {layer + 1: scores}


@pytest.fixture
def slow_reads(monkeypatch):
    """Every read takes ``delay`` (default READ_DELAY) more: the compute waits on
    the drive, as it does on a model larger than memory (tmpfs/page-cache
    reads are free). Returns a setter for the delay."""
    real = ExtentReader._preadv
    delay = [READ_DELAY]

    def slow(self, fd, buf, off):
        time.sleep(delay[0])
        return real(self, fd, buf, off)

    monkeypatch.setattr(ExtentReader, "_preadv", slow)
    return lambda seconds: delay.__setitem__(0, seconds)


def run(store, predictor=None, prefetch=True, slots=20, unthrottled=False, compute=0):
    """Stream with ``slots`` expert slots; (text, source stats). ``compute``
    seconds are added after each layer (a model whose layers take time)."""
    ext = Store.open(store).extent_nbytes

    def make(st):
        return StreamedExperts(st, slots * ext, io_threads=2, prefetch=prefetch)

    eng, tok = load(store, ctx=128, source=make)
    try:
        use_predictor(eng, predictor)
        if predictor is not None:
            predictor.engine = eng
        if compute:
            eng.route_hook = lambda *a: time.sleep(compute)
        if unthrottled:  # the counterfactual: scores taken as they come, all read
            th = eng.source.throttle
            th.factor = lambda distance, kind: 1.0
            th.decide = lambda p, room: "issue"
            th.hint_computed = lambda kind, seconds: None  # the gate stays open
            th.trial.step = lambda tokens, now: None  # no off windows
        c = Completion(eng, tok, PROMPT, GenerateOptions(max_tokens=N_TOKENS))
        done = threading.Event()
        t = threading.Thread(target=lambda: (c.run(), done.set()), daemon=True)
        t.start()
        t.join(120)
        assert done.is_set(), "generation did not finish (deadlock?)"
        return c.result.completion, eng.source.stats()
    finally:
        eng.close()


# ------------------------------------------------------------------ live runs


def test_wrong_predictor_is_turned_off(store, resident, slow_reads):
    text, seq = resident
    t_off, off = run(store, prefetch=False)
    t_free, free = run(store, Oracle(seq, right=False), unthrottled=True)
    t_on, on = run(store, Oracle(seq, right=False))
    assert t_off == t_free == t_on == text
    ext = Store.open(store).extent_nbytes
    th = on["prefetch_throttle"]
    assert on["prefetch_hints"] == "wrong"
    # without the throttle every wrong hint is read: far more bytes
    assert free["prefetch_issued"] > 30
    assert free["bytes_read"] > off["bytes_read"] + 20 * ext
    # with it, a few reads until the precision is measured, then none: the
    # candidates fall below the break-even probability, and computing the
    # hints stops (the gate closes: the predictor saved nothing for its time)
    assert th["skipped_benefit"] > th["issued"] and th["state"] == "off"
    gate = th["hint_gates"]["wrong"]
    assert not gate["open"] and gate["closed"] >= 1 and gate["saved_ms"] == 0
    assert gate["hints_skipped"] > gate["hints_computed"]
    assert th["hints_used"]["wrong"] == 0.0  # (prefill hints are lookahead)
    assert on["bytes_read"] <= off["bytes_read"] + (th["issued"] + 2) * ext
    assert on["bytes_read"] < free["bytes_read"]
    # the cache's third signal got calibrated (near 0) probabilities, so the
    # wrong hints did not push real experts out: hit rate as without prefetch
    assert on["hit_rate"] >= off["hit_rate"] - 0.05


def test_right_predictor_stays_on_and_raises_the_hit_rate(store, resident, slow_reads):
    text, seq = resident
    # reads of 5 ms (a miss costs far more than computing a hint), layers
    # computing for longer than a read: right prefetches land in time
    slow_reads(0.005)
    t_off, off = run(store, prefetch=False, compute=0.015)
    t_on, on = run(store, Oracle(seq, right=True), compute=0.015)
    assert t_off == t_on == text
    th = on["prefetch_throttle"]
    assert th["state"] == "on" and th["probes"] == 0
    gate = th["hint_gates"]["oracle"]
    # the gate times wall clock: on a loaded machine one window may come out
    # short, so it must end open and have skipped at most a probe window's hints
    assert gate["open"] and gate["closed"] <= 1
    assert gate["hints_skipped"] <= 0.25 * (
        gate["hints_computed"] + gate["hints_skipped"]
    )
    assert gate["saved_ms"] > gate["hint_ms"]
    assert th["live_precision"] >= 0.9 and th["hints_used"]["oracle"] == 1.0
    assert on["prefetch_used"] >= 0.9 * on["prefetch_issued"] > 0
    assert on["hit_rate"] > off["hit_rate"] + 0.1


@pytest.mark.parametrize("how", ["lookahead", "oracle", "wrong", "off"])
def test_tokens_identical_to_resident_with_any_hints(store, resident, how):
    text, seq = resident
    for slots in (2, 9):
        pred = {"oracle": Oracle(seq, True), "wrong": Oracle(seq, False)}.get(how)
        got, st = run(store, pred, prefetch=how != "off", slots=slots)
        assert got == text
        assert st["prefetch_hints"] == how


def test_preview_predictor_live_equals_offline(store, resident, tmp_path):
    """A predictor taking the attention preview, streamed: each decode step's
    preview is the one the trace recorded at that token and layer, its scores
    are the offline predict_trace scores, and the text is the resident one."""
    from mer_cli.predictors import load_predictor
    from mer_cli.trace import trace
    from mer_cli.train_predictor import fit_mlp

    text, _ = resident
    t = trace(store, [PROMPT], tmp_path / "t.npz", max_tokens=N_TOKENS,
              progress=False)  # fmt: skip
    path = fit_mlp(t, None, max_distance=2, hidden=8, epochs=1, preview=True,
                   progress=False).save(tmp_path / "p.npz")  # fmt: skip
    pred = load_predictor(path, store)
    offline = pred.predict_trace(t)  # [N, L, A, E]
    sketch = Sketcher(pred.arrays["projection"])
    real = pred.observe
    seen = []

    def spy(layer, experts, hidden, preview=None):
        out = real(layer, experts, hidden, preview=preview)
        seen.append((pred.engine.pos, layer, preview, out))
        return out

    pred.observe = spy
    got, st = run(store, pred, slots=9, unthrottled=True)
    assert got == text and st["prefetch_hints"] == "mlp"
    decode = [c for c in seen if c[2] is not None]
    n_prompt = int((t.positions < t.positions[-1] - N_TOKENS + 2).sum())
    # every decode step but the last layer's, which has no next layer
    assert len(decode) == (N_TOKENS - 1) * (L - 1)
    for pos, layer, preview, out in decode:
        assert pos >= n_prompt
        np.testing.assert_array_equal(sketch(preview), t.preview_sketch[pos, layer])
        for target, s in out.items():
            np.testing.assert_allclose(
                s, offline[pos, layer, target - layer - 1], atol=1e-4
            )


def test_demand_read_overtakes_queued_prefetches(store):
    """One reader thread held on its first chunk: three prefetches queue, a
    demand read arrives, and it lands before every prefetch not yet started."""
    s = Store.open(store)
    ext = s.extent_nbytes
    with StreamedExperts(
        s, 8 * ext, io_threads=1, chunk_size=4096, prefetch_depth=3
    ) as src:
        gate = threading.Event()
        real = src.reader._preadv

        def held(fd, buf, off):
            gate.wait(10)
            return real(fd, buf, off)

        src.reader._preadv = held
        reqs = []
        submit = src.reader.submit
        src.reader.submit = lambda *a, **kw: reqs.append(submit(*a, **kw)) or reqs[-1]
        src.prefetch(1, [0, 1, 2], [1.0, 1.0, 1.0])
        assert src.stats()["prefetch_issued"] == 3
        threading.Timer(0.2, gate.set).start()
        list(src.fetch(0, [5]))  # demand, another layer: prefetches stay valid
        for r in reqs:
            r.wait(10)
        *pf, demand = reqs
        assert demand.priority == 0 and all(r.priority > 0 for r in pf)
        # only the prefetch whose chunk was in flight may finish first
        assert sum(r.t_done < demand.t_done for r in pf) <= 1
        assert all(r.ok for r in reqs)


# ------------------------------------------------------------------ the throttle


def test_throttle_calibrates_hints_and_breaks_even_on_measured_costs():
    MB = 10**6
    th = PrefetchThrottle(num_layers=4, extent_nbytes=MB, window=16)
    assert th.probability(0.8, 1) == pytest.approx(0.8)  # no data: trust scores
    for _ in range(20):  # scores of 0.8 that are right one time in four
        th.candidates(2, 1, {0: 0.8, 1: 0.8, 2: 0.8, 3: 0.8})
        th.visit(2, [0])
    c = (1 + 4) / (1 + 16 * 0.8)  # the last 16 outcomes, 4 of them used
    assert th.calibration(1) == pytest.approx(c)
    assert th.probability(0.8, 1) == pytest.approx(0.8 * c)
    assert th.probability(0.8, 2) == pytest.approx(0.8)  # another distance
    assert th.hint_precision() == {"hint": pytest.approx(0.25)}
    assert th.threshold == 0.0  # nothing measured: every candidate may go

    def settle(**kw):
        for _ in range(400):  # the moving averages converge
            th.interval(**kw)

    # every miss stalls a whole read (10 ms at 100 MB/s), the drive never idles
    settle(wall_s=0.02, stall_s=0.01, rate=100 * MB, busy_s=0.02, misses=1)
    assert th.read_seconds == pytest.approx(0.01)
    assert th.stall_per_miss == pytest.approx(0.01, rel=1e-3)
    assert th.busy_share == pytest.approx(1.0, rel=1e-3)
    assert th.threshold == pytest.approx(0.5, rel=1e-3)
    # the drive mostly idle: wasted reads are nearly free
    settle(wall_s=0.02, stall_s=0.01, rate=100 * MB, busy_s=0.002, misses=1)
    assert th.threshold == pytest.approx(0.001 / 0.011, rel=1e-2)
    # reads hidden behind compute: a miss costs little, so does little good
    settle(wall_s=0.02, stall_s=0.0005, rate=100 * MB, busy_s=0.01, misses=1)
    assert th.threshold == pytest.approx(0.005 / 0.0055, rel=1e-2)
    # used prefetches that were still being read when asked for, then waited
    # for 8 ms: they saved 2 ms, not a 10 ms miss, and the bar rises to match
    settle(wall_s=0.02, stall_s=0.01, rate=100 * MB, busy_s=0.02, misses=1)
    th.outcome(0.9, True, False, "markov", late=True, saved=0.002)
    assert th.saving_per_use == pytest.approx(0.002)
    assert th.threshold == pytest.approx(0.01 / 0.012, rel=1e-3)
    assert th.gate("markov").pending == pytest.approx(0.002)
    for _ in range(200):  # then they land in time: each saves a whole miss
        th.outcome(0.9, True, False, "markov")
    assert th.saving_per_use == pytest.approx(0.01, rel=1e-3)
    assert th.threshold == pytest.approx(0.5, rel=1e-3)
    # spare bandwidth: 1 GB/s x 4 ms of compute = 4 extents of 1 MB, cap 3
    th = PrefetchThrottle(num_layers=4, extent_nbytes=MB)
    assert th.inflight_cap(MB, depth=3) == 3  # unmeasured: the depth
    th.interval(0.010, 0.006, rate=1000 * MB)
    assert th.inflight_cap(MB, depth=3) == 3
    assert th.inflight_cap(2 * MB, depth=3) == 2
    assert th.inflight_cap(10 * MB, depth=3) == 1  # never below one


def test_throttle_probes_when_off_and_backs_off():
    th = PrefetchThrottle(num_layers=4, extent_nbytes=10**6)

    def layers(n):  # misses stall a whole read, drive busy: threshold 0.5
        for _ in range(n):
            th.interval(0.02, 0.01, rate=1e8, busy_s=0.02, misses=1)

    layers(400)
    assert th.threshold == pytest.approx(0.5, rel=1e-3)
    assert th.decide(0.1, room=True) == "probe"  # 400 demand reads, no probe yet
    th.started("probe")
    assert th.state == "off" and th.probes == th.issued == 1
    layers(100)
    assert th.decide(0.1, True) is None  # one probe at a time
    th.outcome(0.1, used=False, probe=True)  # wasted: the next after 2 x 32 reads
    layers(2 * PROBE_EVERY - 1)
    assert th.decide(0.1, True) is None
    layers(1)
    assert th.decide(0.1, True) == "probe"
    th.started("probe")
    th.outcome(0.1, used=True, probe=True)  # used: back to 32
    layers(PROBE_EVERY - 1)
    assert th.decide(0.1, True) is None
    layers(1)
    assert th.decide(0.1, True) == "probe"
    assert th.skipped_benefit == 3 and th.probes == 2
    assert th.decide(0.9, True) == "issue" and th.state == "on"
    th.started("issue")
    assert th.decide(0.9, room=False) is None and th.skipped_bandwidth == 1


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def predictors(store, tmp_path_factory):
    """A real predictor of ``store`` and one of another model, each trained
    on a trace made by mer_cli.trace."""
    from mer_cli.quantize import quantize
    from mer_cli.trace import trace
    from mer_cli.train_predictor import train_predictor

    d = tmp_path_factory.mktemp("preds")
    other_ck = make_hf_checkpoint(d / "ck", "mixtral", seed=4, layers=3)
    other = quantize(other_ck, d / "o.mer", progress=False)
    prompts = [f"{w} prompt number {i}" for i, w in enumerate("abcdefgh")]
    out = {}
    for name, st in (("own", store), ("other", other)):
        trace(st, prompts, d / f"{name}.trace.npz", max_tokens=6, progress=False)
        train_predictor(
            [d / f"{name}.trace.npz"],
            d / f"{name}.pred.npz",
            kind="markov",
            epochs=2,
            progress=False,
        )
        out[name] = d / f"{name}.pred.npz"
    return out


def gen(*args):
    return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)


def test_cli_predictor_streams_same_text_and_reports_the_throttle(
    store, resident, predictors
):
    ext = Store.open(store).extent_nbytes
    args = ["--model", str(store), "--prompt", PROMPT, "--max-tokens", str(N_TOKENS)]
    args += ["--ram-budget", str(12 * ext), "--stream", "--no-io-measure"]
    r = gen(*args, "--predictor", str(predictors["own"]), "--stats")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == resident[0].strip()
    assert "prefetch (markov): throttle " in r.stderr
    assert "skipped" in r.stderr and "live precision" in r.stderr
    # 24 tokens: two warm-up windows, then one pair of 4-token windows
    line = next(x for x in r.stderr.splitlines() if x.startswith("prefetch trial"))
    assert "still measuring" in line and "1 alternating pairs" in line


def test_cli_refuses_a_predictor_of_another_model(store, predictors):
    base = ["--model", str(store), "--prompt", "hi", "--max-tokens", "2"]
    r = gen(*base, "--predictor", str(predictors["other"]))
    assert r.exit_code == 1
    assert str(predictors["other"]) in r.stderr
    assert "made for a model with num_layers 3" in r.stderr
    assert "this model has num_layers 4" in r.stderr
    r = gen(*base, "--predictor", str(predictors["own"]), "--no-prefetch")
    assert r.exit_code == 2 and "--no-prefetch" in r.stderr
    r = gen(*base, "--predictor", str(store / "manifest.json"))
    assert r.exit_code == 1 and "manifest.json" in r.stderr


def test_compute_gate_closes_probes_and_reopens():
    th = PrefetchThrottle(num_layers=4, extent_nbytes=10**6)
    g = th.gate("markov")
    for _ in range(2 * 4):  # 1 ms per hint, nothing saved: closes
        assert g.wanted()
        th.hint_computed("markov", 0.001)
    assert not g.open and g.closed == 1
    assert [g.wanted() for _ in range(16 * 4)] == [False] * 64 and g.stale
    for _ in range(2 * 4):  # a probe window of two tokens that saves nothing
        assert g.wanted()
        th.hint_computed("markov", 0.001)
    assert not g.open  # the next window comes twice as late
    assert sum(not g.wanted() for _ in range(32 * 4)) == 128
    for _ in range(2 * 4):  # this window's prefetches save 2 ms per 1 ms hint
        assert g.wanted()
        g.credit(0.002)
        th.hint_computed("markov", 0.001)
    assert g.open and g.skipped == 64 + 128
    assert g.stats()["hints_computed"] == 3 * 2 * 4


def drive_trial(trial, windows, on_s, off_s, now=0.0):
    """``windows`` trial windows of single-token passes taking ``on_s``
    (prefetch allowed) or ``off_s`` seconds; the arm of each pass, in order."""
    arms = []
    for _ in range(windows * TRIAL_TOKENS):
        trial.step(1, now)  # a pass starts: the previous one is timed
        arms.append(trial.allowed)
        now += on_s if trial.allowed else off_s
    return arms, now


def test_trial_turns_off_a_prefetch_that_slows_decode_and_keeps_checking():
    t = _Trial(random.Random(0))
    W, n = TRIAL_WARMUP, TRIAL_TOKENS
    arms, now = drive_trial(t, W + 2 * TRIAL_MIN_PAIRS + 1, 0.11, 0.10)
    assert all(arms[: W * n])  # the warm-up windows: prefetch as it would be
    windows = arms[W * n :: n]
    for k in range(TRIAL_MIN_PAIRS):  # each pair: one window of each arm
        assert {windows[2 * k], windows[2 * k + 1]} == {True, False}
    # a difference this clear (no noise at all) is a verdict after 3 pairs
    assert t.verdict is False and t.n_pairs == TRIAL_MIN_PAIRS
    st = t.stats()
    assert st["verdict"] == "off" and st["speedup"] == pytest.approx(10 / 11, abs=1e-4)
    assert st["on_ms_per_token"] == pytest.approx(110) and st["pairs"] == 3
    arms, now = drive_trial(t, 10 * (TRIAL_EVERY + 2), 0.11, 0.10, now)
    # off from now on but for one checking pair after every TRIAL_EVERY windows
    assert sum(arms) == 10 * n and t.verdict is False
    # the drive got faster: the checks see it and the verdict follows
    arms, now = drive_trial(t, 3 * TRIAL_MEMORY * (TRIAL_EVERY + 2), 0.08, 0.1, now)
    tail = arms[-3 * (TRIAL_EVERY + 2) * n :]  # on but for the checks' off halves
    assert t.verdict is True and sum(tail) == 3 * (TRIAL_EVERY + 1) * n


def test_trial_of_identical_arms_has_no_side():
    """A/A: token times that depend on the position only (a costly start, a
    burst of misses) do not favour either arm: random pair orders."""
    cost = [0.3] * 8 + [0.1] * 40 + [0.25] * 6 + [0.1] * 200
    speedups = []
    for seed in range(40):
        t = _Trial(random.Random(seed))
        now = 0.0
        for c in cost:
            t.step(1, now)
            now += c
        speedups.append(t.stats()["speedup"])
    assert 0.97 < float(np.exp(np.mean(np.log(speedups)))) < 1.03
    assert 10 < sum(s < 1 for s in speedups) < 30


def test_trial_waits_for_a_clear_difference():
    """Pairs whose differences scatter around a small mean: no verdict until
    TRIAL_PAIRS pairs, then the mean's sign."""
    t = _Trial(random.Random(1), warmup=0)
    noise = [0.03, -0.028, 0.025, -0.02, 0.03, -0.027, 0.02, -0.02]
    now = 0.0
    t.step(1, now)
    while t.n_pairs < TRIAL_PAIRS:
        assert t.verdict is None
        k = t.n_pairs
        for _ in range(TRIAL_TOKENS):
            # on windows: 0.1 + noise of this pair (mean +0.001); off: 0.1
            now += 0.1 + (noise[k] + 0.001 if t.allowed else 0.0)
            t.step(1, now)
    assert t.verdict is False


def test_trial_keeps_a_prefetch_that_pays_and_skips_longer_passes():
    t = _Trial(random.Random(2))
    arms, _ = drive_trial(t, TRIAL_WARMUP + 2 * TRIAL_PAIRS + TRIAL_EVERY, 0.09, 0.10)
    assert t.verdict is True and t.stats()["speedup"] == pytest.approx(10 / 9, abs=1e-4)
    tail = arms[-(TRIAL_EVERY + 2) * TRIAL_TOKENS :]
    assert sum(tail) >= TRIAL_EVERY * TRIAL_TOKENS  # on but for a check's half
    # a prefill (several tokens) between two decode steps: its time, however
    # long, is no token's
    u = _Trial(random.Random(3), warmup=0)
    first = u.allowed
    for i in range(TRIAL_TOKENS):
        u.step(1, float(i))
    u.step(7, 100.0)  # the interval 3 -> 100 is dropped
    for i in range(2):
        u.step(1, 200.0 + i)
    assert u._pair == {first: 1.0} and u.allowed is not first


def test_trial_turns_prefetch_off_for_a_cost_the_rule_cannot_see(
    store, resident, slow_reads
):
    """Right hints that land in time, but every layer computed while a
    prefetch read is in flight takes 30 ms more (reads slowing the compute
    threads, as on the 2-core VM): the trial turns prefetch off by itself,
    and the text stays the resident run's."""
    text, seq = resident
    slow_reads(0.005)
    tokens = (TRIAL_WARMUP + 2 * TRIAL_PAIRS + 2) * TRIAL_TOKENS
    eng, tok = load(
        store,
        ctx=256,
        source=lambda st: StreamedExperts(st, 20 * st.extent_nbytes, io_threads=2),
    )
    try:
        pred = Oracle(seq, right=True)
        pred.engine = eng
        use_predictor(eng, pred)
        src = eng.source

        def hook(layer, x, ids, w):
            busy = any(s in src._prefetched for s in src._reqs)
            time.sleep(0.035 if busy else 0.005)

        eng.route_hook = hook
        pred.observe = lambda layer, experts, hidden, _o=pred.observe: (
            _o(layer, experts, hidden) if (eng.pos, layer) in seq else {}
        )
        c = Completion(eng, tok, PROMPT, GenerateOptions(max_tokens=tokens))
        c.run()
        st = src.stats()["prefetch_throttle"]
    finally:
        eng.close()
    assert c.result.completion.startswith(text)
    trial = st["trial"]
    assert trial["verdict"] == "off" and trial["speedup"] < 1
    assert trial["pairs"] >= TRIAL_MIN_PAIRS


def test_prefetch_chunks_leave_half_the_workers_to_demand(tmp_path):
    """Four workers: prefetch chunks never occupy more than two, so a demand
    read starts while prefetch chunks are still being read, not after them."""
    data = tmp_path / "d.bin"
    data.write_bytes(np.random.default_rng(0).bytes(48 * PAGE))
    pool = SlabPool(16 * PAGE, 3)
    reader = ExtentReader([data], threads=4, chunk_size=PAGE)
    lock = threading.Lock()
    now = {"pf": 0, "max_pf": 0, "pf_at_demand": None}
    real = reader._preadv

    def read(fd, buf, off):
        pf = off < 32 * PAGE  # the prefetches' region
        with lock:
            if pf:
                now["pf"] += 1
                now["max_pf"] = max(now["max_pf"], now["pf"])
            elif now["pf_at_demand"] is None:
                now["pf_at_demand"] = now["pf"]
        try:
            time.sleep(0.05)
            return real(fd, buf, off)
        finally:
            if pf:
                with lock:
                    now["pf"] -= 1

    reader._preadv = read
    try:
        pfs = [
            reader.submit(0, i * 16 * PAGE, 16 * PAGE, pool.slabs[i], priority=1)
            for i in (0, 1)
        ]
        time.sleep(0.02)
        demand = reader.submit(0, 32 * PAGE, 16 * PAGE, pool.slabs[2], priority=0)
        for r in (*pfs, demand):
            r.result(30)
        assert now["max_pf"] == reader.prefetch_threads == 2
        assert now["pf_at_demand"] >= 1  # ran alongside the prefetch chunks
        assert demand.t_done < min(r.t_done for r in pfs)
        got = bytes(pool.slabs[2][: 16 * PAGE])
        assert got == data.read_bytes()[32 * PAGE :]
    finally:
        reader.close()
        pool.close()
