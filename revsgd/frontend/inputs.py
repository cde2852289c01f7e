"""Turning what a PyTorch user passes into what the engine takes: params, hypers and schedules."""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..kernels import check_threads
from ..optim import ReversibleOptimizer

#: Torch threads pinned for a run when ``threads`` is not given: one thread is never much slower than several on a
#: shared machine (with a busy process beside it, 2 threads on 2 cores ran small models 4–25× slower), and float sums
#: depend on the count, which exact reversal needs fixed. Pass ``threads=k`` for large models on a dedicated machine.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def pinned_threads(k: Optional[int]):
    """Fix torch's intra-op thread count for a whole forward + reverse run (float sums depend on it)."""
    old = torch.get_num_threads()
    k = DEFAULT_THREADS if k is None else check_threads(k, "threads")
    torch.set_num_threads(k)
    try:
        yield k
    finally:
        torch.set_num_threads(old)


@dataclass
class Params:
    """The trainable parameters as one flat vector: names, shapes, lane offsets, one dtype and device."""
    names: list
    tensors: list
    module: Optional[torch.nn.Module]

    def __post_init__(self):
        self.shapes = [t.shape for t in self.tensors]
        self.sizes = np.array([t.numel() for t in self.tensors], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.size = int(self.offsets[-1])
        self.dtype = self.tensors[0].dtype
        self.device = self.tensors[0].device

    def flat(self, tensors=None) -> torch.Tensor:
        """The params (or same-shaped tensors) as one flat float64 vector."""
        ts = self.tensors if tensors is None else tensors
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts])

    def views(self, flat: torch.Tensor) -> dict:
        """name → a view of ``flat`` with the param's shape (differentiable if ``flat`` is)."""
        return {k: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]) for i, k in enumerate(self.names)}

    def unflat(self, x: torch.Tensor, dtype=None) -> dict:
        """A flat vector → dict of fresh tensors shaped like the params (dtype of the params unless given)."""
        return {k: v.detach().to(dtype or self.dtype).clone() for k, v in self.views(x).items()}


def as_params(params0) -> Params:
    """params0 as a dict name → tensor, a list/tuple of tensors (named "0", "1", …) or an nn.Module (its parameters
    with requires_grad; frozen ones stay constants). All trainable tensors share one float dtype and device."""
    module = None
    if isinstance(params0, torch.nn.Module):
        module = params0
        items = [(k, p) for k, p in params0.named_parameters() if p.requires_grad]
        if not items:
            raise ValueError("the module has no parameter with requires_grad=True: nothing to train")
    elif isinstance(params0, Mapping):
        items = list(params0.items())
    elif isinstance(params0, (list, tuple)):
        items = [(str(i), p) for i, p in enumerate(params0)]
    else:
        raise TypeError(f"params0 must be a dict name -> Tensor, a list of Tensors or an nn.Module, got "
                        f"{type(params0).__name__}")
    if not items:
        raise ValueError("params0 is empty: nothing to train")
    for k, v in items:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"params0[{k!r}] must be a Tensor, got {type(v).__name__}")
        if v.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"params0[{k!r}] must be float32 or float64, got {v.dtype}")
        if v.numel() == 0:
            raise ValueError(f"params0[{k!r}] has no elements; leave it out (nothing to train)")
        if not bool(torch.isfinite(v.detach()).all()):
            raise ValueError(f"params0[{k!r}] holds NaN or inf")
    dtypes = {v.dtype for _, v in items}
    if len(dtypes) > 1:
        raise TypeError(f"params0 mixes dtypes {sorted(map(str, dtypes))}: revsgd keeps the params in one flat "
                        f"buffer; cast them to one dtype (e.g. model.double())")
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        raise ValueError(f"params0 lives on several devices {sorted(map(str, devices))}; put them on one")
    return Params([k for k, _ in items], [v.detach() for _, v in items], module)


def as_hypers(hypers, params: Params) -> dict:
    """hypers as name → tensor (Python numbers become float64 tensors on the params' device)."""
    if hypers is None:
        return {}
    if not isinstance(hypers, Mapping):
        raise TypeError(f"hypers must be a dict name -> Tensor or number, got {type(hypers).__name__}")
    out = {}
    for k, v in hypers.items():
        if isinstance(v, bool):
            raise TypeError(f"hypers[{k!r}] must be a Tensor or a number, got bool")
        if isinstance(v, numbers.Real):
            v = torch.tensor(float(v), dtype=torch.float64, device=params.device)
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"hypers[{k!r}] must be a Tensor or a number, got {type(v).__name__}")
        if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all()):
            raise ValueError(f"hypers[{k!r}] holds NaN or inf")
        out[k] = v
    return out


ScheduleLike = Union[float, torch.Tensor, np.ndarray, Sequence[float]]


def as_schedules(opt: ReversibleOptimizer, given: dict, steps: Optional[int], groups: int) -> tuple:
    """(float64 NumPy copies, the user's tensors) of every schedule of ``opt``: floats and 0-d tensors broadcast to
    (T,) with T = ``steps`` or the length of the schedules given as sequences; missing ones take the optimiser's
    defaults. A copy is taken now, so changing a schedule tensor in place later cannot change this run."""
    unknown = [k for k in given if k not in opt.schedule_names]
    if unknown:
        raise TypeError(f"optimizer {opt.name!r} takes the schedules {list(opt.schedule_names)}, not {unknown}")
    defaults = getattr(opt, "defaults", {})
    missing = [k for k in opt.schedule_names if given.get(k) is None and k not in defaults]
    if missing:
        raise TypeError(f"optimizer {opt.name!r} needs {', '.join(missing)}")
    arrays, tensors = {}, {}
    for k in opt.schedule_names:
        v = given.get(k)
        if v is None:
            v = defaults[k]
        if isinstance(v, bool) or isinstance(v, str):
            raise TypeError(f"{k} must be a number or a Tensor of shape (T,) or (T, {groups}), got {v!r}")
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point():
                raise TypeError(f"{k} must be a float Tensor, got {v.dtype}")
            tensors[k] = v
            a = v.detach().to(torch.float64).cpu().numpy().copy()
        else:
            try:
                a = np.array(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"{k} must be a number or a Tensor, got {type(v).__name__}") from None
        if a.ndim > 2 or (a.ndim == 2 and a.shape[1] != groups):
            raise ValueError(f"{k} must be a scalar or have shape (T,) or (T, {groups}) (one column per parameter "
                             f"tensor), got {a.shape}")
        arrays[k] = a
    lengths = {k: a.shape[0] for k, a in arrays.items() if a.ndim >= 1}
    Ts = set(lengths.values()) | ({steps} if steps is not None else set())
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not Ts:
        raise ValueError("every schedule is a scalar: pass steps= (the number of training steps)")
    if len(Ts) > 1:
        raise ValueError(f"schedules disagree on the number of steps: {lengths}" +
                         (f", steps={steps}" if steps is not None else ""))
    T = Ts.pop()
    if T < 1:
        raise ValueError("the schedules have no steps (T = 0)")
    for k, a in arrays.items():
        if a.ndim == 0:
            arrays[k] = np.full(T, float(a))
        if not np.all(np.isfinite(arrays[k])):
            raise ValueError(f"{k} holds NaN or inf")
    return arrays, tensors
