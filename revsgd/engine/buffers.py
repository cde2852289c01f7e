"""Running averages that training updates as a side effect (BatchNorm's running mean and variance), reversed
exactly as one more set of lanes (docs/design.md §7).

Each buffer lane follows ``R_{t+1} = (1 − m) R_t + u_t``, where the problem reports u_t = m · (batch statistic at
w_t) — a differentiable function of w_t, recomputed bit for bit in the reverse pass. Groups are buffers (each with
its module's momentum m). The exact method keeps R̂ = R / e with the decay's scale e, shifts out the bits 1 − m
destroys onto a tape, and adds rint(u_t / e_{t+1} · 2^F); undoing subtracts the same integers and unshifts.
The adjoint: dR_t = (1 − m) dR_{t+1}, and du_t = dR_{t+1} flows into w_t through the step's vector-Jacobian product.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import kernels
from ..core.fixed import DEFAULT_FRAC_BITS
from ..core.tapeformat import TapeStorage
from ..optim.base import Decay, _to_fixed_t

KEY = "__buffers"   # the float state key the providers carry the buffers under


class Buffers:
    """The buffer recursion of one run: initial values ``R0`` (float64, flat), lanes per buffer ``sizes`` and each
    buffer's momentum ``m`` (the same for every step)."""

    def __init__(self, R0: torch.Tensor, sizes: np.ndarray, momentum: np.ndarray, T: int,
                 frac_bits: int = DEFAULT_FRAC_BITS):
        self.R0 = R0.detach().to(torch.float64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.m = np.asarray(momentum, dtype=np.float64)
        self.frac = frac_bits
        self.T = T
        gid = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.from_numpy(self.sizes))
        self.keep = (1.0 - torch.from_numpy(self.m))[gid].to(self.R0.device)   # per lane 1 − m

    # --- float side ----------------------------------------------------------------------------------------
    def float_step(self, R: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.keep * R + u

    def adjoint(self, dR1: torch.Tensor) -> tuple:
        """(dR_t, du_t) from dR_{t+1}."""
        return self.keep * dR1, dR1

    # --- exact side ----------------------------------------------------------------------------------------
    def exact(self, backend: Optional[str]) -> "ExactBuffers":
        return ExactBuffers(self, backend)


class ExactBuffers:
    """R̂ (int64) with its decay and tape; steps and undos in fixed point."""

    def __init__(self, b: Buffers, backend: Optional[str]):
        self.b = b
        self.be = kernels.get_backend(backend)
        dev = b.R0.device
        if dev.type != "cpu" and self.be.name != "torch":
            self.be = kernels.get_backend("torch")
        factors = np.broadcast_to(1.0 - b.m, (b.T, len(b.sizes))).copy()
        self.decay = Decay.of(factors, len(b.sizes), "1 - BatchNorm momentum")
        self.R = _to_fixed_t(b.R0, b.frac, "buffers")
        self.R0 = self.R.clone()
        arrays = self.be.arrays if self.be.name != "torch" else type(self.be.arrays)(dev)
        self.tape = TapeStorage(int(self.R.shape[0]), b.offsets, arrays)
        self._arr = self.R.numpy() if self.be.name != "torch" else self.R
        self._gid = torch.repeat_interleave(torch.arange(len(b.sizes)), torch.from_numpy(b.sizes)).to(dev)
        self._e = torch.from_numpy(self.decay.e).to(dev)   # (T+1, G)

    def _term(self, u: torch.Tensor, t: int) -> torch.Tensor:
        return u.to(torch.float64) / self._e[t + 1][self._gid]

    def step(self, u: torch.Tensor, t: int) -> None:
        kernels.shift(self.be, self.tape, self._arr, self.decay.h[t], True, name="buffers", frac_bits=self.b.frac)
        try:
            _add(self.R, self._term(u, t), self.b.frac, 1)
        except Exception:
            kernels.shift(self.be, self.tape, self._arr, self.decay.h[t], False, name="buffers",
                          frac_bits=self.b.frac)
            raise

    def undo(self, u: torch.Tensor, t: int) -> None:
        _add(self.R, self._term(u, t), self.b.frac, -1)
        kernels.shift(self.be, self.tape, self._arr, self.decay.h[t], False, name="buffers", frac_bits=self.b.frac)

    def value(self, t: int) -> torch.Tensor:
        """R_t as float64 (the true value: R̂ times its scale)."""
        return self.R.to(torch.float64) * 2.0 ** -self.b.frac * self._e[t][self._gid]

    def at_start(self) -> bool:
        return torch.equal(self.R, self.R0) and self.tape.at_start()

    @property
    def nbytes(self) -> int:
        return self.tape.nbytes

    @property
    def info_bits(self) -> int:
        return self.tape.info_bits


def _add(X: torch.Tensor, u: torch.Tensor, frac: int, sign: int) -> None:
    """X += sign·rint(u·2^F), all or nothing."""
    y = u * 2.0 ** frac
    if not bool(((y >= -2.0**63) & (y < 2.0**63)).all()):   # NaN fails too
        raise OverflowError("a BatchNorm running statistic leaves the fixed-point range (or is not finite); nothing "
                            "was changed")
    d = torch.round(y).to(torch.int64) * sign
    Y = X + d
    if bool((((X ^ Y) & (d ^ Y)) < 0).any()):
        raise OverflowError("a BatchNorm running statistic leaves the fixed-point range; nothing was changed")
    X.copy_(Y)
