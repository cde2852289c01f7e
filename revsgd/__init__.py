"""revsgd: exact hypergradients through long momentum-SGD runs by reversible fixed-point learning.

Layers (dependencies point down only; DESIGN.md §7)::

    cli / scripts           revsgd.cli
    meta                    revsgd.meta, revsgd.params
    unroll (methods)        revsgd.unroll
    optimisers              revsgd.tape.ExactMomentum
    kernels                 revsgd.kernels (numpy reference | numba | cpp)
    tape + fixed point      revsgd.tapeformat, revsgd.fixed
"""
from .core.fixed import (DEFAULT_FRAC_BITS, NonFiniteError, dequantize_momentum, from_fixed, quantize_momentum,
                    to_fixed)
from .kernels import BACKENDS, TapeExhaustedError, set_num_threads
from .core.tape import ExactMomentum, Tape
from .core.tapeformat import TapeFormatError

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Tape", "ExactMomentum", "TapeFormatError", "TapeExhaustedError", "NonFiniteError",
    "set_num_threads", "quantize_momentum", "dequantize_momentum", "to_fixed", "from_fixed", "DEFAULT_FRAC_BITS",
]

from .engine import EngineResult, ReversalError, Unroll, hypergrad_numpy  # noqa: E402
from .frontend.functional import HypergradResult, hypergrad, pinned_threads, unroll  # noqa: E402

__all__ += ["hypergrad", "unroll", "HypergradResult", "ReversalError", "hypergrad_numpy", "Unroll", "EngineResult",
            "pinned_threads"]
