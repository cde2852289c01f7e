"""The ``revsgd`` command: ``demo``, ``bench`` and ``verify``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revsgd", description="Exact hypergradients through long momentum-SGD runs "
                                "by reversible fixed-point learning.")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench,verify}")
    sub.required = True
    d = sub.add_parser("demo", help="learn per-layer lr and momentum schedules on scikit-learn's digits (~2 min)")
    d.add_argument("--out", default=".", help="folder for demo.png and demo.json (default: current directory)")
    d.add_argument("--steps", type=_positive_int, default=1000, help="training steps T per run (default 1000)")
    d.add_argument("--iterations", type=_positive_int, default=60, help="meta-iterations (default 60)")
    d.add_argument("--knots", type=_positive_int, default=10, help="schedule knots per layer (default 10)")
    d.add_argument("--meta-lr", type=_positive_float, default=0.08, help="Adam step on the free hypers")
    d.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--checkpoint", default=None, help="checkpoint file: resume from it, update it every iteration")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = sub.add_parser("bench", help="compare hypergradient methods on the digits MLP (a minute or two)")
    b.add_argument("--steps", type=_positive_int, nargs="+", default=[100, 1000], help="values of T")
    b.add_argument("--out", default="bench_unroll.json", help="JSON output (default bench_unroll.json)")
    b.add_argument("--png", default="bench_unroll.png", help="figure output (default bench_unroll.png)")
    sub.add_parser("verify", help="self-test of exact reversal on this machine; exits non-zero on failure")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        if args.knots > args.steps:
            print(f"revsgd demo: error: --knots ({args.knots}) must not exceed --steps ({args.steps})",
                  file=sys.stderr)
            return 2
        run_demo(args.out, T=args.steps, iterations=args.iterations, knots=args.knots, meta_lr=args.meta_lr,
                 threads=args.threads, checkpoint=args.checkpoint, progress=not args.no_progress)
        return 0
    if args.command == "bench":
        from ..bench.unroll import main as bench_main
        return bench_main(["--steps", *map(str, args.steps), "--exact-extra", "--out", args.out, "--png", args.png])
    from .verify import main as verify_main
    return verify_main()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
