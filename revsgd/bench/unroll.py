"""Time, memory and accuracy of every hypergradient method as the unroll length T grows.

Problem (exactly): ``revsgd.problems.digits_mlp()`` with its defaults: a 64-100-10 tanh MLP (7,510 parameters,
float32, init N(0, 1/fan_in) with seed 0, zero biases) on scikit-learn's bundled digits (first 1,200 images for
training, the other 597 for validation, pixels / 16), minibatch 64 (minibatch t a pure function of (seed=0, t)),
train loss = cross-entropy + exp(log_l2)·Σ‖W‖² with hyper ``log_l2 = -8``, validation loss = mean cross-entropy on
the validation split. Schedules: ``lr = 0.2`` and ``momentum = 0.9`` at every step (float32 tensors of shape (T,);
0.9 quantises to γ = 58982/65536). Hypergradients of the validation loss after T steps with respect to lr (T,),
momentum (T,), params0 (all 7,510 weights, flattened in dict order) and log_l2.

Methods: ``exact``, ``naive``, ``trajectory``, ``checkpoint`` (k = √T), ``drmad``, ``truncated`` (K = T/10), all
through ``revsgd.hypergrad(..., threads=1)``, and ``plain``: the same T momentum-SGD steps with first-order
gradients only (float32 params and velocity, ``torch.autograd.grad`` + in-place updates under ``no_grad``, the same
quantised γ), i.e. ordinary training without any hypergradient.

Protocol: every (method, T) runs in a FRESH child process (``python -m revsgd.bench.unroll --child JSON``) with
``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)`` and ``revsgd.set_num_threads(1)``. The child imports torch and
revsgd, builds the problem and the schedules, runs one training-loss gradient (warm-up of torch's autograd), and
records its RSS (``baseline``); then it runs the method once and records

- ``seconds``: wall time of the ``hypergrad`` call (this includes revsgd's one-off per-process kernel warm-up, if
  the installed revsgd does one) (``plain``: of the training loop + validation loss), and
  ``seconds_forward`` / ``seconds_reverse`` from ``result.stats``;
- ``peak_rss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at the end (MB = 2^20 bytes), and
  ``rss_over_baseline_mb`` = peak − baseline RSS;
- ``tape_bytes``, ``info_bits``, ``storage_bytes`` from ``result.stats``;
- the hypergradients, saved to a temporary .npz. The parent computes, per key (lr, momentum, params0, log_l2),
  the relative error ‖x − x_exact‖ / ‖x_exact‖ and the cosine similarity against ``exact`` at the same T.

With ``--repeats N`` every cell runs in N fresh children and the fastest ok run is reported (all N are kept in
the JSON, with the median time); use it on a busy machine.

Memory guard: the child caps its address space (RLIMIT_AS = its virtual size after setup + ``--mem-limit-gb``), and
the parent polls the child's RSS every 0.1 s and kills it if it exceeds ``--mem-limit-gb``; either way the cell is
recorded as ``out of memory`` (a timeout as ``timeout``) and the run goes on.

Outputs: JSON (``--out``; rewritten after every cell so a partial run is kept), a PNG with two log-log panels
(peak RSS and seconds vs T, one line per method; ``--png``), and a markdown table plus the headline ratios on
stdout: exact/naive time at T = 1000 (target ≤ 1.5), exact − plain peak RSS at T = 10 000 (target ≤ +50 MB), and
exact at T = 100 000 (time and memory).

Examples::

    revsgd bench                                              # T in {100, 1000}, a minute or two
    python scripts/bench_unroll.py --quick                     # smoke run, < 1 min
    python scripts/bench_unroll.py --out out/bench_unroll.json --png out/bench_unroll.png   # the full table
    python scripts/bench_unroll.py --steps 100 1000 --methods exact naive plain --exact-extra
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time

ALL_METHODS = ("plain", "exact", "naive", "trajectory", "checkpoint", "drmad", "truncated")
LR, MOMENTUM = 0.2, 0.9
GRAD_KEYS = ("lr", "momentum", "params0", "log_l2")
MB = 2.0 ** 20


# ------------------------------------------------------------------------------------------------------- child --

def _proc_status(pid="self") -> dict:
    """VmRSS / VmSize / VmHWM of a process in bytes (Linux /proc)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmSize", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _plain(prob, T, lr, momentum):
    """Ordinary momentum SGD, first-order gradients only, in the params' dtype (float32)."""
    import torch
    from revsgd import quantize_momentum
    from revsgd.core.fixed import GAMMA_ONE
    gam = (quantize_momentum(momentum.double().numpy()) / GAMMA_ONE).tolist()
    alphas = lr.double().tolist()
    ps = {k: v.detach().clone().requires_grad_() for k, v in prob.params0.items()}
    vs = {k: torch.zeros_like(v) for k, v in ps.items()}
    keys = list(ps)
    t0 = time.perf_counter()
    for t in range(T):
        loss = prob.train_loss(ps, prob.hypers, t)
        gs = torch.autograd.grad(loss, [ps[k] for k in keys])
        with torch.no_grad():
            g_t, a_t = gam[t], alphas[t]
            for k, g in zip(keys, gs):
                vs[k].mul_(g_t).add_(g, alpha=-(1.0 - g_t))
                ps[k].add_(vs[k], alpha=a_t)
    t1 = time.perf_counter()
    with torch.no_grad():
        f = float(prob.val_loss(ps, prob.hypers))
    t2 = time.perf_counter()
    return f, {"seconds_forward": t1 - t0, "seconds_reverse": 0.0, "seconds_val": t2 - t1,
               "tape_bytes": 0, "info_bits": 0.0, "storage_bytes": 0}


def child_main(cfg: dict) -> None:
    t_start = time.perf_counter()
    out = {"method": cfg["method"], "T": cfg["T"], "status": "error"}

    def dump():
        with open(cfg["result"], "w") as f:
            json.dump(out, f)

    try:
        import numpy as np
        import torch
        import revsgd
        from revsgd.problems import digits_mlp
        torch.set_num_threads(1)
        revsgd.set_num_threads(1)
        method, T = cfg["method"], int(cfg["T"])
        prob = digits_mlp()
        lr = torch.full((T,), LR, dtype=torch.float32)
        momentum = torch.full((T,), MOMENTUM, dtype=torch.float32)
        # warm-up: one first-order gradient, so that torch's autograd start-up is part of the baseline
        with torch.enable_grad():
            ps = {k: v.detach().clone().requires_grad_() for k, v in prob.params0.items()}
            torch.autograd.grad(prob.train_loss(ps, prob.hypers, 0), list(ps.values()))
        del ps
        st = _proc_status()
        out.update(baseline_rss_mb=st.get("VmRSS", 0) / MB, baseline_maxrss_mb=_maxrss_mb(),
                   baseline_vmsize_mb=st.get("VmSize", 0) / MB, setup_seconds=time.perf_counter() - t_start,
                   torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                   problem=prob.description, num_params=prob.num_params)
        if cfg.get("mem_limit_bytes") and st.get("VmSize"):
            cap = st["VmSize"] + int(cfg["mem_limit_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            out["rlimit_as_mb"] = cap / MB
        try:
            t0 = time.perf_counter()
            if method == "plain":
                f, stats = _plain(prob, T, lr, momentum)
                grads = None
            else:
                r = revsgd.hypergrad(prob.train_loss, prob.val_loss, prob.params0, lr=lr, momentum=momentum,
                                     hypers=prob.hypers, method=method, threads=1)
                f, stats = r.val_loss, dict(r.stats)
                grads = {"lr": r.grads["lr"].double().numpy(), "momentum": r.grads["momentum"].double().numpy(),
                         "params0": np.concatenate([v.double().reshape(-1).numpy()
                                                    for v in r.grads["params0"].values()]),
                         "log_l2": r.grads["log_l2"].double().reshape(-1).numpy()}
            seconds = time.perf_counter() - t0
        except MemoryError as e:
            out.update(status="out of memory", error=f"MemoryError: {e}"[:500])
            return
        except RuntimeError as e:
            msg = str(e)
            if any(s in msg.lower() for s in ("alloc", "out of memory", "not enough memory")):
                out.update(status="out of memory", error=msg[:500])
            else:
                out.update(status="error", error=f"RuntimeError: {msg}"[:2000])
            return
        peak = _maxrss_mb()
        out.update(status="ok", seconds=seconds, val_loss=f, peak_rss_mb=peak,
                   rss_over_baseline_mb=peak - out["baseline_rss_mb"],
                   end_rss_mb=_proc_status().get("VmRSS", 0) / MB,
                   seconds_forward=stats.get("seconds_forward"), seconds_reverse=stats.get("seconds_reverse"),
                   tape_bytes=int(stats.get("tape_bytes", 0)), info_bits=float(stats.get("info_bits", 0.0)),
                   storage_bytes=int(stats.get("storage_bytes", 0)),
                   stats={k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                          for k, v in stats.items()})
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

def run_child(method: str, T: int, tmpdir: str, timeout: float, mem_limit_gb: float, rep: int = 0) -> dict:
    tag = f"{method}_{T}_{rep}"
    cfg = {"method": method, "T": T, "result": os.path.join(tmpdir, tag + ".json"),
           "grads": os.path.join(tmpdir, tag + ".npz"), "mem_limit_bytes": int(mem_limit_gb * 2 ** 30)}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    limit = mem_limit_gb * 2 ** 30
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "revsgd.bench.unroll", "--child", json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killed, max_seen = None, 0
    log_chunks = []
    import threading

    def reader():
        for line in proc.stdout:
            log_chunks.append(line)
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        rss = _proc_status(proc.pid).get("VmRSS", 0)
        max_seen = max(max_seen, rss)
        if rss > limit:
            killed = "out of memory"
        elif time.perf_counter() - t0 > timeout:
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
    wall = time.perf_counter() - t0
    res = {"method": method, "T": T}
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
    res["parent_max_rss_seen_mb"] = max_seen / MB
    tail = b"".join(log_chunks).decode(errors="replace")[-2000:]
    if tail.strip():
        res["child_output_tail"] = tail
    return res


def compare(results: list) -> None:
    """Per-key relative error and cosine against exact at the same T (in place)."""
    import numpy as np
    exact = {r["T"]: r for r in results if r["method"] == "exact" and r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok" or "grads_file" not in r or r["T"] not in exact:
            continue
        ref = np.load(exact[r["T"]]["grads_file"])
        mine = np.load(r["grads_file"])
        rel, cos = {}, {}
        for k in GRAD_KEYS:
            x, y = mine[k].ravel(), ref[k].ravel()
            ny, nx = float(np.linalg.norm(y)), float(np.linalg.norm(x))
            d = float(np.linalg.norm(x - y))
            rel[k] = d / ny if ny > 0 else (0.0 if d == 0 else float("inf"))
            cos[k] = float(np.dot(x, y) / (nx * ny)) if nx > 0 and ny > 0 else None
        r["rel_error"], r["cosine"] = rel, cos
        r["nonfinite"] = {k: int((~np.isfinite(mine[k])).sum()) for k in GRAD_KEYS}  # NaN/inf entries (drmad)
        r["grad_norms"] = {k: float(np.linalg.norm(mine[k])) for k in GRAD_KEYS}
        if r["method"] == "exact":
            r["grad_values_head"] = {"lr[:3]": mine["lr"][:3].tolist(), "lr[-3:]": mine["lr"][-3:].tolist(),
                                     "log_l2": mine["log_l2"].tolist()}


def _fmt(x, spec):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and (x != x):
        return "nan"
    return format(x, spec)


def markdown(results: list) -> str:
    hdr = ("| method | T | seconds | fwd s | rev s | peak RSS MB | RSS over baseline MB | tape bytes | "
           "storage bytes | rel.err lr | rel.err params0 | rel.err momentum | rel.err log_l2 | val loss |")
    ncol = hdr.count("|") - 1
    lines = [hdr, "|" + "---|" * ncol]
    for r in sorted(results, key=lambda r: (r["T"], ALL_METHODS.index(r["method"]))):
        if r.get("status") != "ok":
            cells = [r["method"], str(r["T"]), str(r.get("status")), "", "",
                     f"{_fmt(r.get('parent_max_rss_seen_mb'), '.0f')} (seen)"] + [""] * (ncol - 6)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        re_ = dict(r.get("rel_error", {}))
        for k, c in r.get("nonfinite", {}).items():
            if c:
                re_[k] = f"non-finite ({c})"
        lines.append(
            f"| {r['method']} | {r['T']} | {_fmt(r['seconds'], '.2f')} | {_fmt(r.get('seconds_forward'), '.2f')} | "
            f"{_fmt(r.get('seconds_reverse'), '.2f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['rss_over_baseline_mb'], '.1f')} | {r['tape_bytes']:,} | {r['storage_bytes']:,} | "
            f"{_fmt(re_.get('lr'), '.2e')} | {_fmt(re_.get('params0'), '.2e')} | "
            f"{_fmt(re_.get('momentum'), '.2e')} | {_fmt(re_.get('log_l2'), '.2e')} | {_fmt(r.get('val_loss'), '.4f')} |")
    return "\n".join(lines)


def ratios(results: list) -> dict:
    ok = {(r["method"], r["T"]): r for r in results if r.get("status") == "ok"}
    out = {}

    def get(m, T):
        return ok.get((m, T))
    e, n = get("exact", 1000), get("naive", 1000)
    out["exact_over_naive_time_T1000"] = {
        "value": e["seconds"] / n["seconds"] if e and n else None, "target": "<= 1.5",
        "exact_s": e and e["seconds"], "naive_s": n and n["seconds"]}
    e, p = get("exact", 10000), get("plain", 10000)
    out["exact_minus_plain_peak_rss_mb_T10000"] = {
        "value": e["peak_rss_mb"] - p["peak_rss_mb"] if e and p else None, "target": "<= +50 MB",
        "exact_peak_mb": e and e["peak_rss_mb"], "plain_peak_mb": p and p["peak_rss_mb"],
        "exact_over_baseline_mb": e and e["rss_over_baseline_mb"],
        "plain_over_baseline_mb": p and p["rss_over_baseline_mb"]}
    e, p = get("exact", 100000), get("plain", 100000)
    out["exact_T100000"] = None if not e else {
        "seconds": e["seconds"], "seconds_forward": e["seconds_forward"], "seconds_reverse": e["seconds_reverse"],
        "peak_rss_mb": e["peak_rss_mb"], "rss_over_baseline_mb": e["rss_over_baseline_mb"],
        "tape_bytes": e["tape_bytes"], "info_bits": e["info_bits"],
        "plain_seconds": p and p["seconds"], "plain_peak_rss_mb": p and p["peak_rss_mb"]}
    if not e:
        bad = [r for r in results if r["method"] == "exact" and r["T"] == 100000]
        if bad:
            out["exact_T100000"] = {"status": bad[0].get("status"), "error": bad[0].get("error")}
    # the same two ratios at every T measured, for context
    out["per_T"] = {}
    for T in sorted({r["T"] for r in results}):
        e, n, p = get("exact", T), get("naive", T), get("plain", T)
        out["per_T"][T] = {"exact_over_naive_time": e["seconds"] / n["seconds"] if e and n else None,
                           "exact_over_plain_time": e["seconds"] / p["seconds"] if e and p else None,
                           "exact_minus_plain_peak_rss_mb": e["peak_rss_mb"] - p["peak_rss_mb"] if e and p else None}
    return out


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for m in ALL_METHODS:
        rs = sorted([r for r in results if r["method"] == m], key=lambda r: r["T"])
        good = [r for r in rs if r.get("status") == "ok"]
        if not rs:
            continue
        style = dict(marker="o", lw=2.2 if m in ("exact", "plain") else 1.4,
                     ls="--" if m == "plain" else "-")
        for ax, key in ((axes[0], "peak_rss_mb"), (axes[1], "seconds")):
            line, = ax.plot([r["T"] for r in good], [r[key] for r in good], label=m, **style)
            for r in rs:
                if r.get("status") != "ok":
                    y = r.get("parent_max_rss_seen_mb") if key == "peak_rss_mb" else r.get("child_wall_s")
                    if y:
                        ax.plot([r["T"]], [y], marker="x", ms=10, color=line.get_color())
                        ax.annotate(r["status"], (r["T"], y), fontsize=7, color=line.get_color())
    axes[0].set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="peak RSS of the child (MB)",
                title="memory")
    axes[1].set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="seconds (hypergrad call)", title="time")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("digits 64-100-10 tanh MLP (7,510 params, float32), batch 64, lr 0.2, momentum 0.9, 1 thread",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--exact-extra", type=int, nargs="*", default=[100000],
                    help="extra T's for exact only (plus the cheap plain baseline); no values: none")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: T in {50, 200}, no extra T's, 2 children at a time unless --jobs (< 1 min)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="children run at the same time (default 1; timings are only clean with 1)")
    ap.add_argument("--out", default="bench_unroll.json")
    ap.add_argument("--png", default="bench_unroll.png")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh children per cell; the fastest ok run is reported, all are kept in the JSON")
    ap.add_argument("--keep-grads", action="store_true", help="keep the per-child .npz files (next to --out)")
    a = ap.parse_args(argv)
    if a.child:
        child_main(json.loads(a.child))
        return 0
    if a.quick:
        a.steps, a.exact_extra = [50, 200], []
        a.jobs = 2 if a.jobs is None else a.jobs
    a.jobs = 1 if a.jobs is None else a.jobs
    if a.jobs > 1:
        print(f"note: --jobs {a.jobs}: children run concurrently, timings include contention", file=sys.stderr)
    methods = [m for m in ALL_METHODS if m in a.methods]
    if any(m != "exact" and m != "plain" for m in methods) and "exact" not in methods:
        print("note: without 'exact' no errors are computed", file=sys.stderr)
    jobs = [(m, T) for T in sorted(set(a.steps)) for m in methods]
    extra = sorted(set(a.exact_extra) - set(a.steps))
    jobs += [(m, T) for T in extra for m in ("plain", "exact") if m in methods]
    for p in (a.out, a.png):
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
    tmpdir = (os.path.splitext(os.path.abspath(a.out))[0] + "_grads") if a.keep_grads else tempfile.mkdtemp(
        prefix="bench_unroll_")
    os.makedirs(tmpdir, exist_ok=True)
    doc = {"benchmark": "bench_unroll", "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "problem": {"constructor": "revsgd.problems.digits_mlp()", "layers": "64-100-10 tanh",
                       "num_params": 7510, "dtype": "float32", "batch": 64, "train": 1200, "val": 597,
                       "log_l2": -8.0, "seed": 0},
           "schedule": {"lr": LR, "momentum": MOMENTUM, "shape": "(T,)", "constant": True},
           "threads": 1, "jobs": a.jobs, "repeats": a.repeats, "mem_limit_gb": a.mem_limit_gb, "timeout_s": a.timeout,
           "machine": {"python": platform.python_version(), "platform": platform.platform(),
                       "cpu_count": os.cpu_count()},
           "results": []}
    t_all = time.perf_counter()

    def save():
        compare(doc["results"])
        doc["ratios"] = ratios(doc["results"])
        doc["total_seconds"] = time.perf_counter() - t_all
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    def report(i, m, T, r):
        if r.get("status") == "ok":
            msg = f"{r['seconds']:.2f} s, peak {r['peak_rss_mb']:.0f} MB (+{r['rss_over_baseline_mb']:.1f})"
        else:
            msg = f"{r.get('status')}: {str(r.get('error', ''))[-300:]}"
        print(f"[{i + 1}/{len(jobs)}] {m:10s} T={T:<7d} {msg}", file=sys.stderr, flush=True)

    def cell(m, T):
        """Run a cell --repeats times (fresh child each); keep the fastest ok run, list them all."""
        runs = [run_child(m, T, tmpdir, a.timeout, a.mem_limit_gb, rep=k) for k in range(a.repeats)]
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            return runs[0]
        best = dict(min(ok, key=lambda r: r["seconds"]))
        if a.repeats > 1:
            best["repeats"] = [{k: r.get(k) for k in ("status", "seconds", "seconds_forward", "seconds_reverse",
                                                       "peak_rss_mb", "rss_over_baseline_mb")} for r in runs]
            best["seconds_median"] = sorted(r["seconds"] for r in ok)[len(ok) // 2]
            best["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in ok)
        return best

    if a.jobs <= 1:
        for i, (m, T) in enumerate(jobs):
            r = cell(m, T)
            doc["results"].append(r)
            report(i, m, T, r)
            save()
    else:  # concurrent children: only for smoke runs, the timings then include contention
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(a.jobs) as ex:
            futs = [ex.submit(cell, m, T) for m, T in jobs]
            for i, ((m, T), fu) in enumerate(zip(jobs, futs)):
                r = fu.result()
                doc["results"].append(r)
                report(i, m, T, r)
                save()
    save()
    plot(doc["results"], a.png)
    if not a.keep_grads:
        for r in doc["results"]:
            r.pop("grads_file", None)
        for fn in os.listdir(tmpdir):
            os.remove(os.path.join(tmpdir, fn))
        os.rmdir(tmpdir)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    print(f"# bench_unroll: {doc['problem']['constructor']}, lr {LR}, momentum {MOMENTUM}, 1 thread\n")
    print(markdown(doc["results"]))
    ra = doc["ratios"]
    print()
    x = ra["exact_over_naive_time_T1000"]
    print(f"- exact time / naive time at T=1000: {_fmt(x['value'], '.3f')} (target {x['target']}; "
          f"exact {_fmt(x['exact_s'], '.2f')} s, naive {_fmt(x['naive_s'], '.2f')} s)")
    x = ra["exact_minus_plain_peak_rss_mb_T10000"]
    print(f"- exact peak RSS − plain peak RSS at T=10000: {_fmt(x['value'], '+.1f')} MB (target {x['target']}; "
          f"exact {_fmt(x['exact_peak_mb'], '.1f')} MB, plain {_fmt(x['plain_peak_mb'], '.1f')} MB)")
    x = ra["exact_T100000"]
    if x and "seconds" in x:
        print(f"- exact at T=100000: {x['seconds']:.1f} s (forward {x['seconds_forward']:.1f} s, reverse "
              f"{x['seconds_reverse']:.1f} s), peak RSS {x['peak_rss_mb']:.1f} MB (+{x['rss_over_baseline_mb']:.1f} "
              f"over baseline), tape {x['tape_bytes']:,} bytes; plain: {_fmt(x['plain_seconds'], '.1f')} s, "
              f"peak {_fmt(x['plain_peak_rss_mb'], '.1f')} MB")
    elif x:
        print(f"- exact at T=100000: {x.get('status')}: {x.get('error')}")
    else:
        print("- exact at T=100000: not run")
    print(f"\ntotal wall time {doc['total_seconds']:.1f} s; JSON {a.out}; PNG {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
