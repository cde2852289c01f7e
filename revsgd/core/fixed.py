"""Fixed-point numbers and quantised momentum (DESIGN.md §2).

A real x is held as the int64 ``X = fix(x) = rint(x · 2^F)`` with ``F`` fractional bits, where ``rint`` rounds
to nearest with ties to even (IEEE default; ``np.rint``, C ``llrint``). Reading back, ``flt(X) = float64(X) · 2^-F``.
Every product that enters the state is one float64 multiplication followed by ``fix``; since scaling by a power
of two is exact, ``fix(a · flt(X)) == rint(a · float64(X))``, which is how the kernels compute it.

Representable range: ``-2^(63-F) <= x < 2^(63-F)`` (±2048 at the default F = 52). Anything outside raises
:class:`OverflowError`; a non-finite value raises :class:`NonFiniteError`. Neither wraps silently.

Momentum is quantised for every method to ``γ = n / 2^16`` with integer ``n ∈ [1, 65536]``.
"""
from __future__ import annotations

import numpy as np

DEFAULT_FRAC_BITS = 52
GAMMA_ONE = 1 << 16  # n = 65536 is γ = 1
TWO63 = 2.0**63


class NonFiniteError(ValueError):
    """A gradient or input held NaN or ±inf; nothing was changed."""


def check_frac_bits(frac_bits: int) -> int:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)):
        raise TypeError(f"frac_bits must be an int, got {type(frac_bits).__name__}")
    if not 0 <= int(frac_bits) <= 62:
        raise ValueError(f"frac_bits must lie in [0, 62], got {frac_bits}")
    return int(frac_bits)


def fixed_range(frac_bits: int) -> tuple[float, float]:
    """The half-open interval [lo, hi) of reals representable with ``frac_bits`` fractional bits."""
    half = 2.0 ** (63 - frac_bits)
    return -half, half


def to_fixed(x: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, *, name: str = "value") -> np.ndarray:
    """``fix(x)``: float64 array → int64, rounding to nearest-even. Raises before returning anything."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        bad = int(np.flatnonzero(~np.isfinite(x.ravel()))[0])
        raise NonFiniteError(f"{name} holds a non-finite value at index {bad}")
    with np.errstate(over="ignore"):
        y = x * 2.0**frac_bits
    ok = (y >= -TWO63) & (y < TWO63)
    if not np.all(ok):
        lo, hi = fixed_range(frac_bits)
        bad = int(np.flatnonzero(~ok.ravel())[0])
        raise OverflowError(
            f"{name}[{bad}] = {x.ravel()[bad]!r} leaves the fixed-point range [{lo:g}, {hi:g}) "
            f"of frac_bits={frac_bits}; use fewer fractional bits"
        )
    return np.rint(y).astype(np.int64)


def from_fixed(X: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """``flt(X)``: int64 → float64 (the int64→float64 conversion rounds to nearest-even; scaling is exact)."""
    return np.asarray(X, dtype=np.int64).astype(np.float64) * 2.0**-frac_bits


def quantize_momentum(gamma) -> np.ndarray:
    """Momentum γ ∈ (0, 1] → integer n ∈ [1, 65536] with γ ≈ n/65536 (round to nearest, ties to even).

    γ below 1/65536 but above 0 rounds up to n = 1; γ ≤ 0, γ > 1 or NaN raises ValueError.
    """
    g = np.asarray(gamma, dtype=np.float64)
    if not np.all((g > 0.0) & (g <= 1.0)):
        raise ValueError(f"momentum must lie in (0, 1], got values in [{np.nanmin(g)}, {np.nanmax(g)}]"
                         if g.size and not np.all(np.isnan(g)) else "momentum must lie in (0, 1], got NaN")
    return np.maximum(np.rint(g * GAMMA_ONE), 1).astype(np.int64)


def dequantize_momentum(n) -> np.ndarray:
    """n → γ = n / 65536 (exact in float64)."""
    return np.asarray(n, dtype=np.float64) / GAMMA_ONE
