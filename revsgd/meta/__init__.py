"""Meta-optimisation: hyperparameter parametrisations (:mod:`revsgd.meta.params`) and the resumable meta loop."""
from . import checkpoint, params
from .checkpoint import CheckpointError
from .trainer import MetaSpec, MetaTrainer

__all__ = ["CheckpointError", "MetaSpec", "MetaTrainer", "checkpoint", "params"]
