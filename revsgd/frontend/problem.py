"""The engine's :class:`~revsgd.engine.problem.Problem` for torch losses on one flat parameter leaf."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

import contextlib

from ..core.fixed import NonFiniteError
from ..engine import REVERSAL_HINT, ReversalError
from ..engine.buffers import Buffers
from ..engine.problem import Problem, bit_words
from ..optim.autograd import grad as _grad
from .inputs import Params
from .module import ModuleBinding
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
    """Losses ``train_loss(params, hypers, t)`` and ``val_loss(params, hypers)`` on a dict of leaf tensors whose
    memory is one flat buffer ``P`` (model dtype): writing w_t into P is what the leaves see, and a first-order
    gradient accumulates in place into one flat buffer (each leaf's ``.grad`` is a view of it) — the cost of plain
    training, with no per-step flattening. With ``seed`` set, step t runs under torch's RNG seeded from (seed, t)."""

    def __init__(self, train_loss: TrainLoss, val_loss: Optional[ValLoss], params: Params, hypers: dict,
                 threads: int, seed: Optional[int] = 0, steps: int = 0):
        self.params, self.threads = params, threads
        self.binding = ModuleBinding(params.module, params) if params.module is not None else None
        if self.binding is not None and self.binding.layers:
            b = self.binding
            self.buffers = Buffers(b.R0.to(params.device), b.sizes, b.momentum, steps)
        if seed is not None and not is_step_seeded(train_loss):
            train_loss = step_seeded(train_loss, seed)
        self.train_loss, self.val_loss = train_loss, val_loss
        self.P = params.flat().to(params.dtype).to(params.device)
        self.views = {k: v.requires_grad_() for k, v in params.views(self.P).items()}
        self._lv = list(self.views.values())
        self._G = torch.zeros_like(self.P)
        self._gviews = list(params.views(self._G).values())
        self._Gbits = bit_words(self._G)
        self._vcache: dict = {}
        for leaf, gv in zip(self._lv, self._gviews):
            leaf.grad = gv
        self.hypers = {k: v.detach() for k, v in hypers.items()}
        self.leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in hypers.items()}
        self._req = [h for h in self.leaves.values() if h.requires_grad]
        self.num_hypers = sum(h.numel() for h in self.leaves.values())

    def _check_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            raise ReversalError(f"torch's thread count changed during the run ({self.threads} -> "
                                f"{torch.get_num_threads()}). " + REVERSAL_HINT)

    def _loss(self, hypers: dict, t: int):
        """Step t's training loss and (modules with BatchNorm) its buffer increments, with graphs."""
        ctx = self.binding.training() if self.binding is not None else contextlib.nullcontext()
        with ctx:
            loss = scalar(self.train_loss(self.views, hypers, t), "train_loss", t)
            u = self.binding.increments() if self.buffers is not None else None
        return loss, u

    def grad(self, t: int) -> torch.Tensor:
        """∇L at P, accumulated in place into the flat buffer (returned; the next call reuses it)."""
        self._check_threads()
        self._G.zero_()
        with torch.enable_grad():
            loss, u = self._loss(self.hypers, t)
            if not math.isfinite(loss.item()):
                raise NonFiniteError(f"at step {t}: train_loss returned a non-finite value ({loss.item()})")
            if loss.requires_grad:
                _grad([loss], self._lv, accumulate=True)
        self.aux = None if u is None else u.detach()
        return self._G

    def fingerprint(self, g: torch.Tensor) -> torch.Tensor:
        if g is self._G:           # the gradient buffer (every step's g): its word view made once
            return torch.sum(self._Gbits, dtype=torch.int64)
        return super().fingerprint(g)

    def _leaf_views(self, x: torch.Tensor) -> list:
        """Per-leaf views of a flat buffer, made once per buffer (the sweep passes the same few every step). A cached
        view keeps its storage alive, so a live tensor at the same address is that memory."""
        key = (x.data_ptr(), x.dtype, x.device, x.numel())
        v = self._vcache.get(key)
        if v is None:
            if len(self._vcache) >= 4:
                self._vcache.clear()
            v = self._vcache[key] = list(self.params.views(x.detach()).values())
        return v

    def _add_into(self, acc: Optional[torch.Tensor], gs) -> torch.Tensor:
        """acc += the per-leaf products (acc float64, flat; a new zero vector when None), leaf by leaf: no
        concatenation or conversion temporaries the size of the model."""
        if acc is None:
            acc = torch.zeros(self.P.shape, dtype=torch.float64, device=self.P.device)
        for g, v in zip(gs, self._leaf_views(acc)):
            if g is not None:
                v.add_(g)
        return acc

    def _flat(self, gs) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, self._lv)])

    def grad_vjp(self, t: int):
        """g_t with its graph. The flat g returned is the gradient buffer of :meth:`grad` (valid until the next call
        or until ``vjp``, which converts its cotangent into the same buffer: no model-sized temporaries)."""
        self._check_threads()
        with torch.enable_grad():
            loss, u = self._loss(self.leaves, t)
            gs = _grad([loss], self._lv, create_graph=True) if loss.requires_grad else [None] * len(self._lv)
        with torch.no_grad():
            for x, v in zip(gs, self._gviews):
                v.zero_() if x is None else v.copy_(x)
        self.aux = None if u is None else u.detach()
        wrt = self._lv + self._req
        n = len(self._lv)

        def vjp(dg: torch.Tensor, du: Optional[torch.Tensor] = None, acc: Optional[torch.Tensor] = None):
            with torch.no_grad():
                cot = dg if dg.dtype == self._G.dtype else self._G.copy_(dg)   # g is read by now
            outs = [(x, c) for x, c in zip(gs, self._leaf_views(cot)) if x is not None and x.requires_grad]
            if du is not None and u is not None and u.requires_grad:
                outs.append((u, du.to(u.dtype)))
            if not outs:
                return self._add_into(acc, []), [None] * len(self.leaves)
            with torch.enable_grad():
                out = _grad([o for o, _ in outs], wrt, [c for _, c in outs])
            return self._add_into(acc, out[:n]), self._per_hyper(out[n:])
        return self._G, vjp

    def set_buffers(self, R: torch.Tensor) -> None:
        """The running statistics the validation loss sees (R_T)."""
        self._R = R.detach()

    def close(self) -> None:
        """Remove the module hooks (the run is over)."""
        if self.binding is not None:
            self.binding.close()

    def eval_buffers(self, R: torch.Tensor, differentiable: bool = True):
        """Context: the module's BatchNorm buffers are views of R during the block (no-op without buffers)."""
        if self.buffers is None:
            return contextlib.nullcontext()
        return self.binding.evaluating(R, self.buffers.T, differentiable)

    def _per_hyper(self, outs) -> list:
        it = iter(outs)
        return [(lambda x: None if x is None else x.detach())(next(it)) if h.requires_grad else None
                for h in self.leaves.values()]

    def val(self):
        R = None if self.buffers is None else self._R.to(self.params.dtype).requires_grad_()
        with torch.enable_grad(), self.eval_buffers(R):
            f = scalar(self.val_loss(self.views, self.leaves), "val_loss")
            wrt = self._lv + self._req + ([R] if R is not None else [])
            out = torch.autograd.grad(f, wrt, allow_unused=True)
        fv = f.item()
        if not math.isfinite(fv):
            raise ValueError(f"val_loss returned a non-finite value: {fv}")
        if R is not None:
            self.d_buffers = _f64(out[-1], R)
            out = out[:-1]
        n = len(self._lv)
        return fv, self._flat(out[:n]).to(torch.float64), self._per_hyper(out[n:])

    def hyper_zeros(self) -> list:
        return [torch.zeros_like(h, dtype=torch.float64) if h.is_floating_point() else None
                for h in self.leaves.values()]


def _f64(x, like) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float64, device=like.device) if x is None else x.to(torch.float64)
