"""Kernel backends and the driver that runs them.

Backends: ``cpp`` (C++/OpenMP, built with the package), ``numba``, ``numpy`` (the readable reference:
:mod:`revsgd.kernels.vectorized` on NumPy arrays) and ``torch`` (the same vectorized spec on torch tensors, on any
device). All produce the same states and tapes bit for bit, for every thread count.

A backend module has ``name``, ``available``, ``arrays`` (the array operations its tape storage uses) and the ops
``shift``, ``momentum`` and ``adam`` with the semantics of :mod:`revsgd.kernels.vectorized`: on failure they raise
:class:`~revsgd.kernels.vectorized.KernelError` and leave every array and tape exactly as they were. The driver
checks what can be checked up front and turns a KernelError into the exception a user expects, naming the state.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import fields
from types import ModuleType
from typing import Optional, Sequence

import numpy as np

from ..core.fixed import NonFiniteError, fixed_range
from ..core.tapeformat import TapeStorage
from . import codes
from .vectorized import AdamParams, KernelError, MomentumParams

_FIELDS = {c: [f.name for f in fields(c) if not f.name.startswith("frac")] for c in (MomentumParams, AdamParams)}

__all__ = ["BACKENDS", "TapeExhaustedError", "get_backend", "set_num_threads", "get_num_threads", "MAX_THREADS",
           "shift", "momentum", "adam", "MomentumParams", "AdamParams", "TRIM_EVERY"]

TRIM_EVERY = 32  # reverse shifts between checks for tape memory to give back
#: Upper bound for thread counts (kernels and torch): more threads than this only oversubscribe, and very large
#: values crash OpenMP runtimes.
MAX_THREADS = 4 * max(1, os.cpu_count() or 1)


class TapeExhaustedError(RuntimeError):
    """A reverse step needed bits the tape does not hold (more unshifts than shifts)."""


def _installed(name: str) -> bool:
    spec = {"cpp": "revsgd._cpp", "numba": "numba", "torch": "torch"}[name]
    try:
        return importlib.util.find_spec(spec) is not None
    except (ImportError, ValueError):
        return False


# Backends load on first use (importing numba costs time and memory a cpp user need not pay).
_MODULES: dict[str, Optional[ModuleType]] = {n: None for n in ("cpp", "numba") if _installed(n)}
_MODULES["numpy"] = None
if _installed("torch"):
    _MODULES["torch"] = None
_threads: int = 1

#: Backends available in this install; the first is the default on CPU.
BACKENDS: tuple[str, ...] = tuple(_MODULES)
KNOWN = ("cpp", "numba", "numpy", "torch")


def get_backend(backend: Optional[str]) -> ModuleType:
    name = BACKENDS[0] if backend is None else backend
    if not isinstance(name, str) or name not in _MODULES:
        if name in KNOWN:
            raise ValueError(f"backend {name!r} is not available in this install; available: {BACKENDS}")
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    m = _MODULES[name]
    if m is None:
        mod = {"numpy": "reference"}.get(name, f"{name}_backend")
        m = importlib.import_module(f"revsgd.kernels.{mod}")
        if not getattr(m, "available", False):
            raise ImportError(f"backend {name!r} is installed but failed to load")
        if hasattr(m, "set_num_threads"):
            m.set_num_threads(_threads)
        _MODULES[name] = m
    return m


def check_threads(k, what: str = "number of threads") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_THREADS:
        raise ValueError(f"{what} must be an int in [1, {MAX_THREADS}] (4 × the {os.cpu_count()} cores here), "
                         f"got {k!r}")
    return int(k)


def set_num_threads(k: int) -> None:
    """Threads used by the compiled kernels (default 1; results never depend on it)."""
    global _threads
    _threads = check_threads(k)
    for m in _MODULES.values():
        f = getattr(m, "set_num_threads", None)
        if f is not None:
            f(_threads)


def get_num_threads() -> int:
    return _threads


def warm_up(backend: Optional[str] = None) -> None:
    """Load ``backend`` (default: the first) and run each op once (JIT compilation, thread pool start-up).
    Numba's OpenMP layer resets the process-wide OpenMP thread count on its first parallel launch; callers that pin
    a thread count (e.g. for torch) warm up first."""
    m = get_backend(backend)
    if m.name == "torch":
        return
    st = TapeStorage(2, [0, 1, 2], m.arrays)
    X = np.array([5, -3], dtype=np.int64)
    h = np.array([3, 0], dtype=np.int64)
    shift(m, st, X, h, True)
    shift(m, st, X, h, False)


def _message(e: KernelError, names: Sequence[str], frac_bits: Sequence[int]) -> Exception:
    name = names[e.state] if e.state < len(names) else f"state {e.state}"
    lo, hi = fixed_range(frac_bits[e.state] if e.state < len(frac_bits) else frac_bits[0])
    rng = f"[{lo:g}, {hi:g})"
    lane = e.lane
    if e.base == codes.GRAD_NONFINITE:
        return NonFiniteError(f"gradient holds NaN or inf at lane {lane}; nothing was changed")
    if e.base == codes.TERM_OVERFLOW:
        return OverflowError(f"the update of {name} at lane {lane} leaves the fixed-point range {rng}; nothing "
                             f"was changed (use fewer fractional bits for {name}, or a smaller step)")
    if e.base == codes.ADD_OVERFLOW:
        return OverflowError(f"{name} at lane {lane} leaves the fixed-point range {rng}; nothing was changed")
    if e.base == codes.UNSHIFT_OVERFLOW:
        return OverflowError(f"undoing the decay of {name} at lane {lane} leaves int64: {name} differs from what "
                             f"the forward pass left; nothing was changed")
    return RuntimeError(f"kernel failed with code {e.base} at lane {lane}")


def _per_group(prm, G: int):
    """Every per-group parameter as a contiguous (G,) float64 or int64 array (a length-1 array is one value for all
    groups), so backends index parameters by group without special cases."""
    for f in _FIELDS[type(prm)]:
        v = getattr(prm, f)
        if v.shape != (G,) or not v.flags.c_contiguous or v.dtype.kind not in "fi" or v.itemsize != 8:
            if v.shape not in ((G,), (1,)):
                raise ValueError(f"kernel parameter {f} has shape {v.shape}, expected (1,) or ({G},)")
            setattr(prm, f, np.ascontiguousarray(np.broadcast_to(v, (G,)),
                                                 dtype=np.int64 if v.dtype.kind in "iu" else np.float64))
    return prm


def _check_pops(tapes, hs, names) -> None:
    for st, h, name in zip(tapes, hs, names):
        if st is None or h is None:
            continue
        if st.depth == 0 or (h.any() and st.can_pop(h) is not None):
            raise TapeExhaustedError(f"cannot undo a decay of {name}: its tape holds fewer bits than the undo needs "
                                     f"(more reverse steps than forward steps, or a different schedule); nothing "
                                     f"was changed")


def _after(tapes, forward: bool) -> None:
    if not forward:
        for st in tapes:
            if st is not None and st.depth % TRIM_EVERY == 0:
                st.trim()


def shift(be: ModuleType, st: TapeStorage, X, h: np.ndarray, forward: bool, name: str = "X",
          frac_bits: int = 0) -> None:
    """X >>= h per group keeping the bits (forward), or the exact inverse; all or nothing."""
    if not forward:
        _check_pops([st], [h], [name])
    try:
        be.shift(st, X, h, forward)
    except KernelError as e:
        raise _message(e, [name], [frac_bits]) from None
    _after([st], forward)


def momentum(be: ModuleType, st: TapeStorage, V, W, G, P, prm: MomentumParams, *, forward: bool, state: bool,
             position: bool, names: Sequence[str] = ("velocity", "params")) -> None:
    """One momentum op on every lane (see :mod:`revsgd.kernels.vectorized`); all or nothing."""
    _per_group(prm, st.num_groups)
    if not forward and state:
        _check_pops([st], [prm.h], names[:1])
    try:
        be.momentum(st, V, W, G, P, prm, forward, state, position)
    except KernelError as e:
        raise _message(e, names, (prm.frac_v, prm.frac_w)) from None
    if state:
        _after([st], forward)


def adam(be: ModuleType, tapes: tuple, M, S, W, G, P, prm: AdamParams, *, forward: bool, state: bool,
         position: bool, names: Sequence[str] = ("exp_avg", "exp_avg_sq", "params")) -> None:
    """One Adam op on every lane (see :mod:`revsgd.kernels.vectorized`); all or nothing."""
    _per_group(prm, tapes[0].num_groups)
    if not forward:
        hs = [prm.h1 if state else None, prm.h2 if state else None, prm.hw if position else None]
        _check_pops(tapes, hs, names)
    try:
        be.adam(tapes, M, S, W, G, P, prm, forward, state, position)
    except KernelError as e:
        raise _message(e, names, (prm.frac_m, prm.frac_s, prm.frac_w)) from None
    _after(([tapes[0], tapes[1]] if state else []) + ([tapes[2]] if position else []), forward)
