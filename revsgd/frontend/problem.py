"""The engine's :class:`~revsgd.engine.problem.Problem` for torch losses on one flat parameter leaf."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..engine import REVERSAL_HINT, ReversalError
from ..engine.problem import Problem
from .inputs import Params
from .randomness import is_step_seeded, step_seeded

TrainLoss = Callable[[dict, dict, int], torch.Tensor]
ValLoss = Callable[[dict, dict], torch.Tensor]


def scalar(loss, what: str, t: Optional[int] = None) -> torch.Tensor:
    where = f" at step {t}" if t is not None else ""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a Tensor{where}, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(f"{what} must return a scalar Tensor{where}, got shape {tuple(loss.shape)}")
    return loss.reshape(())


class TorchProblem(Problem):
    """Losses ``train_loss(params, hypers, t)`` and ``val_loss(params, hypers)`` on dicts of tensors that are views of
    one flat leaf ``P`` (model dtype): the gradient of a step is one ``autograd.grad`` with respect to P, with no
    per-step flattening. With ``seed`` set, step t runs under torch's RNG seeded from (seed, t)."""

    def __init__(self, train_loss: TrainLoss, val_loss: Optional[ValLoss], params: Params, hypers: dict,
                 threads: int, seed: Optional[int] = 0):
        self.params, self.threads = params, threads
        if seed is not None and not is_step_seeded(train_loss):
            train_loss = step_seeded(train_loss, seed)
        self.train_loss, self.val_loss = train_loss, val_loss
        self.P = params.flat().to(params.dtype).to(params.device).requires_grad_(True)
        self.views = params.views(self.P)
        self.hypers = {k: v.detach() for k, v in hypers.items()}
        self.leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in hypers.items()}
        self._req = [h for h in self.leaves.values() if h.requires_grad]
        self.num_hypers = sum(h.numel() for h in self.leaves.values())

    def _check_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            raise ReversalError(f"torch's thread count changed during the run ({self.threads} -> "
                                f"{torch.get_num_threads()}). " + REVERSAL_HINT)

    def grad(self, t: int) -> torch.Tensor:
        self._check_threads()
        with torch.enable_grad():
            loss = scalar(self.train_loss(self.views, self.hypers, t), "train_loss", t)
            g, = torch.autograd.grad(loss, self.P, allow_unused=True)
        return torch.zeros_like(self.P) if g is None else g

    def grad_vjp(self, t: int):
        self._check_threads()
        with torch.enable_grad():
            loss = scalar(self.train_loss(self.views, self.leaves, t), "train_loss", t)
            g, = torch.autograd.grad(loss, self.P, create_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(self.P)
        wrt = [self.P] + self._req

        def vjp(u: torch.Tensor):
            if not g.requires_grad:
                return torch.zeros_like(u), [None] * len(self.leaves)
            with torch.enable_grad():
                out = torch.autograd.grad(g, wrt, grad_outputs=u.to(g.dtype), allow_unused=True)
            return _f64(out[0], u), self._per_hyper(out[1:])
        return g, vjp

    def _per_hyper(self, outs) -> list:
        it = iter(outs)
        return [(lambda x: None if x is None else x.detach())(next(it)) if h.requires_grad else None
                for h in self.leaves.values()]

    def val(self):
        with torch.enable_grad():
            f = scalar(self.val_loss(self.views, self.leaves), "val_loss")
            out = torch.autograd.grad(f, [self.P] + self._req, allow_unused=True)
        fv = f.item()
        if not math.isfinite(fv):
            raise ValueError(f"val_loss returned a non-finite value: {fv}")
        return fv, _f64(out[0], self.P), self._per_hyper(out[1:])

    def hyper_zeros(self) -> list:
        return [torch.zeros_like(h, dtype=torch.float64) if h.is_floating_point() else None
                for h in self.leaves.values()]


def _f64(x, like) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float64, device=like.device) if x is None else x.to(torch.float64)
