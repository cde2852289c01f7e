"""Step-indexed minibatches: step t's batch is a pure function of (seed, t).

A reversible run evaluates step t's training loss twice, once going forward and once replaying the run backwards, and
the two evaluations must see bit-identical data. An iterator (``DataLoader``) cannot be replayed in reverse;
:class:`StepSampler` is indexed by the step instead. It follows the convention of :class:`revsgd.problems.Batches`:
epoch ``e = t // batches_per_epoch`` visits the dataset in the order
``np.random.default_rng([seed, e]).permutation(n)``, cut into consecutive batches; with ``drop_last`` the incomplete
last batch of each epoch is dropped.
"""
from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

__all__ = ["StepSampler"]

Device = Union[str, torch.device, int]


def as_step(t: Any, name: str = "t") -> int:
    """``t`` as a non-negative Python int (ints, numpy ints and integer 0-dim tensors; not bools or floats)."""
    if isinstance(t, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool ({t!r})")
    try:
        i = operator.index(t)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(t).__name__} ({t!r})") from None
    if i < 0:
        raise ValueError(f"{name} must be >= 0, got {i}")
    return i


def _move(batch: Any, device: Optional[torch.device], pin: bool) -> Any:
    """Pin (CPU tensors, if asked) and move every tensor of a collated batch; containers keep their type."""
    if isinstance(batch, torch.Tensor):
        if pin and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        if device is not None:
            batch = batch.to(device, non_blocking=pin)
        return batch
    if isinstance(batch, Mapping):
        moved = {k: _move(v, device, pin) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:             # a mapping type that cannot be built from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(v, device, pin) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(v, device, pin) for v in batch)
    return batch


class StepSampler:
    """Step t's minibatch, a pure function of (seed, t): ``sampler(t)`` in any order, any number of times, on any
    sampler built with the same arguments, returns bit-identical tensors.

    ``StepSampler(dataset, batch_size=64)`` wraps a map-style dataset (anything with ``__len__`` and
    ``__getitem__``, e.g. a ``torch.utils.data.Dataset``; ``__getitems__`` is used when present) and collates the
    examples with ``collate_fn`` (default: ``torch.utils.data.default_collate``).
    ``StepSampler(x, y, batch_size=64)`` wraps one or more tensors with the same first dimension and returns
    ``x[i]`` (one tensor) or the tuple ``(x[i], y[i], ...)``, indexed in one call per tensor; a ``collate_fn``
    given with tensors receives the list of examples (``x[j]`` or ``(x[j], y[j], ...)``), as a DataLoader over a
    ``TensorDataset`` would.

    Epoch ``e = t // batches_per_epoch`` uses ``np.random.default_rng([seed, e]).permutation(n)``
    (``shuffle=False``: ``0, ..., n-1``) and batch ``k = t % batches_per_epoch`` is positions
    ``[k * batch_size, (k + 1) * batch_size)`` of it: every epoch visits each example once (``drop_last=True``,
    the default, drops the ``n % batch_size`` examples left over; ``drop_last=False`` makes them a short last batch).
    This is :class:`revsgd.problems.Batches`'s convention. Only the current epoch's permutation is cached.

    ``device`` moves the batch there (``non_blocking`` when pinned); ``pin_memory`` pins CPU batches first (needs
    CUDA: without it a warning is issued and pinning is skipped, as ``DataLoader`` does).
    """

    def __init__(self, *data: Any, batch_size: int, seed: int = 0, collate_fn: Optional[Callable] = None,
                 device: Optional[Device] = None, pin_memory: bool = False, drop_last: bool = True,
                 shuffle: bool = True):
        if not data:
            raise TypeError("StepSampler needs a dataset or one or more tensors: StepSampler(dataset, batch_size=...) "
                            "or StepSampler(x, y, batch_size=...)")
        if any(isinstance(d, torch.Tensor) for d in data):
            bad = [type(d).__name__ for d in data if not isinstance(d, torch.Tensor)]
            if bad:
                raise TypeError(f"pass either one dataset or only tensors, got tensors mixed with {', '.join(bad)}")
            if any(d.dim() == 0 for d in data):
                raise ValueError("tensors must have a first (example) dimension; got a 0-dim tensor")
            sizes = [int(d.shape[0]) for d in data]
            if len(set(sizes)) > 1:
                raise ValueError(f"tensors must have the same first dimension (number of examples), got {sizes}")
            self._tensors: Optional[tuple] = tuple(data)
            self.dataset: Any = None
            n = sizes[0]
        else:
            if len(data) > 1:
                raise TypeError(f"pass one dataset (or several tensors), got {len(data)} non-tensor arguments")
            ds = data[0]
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
                raise TypeError(f"dataset must be map-style (define __len__ and __getitem__), got "
                                f"{type(ds).__name__}; for an IterableDataset, materialise it first")
            self._tensors = None
            self.dataset = ds
            n = len(ds)
        if n == 0:
            raise ValueError("the dataset is empty")
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} ({batch_size!r})")
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must lie in [1, {n}] (the dataset size), got {batch_size}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True needs CUDA, which is not available; batches will not be pinned",
                          stacklevel=2)
            pin_memory = False
        self.n = n
        self.batch_size = int(batch_size)
        self.seed = as_step(seed, "seed")
        self.collate_fn = collate_fn
        self.device = None if device is None else torch.device(device)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.batches_per_epoch = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        self._epoch: tuple = (-1, None, {})   # (epoch, CPU permutation, {device: permutation on that device})

    # --- indices --------------------------------------------------------------------------------------------
    def _permutation(self, e: int) -> tuple:
        cached = self._epoch
        if cached[0] == e:
            return cached
        if self.shuffle:
            perm = torch.from_numpy(np.random.default_rng([self.seed, e]).permutation(self.n).astype(np.int64))
        else:
            perm = torch.arange(self.n, dtype=torch.int64)
        cached = (e, perm, {})
        self._epoch = cached          # one assignment: a concurrent reader sees the old or the new epoch whole
        return cached

    def _locate(self, t: Any) -> tuple:
        e, k = divmod(as_step(t), self.batches_per_epoch)
        return self._permutation(e), k * self.batch_size

    def indices(self, t: int) -> torch.Tensor:
        """Dataset indices of step t's batch (a fresh int64 CPU tensor): a pure function of (seed, t)."""
        (_, perm, _), lo = self._locate(t)
        return perm[lo:lo + self.batch_size].clone()

    def epoch(self, t: int) -> int:
        """The epoch step t falls in: ``t // batches_per_epoch``."""
        return as_step(t) // self.batches_per_epoch

    # --- batches --------------------------------------------------------------------------------------------
    def __call__(self, t: int) -> Any:
        """Step t's minibatch (fresh tensors, on ``device`` if given): a pure function of (seed, t)."""
        (_, perm, on_device), lo = self._locate(t)
        tensors = self._tensors
        if tensors is not None and self.collate_fn is None:
            out = []
            for x in tensors:
                dev = x.device
                if dev.type == "cpu":
                    idx = perm[lo:lo + self.batch_size]
                else:
                    p = on_device.get(dev)
                    if p is None:
                        p = on_device[dev] = perm.to(dev)
                    idx = p[lo:lo + self.batch_size]
                out.append(torch.index_select(x, 0, idx))
            batch: Any = out[0] if len(out) == 1 else tuple(out)
        else:
            idx = perm[lo:lo + self.batch_size].tolist()
            if tensors is not None:
                examples = ([tensors[0][i] for i in idx] if len(tensors) == 1
                            else [tuple(x[i] for x in tensors) for i in idx])
            elif hasattr(self.dataset, "__getitems__"):
                examples = self.dataset.__getitems__(idx)
            else:
                examples = [self.dataset[i] for i in idx]
            collate = self.collate_fn if self.collate_fn is not None else torch.utils.data.default_collate
            batch = collate(examples)
        if self.device is None and not self.pin_memory:
            return batch
        return _move(batch, self.device, self.pin_memory)

    def with_seed(self, seed: int) -> "StepSampler":
        """The same sampler (same data, no copy, same options) for another seed, e.g. a fresh data order per
        meta-iteration."""
        other = copy.copy(self)
        other.seed = as_step(seed, "seed")
        other._epoch = (-1, None, {})
        return other

    def __len__(self) -> int:
        """Batches per epoch (the sampler itself accepts any step t >= 0)."""
        return self.batches_per_epoch

    def __repr__(self) -> str:
        src = (f"{len(self._tensors)} tensor(s)" if self._tensors is not None else type(self.dataset).__name__)
        return (f"StepSampler({src}, n={self.n}, batch_size={self.batch_size}, seed={self.seed}, "
                f"batches_per_epoch={self.batches_per_epoch}, shuffle={self.shuffle}, drop_last={self.drop_last}"
                + (f", device={self.device}" if self.device is not None else "")
                + (", pin_memory=True" if self.pin_memory else "") + ")")
