"""Hyperparameter parametrisations: free, unconstrained tensors → the quantities :func:`revsgd.hypergrad` takes.

Each piece holds one free tensor (``.free``, a leaf with ``requires_grad``) and maps it, differentiably, to a
constrained value when called. Torch autograd carries the engine's hypergradients back to ``.free``.

======================  ======================================  ===================================
piece                   value                                   free tensor
======================  ======================================  ===================================
LogSchedule             lr[t, g] = exp(Σ_k M[t, k] · u[k, g])    u: (knots or T, groups)
LogitSchedule           γ[t, g] = σ(Σ_k M[t, k] · u[k, g])       u: (knots or T, groups)
LogScale                s = exp(u)  (L2 strengths, per layer     u: any shape
                        or per weight)
InitScale               w0[k] = exp(u[i]) · z[k], z a fixed      u: (scaled entries,)
                        unit-variance draw
======================  ======================================  ===================================

``M`` is the identity (one value per step) or, with ``knots=K``, piecewise-linear interpolation from K evenly
spaced knots to T steps (smooth schedules with few free values).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def interp_matrix(T: int, knots: int, dtype=torch.float64) -> torch.Tensor:
    """(T, K) matrix of piecewise-linear interpolation weights from K evenly spaced knots onto steps 0..T-1."""
    if T < 1 or knots < 1:
        raise ValueError(f"need T >= 1 and knots >= 1, got T={T}, knots={knots}")
    if knots == 1:
        return torch.ones(T, 1, dtype=dtype)
    pos = torch.arange(T, dtype=torch.float64) * (knots - 1) / max(T - 1, 1)
    lo = pos.floor().clamp(max=knots - 2).long()
    frac = pos - lo
    M = torch.zeros(T, knots, dtype=torch.float64)
    M[torch.arange(T), lo] = 1 - frac
    M[torch.arange(T), lo + 1] += frac
    return M.to(dtype)


class _Schedule:
    def __init__(self, T: int, groups: int, init, knots: Optional[int], dtype, inverse, name: str):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"{name}: T must be a positive int, got {T!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
            raise ValueError(f"{name}: groups must be a non-negative int (0: one value per step), got {groups!r}")
        if knots is not None and (not isinstance(knots, int) or not 1 <= knots <= T):
            raise ValueError(f"{name}: knots must be an int in [1, T={T}], got {knots!r}")
        self.T, self.groups, self.knots = T, groups, knots
        self.M = None if knots is None else interp_matrix(T, knots, dtype)
        rows = T if knots is None else knots
        init = torch.as_tensor(init, dtype=dtype)
        u = inverse(init).expand(rows, max(groups, 1)).clone()
        self.free = u.requires_grad_(True)

    def _linear(self) -> torch.Tensor:
        u = self.free if self.M is None else self.M @ self.free
        return u if self.groups else u[:, 0]


class LogSchedule(_Schedule):
    """Positive per-step (and per-group) values in log space: learning rates. ``groups=0``: shape (T,)."""

    def __init__(self, T: int, groups: int, init: float | torch.Tensor, *, knots: Optional[int] = None,
                 dtype=torch.float64):
        if torch.any(torch.as_tensor(init) <= 0):
            raise ValueError("LogSchedule: init must be positive")
        super().__init__(T, groups, init, knots, dtype, torch.log, "LogSchedule")

    def __call__(self) -> torch.Tensor:
        return torch.exp(self._linear())


class LogitSchedule(_Schedule):
    """Values in (0, 1) through a logistic: momentum. ``groups=0``: shape (T,)."""

    def __init__(self, T: int, groups: int, init: float | torch.Tensor, *, knots: Optional[int] = None,
                 dtype=torch.float64):
        i = torch.as_tensor(init)
        if torch.any((i <= 0) | (i >= 1)):
            raise ValueError("LogitSchedule: init must lie in (0, 1)")
        super().__init__(T, groups, init, knots, dtype, torch.logit, "LogitSchedule")

    def __call__(self) -> torch.Tensor:
        return torch.sigmoid(self._linear())


class LogScale:
    """A positive tensor in log space (L2 strength per layer: shape (layers,); per weight: the weight's shape)."""

    def __init__(self, init: float | torch.Tensor, shape: Sequence[int] = (), dtype=torch.float64):
        init = torch.as_tensor(init, dtype=dtype)
        if torch.any(init <= 0):
            raise ValueError("LogScale: init must be positive")
        self.free = torch.log(init).expand(tuple(shape)).clone().requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        return torch.exp(self.free)


class InitScale:
    """Initial weights w0[k] = exp(u[i]) · z[k] for each scaled entry k, z a fixed unit-variance draw (seeded).

    ``template``: params0-like dict (name -> Tensor) giving order, shapes and dtypes; ``scaled``: the names to
    scale (default: every entry with two or more dimensions); the others are passed through as given (e.g. zero
    biases). ``init``: per-entry scales (default 1/sqrt(fan-in), fan-in = shape[0]).
    """

    def __init__(self, template: dict, *, scaled: Optional[Sequence[str]] = None,
                 init: Optional[Sequence[float]] = None, seed: int = 0):
        self.template = {k: v.detach() for k, v in template.items()}
        self.names = [k for k, v in template.items() if v.dim() >= 2] if scaled is None else list(scaled)
        missing = [k for k in self.names if k not in template]
        if missing or not self.names:
            raise ValueError(f"InitScale: scaled names {missing or self.names!r} are not entries of the template")
        g = torch.Generator().manual_seed(seed)
        self.z = {k: torch.randn(tuple(template[k].shape), generator=g, dtype=torch.float64) for k in self.names}
        if init is None:
            init = [1.0 / math.sqrt(template[k].shape[0]) for k in self.names]
        if len(init) != len(self.names) or any(s <= 0 for s in init):
            raise ValueError(f"InitScale: need {len(self.names)} positive initial scales, got {init!r}")
        self.free = torch.log(torch.tensor(list(init), dtype=torch.float64)).requires_grad_(True)

    def scales(self) -> torch.Tensor:
        return torch.exp(self.free)

    def __call__(self) -> dict:
        s = self.scales()
        idx = {k: i for i, k in enumerate(self.names)}
        return {k: (s[idx[k]] * self.z[k]).to(v.dtype) if k in idx else v for k, v in self.template.items()}
