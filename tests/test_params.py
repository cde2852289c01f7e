import math

import pytest
import torch

from revsgd.meta.params import InitScale, LogitSchedule, LogScale, LogSchedule, interp_matrix


def test_interp_matrix_rows_are_convex_combinations_hitting_the_knots():
    M = interp_matrix(11, 3)
    assert M.shape == (11, 3)
    assert torch.allclose(M.sum(1), torch.ones(11, dtype=M.dtype))
    assert torch.equal(M[0], torch.tensor([1.0, 0, 0], dtype=M.dtype))
    assert torch.equal(M[5], torch.tensor([0, 1.0, 0], dtype=M.dtype))
    assert torch.equal(M[-1], torch.tensor([0, 0, 1.0], dtype=M.dtype))
    assert torch.equal(interp_matrix(7, 7), torch.eye(7, dtype=M.dtype))


@pytest.mark.parametrize("groups,knots", [(0, None), (3, None), (0, 4), (3, 4)])
def test_schedules_shapes_values_and_gradients(groups, knots):
    T = 9
    lr = LogSchedule(T, groups, 0.1, knots=knots)
    mom = LogitSchedule(T, groups, 0.9, knots=knots)
    shape = (T,) if groups == 0 else (T, groups)
    assert lr().shape == shape and mom().shape == shape
    assert torch.allclose(lr(), torch.full(shape, 0.1, dtype=torch.float64))
    assert torch.allclose(mom(), torch.full(shape, 0.9, dtype=torch.float64))
    with torch.no_grad():
        lr.free.add_(torch.randn_like(lr.free))
        mom.free.add_(torch.randn_like(mom.free))
    assert bool((mom() > 0).all() and (mom() < 1).all() and (lr() > 0).all())
    w = torch.randn(shape, dtype=torch.float64)
    for sched in (lr, mom):
        def f(u, sched=sched):
            old = sched.free
            sched.free = u
            try:
                return (sched() * w).sum()
            finally:
                sched.free = old
        assert torch.autograd.gradcheck(f, (sched.free.detach().clone().requires_grad_(),))


def test_logscale_and_initscale():
    s = LogScale(1e-3, (2, 3))
    assert s().shape == (2, 3) and torch.allclose(s(), torch.full((2, 3), 1e-3, dtype=torch.float64))
    template = {"W0": torch.zeros(4, 5), "b0": torch.ones(5), "W1": torch.zeros(5, 2), "b1": torch.zeros(2)}
    init = InitScale(template, seed=3)
    assert init.names == ["W0", "W1"]
    w0 = init()
    assert list(w0) == list(template) and w0["W0"].dtype == torch.float32
    assert torch.equal(w0["b0"], template["b0"])
    assert torch.allclose(init.scales(), torch.tensor([1 / math.sqrt(4), 1 / math.sqrt(5)], dtype=torch.float64))
    assert torch.allclose(w0["W0"].double(), init.z["W0"] * 0.5, atol=1e-6)
    (w0["W0"].double() * 2).sum().backward()
    assert torch.allclose(init.free.grad[0], 2 * (init.z["W0"] * 0.5).sum(), rtol=1e-5)
    assert init.free.grad[1] == 0


@pytest.mark.parametrize("make", [
    lambda: LogSchedule(5, 1, 0.0), lambda: LogSchedule(0, 1, 0.1), lambda: LogSchedule(5, 1, 0.1, knots=6),
    lambda: LogitSchedule(5, 1, 1.0), lambda: LogitSchedule(5, -1, 0.5), lambda: LogScale(-1.0),
    lambda: InitScale({"W": torch.zeros(2, 2)}, init=[0.0]), lambda: InitScale({"W": torch.zeros(2, 2)}, scaled=["X"]),
])
def test_bad_arguments_raise_clear_errors(make):
    with pytest.raises(ValueError):
        make()
