"""Numba kernels: :mod:`revsgd.kernels.vectorized` (the specification) as fused per-lane loops.

The same design as csrc/kernels.cpp: lanes in chunks of ``CHUNK`` (chunks in parallel with ``prange`` when there are
several, a plain call when there is one), lanes ascending inside a chunk, walked segment by segment (segment =
chunk ∩ group) with the group's parameters loaded once per segment. Every lane evaluates exactly the expressions
of the specification in its order (no fastmath: one IEEE rounding per operation) and stops its chunk at the first
failure (that lane untouched); the driver then undoes every chunk's finished lanes with the inverse op (same
parameters and rows, the pending counts the failed op would have left) and returns (code, lowest failing lane).
P is written in a second pass once every lane succeeded (on error it stays untouched, as in the specification).

Python plans the tape (:meth:`TapeStorage.plan`; skipped when no group shifts) and commits after success. A tape
goes to the kernel as ``(heads, words, h, pending, rows, on)``; ``on`` is False when no group shifts.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a hard dependency, but the reference still works without it
    available = False
else:
    available = True

from ..core.tapeformat import HostArrays
from .vectorized import KernelError

name = "numba"
arrays = HostArrays
CHUNK = 16384

_TWO63 = 2.0**63
# revsgd/kernels/codes.py: base | state << 4
_GRAD0 = 1
_TERM0, _TERM1, _TERM2 = 2, 2 | 16, 2 | 32
_ADD0, _ADD1, _ADD2 = 3, 3 | 16, 3 | 32
_UNSH0, _UNSH1, _UNSH2 = 4, 4 | 16, 4 | 32
_UNDO_FAILED = -1

_F32, _F64, _I64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)
_NO32, _NO64 = np.zeros(0, np.float32), np.zeros(0, np.float64)   # "no G" / "no P"
_OFF = (np.zeros(0, np.uint16), np.zeros(0, np.uint16), np.zeros(1, np.int64), np.zeros(1, np.int64),
        np.zeros(1, np.int64), False)            # a tape with no work

if available:
    _jit = njit(cache=True, nogil=True)
    _pjit = njit(parallel=True, cache=True, nogil=True)

    @_jit
    def _group_of(off, a):
        """The last g with off[g] <= a."""
        lo, hi = 0, off.shape[0] - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if off[mid] <= a:
                lo = mid
            else:
                hi = mid
        return lo

    @_jit
    def _at(a, g):
        """Per-group value: a has G entries or one for all groups."""
        return a[g] if a.shape[0] > 1 else a[0]

    @_jit
    def _seg(tape, g, first, push, undo):
        """A tape's work on a segment of group g: (h, p, moves, keep, wbase); h = 0: none. push: this kernel
        pushes; undo: the pending count is the one the undone op would have left."""
        if not tape[5]:
            return 0, 0, False, 0, 0
        h = _at(tape[2], g)
        if h == 0:
            return 0, 0, False, 0, 0
        p = tape[3][g]
        row = tape[4][g]
        moves = row >= 0
        if undo:
            if push:
                p = p + 16 - h if moves else p - h
            else:
                p = p + h - 16 if moves else p + h
        keep = p + h - 16 if moves else 0
        return h, p, moves, keep, row - first

    @_jit
    def _push(heads, i, x, h, moves, keep):
        """_Shift.forward on lane i: (x >> h, new head, row word)."""
        c = (np.int64(heads[i]) << h) | (x & ((np.int64(1) << h) - 1))
        if moves:
            return x >> h, c & ((np.int64(1) << keep) - 1), c >> keep
        return x >> h, c, np.int64(0)

    @_jit
    def _pop(heads, words, i, x, h, p, moves, wbase):
        """_Shift.reverse on lane i: (ok, (x << h) | bits, new head); ok False where x << h leaves int64."""
        top = x >> (63 - h)
        if top != 0 and top != -1:
            return False, x, np.int64(0)
        c = np.int64(heads[i])
        if moves:
            c = (np.int64(words[wbase + i]) << p) | c
        return True, (x << h) | (c & ((np.int64(1) << h) - 1)), c >> h

    @_jit
    def _store(tape, i, push, moves, wbase, head, word):
        tape[0][i] = head
        if push and moves:
            tape[1][wbase + i] = word

    @_jit
    def _fix(y):
        """(ok, rint(y)) for y in [-2^63, 2^63) (NaN fails)."""
        if y >= -_TWO63 and y < _TWO63:
            return True, np.int64(np.rint(y))
        return False, np.int64(0)

    @_jit
    def _add(x, d):
        """(overflowed, x + d) in int64 (wraps; the sign test sees it)."""
        y = x + d
        return ((x ^ y) & (d ^ y)) < 0, y

    @_jit
    def _sub(x, d):
        y = x - d
        return ((x ^ d) & (x ^ y)) < 0, y

    # --- the P output (second pass) -----------------------------------------------------------------------
    @_jit
    def _write_p(W, P32, P64, off, scale, a, b):
        """P = f64(W)·scale[group] on lanes [a, b): into P32 (float32) if it has lanes, else P64 (or nowhere)."""
        g = _group_of(off, a)
        lo = a
        while lo < b:
            hi = min(b, off[g + 1])
            c = _at(scale, g)
            if P32.shape[0] != 0:
                for i in range(lo, hi):
                    P32[i] = np.float32(np.float64(W[i]) * c)
            elif P64.shape[0] != 0:
                for i in range(lo, hi):
                    P64[i] = np.float64(W[i]) * c
            lo = hi
            g += 1

    @_pjit
    def _write_p_chunks(W, P32, P64, off, scale):
        L = W.shape[0]
        for c in prange((L + CHUNK - 1) // CHUNK):
            _write_p(W, P32, P64, off, scale, c * CHUNK, min(L, (c + 1) * CHUNK))

    # --- checks (they guard memory: no bounds checks in the loops) ----------------------------------------
    @_jit
    def _check_groups(off, L):
        G = off.shape[0] - 1
        if G < 1 or off[0] != 0 or off[G] != L:
            raise ValueError("group offsets must run from 0 to num_lanes")
        for k in range(G):
            if off[k + 1] <= off[k]:
                raise ValueError("group offsets must increase strictly")
        return G

    @_jit
    def _lanes_ok(G32, G64, P32, P64, st, L):
        """G (if used) one entry per lane in exactly one of G32 / G64; P: none, or one entry per lane."""
        g_ok = not st or (G32.shape[0] == L) != (G64.shape[0] == L)
        p_ok = (P32.shape[0] == 0 or P32.shape[0] == L) and (P64.shape[0] == 0 or P64.shape[0] == L)
        return g_ok and p_ok and (P32.shape[0] == 0 or P64.shape[0] == 0)

    @_jit
    def _check_param(a, G):
        if a.shape[0] != G and a.shape[0] != 1:
            raise ValueError("per-group parameters must have shape (G,) or (1,)")

    @_jit
    def _check_tape(tape, off, L):
        if not tape[5]:
            return
        G = off.shape[0] - 1
        _check_param(tape[2], G)
        if tape[0].shape[0] != L or tape[3].shape[0] != G or tape[4].shape[0] != G:
            raise ValueError("tape arrays have the wrong length")
        cap = tape[1].shape[0]
        for k in range(G):
            h, p, r = _at(tape[2], k), tape[3][k], tape[4][k]
            if h < 0 or h > 16 or p < 0 or p > 15:
                raise ValueError("shift or pending count out of range")
            if r >= 0 and (h == 0 or r > cap - (off[k + 1] - off[k])):
                raise ValueError("tape row outside the word buffer")

    # --- shift --------------------------------------------------------------------------------------------
    @_jit
    def _shift_range(X, off, tape, fwd, a, b, undo):
        g = _group_of(off, a)
        lo = a
        while lo < b:
            hi = min(b, off[g + 1])
            h, p, moves, keep, wbase = _seg(tape, g, off[g], fwd, undo)
            if h != 0:
                heads, words = tape[0], tape[1]
                for i in range(lo, hi):
                    if fwd:
                        x, nh, nw = _push(heads, i, X[i], h, moves, keep)
                    else:
                        ok, x, nh = _pop(heads, words, i, X[i], h, p, moves, wbase)
                        nw = np.int64(0)
                        if not ok:
                            return i, _UNSH0
                    _store(tape, i, fwd, moves, wbase, nh, nw)
                    X[i] = x
            lo = hi
            g += 1
        return b, 0

    @_pjit
    def _shift_chunks(X, off, tape, fwd, undo, stop, err):
        L = X.shape[0]
        for c in prange(stop.shape[0]):
            a = c * CHUNK
            b = stop[c] if undo else min(L, a + CHUNK)
            s, e = _shift_range(X, off, tape, fwd, a, b, undo)
            if undo:
                if s != b or e != 0:
                    err[c] = _UNDO_FAILED
            else:
                stop[c], err[c] = s, e

    @_jit
    def _shift(X, off, tape, fwd):
        L = X.shape[0]
        _check_groups(off, L)
        _check_tape(tape, off, L)
        nch = (L + CHUNK - 1) // CHUNK
        if nch == 1:
            s, e = _shift_range(X, off, tape, fwd, np.int64(0), L, np.bool_(False))
            if e != 0:
                s2, e2 = _shift_range(X, off, tape, not fwd, np.int64(0), s, np.bool_(True))
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _shift_chunks(X, off, tape, fwd, np.bool_(False), stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _shift_chunks(X, off, tape, not fwd, np.bool_(True), stop, err)
                for c2 in range(nch):
                    if err[c2] != 0:
                        raise RuntimeError("undoing a failed op failed (internal error)")
                return e, lane
        return 0, -1

    # --- momentum -----------------------------------------------------------------------------------------
    @_jit
    def _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, a, b, undo):
        g32 = G32.shape[0] != 0
        two_fv = 2.0**fv
        sv = 2.0 ** (fw - fv)
        ws = 2.0**-fw
        g = _group_of(off, a)
        lo = a
        while lo < b:
            hi = min(b, off[g + 1])
            cvg, cpg, lamg = _at(cv, g), _at(cp, g), _at(lam, g)
            if st:
                h, p, moves, keep, wbase = _seg(tape, g, off[g], fwd, undo)
            else:
                h, p, moves, keep, wbase = 0, 0, False, 0, 0
            heads, words = tape[0], tape[1]
            for i in range(lo, hi):
                v, w = V[i], W[i]
                nh = nw = np.int64(0)
                if not fwd and po:
                    ok, e = _fix((cpg * np.float64(v)) * sv)
                    if not ok:
                        return i, _TERM1
                    bad, w = _sub(w, e)
                    if bad:
                        return i, _ADD1
                if st:
                    gr = np.float64(G32[i]) if g32 else G64[i]
                    if not np.isfinite(gr):
                        return i, _GRAD0
                    gr = gr + lamg * (np.float64(w) * ws)
                    ok, d = _fix((cvg * gr) * two_fv)
                    if not ok:
                        return i, _TERM0
                    if fwd:
                        if h != 0:
                            v, nh, nw = _push(heads, i, v, h, moves, keep)
                        bad, v = _add(v, d)
                        if bad:
                            return i, _ADD0
                    else:
                        bad, v = _sub(v, d)
                        if bad:
                            return i, _ADD0
                        if h != 0:
                            ok, v, nh = _pop(heads, words, i, v, h, p, moves, wbase)
                            if not ok:
                                return i, _UNSH0
                if fwd and po:
                    ok, e = _fix((cpg * np.float64(v)) * sv)
                    if not ok:
                        return i, _TERM1
                    bad, w = _add(w, e)
                    if bad:
                        return i, _ADD1
                if st:
                    if h != 0:
                        _store(tape, i, fwd, moves, wbase, nh, nw)
                    V[i] = v
                if po:
                    W[i] = w
            lo = hi
            g += 1
        return b, 0

    @_pjit
    def _mom_chunks(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, undo, stop, err):
        L = V.shape[0]
        for c in prange(stop.shape[0]):
            a = c * CHUNK
            b = stop[c] if undo else min(L, a + CHUNK)
            s, e = _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, a, b, undo)
            if undo:
                if s != b or e != 0:
                    err[c] = _UNDO_FAILED
            else:
                stop[c], err[c] = s, e

    @_jit
    def _momentum(V, W, G32, G64, P32, P64, off, cv, cp, lam, fv, fw, tape, fwd, st, po):
        L = V.shape[0]
        Gn = _check_groups(off, L)
        if W.shape[0] != L or not _lanes_ok(G32, G64, P32, P64, st, L):
            raise ValueError("arrays must have one entry per lane")
        _check_param(cv, Gn)
        _check_param(cp, Gn)
        _check_param(lam, Gn)
        if fv < 0 or fv > 62 or fw < 0 or fw > 62:
            raise ValueError("fractional bits must lie in [0, 62]")
        _check_tape(tape, off, L)
        nch = (L + CHUNK - 1) // CHUNK
        if nch == 1:
            s, e = _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, np.int64(0), L, np.bool_(False))
            if e != 0:
                s2, e2 = _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, not fwd, st, po, np.int64(0), s, np.bool_(True))
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            if po:
                _write_p(W, P32, P64, off, np.full(1, 2.0**-fw), np.int64(0), L)
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _mom_chunks(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, np.bool_(False), stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _mom_chunks(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, not fwd, st, po, np.bool_(True), stop, err)
                for c2 in range(nch):
                    if err[c2] != 0:
                        raise RuntimeError("undoing a failed op failed (internal error)")
                return e, lane
        if po:
            _write_p_chunks(W, P32, P64, off, np.full(1, 2.0**-fw))
        return 0, -1

    # --- adam ---------------------------------------------------------------------------------------------
    @_jit
    def _adam_range(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, a, b, undo):
        c1a, c2a, lama, ama, asa, sba, epsa, cua, wsa = prm
        g32 = G32.shape[0] != 0
        two_fm, two_fs, two_fw = 2.0**fm, 2.0**fs, 2.0**fw
        g = _group_of(off, a)
        lo = a
        while lo < b:
            hi = min(b, off[g + 1])
            first = off[g]
            c1, c2, lam, am = _at(c1a, g), _at(c2a, g), _at(lama, g), _at(ama, g)
            as_, sb, eps, cu, ws = _at(asa, g), _at(sba, g), _at(epsa, g), _at(cua, g), _at(wsa, g)
            if st:
                hm, pm, mvm, kpm, wbm = _seg(tm, g, first, fwd, undo)
                hs, ps, mvs, kps, wbs = _seg(ts, g, first, fwd, undo)
            else:
                hm, pm, mvm, kpm, wbm = 0, 0, False, 0, 0
                hs, ps, mvs, kps, wbs = 0, 0, False, 0, 0
            if po:
                hw, pw, mvw, kpw, wbw = _seg(tw, g, first, fwd, undo)
            else:
                hw, pw, mvw, kpw, wbw = 0, 0, False, 0, 0
            for i in range(lo, hi):
                m, s, w = M[i], S[i], W[i]
                nhm = nwm = nhs = nws = nhw = nww = np.int64(0)
                if not fwd and po:
                    q = (am * np.float64(m)) / (np.sqrt(as_ * np.float64(s)) / sb + eps)
                    ok, u = _fix((cu * q) * two_fw)
                    if not ok:
                        return i, _TERM2
                    bad, w = _add(w, u)
                    if bad:
                        return i, _ADD2
                    if hw != 0:
                        ok, w, nhw = _pop(tw[0], tw[1], i, w, hw, pw, mvw, wbw)
                        if not ok:
                            return i, _UNSH2
                if st:
                    gr = np.float64(G32[i]) if g32 else G64[i]
                    if not np.isfinite(gr):
                        return i, _GRAD0
                    gr = gr + lam * (np.float64(w) * ws)
                    ok, d1 = _fix((c1 * gr) * two_fm)
                    if not ok:
                        return i, _TERM0
                    ok, d2 = _fix((c2 * (gr * gr)) * two_fs)
                    if not ok:
                        return i, _TERM1
                    if fwd:
                        if hm != 0:
                            m, nhm, nwm = _push(tm[0], i, m, hm, mvm, kpm)
                        bad, m = _add(m, d1)
                        if bad:
                            return i, _ADD0
                        if hs != 0:
                            s, nhs, nws = _push(ts[0], i, s, hs, mvs, kps)
                        bad, s = _add(s, d2)
                        if bad:
                            return i, _ADD1
                    else:
                        bad, s = _sub(s, d2)
                        if bad:
                            return i, _ADD1
                        if hs != 0:
                            ok, s, nhs = _pop(ts[0], ts[1], i, s, hs, ps, mvs, wbs)
                            if not ok:
                                return i, _UNSH1
                        bad, m = _sub(m, d1)
                        if bad:
                            return i, _ADD0
                        if hm != 0:
                            ok, m, nhm = _pop(tm[0], tm[1], i, m, hm, pm, mvm, wbm)
                            if not ok:
                                return i, _UNSH0
                if fwd and po:
                    if hw != 0:
                        w, nhw, nww = _push(tw[0], i, w, hw, mvw, kpw)
                    q = (am * np.float64(m)) / (np.sqrt(as_ * np.float64(s)) / sb + eps)
                    ok, u = _fix((cu * q) * two_fw)
                    if not ok:
                        return i, _TERM2
                    bad, w = _sub(w, u)
                    if bad:
                        return i, _ADD2
                if st:
                    if hm != 0:
                        _store(tm, i, fwd, mvm, wbm, nhm, nwm)
                    if hs != 0:
                        _store(ts, i, fwd, mvs, wbs, nhs, nws)
                    M[i] = m
                    S[i] = s
                if po:
                    if hw != 0:
                        _store(tw, i, fwd, mvw, wbw, nhw, nww)
                    W[i] = w
            lo = hi
            g += 1
        return b, 0

    @_pjit
    def _adam_chunks(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, undo, stop, err):
        L = M.shape[0]
        for c in prange(stop.shape[0]):
            a = c * CHUNK
            b = stop[c] if undo else min(L, a + CHUNK)
            s, e = _adam_range(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, a, b, undo)
            if undo:
                if s != b or e != 0:
                    err[c] = _UNDO_FAILED
            else:
                stop[c], err[c] = s, e

    @_jit
    def _adam(M, S, W, G32, G64, P32, P64, off, prm, ps, fm, fs, fw, tm, ts, tw, fwd, st, po):
        L = M.shape[0]
        Gn = _check_groups(off, L)
        if S.shape[0] != L or W.shape[0] != L or not _lanes_ok(G32, G64, P32, P64, st, L):
            raise ValueError("arrays must have one entry per lane")
        c1, c2, lam, am, as_, sb, eps, cu, ws = prm
        for a in (c1, c2, lam, am, as_, sb, eps, cu, ws, ps):
            _check_param(a, Gn)
        if fm < 0 or fm > 62 or fs < 0 or fs > 62 or fw < 0 or fw > 62:
            raise ValueError("fractional bits must lie in [0, 62]")
        _check_tape(tm, off, L)
        _check_tape(ts, off, L)
        _check_tape(tw, off, L)
        nch = (L + CHUNK - 1) // CHUNK
        if nch == 1:
            s, e = _adam_range(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, np.int64(0), L, np.bool_(False))
            if e != 0:
                s2, e2 = _adam_range(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, not fwd, st, po, np.int64(0), s, np.bool_(True))
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            if po:
                _write_p(W, P32, P64, off, ps, np.int64(0), L)
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _adam_chunks(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, np.bool_(False), stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _adam_chunks(M, S, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, not fwd, st, po, np.bool_(True), stop, err)
                for c2 in range(nch):
                    if err[c2] != 0:
                        raise RuntimeError("undoing a failed op failed (internal error)")
                return e, lane
        if po:
            _write_p_chunks(W, P32, P64, off, ps)
        return 0, -1


# --- Python side: plan, run, commit --------------------------------------------------------------------------
_ZERO_BYTES: dict = {}


def _any_shift(h) -> bool:
    """Whether any group shifts (cheaper than ``h.any()`` on tiny arrays)."""
    b = h.tobytes()
    z = _ZERO_BYTES.get(len(b))
    if z is None:
        z = _ZERO_BYTES[len(b)] = bytes(len(b))
    return b != z


def _tape(st, h, push: bool):
    """(kernel tape tuple, rows or None): plans the tape unless no group shifts (then no tape work at all)."""
    if st is None or not _any_shift(h):
        return _OFF, None
    if h.dtype != _I64:
        raise TypeError(f"shifts must be int64, got {h.dtype} (no silent conversion)")
    rows = st.plan(h, push)
    return (st.heads, st.words, h, st.pending, rows, True), rows


def _commit(st, h, push: bool, rows) -> None:
    if rows is None:
        st.depth += 1 if push else -1   # TapeStorage.commit of an all-zero shift: only the depth changes
    else:
        st.commit(h, push)


def _floats(a, what: str, used: bool):
    """(float32 array, float64 array): ``a`` in the slot of its dtype, the other empty (one compiled variant)."""
    if not used or a is None:
        return _NO32, _NO64
    if a.dtype == _F32:
        return a, _NO64
    if a.dtype == _F64:
        return _NO32, a
    raise TypeError(f"{what} must be float32 or float64, got {a.dtype} (no silent conversion)")


def shift(st, X, h, forward) -> None:
    tape, rows = _tape(st, h, forward)
    if rows is not None:
        e, lane = _shift(X, st.offsets, tape, forward)
        if e:
            raise KernelError(int(e), int(lane))
    _commit(st, h, forward, rows)


def momentum(st, V, W, G, P, prm, forward, state, position) -> None:
    h = prm.h
    tape, rows = _tape(st, h, forward) if state else (_OFF, None)
    G32, G64 = _floats(G, "G", state)
    P32, P64 = _floats(P, "P", position)
    e, lane = _momentum(V, W, G32, G64, P32, P64, st.offsets, prm.cv, prm.cp, prm.lam, prm.frac_v, prm.frac_w,
                        tape, forward, state, position)
    if e:
        raise KernelError(int(e), int(lane))
    if state:
        _commit(st, h, forward, rows)


def adam(tapes, M, S, W, G, P, prm, forward, state, position) -> None:
    stm, sts, stw = tapes
    if state:
        tm, rm = _tape(stm, prm.h1, forward)
        ts, rs = _tape(sts, prm.h2, forward)
    else:
        tm = ts = _OFF
        rm = rs = None
    tw, rw = _tape(stw, prm.hw, forward) if position else (_OFF, None)
    G32, G64 = _floats(G, "G", state)
    P32, P64 = _floats(P, "P", position)
    e, lane = _adam(M, S, W, G32, G64, P32, P64, stm.offsets,
                    (prm.c1, prm.c2, prm.lam, prm.am, prm.as_, prm.sb, prm.eps, prm.cu, prm.ws), prm.ps,
                    prm.frac_m, prm.frac_s, prm.frac_w, tm, ts, tw, forward, state, position)
    if e:
        raise KernelError(int(e), int(lane))
    if state:
        _commit(stm, prm.h1, forward, rm)
        _commit(sts, prm.h2, forward, rs)
    if position and stw is not None:
        _commit(stw, prm.hw, forward, rw)


def set_num_threads(k: int) -> None:
    numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
