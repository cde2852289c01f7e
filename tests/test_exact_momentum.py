"""``revsgd.ExactMomentum`` (docs/design.md §2, §3, §5): the heavy-ball step on int64 fixed point, reversible.

- forward then reverse restores W and V bit for bit and the tape is at its start (hypothesis over sizes, steps,
  groups, momentum in [2^-15, 1] incl. 1 and 2^-15, lr per group, frac_bits 24..62, v0);
- the group scales follow ``decay_scales`` of the momentum schedule, and the tape holds exactly Σ h_t·lanes bits;
- the fixed-point trajectory tracks a float64 reference of v ← γv − (1−γ)g, w ← w + αv within a bound derived
  below (test_tracks_float64_reference);
- byte identity (W, V̂, tape, scales) across host backends and kernel thread counts 1 and 2;
- errors are the documented exception types and change nothing (fixed_params, fixed_velocity, info_bits, steps,
  tape bytes, scales); afterwards the run still reverses to its start.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from revsgd import ExactMomentum, NonFiniteError, TapeExhaustedError, to_fixed
from revsgd.core.fixed import MIN_FACTOR, decay_scales
from tests.conftest import CHUNK, HOST_BACKENDS, REFERENCE, num_threads

BIG = 2 * CHUNK + 123
LATE_LANES = [BIG - 1, CHUNK + 5, 2 * CHUNK]


# --- helpers ---------------------------------------------------------------------------------------------------
def snapshot(opt: ExactMomentum) -> tuple:
    return (opt.fixed_params.tobytes(), opt.fixed_velocity.tobytes(), opt.info_bits, opt.steps,
            opt._tape.to_bytes(), np.asarray(opt._e).tobytes())


def forward(opt, grads, lrs, moms, threads=None):
    with num_threads(threads):
        for g, a, m in zip(grads, lrs, moms):
            opt.step(g, a, m)


def reverse(opt, grads, lrs, moms, threads=None):
    with num_threads(threads):
        for g, a, m in zip(reversed(grads), reversed(lrs), reversed(moms)):
            opt.unstep_position(a)
            opt.unstep_velocity(g, m)


def assert_at_start(opt, w0, frac_bits, v0=None):
    assert np.array_equal(opt.fixed_params, to_fixed(w0, frac_bits))
    V0 = np.zeros(opt.num_lanes, np.int64) if v0 is None else to_fixed(v0, frac_bits)
    assert np.array_equal(opt.fixed_velocity, V0)
    assert opt.at_start() and opt._tape.at_start() and opt.steps == 0 and opt.info_bits == 0
    assert np.all(np.asarray(opt._e) == 1.0)


def offsets_for(rng, L, G):
    G = min(G, L)
    cuts = np.sort(rng.choice(np.arange(1, L), size=G - 1, replace=False)) if G > 1 else np.array([], int)
    return np.concatenate([[0], cuts, [L]]).astype(np.int64)


SPECIAL_GAMMAS = [1.0, MIN_FACTOR, 0.9, 0.5, 0.999, 0.99, np.nextafter(1.0, 0.0), 2 * MIN_FACTOR]


def schedule(rng, L, G, T, grad_scale=0.05, per_group=None):
    """(grads, lrs, moms): lr and momentum each a float or one value per group (random unless fixed)."""
    grads, lrs, moms = [], [], []
    for _ in range(T):
        grads.append(rng.standard_normal(L) * grad_scale)
        pg = bool(rng.integers(2)) if per_group is None else per_group
        lrs.append(rng.uniform(0, 0.5, G) if pg and G > 1 else float(rng.uniform(0, 0.5)))

        def gamma():
            return (float(rng.choice(SPECIAL_GAMMAS)) if rng.random() < 0.4 else
                    float(2.0 ** rng.uniform(-15, 0)) if rng.random() < 0.3 else float(rng.uniform(MIN_FACTOR, 1)))
        moms.append(np.array([gamma() for _ in range(G)]) if pg and G > 1 else gamma())
    return grads, lrs, moms


def momentum_table(moms, G):
    return np.array([np.broadcast_to(np.asarray(m, dtype=np.float64), (G,)) for m in moms]).reshape(len(moms), G)


# --- exact round trips -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(size=st.sampled_from([1, 2, 7, 100, CHUNK + 5]), steps=st.integers(0, 20), groups=st.integers(1, 5),
       frac_bits=st.integers(24, 62), seed=st.integers(0, 2**32 - 1), with_v0=st.booleans())
def test_forward_then_reverse_restores_start(backend, size, steps, groups, frac_bits, seed, with_v0):
    rng = np.random.default_rng(seed)
    offsets = offsets_for(rng, size, groups)
    G = offsets.shape[0] - 1
    lim = min(0.5, 2.0 ** (61 - frac_bits))
    w0 = rng.uniform(-lim, lim, size)
    v0 = rng.uniform(-lim, lim, size) * 0.1 if with_v0 else None
    grads, lrs, moms = schedule(rng, size, G, steps, grad_scale=0.05 * lim)
    opt = ExactMomentum(w0, groups=offsets, frac_bits=frac_bits, backend=backend, v0=v0)
    done = 0
    for g, a, m in zip(grads, lrs, moms):
        before = snapshot(opt)
        try:
            opt.step(g, a, m)
        except OverflowError:            # possible at F = 62 (range ±2): refused, nothing changed
            assert snapshot(opt) == before
            break
        done += 1
    grads, lrs, moms = grads[:done], lrs[:done], moms[:done]
    assert opt.steps == done
    # the scales are decay_scales of the momentum schedule, and the tape holds exactly Σ h·lanes bits
    e, h = decay_scales(momentum_table(moms, G))
    assert np.array_equal(np.asarray(opt._e), e[done])
    assert opt.info_bits == int((h.sum(axis=0) * np.diff(offsets)).sum())
    reverse(opt, grads, lrs, moms)
    assert_at_start(opt, w0, frac_bits, v0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, MIN_FACTOR, 0.5, 0.9, 0.999])
def test_long_run_constant_momentum(backend, gamma):
    L, T = 300, 200
    rng = np.random.default_rng(int(gamma * 1000))
    w0 = rng.uniform(-1, 1, L)
    grads = [rng.standard_normal(L) for _ in range(T)]
    opt = ExactMomentum(w0, backend=backend)
    forward(opt, grads, [0.05] * T, [gamma] * T)
    e, h = decay_scales(np.full(T, gamma))
    assert opt.info_bits == int(h.sum()) * L
    if gamma == 1.0:
        assert opt.info_bits == 0                 # γ = 1 destroys nothing
    reverse(opt, grads, [0.05] * T, [gamma] * T)
    assert_at_start(opt, w0, 52)


# --- float64 reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("frac_bits", [24, 32, 52])
def test_tracks_float64_reference(backend, frac_bits):
    """Bound (u = 2^-F, ε = 2^-52 covering a few float64 roundings on either side). With V̂ the int state,
    v = e·V̂·u exactly; one step is V̂' = floor(V̂/2^h) + rint(fl(fl(−(1−γ)/e')·g)/u) with e' = fl(eγ)·2^h ≤ 1:

    - the floor loses r·fl(eγ)·u < e'·u ≤ u (r < 2^h), the rint at most e'·u/2 ≤ u/2;
    - fl(eγ) = eγ(1+δ) and the coefficient's two roundings give relative errors ≤ 2ε on γv and (1−γ)g;

    so E_v' ≤ γ(1+2ε)E_v + 1.5u + 4ε(γ|v| + (1−γ)|g|). Positions: W' = W + rint(fl(fl(αe')·V̂')), so
    E_w' ≤ E_w + αE_v' + u/2 + 4ε(α|v'| + |w'|). Reading back (int64 → float64, ·e) adds 2ε relative."""
    L, T, G = 240, 80, 3
    rng = np.random.default_rng(frac_bits)
    offsets = np.array([0, 7, 100, L])
    sizes = np.diff(offsets)
    w0 = rng.uniform(-1, 1, L)
    grads, lrs, moms = schedule(rng, L, G, T, grad_scale=1.0, per_group=True)
    moms[5] = np.array([MIN_FACTOR, 1.0, 0.999])
    opt = ExactMomentum(w0, groups=offsets, frac_bits=frac_bits, backend=backend)
    u, eps = 2.0**-frac_bits, 2.0**-52
    w = w0.copy()
    v = np.zeros(L)
    Ev, Ew = np.zeros(L), np.full(L, u / 2)          # to_fixed(w0) rounds by at most u/2
    worst = 0.0
    for g, a, m in zip(grads, lrs, moms):
        gam = np.repeat(np.broadcast_to(m, (G,)), sizes)
        alpha = np.repeat(np.broadcast_to(a, (G,)), sizes)
        opt.step(g, a, m)
        Ev = gam * (1 + 2 * eps) * Ev + 1.5 * u + 4 * eps * (gam * (np.abs(v) + Ev) + (1 - gam) * np.abs(g))
        v = gam * v - (1.0 - gam) * g
        Ew = Ew + alpha * Ev + u / 2 + 4 * eps * (alpha * (np.abs(v) + Ev) + np.abs(w) + Ew)
        w = w + alpha * v
        dv = np.abs(opt.velocity - v)
        dw = np.abs(opt.params - w)
        assert np.all(dv <= Ev + 2 * eps * np.abs(v)), (np.max(dv - Ev), frac_bits)
        assert np.all(dw <= Ew + 2 * eps * np.abs(w)), (np.max(dw - Ew), frac_bits)
        worst = max(worst, float(dw.max()))
    # the bound is not vacuous: a few units of 2^-F per step, far below the values
    assert Ev.max() < 4 * u * T and Ew.max() < 4 * u * T * T
    if frac_bits <= 32:
        assert worst > 0                                  # the fixed point really differs: the test measures it


# --- byte identity ----------------------------------------------------------------------------------------------
def _big_run(seed=17, T=10):
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 1, 5000, CHUNK + 3, BIG])
    w0 = rng.uniform(-1, 1, BIG)
    v0 = rng.uniform(-0.1, 0.1, BIG)
    grads, lrs, moms = schedule(rng, BIG, 4, T, grad_scale=1.0, per_group=True)
    moms[2] = np.array([MIN_FACTOR, 0.999, 1.0, 0.5])
    return w0, v0, offsets, grads, lrs, moms


@pytest.fixture(scope="module")
def big_reference():
    w0, v0, offsets, grads, lrs, moms = _big_run()
    opt = ExactMomentum(w0, groups=offsets, backend=REFERENCE, v0=v0)
    forward(opt, grads, lrs, moms, threads=1)
    return snapshot(opt)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_identical_across_backends_and_threads(backend, threads, big_reference):
    w0, v0, offsets, grads, lrs, moms = _big_run()
    opt = ExactMomentum(w0, groups=offsets, backend=backend, v0=v0)
    forward(opt, grads, lrs, moms, threads=threads)
    assert snapshot(opt) == big_reference
    reverse(opt, grads, lrs, moms, threads=3 - threads)
    assert_at_start(opt, w0, 52, v0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_grad_float_dtypes_behave_like_float64(backend, dtype):
    """``grad`` is documented as a 1-D float array: a float32/float16 gradient must give, on every backend, the
    result of the same values as float64 (the reference backend's behaviour)."""
    rng = np.random.default_rng(2)
    g = rng.standard_normal(50).astype(dtype)
    a = ExactMomentum(np.zeros(50), backend=backend)
    b = ExactMomentum(np.zeros(50), backend=REFERENCE)
    a.step(g, 0.1, 0.9)
    b.step(g.astype(np.float64), 0.1, 0.9)
    assert snapshot(a) == snapshot(b)
    a.unstep_position(0.1)
    a.unstep_velocity(g, 0.9)
    assert a.at_start()


def test_non_contiguous_grad():
    g = np.arange(20, dtype=np.float64)[::2] * 0.01
    for backend in HOST_BACKENDS:
        a = ExactMomentum(np.zeros(10), backend=backend)
        b = ExactMomentum(np.zeros(10), backend=REFERENCE)
        a.step(g, 0.1, 0.9)
        b.step(g.copy(), 0.1, 0.9)
        assert snapshot(a) == snapshot(b)


# --- errors change nothing -------------------------------------------------------------------------------------
def _in_progress(backend, steps=3, seed=3, L=BIG):
    rng = np.random.default_rng(seed)
    offsets = np.array([0, 10, min(CHUNK + 1, L - 1), L])
    w0 = rng.uniform(-1, 1, L)
    hist = schedule(rng, L, 3, steps, grad_scale=1.0)
    opt = ExactMomentum(w0, groups=offsets, backend=backend)
    forward(opt, *hist)
    return opt, hist, w0, rng


def _finish(opt, hist, w0):
    reverse(opt, *hist)
    assert_at_start(opt, w0, opt.frac_bits)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_grad_in_step(backend, lane, bad):
    opt, hist, w0, rng = _in_progress(backend)
    before = snapshot(opt)
    g = rng.standard_normal(BIG)
    g[lane] = bad
    for gamma in (0.9, 1.0, MIN_FACTOR):            # γ = 1: (1 − γ)·NaN is NaN, still refused
        with pytest.raises(NonFiniteError) as ei:
            opt.step(g, 0.1, gamma)
        assert str(lane) in str(ei.value)
        assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES[:2])
def test_non_finite_grad_in_unstep_velocity(backend, lane):
    opt, hist, w0, rng = _in_progress(backend)
    grads, lrs, moms = hist
    opt.unstep_position(lrs[-1])
    before = snapshot(opt)
    g = grads[-1].copy()
    g[lane] = np.nan
    with pytest.raises(NonFiniteError):
        opt.unstep_velocity(g, moms[-1])
    assert snapshot(opt) == before
    opt.unstep_velocity(grads[-1], moms[-1])
    _finish(opt, (grads[:-1], lrs[:-1], moms[:-1]), w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("lane", LATE_LANES[:2])
@pytest.mark.parametrize("huge", [1e300, -1e300, 1e20])
def test_huge_grad_overflows_velocity(backend, lane, huge):
    opt, hist, w0, rng = _in_progress(backend)
    before = snapshot(opt)
    g = rng.standard_normal(BIG)
    g[lane] = huge
    with pytest.raises(OverflowError) as ei:
        opt.step(g, 0.1, 0.5)
    assert "velocity" in str(ei.value) and str(lane) in str(ei.value)
    assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_huge_lr_overflows_params(backend):
    opt, hist, w0, rng = _in_progress(backend)
    before = snapshot(opt)
    g = rng.standard_normal(BIG)
    for lr in (1e30, np.array([0.1, 0.1, 1e30]), np.array([1e300, 0.1, 0.1])):
        with pytest.raises(OverflowError) as ei:
            opt.step(g, lr, 0.9)
        assert "params" in str(ei.value)
        assert snapshot(opt) == before
    with pytest.raises(OverflowError):
        opt.unstep_position(np.array([0.1, 0.1, 1e30]))
    assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_params_leaving_range(backend):
    L = CHUNK + 50
    w0 = np.zeros(L)
    w0[CHUNK + 40] = 2047.5
    opt = ExactMomentum(w0, backend=backend)
    before = snapshot(opt)
    g = np.zeros(L)
    g[CHUNK + 40] = -2000.0                          # γ = 2^-15: v ≈ +2000, w ≈ 2047.5 + 2000 > 2048
    with pytest.raises(OverflowError, match="params") as ei:
        opt.step(g, 1.0, MIN_FACTOR)
    assert str(CHUNK + 40) in str(ei.value)
    assert snapshot(opt) == before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad", [0.0, -0.0, 1.5, np.nextafter(1.0, 2.0), np.nan, -0.5, MIN_FACTOR / 2])
def test_bad_momentum(backend, bad):
    opt, hist, w0, rng = _in_progress(backend, L=500)
    before = snapshot(opt)
    g = rng.standard_normal(500)
    with pytest.raises(ValueError) as ei:
        opt.step(g, 0.1, bad)
    if bad == 0.0:
        assert "plain SGD" in str(ei.value)
    with pytest.raises(ValueError):
        opt.step(g, 0.1, np.array([0.9, bad, 0.9]))
    assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_unstep_before_any_step(backend):
    opt = ExactMomentum(np.ones(4), backend=backend)
    before = snapshot(opt)
    with pytest.raises(TapeExhaustedError):
        opt.unstep_position(0.1)
    with pytest.raises(TapeExhaustedError):
        opt.unstep_velocity(np.zeros(4), 0.9)
    assert snapshot(opt) == before
    opt.step(np.ones(4), 0.1, 0.9)
    opt.unstep_position(0.1)
    opt.unstep_velocity(np.ones(4), 0.9)
    with pytest.raises(TapeExhaustedError):
        opt.unstep_position(0.1)
    assert opt.at_start()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_wrong_momentum_at_unstep_velocity(backend):
    opt, hist, w0, rng = _in_progress(backend, L=500)
    grads, lrs, moms = hist
    opt.unstep_position(lrs[-1])
    before = snapshot(opt)
    m = np.broadcast_to(np.asarray(moms[-1], dtype=np.float64), (3,))
    for wrong in (np.nextafter(m, 0.0), m * 0.5, np.array([m[0], m[1], np.nextafter(m[2], 0.0)])):
        with pytest.raises(ValueError, match="momentum"):
            opt.unstep_velocity(grads[-1], wrong)
    assert snapshot(opt) == before
    opt.unstep_velocity(grads[-1], moms[-1])
    _finish(opt, (grads[:-1], lrs[:-1], moms[:-1]), w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bad_arguments(backend):
    opt, hist, w0, rng = _in_progress(backend, L=500)
    before = snapshot(opt)
    g = rng.standard_normal(500)
    cases = [
        (lambda: opt.step(g.astype(np.int64), 0.1, 0.9), TypeError),
        (lambda: opt.step(list(g), 0.1, 0.9), TypeError),
        (lambda: opt.step(g[:-1], 0.1, 0.9), ValueError),
        (lambda: opt.step(g.reshape(20, 25), 0.1, 0.9), ValueError),
        (lambda: opt.step(g, np.array([0.1, 0.1]), 0.9), TypeError),
        (lambda: opt.step(g, np.full((3, 1), 0.1), 0.9), TypeError),
        (lambda: opt.step(g, 0.1, np.array([0.9, 0.9])), TypeError),
        (lambda: opt.step(g, True, 0.9), TypeError),
        (lambda: opt.step(g, None, 0.9), TypeError),
        (lambda: opt.step(g, np.nan, 0.9), NonFiniteError),
        (lambda: opt.step(g, np.array([0.1, np.inf, 0.1]), 0.9), NonFiniteError),
        (lambda: opt.unstep_position(np.array([0.1, 0.1])), TypeError),
        (lambda: opt.unstep_position(np.nan), NonFiniteError),
        (lambda: opt.unstep_velocity(g.astype(np.int32), hist[2][-1]), TypeError),
        (lambda: opt.unstep_velocity(g[:3], hist[2][-1]), ValueError),
    ]
    for call, exc in cases:
        with pytest.raises(exc):
            call()
        assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_string_hyperparameters_refused(backend):
    """lr and momentum are floats or float arrays: a str is a wrong type, not silently parsed."""
    opt, hist, w0, rng = _in_progress(backend, L=500)
    before = snapshot(opt)
    g = rng.standard_normal(500)
    for lr, m in (("0.1", 0.9), (0.1, "0.9"), (np.array(["0.1"] * 3), 0.9)):
        with pytest.raises((TypeError, ValueError)):
            opt.step(g, lr, m)
        assert snapshot(opt) == before
    _finish(opt, hist, w0)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(w0=np.zeros((3, 2))), TypeError),
    (dict(w0=np.zeros(3, dtype=np.int64)), TypeError),
    (dict(w0=np.zeros(0)), ValueError),
    (dict(w0=np.zeros(3), frac_bits=16), ValueError),
    (dict(w0=np.zeros(3), frac_bits=23), ValueError),
    (dict(w0=np.zeros(3), frac_bits=63), ValueError),
    (dict(w0=np.zeros(3), frac_bits=True), TypeError),
    (dict(w0=np.zeros(3), frac_bits=52.0), TypeError),
    (dict(w0=np.zeros(3), backend="torch"), ValueError),
    (dict(w0=np.zeros(3), backend="nope"), ValueError),
    (dict(w0=np.zeros(3), v0=np.zeros(4)), TypeError),
    (dict(w0=np.zeros(3), v0=np.zeros(3, dtype=np.int64)), TypeError),
    (dict(w0=np.array([0.0, np.nan, 1.0])), NonFiniteError),
    (dict(w0=np.array([0.0, 3000.0])), OverflowError),
    (dict(w0=np.array([0.0, 1.5]), frac_bits=62), None),
    (dict(w0=np.array([0.0, 2.5]), frac_bits=62), OverflowError),
    (dict(w0=np.zeros(3), v0=np.array([0.0, 0.0, np.inf])), NonFiniteError),
    (dict(w0=np.zeros(4), groups=[0, 2, 2, 4]), ValueError),
    (dict(w0=np.zeros(4), groups=[0, 5]), ValueError),
])
def test_constructor(kwargs, exc):
    if exc is None:
        ExactMomentum(**kwargs)
        return
    with pytest.raises(exc):
        ExactMomentum(**kwargs)


def test_properties_and_repr():
    w0 = np.array([0.5, -0.25, 1.0])
    opt = ExactMomentum(w0, groups=[0, 1, 3], frac_bits=40, backend=REFERENCE)
    assert (opt.num_lanes, opt.num_groups, opt.frac_bits, opt.steps) == (3, 2, 40, 0)
    assert np.array_equal(opt.params, w0) and np.array_equal(opt.velocity, np.zeros(3))
    opt.step(np.array([1.0, 2.0, -4.0]), np.array([0.5, 0.25]), np.array([0.5, 0.75]))
    # v = −(1 − γ)g, w = w0 + αv: exact in group 0 (γ = 1/2: e = 1), within 2^-F in group 1 (e = 3/4)
    assert opt.velocity[0] == -0.5 and opt.params[0] == 0.25
    assert np.allclose(opt.velocity[1:], [-0.5, 1.0], rtol=0, atol=2.0**-40)
    assert np.allclose(opt.params[1:], [-0.375, 1.25], rtol=0, atol=2.0**-40)
    r = repr(opt)
    assert "ExactMomentum" in r and "steps=1" in r and "numpy" in r
    a = opt.fixed_params
    a[0] = 12345
    assert opt.fixed_params[0] != 12345             # copies
