"""The unroll engine: T optimiser steps forward, then one optimiser-agnostic reverse sweep (docs/design.md §4).

Reverse sweep, from dw = ∂f/∂w_T, dθ = ∂f/∂θ, d(state) = 0, for t = T−1 … lo::

    recover w_t (P ← w_t);  g_t, vjp = grad_vjp(t);  recover state_t
    (dw, d state, dg, dhp) = optimiser adjoint of the step at (w_t, state_t, g_t) → (w_{t+1}, state_{t+1})
    grads[h][t] += Σ_lanes dhp[h]            (per group for per-group schedules)
    dw += ∇²L·dg;  dθ += ∂_θ(∇L·dg)           (one backward pass through g_t's graph)

Then schedules that feed derived per-step quantities (e.g. Adam's bias corrections) get those adjoints by autograd.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..optim import ReversibleOptimizer, Schedules
from . import methods as M
from .buffers import KEY
from .problem import Problem

METHODS = ("exact", "naive", "trajectory", "checkpoint", "replay", "drmad", "truncated")
ENGINE_METHODS = tuple(m for m in METHODS if m != "naive")
_OWN = {"checkpoint_every": "checkpoint", "truncate": "truncated", "replay_k": "replay", "backend": "exact",
        "tape_dir": "exact", "spill_block_bytes": "exact"}


@dataclass
class EngineResult:
    val_loss: float
    w: torch.Tensor               # w_T (flat, in the params' dtype: what the losses saw)
    grads: dict                   # schedule name -> (T,) or (T, G) float64 tensor
    d_w0: torch.Tensor
    d_state0: dict
    d_theta: list
    stats: dict = field(default_factory=dict)


class Unroll:
    """One T-step unroll of ``opt`` on ``prob``: ``forward()`` trains (then ``wT`` holds w_T in the params' dtype),
    ``reverse(dw)`` sweeps back (callable again after another ``forward()``).
    ``exact_state(opt, w0, P, plan, backend, state0)`` replaces the exact method's
    :class:`~revsgd.optim.ExactState` (e.g. a sharded one, :mod:`revsgd.distributed`); ``tape_dir`` spills the
    tapes to files there in blocks of ``spill_block_bytes`` (docs/distributed.md)."""

    def __init__(self, prob: Problem, opt: ReversibleOptimizer, schedules: dict, w0: torch.Tensor, *,
                 sizes: Optional[np.ndarray] = None, state0: Optional[dict] = None, method: str = "exact",
                 backend: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 truncate: Optional[int] = None, replay_k: Optional[int] = None, progress: bool = False,
                 exact_state: Optional[Callable] = None, tape_dir=None, spill_block_bytes: Optional[int] = None):
        if method not in ENGINE_METHODS:
            raise ValueError(f"unknown method {method!r} for the engine; choose one of {ENGINE_METHODS}")
        for name, val in (("checkpoint_every", checkpoint_every), ("truncate", truncate), ("replay_k", replay_k),
                          ("backend", backend), ("tape_dir", tape_dir), ("spill_block_bytes", spill_block_bytes)):
            if val is not None and method != _OWN[name]:
                raise TypeError(f"option {name!r} belongs to method {_OWN[name]!r}, not {method!r}")
        L = prob.num_lanes
        sizes = np.array([L], dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
        self.sch = Schedules(schedules, sizes, prob.device)
        self.T = T = self.sch.T
        if T < 1:
            raise ValueError("the schedule must have at least one step (T = 0)")
        self.prob, self.opt, self.method, self.progress = prob, opt, method, progress
        self.plan = opt.prepare(self.sch, exact=(method == "exact"))
        self.der_dev = {k: torch.from_numpy(v).to(prob.device) for k, v in self.plan.derived.items()}
        w0 = w0.detach().to(torch.float64).to(prob.device)
        s0 = (w0, opt.float_init(w0, state0))
        if prob.buffers is not None:
            s0[1][KEY] = prob.buffers.R0
            if method == "drmad":
                raise ValueError("method 'drmad' cannot recover running statistics (BatchNorm buffers) from the "
                                 "straight line; use another method")
        if method == "exact":
            if not opt.supports_exact:
                raise ValueError(opt.exact_refusal or f"optimizer {opt.name!r} has no exact (reversible) step; "
                                 f"use a stored-state method (checkpoint, replay, trajectory)")
            storage = {k: v for k, v in (("tape_dir", tape_dir), ("spill_block_bytes", spill_block_bytes))
                       if v is not None}
            self.prov = M.Exact(opt, prob, self.plan, w0, state0, backend, exact_state, storage)
        else:
            stepper = M._Stepper(opt, prob, self.hypers_at)
            if method == "trajectory":
                self.prov = M.Trajectory(stepper, s0)
            elif method == "checkpoint":
                self.prov = M.Checkpoint(stepper, s0, _positive("checkpoint_every", checkpoint_every,
                                                                max(1, int(round(np.sqrt(T))))))
            elif method == "replay":
                self.prov = M.Replay(stepper, s0, _positive("replay_k", replay_k, 4, lo=2))
            elif method == "truncated":
                self.prov = M.Truncated(stepper, s0, _positive("truncate", truncate, max(1, T // 10)))
            else:
                f = getattr(opt, "drmad_state", None)
                if f is None:
                    raise ValueError(f"method 'drmad' is defined for optimizers whose state follows from the "
                                     f"straight-line trajectory (heavyball, sgd), not {opt.name!r}")
                self.prov = M.DrMAD(stepper, s0, lambda t, w, w1: f(w, w1, self.hypers_at(t)))
        self.stats = {"method": method, "optimizer": opt.name, "steps": T, "lanes": L}
        self.forward_done = False

    def hypers_at(self, t: int) -> dict:
        return self.opt.hypers_at(self.sch, self.der_dev, t)

    def _bar(self, what: str):
        if not self.progress:
            return None, (lambda k=1: None)
        from tqdm.auto import tqdm
        bar = tqdm(total=self.T, desc=f"{self.method} {what}", leave=False)
        return bar, bar.update

    def forward(self) -> tuple:
        """Train T steps; returns (w_T, state_T) as float64 tensors and leaves w_T in the problem's P (and a copy,
        in the params' dtype, in ``EngineResult.w``). The sweep keeps neither: it starts from the provider's
        final state, so a caller that drops them holds no model-sized float64 vectors through the reverse pass."""
        bar, tick = self._bar("forward")
        t0 = time.perf_counter()
        try:
            sT = self.prov.forward(self.T, tick)
        finally:
            if bar is not None:
                bar.close()
        self.prob.set_params(sT[0])
        self.wT = self.prob.P.detach().clone()
        self.stats["seconds_forward"] = time.perf_counter() - t0
        self.forward_done = True
        return sT

    def reverse(self, dw: torch.Tensor, dtheta: Optional[list] = None, dstate: Optional[dict] = None, *,
                overwrite: bool = False) -> EngineResult:
        """Sweep back from dw = ∂f/∂w_T (and ∂f/∂θ, ∂f/∂state_T); returns hypergradients (val_loss left NaN).
        ``overwrite``: dw is the caller's to give up — when it is float64 on the problem's device the sweep
        accumulates into it instead of a copy."""
        if not self.forward_done:
            raise RuntimeError("reverse() needs a completed forward() (each forward allows one reverse)")
        self.forward_done = False
        prov, opt, prob, sch = self.prov, self.opt, self.prob, self.sch
        bar, tick = self._bar("reverse")
        t0 = time.perf_counter()
        dev = prob.device
        keep = overwrite and dw.dtype == torch.float64 and dw.device == dev
        dw = dw.detach() if keep else dw.detach().to(torch.float64).to(dev).clone()
        dth = [None if x is None else x.to(torch.float64).clone()
               for x in (prob.hyper_zeros() if dtheta is None else dtheta)]
        dst = {k: (torch.zeros_like(dw) if dstate is None or k not in dstate else dstate[k].to(dw).clone())
               for k in opt.state_names}
        buf = prob.buffers
        dR = None if buf is None else (torch.zeros_like(buf.R0) if prob.d_buffers is None
                                       else prob.d_buffers.detach().to(torch.float64).clone())
        grads = sch.zeros()
        dder = {k: torch.zeros(v.shape, dtype=torch.float64, device=dev) for k, v in self.plan.derived.items()}
        post = prov.final()
        gbuf = torch.empty_like(dw)          # step t's gradient in float64 (the adjoint may overwrite it)
        try:
            for t in range(self.T - 1, prov.lo - 1, -1):
                prov.before(t)
                g, vjp = prob.grad_vjp(t)
                pre = prov.after(t, g)
                g64 = gbuf.copy_(g.detach())
                dw_in = dw
                dw, dst, dg, dhp = opt.adjoint(t, pre[0], pre[1], g64, post[0], post[1], dw, dst, self.hypers_at(t))
                self._accumulate(dhp, t, grads, dder)
                du = None
                if buf is not None:
                    dR, du = buf.adjoint(dR)
                if dw is dw_in:                  # the sweep's own buffer: the product is added in place
                    dw, th = vjp(dg, du, acc=dw)
                else:                            # a new dw may alias what the adjoint returned
                    hu, th = vjp(dg, du)
                    dw = dw + hu
                for i, x in enumerate(th):
                    if x is not None:
                        dth[i] = x.to(torch.float64) if dth[i] is None else dth[i] + x
                post = pre
                tick()
        finally:
            if bar is not None:
                bar.close()
        if prov.lo > 0:   # truncated: nothing flows past step lo
            dw = torch.zeros_like(dw)
            dst = {k: torch.zeros_like(v) for k, v in dst.items()}
            dR = None if dR is None else torch.zeros_like(dR)
        prov.finish()
        if dder:
            grads = self._through_derived(grads, dder)
        st = self.stats
        st["finite"] = all(bool(torch.isfinite(x).all()) for x in [dw, *grads.values(), *dst.values(), *dth]
                           if x is not None)
        if not st["finite"]:
            warnings.warn(f"the {self.method} hypergradient is not finite (the adjoint diverged over T={self.T} "
                          f"steps" + ("; DrMAD's straight-line trajectory is a poor approximation here)"
                                      if self.method == "drmad" else ")"), RuntimeWarning, stacklevel=3)
        st["seconds_reverse"] = time.perf_counter() - t0
        st.update(tape_bytes=0, info_bits=0, storage_bytes=0)
        st.update(prov.stats)
        if dR is not None:
            dst[KEY] = dR
        return EngineResult(float("nan"), self.wT, grads, dw, dst, dth, dict(st))

    def _accumulate(self, dhp: dict, t: int, grads: dict, dder: dict) -> None:
        self.sch.reduce({k: v for k, v in dhp.items() if k in grads}, t, grads)
        if dder:
            self.sch.reduce({k: v for k, v in dhp.items() if k in dder}, t, dder)

    def _through_derived(self, grads: dict, dder: dict) -> dict:
        with torch.enable_grad():
            leaves = {k: torch.from_numpy(v).to(self.prob.device).requires_grad_() for k, v in self.sch.host.items()}
            der = self.opt.derived(leaves)
            names = [k for k in der if k in dder]
            outs = torch.autograd.grad([der[k] for k in names], list(leaves.values()),
                                       [dder[k] for k in names], allow_unused=True)
        return {k: grads[k] + (0 if d is None else d) for (k, _), d in zip(leaves.items(), outs)}


def _positive(name: str, v, default: int, lo: int = 1) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)
