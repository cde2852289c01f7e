"""seeded / step_seeded: torch's global randomness inside a block is a pure function of (seed, t), and the caller's
RNG state is left as it was; the seeds are NumPy's SeedSequence words, also where revsgd computes them 1,024 steps at a
time."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revsgd.frontend.data import StepSampler
from revsgd.frontend.randomness import (DOMAIN, is_step_seeded, seed_sequence_words, seeded, step_seed,
                                       step_seeded)


def _draws():
    x = torch.ones(64)
    return torch.rand(5), torch.randn(3), F.dropout(x, 0.5, training=True), torch.randint(0, 1000, (4,))


def _equal(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_same_step_same_draws_different_steps_differ():
    torch.manual_seed(0)
    with seeded(3, 10):
        a = _draws()
    torch.rand(100)                     # the caller's stream moved on: no effect on the block
    with seeded(3, 10):
        b = _draws()
    assert _equal(a, b)
    assert all(u.dtype == v.dtype for u, v in zip(a, b))
    for other in [(3, 11), (3, 9), (4, 10), (10, 3)]:
        with seeded(*other):
            c = _draws()
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


def test_caller_state_unchanged():
    torch.manual_seed(1234)
    before = torch.rand(4)
    with seeded(0, 5):
        torch.rand(1000)
        F.dropout(torch.ones(100), 0.3, training=True)
    after = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(4), before) and torch.equal(torch.rand(4), after)


def test_caller_state_restored_after_exception():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with seeded(0, 1):
            torch.rand(10)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)


def test_nested_blocks():
    with seeded(1, 2):
        a1 = torch.rand(3)
        with seeded(1, 3):
            inner = torch.rand(3)
        a2 = torch.rand(3)
    with seeded(1, 2):
        b1, b2 = torch.rand(3), torch.rand(3)        # the inner block does not disturb the outer stream
    with seeded(1, 3):
        c = torch.rand(3)                            # nor does the outer block change the inner one
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(inner, c)


def test_yields_step_seed_and_seed_derivation():
    with seeded(5, 6) as s:
        x = torch.rand(3)
    assert s == step_seed(5, 6) and 0 <= s < 2**64
    torch.manual_seed(s)
    assert torch.equal(torch.rand(3), x)
    w = np.random.SeedSequence(5, spawn_key=(DOMAIN, 6)).generate_state(2, np.uint32)
    assert s == int(w[0]) + (int(w[1]) << 32)
    # nearby pairs decorrelated: distinct seeds (also their low 32 bits, all torch's CPU generator uses),
    # no aliasing of large seeds, and not the data order's SeedSequence([seed, e])
    grid = [step_seed(a, b) for a in range(20) for b in range(200)]
    assert len(set(grid)) == len(grid) and len({g & 0xFFFFFFFF for g in grid}) == len(grid)
    assert step_seed(2**32 + 5, 7) != step_seed(5, 2**32 + 7) and step_seed(1, 2) != step_seed(2, 1)
    assert step_seed(3, 4) != int(np.random.SeedSequence([3, 4]).generate_state(1, np.uint64)[0])
    bits = np.array([[(step_seed(0, t) >> k) & 1 for k in range(64)] for t in range(256)])
    assert abs(bits.mean() - 0.5) < 0.02                     # consecutive steps: ~half the bits differ
    flips = (bits[1:] != bits[:-1]).mean(axis=1)
    assert abs(flips.mean() - 0.5) < 0.02 and 0.2 < flips.min() and flips.max() < 0.8   # ±4.8σ per pair


@pytest.mark.parametrize("seed", [0, 1, 5, 2**32 - 1, 2**32, 2**63 + 11, 2**96 + 3, 2**127 + 1, 2**130 + 7])
@pytest.mark.parametrize("n", [1, 2, 6, 9])
def test_seed_sequence_words_equal_numpy(seed, n):
    rng = np.random.default_rng(seed % 1000 + n)
    ts = np.concatenate([[0, 1, 1023, 1024, 2**31, 2**32 - 1], rng.integers(0, 2**32, 40)]).astype(np.uint32)
    ref = np.array([np.random.SeedSequence(seed, spawn_key=(DOMAIN, int(t))).generate_state(n, np.uint32)
                    for t in ts])
    assert np.array_equal(seed_sequence_words(seed, (DOMAIN,), ts, n), ref)
    assert np.array_equal(seed_sequence_words(seed, (DOMAIN, 9), ts, n)[:3],
                          [np.random.SeedSequence(seed, spawn_key=(DOMAIN, 9, int(t))).generate_state(n, np.uint32)
                           for t in ts[:3]])


@pytest.mark.parametrize("t", [0, 1023, 1024, 5000, 2**32 - 1, 2**32, 2**32 + 1025, 2**40])
def test_step_seed_equals_seed_sequence_on_every_block(t):
    """Blocks of 1,024 steps (vectorised), and steps of two words (NumPy's own, step by step)."""
    for seed in (0, 7, 2**64 + 1):
        w = np.random.SeedSequence(seed, spawn_key=(DOMAIN, t)).generate_state(2, np.uint32)
        assert step_seed(seed, t) == int(w[0]) | (int(w[1]) << 32)


def test_numpy_and_python_rngs_untouched_by_default():
    np.random.seed(3)
    random.seed(3)
    with seeded(0, 0):
        a, b = np.random.rand(), random.random()
    with seeded(0, 0):
        c, d = np.random.rand(), random.random()
    assert a != c and b != d                 # not reseeded: the global streams just continue


def test_host_rngs_reseeded_and_restored():
    np.random.seed(11)
    random.seed(11)
    ref_np, ref_py = np.random.rand(3), [random.random() for _ in range(3)]
    np.random.seed(11)
    random.seed(11)
    draws = []
    for _ in range(2):
        with seeded(2, 9, host_rngs=True):
            draws.append((np.random.rand(4).tolist(), random.random(), torch.rand(2).tolist()))
        np.random.rand()
        random.random()                      # the caller's streams move on between blocks
    assert draws[0] == draws[1]
    with seeded(2, 10, host_rngs=True):
        other = (np.random.rand(4).tolist(), random.random())
    assert other[0] != draws[0][0] and other[1] != draws[0][1]
    with seeded(2, 9):
        assert torch.rand(2).tolist() == draws[0][2]            # host_rngs does not change torch's seed
    # the caller's streams: two draws taken between blocks, the third continues where it would have
    assert np.random.rand() == ref_np[2] and random.random() == ref_py[2]
    # numpy and torch get different words of the SeedSequence: their MT19937 streams are not the same
    with seeded(0, 0, host_rngs=True):
        t31 = torch.randint(0, 2**31, (16,), dtype=torch.int64).tolist()
        n31 = np.random.randint(0, 2**31, 16).tolist()
        p31 = [random.getrandbits(31) for _ in range(16)]
    assert not set(t31) & set(n31) and not set(t31) & set(p31) and not set(n31) & set(p31)


def test_step_seeded_loss_is_pure_function_of_t():
    w = torch.randn(32, requires_grad=True)

    def train_loss(params, hypers, t):
        """dropout loss"""
        x = torch.randn(16, 32)                               # a random "augmentation"
        h = F.dropout(x * params["w"], 0.5, training=True)
        return (h.sum(1) ** 2).mean() * hypers["c"] + t

    loss = step_seeded(train_loss, seed=4)
    assert loss.__name__ == "train_loss" and loss.__doc__ == "dropout loss" and loss.__wrapped__ is train_loss
    assert is_step_seeded(loss) and not is_step_seeded(train_loss)
    p, h = {"w": w}, {"c": torch.tensor(1.0)}
    l5 = loss(p, h, 5)
    (g5,) = torch.autograd.grad(l5, w)
    for t in [3, 5, 0]:
        loss(p, h, t)
    l5b = loss(p, h, 5)
    (g5b,) = torch.autograd.grad(l5b, w)
    assert torch.equal(l5, l5b) and torch.equal(g5, g5b)
    assert not torch.equal(loss(p, h, 6) - 6, l5 - 5)
    assert not torch.equal(train_loss(p, h, 5), train_loss(p, h, 5))      # unwrapped: not pure
    assert not torch.equal(step_seeded(train_loss, seed=5)(p, h, 5), l5)


def test_step_seeded_with_sampler():
    x = torch.randn(40, 8)
    data = StepSampler(x, batch_size=8, seed=1)
    loss = step_seeded(lambda p, h, t: F.dropout(data(t) @ p, 0.2, training=True).sum(), seed=1)
    p = torch.randn(8)
    assert [loss(p, None, t).item() for t in range(12)] == [loss(p, None, t).item() for t in range(12)]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: seeded(0, -1), ValueError, "t must be >= 0"),
    (lambda: seeded(-1, 0), ValueError, "seed must be >= 0"),
    (lambda: seeded(0, 1.0), TypeError, "t must be an int"),
    (lambda: seeded("0", 1), TypeError, "seed must be an int"),
    (lambda: seeded(0, 1, devices=0), TypeError, "list of devices"),
    (lambda: seeded(0, 1, devices=["mps"]), ValueError, "CPU and CUDA"),
    (lambda: seeded(0, 1, devices=[1.5]), TypeError, "devices must hold"),
    (lambda: step_seeded(3, 0), TypeError, "callable"),
    (lambda: step_seeded(lambda p, h, t: 0, -2), ValueError, "seed must be >= 0"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        with call():
            pass


def test_cpu_device_entries_accepted():
    with seeded(0, 1, devices=["cpu", torch.device("cpu")]) as s:
        a = torch.rand(2)
    with seeded(0, 1, devices=[]):
        assert torch.equal(torch.rand(2), a)
    assert s == step_seed(0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        with seeded(0, 1, devices=[0]):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators():
    torch.cuda.manual_seed_all(99)
    before = torch.rand(4, device="cuda")
    with seeded(1, 2):                                  # default: all visible devices
        a = torch.rand(4, device="cuda"), F.dropout(torch.ones(64, device="cuda"), 0.5, training=True)
    after = torch.rand(4, device="cuda")
    with seeded(1, 2, devices=["cuda:0"]):
        b = torch.rand(4, device="cuda"), F.dropout(torch.ones(64, device="cuda"), 0.5, training=True)
    with seeded(1, 3, devices=[0]):
        c = torch.rand(4, device="cuda")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c)
    torch.cuda.manual_seed_all(99)
    assert torch.equal(torch.rand(4, device="cuda"), before) and torch.equal(torch.rand(4, device="cuda"), after)
    torch.cuda.manual_seed_all(5)
    with seeded(1, 2, devices=[]):                      # CPU only: CUDA's generator is neither reseeded nor restored
        torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(5)
    torch.rand(4, device="cuda")
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(5)
    with seeded(1, 2, devices=[]):
        torch.rand(4, device="cuda")
    assert torch.equal(torch.rand(4, device="cuda"), expected)
