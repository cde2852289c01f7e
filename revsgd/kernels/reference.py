"""The NumPy reference backend: :mod:`revsgd.kernels.vectorized` (the specification) on NumPy arrays."""
from __future__ import annotations

from ..core.tapeformat import HostArrays
from . import vectorized as _v

name = "numpy"
available = True
arrays = HostArrays
ops = _v.NumpyOps


def shift(st, X, h, forward) -> None:
    _v.shift(ops, st, X, h, forward)


def momentum(st, V, W, G, P, prm, forward, state, position) -> None:
    _v.momentum(ops, st, V, W, G, P, prm, forward, state, position)


def adam(tapes, M, S, W, G, P, prm, forward, state, position) -> None:
    _v.adam(ops, tapes, M, S, W, G, P, prm, forward, state, position)
