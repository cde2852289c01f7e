"""``revsgd demo``: learn per-layer learning-rate and momentum schedules for an MLP on scikit-learn's digits."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from ..frontend.inputs import DEFAULT_THREADS
from ..meta import MetaSpec, MetaTrainer
from ..meta.params import LogitSchedule, LogSchedule
from ..problems import accuracy, load_digits, mlp_forward, mlp_problem


def schedule_problem(data, *, T: int, knots: Optional[int], hidden=(100,), batch: int = 64, lr0: float = 0.02,
                     momentum0: float = 0.5, log_l2: float = -8.0):
    """Free per-layer lr (log space) and momentum (logistic) schedules for an MLP; returns (free, build)."""
    base = mlp_problem(data, hidden, batch=batch, log_l2=log_l2)
    G = len(base.params0)
    lr_s = LogSchedule(T, G, lr0, knots=knots)
    mom_s = LogitSchedule(T, G, momentum0, knots=knots)

    def build(seed: int) -> MetaSpec:
        pb = mlp_problem(data, hidden, batch=batch, seed=seed, log_l2=log_l2)

        def evaluate(p):
            with torch.no_grad():
                train = torch.nn.functional.cross_entropy(mlp_forward(p, data.x_train), data.y_train)
            return {"train_loss": float(train), "val_accuracy": accuracy(p, data.x_val, data.y_val)}
        return MetaSpec(pb.train_loss, pb.val_loss, pb.params0, {"lr": lr_s(), "momentum": mom_s()}, "heavyball", pb.hypers,
                        evaluate)

    return {"log_lr": lr_s.free, "logit_momentum": mom_s.free}, build, (lr_s, mom_s), base


def run_demo(out_dir: str = ".", *, T: int = 1000, iterations: int = 60, knots: Optional[int] = 10,
             meta_lr: float = 0.08, threads: Optional[int] = None, checkpoint: Optional[str] = None,
             progress: bool = True, quiet: bool = False) -> dict:
    """Meta-train the schedules, print a table, write ``demo.json`` and ``demo.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    data = load_digits(torch.float32)
    free, build, (lr_s, mom_s), base = schedule_problem(data, T=T, knots=knots)
    names = list(base.params0)
    with torch.no_grad():
        lr_init, mom_init = lr_s().clone(), mom_s().clone()
    t0 = time.perf_counter()
    trainer = MetaTrainer(build, free, meta_lr=meta_lr, checkpoint=checkpoint, progress=progress,
                          threads=threads)

    def show(rec):
        if not quiet and (rec["iteration"] % 5 == 0 or rec["iteration"] == iterations - 1):
            msg = (f"{rec['iteration']:>5d}  {rec['val_loss']:>9.4f}  {rec['val_accuracy']:>8.3f}  "
                   f"{rec['train_loss']:>10.4f}  {rec['seconds']:>7.2f}")
            (print if not progress else _tqdm_write)(msg)

    if not quiet:
        print(f"revsgd demo: {base.description}; T={T} steps, {iterations} meta-iterations, exact hypergradients")
        print(f"{'iter':>5s}  {'val loss':>9s}  {'val acc':>8s}  {'train loss':>10s}  {'seconds':>7s}")
    records = trainer.run(iterations, callback=show)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        lr_fin, mom_fin = lr_s(), mom_s()
    result = {
        "problem": base.description, "steps": T, "knots": knots, "meta_lr": meta_lr,
        "parameter_groups": names, "seconds": seconds, **run_record(threads),
        "initial_val_loss": records[0]["val_loss"] if records else None,
        "final_val_loss": records[-1]["val_loss"] if records else None,
        "schedules": {"lr_initial": lr_init.tolist(), "momentum_initial": mom_init.tolist(),
                      "lr_learned": lr_fin.tolist(), "momentum_learned": mom_fin.tolist()},
        "meta_iterations": records,
    }
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_demo(result, os.path.join(out_dir, "demo.png"))
    if not quiet:
        print(f"val loss {result['initial_val_loss']:.4f} -> {result['final_val_loss']:.4f} in {seconds:.1f} s; "
              f"wrote {os.path.join(out_dir, 'demo.json')} and {os.path.join(out_dir, 'demo.png')}")
    return result


def run_record(threads: Optional[int]) -> dict:
    """What the numbers were measured with: versions, the kernel backend, the thread count, the machine."""
    import platform
    import sys

    import numpy as np

    from .. import BACKENDS, __version__
    return {
        "versions": {"revsgd": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        # the exact method runs on the default backend: the first (fastest) of revsgd.BACKENDS
        "kernel_backend": BACKENDS[0] if BACKENDS else None,
        # hypergrad pins torch's intra-op thread count for each run: --threads, else revsgd's default (1)
        "threads": threads if threads is not None else DEFAULT_THREADS,
        "threads_requested": threads,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "argv": list(sys.argv),
    }


def _tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(msg)


def plot_demo(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["parameter_groups"]
    sch = result["schedules"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for key, a, title in (("lr", ax[0], "learning rate"), ("momentum", ax[1], "momentum")):
        init = torch.tensor(sch[f"{key}_initial"])
        fin = torch.tensor(sch[f"{key}_learned"])
        for g, name in enumerate(names):
            a.plot(fin[:, g], color=colors[g % len(colors)], label=f"{name} (learned)")
            a.plot(init[:, g], color=colors[g % len(colors)], ls=":", alpha=0.6)
        a.set_xlabel("training step t")
        a.set_title(f"{title} per layer (dotted: initial)")
        if key == "lr":
            a.set_yscale("log")
        a.legend(fontsize=8)
    it = [r["iteration"] for r in result["meta_iterations"]]
    ax[2].plot(it, [r["val_loss"] for r in result["meta_iterations"]], label="validation loss")
    if result["meta_iterations"] and "train_loss" in result["meta_iterations"][0]:
        ax[2].plot(it, [r["train_loss"] for r in result["meta_iterations"]], label="training loss")
    ax[2].set_xlabel("meta-iteration")
    ax[2].set_title("meta-objective")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"revsgd demo — {result['problem']}, T={result['steps']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
