"""Shared tiny problems for the optimiser, engine and front-end tests.

Everything is float64 and small (a 3-5-2 tanh MLP, 32 parameters in four tensors), so that exact reversal can be
compared with naive autograd to ~1e-8 relative in well under a second per run. The training minibatch of step t is
a pure function of t (precomputed index sets), as reversal requires.

- :func:`mlp_problem` → (train_loss, val_loss, params0, hypers) for the functional front end;
- :func:`schedules` → non-constant schedules for every optimiser, one value per step (T,) or per step and group
  (T, G);
- :func:`rel`, :func:`grad_vector`, :func:`assert_grads_close`: comparisons of hypergradient results;
- :class:`CountingLoss`: a training loss that counts its calls (to show that an error came before any training);
- :func:`float_unroll`: T float steps of an optimiser on a gradient function, through the optimiser protocol only.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

import revsgd

D_IN, HID, D_OUT = 3, 5, 2
N_TRAIN, N_VAL, BATCH = 64, 24, 8
NAMES = ("W0", "b0", "W1", "b1")
G = len(NAMES)
MAX_T = 400
F64 = torch.float64

# step t's minibatch: a pure function of t
_BATCHES = [torch.from_numpy(np.random.default_rng([11, t]).choice(N_TRAIN, BATCH, replace=False))
            for t in range(MAX_T)]


def _data():
    g = torch.Generator().manual_seed(1234)
    xt = torch.randn(N_TRAIN, D_IN, generator=g, dtype=F64)
    xv = torch.randn(N_VAL, D_IN, generator=g, dtype=F64)
    A = torch.randn(D_IN, D_OUT, generator=g, dtype=F64)
    yt = torch.sin(xt @ A) + 0.1 * torch.randn(N_TRAIN, D_OUT, generator=g, dtype=F64)
    yv = torch.sin(xv @ A) + 0.1 * torch.randn(N_VAL, D_OUT, generator=g, dtype=F64)
    return xt, yt, xv, yv


XT, YT, XV, YV = _data()


def mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["W0"] + p["b0"]) @ p["W1"] + p["b1"]


def batch(t: int):
    i = _BATCHES[t]
    return XT[i], YT[i]


def params0(seed: int = 99, dtype=F64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "W0": (torch.randn(D_IN, HID, generator=g, dtype=F64) / math.sqrt(D_IN)).to(dtype),
        "b0": (0.1 * torch.randn(HID, generator=g, dtype=F64)).to(dtype),
        "W1": (torch.randn(HID, D_OUT, generator=g, dtype=F64) / math.sqrt(HID)).to(dtype),
        "b1": (0.1 * torch.randn(D_OUT, generator=g, dtype=F64)).to(dtype),
    }


def hypers(dtype=F64) -> dict:
    """l2 (a scalar) and pw (one weight per entry of W0): both enter the training loss only."""
    g = torch.Generator().manual_seed(7)
    return {"l2": torch.tensor(3e-3, dtype=dtype),
            "pw": (1e-2 * torch.rand(D_IN, HID, generator=g, dtype=F64)).to(dtype)}


def train_loss(p: dict, h: dict, t: int) -> torch.Tensor:
    x, y = (v.to(p["W0"].dtype) for v in batch(t))
    mse = ((mlp(p, x) - y) ** 2).mean()
    return mse + h["l2"] * ((p["W0"] ** 2).sum() + (p["W1"] ** 2).sum()) + (h["pw"] * p["W0"] ** 2).sum()


def val_loss(p: dict, h: dict) -> torch.Tensor:
    dt = p["W0"].dtype
    return ((mlp(p, XV.to(dt)) - YV.to(dt)) ** 2).mean()


def mlp_problem(dtype=F64):
    """(train_loss, val_loss, params0, hypers)."""
    return train_loss, val_loss, params0(dtype=dtype), hypers(dtype)


# --- schedules -----------------------------------------------------------------------------------------------
def _wave(T: int, per_group: bool, lo: float, hi: float, freq: float, phase: float) -> torch.Tensor:
    """Values in [lo, hi] that vary over steps (and, per group, over columns): indexing bugs cannot hide."""
    t = torch.arange(T, dtype=F64)
    if per_group:
        j = torch.arange(G, dtype=F64)
        x = 0.5 + 0.5 * torch.sin(freq * t[:, None] + phase + 1.1 * j[None, :])
    else:
        x = 0.5 + 0.5 * torch.sin(freq * t + phase)
    return lo + (hi - lo) * x


RANGES = {
    "heavyball": {"lr": (0.1, 0.4), "momentum": (0.5, 0.95)},
    "sgd": {"lr": (0.03, 0.1), "momentum": (0.5, 0.9), "dampening": (0.0, 0.4), "weight_decay": (1e-3, 2e-2)},
    "nesterov": {"lr": (0.03, 0.1), "momentum": (0.5, 0.9), "dampening": (0.0, 0.0), "weight_decay": (1e-3, 2e-2)},
    "plain_sgd": {"lr": (0.1, 0.3), "momentum": (0.0, 0.0), "dampening": (0.0, 0.0), "weight_decay": (1e-3, 2e-2)},
    "adam": {"lr": (0.005, 0.02), "beta1": (0.7, 0.95), "beta2": (0.9, 0.999), "eps": (1e-3, 1e-2),
             "weight_decay": (1e-3, 2e-2)},
    "adamw": {"lr": (0.005, 0.02), "beta1": (0.7, 0.95), "beta2": (0.9, 0.999), "eps": (1e-3, 1e-2),
              "weight_decay": (0.05, 0.5)},
}


def schedules(kind: str, T: int, per_group: bool = False) -> dict:
    """Non-constant float64 schedule tensors for optimiser ``kind`` (a key of RANGES): (T,) or (T, G) each."""
    out = {}
    for i, (k, (lo, hi)) in enumerate(RANGES[kind].items()):
        out[k] = _wave(T, per_group, lo, hi, 0.17 + 0.11 * i, 0.7 * i)
    return out


def optimizer_name(kind: str) -> str:
    return "sgd" if kind == "plain_sgd" else kind


# --- comparisons ---------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64 (the reference must not be zero: the comparison would prove nothing)."""
    a = torch.as_tensor(a).detach().to(F64).reshape(-1)
    b = torch.as_tensor(b).detach().to(F64).reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = float(torch.linalg.vector_norm(b))
    assert nb > 0, "reference is identically zero: the comparison would prove nothing"
    return float(torch.linalg.vector_norm(a - b)) / nb


def grad_items(res) -> list:
    """(name, tensor) for every hypergradient of a HypergradResult: schedules, each params0 tensor, hypers."""
    out = []
    for k, v in sorted(res.grads.items()):
        if k == "params0":
            out += [(f"params0.{n}", x) for n, x in sorted(v.items())]
        elif v is not None:
            out.append((k, v))
    return out


def grad_vector(res) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).to(F64) for _, v in grad_items(res)])


def assert_grads_close(res, ref, tol: float, what: str = "", skip=()) -> None:
    """Every hypergradient of ``res`` within ``tol`` (relative, per entry of grads) of ``ref``'s."""
    a, b = dict(grad_items(res)), dict(grad_items(ref))
    assert set(a) == set(b), (what, sorted(a), sorted(b))
    for k in a:
        if k in skip:
            continue
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)
        if not bool(b[k].abs().sum()):   # e.g. momentum and dampening of plain SGD: no dependence at all
            assert not bool(a[k].abs().sum()), f"{what}: grads[{k!r}] must be zero like the reference's"
            continue
        r = rel(a[k], b[k])
        assert r <= tol, f"{what}: grads[{k!r}] differ by {r:.3e} relative (tolerance {tol:g})"


# --- instrumentation -----------------------------------------------------------------------------------------
class CountingLoss:
    """Wraps a training loss and counts its calls (steps seen in ``steps``)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0
        self.steps: list = []

    def __call__(self, p, h, t):
        self.calls += 1
        self.steps.append(t)
        return self.fn(p, h, t)


# --- the optimiser protocol on its own -----------------------------------------------------------------------
def float_unroll(opt, w0: torch.Tensor, grad_fn: Callable, sched: dict, sizes: Optional[np.ndarray] = None):
    """T float steps of ``opt`` (a ReversibleOptimizer) from w0 on ``grad_fn(w, t)``, through prepare /
    hypers_at / float_step only. Returns the list of (w_t, state_t), t = 0 … T."""
    from revsgd.optim import Schedules
    sizes = np.array([w0.numel()]) if sizes is None else sizes
    sch = Schedules({k: np.asarray(v, dtype=np.float64) for k, v in sched.items()}, sizes, w0.device)
    plan = opt.prepare(sch, exact=False)
    der = {k: torch.from_numpy(v) for k, v in plan.derived.items()}
    w, st = w0.clone(), opt.float_init(w0)
    out = [(w, st)]
    for t in range(sch.T):
        g = grad_fn(w, t)
        w, st = opt.float_step(w, st, g, opt.hypers_at(sch, der, t), t)
        out.append((w, st))
    return out


def run(kind: str, method: str, T: int, per_group: bool = False, problem=None, **options):
    """``revsgd.hypergrad`` of the MLP problem with ``schedules(kind, T, per_group)``."""
    tl, vl, p0, hy = mlp_problem() if problem is None else problem
    return revsgd.hypergrad(tl, vl, p0, optimizer=optimizer_name(kind), hypers=hy, method=method,
                            **schedules(kind, T, per_group), **options)
