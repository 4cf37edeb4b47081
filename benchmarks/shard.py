"""Expert reads spread over two devices by ``mer shard``: per-device split and
parallelism, one drive vs ``stripe`` vs ``balanced`` (vs ``balanced`` with hot
experts copied onto both).

Usage::

    sudo nice -n 19 python benchmarks/shard.py [--store STORE --trace TRACE]
        [--work /work/scratch/shard/bench] [--tokens 200] [--dirs]

As root, two loop devices (``losetup --direct-io=on`` on two sparse image
files, ext4, mounted under WORK/mnt0 and WORK/mnt1) are the two "drives";
otherwise (or with ``--dirs``) two plain directories are used and the reader is
told they are two devices (its ``devices`` keys), so the per-device queues and
the split still show, but both directories share one filesystem.

Without ``--store`` a store of random q4 extents is built (8 layers x 16
experts, D=1024, F=2816: 4.9 MB extents, 0.6 GB) with a synthetic routing
trace whose per-layer expert popularity is Dirichlet(0.3) (skewed, like real
routers). The trace's first half guides ``balanced``; the second half is
replayed: for each token and layer, a demand fetch of its top-k experts through
:class:`~mer_cli.streaming.StreamedExperts` (O_DIRECT, one queue per device,
``--slots`` cache slots, no prefetch), exactly as ``mer generate`` reads them,
without the compute.

Printed per layout: bytes read from each device (and its share), the share the
trace predicted, the replay's wall time and GB/s, and the reads' parallelism:
the devices' busy seconds added up over the wall time during which any read was
in flight (1.0 = one device at a time, 2.0 = both busy all the time).

Both loop devices sit on the same virtio disk on the development machines, so
their bandwidth cannot add up there: the figures show the split and that the
two queues run in parallel, not a speed-up. The machine is shared: compare only
numbers from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mer_cli.formats.store import Store, StoreWriter
from mer_cli.formats.trace import FORMAT as TRACE_FORMAT
from mer_cli.formats.trace import VERSION as TRACE_VERSION
from mer_cli.formats.trace import Trace
from mer_cli.models.config import ModelConfig
from mer_cli.shard import ShardOptions, shard, trace_counts
from mer_cli.streaming import StreamedExperts
from mer_cli.units import format_size


def build_store(path: Path, layers: int, experts: int, D: int, F: int) -> Path:
    """A store of random extents (routing is replayed, nothing is computed)."""
    from mer_cli.formats import quant

    cfg = ModelConfig(
        arch="mixtral",
        vocab_size=256,
        hidden_size=D,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=8,
        head_dim=D // 8,
        num_experts=experts,
        top_k=2,
        expert_ffn=F,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position=512,
    )
    rng = np.random.default_rng(0)
    with StoreWriter(path, cfg, force=True) as w:
        emb = rng.standard_normal((256, D), dtype=np.float32)
        w.add_dense("embed", quant.encode(emb, "q8"), "q8", emb.shape)
        for la in range(layers):
            for e in range(experts):
                parts = {
                    k: np.frombuffer(rng.bytes(p.nbytes), np.uint8)
                    for k, p in w.parts.items()
                }
                w.add_expert(la, e, parts)
        w.add_file("tokenizer.json", b"{}")
        return w.commit()


def synthetic_trace(store: Store, tokens: int, path: Path, seed: int = 1) -> Path:
    """A trace of ``tokens`` tokens whose experts follow skewed popularities."""
    cfg = store.model
    L, E, K = cfg.num_layers, cfg.num_experts, cfg.top_k
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet([0.3] * E, L)  # [L, E]
    ex = np.empty((tokens, L, K), np.int16)
    for la in range(L):
        for n in range(tokens):
            ex[n, la] = rng.choice(E, K, replace=False, p=pop[la])
    S = 1
    meta = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "store_id": store.store_id.hex(),
        "arch": cfg.arch,
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "hidden_size": cfg.hidden_size,
        "sketch_dim": S,
        "sketch_seed": 0,
        "created_by": "benchmarks/shard.py (synthetic)",
    }
    t = Trace(
        meta=meta,
        tokens=np.zeros(tokens, np.int32),
        positions=np.arange(tokens, dtype=np.int32),
        prompt=np.zeros(tokens, np.int32),
        experts=ex,
        weights=np.full((tokens, L, K), 1 / K, np.float16),
        probs=np.zeros((tokens, L, E), np.float16),
        sketch=np.zeros((tokens, L, S), np.float16),
        projection=np.zeros((cfg.hidden_size, S), np.float32),
    )
    t.save(path)
    return path


def half_trace(src: Path, dst: Path, first: bool) -> Path:
    """The first or second half of a trace's tokens (placement vs replay)."""
    t = Trace.load(src)
    n = t.num_tokens // 2
    sl = slice(0, n) if first else slice(n, None)
    arrays = {k: v[sl] for k, v in t.arrays().items() if k != "projection"}
    if t.lookahead is not None:
        arrays["lookahead"] = t.lookahead[sl]
    out = Trace(meta=dict(t.meta), projection=t.projection, **arrays)
    out.save(dst)
    return dst


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def setup_loops(work: Path, size: int) -> list[Path]:
    mounts = []
    for i in range(2):
        img, mnt = work / f"drive{i}.img", work / f"mnt{i}"
        with open(img, "wb") as f:
            f.truncate(size)
        dev = run(["losetup", "--find", "--show", "--direct-io=on", str(img)]).strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
        mnt.mkdir(exist_ok=True)
        run(["mount", "-o", "noatime", dev, str(mnt)])
        (mnt / "mer").mkdir(exist_ok=True)
        mounts.append(mnt / "mer")
    return mounts


def teardown_loops(work: Path) -> None:
    for i in range(2):
        mnt, img = work / f"mnt{i}", work / f"drive{i}.img"
        if os.path.ismount(mnt):
            dev = run(["findmnt", "-n", "-o", "SOURCE", str(mnt)]).strip()
            subprocess.run(["umount", str(mnt)], check=False)
            subprocess.run(["losetup", "-d", dev], check=False)
        img.unlink(missing_ok=True)


def replay(store_path: Path, trace: Trace, slots: int, fake_devices: bool) -> dict:
    """Fetch every token's experts, layer by layer, as generate would."""
    st = Store.open(store_path)
    with StreamedExperts(st, slots * st.extent_nbytes, prefetch=False) as src:
        if fake_devices:  # two dirs on one filesystem: tell the reader
            from mer_cli.io.reader import ExtentReader

            src.reader.close()
            keys = [str(p.parent) for p in st.file_paths]
            src.reader = ExtentReader(st.file_paths, devices=keys)
        t0 = time.perf_counter()
        for n in range(trace.num_tokens):
            for la in range(st.model.num_layers):
                for _ in src.fetch(la, [int(e) for e in trace.experts[n, la]]):
                    pass
        wall = time.perf_counter() - t0
        s = src.stats()
    return {"wall": wall, **s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="store to copy and shard")
    ap.add_argument("--trace", type=Path, help="routing trace of that store")
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/shard/bench"))
    ap.add_argument(
        "--tokens", type=int, default=100, help="tokens replayed (synthetic trace)"
    )
    ap.add_argument("--slots", type=int, default=4, help="expert cache slots")
    ap.add_argument("--hot-copies", type=int, default=8)
    ap.add_argument("--dirs", action="store_true", help="two dirs, not loop devices")
    ap.add_argument("--keep", action="store_true", help="keep the images and store")
    a = ap.parse_args(argv)

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    loops = os.geteuid() == 0 and not a.dirs and shutil.which("losetup")
    store = work / "store.mer"
    t0 = time.perf_counter()
    if a.store:
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(a.store, store)
    else:
        build_store(store, 8, 16, 1024, 2816)
    st = Store.open(store)
    full = a.trace or synthetic_trace(st, 2 * a.tokens, work / "full.trace")
    guide = half_trace(full, work / "guide.trace", first=True)
    test = Trace.load(half_trace(full, work / "replay.trace", first=False))
    print(
        f"store {store}: {len(st.experts)} extents x "
        f"{format_size(st.extent_nbytes)}; trace {full}: {test.num_tokens} tokens "
        f"replayed, the other {Trace.load(guide).num_tokens} guide balanced "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    if loops:
        teardown_loops(work)
        size = 2 * len(st.experts) * st.extent_nbytes + (256 << 20)
        drives = setup_loops(work, size)
        print(f"two loop devices (--direct-io=on, ext4) of {format_size(size)} each")
    else:
        drives = [work / "dir0", work / "dir1"]
        for d in drives:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        print("two directories on one filesystem, given to the reader as two devices")
    counts, _, _ = trace_counts(guide, st)
    replay_counts, _, _ = trace_counts(work / "replay.trace", st)
    layouts = [
        ("one drive", ShardOptions((str(drives[0]),))),
        ("stripe", ShardOptions(tuple(map(str, drives)))),
        ("balanced", ShardOptions(tuple(map(str, drives)), "balanced", str(guide))),
        (
            f"balanced +{a.hot_copies} hot copies",
            ShardOptions(
                tuple(map(str, drives)),
                "balanced",
                str(guide),
                hot_copies=a.hot_copies,
            ),
        ),
        ("one drive, again", ShardOptions((str(drives[0]),))),  # order effects
    ]
    rows = []
    try:
        for name, opts in layouts:
            t1 = time.perf_counter()
            res = shard(store, opts)
            shard_s = time.perf_counter() - t1
            s = Store.open(store)
            pred = predicted_split(s, drives, replay_counts)
            r = replay(store, test, a.slots, fake_devices=not loops)
            devs = by_drive(r["read_devices"], s, drives)
            total = sum(devs) or 1
            busy = sum(d["read_seconds"] for d in r["read_devices"])
            rows.append(
                {
                    "layout": name,
                    "shard_s": shard_s,
                    "copied": res.copied_bytes,
                    "bytes": devs,
                    "share": [b / total for b in devs],
                    "predicted": pred,
                    "wall_s": r["wall"],
                    "gbps": r["bytes_read"] / r["wall"] / 1e9,
                    "parallelism": busy / r["read_seconds"]
                    if r["read_seconds"]
                    else 0.0,
                    "hit_rate": r["hit_rate"],
                }
            )
    finally:
        if not a.keep:  # the store is a scratch copy: drop it with the drives
            shutil.rmtree(store, ignore_errors=True)
            if loops:
                teardown_loops(work)
            else:
                for d in drives:
                    shutil.rmtree(d, ignore_errors=True)
    print()
    print(
        f"{'layout':28s} {'drive0':>10s} {'drive1':>10s} {'split':>11s} "
        f"{'predicted':>11s} {'replay':>8s} {'GB/s':>6s} {'parallel':>8s} "
        f"{'shard':>7s}"
    )
    for r in rows:
        b0, b1 = r["bytes"]
        print(
            f"{r['layout']:28s} {format_size(b0):>10s} {format_size(b1):>10s} "
            f"{100 * r['share'][0]:4.1f}/{100 * r['share'][1]:4.1f}% "
            f"{100 * r['predicted'][0]:4.1f}/{100 * r['predicted'][1]:4.1f}% "
            f"{r['wall_s']:7.2f}s {r['gbps']:6.2f} {r['parallelism']:7.2f}x "
            f"{r['shard_s']:6.1f}s"
        )
    base = (rows[0]["wall_s"] + rows[-1]["wall_s"]) / 2
    print()
    for r in rows[1:-1]:
        print(
            f"{r['layout']}: replay time {r['wall_s'] / base:.2f}x one drive's "
            "(mean of its two runs)"
        )
    print(
        f"(hit rate {rows[0]['hit_rate']:.2f} with {a.slots} slots, same for all; "
        "parallel = devices' busy seconds added / seconds any read was in flight)"
    )
    (work / "result.json").write_text(json.dumps(rows, indent=1))
    return 0


def predicted_split(store: Store, drives: list[Path], counts) -> list[float]:
    """Share of expert reads each drive gets under ``counts`` (copies split
    evenly), from the store's placement."""
    load = [0.0, 0.0]
    E = store.model.num_experts
    for e in store.experts:
        dirs = [drive_index(store.file_paths[f], drives) for f, _ in e.copies]
        for d in dirs:
            load[d] += counts[e.layer * E + e.expert] / len(dirs)
    s = sum(load) or 1
    return [x / s for x in load]


def drive_index(p: Path, drives: list[Path]) -> int:
    return next(i for i, d in enumerate(drives) if p.resolve().parent == d.resolve())


def by_drive(devices: list[dict], store: Store, drives: list[Path]) -> list[int]:
    out = [0, 0]
    for d in devices:
        f = d["files"][0]
        try:
            out[drive_index(store.file_paths[f], drives)] += d["bytes_read"]
        except StopIteration:
            pass  # dense.bin's device: no expert reads
    return out


if __name__ == "__main__":
    sys.exit(main())
