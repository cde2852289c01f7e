#!/usr/bin/env python
"""Throughput of the exact-arithmetic kernels, flat in the number of steps T (DESIGN.md §3).

One run prints a JSON document to stdout (and writes it to ``--out``) and a compact table to stderr. It measures,
for every backend in ``revsgd.BACKENDS`` (or ``--backends``), every lane count (``--lanes``, default 1e5 and 1e7)
and every depth (``--steps``, default T = 100 and 10 000), in element-steps per second (lanes × steps / seconds):

- ``scale``   ``Tape.scale(X, n)``
- ``unscale`` ``Tape.unscale(X, n)``
- ``step``    ``ExactMomentum.step(grad, alpha, n)`` (fused: exact scale, velocity update, position update)
- ``unstep``  ``ExactMomentum.unstep_position(alpha)`` + ``unstep_velocity(grad, n)``, counted as ONE step

with γ = 0.9 quantised to n = 58982 (``--gamma``), and puts them next to the same run's NumPy ``a += b`` rate on
int64 arrays of the same length, next to an arbitrary-precision-integer store (one Python int per lane, the 2015
hypergrad approach), and next to the information limit and the byte bound of the tape.

Protocol ("rate at depth T")
----------------------------
Doing T full steps per cell is too slow at 1e7 lanes and T = 10 000 (1e11 element-steps per operation), so each
cell (backend, lanes L, depth T) does this, on ONE tape:

1. *Preload* the tape of an ``ExactMomentum`` with a history of depth T − k (k = ``--timed-steps``, default 20) by
   calling ``tape.scale(P, ·)`` on a separate int64 array P. Two ways, chosen per cell (``--preload``):

   - ``real``: T − k scales with the benchmark's n: exactly the tape a run of T − k steps leaves behind.
   - ``bits``: ceil((T − k)·(−log2(n/65536))/16) scales with n = 1, each of which stores exactly 16 bits per
     lane, i.e. the same information, the same words per stream and the same bytes as the real history
     (±1 word per lane), at ~1/100 of the steps. The kernels' state is heads + word streams (+ a depth counter
     they never read), so a step cannot tell the two histories apart; the run cross-checks this where both fit
     (``preload_crosscheck``). (The NumPy reference groups emitted/popped words per chunk with a loop whose cost
     is words × chunks, so for it an n = 1 step costs ~10x a γ step at 1e7 lanes and the 1e7 × 10 000 cell is
     usually over budget and skipped.)
   - ``auto`` (default): ``real`` if its estimated preload + unwind time fits ``--budget-s`` (estimated from
     rates measured on the same backend and lane count), else ``bits``; if even that does not fit, the cell is
     skipped and recorded with the reason.

2. *Time* k steps at that depth, taking the best of ``--repeats`` (default 3) repeats: k ``scale`` of a
   velocity-like X (depth T − k → T), then k ``unscale`` (back to T − k, X checked bit-identical), then k fused
   ``step`` of the momentum optimiser on the same tape, then k ``unstep``. Only these loops are timed
   (``time.perf_counter``); the tape's information and allocated bytes are read at depth T. Short segments get
   extra repeats until their best time is reproduced within 10 % (at most 15 repeats / ``--repeat-budget-s``).
   Stream growth (reallocation by ~3 % at a time) is paid by whichever repeat crosses a capacity, so the best
   repeat shows the steady-state kernel cost; the amortised growth cost is inside the preload rate.

3. *Unwind* the preload (T − k unscales of P) and assert ``tape.at_start()`` and that X, P, W and V are back to
   their start bit for bit. Nothing reported comes from a run that failed to reverse.

"Flat in T" means the rate at T = 10 000 equals the rate at T = 100 (``flatness``: rate(T_max)/rate(T_min)).

Allocator: every process first fixes glibc's malloc thresholds (``settle_allocator``: mmap only blocks >= 32 MB,
keep up to 1 GB of freed heap). With the dynamic defaults the NumPy reference page-faulted its 1-8 MB per-call
temporaries afresh on every call at 1e5-1e6 lanes until some live buffer happened to pin the heap top, which
looked like a (false) 2-3x depth dependence.

Isolation and contention: each backend runs in a fresh process (``--no-isolate`` to switch off), as a user runs
one backend; the numba and C++ kernels share one libgomp, and after numba had run, the C++ kernel was seen to
stall ~8 ms per call under contention where it had not before. Each cell records ``other_processes_cores``:
the cores other processes kept busy while it was timed (/proc/stat minus this process). With 2 kernel threads
on 2 cores, another busy process costs a 2-thread fork-join about one scheduler slice (~8 ms) per call, which
dominates at 1e5 lanes; read such cells with that in mind (the summary lists them as ``contended_cells``).
Such a cell's timed block (not its preload) is run again after 5 s, up to ``--contention-retries`` times
(default 2) if a block takes <= 20 s; all repeats of all attempts count towards the best time and each
attempt's contention is kept in ``attempts``.

Values: X, P are fix(N(0, 0.01²)) at F = 52 and the gradient is N(0, 0.01²) so the velocity stays of that size,
as in training. The compiled kernels divide |v| < 2^50 on a faster path; ``value_range`` reports scale/unscale on
full-range int64 X (|X| ~ 2^62, the slow path) at the largest lane count for comparison.

Bigint baseline: one Python int per lane holding the lost bits (hypergrad's BitStore, Maclaurin et al. 2015):
scale with n: r = X mod 2^16, X //= 2^16; store = store·2^16 + r; s = store mod n, store //= n; X = X·n + s.
unscale is the inverse with divmod. Its store is initialised to a random integer of the bit length that
``--bigint-depths`` steps at γ leave (≈152 bits at T = 1000), which is what the preload would produce, then a few
steps are timed on ``--bigint-lanes`` lanes. Two forms: a plain Python list of ints with a per-lane loop (the
primary number), and a NumPy object array with the whole-array ops the original exact_rep.py used.

Examples::

    python scripts/bench_kernels.py                     # full default run (~5-6 min on 2 idle cores)
    python scripts/bench_kernels.py --quick             # smoke run, < 1 min
    python scripts/bench_kernels.py --backends cpp --lanes 1e6 --steps 100,1000 --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

import revsgd

FRAC_BITS = revsgd.DEFAULT_FRAC_BITS
WORD_BITS = 16
OPS = ("scale", "unscale", "step", "unstep")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def bits_per_step(n: int) -> float:
    return -math.log2(n / 65536.0)


# ---------------------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------------------
#: Short segments are noisy (one preemption on a shared 2-core machine ruins a 1 ms segment). A timed pair of
#: segments (e.g. k scales then k unscales) is repeated at least ``--repeats`` times, then further while the best
#: time of either segment has not been reproduced within AGREE by a second repeat, up to MAX_REPEATS repeats or
#: until the pair has used REPEAT_BUDGET_S seconds. The best (shortest) repeat is reported.
AGREE = 0.10
MAX_REPEATS = 15
REPEAT_BUDGET_S = 5.0
_REPEAT_BUDGET = [REPEAT_BUDGET_S]   # set from --repeat-budget-s (also inside backend processes)
#: A cell timed while other processes kept more than ``threshold`` cores busy has its timed block (not the preload)
#: run again after ``wait_s``, up to ``retries`` times, if one block takes at most ``max_block_s``; every repeat
#: of every attempt counts towards the best time, and each attempt's contention is recorded.
_CONTENTION = [{"retries": 2, "threshold": 0.25, "wait_s": 5.0, "max_block_s": 20.0}]


def _loadavg():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _reproduced(ts: list) -> bool:
    s = sorted(ts)
    return len(s) < 1 or (len(s) >= 2 and s[1] <= s[0] * (1 + AGREE))


def _more(rep: int, repeats: int, ta: list, tb: list) -> bool:
    if rep < repeats:
        return True
    if rep >= MAX_REPEATS or sum(ta) + sum(tb) >= _REPEAT_BUDGET[0]:
        return False
    return not (_reproduced(ta) and _reproduced(tb))


class CpuMeter:
    """CPU seconds used by OTHER processes between start() and stop(), from /proc/stat minus our own
    os.times(); reported as the average number of cores they kept busy (10 ms resolution; Linux only)."""

    def __init__(self):
        self.start()

    @staticmethod
    def _snap():
        busy = None
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait
        except (OSError, ValueError):
            pass
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def start(self) -> None:
        self.s0 = self._snap()

    def other_cores(self):
        s1 = self._snap()
        if self.s0[0] is None or s1[0] is None or s1[2] <= self.s0[2]:
            return None
        other = (s1[0] - self.s0[0]) - (s1[1] - self.s0[1])
        return max(0.0, other / (s1[2] - self.s0[2]))


def velocity_like(rng: np.random.Generator, L: int, std: float = 0.01) -> np.ndarray:
    return revsgd.to_fixed(rng.standard_normal(L) * std, FRAC_BITS)


def numpy_add_rate(L: int, k: int, repeats: int) -> dict:
    """Element-ops/s of ``a += b`` on int64 arrays of length L (best of ``repeats`` runs of k adds)."""
    a = np.arange(L, dtype=np.int64)
    b = np.ones(L, dtype=np.int64)
    a += b  # touch
    times = []
    while _more(len(times), repeats, times, []):
        t0 = time.perf_counter()
        for _ in range(k):
            a += b
        times.append(time.perf_counter() - t0)
    return {"rate": L * k / min(times), "times_s": times, "adds_per_repeat": k}


def settle_allocator() -> dict:
    """Fix glibc's malloc thresholds so timings do not depend on which buffers the process happened to free
    earlier: mmap only blocks >= 32 MB and never give freed heap memory back to the OS below 1 GB.

    With glibc's dynamic defaults the NumPy reference's 1-8 MB per-call temporaries were mmapped or the heap
    trimmed and page-faulted afresh on every call until some live buffer happened to pin the heap top, which made
    the reference 2-3x slower at shallow depth than deep at 1e5-1e6 lanes: an allocator artefact, not a depth
    effect. Arrays of 1e7 int64 (80 MB) are always mmapped, as in any process. Falls back to allocating and
    freeing one 32 MB buffer (which raises the dynamic thresholds) where mallopt is not available."""
    a = np.ones(4_000_000, dtype=np.int64)   # 32 MB: raises glibc's dynamic thresholds where mallopt fails
    del a
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) == 1) & (libc.mallopt(m_trim_threshold, 1 << 30) == 1)
        return {"method": "glibc mallopt", "M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30, "ok": ok}
    except (OSError, AttributeError):
        return {"method": "32 MB allocate/free (no glibc mallopt)", "ok": None}


def warm_up(be: str) -> None:
    """Compile / load every kernel variant once on a tiny problem (numba JIT) so no timing includes it."""
    L = 1000
    rng = np.random.default_rng(1)
    t = revsgd.Tape(L, backend=be)
    X = velocity_like(rng, L)
    for n in (58982, 1):
        t.scale(X, n)
        t.unscale(X, n)
    em = revsgd.ExactMomentum(rng.uniform(-1, 1, L), backend=be)
    g = rng.standard_normal(L) * 0.01
    em.step(g, 0.01, 58982)
    em.unstep_position(0.01)
    em.unstep_velocity(g, 58982)
    assert t.at_start() and em.tape.at_start()


def calibrate(be: str, L: int, n: int, repeats: int = 3) -> dict:
    """Rough scale/unscale rates (element-steps/s, mean of ``repeats`` single steps) at n and at n = 1, used only
    to estimate preload times."""
    rng = np.random.default_rng(2)
    X = velocity_like(rng, L)
    t = revsgd.Tape(L, backend=be)
    out = {}
    for nn in (n, 1):
        ts, tu = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            t.scale(X, nn)
            t1 = time.perf_counter()
            t.unscale(X, nn)
            t2 = time.perf_counter()
            ts.append(t1 - t0)
            tu.append(t2 - t1)
        out[f"scale_n{nn}"] = L / float(np.mean(ts))     # mean, not best: preloads pay every stall
        out[f"unscale_n{nn}"] = L / float(np.mean(tu))
    assert t.at_start()
    return out


def tape_report(tape, L: int, held: list[tuple[int, int]]) -> dict:
    """info_bits and nbytes against the information limit and the byte bound, for a history ``held``
    of (steps, n) pairs."""
    limit = L * sum(s * bits_per_step(nn) for s, nn in held)
    info = tape.info_bits
    nbytes = tape.nbytes
    bound = 1.05 * info / 8 + 4 * L + (1 << 20)
    return {
        "tape_depth_counter": tape.depth,
        "held_steps": [{"steps": s, "n": nn} for s, nn in held],
        "info_bits": info,
        "info_limit_bits": limit,
        "info_ratio": info / limit if limit > 0 else None,
        "info_within_0.1pct": bool(limit > 0 and abs(info / limit - 1.0) <= 1e-3),
        "nbytes": nbytes,
        "nbytes_bound": bound,
        "nbytes_within_bound": bool(nbytes <= bound),
        "bits_per_lane_step": info / (L * sum(s for s, _ in held)) if held else None,
    }


def _timed_block(tape, em, X, X0, W0, V0, grad, alpha, n, k, repeats, report) -> dict:
    """The timed part of a cell: repeats of (k scale, k unscale) then of (k step, k unstep); returns the times.
    ``report`` (if given) is called once at depth T, outside the timed loops."""
    times = {op: [] for op in OPS}
    rep = 0
    while _more(rep, repeats, times["scale"], times["unscale"]):
        t0 = time.perf_counter()
        for _ in range(k):
            tape.scale(X, n)
        t1 = time.perf_counter()
        if rep == 0 and report is not None:
            times["report"] = report()
        t2 = time.perf_counter()
        for _ in range(k):
            tape.unscale(X, n)
        t3 = time.perf_counter()
        times["scale"].append(t1 - t0)
        times["unscale"].append(t3 - t2)
        assert np.array_equal(X, X0), "unscale did not restore X"
        rep += 1
    rep = 0
    while _more(rep, repeats, times["step"], times["unstep"]):
        t0 = time.perf_counter()
        for _ in range(k):
            em.step(grad, alpha, n)
        t1 = time.perf_counter()
        for _ in range(k):
            em.unstep_position(alpha)
            em.unstep_velocity(grad, n)
        t2 = time.perf_counter()
        times["step"].append(t1 - t0)
        times["unstep"].append(t2 - t1)
        assert np.array_equal(em.fixed_params, W0) and np.array_equal(em.fixed_velocity, V0), \
            "unstep did not restore W, V"
        rep += 1
    return times


def run_cell(be: str, L: int, T: int, k: int, n: int, repeats: int, mode: str, budget_s: float,
             calib: dict, seed: int) -> dict:
    """One (backend, lanes, depth) cell of the protocol in the module docstring."""
    k = min(k, T)
    m_real = T - k
    m_bits = math.ceil(m_real * bits_per_step(n) / WORD_BITS)
    est_real = m_real * L * (1 / calib[f"scale_n{n}"] + 1 / calib[f"unscale_n{n}"])
    est_bits = m_bits * L * (1 / calib["scale_n1"] + 1 / calib["unscale_n1"])
    cell = {"backend": be, "lanes": L, "T": T, "timed_steps": k, "n": n, "loadavg_before": _loadavg(),
            "preload_estimate_s": {"real": est_real, "bits": est_bits}, "budget_s": budget_s}
    if mode == "auto":
        chosen = "real" if est_real <= budget_s else "bits"
    else:
        chosen = mode
    est = est_real if chosen == "real" else est_bits
    if m_real == 0:
        chosen, est = "none", 0.0
    if est > budget_s:
        nn = n if chosen == "real" else 1
        cell.update(skipped=True, reason=f"estimated {chosen} preload+unwind {est:.0f} s exceeds --budget-s "
                                         f"{budget_s:g} s (measured scale/unscale at n={nn}: "
                                         f"{calib[f'scale_n{nn}'] / 1e6:.1f}/{calib[f'unscale_n{nn}'] / 1e6:.1f} "
                                         f"M el-steps/s)")
        return cell
    m_pre, n_pre = {"real": (m_real, n), "bits": (m_bits, 1), "none": (0, n)}[chosen]
    cell["preload"] = {"method": chosen, "steps": m_pre, "n": n_pre,
                       "equivalent_depth": m_real}
    if chosen == "bits":
        cell["preload"]["note"] = ("the first n=1 step emits each lane's initial head 2^16 as a zero word, so "
                                   "info_bits overcounts by <1 bit/lane once (info_ratio slightly above 1 at "
                                   "small depth; ~0.04% at T=10000, gamma=0.9)")

    rng = np.random.default_rng(seed)
    alpha = 0.01
    em = revsgd.ExactMomentum(rng.uniform(-1.0, 1.0, L), backend=be)
    grad = rng.standard_normal(L) * 0.01
    tape = em.tape
    W0, V0 = em.fixed_params, em.fixed_velocity
    X = velocity_like(rng, L)
    X0 = X.copy()
    P = velocity_like(rng, L)
    P0 = P.copy()

    t0 = time.perf_counter()
    for _ in range(m_pre):
        tape.scale(P, n_pre)
    preload_s = time.perf_counter() - t0
    cell["preload"]["seconds"] = preload_s
    if m_pre:
        cell["preload"]["rate"] = L * m_pre / preload_s

    held = [(m_pre, n_pre), (k, n)] if m_pre else [(k, n)]
    times = {op: [] for op in OPS}
    attempts = []
    for attempt in range(1 + _CONTENTION[0]["retries"]):
        if attempt:
            time.sleep(_CONTENTION[0]["wait_s"])
        meter = CpuMeter()
        t_att = time.perf_counter()
        ta = _timed_block(tape, em, X, X0, W0, V0, grad, alpha, n, k, repeats,
                          (lambda: tape_report(tape, L, held)) if attempt == 0 else None)
        if attempt == 0:
            cell["tape_at_T"] = ta.pop("report")
            cell["tape_at_T"]["equivalent_depth_T"] = T
        oth = meter.other_cores()
        att_s = time.perf_counter() - t_att
        attempts.append({"other_processes_cores": oth, "seconds": att_s,
                         "rates": {op: L * k / min(ta[op]) for op in OPS}})
        for op in OPS:
            times[op] += ta[op]
        # retry only cells that were timed under contention and are cheap to time again
        if (oth is None or oth <= _CONTENTION[0]["threshold"] or att_s > _CONTENTION[0]["max_block_s"]):
            break
    cell["attempts"] = attempts
    cell["other_processes_cores"] = min((a["other_processes_cores"] for a in attempts
                                         if a["other_processes_cores"] is not None), default=None)

    t0 = time.perf_counter()
    for _ in range(m_pre):
        tape.unscale(P, n_pre)
    unwind_s = time.perf_counter() - t0
    cell["preload"]["unwind_seconds"] = unwind_s
    if m_pre:
        cell["preload"]["unwind_rate"] = L * m_pre / unwind_s
    assert tape.at_start(), "tape not at start after unwinding everything"
    assert np.array_equal(P, P0) and np.array_equal(X, X0), "P or X not restored"
    assert np.array_equal(em.fixed_params, W0) and np.array_equal(em.fixed_velocity, V0), "W or V not restored"
    cell["reversed_to_start"] = True
    cell["loadavg_after"] = _loadavg()
    cell["times_s"] = times
    cell["rates"] = {op: L * k / min(ts) for op, ts in times.items()}
    del em, tape, X, X0, P, P0, grad
    gc.collect()
    return cell


def value_range_cell(be: str, L: int, k: int, n: int, repeats: int, seed: int) -> dict:
    """scale/unscale rate on a fresh tape for velocity-like X and for full-range int64 X."""
    rng = np.random.default_rng(seed)
    out = {"backend": be, "lanes": L, "timed_steps": k, "n": n}
    for name, X in (("velocity_like", velocity_like(rng, L)),
                    ("full_int64", rng.integers(-2**62, 2**62, L, dtype=np.int64))):
        X0 = X.copy()
        tape = revsgd.Tape(L, backend=be)
        ts, tu = [], []
        while _more(len(ts), repeats, ts, tu):
            t0 = time.perf_counter()
            for _ in range(k):
                tape.scale(X, n)
            t1 = time.perf_counter()
            for _ in range(k):
                tape.unscale(X, n)
            t2 = time.perf_counter()
            ts.append(t1 - t0)
            tu.append(t2 - t1)
        assert tape.at_start() and np.array_equal(X, X0)
        out[name] = {"scale": L * k / min(ts), "unscale": L * k / min(tu)}
        del tape, X, X0
    return out


def _fmt(x, spec: str = ".2f") -> str:
    return "?" if x is None else format(x, spec)


def _log_cell(cell: dict) -> None:
    be, L, T = cell["backend"], cell["lanes"], cell["T"]
    if cell.get("skipped"):
        log(f"  {be:6s} L={L:.0e} T={T:<6d} SKIPPED: {cell['reason']}")
        return
    r, tr = cell["rates"], cell["tape_at_T"]
    oth = cell.get("other_processes_cores")
    log(f"  {be:6s} L={L:.0e} T={T:<6d} [{cell['preload']['method']:4s}] " +
        " ".join(f"{op} {r[op] / 1e6:7.1f}" for op in OPS) +
        f" M/s | info {tr['info_ratio']:.5f} | bytes ok {tr['nbytes_within_bound']} | other procs "
        f"{'?' if oth is None else f'{oth:.2f}'} cores | {cell['cell_wall_s']:.1f}s")


def backend_job(be: str, cfg: dict) -> dict:
    """Every cell of one backend (plus its preload cross-check and value-range check), in one process."""
    revsgd.set_num_threads(cfg["threads"])
    _REPEAT_BUDGET[0] = cfg["repeat_budget_s"]
    _CONTENTION[0] = cfg["contention"]
    alloc = settle_allocator()
    warm_up(be)
    k, n, repeats, budget_s, seed = cfg["k"], cfg["n"], cfg["repeats"], cfg["budget_s"], cfg["seed"]
    out = {"cells": [], "crosscheck": [], "value_range": None,
           "process": {"pid": os.getpid(), "threads": cfg["threads"], "allocator": alloc}}
    try:
        from revsgd import _cpp
        out["process"]["cpp_threads"] = _cpp.get_num_threads()
    except Exception:
        pass
    try:
        import numba
        out["process"]["numba_threads"] = numba.get_num_threads()
        if be == "numba":
            out["process"]["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        pass
    calib = {}
    for L in cfg["lanes"]:
        calib[L] = cb = calibrate(be, L, n)
        for T in cfg["steps"]:
            t0 = time.perf_counter()
            cell = run_cell(be, L, T, k, n, repeats, cfg["preload"], budget_s, cb, seed)
            cell["calibration"] = cb
            cell["cell_wall_s"] = time.perf_counter() - t0
            out["cells"].append(cell)
            _log_cell(cell)
    if cfg["crosscheck"]:
        Tmax = cfg["steps"][-1]
        for cell in list(out["cells"]):
            if cell.get("skipped") or cell["T"] != Tmax or cell["preload"]["method"] != "real":
                continue
            L = cell["lanes"]
            other = run_cell(be, L, Tmax, k, n, repeats, "bits", budget_s, calib[L], seed + 1)
            if other.get("skipped"):
                continue
            x = {"backend": be, "lanes": L, "T": Tmax, "rates_real": cell["rates"], "rates_bits": other["rates"],
                 "bits_over_real": {op: other["rates"][op] / cell["rates"][op] for op in OPS},
                 "info_ratio_real": cell["tape_at_T"]["info_ratio"],
                 "info_ratio_bits": other["tape_at_T"]["info_ratio"],
                 "nbytes_real": cell["tape_at_T"]["nbytes"], "nbytes_bits": other["tape_at_T"]["nbytes"],
                 "other_processes_cores": [cell.get("other_processes_cores"), other.get("other_processes_cores")]}
            out["crosscheck"].append(x)
            log(f"  {be:6s} L={L:.0e} T={Tmax:<6d} preload bits/real: " +
                " ".join(f"{op} {x['bits_over_real'][op]:.2f}" for op in OPS))
    if cfg["value_range"] and be != "numpy":   # the reference has no magnitude-dependent path
        out["value_range"] = v = value_range_cell(be, max(cfg["lanes"]), k, n, repeats, seed)
        log(f"  {be:6s} L={v['lanes']:.0e} value range: velocity-like scale/unscale "
            f"{v['velocity_like']['scale'] / 1e6:.0f}/{v['velocity_like']['unscale'] / 1e6:.0f} M/s, full int64 "
            f"{v['full_int64']['scale'] / 1e6:.0f}/{v['full_int64']['unscale'] / 1e6:.0f} M/s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# bigint baseline: one Python int per lane (hypergrad's BitStore)
# ---------------------------------------------------------------------------------------------------------------
def bigint_scale(store: list, X: list, n: int) -> None:
    """X ← X·n/65536, the lost bits pushed onto the per-lane Python int ``store`` (push r mod 2^16, pop mod n)."""
    for i in range(len(X)):
        x = X[i]
        st, s = divmod((store[i] << 16) | (x & 0xFFFF), n)
        store[i] = st
        X[i] = (x >> 16) * n + s


def bigint_unscale(store: list, X: list, n: int) -> None:
    """Inverse of :func:`bigint_scale` (push s mod n, pop r mod 2^16)."""
    for i in range(len(X)):
        q, s = divmod(X[i], n)
        st = store[i] * n + s
        store[i] = st >> 16
        X[i] = (q << 16) | (st & 0xFFFF)


class ObjBitStore:
    """hypergrad/exact_rep.py's BitStore: a NumPy object array of Python ints, whole-array ops."""

    def __init__(self, store: np.ndarray):
        self.store = store

    def push(self, N, M):
        self.store *= M
        self.store += N

    def pop(self, M):
        N = self.store % M
        self.store //= M
        return N


def obj_scale(bs: ObjBitStore, X: np.ndarray, n: int) -> np.ndarray:
    """exact_rep.py's rational_mul(n, d=2^16) on an int64 X (returns the new X)."""
    bs.push(X % 65536, 65536)
    X = X // 65536
    X *= n
    X += bs.pop(n).astype(np.int64)
    return X


def obj_unscale(bs: ObjBitStore, X: np.ndarray, n: int) -> np.ndarray:
    """rational_mul(2^16, d=n): the exact inverse of :func:`obj_scale`."""
    bs.push(X % n, n)
    X = X // n
    X *= 65536
    X += bs.pop(65536).astype(np.int64)
    return X


def bigint_selfcheck(seed: int) -> dict:
    """Round trip of both bigint forms through a mixed-n schedule; both forms must agree with each other."""
    rnd = random.Random(seed)
    L = 500
    ns = [58982, 1, 65536, 3, 40000, 58982, 7, 65535] + [rnd.randint(1, 65536) for _ in range(12)]
    X0 = [rnd.randint(-2**62, 2**62) for _ in range(L)]
    S0 = [rnd.getrandbits(150) for _ in range(L)]
    X, S = list(X0), list(S0)
    bs = ObjBitStore(np.array(S0, dtype=object))
    Xo = np.array(X0, dtype=np.int64)
    for n in ns:
        bigint_scale(S, X, n)
        Xo = obj_scale(bs, Xo, n)
        assert X == Xo.tolist() and S == bs.store.tolist(), "list and object-array bigint stores disagree"
        assert all(-2**63 <= x < 2**63 for x in X)
    grown = sum(s.bit_length() for s in S) / L - sum(s.bit_length() for s in S0) / L
    expected = sum(bits_per_step(n) for n in ns)
    for n in reversed(ns):
        bigint_unscale(S, X, n)
        Xo = obj_unscale(bs, Xo, n)
    assert X == X0 and S == S0, "bigint list store did not round-trip"
    assert Xo.tolist() == X0 and bs.store.tolist() == S0, "bigint object store did not round-trip"
    assert abs(grown - expected) < 2.0, (grown, expected)
    return {"ok": True, "lanes": L, "steps": len(ns), "mean_bit_growth": grown, "expected_bit_growth": expected}


def bigint_bench(L: int, depth: int, n: int, k: int, repeats: int, seed: int) -> dict:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    nbits = max(1, round(depth * bits_per_step(n)))
    X0 = velocity_like(rng, L).tolist()
    S0 = [rnd.getrandbits(nbits) | (1 << (nbits - 1)) for _ in range(L)]
    out = {"lanes": L, "depth": depth, "store_bits_per_lane": nbits, "timed_steps": k}
    # plain list, per-lane loop
    X, S = list(X0), list(S0)
    ts, tu = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            bigint_scale(S, X, n)
        t1 = time.perf_counter()
        for _ in range(k):
            bigint_unscale(S, X, n)
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        tu.append(t2 - t1)
        assert X == X0 and S == S0, "bigint list store did not reverse"
    out["list"] = {"scale": L * k / min(ts), "unscale": L * k / min(tu), "times_s": {"scale": ts, "unscale": tu}}
    # NumPy object array, whole-array ops (exact_rep.py)
    bs = ObjBitStore(np.array(S0, dtype=object))
    Xo0 = np.array(X0, dtype=np.int64)
    Xo = Xo0.copy()
    ts, tu = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            Xo = obj_scale(bs, Xo, n)
        t1 = time.perf_counter()
        for _ in range(k):
            Xo = obj_unscale(bs, Xo, n)
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        tu.append(t2 - t1)
        assert np.array_equal(Xo, Xo0) and bs.store.tolist() == S0, "bigint object store did not reverse"
    out["object_array"] = {"scale": L * k / min(ts), "unscale": L * k / min(tu),
                           "times_s": {"scale": ts, "unscale": tu}}
    return out


# ---------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------
def environment(threads: int) -> dict:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "revsgd": getattr(revsgd, "__version__", None),
        "backends_available": list(revsgd.BACKENDS),
        "threads_requested": threads,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import numba
        env["numba"] = numba.__version__
        env["numba_threads"] = numba.get_num_threads()
        env["numba_threading_layer_config"] = numba.config.THREADING_LAYER
    except Exception:  # pragma: no cover
        pass
    try:
        from revsgd import _cpp
        env["cpp_openmp"] = bool(getattr(_cpp, "openmp", False))
        env["cpp_threads"] = _cpp.get_num_threads()
    except Exception:
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        pass
    return env


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
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
    ap.add_argument("--gamma", type=float, default=0.9, help="momentum, quantised to n/65536 (default 0.9)")
    ap.add_argument("--preload", choices=("auto", "real", "bits"), default="auto")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="max estimated preload+unwind seconds per cell (default 60)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default 2 if available)")
    ap.add_argument("--bigint-lanes", type=int, default=None, help="lanes of the bigint baseline (default 1e5)")
    ap.add_argument("--bigint-depths", default=None, help="emulated depths of the bigint store (default 1000,10000)")
    ap.add_argument("--bigint-steps", type=int, default=None, help="steps timed for the bigint baseline (default 3)")
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the real-vs-bits preload cross-check")
    ap.add_argument("--no-value-range", action="store_true", help="skip the full-range-X scale/unscale check")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: lanes 1e5,1e6, T 100,1000, k=10, budget 8 s, repeat budget 0.5 s, small bigint")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run all backends in this process (default: a fresh process per backend)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_kernels.json")
    args = ap.parse_args(argv)

    q = args.quick
    lanes = parse_int_list(args.lanes) if args.lanes else ([10**5, 10**6] if q else [10**5, 10**7])
    steps = sorted(parse_int_list(args.steps) if args.steps else ([100, 1000] if q else [100, 10000]))
    k = args.timed_steps if args.timed_steps is not None else (10 if q else 20)
    budget_s = args.budget_s if args.budget_s is not None else (8.0 if q else 60.0)
    repeat_budget_s = args.repeat_budget_s if args.repeat_budget_s is not None else (0.5 if q else REPEAT_BUDGET_S)
    _REPEAT_BUDGET[0] = repeat_budget_s
    contention = dict(_CONTENTION[0], retries=args.contention_retries if args.contention_retries is not None
                      else (0 if q else 2))
    _CONTENTION[0] = contention
    allocator = settle_allocator()
    big_lanes = args.bigint_lanes if args.bigint_lanes is not None else (2 * 10**4 if q else 10**5)
    big_depths = parse_int_list(args.bigint_depths) if args.bigint_depths else ([1000] if q else [1000, 10000])
    big_k = args.bigint_steps if args.bigint_steps is not None else (2 if q else 3)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else list(revsgd.BACKENDS)
    for b in backends:
        if b not in revsgd.BACKENDS:
            ap.error(f"backend {b!r} not available; available: {revsgd.BACKENDS}")
    if min(lanes) < 1 or min(steps) < 1 or k < 1 or args.repeats < 1:
        ap.error("lanes, steps, --timed-steps and --repeats must be positive")
    n = int(revsgd.quantize_momentum(args.gamma))
    threads = args.threads if args.threads is not None else min(2, os.cpu_count() or 1)
    revsgd.set_num_threads(threads)

    wall0 = time.perf_counter()
    doc = {
        "benchmark": "revsgd kernels: element-steps/s, flat in T",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "config": {"backends": backends, "lanes": lanes, "steps_T": steps, "timed_steps_k": k,
                   "repeats": args.repeats, "gamma": args.gamma, "n": n, "gamma_quantised": n / 65536,
                   "bits_per_lane_step": bits_per_step(n), "preload_mode": args.preload, "budget_s": budget_s,
                   "threads": threads, "frac_bits": FRAC_BITS, "alpha": 0.01, "value_std": 0.01,
                   "quick": q, "seed": args.seed, "repeat_budget_s": repeat_budget_s,
                   "isolated_backend_processes": not args.no_isolate,
                   "contention_retry": contention, "allocator": allocator},
        "protocol": (
            "Per cell (backend, lanes L, depth T): one ExactMomentum with its tape. Preload the tape to depth T-k "
            f"(k={k}) by Tape.scale of a separate int64 array P: 'real' = T-k scales with the benchmark n "
            "(the tape a T-k step run leaves), 'bits' = ceil((T-k)*(-log2(n/65536))/16) scales with n=1, each "
            "storing exactly 16 bits/lane, i.e. the same information, words and bytes as the real history (the "
            "kernels' state is heads + word streams only); 'auto' picks real if its estimated preload+unwind "
            "time fits budget_s, else bits, else the cell is skipped. Then time (perf_counter, best of "
            f"{args.repeats}) k Tape.scale of a velocity-like X (depth T-k -> T), k Tape.unscale (X restored "
            "bit for bit), k fused ExactMomentum.step on the same tape, k unsteps (unstep_position + "
            "unstep_velocity = one element-step; W, V restored). info_bits/nbytes are read at depth T. Finally "
            "unwind P and assert tape.at_start() and X, P, W, V equal to their start. Rate = L*k/best seconds "
            "(element-steps/s). Flat in T: rate(T_max)/rate(T_min) ~ 1. numpy_add: best of repeats of k "
            "'a += b' on int64 arrays of length L, same run."),
        "environment": environment(threads),
        "numpy_add": {},
        "cells": [],
    }
    log(f"revsgd kernel bench: backends={backends} lanes={lanes} T={steps} k={k} n={n} threads={threads} "
        f"preload={args.preload} budget={budget_s:g}s")

    # --- bigint self-check first: cheap, and a failure should stop the run early -------------------------------
    doc["bigint_selfcheck"] = bigint_selfcheck(args.seed)

    cfg = {"lanes": lanes, "steps": steps, "k": k, "n": n, "repeats": args.repeats, "preload": args.preload,
           "budget_s": budget_s, "seed": args.seed, "threads": threads,
           "crosscheck": not args.no_crosscheck and args.preload == "auto",
           "value_range": not args.no_value_range, "repeat_budget_s": repeat_budget_s,
           "contention": contention}
    for L in lanes:
        add = numpy_add_rate(L, max(k, 20), args.repeats)
        doc["numpy_add"][str(L)] = {"rate_start": add["rate"]}
        log(f"numpy a+=b at {L:.0e} lanes: {add['rate'] / 1e6:.0f} M el-ops/s")
    doc["preload_crosscheck"] = []
    doc["value_range"] = []
    doc["backend_processes"] = {}
    for be in backends:
        if args.no_isolate:
            res = backend_job(be, cfg)
        else:
            # a fresh process per backend, as a user runs one backend: the numba and C++ kernels share one
            # libgomp, and having used one changes how the other's threads wait (seen as ~8 ms stalls per call
            # when another process holds a core)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                res = pool.apply(backend_job, (be, cfg))
        doc["cells"] += res["cells"]
        doc["preload_crosscheck"] += res["crosscheck"]
        if res["value_range"] is not None:
            doc["value_range"].append(res["value_range"])
        doc["backend_processes"][be] = res["process"]

    # --- bigint baseline ----------------------------------------------------------------------------------------
    doc["bigint"] = {"description": "one Python int per lane (hypergrad BitStore): 'list' = plain list with a "
                                    "per-lane loop (primary), 'object_array' = numpy object array, "
                                    "whole-array ops as in hypergrad/exact_rep.py",
                     "runs": [bigint_bench(big_lanes, d, n, big_k, args.repeats, args.seed) for d in big_depths]}

    # --- numpy add again at the end; keep the best ----------------------------------------------------------------
    for L in lanes:
        add = numpy_add_rate(L, max(k, 20), args.repeats)
        e = doc["numpy_add"][str(L)]
        e["rate_end"] = add["rate"]
        e["rate"] = max(e["rate_start"], add["rate"])   # the ratios below use this (best of start and end)

    # --- derived: ratios, flatness, best backend, summary ---------------------------------------------------------
    done = [c for c in doc["cells"] if not c.get("skipped")]
    for c in done:
        add = doc["numpy_add"][str(c["lanes"])]["rate"]
        c["ratio_to_numpy_add"] = {op: c["rates"][op] / add for op in OPS}
    flat = []
    for be in backends:
        for L in lanes:
            cs = sorted((c for c in done if c["backend"] == be and c["lanes"] == L), key=lambda c: c["T"])
            if len(cs) >= 2:
                flat.append({"backend": be, "lanes": L, "T_min": cs[0]["T"], "T_max": cs[-1]["T"],
                             "preload_T_max": cs[-1]["preload"]["method"],
                             "rate_T_max_over_T_min": {op: cs[-1]["rates"][op] / cs[0]["rates"][op] for op in OPS}})
    doc["flatness"] = flat

    def best(L, T):
        cs = [c for c in done if c["lanes"] == L and c["T"] == T]
        if not cs:
            return None
        return {op: max(((c["rates"][op], c["backend"]) for c in cs)) for op in OPS}

    summary = {"best_backend": {}}
    for L in lanes:
        for T in steps:
            b = best(L, T)
            if b:
                add = doc["numpy_add"][str(L)]["rate"]
                summary["best_backend"][f"L={L},T={T}"] = {
                    op: {"backend": be_, "rate": r, "ratio_to_numpy_add": r / add} for op, (r, be_) in b.items()}
    # bigint ratio: best backend at the bigint lane count (or the nearest measured), deepest T measured
    Lb = min(lanes, key=lambda L: abs(math.log(L / big_lanes)))
    Tb = max((c["T"] for c in done if c["lanes"] == Lb), default=None)
    b = best(Lb, Tb) if Tb is not None else None
    if b:
        rb = []
        for run in doc["bigint"]["runs"]:
            rb.append({
                "bigint_depth": run["depth"], "store_bits_per_lane": run["store_bits_per_lane"],
                "bigint_list_rate": {op: run["list"][op] for op in ("scale", "unscale")},
                "best_backend": {op: b[op][1] for op in ("scale", "unscale")},
                "best_backend_rate": {op: b[op][0] for op in ("scale", "unscale")},
                "best_over_bigint_list": {op: b[op][0] / run["list"][op] for op in ("scale", "unscale")},
                "best_over_bigint_object_array": {op: b[op][0] / run["object_array"][op]
                                                  for op in ("scale", "unscale")},
            })
        summary["bigint_comparison"] = {"backend_cell": {"lanes": Lb, "T": Tb}, "runs": rb}
    Lh = max(lanes)
    Th = max((c["T"] for c in done if c["lanes"] == Lh), default=None)
    bh = best(Lh, Th) if Th is not None else None
    if bh:
        add = doc["numpy_add"][str(Lh)]["rate"]
        ch = {c["backend"]: c for c in done if c["lanes"] == Lh and c["T"] == Th}
        summary["headline"] = {
            "lanes": Lh, "T": Th, "numpy_add_rate": add,
            **{op: {"backend": bh[op][1], "rate": bh[op][0], "ratio_to_numpy_add": bh[op][0] / add,
                    "other_processes_cores": ch[bh[op][1]].get("other_processes_cores"),
                    "preload": ch[bh[op][1]]["preload"]["method"]} for op in OPS},
        }
    summary["all_reversed_to_start"] = all(c.get("reversed_to_start") for c in done)
    real = [c for c in done if c["preload"]["method"] != "bits"]
    summary["all_info_within_0.1pct"] = all(c["tape_at_T"]["info_within_0.1pct"] for c in real)
    summary["info_check_note"] = ("over cells whose tape holds a real history (preload 'real' or none); "
                                  "'bits'-preloaded cells carry a one-off <1 bit/lane overcount, see their note")
    summary["info_ratio_range_real_history"] = ([min(c["tape_at_T"]["info_ratio"] for c in real),
                                                 max(c["tape_at_T"]["info_ratio"] for c in real)] if real else None)
    bits = [c["tape_at_T"]["info_ratio"] for c in done if c["preload"]["method"] == "bits"]
    summary["info_ratio_range_bits_preload"] = [min(bits), max(bits)] if bits else None
    summary["all_nbytes_within_bound"] = all(c["tape_at_T"]["nbytes_within_bound"] for c in done)
    oth = [c.get("other_processes_cores") for c in done if c.get("other_processes_cores") is not None]
    summary["max_other_processes_cores"] = max(oth) if oth else None
    summary["contended_cells"] = [{"backend": c["backend"], "lanes": c["lanes"], "T": c["T"],
                                   "other_processes_cores": c["other_processes_cores"]}
                                  for c in done if (c.get("other_processes_cores") or 0) > 0.25]
    summary["skipped_cells"] = [{"backend": c["backend"], "lanes": c["lanes"], "T": c["T"], "reason": c["reason"]}
                                for c in doc["cells"] if c.get("skipped")]
    doc["summary"] = summary
    doc["wall_s"] = time.perf_counter() - wall0

    # --- human-readable table -------------------------------------------------------------------------------------
    log("\n== element-steps/s (M/s) and ratio to numpy a+=b; info = info_bits / limit; bytes = nbytes <= bound; "
        "other = cores kept busy by other processes while timing ==")
    log(f"{'backend':7s} {'lanes':>6s} {'T':>6s} {'pre':4s} " +
        " ".join(f"{op:>16s}" for op in OPS) + f" {'info':>8s} {'bytes':>5s} {'other':>5s}")
    for c in doc["cells"]:
        head = f"{c['backend']:7s} {c['lanes']:6.0e} {c['T']:6d} "
        if c.get("skipped"):
            log(head + f"SKIPPED ({c['reason']})")
            continue
        log(head + f"{c['preload']['method']:4s} " +
            " ".join(f"{c['rates'][op] / 1e6:8.1f} ({c['ratio_to_numpy_add'][op]:5.3f})" for op in OPS) +
            f" {c['tape_at_T']['info_ratio']:8.5f} {str(c['tape_at_T']['nbytes_within_bound']):>5s}"
            f" {_fmt(c.get('other_processes_cores')):>5s}")
    log("numpy a+=b: " + ", ".join(f"L={L:.0e}: {v['rate'] / 1e6:.0f} M/s" for L, v in
                                   ((int(x), y) for x, y in doc["numpy_add"].items())))
    if flat:
        log("flat in T (rate T_max / rate T_min): " + "; ".join(
            f"{f['backend']} L={f['lanes']:.0e}: " + " ".join(f"{op} {f['rate_T_max_over_T_min'][op]:.2f}"
                                                               for op in OPS) for f in flat))
    for x in doc["preload_crosscheck"]:
        log(f"preload bits/real at L={x['lanes']:.0e} T={x['T']} {x['backend']}: " +
            " ".join(f"{op} {x['bits_over_real'][op]:.2f}" for op in OPS))
    for v in doc["value_range"]:
        log(f"value range {v['backend']} L={v['lanes']:.0e}: velocity-like scale/unscale "
            f"{v['velocity_like']['scale'] / 1e6:.0f}/{v['velocity_like']['unscale'] / 1e6:.0f} M/s, full int64 "
            f"{v['full_int64']['scale'] / 1e6:.0f}/{v['full_int64']['unscale'] / 1e6:.0f} M/s")
    for r in summary.get("bigint_comparison", {}).get("runs", []):
        log(f"bigint ({r['store_bits_per_lane']} bits/lane, depth {r['bigint_depth']}, L={big_lanes:.0e}): list "
            f"scale/unscale {r['bigint_list_rate']['scale'] / 1e6:.2f}/{r['bigint_list_rate']['unscale'] / 1e6:.2f}"
            f" M/s; best backend / bigint list: scale {r['best_over_bigint_list']['scale']:.0f}x, unscale "
            f"{r['best_over_bigint_list']['unscale']:.0f}x (object array: "
            f"{r['best_over_bigint_object_array']['scale']:.0f}x, "
            f"{r['best_over_bigint_object_array']['unscale']:.0f}x)")
    h = summary.get("headline")
    if h:
        log(f"headline L={h['lanes']:.0e} T={h['T']}: " + ", ".join(
            f"{op} {h[op]['backend']} {h[op]['rate'] / 1e6:.0f} M/s ({h[op]['ratio_to_numpy_add']:.3f} of a+=b)"
            for op in OPS) + f"; numpy a+=b {h['numpy_add_rate'] / 1e6:.0f} M/s")
    log(f"all reversed: {summary['all_reversed_to_start']}; info within 0.1% (real histories): "
        f"{summary['all_info_within_0.1pct']}; "
        f"nbytes within bound: {summary['all_nbytes_within_bound']}; skipped: {len(summary['skipped_cells'])}; "
        f"cells timed while other processes used > 0.25 core: {len(summary['contended_cells'])}; "
        f"wall {doc['wall_s']:.0f} s")

    text = json.dumps(doc, indent=1, sort_keys=False)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
