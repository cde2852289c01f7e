"""The engine (docs/design.md §4, §6): methods, their costs, the NumPy adapter and the reversal checks.

- every method computes the same hypergradient (exact, naive, trajectory, checkpoint, replay, truncated with
  K >= T), the exact one bit for bit on every kernel backend;
- replay recomputes O(T log_k T) steps and keeps O(k log_k T) states (counted independently, from the loss calls);
  checkpoint recomputes T − ⌈T/k⌉ steps; truncated gives params0 no gradient and never evaluates a step before T−K;
- drmad runs for heavyball and sgd and is refused for adam and for models with BatchNorm buffers;
- ``hypergrad_numpy``: the README example's values, groups via offsets, clear errors for bad callbacks and a NaN
  validation loss;
- non-determinism is a ReversalError, never a hypergradient: unseeded randomness fails at the step-0 probe (two
  loss calls, before the forward pass), also at momentum 1 where the state never sees a gradient; a loss that
  changes only at step 7 of the reverse pass is named by its step (gradient fingerprints); a thread-count change
  inside the loss is caught;
- the sweep's buffers: ``reverse(overwrite=True)`` accumulates into the caller's dw (same result), the unroll keeps
  no float copy of (w_T, state_T), and the exact method remembers its start by SHA-256 digests (a record one bit
  off is a ReversalError).
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import revsgd
from revsgd import NonFiniteError, ReversalError
from revsgd.engine import REVERSAL_HINT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/ (pytest runs with importlib mode)
from helpers import (F64, NAMES, XV, YV, CountingLoss, assert_grads_close, batch, grad_items, hypers,  # noqa: E402
                     params0, rel, run, schedules, train_loss, val_loss)


# --- methods agree ---------------------------------------------------------------------------------------------
_CACHE: dict = {}


def cached(kind, method, T=60, per_group=False, **options):
    key = (kind, method, T, per_group, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = run(kind, method, T, per_group, **options)
    return _CACHE[key]


@pytest.mark.parametrize("method,options", [("exact", {}), ("trajectory", {}), ("checkpoint", {}),
                                            ("checkpoint", {"checkpoint_every": 1}),
                                            ("checkpoint", {"checkpoint_every": 60}), ("replay", {}),
                                            ("replay", {"replay_k": 2}), ("truncated", {"truncate": 60}),
                                            ("truncated", {"truncate": 100})])
@pytest.mark.parametrize("kind,per_group", [("heavyball", False), ("sgd", True), ("adam", True)])
def test_methods_agree(kind, per_group, method, options):
    res, nv = cached(kind, method, per_group=per_group, **options), cached(kind, "naive", per_group=per_group)
    assert_grads_close(res, nv, 1e-8, f"{kind} {method} {options}")
    assert res.val_loss == pytest.approx(nv.val_loss, rel=1e-10)
    for k in NAMES:
        assert rel(res.params[k], nv.params[k]) <= 1e-10
    assert res.stats["method"] == method and res.stats["steps"] == 60


def test_float_methods_agree_bit_for_bit():
    """trajectory, checkpoint and replay run the same float64 steps: identical bits."""
    ref = cached("adam", "trajectory", per_group=True)
    for method, opts in (("checkpoint", {}), ("replay", {}), ("replay", {"replay_k": 2})):
        res = cached("adam", method, per_group=True, **opts)
        for (name, a), (_, b) in zip(grad_items(res), grad_items(ref)):
            assert torch.equal(a, b), (method, name)


@pytest.mark.parametrize("kind", ["heavyball", "adamw"])
def test_exact_identical_on_every_backend(kind):
    results = {b: run(kind, "exact", 30, True, backend=b) for b in revsgd.BACKENDS}
    ref = results["numpy"]
    for b, res in results.items():
        assert res.stats["backend"] == b
        assert res.val_loss == ref.val_loss, b
        for k in NAMES:
            assert torch.equal(res.params[k], ref.params[k]), (b, k)
        for (name, x), (_, y) in zip(grad_items(res), grad_items(ref)):
            assert torch.equal(x, y), (b, name)
        assert res.stats["info_bits"] == ref.stats["info_bits"] > 0


@pytest.mark.parametrize("method", ["exact", "naive", "trajectory", "checkpoint", "replay", "truncated"])
def test_stats(method):
    res = cached("heavyball", method)
    st = res.stats
    for key in ("method", "optimizer", "steps", "seconds_forward", "seconds_reverse", "tape_bytes", "info_bits",
                "storage_bytes", "threads"):
        assert key in st, key
    assert st["optimizer"] == "heavyball" and st["threads"] == 1
    if method == "exact":
        assert st["tape_bytes"] > 0 and st["info_bits"] > 0 and st["storage_bytes"] == 0
    else:
        assert st["tape_bytes"] == 0 and st["info_bits"] == 0


# --- replay, checkpoint, truncated: what they cost -------------------------------------------------------------
def _log_ceil(T, k):
    """⌈log_k T⌉ for T >= 1, with integer arithmetic."""
    n, p = 0, 1
    while p < T:
        p *= k
        n += 1
    return n


@pytest.mark.parametrize("T", [1, 2, 7, 16, 64, 81])
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_replay_costs(T, k):
    loss = CountingLoss(train_loss)
    res = run("heavyball", "replay", T, problem=(loss, val_loss, params0(), hypers()), replay_k=k)
    st = res.stats
    depth = _log_ceil(T, k)
    # counted independently: T forward steps, the recomputations, T gradients with graph in the sweep
    assert loss.calls == 2 * T + st.get("recompute_steps", 0)
    assert st.get("recompute_steps", 0) <= T * depth
    assert st.get("peak_states", 0) <= k * depth
    if T >= 64:   # far below storing the trajectory
        assert st["peak_states"] < T / 3
        assert st["storage_bytes"] < (T + 1) * 2 * 8 * 32 / 3


@pytest.mark.parametrize("T,k", [(10, 1), (10, 3), (10, 7), (50, 7), (50, 50), (10, 50)])
def test_checkpoint_costs(T, k):
    loss = CountingLoss(train_loss)
    res = run("heavyball", "checkpoint", T, problem=(loss, val_loss, params0(), hypers()), checkpoint_every=k)
    st = res.stats
    assert st["recompute_steps"] == T - math.ceil(T / k)
    assert loss.calls == 2 * T + st["recompute_steps"]
    # states: ⌈T/k⌉ checkpoints and one segment of at most min(k, T) states (+1 for the final state)
    state_bytes = 2 * 8 * 32          # w and the velocity, float64, 32 lanes
    assert st["storage_bytes"] <= (math.ceil(T / k) + min(k, T) + 1) * state_bytes
    traj = run("heavyball", "trajectory", T)
    assert st["storage_bytes"] <= traj.stats["storage_bytes"] + state_bytes


@pytest.mark.parametrize("kind", ["heavyball", "adam"])
def test_truncated(kind):
    T, K = 40, 9
    loss = CountingLoss(train_loss)
    tu = run(kind, "truncated", T, problem=(loss, val_loss, params0(), hypers()), truncate=K)
    tr = run(kind, "trajectory", T)
    assert loss.steps[T:] == list(range(T - 1, T - K - 1, -1)), "the sweep stops at T−K"
    for k in NAMES:
        assert torch.all(tu.grads["params0"][k] == 0), k
    for name in ("lr",) + (("momentum",) if kind == "heavyball" else ("eps",)):   # beta1 also feeds 1 − Πβ1
        g = tu.grads[name]
        assert torch.all(g[:T - K] == 0), name
        assert torch.equal(g[T - K:], tr.grads[name][T - K:]), name   # the same sweep over the last K steps
    # the hypers' gradients are partial sums of the full ones: different, but not zero
    assert 0 < float(tu.grads["l2"].abs()) and float((tu.grads["l2"] - tr.grads["l2"]).abs()) > 0


# --- drmad ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["heavyball", "sgd"])
def test_drmad_runs_for_momentum_optimizers(kind):
    """DrMAD (Fu et al. 2016): the straight line from w_0 to w_T; approximate, but defined for heavyball and sgd
    (docs/design.md §6)."""
    T = 30
    dr = run(kind, "drmad", T)
    tr = cached(kind, "trajectory", T)
    assert set(dr.grads) == set(tr.grads)
    for (name, a), (_, b) in zip(grad_items(dr), grad_items(tr)):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
    assert dr.val_loss == tr.val_loss                    # the same float64 forward pass
    assert dr.stats["storage_bytes"] == 0


def test_drmad_refused_for_adam():
    loss = CountingLoss(train_loss)
    with pytest.raises(ValueError, match="drmad"):
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="adam", hypers=hypers(), method="drmad",
                         **schedules("adam", 10))
    assert loss.calls == 0


def test_drmad_refused_with_batchnorm_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = copy.deepcopy(net.state_dict())
    calls = []

    def tl(p, h, t):
        calls.append(t)
        x, y = batch(t)
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    with pytest.raises(ValueError, match="(?i)drmad.*(running statistics|BatchNorm)"):
        revsgd.hypergrad(tl, lambda p, h: ((functional_call(net, p, (XV,)) - YV) ** 2).mean(), net,
                         optimizer="sgd", lr=0.1, momentum=0.9, steps=10, method="drmad")
    assert calls == []
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- hypergrad_numpy ---------------------------------------------------------------------------------------------
class Quadratic:
    """The README example: L(w, θ, t) = ½ Σ a_t (w − θ)², f(w) = ½ ‖w − 1‖²."""

    def __init__(self, T=50):
        self.a = 1.0 + np.random.default_rng(0).random(T)
        self.theta = np.array([0.5, 2.0, -1.0])
        self.calls = 0

    def grad(self, w, t):
        self.calls += 1
        return self.a[t] * (w - self.theta)

    def grad_vjp(self, w, t):
        self.calls += 1
        a = self.a[t]
        return a * (w - self.theta), lambda u: (a * u, -a * u)

    @staticmethod
    def val(w):
        return 0.5 * np.sum((w - 1) ** 2), w - 1, np.zeros(3)

    def run(self, **kw):
        kw.setdefault("lr", np.full(50, 0.1))
        kw.setdefault("momentum", np.full(50, 0.9))
        return revsgd.hypergrad_numpy(self.grad, self.grad_vjp, self.val, np.zeros(3), num_hypers=3, **kw)


def _plain_heavyball(a, theta, lr, mom, w0=np.zeros(3)):
    """Float64 heavyball on the quadratic, written out here: f(w_T)."""
    w, v = w0.copy(), np.zeros_like(w0)
    for t in range(len(lr)):
        v = mom[t] * v - (1 - mom[t]) * a[t] * (w - theta)
        w = w + lr[t] * v
    return 0.5 * np.sum((w - 1) ** 2)


def test_hypergrad_numpy_readme_example():
    q = Quadratic()
    res = q.run()
    np.testing.assert_allclose(res.d_theta, [-0.498, 0.839, -1.836], atol=6e-4)     # the README's values
    np.testing.assert_allclose(res.d_theta, [-0.49845029, 0.8391814, -1.83608198], rtol=1e-7)
    assert res.grads["lr"].shape == (50,) and res.grads["momentum"].shape == (50,)
    assert res.d_w0.shape == (3,) and set(res.d_state0) == {"velocity"}
    # finite differences of the plain float64 unroll written above
    lr, mom, h = np.full(50, 0.1), np.full(50, 0.9), 1e-6
    for t in (0, 25, 49):
        e = np.zeros(50)
        e[t] = h
        fd = (_plain_heavyball(q.a, q.theta, lr + e, mom) - _plain_heavyball(q.a, q.theta, lr - e, mom)) / (2 * h)
        assert res.grads["lr"][t] == pytest.approx(fd, rel=1e-6, abs=1e-10)
        fd = (_plain_heavyball(q.a, q.theta, lr, mom + e) - _plain_heavyball(q.a, q.theta, lr, mom - e)) / (2 * h)
        assert res.grads["momentum"][t] == pytest.approx(fd, rel=1e-6, abs=1e-10)
    for i in range(3):
        e = np.zeros(3)
        e[i] = h
        fd = (_plain_heavyball(q.a, q.theta + e, lr, mom) - _plain_heavyball(q.a, q.theta - e, lr, mom)) / (2 * h)
        assert res.d_theta[i] == pytest.approx(fd, rel=1e-6)
    assert res.val_loss == pytest.approx(_plain_heavyball(q.a, q.theta, lr, mom), rel=1e-12)


@pytest.mark.parametrize("method", ["exact", "trajectory", "checkpoint", "replay"])
def test_hypergrad_numpy_methods_agree(method):
    ref = Quadratic().run(method="trajectory")
    res = Quadratic().run(method=method)
    for k in ("lr", "momentum"):
        np.testing.assert_allclose(res.grads[k], ref.grads[k], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.d_theta, ref.d_theta, rtol=1e-10)
    np.testing.assert_allclose(res.d_w0, ref.d_w0, rtol=1e-10)


def test_hypergrad_numpy_groups():
    """Per-group schedules with offsets: equal columns reproduce the scalar schedule, and the per-group gradients
    sum to the scalar ones; the groups are where the offsets say."""
    q = Quadratic()
    ref = q.run()
    res = q.run(offsets=[0, 1, 3], lr=np.full((50, 2), 0.1), momentum=np.full((50, 2), 0.9))
    assert res.grads["lr"].shape == (50, 2) and res.grads["momentum"].shape == (50, 2)
    np.testing.assert_allclose(res.grads["lr"].sum(1), ref.grads["lr"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.grads["momentum"].sum(1), ref.grads["momentum"], rtol=1e-12, atol=1e-15)
    # the float adjoint may take a differently fused path for per-group values: equal to rounding, not bit for bit
    np.testing.assert_allclose(res.d_theta, ref.d_theta, rtol=1e-12, atol=1e-15)
    # group 0 is lane 0 alone: a larger lr there changes only lane 0's trajectory
    lr = np.full((50, 2), 0.1)
    lr[:, 0] = 0.05
    a = q.run(offsets=[0, 1, 3], lr=lr, momentum=np.full((50, 2), 0.9))
    b = q.run(offsets=[0, 1, 3], lr=np.full((50, 2), 0.1), momentum=np.full((50, 2), 0.9))
    assert a.w[0] != b.w[0] and np.array_equal(a.w[1:], b.w[1:])


@pytest.mark.parametrize("what,kwargs,exc,match", [
    ("grad shape", dict(grad=lambda w, t: np.zeros(4)), ValueError, "grad"),
    ("grad_vjp not a pair", dict(grad_vjp=lambda w, t: np.zeros(3)), TypeError, "grad_vjp"),
    ("vjp not a pair", dict(grad_vjp=lambda w, t: (w - 1, lambda u: u)), TypeError, "vjp"),
    ("vjp shape", dict(grad_vjp=lambda w, t: (w - 1, lambda u: (u, np.zeros(2)))), ValueError, "vjp"),
    ("val not a triple", dict(val=lambda w: 1.0), TypeError, "val"),
    ("val shape", dict(val=lambda w: (1.0, np.zeros(2), np.zeros(3))), ValueError, "val"),
    ("NaN validation loss", dict(val=lambda w: (float("nan"), w - 1, np.zeros(3))), ValueError, "non-finite"),
    ("inf validation loss", dict(val=lambda w: (float("inf"), w - 1, np.zeros(3))), ValueError, "non-finite"),
    ("offsets", dict(offsets=[0, 2]), ValueError, "offsets"),
    ("columns without offsets", dict(lr=np.full((50, 2), 0.1)), ValueError, "groups"),
    ("unknown schedule", dict(foo=np.ones(50)), TypeError, "foo"),
    ("w0 not 1-D", dict(w0=np.zeros((3, 1))), ValueError, "w0"),
    ("option of another method", dict(method="checkpoint", backend="numpy"), TypeError, "backend"),
    ("naive", dict(method="naive"), ValueError, "method"),
])
def test_hypergrad_numpy_bad_input(what, kwargs, exc, match):
    q = Quadratic()
    args = dict(grad=lambda w, t: w - 1, grad_vjp=lambda w, t: (w - 1, lambda u: (u, np.zeros(3))), val=q.val,
                w0=np.zeros(3), lr=np.full(50, 0.1), momentum=np.full(50, 0.9), num_hypers=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        revsgd.hypergrad_numpy(args.pop("grad"), args.pop("grad_vjp"), args.pop("val"), args.pop("w0"), **args)


def test_hypergrad_numpy_grad_and_grad_vjp_must_agree():
    q = Quadratic()
    with pytest.raises(ReversalError):
        revsgd.hypergrad_numpy(q.grad, lambda w, t: (q.grad(w, t) * (1 + 1e-12), lambda u: (u, -u)), q.val,
                               np.zeros(3), lr=np.full(50, 0.1), momentum=np.full(50, 0.9), num_hypers=3)


# --- non-determinism: a ReversalError, never a hypergradient ------------------------------------------------------
def _noisy(p, h, t):
    """The training loss plus a term drawn from torch's global RNG (unseeded with seed=None)."""
    return train_loss(p, h, t) + 1e-3 * torch.rand((), dtype=F64) * (p["W0"] ** 2).sum()


@pytest.mark.parametrize("momentum", [0.9, 1.0])
@pytest.mark.parametrize("optimizer", ["heavyball", "sgd"])
def test_unseeded_randomness_fails_at_the_step0_probe(optimizer, momentum):
    """seed=None leaves torch's RNG alone: the two gradients of step 0 differ and the run stops after two loss
    calls, before the forward pass — also at momentum 1, where the momentum state never sees a gradient."""
    loss = CountingLoss(_noisy)
    torch.manual_seed(0)
    with pytest.raises(ReversalError) as e:
        revsgd.hypergrad(loss, val_loss, params0(), hypers=hypers(), optimizer=optimizer, lr=0.05,
                         momentum=momentum, steps=200, seed=None)
    assert loss.steps == [0, 0]
    assert "step 0" in str(e.value) and "random" in str(e.value)


def test_seeded_randomness_reverses():
    """The same loss with the default seed: torch's RNG is seeded per step, and exact matches naive."""
    loss = CountingLoss(_noisy)
    ex = revsgd.hypergrad(loss, val_loss, params0(), hypers=hypers(), optimizer="heavyball",
                          **schedules("heavyball", 30))
    nv = revsgd.hypergrad(_noisy, val_loss, params0(), hypers=hypers(), optimizer="heavyball", method="naive",
                          **schedules("heavyball", 30))
    assert loss.calls == 2 + 2 * 30
    assert_grads_close(ex, nv, 1e-8, "seeded randomness")


class ChangesInReverse:
    """A loss that changes (by one part in 10^15) only when step ``at`` is evaluated again in the reverse pass."""

    def __init__(self, at):
        self.at, self.seen = at, {}

    def __call__(self, p, h, t):
        self.seen[t] = self.seen.get(t, 0) + 1
        loss = train_loss(p, h, t)
        if t == self.at and self.seen[t] > (3 if t == 0 else 1):   # step 0: the probe's two calls and the forward's
            loss = loss * (1 + 1e-15)
        return loss


@pytest.mark.parametrize("momentum", [0.9, 1.0])
@pytest.mark.parametrize("at", [7, 0])
def test_reverse_pass_change_is_named_by_its_step(at, momentum):
    loss = ChangesInReverse(at)
    with pytest.raises(ReversalError, match=rf"\bstep {at}\b"):
        revsgd.hypergrad(loss, val_loss, params0(), hypers=hypers(), optimizer="heavyball", lr=0.05,
                         momentum=momentum, steps=20)


def test_counter_dependent_loss_raises_reversal_error():
    """A minibatch from a call counter (an iterator), not from t."""
    calls = [0]

    def tl(p, h, t):
        calls[0] += 1
        return (1e-4 if calls[0] <= 12 else 1e3) * (p["w"] ** 2).sum()

    with pytest.raises(ReversalError, match="step 9"):
        revsgd.hypergrad(tl, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(4, dtype=F64)},
                         optimizer="heavyball", lr=100.0, momentum=0.9, steps=10)


@pytest.mark.parametrize("when", ["forward", "reverse"])
def test_thread_count_change_inside_the_loss(when):
    old = torch.get_num_threads()
    seen = {}

    def meddling(p, h, t):
        seen[t] = seen.get(t, 0) + 1
        if t == 5 and (when == "forward" or seen[t] == 2):
            torch.set_num_threads(2)
        return train_loss(p, h, t)

    try:
        with pytest.raises(ReversalError, match="thread"):
            revsgd.hypergrad(meddling, val_loss, params0(), hypers=hypers(), optimizer="heavyball", lr=0.05,
                             momentum=0.9, steps=12, threads=1)
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old


def test_reversal_error_never_returns_a_hypergradient():
    """Through every entry point: hypergrad raises, unroll's backward raises and leaves every .grad unset, the
    context form raises and keeps no gradients."""
    with pytest.raises(ReversalError):
        revsgd.hypergrad(ChangesInReverse(7), val_loss, params0(), hypers=hypers(), optimizer="heavyball",
                         lr=0.05, momentum=0.9, steps=20)
    p0 = {k: v.clone().requires_grad_() for k, v in params0().items()}
    lr = torch.full((20,), 0.05, dtype=F64, requires_grad=True)
    hy = {k: v.clone().requires_grad_() for k, v in hypers().items()}
    final = revsgd.unroll(ChangesInReverse(7), p0, optimizer="heavyball", lr=lr, momentum=0.9, hypers=hy)
    with pytest.raises(ReversalError):
        val_loss(final, hy).backward()
    assert lr.grad is None and all(v.grad is None for v in p0.values()) and all(v.grad is None for v in hy.values())

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    lr = torch.full((20,), 0.05, dtype=F64, requires_grad=True)
    seen = {}

    def step(t):
        seen[t] = seen.get(t, 0) + 1
        x, y = batch(t)
        loss = ((model(x) - y) ** 2).mean()
        return loss * (1 + 1e-15) if t == 7 and seen[t] > 1 else loss

    with revsgd.reversible(model, optimizer="heavyball", lr=lr, momentum=0.9) as run_:
        run_.fit(step)
        with pytest.raises(ReversalError):
            run_.backward(((model(XV) - YV) ** 2).mean())
    assert lr.grad is None and run_.grads == {}
    assert all(p.grad is None for p in model.parameters())


def test_reversal_hint_names_real_arguments():
    """The advice in every ReversalError must name arguments that exist (``seed=None`` turns the per-step seeding
    off)."""
    named = set(re.findall(r"\b([a-z_]+)=", REVERSAL_HINT))
    params = set(inspect.signature(revsgd.hypergrad).parameters)
    assert named <= params, f"REVERSAL_HINT names {sorted(named - params)}, which hypergrad does not take"


@pytest.mark.parametrize("optimizer", ["heavyball", "adam"])
@pytest.mark.parametrize("at", [0, 5])
def test_nan_gradient_is_non_finite_error(optimizer, at):
    """A NaN gradient is a NonFiniteError naming the step (docs/design.md §2) — at step 0 too, where the probe
    compares two gradients: NaN ≠ NaN must not be reported as non-determinism."""
    def tl(p, h, t):
        loss = train_loss(p, h, t)
        return loss + torch.sqrt(p["b1"][0] - 100.0) if t == at else loss

    with pytest.raises(NonFiniteError, match=f"step {at}"):
        revsgd.hypergrad(tl, val_loss, params0(), hypers=hypers(), optimizer=optimizer, lr=0.05, steps=10,
                         **({"momentum": 0.9} if optimizer == "heavyball" else {}))


# --- a fresh process ---------------------------------------------------------------------------------------------
_FRESH_PROCESS = r"""
import sys
import torch
import revsgd
p0 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
res = revsgd.hypergrad(lambda p, h, t: ((p["w"] - 0.01 * t) ** 2).sum(), lambda p, h: (p["w"] ** 2).sum(), p0,
                       optimizer="heavyball", lr=0.1, momentum=0.9, steps=5, backend=sys.argv[1], threads=1)
assert res.stats["backend"] == sys.argv[1]
print("OK")
"""


@pytest.mark.parametrize("backend", [b for b in revsgd.BACKENDS if b in ("cpp", "numba")])
def test_first_kernel_call_in_a_process_keeps_torch_threads_pinned(backend):
    """The first compiled-kernel call of a fresh process must not change torch's thread count mid-run (that would
    be a spurious ReversalError for a deterministic loss)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(revsgd.__file__)))   # this checkout's revsgd
    env = dict(os.environ, NUMBA_NUM_THREADS="2", PYTHONPATH=here)
    p = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, backend], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


# --- the sweep's buffers --------------------------------------------------------------------------------------
def _quadratic_unroll(method="exact", T=50):
    from revsgd.engine import Unroll
    from revsgd.engine.problem import NumpyProblem
    from revsgd.optim import get_optimizer
    q = Quadratic(T)
    prob = NumpyProblem(lambda w, t: q.grad(w, t), lambda w, t: q.grad_vjp(w, t), q.val, 3, 3)
    sched = {"lr": np.full(T, 0.1), "momentum": np.full(T, 0.9)}
    return Unroll(prob, get_optimizer("heavyball"), sched, torch.zeros(3, dtype=F64), method=method), prob


@pytest.mark.parametrize("method", ["exact", "trajectory"])
def test_reverse_overwrite_accumulates_into_the_callers_dw(method):
    res = {}
    for overwrite in (False, True):
        u, prob = _quadratic_unroll(method)
        u.forward()
        f, dw, dth = prob.val()
        given = dw.clone()
        out = u.reverse(dw, dth, overwrite=overwrite)
        assert (out.d_w0.data_ptr() == dw.data_ptr()) == overwrite   # the same memory, or a copy
        assert overwrite or torch.equal(dw, given)             # the caller's dw untouched without overwrite
        res[overwrite] = out
    assert torch.equal(res[True].d_w0, res[False].d_w0)
    assert all(torch.equal(res[True].grads[k], res[False].grads[k]) for k in res[True].grads)


def test_exact_unroll_keeps_no_float_state_and_checks_the_start_by_digest():
    u, prob = _quadratic_unroll()
    wT, stT = u.forward()
    assert u.wT.dtype == prob.P.dtype and torch.equal(u.wT, wT.to(prob.P.dtype))
    held = [x for v in vars(u).values() if v is not u.wT for x in (v if isinstance(v, (tuple, list)) else [v])]
    assert not any(isinstance(x, torch.Tensor) and x.shape == wT.shape for x in held)   # (w_T, state_T) not kept
    ex = u.prov.ex
    assert set(ex.start) == {"params", "velocity"} and all(len(d) == 32 for d in ex.start.values())
    d = ex.start["velocity"]
    ex.start["velocity"] = bytes([d[0] ^ 1]) + d[1:]           # the record of the start, one bit off
    f, dw, dth = prob.val()
    with pytest.raises(ReversalError, match=r"does not return to the start \(velocity differ"):
        u.reverse(dw, dth)
