"""``revsgd.unroll``: the final params as tensors whose backward pass is the reverse sweep (a backend for other
people's training code).

- for every method but naive, ``val_loss(unroll(...)).backward()`` fills the same gradients that
  ``revsgd.hypergrad`` returns — schedules (one value per step, or per step and parameter tensor), params0 and
  hypers, for momentum SGD and Adam — and the returned tensors are hypergrad's w_T;
- a second backward (``retain_graph=True`` on the first, as torch requires for any graph) replays the forward pass
  and gives the same result: the gradients accumulate to exactly twice the first;
- modifying a float64 or float32 schedule tensor (or a hyper, or params0) in place between ``unroll()`` and
  ``backward()`` raises torch's error for a modified saved tensor;
- only tensors that require grad receive .grad; nn.Module params0 works; naive is refused.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import revsgd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/ (pytest runs with importlib mode)
from helpers import (F64, NAMES, XV, YV, CountingLoss, batch, hypers, params0, schedules,  # noqa: E402
                     train_loss, val_loss)

T = 20
METHODS = [("exact", {}), ("trajectory", {}), ("checkpoint", {"checkpoint_every": 6}), ("replay", {"replay_k": 3}),
           ("truncated", {"truncate": 7}), ("drmad", {})]


def leaves(kind, per_group=False, dtype=F64):
    """Fresh leaves that require grad: schedules, params0, hypers."""
    s = {k: v.to(dtype).clone().requires_grad_() for k, v in schedules(kind, T, per_group).items()}
    p = {k: v.clone().requires_grad_() for k, v in params0().items()}
    h = {k: v.clone().requires_grad_() for k, v in hypers().items()}
    return s, p, h


def assert_same(s, p, h, ref, factor=1.0, exact=True):
    check = (lambda a, b: torch.equal(a, b)) if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-12,
                                                                                        atol=1e-15))
    for k, t in s.items():
        assert t.grad is not None and check(t.grad, factor * ref.grads[k]), k
    for k, t in p.items():
        assert t.grad is not None and check(t.grad, factor * ref.grads["params0"][k]), k
    for k, t in h.items():
        assert t.grad is not None and check(t.grad, factor * ref.grads[k]), k


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind,per_group", [("sgd", False), ("adam", True)])
def test_unroll_gradients_equal_hypergrad(kind, per_group, method, options):
    if method == "drmad" and kind == "adam":
        pytest.skip("drmad is defined for heavyball and sgd only")
    s, p, h = leaves(kind, per_group)
    final = revsgd.unroll(train_loss, p, optimizer=kind, hypers=h, method=method, **s, **options)
    assert list(final) == list(NAMES)
    ref = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer=kind, hypers=hypers(), method=method,
                           **{k: v.detach() for k, v in s.items()}, **options)
    for k in NAMES:
        assert torch.equal(final[k].detach(), ref.params[k]), k
        assert final[k].requires_grad and final[k].dtype == F64
    loss = val_loss(final, h)
    assert loss.item() == ref.val_loss
    loss.backward()
    assert_same(s, p, h, ref)


@pytest.mark.parametrize("method", ["exact", "checkpoint"])
def test_second_backward_replays_the_forward(method):
    s, p, h = leaves("sgd")
    loss_fn = CountingLoss(train_loss)
    final = revsgd.unroll(loss_fn, p, optimizer="sgd", hypers=h, method=method, **s)
    forward_calls = loss_fn.calls
    ref = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", hypers=hypers(), method=method,
                           **{k: v.detach() for k, v in s.items()})
    val_loss(final, h).backward(retain_graph=True)
    assert_same(s, p, h, ref)
    first = loss_fn.calls
    val_loss(final, h).backward()
    assert_same(s, p, h, ref, factor=2.0)          # accumulated: exactly twice (x + x is exact)
    # the second backward ran the training forward again before sweeping back
    assert loss_fn.calls - first >= forward_calls + T


def test_second_backward_without_retain_graph_is_torchs_error():
    s, p, h = leaves("sgd")
    final = revsgd.unroll(train_loss, p, optimizer="sgd", hypers=h, **s)
    loss = val_loss(final, h)
    loss.backward()
    with pytest.raises(RuntimeError, match="(?i)second time|freed"):
        val_loss(final, h).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("what", ["schedule", "hyper", "params0"])
def test_in_place_change_before_backward_is_an_error(what, dtype):
    """unroll() copies its inputs; changing one in place afterwards must not silently give the gradient of
    another run: torch refuses the backward (a saved tensor was modified)."""
    s, p, h = leaves("sgd", dtype=dtype)
    final = revsgd.unroll(train_loss, p, optimizer="sgd", hypers=h, **s)
    with torch.no_grad():
        if what == "schedule":
            s["lr"][3] += 0.01
        elif what == "hyper":
            h["l2"].add_(1.0)
        else:
            p["W0"].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        val_loss(final, h).backward()


def test_only_tensors_that_require_grad_get_grad():
    s, p, h = leaves("sgd")
    s["momentum"].requires_grad_(False)
    p["b0"].requires_grad_(False)
    h["pw"].requires_grad_(False)
    final = revsgd.unroll(train_loss, p, optimizer="sgd", hypers=h, **s)
    val_loss(final, h).backward()
    assert s["momentum"].grad is None and p["b0"].grad is None and h["pw"].grad is None
    assert s["lr"].grad is not None and p["W0"].grad is not None and h["l2"].grad is not None
    assert float(h["l2"].grad.abs()) > 0


def test_hypers_get_gradients():
    """A hyper that only the training loss reads gets its gradient through the whole unroll."""
    s, p, h = leaves("heavyball")
    final = revsgd.unroll(train_loss, p, optimizer="heavyball", hypers=h, **s)
    val_loss(final, {}).backward()
    ref = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="heavyball", hypers=hypers(),
                           method="naive", **{k: v.detach() for k, v in s.items()})
    for k in ("l2", "pw"):
        assert h[k].grad.shape == h[k].shape
        assert torch.allclose(h[k].grad, ref.grads[k], rtol=1e-8, atol=0), k
        assert h[k].grad.abs().sum() > 0


def test_scalar_schedules_and_float_hypers():
    """Numbers are accepted (they get no gradient); tensors that require grad still do."""
    p = {k: v.clone().requires_grad_() for k, v in params0().items()}
    final = revsgd.unroll(train_loss, p, optimizer="sgd", lr=0.1, momentum=0.9, steps=T,
                          hypers={"l2": 1e-3, "pw": hypers()["pw"]})
    val_loss(final, {}).backward()
    ref = revsgd.hypergrad(train_loss, val_loss, params0(), optimizer="sgd", lr=0.1, momentum=0.9, steps=T,
                           hypers={"l2": 1e-3, "pw": hypers()["pw"]})
    for k in NAMES:
        assert torch.equal(p[k].grad, ref.grads["params0"][k]), k


def test_unroll_with_nn_module():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def tl(p, h, t):
        x, y = batch(t)
        return ((functional_call(model, p, (x,)) - y) ** 2).mean() + h["l2"] * sum((w ** 2).sum()
                                                                                   for w in p.values())

    def vl(p, h):
        return ((functional_call(model, p, (XV,)) - YV) ** 2).mean()

    lr = torch.full((T,), 0.1, dtype=F64, requires_grad=True)
    l2 = torch.tensor(1e-3, dtype=F64, requires_grad=True)
    final = revsgd.unroll(tl, model, lr=lr, momentum=0.9, hypers={"l2": l2})
    assert set(final) == set(w0)
    vl(final, {}).backward()
    ref = revsgd.hypergrad(tl, vl, model, lr=lr.detach(), momentum=0.9, hypers={"l2": 1e-3})
    assert torch.equal(lr.grad, ref.grads["lr"]) and torch.equal(l2.grad, ref.grads["l2"])
    for k, prm in model.named_parameters():
        assert torch.equal(prm.grad, ref.grads["params0"][k]), k


def test_unroll_with_batchnorm_module_is_right_or_refused():
    """With BatchNorm the validation loss reads the running statistics R_T. unroll must either give hypergrad's
    result (R_T in the module, its gradient through the statistics) or refuse the module clearly — never return
    a loss on the initial statistics with a gradient that misses them."""
    import copy
    torch.manual_seed(0)
    net0 = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()

    def losses(net):
        def tl(p, h, t):
            x, y = batch(t)
            net.train()
            return ((functional_call(net, p, (x,)) - y) ** 2).mean()

        def vl(p, h):
            net.eval()
            return ((functional_call(net, p, (XV,)) - YV) ** 2).mean()
        return tl, vl

    ref_net = copy.deepcopy(net0)
    ref = revsgd.hypergrad(*losses(ref_net), ref_net, lr=0.1, momentum=0.9, steps=10)
    net = copy.deepcopy(net0)
    tl, vl = losses(net)
    try:
        final = revsgd.unroll(tl, net, lr=0.1, momentum=0.9, steps=10)
    except (ValueError, TypeError) as e:
        assert "BatchNorm" in str(e) or "buffer" in str(e)
        return
    loss = vl(final, {})
    assert loss.item() == pytest.approx(ref.val_loss, rel=1e-12)
    loss.backward()
    for k, prm in net.named_parameters():
        assert torch.allclose(prm.grad, ref.grads["params0"][k], rtol=1e-10, atol=1e-14), k


def test_unroll_refuses_naive_and_bad_params0():
    with pytest.raises(ValueError, match="naive"):
        revsgd.unroll(train_loss, params0(), lr=0.1, momentum=0.9, steps=3, method="naive")
    with pytest.raises(TypeError, match="params0"):
        revsgd.unroll(lambda p, h, t: p.sum(), torch.zeros(3, dtype=F64), lr=0.1, momentum=0.9, steps=3)


def test_unroll_exact_refusals_reach_the_caller():
    loss = CountingLoss(train_loss)
    with pytest.raises(ValueError, match="nesterov"):
        revsgd.unroll(loss, params0(), optimizer="nesterov", lr=0.1, momentum=0.9, steps=3)
    assert loss.calls == 0
