"""Fixed-point conversion and momentum quantisation (DESIGN.md §2, revsgd/fixed.py)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import revsgd
from revsgd import NonFiniteError, dequantize_momentum, from_fixed, quantize_momentum, to_fixed

finite = st.floats(allow_nan=False, allow_infinity=False)


def exact_fix(x: float, F: int) -> int:
    """Round half to even of x·2^F, computed with rationals (Python's round() of a Fraction is half-even)."""
    return round(Fraction(x) * 2**F)


# --- to_fixed / from_fixed -----------------------------------------------------------------------------------
def test_default_frac_bits_is_52():
    assert revsgd.DEFAULT_FRAC_BITS == 52
    assert to_fixed(np.array([1.0]))[0] == 2**52


@given(X=st.integers(-(2**53), 2**53), F=st.integers(0, 62))
def test_from_fixed_then_to_fixed_is_identity_on_exact_values(X, F):
    arr = np.array([X], dtype=np.int64)
    x = from_fixed(arr, F)
    assert x.dtype == np.float64
    assert Fraction(float(x[0])) == Fraction(X, 2**F)  # |X| <= 2^53: the float is exact
    back = to_fixed(x, F)
    assert back.dtype == np.int64
    assert back[0] == X


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
def test_round_trip_error_at_most_half_ulp(x, F):
    back = from_fixed(to_fixed(np.array([x]), F), F)[0]
    assert abs(Fraction(float(back)) - Fraction(x)) <= Fraction(1, 2 ** (F + 1))


@pytest.mark.parametrize("F, x, want", [
    (0, 0.5, 0), (0, 1.5, 2), (0, 2.5, 2), (0, 3.5, 4), (0, -0.5, 0), (0, -1.5, -2), (0, -2.5, -2),
    (1, 0.25, 0), (1, 0.75, 2), (1, 1.25, 2), (1, -0.75, -2), (1, -1.25, -2),
    (3, 1 / 16, 0), (3, 3 / 16, 2), (3, 5 / 16, 2), (3, -3 / 16, -2),
    # not truncation, not round-half-up/away:
    (0, 0.9, 1), (0, -0.9, -1), (0, 0.49999999999999994, 0), (2, 0.3, 1), (2, -0.3, -1),
])
def test_explicit_ties_and_rounding(F, x, want):
    assert to_fixed(np.array([x]), F)[0] == want


def test_exact_half_ulp_ties_at_default_frac_bits():
    ulp = 2.0**-52
    xs = np.array([0.5 * ulp, 1.5 * ulp, 2.5 * ulp, -0.5 * ulp, -1.5 * ulp, 1.0 + 0.5 * ulp * 2])
    assert to_fixed(xs, 52).tolist() == [0, 2, 2, 0, -2, 2**52 + 1]


def test_range_edges():
    F = 52
    lo = np.array([-2048.0])
    assert to_fixed(lo, F)[0] == -(2**63)
    top = np.array([np.nextafter(2048.0, 0.0)])
    assert to_fixed(top, F)[0] == 2**63 - 2**(63 - 53)
    for bad in (2048.0, np.nextafter(-2048.0, -np.inf), 1e300, -1e300):
        with pytest.raises(OverflowError):
            to_fixed(np.array([bad]), F)
    # F = 62: range [-2, 2)
    assert to_fixed(np.array([-2.0]), 62)[0] == -(2**63)
    with pytest.raises(OverflowError):
        to_fixed(np.array([2.0]), 62)
    # F = 0: the whole int64 range
    assert to_fixed(np.array([-(2.0**63)]), 0)[0] == -(2**63)
    with pytest.raises(OverflowError):
        to_fixed(np.array([2.0**63]), 0)


def test_overflow_message_names_value_index_and_range():
    with pytest.raises(OverflowError) as ei:
        to_fixed(np.array([0.0, 1.0, 3000.0]), 52, name="w0")
    msg = str(ei.value)
    assert "w0[2]" in msg
    assert "3000" in msg
    assert "-2048" in msg and "2048" in msg
    assert "frac_bits=52" in msg


def test_overflow_is_not_silent_wrap_for_arrays():
    x = np.array([1.0, -5000.0, 2.0])
    with pytest.raises(OverflowError, match=r"\[1\]"):
        to_fixed(x, 52)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad):
    x = np.array([0.0, 1.0, bad, 2.0])
    with pytest.raises(NonFiniteError) as ei:
        to_fixed(x, 40, name="grad")
    assert "grad" in str(ei.value) and "2" in str(ei.value)
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
    assert x[1] == 2048.0  # int64 max rounds to 2^63 in float64
    assert x[2] == 0.0 and x[3] == -(2.0**-52) and x[4] == 2.0**-52


# --- quantize_momentum ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.0, -0.1, -1.0, 1.0000001, 1.5, 2.0, np.nan, np.inf, -np.inf])
def test_quantize_momentum_range_errors(bad):
    with pytest.raises(ValueError) as ei:
        quantize_momentum(bad)
    assert "momentum" in str(ei.value)


def test_quantize_momentum_array_with_one_bad_value():
    with pytest.raises(ValueError):
        quantize_momentum(np.array([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError):
        quantize_momentum(np.array([0.9, np.nan]))
    with pytest.raises(ValueError):
        quantize_momentum([0.9, 1.01])


def test_quantize_momentum_values():
    assert int(quantize_momentum(1.0)) == 65536
    assert int(quantize_momentum(1e-300)) == 1
    assert int(quantize_momentum(1e-9)) == 1
    assert int(quantize_momentum(0.4 / 65536)) == 1   # rounds to 0, clamps to 1
    assert int(quantize_momentum(0.5)) == 32768
    assert int(quantize_momentum(0.9)) == 58982       # 58982.4
    assert int(quantize_momentum(0.99)) == 64881      # 64880.64
    assert int(quantize_momentum(2.5 / 65536)) == 2   # tie to even
    assert int(quantize_momentum(3.5 / 65536)) == 4   # tie to even
    q = quantize_momentum(np.array([0.9, 1.0, 0.5]))
    assert q.dtype == np.int64
    assert q.tolist() == [58982, 65536, 32768]


@given(g=st.floats(min_value=2.0**-17, max_value=1.0, exclude_min=True))
def test_quantize_momentum_nearest(g):
    n = int(quantize_momentum(g))
    assert 1 <= n <= 65536
    assert abs(n - g * 65536) <= 0.5
    assert abs(float(dequantize_momentum(n)) - g) <= 0.5 / 65536


def test_dequantize_momentum_exact():
    n = np.arange(1, 65537)
    g = dequantize_momentum(n)
    assert g.dtype == np.float64
    assert np.array_equal(g * 65536, n.astype(np.float64))
    assert np.array_equal(quantize_momentum(g), n)
