"""Numba kernels: the reference semantics (see :mod:`revsgd.kernels.reference`) as fused per-lane loops.

Chunks run in parallel (``prange``); inside a chunk lanes go in ascending (forward) or descending (reverse)
order, so stream contents never depend on the thread count. A chunk stops at the first lane it cannot finish
(status code, lane untouched) and records its progress in ``begin`` / ``end``.

Integer divisions by n ≤ 2^16 use float64: for 0 ≤ y < 2^48, ``trunc((y + 0.5) · (1/n)) == y // n`` exactly
(the true quotient sits at least 0.5/n from an integer; the float error is below 2^-4/n). Signed floor division
of |v| < 2^50 needs one such product (error below 2^-2/n); larger |v| is split as v = a·2^32 + b and the two
halves are divided the same way.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a hard dependency, but the reference still works without it
    available = False
else:
    available = True

from ._args import kernel_args

name = "numba"

if available:
    @intrinsic
    def _u16_ptr(typingctx, addr):
        """Reinterpret an integer address as a uint16 pointer (stream buffers are owned by TapeStorage)."""
        if not isinstance(addr, types.Integer):
            return None
        ptr_t = types.CPointer(types.uint16)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr_t))

        return ptr_t(addr), codegen

    _TWO63 = 2.0**63
    _TWO47 = 1 << 47
    _TWO50 = 1 << 50

    @njit(cache=True, nogil=True)
    def _velocity_term(g, ni, twoF):
        """(code, fix((1 − n/2^16)·g)): the velocity update's integer."""
        if not np.isfinite(g):
            return 2, np.int64(0)
        d = (np.float64(65536 - ni) * 2.0**-16 * g) * twoF
        if not (d >= -_TWO63 and d < _TWO63):
            return 3, np.int64(0)
        return 0, np.int64(np.rint(d))

    @njit(cache=True, nogil=True)
    def _position_term(a, v):
        """(code, fix(α·flt(V)) = rint(α·float64(V))): the position update's integer."""
        ef = a * np.float64(v)
        if not (ef >= -_TWO63 and ef < _TWO63):
            return 5, np.int64(0)
        return 0, np.int64(np.rint(ef))

    @njit(parallel=True, cache=True, nogil=True)
    def _forward(V, W, G, alpha, n, heads, ptrs, lens, caps, begin, end, status, do_scale, has_w, has_g, twoF):
        n_step = 1 if n.shape[0] > 1 else 0
        a_step = 1 if alpha.shape[0] > 1 else 0
        for c in prange(begin.shape[0]):
            i = begin[c]
            e = end[c]
            p = _u16_ptr(ptrs[c])
            k = lens[c]
            cap = caps[c]
            code = 0
            while i < e:
                ni = np.int64(n[i * n_step])
                v = V[i]
                x = np.int64(heads[i])
                emit = False
                word = np.int64(0)
                if do_scale:
                    q = v >> 16
                    r = v & 0xFFFF
                    if x >= (ni << 16):
                        emit = True
                        word = x & 0xFFFF
                        x >>= 16
                    y = (x << 16) | r
                    xq = np.int64((np.float64(y) + 0.5) * (1.0 / ni))
                    v = q * ni + (y - xq * ni)
                    x = xq
                if has_g:
                    code, D = _velocity_term(G[i], ni, twoF)
                    if code != 0:
                        break
                    v2 = v - D
                    if ((v ^ D) & (v ^ v2)) < 0:
                        code = 4
                        break
                    v = v2
                w2 = np.int64(0)
                if has_w:
                    code, E = _position_term(alpha[i * a_step], v)
                    if code != 0:
                        break
                    w = W[i]
                    w2 = w + E
                    if ((w ^ w2) & (E ^ w2)) < 0:
                        code = 6
                        break
                if emit:
                    if k == cap:
                        code = 1
                        break
                    p[k] = np.uint16(word)
                    k += 1
                if do_scale:
                    heads[i] = np.uint32(x)
                V[i] = v
                if has_w:
                    W[i] = w2
                i += 1
            begin[c] = i
            lens[c] = k
            status[c] = code

    @njit(parallel=True, cache=True, nogil=True)
    def _reverse(V, W, G, alpha, n, heads, ptrs, lens, caps, begin, end, status, do_scale, has_w, has_g, twoF):
        n_step = 1 if n.shape[0] > 1 else 0
        a_step = 1 if alpha.shape[0] > 1 else 0
        for c in prange(begin.shape[0]):
            b = begin[c]
            i = end[c] - 1
            p = _u16_ptr(ptrs[c])
            k = lens[c]
            code = 0
            while i >= b:
                ni = np.int64(n[i * n_step])
                v = V[i]
                w2 = np.int64(0)
                if has_w:
                    code, E = _position_term(alpha[i * a_step], v)
                    if code != 0:
                        break
                    w = W[i]
                    w2 = w - E
                    if ((w ^ E) & (w ^ w2)) < 0:
                        code = 6
                        break
                if has_g:
                    code, D = _velocity_term(G[i], ni, twoF)
                    if code != 0:
                        break
                    v2 = v + D
                    if ((v ^ v2) & (D ^ v2)) < 0:
                        code = 4
                        break
                    v = v2
                x = np.int64(0)
                pop = False
                if do_scale:
                    inv = 1.0 / ni
                    if v >= -_TWO50 and v < _TWO50:  # one float product is exact here
                        z = (np.float64(v) + 0.5) * inv
                        q = np.int64(z) - (1 if z < 0.0 else 0)
                        s = v - q * ni
                    else:                            # v = a·2^32 + b: divide the halves
                        a = v >> 32
                        z = (np.float64(a) + 0.5) * inv
                        qa = np.int64(z) - (1 if z < 0.0 else 0)
                        y2 = ((a - qa * ni) << 32) | (v & 0xFFFFFFFF)
                        q2 = np.int64((np.float64(y2) + 0.5) * inv)
                        s = y2 - q2 * ni
                        q = qa * 4294967296 + q2
                    if q < -_TWO47 or q >= _TWO47:
                        code = 8
                        break
                    y = np.int64(heads[i]) * ni + s
                    x = y >> 16
                    if x < 65536:
                        if k == 0:
                            code = 7
                            break
                        pop = True
                    v = q * 65536 + (y & 0xFFFF)
                if pop:
                    k -= 1
                    x = (x << 16) | np.int64(p[k])
                if do_scale:
                    heads[i] = np.uint32(x)
                V[i] = v
                if has_w:
                    W[i] = w2
                i -= 1
            end[c] = i + 1
            lens[c] = k
            status[c] = code


def forward(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _forward(*kernel_args(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status))


def reverse(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status) -> None:
    _reverse(*kernel_args(st, V, W, G, alpha, n, do_scale, frac_bits, begin, end, status))


def set_num_threads(k: int) -> None:
    numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
