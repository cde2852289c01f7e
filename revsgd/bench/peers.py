"""The same hypergradients computed by other libraries' differentiable optimisers: torchopt and higher.

Neither is a dependency of revsgd: :func:`peer_missing` says why one cannot run (``None`` when it can),
:func:`peer_unsupported` whether it has the optimiser under test, and the benchmark records such a cell as
skipped with that note. Support: torchopt — heavyball (through SGD's form), sgd, adam, adamw; higher — heavyball,
sgd, adam (higher 0.2.1 has no differentiable AdamW).

The schedules arrive as a dict of (T,) tensors (``lr``, ``momentum`` / ``lr``, ``beta1``, ``beta2``, ``eps``,
``weight_decay``), the values every revsgd method gets, used as given (no quantisation). The peers compute
λ, μ, ... from float64 leaf tensors made of them *by autograd*, so their hypergradients come out in revsgd's
parametrisation by the chain rule, with no conversion by hand.

**heavyball → torch.optim.SGD.** revsgd's heavy ball (Maclaurin et al. 2015) steps ``v_t = γ_t v_{t-1} − (1 − γ_t)
g_t``, ``w_t = w_{t-1} + α_t v_t`` with ``v_0 = 0``. ``torch.optim.SGD`` (dampening 0) steps ``b_t = μ_t b_{t-1} +
g_t`` (``b_1 = g_1``), ``w_t = w_{t-1} − λ_t b_t``. With ``b_t = −v_t / (1 − γ_t)`` the two are the same recursion
for

    λ_t = α_t (1 − γ_t),      μ_t = γ_t (1 − γ_{t-1}) / (1 − γ_t)      (μ_1 is never used),

i.e. for constant γ exactly ``lr = α(1 − γ)``, ``momentum = γ``, ``dampening = 0`` (:func:`torch_sgd_schedule`;
γ = 1 has no such form).

- ``higher``: ``higher.innerloop_ctx(module, torch.optim.SGD / Adam(...))`` with per-step overrides
  (``diffopt.step(loss, override={"lr": [λ_t], "momentum": [μ_t]})``; Adam: ``{"lr": [α_t], "betas": [(β1, β2)]}``
  with ONE pair of beta tensors for the run, so their gradients are the *tied* ones ``beta1_tied`` = Σ_t ∂f/∂β1_t).
  Caveat, measured and reported as it is: higher's DifferentiableAdam is torch 1.x's formula — ε added to √s
  *before* the bias correction (lr·√bc2/bc1 · m/(√s + ε), not torch.optim.Adam's lr/bc1 · m/(√s/√bc2 + ε)) and
  ``math.sqrt(bias_correction2)``, which carries no gradient to β2 — so its Adam trajectory differs slightly from
  torch.optim.Adam's and its β2 gradient is not the derivative of torch's Adam.
- ``torchopt``: the functional ``torchopt.sgd / adam / adamw`` with ``opt.update(..., inplace=False)`` and
  ``torchopt.apply_updates(..., inplace=False)``, ``torch.autograd.grad`` at the end. Its learning rate may be a
  schedule (a callable of the step count: differentiable), but its momentum is ONE value for the whole run (the
  *tied* gradient ``momentum_tied`` = Σ_t ∂f/∂γ_t), and its betas must be Python floats (no beta gradients).

Both run in the params' dtype (float32 for the benchmark problems), as their users would.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from typing import Optional

import numpy as np
import torch

PEERS = ("torchopt", "higher")
INSTALL = {"torchopt": "pip install torchopt==0.7.3", "higher": "pip install higher==0.2.1"}
SUPPORT = {"torchopt": ("heavyball", "sgd", "adam", "adamw"), "higher": ("heavyball", "sgd", "adam")}
UNSUPPORTED_WHY = {("higher", "adamw"): "higher 0.2.1 has no differentiable AdamW (its optimisers: SGD, Adam, "
                                        "Adadelta, Adagrad, Adamax, ASGD, RMSprop, Rprop)"}
PEER_NOTES = {
    ("higher", "adam"): "higher's DifferentiableAdam: eps added before the bias correction (torch 1.x formula) and "
                        "math.sqrt(bias_correction2) carries no gradient to beta2: its trajectory differs slightly "
                        "from torch.optim.Adam's, and beta2_tied is not torch Adam's derivative",
    ("torchopt", "adam"): "torchopt's betas are Python floats: no beta gradients",
    ("torchopt", "adamw"): "torchopt's betas are Python floats: no beta gradients",
}


def peer_missing(name: str) -> Optional[str]:
    """``None`` if the peer library ``name`` can be imported here, else a short reason (with the install line)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {PEERS}")
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{name} not installed ({INSTALL[name]})"


def peer_unsupported(name: str, optimizer: str) -> Optional[str]:
    """``None`` if peer ``name`` has a differentiable form of ``optimizer``, else why not."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {PEERS}")
    if optimizer in SUPPORT[name]:
        return None
    return UNSUPPORTED_WHY.get((name, optimizer), f"{name} has no differentiable {optimizer}")


def torch_sgd_schedule(alpha: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, μ), each (T,): the ``torch.optim.SGD`` (dampening 0) lr and momentum that reproduce revsgd's heavy-ball
    steps with lr α_t and momentum γ_t (module docstring). Differentiable in ``alpha`` and ``gamma`` (both (T,))."""
    if alpha.shape != gamma.shape or alpha.dim() != 1:
        raise ValueError(f"alpha and gamma must both have shape (T,), got {tuple(alpha.shape)} and "
                         f"{tuple(gamma.shape)}")
    if bool((gamma >= 1).any()):
        raise ValueError("momentum γ = 1 has no torch.optim.SGD form (lr = α(1 − γ) = 0)")
    lam = alpha * (1 - gamma)
    mu = torch.cat([gamma[:1], gamma[1:] * (1 - gamma[:-1]) / (1 - gamma[1:])])
    return lam, mu


def _check(sched: dict, optimizer: str, peer: str) -> int:
    why = peer_unsupported(peer, optimizer)
    if why:
        raise ValueError(why)
    need = ("lr", "momentum") if optimizer in ("heavyball", "sgd") else ("lr", "beta1", "beta2")
    T = None
    for k in need:
        v = sched.get(k)
        if v is None or v.dim() != 1:
            raise ValueError(f"{peer} peer: schedule {k!r} must be a tensor of shape (T,) (one value per step)")
        T = v.shape[0] if T is None else T
        if v.shape[0] != T:
            raise ValueError(f"{peer} peer: schedules of different lengths")
    return T


def _constant(sched: dict, key: str, default: float, peer: str) -> float:
    """A schedule the peer takes as one number: it must be constant."""
    v = sched.get(key)
    if v is None:
        return default
    v = v.detach().to(torch.float64).reshape(-1)
    if not bool((v == v[0]).all()):
        raise ValueError(f"{peer} takes one {key} value per run: constant {key} schedules only")
    return float(v[0])


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).clone().requires_grad_()


def _leaves(prob):
    keys = list(prob.params0)
    params0 = [prob.params0[k].detach().clone().requires_grad_() for k in keys]
    hypers = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in prob.hypers.items()}
    return keys, params0, hypers


def _grads_out(keys, params0, hypers, f, named: dict, t0, t1) -> tuple:
    """d f / d (named leaves, params0, float hypers) as float64 NumPy arrays."""
    h_req = [k for k, v in hypers.items() if v.requires_grad]
    names = list(named)
    out = torch.autograd.grad(f, [named[n] for n in names] + list(params0) + [hypers[k] for k in h_req],
                              allow_unused=True)
    t2 = time.perf_counter()
    z = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
    grads = {n: z(g, named[n]).detach().double().reshape(-1).numpy() for n, g in zip(names, out)}
    rest = out[len(names):]
    grads["params0"] = np.concatenate([z(g, p).detach().double().reshape(-1).numpy()
                                       for g, p in zip(rest[:len(keys)], params0)])
    for k, g in zip(h_req, rest[len(keys):]):
        grads[k] = z(g, hypers[k]).detach().double().reshape(-1).numpy()
    stats = {"seconds_forward": t1 - t0, "seconds_reverse": t2 - t1, "tape_bytes": 0, "info_bits": 0.0,
             "storage_bytes": 0}
    return float(f.detach()), grads, stats


def _tied(v: torch.Tensor, peer: str, what: str) -> torch.Tensor:
    v = v.detach().to(torch.float64)
    if not bool((v == v[0]).all()):
        raise ValueError(f"{peer} takes one {what} value per run: constant {what} schedules only")
    return v[0].clone().requires_grad_()


def run_torchopt(prob, sched: dict, optimizer: str = "heavyball") -> tuple[float, dict, dict]:
    """Hypergradients by torchopt's functional optimiser unrolled under autograd (module docstring).

    Returns (val_loss, grads, stats); grads: "lr" (T,), "momentum_tied" (1,) = Σ_t ∂f/∂γ_t for heavyball / sgd,
    "params0" (flat, dict order), one entry per float hyper; all float64 NumPy arrays."""
    import torchopt
    T = _check(sched, optimizer, "torchopt")
    t0 = time.perf_counter()
    with torch.enable_grad():
        alpha = _leaf(sched["lr"])
        named = {"lr": alpha}
        if optimizer in ("heavyball", "sgd"):
            gamma = _tied(sched["momentum"], "torchopt", "momentum")       # one γ, tied over all steps
            named["momentum_tied"] = gamma
            if optimizer == "heavyball":
                lam, _ = torch_sgd_schedule(alpha, gamma.expand(T))     # λ_t = α_t (1 − γ)
            else:
                lam = alpha
            opt = torchopt.sgd(lr=lambda count: lam[int(count)], momentum=gamma,
                               dampening=_constant(sched, "dampening", 0.0, "torchopt"),
                               weight_decay=_constant(sched, "weight_decay", 0.0, "torchopt"))
        else:
            kw = dict(lr=lambda count: alpha[int(count)],
                      betas=(_constant(sched, "beta1", 0.9, "torchopt"), _constant(sched, "beta2", 0.999, "torchopt")),
                      eps=_constant(sched, "eps", 1e-8, "torchopt"),
                      weight_decay=_constant(sched, "weight_decay", 0.0 if optimizer == "adam" else 0.01, "torchopt"))
            opt = (torchopt.adam if optimizer == "adam" else torchopt.adamw)(**kw)
        keys, params0, hypers = _leaves(prob)
        params = tuple(params0)
        state = opt.init(params)
        for t in range(T):
            loss = prob.train_loss(dict(zip(keys, params)), hypers, t)
            g = torch.autograd.grad(loss, params, create_graph=True)
            updates, state = opt.update(g, state, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        t1 = time.perf_counter()
        f = prob.val_loss(dict(zip(keys, params)), hypers)
        return _grads_out(keys, params0, hypers, f, named, t0, t1)


class ParamHolder(torch.nn.Module):
    """An ``nn.Module`` whose parameters are given tensors, in order (for libraries that patch a module)."""

    def __init__(self, tensors):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(t) for t in tensors])

    def forward(self, *a):  # pragma: no cover - the losses read the (fast) parameters directly
        raise NotImplementedError


def run_higher(prob, sched: dict, optimizer: str = "heavyball") -> tuple[float, dict, dict]:
    """Hypergradients by ``higher.innerloop_ctx`` around ``torch.optim.SGD`` / ``Adam`` with per-step overrides
    (module docstring). Returns (val_loss, grads, stats) as :func:`run_torchopt`, with a per-step "momentum" (T,)
    for heavyball / sgd and "beta1_tied", "beta2_tied" for adam."""
    import higher
    T = _check(sched, optimizer, "higher")
    t0 = time.perf_counter()
    with torch.enable_grad():
        alpha = _leaf(sched["lr"])
        named = {"lr": alpha}
        keys, params0, hypers = _leaves(prob)
        holder = ParamHolder(params0)
        params0 = list(holder.parameters())          # the leaves d f / d w_0 is taken against
        if optimizer in ("heavyball", "sgd"):
            gamma = _leaf(sched["momentum"])
            named["momentum"] = gamma
            lam, mu = torch_sgd_schedule(alpha, gamma) if optimizer == "heavyball" else (alpha, gamma)
            opt = torch.optim.SGD(holder.parameters(), lr=float(lam[0].detach()), momentum=float(mu[0].detach()),
                                  dampening=_constant(sched, "dampening", 0.0, "higher"),
                                  weight_decay=_constant(sched, "weight_decay", 0.0, "higher"))
            override = lambda t: {"lr": [lam[t]], "momentum": [mu[t]]}  # noqa: E731
        else:
            b1 = _tied(sched["beta1"], "higher", "beta1")
            b2 = _tied(sched["beta2"], "higher", "beta2")
            named["beta1_tied"], named["beta2_tied"] = b1, b2
            opt = torch.optim.Adam(holder.parameters(), lr=float(alpha[0].detach()),
                                   betas=(float(b1.detach()), float(b2.detach())),
                                   eps=_constant(sched, "eps", 1e-8, "higher"),
                                   weight_decay=_constant(sched, "weight_decay", 0.0, "higher"))
            override = lambda t: {"lr": [alpha[t]], "betas": [(b1, b2)]}  # noqa: E731
        with higher.innerloop_ctx(holder, opt, copy_initial_weights=False, track_higher_grads=True) as (fm, dopt), \
                warnings.catch_warnings():
            # higher's Adam takes math.sqrt of the bias correction (a tensor here): torch warns once per step that
            # the value is detached — the β2 caveat of the module docstring, recorded as the cell's peer_note
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            for t in range(T):
                loss = prob.train_loss(dict(zip(keys, fm.fast_params)), hypers, t)
                dopt.step(loss, override=override(t))
            t1 = time.perf_counter()
            f = prob.val_loss(dict(zip(keys, fm.fast_params)), hypers)
            return _grads_out(keys, params0, hypers, f, named, t0, t1)


RUNNERS = {"torchopt": run_torchopt, "higher": run_higher}
