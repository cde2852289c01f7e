"""revsgd: exact hypergradients through long training runs by reversible fixed-point learning."""
from .core.fixed import DEFAULT_FRAC_BITS, NonFiniteError, from_fixed, to_fixed
from .core.tapeformat import TapeFormatError
from .engine import EngineResult, NumpyResult, ReversalError, Unroll, hypergrad_numpy
from .kernels import BACKENDS, TapeExhaustedError, set_num_threads
from .kernels.tape import Tape
from .optim import OPTIMIZERS, ReversibleOptimizer
from .optim.exact_momentum import ExactMomentum
from .frontend.functional import HypergradResult, hypergrad, unroll
from .frontend.inputs import pinned_threads
from .frontend.context import Reversible, reversible
from .frontend.data import StepSampler
from .frontend.randomness import seeded, step_seeded

__version__ = "0.2.0"
from . import meta  # noqa: E402  (revsgd.meta.params, revsgd.meta.MetaTrainer)
