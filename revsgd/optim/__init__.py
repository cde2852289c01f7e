"""Reversible optimisers (docs/design.md §5): exact integer steps and their undo, float steps and their adjoints.

Built in: ``"sgd"`` (torch.optim.SGD), ``"nesterov"`` (stored-state methods only), ``"adam"``, ``"adamw"`` and
``"heavyball"`` (the 2015 paper's v ← γv − (1−γ)g, w ← w + αv). A new optimiser subclasses
:class:`ReversibleOptimizer`; pass the instance wherever a name is accepted.
"""
from __future__ import annotations

from typing import Optional, Union

from .adam import Adam, AdamW
from .base import Decay, ExactState, Plan, ReversibleOptimizer, Schedules
from .momentum import SGD, HeavyBall, Nesterov

OPTIMIZERS = {c.name: c for c in (SGD, Nesterov, Adam, AdamW, HeavyBall)}

__all__ = ["OPTIMIZERS", "get_optimizer", "ReversibleOptimizer", "SGD", "Nesterov", "Adam", "AdamW", "HeavyBall",
           "Schedules", "Plan", "Decay", "ExactState"]


def get_optimizer(opt: Union[str, ReversibleOptimizer], frac_bits: Optional[Union[int, dict]] = None
                  ) -> ReversibleOptimizer:
    """An optimiser instance from a name (with ``frac_bits``) or an instance (returned as is)."""
    if isinstance(opt, ReversibleOptimizer):
        if frac_bits is not None:
            raise TypeError("frac_bits goes to the optimiser's constructor when passing an instance")
        return opt
    if not isinstance(opt, str) or opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt!r}; choose one of {sorted(OPTIMIZERS)} or pass a "
                         f"ReversibleOptimizer instance")
    return OPTIMIZERS[opt](frac_bits)
