"""Streaming experts under a memory limit: mer vs page-cache mmap vs llama.cpp.

Usage (as root; cgroup v1 memory controller)::

    python benchmarks/stream.py --store mixtral-16l.mer --gguf mixtral-16l.gguf \\
        --limit 4GiB --tokens 16 --prompt "The history of the Roman empire"
    python benchmarks/stream.py --store tiny.mer --no-cgroup --tokens 8   # dry run

One run, several configurations, each a child process. Before each one the page
cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) and the child is
placed in a cgroup v1 memory group limited to ``--limit`` (its pid is written to
``cgroup.procs`` before it starts Python, so all its memory, page cache included,
is charged there). Configurations:

``resident``
    All experts in RAM, OUTSIDE the cgroup (skipped when the store does not fit
    in available memory): the compute time per token. Without it the compute
    time is a streamed run's stall-free time (decode time minus time stalled).
``stream``, ``stream-noprefetch``
    ``StreamedExperts`` (O_DIRECT reads into ``--ram-budget`` of slots), with the
    router-lookahead prefetch on and off.
``stream-KIND``
    One per ``--predictor PRED`` (KIND = the predictor's kind, ``markov`` or
    ``mlp``): prefetches ranked by the predictor (``mer generate --predictor``),
    throttled by live precision like the lookahead ones.
``stream-wrong``, ``stream-wrong-free``
    With ``--wrong-predictor PRED``: PRED's scores given to the wrong experts
    (a fixed random permutation of each layer's experts, so the confidence
    stays and the hints point elsewhere), with the throttle, and without it
    (every candidate read, hints always computed, no trial): a predictor that
    can only cost, to show that the throttle turns it off by itself and what
    it would cost otherwise.
``mmap``
    The naive baseline: the same store through its memory map
    (``ResidentExperts(preload=False)``), i.e. page-cache demand paging.
``llama.cpp``
    ``llama_cpp.Llama(gguf, use_mmap=True)`` on the GGUF Q4_0 of the same model
    (``--gguf``), greedy decode timed token by token.

Also measured in the same run: the drive's sequential O_DIRECT ceiling on the
largest experts file (fio, libaio queue depth 8, when installed; else mer's
reader with 8 threads), after dropping the cache.

Reported in one table: decode tok/s, expert read GB/s during decode (while
reads were in flight, and over decode wall time), its share of the ceiling, the
share of decode time stalled on I/O, and token time / max(I/O time, compute
time), where I/O time = decode bytes read / ceiling. Ratios: ours / llama.cpp,
ours / mmap. The machine may be shared: compare only figures of one run.

A second table compares the prefetch configurations with prefetch off:
decode tok/s and its ratio to ``stream-noprefetch`` of the same round, bytes
read per token, hit rate, and what the throttle did (reads issued, probes,
candidates skipped because the benefit was below the cost or for lack of spare
bandwidth, live precision, share of hinted experts used, final state, and the
trial's verdict with the speed-up it measured: decode token time with prefetch
off / with it on, over alternating windows of the same run).
``--repeat N`` runs the streamed configurations N times in rotated order, so
the spread of the prefetch-off runs shows the noise.

Each configuration is bounded by ``--tokens`` and killed after ``--timeout``
seconds; the cgroup is removed at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
CHILD_FLAG = "--child"
OVERHEAD = 512 << 20  # interpreter, numba, buffers: kept out of the default budget


# ---------------------------------------------------------------- child side


def _read_bytes() -> int:
    """Bytes this process made the storage layer fetch (page cache misses and
    O_DIRECT reads), from /proc/self/io."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _warm_up(warm: str | None, threads: int | None) -> None:
    """Run the kernels once on a tiny store (JIT/cache load), not on the big one,
    so the measured store stays cold."""
    if not warm:
        return
    from mer_cli.generate import GenerateOptions, generate, load

    eng, tok = load(warm, ctx=64, threads=threads)
    try:
        generate(eng, tok, "warm up", GenerateOptions(max_tokens=3))
    finally:
        eng.close()


def child_mer(cfg: dict) -> dict:
    from mer_cli.experts import ResidentExperts
    from mer_cli.generate import Completion, GenerateOptions, load
    from mer_cli.memory import peak_rss_bytes
    from mer_cli.streaming import StreamedExperts

    _warm_up(cfg.get("warm"), cfg.get("threads"))
    mode = cfg["mode"]

    def make(store):
        if mode == "resident":
            return ResidentExperts(store, preload=True)
        if mode == "mmap":
            return ResidentExperts(store, preload=False)
        return StreamedExperts(
            store,
            cfg["ram_budget"],
            io_threads=cfg["io_threads"],
            chunk_size=cfg["chunk"],
            prefetch=mode in ("stream", "stream-pred"),
            switch_interval=cfg.get("switch_interval"),
        )

    t_load = time.perf_counter()
    eng, tok = load(
        cfg["store"], ctx=cfg["ctx"], threads=cfg.get("threads"), source=make
    )
    if cfg.get("predictor"):
        from mer_cli.predictors import load_predictor
        from mer_cli.prefetch import use_predictor

        pred = load_predictor(cfg["predictor"], eng.store)
        if cfg.get("wrong"):
            pred = Misdirected(pred, seed=0)
        use_predictor(eng, pred)
        if cfg.get("free"):  # the counterfactual: no throttle, no trial
            th = eng.source.throttle
            th.factor = lambda distance, kind: 1.0
            th.decide = lambda p, room: "issue"
            th.hint_computed = lambda kind, seconds: None
            th.trial.step = lambda tokens, now: None
    load_s = time.perf_counter() - t_load
    try:
        c = Completion(
            eng,
            tok,
            cfg["prompt"],
            GenerateOptions(max_tokens=cfg["tokens"]),
        )
        marks: dict[str, int] = {}
        prefill = eng.prefill

        def timed_prefill(*a, **kw):  # mark the prefill/decode boundary
            out = prefill(*a, **kw)
            marks["rb1"] = _read_bytes()
            return out

        eng.prefill = timed_prefill
        rb0 = _read_bytes()
        c.run()
        rb2 = _read_bytes()
        rb1 = marks.get("rb1", rb2)
        res = c.result
    finally:
        eng.close()
    s = res.stats
    return {
        "config": cfg["name"],
        "load_s": round(load_s, 3),
        "tokens": res.completion_tokens,
        "text": res.completion,
        "prefill_tok_s": s.get("prefill_tok_s"),
        "decode_tokens": s.get("decode_tokens"),
        "decode_s": s.get("decode_s"),
        "decode_tok_s": s.get("decode_tok_s"),
        "io": s.get("io"),
        "source": {
            k: v for k, v in s.get("source", {}).items() if not isinstance(v, list)
        },
        "proc_read_bytes_prefill": rb1 - rb0,
        "proc_read_bytes_decode": rb2 - rb1,
        "peak_rss_bytes": peak_rss_bytes(),
    }


class Misdirected:
    """``pred`` with each target layer's scores given to other experts (a fixed
    random permutation per layer): as confident as ``pred``, almost never
    right. Everything else is ``pred``'s."""

    def __init__(self, pred, seed: int) -> None:
        import numpy as np

        self.pred, self.kind = pred, "wrong"
        rng = np.random.default_rng(seed)
        self.perm = []
        for _ in range(pred.L):  # a cycle through all experts: none keeps its own
            order = rng.permutation(pred.E)
            perm = np.empty(pred.E, np.int64)
            perm[order] = np.roll(order, -1)
            self.perm.append(perm)

    def __getattr__(self, name):
        return getattr(self.pred, name)

    def observe(self, layer, experts, hidden, **kw):
        out = self.pred.observe(layer, experts, hidden, **kw)
        return {t: s[self.perm[t]] for t, s in out.items()}


def child_llama(cfg: dict) -> dict:
    import llama_cpp.llama_cpp as capi
    import numpy as np
    from llama_cpp import Llama

    # llama.cpp repacks Q4_0 into anonymous memory at load (CPU_REPACK), which
    # cannot work when the model is larger than the limit (the cgroup OOM-kills
    # it); without repacking it reads the weights through mmap, as `-nr` does
    default_params = capi.llama_model_default_params

    def no_repack():
        p = default_params()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = no_repack

    t0 = time.perf_counter()
    llm = Llama(
        model_path=cfg["gguf"],
        n_threads=cfg.get("threads") or os.cpu_count(),
        n_ctx=cfg["ctx"],
        use_mmap=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(cfg["prompt"].encode(), add_bos=True)
    rb0 = _read_bytes()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    rb1 = _read_bytes()
    out = []
    t0 = time.perf_counter()
    for i in range(cfg["tokens"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok == llm.token_eos():
            break
        out.append(tok)
        if i + 1 < cfg["tokens"]:
            llm.eval([tok])
    decode_s = time.perf_counter() - t0
    rb2 = _read_bytes()
    n = max(len(out) - 1, 0)  # forward passes after the prompt
    return {
        "config": cfg["name"],
        "load_s": round(load_s, 3),
        "tokens": len(out),
        "prefill_tok_s": round(len(ids) / prefill_s, 3) if prefill_s else None,
        "decode_tokens": n,
        "decode_s": round(decode_s, 6),
        "decode_tok_s": round(n / decode_s, 3) if decode_s and n else None,
        "io": None,
        "proc_read_bytes_prefill": rb1 - rb0,
        "proc_read_bytes_decode": rb2 - rb1,
    }


def child_main(arg: str) -> None:
    cfg = json.loads(arg)
    out = child_llama(cfg) if cfg["mode"] == "llama" else child_mer(cfg)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent side


class Cgroup:
    """A cgroup v1 memory group; ``add_self`` is used in the child before exec."""

    def __init__(self, name: str, limit: int) -> None:
        if not CGROUP_ROOT.is_dir():
            sys.exit(
                f"{CGROUP_ROOT} does not exist: this machine has no cgroup v1 memory "
                "controller; run with --no-cgroup for a dry run"
            )
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        try:  # no swapping instead of reclaiming: the limit means DRAM
            (self.path / "memory.swappiness").write_text("0")
        except OSError:
            pass
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def add_self(self) -> None:
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def usage_max(self) -> int:
        try:
            return int((self.path / "memory.max_usage_in_bytes").read_text())
        except OSError:
            return 0

    def reset_max(self) -> None:
        try:
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        except OSError:
            pass

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # tasks still exiting
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def drop_caches(files: list[Path], root: bool) -> None:
    """Empty the page cache (root), else drop ``files``' pages (fadvise)."""
    os.sync()
    if root:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def expert_budget(
    store, limit: int, limit_arg: str, kv_bytes: int, ram_budget: str | None,
    extra: int = 0,
) -> int:  # fmt: skip
    """Bytes for the expert cache under a cgroup limit of ``limit`` bytes.

    ``--ram-budget`` when given, else what the limit leaves after the dense
    weights, ``kv_bytes`` of KV cache, ``extra`` bytes (a draft model) and
    :data:`OVERHEAD`. Exits with the figures when not one expert fits.
    """
    from mer_cli.units import format_size, parse_size

    dense = store.dense_bytes_total
    if ram_budget:
        budget = parse_size(ram_budget, what="--ram-budget")
    else:
        budget = limit - dense - kv_bytes - OVERHEAD
    budget -= extra
    if budget < store.extent_nbytes:
        sys.exit(
            f"--limit {limit_arg} leaves {format_size(max(budget, 0))} for experts "
            f"after the dense weights ({format_size(dense)}), the KV cache(s), "
            f"{format_size(extra)} of draft model and {format_size(OVERHEAD)} "
            f"overhead; one expert needs {format_size(store.extent_nbytes)}: raise "
            "--limit or pass --ram-budget"
        )
    return budget


def run_child(
    cfg: dict, cgroup: Cgroup | None, timeout: float, script: str = __file__
) -> dict:
    """Run ``script --child CFG`` (in ``cgroup``); the dict of its RESULT line."""
    cmd = [sys.executable, os.path.abspath(script), CHILD_FLAG, json.dumps(cfg)]
    if cgroup is not None:
        cgroup.reset_max()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=cgroup.add_self if cgroup is not None else None,
        )
    except subprocess.TimeoutExpired:
        return {"config": cfg["name"], "error": f"timed out after {timeout:g} s"}
    wall = time.perf_counter() - t0
    line = next(
        (x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None
    )
    if p.returncode != 0 or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory in the cgroup?)" if p.returncode < 0 else ""
        return {
            "config": cfg["name"],
            "error": f"exit {p.returncode} {why} " + " | ".join(tail),
        }
    out = json.loads(line[len("RESULT ") :])
    out["wall_s"] = round(wall, 3)
    if cgroup is not None:
        out["cgroup_max_usage_bytes"] = cgroup.usage_max()
    return out


def ceiling_fio(path: str, chunk: int, seconds: float) -> float | None:
    fio = shutil.which("fio")
    if not fio:
        return None
    chunk = min(chunk, os.path.getsize(path) // 4096 * 4096)
    cmd = [
        fio,
        "--name=ceiling",
        f"--filename={path}",
        "--readonly",
        "--rw=read",
        "--direct=1",
        f"--bs={chunk}",
        "--ioengine=libaio",
        "--iodepth=8",
        f"--runtime={seconds:g}",
        "--time_based",
        "--output-format=json",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        print(
            f"fio failed ({p.stderr.strip()[:200]}); using mer's reader",
            file=sys.stderr,
        )
        return None
    data = json.loads(p.stdout[p.stdout.index("{") :])
    return data["jobs"][0]["read"]["bw_bytes"] / 1e9


def ceiling_reader(path: str, chunk: int, seconds: float, depth: int = 8) -> float:
    """Sequential O_DIRECT reads of ``path`` with mer's reader, ``depth`` threads,
    ``chunk``-byte requests, wrapping around the file for ``seconds``."""
    from mer_cli.io import ExtentReader, SlabPool
    from mer_cli.io.reader import DEMAND

    size = os.path.getsize(path) // 4096 * 4096
    chunk = min(chunk, size) // 4096 * 4096
    slabs = SlabPool(chunk, 2 * depth)
    reader = ExtentReader([path], threads=depth, chunk_size=chunk)
    try:
        pending, off, n, i = [], 0, 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            while len(pending) < 2 * depth:
                if off + chunk > size:
                    off = 0
                req = reader.submit(
                    0, off, chunk, slabs.slabs[i % (2 * depth)], priority=DEMAND
                )
                pending.append(req)
                off, i = off + chunk, i + 1
            pending.pop(0).result()
            n += chunk
        for r in pending:
            r.result()
            n += chunk
        dt = time.perf_counter() - t0
    finally:
        reader.close()
        slabs.close()
    return n / dt / 1e9


def make_warm_store(quant: dict, tmp: Path) -> str:
    """A tiny store with the big one's encodings, for the JIT warm-up."""
    from mer_cli.quantize import quantize
    from mer_cli.synth import write_checkpoint

    ck = write_checkpoint("tiny-mixtral", tmp / "warm-ck")
    return str(
        quantize(
            ck,
            tmp / "warm.mer",
            experts=quant.get("experts", "q4"),
            dense=quant.get("dense", "q8"),
            progress=False,
        )
    )


def fmt(v, spec=".3f", unit="") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def main() -> None:
    from mer_cli.formats.store import Store
    from mer_cli.io.reader import DEFAULT_CHUNK, DEFAULT_THREADS
    from mer_cli.memory import available_memory
    from mer_cli.sources import largest_experts_file
    from mer_cli.units import format_size, parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="mer store to stream")
    ap.add_argument("--gguf", help="GGUF Q4_0 of the same model, for llama.cpp")
    ap.add_argument("--limit", default="4GiB", help="cgroup memory limit")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    ap.add_argument(
        "--prompt", default="The history of the Roman empire begins", help="prompt"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per config")
    ap.add_argument(
        "--ram-budget", help="expert slots [default: limit - dense - KV - 512MiB]"
    )
    ap.add_argument("--io-threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--chunk", default=str(DEFAULT_CHUNK), help="bytes per read")
    ap.add_argument("--threads", type=int, help="compute threads [default: all]")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval")
    ap.add_argument("--ceiling-seconds", type=float, default=10.0)
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="CONFIG",
        help="leave this configuration out (repeatable): stream, "
        "stream-noprefetch, mmap, llama.cpp, stream-KIND",
    )
    ap.add_argument(
        "--predictor",
        action="append",
        default=[],
        metavar="PRED",
        help="also stream with prefetches ranked by this predictor (repeatable)",
    )
    ap.add_argument(
        "--wrong-predictor",
        metavar="PRED",
        help="also stream with PRED's scores misdirected to other experts, with "
        "and without the throttle (stream-wrong, stream-wrong-free)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the streamed configurations this many times, rotated",
    )
    ap.add_argument(
        "--no-cgroup",
        action="store_true",
        help="dry run: no cgroup (and no drop_caches unless root)",
    )
    ap.add_argument("--no-resident", action="store_true", help="skip the resident run")
    ap.add_argument("--json", help="also write every result to this file")
    args = ap.parse_args()

    root = os.geteuid() == 0
    if not args.no_cgroup and not root:
        sys.exit(
            "benchmarks/stream.py needs root: it creates a cgroup v1 memory group "
            "and drops the page cache. Run it with sudo, or pass --no-cgroup for a "
            "dry run without the memory limit"
        )
    store = Store.open(args.store)
    pred_kinds = predictor_kinds(args.predictor, store)
    wrong = (
        predictor_kinds([args.wrong_predictor], store) if args.wrong_predictor else []
    )
    limit = parse_size(args.limit, what="--limit")
    chunk = parse_size(args.chunk, what="--chunk")
    cfg = store.model
    kv_bytes = 2 * cfg.num_layers * args.ctx * cfg.num_kv_heads * cfg.head_dim * 4
    dense = store.dense_bytes_total
    budget = expert_budget(store, limit, args.limit, kv_bytes, args.ram_budget)
    files = list(store.file_paths)
    experts_file = largest_experts_file(store)
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(
        f"store {args.store}: {format_size(store.expert_bytes_total)} of experts "
        f"({len(store.experts)} x {format_size(store.extent_nbytes)}), dense "
        f"{format_size(dense)}; limit {format_size(limit)}, budget "
        f"{format_size(budget)}, {args.tokens} tokens",
        flush=True,
    )

    cgroup = None
    ceil = None
    results: list[dict] = []
    drop_all = root and not args.no_cgroup  # a dry run only drops the store's pages
    tmp = Path(tempfile.mkdtemp(prefix="mer-stream-bench-"))
    try:
        warm = make_warm_store(store.quantization, tmp)
        base = {
            "store": str(args.store),
            "prompt": args.prompt,
            "tokens": args.tokens,
            "ctx": args.ctx,
            "threads": args.threads,
            "warm": warm,
            "io_threads": args.io_threads,
            "chunk": chunk,
            "ram_budget": budget,
            "switch_interval": args.switch_interval,
        }
        # the numba cache is filled once here, so children only load it
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), CHILD_FLAG,
             json.dumps({**base, "store": warm, "mode": "resident", "name": "jit",
                         "tokens": 2})],
            check=True, capture_output=True, timeout=args.timeout,
        )  # fmt: skip

        # 1. compute reference, outside the cgroup
        fits = store.expert_bytes_total + dense < 0.8 * available_memory()
        if not args.no_resident and fits:
            drop_caches(files, drop_all)
            results.append(
                run_child(
                    {**base, "mode": "resident", "name": "resident"}, None, args.timeout
                )
            )
        elif not args.no_resident:
            print("resident run skipped: the store does not fit in memory", flush=True)

        # 2. the drive's ceiling
        drop_caches(files, drop_all)
        # the virtio disk here is backed by a host file whose cache makes any one
        # figure noisy: take the better of fio and our reader, measured back to back
        ceil_fio = ceiling_fio(experts_file, chunk, args.ceiling_seconds)
        drop_caches(files, drop_all)
        ceil_mer = ceiling_reader(experts_file, chunk, args.ceiling_seconds)
        print(
            f"ceiling candidates: fio libaio QD8 {ceil_fio or float('nan'):.3f} GB/s, "
            f"mer reader 8 threads {ceil_mer:.3f} GB/s",
            flush=True,
        )
        if ceil_fio is not None and ceil_fio >= ceil_mer:
            ceil, ceil_from = ceil_fio, "fio libaio QD8"
        else:
            ceil, ceil_from = ceil_mer, "mer reader 8 threads"
        print(
            f"ceiling: {ceil:.3f} GB/s ({ceil_from}, {format_size(chunk)} reads)",
            flush=True,
        )

        if not args.no_cgroup:
            cgroup = Cgroup(f"mer-stream-bench-{os.getpid()}", limit)
        streamed = [
            {**base, "mode": "stream-noprefetch", "name": "stream-noprefetch"},
            {**base, "mode": "stream", "name": "stream"},
        ]
        for path, kind in pred_kinds:
            streamed.append(
                {**base, "mode": "stream-pred", "name": kind, "predictor": path}
            )
        for path, _ in wrong:
            for name, free in (("stream-wrong", False), ("stream-wrong-free", True)):
                streamed.append(
                    {**base, "mode": "stream-pred", "name": name, "predictor": path,
                     "wrong": True, "free": free}
                )  # fmt: skip
        others = [{**base, "mode": "mmap", "name": "mmap"}]
        if args.gguf:
            others.append(
                {**base, "mode": "llama", "name": "llama.cpp", "gguf": args.gguf}
            )
        names = {c["name"] for c in streamed + others}
        bad = sorted(set(args.skip) - names)
        if bad:
            sys.exit(f"--skip {bad[0]}: no such configuration; have {sorted(names)}")
        streamed = [c for c in streamed if c["name"] not in args.skip]
        others = [c for c in others if c["name"] not in args.skip]
        # rounds of the streamed configurations, rotated so that none always
        # runs first (the disk and the shared machine drift)
        runs = []
        for r in range(max(args.repeat, 1)):
            k = r % max(len(streamed), 1)
            runs += [{**c, "round": r} for c in streamed[k:] + streamed[:k]]
        for c in runs + others:
            drop_caches(files + ([Path(args.gguf)] if args.gguf else []), drop_all)
            tag = (
                f" (round {c['round'] + 1})" if args.repeat > 1 and "round" in c else ""
            )
            print(f"running {c['name']}{tag} ...", flush=True)
            res = run_child(c, cgroup, args.timeout)
            res["round"] = c.get("round", 0)
            results.append(res)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    report(results, ceil, args, budget)
    report_prefetch(results, store.extent_nbytes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def predictor_kinds(paths: list[str], store) -> list[tuple[str, str]]:
    """``(path, config name)`` per predictor: ``stream-KIND`` (numbered when
    two have the same kind); each is checked against ``store`` first."""
    from mer_cli.errors import MerError
    from mer_cli.predictors import load_predictor

    out: list[tuple[str, str]] = []
    for p in paths:
        try:
            kind = load_predictor(p, store).kind
        except MerError as e:
            sys.exit(f"--predictor: {e}")
        name = f"stream-{kind}"
        n = sum(1 for _, x in out if x.startswith(name))
        out.append((str(Path(p).resolve()), f"{name}-{n + 1}" if n else name))
    return out


def report_prefetch(results: list[dict], extent_nbytes: int) -> None:
    """The prefetch configurations against prefetch off (same round)."""
    rows = [r for r in results if r.get("config", "").startswith("stream")]
    if not rows:
        return
    off = {r["round"]: r for r in rows if r["config"] == "stream-noprefetch"}
    print()
    head = (
        f"{'config':18} {'round':>5} {'tok/s':>7} {'vs off':>6} {'GB/tok':>7} "
        f"{'hit':>5} {'issued':>6} {'probes':>6} {'skip b':>6} {'skip bw':>7} "
        f"{'precis':>6} {'used':>14} {'state':>5} {'hints run':>9} {'trial':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['config']:18} error: {r['error']}")
            continue
        io = r.get("io") or {}
        src = r.get("source") or {}
        th = src.get("prefetch_throttle") or {}
        n = r.get("decode_tokens") or 0
        gb_tok = io.get("decode_bytes_read", 0) / n / 1e9 if n else None
        base = off.get(r["round"], {}).get("decode_tok_s")
        tps = r.get("decode_tok_s")
        ratio = tps / base if tps and base else None
        used = ",".join(
            f"{k[:4]} {100 * v:.0f}%" for k, v in (th.get("hints_used") or {}).items()
        )
        on = src.get("prefetch_hints") != "off"
        gate = (th.get("hint_gates") or {}).get(src.get("prefetch_hints"), {})
        n_run = gate.get("hints_computed", 0)
        n_all = n_run + gate.get("hints_skipped", 0)
        run = f"{100 * n_run / n_all:.0f}%" if n_all else "-"
        tr = th.get("trial") or {}
        trial = "-"
        if on and tr.get("speedup") and r.get("config") != "stream-wrong-free":
            trial = f"{tr['verdict'][:4]} {tr['speedup']:.2f}"
        print(
            f"{r['config']:18} {r['round'] + 1:>5} {fmt(tps, '.3f'):>7} "
            f"{fmt(ratio, '.2f'):>6} {fmt(gb_tok, '.3f'):>7} "
            f"{fmt(io.get('hit_rate') and 100 * io['hit_rate'], '.0f', '%'):>5} "
            f"{src.get('prefetch_issued', 0):>6} {th.get('probes', 0) if on else '-':>6} "
            f"{th.get('skipped_benefit', 0) if on else '-':>6} "
            f"{th.get('skipped_bandwidth', 0) if on else '-':>7} "
            f"{fmt(th.get('live_precision') and 100 * th['live_precision'], '.0f', '%'):>6} "
            f"{used or '-':>14} {th.get('state', '-') if on else '-':>5} {run:>9} "
            f"{trial:>10}"
        )  # fmt: skip
    spread = [r.get("decode_tok_s") for r in off.values() if r.get("decode_tok_s")]
    if len(spread) > 1:
        lo, hi = min(spread), max(spread)
        print(
            f"prefetch off over {len(spread)} rounds: {lo:.3f}-{hi:.3f} tok/s "
            f"(spread {100 * (hi - lo) / hi:.0f}%: the noise)"
        )
    print(
        "vs off: decode tok/s / prefetch-off's in the same round; GB/tok: expert "
        f"bytes read per decode token ({extent_nbytes / 1e6:.1f} MB per expert); "
        "issued: prefetch reads (probes: of them, reads while the throttle was "
        "off); skip b / skip bw: candidates refused, benefit below cost / no "
        "spare bandwidth; precis: issued prefetches used; used: hinted experts "
        "used, per hint kind (prefill hints are router lookahead); hints run: "
        "decode hints computed (the rest skipped while computing them did not "
        "pay for itself, or in the trial's off windows); trial: its verdict "
        "(on, off, meas[uring]) and measured speed-up, token time off / on over "
        "its alternating windows"
    )


def report(results: list[dict], ceil: float | None, args, budget: int) -> None:
    by = {r["config"]: r for r in results if r.get("round", 0) == 0}
    ref = by.get("resident")
    # compute time per token: resident decode, else the streamed stall-free time
    compute = None
    compute_from = None
    if ref and ref.get("decode_tok_s"):
        compute, compute_from = (
            1 / ref["decode_tok_s"],
            "resident run outside the cgroup",
        )
    elif by.get("stream", {}).get("io"):
        s = by["stream"]
        if s.get("decode_tokens"):
            stall = s["io"]["decode_stall_s"]
            compute = (s["decode_s"] - stall) / s["decode_tokens"]
            compute_from = "stall-free time of the streamed run"
    print()
    head = (
        f"{'config':18} {'tok/s':>8} {'s/tok':>8} {'read GB/s':>9} {'wall GB/s':>9} "
        f"{'of ceil':>7} {'wall %':>7} {'stalled':>7} {'tok/max':>7} {'hit':>6} {'GB/tok':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        name = r["config"] + (f" #{r['round'] + 1}" if r.get("round") else "")
        if "error" in r:
            print(f"{name:18} error: {r['error']}")
            continue
        n = r.get("decode_tokens") or 0
        tps = r.get("decode_tok_s")
        spt = 1 / tps if tps else None
        io = r.get("io") or {}
        dec_bytes = io.get("decode_bytes_read", r.get("proc_read_bytes_decode", 0))
        gb_tok = dec_bytes / n / 1e9 if n else None
        read_gbps = io.get("decode_read_gbps")
        wall_gbps = dec_bytes / r["decode_s"] / 1e9 if r.get("decode_s") else None
        share = read_gbps / ceil if ceil and read_gbps else None
        wall_share = wall_gbps / ceil if ceil and wall_gbps else None
        io_time = gb_tok / ceil if ceil and gb_tok is not None else None
        bound = max(x for x in (io_time, compute, 0.0) if x is not None)
        ratio = spt / bound if spt and bound else None
        print(
            f"{name:18} {fmt(tps, '.3f'):>8} {fmt(spt, '.3f'):>8} "
            f"{fmt(read_gbps):>9} {fmt(wall_gbps):>9} "
            f"{fmt(share and 100 * share, '.1f', '%'):>7} "
            f"{fmt(wall_share and 100 * wall_share, '.1f', '%'):>7} "
            f"{fmt(io.get('decode_stall_share') and 100 * io['decode_stall_share'], '.1f', '%'):>7} "
            f"{fmt(ratio, '.2f'):>7} {fmt(io.get('hit_rate') and 100 * io['hit_rate'], '.0f', '%'):>6} "
            f"{fmt(gb_tok, '.3f'):>7}"
        )  # fmt: skip
    print()
    print(
        f"ceiling {fmt(ceil)} GB/s; compute {fmt(compute, '.4f')} s/token ({compute_from})"
    )
    print(
        "read GB/s: decode bytes / time reads were in flight (mer only); wall GB/s: "
        "decode bytes (mer's reads, else /proc/self/io read_bytes) / decode time; "
        "of ceil, wall %: those / ceiling; stalled: decode time waiting for reads; "
        "tok/max: token time / max(bytes per token / ceiling, compute per token)"
    )
    ours = by.get("stream", {}).get("decode_tok_s")
    for other in ("llama.cpp", "mmap", "stream-noprefetch"):
        theirs = by.get(other, {}).get("decode_tok_s")
        if ours and theirs:
            print(f"stream / {other}: {ours / theirs:.2f}x decode tok/s")
    texts = {r["config"]: r.get("text") for r in results if r.get("text") is not None}
    if len(set(texts.values())) > 1:
        print("WARNING: mer configurations produced different text:", texts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        child_main(sys.argv[2])
    else:
        main()
