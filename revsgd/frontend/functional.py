"""The functional torch front end: :func:`hypergrad` (one call, one result, any method) and :func:`unroll` (the
final params as tensors whose backward pass is the reverse sweep, for other people's training code)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..engine import ENGINE_METHODS, METHODS, Unroll
from ..core.fixed import NonFiniteError
from ..engine.buffers import KEY
from ..kernels import warm_up
from ..optim import ReversibleOptimizer, Schedules, get_optimizer
from .inputs import Params, as_hypers, as_params, as_schedules, pinned_threads
from .problem import TorchProblem, TrainLoss, ValLoss, scalar

_METHOD_OPTIONS = {"exact": {"backend", "frac_bits", "tape_dir", "spill_block_bytes"},
                   "checkpoint": {"checkpoint_every"}, "truncated": {"truncate"},
                   "replay": {"replay_k"}}


@dataclass
class HypergradResult:
    """What :func:`hypergrad` returns; the same type for every method."""
    val_loss: float
    params: dict                     # final params w_T, detached, dtype of params0
    grads: dict                      # one entry per schedule ("lr", "momentum", …), "params0" (dict), and per hyper
    stats: dict = field(default_factory=dict)


def _split_options(method: str, options: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    own = _METHOD_OPTIONS.get(method, set())
    for k in options:
        owner = next((m for m, s in _METHOD_OPTIONS.items() if k in s), None)
        if owner is None:
            raise TypeError(f"unknown option {k!r}")
        if k not in own:
            raise TypeError(f"option {k!r} belongs to method {owner!r}, not {method!r}")
    return {k: v for k, v in options.items() if k != "frac_bits"}


def _schedule_args(betas, kwargs: dict) -> dict:
    if betas is not None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for k, v in zip(("beta1", "beta2"), betas):
            if kwargs.get(k) is not None:
                raise TypeError(f"give {k} either in betas or as {k}=, not both")
            kwargs[k] = v
    return {k: v for k, v in kwargs.items() if v is not None}


class _Run:
    """Everything one call sets up: optimiser, params, hypers, schedules, problem, engine."""

    def __init__(self, train_loss, val_loss, params0, optimizer, steps, hypers, method, threads, seed,
                 progress, schedules: dict, options: dict):
        self.method = method
        self.opt = get_optimizer(optimizer, options.get("frac_bits"))
        for k in [k for k in options if k in self.opt.schedule_names]:   # a custom optimiser's own schedules
            schedules[k] = options.pop(k)
        engine_opts = _split_options(method, options)
        self.params = as_params(params0)
        self.hypers = as_hypers(hypers, self.params)
        clash = set(self.hypers) & (set(self.opt.schedule_names) | {"params0"})
        if clash:
            raise ValueError(f"hyper name(s) {sorted(clash)} clash with the result's gradient keys; rename them")
        G = len(self.params.names)
        self.sched, self.sched_tensors = as_schedules(self.opt, schedules, steps, G)
        self.T = next(iter(self.sched.values())).shape[0]
        if method == "exact":   # a compiled backend's first launch may reset OpenMP's thread count: before pinning
            warm_up(engine_opts.get("backend"))
        self.threads = threads
        self.seed = seed
        self.progress = progress
        self.engine_opts = engine_opts
        self.train_loss, self.val_loss = train_loss, val_loss

    def problem(self, k: int) -> TorchProblem:
        return TorchProblem(self.train_loss, self.val_loss, self.params, self.hypers, k, self.seed, self.T)

    def finish(self, prob: TorchProblem, wT: torch.Tensor, R_T: Optional[torch.Tensor]) -> None:
        """A module is left as plain training leaves it: parameters w_T, buffers R_T, num_batches_tracked + T."""
        if self.params.module is None:
            return
        with torch.no_grad():
            for v, p in zip(self.params.unflat(wT).values(), _originals(self.params.module, self.params)):
                p.copy_(v)
        if prob.buffers is not None:
            prob.binding.finalize(R_T, self.T)

    def unroll(self, prob: TorchProblem, **extra) -> Unroll:
        sizes = self.params.sizes if any(a.ndim == 2 for a in self.sched.values()) else None
        return Unroll(prob, self.opt, self.sched, self.params.flat(), sizes=sizes, method=self.method,
                      progress=self.progress, **self.engine_opts, **extra)

    def schedule_grads(self, grads: dict) -> dict:
        """Engine gradients (float64, (T,) or (T, G)) as tensors like the schedules the user passed."""
        out = {}
        for k, g in grads.items():
            like = self.sched_tensors.get(k)
            out[k] = g.detach().to(like.dtype).to(like.device).reshape(like.shape) if like is not None and \
                like.dim() == g.dim() else g.detach().cpu()
        return out


def hypergrad(train_loss: TrainLoss, val_loss: ValLoss, params0, *, optimizer: Union[str, ReversibleOptimizer] = "sgd",
              lr=None, momentum=None, dampening=None, weight_decay=None, betas=None, beta1=None, beta2=None, eps=None,
              steps: Optional[int] = None, hypers: Optional[dict] = None, method: str = "exact",
              threads: Optional[int] = None, seed: Optional[int] = 0, progress: bool = False,
              **options) -> HypergradResult:
    """The gradient of ``val_loss(w_T, hypers)`` with respect to the optimiser's schedules, params0 and hypers,
    through T training steps of ``optimizer`` on ``train_loss``.

    Args:
        train_loss: ``(params, hypers, t) -> scalar Tensor``: deterministic in (params, hypers, t) — its minibatch a
            pure function of t (e.g. :class:`revsgd.StepSampler`); torch's RNG is seeded from (seed, t) for it.
        val_loss: ``(params, hypers) -> scalar Tensor``.
        params0: the initial weights: a dict name → Tensor, a list of Tensors, or an ``nn.Module`` (its trainable
            parameters). One float dtype, one device. The losses receive a dict of tensors with those names.
        optimizer: ``"sgd"`` (torch.optim.SGD: lr, momentum, dampening, weight_decay), ``"nesterov"``, ``"adam"``,
            ``"adamw"`` (lr, betas, eps, weight_decay), ``"heavyball"`` (the 2015 paper's v ← γv − (1−γ)g,
            w ← w + αv: lr, momentum), or a :class:`revsgd.optim.ReversibleOptimizer`.
        lr, momentum, dampening, weight_decay, betas / beta1, beta2, eps: schedules — a number (with ``steps``), a
            Tensor (T,) (one value per step) or (T, len(params0)) (per step and parameter tensor).
        steps: T, needed when every schedule is a number.
        hypers: dict name → Tensor or number of anything else the losses read that should get a hypergradient.
        method: ``"exact"`` (default: reversed bit for bit), ``"naive"``, ``"trajectory"``, ``"checkpoint"``,
            ``"replay"``, ``"drmad"`` or ``"truncated"`` (see README).
        threads: torch threads pinned for the run (default 1; float sums depend on the count).
        seed: seed of the per-step RNG (None: leave torch's RNG alone; the loss must then be deterministic).
        options: exact: ``frac_bits`` (int or dict per state), ``backend``, ``tape_dir`` (the tapes' word stacks
            spill to files there) and ``spill_block_bytes``; checkpoint: ``checkpoint_every``; replay: ``replay_k``;
            truncated: ``truncate``.

    Returns:
        :class:`HypergradResult` (``val_loss``, final ``params``, ``grads`` — schedules, "params0", hypers — ``stats``).

    Raises:
        ReversalError: (exact) the reverse pass did not retrace the forward pass bit for bit.
    """
    run = _Run(train_loss, val_loss, params0, optimizer, steps, hypers, method, threads, seed, progress,
               _schedule_args(betas, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                          beta1=beta1, beta2=beta2, eps=eps)), options)
    with pinned_threads(threads) as k:
        prob = run.problem(k)
        try:
            if method == "naive":
                return _naive(run, prob)
            u = run.unroll(prob)
            R_T = u.forward()[1].get(KEY)     # w_T stays in u.wT (params' dtype), nothing float64 is kept
            if R_T is not None:
                prob.set_buffers(R_T)
            f, dw, dth = prob.val()
            out = u.reverse(dw, dth, overwrite=True)
            run.finish(prob, u.wT, R_T)
        finally:
            prob.close()
    grads = run.schedule_grads(out.grads)
    grads["params0"] = run.params.unflat(out.d_w0)
    grads.update(_hyper_grads(run, out.d_theta))
    out.stats["threads"] = k
    return HypergradResult(f, run.params.unflat(u.wT), grads, out.stats)


def _hyper_grads(run: _Run, d_theta: list) -> dict:
    return {k: (torch.zeros_like(v, dtype=torch.float64) if d is None else d).to(v.dtype).reshape(v.shape)
            if v.is_floating_point() else None for (k, v), d in zip(run.hypers.items(), d_theta)}


def _naive(run: _Run, prob: TorchProblem) -> HypergradResult:
    """Autograd through the whole unroll with the optimiser's float step, as higher/torchopt do: memory grows with T."""
    t0 = time.perf_counter()
    opt, P = run.opt, run.params
    sch = Schedules(run.sched, P.sizes, P.device)
    opt.prepare(sch, exact=False)
    with torch.enable_grad():
        leaves = {k: torch.from_numpy(v).to(P.device).requires_grad_() for k, v in run.sched.items()}
        der = opt.derived(leaves)
        w0 = P.flat().to(P.device).requires_grad_()
        w, st = w0, opt.float_init(w0)
        R = None if prob.buffers is None else prob.buffers.R0
        gid = sch._gid
        it = range(run.T)
        if run.progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="naive forward", leave=False)
        for t in it:
            hp = {k: (v[t] if v.dim() == 1 else v[t][gid]) for k, v in {**leaves, **der}.items()}
            wm = w.to(P.dtype)
            prob.views = P.views(wm)
            loss, u = prob._loss(prob.leaves, t)
            if not math.isfinite(loss.item()):
                raise NonFiniteError(f"at step {t}: train_loss returned a non-finite value ({loss.item()})")
            g, = torch.autograd.grad(loss, wm, create_graph=True, allow_unused=True)
            g = torch.zeros_like(w) if g is None else g.to(torch.float64)
            w, st = opt.float_step(w, st, g, hp, t)
            if R is not None:
                R = prob.buffers.float_step(R, u)
        t1 = time.perf_counter()
        prob.views = P.views(w.to(P.dtype))
        with prob.eval_buffers(None if R is None else R.to(P.dtype)):
            f = scalar(run.val_loss(prob.views, prob.leaves), "val_loss")
        f_report = f.item()
        if not math.isfinite(f_report):
            raise ValueError(f"val_loss returned a non-finite value: {f_report}")
        wrt = list(leaves.values()) + [w0] + prob._req
        out = torch.autograd.grad(f, wrt, allow_unused=True)
    t2 = time.perf_counter()
    n = len(leaves)
    z = lambda x, like: torch.zeros_like(like) if x is None else x  # noqa: E731
    grads = run.schedule_grads({k: z(d, leaves[k]) for k, d in zip(leaves, out[:n])})
    grads["params0"] = P.unflat(z(out[n], w0))
    grads.update(_hyper_grads(run, prob._per_hyper(out[n + 1:])))
    run.finish(prob, w.detach(), None if R is None else R.detach())
    stats = {"method": "naive", "optimizer": opt.name, "steps": run.T, "lanes": P.size, "seconds_forward": t1 - t0,
             "seconds_reverse": t2 - t1, "tape_bytes": 0, "info_bits": 0, "storage_bytes": 0,
             "threads": prob.threads}
    return HypergradResult(f_report, P.unflat(w.detach()), grads, stats)


class _UnrollFunction(torch.autograd.Function):
    """Forward: T training steps. Backward: the reverse sweep from the incoming ∂/∂w_T."""

    @staticmethod
    def forward(ctx, run, *inputs):
        ctx.run = run
        ctx.save_for_backward(*inputs)   # torch then refuses a backward after any of them changed in place
        with pinned_threads(run.k):
            run.u.forward()
        return tuple(run.params.unflat(run.u.wT).values())

    @staticmethod
    def backward(ctx, *grad_out):
        run = ctx.run
        ctx.saved_tensors  # noqa: B018 - triggers torch's check for in-place modification of the inputs
        P = run.params
        with pinned_threads(run.k):
            if not run.u.forward_done:   # a second backward: replay the (deterministic) forward first
                run.u.forward()
            dw = torch.cat([(torch.zeros(s, dtype=torch.float64, device=P.device) if g is None else
                             g.reshape(-1).to(torch.float64)) for g, s in zip(grad_out, P.sizes)])
            out = run.u.reverse(dw, overwrite=True)
        run.stats = out.stats
        sg = run.schedule_grads(out.grads)
        d_sched = [sg[k] for k in run.sched_inputs]
        d_params = [v for v in P.unflat(out.d_w0).values()]
        d_hyp = list(_hyper_grads(run, out.d_theta).values())
        return (None, *d_sched, *d_params, *d_hyp)


def unroll(train_loss: TrainLoss, params0, *, optimizer: Union[str, ReversibleOptimizer] = "sgd", lr=None,
           momentum=None, dampening=None, weight_decay=None, betas=None, beta1=None, beta2=None, eps=None,
           steps: Optional[int] = None, hypers: Optional[dict] = None, method: str = "exact",
           threads: Optional[int] = None, seed: Optional[int] = 0, progress: bool = False, **options) -> dict:
    """The params after T optimiser steps, as tensors differentiable with respect to ``params0``, the schedules
    given as tensors and ``hypers`` — a backend for other people's training code::

        final = revsgd.unroll(train_loss, params0, optimizer="sgd", lr=lr, momentum=momentum)
        val_loss(final).backward()          # runs the reversible pass; fills lr.grad, params0[k].grad, ...

    The backward pass runs training backwards (``method="exact"``, no trajectory stored) and may be called again
    (the forward is replayed first). Schedules and hypers are copied when ``unroll`` is called; modifying one in
    place before ``backward`` raises torch's error for a modified saved tensor. Arguments as in :func:`hypergrad`
    (every method but "naive").
    """
    if method not in ENGINE_METHODS:
        raise ValueError(f"unroll supports methods {ENGINE_METHODS}, got {method!r}")
    run = _Run(train_loss, None, params0, optimizer, steps, hypers, method, threads, seed, progress,
               _schedule_args(betas, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                          beta1=beta1, beta2=beta2, eps=eps)), options)
    with pinned_threads(threads) as k:
        prob = run.problem(k)
    if prob.buffers is not None:
        prob.close()
        raise ValueError("unroll returns only the params, so a validation loss cannot see (nor differentiate) "
                         "BatchNorm's running statistics at step T: use revsgd.hypergrad or revsgd.reversible for "
                         "modules with BatchNorm")
    run.k, run.u = k, run.unroll(prob)
    run.sched_inputs = list(run.sched_tensors)
    inputs = [*run.sched_tensors.values(), *_originals(params0, run.params), *run.hypers.values()]
    outs = _UnrollFunction.apply(run, *inputs)
    return dict(zip(run.params.names, outs))


def _originals(params0, params: Params) -> list:
    """The user's own param tensors (so gradients reach them), in the order of ``params.names``."""
    if isinstance(params0, torch.nn.Module):
        named = dict(params0.named_parameters())
        return [named[k] for k in params.names]
    if isinstance(params0, (list, tuple)):
        return list(params0)
    return [params0[k] for k in params.names]
