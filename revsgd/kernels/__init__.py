"""Kernel backends and the driver that runs them safely.

A backend module has ``name``, ``forward`` and ``reverse`` with the signature and per-lane semantics of
:mod:`revsgd.kernels.reference`, plus optionally ``set_num_threads``. Compiled backends may stop a chunk early
(status ``FULL`` or an error code); the driver grows streams and resumes, or undoes the finished lanes with the
exact inverse kernel and raises, so a failed call leaves every array and the tape exactly as they were.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

import numpy as np

from ..core.fixed import NonFiniteError, fixed_range
from ..core.tapeformat import TapeStorage
from . import codes, reference


TRIM_EVERY = 32  # reverse steps between checks for stream memory to give back (and always at the start)


class TapeExhaustedError(RuntimeError):
    """A reverse step needed bits the tape does not hold."""


def _installed(name: str) -> bool:
    spec = {"cpp": "revsgd._cpp", "numba": "numba"}[name]
    try:
        return importlib.util.find_spec(spec) is not None
    except (ImportError, ValueError):
        return False


# Compiled backends load on first use (importing numba costs time and memory a cpp user need not pay).
_MODULES: dict[str, Optional[ModuleType]] = {name: None for name in ("cpp", "numba") if _installed(name)}
_MODULES["numpy"] = reference
_threads: Optional[int] = None

#: Backends available in this install, fastest first.
BACKENDS: tuple[str, ...] = tuple(_MODULES)


def get_backend(backend: Optional[str]) -> ModuleType:
    name = BACKENDS[0] if backend is None else backend
    if name not in _MODULES:
        if name in ("cpp", "numba", "numpy"):
            raise ValueError(f"backend {name!r} is not available in this install; available: {BACKENDS}")
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    m = _MODULES[name]
    if m is None:
        m = importlib.import_module(f"revsgd.kernels.{name}_backend")
        if not getattr(m, "available", False):
            raise ImportError(f"backend {name!r} is installed but failed to load")
        if _threads is not None and hasattr(m, "set_num_threads"):
            m.set_num_threads(_threads)
        _MODULES[name] = m
    return m


def set_num_threads(k: int) -> None:
    """Threads used by the compiled kernels (results never depend on it: chunks are a format constant)."""
    global _threads
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"number of threads must be a positive int, got {k!r}")
    _threads = int(k)
    for m in _MODULES.values():
        f = getattr(m, "set_num_threads", None)
        if f is not None:
            f(_threads)


def warm_up(backend: Optional[str] = None) -> None:
    """Load ``backend`` (default: the fastest) and start its thread pool now. Numba's OpenMP layer resets the
    process-wide OpenMP thread count on its first parallel launch; callers that pin a thread count (e.g. for
    torch) warm up first."""
    m = get_backend(backend)
    st = TapeStorage(1)
    X = np.zeros(1, dtype=np.int64)
    one = np.ones(1, dtype=np.int64)
    run(m, st, True, X, None, None, None, one, True, 0)
    run(m, st, False, X, None, None, None, one, True, 0)


def _raise(code: int, lane: int, vname: str, wname: str, frac_bits: int) -> None:
    lo, hi = fixed_range(frac_bits)
    rng = f"[{lo:g}, {hi:g}) at frac_bits={frac_bits}"
    msg = {
        codes.GRAD_NONFINITE: (NonFiniteError, f"gradient holds NaN or inf at lane {lane}"),
        codes.VEL_FIX_OVERFLOW: (OverflowError, f"(1 - momentum) * gradient at lane {lane} leaves the "
                                                f"fixed-point range {rng}"),
        codes.VEL_OVERFLOW: (OverflowError, f"{vname} at lane {lane} leaves the fixed-point range {rng}"),
        codes.POS_FIX_OVERFLOW: (OverflowError, f"lr * {vname} at lane {lane} leaves the fixed-point range {rng}"),
        codes.POS_OVERFLOW: (OverflowError, f"{wname} at lane {lane} leaves the fixed-point range {rng}"),
        codes.TAPE_EMPTY: (TapeExhaustedError, f"reversing lane {lane} needs bits the tape does not hold: more "
                                              f"unscales than scales, or {vname} differs from what the forward "
                                              f"pass left"),
        codes.UNSCALE_OVERFLOW: (OverflowError, f"unscaling {vname} at lane {lane} leaves int64: {vname} differs "
                                               f"from what the forward pass left"),
    }[code]
    raise msg[0](msg[1] + "; nothing was changed")


def _first_error(status, begin, end, forward: bool):
    bad = np.flatnonzero(status > codes.FULL)
    if bad.size == 0:
        return None
    c = int(bad[0])
    return int(status[c]), int(begin[c] if forward else end[c] - 1)


def run(be: ModuleType, st: TapeStorage, forward: bool, V: np.ndarray, W: Optional[np.ndarray],
        G: Optional[np.ndarray], alpha: Optional[np.ndarray], n: np.ndarray, do_scale: bool, frac_bits: int,
        vname: str = "X", wname: str = "params") -> None:
    """Apply one forward or reverse kernel to every lane; all or nothing."""
    begin0, end0 = st.chunk_begin.copy(), st.chunk_end.copy()
    begin, end = begin0.copy(), end0.copy()
    status = np.zeros(begin.shape[0], dtype=np.int8)
    if not forward and do_scale and st.depth == 0:
        raise TapeExhaustedError(f"cannot unscale {vname}: the tape is at its start (more unscales than scales)")
    while True:
        status[:] = codes.OK
        (be.forward if forward else be.reverse)(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status)
        err = _first_error(status, begin, end, forward)
        if err is not None:
            undo = np.zeros_like(status)
            if forward:   # lanes [begin0, begin) are done: reverse them
                be.reverse(st, V, W, G, alpha, n, do_scale, frac_bits, begin0.copy(), begin.copy(), undo)
            else:         # lanes [end, end0) are done: replay them forward (their words still have room)
                be.forward(st, V, W, G, alpha, n, do_scale, frac_bits, end.copy(), end0.copy(), undo)
            assert not undo.any(), "undo of completed lanes failed"
            _raise(*err, vname, wname, frac_bits)
        full = np.flatnonzero(status == codes.FULL)
        if full.size == 0:
            break
        for c in full:
            st.reserve(int(c), 1)
    if do_scale:
        st.depth += 1 if forward else -1
        if not forward and st.depth % TRIM_EVERY == 0:
            st.trim()
