#!/usr/bin/env python
"""The exact hypergradient under load: does the DEFAULT thread count survive one busy process beside it?

Measures ``revsgd.hypergrad(..., optimizer="heavyball", method="exact")`` on the digits benchmark problem
(``revsgd.problems.digits_mlp()``, lr 0.2, momentum 0.9, T = 1000 by default) in four settings:

- (a) ``quiet_threads1``: ``threads=1``, nothing else running;
- (d) ``quiet_default``: ``threads`` NOT passed, nothing else running;
- (b) ``load_default``: ``threads`` NOT passed while one CPU-bound process runs beside it;
- (c) ``load_threads2``: ``threads=2`` under the same load.

"Not passed" is measured as a user gets it: the child removes the thread environment variables
(OMP_NUM_THREADS, ...), pins nothing itself (torch keeps its own default, the machine's core count, until the call)
and calls ``hypergrad`` without ``threads``, so revsgd's default applies — ``threads=None`` pins torch to 1 thread
for the call, and the compiled kernels use their default of 1. Each record keeps the count the call actually
pinned (``threads_used``, from ``result.stats``), torch's count in the child before the call and the kernels'
count; the summary checks that the default used 1 thread (``default_threads_used``).

Each measurement is a fresh child process (the protocol of ``revsgd/bench/unroll.py``: setup and torch's one-off
warm-ups untimed, then the ``hypergrad`` call timed). Every repeat runs (a) and (d) with no load (their order
alternates between repeats), then starts the load (``--load python``: a pure-Python ``while True: pass``, exactly
one busy thread; ``--load matmul``: a 256×256 float64 matmul loop on one torch thread), runs (b) and (c) (their
order alternates too), and stops the load. The load's CPU seconds during each run are recorded (how much it
actually competed), and for every run the CPU other processes used (the machine's busy time from /proc/stat minus
the measured child's, the load's and this process's). On a shared machine, ``--quiet-wait-s`` waits before each
quiet run and each load phase until other processes use < 0.25 core (what was waited and seen is recorded).

Prints one JSON document (also written to ``--out``): every run, per setting the times (median, best) and the
ratios (b)/(a), (c)/(a) and (d)/(a) of medians and of bests. The project's target is (b)/(a) <= 1.5; this script
only measures, it changes no default.

    python scripts/bench_threads.py                      # 3 repeats, ~1-2 min on 2 cores (T = 1000)
    python scripts/bench_threads.py --repeats 5 --load matmul --out /tmp/threads.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from revsgd.bench.timing import (BusyLoad, CpuMeter, cpu_seconds_children, cpu_seconds_self, emit_json, machine,
                                 versions, wait_for_quiet)
from revsgd.bench.unroll import run_child

SETTINGS = {"quiet_threads1": (1, False), "quiet_default": (None, False), "load_default": (None, True),
            "load_threads2": (2, True)}


def measure(name: str, T: int, tmpdir: str, rep: int, load: BusyLoad | None, timeout: float) -> dict:
    threads, _ = SETTINGS[name]
    meter = CpuMeter()
    c0, s0, l0, t0 = cpu_seconds_children(), cpu_seconds_self(), load.cpu_seconds() if load else 0.0, time.perf_counter()
    r = run_child("exact", T, tmpdir, timeout, 12.0, rep=rep, problem="digits", threads=threads)
    wall = time.perf_counter() - t0
    busy = meter.busy_cores()
    child_cpu = cpu_seconds_children() - c0          # the measured child has been waited for: counted here
    rec = {"setting": name, "repeat": rep, "threads_passed": threads, "status": r.get("status"),
           "seconds": r.get("seconds"), "seconds_forward": r.get("seconds_forward"),
           "seconds_reverse": r.get("seconds_reverse"), "child_wall_s": wall,
           "torch_threads_before_call": r.get("torch_threads"), "kernel_threads": r.get("kernel_threads"),
           "threads_used": (r.get("stats") or {}).get("threads"),
           "kernel_backend": (r.get("stats") or {}).get("backend"), "peak_rss_mb": r.get("peak_rss_mb"),
           "child_cpu_s": child_cpu}
    if load is not None:
        rec["load_cpu_s"] = load.cpu_seconds() - l0
        rec["load_cores"] = rec["load_cpu_s"] / wall
    if busy is not None:
        other = busy * wall - child_cpu - (cpu_seconds_self() - s0) - rec.get("load_cpu_s", 0.0)
        rec["other_processes_cores"] = max(0.0, other / wall)
    if r.get("status") != "ok":
        rec["error"] = str(r.get("error", ""))[-1000:]
    return rec


def summarize(runs: list) -> dict:
    out: dict = {}
    for name in SETTINGS:
        mine = [r for r in runs if r["setting"] == name]
        ts = [r["seconds"] for r in mine if r["status"] == "ok"]
        lc = [r["load_cores"] for r in mine if "load_cores" in r]
        out[name] = {"times_s": ts, "median_s": statistics.median(ts) if ts else None,
                     "best_s": min(ts) if ts else None,
                     "threads_used": sorted({r["threads_used"] for r in mine if r.get("threads_used") is not None}),
                     "load_cores_mean": statistics.mean(lc) if lc else None}
    a = out["quiet_threads1"]
    for name, key in (("load_default", "b_over_a"), ("load_threads2", "c_over_a"), ("quiet_default", "d_over_a")):
        x = out[name]
        out[key] = {"median": x["median_s"] / a["median_s"] if x["median_s"] and a["median_s"] else None,
                    "best": x["best_s"] / a["best_s"] if x["best_s"] and a["best_s"] else None}
    out["b_over_a"]["target"] = "<= 1.5"
    used = sorted({r["threads_used"] for r in runs if r["threads_passed"] is None and r.get("threads_used")})
    out["default_threads_used"] = used
    out["default_is_one_thread"] = used == [1]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="T, training steps of the hypergradient")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per setting")
    ap.add_argument("--load", choices=("python", "matmul"), default="python", help="the busy process")
    ap.add_argument("--load-procs", type=int, default=1, help="busy processes started beside (b) and (c)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0,
                    help="before each quiet run and each load phase, wait up to this long for other processes to "
                         "use < 0.25 core (recorded per run)")
    ap.add_argument("--out", default="bench_threads.json", help="JSON output file")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.repeats < 1 or a.load_procs < 1 or a.timeout <= 0:
        ap.error("--steps, --repeats, --load-procs and --timeout must be positive")
    tmpdir = tempfile.mkdtemp(prefix="bench_threads_")
    quiet = CpuMeter()
    time.sleep(1.0)
    doc = {"benchmark": "bench_threads", "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "problem": "revsgd.problems.digits_mlp(), heavyball, lr 0.2, momentum 0.9, method exact", "T": a.steps,
           "settings": {k: {"threads": t, "load": ld} for k, (t, ld) in SETTINGS.items()},
           "load": {"kind": a.load, "processes": a.load_procs}, "machine": machine(), "versions": versions(),
           "other_processes_cores_before": quiet.other_cores(), "runs": []}
    t_all = time.perf_counter()
    try:
        for rep in range(a.repeats):
            for name in ["quiet_threads1", "quiet_default"][::(1 if rep % 2 == 0 else -1)]:
                q = wait_for_quiet(a.quiet_wait_s)
                doc["runs"].append(measure(name, a.steps, tmpdir, rep, None, a.timeout))
                doc["runs"][-1]["quiet_wait"] = q
            q = wait_for_quiet(a.quiet_wait_s)
            with BusyLoad(a.load, a.load_procs) as load:
                order = ["load_default", "load_threads2"][::(1 if rep % 2 == 0 else -1)]
                for name in order:
                    doc["runs"].append(measure(name, a.steps, tmpdir, rep, load, a.timeout))
                    doc["runs"][-1]["quiet_wait_before_load"] = q
            for r in doc["runs"][-4:]:
                oth = r.get("other_processes_cores")
                print(f"[{rep + 1}/{a.repeats}] {r['setting']:15s} threads_used={r.get('threads_used')} "
                      f"{r['status']} {r['seconds'] if r['seconds'] is None else round(r['seconds'], 2)} s"
                      + (f" (load {r['load_cores']:.2f} cores)" if "load_cores" in r else "")
                      + (f" (other processes {oth:.2f} cores)" if oth is not None else ""), file=sys.stderr)
    finally:
        for fn in os.listdir(tmpdir):
            os.remove(os.path.join(tmpdir, fn))
        os.rmdir(tmpdir)
    doc["summary"] = sm = summarize(doc["runs"])
    fmt = lambda v: "?" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"(b)/(a) load_default / quiet_threads1: median {fmt(sm['b_over_a']['median'])}, best "
          f"{fmt(sm['b_over_a']['best'])} (target <= 1.5); (c)/(a) threads=2 under load: median "
          f"{fmt(sm['c_over_a']['median'])}; (d)/(a) quiet default / threads=1: median "
          f"{fmt(sm['d_over_a']['median'])}; threads the default used: {sm['default_threads_used']}", file=sys.stderr)
    doc["total_seconds"] = time.perf_counter() - t_all
    emit_json(doc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
