"""The reversible-optimiser protocol (docs/design.md §5).

An optimiser is reversible in fixed point when every state update is either an integer addition of a value computed
from state still known at undo time (undo: subtract the same integer) or a decay (undo: the tape gives back the bits
the decay's exact shifts removed). A :class:`ReversibleOptimizer` provides

- the exact side: ``exact_step`` (state then position), ``exact_undo_position`` (W_{t+1} → W_t, from the state at
  t+1) and ``exact_undo_state`` (state_{t+1} → state_t, given g_t = ∇L(w_t)), on int64 tensors through the kernels;
- the float side: ``float_step`` (one differentiable torch step, for the stored-state methods and naive autograd) and
  ``adjoint`` (its vector-Jacobian product; the default derives it with autograd from ``float_step``).

The engine never looks inside: it recovers (w_t, state_t, g_t) and (w_{t+1}, state_{t+1}) — exactly, or from storage —
and chains the adjoints; the adjoint of g_t goes through one Hessian-vector product of the loss. Adding an optimiser
means writing these methods (the exact ones may use :meth:`ExactState.shift` and :meth:`ExactState.add`, which work on
every backend), nothing else.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, fields
from typing import Callable, Optional

import numpy as np
import torch

from .. import kernels
from ..core.fixed import (DEFAULT_FRAC_BITS, LIMB, MAX_FRAC_BITS, MAX_FRAC_BITS_2, MIN_FRAC_BITS, NonFiniteError,
                          check_factors, check_frac_bits, decay_scales, fixed_range, to_fixed)
from ..core.tapeformat import tape_storage
from . import autograd

_TWO63 = 2.0**63


class Schedules:
    """Per-step hyperparameters of one run: name → float64 array of shape (T,) (one value per step) or (T, G) (one
    per step and parameter group). Values per lane on demand; per-lane contributions reduced per step and group."""

    def __init__(self, values: dict, sizes: np.ndarray, device: torch.device):
        self.host = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in values.items()}
        T = {v.shape[0] for v in self.host.values()}
        if len(T) != 1:
            raise ValueError(f"every schedule needs the same number of steps, got { {k: v.shape[0] for k, v in self.host.items()} }")
        self.T = T.pop()
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.G = int(self.sizes.shape[0])
        self.device = device
        self.per_group = any(v.ndim == 2 for v in self.host.values())
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._lengths = torch.from_numpy(self.sizes).to(device)
        self._gid_lanes: Optional[torch.Tensor] = None
        self._dev: dict[str, torch.Tensor] = {}
        self._grid: dict[str, np.ndarray] = {}

    @property
    def _gid(self) -> torch.Tensor:
        """Each lane's group (int64, one per lane: the size of the model in memory, so made only when per-group
        values are first expanded to lanes)."""
        if self._gid_lanes is None:
            self._gid_lanes = torch.repeat_interleave(torch.arange(self.G, device=self.device), self._lengths)
        return self._gid_lanes

    def dev(self, name: str) -> torch.Tensor:
        d = self._dev.get(name)
        if d is None:
            d = self._dev[name] = torch.from_numpy(self.host[name]).to(self.device)
        return d

    def at(self, name: str, t: int):
        """Step t's value: a float (one value per step) or a (L,) float64 tensor (per group, expanded to lanes)."""
        v = self.host[name]
        if v.ndim == 1:
            return float(v[t])
        return self.dev(name)[t][self._gid]

    def grid(self, name: str) -> np.ndarray:
        """The schedule as a contiguous (T, G) array (a (T,) schedule repeated per group), made once."""
        g = self._grid.get(name)
        if g is None:
            v = self.host[name]
            g = self._grid[name] = np.ascontiguousarray(np.broadcast_to(v[:, None] if v.ndim == 1 else v,
                                                                        (self.T, self.G)))
        return g

    def reduce(self, parts: dict, t: int, into: dict) -> None:
        """Add each contribution's sum over lanes to ``into[name][t]`` — over all lanes where ``into[name]`` is (T,),
        per group where it is (T, G). A contribution is a per-lane tensor, a scalar, a tuple of factors (at most
        two per-lane tensors, any numbers) standing for their per-lane product (summed as one dot product: no
        temporary the size of the model), or a list of such terms standing for their sum."""
        grp = []
        for k, v in parts.items():
            if v is None:
                continue
            if into[k].dim() == 2:
                grp.append(k)
            elif isinstance(v, tuple):
                into[k][t].add_(lane_sum(*v))
            elif isinstance(v, list):
                for term in v:
                    into[k][t].add_(lane_sum(*term) if isinstance(term, tuple) else term.sum())
            else:
                into[k][t].add_(v.sum() if isinstance(v, torch.Tensor) and v.dim() else v)
        if grp:
            vecs = [contribution(parts[k]).expand(self._gid.shape) for k in grp]
            sums = torch.segment_reduce(torch.stack(vecs, 1), "sum", lengths=self._lengths, axis=0)   # (G, K)
            for i, k in enumerate(grp):
                into[k][t] += sums[:, i]

    def zeros(self) -> dict:
        return {k: torch.zeros(v.shape, dtype=torch.float64, device=self.device) for k, v in self.host.items()}


def lane_sum(*factors):
    """Σ over lanes of the product of the factors: at most two tensors (one dot product), any numbers."""
    c = 1.0
    ts = []
    for f in factors:
        if isinstance(f, torch.Tensor) and f.dim():
            ts.append(f)
        else:
            c = c * f
    if len(ts) == 2:
        s = torch.dot(ts[0].reshape(-1), ts[1].reshape(-1))
    elif len(ts) == 1:
        s = ts[0].sum()
    else:
        raise ValueError("a contribution needs one or two per-lane tensors")
    return s if isinstance(c, float) and c == 1.0 else s * c


def contribution(v):
    """A per-lane contribution as one tensor (a tuple of factors multiplied out, a list of terms summed)."""
    if isinstance(v, list):
        out = contribution(v[0])
        for term in v[1:]:
            out = out + contribution(term)
        return out
    if isinstance(v, tuple):
        out = v[0]
        for f in v[1:]:
            out = out * f
        return out
    return v


def axpy_(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x += a·y in place (a a number or a per-lane tensor); returns x."""
    if isinstance(a, torch.Tensor):
        return x.addcmul_(a, y)
    return x if a == 0 else x.add_(y, alpha=a)


def axpy(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x + a·y in one op when a is a number (``torch.add(x, y, alpha=a)``); a per-lane a multiplies first."""
    if isinstance(a, torch.Tensor):
        return x + a * y
    return x if a == 0 else torch.add(x, y, alpha=a)


def scale(a, y: torch.Tensor) -> torch.Tensor:
    """a·y (no op when a is the number 1)."""
    return y if not isinstance(a, torch.Tensor) and a == 1 else a * y


@dataclass
class Decay:
    """A decaying state x_t = e_t·X̂_t·2^-F (docs/design.md §3): the scales e (T+1, G) and shifts h (T, G)."""
    e: np.ndarray
    h: np.ndarray

    @classmethod
    def of(cls, factors: np.ndarray, G: int, name: str) -> "Decay":
        f = check_factors(factors, name)
        e, h = decay_scales(f)
        if f.ndim == 1:
            return cls(np.repeat(e[:, None], G, 1), np.repeat(h[:, None], G, 1))
        return cls(e, h)

    @classmethod
    def none(cls, T: int, G: int) -> "Decay":
        return cls(np.ones((T + 1, G)), np.zeros((T, G), dtype=np.int64))


class ExactState:
    """Integer state of one exact run on the params' device: params ``W``, optimiser states ``X[name]`` (rescaled by
    their decays), one tape per decaying state, and ``P`` — the model-dtype params the loss reads, written by the
    kernels. ``frac[name]`` are the fractional bits (``"params"`` for W).

    Sharding hook: the state may own only lanes [lo, hi) (ZeRO-1 style, see :mod:`revsgd.distributed`): ``X`` and the
    tapes then hold those lanes, the kernels see ``W[lo:hi]``, ``P[lo:hi]`` and ``g[lo:hi]`` and the groups that
    intersect the range (:meth:`local` cuts per-group kernel parameters to them); a subclass makes the full ``W`` and
    ``P`` consistent in :meth:`after_position` and assembles full float states in :meth:`gather`."""

    def __init__(self, w0: torch.Tensor, P: torch.Tensor, states: dict, frac: dict, decaying: tuple,
                 offsets: np.ndarray, backend: Optional[str], lanes: Optional[tuple] = None,
                 two_limb: tuple = (), tape_dir=None, spill_block_bytes: Optional[int] = None):
        self.be = kernels.get_backend(backend)
        if P.device.type != "cpu" and self.be.name != "torch":
            raise ValueError(f"backend {self.be.name!r} runs on the CPU only; params live on {P.device}: use "
                             f"backend='torch'")
        self.device = P.device
        self.frac = dict(frac)
        L = int(w0.shape[0])
        self.lo, self.hi = (0, L) if lanes is None else (int(lanes[0]), int(lanes[1]))
        if not 0 <= self.lo < self.hi <= L:
            raise ValueError(f"lane range {lanes} is not inside [0, {L})")
        self.W = _to_fixed_t(w0, self.frac["params"], "params0")
        n = self.hi - self.lo
        self.two_limb = tuple(two_limb)
        self.X = {}
        for k, v in states.items():
            if k in self.two_limb:      # value = hi·2^62 + lo: X[k] is hi, X[k + ".lo"] is lo
                hi, lo = ((torch.zeros(n, dtype=torch.int64, device=self.device),) * 2 if v is None
                          else _to_fixed2_t(v[self.lo:self.hi], self.frac[k], k))
                self.X[k], self.X[k + ".lo"] = hi.clone(), lo.clone()
            else:
                self.X[k] = (torch.zeros(n, dtype=torch.int64, device=self.device) if v is None
                             else _to_fixed_t(v[self.lo:self.hi], self.frac[k], k))
        g0 = int(np.searchsorted(offsets, self.lo, side="right")) - 1
        g1 = int(np.searchsorted(offsets, self.hi, side="left"))
        self.gsl = slice(g0, g1)
        local = np.concatenate([[self.lo], offsets[g0 + 1:g1], [self.hi]]) - self.lo
        arrays = self.be.arrays if self.be.name != "torch" else type(self.be.arrays)(self.device)
        self.tapes = {k: tape_storage(n, local, arrays, tape_dir=tape_dir, block_bytes=spill_block_bytes)
                      for k in decaying}
        self.P = P
        self.start = self._digests()
        self._host = self.be.name != "torch"
        self._arr: Optional[tuple] = None
        Ws = self.W[self.lo:self.hi]
        if self._host:   # zero-copy NumPy views for the CPU backends, made once
            self._views = {"params": Ws.numpy(), **{k: v.numpy() for k, v in self.X.items()}}
            self.P_arr = P.detach()[self.lo:self.hi].numpy()
        else:
            self._views = {"params": Ws, **self.X}
            self.P_arr = P.detach()[self.lo:self.hi]

    def arr(self, t: torch.Tensor):
        """The array a kernel takes for a full-length tensor ``t`` (this state's lanes; a NumPy view on CPU). The
        last one is kept (the gradient buffer is the same every step): it holds its memory, so a tensor at the same
        address, of the same dtype, device and length, is that memory."""
        key = (t.data_ptr(), t.dtype, t.device, t.shape[0])
        if self._arr is not None and self._arr[0] == key:
            return self._arr[1]
        a = t.detach()[self.lo:self.hi]
        a = a.numpy() if self._host else a
        self._arr = (key, a)
        return a

    def view(self, name: str):
        """The kernel's array for state ``name`` ("params" for W) on this state's lanes; (hi, lo) for a two-limb
        state."""
        if name in self.two_limb:
            return self._views[name], self._views[name + ".lo"]
        return self._views[name]

    def state_float(self, name: str, scale=1.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """scale · flt of the (rescaled) integer state on this state's lanes, float64 (``scale`` a float or a
        per-lane tensor: the decay's scale e turns the rescaled state into its true value); written into ``out``
        (float64, this state's lanes) when given, except for two-limb states."""
        F = self.frac[name]
        if name in self.two_limb:
            return (self.X[name].to(torch.float64) * (2.0 ** (LIMB - F) * scale)
                    + self.X[name + ".lo"].to(torch.float64) * (2.0 ** -F * scale))
        return _scaled(self.X[name], 2.0 ** -F * scale, out)

    def local(self, prm):
        """Per-group kernel parameters cut to the groups this state's lanes intersect (identity when unsharded)."""
        if self.lo == 0 and self.hi == self.W.shape[0]:
            return prm
        for f in fields(prm):
            v = getattr(prm, f.name)
            if isinstance(v, np.ndarray) and v.ndim == 1 and v.shape[0] > 1:
                setattr(prm, f.name, v[self.gsl])
        return prm

    def after_position(self) -> None:
        """Called after every position update or undo (a sharded state all-gathers W and P here)."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A float vector over this state's lanes → over all lanes (identity when unsharded)."""
        return x

    def gather_many(self, xs: list) -> list:
        """:meth:`gather` of several vectors (a sharded state does it in one collective)."""
        return [self.gather(x) for x in xs]

    def tape_bytes(self) -> int:
        return sum(t.nbytes for t in self.tapes.values())

    def info_bits(self) -> int:
        return sum(t.info_bits for t in self.tapes.values())

    def _digests(self) -> dict:
        """SHA-256 of W's and each state's bytes: the start is remembered by these, not by copies the size of the
        model (a difference goes unnoticed with probability 2^-256)."""
        return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().data).digest()
                for k, v in {"params": self.W, **self.X}.items()}

    def at_start(self) -> tuple[bool, list]:
        """(everything back at the start bit for bit, names of what differs)."""
        now = self._digests()
        bad = [k for k, d in self.start.items() if now[k] != d]
        bad += [f"tape of {k}" for k, t in self.tapes.items() if not t.at_start()]
        return not bad, bad

    # --- primitives for optimisers without fused kernels ---------------------------------------------------
    def shift(self, name: str, h: np.ndarray, forward: bool) -> None:
        """Decay step of state ``name`` (``"params"`` for W): X >>= h per group with the bits on its tape, or the
        exact inverse; ``h`` per group of the run."""
        kernels.shift(self.be, self.tapes[name], self.view(name), np.asarray(h, dtype=np.int64)[self.gsl],
                      forward, name=name, frac_bits=self.frac[name])

    def add(self, name: str, u: torch.Tensor, sign: int, *, scale=1.0) -> None:
        """X[name] += sign·rint(u·2^F) on this state's lanes (``u`` full length), all or nothing (OverflowError /
        NonFiniteError). For ``"params"`` it also writes the params the loss reads: P = scale·flt(W) (``scale``:
        the params' decay scale, for optimisers that rescale them)."""
        if name in self.two_limb:
            raise TypeError(f"add() works on one-limb states; {name!r} has two limbs")
        X = self.W[self.lo:self.hi] if name == "params" else self.X[name]
        u = u[self.lo:self.hi]
        y = u.to(torch.float64) * 2.0 ** self.frac[name]
        if not bool(torch.isfinite(u).all()):
            raise NonFiniteError(f"the update of {name} holds NaN or inf; nothing was changed")
        if not bool(((y >= -_TWO63) & (y < _TWO63)).all()):
            raise OverflowError(f"the update of {name} leaves the fixed-point range {fixed_range(self.frac[name])}; "
                                f"nothing was changed")
        d = torch.round(y).to(torch.int64) * sign
        Y = X + d
        if bool((((X ^ Y) & (d ^ Y)) < 0).any()):
            raise OverflowError(f"{name} leaves the fixed-point range {fixed_range(self.frac[name])}; nothing was "
                                f"changed")
        X.copy_(Y)
        if name == "params":
            with torch.no_grad():
                self.P[self.lo:self.hi] = Y.to(torch.float64) * (2.0 ** -self.frac["params"] * scale)

    @contextlib.contextmanager
    def transaction(self):
        """All or nothing for a sequence of primitives: on an exception, ``undo`` callbacks registered with
        :meth:`on_abort` run in reverse order (each primitive is exactly invertible)."""
        self._undo: list = []
        try:
            yield self
        except BaseException:
            for f in reversed(self._undo):
                f()
            raise
        finally:
            self._undo = []

    def on_abort(self, f: Callable[[], None]) -> None:
        self._undo.append(f)

    def float_params(self, scale=1.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """scale · flt(W) over all lanes (W is kept whole on every shard), into ``out`` when given."""
        return _scaled(self.W, 2.0 ** -self.frac["params"] * scale, out)

    @property
    def whole(self) -> bool:
        """Whether this state holds every lane (unsharded: :meth:`gather` is the identity)."""
        return self.lo == 0 and self.hi == self.W.shape[0] and type(self).gather is ExactState.gather


def _scaled(x: torch.Tensor, c, out: Optional[torch.Tensor]) -> torch.Tensor:
    """c · float64(x) — into ``out`` when given, with the same two roundings (conversion, product) and no
    temporary."""
    if out is None:
        return x.to(torch.float64) * c
    return out.copy_(x).mul_(c)


def _to_fixed2_t(x: torch.Tensor, frac: int, name: str) -> tuple:
    """fix of a non-negative float vector as two limbs (hi, lo): hi·2^62 + lo = rint(x·2^F)."""
    y = x.detach().to(torch.float64) * 2.0 ** frac
    if not bool(torch.isfinite(y).all()) or bool((y < 0).any()) or bool((y >= 2.0 ** (61 + LIMB)).any()):
        raise OverflowError(f"{name} must be finite, non-negative and below 2^{61 + LIMB - frac}")
    yh = torch.floor(y * 2.0 ** -LIMB)
    return yh.to(torch.int64), torch.round(y - yh * 2.0 ** LIMB).to(torch.int64)


def _to_fixed_t(x: torch.Tensor, frac: int, name: str) -> torch.Tensor:
    return torch.from_numpy(to_fixed(x.detach().to(torch.float64).cpu().numpy(), frac, name=name)).to(x.device)


class ReversibleOptimizer:
    """Base class: schedules, fractional bits, and the default (autograd) adjoint. Subclasses define

    - ``name``, ``schedule_names`` (per-step hypers the user passes), ``state_names`` (float states), ``decays``
      (state → schedule name of its decay factor, or a callable (Schedules) → factors);
    - ``check(schedules)`` (ranges), ``derived(sched) -> dict`` (per-step quantities computed from the schedules
      with differentiable torch ops, e.g. bias corrections: their adjoints flow back to the schedules by autograd);
    - ``exact_step``, ``exact_undo_position``, ``exact_undo_state`` (optional: without them ``method="exact"`` is
      refused with the reason in ``exact_refusal``);
    - ``float_step(w, st, g, hp)`` → (w', st') and optionally ``adjoint`` (and ``adjoint_reads``).
    """
    name = "base"
    schedule_names: tuple = ()
    state_names: tuple = ()
    default_frac: dict = {}
    exact_refusal: Optional[str] = None
    decay_names: dict = {}
    #: states held in two int64 limbs (value = hi·2^62 + lo) for precision: Adam's second moment
    two_limb: tuple = ()
    #: what :meth:`adjoint` reads of (w, st) and (w1, st1): "params" and state names (None: everything). The exact
    #: method converts only these from its integers and passes None for the rest.
    adjoint_reads: Optional[tuple] = None

    def __init__(self, frac_bits: Optional[dict] = None):
        fb = {"params": DEFAULT_FRAC_BITS, **self.default_frac}
        if frac_bits is not None:
            if isinstance(frac_bits, (int, np.integer)) and not isinstance(frac_bits, bool):
                frac_bits = {k: frac_bits for k in fb}
            if not isinstance(frac_bits, dict):
                raise TypeError(f"frac_bits must be an int or a dict of state name -> int, got "
                                f"{type(frac_bits).__name__}")
            unknown = set(frac_bits) - set(fb)
            if unknown:
                raise ValueError(f"frac_bits names unknown state(s) {sorted(unknown)}; {self.name} has {sorted(fb)}")
            fb.update(frac_bits)
        self.frac = {k: check_frac_bits(v, name=f"frac_bits[{k!r}]", lo=MIN_FRAC_BITS,
                                        hi=MAX_FRAC_BITS_2 if k in self.two_limb else MAX_FRAC_BITS)
                     for k, v in fb.items()}

    # --- schedules -----------------------------------------------------------------------------------------
    def check(self, sch: Schedules) -> None:
        """Raise ValueError for out-of-range schedule values (subclasses)."""

    def derived(self, sch: dict) -> dict:
        """Per-step quantities derived from the schedule tensors (differentiable); default none."""
        return {}

    def decay_factors(self, sch: Schedules) -> dict:
        """state name → factors (T,) or (T, G) of its decay (subclasses)."""
        return {}

    def prepare(self, sch: Schedules, exact: bool) -> "Plan":
        """What the steps need, computed once: derived values and (exact) the decays of the rescaled states."""
        self.check(sch)
        if exact and not self.supports_exact:
            raise ValueError(self.exact_refusal or f"optimizer {self.name!r} has no exact (reversible) step; use a "
                             f"stored-state method (checkpoint, replay, trajectory)")
        dec = {k: Decay.of(f, sch.G, self.decay_names.get(k, k)) for k, f in self.decay_factors(sch).items()} \
            if exact else {}
        with torch.no_grad():
            der = {k: v.cpu().numpy() for k, v in self.derived(
                {k: torch.from_numpy(v) for k, v in sch.host.items()}).items()}
        return Plan(dec, der, sch)

    def hypers_at(self, sch: Schedules, der_dev: dict, t: int) -> dict:
        """Step t's hyper values (floats or per-lane tensors), schedules and derived quantities."""
        hp = {k: sch.at(k, t) for k in sch.host}
        for k, v in der_dev.items():
            x = v[t]
            hp[k] = float(x) if x.dim() == 0 else x[sch._gid]
        return hp

    # --- float side ----------------------------------------------------------------------------------------
    def float_init(self, w0: torch.Tensor, v0: Optional[dict] = None) -> dict:
        return {k: (torch.zeros_like(w0) if v0 is None or v0.get(k) is None else v0[k].to(w0)) for k in
                self.state_names}

    def float_step(self, w, st: dict, g, hp: dict, t: int):
        raise NotImplementedError

    def adjoint(self, t: int, w, st: dict, g, w1, st1: dict, dw, dst: dict, hp: dict):
        """VJP of ``float_step`` at (w, st, g) with cotangents (dw, dst) of its outputs. Returns (dw, dst, dg, dhp)
        where dhp maps hyper names (schedules or derived) to per-lane contributions: a tensor, a tuple of factors
        of the per-lane product (at most two tensors; summed as a dot product), a list of such terms (summed), a
        0-d tensor (the sum itself, for a hyper with one value per step), or None.

        ``dw``, ``dst`` and ``g`` (a float64 copy) are the sweep's buffers: an adjoint may overwrite them and return
        them (e.g. dg in g's memory), provided what it returns does not read what it overwrote.

        Default: autograd through ``float_step`` (correct for any optimiser; built-ins override it with closed
        forms, which are several times cheaper)."""
        with torch.enable_grad():
            w_ = w.detach().requires_grad_()
            st_ = {k: v.detach().requires_grad_() for k, v in st.items()}
            g_ = g.detach().to(torch.float64).requires_grad_()
            hp_ = {k: (torch.as_tensor(v, dtype=torch.float64, device=w.device).detach().requires_grad_())
                   for k, v in hp.items()}
            w1_, st1_ = self.float_step(w_, st_, g_, hp_, t)
            outs = [w1_] + [st1_[k] for k in self.state_names]
            cots = [dw] + [dst[k] for k in self.state_names]
            ins = [w_, g_] + [st_[k] for k in self.state_names] + list(hp_.values())
            grads = autograd.grad(outs, ins, cots)
        z = lambda x, like: torch.zeros_like(like) if x is None else x  # noqa: E731
        dw0, dg = z(grads[0], w), z(grads[1], w)
        n = len(self.state_names)
        dst0 = {k: z(grads[2 + i], w) for i, k in enumerate(self.state_names)}
        dhp = {}
        for (k, v), d in zip(hp.items(), grads[2 + n:]):
            if d is None:
                dhp[k] = None
            elif isinstance(v, torch.Tensor) and v.dim():
                dhp[k] = d
            else:   # a scalar hyper: its per-lane contribution is not needed, only the sum
                dhp[k] = d.reshape(())
        return dw0, dst0, dg, dhp

    # --- exact side ----------------------------------------------------------------------------------------
    @property
    def supports_exact(self) -> bool:
        return self.exact_refusal is None and type(self).exact_step is not ReversibleOptimizer.exact_step

    def exact_init(self, w0: torch.Tensor, P: torch.Tensor, plan: "Plan", backend: Optional[str],
                   state0: Optional[dict] = None, **storage) -> ExactState:
        """The integer state of an exact run (``storage``: ``tape_dir``, ``spill_block_bytes`` for tapes on disk)."""
        return ExactState(w0, P, {k: None if state0 is None else state0.get(k) for k in self.state_names},
                          self.frac, tuple(plan.decay), plan.sch.offsets, backend, two_limb=self.two_limb, **storage)

    def exact_step(self, ex: ExactState, g, t: int, plan: "Plan") -> None:
        raise NotImplementedError

    def exact_undo_position(self, ex: ExactState, t: int, plan: "Plan") -> None:
        raise NotImplementedError

    def exact_undo_state(self, ex: ExactState, g, t: int, plan: "Plan") -> None:
        raise NotImplementedError

    def exact_floats(self, ex: ExactState, t: int, plan: "Plan", out: Optional[tuple] = None,
                     reads: Optional[tuple] = None) -> tuple:
        """(w_t, {state: value_t}) as float64 tensors from the integer state at step t: the true values, i.e. the
        rescaled states times their scales e_t. ``out``: (w, {state: tensor}) float64 buffers to write them into
        (an unsharded state only; entries may be None). ``reads``: convert only these ("params", state names),
        None for the rest."""
        bw, bst = out if out is not None and ex.whole else (None, {})
        names = self.state_names if reads is None else [k for k in self.state_names if k in reads]
        w = None if reads is not None and "params" not in reads else \
            ex.float_params(plan.lanes(plan.decay["params"].e[t]) if "params" in plan.decay else 1.0, out=bw)
        scales = [plan.lanes(plan.decay[k].e[t]) if k in plan.decay else 1.0 for k in names]
        st = dict.fromkeys(self.state_names)
        st.update(zip(names, ex.gather_many([ex.state_float(k, c, out=bst.get(k)) for k, c in zip(names, scales)])))
        return w, st


@dataclass
class Plan:
    """What the steps of one run need, computed once (host arrays)."""
    decay: dict          # state → Decay (exact method only)
    derived: dict        # name → (T, ...) float64
    sch: Schedules

    def lanes(self, vals_g: np.ndarray):
        """Per-group values → a float (one group, or all equal) or a per-lane float64 tensor."""
        if vals_g.shape[0] == 1 or np.all(vals_g == vals_g[0]):
            return float(vals_g[0])
        return torch.from_numpy(np.ascontiguousarray(vals_g)).to(self.sch.device)[self.sch._gid]

    def groups(self, name: str, t: int) -> np.ndarray:
        """A schedule's or derived value's step-t values per group: a (G,) row of a contiguous (T, G) grid."""
        if name in self.derived:
            g = self._grid.get(name)
            if g is None:
                v = self.derived[name]
                g = self._grid[name] = np.ascontiguousarray(
                    np.broadcast_to(v[:, None] if v.ndim == 1 else v, (self.sch.T, self.sch.G)))
            return g[t]
        return self.sch.grid(name)[t]

    def table(self, key: str, make: Callable[[], tuple]) -> tuple:
        """Per-step kernel parameters of the whole run, made once by ``make()`` (e.g. (T, G) arrays whose row t
        is step t's parameters: vectorised, the same IEEE operations as row by row)."""
        v = self._tables.get(key)
        if v is None:
            v = self._tables[key] = make()
        return v

    def __post_init__(self):
        self._grid: dict = {}
        self._tables: dict = {}
