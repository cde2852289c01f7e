"""revsgd: exact hypergradients through long training runs by reversible fixed-point learning."""
from .core.fixed import DEFAULT_FRAC_BITS, NonFiniteError, from_fixed, to_fixed
from .core.tapeformat import TapeFormatError
from .kernels import BACKENDS, TapeExhaustedError, set_num_threads
from .kernels.tape import Tape

__version__ = "0.2.0"
