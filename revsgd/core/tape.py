"""Public face of the exact-arithmetic core: :class:`Tape` and :class:`ExactMomentum`."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from .. import kernels
from .fixed import DEFAULT_FRAC_BITS, GAMMA_ONE, NonFiniteError, check_frac_bits, from_fixed, to_fixed
from .tapeformat import TapeStorage

IntOrArray = Union[int, np.ndarray]
FloatOrArray = Union[float, np.ndarray]


def _check_state(X, num_lanes: int, name: str) -> None:
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name} must be a numpy int64 array, got {type(X).__name__}")
    if X.dtype != np.int64:
        raise TypeError(f"{name} must have dtype int64, got {X.dtype} (no silent conversion)")
    if X.ndim != 1 or X.shape[0] != num_lanes:
        raise ValueError(f"{name} must be 1-D of length {num_lanes}, got shape {X.shape}")
    if not X.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is updated in place; no silent copy)")
    if not X.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place)")


def _check_n(n, num_lanes: int) -> np.ndarray:
    """n as an int64 array of length 1 or num_lanes, every value in [1, 65536]."""
    if isinstance(n, (bool, np.bool_)):
        raise TypeError("n must be an int or an integer array, got bool")
    if isinstance(n, (int, np.integer)):
        if not 1 <= int(n) <= GAMMA_ONE:
            raise ValueError(f"n must lie in [1, {GAMMA_ONE}], got {n}")
        return np.array([n], dtype=np.int64)
    if not isinstance(n, np.ndarray):
        raise TypeError(f"n must be an int or a 1-D integer numpy array, got {type(n).__name__}")
    if n.dtype.kind not in "iu":
        raise TypeError(f"n must have an integer dtype, got {n.dtype}")
    if n.ndim != 1 or n.shape[0] != num_lanes:
        raise ValueError(f"per-lane n must be 1-D of length {num_lanes}, got shape {n.shape}")
    lo, hi = int(n.min()), int(n.max())
    if lo < 1 or hi > GAMMA_ONE:
        raise ValueError(f"n must lie in [1, {GAMMA_ONE}], got values in [{lo}, {hi}]")
    return np.ascontiguousarray(n, dtype=np.int64)


def _check_alpha(alpha, num_lanes: int) -> np.ndarray:
    if isinstance(alpha, np.ndarray):
        if alpha.ndim != 1 or alpha.shape[0] != num_lanes:
            raise ValueError(f"per-lane alpha must be 1-D of length {num_lanes}, got shape {alpha.shape}")
        if alpha.dtype.kind != "f":
            raise TypeError(f"alpha must be a float or a float array, got dtype {alpha.dtype}")
        a = np.ascontiguousarray(alpha, dtype=np.float64)
    elif isinstance(alpha, (float, int, np.floating, np.integer)) and not isinstance(alpha, (bool, np.bool_)):
        a = np.array([float(alpha)])
    else:
        raise TypeError(f"alpha must be a float or a 1-D float64 array, got {type(alpha).__name__}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError("alpha holds NaN or inf")
    return a


def _check_grad(grad, num_lanes: int) -> np.ndarray:
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"grad must be a 1-D float numpy array, got {type(grad).__name__}")
    if grad.dtype.kind != "f":
        raise TypeError(f"grad must have a float dtype, got {grad.dtype}")
    if grad.ndim != 1 or grad.shape[0] != num_lanes:
        raise ValueError(f"grad must be 1-D of length {num_lanes}, got shape {grad.shape}")
    return np.ascontiguousarray(grad, dtype=np.float64)


class Tape:
    """Exact multiply-by-(n/65536) of int64 lanes, keeping the lost bits (DESIGN.md §3).

    ``scale(X, n)`` sets X ← X·n/65536 in place and stores exactly the information the multiplication destroys
    (−log2(n/65536) bits per lane on average); ``unscale(X, n)`` undoes the matching ``scale`` bit for bit.
    The tape is LIFO: unscales must come in the reverse order of scales with the same ``n``.
    """

    def __init__(self, num_lanes: int, *, backend: Optional[str] = None):
        self._backend = kernels.get_backend(backend)
        self._st = TapeStorage(num_lanes)

    @property
    def num_lanes(self) -> int:
        return self._st.num_lanes

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def depth(self) -> int:
        """Number of scale steps not yet undone."""
        return self._st.depth

    def scale(self, X: np.ndarray, n: IntOrArray) -> None:
        """X ← X·n/65536 exactly (floor of X/65536 times n plus bits from the tape); n in [1, 65536]."""
        _check_state(X, self.num_lanes, "X")
        nn = _check_n(n, self.num_lanes)
        kernels.run(self._backend, self._st, True, X, None, None, None, nn, True, 0)

    def unscale(self, X: np.ndarray, n: IntOrArray) -> None:
        """Exact inverse of the last outstanding ``scale(X, n)``; raises TapeExhaustedError past the start."""
        _check_state(X, self.num_lanes, "X")
        nn = _check_n(n, self.num_lanes)
        kernels.run(self._backend, self._st, False, X, None, None, None, nn, True, 0)

    @property
    def info_bits(self) -> float:
        """Information held: 16·words + Σ log2(head / 2^16)."""
        return self._st.info_bits

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for the tape."""
        return self._st.nbytes

    def at_start(self) -> bool:
        """True when every head is at 2^16, every stream empty and no step outstanding."""
        return self._st.at_start()

    def to_bytes(self) -> bytes:
        """Canonical, versioned, CRC-checked serialization; identical across backends for the same history."""
        return self._st.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, backend: Optional[str] = None) -> "Tape":
        """Inverse of :meth:`to_bytes`; raises :class:`revsgd.TapeFormatError` on corrupt or truncated input."""
        st = TapeStorage.from_bytes(data)
        tape = cls.__new__(cls)
        tape._backend = kernels.get_backend(backend)
        tape._st = st
        return tape

    def __repr__(self) -> str:
        return (f"Tape(num_lanes={self.num_lanes}, backend={self.backend!r}, depth={self.depth}, "
                f"info_bits={self.info_bits:.0f}, nbytes={self.nbytes})")


class ExactMomentum:
    """Momentum SGD on int64 fixed-point state that can be run backwards bit for bit (DESIGN.md §2).

    Forward step (``step``)::

        V ← exact_scale(V, n)          γ = n/65536, lost bits to the tape
        V ← V − fix((1 − γ) · grad)
        W ← W + fix(alpha · flt(V))

    Reverse, in two halves so the caller can recompute the gradient in between::

        unstep_position(alpha):  W ← W − fix(alpha · flt(V))     then grad = ∇L(params)
        unstep_velocity(grad, n): V ← V + fix((1 − γ) · grad);  V ← exact_unscale(V, n)

    After unstepping every step, W and V equal their start bit for bit and the tape is at its start.
    """

    def __init__(self, w0: np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS, backend: Optional[str] = None,
                 v0: Optional[np.ndarray] = None):
        self.frac_bits = check_frac_bits(frac_bits)
        w0 = np.asarray(w0)
        if w0.ndim != 1 or w0.dtype.kind != "f":
            raise TypeError(f"w0 must be a 1-D float array, got dtype {w0.dtype} and shape {w0.shape}")
        if w0.shape[0] < 1:
            raise ValueError("w0 must have at least one entry")
        self._W = to_fixed(w0, self.frac_bits, name="w0")
        if v0 is None:
            self._V = np.zeros_like(self._W)
        else:
            v0 = np.asarray(v0)
            if v0.shape != w0.shape or v0.dtype.kind != "f":
                raise TypeError(f"v0 must be a float array of shape {w0.shape}")
            self._V = to_fixed(v0, self.frac_bits, name="v0")
        self.tape = Tape(w0.shape[0], backend=backend)

    @property
    def num_lanes(self) -> int:
        return self._W.shape[0]

    @property
    def steps(self) -> int:
        """Steps taken and not yet undone."""
        return self.tape.depth

    @property
    def params(self) -> np.ndarray:
        return from_fixed(self._W, self.frac_bits)

    @property
    def velocity(self) -> np.ndarray:
        return from_fixed(self._V, self.frac_bits)

    @property
    def fixed_params(self) -> np.ndarray:
        """Copy of the int64 fixed-point params W."""
        return self._W.copy()

    @property
    def fixed_velocity(self) -> np.ndarray:
        """Copy of the int64 fixed-point velocity V."""
        return self._V.copy()

    def _run(self, forward: bool, grad, alpha, n, do_scale: bool) -> None:
        L = self.num_lanes
        g = None if grad is None else _check_grad(grad, L)
        a = None if alpha is None else _check_alpha(alpha, L)
        nn = _check_n(n, L) if n is not None else np.ones(1, dtype=np.int64)
        kernels.run(self.tape._backend, self.tape._st, forward, self._V, None if a is None else self._W, g, a, nn,
                    do_scale, self.frac_bits, vname="velocity", wname="params")

    def step(self, grad: np.ndarray, alpha: FloatOrArray, n: IntOrArray) -> None:
        """One forward step with gradient ``grad``, learning rate ``alpha`` and momentum ``n/65536``."""
        if grad is None or alpha is None or n is None:
            raise TypeError("step needs grad, alpha and n (none of them may be None)")
        self._run(True, grad, alpha, n, True)

    def unstep_position(self, alpha: FloatOrArray) -> None:
        """First half of the reverse step: W ← W − fix(alpha · flt(V))."""
        if alpha is None:
            raise TypeError("unstep_position needs alpha")
        self._run(False, None, alpha, None, False)

    def unstep_velocity(self, grad: np.ndarray, n: IntOrArray) -> None:
        """Second half of the reverse step, with the gradient recomputed at ``params``."""
        if grad is None or n is None:
            raise TypeError("unstep_velocity needs grad and n")
        self._run(False, grad, None, n, True)

    def __repr__(self) -> str:
        return (f"ExactMomentum(num_lanes={self.num_lanes}, frac_bits={self.frac_bits}, steps={self.steps}, "
                f"backend={self.tape.backend!r})")
