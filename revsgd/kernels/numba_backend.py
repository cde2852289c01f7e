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

Compilation (~15 s cold, then cached): one variant per op. G and P go in as a (float32, float64) pair with the
unused slot empty, read-only parameter arrays are copied (numba types them apart), and internal calls pass no
literal constants (each literal would compile its own variant).
"""
from __future__ import annotations

import math

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
_TWO125 = 2.0**125
LIMB = 62                     # two-limb states (Adam's S): hi·2^62 + lo, 0 <= lo < 2^62
_LIMB_MASK = (1 << LIMB) - 1
_TWO62, _TWO_M62 = 2.0**LIMB, 2.0**-LIMB
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
        keep = p + h - 16 if push and moves else 0   # bits left in the head after a push emits its row
        return h, p, moves, keep, row - first

    @_jit
    def _push(head, x, h, moves, keep):
        """_Shift.forward on a lane with head ``head``: (x >> h, new head, row word). Scalars only: helpers that
        take arrays cost a reference count per lane."""
        c = (np.int64(head) << h) | (x & ((np.int64(1) << h) - 1))
        if moves:
            return x >> h, c & ((np.int64(1) << keep) - 1), c >> keep
        return x >> h, c, np.int64(0)

    @_jit
    def _pop(head, word, x, h, p, moves):
        """_Shift.reverse on a lane (``word``: its row word if the group pops a row): (ok, (x << h) | bits,
        new head); ok False where x << h leaves int64."""
        top = x >> (63 - h)
        if top != 0 and top != -1:
            return False, x, np.int64(0)
        c = np.int64(head)
        if moves:
            c = (np.int64(word) << p) | c
        return True, (x << h) | (c & ((np.int64(1) << h) - 1)), c >> h

    @_jit
    def _fix2(y):
        """(ok, yh, yl): yh·2^62 + yl = rint(y) for y in [0, 2^125) (NaN fails); the subtraction is exact."""
        if y >= 0.0 and y < _TWO125:
            f = np.floor(y * _TWO_M62)
            return True, np.int64(np.rint(f)), np.int64(np.rint(y - f * _TWO62))
        return False, np.int64(0), np.int64(0)

    @_jit
    def _add2(hi, lo, dh, dl):
        """(overflowed, hi, lo) of (hi, lo) + (dh, dl), the carry going from lo into hi."""
        lo2 = lo + dl
        bad, hi2 = _add(hi, dh + (lo2 >> LIMB))
        return bad, hi2, lo2 & _LIMB_MASK

    @_jit
    def _sub2(hi, lo, dh, dl):
        """(overflowed, hi, lo) of (hi, lo) − (dh, dl), the borrow going from lo into hi."""
        lo2 = lo - dl
        bad, hi2 = _sub(hi, dh - (lo2 >> LIMB))
        return bad, hi2, lo2 & _LIMB_MASK

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
                        x, nh, nw = _push(heads[i], X[i], h, moves, keep)
                    else:
                        ok, x, nh = _pop(heads[i], words[wbase + i] if moves else 0, X[i], h, p, moves)
                        nw = np.int64(0)
                        if not ok:
                            return i, _UNSH0
                    heads[i] = nh
                    if fwd and moves:
                        words[wbase + i] = nw
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
        zero, no, yes = np.int64(0), np.bool_(False), np.bool_(True)   # not literals: one compiled variant each
        if nch == 1:
            s, e = _shift_range(X, off, tape, fwd, zero, L, no)
            if e != 0:
                s2, e2 = _shift_range(X, off, tape, not fwd, zero, s, yes)
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _shift_chunks(X, off, tape, fwd, no, stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _shift_chunks(X, off, tape, not fwd, yes, stop, err)
                for c2 in range(nch):
                    if err[c2] != 0:
                        raise RuntimeError("undoing a failed op failed (internal error)")
                return e, lane
        return 0, -1

    # --- momentum -----------------------------------------------------------------------------------------
    @_jit
    def _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, a, b, undo):
        g32 = G32.shape[0] != 0
        two_fv = math.ldexp(1.0, fv)      # the spec's 2.0**frac_v, 2.0**(frac_w − frac_v), 2.0**−frac_w: exact
        sv = math.ldexp(1.0, fw - fv)
        ws = math.ldexp(1.0, -fw)
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
                    if lamg != 0.0:   # lam = 0: g + ±0 rounds to the same integer below
                        gr = gr + lamg * (np.float64(w) * ws)
                    ok, d = _fix((cvg * gr) * two_fv)
                    if not ok:
                        return i, _TERM0
                    if fwd:
                        if h != 0:
                            v, nh, nw = _push(heads[i], v, h, moves, keep)
                        bad, v = _add(v, d)
                        if bad:
                            return i, _ADD0
                    else:
                        bad, v = _sub(v, d)
                        if bad:
                            return i, _ADD0
                        if h != 0:
                            ok, v, nh = _pop(heads[i], words[wbase + i] if moves else 0, v, h, p, moves)
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
                        heads[i] = nh
                        if fwd and moves:
                            words[wbase + i] = nw
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
        if fv < 0 or fv > 512 or fw < 0 or fw > 512:
            raise ValueError("fractional bits must lie in [0, 512]")
        _check_tape(tape, off, L)
        nch = (L + CHUNK - 1) // CHUNK
        zero, no, yes = np.int64(0), np.bool_(False), np.bool_(True)   # not literals: one compiled variant each
        if nch == 1:
            s, e = _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, zero, L, no)
            if e != 0:
                s2, e2 = _mom_range(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, not fwd, st, po, zero, s, yes)
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            if po:
                _write_p(W, P32, P64, off, np.full(1, math.ldexp(1.0, -fw)), zero, L)
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _mom_chunks(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, fwd, st, po, no, stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _mom_chunks(V, W, G32, G64, off, cv, cp, lam, fv, fw, tape, not fwd, st, po, yes, stop, err)
                for c2 in range(nch):
                    if err[c2] != 0:
                        raise RuntimeError("undoing a failed op failed (internal error)")
                return e, lane
        if po:
            _write_p_chunks(W, P32, P64, off, np.full(1, math.ldexp(1.0, -fw)))
        return 0, -1

    # --- adam ---------------------------------------------------------------------------------------------
    @_jit
    def _adam_range(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, a, b, undo):
        c1a, c2a, lama, ama, asa, sba, epsa, cua, wsa = prm
        g32 = G32.shape[0] != 0
        hdm, wdm, hds, wds, hdw, wdw = tm[0], tm[1], ts[0], ts[1], tw[0], tw[1]
        two_fm, two_fs, two_fw = math.ldexp(1.0, fm), math.ldexp(1.0, fs), math.ldexp(1.0, fw)
        g = _group_of(off, a)
        lo = a
        while lo < b:
            hi = min(b, off[g + 1])
            first = off[g]
            c1, c2, lam, am = _at(c1a, g), _at(c2a, g), _at(lama, g), _at(ama, g)
            as_, sb, eps, cu, ws = _at(asa, g), _at(sba, g), _at(epsa, g), _at(cua, g), _at(wsa, g)
            as62 = as_ * _TWO62
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
                m, sh, sl, w = M[i], Sh[i], Sl[i], W[i]
                nhm = nwm = nhs = nws = nhw = nww = np.int64(0)
                if not fwd and po:
                    q = (am * np.float64(m)) / (np.sqrt(as62 * np.float64(sh) + as_ * np.float64(sl)) / sb + eps)
                    ok, u = _fix((cu * q) * two_fw)
                    if not ok:
                        return i, _TERM2
                    bad, w = _add(w, u)
                    if bad:
                        return i, _ADD2
                    if hw != 0:
                        ok, w, nhw = _pop(hdw[i], wdw[wbw + i] if mvw else 0, w, hw, pw, mvw)
                        if not ok:
                            return i, _UNSH2
                if st:
                    gr = np.float64(G32[i]) if g32 else G64[i]
                    if not np.isfinite(gr):
                        return i, _GRAD0
                    if lam != 0.0:    # as in momentum
                        gr = gr + lam * (np.float64(w) * ws)
                    ok, d1 = _fix((c1 * gr) * two_fm)
                    if not ok:
                        return i, _TERM0
                    ok, dh, dl = _fix2((c2 * (gr * gr)) * two_fs)
                    if not ok:
                        return i, _TERM1
                    if fwd:
                        if hm != 0:
                            m, nhm, nwm = _push(hdm[i], m, hm, mvm, kpm)
                        bad, m = _add(m, d1)
                        if bad:
                            return i, _ADD0
                        if hs != 0:   # forward2: lo's low bits to the tape, hi's low bits into lo's top
                            sl, nhs, nws = _push(hds[i], sl, hs, mvs, kps)
                            sl = sl | ((sh & ((np.int64(1) << hs) - 1)) << (LIMB - hs))
                            sh = sh >> hs
                        bad, sh, sl = _add2(sh, sl, dh, dl)
                        if bad:
                            return i, _ADD1
                    else:
                        bad, sh, sl = _sub2(sh, sl, dh, dl)
                        if bad:
                            return i, _ADD1
                        if hs != 0:   # reverse2
                            ok, h2, nhs = _pop(hds[i], wds[wbs + i] if mvs else 0, sh, hs, ps, mvs)
                            if not ok:
                                return i, _UNSH1
                            bits = h2 & ((np.int64(1) << hs) - 1)
                            sh = (h2 - bits) | (sl >> (LIMB - hs))
                            sl = ((sl << hs) & _LIMB_MASK) | bits
                        bad, m = _sub(m, d1)
                        if bad:
                            return i, _ADD0
                        if hm != 0:
                            ok, m, nhm = _pop(hdm[i], wdm[wbm + i] if mvm else 0, m, hm, pm, mvm)
                            if not ok:
                                return i, _UNSH0
                if fwd and po:
                    if hw != 0:
                        w, nhw, nww = _push(hdw[i], w, hw, mvw, kpw)
                    q = (am * np.float64(m)) / (np.sqrt(as62 * np.float64(sh) + as_ * np.float64(sl)) / sb + eps)
                    ok, u = _fix((cu * q) * two_fw)
                    if not ok:
                        return i, _TERM2
                    bad, w = _sub(w, u)
                    if bad:
                        return i, _ADD2
                if st:
                    if hm != 0:
                        hdm[i] = nhm
                        if fwd and mvm:
                            wdm[wbm + i] = nwm
                    if hs != 0:
                        hds[i] = nhs
                        if fwd and mvs:
                            wds[wbs + i] = nws
                    M[i] = m
                    Sh[i] = sh
                    Sl[i] = sl
                if po:
                    if hw != 0:
                        hdw[i] = nhw
                        if fwd and mvw:
                            wdw[wbw + i] = nww
                    W[i] = w
            lo = hi
            g += 1
        return b, 0

    @_pjit
    def _adam_chunks(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, undo, stop, err):
        L = M.shape[0]
        for c in prange(stop.shape[0]):
            a = c * CHUNK
            b = stop[c] if undo else min(L, a + CHUNK)
            s, e = _adam_range(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, a, b, undo)
            if undo:
                if s != b or e != 0:
                    err[c] = _UNDO_FAILED
            else:
                stop[c], err[c] = s, e

    @_jit
    def _adam(M, Sh, Sl, W, G32, G64, P32, P64, off, prm, ps, fm, fs, fw, tm, ts, tw, fwd, st, po):
        L = M.shape[0]
        Gn = _check_groups(off, L)
        if Sh.shape[0] != L or Sl.shape[0] != L or W.shape[0] != L or not _lanes_ok(G32, G64, P32, P64, st, L):
            raise ValueError("arrays must have one entry per lane")
        c1, c2, lam, am, as_, sb, eps, cu, ws = prm
        _check_param(c1, Gn)
        _check_param(c2, Gn)
        _check_param(lam, Gn)
        _check_param(am, Gn)
        _check_param(as_, Gn)
        _check_param(sb, Gn)
        _check_param(eps, Gn)
        _check_param(cu, Gn)
        _check_param(ws, Gn)
        _check_param(ps, Gn)
        if fm < 0 or fm > 512 or fs < 0 or fs > 512 or fw < 0 or fw > 512:
            raise ValueError("fractional bits must lie in [0, 512]")
        _check_tape(tm, off, L)
        _check_tape(ts, off, L)
        _check_tape(tw, off, L)
        nch = (L + CHUNK - 1) // CHUNK
        zero, no, yes = np.int64(0), np.bool_(False), np.bool_(True)   # not literals: one compiled variant each
        if nch == 1:
            s, e = _adam_range(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, zero, L, no)
            if e != 0:
                s2, e2 = _adam_range(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, not fwd, st, po, zero, s,
                                     yes)
                if s2 != s or e2 != 0:
                    raise RuntimeError("undoing a failed op failed (internal error)")
                return e, s
            if po:
                _write_p(W, P32, P64, off, ps, zero, L)
            return 0, -1
        stop = np.empty(nch, np.int64)
        err = np.zeros(nch, np.int64)
        _adam_chunks(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, fwd, st, po, no, stop, err)
        for c in range(nch):
            if err[c] != 0:
                e, lane = err[c], stop[c]
                err[:] = 0
                _adam_chunks(M, Sh, Sl, W, G32, G64, off, prm, fm, fs, fw, tm, ts, tw, not fwd, st, po, yes, stop, err)
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


def _w(a):
    """A read-only parameter array (e.g. a view of a frozen schedule grid) as a writeable copy: numba types
    read-only arrays apart, and each mix would compile the kernels again."""
    return a if a.flags.writeable else a.copy()


def _tape(st, h, push: bool):
    """The kernel's tape tuple; plans the tape unless no group shifts (then ``_OFF``: no tape work at all)."""
    if st is None or not _any_shift(h):
        return _OFF
    if h.dtype != _I64:
        raise TypeError(f"shifts must be int64, got {h.dtype} (no silent conversion)")
    return st.heads, st.words, _w(h), st.pending, st.plan(h, push), True


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
    tape = _tape(st, h, forward)
    if tape is not _OFF:
        e, lane = _shift(X, st.offsets, tape, forward)
        if e:
            raise KernelError(int(e), int(lane))
    st.commit(h, forward)


def momentum(st, V, W, G, P, prm, forward, state, position) -> None:
    h = prm.h
    tape = _tape(st, h, forward) if state else _OFF
    G32, G64 = _floats(G, "G", state)
    P32, P64 = _floats(P, "P", position)
    e, lane = _momentum(V, W, G32, G64, P32, P64, st.offsets, _w(prm.cv), _w(prm.cp), _w(prm.lam), prm.frac_v,
                        prm.frac_w, tape, forward, state, position)
    if e:
        raise KernelError(int(e), int(lane))
    if state:
        st.commit(h, forward)


def adam(tapes, M, S, W, G, P, prm, forward, state, position) -> None:
    stm, sts, stw = tapes
    tm, ts = (_tape(stm, prm.h1, forward), _tape(sts, prm.h2, forward)) if state else (_OFF, _OFF)
    tw = _tape(stw, prm.hw, forward) if position else _OFF
    G32, G64 = _floats(G, "G", state)
    P32, P64 = _floats(P, "P", position)
    Sh, Sl = S
    e, lane = _adam(M, Sh, Sl, W, G32, G64, P32, P64, stm.offsets,
                    (_w(prm.c1), _w(prm.c2), _w(prm.lam), _w(prm.am), _w(prm.as_), _w(prm.sb), _w(prm.eps), _w(prm.cu),
                     _w(prm.ws)), _w(prm.ps),
                    prm.frac_m, prm.frac_s, prm.frac_w, tm, ts, tw, forward, state, position)
    if e:
        raise KernelError(int(e), int(lane))
    if state:
        stm.commit(prm.h1, forward)
        sts.commit(prm.h2, forward)
    if position and stw is not None:
        stw.commit(prm.hw, forward)


def set_num_threads(k: int) -> None:
    numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
