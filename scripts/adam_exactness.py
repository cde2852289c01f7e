"""Exactness of reversible Adam and AdamW on the digits MLP in float64, measured in one run (prints JSON).

For each optimiser, at T steps (default 10,000) with a cosine lr schedule:

- ``exact_vs_naive``: relative error ‖exact − naive‖ / ‖naive‖ of every hypergradient (lr, beta1, beta2, eps,
  weight_decay, params0, log_l2), naive = autograd through the whole unroll of float64 torch.optim-equivalent steps;
- ``information``: bits the tapes hold ÷ Σ over lanes and decaying states of Σ_t −log2(decay factor_t) — the
  information the decays destroy (β1, β2 and, for AdamW, 1 − αλ);
- ``trajectory``: max |w_T(exact) − w_T(torch.optim)| ÷ max |w_T(torch.optim) − w_0|, against float64
  ``torch.optim.Adam`` / ``AdamW`` on the same minibatches;
- ``tiny_decay`` (AdamW, αλ = 1e-6 by default): the exact final weights against float64 ``torch.optim.AdamW`` with that
  weight decay and with weight_decay = 0 — the decay's effect must be resolved, not quantised away.

Usage: ``python scripts/adam_exactness.py [--steps 10000] [--out docs/bench/adam_exactness.json]``
(naive at T = 10,000 holds the whole graph: about 10 GB of RAM).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import revsgd
from revsgd.bench.timing import emit_json
from revsgd.problems import digits_mlp


def schedules(T: int, optimizer: str, wd: float) -> dict:
    t = torch.arange(T, dtype=torch.float64)
    lr = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1.0 + torch.cos(math.pi * t / T))      # cosine, 1e-3 → 1e-4
    return {"lr": lr, "beta1": torch.full((T,), 0.9, dtype=torch.float64),
            "beta2": torch.full((T,), 0.999, dtype=torch.float64),
            "eps": torch.full((T,), 1e-8, dtype=torch.float64),
            "weight_decay": torch.full((T,), wd, dtype=torch.float64)}


def flat(grads: dict) -> dict:
    out = {}
    for k, v in grads.items():
        if isinstance(v, dict):
            out[k] = torch.cat([x.detach().reshape(-1).to(torch.float64) for x in v.values()])
        elif v is not None:
            out[k] = v.detach().reshape(-1).to(torch.float64)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb, d = float(b.norm()), float((a - b).norm())
    return d / nb if nb > 0 else (0.0 if d == 0 else math.inf)


def torch_optim_run(prob, optimizer: str, sched: dict) -> torch.Tensor:
    """w_T of float64 torch.optim.Adam / AdamW with the per-step schedules (set into the param group each step)."""
    keys = list(prob.params0)
    ps = [prob.params0[k].detach().clone().requires_grad_() for k in keys]
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    opt = cls(ps, lr=float(sched["lr"][0]))
    T = sched["lr"].shape[0]
    for t in range(T):
        g = opt.param_groups[0]
        g["lr"], g["betas"] = float(sched["lr"][t]), (float(sched["beta1"][t]), float(sched["beta2"][t]))
        g["eps"], g["weight_decay"] = float(sched["eps"][t]), float(sched["weight_decay"][t])
        with revsgd.seeded(0, t):      # as revsgd runs the loss (the digits loss draws nothing; kept for parity)
            loss = prob.train_loss(dict(zip(keys, ps)), prob.hypers, t)
        grads = torch.autograd.grad(loss, ps)
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in ps])


def information_limit(optimizer: str, sched: dict, lanes: int) -> float:
    """Σ_lanes Σ_states Σ_t −log2 f_t: bits destroyed by the decays (one group: the same factors on every lane)."""
    bits = float(-np.log2(sched["beta1"].numpy()).sum() - np.log2(sched["beta2"].numpy()).sum())
    if optimizer == "adamw":
        bits += float(-np.log2(1.0 - (sched["lr"] * sched["weight_decay"]).numpy()).sum())
    return bits * lanes


def run_optimizer(optimizer: str, T: int, wd: float) -> dict:
    prob = digits_mlp(dtype=torch.float64)
    sched = schedules(T, optimizer, wd)
    w0 = torch.cat([v.reshape(-1) for v in prob.params0.values()])
    kw = dict(optimizer=optimizer, lr=sched["lr"], beta1=sched["beta1"], beta2=sched["beta2"], eps=sched["eps"],
              weight_decay=sched["weight_decay"], hypers=prob.hypers)
    t0 = time.perf_counter()
    ex = revsgd.hypergrad(prob.train_loss, prob.val_loss, prob.params0, method="exact", **kw)
    t1 = time.perf_counter()
    nv = revsgd.hypergrad(prob.train_loss, prob.val_loss, prob.params0, method="naive", **kw)
    t2 = time.perf_counter()
    fe, fn = flat(ex.grads), flat(nv.grads)
    wT_exact = torch.cat([v.reshape(-1) for v in ex.params.values()])
    wT_torch = torch_optim_run(prob, optimizer, sched)
    limit = information_limit(optimizer, sched, w0.numel())
    return {
        "problem": prob.description, "T": T, "lanes": int(w0.numel()),
        "schedules": {"lr": "cosine 1e-3 -> 1e-4", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": wd},
        "val_loss": {"exact": ex.val_loss, "naive": nv.val_loss},
        "exact_vs_naive": {k: rel(fe[k], fn[k]) for k in fn},
        "exact_vs_naive_max": max(rel(fe[k], fn[k]) for k in fn),
        "information": {"info_bits": int(ex.stats["info_bits"]), "limit_bits": limit,
                        "held_over_limit": ex.stats["info_bits"] / limit, "tape_bytes": int(ex.stats["tape_bytes"])},
        "trajectory": {"max_abs_diff": float((wT_exact - wT_torch).abs().max()),
                       "max_abs_move": float((wT_torch - w0).abs().max()),
                       "relative": float((wT_exact - wT_torch).abs().max() / (wT_torch - w0).abs().max())},
        "seconds": {"exact": t1 - t0, "naive": t2 - t1},
    }


def tiny_decay(T: int, lr: float, lam: float) -> dict:
    """AdamW with lr·weight_decay = lr·lam: exact vs float64 torch.optim.AdamW with and without the decay."""
    prob = digits_mlp(dtype=torch.float64)
    sched = schedules(T, "adamw", lam)
    sched["lr"] = torch.full((T,), lr, dtype=torch.float64)
    ex = revsgd.hypergrad(prob.train_loss, prob.val_loss, prob.params0, optimizer="adamw", lr=sched["lr"],
                          weight_decay=sched["weight_decay"], hypers=prob.hypers)
    w_ex = torch.cat([v.reshape(-1) for v in ex.params.values()])
    w_ref = torch_optim_run(prob, "adamw", sched)
    w_nodecay = torch_optim_run(prob, "adamw", {**sched, "weight_decay": torch.zeros(T, dtype=torch.float64)})
    err, effect = float((w_ex - w_ref).abs().max()), float((w_ref - w_nodecay).abs().max())
    return {"T": T, "lr": lr, "weight_decay": lam, "lr_times_weight_decay": lr * lam,
            "exact_vs_torch_adamw_max_abs": err, "decay_effect_max_abs": effect, "error_over_effect": err / effect}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10000, help="T for the exact-vs-naive comparison")
    ap.add_argument("--tiny-steps", type=int, default=1000, help="T for the AdamW tiny-decay check")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)           # the torch.optim reference runs as revsgd does (threads=None pins 1)
    t0 = time.perf_counter()
    doc = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "torch": torch.__version__, "revsgd": revsgd.__version__, "threads": 1,
           "adam": run_optimizer("adam", a.steps, 1e-4),
           "adamw": run_optimizer("adamw", a.steps, 1e-2),
           "adamw_tiny_decay": tiny_decay(a.tiny_steps, 1e-3, 1e-3)}
    doc["seconds"] = time.perf_counter() - t0
    emit_json(doc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
