"""Adam and AdamW with ``torch.optim.Adam`` / ``torch.optim.AdamW`` semantics (maximize=False, amsgrad=False)."""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..kernels import AdamParams
from .base import ExactState, Plan, ReversibleOptimizer, Schedules, axpy, scale

_ZERO = np.zeros(1)


class Adam(ReversibleOptimizer):
    """``torch.optim.Adam``, with every hyperparameter a schedule (one value per step, or per step and group)::

        g' = g + λ w                                   (weight_decay: L2 added to the gradient)
        m ← β1 m + (1 − β1) g';   s ← β2 s + (1 − β2) g'²
        w ← w − α/bc1 · m / (√s / √bc2 + ε),   bc1 = 1 − Π_{τ≤t} β1_τ,  bc2 = 1 − Π_{τ≤t} β2_τ

    (For constant β the products are β^(t+1), torch's bias corrections.) The exact method keeps m and s rescaled by
    their decays, so β1, β2 are used as given, unquantised; it stores −log2 β1 − log2 β2 bits per parameter per step.
    """
    name = "adam"
    schedule_names = ("lr", "beta1", "beta2", "eps", "weight_decay")
    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    state_names = ("exp_avg", "exp_avg_sq")
    #: m has the gradient's scale (±2048 at 52 bits); s, the squared gradient's, is held in two limbs with 110
    #: fractional bits: s < 8192 (|g| < 90; beyond, an OverflowError naming exp_avg_sq) with a resolution of 8e-34,
    #: so every realistic update is held exactly and small moments keep their relative precision.
    default_frac = {"exp_avg": 52, "exp_avg_sq": 110}
    two_limb = ("exp_avg_sq",)
    decay_names = {"exp_avg": "beta1", "exp_avg_sq": "beta2", "params": "1 - lr * weight_decay"}
    decoupled = False

    def check(self, sch: Schedules) -> None:
        h = sch.host
        if not np.all(np.isfinite(h["lr"]) & (h["lr"] >= 0)):
            raise ValueError("lr must be finite and non-negative")
        for b in ("beta1", "beta2"):
            if not np.all((h[b] >= 0) & (h[b] < 1)):
                bad = h[b][~((h[b] >= 0) & (h[b] < 1))].ravel()[0]
                raise ValueError(f"{b} must lie in [0, 1), got {bad!r}")
        if not np.all(np.isfinite(h["eps"]) & (h["eps"] > 0)):
            raise ValueError("eps must be finite and positive")
        if not np.all(np.isfinite(h["weight_decay"]) & (h["weight_decay"] >= 0)):
            raise ValueError("weight_decay must be finite and non-negative")
        if self.decoupled and not np.all(sch.grid("lr") * sch.grid("weight_decay") < 1):
            raise ValueError("AdamW needs lr * weight_decay < 1 (the decay factor 1 - lr*weight_decay must stay positive)")

    def derived(self, sch: dict) -> dict:
        return {"bc1": 1.0 - torch.cumprod(sch["beta1"], 0), "bc2": 1.0 - torch.cumprod(sch["beta2"], 0)}

    def decay_factors(self, sch: Schedules) -> dict:
        f = {"exp_avg": sch.host["beta1"], "exp_avg_sq": sch.host["beta2"]}
        if self.decoupled:
            lr, wd = sch.host["lr"], sch.host["weight_decay"]
            f["params"] = 1.0 - (lr * wd if lr.ndim == wd.ndim == 1 else sch.grid("lr") * sch.grid("weight_decay"))
        return f

    # --- exact side ----------------------------------------------------------------------------------------
    def _params(self, plan: Plan, t: int, forward: bool) -> AdamParams:
        d1, d2 = plan.decay["exp_avg"], plan.decay["exp_avg_sq"]
        dw = plan.decay.get("params")
        e1, e2 = d1.e[t + 1], d2.e[t + 1]
        c0 = dw.e[t] if dw is not None else np.ones(plan.sch.G)
        c1 = dw.e[t + 1] if dw is not None else c0
        fw = 2.0 ** -self.frac["params"]
        lr = plan.groups("lr", t)
        return AdamParams(
            h1=d1.h[t], h2=d2.h[t], hw=dw.h[t] if dw is not None else np.zeros(plan.sch.G, dtype=np.int64),
            c1=(1.0 - plan.groups("beta1", t)) / e1, c2=(1.0 - plan.groups("beta2", t)) / e2,
            lam=_ZERO if self.decoupled else np.ascontiguousarray(plan.groups("weight_decay", t)),
            am=e1 * 2.0 ** -self.frac["exp_avg"], as_=e2 * 2.0 ** -self.frac["exp_avg_sq"],
            sb=np.sqrt(plan.groups("bc2", t)), eps=np.ascontiguousarray(plan.groups("eps", t)),
            cu=(lr / plan.groups("bc1", t)) / c1, ws=c0 * fw, ps=(c1 if forward else c0) * fw,
            frac_m=self.frac["exp_avg"], frac_s=self.frac["exp_avg_sq"], frac_w=self.frac["params"])

    def _run(self, ex: ExactState, g, t: int, plan: Plan, forward: bool, state: bool, position: bool, P) -> None:
        kernels.adam(ex.be, (ex.tapes["exp_avg"], ex.tapes["exp_avg_sq"], ex.tapes.get("params")),
                     ex.view("exp_avg"), ex.view("exp_avg_sq"), ex.view("params"),
                     None if g is None else ex.arr(g), P, ex.local(self._params(plan, t, forward)),
                     forward=forward, state=state, position=position)

    def exact_step(self, ex: ExactState, g, t: int, plan: Plan) -> None:
        self._run(ex, g, t, plan, True, True, True, ex.P_arr)

    def exact_undo_position(self, ex: ExactState, t: int, plan: Plan) -> None:
        self._run(ex, None, t, plan, False, False, True, ex.P_arr)

    def exact_undo_state(self, ex: ExactState, g, t: int, plan: Plan) -> None:
        self._run(ex, g, t, plan, False, True, False, None)

    # --- float side ----------------------------------------------------------------------------------------
    def float_step(self, w, st, g, hp, t):
        a, b1, b2, eps, lam = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
        if self.decoupled:
            gp, wd = g, w * (1.0 - a * lam)
        else:
            gp, wd = g + lam * w, w
        m = b1 * st["exp_avg"] + (1.0 - b1) * gp
        s = b2 * st["exp_avg_sq"] + (1.0 - b2) * (gp * gp)
        den = torch.sqrt(s) / _sqrt(hp["bc2"]) + eps
        return wd - (a / hp["bc1"]) * (m / den), {"exp_avg": m, "exp_avg_sq": s}

    def adjoint(self, t, w, st, g, w1, st1, dw, dst, hp):
        a, b1, b2, eps, lam = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
        bc1, bc2 = hp["bc1"], hp["bc2"]
        gp = g if self.decoupled else axpy(g, lam, w)
        m1, s1 = st1["exp_avg"], st1["exp_avg_sq"]
        rs = torch.sqrt(s1)
        sb = _sqrt(bc2)
        den = rs / sb + eps
        q = m1 / den
        step = a / bc1
        dwq = dw * q
        dden = dwq * step / den                          # ∂w'/∂den = step·m'/den²
        dm = dst["exp_avg"] - dw * step / den
        dsq = torch.where(rs > 0, dden / (2.0 * rs * sb), torch.zeros_like(rs))   # √s' is not differentiable at 0
        ds = dst["exp_avg_sq"] + dsq
        dgp = (1.0 - b1) * dm + (2.0 * (1.0 - b2)) * (gp * ds)
        dhp = {"lr": (dwq, -1.0 / bc1), "bc1": (dwq, step / bc1), "eps": dden,
               "bc2": (dden, rs, -0.5 / (sb * bc2)),
               "beta1": (dm, st["exp_avg"] - gp), "beta2": (ds, st["exp_avg_sq"] - gp * gp)}
        if self.decoupled:
            dhp["lr"] = dwq * (-1.0 / bc1) - dw * (lam * w)
            dhp["weight_decay"] = (dw, -a * w)
            dw0 = scale(1.0 - a * lam, dw)
        else:
            dhp["weight_decay"] = (dgp, w)
            dw0 = axpy(dw, lam, dgp)
        return dw0, {"exp_avg": scale(b1, dm), "exp_avg_sq": scale(b2, ds)}, dgp, dhp


class AdamW(Adam):
    """``torch.optim.AdamW``: as :class:`Adam` without the L2 term, and the decoupled decay w ← (1 − αλ) w first.
    The exact method keeps w rescaled by Π(1 − αλ): the decay costs −log2(1 − αλ) bits per parameter per step,
    however small αλ is (no quantisation)."""
    name = "adamw"
    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    decoupled = True


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else float(np.sqrt(x))
