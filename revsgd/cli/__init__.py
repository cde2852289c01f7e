"""The ``revsgd`` command: ``demo``, ``bench`` and ``verify`` (``revsgd --version``, ``revsgd CMD --help``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from .._argtypes import positive_float as _positive_float, positive_int as _positive_int


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option whose default is a value; options whose default is computed at
    run time (None) say so in their own help text."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse.BooleanOptionalAction):
            return action.help
        return super()._get_help_string(action)


def want_progress(flag: Optional[bool]) -> bool:
    """``--progress`` / ``--no-progress`` if given, else on exactly when stderr is a terminal."""
    if flag is not None:
        return flag
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{what} (default: on when stderr is a terminal, off otherwise)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revsgd", description="Exact hypergradients through long momentum-SGD runs "
                                "by reversible fixed-point learning.", formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench,verify}")
    sub.required = True

    d = sub.add_parser("demo", help="learn per-layer lr and momentum schedules on scikit-learn's digits (~2 min)",
                       description="Meta-learn per-layer learning-rate and momentum schedules of a 64-100-10 MLP on "
                       "scikit-learn's digits with exact hypergradients; writes OUT/demo.png and OUT/demo.json.",
                       formatter_class=_Formatter)
    d.add_argument("--out", default=".", metavar="DIR", help="folder for demo.png and demo.json (created if missing)")
    d.add_argument("--steps", type=_positive_int, default=1000, help="training steps T per run")
    d.add_argument("--iterations", type=_positive_int, default=60, help="meta-iterations")
    d.add_argument("--knots", type=_positive_int, default=10, help="schedule knots per layer")
    d.add_argument("--meta-lr", type=_positive_float, default=0.08, help="Adam step on the free hypers")
    d.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads pinned for each hypergradient (default: torch's current count)")
    d.add_argument("--checkpoint", default=None,
                   help="checkpoint file: resume from it, update it every iteration (default: none)")
    _progress_option(d, "progress bar")

    b = sub.add_parser("bench", help="compare hypergradient methods (and installed peers) on a problem "
                       "(digits: a minute or two)",
                       description="Time, memory and agreement with exact of every hypergradient method (and of "
                       "torchopt / higher where installed), each (method, T) in a fresh process; writes "
                       "OUT/bench_unroll.json and OUT/bench_unroll.png and prints the table. The full protocol: "
                       "revsgd/bench/unroll.py.", formatter_class=_Formatter)
    from ..bench.unroll import ALL_METHODS, PROBLEM_NAMES
    b.add_argument("--problem", nargs="+", choices=PROBLEM_NAMES, default=["digits"], metavar="PROBLEM",
                   help="one or more of: digits (64-100-10 MLP, 7,510 params), mlp1m (784-1024-256-10 MLP, "
                        "1,068,810 params), cnn1m (CNN, 962,926 params)")
    b.add_argument("--steps", type=_positive_int, nargs="+", default=[100, 1000], metavar="T",
                   help="values of T (training steps)")
    b.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS), metavar="METHOD",
                   help=f"one or more of: {', '.join(ALL_METHODS)} (torchopt and higher are skipped with a note "
                        "where not installed)")
    b.add_argument("--threads", type=_positive_int, default=1, help="torch and kernel threads in every run")
    b.add_argument("--out", default=".", metavar="DIR",
                   help="folder for bench_unroll.json and bench_unroll.png (created if missing)")
    _progress_option(b, "live line for the running method")

    sub.add_parser("verify", help="self-test of exact reversal on this machine; exits non-zero on failure",
                   formatter_class=_Formatter)
    return p


def _out_dir(parser: argparse.ArgumentParser, cmd: str, path: str) -> str:
    """``--out`` is a folder: refuse an existing file, create the folder otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.exit(2, f"revsgd {cmd}: error: --out {path!r} is a file; --out names a folder\n")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.exit(2, f"revsgd {cmd}: error: cannot create --out folder {path!r}: {e}\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        if args.knots > args.steps:
            print(f"revsgd demo: error: --knots ({args.knots}) must not exceed --steps ({args.steps})",
                  file=sys.stderr)
            return 2
        out = _out_dir(parser, "demo", args.out)
        run_demo(out, T=args.steps, iterations=args.iterations, knots=args.knots, meta_lr=args.meta_lr,
                 threads=args.threads, checkpoint=args.checkpoint, progress=want_progress(args.progress))
        return 0
    if args.command == "bench":
        from ..bench.unroll import main as bench_main
        out = _out_dir(parser, "bench", args.out)
        return bench_main(["--problem", *args.problem, "--steps", *map(str, args.steps), "--methods", *args.methods,
                           "--exact-extra", "--threads", str(args.threads),
                           "--out", os.path.join(out, "bench_unroll.json"),
                           "--png", os.path.join(out, "bench_unroll.png"),
                           "--progress" if want_progress(args.progress) else "--no-progress"])
    from .verify import main as verify_main
    return verify_main()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
