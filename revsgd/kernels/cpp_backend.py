"""C++ kernels (``revsgd._cpp``, built from csrc/kernels.cpp): the reference semantics, OpenMP over chunks."""
from __future__ import annotations

try:
    from .. import _cpp
except ImportError:
    available = False
else:
    available = True

from ._args import kernel_args

name = "cpp"


def forward(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _cpp.forward(*kernel_args(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status))


def reverse(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _cpp.reverse(*kernel_args(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status))


def set_num_threads(k: int) -> None:
    _cpp.set_num_threads(k)
