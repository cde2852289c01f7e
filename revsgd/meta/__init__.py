"""Meta-optimisation: hyperparameter parametrisations (:mod:`revsgd.meta.params`) and the resumable meta loop."""
from . import params
from .trainer import MetaSpec, MetaTrainer

__all__ = ["MetaSpec", "MetaTrainer", "params"]
