"""StepSampler: step t's minibatch is a pure function of (seed, t), with Batches' epoch convention."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from revsgd.frontend.data import StepSampler
from revsgd.problems import Batches


def _xy(n: int = 50, d: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n)          # y[i] == i: a batch's labels are its indices
    return x, y


class Records(Dataset):
    """A dataset whose examples are dicts, counting __getitem__ calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.calls += 1
        return {"id": i, "x": torch.full((2,), float(i))}


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)


# --- purity --------------------------------------------------------------------------------------------------
def test_same_step_same_batch_in_any_order_and_across_samplers():
    x, y = _xy()
    s = StepSampler(x, y, batch_size=8, seed=3)
    steps = [0, 5, 17, 2, 5, 40, 0, 17, 6, 1000, 6]     # crosses epochs back and forth
    first = {t: s(t) for t in steps}
    for t in reversed(steps):
        _assert_same(s(t), first[t])
        _assert_same(StepSampler(x, y, batch_size=8, seed=3)(t), first[t])
    for t in steps:
        bx, by = first[t]
        assert torch.equal(by, s.indices(t)) and torch.equal(bx, x[s.indices(t)])


def test_matches_problems_batches():
    b, s = Batches(50, 8, 7), StepSampler(torch.zeros(50, 1), batch_size=8, seed=7)
    assert s.batches_per_epoch == b.per_epoch == len(s) == 6
    for t in [0, 1, 5, 6, 13, 29, 3]:
        assert torch.equal(s.indices(t), b(t))


def test_indices_are_fresh_tensors():
    s = StepSampler(torch.zeros(10, 1), batch_size=4)
    s.indices(0).fill_(-1)
    assert (s.indices(0) >= 0).all()


@pytest.mark.parametrize("n,b,drop_last,per_epoch", [(50, 8, True, 6), (50, 8, False, 7), (48, 8, False, 6),
                                                      (5, 5, True, 1), (7, 1, True, 7)])
def test_each_epoch_is_a_permutation(n, b, drop_last, per_epoch):
    s = StepSampler(torch.arange(n), batch_size=b, drop_last=drop_last, seed=1)
    assert s.batches_per_epoch == per_epoch
    orders = []
    for e in range(3):
        idx = [s.indices(e * per_epoch + k) for k in range(per_epoch)]
        sizes = [len(i) for i in idx]
        assert sizes[:-1] == [b] * (per_epoch - 1)
        assert sizes[-1] == (b if drop_last else n - b * (per_epoch - 1))
        order = torch.cat(idx)
        if drop_last:
            assert len(order) == (n // b) * b and len(set(order.tolist())) == len(order)
        else:
            assert sorted(order.tolist()) == list(range(n))
        assert torch.equal(order, torch.cat([s(e * per_epoch + k) for k in range(per_epoch)]))
        assert s.epoch(e * per_epoch) == s.epoch(e * per_epoch + per_epoch - 1) == e
        orders.append(order)
    if n > 5:
        assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_no_shuffle_is_in_order():
    s = StepSampler(torch.arange(10), batch_size=4, shuffle=False, drop_last=False)
    assert [s(t).tolist() for t in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_seeds_differ_and_with_seed():
    x, y = _xy(100)
    s0 = StepSampler(x, y, batch_size=10, seed=0)
    s1 = s0.with_seed(1)
    assert s0.seed == 0 and s1.seed == 1 and s1.batches_per_epoch == s0.batches_per_epoch
    assert not torch.equal(s0.indices(0), s1.indices(0))
    for t in [0, 3, 12, 3]:
        _assert_same(s1(t), StepSampler(x, y, batch_size=10, seed=1)(t))
        _assert_same(s0(t), StepSampler(x, y, batch_size=10, seed=0)(t))   # s0 unaffected by s1
    assert s1.with_seed(0).indices(25).tolist() == s0.indices(25).tolist()
    assert s0.with_seed(np.int64(1)).indices(7).tolist() == s1.indices(7).tolist()


def test_only_current_epoch_cached():
    s = StepSampler(torch.arange(20), batch_size=5)
    for t in range(0, 40, 3):
        s(t)
        assert s._epoch[0] == s.epoch(t)


def test_step_types():
    s = StepSampler(torch.arange(20), batch_size=5, seed=2)
    ref = s(7)
    for t in (np.int64(7), np.int32(7), torch.tensor(7)):
        assert torch.equal(s(t), ref)


# --- datasets and tensors ------------------------------------------------------------------------------------
def test_tensor_fast_path_equals_dataloader_collation():
    x, y = _xy()
    ds = TensorDataset(x, y)
    st, sd = StepSampler(x, y, batch_size=8, seed=4), StepSampler(ds, batch_size=8, seed=4)
    for t in [0, 9, 3]:
        bx, by = st(t)
        cx, cy = sd(t)                 # default_collate of TensorDataset examples
        assert torch.equal(bx, cx) and torch.equal(by, cy)
    one = StepSampler(x, batch_size=8, seed=4)(9)
    assert isinstance(one, torch.Tensor) and torch.equal(one, st(9)[0])


def test_dataset_default_and_custom_collate():
    ds = Records(30)
    s = StepSampler(ds, batch_size=4, seed=5)
    b = s(2)
    assert ds.calls == 4
    assert torch.equal(b["id"], s.indices(2)) and b["x"].shape == (4, 2)
    assert torch.equal(b["x"][:, 0], s.indices(2).float())

    def collate(examples):
        return torch.stack([e["x"] for e in examples]).sum(1), [e["id"] for e in examples]

    c = StepSampler(ds, batch_size=4, seed=5, collate_fn=collate)
    xs, ids = c(2)
    assert ids == s.indices(2).tolist() and torch.equal(xs, 2 * s.indices(2).float())


def test_dataset_getitems_and_plain_sequence():
    class Batched(Records):
        def __getitems__(self, idx):
            self.batched = list(idx)
            return [self[i] for i in idx]

    ds = Batched(12)
    s = StepSampler(ds, batch_size=3, seed=0)
    s(1)
    assert ds.batched == s.indices(1).tolist()
    lst = [(float(i), i) for i in range(12)]      # a list is a map-style dataset too
    xs, ys = StepSampler(lst, batch_size=3, seed=0)(1)
    assert ys.tolist() == s.indices(1).tolist()


def test_tensors_with_collate_receive_examples():
    x, y = _xy(20)
    seen = []

    def collate(examples):
        seen.append(examples)
        return default_collate(examples)

    bx, by = StepSampler(x, y, batch_size=4, seed=1, collate_fn=collate)(3)
    assert len(seen[0]) == 4 and isinstance(seen[0][0], tuple)
    fx, fy = StepSampler(x, y, batch_size=4, seed=1)(3)
    assert torch.equal(bx, fx) and torch.equal(by, fy)


def test_device_cpu_keeps_containers():
    x, y = _xy(20)
    bx, by = StepSampler(x, y, batch_size=4, device="cpu")(1)
    assert bx.device.type == "cpu" and torch.equal(by, StepSampler(x, y, batch_size=4)(1)[1])
    Pair = namedtuple("Pair", "a b")
    b = StepSampler(Records(8), batch_size=2, device=torch.device("cpu"),
                    collate_fn=lambda ex: Pair(default_collate(ex), [e["id"] for e in ex]))(0)
    assert isinstance(b, Pair) and isinstance(b.a, dict) and b.a["x"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning and CUDA batches need CUDA")
def test_pin_memory_and_cuda_device():
    x, y = _xy(40)
    ref = StepSampler(x, y, batch_size=8, seed=2)(3)
    px, py = StepSampler(x, y, batch_size=8, seed=2, pin_memory=True)(3)
    assert px.is_pinned() and py.is_pinned()
    cx, cy = StepSampler(x, y, batch_size=8, seed=2, pin_memory=True, device="cuda")(3)
    assert cx.is_cuda and torch.equal(cx.cpu(), ref[0]) and torch.equal(cy.cpu(), ref[1])
    gx, gy = StepSampler(x.cuda(), y.cuda(), batch_size=8, seed=2)(3)       # data already on the GPU
    assert gx.is_cuda and torch.equal(gx.cpu(), ref[0]) and torch.equal(gy.cpu(), ref[1])
    d = StepSampler(Records(16), batch_size=4, seed=2, pin_memory=True, device="cuda")(1)
    assert d["x"].is_cuda and d["id"].is_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_pin_memory_without_cuda_warns_and_skips():
    x, y = _xy(20)
    with pytest.warns(UserWarning, match="pin_memory"):
        s = StepSampler(x, y, batch_size=4, pin_memory=True)
    assert not s.pin_memory and not s(0)[0].is_pinned()


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.zeros(10, 2),), {"batch_size": 0}, ValueError, r"batch_size must lie in \[1, 10\]"),
    ((torch.zeros(10, 2),), {"batch_size": 11}, ValueError, r"batch_size must lie in \[1, 10\]"),
    ((torch.zeros(10, 2),), {"batch_size": 2.0}, TypeError, "batch_size must be an int"),
    ((torch.zeros(10, 2),), {"batch_size": True}, TypeError, "batch_size must be an int"),
    ((torch.zeros(10, 2), torch.zeros(9)), {"batch_size": 2}, ValueError, r"same first dimension.*\[10, 9\]"),
    ((torch.zeros(0, 2),), {"batch_size": 1}, ValueError, "empty"),
    (([],), {"batch_size": 1}, ValueError, "empty"),
    ((Records(0),), {"batch_size": 1}, ValueError, "empty"),
    ((torch.tensor(3.0),), {"batch_size": 1}, ValueError, "0-dim"),
    ((torch.zeros(4), [1, 2, 3, 4]), {"batch_size": 1}, TypeError, "mixed with list"),
    ((Records(4), Records(4)), {"batch_size": 1}, TypeError, "one dataset"),
    ((), {"batch_size": 1}, TypeError, "needs a dataset"),
    ((iter(range(4)),), {"batch_size": 1}, TypeError, "map-style"),
    ((torch.zeros(4),), {"batch_size": 1, "seed": -1}, ValueError, "seed must be >= 0"),
    ((torch.zeros(4),), {"batch_size": 1, "seed": 1.5}, TypeError, "seed must be an int"),
    ((torch.zeros(4),), {"batch_size": 1, "collate_fn": 3}, TypeError, "collate_fn must be callable"),
])
def test_bad_construction(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        StepSampler(*args, **kwargs)


def test_bad_steps():
    s = StepSampler(torch.zeros(10), batch_size=2)
    with pytest.raises(ValueError, match="t must be >= 0"):
        s(-1)
    with pytest.raises(ValueError, match="t must be >= 0"):
        s.indices(-3)
    for bad in (1.0, "3", None, True, torch.tensor(1.5)):
        with pytest.raises(TypeError, match="t must be an int"):
            s(bad)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        s.with_seed(-2)
