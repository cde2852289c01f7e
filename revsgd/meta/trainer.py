"""The meta loop: gradient-based hyperparameter optimisation with one :func:`revsgd.hypergrad` per meta-iteration.

You provide the free tensors (see :mod:`revsgd.meta.params`) and ``build(seed) -> MetaSpec``, which reads them and
returns the losses, params0, optimiser, schedules and hypers of one training run whose minibatches are drawn from
``seed`` (a fresh seed per meta-iteration). Each meta-iteration computes the exact hypergradient, carries it back
to the free tensors with torch autograd, takes one optimiser step (Adam by default), appends a record and writes
a checkpoint (free tensors + optimiser state + records, readable with ``torch.load(weights_only=True)``),
atomically, so a run killed at any moment resumes exactly where its last finished meta-iteration left it.
Checkpoints carry a SHA-256 of their whole content and are validated in full before anything is loaded; a bad
one raises :class:`~revsgd.meta.checkpoint.CheckpointError` and leaves the trainer as it was (see
:mod:`revsgd.meta.checkpoint`).
"""
from __future__ import annotations

import collections
import copy
import operator
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..frontend.functional import hypergrad
from . import checkpoint as ckpt
from .checkpoint import CHECKPOINT_VERSION, CheckpointError

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "MetaSpec", "MetaTrainer"]


@dataclass
class MetaSpec:
    """One training run, as a differentiable function of the free tensors: ``schedules`` maps the optimiser's
    schedule names ("lr", "momentum", "beta1", …) to tensors of shape (T,) or (T, groups)."""
    train_loss: Callable
    val_loss: Callable
    params0: dict
    schedules: dict
    optimizer: Any = "sgd"
    hypers: dict = field(default_factory=dict)
    evaluate: Optional[Callable[[dict], dict]] = None   # final params -> extra metrics (floats) for the record;
    # by default the record's "train_loss" is the final params' loss on the last step's minibatch (evaluate may
    # replace it and "val_loss", not the trainer's own fields: iteration, seed, hypergrad_norms, tape_bytes, seconds*)


class MetaTrainer:
    """Optimise ``free`` tensors by hypergradient descent on the validation loss.

    Args:
        build: ``seed -> MetaSpec``; called once per meta-iteration with ``seed = seed0 + iteration``.
        free: dict name -> leaf Tensor (requires_grad) read by ``build``.
        optimizer: factory ``params -> torch.optim.Optimizer`` (default: Adam with ``meta_lr``).
        checkpoint: path of the checkpoint file; with ``resume=True`` an existing one is continued (a corrupt or
            mismatching one raises :class:`CheckpointError`). Temporary files of this path left by killed
            processes are removed when the trainer starts and at every save.
        method, hypergrad_options: passed to :func:`revsgd.hypergrad` (``threads`` pins torch's threads).
    """

    def __init__(self, build: Callable[[int], MetaSpec], free: dict, *, meta_lr: float = 0.05,
                 optimizer: Optional[Callable] = None, checkpoint: Optional[str] = None, resume: bool = True,
                 seed0: int = 0, method: str = "exact", progress: bool = True, **hypergrad_options):
        if not isinstance(free, dict) or not free:
            raise TypeError("free must be a non-empty dict of name -> Tensor")
        for k, v in free.items():
            if not isinstance(v, torch.Tensor) or not v.requires_grad or not v.is_leaf:
                raise TypeError(f"free[{k!r}] must be a leaf Tensor with requires_grad=True")
        if isinstance(seed0, bool) or not hasattr(type(seed0), "__index__"):
            raise TypeError(f"seed0 must be an int, got {seed0!r}")
        seed0 = int(operator.index(seed0))  # a plain int (not e.g. numpy's): checkpoints hold Python scalars only
        self.build, self.free, self.method = build, free, method
        self.seed0, self.progress, self.options = seed0, progress, hypergrad_options
        self.opt = (optimizer or (lambda ps: torch.optim.Adam(ps, lr=meta_lr)))(list(free.values()))
        self.checkpoint = checkpoint
        self.iteration = 0
        self.records: list[dict] = []
        if checkpoint is not None:
            ckpt.remove_stale_temps(checkpoint)
            if resume and os.path.exists(checkpoint):
                self.load(checkpoint)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A sealed snapshot of the trainer (tensors copied, ``"sha256"`` set): what :meth:`save` writes."""
        return ckpt.seal({"version": CHECKPOINT_VERSION, "iteration": self.iteration, "seed0": self.seed0,
                          "free": {k: v.detach().clone() for k, v in self.free.items()},
                          "optimizer": _clone_tensors(self.opt.state_dict()),
                          "records": copy.deepcopy(self.records)})

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (a kill leaves the previous checkpoint or this one, never
        half of one; an exception leaves no temporary file)."""
        ckpt.write(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Continue from the checkpoint at ``path``: all or nothing.

        The file is read, its checksum verified and every field validated against this trainer before anything is
        changed; then free tensors and optimiser state are committed, and restored if that fails. On any error the
        free tensors, optimiser state, iteration, seed0 and records are exactly as before, and a problem with the
        file raises :class:`CheckpointError` naming the file and the field.
        """
        st = ckpt.read(path)
        ckpt.validate(st, path, free=self.free, optimizer=self.opt)
        free_before = {k: v.detach().clone() for k, v in self.free.items()}
        opt_before = _optimizer_snapshot(self.opt)
        try:
            self.opt.load_state_dict(st["optimizer"])
            with torch.no_grad():
                for k, v in st["free"].items():
                    self.free[k].copy_(v)
        except BaseException as e:
            vars(self.opt).clear()
            vars(self.opt).update(opt_before)
            with torch.no_grad():
                for k, v in free_before.items():
                    self.free[k].copy_(v)
            if isinstance(e, Exception):
                raise CheckpointError(f"{path}: committing the checkpoint to this trainer failed "
                                      f"({type(e).__name__}: {e}); nothing was loaded") from e
            raise
        self.iteration, self.seed0, self.records = st["iteration"], st["seed0"], st["records"]

    # --- the loop ------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One meta-iteration: hypergradient, optimiser step, record, checkpoint."""
        t0 = time.perf_counter()
        seed = self.seed0 + self.iteration
        with torch.enable_grad():
            spec = self.build(seed)
            if not isinstance(spec.schedules, dict) or not spec.schedules:
                raise TypeError("MetaSpec.schedules must be a non-empty dict of schedule name -> Tensor")
            res = hypergrad(spec.train_loss, spec.val_loss, {k: v.detach() for k, v in spec.params0.items()},
                            optimizer=spec.optimizer, **{k: v.detach() for k, v in spec.schedules.items()},
                            hypers={k: v.detach() for k, v in spec.hypers.items()}, method=self.method,
                            **self.options)
            outs = list(spec.schedules.values())
            grads = [res.grads[k] for k in spec.schedules]
            for k, v in spec.params0.items():
                outs.append(v)
                grads.append(res.grads["params0"][k])
            for k, v in spec.hypers.items():
                outs.append(v)
                grads.append(res.grads[k])
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            self.opt.zero_grad(set_to_none=False)
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
        rec = {"iteration": self.iteration, "seed": seed, "val_loss": res.val_loss,
               "hypergrad_norms": {k: float(v.grad.norm()) if v.grad is not None else 0.0
                                   for k, v in self.free.items()},
               "tape_bytes": int(res.stats.get("tape_bytes", 0)),
               "seconds_hypergrad": res.stats.get("seconds_forward", 0.0) + res.stats.get("seconds_reverse", 0.0)}
        with torch.no_grad():  # the final params' loss on the last step's minibatch (evaluate may refine it)
            T = next(iter(spec.schedules.values())).shape[0]
            rec["train_loss"] = float(spec.train_loss(res.params, {k: v.detach() for k, v in spec.hypers.items()},
                                                      T - 1))
        if spec.evaluate is not None:
            extra = {k: float(v) for k, v in spec.evaluate(res.params).items()}
            clash = sorted(k for k in extra if not isinstance(k, str) or k in ckpt.RECORD_RESERVED)
            if clash:
                raise ValueError(f"evaluate must return str-named metrics other than {sorted(ckpt.RECORD_RESERVED)}"
                                 f", got {clash}")
            rec.update(extra)
        self.opt.step()
        rec["seconds"] = time.perf_counter() - t0
        self.records.append(rec)
        self.iteration += 1
        if self.checkpoint is not None:
            self.save(self.checkpoint)
        return rec

    def run(self, iterations: int, callback: Optional[Callable[[dict], None]] = None) -> list:
        """Run until ``iterations`` meta-iterations are done in total (a resumed run continues the count)."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        bar = None
        if self.progress and self.iteration < iterations:
            from tqdm.auto import tqdm
            bar = tqdm(total=iterations, initial=self.iteration, desc="meta", unit="it")
        while self.iteration < iterations:
            rec = self.step()
            if bar is not None:
                bar.set_postfix(val_loss=f"{rec['val_loss']:.4f}")
                bar.update(1)
            if callback is not None:
                callback(rec)
        if bar is not None:
            bar.close()
        return self.records


def _clone_tensors(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every tensor cloned: a snapshot later steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _optimizer_snapshot(opt: torch.optim.Optimizer) -> dict:
    """The optimiser's attributes, with its state and parameter groups copied (parameters themselves shared), so
    that ``vars(opt).update(snapshot)`` undoes whatever ``load_state_dict`` rebound or changed in place."""
    snap = dict(vars(opt))
    snap["state"] = collections.defaultdict(dict, {p: _clone_tensors(s) for p, s in opt.state.items()})
    snap["param_groups"] = [{k: (list(v) if k == "params" else _clone_tensors(v)) for k, v in g.items()}
                            for g in opt.param_groups]
    return snap
