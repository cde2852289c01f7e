"""Torch front end of the unroll engine: :func:`hypergrad` and the differentiable :func:`unroll`.

Losses are functional: ``train_loss(params, hypers, t) -> scalar`` (its minibatch a pure function of t) and
``val_loss(params, hypers) -> scalar``, with ``params``/``hypers`` dicts of tensors. For an ``nn.Module`` use
``torch.func.functional_call(model, params, (x,))`` inside the loss. Params keep their dtype (float32 or float64)
inside the losses; the optimiser state is float64 (``exact``: int64 fixed point) whatever the model dtype.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from ..engine import ENGINE_METHODS, METHODS, REVERSAL_HINT, ReversalError, Unroll
from ..core.fixed import GAMMA_ONE, quantize_momentum
from ..kernels import warm_up

TensorDict = Mapping[str, torch.Tensor]
TrainLoss = Callable[[dict, dict, int], torch.Tensor]
ValLoss = Callable[[dict, dict], torch.Tensor]

_OPTIONS = {
    "exact": {"frac_bits", "backend", "threads", "progress"},
    "naive": {"threads", "progress"},
    "trajectory": {"threads", "progress"},
    "checkpoint": {"checkpoint_every", "threads", "progress"},
    "drmad": {"threads", "progress"},
    "truncated": {"truncate", "threads", "progress"},
}


@dataclass
class HypergradResult:
    """What :func:`hypergrad` returns; the same type for every method."""
    val_loss: float
    params: dict                     # final params w_T, detached, dtype of params0
    grads: dict                      # "lr", "momentum", "params0" (dict), and one entry per hyper name
    stats: dict = field(default_factory=dict)


@contextlib.contextmanager
def pinned_threads(k: Optional[int]):
    """Fix torch's intra-op thread count for a whole forward + reverse run (float sums depend on it)."""
    old = torch.get_num_threads()
    k = old if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"threads must be a positive int, got {k!r}")
    torch.set_num_threads(k)
    try:
        yield k
    finally:
        torch.set_num_threads(old)


class _Layout:
    """Flattening of a dict of tensors into one float64 vector (dict order), and back."""

    def __init__(self, tensors: TensorDict, what: str, need_float: bool = True):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{what} must be a dict of name -> Tensor, got {type(tensors).__name__}")
        self.names = list(tensors)
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{what}[{k!r}] must be a Tensor, got {type(v).__name__}")
            if need_float and v.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{what}[{k!r}] must be float32 or float64, got {v.dtype}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{what}[{k!r}] holds NaN or inf")
        self.shapes = [tensors[k].shape for k in self.names]
        self.dtypes = [tensors[k].dtype for k in self.names]
        self.sizes = [int(tensors[k].numel()) for k in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.size = int(self.offsets[-1])

    def flat(self, tensors) -> np.ndarray:
        out = np.zeros(self.size, dtype=np.float64)
        for i, t in enumerate(tensors):
            if t is not None:
                out[self.offsets[i]:self.offsets[i + 1]] = t.detach().reshape(-1).to(torch.float64).numpy()
        return out

    def unflat(self, x: np.ndarray, requires_grad: bool) -> dict:
        xt = torch.from_numpy(x)
        out = {}
        for i, k in enumerate(self.names):
            p = xt[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i]).to(self.dtypes[i]).detach()
            out[k] = p.requires_grad_(requires_grad)
        return out


def _scalar(loss, what: str, t: Optional[int] = None) -> torch.Tensor:
    where = f" at step {t}" if t is not None else ""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a Tensor{where}, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(f"{what} must return a scalar Tensor{where}, got shape {tuple(loss.shape)}")
    loss = loss.reshape(())
    if not math.isfinite(loss.item()):
        raise ValueError(f"{what} returned a non-finite value{where}: {loss.item()}")
    return loss


class _TorchProblem:
    """The NumPy-level callbacks of :mod:`revsgd.engine`, built from torch losses."""

    def __init__(self, train_loss: TrainLoss, val_loss: Optional[ValLoss], params0: TensorDict,
                 hypers: TensorDict, threads: int):
        self.train_loss, self.val_loss, self.threads = train_loss, val_loss, threads
        self.P = _Layout(params0, "params0")
        self.H = _Layout(hypers, "hypers", need_float=False)
        self.hypers = {k: v.detach() for k, v in hypers.items()}
        self.hyper_leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point() or v.is_complex())
                             for k, v in hypers.items()}

    def theta(self, grads) -> np.ndarray:
        """Flat ∂/∂θ from autograd's outputs for the hyper leaves that require grad (zeros for the others)."""
        it = iter(grads)
        return self.H.flat([next(it) if h.requires_grad else None for h in self.hyper_leaves.values()])

    def _check_threads(self):
        if torch.get_num_threads() != self.threads:
            raise ReversalError(f"torch's thread count changed during the run ({self.threads} -> "
                                f"{torch.get_num_threads()}). " + REVERSAL_HINT)

    def grad(self, w: np.ndarray, t: int) -> np.ndarray:
        self._check_threads()
        with torch.enable_grad():
            ps = self.P.unflat(w, True)
            loss = _scalar(self.train_loss(ps, self.hypers, t), "train_loss", t)
            gs = torch.autograd.grad(loss, list(ps.values()), allow_unused=True)
        return self.P.flat(gs)

    def grad_vjp(self, w: np.ndarray, t: int):
        self._check_threads()
        with torch.enable_grad():
            ps = self.P.unflat(w, True)
            hs = self.hyper_leaves
            loss = _scalar(self.train_loss(ps, hs, t), "train_loss", t)
            gs = torch.autograd.grad(loss, list(ps.values()), create_graph=True, allow_unused=True)
        g = self.P.flat(gs)
        wrt = list(ps.values()) + [h for h in hs.values() if h.requires_grad]

        def vjp(u: np.ndarray):  # (∇_w (g·u), ∂_θ (g·u)): one backward pass through the gradient's graph
            pairs = [(gi, ui) for gi, ui in zip(gs, self.P.unflat(u, False).values())
                     if gi is not None and gi.requires_grad]
            if not pairs:
                return np.zeros_like(u), None
            with torch.enable_grad():
                out = torch.autograd.grad([gi for gi, _ in pairs], wrt, grad_outputs=[ui for _, ui in pairs],
                                          allow_unused=True)
            return self.P.flat(out[:len(ps)]), self.theta(out[len(ps):])
        return g, vjp

    def val(self, w: np.ndarray):
        with torch.enable_grad():
            ps = self.P.unflat(w, True)
            hs = self.hyper_leaves
            f = _scalar(self.val_loss(ps, hs), "val_loss")
            wrt = list(ps.values()) + [h for h in hs.values() if h.requires_grad]
            out = torch.autograd.grad(f, wrt, allow_unused=True)
        return f.item(), self.P.flat(out[:len(ps)]), self.theta(out[len(ps):])


def _schedules(lr, momentum, P: _Layout):
    for name, x in (("lr", lr), ("momentum", momentum)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor of shape (T,) or (T, {len(P.names)}), "
                            f"got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float Tensor, got {x.dtype}")
        if x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[1] != len(P.names)):
            raise ValueError(f"{name} must have shape (T,) or (T, {len(P.names)}) (one column per entry of "
                             f"params0), got {tuple(x.shape)}")
    if lr.shape[0] == 0:
        raise ValueError("lr has no steps (T = 0)")
    if momentum.shape[0] != lr.shape[0]:
        raise ValueError(f"lr has T = {lr.shape[0]} steps but momentum has {momentum.shape[0]}")
    lr_np = lr.detach().to(torch.float64).numpy()
    if not np.all(np.isfinite(lr_np)):
        raise ValueError("lr holds NaN or inf")
    n = quantize_momentum(momentum.detach().to(torch.float64).numpy())
    return lr_np, n


def _check_options(method: str, options: dict):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for method {method!r}; "
                        f"it takes {sorted(_OPTIONS[method])}")


def _to_like(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(like.dtype).reshape(like.shape)


def _unflat_like(P: _Layout, x: np.ndarray) -> dict:
    return {k: v.clone() for k, v in P.unflat(np.array(x, dtype=np.float64), False).items()}


def hypergrad(train_loss: TrainLoss, val_loss: ValLoss, params0: TensorDict, *, lr: torch.Tensor,
              momentum: torch.Tensor, hypers: Optional[TensorDict] = None, method: str = "exact",
              **options) -> HypergradResult:
    """Gradient of ``val_loss(w_T, hypers)`` with respect to lr, momentum, params0 and hypers, through T steps of

        v_{t+1} = γ_t v_t − (1 − γ_t) ∇_w train_loss(w_t, hypers, t),   w_{t+1} = w_t + lr_t v_{t+1},   v_0 = 0

    with γ_t = momentum_t quantised to n/65536 (see :func:`revsgd.quantize_momentum`) for every method.

    Args:
        train_loss: ``(params, hypers, t) -> scalar Tensor``; deterministic in (params, hypers, t).
        val_loss: ``(params, hypers) -> scalar Tensor``.
        params0: dict name -> float32/float64 Tensor (any shapes): the initial weights w_0.
        lr, momentum: Tensor (T,) — one value per step — or (T, len(params0)) — per step and per entry of params0.
        hypers: dict name -> Tensor of anything else the losses read that should get a hypergradient.
        method: "exact" (default), "naive", "trajectory", "checkpoint", "drmad" or "truncated".
        options: ``threads`` (torch threads pinned for the run; default: the current count), ``progress``;
            exact: ``frac_bits`` (52), ``backend``; checkpoint: ``checkpoint_every`` (√T);
            truncated: ``truncate`` (T/10).

    Returns:
        :class:`HypergradResult` with ``val_loss``, final ``params``, ``grads`` ({"lr", "momentum", "params0",
        *hyper names}; "momentum" is the derivative with respect to the quantised γ) and ``stats``.

    Raises:
        ReversalError: (exact) the reverse pass did not retrace the forward pass bit for bit.
    """
    _check_options(method, options)
    hypers = {} if hypers is None else hypers
    threads = options.pop("threads", None)
    if method == "exact":  # a compiled backend's first launch may reset OpenMP's thread count: before pinning
        warm_up(options.get("backend"))
    with pinned_threads(threads) as k:
        prob = _TorchProblem(train_loss, val_loss, params0, hypers, k)
        lr_np, n = _schedules(lr, momentum, prob.P)
        if method == "naive":
            return _naive(prob, lr, momentum, n, params0, hypers, options.get("progress", False))
        res = Unroll(prob.grad, prob.grad_vjp, prob.P.flat(params0.values()), lr_np, n, offsets=prob.P.offsets,
                     num_hypers=prob.H.size, method=method, **options)
        wT, _ = res.forward()
        f, dw, dth = prob.val(wT)
        out = res.reverse(dw, dth)
    grads = {"lr": _to_like(out.d_lr, lr), "momentum": _to_like(out.d_gamma, momentum),
             "params0": _unflat_like(prob.P, out.d_w0)}
    grads.update(_hyper_grads(prob, out.d_theta))
    out.stats["threads"] = k
    return HypergradResult(f, _unflat_like(prob.P, wT), grads, out.stats)


def _hyper_grads(prob: _TorchProblem, d_theta: np.ndarray) -> dict:
    H = prob.H
    return {k: _to_like(d_theta[H.offsets[i]:H.offsets[i + 1]], prob.hypers[k]) for i, k in enumerate(H.names)}


def _naive(prob: _TorchProblem, lr, momentum, n, params0, hypers, progress) -> HypergradResult:
    """Autograd through the whole unroll, as higher/torchopt do: memory grows with T."""
    import time
    t0 = time.perf_counter()
    P = prob.P
    with torch.enable_grad():
        lr_l = lr.detach().to(torch.float64).requires_grad_()
        mom = momentum.detach().to(torch.float64).requires_grad_()
        gam = mom + (torch.from_numpy(n / GAMMA_ONE) - mom).detach()  # quantised value, straight-through gradient
        w0 = torch.from_numpy(P.flat(params0.values())).requires_grad_()
        hs = prob.hyper_leaves
        group = torch.repeat_interleave(torch.arange(len(P.names)), torch.tensor(P.sizes))
        w, v = w0, torch.zeros_like(w0)
        T = lr.shape[0]
        it = range(T)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="naive forward", leave=False)
        for t in it:
            ps = {k: w[P.offsets[i]:P.offsets[i + 1]].view(P.shapes[i]).to(P.dtypes[i])
                  for i, k in enumerate(P.names)}
            loss = _scalar(prob.train_loss(ps, hs, t), "train_loss", t)
            gs = torch.autograd.grad(loss, list(ps.values()), create_graph=True, allow_unused=True)
            g = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                           for gi, p in zip(gs, ps.values())])
            a = lr_l[t] if lr_l.dim() == 1 else lr_l[t][group]
            gm = gam[t] if gam.dim() == 1 else gam[t][group]
            v = gm * v - (1.0 - gm) * g
            w = w + a * v
        t1 = time.perf_counter()
        ps = {k: w[P.offsets[i]:P.offsets[i + 1]].view(P.shapes[i]).to(P.dtypes[i]) for i, k in enumerate(P.names)}
        f = _scalar(prob.val_loss(ps, hs), "val_loss")
        h_req = [h for h in hs.values() if h.requires_grad]
        out = torch.autograd.grad(f, [lr_l, mom, w0] + h_req, allow_unused=True)
    t2 = time.perf_counter()
    z = lambda x, like: torch.zeros_like(like) if x is None else x  # noqa: E731
    grads = {"lr": z(out[0], lr_l).to(lr.dtype), "momentum": z(out[1], mom).to(momentum.dtype),
             "params0": _unflat_like(P, z(out[2], w0).detach().numpy())}
    grads.update(_hyper_grads(prob, prob.theta(out[3:])))
    stats = {"method": "naive", "steps": T, "lanes": P.size, "seconds_forward": t1 - t0,
             "seconds_reverse": t2 - t1, "tape_bytes": 0, "info_bits": 0.0, "storage_bytes": 0,
             "threads": prob.threads}
    return HypergradResult(f.item(), _unflat_like(P, w.detach().numpy()), grads, stats)


class _UnrollFunction(torch.autograd.Function):
    """Forward: T training steps. Backward: the reverse sweep from the incoming ∂/∂w_T."""

    @staticmethod
    def forward(ctx, run, lr, momentum, *tensors):
        ctx.run = run
        with pinned_threads(run.threads):
            wT, _ = run.unroll.forward()
        return tuple(_unflat_like(run.prob.P, wT).values())

    @staticmethod
    def backward(ctx, *grad_out):
        run = ctx.run
        with pinned_threads(run.threads):
            if not run.unroll.forward_done:   # a second backward: replay the (deterministic) forward first
                run.unroll.forward()
            out = run.unroll.reverse(run.prob.P.flat(grad_out))
        P, H = run.prob.P, run.prob.H
        d_params = [torch.from_numpy(out.d_w0[P.offsets[i]:P.offsets[i + 1]].copy()).view(P.shapes[i])
                    .to(P.dtypes[i]) for i in range(len(P.names))]
        d_hypers = [torch.from_numpy(out.d_theta[H.offsets[i]:H.offsets[i + 1]].copy()).view(H.shapes[i])
                    .to(H.dtypes[i]) if H.dtypes[i].is_floating_point else None for i in range(len(H.names))]
        run.stats = out.stats
        return (None, _to_like(out.d_lr, run.lr), _to_like(out.d_gamma, run.momentum), *d_params, *d_hypers)


class _UnrollRun:
    def __init__(self, prob, unroll, threads, lr, momentum):
        self.prob, self.unroll, self.threads, self.lr, self.momentum = prob, unroll, threads, lr, momentum
        self.stats: dict = {}


def unroll(train_loss: TrainLoss, params0: TensorDict, *, lr: torch.Tensor, momentum: torch.Tensor,
           hypers: Optional[TensorDict] = None, method: str = "exact", **options) -> dict:
    """The params after T momentum-SGD steps, as tensors differentiable with respect to ``params0``, ``lr``,
    ``momentum`` and ``hypers`` — a backend for other people's training code::

        final = revsgd.unroll(train_loss, params0, lr=lr, momentum=momentum, hypers=hypers)
        val_loss(final).backward()          # runs the reversible pass; fills lr.grad, params0[k].grad, ...

    The backward pass runs training backwards (``method="exact"``, no trajectory stored); ``backward`` may be
    called again (the forward is replayed first). Arguments and options as in :func:`hypergrad` (no "naive").
    """
    _check_options(method, options)
    if method not in ENGINE_METHODS:
        raise ValueError(f"unroll supports methods {ENGINE_METHODS}, got {method!r}")
    hypers = {} if hypers is None else hypers
    threads = options.pop("threads", None)
    if method == "exact":
        warm_up(options.get("backend"))
    with pinned_threads(threads) as k:
        prob = _TorchProblem(train_loss, None, params0, hypers, k)
        lr_np, n = _schedules(lr, momentum, prob.P)
    u = Unroll(prob.grad, prob.grad_vjp, prob.P.flat(params0.values()), lr_np, n, offsets=prob.P.offsets,
               num_hypers=prob.H.size, method=method, **options)
    run = _UnrollRun(prob, u, k, lr, momentum)
    outs = _UnrollFunction.apply(run, lr, momentum, *params0.values(), *hypers.values())
    return dict(zip(prob.P.names, outs))
