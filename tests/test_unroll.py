"""Tests of the unroll layer (DESIGN.md §4-§6): ``revsgd.hypergrad``, ``revsgd.unroll`` and ``revsgd.hypergrad_numpy``.

Every method must compute the same function (γ quantised to n/65536 everywhere), so:

- ``exact`` (reversed fixed point) agrees with ``naive`` (autograd through the unroll) to ~1e-8 relative, and the
  float64 methods ``naive`` / ``trajectory`` / ``checkpoint`` agree with each other to ~1e-12;
- central finite differences of a plain float64 momentum-SGD unroll written here confirm the exact hypergradient;
- ``truncated`` with K >= T is ``exact``; with small K it is ``exact`` on the last K steps and zero before;
- a non-deterministic training loss is a ``ReversalError``, never a silently wrong hypergradient;
- bad input is a clear error of the right type.

The model is a small float64 5-8-3 tanh MLP whose minibatch is a pure function of t.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import revsgd
from revsgd import ReversalError

D_IN, HID, D_OUT = 5, 8, 3
N_TRAIN, N_VAL, BATCH = 48, 32, 12
T = 30
NAMES = ("W0", "b0", "W1", "b1")


# --- the problem ---------------------------------------------------------------------------------------------
def _data(dtype):
    g = torch.Generator().manual_seed(1234)
    xt = torch.randn(N_TRAIN, D_IN, generator=g, dtype=torch.float64)
    yt = torch.randint(0, D_OUT, (N_TRAIN,), generator=g)
    xv = torch.randn(N_VAL, D_IN, generator=g, dtype=torch.float64)
    yv = torch.randint(0, D_OUT, (N_VAL,), generator=g)
    return xt.to(dtype), yt, xv.to(dtype), yv


# minibatch t: a pure function of (seed, t)
_BATCHES = [torch.from_numpy(np.random.default_rng([7, t]).choice(N_TRAIN, BATCH, replace=False))
            for t in range(200)]


def _mlp(p, x):
    return torch.tanh(x @ p["W0"] + p["b0"]) @ p["W1"] + p["b1"]


def make_problem(dtype=torch.float64):
    """(train_loss, val_loss, params0, hypers): cross-entropy + l2·Σ‖W‖² + Σ pw ⊙ W0² (pw shaped like W0)."""
    xt, yt, xv, yv = _data(dtype)

    def train_loss(p, h, t):
        i = _BATCHES[t]
        ce = F.cross_entropy(_mlp(p, xt[i]), yt[i])
        reg = h["l2"] * ((p["W0"] ** 2).sum() + (p["W1"] ** 2).sum())
        return ce + reg + (h["pw"] * p["W0"] ** 2).sum()

    def val_loss(p, h):
        return F.cross_entropy(_mlp(p, xv), yv)

    g = torch.Generator().manual_seed(99)
    params0 = {
        "W0": (torch.randn(D_IN, HID, generator=g, dtype=torch.float64) / math.sqrt(D_IN)).to(dtype),
        "b0": (0.1 * torch.randn(HID, generator=g, dtype=torch.float64)).to(dtype),
        "W1": (torch.randn(HID, D_OUT, generator=g, dtype=torch.float64) / math.sqrt(HID)).to(dtype),
        "b1": (0.1 * torch.randn(D_OUT, generator=g, dtype=torch.float64)).to(dtype),
    }
    hypers = {
        "l2": torch.tensor(1e-2, dtype=dtype),
        "pw": (1e-2 * torch.rand(D_IN, HID, generator=g, dtype=torch.float64)).to(dtype),
    }
    return train_loss, val_loss, params0, hypers


def make_schedule(kind: str, steps: int = T, dtype=torch.float64):
    """Non-constant schedules: lr varying over steps (and layers), momentum in [0.5, 0.95]."""
    t = torch.arange(steps, dtype=torch.float64)
    if kind == "scalar":
        lr = 0.3 * (1.0 + 0.5 * torch.sin(0.37 * t))
        mom = 0.725 + 0.225 * torch.cos(0.21 * t)
    else:
        j = torch.arange(len(NAMES), dtype=torch.float64)
        lr = 0.25 * (1.0 + 0.5 * torch.sin(0.37 * t[:, None] + 1.3 * j[None, :])) * (1.0 + 0.2 * j[None, :])
        mom = 0.725 + 0.225 * torch.cos(0.21 * t[:, None] + 0.9 * j[None, :])
    assert float(mom.min()) >= 0.5 and float(mom.max()) <= 0.95
    return lr.to(dtype), mom.to(dtype)


def run(method, kind="scalar", dtype=torch.float64, steps=T, problem=None, **options):
    train_loss, val_loss, params0, hypers = make_problem(dtype) if problem is None else problem
    lr, mom = make_schedule(kind, steps, dtype)
    options.setdefault("threads", 1)
    return revsgd.hypergrad(train_loss, val_loss, params0, lr=lr, momentum=mom, hypers=hypers, method=method,
                            **options)


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a = torch.as_tensor(a).to(torch.float64)
    b = torch.as_tensor(b).to(torch.float64)
    nb = float(torch.linalg.vector_norm(b))
    assert nb > 0, "reference is identically zero: the comparison would prove nothing"
    return float(torch.linalg.vector_norm(a - b)) / nb


def grad_items(res):
    """Every hypergradient of a result as (name, tensor) pairs: lr, momentum, each params0 tensor, each hyper."""
    g = res.grads
    out = [("lr", g["lr"]), ("momentum", g["momentum"])]
    out += [(f"params0.{k}", g["params0"][k]) for k in NAMES]
    out += [("l2", g["l2"]), ("pw", g["pw"])]
    return out


def assert_close_grads(res, ref, tol, what=""):
    assert set(res.grads) == set(ref.grads) == {"lr", "momentum", "params0", "l2", "pw"}
    for (name, a), (_, b) in zip(grad_items(res), grad_items(ref)):
        assert a.shape == b.shape, (what, name)
        r = rel(a, b)
        assert r <= tol, f"{what}: grads[{name!r}] differ by {r:.3e} relative (tolerance {tol:g})"


_CACHE: dict = {}


def cached(method, kind, **options):
    key = (method, kind, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = run(method, kind, **options)
    return _CACHE[key]


# --- exact vs the reference methods ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_exact_matches_naive(kind):
    ex, nv = cached("exact", kind), cached("naive", kind)
    lr, _ = make_schedule(kind)
    assert ex.grads["lr"].shape == lr.shape == nv.grads["lr"].shape
    assert ex.grads["momentum"].shape == lr.shape
    assert ex.grads["pw"].shape == (D_IN, HID) and ex.grads["l2"].shape == ()
    assert_close_grads(ex, nv, 1e-8, f"exact vs naive ({kind})")
    # exact_scale keeps V·γ only to within n·2^-52 per step (the low bits come from the tape), so the fixed-point
    # trajectory sits ~1e-10 (relative) from the float64 one
    assert abs(ex.val_loss - nv.val_loss) <= 1e-9 * abs(nv.val_loss)
    for k in NAMES:
        assert rel(ex.params[k], nv.params[k]) <= 1e-8
    # the hypergradients are not trivially small (otherwise the comparison proves little)
    for name, g in grad_items(ex):
        assert float(g.abs().max()) > 1e-8, name


@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
@pytest.mark.parametrize("method,options", [
    ("trajectory", {}),
    ("checkpoint", {"checkpoint_every": 1}),
    ("checkpoint", {"checkpoint_every": 7}),     # not a divisor of T = 30
    ("checkpoint", {"checkpoint_every": 45}),    # more than T
    ("checkpoint", {}),                          # default √T
])
def test_reference_methods_match_exact_and_naive(kind, method, options):
    res = run(method, kind, **options)
    assert_close_grads(res, cached("exact", kind), 1e-8, f"{method}{options} vs exact ({kind})")
    assert_close_grads(res, cached("naive", kind), 1e-12, f"{method}{options} vs naive ({kind})")
    assert_close_grads(res, cached("trajectory", kind), 1e-12, f"{method}{options} vs trajectory ({kind})")
    assert res.stats["method"] == method
    if method == "checkpoint" and options:
        assert res.stats["checkpoint_every"] == options["checkpoint_every"]


# --- finite differences of a plain float64 unroll -------------------------------------------------------------
def plain_val(problem, lr, gamma, params0=None, hypers=None):
    """val_loss(w_T) after T steps of float64 momentum SGD written out here (v_0 = 0), γ given directly."""
    train_loss, val_loss, p0, h0 = problem
    params0 = p0 if params0 is None else params0
    hypers = h0 if hypers is None else hypers
    w = {k: params0[k].detach().clone() for k in NAMES}
    v = {k: torch.zeros_like(w[k]) for k in NAMES}
    with revsgd.pinned_threads(1):
        return _plain_val(train_loss, val_loss, w, v, hypers, lr, gamma)


def _plain_val(train_loss, val_loss, w, v, hypers, lr, gamma):
    for t in range(lr.shape[0]):
        ps = {k: w[k].requires_grad_() for k in NAMES}
        gs = torch.autograd.grad(train_loss(ps, hypers, t), [ps[k] for k in NAMES])
        with torch.no_grad():
            for j, k in enumerate(NAMES):
                a = lr[t] if lr.dim() == 1 else lr[t, j]
                gm = gamma[t] if gamma.dim() == 1 else gamma[t, j]
                v[k] = gm * v[k] - (1.0 - gm) * gs[j]
                w[k] = (w[k] + a * v[k]).detach()
    with torch.no_grad():
        return float(val_loss(w, hypers))


@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_exact_hypergradient_matches_finite_differences(kind):
    problem = make_problem()
    lr, mom = make_schedule(kind)
    gamma = torch.from_numpy(revsgd.quantize_momentum(mom.numpy()) / 65536.0)
    res = cached("exact", kind)
    assert abs(plain_val(problem, lr, gamma) - res.val_loss) <= 1e-9 * abs(res.val_loss)

    g = torch.Generator().manual_seed(5)
    eps = 1e-5

    def check(name, analytic, f_plus, f_minus):
        fd = (f_plus - f_minus) / (2 * eps)
        assert abs(analytic) > 1e-6, f"{name}: directional derivative too small to test"
        assert abs(fd - analytic) <= 1e-5 * abs(analytic), f"{name}: FD {fd!r} vs exact {analytic!r}"

    d = torch.randn(lr.shape, generator=g, dtype=torch.float64)
    check("lr", float((res.grads["lr"] * d).sum()),
          plain_val(problem, lr + eps * d, gamma), plain_val(problem, lr - eps * d, gamma))

    d = torch.randn(gamma.shape, generator=g, dtype=torch.float64)
    check("momentum", float((res.grads["momentum"] * d).sum()),
          plain_val(problem, lr, gamma + eps * d), plain_val(problem, lr, gamma - eps * d))

    p0 = problem[2]
    dp = {k: torch.randn(p0[k].shape, generator=g, dtype=torch.float64) for k in NAMES}
    check("params0", sum(float((res.grads["params0"][k] * dp[k]).sum()) for k in NAMES),
          plain_val(problem, lr, gamma, params0={k: p0[k] + eps * dp[k] for k in NAMES}),
          plain_val(problem, lr, gamma, params0={k: p0[k] - eps * dp[k] for k in NAMES}))

    h0 = problem[3]
    check("l2", float(res.grads["l2"]),
          plain_val(problem, lr, gamma, hypers={**h0, "l2": h0["l2"] + eps}),
          plain_val(problem, lr, gamma, hypers={**h0, "l2": h0["l2"] - eps}))

    d = torch.randn(h0["pw"].shape, generator=g, dtype=torch.float64)
    check("pw", float((res.grads["pw"] * d).sum()),
          plain_val(problem, lr, gamma, hypers={**h0, "pw": h0["pw"] + eps * d}),
          plain_val(problem, lr, gamma, hypers={**h0, "pw": h0["pw"] - eps * d}))


# --- float32 models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_float32_model_reverses_exactly(kind):
    ex = run("exact", kind, dtype=torch.float32)       # a ReversalError here would fail the test
    nv = run("naive", kind, dtype=torch.float32)
    for k in NAMES:
        assert ex.params[k].dtype == torch.float32
        assert ex.grads["params0"][k].dtype == torch.float32
    for name in ("lr", "momentum", "l2", "pw"):
        assert ex.grads[name].dtype == torch.float32, name
    for name, g in grad_items(ex):
        assert torch.isfinite(g).all(), name
    assert_close_grads(ex, nv, 1e-4, f"float32 exact vs naive ({kind})")
    assert abs(ex.val_loss - nv.val_loss) <= 1e-5 * abs(nv.val_loss)


# --- approximate methods ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [("drmad", {}), ("truncated", {}), ("truncated", {"truncate": 5})])
@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_approximate_methods_same_structure(kind, method, options):
    res = run(method, kind, **options)
    ex = cached("exact", kind)
    assert isinstance(res, revsgd.HypergradResult)
    assert set(res.grads) == set(ex.grads)
    assert set(res.grads["params0"]) == set(NAMES)
    assert set(res.params) == set(NAMES)
    for (name, a), (_, b) in zip(grad_items(res), grad_items(ex)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
    # the forward pass is the same training run (float64 here, fixed point in exact)
    assert abs(res.val_loss - ex.val_loss) <= 1e-9 * abs(ex.val_loss)
    for k in NAMES:
        assert rel(res.params[k], ex.params[k]) <= 1e-8
    assert res.stats["method"] == method and res.stats["steps"] == T


@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
@pytest.mark.parametrize("K", [T, T + 10])
def test_truncated_with_K_at_least_T_is_exact(kind, K):
    res = run("truncated", kind, truncate=K)
    assert_close_grads(res, cached("exact", kind), 1e-8, f"truncated K={K} vs exact ({kind})")


@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_truncated_small_K_only_sees_last_steps(kind):
    K = 6
    res = run("truncated", kind, truncate=K)
    ex = cached("exact", kind)
    assert res.stats["truncate"] == K
    for name in ("lr", "momentum"):
        g = res.grads[name]
        assert torch.all(g[:T - K] == 0), f"{name} grads before step T-K must be zero"
        assert torch.all(g[T - K:].abs().sum(dim=tuple(range(1, g.dim()))) > 0), name
        # the last K steps of the sweep are the exact sweep's
        assert rel(g[T - K:], ex.grads[name][T - K:]) <= 1e-8, name
    for k in NAMES:
        assert torch.all(res.grads["params0"][k] == 0), k


# --- determinism: ReversalError, not a wrong answer --------------------------------------------------------------
def test_nondeterministic_loss_raises_reversal_error():
    train_loss, val_loss, params0, hypers = make_problem()
    lr, mom = make_schedule("scalar")

    def noisy(p, h, t):
        s = sum(x.sum() for x in p.values())
        return train_loss(p, h, t) + 1e-3 * torch.rand((), dtype=torch.float64) * s   # global RNG

    torch.manual_seed(0)
    with pytest.raises(ReversalError, match="deterministic"):
        revsgd.hypergrad(noisy, val_loss, params0, lr=lr, momentum=mom, hypers=hypers, threads=1)


def test_counter_dependent_loss_raises_reversal_error():
    train_loss, val_loss, params0, hypers = make_problem()
    lr, mom = make_schedule("scalar")
    calls = [0]

    def counting(p, h, t):  # minibatch from a call counter (an iterator), not from t
        calls[0] += 1
        return train_loss(p, h, calls[0] % 100)

    with pytest.raises(ReversalError, match="deterministic"):
        revsgd.hypergrad(counting, val_loss, params0, lr=lr, momentum=mom, hypers=hypers, threads=1)
    assert calls[0] >= T + 1


def test_reversal_failure_in_position_unstep_is_reversal_error():
    """A loss that reads a call counter instead of t: the reverse pass gets a far larger gradient, the recovered
    velocity is garbage, and undoing the next position update leaves the fixed-point range. That is a failed
    reversal too and must surface as ReversalError (with the hint), not as a bare OverflowError."""
    calls = [0]

    def train_loss(p, h, t):
        calls[0] += 1
        return (1e-4 if calls[0] <= 10 else 1e3) * (p["w"] ** 2).sum()

    p0 = {"w": torch.ones(4, dtype=torch.float64)}
    lr = torch.full((10,), 100.0, dtype=torch.float64)
    mom = torch.full((10,), 0.9, dtype=torch.float64)
    with pytest.raises(ReversalError, match="deterministic"):
        revsgd.hypergrad(train_loss, lambda p, h: (p["w"] ** 2).sum(), p0, lr=lr, momentum=mom, threads=1)


def test_thread_change_inside_loss_raises_reversal_error():
    train_loss, val_loss, params0, hypers = make_problem()
    lr, mom = make_schedule("scalar")
    old = torch.get_num_threads()

    def meddling(p, h, t):
        if t == T // 2:
            torch.set_num_threads(2 if torch.get_num_threads() == 1 else 1)
        return train_loss(p, h, t)

    try:
        with pytest.raises(ReversalError, match="thread"):
            revsgd.hypergrad(meddling, val_loss, params0, lr=lr, momentum=mom, hypers=hypers, threads=1)
    finally:
        torch.set_num_threads(old)


def test_deterministic_loss_does_not_raise_and_is_repeatable():
    a = run("exact", "scalar")
    b = cached("exact", "scalar")
    for (name, x), (_, y) in zip(grad_items(a), grad_items(b)):
        assert torch.equal(x, y), name


# --- the differentiable unroll ----------------------------------------------------------------------------------
def test_unroll_with_nn_module_matches_hypergrad():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, D_OUT)).double()
    xt, yt, xv, yv = _data(torch.float64)

    def train_loss(p, h, t):
        i = _BATCHES[t]
        out = torch.func.functional_call(model, p, (xt[i],))
        return F.cross_entropy(out, yt[i]) + h["l2"] * sum((w ** 2).sum() for k, w in p.items()
                                                           if k.endswith("weight"))

    def val_loss(p, h=None):
        return F.cross_entropy(torch.func.functional_call(model, p, (xv,)), yv)

    lr, mom = make_schedule("scalar")
    lr, mom = lr.clone().requires_grad_(), mom.clone().requires_grad_()
    params0 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    l2 = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)

    ref = revsgd.hypergrad(train_loss, val_loss, params0, lr=lr, momentum=mom, hypers={"l2": l2},
                           method="exact", threads=1)

    final = revsgd.unroll(train_loss, params0, lr=lr, momentum=mom, hypers={"l2": l2}, threads=1)
    assert set(final) == set(params0)
    for k in params0:
        assert final[k].requires_grad and final[k].shape == params0[k].shape
        assert torch.equal(final[k].detach(), ref.params[k])
    loss = val_loss(final)
    assert abs(float(loss.detach()) - ref.val_loss) <= 1e-14 * abs(ref.val_loss)

    leaves = [lr, mom, l2, *params0.values()]
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in leaves]

    def compare():
        assert rel(lr.grad, ref.grads["lr"]) <= 1e-10
        assert rel(mom.grad, ref.grads["momentum"]) <= 1e-10
        assert rel(l2.grad, ref.grads["l2"]) <= 1e-10
        for k, p in params0.items():
            assert p.grad is not None and p.grad.dtype == torch.float64, k
            assert rel(p.grad, ref.grads["params0"][k]) <= 1e-10, k

    compare()
    for x in leaves:
        x.grad = None
    loss.backward()                      # a second backward replays the forward first
    compare()
    for x, g in zip(leaves, first):
        assert torch.equal(x.grad, g)


def test_unroll_rejects_naive():
    train_loss, _, params0, hypers = make_problem()
    lr, mom = make_schedule("scalar")
    with pytest.raises(ValueError, match="method"):
        revsgd.unroll(train_loss, params0, lr=lr, momentum=mom, hypers=hypers, method="naive")


# --- the framework-free level -----------------------------------------------------------------------------------
class Quadratic:
    """L(w, θ, t) = ½ Σ a_t ⊙ (w − θ)², f(w, θ) = ½‖w − c‖² + ½β‖θ‖², all in NumPy."""

    def __init__(self, L=6, steps=25, seed=0):
        rng = np.random.default_rng(seed)
        self.A = rng.uniform(0.5, 2.0, size=(steps, L))
        self.theta = rng.standard_normal(L)
        self.c = rng.standard_normal(L)
        self.w0 = rng.standard_normal(L)
        self.beta = 0.3
        self.offsets = np.array([0, 2, L])
        t = np.arange(steps)[:, None]
        self.lr = 0.2 * (1.0 + 0.5 * np.sin(0.4 * t + np.array([0.0, 1.0])))          # (T, 2)
        self.n = revsgd.quantize_momentum(0.7 + 0.2 * np.cos(0.3 * t + np.array([0.0, 2.0])))

    def grad(self, w, t):
        return self.A[t] * (w - self.theta)

    def grad_vjp(self, w, t):
        a = self.A[t]
        return a * (w - self.theta), (lambda u: (a * u, -a * u))

    def val(self, w):
        f = 0.5 * np.sum((w - self.c) ** 2) + 0.5 * self.beta * np.sum(self.theta ** 2)
        return f, w - self.c, self.beta * self.theta

    def brute(self, w0, theta, lr, gamma):
        """Plain float64 unroll → f."""
        sizes = np.diff(self.offsets)
        w, v = w0.copy(), np.zeros_like(w0)
        for t in range(lr.shape[0]):
            a, gm = np.repeat(lr[t], sizes), np.repeat(gamma[t], sizes)
            v = gm * v - (1 - gm) * self.A[t] * (w - theta)
            w = w + a * v
        return 0.5 * np.sum((w - self.c) ** 2) + 0.5 * self.beta * np.sum(theta ** 2), w


@pytest.mark.parametrize("method,options", [("exact", {}), ("trajectory", {}), ("checkpoint", {"checkpoint_every": 4})])
def test_hypergrad_numpy_quadratic_matches_finite_differences(method, options):
    q = Quadratic()
    res = revsgd.hypergrad_numpy(q.grad, q.grad_vjp, q.val, q.w0, q.lr, q.n, offsets=q.offsets,
                                 num_hypers=q.theta.size, method=method, **options)
    gamma = q.n / 65536.0
    f0, wT = q.brute(q.w0, q.theta, q.lr, gamma)
    tol = 1e-9 if method == "exact" else 1e-12   # exact_scale is within n·2^-52 of V·γ per step
    assert abs(res.val_loss - f0) <= tol * abs(f0)
    np.testing.assert_allclose(res.w, wT, rtol=0, atol=tol)
    assert res.d_lr.shape == q.lr.shape and res.d_gamma.shape == q.n.shape
    assert res.d_w0.shape == q.w0.shape and res.d_theta.shape == q.theta.shape

    eps = 1e-6

    def fd(which, x):
        out = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            base = dict(w0=q.w0, theta=q.theta, lr=q.lr, gamma=gamma)
            out[idx] = (q.brute(**{**base, which: xp})[0] - q.brute(**{**base, which: xm})[0]) / (2 * eps)
        return out

    for name, got, x in (("w0", res.d_w0, q.w0), ("theta", res.d_theta, q.theta), ("lr", res.d_lr, q.lr),
                         ("gamma", res.d_gamma, gamma)):
        want = fd(name, x)
        r = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert r <= 1e-6, f"{method}: d_{name} vs finite differences: {r:.2e}"


# --- stats and backends -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "naive", "trajectory", "checkpoint", "drmad", "truncated"])
def test_stats(method):
    res = cached(method, "scalar") if method in ("exact", "naive", "trajectory") else run(method, "scalar")
    st = res.stats
    for key in ("method", "steps", "seconds_forward", "seconds_reverse", "tape_bytes", "info_bits"):
        assert key in st, key
    assert st["method"] == method and st["steps"] == T
    assert st["seconds_forward"] > 0 and st["seconds_reverse"] > 0
    if method == "exact":
        assert st["tape_bytes"] > 0
        _, mom = make_schedule("scalar")
        n = revsgd.quantize_momentum(mom.numpy())
        lanes = sum(v.numel() for v in make_problem()[2].values())
        expected = lanes * float(np.sum(-np.log2(n / 65536.0)))
        assert abs(st["info_bits"] - expected) <= 1e-3 * expected
    else:
        assert st["info_bits"] == 0


@pytest.mark.parametrize("kind", ["scalar", "per_layer"])
def test_exact_independent_of_backend(kind):
    assert "numpy" in revsgd.BACKENDS
    # start every kernel's thread pool outside the pinned run: the first launch of the numba pool resets torch's
    # thread count, a separate bug pinned down by test_first_kernel_call_in_a_process_keeps_torch_threads_pinned
    for b in revsgd.BACKENDS:
        revsgd.ExactMomentum(np.zeros(4), backend=b).step(np.ones(4), 0.1, 60000)
    results = {}
    for b in revsgd.BACKENDS:
        res = run("exact", kind, backend=b)
        assert res.stats["backend"] == b
        results[b] = res
    ref = results["numpy"]
    for b, res in results.items():
        assert res.val_loss == ref.val_loss, b
        for k in NAMES:
            assert torch.equal(res.params[k], ref.params[k]), (b, k)
        for (name, x), (_, y) in zip(grad_items(res), grad_items(ref)):
            assert torch.equal(x, y), (b, name)
        assert res.stats["tape_bytes"] > 0 and res.stats["info_bits"] == ref.stats["info_bits"], b


_FRESH_PROCESS = r"""
import sys
import torch
import revsgd
p0 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
lr = torch.full((5,), 0.1, dtype=torch.float64)
m = torch.full((5,), 0.9, dtype=torch.float64)
res = revsgd.hypergrad(lambda p, h, t: ((p["w"] - 0.01 * t) ** 2).sum(), lambda p, h: (p["w"] ** 2).sum(), p0,
                       lr=lr, momentum=m, backend=sys.argv[1], threads=1)
assert res.stats["backend"] == sys.argv[1]
print("OK")
"""


@pytest.mark.parametrize("backend", [b for b in revsgd.BACKENDS if b != "numpy"])
def test_first_kernel_call_in_a_process_keeps_torch_threads_pinned(backend):
    """The first compiled-kernel call of a fresh process (threads=1, kernel pool of 2) must not change torch's
    thread count mid-run: that would be a spurious ReversalError for a deterministic loss."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, backend], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


# --- bad input --------------------------------------------------------------------------------------------------
def _call(train_loss=None, val_loss=None, params0=None, lr=None, momentum=None, hypers=None, **kw):
    tl, vl, p0, h0 = make_problem()
    lr0, m0 = make_schedule("scalar", steps=5)
    return revsgd.hypergrad(tl if train_loss is None else train_loss, vl if val_loss is None else val_loss,
                            p0 if params0 is None else params0, lr=lr0 if lr is None else lr,
                            momentum=m0 if momentum is None else momentum, hypers=h0 if hypers is None else hypers,
                            **kw)


def test_bad_input_zero_steps():
    with pytest.raises(ValueError, match="T = 0"):
        _call(lr=torch.zeros(0, dtype=torch.float64), momentum=torch.zeros(0, dtype=torch.float64))


def test_bad_input_schedule_lengths_differ():
    with pytest.raises(ValueError, match="momentum"):
        _call(lr=torch.full((5,), 0.1, dtype=torch.float64), momentum=torch.full((6,), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("cols", [1, 3, 5])
def test_bad_input_wrong_number_of_columns(cols):
    with pytest.raises(ValueError, match="column"):
        _call(lr=torch.full((5, cols), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="column"):
        _call(momentum=torch.full((5, cols), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("bad", [0.0, 1.5, float("nan"), -0.5])
@pytest.mark.parametrize("method", ["exact", "naive"])
def test_bad_input_momentum_out_of_range(bad, method):
    m = torch.full((5,), 0.9, dtype=torch.float64)
    m[2] = bad
    with pytest.raises(ValueError, match="momentum"):
        _call(momentum=m, method=method)


def test_bad_input_nonfinite_lr():
    lr = torch.full((5,), 0.1, dtype=torch.float64)
    lr[1] = float("inf")
    with pytest.raises(ValueError, match="lr"):
        _call(lr=lr)


@pytest.mark.parametrize("method", ["exact", "naive", "trajectory"])
def test_bad_input_non_scalar_train_loss(method):
    xt, yt, _, _ = _data(torch.float64)

    def vector_loss(p, h, t):
        i = _BATCHES[t]
        return F.cross_entropy(_mlp(p, xt[i]), yt[i], reduction="none")

    with pytest.raises(ValueError, match="scalar"):
        _call(train_loss=vector_loss, method=method)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["exact", "naive", "checkpoint"])
def test_bad_input_non_finite_train_loss(bad, method):
    tl, _, _, _ = make_problem()

    def broken(p, h, t):
        loss = tl(p, h, t)
        return loss + bad if t == 3 else loss

    with pytest.raises(ValueError, match="non-finite"):
        _call(train_loss=broken, method=method)


def test_bad_input_non_finite_val_loss():
    with pytest.raises(ValueError, match="non-finite"):
        _call(val_loss=lambda p, h: (p["W0"] ** 2).sum() * float("inf"))


def test_bad_input_integer_params():
    def tl(p, h, t):
        return (p["w"].to(torch.float64) ** 2).sum()

    with pytest.raises(TypeError, match="float"):
        _call(train_loss=tl, val_loss=lambda p, h: p["w"].sum().double(),
              params0={"w": torch.arange(3, dtype=torch.long)}, hypers={})


def test_bad_input_unknown_method():
    with pytest.raises(ValueError, match="method"):
        _call(method="adam")


@pytest.mark.parametrize("method,opts", [("exact", {"checkpoint_every": 2}), ("exact", {"foo": 1}),
                                         ("naive", {"backend": "numpy"}), ("checkpoint", {"truncate": 2})])
def test_bad_input_unknown_option(method, opts):
    with pytest.raises(TypeError, match="option"):
        _call(method=method, **opts)


@pytest.mark.parametrize("params0", [[torch.zeros(3, dtype=torch.float64)], torch.zeros(3, dtype=torch.float64)])
def test_bad_input_params0_not_a_dict(params0):
    with pytest.raises(TypeError, match="dict"):
        _call(params0=params0)
    with pytest.raises(TypeError, match="dict"):
        revsgd.unroll(lambda p, h, t: p.sum(), params0, lr=torch.full((3,), 0.1, dtype=torch.float64),
                      momentum=torch.full((3,), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("opts", [{"checkpoint_every": 0}, {"checkpoint_every": 2.5}])
def test_bad_input_checkpoint_every(opts):
    with pytest.raises(ValueError, match="checkpoint_every"):
        _call(method="checkpoint", **opts)


@pytest.mark.parametrize("method,opts", [("trajectory", {"checkpoint_every": 3}), ("exact", {"truncate": 2}),
                                         ("drmad", {"backend": "numpy"}), ("checkpoint", {"frac_bits": 40})])
def test_numpy_level_refuses_options_of_other_methods(method, opts):
    grad = lambda w, t: w  # noqa: E731
    with pytest.raises(TypeError, match="belongs to method"):
        revsgd.Unroll(grad, lambda w, t: (w, lambda u: (u, None)), np.zeros(3), np.full(4, 0.1),
                      np.full(4, 60000), method=method, **opts)
