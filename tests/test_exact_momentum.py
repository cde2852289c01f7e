"""ExactMomentum: bit-exact reversal, the forward arithmetic, cross-backend identity, all-or-nothing errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import revsgd
from revsgd import ExactMomentum, NonFiniteError, TapeExhaustedError, from_fixed, to_fixed
from revsgd.core.tapeformat import CHUNK
from tests.conftest import (BACKENDS, COMPILED, REFERENCE, ModelTape, momentum_schedule, momentum_snapshot,
                            num_threads, reverse_momentum, run_momentum)


# --- exact reversal ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from([1, 2, 3, 17, 100, 1001]), steps=st.integers(0, 15), frac_bits=st.integers(20, 52),
       per_lane_alpha=st.sampled_from([None, True, False]), per_lane_n=st.sampled_from([None, True, False]),
       grad_scale=st.sampled_from([1e-3, 1.0, 10.0]), with_v0=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_forward_then_reverse_restores_start(backend, size, steps, frac_bits, per_lane_alpha, per_lane_n, grad_scale,
                                             with_v0, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(-1.0, 1.0, size)
    v0 = rng.standard_normal(size) if with_v0 else None
    grads, alphas, ns = momentum_schedule(rng, size, steps, per_lane_alpha=per_lane_alpha, per_lane_n=per_lane_n,
                                          grad_scale=grad_scale)
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns, frac_bits, v0=v0)
    W0 = to_fixed(w0, frac_bits)
    V0 = np.zeros(size, np.int64) if v0 is None else to_fixed(v0, frac_bits)
    assert opt.steps == steps
    assert opt.tape.at_start() == (steps == 0)
    reverse_momentum(opt, grads, alphas, ns)
    assert np.array_equal(opt.fixed_params, W0)
    assert np.array_equal(opt.fixed_velocity, V0)
    assert opt.tape.at_start()
    assert opt.steps == 0
    assert np.array_equal(opt.params, from_fixed(W0, frac_bits))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [CHUNK + 3, 2 * CHUNK - 1])
def test_reverse_restores_start_across_chunks(backend, size):
    rng = np.random.default_rng(size)
    w0 = rng.uniform(-1, 1, size)
    grads, alphas, ns = momentum_schedule(rng, size, 8, n_lo=1)
    ns[2] = 1
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns)
    assert not np.array_equal(W, to_fixed(w0))
    reverse_momentum(opt, grads, alphas, ns)
    assert np.array_equal(opt.fixed_params, to_fixed(w0))
    assert not opt.fixed_velocity.any()
    assert opt.tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_run_at_gamma_0_9(backend):
    rng = np.random.default_rng(0)
    L, T = 64, 300
    w0 = rng.uniform(-1, 1, L)
    grads = [rng.standard_normal(L) for _ in range(T)]
    alphas, ns = [0.05] * T, [int(revsgd.quantize_momentum(0.9))] * T
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns)
    assert opt.tape.info_bits > 0.99 * L * T * -np.log2(0.9)
    reverse_momentum(opt, grads, alphas, ns)
    assert np.array_equal(opt.fixed_params, to_fixed(w0)) and opt.tape.at_start()


# --- the forward arithmetic ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac_bits", [52, 40, 24])
@pytest.mark.parametrize("per_lane", [False, True])
def test_forward_matches_independent_recomputation(backend, frac_bits, per_lane):
    """V ← exact_scale(V, n) − rint((1 − n/2^16)·g·2^F);  W ← W + rint(α·float64(V)), with Python ints/floats and
    the plain-Python tape model supplying the bits of exact_scale."""
    L, T = 23, 12
    rng = np.random.default_rng(frac_bits + per_lane)
    w0 = rng.uniform(-1, 1, L)
    grads, alphas, ns = momentum_schedule(rng, L, T, per_lane_alpha=per_lane, per_lane_n=per_lane)
    opt = ExactMomentum(w0, frac_bits=frac_bits, backend=backend)
    model = ModelTape(L)
    W = [round(x * 2.0**frac_bits) for x in w0.tolist()]
    V = [0] * L
    for g, a, n in zip(grads, alphas, ns):
        W_before = opt.fixed_params
        opt.step(g, a, n)
        V = model.scale(V, n)
        for i in range(L):
            ni = int(n) if np.ndim(n) == 0 else int(n[i])
            ai = float(a) if np.ndim(a) == 0 else float(a[i])
            V[i] -= round(((65536 - ni) * 2.0**-16 * float(g[i])) * 2.0**frac_bits)
            W[i] += round(ai * float(V[i]))
        assert opt.fixed_velocity.tolist() == V
        assert opt.fixed_params.tolist() == W
        assert opt.tape.to_bytes() == model.to_bytes()
        # the position update is exactly rint(α · float64(V_{t+1}))
        alpha = np.broadcast_to(np.asarray(a, dtype=np.float64), (L,))
        assert np.array_equal(opt.fixed_params - W_before, np.rint(alpha * opt.fixed_velocity.astype(np.float64))
                              .astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac_bits", [52, 44])
def test_fixed_point_tracks_float_recursion(backend, frac_bits):
    """flt(V) follows v = γv − (1 − γ)g and flt(W) follows w = w + αv: exact_scale errs by less than n units of
    2^-F per step (the bits s come from the tape), fix() by half a unit; both are damped or summed."""
    L, T = 200, 60
    rng = np.random.default_rng(frac_bits)
    w0 = rng.uniform(-1, 1, L)
    grads, alphas, ns = momentum_schedule(rng, L, T, n_lo=30000)
    opt = ExactMomentum(w0, frac_bits=frac_bits, backend=backend)
    ulp = 2.0**-frac_bits
    w = from_fixed(to_fixed(w0, frac_bits), frac_bits)
    v = np.zeros(L)
    bound_v = np.zeros(L)
    bound_w = np.zeros(L)
    for g, a, n in zip(grads, alphas, ns):
        gamma = np.broadcast_to(np.asarray(n, dtype=np.float64), (L,)) / 65536.0
        alpha = np.broadcast_to(np.asarray(a, dtype=np.float64), (L,))
        opt.step(g, a, n)
        terms_v = gamma * np.abs(v) + (1.0 - gamma) * np.abs(g)
        v = gamma * v - (1.0 - gamma) * g
        terms_w = np.abs(w) + alpha * np.abs(v)
        w = w + alpha * v
        # exact_scale: |s − r·n/65536| < n units; fix(): half a unit; float64 products/sums: a few 2^-53
        bound_v = gamma * bound_v + (65536 * gamma + 1.0) * ulp + 4e-16 * terms_v
        bound_w = bound_w + alpha * bound_v + ulp + 4e-16 * terms_w
        assert np.all(np.abs(opt.velocity - v) <= bound_v)
        assert np.all(np.abs(opt.params - w) <= bound_w)
    # and the bound is not vacuous: the error is far below the values themselves
    assert bound_v.max() < 1e-6 * np.abs(v).max()


# --- cross-backend and cross-thread identity -----------------------------------------------------------------
def _big_history(seed: int, L: int = 3 * CHUNK + 5, T: int = 6):
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(-1, 1, L)
    grads, alphas, ns = momentum_schedule(rng, L, T)
    alphas[0] = rng.uniform(0, 0.5, L)
    ns[1] = rng.integers(1, 65537, L)
    ns[2] = 3
    return w0, grads, alphas, ns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_identical_to_reference(backend, threads):
    w0, grads, alphas, ns = _big_history(1)
    Wr, Vr, br, ref = run_momentum(REFERENCE, w0, grads, alphas, ns, frac_bits=48)
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns, frac_bits=48, threads=threads)
    assert np.array_equal(W, Wr)
    assert np.array_equal(V, Vr)
    assert b == br
    k = 3
    reverse_momentum(ref, grads[k:], alphas[k:], ns[k:])
    reverse_momentum(opt, grads[k:], alphas[k:], ns[k:], threads=threads)
    assert momentum_snapshot(opt) == momentum_snapshot(ref)
    # the two halves of a reverse step separately
    with num_threads(threads):
        opt.unstep_position(alphas[k - 1])
    ref.unstep_position(alphas[k - 1])
    assert momentum_snapshot(opt) == momentum_snapshot(ref)
    with num_threads(threads):
        opt.unstep_velocity(grads[k - 1], ns[k - 1])
    ref.unstep_velocity(grads[k - 1], ns[k - 1])
    assert momentum_snapshot(opt) == momentum_snapshot(ref)


@pytest.mark.parametrize("backend", COMPILED)
def test_thread_count_does_not_change_anything(backend):
    w0, grads, alphas, ns = _big_history(2)
    W1, V1, b1, o1 = run_momentum(backend, w0, grads, alphas, ns, threads=1)
    W2, V2, b2, o2 = run_momentum(backend, w0, grads, alphas, ns, threads=2)
    assert np.array_equal(W1, W2) and np.array_equal(V1, V2) and b1 == b2
    reverse_momentum(o1, grads, alphas, ns, threads=2)
    reverse_momentum(o2, grads, alphas, ns, threads=1)
    for o in (o1, o2):
        assert np.array_equal(o.fixed_params, to_fixed(w0)) and not o.fixed_velocity.any() and o.tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from([1, 5, 64, 777]), steps=st.integers(1, 6), frac_bits=st.integers(20, 52),
       seed=st.integers(0, 2**32 - 1))
def test_identical_to_reference_property(backend, size, steps, frac_bits, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(-1, 1, size)
    grads, alphas, ns = momentum_schedule(rng, size, steps)
    Wr, Vr, br, _ = run_momentum(REFERENCE, w0, grads, alphas, ns, frac_bits)
    W, V, b, _ = run_momentum(backend, w0, grads, alphas, ns, frac_bits)
    assert np.array_equal(W, Wr) and np.array_equal(V, Vr) and b == br


# --- errors: clear, and nothing changed ----------------------------------------------------------------------
BIG = 3 * CHUNK + 5
LATE_LANES = [BIG - 1, 3 * CHUNK - 1, 2 * CHUNK + 17, CHUNK + 5]


def _in_progress(backend, L=BIG, steps=3, seed=3, frac_bits=52, w0=None, v0=None):
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(-1, 1, L) if w0 is None else w0
    grads, alphas, ns = momentum_schedule(rng, L, steps, n_hi=65000)
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns, frac_bits, v0=v0)
    return opt, (grads, alphas, ns), w0, rng


def _finish_and_check_start(opt, hist, w0, v0=None):
    """After a rejected call the run must still reverse exactly to its start."""
    reverse_momentum(opt, *hist)
    assert np.array_equal(opt.fixed_params, to_fixed(w0, opt.frac_bits))
    V0 = np.zeros(opt.num_lanes, np.int64) if v0 is None else to_fixed(v0, opt.frac_bits)
    assert np.array_equal(opt.fixed_velocity, V0)
    assert opt.tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lane", LATE_LANES)
def test_non_finite_grad_in_step(backend, bad, lane):
    opt, hist, w0, rng = _in_progress(backend)
    before = momentum_snapshot(opt)
    g = rng.standard_normal(BIG)
    g[lane] = bad
    with pytest.raises(NonFiniteError, match="nothing was changed"):
        opt.step(g, rng.uniform(0, 0.5, BIG), 60000)
    assert momentum_snapshot(opt) == before
    with pytest.raises(NonFiniteError):
        opt.step(g, 0.1, 65536)  # γ = 1: (1 − γ)·NaN is still NaN
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES[:2])
def test_non_finite_grad_in_unstep_velocity(backend, lane):
    opt, hist, w0, rng = _in_progress(backend)
    grads, alphas, ns = hist
    opt.unstep_position(alphas[-1])
    before = momentum_snapshot(opt)
    g = grads[-1].copy()
    g[lane] = np.nan
    with pytest.raises(NonFiniteError):
        opt.unstep_velocity(g, ns[-1])
    assert momentum_snapshot(opt) == before
    opt.unstep_velocity(grads[-1], ns[-1])
    _finish_and_check_start(opt, (grads[:-1], alphas[:-1], ns[:-1]), w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES[:2])
@pytest.mark.parametrize("huge", [1e300, -1e300, 1e20])
def test_huge_grad_overflows(backend, lane, huge):
    opt, hist, w0, rng = _in_progress(backend)
    before = momentum_snapshot(opt)
    g = rng.standard_normal(BIG)
    g[lane] = huge
    with pytest.raises(OverflowError, match="gradient"):
        opt.step(g, 0.1, 50000)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES[:2])
def test_huge_alpha_overflows_params(backend, lane):
    opt, hist, w0, rng = _in_progress(backend)
    before = momentum_snapshot(opt)
    g = rng.standard_normal(BIG)
    alpha = np.full(BIG, 0.1)
    alpha[lane] = 1e30
    with pytest.raises(OverflowError):
        opt.step(g, alpha, 50000)
    assert momentum_snapshot(opt) == before
    with pytest.raises(OverflowError):
        opt.step(g, 1e30, 50000)
    assert momentum_snapshot(opt) == before
    # reversal with a huge alpha is refused the same way
    with pytest.raises(OverflowError):
        opt.unstep_position(alpha)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_leaving_range_overflow_names_params(backend):
    lane = 2 * CHUNK + 40
    w0 = np.zeros(BIG)
    w0[lane] = 2047.5
    opt, hist, w0, rng = _in_progress(backend, w0=w0)
    before = momentum_snapshot(opt)
    g = np.zeros(BIG)
    g[lane] = -1000.0   # with n = 1 the velocity becomes ≈ +1000, and params 2047.5 + 1000 > 2048
    with pytest.raises(OverflowError, match="params") as ei:
        opt.step(g, 1.0, 1)
    assert str(lane) in str(ei.value)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_velocity_leaving_range_overflow_names_velocity(backend):
    lane = 3 * CHUNK + 2
    v0 = np.zeros(BIG)
    v0[lane] = -2000.0
    opt, hist, w0, rng = _in_progress(backend, v0=v0, steps=0)
    before = momentum_snapshot(opt)
    g = np.zeros(BIG)
    g[lane] = 1e8       # (1/65536)·1e8 ≈ 1526 on top of ≈ -2000
    with pytest.raises(OverflowError, match="velocity"):
        opt.step(g, 0.0, 65535)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0, v0=v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_non_finite_rejected(backend):
    opt, hist, w0, rng = _in_progress(backend, L=10)
    before = momentum_snapshot(opt)
    for a in (np.nan, np.inf, np.r_[np.zeros(9), np.nan]):
        with pytest.raises(NonFiniteError):
            opt.step(rng.standard_normal(10), a, 100)
        with pytest.raises(NonFiniteError):
            opt.unstep_position(a)
        assert momentum_snapshot(opt) == before


def test_w0_and_v0_range_errors():
    with pytest.raises(OverflowError, match="w0") as ei:
        ExactMomentum(np.array([0.0, 1e6]), frac_bits=52)
    assert "1000000" in str(ei.value) and "2048" in str(ei.value)
    ExactMomentum(np.array([1e6]), frac_bits=40)       # fine with fewer fractional bits
    with pytest.raises(OverflowError, match="v0"):
        ExactMomentum(np.zeros(2), v0=np.array([0.0, -3000.0]))
    with pytest.raises(NonFiniteError, match="w0"):
        ExactMomentum(np.array([0.0, np.nan]))
    with pytest.raises(NonFiniteError, match="v0"):
        ExactMomentum(np.zeros(2), v0=np.array([np.inf, 0.0]))


def test_w0_range_error_at_62_bits():
    ExactMomentum(np.array([1.0]), frac_bits=62)
    with pytest.raises(OverflowError, match="w0"):
        ExactMomentum(np.array([2.0]), frac_bits=62)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(w0=np.zeros((2, 2))), TypeError), (dict(w0=np.zeros(3, dtype=np.int64)), TypeError),
    (dict(w0=np.zeros(0)), ValueError), (dict(w0=np.zeros(3), frac_bits=63), ValueError),
    (dict(w0=np.zeros(3), frac_bits=-1), ValueError), (dict(w0=np.zeros(3), frac_bits=52.0), TypeError),
    (dict(w0=np.zeros(3), frac_bits=True), TypeError), (dict(w0=np.zeros(3), v0=np.zeros(4)), TypeError),
    (dict(w0=np.zeros(3), v0=np.zeros(3, dtype=np.int64)), TypeError),
    (dict(w0=np.zeros(3), backend="nope"), ValueError),
])
def test_constructor_rejects(kwargs, exc):
    with pytest.raises(exc):
        ExactMomentum(**kwargs)


L_BAD = 19


def _bad_grads():
    return {
        "short": (np.zeros(L_BAD - 1), ValueError), "long": (np.zeros(L_BAD + 1), ValueError),
        "2d": (np.zeros((1, L_BAD)), ValueError), "int": (np.zeros(L_BAD, dtype=np.int64), TypeError),
        "bool": (np.zeros(L_BAD, dtype=bool), TypeError), "list": ([0.0] * L_BAD, TypeError),
        "complex": (np.zeros(L_BAD, dtype=complex), TypeError),
    }


def _bad_alphas():
    return {
        "short": (np.full(L_BAD - 1, 0.1), ValueError), "int_array": (np.ones(L_BAD, dtype=np.int64), TypeError),
        "2d": (np.full((1, L_BAD), 0.1), ValueError), "str": ("0.1", TypeError), "bool": (True, TypeError),
        "list": ([0.1] * L_BAD, TypeError),
    }


def _bad_ns():
    return {
        "zero": (0, ValueError), "above": (65537, ValueError), "negative": (-1, ValueError),
        "bool": (True, TypeError), "float": (0.9, TypeError), "lane_short": (np.full(L_BAD - 1, 5), ValueError),
        "lane_float": (np.full(L_BAD, 5.0), TypeError), "lane_zero": (np.r_[np.full(L_BAD - 1, 5), 0], ValueError),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_grads()))
def test_bad_grad_rejected(backend, case):
    opt, hist, w0, rng = _in_progress(backend, L=L_BAD)
    before = momentum_snapshot(opt)
    g, exc = _bad_grads()[case]
    with pytest.raises(exc, match="grad"):
        opt.step(g, 0.1, 100)
    assert momentum_snapshot(opt) == before
    with pytest.raises(exc, match="grad"):
        opt.unstep_velocity(g, 100)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_alphas()))
def test_bad_alpha_rejected(backend, case):
    opt, hist, w0, rng = _in_progress(backend, L=L_BAD)
    before = momentum_snapshot(opt)
    a, exc = _bad_alphas()[case]
    with pytest.raises(exc, match="alpha"):
        opt.step(rng.standard_normal(L_BAD), a, 100)
    with pytest.raises(exc, match="alpha"):
        opt.unstep_position(a)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_ns()))
def test_bad_n_rejected(backend, case):
    opt, hist, w0, rng = _in_progress(backend, L=L_BAD)
    before = momentum_snapshot(opt)
    n, exc = _bad_ns()[case]
    with pytest.raises(exc, match="n"):
        opt.step(rng.standard_normal(L_BAD), 0.1, n)
    with pytest.raises(exc, match="n"):
        opt.unstep_velocity(rng.standard_normal(L_BAD), n)
    assert momentum_snapshot(opt) == before
    _finish_and_check_start(opt, hist, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unstep_velocity_past_start(backend):
    rng = np.random.default_rng(4)
    w0 = rng.uniform(-1, 1, 7)
    opt = ExactMomentum(w0, backend=backend)
    before = momentum_snapshot(opt)
    with pytest.raises(TapeExhaustedError):
        opt.unstep_velocity(rng.standard_normal(7), 100)
    assert momentum_snapshot(opt) == before
    grads, alphas, ns = momentum_schedule(rng, 7, 4)
    for g, a, n in zip(grads, alphas, ns):
        opt.step(g, a, n)
    reverse_momentum(opt, grads, alphas, ns)
    before = momentum_snapshot(opt)
    with pytest.raises(TapeExhaustedError):
        opt.unstep_velocity(grads[0], ns[0])
    assert momentum_snapshot(opt) == before
    assert opt.tape.at_start() and np.array_equal(opt.fixed_params, to_fixed(w0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_reversing_with_a_different_gradient_is_detected(backend, which):
    L, T = 40, 20
    rng = np.random.default_rng(["first", "middle", "last"].index(which))
    w0 = rng.uniform(-1, 1, L)
    grads, alphas, ns = momentum_schedule(rng, L, T, n_lo=100, n_hi=64000)
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns)
    k = {"first": 0, "middle": T // 2, "last": T - 1}[which]
    wrong = [g.copy() for g in grads]
    wrong[k] = wrong[k] + 1.0
    try:
        reverse_momentum(opt, wrong, alphas, ns)
    except (TapeExhaustedError, OverflowError):
        return
    assert not opt.tape.at_start()
    assert not (np.array_equal(opt.fixed_params, to_fixed(w0)) and not opt.fixed_velocity.any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reversing_with_a_different_n_is_detected(backend):
    L, T = 40, 20
    rng = np.random.default_rng(5)
    w0 = rng.uniform(-1, 1, L)
    grads, alphas, ns = momentum_schedule(rng, L, T, n_lo=100, n_hi=64000)
    W, V, b, opt = run_momentum(backend, w0, grads, alphas, ns)
    wrong = list(ns)
    wrong[T // 2] = wrong[T // 2] + 7
    try:
        reverse_momentum(opt, grads, alphas, wrong)
    except (TapeExhaustedError, OverflowError):
        return
    assert not opt.tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", [4, CHUNK + 9])
def test_non_finite_message_names_the_lane(backend, lane):
    L = 2 * CHUNK + 1
    opt = ExactMomentum(np.zeros(L), backend=backend)
    g = np.ones(L)
    g[lane] = np.nan
    with pytest.raises(NonFiniteError) as ei:
        opt.step(g, 0.1, 60000)
    assert f"lane {lane};" in str(ei.value)


def test_properties_and_repr():
    w0 = np.array([0.5, -0.25, 1.0])
    opt = ExactMomentum(w0, frac_bits=30, backend=REFERENCE)
    assert opt.num_lanes == 3 and opt.steps == 0 and opt.frac_bits == 30
    assert np.array_equal(opt.params, w0)
    assert opt.fixed_params.tolist() == [2**29, -(2**28), 2**30]
    P = opt.fixed_params
    P[0] = 7                       # a copy: the state is not exposed for writing
    assert opt.fixed_params[0] == 2**29
    opt.step(np.array([1.0, 0.0, -1.0]), 0.5, 32768)
    assert opt.steps == 1
    assert opt.velocity.tolist() == [-0.5, 0.0, 0.5]
    assert opt.params.tolist() == [0.25, -0.25, 1.25]
    assert "ExactMomentum" in repr(opt) and "steps=1" in repr(opt)
