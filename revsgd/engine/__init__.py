"""The unroll engine: methods that compute the same hypergradient (docs/design.md §4, §6), optimiser-agnostic.

:class:`Unroll` drives a :class:`~revsgd.engine.problem.Problem` (flat parameter vectors as torch tensors on one
device) with a :class:`~revsgd.optim.ReversibleOptimizer`; :func:`hypergrad_numpy` is the framework-free adapter
(NumPy callbacks on flat float64 vectors, so JAX, autograd or hand-written models can drive the same engine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..optim import ReversibleOptimizer, get_optimizer
from .methods import REVERSAL_HINT, ReversalError
from .problem import NumpyProblem, Problem
from .sweep import ENGINE_METHODS, METHODS, EngineResult, Unroll

__all__ = ["Unroll", "EngineResult", "ReversalError", "REVERSAL_HINT", "Problem", "METHODS", "ENGINE_METHODS",
           "hypergrad_numpy", "NumpyResult"]


@dataclass
class NumpyResult:
    """What :func:`hypergrad_numpy` returns (NumPy arrays)."""
    val_loss: float
    w: np.ndarray                  # w_T
    grads: dict                    # schedule name -> (T,) or (T, G): d val / d schedule
    d_w0: np.ndarray
    d_state0: dict                 # optimiser state name -> d val / d state_0
    d_theta: np.ndarray
    stats: dict = field(default_factory=dict)


def hypergrad_numpy(grad: Callable, grad_vjp: Callable, val: Callable, w0: np.ndarray, *,
                    optimizer: Union[str, ReversibleOptimizer] = "heavyball", offsets: Optional[np.ndarray] = None,
                    num_hypers: int = 0, state0: Optional[dict] = None, method: str = "exact",
                    frac_bits: Optional[Union[int, dict]] = None, progress: bool = False,
                    **schedules_and_options) -> NumpyResult:
    """Hypergradients of ``val(w_T)`` through T optimiser steps, from NumPy callbacks on flat float64 vectors::

        grad(w, t)     -> g                  ∇_w L(w, θ, t), shape (L,)
        grad_vjp(w, t) -> (g, vjp)           the same g (bit for bit) and vjp(u) -> (∇_w(g·u), ∂_θ(g·u)) — (L,), (K,)
        val(w)         -> (f, df/dw, df/dθ)  validation loss and its gradients, (L,), (K,)

    Schedules are keyword arguments named as the optimiser's (``lr`` and ``momentum`` for the default
    ``"heavyball"``; see :mod:`revsgd.optim`), each of shape (T,) or (T, G) with ``offsets`` (G+1,) cutting the
    lanes into G contiguous groups. Options: ``method``, ``frac_bits``, ``backend``, ``checkpoint_every``,
    ``truncate``, ``replay_k``, ``progress``, ``state0`` (initial optimiser states, e.g. {"velocity": v0}).
    """
    opt = get_optimizer(optimizer, frac_bits)
    options = {k: schedules_and_options.pop(k) for k in ("backend", "checkpoint_every", "truncate", "replay_k")
               if k in schedules_and_options}
    sched = _schedules(opt, schedules_and_options)
    w0 = np.ascontiguousarray(w0, dtype=np.float64)
    if w0.ndim != 1 or w0.size == 0:
        raise ValueError("w0 must be a non-empty 1-D float array")
    sizes = None
    if offsets is not None:
        o = np.asarray(offsets, dtype=np.int64)
        if o.ndim != 1 or o[0] != 0 or o[-1] != w0.size or np.any(np.diff(o) <= 0):
            raise ValueError("offsets must increase strictly from 0 to len(w0)")
        sizes = np.diff(o)
    for k, v in sched.items():
        if v.ndim == 2 and (sizes is None or v.shape[1] != sizes.shape[0]):
            raise ValueError(f"{k} has {v.shape[1]} columns but offsets define "
                             f"{1 if sizes is None else sizes.shape[0]} groups")
    prob = NumpyProblem(grad, grad_vjp, val, w0.size, num_hypers)
    s0 = None if state0 is None else {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in
                                      state0.items()}
    with torch.no_grad():
        u = Unroll(prob, opt, sched, torch.from_numpy(w0), sizes=sizes, state0=s0, method=method,
                   progress=progress, **options)
        wT, _ = u.forward()
        f, dw, dth = prob.val()
        res = u.reverse(dw, dth, overwrite=True)
    return NumpyResult(f, wT.numpy().copy(), {k: v.numpy() for k, v in res.grads.items()}, res.d_w0.numpy(),
                       {k: v.numpy() for k, v in res.d_state0.items()}, res.d_theta[0].numpy(), res.stats)


def _schedules(opt: ReversibleOptimizer, given: dict) -> dict:
    """The optimiser's schedules as float64 arrays: every name given or defaulted, nothing unknown."""
    unknown = set(given) - set(opt.schedule_names)
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)} for optimizer {opt.name!r}; its schedules are "
                        f"{list(opt.schedule_names)}")
    defaults = getattr(opt, "defaults", {})
    missing = [k for k in opt.schedule_names if k not in given and k not in defaults]
    if missing:
        raise TypeError(f"optimizer {opt.name!r} needs the schedule(s) {missing}")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in given.items()}
    T = {a.shape[0] for a in arrays.values() if a.ndim >= 1}
    if len(T) != 1 or any(a.ndim not in (1, 2) for a in arrays.values()):
        raise ValueError(f"every schedule must have shape (T,) or (T, groups) with the same T, got "
                         f"{ {k: a.shape for k, a in arrays.items()} }")
    T = T.pop()
    for k in opt.schedule_names:
        if k not in arrays:
            arrays[k] = np.full(T, float(defaults[k]))
    return arrays
