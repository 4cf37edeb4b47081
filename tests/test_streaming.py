"""StreamedExperts against ResidentExperts on tiny stores written to tmp_path."""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest

from mer_cli.errors import FormatError, ReadError, ResourceError
from mer_cli.experts import ResidentExperts
from mer_cli.formats import quant
from mer_cli.formats.store import Store, StoreWriter
from mer_cli.models.config import ModelConfig
from mer_cli.streaming import StreamedExperts

L, E, K, D, F = 3, 4, 2, 64, 96
PAGE = 4096


def make_store(path, seed=0, max_file_size=None) -> Store:
    cfg = ModelConfig(
        arch="mixtral",
        vocab_size=64,
        hidden_size=D,
        num_layers=L,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        num_experts=E,
        top_k=K,
        expert_ffn=F,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        max_position=128,
    )
    rng = np.random.default_rng(seed)
    with StoreWriter(path, cfg, max_file_size=max_file_size) as w:
        for la in range(L):
            for e in range(E):
                gu = rng.standard_normal((2 * F, D)).astype(np.float32)
                dn = rng.standard_normal((D, F)).astype(np.float32)
                w.add_expert(
                    la,
                    e,
                    {"gate_up": quant.encode(gu, "q4"), "down": quant.encode(dn, "q4")},
                )
        w.commit()
    return Store.open(path)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


def as_bytes(parts):
    """Every array inside ``parts`` as raw bytes, for byte-exact comparison."""
    out = {}
    for name, t in parts.items():
        if isinstance(t, quant.QTensor):
            out[name] = (t.dtype, t.packed.tobytes(), t.scales.tobytes())
        else:
            out[name] = t.tobytes()
    return out


def run_tokens(src, routes, prefetch_next=False):
    """Fetch every (layer, ids) of ``routes``; return [(layer, id, bytes)]."""
    got = []
    for i, (layer, ids) in enumerate(routes):
        if prefetch_next and i + 1 < len(routes):
            nl, nids = routes[i + 1]
            src.prefetch(nl, nids, [0.9] * len(nids))
        for e, parts in src.fetch(layer, ids):
            got.append((layer, e, as_bytes(parts)))
    return got


def random_routes(tokens, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (la, [int(x) for x in rng.choice(E, K, replace=False)])
        for _ in range(tokens)
        for la in range(L)
    ]


def run_with_timeout(fn, seconds=20):
    """Run ``fn`` in a thread; fail (not hang) if it deadlocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"deadlock: no result after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("slots", [1, 2, 5, L * E])
@pytest.mark.parametrize("prefetch", [False, True])
def test_same_bytes_as_resident_for_any_budget(store, slots, prefetch):
    """Byte-identical parts for every expert, including a budget of ONE slot
    while each layer needs K=2 experts (must be slow but never deadlock)."""
    routes = [(la, [e, (e + 1) % E]) for la in range(L) for e in range(E)]
    routes += random_routes(6, seed=slots)
    ref = ResidentExperts(store)
    want = {(la, e): as_bytes(p) for la, ids in routes for e, p in ref.fetch(la, ids)}

    def go():
        with StreamedExperts(
            store,
            slots * store.extent_nbytes,
            io_threads=3,
            chunk_size=PAGE,
            prefetch=prefetch,
        ) as src:
            got = run_tokens(src, routes, prefetch_next=prefetch)
            return got, src.stats()

    got, st = run_with_timeout(go)
    assert len(got) == sum(len(ids) for _, ids in routes)
    seen = [(la, e) for la, e, _ in got]
    for (_, ids), start in zip(routes, np.cumsum([0] + [len(i) for _, i in routes])):
        assert sorted(e for _, e in seen[start : start + len(ids)]) == sorted(ids)
    for la, e, b in got:
        assert b == want[(la, e)], f"expert ({la}, {e}) differs from the resident copy"
    assert st["slots"] == slots
    assert st["hits"] + st["misses"] == st["expert_requests"] == len(got)
    assert st["hit_rate_belady"] >= st["hit_rate_lru"] - 1e-9
    assert st["bytes_read"] > 0 and st["bytes_read"] % PAGE == 0
    if not prefetch:  # (cancelled prefetches may stop part-way)
        assert st["bytes_read"] == st["misses"] * store.extent_nbytes
    if slots == L * E and not prefetch:
        # everything fits: each expert read exactly once
        assert st["misses"] == len({(la, e) for la, e, _ in got})


def test_cached_experts_come_first(store):
    with StreamedExperts(store, 4 * store.extent_nbytes, chunk_size=PAGE) as src:
        list(src.fetch(0, [1]))
        order = [e for e, _ in src.fetch(0, [3, 2, 1])]
        assert order[0] == 1 and sorted(order) == [1, 2, 3]
        st = src.stats()
        assert st["hits"] == 1 and st["misses"] == 3


def test_prefetch_and_fetch_share_one_read(store):
    with StreamedExperts(store, 4 * store.extent_nbytes, chunk_size=PAGE) as src:
        src.prefetch(1, [2], [0.9])
        got = dict(src.fetch(1, [2]))
        assert set(got) == {2}
        st = src.stats()
        assert st["bytes_read"] == store.extent_nbytes
        assert st["prefetch_issued"] == 1 and st["prefetch_used"] == 1
        assert st["prefetch_precision"] == 1.0


def test_prefetch_off_ignores_hints(store):
    with StreamedExperts(store, 4 * store.extent_nbytes, prefetch=False) as src:
        src.prefetch(1, [0, 1], [0.9, 0.8])
        assert src.stats()["bytes_read"] == 0


def test_stale_prefetches_are_cancelled(store):
    with StreamedExperts(
        store, 6 * store.extent_nbytes, io_threads=1, chunk_size=PAGE, prefetch_depth=4
    ) as src:
        gate = threading.Event()
        real = src.reader._preadv

        def slow(fd, buf, off):
            gate.wait(10)
            return real(fd, buf, off)

        src.reader._preadv = slow
        src.prefetch(2, [0, 1, 2], [0.9, 0.8, 0.7])
        threading.Timer(0.2, gate.set).start()
        got = dict(src.fetch(2, [3]))  # none of the hints was right
        assert set(got) == {3}
        st = src.stats()
        assert st["prefetch_issued"] == 3
        assert st["prefetch_cancelled"] >= 2  # the ones not yet started at least
        assert st["prefetch_used"] == 0 and st["prefetch_precision"] == 0.0
        # a cancelled expert is read again when it is really needed
        assert dict(src.fetch(2, [0, 1])).keys() == {0, 1}


def test_prefetch_never_displaces_experts_in_use(store):
    with StreamedExperts(store, 2 * store.extent_nbytes, chunk_size=PAGE) as src:
        gen = src.fetch(0, [0, 1])
        next(gen)  # one slot held by the compute, the other loading/loaded for it
        src.prefetch(1, [0, 1], [1.0, 1.0])
        assert src.stats()["prefetch_issued"] == 0
        rest = list(gen)
        assert len(rest) == 1


def test_closing_a_fetch_early_releases_its_slot(store):
    ref = ResidentExperts(store)
    with StreamedExperts(store, store.extent_nbytes, chunk_size=PAGE) as src:

        def go():
            gen = src.fetch(0, [0, 1])
            next(gen)
            gen.close()
            return {e: as_bytes(p) for e, p in src.fetch(0, [2, 3])}

        got = run_with_timeout(go)
        for e in (2, 3):
            assert got[e] == as_bytes(dict(ref.fetch(0, [e]))[e])


def test_pinned_experts_stay(store):
    with StreamedExperts(
        store, 3 * store.extent_nbytes, chunk_size=PAGE, pinned=[(0, 0), (1, 1)]
    ) as src:
        read0 = src.stats()["bytes_read"]
        assert read0 == 2 * store.extent_nbytes
        run_tokens(src, random_routes(4, seed=5))
        n0 = src.stats()["bytes_read"]
        list(src.fetch(0, [0]))
        list(src.fetch(1, [1]))
        assert src.stats()["bytes_read"] == n0  # still resident
    with pytest.raises(ResourceError, match="pinning 2 experts needs at least 3 slots"):
        StreamedExperts(store, 2 * store.extent_nbytes, pinned=[(0, 0), (1, 1)])


def test_budget_below_one_extent(store):
    with pytest.raises(ResourceError) as ei:
        StreamedExperts(store, store.extent_nbytes - 1)
    msg = str(ei.value)
    assert f"minimum budget is {store.extent_nbytes} bytes" in msg
    assert str(store.path) in msg


def test_truncated_during_run_names_file_and_offset(store):
    path = store.file_paths[1]
    last = store.expert(L - 1, E - 1)
    with StreamedExperts(store, 2 * store.extent_nbytes, chunk_size=PAGE) as src:
        list(src.fetch(0, [0, 1]))
        os.truncate(path, last.offset + PAGE)  # cut the last extent short
        with pytest.raises(ReadError) as ei:
            list(src.fetch(L - 1, [E - 1]))
        msg = str(ei.value)
        assert str(path) in msg and f"offset {last.offset}" in msg
        assert f"expert (layer {L - 1}, expert {E - 1})" in msg and "truncated" in msg
        # experts before the cut still read fine afterwards
        assert dict(src.fetch(1, [0])).keys() == {0}


def test_deleted_during_run(tmp_path):
    # two expert files: the second is opened only when first needed
    st = make_store(tmp_path / "s", max_file_size=6 * 12288 + PAGE)
    assert len(st.file_paths) >= 3
    second = st.expert(L - 1, E - 1)
    path = st.file_paths[second.file]
    with StreamedExperts(st, 2 * st.extent_nbytes, chunk_size=PAGE) as src:
        list(src.fetch(0, [0]))
        os.unlink(path)
        with pytest.raises(ReadError) as ei:
            list(src.fetch(L - 1, [E - 1]))
        msg = str(ei.value)
        assert str(path) in msg and f"offset {second.offset}" in msg
        assert "removed" in msg


def corrupt(store, layer, expert):
    ent = store.expert(layer, expert)
    with open(store.file_paths[ent.file], "r+b") as f:
        f.seek(ent.offset + 100)
        b = f.read(1)
        f.seek(ent.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    return ent


def test_checksum_mismatch_with_verification_on(store):
    ent = corrupt(store, 1, 2)
    with StreamedExperts(store, 2 * store.extent_nbytes, verify_checksums=True) as src:
        list(src.fetch(1, [0, 1]))  # intact experts pass
        with pytest.raises(FormatError) as ei:
            list(src.fetch(1, [2]))
        msg = str(ei.value)
        assert str(store.file_paths[ent.file]) in msg
        assert "expert (layer 1, expert 2)" in msg and f"offset {ent.offset}" in msg
        assert f"{ent.crc32:08x}" in msg
    with StreamedExperts(store, 2 * store.extent_nbytes) as src:
        assert dict(src.fetch(1, [2])).keys() == {2}  # off: not checked


def test_stats_fields(store):
    with StreamedExperts(store, 3 * store.extent_nbytes, chunk_size=PAGE) as src:
        run_tokens(src, random_routes(5, seed=9), prefetch_next=True)
        st = src.stats()
    for key in (
        "bytes_read",
        "read_seconds",
        "read_gbps",
        "hits",
        "misses",
        "hit_rate",
        "hit_rate_lru",
        "hit_rate_belady",
        "stall_seconds",
        "prefetch_issued",
        "prefetch_used",
        "prefetch_wasted",
        "prefetch_cancelled",
        "prefetch_precision",
        "prefetch_recall",
    ):
        assert key in st
    assert st["read_seconds"] > 0 and st["read_gbps"] > 0
    assert 0 <= st["prefetch_precision"] <= 1 and 0 <= st["prefetch_recall"] <= 1
    assert (
        st["prefetch_used"] + st["prefetch_wasted"] + st["prefetch_cancelled"]
        <= (st["prefetch_issued"])
    )


def test_each_expert_is_yielded_as_soon_as_its_read_lands(store):
    """Expert 0 is handed out while expert 1's read is still held back."""
    slow = store.expert(0, 1)
    release = threading.Event()
    with StreamedExperts(store, 4 * store.extent_nbytes, chunk_size=PAGE) as src:
        real = src.reader._preadv

        def gated(fd, buf, off):
            if slow.offset <= off < slow.offset + slow.nbytes:
                release.wait(10)
            return real(fd, buf, off)

        src.reader._preadv = gated
        gen = src.fetch(0, [1, 0])
        first, _ = run_with_timeout(lambda: next(gen), 5)
        assert first == 0 and not release.is_set()
        release.set()
        assert [e for e, _ in gen] == [1]
        assert src.stats()["stall_seconds"] > 0


def test_bad_ids_are_refused(store):
    with StreamedExperts(store, 2 * store.extent_nbytes) as src:
        with pytest.raises(ValueError, match="experts in 0..3"):
            list(src.fetch(0, [4]))
        with pytest.raises(ValueError, match="repeated"):
            list(src.fetch(0, [1, 1]))


def test_rss_stays_within_budget_plus_overhead(tmp_path):
    """Streaming every expert twice grows RSS by the slots, not by the store."""
    from mer_cli.memory import rss_bytes

    global D, F
    saved = D, F
    D, F = 256, 1024  # ~300 KiB extents: the store is 12 x that
    try:
        st = make_store(tmp_path / "big", seed=3)
    finally:
        D, F = saved
    budget = 2 * st.extent_nbytes
    before = rss_bytes()
    with StreamedExperts(st, budget, chunk_size=64 * 1024) as src:
        for _ in range(2):
            for la in range(L):
                for _e, parts in src.fetch(la, list(range(E))):
                    assert parts["gate_up"].packed.shape == (2048, 128)
        grown = rss_bytes() - before
        assert src.stats()["bytes_read"] == 2 * L * E * st.extent_nbytes
    assert grown < budget + (4 << 20), grown


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_interleavings_keep_bytes_right(store, seed):
    """Hints (right and wrong) given mid-fetch, early closes, tiny budgets: every
    expert handed out still holds its own bytes."""
    rng = np.random.default_rng(seed)
    ref = ResidentExperts(store)
    want = {(la, e): as_bytes(p) for la in range(L) for e, p in ref.fetch(la, range(E))}

    def go():
        slots = int(rng.integers(1, 6))
        with StreamedExperts(
            store,
            slots * store.extent_nbytes,
            io_threads=int(rng.integers(1, 4)),
            chunk_size=PAGE,
            prefetch_depth=int(rng.integers(1, 4)),
        ) as src:
            n = 0
            for _ in range(60):
                la = int(rng.integers(0, L))
                ids = [
                    int(x)
                    for x in rng.choice(E, int(rng.integers(1, 3)), replace=False)
                ]
                stop = int(rng.integers(0, len(ids) + 2))  # sometimes close early
                for i, (e, parts) in enumerate(src.fetch(la, ids)):
                    assert as_bytes(parts) == want[(la, e)]
                    n += 1
                    if rng.random() < 0.5:
                        nl = int(rng.integers(0, L))
                        hint = [int(x) for x in rng.choice(E, 2, replace=False)]
                        src.prefetch(nl, hint, list(rng.random(2)))
                    if i + 1 == stop:
                        break
            return n, src.stats()

    n, st = run_with_timeout(go)
    assert n > 0 and st["expert_requests"] >= n


def test_resident_preload_reads_every_extent_and_checks_it(store):
    """The in-RAM source reads all extents through the reader: the bytes equal
    the file's, and a corrupt extent stops the load with the file and expert."""
    with contextlib.closing(ResidentExperts(store)) as src:
        for layer in range(store.model.num_layers):
            for e, parts in src.fetch(layer, range(store.model.num_experts)):
                want = store.expert_parts(store.expert_bytes(layer, e))
                assert as_bytes(parts) == as_bytes(want)
    ent = corrupt(store, 1, 2)
    with pytest.raises(FormatError) as ei:
        ResidentExperts(store)
    msg = str(ei.value)
    assert str(store.file_paths[ent.file]) in msg
    assert "expert (layer 1, expert 2)" in msg and f"{ent.crc32:08x}" in msg
