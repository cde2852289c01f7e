"""C++ kernels (``revsgd._cpp``, built from csrc/kernels.cpp): the reference semantics, OpenMP over chunks."""
from __future__ import annotations

import numpy as np

try:
    from .. import _cpp
except ImportError:
    available = False
else:
    available = True

name = "cpp"

_NO_W = np.zeros(0, dtype=np.int64)
_NO_G = np.zeros(0, dtype=np.float64)
_NO_A = np.zeros(1, dtype=np.float64)


def _call(fn, st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status):
    fn(V, _NO_W if W is None else W, _NO_G if G is None else G, _NO_A if alpha is None else alpha, n,
       st.heads, st.ptrs, st.lens, st.caps, begin, end, status, do_scale, W is not None, G is not None,
       2.0**frac_bits)


def forward(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _call(_cpp.forward, st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status)


def reverse(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _call(_cpp.reverse, st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status)


def set_num_threads(k: int) -> None:
    _cpp.set_num_threads(k)
