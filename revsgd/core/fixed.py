"""Fixed-point numbers and decay sequences (docs/design.md §2–§3).

A real x is held as the int64 ``X = fix(x) = rint(x · 2^F)`` with ``F`` fractional bits, where ``rint`` rounds to
nearest with ties to even (IEEE default; ``np.rint``, ``torch.round``, C ``llrint``). Reading back,
``flt(X) = float64(X) · 2^-F`` (the int64 → float64 conversion rounds to nearest even; scaling by 2^±F is exact).
Representable range: ``-2^(63-F) <= x < 2^(63-F)`` (±2048 at the default F = 52); anything outside raises
:class:`OverflowError`, a non-finite value :class:`NonFiniteError`. Neither wraps silently.

Decays without quantisation. A state that decays by a factor f_t ∈ [2^-15, 1] per step (momentum γ, Adam's β1/β2,
AdamW's 1 − αλ) is held as ``x_t = e_t · X̂_t · 2^-F`` with a float64 scale ``e_t ∈ (1/2, 1]`` that is the same for
every lane of a group. A step multiplies e by f_t and, whenever that leaves (1/2, 1], doubles e ``h_t`` times and
shifts X̂ right by ``h_t`` bits — the only information a decay destroys, kept on the tape. :func:`decay_scales`
computes (e_t, h_t) once per run, deterministically, so the forward and the reverse pass use identical constants.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_FRAC_BITS = 52
#: Coarser grids than float32's 24-bit significand make unit-scale values lose precision: refused for states.
MIN_FRAC_BITS = 24
MAX_FRAC_BITS = 62
#: Two-limb states (value = hi·2^62 + lo, 0 <= lo < 2^62): up to 61 + 62 integer-and-fraction bits.
MAX_FRAC_BITS_2 = 122
LIMB = 62
#: Smallest decay factor: one step may shift out at most MAX_SHIFT bits (a factor 2^-15 at e = 1/2 needs 16).
MIN_FACTOR = 2.0 ** -15
MAX_SHIFT = 16
TWO63 = 2.0**63


class NonFiniteError(ValueError):
    """A gradient or input held NaN or ±inf; nothing was changed."""


def check_frac_bits(frac_bits: int, *, name: str = "frac_bits", lo: int = 0, hi: int = MAX_FRAC_BITS) -> int:
    """``frac_bits`` as an int in [lo, hi]; TypeError for non-integers (bool included), ValueError outside."""
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(frac_bits).__name__}")
    if not lo <= int(frac_bits) <= hi:
        why = (f" (below {MIN_FRAC_BITS} the fixed-point grid is coarser than float32's precision: the "
               f"hypergradient would be silently wrong)" if lo == MIN_FRAC_BITS and frac_bits < lo else "")
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {frac_bits}{why}")
    return int(frac_bits)


def fixed_range(frac_bits: int) -> tuple[float, float]:
    """The half-open interval [lo, hi) of reals representable with ``frac_bits`` fractional bits."""
    half = 2.0 ** (63 - frac_bits)
    return -half, half


def to_fixed(x: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, *, name: str = "value") -> np.ndarray:
    """``fix(x)``: float64 array → int64, rounding to nearest-even. Raises before returning anything."""
    frac_bits = check_frac_bits(frac_bits)
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
    frac_bits = check_frac_bits(frac_bits)
    return np.asarray(X, dtype=np.int64).astype(np.float64) * 2.0**-frac_bits


def check_factors(f: np.ndarray, name: str) -> np.ndarray:
    """Decay factors as float64, every value in [MIN_FACTOR, 1]; the error names the first bad step."""
    f = np.asarray(f, dtype=np.float64)
    bad = ~((f >= MIN_FACTOR) & (f <= 1.0))   # NaN fails both comparisons
    if bad.any():
        idx = np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), f.shape)
        v = f[idx]
        where = "at step " + ", ".join(map(str, idx)) if f.ndim else ""
        why = ""
        if v == 0.0:
            why = (" (a factor 0 erases the state: nothing is left to reverse — e.g. momentum 0 is plain SGD; use "
                   "a stored-state method such as method='checkpoint' or 'replay', or a positive momentum)")
        raise ValueError(f"{name} must lie in [{MIN_FACTOR:.3g}, 1] (2^-15 .. 1), got {v!r} {where}{why}".rstrip())
    return f


def decay_scales(factors) -> tuple[np.ndarray, np.ndarray]:
    """The scale sequence of a decaying state: ``e`` (T+1, ...) float64 in (1/2, 1] with e_0 = 1, and ``h`` (T, ...)
    int64 shifts in [0, 16], such that a step t maps e_t to ``e_{t+1} = e_t · f_t · 2^{h_t}`` (one float64 product,
    then exact doublings). ``factors`` has shape (T,) or (T, groups); the groups are independent.

    Invariant: Π_{s<t} f_s = e_t · 2^{-Σ_{s<t} h_s} up to float64 rounding of the running product; exactness of the
    reversal never depends on that accuracy, only on using these same arrays in both passes.
    """
    f = np.asarray(factors, dtype=np.float64)
    T = f.shape[0]
    e = np.ones((T + 1,) + f.shape[1:], dtype=np.float64)
    h = np.zeros(f.shape, dtype=np.int64)
    if f.ndim == 1:
        cur = 1.0
        for t, ft in enumerate(f.tolist()):
            y = cur * ft
            m, ex = math.frexp(y)            # y = m·2^ex, m ∈ [1/2, 1)
            k = 1 - ex if m == 0.5 else -ex  # doublings that bring y into (1/2, 1]
            cur = math.ldexp(y, k)
            e[t + 1], h[t] = cur, k
        return e, h
    cur = np.ones(f.shape[1:])
    for t in range(T):
        y = cur * f[t]
        m, ex = np.frexp(y)
        k = np.where(m == 0.5, 1 - ex, -ex)
        cur = np.ldexp(y, k)
        e[t + 1], h[t] = cur, k
    return e, h
