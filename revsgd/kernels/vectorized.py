"""The kernels' specification, vectorized: every backend must produce these states and tapes bit for bit.

Written once against a small array-ops interface (:class:`NumpyOps` here; the torch backend supplies its own), so the
NumPy reference and the device backend run the same code. Compiled backends (numba, C++) implement the same
per-lane arithmetic as fused loops.

Notation: integer states are int64 fixed point; ``rint`` rounds to nearest, ties to even; ``f64`` converts int64 to
float64 (nearest even); per-group parameters are expanded to lanes. Float expressions are evaluated exactly in the
order written, one IEEE rounding per operation (compiled backends are built without FMA contraction).

shift(X, h)          forward: bits = X & (2^h - 1); X >>= h (floor); push bits.   reverse: X = (X << h) | pop(h)

momentum(V, W, G)    (heavy ball and torch.optim.SGD, DESIGN-style; V̂ = V/e with the group scale e)
  forward  state:    shift(V, h);  g = f64(G) + lam·(f64(W)·ws);  V += rint((cv·g)·2^Fv)
           position: W += rint((cp·f64(V))·2^(Fw-Fv));  P = f64(W)·ps
  reverse  position: W -= rint((cp·f64(V))·2^(Fw-Fv));  P = f64(W)·ps
           state:    g = f64(G) + lam·(f64(W)·ws);  V -= rint((cv·g)·2^Fv);  unshift(V, h)

adam(M, S, W, G)     (torch.optim.Adam / AdamW; M̂, Ŝ, Ŵ rescaled by their group scales)
  forward  state:    g = f64(G) + lam·(f64(W)·ws)
                     shift(M, h1);  M += rint((c1·g)·2^Fm);  shift(S, h2);  S += fix2((c2·(g·g))·2^Fs)
           position: shift(W, hw);  q = (am·f64(M)) / (sqrt(flt2(S)) / sb + eps);  W -= rint((cu·q)·2^Fw)
                     P = f64(W)·ps
  reverse  position: q as above;  W += rint((cu·q)·2^Fw);  unshift(W, hw);  P = f64(W)·ps
           state:    g as above;  S -= fix2((c2·(g·g))·2^Fs);  unshift(S, h2);  M -= rint((c1·g)·2^Fm);  unshift(M, h1)

S, Adam's second moment, has two limbs (hi, lo): S = hi·2^62 + lo with 0 <= lo < 2^62 (Fs = 110 by default), so every
addend above 2^-57 is held exactly and small moments keep their relative precision (with one int64, rounding errors
accumulated over ~1/(1 − β2) steps and moved the hypergradient by 1e-6). fix2(y), for y >= 0: yh = floor(y·2^-62),
yl = rint(y − yh·2^62) (the subtraction is exact); flt2(S) = (as·2^62)·f64(hi) + as·f64(lo). Adding carries
lo >> 62 into hi; subtracting borrows. A shift moves lo's low h bits to the tape, hi's low h bits into lo's top.

Errors (see :mod:`revsgd.kernels.codes`) are collected per lane in op order; if any lane fails, nothing is written
and the lowest failing lane is reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.tapeformat import WORD_BITS, TapeStorage
from . import codes

_TWO63 = 2.0**63
_I63 = 1 << 63
LIMB = 62                  # low limb bits of two-limb states: value = hi·2^62 + lo, 0 <= lo < 2^62
LIMB_MASK = (1 << LIMB) - 1


class KernelError(Exception):
    """A lane could not be processed; nothing was changed. ``base`` / ``state`` from :mod:`codes`."""

    def __init__(self, code: int, lane: int):
        super().__init__(code, lane)
        self.base, self.state = codes.split(code)
        self.lane = lane


@dataclass
class MomentumParams:
    """Per-group parameters of one momentum op (arrays of shape (G,)); see the module docstring."""
    h: np.ndarray                 # int64 shift of V (forward: right shift; 0: none)
    cv: np.ndarray                # float64 velocity coefficient
    cp: np.ndarray                # float64 position coefficient
    lam: np.ndarray               # float64 coupled weight decay (0: none)
    frac_v: int
    frac_w: int

    @property
    def ws(self) -> float:
        return 2.0 ** -self.frac_w


@dataclass
class AdamParams:
    """Per-group parameters of one Adam op (arrays of shape (G,)); see the module docstring."""
    h1: np.ndarray                # int64 shifts of M, S, W
    h2: np.ndarray
    hw: np.ndarray
    c1: np.ndarray                # float64: (1 − β1)/d1_{t+1}, (1 − β2)/d2_{t+1}
    c2: np.ndarray
    lam: np.ndarray               # coupled weight decay (Adam's weight_decay; 0 for AdamW)
    am: np.ndarray                # d1_{t+1}·2^-Fm, d2_{t+1}·2^-Fs: m = am·f64(M), s = as·f64(S)
    as_: np.ndarray
    sb: np.ndarray                # sqrt(bias correction 2)
    eps: np.ndarray
    cu: np.ndarray                # step size / c_{t+1} (lr / bias correction 1, in Ŵ units)
    ws: np.ndarray                # scale of the W the gradient was taken at: c_t·2^-Fw
    ps: np.ndarray                # scale of the W written to P: c_{t+1}·2^-Fw (forward) or c_t·2^-Fw (reverse)
    frac_m: int
    frac_s: int
    frac_w: int


class NumpyOps:
    """The array operations the spec needs, for NumPy arrays (int64 states, uint16 tape words)."""

    @staticmethod
    def f64(a):
        return np.asarray(a).astype(np.float64)

    @staticmethod
    def i64(a):
        return np.asarray(a).astype(np.int64)

    @staticmethod
    def rint_i64(y):
        return np.rint(y).astype(np.int64)

    isfinite = staticmethod(np.isfinite)
    where = staticmethod(np.where)
    sqrt = staticmethod(np.sqrt)
    floor = staticmethod(np.floor)

    @staticmethod
    def zeros_i8(n: int, like=None):
        return np.zeros(n, dtype=np.int8)

    @staticmethod
    def first_error(err) -> Optional[tuple]:
        bad = np.flatnonzero(err)
        return None if bad.size == 0 else (int(err[bad[0]]), int(bad[0]))

    @staticmethod
    def lanes_param(vals, gid):
        """Per-group values (G,) → per lane; a single group stays a scalar (broadcast)."""
        vals = np.asarray(vals)
        return vals[0].item() if vals.shape[0] == 1 else vals[gid]

    @staticmethod
    def from_host(a: np.ndarray, like=None):
        return a

    @staticmethod
    def lanes_array(vals, gid):
        """Per-group values (G,) → an array per lane."""
        return np.asarray(vals)[gid]

    @staticmethod
    def read_words(words, pos):
        return words[pos].astype(np.int64)

    @staticmethod
    def write_words(words, pos, vals) -> None:
        words[pos] = vals.astype(np.uint16)

    @staticmethod
    def heads_i64(heads):
        return heads.astype(np.int64)

    @staticmethod
    def store_heads(heads, vals) -> None:
        heads[:] = vals.astype(np.uint16)

    @staticmethod
    def assign(dst, src) -> None:
        dst[...] = src

    @staticmethod
    def store_float(P, vals) -> None:
        P[...] = vals.astype(P.dtype)

    @staticmethod
    def errstate():
        return np.errstate(over="ignore", invalid="ignore", divide="ignore")


@dataclass
class _Lanes:
    """Lane → group lookups shared by every tape of one op (all tapes of an op have the same groups)."""
    gid: Any        # group of each lane (int64, L), on the ops' device
    local: Any      # lane − first lane of its group
    groups: int


_LANES_CACHE: dict = {}


def lanes_of(st: TapeStorage, ops) -> _Lanes:
    key = (id(ops), st.offsets.tobytes(), str(getattr(st.heads, "device", "")))
    hit = _LANES_CACHE.get(key)
    if hit is None:
        L = st.num_lanes
        gid = np.repeat(np.arange(st.num_groups, dtype=np.int64), st.sizes)
        local = np.arange(L, dtype=np.int64) - np.repeat(st.offsets[:-1], st.sizes)
        hit = _Lanes(ops.from_host(gid, st.heads), ops.from_host(local, st.heads), st.num_groups)
        if len(_LANES_CACHE) > 64:
            _LANES_CACHE.clear()
        _LANES_CACHE[key] = hit
    return hit


# --- building blocks ------------------------------------------------------------------------------------------

def _flag(ops, err, bad, c: int):
    return ops.where((err == 0) & bad, c, err)


def _fix(ops, y, err, state: int):
    """rint(y) as int64 where y lies in [-2^63, 2^63); elsewhere 0 and TERM_OVERFLOW (NaN fails the check)."""
    ok = (y >= -_TWO63) & (y < _TWO63)
    err = _flag(ops, err, ~ok, codes.code(codes.TERM_OVERFLOW, state))
    return ops.rint_i64(ops.where(ok, y, 0.0)), err


def _add(ops, X, d, err, state: int, sign: int):
    """X + d (sign 1) or X − d (sign −1), flagging int64 overflow (the sum wraps; the sign test sees it)."""
    if sign > 0:
        Y = X + d
        over = ((X ^ Y) & (d ^ Y)) < 0
    else:
        Y = X - d
        over = ((X ^ d) & (X ^ Y)) < 0
    return Y, _flag(ops, err, over, codes.code(codes.ADD_OVERFLOW, state))


def _fix2(ops, y, err, state: int):
    """fix2(y) for y >= 0 (the addend of a two-limb state): (yh, yl) with yh·2^62 + yl = rint(y)."""
    ok = (y >= 0.0) & (y < _TWO63 * 2.0**LIMB)
    err = _flag(ops, err, ~ok, codes.code(codes.TERM_OVERFLOW, state))
    y = ops.where(ok, y, 0.0)
    yh = ops.floor(y * 2.0**-LIMB)
    return ops.rint_i64(yh), ops.rint_i64(y - yh * 2.0**LIMB), err


def _add2(ops, hi, lo, dh, dl, err, state: int, sign: int):
    """(hi, lo) ± (dh, dl) with the carry (borrow) between the limbs; ADD_OVERFLOW when hi leaves int64."""
    lo2 = lo + dl if sign > 0 else lo - dl          # in (-2^62, 2^63): no wrap
    c = lo2 >> LIMB                                 # the carry (0 or 1) or the borrow (0 or -1)
    hi2, err = _add(ops, hi, dh + c if sign > 0 else dh - c, err, state, sign)
    return hi2, lo2 & LIMB_MASK, err


class _Shift:
    """A pending push (forward) or pop (reverse) of ``h`` bits per group on one tape: computes the new heads and
    words without touching the tape; :meth:`commit` writes them once every lane of the op succeeded."""

    def __init__(self, ops, st: TapeStorage, lanes: _Lanes, h: np.ndarray, push: bool):
        self.ops, self.st, self.h, self.push = ops, st, np.asarray(h, dtype=np.int64), push
        self.active = bool(self.h.any())
        if not self.active:
            return
        rows = st.plan(self.h, push)                      # (G,) stack offset of the group's row, or -1
        self.any_row = bool(np.any(rows >= 0))
        self.h_l = ops.lanes_array(self.h, lanes.gid)
        self.p_l = ops.lanes_array(st.pending, lanes.gid)
        row_l = ops.lanes_array(rows, lanes.gid)
        self.moves = row_l >= 0
        self.pos = ops.where(self.moves, row_l + lanes.local, 0)
        self.head = ops.heads_i64(st.heads)

    def forward(self, X):
        """X >> h, recording the h low bits of every lane."""
        if not self.active:
            return X
        ops, h, p = self.ops, self.h_l, self.p_l
        c = (self.head << h) | (X & ((1 << h) - 1))
        keep = ops.where(self.moves, p + h - WORD_BITS, 32)  # bits left in the head after a row is emitted
        self.word = (c >> keep) & 0xFFFF
        self.head = ops.where(self.moves, c & ((1 << keep) - 1), c)
        return X >> h

    def reverse(self, X, err, state: int):
        """(X << h) | the h bits recorded last; flags UNSHIFT_OVERFLOW where X << h leaves int64."""
        if not self.active:
            return X, err
        ops, h, p = self.ops, self.h_l, self.p_l
        top = X >> (63 - h)                    # X << h fits in int64 iff the bits it shifts out are all sign bits
        fits = (top == 0) | (top == -1)
        err = _flag(ops, err, ~fits, codes.code(codes.UNSHIFT_OVERFLOW, state))
        c = self.head
        if self.any_row:
            c = ops.where(self.moves, (ops.read_words(self.st.words, self.pos) << p) | c, c)
        self.head = c >> h
        return (ops.where(fits, X, 0) << h) | (c & ((1 << h) - 1)), err

    def forward2(self, hi, lo):
        """The two-limb (hi·2^62 + lo) value >> h, recording its h low bits."""
        if not self.active:
            return hi, lo
        h = self.h_l
        m = (1 << h) - 1
        lo2 = self.forward(lo) | ((hi & m) << (LIMB - h))
        return hi >> h, lo2

    def reverse2(self, hi, lo, err, state: int):
        """(hi·2^62 + lo) << h | the h bits recorded last; UNSHIFT_OVERFLOW where hi << h leaves int64."""
        if not self.active:
            return hi, lo, err
        h = self.h_l
        hi2, err = self.reverse(hi, err, state)          # flags overflow; its low bits (from the tape) unused
        bits = hi2 & ((1 << h) - 1)
        hi2 = (hi2 - bits) | (lo >> (LIMB - h))
        lo2 = ((lo << h) & LIMB_MASK) | bits
        on = h > 0                                       # lanes of groups without a shift stay exactly as they are
        return self.ops.where(on, hi2, hi), self.ops.where(on, lo2, lo), err

    def commit(self) -> None:
        if not self.active:
            self.st.commit(self.h, self.push)   # depth counts every shift, h = 0 included
            return
        if self.push and self.any_row:
            self.ops.write_words(self.st.words, self.pos[self.moves], self.word[self.moves])
        self.ops.store_heads(self.st.heads, self.head)
        self.st.commit(self.h, self.push)


def _raise_first(ops, err) -> None:
    e = ops.first_error(err)
    if e is not None:
        raise KernelError(*e)


# --- ops ------------------------------------------------------------------------------------------------------

def shift(ops, st: TapeStorage, X, h: np.ndarray, forward: bool) -> None:
    """X >>= h keeping the bits (forward), or its exact inverse; ``h`` per group."""
    lanes = lanes_of(st, ops)
    sh = _Shift(ops, st, lanes, h, forward)
    if forward:
        Y = sh.forward(X)
    else:
        err = ops.zeros_i8(st.num_lanes, X)
        Y, err = sh.reverse(X, err, 0)
        _raise_first(ops, err)
    sh.commit()
    ops.assign(X, Y)


def momentum(ops, st: TapeStorage, V, W, G, P, prm: MomentumParams, forward: bool, state: bool,
             position: bool) -> None:
    """The momentum op (see the module docstring); ``state`` / ``position`` select the halves."""
    lanes = lanes_of(st, ops)
    L = st.num_lanes
    err = ops.zeros_i8(L, V)
    sv = 2.0 ** (prm.frac_w - prm.frac_v)
    V1, W1 = V, W
    sh = None
    with ops.errstate():
        cp = ops.lanes_param(prm.cp, lanes.gid)
        if not forward and position:
            e, err = _fix(ops, (cp * ops.f64(V1)) * sv, err, 1)
            W1, err = _add(ops, W1, e, err, 1, -1)
        if state:
            g = ops.f64(G)
            err = _flag(ops, err, ~ops.isfinite(g), codes.code(codes.GRAD_NONFINITE, 0))
            lam = ops.lanes_param(prm.lam, lanes.gid)
            g = g + lam * (ops.f64(W1) * prm.ws)
            cv = ops.lanes_param(prm.cv, lanes.gid)
            d, err = _fix(ops, (cv * g) * 2.0**prm.frac_v, err, 0)
            sh = _Shift(ops, st, lanes, prm.h, forward)
            if forward:
                V1, err = _add(ops, sh.forward(V1), d, err, 0, 1)
            else:
                V1, err = _add(ops, V1, d, err, 0, -1)
                V1, err = sh.reverse(V1, err, 0)
        if forward and position:
            e, err = _fix(ops, (cp * ops.f64(V1)) * sv, err, 1)
            W1, err = _add(ops, W1, e, err, 1, 1)
    _raise_first(ops, err)
    if sh is not None:
        sh.commit()
    ops.assign(V, V1)
    if position:
        ops.assign(W, W1)
        if P is not None:
            ops.store_float(P, ops.f64(W1) * prm.ws)


def adam(ops, tapes: tuple, M, S, W, G, P, prm: AdamParams, forward: bool, state: bool, position: bool) -> None:
    """The Adam op (see the module docstring); ``tapes`` = (tape of M, of S, of W or None), ``S`` = (hi, lo)."""
    stm, sts, stw = tapes
    lanes = lanes_of(stm, ops)
    err = ops.zeros_i8(stm.num_lanes, M)
    M1, (Sh1, Sl1), W1 = M, S, W
    shifts = []
    lp = lambda v: ops.lanes_param(v, lanes.gid)  # noqa: E731
    with ops.errstate():
        def q_of(Mx, Sh, Sl):
            m = lp(prm.am) * ops.f64(Mx)
            a = lp(prm.as_)
            s = (a * 2.0**LIMB) * ops.f64(Sh) + a * ops.f64(Sl)
            return m / (ops.sqrt(s) / lp(prm.sb) + lp(prm.eps))

        if not forward and position:
            u, err = _fix(ops, (lp(prm.cu) * q_of(M1, Sh1, Sl1)) * 2.0**prm.frac_w, err, 2)
            W1, err = _add(ops, W1, u, err, 2, 1)
            if stw is not None:
                shw = _Shift(ops, stw, lanes, prm.hw, False)
                W1, err = shw.reverse(W1, err, 2)
                shifts.append(shw)
        if state:
            g = ops.f64(G)
            err = _flag(ops, err, ~ops.isfinite(g), codes.code(codes.GRAD_NONFINITE, 0))
            g = g + lp(prm.lam) * (ops.f64(W1) * lp(prm.ws))
            d1, err = _fix(ops, (lp(prm.c1) * g) * 2.0**prm.frac_m, err, 0)
            dh, dl, err = _fix2(ops, (lp(prm.c2) * (g * g)) * 2.0**prm.frac_s, err, 1)
            sh1 = _Shift(ops, stm, lanes, prm.h1, forward)
            sh2 = _Shift(ops, sts, lanes, prm.h2, forward)
            if forward:
                M1, err = _add(ops, sh1.forward(M1), d1, err, 0, 1)
                Sh1, Sl1 = sh2.forward2(Sh1, Sl1)
                Sh1, Sl1, err = _add2(ops, Sh1, Sl1, dh, dl, err, 1, 1)
            else:
                Sh1, Sl1, err = _add2(ops, Sh1, Sl1, dh, dl, err, 1, -1)
                Sh1, Sl1, err = sh2.reverse2(Sh1, Sl1, err, 1)
                M1, err = _add(ops, M1, d1, err, 0, -1)
                M1, err = sh1.reverse(M1, err, 0)
            shifts += [sh1, sh2]
        if forward and position:
            if stw is not None:
                shw = _Shift(ops, stw, lanes, prm.hw, True)
                W1 = shw.forward(W1)
                shifts.append(shw)
            u, err = _fix(ops, (lp(prm.cu) * q_of(M1, Sh1, Sl1)) * 2.0**prm.frac_w, err, 2)
            W1, err = _add(ops, W1, u, err, 2, -1)
    _raise_first(ops, err)
    for sh in shifts:
        sh.commit()
    if state:
        ops.assign(M, M1)
        ops.assign(S[0], Sh1)
        ops.assign(S[1], Sl1)
    if position:
        ops.assign(W, W1)
        if P is not None:
            ops.store_float(P, ops.f64(W1) * lp(prm.ps))


def backend(ops) -> tuple:
    """The ``shift``, ``momentum`` and ``adam`` functions of a backend module for an array-ops class."""
    def shift_(st, X, h, forward) -> None:
        shift(ops, st, X, h, forward)

    def momentum_(st, V, W, G, P, prm, forward, state, position) -> None:
        momentum(ops, st, V, W, G, P, prm, forward, state, position)

    def adam_(tapes, M, S, W, G, P, prm, forward, state, position) -> None:
        adam(ops, tapes, M, S, W, G, P, prm, forward, state, position)
    return shift_, momentum_, adam_
