"""The reversible optimisers (docs/design.md §3, §5): exact steps, float steps, adjoints, schedules, bad input.

- exact reversal equals naive autograd through the float steps to 1e-8 relative for every optimiser, every schedule
  (one value per step and one per step and parameter tensor), params0 and the hypers; the stored-state methods
  (trajectory, checkpoint, replay) agree likewise, nesterov and plain SGD included;
- central finite differences confirm one lr entry and one beta1 entry;
- every ``float_step`` is torch.optim's step (SGD with momentum/dampening/weight decay/nesterov and its first-step
  buffer rule, Adam, AdamW) to ~1e-15 — asserted at 1e-12 — and the exact fixed-point run tracks float64
  torch.optim (measured ~1e-14 relative after 300 Adam steps; asserted at 1e-12);
- every closed-form ``adjoint`` equals the base class's autograd default on random inputs;
- AdamW with lr·weight_decay = 1e-6 really decays (no quantised factors), and the tape holds exactly
  Σ floor(Σ_t −log2 f_t) bits per lane and decaying state: within one bit per lane of the information limit;
- bad input is a clear error before anything runs; exact is refused, with the reason, for plain SGD and nesterov;
- a new optimiser written with ``ExactState.shift`` / ``ExactState.add`` only works end to end (the README example).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import revsgd
from revsgd.optim.base import contribution
from revsgd.optim import ExactState, ReversibleOptimizer, Schedules, get_optimizer
from revsgd.frontend.inputs import as_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/ (pytest runs with importlib mode)
from helpers import (F64, NAMES, RANGES, CountingLoss, assert_grads_close, float_unroll, hypers,
                     mlp_problem, optimizer_name, params0, rel, run, schedules, train_loss, val_loss)

EXACT_KINDS = ["heavyball", "sgd", "adam", "adamw"]
STORED_KINDS = EXACT_KINDS + ["nesterov", "plain_sgd"]
T_SCALAR, T_GROUP, T_STORED = 300, 120, 100

_CACHE: dict = {}


def cached(kind, method, per_group, T=None, **options):
    T = T if T is not None else T_GROUP if per_group else T_SCALAR
    key = (kind, method, per_group, T, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = run(kind, method, T, per_group, **options)
    return _CACHE[key]


# --- exact vs naive, every schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("per_group", [False, True], ids=["per_step", "per_group"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_exact_matches_naive_for_every_schedule(kind, per_group):
    ex, nv = cached(kind, "exact", per_group), cached(kind, "naive", per_group)
    T = T_GROUP if per_group else T_SCALAR
    # every schedule of the optimiser gets a gradient of the schedule's shape, and so do params0 and the hypers
    opt = get_optimizer(optimizer_name(kind))
    assert set(ex.grads) == set(opt.schedule_names) | {"params0", "l2", "pw"}
    for k in opt.schedule_names:
        assert ex.grads[k].shape == ((T, len(NAMES)) if per_group else (T,)), k
        assert torch.isfinite(ex.grads[k]).all(), k
    assert_grads_close(ex, nv, 1e-8, f"{kind} exact vs naive")
    assert abs(ex.val_loss - nv.val_loss) <= 1e-10 * abs(nv.val_loss)
    assert ex.stats["method"] == "exact" and ex.stats["steps"] == T


@pytest.mark.parametrize("method,options", [("trajectory", {}), ("checkpoint", {"checkpoint_every": 7}),
                                            ("replay", {"replay_k": 3})])
@pytest.mark.parametrize("kind", STORED_KINDS)
def test_stored_state_methods_match_naive(kind, method, options):
    per_group = kind in ("adam", "sgd")          # both shapes of schedule, without running every pair twice
    res, nv = cached(kind, method, per_group, T_STORED, **options), cached(kind, "naive", per_group, T_STORED)
    assert_grads_close(res, nv, 1e-8, f"{kind} {method} vs naive")
    assert res.val_loss == pytest.approx(nv.val_loss, rel=1e-12)


# --- finite differences ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,name,t", [("sgd", "lr", 17), ("adam", "lr", 23), ("adam", "beta1", 11),
                                         ("adam", "beta1", 0)])
def test_finite_differences(kind, name, t):
    """Central differences of the float64 training run (method 'trajectory': no autograd through the unroll) in
    one schedule entry confirm the exact hypergradient (beta1 also reaches the bias corrections 1 − Πβ1)."""
    T, h = 40, 1e-5
    tl, vl, p0, hy = mlp_problem()
    s = schedules(kind, T)
    ex = revsgd.hypergrad(tl, vl, p0, optimizer=kind, hypers=hy, **s)
    vals = []
    for sign in (1, -1):
        s2 = {k: v.clone() for k, v in s.items()}
        s2[name][t] += sign * h
        vals.append(revsgd.hypergrad(tl, vl, p0, optimizer=kind, hypers=hy, method="trajectory", **s2).val_loss)
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(fd) > 1e-4, "the entry must matter for the test to mean anything"
    assert float(ex.grads[name][t]) == pytest.approx(fd, rel=1e-6)


# --- float steps are torch.optim's ------------------------------------------------------------------------------
_P = as_params(params0())


def _grad_fn(w, t):
    w = w.detach().requires_grad_()
    return torch.autograd.grad(train_loss(_P.views(w), hypers(), t), w)[0]


def _torch_run(cls, T, **kw):
    """T steps of a float64 torch.optim optimiser on the MLP's parameters; (flat w_T, optimiser)."""
    ps = [v.clone().requires_grad_() for v in params0().values()]
    o = cls(ps, **kw)
    hy = hypers()
    for t in range(T):
        o.zero_grad()
        train_loss(dict(zip(NAMES, ps)), hy, t).backward()
        o.step()
    return torch.cat([p.detach().reshape(-1) for p in ps]), o


def _torch_state(o, key):
    return torch.cat([o.state[p][key].reshape(-1) for p in o.param_groups[0]["params"]])


TORCH_CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.2, momentum=0.0, weight_decay=0.01)),                      # plain SGD
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.5)),
    ("nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)),
    ("adam", torch.optim.Adam, dict(lr=0.02)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01)),                                                  # wd 0.01
]
STATE_KEYS = {"momentum_buffer": "momentum_buffer", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def _constant_schedules(opt, T, kw):
    kw = dict(kw)
    kw.pop("nesterov", None)
    if "betas" in kw:
        kw["beta1"], kw["beta2"] = kw.pop("betas")
    defaults = getattr(opt, "defaults", {})
    return {k: np.full(T, float(kw[k] if k in kw else defaults[k])) for k in opt.schedule_names}


@pytest.mark.parametrize("name,cls,kw", TORCH_CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TORCH_CASES)])
def test_float_step_is_torch_optim(name, cls, kw):
    T = 30
    ref, o = _torch_run(cls, T, **kw)
    opt = get_optimizer(name)
    traj = float_unroll(opt, _P.flat(), _grad_fn, _constant_schedules(opt, T, kw))
    wT, stT = traj[-1]
    assert rel(wT, _P.flat()) > 0.05, "training must move the weights"
    assert rel(wT, ref) <= 1e-12
    for k in opt.state_names:
        if kw.get("momentum", 1.0) == 0.0:
            continue                                   # plain SGD: torch keeps no buffer
        assert rel(stT[k], _torch_state(o, STATE_KEYS[k])) <= 1e-12, k


def test_float_step_first_buffer_rule():
    """torch.optim.SGD's first step sets the buffer to g' (no dampening); later steps dampen. With dampening 0.9
    a wrong first step would differ by a factor 10."""
    T = 3
    ref, o = _torch_run(torch.optim.SGD, 1, lr=0.05, momentum=0.9, dampening=0.9)
    opt = get_optimizer("sgd")
    traj = float_unroll(opt, _P.flat(), _grad_fn, _constant_schedules(opt, T, dict(lr=0.05, momentum=0.9,
                                                                                     dampening=0.9)))
    g0 = _grad_fn(_P.flat(), 0)
    assert torch.equal(traj[1][1]["momentum_buffer"], g0)
    assert rel(traj[1][0], ref) <= 1e-15
    assert rel(traj[2][1]["momentum_buffer"], 0.9 * g0 + 0.1 * _grad_fn(traj[1][0], 1)) <= 1e-15


def test_heavyball_is_torch_sgd_with_scaled_lr():
    """The 2015 form v ← γv − (1−γ)g, w ← w + αv is torch.optim.SGD(lr=α(1−γ), momentum=γ)."""
    T, a, g = 30, 0.3, 0.9
    ref, _ = _torch_run(torch.optim.SGD, T, lr=a * (1 - g), momentum=g)
    traj = float_unroll(get_optimizer("heavyball"), _P.flat(), _grad_fn,
                        {"lr": np.full(T, a), "momentum": np.full(T, g)})
    assert rel(traj[-1][0], ref) <= 1e-12


@pytest.mark.parametrize("name,cls,kw", [
    ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
])
def test_exact_trajectory_tracks_torch_optim(name, cls, kw):
    """The fixed-point run uses the factors as given (no quantisation): after 300 steps its weights sit within
    1e-12 (relative; measured 5e-15 for Adam/AdamW, 2e-15 for SGD) of float64 torch.optim's."""
    T = 300
    ref, _ = _torch_run(cls, T, **kw)
    kw = {k: v for k, v in kw.items()}
    r = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer=name, hypers=hypers(), steps=T, **kw)
    w = _P.flat([r.params[k] for k in NAMES])
    assert rel(w, _P.flat()) > 0.05
    assert rel(w, ref) <= 1e-12


# --- AdamW's tiny decay and the information held ----------------------------------------------------------------
def test_adamw_tiny_weight_decay_really_decays():
    """lr·weight_decay = 1e-6: a factor 1 − 1e-6 per step, far below any 16-bit quantisation grid. The exact run
    must follow torch.optim.AdamW, whose weights differ clearly (~3e-4) from weight_decay = 0 after 200 steps."""
    T, lr, wd = 200, 1e-3, 1e-3
    ref, _ = _torch_run(torch.optim.AdamW, T, lr=lr, weight_decay=wd)
    ref0, _ = _torch_run(torch.optim.AdamW, T, lr=lr, weight_decay=0.0)
    r = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="adamw", hypers=hypers(), steps=T, lr=lr,
                         weight_decay=wd)
    r0 = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="adamw", hypers=hypers(), steps=T, lr=lr,
                          weight_decay=0.0)
    w = _P.flat([r.params[k] for k in NAMES])
    w0 = _P.flat([r0.params[k] for k in NAMES])
    effect = float((ref - ref0).abs().max())
    assert effect > 1e-4
    assert float((w - ref).abs().max()) <= 1e-6 * effect
    assert float((w - w0).abs().max()) == pytest.approx(effect, rel=1e-6)
    assert r.grads["weight_decay"].abs().sum() > 0


def _lambda(factors: np.ndarray) -> np.ndarray:
    """Σ_t −log2 f_t per group: the information limit of one lane of that group, in bits."""
    return (-np.log2(np.asarray(factors, dtype=np.float64))).sum(0)


def _expected_bits(limits: list, sizes: np.ndarray) -> tuple:
    """(limit, held) over lanes and decaying states: the tape holds Σ h_t = floor(λ) bits per lane (the scale
    e_T = Πf·2^Σh stays in (1/2, 1])."""
    limit = held = 0.0
    for lam in limits:
        lam = np.broadcast_to(lam, sizes.shape)
        frac = lam - np.floor(lam)
        assert np.all((frac > 1e-9) & (frac < 1 - 1e-9)), "pick schedules whose limits are not integers"
        limit += float((lam * sizes).sum())
        held += float((np.floor(lam) * sizes).sum())
    return limit, held


@pytest.mark.parametrize("kind,per_group", [("adam", False), ("adam", True), ("adamw", False), ("adamw", True)])
def test_info_bits_at_the_information_limit(kind, per_group):
    T = 100
    s = {k: v.numpy() for k, v in schedules(kind, T, per_group).items()}
    r = run(kind, "exact", T, per_group)
    sizes = _P.sizes
    lims = [_lambda(s["beta1"]), _lambda(s["beta2"])]
    if kind == "adamw":
        lims.append(_lambda(1.0 - s["lr"] * s["weight_decay"]))
    limit, held = _expected_bits(lims, sizes)
    info = r.stats["info_bits"]
    per_lane = limit / sizes.sum()
    assert 1 - len(lims) / per_lane < info / limit <= 1.001   # at most one bit per lane and state short
    assert limit - info < len(lims) * sizes.sum()
    assert info == held
    assert r.stats["tape_bytes"] > 0


def test_info_bits_momentum_first_step_stores_nothing():
    """torch's SGD buffer starts empty: step 0 fills it and nothing decays. A momentum of 1/4 at step 0 (2 bits per
    lane if it were applied) must not reach the tape; heavyball applies every factor."""
    T = 60
    s = schedules("sgd", T)
    s["momentum"][0] = 0.25
    r = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), **s)
    L = int(_P.sizes.sum())
    assert r.stats["info_bits"] == L * math.floor(_lambda(s["momentum"][1:].numpy()))
    h = schedules("heavyball", T)
    h["momentum"][0] = 0.25
    r = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="heavyball", hypers=hypers(), **h)
    assert r.stats["info_bits"] == L * math.floor(_lambda(h["momentum"].numpy()))


# --- closed-form adjoints ---------------------------------------------------------------------------------------
def _random_case(kind: str, per_lane: bool, seed: int):
    """A prepared optimiser, step inputs and cotangents, and hypers (floats or per-lane tensors) in range."""
    opt = get_optimizer(optimizer_name(kind))
    L = 13
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(L, generator=g, dtype=F64)  # noqa: E731
    # prepare() runs check(), which tells SGD whether it is plain
    sch = Schedules({k: np.full(4, 0.5 * (lo + hi)) for k, (lo, hi) in RANGES[kind].items()}, np.array([L]),
                    torch.device("cpu"))
    opt.prepare(sch, exact=False)
    ranges = dict(RANGES[kind])
    if opt.name in ("adam", "adamw"):
        ranges.update(bc1=(0.1, 1.0), bc2=(0.01, 1.0))
    hp = {}
    for k, (lo, hi) in ranges.items():
        if lo == hi:
            hp[k] = lo
        elif per_lane:
            hp[k] = u(lo, hi)
        else:
            hp[k] = float(u(lo, hi)[0])
    w, gr, dw = (torch.randn(L, generator=g, dtype=F64) for _ in range(3))
    st = {k: (u(0.01, 2.0) if k == "exp_avg_sq" else torch.randn(L, generator=g, dtype=F64))
          for k in opt.state_names}
    dst = {k: torch.randn(L, generator=g, dtype=F64) for k in opt.state_names}
    return opt, hp, w, st, gr, dw, dst


def _total(x, like):
    """A contribution (tensor, tuple of factors, or None) as the adjoint of hyper value ``like``: summed over lanes
    for a scalar hyper, per lane for a per-lane one."""
    if x is None:
        return torch.zeros(()) if not isinstance(like, torch.Tensor) else torch.zeros_like(like)
    x = contribution(x)
    if not isinstance(like, torch.Tensor) or like.dim() == 0:
        return torch.as_tensor(x).sum()
    return x


@pytest.mark.parametrize("t", [0, 5])
@pytest.mark.parametrize("per_lane", [False, True], ids=["scalar_hypers", "per_lane_hypers"])
@pytest.mark.parametrize("kind", STORED_KINDS)
def test_closed_form_adjoint_equals_autograd_default(kind, per_lane, t):
    for seed in range(3):
        opt, hp, w, st, g, dw, dst = _random_case(kind, per_lane, 1000 * seed + t)
        assert type(opt).adjoint is not ReversibleOptimizer.adjoint, "built-ins have closed forms"
        w1, st1 = opt.float_step(w, st, g, hp, t)
        # each call gets its own g, dw and dst: an adjoint may overwrite them (they are the sweep's buffers)
        mine = lambda: (g.clone(), dw.clone(), {k: v.clone() for k, v in dst.items()})  # noqa: E731
        g1, dw1, dst1 = mine()
        got = opt.adjoint(t, w, st, g1, w1, st1, dw1, dst1, hp)
        g2, dw2, dst2 = mine()
        want = ReversibleOptimizer.adjoint(opt, t, w, st, g2, w1, st1, dw2, dst2, hp)
        for name, a, b in (("dw", got[0], want[0]), ("dg", got[2], want[2])):
            assert torch.allclose(torch.as_tensor(a, dtype=F64).expand_as(b), b, rtol=1e-12, atol=1e-13), name
        for k in opt.state_names:
            assert torch.allclose(got[1][k], want[1][k], rtol=1e-12, atol=1e-13), k
        assert set(got[3]) <= set(hp)
        for k in hp:
            a = _total(got[3].get(k), hp[k])
            b = _total(want[3].get(k), hp[k])
            assert torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=1e-11,
                                  atol=1e-13), (kind, t, k, a, b)


# --- bad input --------------------------------------------------------------------------------------------------
def _bad(kind, T=8, **override):
    """Call hypergrad with schedules(kind) updated by ``override``; returns (exception info, loss, p0, sched)."""
    loss = CountingLoss(train_loss)
    p0 = params0()
    before = {k: v.clone() for k, v in p0.items()}
    s = schedules(kind, T)
    s.update(override)
    s_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
    with pytest.raises((ValueError, TypeError)) as e:
        revsgd.hypergrad(loss, val_loss, p0, optimizer=optimizer_name(kind), hypers=hypers(),
                         method="checkpoint" if kind == "nesterov" else "exact",
                         **{k: v for k, v in s.items() if v is not None})
    # nothing ran and nothing changed
    assert loss.calls == 0
    for k in before:
        assert torch.equal(p0[k], before[k])
    for k, v in s_before.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(s[k], v, rtol=0, atol=0, equal_nan=True)
    return e


def _full(T, v):
    return torch.full((T,), v, dtype=F64)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("beta", ["beta1", "beta2"])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan")])
def test_bad_beta(kind, beta, value):
    bad = _full(8, 0.9)
    bad[3] = value
    e = _bad(kind, **{beta: bad})
    assert beta in str(e.value)


@pytest.mark.parametrize("kind", ["heavyball", "sgd", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_bad_lr(kind, value):
    """torch.optim refuses a negative learning rate for every optimiser; so must revsgd."""
    lr = schedules(kind, 8)["lr"]
    lr[2] = value
    e = _bad(kind, lr=lr)
    assert e.type is ValueError and "lr" in str(e.value)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("value", [0.0, -1e-8, float("inf"), float("nan")])
def test_bad_eps(kind, value):
    eps = _full(8, 1e-8)
    eps[5] = value
    e = _bad(kind, eps=eps)
    assert e.type is ValueError and "eps" in str(e.value)


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("value", [-1e-3, float("inf"), float("nan")])
def test_bad_weight_decay(kind, value):
    wd = _full(8, 1e-3)
    wd[1] = value
    e = _bad(kind, weight_decay=wd)
    assert e.type is ValueError and "weight_decay" in str(e.value)


def test_adamw_decay_factor_must_stay_positive():
    e = _bad("adamw", lr=_full(8, 0.5), weight_decay=_full(8, 2.0))
    assert "weight_decay" in str(e.value)


@pytest.mark.parametrize("kind,name,value", [("heavyball", "momentum", 1.5), ("heavyball", "momentum", -0.5),
                                             ("sgd", "momentum", 1.5), ("sgd", "dampening", 1.5),
                                             ("sgd", "dampening", -0.5), ("nesterov", "dampening", 0.1)])
def test_bad_unit_interval_schedules(kind, name, value):
    s = _full(8, 0.5 if name == "momentum" else 0.0)
    s[4] = value
    e = _bad(kind, **{name: s})
    assert e.type is ValueError and name in str(e.value)


@pytest.mark.parametrize("kind", ["sgd", "adam", "heavyball"])
def test_bad_schedule_shapes(kind):
    T = 8
    # wrong number of columns, a third dimension, a length differing from the other schedules
    for bad in (torch.full((T, len(NAMES) + 1), 0.01, dtype=F64), torch.full((T, len(NAMES), 1), 0.01, dtype=F64),
                torch.full((T + 1,), 0.01, dtype=F64), torch.zeros(0, dtype=F64)):
        e = _bad(kind, lr=bad)
        assert e.type is ValueError and ("lr" in str(e.value) or "steps" in str(e.value)), bad.shape


def test_bad_steps_disagree_with_schedules():
    loss = CountingLoss(train_loss)
    with pytest.raises(ValueError, match="steps"):
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), lr=_full(8, 0.1),
                         momentum=0.9, steps=9)
    with pytest.raises(ValueError, match="steps"):
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), lr=0.1, momentum=0.9)
    assert loss.calls == 0


@pytest.mark.parametrize("kind,option,value", [
    ("sgd", "betas", (0.9, 0.99)), ("sgd", "beta1", 0.9), ("sgd", "eps", 1e-8), ("heavyball", "weight_decay", 0.1),
    ("heavyball", "dampening", 0.1), ("adam", "momentum", 0.9), ("adam", "dampening", 0.1),
    ("adamw", "momentum", 0.9)])
def test_option_of_another_optimizer(kind, option, value):
    e = _bad(kind, **{option: value})
    assert e.type is TypeError
    assert (option if option != "betas" else "beta1") in str(e.value)


def test_betas_given_twice():
    e = _bad("adam", betas=(0.9, 0.99), beta1=0.9)
    assert e.type is TypeError and "beta1" in str(e.value)


@pytest.mark.parametrize("method", ["exact", "checkpoint", "naive"])
def test_momentum_mixing_zero_and_nonzero(method):
    loss = CountingLoss(train_loss)
    mom = _full(8, 0.9)
    mom[3] = 0.0
    with pytest.raises(ValueError, match="momentum"):
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), lr=0.1, momentum=mom,
                         method=method)
    assert loss.calls == 0


# --- exact refused where nothing is reversible -------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 8])
def test_exact_refused_for_plain_sgd(T):
    loss = CountingLoss(train_loss)
    with pytest.raises(ValueError) as e:
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), lr=0.1, momentum=0.0, steps=T)
    assert "plain SGD" in str(e.value) and ("checkpoint" in str(e.value) or "replay" in str(e.value))
    assert loss.calls == 0


def test_exact_refused_for_nesterov():
    loss = CountingLoss(train_loss)
    with pytest.raises(ValueError) as e:
        revsgd.hypergrad(loss, val_loss, params0(), optimizer="nesterov", hypers=hypers(), lr=0.1, momentum=0.9,
                         steps=8)
    assert "nesterov" in str(e.value) and "checkpoint" in str(e.value)
    assert loss.calls == 0


@pytest.mark.parametrize("kind", ["plain_sgd", "nesterov"])
def test_plain_sgd_and_nesterov_run_with_stored_state_methods(kind):
    nv = run(kind, "naive", 30)
    for m in ("checkpoint", "replay"):
        assert_grads_close(run(kind, m, 30), nv, 1e-8, f"{kind} {m}")


# --- a new optimiser from the primitives (the README example) ---------------------------------------------------
class DecayedMomentum(ReversibleOptimizer):
    """v ← γ v + g;  w ← w − α v  (torch.optim.SGD without dampening and without its first-step rule).

    The float side is one differentiable torch step; the adjoint comes from autograd (the base class). The exact
    side keeps v rescaled: v_t = e_t · V̂_t · 2^-F, where the engine computed the scales e_t and the shifts h_t of
    the decay γ once per run (``plan.decay["velocity"]``). One exact step is

        V̂ ← shift(V̂, h_t)            the decay: exact power-of-two shift, the bits shifted out go on the tape
        V̂ += fix(g / e_{t+1})         an addition, undone by subtracting the same integers
        W −= fix(α · v_{t+1})          computed from V̂_{t+1}, still known when the step is undone

    and the undo runs it backwards: position first (from the state at t+1), then — given g_t — the state.
    """
    name = "decayed_momentum"
    schedule_names = ("lr", "momentum")
    state_names = ("velocity",)
    default_frac = {"velocity": 52}

    def check(self, sch):
        m = sch.host["momentum"]
        if not np.all((m > 0) & (m <= 1)):
            raise ValueError("momentum must lie in (0, 1]")

    def decay_factors(self, sch):
        return {"velocity": sch.host["momentum"]}

    def float_step(self, w, st, g, hp, t):
        v = hp["momentum"] * st["velocity"] + g
        return w - hp["lr"] * v, {"velocity": v}

    # exact side
    def _scale(self, plan, t):
        return plan.lanes(plan.decay["velocity"].e[t])         # a float, or one value per lane

    def _position_update(self, ex, t, plan):
        v1 = ex.X["velocity"].to(torch.float64) * 2.0 ** -self.frac["velocity"] * self._scale(plan, t + 1)
        return plan.sch.at("lr", t) * v1

    def exact_step(self, ex: ExactState, g, t, plan):
        ex.shift("velocity", plan.decay["velocity"].h[t], forward=True)
        ex.add("velocity", g.to(torch.float64) / self._scale(plan, t + 1), +1)
        ex.add("params", self._position_update(ex, t, plan), -1)

    def exact_undo_position(self, ex: ExactState, t, plan):
        ex.add("params", self._position_update(ex, t, plan), +1)

    def exact_undo_state(self, ex: ExactState, g, t, plan):
        ex.add("velocity", g.to(torch.float64) / self._scale(plan, t + 1), -1)
        ex.shift("velocity", plan.decay["velocity"].h[t], forward=False)


def _custom_schedules(T, per_group=False):
    s = schedules("heavyball", T, per_group)
    return {"lr": 0.1 * s["lr"], "momentum": s["momentum"]}


def test_custom_optimizer_float_side_and_default_adjoint():
    """The float step and the autograd default adjoint, through the stored-state methods."""
    tl, vl, p0, hy = mlp_problem()
    s = _custom_schedules(50)
    nv = revsgd.hypergrad(tl, vl, p0, optimizer=DecayedMomentum(), hypers=hy, method="naive", **s)
    tr = revsgd.hypergrad(tl, vl, p0, optimizer=DecayedMomentum(), hypers=hy, method="trajectory", **s)
    assert_grads_close(tr, nv, 1e-10, "custom trajectory vs naive")
    # the float step really is v ← γv + g, w ← w − αv: torch.optim.SGD(momentum=γ, dampening=0) after step 0
    opt = DecayedMomentum()
    T = 20
    traj = float_unroll(opt, _P.flat(), _grad_fn, {"lr": np.full(T, 0.05), "momentum": np.full(T, 0.9)})
    ref, _ = _torch_run(torch.optim.SGD, T, lr=0.05, momentum=0.9)
    assert rel(traj[-1][0], ref) <= 1e-12


@pytest.mark.parametrize("per_group", [False, True], ids=["per_step", "per_group"])
def test_custom_optimizer_exact_from_primitives(per_group):
    """Written with ExactState.shift / ExactState.add only, the optimiser reverses exactly and matches naive."""
    tl, vl, p0, hy = mlp_problem()
    s = _custom_schedules(50, per_group)
    assert DecayedMomentum().supports_exact
    nv = revsgd.hypergrad(tl, vl, p0, optimizer=DecayedMomentum(), hypers=hy, method="naive", **s)
    ex = revsgd.hypergrad(tl, vl, p0, optimizer=DecayedMomentum(), hypers=hy, method="exact", **s)
    assert_grads_close(ex, nv, 1e-8, "custom exact vs naive")
    assert ex.val_loss == pytest.approx(nv.val_loss, rel=1e-12)
    mom = s["momentum"].numpy()
    assert ex.stats["info_bits"] == pytest.approx(
        float((np.floor(_lambda(mom)) * (_P.sizes if per_group else _P.sizes.sum())).sum()), abs=0)


# --- the README's example, verbatim ------------------------------------------------------------------------------
class Momentum(ReversibleOptimizer):          # b ← γ b + g;  w ← w − α b
    name = "momentum_demo"; schedule_names = ("lr", "gamma"); state_names = ("buf",)  # noqa: E702
    default_frac = {"buf": 52}
    def decay_factors(self, sch): return {"buf": sch.host["gamma"]}  # noqa: E301, E704
    def float_step(self, w, st, g, hp, t):  # noqa: E301
        b = hp["gamma"] * st["buf"] + g
        return w - hp["lr"] * b, {"buf": b}
    def _u(self, ex, plan, t):                # the values each undo needs, from state that is still known  # noqa
        e = plan.decay["buf"].e
        return plan.lanes(e[t + 1]), plan.lanes(plan.sch.grid("lr")[t] * e[t + 1])
    def exact_step(self, ex, g, t, plan):  # noqa: E301
        e1, ae = self._u(ex, plan, t)
        with ex.transaction():
            ex.shift("buf", plan.decay["buf"].h[t], True); ex.on_abort(lambda: ex.shift("buf", plan.decay["buf"].h[t], False))  # noqa
            ex.add("buf", g / e1, +1); ex.on_abort(lambda: ex.add("buf", g / e1, -1))  # noqa: E702
            ex.add("params", -ae * ex.state_float("buf"), +1)
    def exact_undo_position(self, ex, t, plan):  # noqa: E301
        e1, ae = self._u(ex, plan, t)
        ex.add("params", -ae * ex.state_float("buf"), -1)
    def exact_undo_state(self, ex, g, t, plan):  # noqa: E301
        e1, _ = self._u(ex, plan, t)
        ex.add("buf", g / e1, -1); ex.shift("buf", plan.decay["buf"].h[t], False)  # noqa: E702


@pytest.mark.parametrize("form", ["numbers", "per_group_tensors"])
def test_readme_optimizer_example(form):
    """The README's "Adding an optimiser" class as printed there: its own schedule name (gamma) as a keyword
    argument, exact reversal equal to naive autograd, and the float step is torch.optim.SGD(momentum=γ,
    dampening=0) after its first step."""
    T = 40
    tl, vl, p0, hy = mlp_problem()
    if form == "numbers":
        kw = dict(lr=0.02, gamma=0.9, steps=T)
    else:
        s = schedules("heavyball", T, per_group=True)
        kw = dict(lr=0.1 * s["lr"], gamma=s["momentum"])
    nv = revsgd.hypergrad(tl, vl, p0, optimizer=Momentum(), hypers=hy, method="naive", **kw)
    ex = revsgd.hypergrad(tl, vl, p0, optimizer=Momentum(), hypers=hy, **kw)
    assert set(ex.grads) == {"lr", "gamma", "params0", "l2", "pw"}
    assert ex.grads["gamma"].shape == ((T,) if form == "numbers" else (T, len(NAMES)))
    assert_grads_close(ex, nv, 1e-8, "README Momentum exact vs naive")
    assert ex.stats["info_bits"] > 0
    traj = float_unroll(Momentum(), _P.flat(), _grad_fn, {"lr": np.full(20, 0.05), "gamma": np.full(20, 0.9)})
    ref, _ = _torch_run(torch.optim.SGD, 20, lr=0.05, momentum=0.9)
    assert rel(traj[-1][0], ref) <= 1e-12
