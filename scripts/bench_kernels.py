#!/usr/bin/env python
"""Throughput of the exact-arithmetic kernels, flat in the number of steps T (docs/design.md §3).

Element-steps per second (lanes × steps / seconds) of ``Tape.shift`` / ``Tape.unshift`` over a real γ = 0.9
schedule (and for steps shifting by 1 and by 0 bits), the fused ``ExactMomentum.step`` and ``unstep_position`` +
``unstep_velocity``, for every backend × lane count × depth T, next to NumPy ``a += b`` on int64 arrays of the same
length, an arbitrary-precision-integer store (the 2015 approach) and the tape's information limit and byte bound.
The protocol (preloading the tape to depth T − k, timing k steps, unwinding, contention retries, allocator
settling) is in the docstring of ``revsgd/bench/kernels.py``, which holds the measurement code; this script only
sets the run up. Prints the JSON document to stdout (and writes it to ``--out``) and a compact table to stderr.

Examples::

    python scripts/bench_kernels.py                     # full default run: ~25-35 min on 2 idle cores (estimated;
                                                        # NumPy and torch at 1e7 lanes x T = 10 000 dominate)
    python scripts/bench_kernels.py --budget-s 120      # the same without those two cells (skipped): ~6-8 min
    python scripts/bench_kernels.py --quick             # smoke run, < 1 min
    python scripts/bench_kernels.py --backends cpp --lanes 1e6 --steps 100,1000 --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import os
import sys

import revsgd
from revsgd.bench.kernels import parse_int_list, run_benchmark
from revsgd.bench.timing import ContentionPolicy, RepeatPolicy, emit_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None, help="comma-separated (default: all of revsgd.BACKENDS)")
    ap.add_argument("--lanes", default=None, help="comma-separated lane counts (default 1e5,1e7)")
    ap.add_argument("--steps", default=None, help="comma-separated depths T (default 100,10000)")
    ap.add_argument("--timed-steps", type=int, default=None, help="k steps timed at depth T (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many repeats of each timed segment")
    ap.add_argument("--repeat-budget-s", type=float, default=None,
                    help="extra repeats (to reproduce the best time within 10%%) stop once a timed pair of "
                         "segments has used this long (default 5 s; 0.5 s with --quick)")
    ap.add_argument("--contention-retries", type=int, default=None,
                    help="times a cell's timed block is run again (after 5 s) when other processes kept more than "
                         "0.25 core busy while it ran and the block took <= 20 s (default 2; 0 with --quick)")
    ap.add_argument("--gamma", type=float, default=0.9, help="momentum γ, used as given (default 0.9)")
    ap.add_argument("--preload", choices=("auto", "real", "packed"), default="auto",
                    help="history that fills the tape to depth T - k (default auto: real if it fits --budget-s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="max estimated preload+unwind seconds per cell, both phases (default 600; 8 with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernel (and torch) threads (default 2 if available; 1 with --quick: on a shared machine "
                         "two threads stall ~8 ms per call whenever another process holds a core)")
    ap.add_argument("--bigint-lanes", type=int, default=None, help="lanes of the bigint baseline (default 1e5)")
    ap.add_argument("--bigint-depths", default=None, help="emulated depths of the bigint store (default 1000,10000)")
    ap.add_argument("--bigint-steps", type=int, default=None, help="steps timed for the bigint baseline (default 3)")
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the real-vs-packed preload cross-check")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: lanes 1e5,1e6, T 100,1000, k=10, 1 thread, budget 8 s, repeat budget 0.5 s, "
                         "no contention retries, small bigint")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run all backends in this process (default: a fresh process per backend)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_kernels.json")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    q = args.quick
    lanes = parse_int_list(args.lanes) if args.lanes else ([10**5, 10**6] if q else [10**5, 10**7])
    steps = sorted(parse_int_list(args.steps) if args.steps else ([100, 1000] if q else [100, 10000]))
    k = args.timed_steps if args.timed_steps is not None else (10 if q else 20)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else list(revsgd.BACKENDS)
    for b in backends:
        if b not in revsgd.BACKENDS:
            ap.error(f"backend {b!r} not available; available: {revsgd.BACKENDS}")
    if not lanes or not steps or min(lanes) < 1 or min(steps) < 1 or k < 1 or args.repeats < 1:
        ap.error("lanes, steps, --timed-steps and --repeats must be positive")
    if not 2.0 ** -15 <= args.gamma < 1.0:
        ap.error(f"--gamma must lie in [2^-15, 1), got {args.gamma}")
    retries = args.contention_retries if args.contention_retries is not None else (0 if q else 2)
    doc = run_benchmark(
        backends=backends, lanes=lanes, steps=steps, k=k, repeats=args.repeats, gamma=args.gamma,
        preload=args.preload, budget_s=args.budget_s if args.budget_s is not None else (8.0 if q else 600.0),
        threads=args.threads if args.threads is not None else (1 if q else min(2, os.cpu_count() or 1)),
        seed=args.seed, quick=q,
        repeat_budget_s=(args.repeat_budget_s if args.repeat_budget_s is not None
                         else (0.5 if q else RepeatPolicy().budget_s)),
        contention=ContentionPolicy(retries=retries), isolate=not args.no_isolate,
        crosscheck=not args.no_crosscheck and args.preload == "auto",
        big_lanes=args.bigint_lanes if args.bigint_lanes is not None else (2 * 10**4 if q else 10**5),
        big_depths=parse_int_list(args.bigint_depths) if args.bigint_depths else ([1000] if q else [1000, 10000]),
        big_k=args.bigint_steps if args.bigint_steps is not None else (2 if q else 3),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    emit_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
