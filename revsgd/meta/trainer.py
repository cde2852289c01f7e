"""The meta loop: gradient-based hyperparameter optimisation with one :func:`revsgd.hypergrad` per meta-iteration.

You provide the free tensors (see :mod:`revsgd.meta.params`) and ``build(seed) -> MetaSpec``, which reads them and
returns the losses, params0, lr, momentum and hypers of one training run whose minibatches are drawn from
``seed`` (a fresh seed per meta-iteration). Each meta-iteration computes the exact hypergradient, carries it back
to the free tensors with torch autograd, takes one optimiser step (Adam by default), appends a record and writes
a checkpoint (free tensors + optimiser state + records, readable with ``torch.load(weights_only=True)``),
atomically, so a run killed at any moment resumes exactly where its last finished meta-iteration left it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..frontend.functional import hypergrad

CHECKPOINT_VERSION = 1


@dataclass
class MetaSpec:
    """One training run, as a differentiable function of the free tensors."""
    train_loss: Callable
    val_loss: Callable
    params0: dict
    lr: torch.Tensor
    momentum: torch.Tensor
    hypers: dict = field(default_factory=dict)
    evaluate: Optional[Callable[[dict], dict]] = None   # final params -> extra metrics (floats) for the record;
    # by default the record's "train_loss" is the final params' loss on the last step's minibatch


class MetaTrainer:
    """Optimise ``free`` tensors by hypergradient descent on the validation loss.

    Args:
        build: ``seed -> MetaSpec``; called once per meta-iteration with ``seed = seed0 + iteration``.
        free: dict name -> leaf Tensor (requires_grad) read by ``build``.
        optimizer: factory ``params -> torch.optim.Optimizer`` (default: Adam with ``meta_lr``).
        checkpoint: path of the checkpoint file; with ``resume=True`` an existing one is continued.
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
        self.build, self.free, self.method = build, free, method
        self.seed0, self.progress, self.options = seed0, progress, hypergrad_options
        self.opt = (optimizer or (lambda ps: torch.optim.Adam(ps, lr=meta_lr)))(list(free.values()))
        self.checkpoint = checkpoint
        self.iteration = 0
        self.records: list[dict] = []
        if checkpoint is not None and resume and os.path.exists(checkpoint):
            self.load(checkpoint)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "iteration": self.iteration, "seed0": self.seed0,
                "free": {k: v.detach().clone() for k, v in self.free.items()},
                "optimizer": self.opt.state_dict(), "records": self.records}

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or this one, never half of one

    def load(self, path: str) -> None:
        st = torch.load(path, weights_only=True)
        if st.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint version {st.get('version')!r}")
        if set(st["free"]) != set(self.free):
            raise ValueError(f"{path}: checkpoint holds free tensors {sorted(st['free'])}, "
                             f"this run has {sorted(self.free)}")
        for k, v in st["free"].items():
            if v.shape != self.free[k].shape:
                raise ValueError(f"{path}: free[{k!r}] has shape {tuple(v.shape)} in the checkpoint, "
                                 f"{tuple(self.free[k].shape)} here")
        with torch.no_grad():
            for k, v in st["free"].items():
                self.free[k].copy_(v)
        self.opt.load_state_dict(st["optimizer"])
        self.iteration, self.seed0, self.records = int(st["iteration"]), int(st["seed0"]), list(st["records"])

    # --- the loop ------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One meta-iteration: hypergradient, optimiser step, record, checkpoint."""
        t0 = time.perf_counter()
        seed = self.seed0 + self.iteration
        with torch.enable_grad():
            spec = self.build(seed)
            res = hypergrad(spec.train_loss, spec.val_loss, {k: v.detach() for k, v in spec.params0.items()},
                            lr=spec.lr.detach(), momentum=spec.momentum.detach(),
                            hypers={k: v.detach() for k, v in spec.hypers.items()}, method=self.method,
                            **self.options)
            outs, grads = [spec.lr, spec.momentum], [res.grads["lr"], res.grads["momentum"]]
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
            rec["train_loss"] = float(spec.train_loss(res.params, {k: v.detach() for k, v in spec.hypers.items()},
                                                      spec.lr.shape[0] - 1))
        if spec.evaluate is not None:
            rec.update({k: float(v) for k, v in spec.evaluate(res.params).items()})
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
