"""Throughput of the exact-arithmetic kernels, flat in the number of steps T (docs/design.md §3): the measurement
code of ``scripts/bench_kernels.py`` (the driver: options, defaults, output).

One run of the script prints a JSON document to stdout (and writes it to ``--out``) and a compact table to stderr.
It measures, for every backend in ``revsgd.BACKENDS`` (or ``--backends``; torch runs on the CPU), every lane count
(``--lanes``, default 1e5 and 1e7) and every depth (``--steps``, default T = 100 and 10 000), in element-steps per
second (lanes × steps / seconds):

- ``shift`` / ``unshift``        ``Tape.shift(X, h_t)`` / ``Tape.unshift(X, h_t)`` over the real schedule's steps
  T − k … T − 1, where (e_t, h_t) = ``decay_scales`` of a constant momentum γ (``--gamma``, default 0.9, used as
  given): the average cost per training step of a decay (at γ = 0.9 one step in ~6.6 shifts by one bit, the others
  by zero; the cell records how many of its k steps shift);
- ``shift_h1`` / ``unshift_h1``  a step with h = 1 (16·⌈k/16⌉ of them in a row, so exactly one in 16 emits a row
  onto the word stack, as in a real run);
- ``shift_h0`` / ``unshift_h0``  a step with h = 0 (no tape work: the call's fixed cost);
- ``step``     ``ExactMomentum.step(grad, lr, γ)`` (fused: decay of the velocity through the tape, velocity update,
  position update), averaged over k steps of its own schedule;
- ``unstep``   ``ExactMomentum.unstep_position(lr)`` + ``unstep_velocity(grad, γ)``, counted as ONE step.

next to the same run's NumPy ``a += b`` on int64 arrays of the same length, next to an arbitrary-precision-integer
store (one Python int per lane, the 2015 approach), and next to the information limit and the byte bound of the
tape. ``ExactMomentum`` works on NumPy arrays only; for the torch backend ``step``/``unstep`` run the same kernel
driver call that ``ExactMomentum`` makes (``revsgd.kernels.momentum`` with the same parameters) on torch tensors
(:class:`TorchMomentum`; recorded as ``optimizer_api``). ``schedule_model`` is the schedule average predicted from
the h = 1 and h = 0 rates and the schedule's fraction of shifting steps (a check on ``shift`` whose k-step segment
holds a whole number of shifts).

Protocol ("rate at depth T")
----------------------------
Each cell (backend, lanes L, depth T) has two phases, each on its own tape (one at a time, to halve peak memory):

1. *Preload* the tape to depth T − k (k = ``--timed-steps``, default 20) by shifting a separate int64 array P. The
   tape's layout (heads' pending count, rows on the stack, bytes) depends only on the sequence of h, never on the
   data, so:

   - ``real``: the T − k shifts ``shift(P, h_t)`` of the real schedule (most are h = 0 and cost only a call):
     exactly the tape a run of T − k steps leaves behind;
   - ``packed``: ⌊Σh/16⌋ shifts by 16 and one by Σh mod 16: the same rows, pending bits, words, capacity and
     information as the real history (only the depth counter differs), at ~1/16 of the bit-shifting calls;
   - ``auto`` (default): ``real`` if its estimated preload + unwind time (both phases, from rates measured on the
     same backend and lane count) fits ``--budget-s``, else ``packed``; if even that does not fit, the cell is
     skipped and recorded with the reason. The run cross-checks packed against real where real was used at the
     largest T (``preload_crosscheck``).

   The tape phase preloads a ``revsgd.Tape`` through its public ``shift``; the optimiser phase preloads the tape
   inside a fresh ``ExactMomentum`` through ``revsgd.kernels.shift`` on its storage (the one private access of
   this benchmark: ``ExactMomentum`` exposes no tape; without it that phase is skipped with the reason).

2. *Time* at that depth, taking the best of ``--repeats`` (default 3) repeats of each pair: tape phase — k shifts
   of a velocity-like X with the schedule's h_{T−k} … h_{T−1} (depth T − k → T; information and bytes are read
   here), then the k unshifts back (X checked bit-identical); the h = 1 pair; the h = 0 pair. Optimiser phase —
   k ``step`` then k ``unstep`` (W, V checked bit-identical). Only these loops are timed (``time.perf_counter``).
   Short segments get extra repeats until their best time is reproduced within 10 % (at most 15 repeats /
   ``--repeat-budget-s``). Stack growth (reallocation by ~3 % at a time; torch's copy-grown buffer: 25 %) is paid
   by whichever repeat crosses a capacity, so the best repeat shows the steady-state kernel cost.

3. *Unwind* the preload and assert the tape is at its start and that X, P, W and V are back to their start bit
   for bit. Nothing reported comes from a run that failed to reverse.

"Flat in T" means the rate at T = 10 000 equals the rate at T = 100 (``flatness``: rate(T_max)/rate(T_min)).

Information and bytes (tape phase, at depth T): the tape holds exactly L·Σ_{t<T} h_t bits (checked), against the
information limit L·T·(−log2 γ): held ÷ limit, and the deficit limit − held, which must lie in [0, 1) bit per
lane (log2 of the final scale e_T ∈ (1/2, 1]). Allocated bytes ``Tape.nbytes`` against the bound
1.04·info/8 + 2 bytes/lane (heads) + 4 KiB; ``nbytes_bound_backend`` uses the backend's own growth step instead of
4 % (torch grows its stack by copying, 25 % at a time).

Allocator: every process first fixes glibc's malloc thresholds (``settle_allocator``: mmap only blocks >= 32 MB,
keep up to 1 GB of freed heap), so timings do not depend on which temporaries earlier calls happened to free.

Isolation and contention: each backend runs in a fresh process (``--no-isolate`` to switch off), as a user runs
one backend (the numba and C++ kernels share one libgomp). Each cell records ``other_processes_cores``: the cores
other processes kept busy while it was timed (/proc/stat minus this process). With 2 kernel threads on 2 cores,
another busy process costs a 2-thread fork-join about one scheduler slice (~8 ms) per call, which dominates at
1e5 lanes; the summary lists such cells as ``contended_cells``. A phase's timed block (not its preload) is run
again after 5 s, up to ``--contention-retries`` times (default 2) if a block takes <= 20 s; all repeats of all
attempts count towards the best time and each attempt's contention is kept in ``attempts``.

Values: X, P are fix(N(0, 0.01²)) at F = 52 and the gradient is N(0, 0.01²) (lr 0.01) so the velocity stays of that
size, as in training. Shifts are bit operations: their cost does not depend on the values.

Bigint baseline: one Python int per lane holding the lost bits (hypergrad's BitStore, Maclaurin et al. 2015), with
the 2015 rational multiplication by n/d, d = 2^16, n = ⌊γ·2^16 + 1⌋ (hypergrad's ``float_to_rational``): scale:
r = X mod 2^16, X //= 2^16; store = store·2^16 + r; s = store mod n, store //= n; X = X·n + s; unscale is the
inverse with divmod. Every step does this work (a multiplication never skips a step), so it is compared with the
schedule average ``shift`` and with the h = 1 step. Its store is initialised to a random integer of the bit
length that ``--bigint-depths`` steps leave (≈152 bits at T = 1000), then a few steps are timed on
``--bigint-lanes`` lanes. Two forms: a plain Python list of ints with a per-lane loop (the primary number), and a
NumPy object array with the whole-array ops the original exact_rep.py used.
"""
from __future__ import annotations

import datetime
import gc
import math
import multiprocessing
import os
import random
import sys
import time

import numpy as np

import revsgd
from revsgd.core.fixed import decay_scales

from .timing import (ContentionPolicy, CpuMeter, RepeatPolicy, git_state, kernel_threads_info, loadavg, machine,
                     settle_allocator)

FRAC_BITS = revsgd.DEFAULT_FRAC_BITS
WORD_BITS = 16
TAPE_OPS = ("shift", "unshift", "shift_h1", "unshift_h1", "shift_h0", "unshift_h0")
OPT_OPS = ("step", "unstep")
OPS = TAPE_OPS + OPT_OPS
PAIRS = (("shift", "unshift"), ("shift_h1", "unshift_h1"), ("shift_h0", "unshift_h0"), ("step", "unstep"))
#: byte bound: 1.04 · info/8 + 2 bytes per lane (heads) + BYTES_CONST
BYTES_SLACK = 1.04
BYTES_CONST = 4096
ALPHA = 0.01
VALUE_STD = 0.01


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def bits_per_step(gamma: float) -> float:
    """Information limit per lane per step of a decay by γ: −log2 γ."""
    return -math.log2(gamma)


def schedule_shifts(gamma: float, T: int) -> np.ndarray:
    """h_t (T,) of a constant decay γ, exactly as every revsgd run computes it (``decay_scales``)."""
    return decay_scales(np.full(T, float(gamma)))[1]


def h1_steps(k: int) -> int:
    """Number of consecutive h = 1 steps timed: a multiple of 16, so exactly one in 16 emits a row."""
    return WORD_BITS * max(1, math.ceil(k / WORD_BITS))


def packed_plan(sum_h: int) -> list:
    """Shifts with the same rows, pending bits and information as any history with Σh = ``sum_h``."""
    return [WORD_BITS] * (sum_h // WORD_BITS) + ([sum_h % WORD_BITS] if sum_h % WORD_BITS else [])


# ---------------------------------------------------------------------------------------------------------------
# arrays per backend, and the optimiser under test
# ---------------------------------------------------------------------------------------------------------------
def velocity_like(rng: np.random.Generator, L: int, std: float = VALUE_STD) -> np.ndarray:
    return revsgd.to_fixed(rng.standard_normal(L) * std, FRAC_BITS)


def as_backend(be: str, a: np.ndarray):
    """A NumPy array as the state type of backend ``be`` (a torch CPU tensor for torch)."""
    if be == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(a))
    return a


def copy_of(a):
    return a.clone() if hasattr(a, "clone") else a.copy()


def same(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


class TorchMomentum(revsgd.ExactMomentum):
    """``ExactMomentum`` on torch int64 tensors (CPU, one group) for the torch backend's rows.

    ``ExactMomentum`` refuses the torch backend (its public API is NumPy; revsgd.hypergrad uses torch through the
    engine). This subclass only swaps the storage: the same steps make the same ``revsgd.kernels.momentum`` calls
    with the same parameters, on tensors."""

    def __init__(self, w0: np.ndarray, frac_bits: int = FRAC_BITS):
        import torch
        from revsgd.core.tapeformat import TapeStorage
        super().__init__(w0, frac_bits=frac_bits)
        self._be = revsgd.kernels.get_backend("torch")
        self._tape = TapeStorage(self.num_lanes, self._offsets, self._be.arrays)
        self._W = torch.from_numpy(self._W)
        self._V = torch.from_numpy(self._V)

    def _grad(self, grad):
        return grad

    @property
    def fixed_params(self):
        return self._W.clone()

    @property
    def fixed_velocity(self):
        return self._V.clone()


def make_optimizer(be: str, w0: np.ndarray):
    """``revsgd.ExactMomentum`` (or, for torch, :class:`TorchMomentum`) and the name of the API measured."""
    if be == "torch":
        return TorchMomentum(w0), "revsgd.kernels.momentum on torch tensors (ExactMomentum is NumPy-only)"
    return revsgd.ExactMomentum(w0, backend=be), "revsgd.ExactMomentum"


def optimizer_storage(opt):
    """The tape storage inside the optimiser (private: ``ExactMomentum`` exposes no tape), or None."""
    st = getattr(opt, "_tape", None)
    return st if st is not None and hasattr(st, "info_bits") and hasattr(st, "num_lanes") else None


def storage_shift(be: str, st, P, h: int, forward: bool) -> None:
    from revsgd import kernels
    kernels.shift(kernels.get_backend(be), st, P, np.array([h], dtype=np.int64), forward)


def storage_growth(be: str) -> float:
    """Growth step of the backend's word stack (a fraction of its size), for the backend's own byte bound."""
    try:
        from revsgd import kernels
        return float(kernels.get_backend(be).arrays.growth)
    except Exception:  # noqa: BLE001 - the bound then uses the default slack
        return BYTES_SLACK - 1.0


# ---------------------------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------------------------
def numpy_add_rate(L: int, k: int, policy: RepeatPolicy) -> dict:
    """Element-ops/s of ``a += b`` on int64 arrays of length L (best of ``policy``'s repeats of k adds)."""
    a = np.arange(L, dtype=np.int64)
    b = np.ones(L, dtype=np.int64)
    a += b  # touch
    times = []
    while policy.more(len(times), times, []):
        t0 = time.perf_counter()
        for _ in range(k):
            a += b
        times.append(time.perf_counter() - t0)
    return {"rate": L * k / min(times), "times_s": times, "adds_per_repeat": k}


def warm_up(be: str, gamma: float = 0.9) -> None:
    """Load / compile every kernel variant once on a tiny problem (numba JIT, thread pools) so no timing includes
    it: shifts by 0, 1 (with and without a row) and 16, and momentum steps with and without a shift."""
    L = 1000
    rng = np.random.default_rng(1)
    t = revsgd.Tape(L, backend=be)
    X = as_backend(be, velocity_like(rng, L))
    X0 = copy_of(X)
    hs = [1] * 17 + [0, 16, 3]
    for h in hs:
        t.shift(X, h)
    for h in reversed(hs):
        t.unshift(X, h)
    opt, _ = make_optimizer(be, rng.uniform(-1, 1, L))
    g = as_backend(be, rng.standard_normal(L) * VALUE_STD)
    for _ in range(20):
        opt.step(g, ALPHA, gamma)
    for _ in range(20):
        opt.unstep_position(ALPHA)
        opt.unstep_velocity(g, gamma)
    assert t.at_start() and same(X, X0) and opt.at_start()


def calibrate(be: str, L: int, repeats: int = 3) -> dict:
    """Rough per-call seconds (mean of ``repeats``) of shift/unshift by 1, 16 and 0 bits, used only to estimate
    preload times (means, not bests: a preload pays every stall)."""
    rng = np.random.default_rng(2)
    X = as_backend(be, velocity_like(rng, L))
    t = revsgd.Tape(L, backend=be)
    out = {}
    for h in (1, 16, 0):
        ts, tu = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            t.shift(X, h)
            t1 = time.perf_counter()
            t.unshift(X, h)
            t2 = time.perf_counter()
            ts.append(t1 - t0)
            tu.append(t2 - t1)
        out[f"shift_h{h}_s"] = float(np.mean(ts))
        out[f"unshift_h{h}_s"] = float(np.mean(tu))
    assert t.at_start()
    return out


def preload_estimates(h_pre: np.ndarray, calib: dict) -> dict:
    """Estimated seconds of preload + unwind, both phases, for the real and the packed history."""
    n1 = int((h_pre > 0).sum())
    n0 = int(h_pre.shape[0]) - n1
    s = int(h_pre.sum())
    c1 = calib["shift_h1_s"] + calib["unshift_h1_s"]
    c16 = calib["shift_h16_s"] + calib["unshift_h16_s"]
    c0 = calib["shift_h0_s"] + calib["unshift_h0_s"]
    real = n1 * c1 + n0 * c0 + (s // WORD_BITS) * c16       # rows emitted: at most a full row's cost each
    packed = len(packed_plan(s)) * c16
    return {"real": 2 * real, "packed": 2 * packed}


def tape_report(tape, L: int, T: int, gamma: float, sum_h: int, be: str) -> dict:
    """Information held and bytes allocated at depth T against the limit and the bounds."""
    limit = L * T * bits_per_step(gamma)
    info = tape.info_bits
    nbytes = tape.nbytes
    growth = storage_growth(be)
    bound = BYTES_SLACK * info / 8 + 2 * L + BYTES_CONST
    bound_be = (1 + max(growth, BYTES_SLACK - 1)) * info / 8 + 2 * L + BYTES_CONST
    deficit = (limit - info) / L
    return {
        "depth_T": T,
        "sum_h": sum_h,
        "info_bits": info,
        "info_equals_sum_of_shifts": bool(info == L * sum_h),
        "info_limit_bits": limit,
        "info_ratio": info / limit if limit > 0 else None,
        "deficit_bits_per_lane": deficit,
        "deficit_below_one_bit_per_lane": bool(-1e-9 <= deficit < 1.0),
        "nbytes": nbytes,
        "nbytes_bound": bound,
        "nbytes_within_bound": bool(nbytes <= bound),
        "stack_growth": growth,
        "nbytes_bound_backend": bound_be,
        "nbytes_within_backend_bound": bool(nbytes <= bound_be),
        "nbytes_over_info_bytes": nbytes / (info / 8) if info else None,
        "bits_per_lane_step": info / (L * T),
    }


def _tape_block(tape, X, X0, h_seg: list, m1: int, k: int, policy: RepeatPolicy, report) -> dict:
    """Timed pairs of the tape phase; ``report`` (if given) is called once at depth T, outside the timed loops."""
    times = {op: [] for op in TAPE_OPS}
    rep = 0
    while policy.more(rep, times["shift"], times["unshift"]):
        t0 = time.perf_counter()
        for h in h_seg:
            tape.shift(X, h)
        t1 = time.perf_counter()
        if rep == 0 and report is not None:
            times["report"] = report()
        t2 = time.perf_counter()
        for h in reversed(h_seg):
            tape.unshift(X, h)
        t3 = time.perf_counter()
        times["shift"].append(t1 - t0)
        times["unshift"].append(t3 - t2)
        assert same(X, X0), "unshift did not restore X"
        rep += 1
    for h, n, a, b in ((1, m1, "shift_h1", "unshift_h1"), (0, k, "shift_h0", "unshift_h0")):
        rep = 0
        while policy.more(rep, times[a], times[b]):
            t0 = time.perf_counter()
            for _ in range(n):
                tape.shift(X, h)
            t1 = time.perf_counter()
            for _ in range(n):
                tape.unshift(X, h)
            t2 = time.perf_counter()
            times[a].append(t1 - t0)
            times[b].append(t2 - t1)
            assert same(X, X0), f"unshift by {h} did not restore X"
            rep += 1
    return times


def _opt_block(opt, grad, gamma: float, k: int, W0, V0, policy: RepeatPolicy, report) -> dict:
    """Timed pairs of the optimiser phase: k steps, then k unsteps (unstep_position + unstep_velocity)."""
    times = {op: [] for op in OPT_OPS}
    rep = 0
    while policy.more(rep, times["step"], times["unstep"]):
        t0 = time.perf_counter()
        for _ in range(k):
            opt.step(grad, ALPHA, gamma)
        t1 = time.perf_counter()
        if rep == 0 and report is not None:
            times["report"] = report()
        t2 = time.perf_counter()
        for _ in range(k):
            opt.unstep_position(ALPHA)
            opt.unstep_velocity(grad, gamma)
        t3 = time.perf_counter()
        times["step"].append(t1 - t0)
        times["unstep"].append(t3 - t2)
        assert same(opt.fixed_params, W0) and same(opt.fixed_velocity, V0), "unstep did not restore W, V"
        rep += 1
    return times


def _with_retries(block, contention: ContentionPolicy, ops: tuple, counts: dict, L: int):
    """Run ``block(attempt)`` once, and again (after a wait) while other processes competed; returns the merged
    times, the report of the first attempt and the attempts."""
    times = {op: [] for op in ops}
    attempts, report = [], None
    for attempt in range(1 + contention.retries):
        if attempt:
            time.sleep(contention.wait_s)
        meter = CpuMeter()
        t0 = time.perf_counter()
        ta = block(attempt)
        if "report" in ta:
            report = ta.pop("report")
        oth = meter.other_cores()
        att_s = time.perf_counter() - t0
        attempts.append({"other_processes_cores": oth, "seconds": att_s,
                         "rates": {op: L * counts[op] / min(ta[op]) for op in ops}})
        for op in ops:
            times[op] += ta[op]
        if oth is None or oth <= contention.threshold or att_s > contention.max_block_s:
            break
    return times, report, attempts


def run_cell(be: str, L: int, T: int, k: int, gamma: float, policy: RepeatPolicy, mode: str, budget_s: float,
             calib: dict, seed: int, contention: ContentionPolicy) -> dict:
    """One (backend, lanes, depth) cell of the protocol in the module docstring."""
    k = min(k, T)
    m = T - k
    h_all = schedule_shifts(gamma, T)
    h_pre, h_seg = h_all[:m], h_all[m:].tolist()
    sum_pre, sum_all = int(h_pre.sum()), int(h_all.sum())
    m1 = h1_steps(k)
    counts = {"shift": k, "unshift": k, "shift_h1": m1, "unshift_h1": m1, "shift_h0": k, "unshift_h0": k,
              "step": k, "unstep": k}
    est = preload_estimates(h_pre, calib)
    cell = {"backend": be, "lanes": L, "T": T, "timed_steps": k, "h1_steps": m1, "gamma": gamma,
            "segment_shifting_steps": int(sum(1 for h in h_seg if h)), "segment_h": h_seg,
            "schedule_shifting_fraction": float((h_all > 0).mean()), "loadavg_before": loadavg(),
            "preload_estimate_s": est, "budget_s": budget_s, "counts": counts}
    chosen = ("real" if est["real"] <= budget_s else "packed") if mode == "auto" else mode
    if m == 0:
        chosen = "none"
    e = {"real": est["real"], "packed": est["packed"], "none": 0.0}[chosen]
    if e > budget_s:
        cell.update(skipped=True, reason=f"estimated {chosen} preload+unwind {e:.0f} s exceeds --budget-s "
                                         f"{budget_s:g} s (measured per call: shift by 1 "
                                         f"{calib['shift_h1_s'] * 1e3:.2f} ms, by 16 "
                                         f"{calib['shift_h16_s'] * 1e3:.2f} ms)")
        return cell
    plan = {"real": h_pre.tolist(), "packed": packed_plan(sum_pre), "none": []}[chosen]
    cell["preload"] = {"method": chosen, "shifts": len(plan), "bit_shifting_calls": sum(1 for h in plan if h),
                       "sum_h": sum_pre, "equivalent_depth": m}

    rng = np.random.default_rng(seed)
    X = as_backend(be, velocity_like(rng, L))
    X0 = copy_of(X)
    P = as_backend(be, velocity_like(rng, L))
    P0 = copy_of(P)
    w0 = rng.uniform(-1.0, 1.0, L)
    grad = as_backend(be, rng.standard_normal(L) * VALUE_STD)

    # --- tape phase ---------------------------------------------------------------------------------------------
    tape = revsgd.Tape(L, backend=be)
    t0 = time.perf_counter()
    for h in plan:
        tape.shift(P, h)
    cell["preload"]["seconds"] = time.perf_counter() - t0
    times, rep, att_t = _with_retries(
        lambda a: _tape_block(tape, X, X0, h_seg, m1, k, policy,
                              (lambda: tape_report(tape, L, T, gamma, sum_all, be)) if a == 0 else None),
        contention, TAPE_OPS, counts, L)
    cell["tape_at_T"] = rep
    t0 = time.perf_counter()
    for h in reversed(plan):
        tape.unshift(P, h)
    cell["preload"]["unwind_seconds"] = time.perf_counter() - t0
    assert tape.at_start(), "tape not at start after unwinding everything"
    assert same(P, P0) and same(X, X0), "P or X not restored"
    del tape
    gc.collect()

    # --- optimiser phase ----------------------------------------------------------------------------------------
    opt, api = make_optimizer(be, w0)
    cell["optimizer_api"] = api
    st = optimizer_storage(opt)
    if st is None and plan:
        cell["optimizer_skipped"] = ("the optimiser's tape storage is not reachable (ExactMomentum._tape), so its "
                                     "tape cannot be preloaded to depth T - k")
        att_o = []
    else:
        W0, V0 = opt.fixed_params, opt.fixed_velocity
        t0 = time.perf_counter()
        for h in plan:
            storage_shift(be, st, P, h, True)
        cell["preload"]["optimizer_seconds"] = time.perf_counter() - t0

        def opt_report():
            return {"info_bits": opt.info_bits, "tape_bytes": opt.tape_bytes, "steps_on_top_of_preload": k}
        t_o, rep, att_o = _with_retries(
            lambda a: _opt_block(opt, grad, gamma, k, W0, V0, policy, opt_report if a == 0 else None),
            contention, OPT_OPS, counts, L)
        times.update(t_o)
        cell["optimizer_at_T"] = rep
        t0 = time.perf_counter()
        for h in reversed(plan):
            storage_shift(be, st, P, h, False)
        cell["preload"]["optimizer_unwind_seconds"] = time.perf_counter() - t0
        assert opt.at_start(), "optimiser tape not at start after unwinding everything"
        assert same(P, P0), "P not restored"
        assert same(opt.fixed_params, W0) and same(opt.fixed_velocity, V0), "W or V not restored"

    cell["attempts"] = {"tape": att_t, "optimizer": att_o}
    per_phase = [min((a["other_processes_cores"] for a in att if a["other_processes_cores"] is not None),
                     default=None) for att in (att_t, att_o) if att]
    per_phase = [x for x in per_phase if x is not None]
    cell["other_processes_cores"] = max(per_phase) if per_phase else None
    cell["reversed_to_start"] = True
    cell["loadavg_after"] = loadavg()
    cell["times_s"] = times
    cell["rates"] = {op: L * counts[op] / min(ts) for op, ts in times.items()}
    f1 = cell["schedule_shifting_fraction"]
    r = cell["rates"]
    cell["schedule_model"] = {a: 1.0 / (f1 / r[f"{a}_h1"] + (1 - f1) / r[f"{a}_h0"]) for a in ("shift", "unshift")}
    del opt, X, X0, P, P0, grad
    gc.collect()
    return cell


def _fmt(x, spec: str = ".2f") -> str:
    return "?" if x is None else format(x, spec)


def _log_cell(cell: dict) -> None:
    be, L, T = cell["backend"], cell["lanes"], cell["T"]
    if cell.get("skipped"):
        log(f"  {be:6s} L={L:.0e} T={T:<6d} SKIPPED: {cell['reason']}")
        return
    r, tr = cell["rates"], cell["tape_at_T"]
    log(f"  {be:6s} L={L:.0e} T={T:<6d} [{cell['preload']['method']:6s}] " +
        " ".join(f"{op} {r[op] / 1e6:.4g}" for op in OPS if op in r) +
        f" M/s | info {tr['info_ratio']:.5f} | bytes ok {tr['nbytes_within_bound']} | other procs "
        f"{_fmt(cell.get('other_processes_cores'))} cores | {cell['cell_wall_s']:.1f}s")


def _pin_threads(be: str, threads: int) -> None:
    revsgd.set_num_threads(threads)
    if be == "torch":
        import torch
        torch.set_num_threads(threads)


def backend_job(be: str, cfg: dict) -> dict:
    """Every cell of one backend (plus its preload cross-check), in one process."""
    # read the libraries' thread counts first, and numba's only in the numba process: starting numba's threading
    # layer resets the process-wide OpenMP thread count (torch's count went from 1 to 2 when read afterwards)
    info = kernel_threads_info(with_numba=be == "numba")
    threads = cfg["threads"]
    _pin_threads(be, threads)
    policy = RepeatPolicy(repeats=cfg["repeats"], budget_s=cfg["repeat_budget_s"])
    contention = ContentionPolicy(**cfg["contention"])
    alloc = settle_allocator()
    gamma, k, budget_s, seed = cfg["gamma"], cfg["k"], cfg["budget_s"], cfg["seed"]
    warm_up(be, gamma)
    out = {"cells": [], "crosscheck": [],
           "process": {"pid": os.getpid(), "threads": threads, "allocator": alloc}}
    for key in ("cpp_threads", "numba_threads"):
        if key in info:
            out["process"][key] = info[key]
    if be == "numba":
        try:
            import numba
            out["process"]["numba_threading_layer"] = numba.threading_layer()
            out["process"]["numba_threads_after_warmup"] = numba.get_num_threads()
        except Exception:  # noqa: BLE001
            pass
    if be == "torch":
        import torch
        out["process"]["torch_threads_after_warmup"] = torch.get_num_threads()
    calib = {}
    for L in cfg["lanes"]:
        calib[L] = cb = calibrate(be, L)
        for T in cfg["steps"]:
            _pin_threads(be, threads)
            t0 = time.perf_counter()
            cell = run_cell(be, L, T, k, gamma, policy, cfg["preload"], budget_s, cb, seed, contention)
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
            other = run_cell(be, L, Tmax, k, gamma, policy, "packed", budget_s, calib[L], seed + 1, contention)
            if other.get("skipped"):
                continue
            x = {"backend": be, "lanes": L, "T": Tmax, "rates_real": cell["rates"], "rates_packed": other["rates"],
                 "packed_over_real": {op: other["rates"][op] / cell["rates"][op]
                                      for op in OPS if op in other["rates"] and op in cell["rates"]},
                 "info_bits_real": cell["tape_at_T"]["info_bits"], "info_bits_packed": other["tape_at_T"]["info_bits"],
                 "nbytes_real": cell["tape_at_T"]["nbytes"], "nbytes_packed": other["tape_at_T"]["nbytes"],
                 "other_processes_cores": [cell.get("other_processes_cores"), other.get("other_processes_cores")]}
            out["crosscheck"].append(x)
            log(f"  {be:6s} L={L:.0e} T={Tmax:<6d} preload packed/real: " +
                " ".join(f"{op} {v:.2f}" for op, v in x["packed_over_real"].items()))
    if be == "torch":
        import torch
        out["process"]["torch_threads_at_end"] = torch.get_num_threads()
    return out


# ---------------------------------------------------------------------------------------------------------------
# bigint baseline: one Python int per lane (hypergrad's BitStore)
# ---------------------------------------------------------------------------------------------------------------
def bigint_n(gamma: float) -> int:
    """hypergrad's rational approximation of γ < 1: n/2^16 with n = ⌊γ·2^16 + 1⌋ (exact_rep.float_to_rational)."""
    return min(65536, int(math.floor(gamma * 65536 + 1)))


def bigint_bits_per_step(n: int) -> float:
    return -math.log2(n / 65536.0)


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
    ns = [58983, 1, 65536, 3, 40000, 58983, 7, 65535] + [rnd.randint(1, 65536) for _ in range(12)]
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
    expected = sum(bigint_bits_per_step(n) for n in ns)
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
    nbits = max(1, round(depth * bigint_bits_per_step(n)))
    X0 = velocity_like(rng, L).tolist()
    S0 = [rnd.getrandbits(nbits) | (1 << (nbits - 1)) for _ in range(L)]
    out = {"lanes": L, "depth": depth, "n": n, "store_bits_per_lane": nbits, "timed_steps": k}
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
    m = machine()
    env = {
        "python": sys.version.split()[0],
        "platform": m["platform"],
        "machine": m["machine"],
        "processor": m["processor"],
        "os_cpu_count": m["os_cpu_count"],
        "affinity_cpus": m["affinity_cpus"],
        "memory_total_mb": m["memory_total_mb"],
        "loadavg_at_start": m["loadavg"],
        "numpy": np.__version__,
        "revsgd": getattr(revsgd, "__version__", None),
        "backends_available": list(revsgd.BACKENDS),
        "threads_requested": threads,
    }
    if m["cpu_model"] is not None:
        env["cpu_model"] = m["cpu_model"]
    for mod in ("numba", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    env.update(kernel_threads_info())
    env.update(git_state())
    return env


# ---------------------------------------------------------------------------------------------------------------
# a whole run
# ---------------------------------------------------------------------------------------------------------------
def protocol_text(k: int, repeats: int, gamma: float) -> str:
    return (
        f"Per cell (backend, lanes L, depth T), gamma={gamma} used as given, (e_t, h_t) = decay_scales. Tape phase: "
        f"preload a revsgd.Tape to depth T-k (k={k}) by Tape.shift of a separate int64 array P: 'real' = the T-k "
        "shifts of the real schedule (most h = 0), 'packed' = floor(sum h/16) shifts by 16 + one by sum h mod 16 "
        "(same rows, pending bits, words, capacity and information: the layout is data-independent; only the "
        "depth counter differs); 'auto' picks real if its estimated preload+unwind time fits budget_s, else "
        f"packed, else the cell is skipped. Then time (perf_counter, best of >= {repeats}) k Tape.shift of a "
        "velocity-like X with h_{T-k..T-1} (info and bytes read at depth T), the k unshifts (X restored bit for "
        "bit), 16*ceil(k/16) shifts and unshifts by 1, k shifts and unshifts by 0; unwind P, tape at start. "
        "Optimiser phase: a fresh ExactMomentum (torch: the same revsgd.kernels.momentum call on tensors), its "
        "tape preloaded the same way through revsgd.kernels.shift; time k step(grad, lr, gamma) and k unsteps "
        "(unstep_position + unstep_velocity = one element-step; W, V restored); unwind. Rate = L*count/best "
        "seconds (element-steps/s). Flat in T: rate(T_max)/rate(T_min) ~ 1. numpy_add: best of repeats of "
        "'a += b' on int64 arrays of length L, same run (best of start and end).")


def run_benchmark(*, backends: list, lanes: list, steps: list, k: int, repeats: int, gamma: float, preload: str,
                  budget_s: float, threads: int, seed: int, quick: bool, repeat_budget_s: float,
                  contention: ContentionPolicy, isolate: bool, crosscheck: bool,
                  big_lanes: int, big_depths: list, big_k: int, command: str) -> dict:
    """The whole benchmark (module docstring); returns the JSON document and logs the table to stderr."""
    if not 2.0 ** -15 <= gamma < 1.0:
        raise ValueError(f"gamma must lie in [2^-15, 1), got {gamma}")
    allocator = settle_allocator()
    revsgd.set_num_threads(threads)
    policy = RepeatPolicy(repeats=repeats, budget_s=repeat_budget_s)
    wall0 = time.perf_counter()
    n_big = bigint_n(gamma)
    doc = {
        "benchmark": "revsgd kernels: element-steps/s, flat in T",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"backends": backends, "lanes": lanes, "steps_T": steps, "timed_steps_k": k,
                   "h1_steps": h1_steps(k), "repeats": repeats, "gamma": gamma,
                   "info_limit_bits_per_lane_step": bits_per_step(gamma),
                   "schedule_shifting_fraction": float((schedule_shifts(gamma, max(steps)) > 0).mean()),
                   "preload_mode": preload, "budget_s": budget_s, "threads": threads, "frac_bits": FRAC_BITS,
                   "alpha": ALPHA, "value_std": VALUE_STD, "quick": quick, "seed": seed,
                   "repeat_budget_s": repeat_budget_s, "isolated_backend_processes": isolate,
                   "contention_retry": contention.as_dict(), "allocator": allocator,
                   "bytes_bound": f"{BYTES_SLACK} * info/8 + 2*lanes + {BYTES_CONST}",
                   "bigint_n": n_big, "bigint_gamma": n_big / 65536},
        "protocol": protocol_text(k, repeats, gamma),
        "environment": environment(threads),
        "numpy_add": {},
        "cells": [],
    }
    log(f"revsgd kernel bench: backends={backends} lanes={lanes} T={steps} k={k} gamma={gamma} threads={threads} "
        f"preload={preload} budget={budget_s:g}s")

    # bigint self-check first: cheap, and a failure should stop the run early
    doc["bigint_selfcheck"] = bigint_selfcheck(seed)

    cfg = {"lanes": lanes, "steps": steps, "k": k, "gamma": gamma, "repeats": repeats, "preload": preload,
           "budget_s": budget_s, "seed": seed, "threads": threads, "crosscheck": crosscheck,
           "repeat_budget_s": repeat_budget_s, "contention": contention.as_dict()}
    for L in lanes:
        add = numpy_add_rate(L, max(k, 20), policy)
        doc["numpy_add"][str(L)] = {"rate_start": add["rate"]}
        log(f"numpy a+=b at {L:.0e} lanes: {add['rate'] / 1e6:.0f} M el-ops/s")
    doc["preload_crosscheck"] = []
    doc["backend_processes"] = {}
    for be in backends:
        if not isolate:
            res = backend_job(be, cfg)
        else:
            # a fresh process per backend, as a user runs one backend: the numba and C++ kernels share one
            # libgomp, and having used one changes how the other's threads wait
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                res = pool.apply(backend_job, (be, cfg))
        doc["cells"] += res["cells"]
        doc["preload_crosscheck"] += res["crosscheck"]
        doc["backend_processes"][be] = res["process"]

    doc["bigint"] = {"description": "one Python int per lane (hypergrad BitStore), rational multiplication by "
                                    f"n/65536 with n = {n_big}: 'list' = plain list with a per-lane loop "
                                    "(primary), 'object_array' = numpy object array, whole-array ops as in "
                                    "hypergrad/exact_rep.py",
                     "runs": [bigint_bench(big_lanes, d, n_big, big_k, repeats, seed) for d in big_depths]}

    # numpy add again at the end; keep the best
    for L in lanes:
        add = numpy_add_rate(L, max(k, 20), policy)
        e = doc["numpy_add"][str(L)]
        e["rate_end"] = add["rate"]
        e["rate"] = max(e["rate_start"], add["rate"])   # the ratios below use this (best of start and end)

    summarize(doc, backends, lanes, steps, big_lanes)
    doc["wall_s"] = time.perf_counter() - wall0
    log_report(doc, big_lanes)
    return doc


# ---------------------------------------------------------------------------------------------------------------
# derived numbers and the table
# ---------------------------------------------------------------------------------------------------------------
def summarize(doc: dict, backends: list, lanes: list, steps: list, big_lanes: int) -> None:
    """Derived numbers (in place): ratios to numpy a+=b, flatness in T, best backend per cell, the bigint
    comparison, the headline and the checks summary."""
    done = [c for c in doc["cells"] if not c.get("skipped")]
    for c in done:
        add = doc["numpy_add"][str(c["lanes"])]["rate"]
        c["ratio_to_numpy_add"] = {op: v / add for op, v in c["rates"].items()}
    flat = []
    for be in backends:
        for L in lanes:
            cs = sorted((c for c in done if c["backend"] == be and c["lanes"] == L), key=lambda c: c["T"])
            if len(cs) >= 2:
                a, b = cs[0], cs[-1]
                flat.append({"backend": be, "lanes": L, "T_min": a["T"], "T_max": b["T"],
                             "preload_T_max": b["preload"]["method"],
                             "rate_T_max_over_T_min": {op: b["rates"][op] / a["rates"][op] for op in OPS
                                                       if op in a["rates"] and op in b["rates"]},
                             "schedule_model_T_max_over_T_min": {
                                 op: b["schedule_model"][op] / a["schedule_model"][op] for op in ("shift", "unshift")},
                             "segment_shifting_steps": [a["segment_shifting_steps"], b["segment_shifting_steps"]]})
    doc["flatness"] = flat

    def best(L, T):
        cs = [c for c in done if c["lanes"] == L and c["T"] == T]
        if not cs:
            return None
        return {op: max((c["rates"][op], c["backend"]) for c in cs if op in c["rates"])
                for op in OPS if any(op in c["rates"] for c in cs)}

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
        pairs = {"scale": ("shift", "shift_h1"), "unscale": ("unshift", "unshift_h1")}
        for run in doc["bigint"]["runs"]:
            x = {"bigint_depth": run["depth"], "store_bits_per_lane": run["store_bits_per_lane"],
                 "bigint_list_rate": {op: run["list"][op] for op in pairs},
                 "bigint_object_array_rate": {op: run["object_array"][op] for op in pairs}}
            for op, ours in pairs.items():
                for o in ours:
                    if o in b:
                        x[f"best_{o}"] = {"backend": b[o][1], "rate": b[o][0],
                                          "over_bigint_list": b[o][0] / run["list"][op],
                                          "over_bigint_object_array": b[o][0] / run["object_array"][op]}
            rb.append(x)
        summary["bigint_comparison"] = {"backend_cell": {"lanes": Lb, "T": Tb}, "runs": rb,
                                        "note": "bigint does its work at every step; 'shift' is revsgd's average "
                                                "over the real schedule, 'shift_h1' a step that shifts"}
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
                    "preload": ch[bh[op][1]]["preload"]["method"]} for op in bh},
        }
    summary["all_reversed_to_start"] = all(c.get("reversed_to_start") for c in done)
    summary["all_info_equals_sum_of_shifts"] = all(c["tape_at_T"]["info_equals_sum_of_shifts"] for c in done)
    summary["all_deficit_below_one_bit_per_lane"] = all(c["tape_at_T"]["deficit_below_one_bit_per_lane"]
                                                        for c in done)
    ratios = [c["tape_at_T"]["info_ratio"] for c in done]
    summary["info_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    deficits = [c["tape_at_T"]["deficit_bits_per_lane"] for c in done]
    summary["deficit_bits_per_lane_range"] = [min(deficits), max(deficits)] if deficits else None
    summary["all_nbytes_within_bound"] = all(c["tape_at_T"]["nbytes_within_bound"] for c in done)
    summary["all_nbytes_within_backend_bound"] = all(c["tape_at_T"]["nbytes_within_backend_bound"] for c in done)
    summary["cells_over_bytes_bound"] = [
        {"backend": c["backend"], "lanes": c["lanes"], "T": c["T"], "nbytes": c["tape_at_T"]["nbytes"],
         "bound": c["tape_at_T"]["nbytes_bound"], "stack_growth": c["tape_at_T"]["stack_growth"]}
        for c in done if not c["tape_at_T"]["nbytes_within_bound"]]
    oth = [c.get("other_processes_cores") for c in done if c.get("other_processes_cores") is not None]
    summary["max_other_processes_cores"] = max(oth) if oth else None
    summary["contended_cells"] = [{"backend": c["backend"], "lanes": c["lanes"], "T": c["T"],
                                   "other_processes_cores": c["other_processes_cores"]}
                                  for c in done if (c.get("other_processes_cores") or 0) > 0.25]
    summary["skipped_cells"] = [{"backend": c["backend"], "lanes": c["lanes"], "T": c["T"], "reason": c["reason"]}
                                for c in doc["cells"] if c.get("skipped")]
    summary["optimizer_skipped"] = [{"backend": c["backend"], "lanes": c["lanes"], "T": c["T"],
                                     "reason": c["optimizer_skipped"]} for c in done if c.get("optimizer_skipped")]
    doc["summary"] = summary


def _m(x) -> str:
    """A rate in M/s, in at most 6 characters."""
    v = x / 1e6
    return f"{v:6.0f}" if v >= 1000 else f"{v:6.1f}"


def log_report(doc: dict, big_lanes: int) -> None:
    """The human-readable table and summary lines, on stderr."""
    summary, flat = doc["summary"], doc["flatness"]
    log("\n== element-steps/s (M/s); (x) = ratio to numpy a+=b; sched = the real gamma schedule's steps, h1/h0 = "
        "steps shifting by 1/0 bits; info = held/limit; bytes = nbytes <= bound; other = cores kept busy by other "
        "processes while timing ==")
    log(f"{'backend':7s} {'lanes':>6s} {'T':>6s} {'pre':6s} {'shift sched':>14s} {'unshift sched':>14s} "
        f"{'h1 sh/unsh':>13s} {'h0 sh/unsh':>13s} {'step':>14s} {'unstep':>14s} {'info':>8s} {'bytes':>5s} "
        f"{'other':>5s}")
    for c in doc["cells"]:
        head = f"{c['backend']:7s} {c['lanes']:6.0e} {c['T']:6d} "
        if c.get("skipped"):
            log(head + f"SKIPPED ({c['reason']})")
            continue
        r, x = c["rates"], c["ratio_to_numpy_add"]

        def rx(op):
            return f"{_m(r[op])} ({x[op]:5.3f})" if op in r else f"{'—':>14s}"
        log(head + f"{c['preload']['method']:6s} {rx('shift')} {rx('unshift')} "
            f"{_m(r['shift_h1'])}/{_m(r['unshift_h1'])} {_m(r['shift_h0'])}/{_m(r['unshift_h0'])} "
            f"{rx('step')} {rx('unstep')} {c['tape_at_T']['info_ratio']:8.5f} "
            f"{str(c['tape_at_T']['nbytes_within_bound']):>5s} {_fmt(c.get('other_processes_cores')):>5s}")
    log("numpy a+=b: " + ", ".join(f"L={int(L):.0e}: {v['rate'] / 1e6:.0f} M/s" for L, v in doc["numpy_add"].items()))
    if flat:
        log("flat in T (rate T_max / rate T_min; for the schedule average also the shifting steps in the two timed "
            "segments and the ratio of schedule_model, which removes that count): " + "; ".join(
                f"{f['backend']} L={f['lanes']:.0e}: " + " ".join(
                    f"{op} {v:.2f}" + (f" [{'/'.join(map(str, f['segment_shifting_steps']))}; model "
                                       f"{f['schedule_model_T_max_over_T_min'][op]:.2f}]"
                                       if op in f["schedule_model_T_max_over_T_min"] else "")
                    for op, v in f["rate_T_max_over_T_min"].items())
                for f in flat))
    for x in doc["preload_crosscheck"]:
        log(f"preload packed/real at L={x['lanes']:.0e} T={x['T']} {x['backend']}: " +
            " ".join(f"{op} {v:.2f}" for op, v in x["packed_over_real"].items()))
    for r in summary.get("bigint_comparison", {}).get("runs", []):
        parts = []
        for o in ("shift", "shift_h1", "unshift", "unshift_h1"):
            if f"best_{o}" in r:
                parts.append(f"{o} {r[f'best_{o}']['over_bigint_list']:.0f}x")
        log(f"bigint ({r['store_bits_per_lane']} bits/lane, depth {r['bigint_depth']}, L={big_lanes:.0e}): list "
            f"scale/unscale {r['bigint_list_rate']['scale'] / 1e6:.2f}/{r['bigint_list_rate']['unscale'] / 1e6:.2f}"
            f" M/s; best backend / bigint list: " + ", ".join(parts))
    h = summary.get("headline")
    if h:
        log(f"headline L={h['lanes']:.0e} T={h['T']}: " + ", ".join(
            f"{op} {h[op]['backend']} {h[op]['rate'] / 1e6:.0f} M/s ({h[op]['ratio_to_numpy_add']:.3f})"
            for op in OPS if op in h) + f"; numpy a+=b {h['numpy_add_rate'] / 1e6:.0f} M/s")
    lo, hi = summary["info_ratio_range"] or (None, None)
    log(f"all reversed: {summary['all_reversed_to_start']}; info = sum of shifts: "
        f"{summary['all_info_equals_sum_of_shifts']}; limit - held in [0, 1) bit/lane: "
        f"{summary['all_deficit_below_one_bit_per_lane']} (held/limit {_fmt(lo, '.5f')}..{_fmt(hi, '.5f')}); "
        f"nbytes within 1.04 bound: "
        f"{summary['all_nbytes_within_bound']} (backend's own growth: {summary['all_nbytes_within_backend_bound']}); "
        f"skipped: {len(summary['skipped_cells'])}; cells timed while other processes used > 0.25 core: "
        f"{len(summary['contended_cells'])}; wall {doc['wall_s']:.0f} s")
