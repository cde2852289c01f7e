"""``revsgd.optim.autograd.grad``: the sweep's backward passes, the autograd engine called directly.

- it returns what ``torch.autograd.grad`` returns, bit for bit: first-order gradients, gradients with graph, a
  vector-Jacobian product of several outputs through that graph, None for an unused input;
- ``accumulate=True`` adds into ``.grad`` as ``torch.autograd.backward`` does;
- wrong cotangents (shape, dtype, count), a non-scalar output without cotangent and an output that does not require
  grad are errors, as with ``torch.autograd.grad``;
- without the engine entry point, and for tensor subclasses, it falls back to ``torch.autograd.grad`` (same values).
"""
from __future__ import annotations

import pytest
import torch

import revsgd.optim.autograd as AG


def _model(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(),
          torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(),
          torch.randn(7, 3, generator=g, dtype=torch.float64).requires_grad_()]
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)

    def loss():
        return torch.tanh(x @ ps[0] + ps[1]).pow(2).sum() + (torch.tanh(x @ ps[0]) @ ps[2]).sin().mean()
    return ps, loss


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.fixture(params=["engine", "fallback"])
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(AG, "_run_backward", None)
    return request.param


def test_first_order_and_vjp_equal_torch(path):
    ps, loss = _model()
    _same(AG.grad([loss()], ps), torch.autograd.grad(loss(), ps))
    gs = AG.grad([loss()], ps, create_graph=True)
    ref = torch.autograd.grad(loss(), ps, create_graph=True)
    _same([g.detach() for g in gs], [g.detach() for g in ref])
    assert all(g.requires_grad for g in gs)
    cots = [torch.randn_like(g) for g in gs]
    _same(AG.grad(gs, ps, cots), torch.autograd.grad(ref, ps, cots))


def test_unused_input_is_none(path):
    ps, loss = _model()
    spare = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = AG.grad([loss()], ps + [spare])
    assert out[-1] is None and all(o is not None for o in out[:-1])


def test_accumulate_adds_into_grad(path):
    ps, loss = _model()
    ref = torch.autograd.grad(loss(), ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    assert AG.grad([loss()], ps, accumulate=True) is None
    for p, r in zip(ps, ref):
        assert torch.equal(p.grad, torch.ones_like(p) + r)


def test_graph_freed_without_create_graph(path):
    ps, loss = _model()
    out = loss()
    AG.grad([out], ps)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        AG.grad([out], ps)


def test_bad_cotangents_raise(path):
    ps, loss = _model()
    gs = AG.grad([loss()], ps, create_graph=True)
    with pytest.raises(RuntimeError, match="shape|size"):
        AG.grad(gs, ps, [torch.ones(2, dtype=torch.float64)] * 3)
    with pytest.raises(ValueError, match="3 outputs but 2 cotangents"):
        AG.grad(gs, ps, [torch.ones_like(g) for g in gs[:2]])
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        AG.grad(gs[:1], ps)
    with pytest.raises(RuntimeError, match="does not require grad"):
        AG.grad([torch.ones((), dtype=torch.float64)], ps)


def test_subclass_goes_through_torch(monkeypatch):
    class Sub(torch.Tensor):
        pass

    ps, loss = _model()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = loss().as_subclass(Sub)
    AG.grad([out], ps)
    assert calls                  # the public API (it may re-enter itself through __torch_function__)
