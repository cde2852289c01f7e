"""The torch backend: :mod:`revsgd.kernels.vectorized` on torch tensors, on any device (CPU or CUDA).

States are int64 tensors; the tape's heads and word stack are int16 tensors on the same device (the bits of the
canonical uint16 words). Elementwise torch ops are deterministic and each rounds once (separate kernels: no FMA
contraction), so the results equal the other backends' bit for bit — except torch's CPU float64 sqrt, which is not
correctly rounded: square roots on the CPU come from NumPy. A failing op costs one device sync (the error
check); the tape's stack grows by reallocation of one flat buffer.
"""
from __future__ import annotations

import contextlib

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover
    available = False
else:
    available = True

from . import vectorized as _v

name = "torch"


def _wrap16(v):
    """int64 values in [0, 2^16) → int16 with the same bits (explicit: no reliance on narrowing behaviour)."""
    return torch.where(v >= 32768, v - 65536, v).to(torch.int16)


class TorchArrays:
    """Tape storage arrays as torch int16 tensors on one device."""
    name = "torch"
    growth = 1 / 4           # growing copies the stack (no realloc in place): a geometric step keeps it amortised

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.host_memory = self.device.type == "cpu"

    def zeros_u16(self, n: int):
        return torch.zeros(n, dtype=torch.int16, device=self.device)

    def grow(self, buf, cap: int):
        out = torch.zeros(cap, dtype=torch.int16, device=self.device)
        k = min(cap, int(buf.shape[0]))
        out[:k] = buf[:k]
        return out

    @staticmethod
    def to_numpy_u16(a, n=None) -> np.ndarray:
        a = a[:n] if n is not None else a
        return a.detach().cpu().numpy().view(np.uint16)

    def from_numpy_u16(self, a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint16).view(np.int16).copy()).to(self.device)


#: Default storage (CPU); tapes for another device pass ``TorchArrays(device)``.
arrays = TorchArrays("cpu") if available else None


class TorchOps:
    """The array operations the spec needs, for torch tensors."""

    @staticmethod
    def f64(a):
        return a.to(torch.float64)

    @staticmethod
    def rint_i64(y):
        return torch.round(y).to(torch.int64)   # round half to even

    isfinite = staticmethod(torch.isfinite) if available else None
    floor = staticmethod(torch.floor) if available else None

    @staticmethod
    def sqrt(x):
        """Correctly rounded: torch's CPU kernel for float64 is not (it differs from IEEE sqrt in ~1 % of inputs),
        so on the CPU the root comes from NumPy (zero-copy); CUDA's double sqrt rounds to nearest."""
        if x.device.type == "cpu":
            return torch.from_numpy(np.sqrt(x.numpy()))
        return torch.sqrt(x)

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def zeros_i8(n: int, like):
        return torch.zeros(n, dtype=torch.int8, device=like.device)

    @staticmethod
    def first_error(err):
        bad = torch.nonzero(err)
        if bad.numel() == 0:
            return None
        i = int(bad[0, 0])
        return int(err[i]), i

    @staticmethod
    def from_host(a: np.ndarray, like):
        return torch.from_numpy(a).to(like.device)

    @staticmethod
    def lanes_param(vals, gid):
        vals = np.asarray(vals)
        if vals.shape[0] == 1:
            return vals[0].item()
        return torch.from_numpy(np.array(vals)).to(gid.device)[gid]

    @staticmethod
    def lanes_array(vals, gid):
        return torch.from_numpy(np.array(vals)).to(gid.device)[gid]

    @staticmethod
    def read_words(words, pos):
        return words[pos].to(torch.int64) & 0xFFFF

    @staticmethod
    def write_words(words, pos, vals) -> None:
        words[pos] = _wrap16(vals)

    @staticmethod
    def heads_i64(heads):
        return heads.to(torch.int64) & 0xFFFF

    @staticmethod
    def store_heads(heads, vals) -> None:
        heads.copy_(_wrap16(vals))

    @staticmethod
    def assign(dst, src) -> None:
        if dst is not src:
            dst.copy_(src)

    @staticmethod
    def store_float(P, vals) -> None:
        P.copy_(vals)

    @staticmethod
    def errstate():
        return contextlib.nullcontext()


ops = TorchOps
shift, momentum, adam = _v.backend(ops)
