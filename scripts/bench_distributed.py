"""Benchmark of revsgd.distributed on this machine (gloo, one thread per rank) and of tape spilling; prints JSON.

    PYTHONPATH=. python scripts/bench_distributed.py                    # world sizes 1, 2, 4; digits MLP; spill
    PYTHONPATH=. python scripts/bench_distributed.py --worlds 1,2 --steps 50 --spill-mib 0

Problem: the 64-100-10 tanh MLP on scikit-learn's digits (revsgd.problems; 7,510 parameters), global minibatch 64
split equally over the ranks (revsgd.distributed.shard), cross-entropy + exp(log_l2)·Σ‖W‖², float64 by default.
For each world size: seconds per step (forward + reverse, measured inside hypergrad on rank 0), tape bytes per rank
(the largest rank; at the end of the forward pass) and its ratio to the single-process tape, the tapes' total
information against the single process's, and the relative error of the hypergradient (every schedule, params0 and
log_l2, concatenated) against a single-process revsgd.hypergrad on the same global minibatches.

Spill: a tape of ``--spill-lanes`` lanes takes 16-bit shifts (one word per lane per step) through the C++ kernels
until ``--spill-mib`` MiB are on the stack, then gives them back, in memory and with tape_dir (64 MiB blocks); and the
raw sequential write (with fsync) / read (after dropping the file's pages) of the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_problem(dtype, batch: int, hidden=(100,), seed: int = 0):
    from revsgd.problems import Batches, load_digits, mlp_forward, mlp_init
    import torch.nn.functional as F
    data = load_digits(dtype)
    batches = Batches(data.x_train.shape[0], batch, seed)

    def losses(shard):
        def train_loss(p, h, t):
            i = shard(batches(t))
            ce = F.cross_entropy(mlp_forward(p, data.x_train[i]), data.y_train[i])
            return ce + torch.exp(h["log_l2"]) * sum((p[k] ** 2).sum() for k in p if k.startswith("W"))

        def val_loss(p, h):
            return F.cross_entropy(mlp_forward(p, data.x_val), data.y_val)
        return train_loss, val_loss
    sizes = [data.x_train.shape[1], *hidden, int(data.y_train.max()) + 1]
    return losses, mlp_init(sizes, dtype=dtype), {"log_l2": torch.tensor(-8.0, dtype=dtype)}


def run_kwargs(args, T=None):
    T = args.steps if T is None else T
    if args.optimizer == "adam":
        return dict(optimizer="adam", lr=torch.full((T,), 0.003, dtype=torch.float64), betas=(0.9, 0.999), eps=1e-8)
    return dict(optimizer="sgd", lr=torch.full((T,), 0.1, dtype=torch.float64),
                momentum=torch.full((T,), 0.9, dtype=torch.float64))


def hidden(args) -> tuple:
    return tuple(int(h) for h in args.hidden.split(",") if h)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).to(torch.float64) for k, v in sorted(grads.items()) if k != "params0"] +
                     [v.reshape(-1).to(torch.float64) for v in grads["params0"].values()])


def worker(args) -> None:
    import revsgd.distributed as rd
    rd.init_from_env("gloo", timeout_s=600)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    losses, p0, hypers = make_problem(dtype, args.batch, hidden(args))
    tl, vl = losses(rd.shard)
    rd.hypergrad(tl, vl, p0, hypers=hypers, threads=1, **run_kwargs(args, 3))   # warm-up (first-call costs)
    res = rd.hypergrad(tl, vl, p0, hypers=hypers, threads=1, **run_kwargs(args))
    if torch.distributed.get_rank() == 0:
        torch.save({"grads": flat(res.grads), "stats": res.stats}, args.worker_out)
    torch.distributed.destroy_process_group()


def single(args) -> dict:
    import revsgd
    dtype = getattr(torch, args.dtype)
    losses, p0, hypers = make_problem(dtype, args.batch, hidden(args))
    tl, vl = losses(lambda i: i)
    revsgd.hypergrad(tl, vl, p0, hypers=hypers, threads=1, **run_kwargs(args, 3))   # warm-up (first-call costs)
    res = revsgd.hypergrad(tl, vl, p0, hypers=hypers, threads=1, **run_kwargs(args))
    return {"grads": flat(res.grads), "stats": res.stats}


def distributed(args, W: int, ref: dict) -> dict:
    import revsgd.distributed as rd
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.pt")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker-out", out, "--steps", str(args.steps),
               "--optimizer", args.optimizer, "--dtype", args.dtype, "--batch", str(args.batch),
               "--hidden", args.hidden]
        t0 = time.perf_counter()
        res = rd.run_local(cmd, W, timeout_s=args.timeout, env=env)
        wall = time.perf_counter() - t0
        for r in res:
            if r.returncode != 0:
                raise RuntimeError(f"world {W}, rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}")
        got = torch.load(out, weights_only=False)
    st, rst = got["stats"], ref["stats"]
    T = args.steps
    per_rank = st["tape_bytes_per_rank"]
    return {
        "world_size": W,
        "seconds_per_step": (st["seconds_forward"] + st["seconds_reverse"]) / T,
        "seconds_per_step_forward": st["seconds_forward"] / T,
        "seconds_per_step_reverse": st["seconds_reverse"] / T,
        "tape_bytes_per_rank": per_rank,
        "tape_bytes_max_rank_over_single": max(per_rank) / rst["tape_bytes"],
        "info_bits_total": st["info_bits_total"],
        "info_bits_equal_single": st["info_bits_total"] == rst["info_bits"],
        "rel_error_vs_single": float((got["grads"] - ref["grads"]).norm() / ref["grads"].norm()),
        "max_abs_error_vs_single": float((got["grads"] - ref["grads"]).abs().max()),
        "wall_seconds_incl_startup": wall,
    }


def spill_bench(args) -> dict:
    from revsgd import kernels
    from revsgd.core.tapeformat import SpillTapeStorage, TapeStorage
    be = kernels.get_backend("cpp" if "cpp" in kernels.BACKENDS else "numpy")
    L = args.spill_lanes
    steps = max(1, (args.spill_mib << 20) // (2 * L))
    nbytes = 2 * L * steps
    h = np.array([16], dtype=np.int64)
    out = {"lanes": L, "steps": steps, "stack_bytes": nbytes, "backend": be.name}
    X0 = np.random.default_rng(0).integers(-2**62, 2**62, L)
    with tempfile.TemporaryDirectory(dir=args.spill_dir) as d:
        for mode in ("memory", "spill"):
            st = TapeStorage(L) if mode == "memory" else SpillTapeStorage(L, tape_dir=d)
            X = X0.copy()
            t0 = time.perf_counter()
            for _ in range(steps):
                kernels.shift(be, st, X, h, True)
            t1 = time.perf_counter()
            peak = st.nbytes
            for _ in range(steps):
                kernels.shift(be, st, X, h, False)
            t2 = time.perf_counter()
            assert np.array_equal(X, X0) and st.at_start()
            out[mode] = {"push_MBps": nbytes / (t1 - t0) / 1e6, "pop_MBps": nbytes / (t2 - t1) / 1e6,
                         "memory_bytes_at_peak": peak}
            if mode == "spill":
                out[mode]["files_left"] = os.listdir(d)
            del st
        # the disk itself: sequential 64 MiB writes + fsync; reads after dropping the file from the page cache
        path = os.path.join(d, "raw")
        block = np.random.default_rng(1).integers(0, 2**16, 32 << 20, dtype=np.uint16)   # 64 MiB
        nblk = max(1, nbytes // block.nbytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        t0 = time.perf_counter()
        for i in range(nblk):
            os.pwrite(fd, memoryview(block).cast("B"), i * block.nbytes)
        os.fsync(fd)
        t1 = time.perf_counter()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = np.empty_like(block)
        t2 = time.perf_counter()
        for i in reversed(range(nblk)):
            os.preadv(fd, [memoryview(buf).cast("B")], i * block.nbytes)
        t3 = time.perf_counter()
        os.close(fd)
        os.unlink(path)
        out["disk"] = {"bytes": nblk * block.nbytes, "write_fsync_MBps": nblk * block.nbytes / (t1 - t0) / 1e6,
                       "read_reverse_uncached_MBps": nblk * block.nbytes / (t3 - t2) / 1e6}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", default="100", help="hidden layer widths, e.g. 1024,1024")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--spill-mib", type=int, default=1024, help="MiB pushed through a spilling tape (0: skip)")
    ap.add_argument("--spill-lanes", type=int, default=4 << 20)
    ap.add_argument("--spill-dir", default=None, help="where the spill benchmark writes (default: the temp dir)")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return
    load0 = os.getloadavg()
    sys.path.insert(0, ROOT)
    import revsgd
    ref = single(args)
    rs = ref["stats"]
    report = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "revsgd": revsgd.__version__,
                    "backend": rs.get("backend"), "load_average_at_start": load0},
        "problem": {"name": f"digits 64-{'-'.join(map(str, hidden(args)))}-10 tanh MLP", "params": int(rs["lanes"]),
                    "steps": args.steps, "global_batch": args.batch, "optimizer": args.optimizer, "dtype": args.dtype},
        "single_process": {"seconds_per_step": (rs["seconds_forward"] + rs["seconds_reverse"]) / args.steps,
                           "tape_bytes": rs["tape_bytes"], "info_bits": rs["info_bits"]},
        "distributed": [distributed(args, int(W), ref) for W in args.worlds.split(",") if W],
    }
    if args.spill_mib > 0:
        report["spill"] = spill_bench(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
