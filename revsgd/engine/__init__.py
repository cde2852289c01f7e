"""The unroll engine at the NumPy level: hypergradients through T steps of momentum SGD (DESIGN.md §4, §6).

Framework-free: the caller supplies three callbacks on flat float64 vectors, so any autodiff system (torch, JAX,
autograd) can drive it. With ``L`` lanes (parameters) and ``K`` hyperparameters θ (flattened)::

    grad(w, t)     -> g                      ∇_w L(w, θ, t), shape (L,)
    grad_vjp(w, t) -> (g, vjp)               the same g (bit for bit), and
                      vjp(u) -> (Hu, θu)     Hu = ∇_w (g·u) = ∇²_w L · u, shape (L,); θu = ∂_θ (g·u), shape (K,)
    val(w)         -> (f, dw, dθ)            validation loss, ∂f/∂w (L,), ∂f/∂θ (K,)

Dynamics, with γ_t = n_t / 65536 (every method uses the quantised value)::

    v_{t+1} = γ_t v_t − (1 − γ_t) g_t,   w_{t+1} = w_t + α_t v_{t+1}

The reverse sweep (shared by every method; they differ only in how they recover w_t and v_t)::

    dα_t = dw · v_{t+1};   w_t, g_t, v_t;   dv += α_t dw;   dγ_t = dv · (v_t + g_t)
    dw −= Hu, dθ −= θu with u = (1 − γ_t) dv;   dv *= γ_t

Methods: ``exact`` (fixed point, reversed bit for bit through the tape), ``trajectory`` (every w_t, v_t stored),
``checkpoint`` (states every k steps, segments recomputed exactly), ``drmad`` (w_t on the straight line from w_0 to
w_T, approximate), ``truncated`` (only the last K steps, approximate). All but ``exact`` run the forward pass in
float64.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..core.fixed import DEFAULT_FRAC_BITS, GAMMA_ONE
from ..kernels import TapeExhaustedError
from ..core.tape import ExactMomentum

GradFn = Callable[[np.ndarray, int], np.ndarray]
VjpFn = Callable[[np.ndarray], tuple]
GradVjpFn = Callable[[np.ndarray, int], tuple]
ValFn = Callable[[np.ndarray], tuple]

METHODS = ("exact", "naive", "trajectory", "checkpoint", "drmad", "truncated")
ENGINE_METHODS = ("exact", "trajectory", "checkpoint", "drmad", "truncated")


class ReversalError(RuntimeError):
    """The reverse pass did not retrace the forward pass bit for bit; no hypergradient is returned."""


REVERSAL_HINT = ("The training loss must be a deterministic, pure function of (params, hypers, t): the same "
                 "minibatch for step t in both passes (derive it from a seed and t, not from a global RNG or an "
                 "iterator), no dropout or other randomness that is not seeded by t, and the same thread count in "
                 "both passes (revsgd pins torch's thread count for the run; do not change it from the loss).")


@dataclass
class EngineResult:
    val_loss: float
    w: Optional[np.ndarray]       # w_T (set by hypergrad_numpy)
    d_lr: np.ndarray              # like lr
    d_gamma: np.ndarray           # like n: derivative with respect to γ = n/65536
    d_w0: np.ndarray
    d_v0: np.ndarray
    d_theta: np.ndarray
    stats: dict = field(default_factory=dict)


class Schedule:
    """Per-step values, either one per step (T,) or one per step and group (T, G), expanded to lanes."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = values
        self.offsets = offsets
        self.per_group = values.ndim == 2
        self.sizes = np.diff(offsets)

    def lanes(self, t: int):
        """Step t's value: a scalar, or a per-lane array."""
        if not self.per_group:
            return self.values[t].item()
        return np.repeat(self.values[t], self.sizes)

    def group_sum(self, x: np.ndarray):
        """Σ over lanes (scalar schedule) or over each group's lanes (per-group schedule)."""
        if not self.per_group:
            return float(x.sum())
        return np.add.reduceat(x, self.offsets[:-1])


def _check_inputs(w0, lr, n, offsets, v0):
    if w0.ndim != 1 or w0.dtype != np.float64 or w0.size == 0:
        raise ValueError("w0 must be a non-empty 1-D float64 array")
    if lr.ndim not in (1, 2) or n.ndim not in (1, 2):
        raise ValueError("lr and n must have shape (T,) or (T, groups)")
    T = lr.shape[0]
    if T < 1:
        raise ValueError("the schedule must have at least one step (T = 0)")
    if n.shape[0] != T:
        raise ValueError(f"lr has {T} steps but momentum has {n.shape[0]}")
    G = offsets.shape[0] - 1
    for name, a in (("lr", lr), ("momentum", n)):
        if a.ndim == 2 and a.shape[1] != G:
            raise ValueError(f"{name} has {a.shape[1]} columns but there are {G} parameter groups")
    if offsets[0] != 0 or offsets[-1] != w0.size or np.any(np.diff(offsets) <= 0):
        raise ValueError("group offsets must increase strictly from 0 to len(w0)")
    if not np.all(np.isfinite(lr)):
        raise ValueError("lr holds NaN or inf")
    if n.dtype.kind not in "iu" or n.min() < 1 or n.max() > GAMMA_ONE:
        raise ValueError(f"quantised momentum n must be integers in [1, {GAMMA_ONE}]")
    if v0 is not None and (v0.shape != w0.shape or v0.dtype != np.float64):
        raise ValueError("v0 must be a float64 array shaped like w0")
    return T


# --- state providers: how each method recovers (w_t, v_{t+1}, v_t) in the reverse sweep --------------------------

class _Exact:
    """Fixed-point forward with the tape; the reverse pass runs training backwards bit for bit."""

    def __init__(self, w0, v0, frac_bits, backend):
        self.opt = ExactMomentum(w0, frac_bits=frac_bits, backend=backend, v0=v0)
        self.W0, self.V0 = self.opt.fixed_params, self.opt.fixed_velocity

    def forward(self, grad, lr, n, T, tick):
        for t in range(T):
            self.opt.step(grad(self.opt.params, t), lr.lanes(t), n.lanes(t))
            tick()
        self.tape_bytes = self.opt.tape.nbytes
        self.info_bits = self.opt.tape.info_bits
        return self.opt.params, self.opt.velocity

    def _undo(self, t, fn, *args):
        try:
            fn(*args)
        except (TapeExhaustedError, OverflowError, ValueError) as e:
            raise ReversalError(f"reversal failed at step {t}: {e}. {REVERSAL_HINT}") from e

    def before(self, t, lr):
        v_next = self.opt.velocity
        self._undo(t, self.opt.unstep_position, lr.lanes(t))
        return self.opt.params, v_next

    def after(self, t, g, n):
        self._undo(t, self.opt.unstep_velocity, g, n.lanes(t))
        return self.opt.velocity

    def finish(self):
        ok_w = np.array_equal(self.opt.fixed_params, self.W0)
        ok_v = np.array_equal(self.opt.fixed_velocity, self.V0)
        if not (ok_w and ok_v and self.opt.tape.at_start()):
            what = [s for s, ok in (("params", ok_w), ("velocity", ok_v), ("tape", self.opt.tape.at_start()))
                    if not ok]
            raise ReversalError(f"the reversed trajectory does not return to the start ({', '.join(what)} differ). "
                                + REVERSAL_HINT)


def _float_step(w, v, g, a, gamma):
    v = gamma * v - (1.0 - gamma) * g
    return w + a * v, v


class _Float:
    """Float64 forward pass; subclasses keep what they need of each (t, w_t, v_t), t = 0 … T."""

    def __init__(self, w0, v0):
        self.w0, self.v0 = w0.copy(), v0.copy()

    def keep(self, t, w, v):
        pass

    def forward(self, grad, lr, n, T, tick):
        self.grad, self.lr, self.n, self.T = grad, lr, n, T
        w, v = self.w0, self.v0
        for t in range(T):
            self.keep(t, w, v)
            w, v = _float_step(w, v, grad(w, t), lr.lanes(t), n.lanes(t) / GAMMA_ONE)
            tick()
        self.keep(T, w, v)
        self.wT = w
        return w, v

    def finish(self):
        pass


class _Trajectory(_Float):
    """Every (w_t, v_t) stored."""

    def keep(self, t, w, v):
        if t == 0:
            self.W, self.V = {}, {}
        self.W[t], self.V[t] = w, v

    def forward(self, grad, lr, n, T, tick):
        out = super().forward(grad, lr, n, T, tick)
        self.storage_bytes = (len(self.W) + len(self.V)) * self.w0.nbytes
        return out

    def before(self, t, lr):
        return self.W[t], self.V[t + 1]

    def after(self, t, g, n):
        del self.W[t + 1], self.V[t + 1]  # no longer needed: memory falls as the sweep goes back
        return self.V[t]


class _Truncated(_Trajectory):
    """Only the last K states kept; the sweep stops K steps before the end."""

    def __init__(self, w0, v0, K):
        super().__init__(w0, v0)
        self.K, self.W, self.V = K, {}, {}

    def keep(self, t, w, v):
        if t == 0:
            self.W, self.V = {}, {}
        if t >= self.T - self.K:
            self.W[t], self.V[t] = w, v

    @property
    def lo(self):
        return max(self.T - self.K, 0)


class _Checkpoint(_Float):
    """(w, v) kept every k steps; each segment is recomputed, bit for bit, when the sweep reaches it."""

    def __init__(self, w0, v0, k):
        super().__init__(w0, v0)
        self.k, self.ckpt, self.seg_lo, self.recompute_steps = k, {}, None, 0

    def keep(self, t, w, v):
        if t % self.k == 0 and t < self.T:
            self.ckpt[t] = (w, v)

    def forward(self, grad, lr, n, T, tick):
        self.ckpt, self.seg_lo, self.recompute_steps = {}, None, 0
        out = super().forward(grad, lr, n, T, tick)
        self.storage_bytes = (len(self.ckpt) + self.k + 1) * 2 * self.w0.nbytes
        return out

    def _segment(self, t):
        lo = (t // self.k) * self.k
        if self.seg_lo != lo:
            w, v = self.ckpt[lo]
            self.W, self.V = [w], [v]
            for s in range(lo, min(lo + self.k, self.T)):
                w, v = _float_step(w, v, self.grad(w, s), self.lr.lanes(s), self.n.lanes(s) / GAMMA_ONE)
                self.W.append(w)
                self.V.append(v)
                self.recompute_steps += 1
            self.seg_lo = lo
        return lo

    def before(self, t, lr):
        lo = self._segment(t)
        return self.W[t - lo], self.V[t - lo + 1]

    def after(self, t, g, n):
        return self.V[t - self.seg_lo]


class _DrMAD(_Float):
    """Fu et al. 2016: w_t = w_0 + (t/T)(w_T − w_0); v_{t+1} = (w_{t+1} − w_t)/α_t on that line. Nothing stored."""

    def _v(self, t):
        """Velocity v_t on the line (α_{t−1} = 0 gives 0)."""
        a = np.asarray(self.lr.lanes(t - 1), dtype=np.float64)
        step = (self.wT - self.w0) / self.T
        return np.where(a != 0, step / np.where(a != 0, a, 1.0), 0.0) * np.ones_like(self.w0)

    def before(self, t, lr):
        return self.w0 + (t / self.T) * (self.wT - self.w0), self._v(t + 1)

    def after(self, t, g, n):
        return self._v(t) if t > 0 else self.v0


class Unroll:
    """One T-step unroll: ``forward()`` trains, ``reverse(dw)`` sweeps back from ∂f/∂w_T (callable again after
    another ``forward()``). :func:`hypergrad_numpy` is forward, ``val``, reverse."""

    def __init__(self, grad: GradFn, grad_vjp: GradVjpFn, w0: np.ndarray, lr: np.ndarray, n: np.ndarray, *,
                 offsets: Optional[np.ndarray] = None, num_hypers: int = 0, v0: Optional[np.ndarray] = None,
                 method: str = "exact", frac_bits: int = DEFAULT_FRAC_BITS, backend: Optional[str] = None,
                 checkpoint_every: Optional[int] = None, truncate: Optional[int] = None, progress: bool = False):
        w0 = np.ascontiguousarray(w0, dtype=np.float64)
        lr = np.asarray(lr, dtype=np.float64)
        n = np.asarray(n)
        offsets = (np.array([0, w0.size], dtype=np.int64) if offsets is None
                   else np.asarray(offsets, dtype=np.int64))
        self.T = T = _check_inputs(w0, lr, n, offsets, v0)
        if method not in ENGINE_METHODS:
            raise ValueError(f"unknown method {method!r} for the NumPy engine; choose one of {ENGINE_METHODS}")
        for opt, val, owner in (("checkpoint_every", checkpoint_every, "checkpoint"), ("truncate", truncate,
                                "truncated"), ("backend", backend, "exact"),
                                ("frac_bits", None if frac_bits == DEFAULT_FRAC_BITS else frac_bits, "exact")):
            if val is not None and method != owner:
                raise TypeError(f"option {opt!r} belongs to method {owner!r}, not {method!r}")
        v0 = np.zeros_like(w0) if v0 is None else np.ascontiguousarray(v0, dtype=np.float64)
        self.grad, self.grad_vjp, self.method, self.num_hypers = grad, grad_vjp, method, num_hypers
        self.lr, self.n = Schedule(lr, offsets), Schedule(n.astype(np.int64), offsets)
        self.w0, self.progress = w0, progress
        if method == "exact":
            self.prov = _Exact(w0, v0, frac_bits, backend)
        elif method == "trajectory":
            self.prov = _Trajectory(w0, v0)
        elif method == "checkpoint":
            k = checkpoint_every if checkpoint_every is not None else max(1, int(round(np.sqrt(T))))
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
            self.prov = _Checkpoint(w0, v0, int(k))
        elif method == "drmad":
            self.prov = _DrMAD(w0, v0)
        else:
            K = truncate if truncate is not None else max(1, T // 10)
            if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
                raise ValueError(f"truncate must be a positive int, got {truncate!r}")
            self.prov = _Truncated(w0, v0, int(K))
        self.stats = {"method": method, "steps": T, "lanes": int(w0.size)}
        self.forward_done = False

    def _bar(self, what):
        if not self.progress:
            return None, (lambda k=1: None)
        from tqdm.auto import tqdm
        bar = tqdm(total=self.T, desc=f"{self.method} {what}", leave=False)
        return bar, bar.update

    def forward(self) -> tuple[np.ndarray, np.ndarray]:
        """Train T steps; returns (w_T, v_T) as float64."""
        bar, tick = self._bar("forward")
        t0 = time.perf_counter()
        wT, vT = self.prov.forward(self.grad, self.lr, self.n, self.T, tick)
        self.stats["seconds_forward"] = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        self.forward_done = True
        return wT, vT

    def reverse(self, dw: np.ndarray, dtheta: Optional[np.ndarray] = None,
                dv: Optional[np.ndarray] = None) -> EngineResult:
        """Sweep back from dw = ∂f/∂w_T (and ∂f/∂θ, ∂f/∂v_T); returns hypergradients (val_loss left NaN)."""
        if not self.forward_done:
            raise RuntimeError("reverse() needs a completed forward() (each forward allows one reverse)")
        self.forward_done = False
        prov, lr_s, n_s, T = self.prov, self.lr, self.n, self.T
        bar, tick = self._bar("reverse")
        t0 = time.perf_counter()
        dw = np.array(dw, dtype=np.float64)
        dtheta = np.zeros(self.num_hypers) if dtheta is None else np.array(dtheta, dtype=np.float64)
        dv = np.zeros_like(self.w0) if dv is None else np.array(dv, dtype=np.float64)
        d_lr = np.zeros_like(lr_s.values)
        d_gamma = np.zeros(n_s.values.shape, dtype=np.float64)
        lo = getattr(prov, "lo", 0)
        for t in range(T - 1, lo - 1, -1):
            a = lr_s.lanes(t)
            gamma = n_s.lanes(t) / GAMMA_ONE
            w_t, v_next = prov.before(t, lr_s)
            d_lr[t] = lr_s.group_sum(dw * v_next)
            g, vjp = self.grad_vjp(w_t, t)
            v_t = prov.after(t, g, n_s)
            dv += a * dw
            d_gamma[t] = n_s.group_sum(dv * (v_t + g))
            hu, th = vjp((1.0 - gamma) * dv)
            dw -= hu
            if th is not None:
                dtheta -= th
            dv *= gamma
            tick()
        if lo > 0:  # truncated: nothing flows past step lo
            dw[:] = 0.0
            dv[:] = 0.0
        prov.finish()
        if bar is not None:
            bar.close()
        st = self.stats
        st["finite"] = all(bool(np.all(np.isfinite(x))) for x in (d_lr, d_gamma, dw, dv, dtheta))
        if not st["finite"]:
            warnings.warn(f"the {self.method} hypergradient is not finite (the adjoint diverged over T={T} steps"
                          + ("; DrMAD's straight-line trajectory is a poor approximation here)"
                             if self.method == "drmad" else ")"), RuntimeWarning, stacklevel=3)
        st["seconds_reverse"] = time.perf_counter() - t0
        st.update(tape_bytes=getattr(prov, "tape_bytes", 0), info_bits=getattr(prov, "info_bits", 0.0),
                  storage_bytes=getattr(prov, "storage_bytes", 0))
        if self.method == "exact":
            st.update(frac_bits=prov.opt.frac_bits, backend=prov.opt.tape.backend)
        elif self.method == "checkpoint":
            st.update(checkpoint_every=prov.k, recompute_steps=prov.recompute_steps)
        elif self.method == "truncated":
            st.update(truncate=prov.K)
        return EngineResult(float("nan"), None, d_lr, d_gamma, dw, dv, dtheta, dict(st))


def hypergrad_numpy(grad: GradFn, grad_vjp: GradVjpFn, val: ValFn, w0: np.ndarray, lr: np.ndarray,
                    n: np.ndarray, **options) -> EngineResult:
    """Hypergradients of ``val(w_T)`` through T momentum-SGD steps, from NumPy callbacks (see module doc).

    ``lr`` (float64) and ``n`` (integer momentum numerators, γ = n/65536) have shape (T,) or (T, G); with G groups,
    ``offsets`` (G+1,) cuts the lanes into contiguous groups (per-layer schedules). Options: ``offsets``,
    ``num_hypers``, ``v0``, ``method``, ``frac_bits``, ``backend``, ``checkpoint_every``, ``truncate``,
    ``progress`` (see :class:`Unroll`). ``d_gamma`` is the derivative with respect to γ_t.
    """
    u = Unroll(grad, grad_vjp, w0, lr, n, **options)
    wT, _ = u.forward()
    f, dw, dtheta = val(wT)
    res = u.reverse(dw, dtheta)
    res.val_loss, res.w = float(f), wT
    return res
