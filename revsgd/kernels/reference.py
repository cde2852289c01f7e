"""The NumPy reference backend: :mod:`revsgd.kernels.vectorized` (the specification) on NumPy arrays."""
from __future__ import annotations

from ..core.tapeformat import HostArrays
from . import vectorized as _v

name = "numpy"
available = True
arrays = HostArrays
ops = _v.NumpyOps
shift, momentum, adam = _v.backend(ops)
