"""`otprune bench selection`: time the selection methods against the cost floor."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Benchmark the selection methods",
        description=(
            "Time every selection method on random features and compare OTPrune with its cost floor, "
            "one Xn @ Xn.T product (N x N x D), measured in the same process (ratios from paired runs). "
            "Also compares a batch of B images in one call with B single calls (per-sample time)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("what", choices=["selection"], help="what to benchmark")
    parser.add_argument("--sizes", default="576,1152,2880", help="token counts N, comma-separated")
    parser.add_argument("--dim", type=int, default=4096, help="feature dimension D (4096 = LLaVA-7B)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept ratio")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the batched-vs-single comparison")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.set_defaults(run=run)


def run(args) -> int:
    import sys

    from otprune import METHODS, bench

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes={args.sizes!r}: must be comma-separated integers, e.g. 576,1152,2880") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes={args.sizes!r}: every N must be >= 1")
    if args.repeats < 1 or args.batch < 1 or args.dim < 1:
        raise ValueError("--repeats, --batch and --dim must be >= 1")
    methods = None
    if args.methods:
        methods = [METHODS.canonical(m) for m in args.methods.split(",")]
        if "otprune" not in methods:
            methods.insert(0, "otprune")
    rows = bench.run(
        sizes, args.dim, args.ratio, methods, args.repeats, args.batch, args.device,
        progress=lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True),
    )
    print(bench.format_table(rows, args.dim, args.ratio, args.device))
    return 0
