"""Time, memory and accuracy of every hypergradient method, and of two peer libraries, as the unroll length T grows.

Problems (``--problem``, builders in :mod:`revsgd.problems`; all float32, cross-entropy + exp(log_l2)·Σ‖W‖² with
hyper ``log_l2 = -8``, minibatch t a pure function of (seed=0, t), validation loss = mean cross-entropy on the
validation split; nothing is downloaded):

- ``digits``: ``digits_mlp()``, a 64-100-10 tanh MLP (7,510 parameters, init N(0, 1/fan_in) with seed 0, zero
  biases) on scikit-learn's bundled 8×8 digits (first 1,200 images for training, the other 597 for validation,
  pixels / 16), batch 64;
- ``mlp1m``: ``mlp1m()``, a 784-1024-256-10 tanh MLP (1,068,810 parameters) on the same digits bilinearly
  upsampled to 28×28, batch 128;
- ``cnn1m``: ``cnn1m()``, conv 3×3 stride 2 (1→32) → tanh → conv 3×3 stride 2 (32→64) → tanh → 3136-300-10 tanh
  (962,926 parameters) on the 28×28 digits, batch 128.

Optimisers (``--optimizer``, one per run; every schedule a float32 tensor of shape (T,), constant, used as given —
no quantisation):

- ``heavyball`` (default, the historical table): ``lr = 0.2``, ``momentum = 0.9`` (v ← γv − (1−γ)g, w ← w + αv);
- ``sgd`` (torch.optim.SGD): ``lr = 0.02``, ``momentum = 0.9`` — the same trajectory as heavyball (lr α(1 − γ));
- ``adam``: ``lr = 1e-3``, ``betas = (0.9, 0.999)``, ``eps = 1e-8``, ``weight_decay = 0``;
- ``adamw``: as adam with ``weight_decay = 0.01`` (decoupled).

Hypergradients of the validation loss after T steps with respect to every schedule (T,), params0 (all weights,
flattened in dict order) and log_l2.

Methods: ``exact``, ``naive``, ``trajectory``, ``checkpoint`` (k = √T), ``replay`` (REPLAY's k-ary tree, k = 4),
``drmad``, ``truncated`` (K = T/10) — all through ``revsgd.hypergrad(..., optimizer=OPT, threads=THREADS)``; drmad
and truncated for heavyball / sgd only (adam / adamw: exact, naive, trajectory, checkpoint, replay); the peers
``torchopt`` and ``higher`` (optional installs, :mod:`revsgd.bench.peers`: hypergradients by autograd through their
differentiable optimisers — heavyball through torch.optim.SGD's form lr = α(1 − γ), momentum = γ; torchopt's
momentum is one value per run, so its momentum gradient is the tied one, Σ_t ∂f/∂γ_t, compared against the sum of
exact's; higher has no AdamW; a peer that is not installed or has no such optimiser is recorded as skipped with the
reason); and ``plain``: ordinary training without any hypergradient — ``torch.optim.SGD`` (heavyball: lr = α(1 − γ),
momentum = γ, dampening 0), ``torch.optim.Adam`` or ``torch.optim.AdamW`` with the same hyperparameters, in the
params' dtype (float32), first-order gradients only.

Default run (no ``--steps``/``--methods``/``--quick``): ``digits`` at T = 1000 for every method, at T = 10000 for
plain, exact, naive, torchopt, higher, replay and checkpoint, and exact + plain at T = 100,000 (``--exact-extra``);
``mlp1m`` and ``cnn1m`` at T ∈ {100, 1000, 10000} for plain, exact, naive, torchopt, higher and replay (methods the
optimiser does not support are left out). A method that ran out of memory (or time) at some T is not started at a
larger T of the same problem (recorded as skipped, with the reason). ``--steps`` runs every selected method at
those T's instead.

Protocol: every (problem, method, T) runs in a FRESH child process (``python -m revsgd.bench.unroll --child
JSON``) with ``OMP_NUM_THREADS`` = ``torch.set_num_threads`` = ``revsgd.set_num_threads`` = ``--threads``
(default 1; the child records the count the call actually pinned, ``stats.threads``). The child imports torch,
revsgd (and the peer library), builds the problem and the schedules, pays torch's one-off start-up costs
(:func:`warm_up_torch`: one gradient, one Hessian-vector product — torch imports sympy on the first
``autograd.grad`` with ``grad_outputs`` — and one step of the torch.optim optimiser of the run — its constructor
imports torch._dynamo; ~2 s and ~80 MB together, recorded under ``warmup``), and records its RSS (``baseline``);
then it runs the method once and records

- ``seconds``: wall time of the ``hypergrad`` call (this includes revsgd's one-off per-process kernel warm-up, if
  the installed revsgd does one) (``plain``: of the training loop + validation loss; peers: of unroll + grad), and
  ``seconds_forward`` / ``seconds_reverse`` from ``result.stats``;
- ``peak_rss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at the end (MB = 2^20 bytes), and
  ``rss_over_baseline_mb`` = peak − baseline RSS;
- ``tape_bytes``, ``info_bits``, ``storage_bytes`` from ``result.stats``;
- the hypergradients, saved to a temporary .npz. The parent computes, per key (each schedule, params0, log_l2),
  the relative error ‖x − x_exact‖ / ‖x_exact‖ and the cosine similarity against ``exact`` at the same problem
  and T (a peer's ``<key>_tied`` against the sum over t of exact's ``<key>``).

With ``--repeats N`` every cell runs in N fresh children and the fastest ok run is reported (all N are kept in
the JSON, with the median time); use it on a busy machine, with ``--quiet-wait-s`` (wait before each child until
other processes use < 0.25 core; what was waited and seen is recorded per cell).

Memory guard: the child caps its address space (RLIMIT_AS = its virtual size after setup + ``--mem-limit-gb``), and
the parent polls the child's RSS every 0.1 s and kills it if it exceeds ``--mem-limit-gb``; either way the cell is
recorded as ``out of memory`` (a timeout as ``timeout``) and the run goes on.

Outputs: JSON (``--out``; rewritten after every cell so a partial run is kept: argv, machine, versions, every
cell), a PNG with two log-log panels per problem (peak RSS and seconds vs T, one line per method; ``--png``), and
a markdown table per problem plus the headline ratios on stdout. digits: exact/naive time at T = 1000,
exact/torchopt and exact/higher time at T = 1000 and 10,000, exact − plain peak RSS at T = 10,000, replay's and
checkpoint's time and memory beside exact's at both T, exact at T = 100,000 (the targets ≤ 1.5 and ≤ +50 MB are
the heavy-ball table's); 1M-parameter problems: exact/plain time at T = 1000 and exact peak RSS − (plain peak RSS +
tape bytes) at T = 10,000, replay and checkpoint beside them. Progress (a live line per running child on stderr)
is on when stderr is a terminal (``--progress`` / ``--no-progress`` to force); one line per finished cell goes to
stderr either way.

Examples::

    revsgd bench --out bench_out                                # digits, heavyball, T in {100, 1000}
    python scripts/bench_unroll.py --quick                      # smoke run of all three problems, ~2-3 min
    python scripts/bench_unroll.py --quick --optimizer adam     # the same for Adam
    python scripts/bench_unroll.py --out out/bench_unroll.json  # the full tables (long); figure out/bench_unroll.png
    python scripts/bench_unroll.py --problem digits --steps 1000 --methods exact naive torchopt plain --exact-extra
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from .._argtypes import positive_int as _pos_int
from .timing import (MB, CpuMeter, cpu_seconds_children, cpu_seconds_self, machine, maxrss_mb, proc_status, versions,
                     wait_for_quiet)

CORE_METHODS = ("exact", "naive", "trajectory", "checkpoint", "replay", "drmad", "truncated")
PEER_METHODS = ("torchopt", "higher")
ALL_METHODS = ("plain", "exact", "naive", "torchopt", "higher", "trajectory", "checkpoint", "replay", "drmad",
               "truncated")
PROBLEM_NAMES = ("digits", "mlp1m", "cnn1m")
OPTIMIZERS = ("heavyball", "sgd", "adam", "adamw")
#: Constant schedules per optimiser (each becomes a float32 tensor of shape (T,)).
SCHEDULES = {
    "heavyball": {"lr": 0.2, "momentum": 0.9},
    "sgd": {"lr": 0.02, "momentum": 0.9},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
}
#: The decaying schedules whose hypergradients get a column in the table (besides lr, params0, log_l2).
DECAY_KEYS = {"heavyball": ("momentum",), "sgd": ("momentum",), "adam": ("beta1", "beta2"),
              "adamw": ("beta1", "beta2")}
#: What ``plain`` runs, per optimiser.
PLAIN = {"heavyball": "torch.optim.SGD(lr=lr*(1-momentum), momentum=momentum, dampening=0)",
         "sgd": "torch.optim.SGD(lr, momentum)", "adam": "torch.optim.Adam(lr, betas, eps, weight_decay)",
         "adamw": "torch.optim.AdamW(lr, betas, eps, weight_decay)"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")

#: What each problem is, for the JSON (the builders in revsgd.problems are the definition).
PROBLEM_INFO = {
    "digits": {"constructor": "revsgd.problems.digits_mlp()", "layers": "64-100-10 tanh MLP", "short": "MLP",
               "num_params": 7510,
               "data": "scikit-learn digits 8x8, 1200 train / 597 val", "batch": 64},
    "mlp1m": {"constructor": "revsgd.problems.mlp1m()", "layers": "784-1024-256-10 tanh MLP", "short": "MLP",
              "num_params": 1068810, "data": "scikit-learn digits upsampled to 28x28 (bilinear), 1200 train / 597 val",
              "batch": 128},
    "cnn1m": {"constructor": "revsgd.problems.cnn1m()",
              "layers": "conv3x3/2 1-32, tanh, conv3x3/2 32-64, tanh, 3136-300 tanh, 300-10", "short": "CNN",
              "num_params": 962926, "data": "scikit-learn digits upsampled to 28x28 (bilinear), 1200 train / 597 val",
              "batch": 128},
}
for _p in PROBLEM_INFO.values():
    _p.update(dtype="float32", log_l2=-8.0, seed=0)

_MAIN = ("plain", "exact", "naive", "torchopt", "higher", "replay")


def method_unsupported(method: str, optimizer: str) -> Optional[str]:
    """Why ``method`` does not run with ``optimizer`` (None when it does). Peers: :func:`peers.peer_unsupported`."""
    if method in ("drmad", "truncated") and optimizer in ("adam", "adamw"):
        return f"{method} is benchmarked for heavyball and sgd only (drmad: revsgd supports it for them only)"
    return None


def default_plan(problem: str) -> list:
    """(method, T) cells of the default run for ``problem`` (without the exact-extra T's)."""
    if problem == "digits":
        cells = [(m, 1000) for m in ALL_METHODS]
        return cells + [(m, 10000) for m in _MAIN + ("checkpoint",)]
    return [(m, T) for T in (100, 1000, 10000) for m in _MAIN]


def quick_plan(problem: str) -> list:
    if problem == "digits":
        return [(m, T) for T in (50, 200) for m in ALL_METHODS]
    return [(m, T) for T in (5, 20) for m in _MAIN]


DEFAULT_EXACT_EXTRA = {"digits": [100000], "mlp1m": [], "cnn1m": []}


# ------------------------------------------------------------------------------------------------------- child --

def schedules(optimizer: str, T: int) -> dict:
    """The run's schedules: name → float32 tensor (T,) (constant, :data:`SCHEDULES`)."""
    import torch
    return {k: torch.full((T,), v, dtype=torch.float32) for k, v in SCHEDULES[optimizer].items()}


def torch_optimizer(optimizer: str, params: list, sched: dict, t: int = 0):
    """The torch.optim optimiser that ``plain`` runs, with step t's hyperparameters (float64 values of the float32
    schedules, as every method gets them)."""
    import torch
    v = {k: float(x[t]) for k, x in sched.items()}
    if optimizer == "heavyball":
        return torch.optim.SGD(params, lr=v["lr"] * (1.0 - v["momentum"]), momentum=v["momentum"], dampening=0.0)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=v["lr"], momentum=v["momentum"])
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=v["lr"], betas=(v["beta1"], v["beta2"]), eps=v["eps"], weight_decay=v["weight_decay"])


def _set_step(opt, optimizer: str, sched: dict, t: int, lam_mu) -> None:
    """Step t's hyperparameters into the optimiser's param group (per-step schedules)."""
    g = opt.param_groups[0]
    if optimizer == "heavyball":
        g["lr"], g["momentum"] = lam_mu[0][t], lam_mu[1][t]
    elif optimizer == "sgd":
        g["lr"], g["momentum"] = float(sched["lr"][t]), float(sched["momentum"][t])
    else:
        g["lr"], g["betas"] = float(sched["lr"][t]), (float(sched["beta1"][t]), float(sched["beta2"][t]))
        g["eps"], g["weight_decay"] = float(sched["eps"][t]), float(sched["weight_decay"][t])


def _plain(prob, T, sched, optimizer):
    """Ordinary training with the torch.optim optimiser (:data:`PLAIN`), first-order gradients only, in the params'
    dtype (float32). Per-step schedules go into the param group before each step (heavyball: torch.optim.SGD's
    λ_t = α_t(1 − γ_t), μ_t of :func:`revsgd.bench.peers.torch_sgd_schedule`)."""
    import torch
    lam_mu = None
    if optimizer == "heavyball":
        from .peers import torch_sgd_schedule
        lam, mu = torch_sgd_schedule(sched["lr"].double(), sched["momentum"].double())
        lam_mu = (lam.tolist(), mu.tolist())
    keys = list(prob.params0)
    ps = [prob.params0[k].detach().clone().requires_grad_() for k in keys]
    opt = torch_optimizer(optimizer, ps, sched)
    t0 = time.perf_counter()
    for t in range(T):
        _set_step(opt, optimizer, sched, t, lam_mu)
        loss = prob.train_loss(dict(zip(keys, ps)), prob.hypers, t)
        gs = torch.autograd.grad(loss, ps)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
    t1 = time.perf_counter()
    with torch.no_grad():
        f = float(prob.val_loss(dict(zip(keys, ps)), prob.hypers))
    t2 = time.perf_counter()
    return f, {"seconds_forward": t1 - t0, "seconds_reverse": 0.0, "seconds_val": t2 - t1,
               "tape_bytes": 0, "info_bits": 0.0, "storage_bytes": 0, "plain": PLAIN[optimizer]}


def _flat_grads(r) -> dict:
    """Every hypergradient of a result as a flat float64 NumPy array: each schedule, params0, each hyper."""
    import numpy as np
    out = {}
    for k, v in r.grads.items():
        if k == "params0":
            out[k] = np.concatenate([x.double().reshape(-1).numpy() for x in v.values()])
        elif v is not None:
            out[k] = v.detach().double().reshape(-1).numpy()
    return out


def warm_up_torch(prob, optimizer: str = "heavyball") -> dict:
    """torch's one-off start-up costs, paid in every child's setup so that they count in no method's time or
    RSS over baseline: one training-loss gradient (autograd start-up); one Hessian-vector product with
    ``grad_outputs`` (torch imports sympy lazily on the first such call: ~0.6 s, ~40 MB here); one step of the
    run's torch.optim optimiser on a dummy tensor (its constructor imports torch._dynamo: ~1.7 s, ~40 MB here).
    Returns seconds and RSS after each step."""
    import torch
    rec = {}
    t0 = time.perf_counter()
    with torch.enable_grad():
        ps = {k: v.detach().clone().requires_grad_() for k, v in prob.params0.items()}
        gs = torch.autograd.grad(prob.train_loss(ps, prob.hypers, 0), list(ps.values()), create_graph=True)
        rec["grad_s"], rec["rss_after_grad_mb"] = time.perf_counter() - t0, proc_status().get("VmRSS", 0) / MB
        t0 = time.perf_counter()
        torch.autograd.grad(gs, list(ps.values()), grad_outputs=[torch.ones_like(g) for g in gs],
                            allow_unused=True)
        rec["hvp_s"], rec["rss_after_hvp_mb"] = time.perf_counter() - t0, proc_status().get("VmRSS", 0) / MB
    del ps, gs
    t0 = time.perf_counter()
    x = torch.zeros(1, requires_grad=True)
    opt = torch_optimizer(optimizer, [x], schedules(optimizer, 1))
    x.grad = torch.ones(1)
    opt.step()
    del opt, x
    rec["optim_s"], rec["rss_after_optim_mb"] = time.perf_counter() - t0, proc_status().get("VmRSS", 0) / MB
    return rec


def child_main(cfg: dict) -> None:
    """Run one cell (cfg: problem, optimizer, method, T, threads, result, grads, mem_limit_bytes) and write its
    record. ``threads`` None: nothing is pinned here and ``hypergrad`` gets no ``threads`` (revsgd's default)."""
    t_start = time.perf_counter()
    out = {"problem": cfg.get("problem", "digits"), "optimizer": cfg.get("optimizer", "heavyball"),
           "method": cfg["method"], "T": cfg["T"], "status": "error"}

    def dump():
        with open(cfg["result"], "w") as f:
            json.dump(out, f)

    try:
        import numpy as np
        import torch
        import revsgd
        from revsgd.problems import get_problem
        threads = cfg.get("threads")
        if threads is not None:
            torch.set_num_threads(int(threads))
            revsgd.set_num_threads(int(threads))
        method, T, optimizer = cfg["method"], int(cfg["T"]), out["optimizer"]
        if method in PEER_METHODS:
            from . import peers
            __import__(method)            # the library's import cost is setup, not part of the measurement
            runner = peers.RUNNERS[method]
        prob = get_problem(out["problem"])
        sched = schedules(optimizer, T)
        out["rss_after_setup_mb"] = proc_status().get("VmRSS", 0) / MB
        out["warmup"] = warm_up_torch(prob, optimizer)
        st = proc_status()
        out.update(baseline_rss_mb=st.get("VmRSS", 0) / MB, baseline_maxrss_mb=maxrss_mb(),
                   baseline_vmsize_mb=st.get("VmSize", 0) / MB, setup_seconds=time.perf_counter() - t_start,
                   threads_requested=threads, torch_threads=torch.get_num_threads(),
                   kernel_threads=revsgd.kernels.get_num_threads(), torch_version=torch.__version__,
                   revsgd_path=os.path.dirname(revsgd.__file__),
                   problem_description=prob.description, num_params=prob.num_params,
                   schedules={k: float(v[0]) for k, v in sched.items()})
        if cfg.get("mem_limit_bytes") and st.get("VmSize"):
            cap = st["VmSize"] + int(cfg["mem_limit_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            out["rlimit_as_mb"] = cap / MB
        try:
            t0 = time.perf_counter()
            if method == "plain":
                f, stats = _plain(prob, T, sched, optimizer)
                grads = None
            elif method in PEER_METHODS:
                f, grads, stats = runner(prob, sched, optimizer)
            else:
                kw = {} if threads is None else {"threads": int(threads)}
                r = revsgd.hypergrad(prob.train_loss, prob.val_loss, prob.params0, optimizer=optimizer,
                                     hypers=prob.hypers, method=method, **sched, **kw)
                f, stats = r.val_loss, dict(r.stats)
                grads = _flat_grads(r)
            seconds = time.perf_counter() - t0
        except MemoryError as e:
            out.update(status="out of memory", error=f"MemoryError: {e}"[:500])
            return
        except RuntimeError as e:
            msg = str(e)
            if any(s in msg.lower() for s in ("alloc", "out of memory", "not enough memory")):
                out.update(status="out of memory", error=msg[:500])
            else:
                out.update(status="error", error=f"{type(e).__name__}: {msg}"[:2000])
            return
        peak = maxrss_mb()
        out.update(status="ok", seconds=seconds, val_loss=f, peak_rss_mb=peak,
                   rss_over_baseline_mb=peak - out["baseline_rss_mb"],
                   end_rss_mb=proc_status().get("VmRSS", 0) / MB, torch_threads_after=torch.get_num_threads(),
                   seconds_forward=stats.get("seconds_forward"), seconds_reverse=stats.get("seconds_reverse"),
                   tape_bytes=int(stats.get("tape_bytes", 0)), info_bits=float(stats.get("info_bits", 0.0)),
                   storage_bytes=int(stats.get("storage_bytes", 0)),
                   stats={k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                          for k, v in stats.items()})
        if method in PEER_METHODS and (method, optimizer) in peers.PEER_NOTES:
            out["peer_note"] = peers.PEER_NOTES[(method, optimizer)]
        if grads is not None:
            np.savez(cfg["grads"], **grads)
            out["grads_file"] = cfg["grads"]
    except BaseException as e:  # noqa: BLE001 - record anything, the parent decides
        import traceback
        out.update(status="out of memory" if isinstance(e, MemoryError) else "error",
                   error=traceback.format_exc()[-3000:])
    finally:
        out["child_seconds"] = time.perf_counter() - t_start
        dump()


# ------------------------------------------------------------------------------------------------------ parent --

def child_env(threads: Optional[int]) -> dict:
    """The child's environment: thread variables set to ``threads``, or removed (library defaults) for None; the
    folder holding the revsgd package this process imported goes first on PYTHONPATH, so the child measures the
    same code."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x and os.path.abspath(x) != here]
    env["PYTHONPATH"] = os.pathsep.join([here] + rest)
    for k in THREAD_ENV:
        if threads is None:
            env.pop(k, None)
        else:
            env[k] = str(threads)
    return env


class _Progress:
    """A live status line on stderr for the running child (only when enabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if force or now - self.last >= 0.5:
            self.last = now
            sys.stderr.write("\r\x1b[K" + text[:150])
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_child(method: str, T: int, tmpdir: str, timeout: float, mem_limit_gb: float, rep: int = 0, *,
              problem: str = "digits", threads: Optional[int] = 1, label: str = "",
              progress: Optional[_Progress] = None, optimizer: str = "heavyball") -> dict:
    """Run one cell in a fresh ``python -m revsgd.bench.unroll --child`` process under the memory guard and the
    timeout; returns its record (status ok / out of memory / timeout / error / crashed)."""
    tag = f"{problem}_{optimizer}_{method}_{T}_{rep}"
    cfg = {"problem": problem, "optimizer": optimizer, "method": method, "T": T, "threads": threads,
           "result": os.path.join(tmpdir, tag + ".json"), "grads": os.path.join(tmpdir, tag + ".npz"),
           "mem_limit_bytes": int(mem_limit_gb * 2 ** 30)}
    limit = mem_limit_gb * 2 ** 30
    meter, c0, s0 = CpuMeter(), cpu_seconds_children(), cpu_seconds_self()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "revsgd.bench.unroll", "--child", json.dumps(cfg)],
                            env=child_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed, max_seen = None, 0
    log_chunks: list = []

    def reader():
        for line in proc.stdout:
            log_chunks.append(line)
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        rss = proc_status(proc.pid).get("VmRSS", 0)
        max_seen = max(max_seen, rss)
        el = time.perf_counter() - t0
        if progress is not None:
            progress.show(f"{label} {problem} {method} T={T}: {el:.0f} s, RSS {rss / MB:.0f} MB")
        if rss > limit:
            killed = "out of memory"
        elif el > timeout:
            killed = "timeout"
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            break
        time.sleep(0.1)
    th.join(timeout=5)
    if progress is not None:
        progress.clear()
    wall = time.perf_counter() - t0
    busy = meter.busy_cores()
    child_cpu = cpu_seconds_children() - c0
    other = None if busy is None else max(0.0, (busy * wall - child_cpu - (cpu_seconds_self() - s0)) / wall)
    res: dict = {"problem": problem, "optimizer": optimizer, "method": method, "T": T}
    if os.path.exists(cfg["result"]) and not killed:
        with open(cfg["result"]) as f:
            res = json.load(f)
    elif killed:
        res["status"] = killed
        res["error"] = (f"parent killed the child: RSS {max_seen / MB:.0f} MB > {mem_limit_gb} GB limit"
                        if killed == "out of memory" else f"ran past --timeout {timeout} s")
    else:
        res["status"] = "out of memory" if proc.returncode == -signal.SIGKILL else "crashed"
        res["error"] = f"child exited with code {proc.returncode} without a result"
    res["returncode"] = proc.returncode
    res["child_wall_s"] = wall
    res["child_cpu_s"] = child_cpu
    # cores other processes kept busy while the child ran (from /proc/stat; with --jobs > 1 this includes the
    # concurrent children)
    res["other_processes_cores"] = other
    res["parent_max_rss_seen_mb"] = max_seen / MB
    tail = b"".join(log_chunks).decode(errors="replace")[-2000:]
    if tail.strip():
        res["child_output_tail"] = tail
    return res


def _rel_cos(x, y):
    import numpy as np
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ny, nx = float(np.linalg.norm(y)), float(np.linalg.norm(x))
    d = float(np.linalg.norm(x - y))
    rel = d / ny if ny > 0 else (0.0 if d == 0 else float("inf"))
    cos = float(np.dot(x, y) / (nx * ny)) if nx > 0 and ny > 0 else None
    return rel, cos


def _key(r) -> tuple:
    return r.get("problem", "digits"), r.get("optimizer", "heavyball"), r["T"]


def compare(results: list) -> None:
    """Per-key relative error and cosine against exact at the same problem, optimiser and T (in place). A peer's
    ``<key>_tied`` (one value for the whole run) is compared against the sum over t of exact's ``<key>``."""
    import numpy as np
    exact = {_key(r): r for r in results if r["method"] == "exact" and r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok" or "grads_file" not in r or _key(r) not in exact:
            continue
        ref = np.load(exact[_key(r)]["grads_file"])
        mine = np.load(r["grads_file"])
        rel, cos, nonfinite, norms = {}, {}, {}, {}
        for k in mine.files:
            if k in ref.files:
                y = ref[k]
            elif k.endswith("_tied") and k[:-5] in ref.files:
                y = np.array([ref[k[:-5]].sum()])
            else:
                continue
            rel[k], cos[k] = _rel_cos(mine[k], y)
            nonfinite[k] = int((~np.isfinite(mine[k])).sum())   # NaN/inf entries (drmad)
            norms[k] = float(np.linalg.norm(mine[k]))
        r["rel_error"], r["cosine"], r["nonfinite"], r["grad_norms"] = rel, cos, nonfinite, norms
        tied = sorted(k for k in rel if k.endswith("_tied"))
        if tied:
            r["rel_error_note"] = (f"{', '.join(tied)}: one value for the whole run, so the gradient is "
                                   "d f/d x = Σ_t ∂f/∂x_t, compared against the sum of exact's")
        if r["method"] == "exact":
            r["grad_values_head"] = {"lr[:3]": mine["lr"][:3].tolist(), "lr[-3:]": mine["lr"][-3:].tolist(),
                                     **{f"{k}_sum": float(mine[k].sum()) for k in mine.files
                                        if k not in ("lr", "params0", "log_l2")},
                                     "log_l2": mine["log_l2"].tolist() if "log_l2" in mine.files else None}


def _fmt(x, spec):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and (x != x):
        return "nan"
    return format(x, spec)


def _order(r):
    return (PROBLEM_NAMES.index(r.get("problem", "digits")) if r.get("problem", "digits") in PROBLEM_NAMES else 9,
            r["T"], ALL_METHODS.index(r["method"]))


def _optimizer_of(results: list) -> str:
    return next((r["optimizer"] for r in results if r.get("optimizer")), "heavyball")


def markdown(results: list, problem: Optional[str] = None, optimizer: Optional[str] = None) -> str:
    """The markdown table of ``results`` (of one ``problem``, if given); the hypergradient columns are lr, params0,
    the optimiser's decaying schedules (momentum / beta1, beta2) and log_l2."""
    optimizer = optimizer or _optimizer_of(results)
    keys = ("lr", "params0") + DECAY_KEYS.get(optimizer, ("momentum",)) + ("log_l2",)
    hdr = ("| method | T | seconds | fwd s | rev s | peak RSS MB | RSS over baseline MB | tape bytes | storage bytes | "
           + " | ".join(f"rel.err {k}" for k in keys) + " | val loss | note |")
    ncol = hdr.count("|") - 1
    lines = [hdr, "|" + "---|" * ncol]
    rows = [r for r in results if problem is None or r.get("problem", "digits") == problem]
    for r in sorted(rows, key=_order):
        if r.get("status") != "ok":
            note = str(r.get("note") or r.get("error") or "").strip().splitlines()
            note = note[-1][:120] if note else ""
            seen = r.get("parent_max_rss_seen_mb")
            cells = [r["method"], str(r["T"]), str(r.get("status")), "", "",
                     f"{_fmt(seen, '.0f')} (seen)" if seen else ""] + [""] * (ncol - 7) + [note.replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        re_ = dict(r.get("rel_error", {}))
        for k, c in r.get("nonfinite", {}).items():
            if c:
                re_[k] = f"non-finite ({c})"
        cols, tied = [], []
        for k in keys:
            v = re_.get(k)
            if v is None and f"{k}_tied" in re_:
                v = f"{_fmt(re_[f'{k}_tied'], '.2e')} (Σ_t)"
                tied.append(k)
            cols.append(_fmt(v, ".2e"))
        notes = [f"{', '.join(tied)}: tied (one value per run)"] if tied else []
        if r.get("peer_note"):
            notes.append(r["peer_note"].split(":")[0])
        if (r.get("other_processes_cores") or 0) > 0.25:
            notes.append(f"other processes used {r['other_processes_cores']:.1f} cores")
        note = "; ".join(notes).replace("|", "/")
        lines.append(
            f"| {r['method']} | {r['T']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r.get('seconds_forward'), '.2f')} | "
            f"{_fmt(r.get('seconds_reverse'), '.2f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['rss_over_baseline_mb'], '.1f')} | {r['tape_bytes']:,} | {r['storage_bytes']:,} | "
            + " | ".join(cols) + f" | {_fmt(r.get('val_loss'), '.4f')} | {note} |")
    return "\n".join(lines)


BESIDE = ("exact", "replay", "checkpoint")


def ratios(results: list) -> dict:
    """Headline ratios per problem (None where a cell is missing), replay's and checkpoint's time and memory beside
    exact's at T = 1000 and 10,000, plus exact/naive, exact/plain per T."""
    ok = {(r.get("problem", "digits"), r["method"], r["T"]): r for r in results if r.get("status") == "ok"}
    optimizer = _optimizer_of(results)
    historical = optimizer == "heavyball"          # the project's targets belong to the heavy-ball table
    out: dict = {}
    for prob in sorted({r.get("problem", "digits") for r in results}, key=lambda p: (p not in PROBLEM_NAMES, p)):
        def get(m, T, prob=prob):
            return ok.get((prob, m, T))
        o: dict = {"optimizer": optimizer}

        def time_ratio(a, b, T, target=None):
            x, y = get(a, T), get(b, T)
            d = {"value": x["seconds"] / y["seconds"] if x and y else None, f"{a}_s": x and x["seconds"],
                 f"{b}_s": y and y["seconds"]}
            if target:
                d["target"] = target
            return d
        if prob == "digits":
            o["exact_over_naive_time_T1000"] = time_ratio("exact", "naive", 1000, "<= 1.5" if historical else None)
            for T in (1000, 10000):
                o[f"exact_over_torchopt_time_T{T}"] = time_ratio("exact", "torchopt", T)
                o[f"exact_over_higher_time_T{T}"] = time_ratio("exact", "higher", T)
            e, p = get("exact", 10000), get("plain", 10000)
            o["exact_minus_plain_peak_rss_mb_T10000"] = {
                "value": e["peak_rss_mb"] - p["peak_rss_mb"] if e and p else None,
                "exact_peak_mb": e and e["peak_rss_mb"], "plain_peak_mb": p and p["peak_rss_mb"],
                "exact_over_baseline_mb": e and e["rss_over_baseline_mb"],
                "plain_over_baseline_mb": p and p["rss_over_baseline_mb"]}
            if historical:
                o["exact_minus_plain_peak_rss_mb_T10000"]["target"] = "<= +50 MB"
            e, p = get("exact", 100000), get("plain", 100000)
            o["exact_T100000"] = None if not e else {
                "seconds": e["seconds"], "seconds_forward": e["seconds_forward"],
                "seconds_reverse": e["seconds_reverse"], "peak_rss_mb": e["peak_rss_mb"],
                "rss_over_baseline_mb": e["rss_over_baseline_mb"], "tape_bytes": e["tape_bytes"],
                "info_bits": e["info_bits"], "plain_seconds": p and p["seconds"],
                "plain_peak_rss_mb": p and p["peak_rss_mb"]}
            if not e:
                bad = [r for r in results if r["method"] == "exact" and r["T"] == 100000
                       and r.get("problem", "digits") == prob]
                if bad:
                    o["exact_T100000"] = {"status": bad[0].get("status"), "error": bad[0].get("error")}
        else:
            o["exact_over_plain_time_T1000"] = time_ratio("exact", "plain", 1000)
            e, p = get("exact", 10000), get("plain", 10000)
            o["exact_peak_minus_plain_peak_plus_tape_mb_T10000"] = {
                "value": e["peak_rss_mb"] - (p["peak_rss_mb"] + e["tape_bytes"] / MB) if e and p else None,
                "exact_peak_mb": e and e["peak_rss_mb"], "plain_peak_mb": p and p["peak_rss_mb"],
                "tape_mb": e and e["tape_bytes"] / MB}
        o["beside"] = {}
        for T in (1000, 10000):
            p, n = get("plain", T), get("naive", T)
            b = {}
            for m in BESIDE:
                x = get(m, T)
                if x:
                    b[m] = {"seconds": x["seconds"], "peak_rss_mb": x["peak_rss_mb"],
                            "rss_over_baseline_mb": x["rss_over_baseline_mb"],
                            "storage_bytes": x.get("storage_bytes"), "tape_bytes": x.get("tape_bytes"),
                            "over_naive_time": x["seconds"] / n["seconds"] if n else None,
                            "over_plain_time": x["seconds"] / p["seconds"] if p else None,
                            "minus_plain_peak_rss_mb": x["peak_rss_mb"] - p["peak_rss_mb"] if p else None}
            if b:
                o["beside"][T] = b
        o["per_T"] = {}
        for T in sorted({r["T"] for r in results if r.get("problem", "digits") == prob}):
            e, n, p, t = get("exact", T), get("naive", T), get("plain", T), get("torchopt", T)
            o["per_T"][T] = {"exact_over_naive_time": e["seconds"] / n["seconds"] if e and n else None,
                             "exact_over_torchopt_time": e["seconds"] / t["seconds"] if e and t else None,
                             "exact_over_plain_time": e["seconds"] / p["seconds"] if e and p else None,
                             "exact_minus_plain_peak_rss_mb": e["peak_rss_mb"] - p["peak_rss_mb"] if e and p
                             else None}
        out[prob] = o
    return out


def headline_lines(ra: dict) -> list:
    """The headline ratios as printable lines."""
    lines = []
    for prob in PROBLEM_NAMES:
        d = ra.get(prob)
        if not d:
            continue
        tag = f"{prob} [{d.get('optimizer', 'heavyball')}]"
        if prob == "digits":
            x = d["exact_over_naive_time_T1000"]
            tgt = f"target {x['target']}; " if x.get("target") else ""
            lines.append(f"- {tag}: exact time / naive time at T=1000: {_fmt(x['value'], '.3f')} ({tgt}"
                         f"exact {_fmt(x['exact_s'], '.2f')} s, naive {_fmt(x['naive_s'], '.2f')} s)")
            for T in (1000, 10000):
                for peer in PEER_METHODS:
                    x = d[f"exact_over_{peer}_time_T{T}"]
                    lines.append(f"- {tag}: exact time / {peer} time at T={T}: {_fmt(x['value'], '.3f')} "
                                 f"(exact {_fmt(x['exact_s'], '.2f')} s, {peer} {_fmt(x[f'{peer}_s'], '.2f')} s)")
            x = d["exact_minus_plain_peak_rss_mb_T10000"]
            tgt = f"target {x['target']}; " if x.get("target") else ""
            lines.append(f"- {tag}: exact peak RSS − plain peak RSS at T=10000: {_fmt(x['value'], '+.1f')} MB ("
                         f"{tgt}exact {_fmt(x['exact_peak_mb'], '.1f')} MB, plain "
                         f"{_fmt(x['plain_peak_mb'], '.1f')} MB)")
        else:
            x = d["exact_over_plain_time_T1000"]
            lines.append(f"- {tag}: exact time / plain training time at T=1000: {_fmt(x['value'], '.2f')} (exact "
                         f"{_fmt(x['exact_s'], '.1f')} s, plain {_fmt(x['plain_s'], '.1f')} s)")
            x = d["exact_peak_minus_plain_peak_plus_tape_mb_T10000"]
            lines.append(f"- {tag}: exact peak RSS − (plain peak RSS + tape) at T=10000: {_fmt(x['value'], '+.1f')} "
                         f"MB (exact {_fmt(x['exact_peak_mb'], '.1f')} MB, plain {_fmt(x['plain_peak_mb'], '.1f')} "
                         f"MB, tape {_fmt(x['tape_mb'], '.1f')} MB)")
        for T, b in sorted(d.get("beside", {}).items()):
            parts = []
            for m in BESIDE:
                if m in b:
                    x = b[m]
                    parts.append(f"{m} {x['seconds']:.2f} s (×{_fmt(x['over_plain_time'], '.1f')} plain), peak "
                                 f"{x['peak_rss_mb']:.0f} MB ({_fmt(x['minus_plain_peak_rss_mb'], '+.1f')} MB vs "
                                 f"plain)")
            if parts:
                lines.append(f"- {tag}: at T={T}: " + "; ".join(parts))
        x = d.get("exact_T100000")
        if prob == "digits":
            if x and "seconds" in x:
                lines.append(f"- {tag}: exact at T=100000: {x['seconds']:.1f} s (forward "
                             f"{x['seconds_forward']:.1f} s, reverse {x['seconds_reverse']:.1f} s), peak RSS "
                             f"{x['peak_rss_mb']:.1f} MB (+{x['rss_over_baseline_mb']:.1f} over baseline), tape "
                             f"{x['tape_bytes']:,} bytes; plain: {_fmt(x['plain_seconds'], '.1f')} s, peak "
                             f"{_fmt(x['plain_peak_rss_mb'], '.1f')} MB")
            elif x:
                lines.append(f"- {tag}: exact at T=100000: {x.get('status')}: {x.get('error')}")
            else:
                lines.append(f"- {tag}: exact at T=100000: not run")
    return lines


def plot(results: list, path: str, threads: int = 1) -> None:
    """Peak RSS and seconds vs T, one line per method, one row of panels per problem."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probs = [p for p in PROBLEM_NAMES if any(r.get("problem", "digits") == p for r in results)] or ["digits"]
    fig, axes = plt.subplots(len(probs), 2, figsize=(12, 4.4 * len(probs)), squeeze=False)
    for row, prob in zip(axes, probs):
        for m in ALL_METHODS:
            rs = sorted([r for r in results if r["method"] == m and r.get("problem", "digits") == prob],
                        key=lambda r: r["T"])
            good = [r for r in rs if r.get("status") == "ok"]
            if not good and not any(r.get("parent_max_rss_seen_mb") for r in rs):
                continue
            style = dict(marker="o", lw=2.2 if m in ("exact", "plain") else 1.4,
                         ls="--" if m == "plain" else (":" if m in PEER_METHODS else "-"))
            for ax, key in ((row[0], "peak_rss_mb"), (row[1], "seconds")):
                line, = ax.plot([r["T"] for r in good], [r[key] for r in good], label=m, **style)
                for r in rs:
                    if r.get("status") not in ("ok", "skipped"):
                        y = r.get("parent_max_rss_seen_mb") if key == "peak_rss_mb" else r.get("child_wall_s")
                        if y:
                            ax.plot([r["T"]], [y], marker="x", ms=10, color=line.get_color())
                            ax.annotate(r["status"], (r["T"], y), fontsize=7, color=line.get_color())
        info = PROBLEM_INFO.get(prob, {})
        what = f"{prob} ({info.get('short', '')}, {info.get('num_params', 0):,} params)"
        row[0].set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="peak RSS of the child (MB)",
                   title=f"{what}: memory")
        row[1].set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="seconds (hypergrad call)",
                   title=f"{what}: time")
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[1].legend(fontsize=8)
    opt = _optimizer_of(results)
    hp = ", ".join(f"{k} {v:g}" for k, v in SCHEDULES.get(opt, {}).items())
    fig.suptitle(f"{opt} ({hp}), float32, {threads} thread(s), each cell a fresh process", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):
            if action.default is None or action.default is False:
                return action.help
            return super()._get_help_string(action)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Protocol: see the module docstring of revsgd/bench/unroll.py.",
                                 formatter_class=Fmt)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--problem", nargs="+", choices=PROBLEM_NAMES, default=list(PROBLEM_NAMES), metavar="PROBLEM",
                    help=f"benchmark problems, one or more of: {', '.join(PROBLEM_NAMES)}")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="heavyball",
                    help="the optimiser trained through (schedules: see the module docstring); heavyball keeps the "
                         "historical table comparable")
    ap.add_argument("--steps", type=_pos_int, nargs="+", default=None, metavar="T",
                    help="values of T for every selected method (default: each problem's plan, see the module "
                         "docstring)")
    ap.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS, metavar="METHOD",
                    help=f"methods to run, one or more of: {', '.join(ALL_METHODS)} (default: each problem's plan)")
    ap.add_argument("--exact-extra", type=_pos_int, nargs="*", default=None,
                    help="extra T's for exact only (plus the cheap plain baseline); no values: none "
                         "(default: 100000 for digits, none for the 1M-parameter problems)")
    ap.add_argument("--threads", type=_pos_int, default=1, help="torch and kernel threads in every child")
    ap.add_argument("--timeout", type=float, default=10800.0, help="seconds per child")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="memory guard per child")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: digits at T in {50, 200} (every method), the 1M problems at T in {5, 20}, "
                         "no extra T's, 2 children at a time unless --jobs")
    ap.add_argument("--jobs", type=_pos_int, default=None,
                    help="children run at the same time (default 1; timings are only clean with 1)")
    ap.add_argument("--out", default="bench_unroll.json", help="JSON output file")
    ap.add_argument("--png", default=None, help="figure output file (default: --out with .png)")
    ap.add_argument("--repeats", type=_pos_int, default=1,
                    help="fresh children per cell; the fastest ok run is reported, all are kept in the JSON")
    ap.add_argument("--keep-grads", action="store_true", help="keep the per-child .npz files (next to --out)")
    ap.add_argument("--quiet-wait-s", type=float, default=0.0,
                    help="before each child, wait up to this long for other processes to use < 0.25 core (a "
                         "shared machine); what was waited and seen is recorded per cell")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="live line for the running child on stderr (default: on when stderr is a terminal)")
    return ap


def plan_cells(problems, steps, methods, exact_extra, quick, optimizer: str = "heavyball") -> list:
    """The (problem, method, T) cells of a run, in run order. Without ``methods``, methods the optimiser does not
    run (:func:`method_unsupported`) are left out; asked for by name they are recorded as skipped."""
    cells = []
    for prob in problems:
        if quick:
            pc = quick_plan(prob)
        elif steps:
            pc = [(m, T) for T in sorted(set(steps)) for m in ALL_METHODS]
        else:
            pc = default_plan(prob)
        if methods is not None:
            pc = [(m, T) for m, T in pc if m in methods]
        else:
            pc = [(m, T) for m, T in pc if not method_unsupported(m, optimizer)]
        extra = [] if quick else (DEFAULT_EXACT_EXTRA[prob] if exact_extra is None else exact_extra)
        have = {T for _, T in pc}
        sel = ("plain", "exact") if methods is None else [m for m in ("plain", "exact") if m in methods]
        pc += [(m, T) for T in sorted(set(extra) - have) for m in sel]
        cells += [(prob, m, T) for m, T in pc]
    return cells


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.child:
        child_main(json.loads(a.child))
        return 0
    if a.quick:
        a.jobs = 2 if a.jobs is None else a.jobs
    a.jobs = 1 if a.jobs is None else a.jobs
    if a.mem_limit_gb <= 0 or a.timeout <= 0:
        ap.error("--mem-limit-gb and --timeout must be positive")
    progress = _Progress((sys.stderr.isatty() if a.progress is None else a.progress) and a.jobs == 1)
    if a.jobs > 1:
        print(f"note: --jobs {a.jobs}: children run concurrently, timings include contention", file=sys.stderr)
    if a.methods is not None and any(m != "plain" for m in a.methods) and "exact" not in a.methods:
        print("note: without 'exact' no errors are computed", file=sys.stderr)
    from .peers import peer_missing, peer_unsupported
    missing = {m: peer_missing(m) or peer_unsupported(m, a.optimizer) for m in PEER_METHODS}
    jobs = plan_cells(a.problem, a.steps, a.methods, a.exact_extra, a.quick, a.optimizer)
    if a.png is None:
        a.png = os.path.splitext(a.out)[0] + ".png"
    for p in (a.out, a.png):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmpdir = (os.path.splitext(os.path.abspath(a.out))[0] + "_grads") if a.keep_grads else tempfile.mkdtemp(
        prefix="bench_unroll_")
    os.makedirs(tmpdir, exist_ok=True)
    doc = {"benchmark": "bench_unroll", "argv": sys.argv, "bench_args": sys.argv[1:] if argv is None else list(argv),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "problems": {p: PROBLEM_INFO[p] for p in a.problem},
           "optimizer": a.optimizer, "plain": PLAIN[a.optimizer],
           "schedule": {**SCHEDULES[a.optimizer], "shape": "(T,)", "constant": True, "dtype": "float32",
                        "quantised": False},
           "threads": a.threads, "jobs": a.jobs, "repeats": a.repeats, "mem_limit_gb": a.mem_limit_gb,
           "timeout_s": a.timeout, "machine": machine(), "versions": versions(("torchopt", "higher")),
           "peers_missing": {m: v for m, v in missing.items() if v},
           "plan": [{"problem": p, "method": m, "T": T} for p, m, T in jobs], "results": []}
    t_all = time.perf_counter()

    def save():
        compare(doc["results"])
        doc["ratios"] = ratios(doc["results"])
        doc["total_seconds"] = time.perf_counter() - t_all
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    def report(i, prob, m, T, r):
        if r.get("status") == "ok":
            msg = f"{r['seconds']:.2f} s, peak {r['peak_rss_mb']:.0f} MB (+{r['rss_over_baseline_mb']:.1f})"
            if r.get("other_processes_cores") is not None:
                msg += f", other processes {r['other_processes_cores']:.2f} cores"
        else:
            msg = f"{r.get('status')}: {str(r.get('note') or r.get('error', ''))[-300:]}"
        print(f"[{i + 1}/{len(jobs)}] {prob:6s} {a.optimizer:9s} {m:10s} T={T:<7d} {msg}", file=sys.stderr,
              flush=True)

    failed: dict = {}          # (problem, method) -> (T, status): larger T's of it are not started

    def skip_reason(prob, m, T) -> Optional[str]:
        if m in PEER_METHODS and missing[m]:
            return missing[m]
        why = method_unsupported(m, a.optimizer)
        if why:
            return why
        f = failed.get((prob, m))
        if f and f[0] < T:
            return f"not started: {f[1]} at T={f[0]}"
        return None

    def cell(i, prob, m, T):
        """Run a cell --repeats times (fresh child each); keep the fastest ok run, list them all."""
        why = skip_reason(prob, m, T)
        if why:
            return {"problem": prob, "optimizer": a.optimizer, "method": m, "T": T, "status": "skipped", "note": why}
        runs = []
        for k in range(a.repeats):
            quiet = wait_for_quiet(a.quiet_wait_s) if a.quiet_wait_s > 0 else None
            runs.append(run_child(m, T, tmpdir, a.timeout, a.mem_limit_gb, rep=k, problem=prob, threads=a.threads,
                                  label=f"[{i + 1}/{len(jobs)}]", progress=progress, optimizer=a.optimizer))
            if quiet is not None:
                runs[-1]["quiet_wait"] = quiet
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            if runs[0].get("status") in ("out of memory", "timeout"):
                prev = failed.get((prob, m))
                if prev is None or T < prev[0]:
                    failed[(prob, m)] = (T, runs[0]["status"])
            return runs[0]
        best = dict(min(ok, key=lambda r: r["seconds"]))
        if a.repeats > 1:
            best["repeats"] = [{k: r.get(k) for k in ("status", "seconds", "seconds_forward", "seconds_reverse",
                                                       "peak_rss_mb", "rss_over_baseline_mb",
                                                       "other_processes_cores")} for r in runs]
            best["seconds_median"] = sorted(r["seconds"] for r in ok)[len(ok) // 2]
            best["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in ok)
        return best

    if a.jobs <= 1:
        for i, (prob, m, T) in enumerate(jobs):
            r = cell(i, prob, m, T)
            doc["results"].append(r)
            report(i, prob, m, T, r)
            save()
    else:  # concurrent children: only for smoke runs, the timings then include contention
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(a.jobs) as ex:
            futs = [ex.submit(cell, i, *job) for i, job in enumerate(jobs)]
            for i, ((prob, m, T), fu) in enumerate(zip(jobs, futs)):
                r = fu.result()
                doc["results"].append(r)
                report(i, prob, m, T, r)
                save()
    save()
    plot(doc["results"], a.png, a.threads)
    if not a.keep_grads:
        for r in doc["results"]:
            r.pop("grads_file", None)
        for fn in os.listdir(tmpdir):
            os.remove(os.path.join(tmpdir, fn))
        os.rmdir(tmpdir)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    for prob in a.problem:
        info = PROBLEM_INFO[prob]
        hp = ", ".join(f"{k} {v:g}" for k, v in SCHEDULES[a.optimizer].items())
        print(f"# bench_unroll {prob}: {info['constructor']}, {info['layers']} ({info['num_params']:,} params), "
              f"batch {info['batch']}, {a.optimizer} ({hp}; plain = {PLAIN[a.optimizer]}), {a.threads} thread(s)\n")
        print(markdown(doc["results"], prob, a.optimizer))
        print()
    for m, why in missing.items():
        if why and any(j[1] == m for j in jobs):
            print(f"- {m}: skipped, {why}")
    for line in headline_lines(doc["ratios"]):
        print(line)
    print(f"\ntotal wall time {doc['total_seconds']:.1f} s; JSON {a.out}; PNG {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
