"""Momentum optimisers: the 2015 paper's heavy ball, and ``torch.optim.SGD`` (momentum, dampening, weight decay;
nesterov for the stored-state methods only)."""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..kernels import MomentumParams
from .base import ExactState, Plan, ReversibleOptimizer, Schedules, axpy, axpy_, lane_sum, scale

_ZERO = np.zeros(1)


def _check_lr(sch: Schedules) -> None:
    lr = sch.host["lr"]
    if not np.all(np.isfinite(lr) & (lr >= 0)):
        raise ValueError("lr must be finite and non-negative (as torch.optim requires)")


def _check_unit(sch: Schedules, name: str, lo_open: bool = False) -> None:
    v = sch.host[name]
    ok = (v > 0.0) if lo_open else (v >= 0.0)
    if not np.all(ok & (v <= 1.0)):
        bad = v[~(ok & (v <= 1.0))].ravel()[0]
        raise ValueError(f"{name} must lie in {'(0' if lo_open else '[0'}, 1], got {bad!r}")


class _MomentumKernel(ReversibleOptimizer):
    """Exact steps of the one-state momentum optimisers through the fused ``momentum`` kernel."""
    buffer: str

    def _params(self, plan: Plan, t: int) -> MomentumParams:
        raise NotImplementedError

    def _run(self, ex: ExactState, g, t: int, plan: Plan, forward: bool, state: bool, position: bool) -> None:
        kernels.momentum(ex.be, ex.tapes[self.buffer], ex.view(self.buffer), ex.view("params"),
                         None if g is None else ex.arr(g), ex.P_arr if position else None,
                         ex.local(self._params(plan, t)), forward=forward, state=state, position=position,
                         names=(self.buffer, "params"))

    def exact_step(self, ex: ExactState, g, t: int, plan: Plan) -> None:
        self._run(ex, g, t, plan, True, True, True)

    def exact_undo_position(self, ex: ExactState, t: int, plan: Plan) -> None:
        self._run(ex, None, t, plan, False, False, True)

    def exact_undo_state(self, ex: ExactState, g, t: int, plan: Plan) -> None:
        self._run(ex, g, t, plan, False, True, False)


class HeavyBall(_MomentumKernel):
    """The form of Maclaurin, Duvenaud & Adams (2015)::

        v ← γ v − (1 − γ) g;   w ← w + α v

    Schedules: ``lr`` (α), ``momentum`` (γ ∈ [0, 1]; the exact method needs γ ≥ 2^-15). For a constant γ this is
    ``torch.optim.SGD(lr=α(1−γ), momentum=γ)`` with the buffer b = −v/(1−γ).
    """
    name = "heavyball"
    schedule_names = ("lr", "momentum")
    state_names = ("velocity",)
    buffer = "velocity"
    default_frac = {"velocity": 52}
    decay_names = {"velocity": "momentum"}

    def check(self, sch: Schedules) -> None:
        _check_lr(sch)
        _check_unit(sch, "momentum")

    def decay_factors(self, sch: Schedules) -> dict:
        return {"velocity": sch.host["momentum"]}

    def _params(self, plan: Plan, t: int) -> MomentumParams:
        h, cv, cp = plan.table("heavyball", lambda: self._table(plan))
        return MomentumParams(h[t], cv[t], cp[t], _ZERO, self.frac["velocity"], self.frac["params"])

    @staticmethod
    def _table(plan: Plan) -> tuple:
        d = plan.decay["velocity"]
        e1 = d.e[1:]
        gam = plan.sch.grid("momentum")
        return d.h, -(1.0 - gam) / e1, plan.sch.grid("lr") * e1

    def float_step(self, w, st, g, hp, t):
        gam, a = hp["momentum"], hp["lr"]
        v = gam * st["velocity"] - (1.0 - gam) * g
        return w + a * v, {"velocity": v}

    def drmad_state(self, w, w1, hp) -> dict:
        """DrMAD: the velocity that moves w to w1 in one step, v = (w1 − w)/α (0 where α = 0)."""
        return {"velocity": _per_lr(w1 - w, hp["lr"])}

    adjoint_reads = ("velocity",)

    def adjoint(self, t, w, st, g, w1, st1, dw, dst, hp):
        gam, a = hp["momentum"], hp["lr"]
        lr = (dw, st1["velocity"])
        if isinstance(gam, torch.Tensor):   # per-group γ: d/dγ stays per lane, so dv is kept
            dv = axpy(dst["velocity"], a, dw)
            dhp = {"lr": lr, "momentum": [(dv, st["velocity"]), (dv, g)]}
            return dw, {"velocity": scale(gam, dv)}, scale(-(1.0 - gam), dv), dhp
        # In the sweep's buffers, no allocation: dv overwrites d velocity, d/dγ (one value per step) is summed
        # before dv is scaled, and dg overwrites g.
        dv = axpy_(dst["velocity"], a, dw)
        dmom = lane_sum(dv, st["velocity"]) + lane_sum(dv, g)
        dg = torch.mul(dv, -(1.0 - gam), out=g)
        return dw, {"velocity": dv.mul_(gam)}, dg, {"lr": lr, "momentum": dmom}


class SGD(_MomentumKernel):
    """``torch.optim.SGD`` (maximize=False, nesterov=False)::

        g' = g + λ w
        b ← g'                      at the first step (the buffer starts empty)
        b ← μ b + (1 − τ) g'        afterwards
        w ← w − α b

    Schedules: ``lr`` (α), ``momentum`` (μ), ``dampening`` (τ), ``weight_decay`` (λ). A momentum schedule that is all
    zero is plain SGD (w ← w − α g'), as in torch; the exact method refuses it (nothing decays and the position step
    needs g_t, i.e. w_t itself: undoing it would mean storing every gradient).
    """
    name = "sgd"
    schedule_names = ("lr", "momentum", "dampening", "weight_decay")
    defaults = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0}
    state_names = ("momentum_buffer",)
    buffer = "momentum_buffer"
    default_frac = {"momentum_buffer": 52}
    decay_names = {"momentum_buffer": "momentum"}
    nesterov = False
    _plain = False

    @property
    def exact_refusal(self):
        return ("plain SGD (momentum 0) cannot be reversed exactly: nothing decays, and undoing w ← w − α∇L(w) needs "
                "the w being recovered; exact reversal would have to store every gradient. Use method='checkpoint' "
                "or 'replay', or a momentum > 0" if self._plain else None)

    def check(self, sch: Schedules) -> None:
        _check_lr(sch)
        mu = sch.host["momentum"]
        if not np.all(np.isfinite(mu) & (mu >= 0) & (mu <= 1)):
            raise ValueError(f"momentum must lie in [0, 1], got values in [{np.nanmin(mu)}, {np.nanmax(mu)}]"
                             if not np.isnan(mu).all() else "momentum holds NaN")
        if mu.any() and not mu.all():
            raise ValueError("momentum must be zero at every step (plain SGD) or positive at every step; torch "
                             "keeps no buffer while momentum is 0, which a schedule cannot switch on and off")
        self._plain = not mu.any()
        _check_unit(sch, "dampening")
        wd = sch.host["weight_decay"]
        if not np.all(np.isfinite(wd) & (wd >= 0)):
            raise ValueError("weight_decay must be finite and non-negative")

    def decay_factors(self, sch: Schedules) -> dict:
        mu = sch.host["momentum"].copy()
        mu[0] = 1.0                      # the first step fills the (empty) buffer: nothing decays
        return {"momentum_buffer": mu}

    def _params(self, plan: Plan, t: int) -> MomentumParams:
        h, cv, cp, lam = plan.table("sgd", lambda: self._table(plan))
        return MomentumParams(h[t], cv[t], cp[t], lam[t], self.frac["momentum_buffer"], self.frac["params"])

    @staticmethod
    def _table(plan: Plan) -> tuple:
        d = plan.decay["momentum_buffer"]
        e1 = d.e[1:]
        cv = (1.0 - plan.sch.grid("dampening")) / e1
        cv[0] = 1.0 / e1[0]                        # the first step fills the buffer: g' itself
        lam = np.ascontiguousarray(plan.sch.grid("weight_decay"), dtype=np.float64)
        return d.h, cv, -plan.sch.grid("lr") * e1, lam

    def drmad_state(self, w, w1, hp) -> dict:
        """DrMAD: the buffer that moves w to w1 in one step, b = −(w1 − w)/α (0 where α = 0)."""
        if self.nesterov:
            raise ValueError("method 'drmad' cannot recover nesterov's buffer from the straight line (its step "
                             "also depends on the gradient); use another method")
        return {"momentum_buffer": -_per_lr(w1 - w, hp["lr"])}

    def float_step(self, w, st, g, hp, t):
        a, mu, tau, lam = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
        gp = g + lam * w
        b = st["momentum_buffer"]
        if self._plain:                      # plain SGD: no buffer
            return w - a * gp, {"momentum_buffer": b}
        b1 = gp if t == 0 else mu * b + (1.0 - tau) * gp
        d = gp + mu * b1 if self.nesterov else b1
        return w - a * d, {"momentum_buffer": b1}

    def adjoint(self, t, w, st, g, w1, st1, dw, dst, hp):
        a, mu, tau, lam = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
        if not (self._plain or self.nesterov or any(isinstance(x, torch.Tensor) for x in (a, mu, tau, lam))):
            return self._adjoint_in_place(t, w, st, g, st1, dw, dst, a, mu, tau, lam)
        gp = axpy(g, lam, w)
        b, b1 = st["momentum_buffer"], st1["momentum_buffer"]
        if self._plain:
            dgp = scale(-a, dw)
            dhp = {"lr": (dw, gp, -1.0), "momentum": None, "dampening": None, "weight_decay": (dgp, w)}
            return axpy(dw, lam, dgp), {"momentum_buffer": dst["momentum_buffer"]}, dgp, dhp
        mom = []   # contributions to d/dμ, summed
        if self.nesterov:
            db1 = axpy(dst["momentum_buffer"], -(a * mu), dw)
            dgp = scale(-a, dw)
            dhp = {"lr": (dw, axpy(gp, mu, b1), -1.0)}
            mom.append((dw, b1, -a))
        else:
            db1 = axpy(dst["momentum_buffer"], -a, dw)
            dgp = None
            dhp = {"lr": (dw, b1, -1.0)}
        if t == 0:
            dgp = db1 if dgp is None else dgp + db1
            db = torch.zeros_like(db1)
            dhp["dampening"] = None
        else:
            dgp = scale(1.0 - tau, db1) if dgp is None else axpy(dgp, 1.0 - tau, db1)
            db = scale(mu, db1)
            mom.append((db1, b))
            dhp["dampening"] = (db1, gp, -1.0)
        dhp["momentum"] = None if not mom else mom[0] if len(mom) == 1 else mom
        dhp["weight_decay"] = (dgp, w)
        return axpy(dw, lam, dgp), {"momentum_buffer": db}, dgp, dhp

    def _adjoint_in_place(self, t, w, st, g, st1, dw, dst, a, mu, tau, lam):
        """The adjoint above for one value of each hyper per step, in the sweep's buffers (no allocation): d buffer
        becomes db1 and then db, g becomes dgp, dw is updated last; every hypergradient is summed before the
        tensors it reads are overwritten."""
        b, b1 = st["momentum_buffer"], st1["momentum_buffer"]
        dhp = {"lr": -lane_sum(dw, b1)}
        db1 = axpy_(dst["momentum_buffer"], -a, dw)
        if t == 0:
            dgp = g.copy_(db1)
            db1.zero_()
            dhp.update(dampening=None, momentum=None)
        else:
            dg_w = lane_sum(db1, w) if lam != 0 else 0.0
            dhp.update(momentum=lane_sum(db1, b), dampening=-(lane_sum(db1, g) + lam * dg_w))
            dgp = torch.mul(db1, 1.0 - tau, out=g)
            db1.mul_(mu)
        dhp["weight_decay"] = lane_sum(dgp, w)
        return axpy_(dw, lam, dgp), {"momentum_buffer": db1}, dgp, dhp


class Nesterov(SGD):
    """``torch.optim.SGD(nesterov=True)``: w ← w − α (g' + μ b) with b updated as in :class:`SGD`.

    Stored-state methods only: the position step adds α·g_t, and g_t = ∇L(w_t) needs the very w_t being recovered,
    so no reparametrisation that evaluates the gradient at the same points can undo it without storing per-step
    information (docs/design.md §5)."""
    name = "nesterov"
    nesterov = True
    exact_refusal = ("nesterov momentum cannot be reversed exactly: its position step adds α·∇L(w_t), which needs "
                     "the w_t being recovered (an implicit equation); use method='checkpoint', 'replay' or "
                     "'trajectory', or optimizer='sgd'")

    def check(self, sch: Schedules) -> None:
        super().check(sch)
        if self._plain:
            raise ValueError("nesterov momentum requires a momentum > 0 (as torch.optim.SGD does)")
        if np.any(sch.host["dampening"] != 0):
            raise ValueError("nesterov momentum requires zero dampening (as torch.optim.SGD does)")


def _per_lr(dw: torch.Tensor, a) -> torch.Tensor:
    """dw / α with 0 where α = 0 (α a float or a per-lane tensor)."""
    a = torch.as_tensor(a, dtype=dw.dtype, device=dw.device)
    return torch.where(a != 0, dw / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(dw))
