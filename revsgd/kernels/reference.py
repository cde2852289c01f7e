"""NumPy reference kernels: the readable specification every compiled backend must match byte for byte.

Both kernels act on the lanes ``begin[c] <= i < end[c]`` of every chunk ``c`` and, per lane, in this order:

forward (ascending lanes)                       reverse (descending lanes)
    V = exact_scale(V, n)      if do_scale          W -= fix(α · flt(V))        if W given
    V -= fix((1 − n/2^16) · G) if G given           V += fix((1 − n/2^16) · G)  if G given
    W += fix(α · flt(V))       if W given           V = exact_unscale(V, n)     if do_scale

exact_scale(V, n):   q = V >> 16 (floor), r = V & 0xFFFF; the head takes r in and gives s ∈ [0, n) out; V = q·n + s.
    head forward:    if x >= n·2^16: emit x & 0xFFFF, x >>= 16;  y = x·2^16 + r;  s = y mod n;  x = y div n.
exact_unscale(V, n): q = floor(V / n), s = V − q·n; the head takes s in and gives r out; V = q·2^16 + r.
    head reverse:    y = x·n + s;  r = y & 0xFFFF;  x = y >> 16;  if x < 2^16: x = (x << 16) | pop().

fix(a·flt(X)) is computed as rint(a · float64(X)) (scaling by 2^±F is exact); fix(c·G) as rint((c·G)·2^F).
Like the compiled kernels, each chunk stops at its first failing lane (in its walking order), keeps the lanes
before it and reports that lane's code; the driver then undoes the kept lanes and raises.
"""
from __future__ import annotations

import numpy as np

from ..core.tapeformat import CHUNK, TapeStorage
from . import codes

name = "numpy"
_TWO63 = 2.0**63
_M16 = np.uint64(0xFFFF)
_S16 = np.uint64(16)


def _lanes(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(b, e, dtype=np.int64) for b, e in zip(begin, end)])


def _per_lane(a: np.ndarray, i: np.ndarray) -> np.ndarray:
    return a if a.shape[0] == 1 else a[i]


def _fix_checked(y: np.ndarray, err: np.ndarray, code: int) -> np.ndarray:
    """rint(y) as int64 where y lies in [-2^63, 2^63); elsewhere 0 and ``code`` (unless an earlier error)."""
    ok = (y >= -_TWO63) & (y < _TWO63)
    err[(~ok) & (err == 0)] = code
    return np.rint(np.where(ok, y, 0.0)).astype(np.int64)


def _flag(err: np.ndarray, bad: np.ndarray, code: int) -> None:
    err[bad & (err == 0)] = code


def _by_chunk(pos: np.ndarray, i: np.ndarray):
    """Group positions ``pos`` (ascending, into the ascending lane list ``i``) by chunk: yields (chunk, positions)."""
    if pos.size == 0:
        return []
    cid = i[pos] // CHUNK
    cuts = np.flatnonzero(np.diff(cid)) + 1
    return zip(cid[np.r_[0, cuts]], np.split(pos, cuts))


def _stops(i: np.ndarray, err: np.ndarray, begin, end, status, forward: bool) -> np.ndarray:
    """Per-chunk stop semantics of every backend: a chunk walks its lanes (ascending forward, descending in
    reverse), stops at its first failing lane and records that lane's code; returns the mask of lanes to commit
    and leaves the progress in ``begin`` (forward) or ``end`` (reverse)."""
    chunk = i // CHUNK
    bad = np.flatnonzero(err)
    if forward:
        stop = end.copy()
        np.minimum.at(stop, chunk[bad], i[bad])
        commit = i < stop[chunk]
        failed = np.flatnonzero(stop < end)
        status[failed] = err[np.searchsorted(i, stop[failed])]
        begin[:] = stop
    else:
        stop = begin - 1
        np.maximum.at(stop, chunk[bad], i[bad])
        commit = i > stop[chunk]
        failed = np.flatnonzero(stop >= begin)
        status[failed] = err[np.searchsorted(i, stop[failed])]
        end[:] = stop + 1
    return commit


def _alpha_v(alpha, i, v):
    with np.errstate(over="ignore", invalid="ignore"):
        return _per_lane(alpha, i) * v.astype(np.float64)


def _velocity_term(G, n_l, i, frac_bits, err):
    c = (65536 - n_l).astype(np.float64) * 2.0**-16
    g = G[i]
    _flag(err, ~np.isfinite(g), codes.GRAD_NONFINITE)
    with np.errstate(over="ignore", invalid="ignore"):
        y = (c * g) * 2.0**frac_bits
    return _fix_checked(y, err, codes.VEL_FIX_OVERFLOW)


def forward(st: TapeStorage, V, W, G, alpha, n, do_scale: bool, frac_bits: int, begin, end, status) -> None:
    i = _lanes(begin, end)
    if i.size == 0:
        return
    err = np.zeros(i.size, dtype=np.int8)
    v = V[i]
    n_l = _per_lane(n, i)
    if do_scale:
        nn = n_l.astype(np.uint64)
        q = v >> 16
        r = (v & 0xFFFF).astype(np.uint64)
        x = st.heads[i].astype(np.uint64)
        emit = x >= (nn << _S16)
        words = (x & _M16).astype(np.uint16)
        x = np.where(emit, x >> _S16, x)
        y = (x << _S16) | r
        x = y // nn
        s = (y - x * nn).astype(np.int64)
        v = q * n_l + s
    if G is not None:
        d = _velocity_term(G, n_l, i, frac_bits, err)
        v2 = v - d
        _flag(err, ((v ^ d) & (v ^ v2)) < 0, codes.VEL_OVERFLOW)
        v = v2
    if W is not None:
        w = W[i]
        e = _fix_checked(_alpha_v(alpha, i, v), err, codes.POS_FIX_OVERFLOW)
        w2 = w + e
        _flag(err, ((w ^ w2) & (e ^ w2)) < 0, codes.POS_OVERFLOW)
    ok = _stops(i, err, begin, end, status, forward=True)
    if do_scale:
        for c, pos in _by_chunk(np.flatnonzero(emit & ok), i):
            wc = words[pos]
            st.reserve(int(c), wc.size)
            k = int(st.lens[c])
            st.streams[c][k:k + wc.size] = wc
            st.lens[c] = k + wc.size
        st.heads[i[ok]] = x[ok].astype(np.uint32)
    V[i[ok]] = v[ok]
    if W is not None:
        W[i[ok]] = w2[ok]


def reverse(st: TapeStorage, V, W, G, alpha, n, do_scale: bool, frac_bits: int, begin, end, status) -> None:
    i = _lanes(begin, end)
    if i.size == 0:
        return
    err = np.zeros(i.size, dtype=np.int8)
    v = V[i]
    n_l = _per_lane(n, i)
    if W is not None:
        w = W[i]
        e = _fix_checked(_alpha_v(alpha, i, v), err, codes.POS_FIX_OVERFLOW)
        w2 = w - e
        _flag(err, ((w ^ e) & (w ^ w2)) < 0, codes.POS_OVERFLOW)
    if G is not None:
        d = _velocity_term(G, n_l, i, frac_bits, err)
        v2 = v + d
        _flag(err, ((v ^ v2) & (d ^ v2)) < 0, codes.VEL_OVERFLOW)
        v = v2
    if do_scale:
        q = np.floor_divide(v, n_l)
        s = (v - q * n_l).astype(np.uint64)
        _flag(err, (q < -(1 << 47)) | (q >= (1 << 47)), codes.UNSCALE_OVERFLOW)
        y = st.heads[i].astype(np.uint64) * n_l.astype(np.uint64) + s
        r = (y & _M16).astype(np.int64)
        x = y >> _S16
        for c, p in _by_chunk(np.flatnonzero(x < (1 << 16)), i):
            # p ascending; descending lanes pop the top of the stream first
            short = p.size - int(st.lens[c])  # the lowest `short` poppers find the stream empty
            if short > 0:
                _flag(err, np.isin(np.arange(i.size), p[:short]), codes.TAPE_EMPTY)
        v = q * 65536 + r
    ok = _stops(i, err, begin, end, status, forward=False)
    if do_scale:
        for c, p in _by_chunk(np.flatnonzero((x < (1 << 16)) & ok), i):
            have = int(st.lens[c])
            x[p] = (x[p] << _S16) | st.streams[c][have - p.size:have].astype(np.uint64)
            st.lens[c] = have - p.size
        st.heads[i[ok]] = x[ok].astype(np.uint32)
    V[i[ok]] = v[ok]
    if W is not None:
        W[i[ok]] = w2[ok]
