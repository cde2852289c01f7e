"""Reliability items the core owns (the project's issue 7).

- thread counts are bounded: ``revsgd.set_num_threads`` and ``revsgd.pinned_threads`` refuse huge, zero, negative,
  float and bool counts with ValueError and change nothing (kernel count, torch's count);
- frac_bits below 24 are refused for optimiser states (ExactMomentum, hypergrad_numpy) while the conversion
  ``to_fixed(x, 16)`` still works;
- the real precision: at frac_bits F the exact method's hypergradient agrees with the float64 one (method
  "trajectory") to a relative error bounded by 2T·2^-F, and the error scales like 2^-F;
- scaling an all-zero velocity keeps it exactly zero (momentum < 1, zero gradient), on every backend.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import revsgd
from revsgd import ExactMomentum, Tape, to_fixed
from revsgd.core.fixed import MIN_FACTOR
from revsgd.kernels import MAX_THREADS, get_num_threads
from tests.conftest import BACKENDS, HOST_BACKENDS, host, lanes

BAD_THREADS = [10**6, 2**40, 2**63, 0, -1, 1.5, 2.0, True, False, None, "2", MAX_THREADS + 1]


# --- thread counts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", BAD_THREADS)
def test_set_num_threads_is_bounded(k):
    before = get_num_threads()
    with pytest.raises(ValueError):
        revsgd.set_num_threads(k)
    assert get_num_threads() == before


def test_set_num_threads_accepts_the_bounds():
    before = get_num_threads()
    try:
        for k in (1, MAX_THREADS, np.int64(2)):
            revsgd.set_num_threads(k)
            assert get_num_threads() == int(k)
            X = np.arange(5, dtype=np.int64)
            for be in HOST_BACKENDS:                   # the kernels still run at the bound
                t = Tape(5, backend=be)
                t.shift(X, 3)
                t.unshift(X, 3)
                assert X.tolist() == [0, 1, 2, 3, 4] and t.at_start()
    finally:
        revsgd.set_num_threads(before)


@pytest.mark.parametrize("k", [k for k in BAD_THREADS if k is not None])   # None: the documented default
def test_pinned_threads_is_bounded(k):
    before = torch.get_num_threads()
    with pytest.raises(ValueError):
        with revsgd.pinned_threads(k):
            pass
    assert torch.get_num_threads() == before


def test_pinned_threads_pins_and_restores():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with revsgd.pinned_threads(other) as k:
        assert k == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with revsgd.pinned_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


# --- frac_bits floor ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("F", [0, 8, 16, 20, 23])
def test_low_frac_bits_refused_for_states(F):
    with pytest.raises(ValueError) as ei:
        ExactMomentum(np.zeros(3), frac_bits=F)
    assert "precision" in str(ei.value)
    want = [round(Fraction(x) * 2**F) for x in (0.5, -1.25)]     # half to even
    assert to_fixed(np.array([0.5, -1.25]), F).tolist() == want


def test_to_fixed_16_still_works():
    assert to_fixed(np.array([1.0, 0.5, -3.0]), 16).tolist() == [65536, 32768, -3 * 65536]


# --- the quadratic example (README) --------------------------------------------------------------------------
T = 50
_A = 1.0 + np.random.default_rng(0).random(T)
_THETA = np.array([0.5, 2.0, -1.0])


def _grad(w, t):
    return _A[t] * (w - _THETA)


def _grad_vjp(w, t):
    return _grad(w, t), (lambda u: (_A[t] * u, -_A[t] * u))


def _val(w):
    return 0.5 * np.sum((w - 1) ** 2), w - 1, np.zeros(3)


def _hypergrad(method, **kw):
    return revsgd.hypergrad_numpy(_grad, _grad_vjp, _val, np.zeros(3), lr=np.full(T, 0.1),
                                  momentum=np.full(T, 0.9), num_hypers=3, method=method, **kw)


def _rel_errors(r, ref) -> dict:
    out = {k: np.abs(r.grads[k] - ref.grads[k]).max() / np.abs(ref.grads[k]).max() for k in ref.grads}
    out["theta"] = np.abs(r.d_theta - ref.d_theta).max() / np.abs(ref.d_theta).max()
    out["w0"] = np.abs(r.d_w0 - ref.d_w0).max() / np.abs(ref.d_w0).max()
    return out


@pytest.fixture(scope="module")
def precision():
    ref = _hypergrad("trajectory")
    return {F: _rel_errors(_hypergrad("exact", frac_bits=F), ref) for F in (24, 32, 52)}


@pytest.mark.parametrize("F", [24, 32, 52])
def test_exact_hypergradient_precision(precision, F):
    """Each of the T steps perturbs w and v by at most ~2 units of 2^-F (a rint, a floor shift); the hypergradient
    is linear in those perturbations through the (contracting) dynamics, so its relative error is O(T·2^-F).
    Bound: 2T·2^-F = 100·2^-F (measured: at most ~17·2^-F for F = 24, 32, 52)."""
    err = precision[F]
    bound = 2 * T * 2.0**-F
    assert all(e <= bound for e in err.values()), (F, err, bound)


def test_exact_hypergradient_error_scales_like_2_to_minus_F(precision):
    """8 more fractional bits divide the error by about 2^8 (accepted: 2^5 .. 2^11)."""
    for k in precision[24]:
        ratio = precision[24][k] / precision[32][k]
        assert 2**5 <= ratio <= 2**11, (k, precision[24][k], precision[32][k], ratio)


def test_hypergrad_numpy_refuses_low_frac_bits():
    with pytest.raises(ValueError, match="precision"):
        _hypergrad("exact", frac_bits=16)


# --- zero stays zero ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("gamma", [0.9, 0.5, MIN_FACTOR, 0.999])
def test_zero_velocity_stays_exactly_zero(backend, gamma):
    L, steps = 1000, 300
    w0 = np.random.default_rng(1).uniform(-1, 1, L)
    opt = ExactMomentum(w0, groups=[0, 10, L], backend=backend)
    W0 = opt.fixed_params
    zero = np.zeros(L)
    for _ in range(steps):
        opt.step(zero, np.array([0.1, 0.3]), gamma)
    assert not opt.fixed_velocity.any()
    assert np.all(opt.velocity == 0.0)
    assert np.array_equal(opt.fixed_params, W0)           # nothing moved
    for _ in range(steps):
        opt.unstep_position(np.array([0.1, 0.3]))
        opt.unstep_velocity(zero, gamma)
    assert opt.at_start() and np.array_equal(opt.fixed_params, W0) and not opt.fixed_velocity.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifting_zero_lanes_keeps_zero(backend):
    tape = Tape(100, groups=[0, 50, 100], backend=backend)
    X = lanes(np.zeros(100, dtype=np.int64), backend)
    for h in (16, 3, 0, 15, 1):
        tape.shift(X, h)
        assert not host(X).any()
    assert tape.info_bits == 35 * 100
