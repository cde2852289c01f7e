"""The positional arguments every compiled kernel takes (absent W / G / alpha as small placeholder arrays)."""
import numpy as np

_NO_W = np.zeros(0, dtype=np.int64)
_NO_G = np.zeros(0, dtype=np.float64)
_NO_A = np.zeros(1, dtype=np.float64)


def kernel_args(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> tuple:
    return (V, _NO_W if W is None else W, _NO_G if G is None else G, _NO_A if alpha is None else alpha, n,
            st.heads, st.ptrs, st.lens, st.caps, begin, end, status, do_scale, W is not None, G is not None,
            2.0**frac_bits)
