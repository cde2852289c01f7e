"""``ExactMomentum``: the 2015 heavy-ball step on NumPy arrays, reversible bit for bit (framework-free API)."""
from __future__ import annotations

import math
import threading
from typing import Optional, Sequence, Union

import numpy as np

from .. import kernels
from ..core.fixed import DEFAULT_FRAC_BITS, MIN_FRAC_BITS, NonFiniteError, check_factors, check_frac_bits, \
    from_fixed, to_fixed
from ..core.tapeformat import TapeStorage, check_offsets
from ..kernels import MomentumParams, TapeExhaustedError

FloatOrArray = Union[float, np.ndarray]


class ExactMomentum:
    """Momentum SGD on int64 fixed-point state that can be run backwards bit for bit (docs/design.md §3)::

        step(grad, lr, momentum):         v ← γ v − (1 − γ) grad;   w ← w + α v
        unstep_position(lr):              w ← w − α v                  (then compute grad at ``params``)
        unstep_velocity(grad, momentum):  v ← (v + (1 − γ) grad) / γ

    ``lr`` and ``momentum`` are floats or one value per group (``groups``: lane offsets, contiguous ranges);
    γ ∈ [2^-15, 1] is used as given (no quantisation): the velocity is kept as V̂ = v / e with a scale e ∈ (1/2, 1]
    per group, and the bits that γ destroys are shifted out onto the tape. Per step the object also keeps the
    group scales (8 bytes per group) to undo them. After unstepping every step, W and V equal their start bit for
    bit and the tape is at its start. Calls are serialised by a lock (an object may be shared between threads).
    """

    def __init__(self, w0: np.ndarray, *, groups: Optional[Sequence[int]] = None,
                 frac_bits: int = DEFAULT_FRAC_BITS, backend: Optional[str] = None, v0: Optional[np.ndarray] = None):
        self.frac_bits = check_frac_bits(frac_bits, lo=MIN_FRAC_BITS)
        w0 = np.asarray(w0)
        if w0.ndim != 1 or w0.dtype.kind != "f":
            raise TypeError(f"w0 must be a 1-D float array, got dtype {w0.dtype} and shape {w0.shape}")
        if w0.shape[0] < 1:
            raise ValueError("w0 must have at least one entry")
        self._be = kernels.get_backend(backend)
        if self._be.name == "torch":
            raise ValueError("ExactMomentum works on NumPy arrays: use backend 'cpp', 'numba' or 'numpy' (the "
                             "torch backend is used through revsgd.hypergrad)")
        L = w0.shape[0]
        self._offsets = check_offsets(groups, L)
        self._W = to_fixed(w0, self.frac_bits, name="w0")
        if v0 is None:
            self._V = np.zeros_like(self._W)
        else:
            v0 = np.asarray(v0)
            if v0.shape != w0.shape or v0.dtype.kind != "f":
                raise TypeError(f"v0 must be a float array of shape {w0.shape}")
            self._V = to_fixed(v0, self.frac_bits, name="v0")
        G = self._offsets.shape[0] - 1
        self._tape = TapeStorage(L, self._offsets, self._be.arrays)
        self._e = np.ones(G)                 # current group scales: v = e · flt(V̂)
        self._hist: list = []                # (e before the step, γ, shifts) per outstanding step
        self._lock = threading.Lock()

    @property
    def num_lanes(self) -> int:
        return self._W.shape[0]

    @property
    def num_groups(self) -> int:
        return self._offsets.shape[0] - 1

    @property
    def steps(self) -> int:
        """Steps taken and not yet undone."""
        return len(self._hist)

    @property
    def params(self) -> np.ndarray:
        return from_fixed(self._W, self.frac_bits)

    @property
    def velocity(self) -> np.ndarray:
        return from_fixed(self._V, self.frac_bits) * np.repeat(self._e, np.diff(self._offsets))

    @property
    def fixed_params(self) -> np.ndarray:
        """Copy of the int64 fixed-point params W."""
        return self._W.copy()

    @property
    def fixed_velocity(self) -> np.ndarray:
        """Copy of the int64 rescaled velocity V̂ (v = e · V̂ · 2^-F)."""
        return self._V.copy()

    @property
    def info_bits(self) -> int:
        return self._tape.info_bits

    @property
    def tape_bytes(self) -> int:
        return self._tape.nbytes

    def at_start(self) -> bool:
        return not self._hist and self._tape.at_start()

    # --- arguments ---------------------------------------------------------------------------------------------
    def _groups(self, x, name: str) -> np.ndarray:
        G = self.num_groups
        if isinstance(x, (bool, np.bool_, str, bytes)) or x is None:
            raise TypeError(f"{name} must be a float or an array of {G} floats (one per group), got {x!r}")
        a = np.asarray(x, dtype=np.float64) if not isinstance(x, np.ndarray) or x.dtype.kind in "fiu" else None
        if a is None or a.ndim > 1 or (a.ndim == 1 and a.shape[0] != G):
            raise TypeError(f"{name} must be a float or an array of {G} floats (one per group), got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
        if not np.all(np.isfinite(a)):
            raise NonFiniteError(f"{name} holds NaN or inf")
        return np.broadcast_to(a, (G,)).astype(np.float64)

    def _grad(self, grad) -> np.ndarray:
        if not isinstance(grad, np.ndarray) or grad.dtype.kind != "f":
            raise TypeError(f"grad must be a 1-D float numpy array, got {getattr(grad, 'dtype', type(grad).__name__)}")
        if grad.shape != (self.num_lanes,):
            raise ValueError(f"grad must be 1-D of length {self.num_lanes}, got shape {grad.shape}")
        if grad.dtype not in (np.float32, np.float64):   # float16, longdouble: exact as float64 (or rounded once)
            return np.ascontiguousarray(grad, dtype=np.float64)
        return np.ascontiguousarray(grad)

    def _run(self, prm: MomentumParams, g, forward: bool, state: bool, position: bool) -> None:
        kernels.momentum(self._be, self._tape, self._V, self._W, g, None, prm, forward=forward, state=state,
                         position=position)

    # --- steps -------------------------------------------------------------------------------------------------
    def step(self, grad: np.ndarray, lr: FloatOrArray, momentum: FloatOrArray) -> None:
        """One forward step with gradient ``grad``, learning rate ``lr`` and momentum γ."""
        g = self._grad(grad)
        a = self._groups(lr, "lr")
        gam = check_factors(self._groups(momentum, "momentum"), "momentum")
        with self._lock:
            e0 = self._e
            e1 = np.empty_like(e0)
            h = np.empty(e0.shape, dtype=np.int64)
            for i, y in enumerate((e0 * gam).tolist()):
                m, ex = math.frexp(y)
                h[i] = 1 - ex if m == 0.5 else -ex
                e1[i] = math.ldexp(y, int(h[i]))
            prm = MomentumParams(h, -(1.0 - gam) / e1, a * e1, np.zeros(1), self.frac_bits, self.frac_bits)
            self._run(prm, g, True, True, True)
            self._hist.append((e0, gam, h))
            self._e = e1

    def unstep_position(self, lr: FloatOrArray) -> None:
        """First half of the reverse step: w ← w − α v (v of the last outstanding step)."""
        a = self._groups(lr, "lr")
        with self._lock:
            if not self._hist:
                raise TapeExhaustedError("unstep_position before any step: there is nothing to undo")
            prm = MomentumParams(np.zeros(self.num_groups, dtype=np.int64), np.zeros(1), a * self._e, np.zeros(1),
                                 self.frac_bits, self.frac_bits)
            self._run(prm, None, False, False, True)

    def unstep_velocity(self, grad: np.ndarray, momentum: FloatOrArray) -> None:
        """Second half of the reverse step, with the gradient recomputed at ``params``; ``momentum`` must be the
        step's own."""
        g = self._grad(grad)
        gam = self._groups(momentum, "momentum")
        with self._lock:
            if not self._hist:
                raise TapeExhaustedError("unstep_velocity before any step: there is nothing to undo")
            e0, gam0, h = self._hist[-1]
            if not np.array_equal(gam, gam0):
                raise ValueError(f"momentum {gam} differs from the step's own {gam0}: undo with the same values")
            prm = MomentumParams(h, -(1.0 - gam0) / self._e, np.zeros(1), np.zeros(1), self.frac_bits,
                                 self.frac_bits)
            self._run(prm, g, False, True, False)
            self._hist.pop()
            self._e = e0

    def __repr__(self) -> str:
        return (f"ExactMomentum(num_lanes={self.num_lanes}, groups={self.num_groups}, frac_bits={self.frac_bits}, "
                f"steps={self.steps}, backend={self._be.name!r})")
