"""nn.Module support: parameters as views of the flat leaf, and buffers as state of the training run.

BatchNorm's running mean and variance are exponential averages of batch statistics: R ← (1 − m) R + m·s with s the
batch mean, or the unbiased batch variance, of the layer's input. During every training-loss call the module's
running buffers are swapped for throwaway zeros (so nothing of the user's is updated twice: the forward and the
reverse pass both evaluate step t), and the layer's input is captured to compute u = m·s *differentiably* — the
engine reverses R exactly (:mod:`revsgd.engine.buffers`) and carries hypergradients through it to the weights. The
validation loss sees R_T (as a tensor that receives ∂f/∂R_T); after the run the module holds R_T and
``num_batches_tracked`` = its start + T, exactly what the forward pass left. Any other buffer that a training step
changes is an error naming it: revsgd would not know how to reverse it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .inputs import Params


class ModuleBinding:
    """The module's BatchNorm layers and the buffer lanes: ``names`` (qualified buffer names, running_mean and
    running_var per layer), ``sizes``, ``momentum`` per buffer, the initial values ``R0`` (float64, flat)."""

    def __init__(self, module: torch.nn.Module, params: Params):
        self.module, self.params = module, params
        self.layers: list = []
        for name, m in module.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
                if m.momentum is None:
                    raise ValueError(f"BatchNorm {name!r} uses a cumulative moving average (momentum=None); revsgd "
                                     f"reverses exponential averages only: give it a momentum (e.g. 0.1)")
                self.layers.append((name, m))
            elif isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
                raise ValueError(f"InstanceNorm {name!r} tracks running statistics, which revsgd does not reverse; "
                                 f"use track_running_stats=False")
        self.names = [f"{n}.{b}" if n else b for n, _ in self.layers for b in ("running_mean", "running_var")]
        self.sizes = np.array([m.num_features for _, m in self.layers for _ in (0, 1)], dtype=np.int64)
        self.momentum = np.array([float(m.momentum) for _, m in self.layers for _ in (0, 1)])
        self.R0 = (torch.cat([torch.cat([m.running_mean.detach().reshape(-1), m.running_var.detach().reshape(-1)])
                              .to(torch.float64) for _, m in self.layers]) if self.layers else None)
        self.counts0 = [int(m.num_batches_tracked) if m.num_batches_tracked is not None else None
                        for _, m in self.layers]
        self._watch = [(f"{mn}.{bn}" if mn else bn, mod, bn) for mn, mod in module.named_modules()
                       for bn, buf in mod._buffers.items()
                       if buf is not None and not (isinstance(mod, _BatchNorm) and bn in
                                                   ("running_mean", "running_var", "num_batches_tracked"))]
        self._captured: Optional[list] = None
        self._hooks = [m.register_forward_pre_hook(self._capture_hook(i)) for i, (_, m) in enumerate(self.layers)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _capture_hook(self, i: int):
        def hook(mod, args):
            if self._captured is None:
                return
            name = self.layers[i][0]
            if not mod.training:
                raise ValueError(f"BatchNorm {name!r} is in eval mode during the training loss: its running "
                                 f"statistics would feed the training loss; call model.train() for the training "
                                 f"loss (revsgd reverses running statistics as averages of batch statistics)")
            if self._captured[i] is not None:
                raise ValueError(f"BatchNorm {name!r} ran twice in one training step (shared module): its running "
                                 f"statistics would be updated twice per step, which revsgd does not reverse")
            self._captured[i] = args[0]
        return hook

    @contextlib.contextmanager
    def training(self):
        """Around one training-loss call: BatchNorm buffers are throwaway zeros, layer inputs are captured."""
        saved = []
        for _, m in self.layers:
            saved.append((m, dict(m._buffers)))
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if m._buffers.get(b) is not None:
                    m._buffers[b] = torch.zeros_like(m._buffers[b])
        before = [(n, mod._buffers[b].detach().clone()) for n, mod, b in self._watch]
        self._captured = [None] * len(self.layers)
        try:
            yield self
        except BaseException:
            self._captured = None
            raise
        finally:
            for m, bufs in saved:
                m._buffers.update(bufs)
            for (n, old), (_, mod, b) in zip(before, self._watch):
                if not torch.equal(mod._buffers[b].detach(), old):
                    raise ValueError(f"buffer {n!r} changed during a training step; revsgd reverses BatchNorm "
                                     f"running statistics only and cannot undo this update (it would be applied "
                                     f"twice otherwise): make it a constant, or compute it outside the module")

    def increments(self) -> Optional[torch.Tensor]:
        """u = m · (batch mean, unbiased batch variance) of every layer's captured input, flat float64, with graph."""
        if not self.layers:
            return None
        caps, self._captured = self._captured, None
        parts = []
        for (name, m), x in zip(self.layers, caps):
            if x is None:
                raise ValueError(f"BatchNorm {name!r} did not run in the training step: its running statistics "
                                 f"would be left as they are, which is fine only if it never runs — remove it, or "
                                 f"run it at every step")
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims)
            var = x.var(dims, correction=1)
            mom = float(m.momentum)
            parts += [(mom * mean).to(torch.float64), (mom * var).to(torch.float64)]
        return torch.cat(parts)

    @contextlib.contextmanager
    def evaluating(self, R: torch.Tensor, steps: int, differentiable: bool = False):
        """Around the validation loss: the buffers are views of ``R`` (model dtype) and num_batches_tracked =
        start + T, as plain training would leave them. With ``differentiable``, eval-mode BatchNorm layers compute
        (x − mean)/√(var + eps)·weight + bias themselves, so ∂f/∂R exists (torch's kernel does not differentiate
        with respect to running statistics)."""
        saved = []
        off = 0
        for i, (_, m) in enumerate(self.layers):
            saved.append((m, dict(m._buffers)))
            if differentiable:
                m.forward = _eval_forward(m)
            n = m.num_features
            m._buffers["running_mean"] = R[off:off + n]
            m._buffers["running_var"] = R[off + n:off + 2 * n]
            off += 2 * n
            if self.counts0[i] is not None:
                m._buffers["num_batches_tracked"] = torch.tensor(self.counts0[i] + steps, dtype=torch.long,
                                                                 device=R.device)
        try:
            yield
        finally:
            for m, bufs in saved:
                m._buffers.update(bufs)
                m.__dict__.pop("forward", None)

    def finalize(self, R: torch.Tensor, steps: int) -> None:
        """Leave the module's buffers where the forward pass left them: R_T and num_batches_tracked = start + T."""
        off = 0
        with torch.no_grad():
            for i, (_, m) in enumerate(self.layers):
                n = m.num_features
                m.running_mean.copy_(R[off:off + n])
                m.running_var.copy_(R[off + n:off + 2 * n])
                off += 2 * n
                if self.counts0[i] is not None:
                    m.num_batches_tracked.fill_(self.counts0[i] + steps)


def _eval_forward(m: _BatchNorm):
    """``m.forward`` whose eval mode is differentiable with respect to the running statistics: the values are torch's
    own kernel's, bit for bit (y_torch + (y − y) is y_torch exactly), the gradients those of
    (x − mean)/√(var + eps)·weight + bias."""
    train_forward = type(m).forward.__get__(m)

    def forward(x):
        if m.training:
            return train_forward(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
        if m.weight is not None:
            y = y * m.weight.view(shape) + m.bias.view(shape)
        with torch.no_grad():
            y_torch = torch.nn.functional.batch_norm(x, m.running_mean.detach(), m.running_var.detach(),
                                                     None if m.weight is None else m.weight.detach(),
                                                     None if m.bias is None else m.bias.detach(), False, 0.0, m.eps)
        return y_torch + (y - y.detach())
    return forward
