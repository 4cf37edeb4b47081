"""Write a store that computes the built-in model at Mixtral-8x7B expert shapes.

Usage::

    python benchmarks/widen.py -o wide.mer                       # D=4096, F=14336
    python benchmarks/widen.py --model tiny.mer --hidden 512 --ffn 1024 -o w.mer
    python benchmarks/widen.py --predictor b.pred.npz --store wide.mer -o w.pred.npz

The built-in trained model (6 layers, 16 experts, top-2) zero-padded to model
width ``--hidden`` and expert width ``--ffn`` (see :mod:`mer_cli.widen`): its
experts are 99 MB q4 extents like Mixtral-8x7B's, 9.5 GB in all, so a streamed
run under a memory limit is read-bound, while its routing and its text are the
trained model's (random-weight stores at these shapes route without the
structure a predictor learns and never copy their prompt). Benchmarks of
prefetch predictors and speculative decoding run on it. ``--predictor`` pads a
predictor fitted on the source's traces for the widened store (same routing).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="builtin", help="source store (default: builtin)"
    )
    ap.add_argument("--hidden", type=int, default=4096, help="model width D'")
    ap.add_argument("--ffn", type=int, default=14336, help="expert width F'")
    ap.add_argument("-o", "--output", required=True, help="store to write")
    ap.add_argument("--force", action="store_true", help="replace the output")
    ap.add_argument("--predictor", help="widen this predictor file instead")
    ap.add_argument("--store", help="with --predictor: the widened store")
    args = ap.parse_args(argv)
    if args.predictor and not args.store:
        ap.error("--predictor needs --store (the widened store it will serve)")

    from mer_cli import builtin
    from mer_cli.errors import MerError
    from mer_cli.formats.store import Store
    from mer_cli.units import format_size
    from mer_cli.widen import widen_predictor, widen_store

    if args.predictor:
        try:
            out = widen_predictor(args.predictor, args.output, args.store)
        except MerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{out}: {args.predictor} for {args.store}")
        return 0
    try:
        src = builtin.resolve(args.model)
        t0 = time.perf_counter()
        out = widen_store(src, args.output, hidden=args.hidden, ffn=args.ffn,
                          force=args.force)  # fmt: skip
        s = Store.open(out)
    except MerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = s.model
    print(
        f"{out}: D={m.hidden_size}, {m.num_experts} experts x F={m.expert_ffn}, "
        f"{m.num_layers} layers; {len(s.experts)} extents x "
        f"{format_size(s.extent_nbytes)} = {format_size(s.expert_bytes_total)} "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
