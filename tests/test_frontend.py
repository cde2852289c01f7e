"""The torch front end (docs/design.md §7): inputs, nn.Module models with BatchNorm and dropout, the context form.

- params0 as a dict, a list (names "0", "1", …) or an nn.Module (frozen parameters excluded and untouched); one
  dtype (mixed dtypes: TypeError); schedules as numbers with ``steps=``, 0-d tensors, (T,) and (T, G) tensors,
  NumPy arrays, float32 tensors; hypers as Python floats — all the same run;
- BatchNorm models (an MLP with BatchNorm1d and a CNN with BatchNorm2d, both with Dropout, float64): the exact
  hypergradient equals naive autograd, where the running statistics are part of the unrolled graph, to 1e-8;
  afterwards the module holds what training leaves: buffers identical bit for bit between the methods that run the
  same float64 forward pass (naive, trajectory, checkpoint, replay) and between two exact runs (function form and
  context form: the fixed-point forward pass), within 1e-12 of a plain torch.optim training loop with torch's own
  BatchNorm update; num_batches_tracked = start + T; the reported validation loss is the module's eval-mode loss;
- unsupported buffers are errors that name them, and leave the module usable;
- dropout with the automatic per-step seed reverses; with ``seed=None`` it is a ReversalError at the first step;
- ``revsgd.reversible`` gives the function form's results bit for bit, sets ``.grad`` where asked, leaves the model
  as plain training does, and refuses misuse.
"""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import revsgd
from revsgd import ReversalError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/ (pytest runs with importlib mode)
from helpers import (F64, NAMES, XV, YV, CountingLoss, assert_grads_close, batch, grad_items, hypers,  # noqa: E402
                     mlp_problem, params0, rel, run, schedules, train_loss, val_loss)


# --- params0 -------------------------------------------------------------------------------------------------
def test_params0_as_list_is_the_dict_run():
    T = 20
    ref = run("sgd", "exact", T)
    p = params0()

    def tl(q, h, t):
        return train_loss(dict(zip(NAMES, (q["0"], q["1"], q["2"], q["3"]))), h, t)

    def vl(q, h):
        return val_loss(dict(zip(NAMES, (q["0"], q["1"], q["2"], q["3"]))), h)

    res = revsgd.hypergrad(tl, vl, [p[k] for k in NAMES], optimizer="sgd", hypers=hypers(), **schedules("sgd", T))
    assert list(res.params) == ["0", "1", "2", "3"] and list(res.grads["params0"]) == ["0", "1", "2", "3"]
    for i, k in enumerate(NAMES):
        assert torch.equal(res.params[str(i)], ref.params[k])
        assert torch.equal(res.grads["params0"][str(i)], ref.grads["params0"][k])
    assert torch.equal(res.grads["lr"], ref.grads["lr"])


def test_params0_untouched_by_a_run():
    p = params0()
    before = {k: v.clone() for k, v in p.items()}
    res = revsgd.hypergrad(train_loss, val_loss, p, optimizer="adam", hypers=hypers(), **schedules("adam", 10))
    for k in NAMES:
        assert torch.equal(p[k], before[k])
        assert not torch.equal(res.params[k], before[k])


class TinyNet(nn.Module):
    def __init__(self, frozen: bool):
        super().__init__()
        g = torch.Generator().manual_seed(99)
        self.W0 = nn.Parameter(params0()["W0"])
        self.b0 = nn.Parameter(params0()["b0"])
        self.W1 = nn.Parameter(params0()["W1"], requires_grad=not frozen)
        self.b1 = nn.Parameter(params0()["b1"])
        self.scale = nn.Parameter(1.0 + 0.1 * torch.rand(D_OUT, generator=g, dtype=F64), requires_grad=False)

    def forward(self, x):
        return (torch.tanh(x @ self.W0 + self.b0) @ self.W1 + self.b1) * self.scale


D_OUT = 2


def test_params0_as_module_frozen_parameters_excluded_and_untouched():
    T = 20
    net = TinyNet(frozen=True)
    frozen = {"W1": net.W1.detach().clone(), "scale": net.scale.detach().clone()}
    ids = {k: id(v) for k, v in net.named_parameters()}

    def tl(p, h, t):
        x, y = batch(t)
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    def vl(p, h):
        return ((functional_call(net, p, (XV,)) - YV) ** 2).mean()

    res = revsgd.hypergrad(tl, vl, net, optimizer="sgd", **schedules("sgd", T))
    assert set(res.params) == set(res.grads["params0"]) == {"W0", "b0", "b1"}
    assert torch.equal(net.W1.detach(), frozen["W1"]) and torch.equal(net.scale.detach(), frozen["scale"])
    assert {k: id(v) for k, v in net.named_parameters()} == ids, "the module keeps its Parameter objects"
    assert not net.W1.requires_grad and net.W0.requires_grad
    for k in ("W0", "b0", "b1"):
        assert torch.equal(getattr(net, k).detach(), res.params[k]), "the module holds w_T"
    # the same run on a dict with the frozen tensors as constants
    def tl2(p, h, t):
        return tl({**p, "W1": frozen["W1"]}, h, t)

    def vl2(p, h):
        return vl({**p, "W1": frozen["W1"]}, h)

    p0 = {k: params0()[k] for k in ("W0", "b0", "b1")}
    ref = revsgd.hypergrad(tl2, vl2, p0, optimizer="sgd", **schedules("sgd", T))
    for k in ("W0", "b0", "b1"):
        assert torch.equal(res.grads["params0"][k], ref.grads["params0"][k])


def test_module_without_trainable_parameters_is_refused():
    net = TinyNet(frozen=True)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        revsgd.hypergrad(lambda p, h, t: p["W0"].sum(), lambda p, h: p["W0"].sum(), net, lr=0.1, momentum=0.9,
                         steps=3)


@pytest.mark.parametrize("form", ["dict", "list", "module"])
def test_mixed_dtypes_are_a_type_error(form):
    p = params0()
    p["b0"] = p["b0"].float()
    if form == "module":
        net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
        arg = net
    else:
        arg = p if form == "dict" else list(p.values())
    loss = CountingLoss(lambda q, h, t: sum(v.double().sum() for v in q.values()))
    with pytest.raises(TypeError, match="dtype"):
        revsgd.hypergrad(loss, lambda q, h: sum(v.double().sum() for v in q.values()), arg, lr=0.1, momentum=0.9,
                         steps=3)
    assert loss.calls == 0


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=F64), 3.0, "W0", None])
def test_params0_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="params0"):
        revsgd.hypergrad(train_loss, val_loss, bad, lr=0.1, momentum=0.9, steps=3)


def test_integer_params_refused():
    with pytest.raises(TypeError, match="float"):
        revsgd.hypergrad(lambda p, h, t: (p["w"].double() ** 2).sum(), lambda p, h: p["w"].double().sum(),
                         {"w": torch.arange(3)}, lr=0.1, momentum=0.9, steps=3)


# --- schedules and hypers in every form ---------------------------------------------------------------------------
T_FORMS = 15


def _forms_ref():
    return revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=hypers(),
                            lr=torch.full((T_FORMS,), 0.1, dtype=F64), momentum=torch.full((T_FORMS,), 0.9, dtype=F64),
                            dampening=torch.zeros(T_FORMS, dtype=F64), weight_decay=torch.zeros(T_FORMS, dtype=F64))


@pytest.mark.parametrize("form", ["floats", "0-d tensors", "numpy", "lists", "per_group"])
def test_schedule_forms_are_the_same_run(form):
    ref = _forms_ref()
    T, G = T_FORMS, len(NAMES)
    if form == "floats":
        kw = dict(lr=0.1, momentum=0.9, steps=T)
    elif form == "0-d tensors":
        kw = dict(lr=torch.tensor(0.1, dtype=F64), momentum=torch.tensor(0.9, dtype=F64), steps=T)
    elif form == "numpy":
        kw = dict(lr=np.full(T, 0.1), momentum=np.full(T, 0.9))
    elif form == "lists":
        kw = dict(lr=[0.1] * T, momentum=[0.9] * T)
    else:
        kw = dict(lr=torch.full((T, G), 0.1, dtype=F64), momentum=torch.full((T, G), 0.9, dtype=F64))
    res = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), **kw)
    for k in NAMES:
        assert torch.equal(res.params[k], ref.params[k])          # the same (exact) training run
        if form == "per_group":   # per-lane hypers take a differently fused float path in the adjoint
            assert torch.allclose(res.grads["params0"][k], ref.grads["params0"][k], rtol=1e-12, atol=1e-15)
        else:
            assert torch.equal(res.grads["params0"][k], ref.grads["params0"][k])
    for k in ("lr", "momentum"):
        g = res.grads[k]
        assert isinstance(g, torch.Tensor) and g.dtype == F64
        if form == "per_group":
            assert g.shape == (T, G)
            assert torch.allclose(g.sum(1), ref.grads[k], rtol=1e-12, atol=1e-15)
        else:
            assert g.shape == (T,)
            assert torch.equal(g, ref.grads[k])


def test_float32_schedule_tensors_get_float32_gradients():
    ref = _forms_ref()
    lr = torch.full((T_FORMS,), 0.1, dtype=torch.float32)
    res = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), lr=lr, momentum=0.9)
    assert res.grads["lr"].dtype == torch.float32 and res.grads["lr"].shape == (T_FORMS,)
    # float32(0.1) is a different learning rate: the same function, evaluated there
    assert rel(res.grads["lr"], ref.grads["lr"]) < 1e-5


def test_hypers_as_python_floats():
    h = hypers()
    a = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=h, **schedules("sgd", 20))
    b = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd",
                         hypers={"l2": float(h["l2"]), "pw": h["pw"]}, **schedules("sgd", 20))
    assert isinstance(b.grads["l2"], torch.Tensor) and b.grads["l2"].shape == () and b.grads["l2"].dtype == F64
    assert torch.equal(a.grads["l2"], b.grads["l2"]) and torch.equal(a.grads["lr"], b.grads["lr"])


@pytest.mark.parametrize("name", ["lr", "params0"])
def test_hyper_names_must_not_clash_with_result_keys(name):
    with pytest.raises(ValueError, match=name):
        revsgd.hypergrad(train_loss, val_loss, params0(), hypers={**hypers(), name: 1.0}, lr=0.1, momentum=0.9,
                         steps=3)


# --- bad losses and options (carried over from the original suite) -------------------------------------------------
def _call(**kw):
    args = dict(train_loss=train_loss, val_loss=val_loss, params0=params0(), hypers=hypers(), optimizer="sgd",
                **schedules("sgd", 6))
    args.update(kw)
    return revsgd.hypergrad(args.pop("train_loss"), args.pop("val_loss"), args.pop("params0"), **args)


@pytest.mark.parametrize("method", ["exact", "naive", "trajectory"])
def test_non_scalar_train_loss(method):
    def vector_loss(p, h, t):
        x, y = batch(t)
        return ((torch.tanh(x @ p["W0"] + p["b0"]) @ p["W1"] + p["b1"] - y) ** 2).mean(1)

    with pytest.raises(ValueError, match="scalar"):
        _call(train_loss=vector_loss, method=method)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["exact", "naive"])
def test_non_finite_train_loss(bad, method):
    """A training loss that is inf or NaN at one step (here with a finite gradient) is an error, as in the
    original suite: it almost always means a broken loss, and the run cannot be a meaningful training run."""
    def broken(p, h, t):
        loss = train_loss(p, h, t)
        return loss + bad if t == 3 else loss

    with pytest.raises(ValueError, match="(?i)non-finite|nan"):
        _call(train_loss=broken, method=method)


@pytest.mark.parametrize("method", ["exact", "naive", "replay"])
def test_non_finite_val_loss(method):
    with pytest.raises(ValueError, match="non-finite"):
        _call(val_loss=lambda p, h: (p["W0"] ** 2).sum() * float("inf"), method=method)


@pytest.mark.parametrize("method,opts,exc", [
    ("adam", {}, ValueError),                                    # not a method
    ("exact", {"checkpoint_every": 2}, TypeError), ("exact", {"foo": 1}, TypeError),
    ("naive", {"backend": "numpy"}, TypeError), ("checkpoint", {"truncate": 2}, TypeError),
    ("checkpoint", {"checkpoint_every": 0}, ValueError), ("checkpoint", {"checkpoint_every": 2.5}, ValueError),
    ("replay", {"replay_k": 1}, ValueError), ("truncated", {"truncate": 0}, ValueError),
    ("exact", {"frac_bits": 12}, ValueError), ("exact", {"backend": "fortran"}, ValueError),
])
def test_bad_method_options(method, opts, exc):
    loss = CountingLoss(train_loss)
    with pytest.raises(exc):
        _call(train_loss=loss, method=method, **opts)
    assert loss.calls == 0


@pytest.mark.parametrize("kind", ["scalar", "per_group"])
def test_float32_model_reverses(kind):
    tl, vl, p0, hy = mlp_problem(torch.float32)
    s = schedules("heavyball", 30, kind == "per_group")
    ex = revsgd.hypergrad(tl, vl, p0, optimizer="heavyball", hypers=hy, **s)
    nv = revsgd.hypergrad(tl, vl, p0, optimizer="heavyball", hypers=hy, method="naive", **s)
    for k in NAMES:
        assert ex.params[k].dtype == torch.float32 and ex.grads["params0"][k].dtype == torch.float32
    assert ex.grads["l2"].dtype == torch.float32
    assert_grads_close(ex, nv, 1e-4, "float32 exact vs naive")


# --- BatchNorm models ------------------------------------------------------------------------------------------
_g = torch.Generator().manual_seed(5)
XI = torch.randn(64, 1, 6, 6, generator=_g, dtype=F64)
YI = torch.randint(0, 3, (64,), generator=_g)
XIV = torch.randn(24, 1, 6, 6, generator=_g, dtype=F64)
YIV = torch.randint(0, 3, (24,), generator=_g)
START = 5   # num_batches_tracked before training


def _idx(t):
    return torch.from_numpy(np.random.default_rng([3, t]).choice(64, 8, replace=False))


def bn_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, momentum=0.2), nn.Tanh(), nn.Dropout(0.2),
                        nn.Linear(6, 2)).double()
    net[1].num_batches_tracked.fill_(START)
    return net


def bn_cnn():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                        nn.Linear(48, 3)).double()
    net[1].num_batches_tracked.fill_(START)
    return net


MODELS = {"mlp": bn_mlp, "cnn": bn_cnn}


def data(kind, t=None):
    if kind == "mlp":
        return batch(t) if t is not None else (XV, YV)
    return (XI[_idx(t)], YI[_idx(t)]) if t is not None else (XIV, YIV)


def crit(kind, out, y):
    return ((out - y) ** 2).mean() if kind == "mlp" else F.cross_entropy(out, y)


def module_losses(kind, net):
    """The function form's losses for a module (torch.func.functional_call), training mode for training."""
    def tl(p, h, t):
        x, y = data(kind, t)
        net.train()
        return crit(kind, functional_call(net, p, (x,)), y) + h["l2"] * sum((v ** 2).sum() for v in p.values())

    def vl(p, h):
        x, y = data(kind)
        net.eval()
        return crit(kind, functional_call(net, p, (x,)), y)
    return tl, vl


T_BN = 30
BN_SCHED = dict(optimizer="sgd", lr=torch.full((T_BN,), 0.1, dtype=F64), momentum=0.9, dampening=0.1)
_BN: dict = {}


def bn_run(kind, method):
    if (kind, method) not in _BN:
        net = MODELS[kind]()
        tl, vl = module_losses(kind, net)
        res = revsgd.hypergrad(tl, vl, net, hypers={"l2": 1e-3}, method=method, **BN_SCHED)
        _BN[kind, method] = (res, net)
    return _BN[kind, method]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["exact", "trajectory", "checkpoint", "replay"])
def test_batchnorm_hypergradients_equal_naive(kind, method):
    """Naive autograd unrolls the running statistics too (R ← (1−m)R + m·batch statistics, differentiable), so
    hypergradients that flow through R_T into the eval-mode validation loss are included on both sides."""
    res, _ = bn_run(kind, method)
    nv, _ = bn_run(kind, "naive")
    assert_grads_close(res, nv, 1e-8, f"{kind} {method} vs naive")
    assert res.val_loss == pytest.approx(nv.val_loss, rel=1e-12)


def test_batchnorm_hypergradient_matches_finite_differences():
    """Central differences of the float64 run (method 'trajectory') in one lr entry confirm the exact
    hypergradient of the BatchNorm MLP (with dropout). About 6 % of this entry flows through the running
    statistics R_T into the eval-mode validation loss (measured by dropping that path), far above the tolerance."""
    t, h = 12, 1e-5

    def go(lr, method):
        net = bn_mlp()
        tl, vl = module_losses("mlp", net)
        return revsgd.hypergrad(tl, vl, net, hypers={"l2": 1e-3}, method=method,
                                **{**BN_SCHED, "lr": lr})

    lr = BN_SCHED["lr"]
    vals = []
    for sign in (1, -1):
        lr2 = lr.clone()
        lr2[t] += sign * h
        vals.append(go(lr2, "trajectory").val_loss)
    fd = (vals[0] - vals[1]) / (2 * h)
    ex, _ = bn_run("mlp", "exact")
    assert float(ex.grads["lr"][t]) == pytest.approx(fd, rel=1e-6)


def _torch_reference(kind):
    """Plain training: torch.optim.SGD on the module, torch's own BatchNorm update, dropout seeded as revsgd
    seeds it (revsgd.seeded(0, t))."""
    net = MODELS[kind]()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    for t in range(T_BN):
        x, y = data(kind, t)
        net.train()
        with revsgd.seeded(0, t):
            loss = crit(kind, net(x), y) + 1e-3 * sum((v ** 2).sum() for v in net.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batchnorm_module_left_as_training_leaves_it(kind):
    ref = _torch_reference(kind)
    float_nets = {m: bn_run(kind, m)[1] for m in ("naive", "trajectory", "checkpoint", "replay")}
    ex_res, ex_net = bn_run(kind, "exact")
    bn = ex_net[1]
    assert int(bn.num_batches_tracked) == START + T_BN
    # the float64 forward passes are one computation: identical bits
    base = float_nets["trajectory"]
    for m, net in float_nets.items():
        for (name, a), (_, b) in zip(net.state_dict().items(), base.state_dict().items()):
            assert torch.equal(a, b), (m, name)
    # torch's own BatchNorm kernel rounds differently; the fixed-point run stays within 1e-12 of both
    for net in (base, ex_net):
        for (name, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
            if a.is_floating_point():
                assert rel(a, b) <= 1e-12, name
            else:
                assert torch.equal(a, b), name
    for net, res in [(ex_net, ex_res)] + [(float_nets[m], bn_run(kind, m)[0]) for m in float_nets]:
        x, y = data(kind)
        net.eval()
        with torch.no_grad():
            assert crit(kind, net(x), y).item() == res.val_loss, "the reported loss is the module's eval loss"
        for k, v in res.params.items():
            assert torch.equal(net.get_parameter(k).detach(), v), k


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_buffers_identical_between_two_exact_runs(kind):
    """The exact method's R_T is the fixed-point forward pass's: the context form (another exact run of the same
    problem) leaves the module with the same bits."""
    _, net_a = bn_run(kind, "exact")
    net_b = MODELS[kind]()
    with revsgd.reversible(net_b, hypers={"l2": 1e-3}, **BN_SCHED) as r:
        def step(t):
            x, y = data(kind, t)
            net_b.train()
            return crit(kind, net_b(x), y) + r.hypers["l2"] * sum((v ** 2).sum() for v in net_b.parameters())
        r.fit(step)
        x, y = data(kind)
        net_b.eval()
        r.backward(crit(kind, net_b(x), y))
    for (name, a), (_, b) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
        assert torch.equal(a, b), name


# --- unsupported buffers ---------------------------------------------------------------------------------------
class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.bn(self.bn(x)))


def _unsupported(case):
    """(module, train mode for the training loss, call twice, expected message pattern)."""
    if case == "momentum None":
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 2)), True, False, \
            r"'1'.*momentum=None"
    if case == "own buffer":
        return CountsCalls(), True, False, r"'calls'"
    if case == "eval mode":
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), False, False, r"'1'.*eval mode"
    if case == "called twice":
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), True, True, r"'1'.*twice"
    if case == "shared":
        return SharedBN(), True, False, r"'bn'.*twice"
    raise AssertionError(case)


CASES = ["momentum None", "own buffer", "eval mode", "called twice", "shared"]


def _run_unsupported(net, train_mode, twice, method="exact"):
    def tl(p, h, t):
        x, y = batch(t)
        net.train(train_mode)
        out = functional_call(net, p, (x,))
        if twice:
            out = out + functional_call(net, p, (x,))
        return ((out - y) ** 2).mean()

    def vl(p, h):
        net.eval()
        return ((functional_call(net, p, (XV,)) - YV) ** 2).mean()

    return revsgd.hypergrad(tl, vl, net, optimizer="sgd", lr=0.05, momentum=0.9, steps=5, method=method)


@pytest.mark.parametrize("method", ["exact", "naive"])
@pytest.mark.parametrize("case", CASES)
def test_unsupported_buffers_are_named(case, method):
    net, train_mode, twice, pattern = _unsupported(case)
    net = net.double()
    params_before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match=pattern):
        _run_unsupported(net, train_mode, twice, method)
    for k, v in net.named_parameters():
        assert torch.equal(v.detach(), params_before[k]), k


@pytest.mark.parametrize("case", ["eval mode", "called twice", "shared", "momentum None"])
def test_module_usable_after_a_refused_run(case):
    """A refused run must not leave revsgd's hooks or state on the user's module: afterwards the module trains and
    evaluates exactly like an untouched copy."""
    net, train_mode, twice, _ = _unsupported(case)
    net = net.double()
    fresh = copy.deepcopy(net)
    with pytest.raises(ValueError):
        _run_unsupported(net, train_mode, twice)
    x, _ = batch(0)
    for m in (net, fresh):
        m.train()
        m(x)                      # updates BatchNorm's running statistics once
        m.eval()
    with torch.no_grad():
        assert torch.equal(net(XV), fresh(XV))
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


# --- dropout -----------------------------------------------------------------------------------------------------
def test_dropout_unseeded_fails_within_the_first_step():
    net = bn_mlp()
    tl, vl = module_losses("mlp", net)
    loss = CountingLoss(tl)
    torch.manual_seed(0)
    with pytest.raises(ReversalError, match="random"):
        revsgd.hypergrad(loss, vl, net, hypers={"l2": 1e-3}, seed=None, **BN_SCHED)
    assert loss.steps == [0, 0]


def test_dropout_seed_matters_and_is_reproducible():
    """The per-step seed (seed=) decides the dropout masks: the same seed, the same bits; another seed, another
    run — and both reverse exactly."""
    out = {}
    for seed in (0, 0, 1):
        net = bn_mlp()
        tl, vl = module_losses("mlp", net)
        out.setdefault(seed, []).append(revsgd.hypergrad(tl, vl, net, hypers={"l2": 1e-3}, seed=seed, **BN_SCHED))
    a, b = out[0]
    for (name, x), (_, y) in zip(grad_items(a), grad_items(b)):
        assert torch.equal(x, y), name
    assert a.val_loss != out[1][0].val_loss


# --- the context form ------------------------------------------------------------------------------------------
def _function_form(kind, optimizer, sched, l2):
    net = MODELS[kind]()
    tl, vl = module_losses(kind, net)
    res = revsgd.hypergrad(tl, vl, net, optimizer=optimizer, hypers={"l2": l2}, **sched)
    return res, net


@pytest.mark.parametrize("kind,optimizer,method", [("mlp", "adamw", "exact"), ("cnn", "sgd", "exact"),
                                                   ("mlp", "sgd", "checkpoint")])
def test_context_form_equals_function_form(kind, optimizer, method):
    T = 20
    if optimizer == "adamw":
        mk = lambda rg: dict(lr=torch.full((T,), 0.01, dtype=F64, requires_grad=rg), weight_decay=0.01,  # noqa
                             eps=torch.full((T,), 1e-3, dtype=F64))
    else:
        mk = lambda rg: dict(lr=torch.full((T,), 0.1, dtype=F64, requires_grad=rg),  # noqa
                             momentum=torch.full((T,), 0.9, dtype=F64))
    ref, ref_net = _function_form(kind, optimizer, {**mk(False), "method": method}, 1e-3)

    model = MODELS[kind]()
    ids = [id(p) for p in model.parameters()]
    sched = mk(True)
    l2 = torch.tensor(1e-3, dtype=F64, requires_grad=True)
    with revsgd.reversible(model, optimizer=optimizer, hypers={"l2": l2}, method=method, **sched) as r:
        def step(t):
            x, y = data(kind, t)
            model.train()
            return crit(kind, model(x), y) + r.hypers["l2"] * sum((p ** 2).sum() for p in model.parameters())
        r.fit(step)
        x, y = data(kind)
        model.eval()
        grads = r.backward(crit(kind, model(x), y))
    for k, v in ref.grads.items():
        if k == "params0":
            for n, g in v.items():
                assert torch.equal(grads["params0"][n], g), n
        else:
            assert torch.equal(grads[k], v), k
    # .grad where asked: the lr tensor and the hyper; not on the momentum / eps tensors
    assert torch.equal(sched["lr"].grad, ref.grads["lr"]) and torch.equal(l2.grad, ref.grads["l2"])
    for k, t in sched.items():
        if isinstance(t, torch.Tensor) and not t.requires_grad:
            assert t.grad is None, k
    assert all(p.grad is None for p in model.parameters())
    # the model as plain training leaves it: same Parameter objects, w_T, buffers, num_batches_tracked
    assert [id(p) for p in model.parameters()] == ids
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), ref_net.state_dict().items()):
        assert torch.equal(a, b), name
    assert int(model[1].num_batches_tracked) == START + T
    assert r.stats["method"] == method
    # the reported validation loss: the function form's, i.e. the module's eval-mode loss (torch's own kernels)
    x, y = data(kind)
    model.eval()
    with torch.no_grad():
        assert r.val_loss == crit(kind, model(x), y).item() == ref.val_loss


def test_context_form_grad_accumulates_like_torch():
    """.grad is accumulated (as backward() does), not overwritten."""
    model = bn_mlp()
    lr = torch.full((10,), 0.1, dtype=F64, requires_grad=True)
    lr.grad = torch.ones(10, dtype=F64)
    def step(t):
        model.train()                  # the step runs again in backward(), after model.eval()
        return crit("mlp", model(batch(t)[0]), batch(t)[1])

    with revsgd.reversible(model, lr=lr, momentum=0.9) as r:
        r.fit(step)
        model.eval()
        g = r.backward(crit("mlp", model(XV), YV))
    assert torch.equal(lr.grad, 1.0 + g["lr"])


def _ctx_model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_context_form_misuse():
    model = _ctx_model()
    before = copy.deepcopy(model.state_dict())
    step = lambda t: crit("mlp", model(batch(t)[0]), batch(t)[1])  # noqa: E731
    r = revsgd.reversible(model, lr=0.1, momentum=0.9, steps=5)
    with pytest.raises(RuntimeError, match="with-block"):
        r.fit(step)                                           # outside the with-block
    with revsgd.reversible(model, lr=0.1, momentum=0.9, steps=5) as r:
        with pytest.raises(RuntimeError, match="fit"):
            r.backward(torch.tensor(1.0, dtype=F64))          # backward before fit
        with pytest.raises(TypeError):
            r.fit("not a function")
        r.fit(step)
        with pytest.raises(RuntimeError, match="once"):
            r.fit(step)                                       # fit twice
        with pytest.raises(TypeError, match="scalar"):
            r.backward(model(XV))                             # not a scalar
        v = crit("mlp", model(XV), YV)
        r.backward(v)
        with pytest.raises(RuntimeError, match="once"):
            r.backward(v)                                     # backward twice
    with pytest.raises(RuntimeError):
        r.fit(step)                                           # after the with-block
    with pytest.raises(RuntimeError):
        r.backward(v)
    assert not all(torch.equal(a, before[k]) for k, a in model.state_dict().items())


def test_context_form_fit_without_backward_leaves_trained_model():
    """Leaving the block after fit() without backward(): the model still holds w_T (plain training)."""
    model = _ctx_model()
    ref_model = _ctx_model()
    ref_model.load_state_dict(model.state_dict())
    step = lambda t: crit("mlp", model(batch(t)[0]), batch(t)[1])  # noqa: E731
    with revsgd.reversible(model, lr=0.1, momentum=0.9, steps=8, method="trajectory") as r:
        r.fit(step)
    res = revsgd.hypergrad(lambda p, h, t: crit("mlp", functional_call(ref_model, p, (batch(t)[0],)), batch(t)[1]),
                           lambda p, h: crit("mlp", functional_call(ref_model, p, (XV,)), YV), ref_model,
                           lr=0.1, momentum=0.9, steps=8, method="trajectory")
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert res.stats["steps"] == 8


@pytest.mark.parametrize("bad", ["naive", "not a module"])
def test_context_form_refuses(bad):
    if bad == "naive":
        with pytest.raises(ValueError, match="naive"):
            revsgd.reversible(_ctx_model(), lr=0.1, momentum=0.9, steps=5, method="naive")
    else:
        with pytest.raises(TypeError, match="nn.Module"):
            revsgd.reversible(params0(), lr=0.1, momentum=0.9, steps=5)
