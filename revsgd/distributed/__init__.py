"""Beyond one machine (docs/distributed.md): data-parallel exact reversal with ``torch.distributed``.

- :func:`hypergrad`: :func:`revsgd.hypergrad` on every rank of a process group; each rank's ``train_loss`` sees its
  shard of the global minibatch (:func:`shard`).
- :class:`DistributedProblem`: the engine's problem whose gradient is the exact int64 sum of the ranks' quantised
  gradients (identical bits on every rank), Hessian-vector products summed in float.
- :class:`DistributedExactState`: ZeRO-1 — each rank keeps only its lane range of the optimiser states and tapes
  (:func:`lane_ranges`); W and P are all-gathered after every position update and undo. Tapes may spill to disk
  (``tape_dir``).
- :class:`Comm`, :class:`DistributedError`, :class:`CollectiveError`: every rank raises the same error when one
  fails; a collective that fails or times out names the step and the rank.
- :func:`init_from_env` (inside torchrun), :func:`run_local` (a small local launcher with a timeout).
"""
from .comm import CollectiveError, Comm, DistributedError
from .functional import hypergrad, rank_seed
from .launch import init_from_env, run_local
from .problem import DEFAULT_GRAD_FRAC_BITS, DistributedProblem, grad_range, quantise, shard
from .state import DistributedExactState, exact_state_factory, lane_ranges

__all__ = ["hypergrad", "DistributedProblem", "DistributedExactState", "exact_state_factory", "lane_ranges",
           "Comm", "DistributedError", "CollectiveError", "init_from_env", "run_local", "shard", "quantise",
           "grad_range", "DEFAULT_GRAD_FRAC_BITS", "rank_seed"]
