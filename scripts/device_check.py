#!/usr/bin/env python
"""GPU check, ready to run in one go (< 5 minutes on one GPU): prints one JSON document.

1. byte identity: the torch backend on the device against the CPU backends (numpy reference, and cpp/numba when
   built) on random cases of every kernel op (shift, momentum, adam), forward and reverse — states, P outputs and
   canonical tape bytes;
2. exact reversal of a small CNN (BatchNorm, dropout) trained on the device with SGD and AdamW: the hypergradient
   equals naive autograd (float64) and the end-of-run check passes;
3. kernel rate: element-steps/s of the momentum op (forward state+position, and a halving step) at 10^8 lanes (or
   ``--lanes``) against ``torch.add_`` on tensors of the same size;
4. exact vs naive on the digits MLP: seconds and peak device memory at T = 1000.

    python scripts/device_check.py                 # on the GPU (device cuda)
    python scripts/device_check.py --device cpu --lanes 1e6 --quick     # the same logic on a CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

import revsgd
from revsgd import kernels
from revsgd.core.tapeformat import TapeStorage
from revsgd.kernels import vectorized as V
from revsgd.kernels.torch_backend import TorchArrays


def _random_op_case(rng, L: int, G: int):
    off = np.unique(np.concatenate([[0, L], rng.choice(np.arange(1, L), G - 1, replace=False)])) if G > 1 \
        else np.array([0, L])
    G = len(off) - 1
    h = lambda: np.where(rng.random(G) < 0.5, 0, rng.integers(1, 17, G)).astype(np.int64)  # noqa: E731
    f = lambda lo, hi: rng.uniform(lo, hi, G)  # noqa: E731
    mom = V.MomentumParams(h(), f(-0.5, 0.5), f(-0.2, 0.2), f(0, 0.01), 52, 52)
    adam = V.AdamParams(h(), h(), h(), f(0, 0.2), f(0, 0.01), f(0, 0.01), f(0.5, 1) * 2.0 ** -52,
                        f(0.5, 1) * 2.0 ** -110, f(0.1, 1), f(1e-8, 1e-6), f(1e-4, 1e-2), f(0.5, 1) * 2.0 ** -52,
                        f(0.5, 1) * 2.0 ** -52, 52, 110, 52)      # S has two limbs (hi, lo): 110 fractional bits
    return off, mom, adam


def check_identity(device: str, cases: int, seed: int = 0) -> dict:
    """Every available CPU backend and the torch backend on ``device``: identical states and tape bytes."""
    rng = np.random.default_rng(seed)
    cpu_backends = [b for b in revsgd.BACKENDS if b != "torch"]
    results = {"cases": 0, "mismatches": [], "backends": cpu_backends + [f"torch:{device}"]}
    kernels.get_backend("torch")      # fails here, with the reason, if the torch backend cannot load
    for c in range(cases):
        L = int(rng.choice([1, 7, 1000, 40_000]))
        G = int(min(L, rng.choice([1, 3, 17])))
        off, mom, adam = _random_op_case(rng, L, G)
        W0 = rng.integers(-2**50, 2**50, L)
        V0 = rng.integers(-2**48, 2**48, L)
        Z0 = np.zeros(L, dtype=np.int64)            # M and S (hi, lo) start at zero, as in training
        grads = [rng.normal(size=L) * 1e-2 for _ in range(4)]
        outs = {}
        for be_name in cpu_backends + ["torch"]:
            be = kernels.get_backend(be_name)
            on_dev = be_name == "torch"
            arr = (lambda a: torch.from_numpy(a.copy()).to(device)) if on_dev else (lambda a: a.copy())
            mk = (lambda: TapeStorage(L, off, TorchArrays(device))) if on_dev else (lambda: TapeStorage(L, off))
            W, Vv, M, Sh, Sl, W2 = arr(W0), arr(V0), arr(Z0), arr(Z0), arr(Z0), arr(W0)
            P = arr(np.zeros(L, dtype=np.float32))
            stv, stm, sts, stw = mk(), mk(), mk(), mk()
            for g in grads:
                gg = arr(g.astype(np.float32))
                kernels.momentum(be, stv, Vv, W, gg, P, _copy(mom), forward=True, state=True, position=True)
                kernels.adam(be, (stm, sts, stw), M, (Sh, Sl), W2, gg, P, _copy(adam), forward=True, state=True,
                             position=True)
            snap = [np.asarray(x.cpu() if on_dev else x).copy() for x in (W, Vv, M, Sh, Sl, W2, P)] + \
                   [t.to_bytes() for t in (stv, stm, sts, stw)]
            for g in reversed(grads):
                gg = arr(g.astype(np.float32))
                kernels.adam(be, (stm, sts, stw), M, (Sh, Sl), W2, gg, None, _copy(adam), forward=False, state=True,
                             position=True)
                kernels.momentum(be, stv, Vv, W, gg, None, _copy(mom), forward=False, state=True, position=True)
            back = all(np.array_equal(np.asarray(x.cpu() if on_dev else x), y)
                       for x, y in ((W, W0), (Vv, V0), (M, Z0), (Sh, Z0), (Sl, Z0), (W2, W0)))
            outs[be_name] = (snap, back and all(t.at_start() for t in (stv, stm, sts, stw)))
        ref = outs["numpy"]
        for k, (snap, back) in outs.items():
            same = all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(snap, ref[0]))
            if not (same and back):
                results["mismatches"].append({"case": c, "backend": k, "same_as_numpy": same, "reversed": back})
        results["cases"] += 1
    results["ok"] = not results["mismatches"]
    return results


def _copy(prm):
    from dataclasses import replace
    return replace(prm, **{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(prm).items()})


def check_cnn(device: str, T: int) -> dict:
    import torch.nn.functional as F
    from torch.func import functional_call
    torch.manual_seed(0)
    net0 = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Dropout(0.1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    X = torch.randn(256, 1, 8, 8, dtype=torch.float64, device=device)
    Y = torch.randint(0, 10, (256,), device=device)
    out = {}
    import copy
    for opt, kw in (("sgd", dict(lr=0.05, momentum=0.9)), ("adamw", dict(lr=0.003, weight_decay=0.01))):
        res = {}
        for m in ("exact", "naive"):
            net = copy.deepcopy(net0).double().to(device)
            sampler = revsgd.StepSampler(X, Y, batch_size=32, seed=0)

            def train_loss(p, h, t, net=net, sampler=sampler):
                x, y = sampler(t)
                net.train()
                return F.cross_entropy(functional_call(net, p, (x,)), y)

            def val_loss(p, h, net=net):
                net.eval()
                return F.cross_entropy(functional_call(net, p, (X[:64],)), Y[:64])
            extra = {"backend": "torch"} if m == "exact" else {}
            t0 = time.perf_counter()
            r = revsgd.hypergrad(train_loss, val_loss, net, optimizer=opt, steps=T, method=m, **kw, **extra)
            res[m] = (r, time.perf_counter() - t0)
        flat = lambda r: torch.cat([r.grads["lr"].reshape(-1).double().cpu()] +  # noqa: E731
                                   [v.reshape(-1).double().cpu() for v in r.grads["params0"].values()])
        rel = float((flat(res["exact"][0]) - flat(res["naive"][0])).norm() / flat(res["naive"][0]).norm())
        out[opt] = {"rel_error_vs_naive": rel, "ok": rel < 1e-8, "seconds_exact": res["exact"][1],
                    "seconds_naive": res["naive"][1]}
    return out


def kernel_rate(device: str, lanes: int, repeats: int) -> dict:
    be = kernels.get_backend("torch")
    L = lanes
    st = TapeStorage(L, None, TorchArrays(device))
    Vv = torch.zeros(L, dtype=torch.int64, device=device)
    W = torch.zeros(L, dtype=torch.int64, device=device)
    G = torch.randn(L, dtype=torch.float32, device=device) * 1e-2
    P = torch.zeros(L, dtype=torch.float32, device=device)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    res = {}
    for name, h in (("step_no_shift", 0), ("step_with_shift", 1)):
        prm = V.MomentumParams(np.array([h]), np.array([-0.1]), np.array([0.01]), np.array([0.0]), 52, 52)
        kernels.momentum(be, st, Vv, W, G, P, _copy(prm), forward=True, state=True, position=True)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            kernels.momentum(be, st, Vv, W, G, P, _copy(prm), forward=True, state=True, position=True)
        sync()
        res[name] = L * repeats / (time.perf_counter() - t0)
    a = torch.zeros(L, dtype=torch.int64, device=device)
    b = torch.ones(L, dtype=torch.int64, device=device)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a.add_(b)
    sync()
    res["torch_add_"] = L * repeats / (time.perf_counter() - t0)
    res.update({f"{k}_over_add": v / res["torch_add_"] for k, v in list(res.items()) if k != "torch_add_"})
    return {"lanes": L, "element_steps_per_s": res}


def exact_vs_naive(device: str, T: int) -> dict:
    """The digits MLP (float32) with its data on ``device``: exact (torch backend) against naive autograd."""
    from revsgd.problems import Dataset, digits_mlp, mlp_problem
    d = digits_mlp().data
    data = Dataset(d.x_train.to(device), d.y_train.to(device), d.x_val.to(device), d.y_val.to(device), d.name)
    pb = mlp_problem(data)
    p0 = {k: v.to(device) for k, v in pb.params0.items()}
    hyp = {k: v.to(device) for k, v in pb.hypers.items()}
    out = {}
    for m in ("exact", "naive"):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        extra = {"backend": "torch"} if m == "exact" else {}
        t0 = time.perf_counter()
        r = revsgd.hypergrad(pb.train_loss, pb.val_loss, p0, optimizer="sgd", lr=0.1, momentum=0.9, steps=T,
                             hypers=hyp, method=m, **extra)
        out[m] = {"seconds": time.perf_counter() - t0, "val_loss": r.val_loss,
                  "peak_device_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                                     else None), "tape_bytes": r.stats.get("tape_bytes")}
    out["exact_over_naive_time"] = out["exact"]["seconds"] / out["naive"]["seconds"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lanes", type=float, default=1e8)
    ap.add_argument("--quick", action="store_true", help="fewer cases and steps (a smoke run)")
    a = ap.parse_args(argv)
    dev = a.device
    doc = {"device": dev, "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None,
           "torch": torch.__version__, "revsgd": revsgd.__version__, "python": platform.python_version()}
    t0 = time.perf_counter()
    steps = [("identity", lambda: check_identity(dev, 6 if a.quick else 40)),
             ("cnn_reversal", lambda: check_cnn(dev, 20 if a.quick else 100)),
             ("kernel_rate", lambda: kernel_rate(dev, int(a.lanes), 5 if a.quick else 20)),
             ("exact_vs_naive_digits", lambda: exact_vs_naive(dev, 100 if a.quick else 1000))]
    for name, f in steps:
        t1 = time.perf_counter()
        try:
            doc[name] = f()
        except Exception as e:  # keep going: the JSON says what failed
            doc[name] = {"error": f"{type(e).__name__}: {e}"}
        doc[name]["seconds"] = time.perf_counter() - t1
        print(f"{name}: done in {doc[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    doc["total_seconds"] = time.perf_counter() - t0
    cnn = [v for v in doc["cnn_reversal"].values() if isinstance(v, dict)]
    doc["ok"] = (all("error" not in doc[name] for name, _ in steps) and bool(doc["identity"].get("ok"))
                 and bool(cnn) and all(v.get("ok") for v in cnn))
    print(json.dumps(doc, indent=1, default=str))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
