"""revsgd: exact hypergradients through long training runs by reversible fixed-point learning.

Layers (dependencies point down only; docs/design.md §8)::

    cli, bench              revsgd.cli, revsgd.bench
    meta                    revsgd.meta (params, MetaTrainer, checkpoints)
    front end               revsgd.frontend (hypergrad, unroll, reversible, modules, data, randomness),
                            revsgd.distributed
    engine                  revsgd.engine (methods, reverse sweep, buffers, hypergrad_numpy)
    optimisers              revsgd.optim (heavyball, sgd, nesterov, adam, adamw; ExactMomentum)
    kernels                 revsgd.kernels (numpy reference | torch | numba | cpp; Tape)
    tape + fixed point      revsgd.core (NumPy only)
"""
__version__ = "0.2.0"

from .core.fixed import DEFAULT_FRAC_BITS, NonFiniteError, from_fixed, to_fixed
from .core.tapeformat import TapeFormatError
from .kernels import BACKENDS, TapeExhaustedError, set_num_threads
from .kernels.tape import Tape
from .optim import OPTIMIZERS, ReversibleOptimizer
from .optim.exact_momentum import ExactMomentum
from .engine import EngineResult, NumpyResult, ReversalError, Unroll, hypergrad_numpy
from .frontend.context import Reversible, reversible
from .frontend.data import StepSampler
from .frontend.functional import HypergradResult, hypergrad, unroll
from .frontend.inputs import pinned_threads
from .frontend.randomness import seeded, step_seeded
from . import meta

__all__ = [
    "hypergrad", "unroll", "reversible", "Reversible", "HypergradResult", "StepSampler", "seeded", "step_seeded",
    "hypergrad_numpy", "NumpyResult", "Unroll", "EngineResult", "ReversalError", "pinned_threads",
    "OPTIMIZERS", "ReversibleOptimizer", "ExactMomentum", "Tape", "BACKENDS", "set_num_threads",
    "TapeFormatError", "TapeExhaustedError", "NonFiniteError", "to_fixed", "from_fixed", "DEFAULT_FRAC_BITS", "meta",
]
