"""C++ kernels (``revsgd._cpp``, built from csrc/kernels.cpp): :mod:`revsgd.kernels.vectorized` as fused loops.

Per call, Python only plans the tape (:meth:`TapeStorage.plan`, skipped when no group shifts), runs the kernel and
commits the counters. The kernel checks its arguments (dtypes, lengths, the row plan against the word buffer),
runs the chunks (OpenMP when there are several), and on a failing lane undoes the finished lanes itself and
returns ``(code, lowest failing lane)``: nothing was changed and nothing was committed.
"""
from __future__ import annotations

try:
    from .. import _cpp
except ImportError:
    available = False
else:
    available = True

from ..core.tapeformat import HostArrays
from .vectorized import KernelError

name = "cpp"
arrays = HostArrays
CHUNK = _cpp.CHUNK if available else 16384


def _plan(st, h, push: bool):
    """Row offsets of a shift by ``h`` bits per group, or None when no group shifts (then no tape work at all)."""
    return st.plan(h, push) if _cpp.any_shift(h) else None



def shift(st, X, h, forward) -> None:
    rows = _plan(st, h, forward)
    if rows is not None:
        r = _cpp.shift(st, X, h, rows, forward)
        if r is not None:
            raise KernelError(*r)
    st.commit(h, forward)


def momentum(st, V, W, G, P, prm, forward, state, position) -> None:
    h = prm.h
    rows = _plan(st, h, forward) if state else None
    r = _cpp.momentum(st, V, W, G, P, prm, rows, forward, state, position)
    if r is not None:
        raise KernelError(*r)
    if state:
        st.commit(h, forward)


def adam(tapes, M, S, W, G, P, prm, forward, state, position) -> None:
    stm, sts, stw = tapes
    if state:
        rm, rs = _plan(stm, prm.h1, forward), _plan(sts, prm.h2, forward)
    else:
        rm = rs = None
    rw = _plan(stw, prm.hw, forward) if position and stw is not None else None
    r = _cpp.adam((stm, sts, stw), M, S, W, G, P, prm, (rm, rs, rw), forward, state, position)
    if r is not None:
        raise KernelError(*r)
    if state:
        stm.commit(prm.h1, forward)
        sts.commit(prm.h2, forward)
    if position and stw is not None:
        stw.commit(prm.hw, forward)


def set_num_threads(k: int) -> None:
    _cpp.set_num_threads(k)
