"""What the engine needs from a training problem, on flat parameter vectors (torch tensors on one device).

A :class:`Problem` owns ``P``, the flat leaf tensor (model dtype) that the loss reads — the engine (or the exact
kernels) writes w_t into it before asking for a gradient — and answers

- ``grad(t)``: g_t = ∇_w L(P, θ, t), shape (L,), first order;
- ``grad_vjp(t)``: the same g_t (bit for bit) computed with its graph, and ``vjp(u, acc=None)`` → (∇_w(g·u),
  [∂_θ(g·u) per hyper]) — one Hessian-vector product and the θ-part, in one backward pass; given ``acc`` (float64,
  flat), the product is added into it in place and ``acc`` is returned (the sweep's adjoint: no temporary);
- ``val()``: (f, ∂f/∂w, [∂f/∂θ per hyper]) at P.

``fingerprint(g)`` hashes a gradient's bits; the exact method compares the forward and reverse passes' gradients
with it at every step, so a loss that is not a pure function of (w, θ, t) is caught at the step where it diverges.

Problems whose training updates running averages (BatchNorm) set ``buffers`` (:class:`~revsgd.engine.buffers.Buffers`):
then ``grad``/``grad_vjp`` also leave the step's increments u_t in ``aux`` (float64, detached), ``vjp(u, du)`` takes
their cotangent, and ``val()`` leaves ∂f/∂R_T in ``d_buffers``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


class Problem:
    """Base class (see the module docstring). Subclasses set ``P`` and implement the three callbacks."""
    P: torch.Tensor
    num_hypers: int = 0
    buffers = None                       # Buffers, for problems with running averages
    aux: Optional[torch.Tensor] = None   # the last step's buffer increments u_t
    d_buffers: Optional[torch.Tensor] = None

    @property
    def num_lanes(self) -> int:
        return int(self.P.shape[0])

    @property
    def device(self) -> torch.device:
        return self.P.device

    def set_params(self, w: torch.Tensor) -> None:
        """P ← w (cast to the model dtype)."""
        with torch.no_grad():
            self.P.copy_(w)

    def grad(self, t: int) -> torch.Tensor:
        raise NotImplementedError

    def grad_vjp(self, t: int):
        raise NotImplementedError

    def val(self):
        raise NotImplementedError

    def hyper_zeros(self) -> list:
        return []

    def fingerprint(self, g: torch.Tensor) -> torch.Tensor:
        """A 0-d int64 hash of g's bits: the wrapping integer sum of their bit patterns taken as int64 words (one
        reduction, no conversion; any change of a single element changes it; deterministic on every device)."""
        return torch.sum(bit_words(g), dtype=torch.int64)


def bit_words(g: torch.Tensor) -> torch.Tensor:
    """g's memory as integer words (a view): int64 where the bytes allow, else int32 (odd float32 counts)."""
    flat = g.detach().reshape(-1)
    if flat.dtype != torch.float64 and (flat.numel() * flat.element_size()) % 8 == 0:
        return flat.view(torch.int64)             # pairs of float32 (or four float16) words
    return flat.view(torch.int64 if flat.dtype == torch.float64 else torch.int32)


class NumpyProblem(Problem):
    """A problem given by NumPy callbacks on flat float64 vectors (see :func:`revsgd.hypergrad_numpy`)."""

    def __init__(self, grad: Callable, grad_vjp: Callable, val: Optional[Callable], num_lanes: int,
                 num_hypers: int):
        self._grad, self._grad_vjp, self._val = grad, grad_vjp, val
        self.P = torch.zeros(num_lanes, dtype=torch.float64)
        self.num_hypers = int(num_hypers)

    def _vec(self, x, what: str, n: int) -> torch.Tensor:
        a = np.asarray(x, dtype=np.float64)
        if a.shape != (n,):
            raise ValueError(f"{what} must return shape ({n},), got {a.shape}")
        return torch.from_numpy(np.array(a, dtype=np.float64))

    def grad(self, t: int) -> torch.Tensor:
        return self._vec(self._grad(self.P.detach().numpy().copy(), t), "grad", self.num_lanes)

    def grad_vjp(self, t: int):
        out = self._grad_vjp(self.P.detach().numpy().copy(), t)
        if not (isinstance(out, tuple) and len(out) == 2 and callable(out[1])):
            raise TypeError("grad_vjp must return (g, vjp) with vjp(u) -> (Hu, theta_u)")
        g, f = out
        g = self._vec(g, "grad_vjp", self.num_lanes)

        def vjp(u: torch.Tensor, du=None, acc: Optional[torch.Tensor] = None):
            r = f(u.detach().numpy().astype(np.float64))
            if not (isinstance(r, tuple) and len(r) == 2):
                raise TypeError("vjp(u) must return (Hu, theta_u)")
            hu = self._vec(r[0], "vjp(u)[0]", self.num_lanes)
            th = [self._vec(np.zeros(self.num_hypers) if r[1] is None else r[1], "vjp(u)[1]", self.num_hypers)]
            return (hu if acc is None else acc.add_(hu)), th
        return g, vjp

    def val(self):
        r = self._val(self.P.detach().numpy().copy())
        if not (isinstance(r, tuple) and len(r) == 3):
            raise TypeError("val(w) must return (f, df/dw, df/dtheta)")
        f = float(r[0])
        if not np.isfinite(f):
            raise ValueError(f"val returned a non-finite validation loss: {f}")
        dth = np.zeros(self.num_hypers) if r[2] is None else r[2]
        return f, self._vec(r[1], "val(w)[1]", self.num_lanes), [self._vec(dth, "val(w)[2]", self.num_hypers)]

    def hyper_zeros(self) -> list:
        return [torch.zeros(self.num_hypers, dtype=torch.float64)]
