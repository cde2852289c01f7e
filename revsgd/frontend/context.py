"""``revsgd.reversible``: reversible training of an ``nn.Module`` from the user's own code.

::

    lr = torch.full((T,), 0.1, requires_grad=True)
    with revsgd.reversible(model, optimizer="sgd", lr=lr, momentum=0.9) as run:
        run.fit(lambda t: F.cross_entropy(model(x[idx(t)]), y[idx(t)]))    # T steps: the model now holds w_T
        model.eval()
        run.backward(F.cross_entropy(model(x_val), y_val))                  # the reverse pass: lr.grad, run.grads
    # the model keeps w_T, BatchNorm statistics and num_batches_tracked as plain training leaves them

Inside the block the model's parameters are views of revsgd's flat parameter buffer (its buffers are managed too);
the step function is called twice per step (forward and reverse pass, each time with the train/eval modes the
modules had when ``fit`` started) and must be a pure function of t — its
minibatch a function of t (:class:`revsgd.StepSampler`), its randomness seeded by t (automatic: torch's RNG is
seeded from (seed, t) around each call). Hyperparameters that should get a gradient are passed as ``hypers`` and
read inside the step function as ``run.hypers[name]``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch

from ..engine.buffers import KEY
from ..optim import ReversibleOptimizer
from .functional import _hyper_grads, _Run, _schedule_args
from .inputs import pinned_threads

StepLoss = Callable[[int], torch.Tensor]


class _Swap:
    """Module parameters replaced by given tensors (the originals put back on exit)."""

    def __init__(self, module: torch.nn.Module, tensors: dict):
        self.items = []
        for name, t in tensors.items():
            mod_name, _, attr = name.rpartition(".")
            sub = module.get_submodule(mod_name) if mod_name else module
            self.items.append((sub, attr, t))

    def __enter__(self):
        self.saved = [(sub, attr, sub._parameters[attr]) for sub, attr, _ in self.items]
        for sub, attr, t in self.items:
            sub._parameters[attr] = t
        return self

    def __exit__(self, *exc):
        for sub, attr, p in self.saved:
            sub._parameters[attr] = p


class Reversible:
    """See the module docstring. Created by :func:`reversible`; use it as a context manager."""

    def __init__(self, model: torch.nn.Module, optimizer, schedules: dict, steps, hypers, method, threads, seed,
                 progress, options):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"reversible() trains an nn.Module, got {type(model).__name__}; for dicts of tensors "
                            f"use revsgd.hypergrad or revsgd.unroll")
        self.model = model
        self._step: Optional[StepLoss] = None
        self._run = _Run(self._train_loss, self._val_loss, model, optimizer, steps, hypers, method, threads, seed,
                         progress, schedules, options)
        if method == "naive":
            raise ValueError("reversible() runs the engine's methods; method='naive' is available in "
                             "revsgd.hypergrad")
        self.grads: dict = {}
        self.val_loss: Optional[float] = None
        self.stats: dict = {}
        self._state = "new"

    # the engine calls these with the flat leaf's views; the user's step function uses the model itself
    def _train_loss(self, params: dict, hypers: dict, t: int):
        self._hypers = hypers
        modules = self._modules
        now = [m.training for m in modules]
        if now != self._modes:      # e.g. model.eval() for the validation loss before backward(): replay fit's modes
            for m, mode in zip(modules, self._modes):
                m.training = mode
        try:
            with _Swap(self.model, params):
                return self._step(t)
        finally:
            if now != self._modes:
                for m, mode in zip(modules, now):
                    m.training = mode

    def _val_loss(self, params: dict, hypers: dict):
        raise RuntimeError("unreachable: reversible() takes the validation loss through backward()")

    @property
    def hypers(self) -> dict:
        """The hyperparameters to read inside the step function (the engine's current copies)."""
        return self._hypers

    def __enter__(self) -> "Reversible":
        self._threads = pinned_threads(self._run.threads)
        k = self._threads.__enter__()
        self._prob = self._run.problem(k)
        self._hypers = self._prob.hypers
        self._state = "entered"
        return self

    def fit(self, step_loss: StepLoss) -> "Reversible":
        """Train T steps with ``step_loss(t)`` → scalar loss of step t computed with the model. Afterwards the model
        (inside the block) holds w_T and the validation loss can be computed with it."""
        if self._state != "entered":
            raise RuntimeError("fit() runs once, inside the with-block of revsgd.reversible(...)")
        if not callable(step_loss):
            raise TypeError("fit() takes a function t -> loss")
        self._step = step_loss
        self._modules = list(self.model.modules())
        self._modes = [m.training for m in self._modules]    # every step runs with these train/eval modes
        self._u = self._run.unroll(self._prob)
        self._R_T = self._u.forward()[1].get(KEY)
        self._state = "fitted"
        self._enter_val()
        return self

    def _enter_val(self) -> None:
        """The model as the validation loss should see it: parameters = w_T (views of the flat leaf), buffers R_T."""
        prob = self._prob
        self._val_stack = contextlib.ExitStack()
        self._val_stack.enter_context(_Swap(self.model, prob.views))
        self._R = None
        if prob.buffers is not None:
            self._R = self._R_T.to(self._run.params.dtype).requires_grad_()
            self._val_stack.enter_context(prob.eval_buffers(self._R))
        self._hypers = prob.leaves

    def backward(self, val: torch.Tensor) -> dict:
        """The reverse pass from a validation loss computed with the model after :meth:`fit`. Like
        ``val.backward()``, it carries the hypergradients into the schedule tensors and hypers that require grad
        (their ``.grad``, or further back through the graph that made them, e.g. ``log_lr`` in
        ``lr = log_lr.exp()``), and returns (and keeps in ``grads``) every hypergradient: schedules,
        "params0" (d val / d w_0, a dict), hypers."""
        if self._state != "fitted":
            raise RuntimeError("backward() needs a completed fit() inside the same with-block, and runs once")
        if not isinstance(val, torch.Tensor) or val.numel() != 1:
            raise TypeError("backward() takes the scalar validation loss tensor")
        prob = self._prob
        wrt = prob._lv + prob._req + ([self._R] if self._R is not None else [])
        out = torch.autograd.grad(val.reshape(()), wrt, allow_unused=True)
        if self._R is not None:
            prob.d_buffers = None if out[-1] is None else out[-1].to(torch.float64)
            out = out[:-1]
        n = len(prob._lv)
        dw = prob._flat(out[:n]).to(torch.float64)
        out = (None,) + tuple(out[n:])
        self.val_loss = float(val.detach())
        self._val_stack.close()
        res = self._u.reverse(dw, prob._per_hyper(out[1:]), overwrite=True)
        run = self._run
        grads = run.schedule_grads(res.grads)
        grads["params0"] = run.params.unflat(res.d_w0)
        grads.update(_hyper_grads(run, res.d_theta))
        pairs = [(t, grads[k]) for k, t in run.sched_tensors.items() if t.requires_grad]
        pairs += [(h, grads[k]) for k, h in run.hypers.items() if h.requires_grad and grads.get(k) is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype).to(t.device).reshape(t.shape)
                                                            for t, g in pairs])
        self.grads, self.stats = grads, res.stats
        self._state = "done"
        return grads

    def __exit__(self, *exc) -> None:
        try:
            if self._state == "fitted":
                self._val_stack.close()
            if self._state in ("fitted", "done"):
                self._run.finish(self._prob, self._u.wT, self._R_T)
            elif self._prob.binding is not None:
                self._prob.binding.close()
        finally:
            self._threads.__exit__(*exc)
            self._state = "closed"


def reversible(model: torch.nn.Module, *, optimizer: Union[str, ReversibleOptimizer] = "sgd", lr=None,
               momentum=None, dampening=None, weight_decay=None, betas=None, beta1=None, beta2=None, eps=None,
               steps: Optional[int] = None, hypers: Optional[dict] = None, method: str = "exact",
               threads: Optional[int] = None, seed: Optional[int] = 0, progress: bool = False,
               **options) -> Reversible:
    """Reversible training of ``model`` in a with-block (see :mod:`revsgd.frontend.context`); arguments as in
    :func:`revsgd.hypergrad`."""
    return Reversible(model, optimizer, _schedule_args(betas, dict(lr=lr, momentum=momentum, dampening=dampening,
                                                                   weight_decay=weight_decay, beta1=beta1,
                                                                   beta2=beta2, eps=eps)),
                      steps, hypers, method, threads, seed, progress, options)
