"""Fixed point and decay scales (docs/design.md §2–§3, revsgd/core/fixed.py).

- to_fixed / from_fixed: rint(x·2^F) with ties to even (checked against exact rationals), range [-2^(63-F), 2^(63-F)),
  OverflowError naming the index, NonFiniteError for NaN/inf, both before anything is returned.
- frac_bits validation: bool / float refused with TypeError, outside [lo, 62] with ValueError; for optimiser states
  (lo = MIN_FRAC_BITS = 24) the message says why (precision).
- decay_scales: e ∈ (1/2, 1], h ∈ [0, 16], e_{t+1} == ldexp(e_t·f_t, h_t) exactly, groups independent, f = 1 never
  shifts; Π f ≈ e_t·2^-Σh.
- check_factors: [2^-15, 1] only; the error names the step, and a factor 0 points to plain SGD / stored-state methods.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import revsgd
from revsgd import NonFiniteError, from_fixed, to_fixed
from revsgd.core.fixed import (MAX_FRAC_BITS, MAX_SHIFT, MIN_FACTOR, MIN_FRAC_BITS, check_factors, check_frac_bits,
                               decay_scales, fixed_range)

finite = st.floats(allow_nan=False, allow_infinity=False)


def exact_fix(x: float, F: int) -> int:
    """Round half to even of x·2^F with rationals (Python's round() of a Fraction is half-even)."""
    return round(Fraction(x) * 2**F)


# --- to_fixed / from_fixed -----------------------------------------------------------------------------------
def test_constants():
    assert revsgd.DEFAULT_FRAC_BITS == 52
    assert MIN_FRAC_BITS == 24 and MAX_FRAC_BITS == 62
    assert MIN_FACTOR == 2.0**-15 and MAX_SHIFT == 16
    assert to_fixed(np.array([1.0]))[0] == 2**52


@given(X=st.integers(-(2**53), 2**53), F=st.integers(0, 62))
def test_from_fixed_then_to_fixed_is_identity_on_exact_values(X, F):
    arr = np.array([X], dtype=np.int64)
    x = from_fixed(arr, F)
    assert x.dtype == np.float64
    assert Fraction(float(x[0])) == Fraction(X, 2**F)   # |X| <= 2^53: exact
    back = to_fixed(x, F)
    assert back.dtype == np.int64 and back[0] == X


@given(X=st.integers(-(2**63), 2**63 - 1), F=st.integers(0, 62))
def test_from_fixed_rounds_int64_to_nearest_float(X, F):
    x = float(from_fixed(np.array([X], dtype=np.int64), F)[0])
    assert x == float(Fraction(X, 2**F))                # Fraction → float is correctly rounded (half even)


@given(x=finite, F=st.integers(0, 62))
def test_to_fixed_rounds_half_to_even_or_raises(x, F):
    want = exact_fix(x, F)
    if -(2**63) <= Fraction(x) * 2**F < 2**63:
        got = to_fixed(np.array([x]), F)
        assert got.dtype == np.int64
        assert int(got[0]) == want
    else:
        with pytest.raises(OverflowError):
            to_fixed(np.array([x]), F)


@given(x=st.floats(-2047.0, 2047.0), F=st.integers(0, 52))
def test_round_trip_error_at_most_half_unit(x, F):
    back = from_fixed(to_fixed(np.array([x]), F), F)[0]
    assert abs(Fraction(float(back)) - Fraction(x)) <= Fraction(1, 2 ** (F + 1))


@pytest.mark.parametrize("F, x, want", [
    (0, 0.5, 0), (0, 1.5, 2), (0, 2.5, 2), (0, 3.5, 4), (0, -0.5, 0), (0, -1.5, -2), (0, -2.5, -2),
    (1, 0.25, 0), (1, 0.75, 2), (1, 1.25, 2), (1, -0.75, -2), (1, -1.25, -2),
    (3, 1 / 16, 0), (3, 3 / 16, 2), (3, 5 / 16, 2), (3, -3 / 16, -2),
    # not truncation, not half-up, not half-away:
    (0, 0.9, 1), (0, -0.9, -1), (0, 0.49999999999999994, 0), (2, 0.3, 1), (2, -0.3, -1),
])
def test_explicit_ties_and_rounding(F, x, want):
    assert to_fixed(np.array([x]), F)[0] == want


def test_half_unit_ties_at_default_frac_bits():
    u = 2.0**-52
    xs = np.array([0.5 * u, 1.5 * u, 2.5 * u, -0.5 * u, -1.5 * u, 1.0 + u])
    assert to_fixed(xs, 52).tolist() == [0, 2, 2, 0, -2, 2**52 + 1]


def test_range_edges():
    assert fixed_range(52) == (-2048.0, 2048.0)
    assert to_fixed(np.array([-2048.0]), 52)[0] == -(2**63)
    assert to_fixed(np.array([np.nextafter(2048.0, 0.0)]), 52)[0] == 2**63 - 2**(63 - 53)
    for bad in (2048.0, np.nextafter(-2048.0, -np.inf), 1e300, -1e300):
        with pytest.raises(OverflowError):
            to_fixed(np.array([bad]), 52)
    assert to_fixed(np.array([-2.0]), 62)[0] == -(2**63)
    with pytest.raises(OverflowError):
        to_fixed(np.array([2.0]), 62)
    assert to_fixed(np.array([-(2.0**63)]), 0)[0] == -(2**63)
    with pytest.raises(OverflowError):
        to_fixed(np.array([2.0**63]), 0)


def test_overflow_message_names_value_index_and_range():
    with pytest.raises(OverflowError) as ei:
        to_fixed(np.array([0.0, 1.0, 3000.0, 5000.0]), 52, name="w0")
    msg = str(ei.value)
    assert "w0[2]" in msg and "3000" in msg            # the FIRST bad index
    assert "-2048" in msg and "2048" in msg and "frac_bits=52" in msg


def test_overflow_index_is_flat_for_nd_arrays():
    x = np.zeros((3, 4))
    x[2, 1] = -1e6
    with pytest.raises(OverflowError, match=r"\[9\]"):
        to_fixed(x, 52)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_naming_the_index(bad):
    x = np.array([0.0, 1.0, 2.0, bad, 2.0, np.nan])
    with pytest.raises(NonFiniteError) as ei:
        to_fixed(x, 40, name="grad")
    assert "grad" in str(ei.value) and "index 3" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_non_finite_wins_over_overflow():
    with pytest.raises(NonFiniteError):
        to_fixed(np.array([1e300, np.nan]), 52)


def test_to_fixed_shapes_and_scalars():
    a = to_fixed(np.array([[0.5, -0.25], [1.0, 0.0]]), 2)
    assert a.dtype == np.int64 and a.shape == (2, 2)
    assert a.tolist() == [[2, -1], [4, 0]]
    assert to_fixed(0.75, 2) == 3


def test_from_fixed_extremes():
    X = np.array([-(2**63), 2**63 - 1, 0, -1, 1], dtype=np.int64)
    x = from_fixed(X, 52)
    assert x[0] == -2048.0
    assert x[1] == 2048.0   # int64 max rounds to 2^63 in float64
    assert x[2] == 0.0 and x[3] == -(2.0**-52) and x[4] == 2.0**-52


# --- frac_bits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, exc", [(True, TypeError), (False, TypeError), (52.0, TypeError), ("52", TypeError),
                                      (None, TypeError), (np.float64(30), TypeError), (-5, ValueError),
                                      (-1, ValueError), (63, ValueError), (64, ValueError), (10**6, ValueError)])
def test_frac_bits_validation(bad, exc):
    with pytest.raises(exc):
        check_frac_bits(bad)
    with pytest.raises(exc):
        to_fixed(np.array([0.5]), bad)
    with pytest.raises(exc):
        from_fixed(np.array([1], dtype=np.int64), bad)


@pytest.mark.parametrize("ok", [0, 1, 16, 24, 52, 62, np.int64(30), np.int32(7)])
def test_frac_bits_accepted(ok):
    assert check_frac_bits(ok) == int(ok)
    assert type(check_frac_bits(ok)) is int


@pytest.mark.parametrize("F", list(range(16, 24)))
def test_state_frac_bits_below_24_refused_with_reason(F):
    with pytest.raises(ValueError) as ei:
        check_frac_bits(F, lo=MIN_FRAC_BITS)
    msg = str(ei.value)
    assert "precision" in msg and "float32" in msg and str(F) in msg
    # the conversion itself still works at any F in [0, 62]
    assert to_fixed(np.array([1.5]), F)[0] == 3 * 2 ** (F - 1)


def test_state_frac_bits_range():
    assert check_frac_bits(MIN_FRAC_BITS, lo=MIN_FRAC_BITS) == 24
    assert check_frac_bits(62, lo=MIN_FRAC_BITS) == 62
    with pytest.raises(ValueError):
        check_frac_bits(63, lo=MIN_FRAC_BITS)
    with pytest.raises(TypeError):
        check_frac_bits(True, lo=MIN_FRAC_BITS)


# --- decay_scales ------------------------------------------------------------------------------------------------
def check_scales(f: np.ndarray, e: np.ndarray, h: np.ndarray) -> None:
    """The documented contract of decay_scales for one group's factor sequence (Python floats, exact)."""
    T = f.shape[0]
    assert e.shape == (T + 1,) and h.shape == (T,)
    assert e.dtype == np.float64 and h.dtype == np.int64
    assert e[0] == 1.0
    assert np.all((e > 0.5) & (e <= 1.0))
    assert np.all((h >= 0) & (h <= MAX_SHIFT))
    for t in range(T):
        y = float(e[t]) * float(f[t])                 # one float64 product
        assert float(e[t + 1]) == math.ldexp(y, int(h[t]))    # then exact doublings
        assert (h[t] == 0) == (y > 0.5)               # shift only when the product left (1/2, 1]


def check_product(f: np.ndarray, e: np.ndarray, h: np.ndarray) -> None:
    """Π_{s<t} f_s = e_t·2^{-Σ h_s} up to the float64 rounding of the running product (relative ≤ t·2^-52)."""
    logp = np.concatenate([[0.0], np.cumsum(np.log2(f))])
    loge = np.log2(e) - np.concatenate([[0], np.cumsum(h)])
    T = f.shape[0]
    assert np.all(np.abs(logp - loge) <= 4 * (np.arange(T + 1) + 1) * 2.0**-52 + 1e-12 * np.abs(logp))


factor = st.one_of(st.sampled_from([1.0, 0.5, 0.9, 0.99, 0.999, 1 - 1e-7, MIN_FACTOR, 2 * MIN_FACTOR,
                                    np.nextafter(1.0, 0.0), np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0)]),
                   st.floats(MIN_FACTOR, 1.0))


@given(f=st.lists(factor, min_size=0, max_size=200))
def test_decay_scales_contract(f):
    f = np.array(f, dtype=np.float64)
    e, h = decay_scales(f)
    check_scales(f, e, h)
    if f.size:
        check_product(f, e, h)


@given(f=st.lists(st.lists(factor, min_size=3, max_size=3), min_size=1, max_size=60))
def test_decay_scales_groups_are_independent(f):
    f = np.array(f, dtype=np.float64)          # (T, 3)
    e, h = decay_scales(f)
    assert e.shape == (f.shape[0] + 1, 3) and h.shape == f.shape
    for g in range(3):
        e1, h1 = decay_scales(f[:, g])
        assert np.array_equal(e[:, g], e1) and np.array_equal(h[:, g], h1)
        check_scales(f[:, g], e[:, g], h[:, g])


def test_factor_one_never_shifts():
    e, h = decay_scales(np.ones(1000))
    assert np.all(e == 1.0) and np.all(h == 0)
    e, h = decay_scales(np.ones((50, 4)))
    assert np.all(e == 1.0) and np.all(h == 0)


def test_known_sequences():
    e, h = decay_scales(np.full(10, 0.5))      # 1·0.5 = 1/2 is not in (1/2, 1]: one doubling each step
    assert np.all(e == 1.0) and np.all(h == 1)
    e, h = decay_scales(np.full(5, MIN_FACTOR))
    assert np.all(e == 1.0) and np.all(h == 15)
    e, h = decay_scales(np.full(7, 0.9))
    # 0.9, 0.81, 0.729, 0.6561, 0.59049, 0.531441, 0.4782969 → doubled
    assert h.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert e[6] == 0.9 * 0.9 * 0.9 * 0.9 * 0.9 * 0.9 and e[7] == 2 * (e[6] * 0.9)
    e, h = decay_scales(np.zeros((0,)))
    assert e.tolist() == [1.0] and h.shape == (0,)


def test_information_is_the_sum_of_minus_log2():
    """Σ h = Σ −log2 f − log2(1/e_T): the information limit minus less than one bit."""
    f = np.full(10000, 0.9)
    e, h = decay_scales(f)
    limit = -np.log2(f).sum()
    assert limit - 1 < h.sum() <= limit + 1e-6
    assert abs(h.sum() - (limit + np.log2(e[-1]))) < 1e-6


# --- check_factors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ok", [1.0, MIN_FACTOR, 0.5, 0.9, np.nextafter(1.0, 0.0)])
def test_check_factors_accepts(ok):
    out = check_factors(np.array([0.9, ok]), "momentum")
    assert out.dtype == np.float64 and out[1] == ok


@pytest.mark.parametrize("bad", [np.nextafter(1.0, 2.0), 1.5, np.inf, -np.inf, np.nan, -0.1,
                                 np.nextafter(MIN_FACTOR, 0.0), 1e-9])
def test_check_factors_refuses_and_names_the_step(bad):
    f = np.array([0.9, 0.9, 0.9, bad, 0.9, bad])
    with pytest.raises(ValueError) as ei:
        check_factors(f, "momentum")
    msg = str(ei.value)
    assert "momentum" in msg and "step 3" in msg
    assert "step 5" not in msg


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_check_factors_zero_points_to_plain_sgd(zero):
    with pytest.raises(ValueError) as ei:
        check_factors(np.array([0.9, zero]), "momentum")
    msg = str(ei.value)
    assert "step 1" in msg
    assert "plain SGD" in msg and "stored-state" in msg


def test_check_factors_two_d_names_step_and_group():
    f = np.full((5, 3), 0.9)
    f[4, 2] = 2.0
    with pytest.raises(ValueError, match=r"step 4, 2"):
        check_factors(f, "beta2")
