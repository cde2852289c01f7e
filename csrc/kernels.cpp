// revsgd._cpp: the ops of revsgd/kernels/vectorized.py (the specification) as fused per-lane loops.
//
// Lanes go in chunks of CHUNK lanes, chunks in parallel (OpenMP), lanes inside a chunk ascending. A chunk walks its
// lanes segment by segment (segment = chunk ∩ group) and loads the group's parameters once per segment. Every lane
// computes exactly the expressions of the specification, in its order, one IEEE rounding per operation (built
// with -ffp-contract=off, no -ffast-math), and its first error code in op order. One term is skipped where it
// cannot change a result: the coupled weight decay lam·(f64(W)·ws) where lam = 0 (adding ±0 to the gradient can only
// flip the sign of a zero, which rounds to the same integer).
//
// Tape: Python plans the op (TapeStorage.plan: per group the stack offset of the group's row, -1 for none; a push
// reserves room first, so the word buffer does not move) and commits the counters after success. A lane's row
// word sits at row + (lane − first lane of its group). Forward = push, reverse = pop (the formulas of
// tapeformat.py); a group with h = 0 does no tape work at all.
//
// Errors: a chunk stops at its first failing lane (that lane untouched) and records how far it got and the code.
// If any chunk failed, the inverse op (same parameters, same rows, the pending counts the op would have left)
// undoes the finished lanes of every chunk; the call then returns (code, lowest failing lane) and the states,
// heads and words below num_words are as before (words above num_words are scratch). P is written in a second pass
// only after every lane succeeded. Nothing was committed, so Python just raises.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t CHUNK = 16384;
constexpr double TWO63 = 9223372036854775808.0;
constexpr int LIMB = 62;                                    // two-limb states: hi·2^62 + lo, 0 <= lo < 2^62
constexpr int64_t LIMB_MASK = (int64_t(1) << LIMB) - 1;

// revsgd/kernels/codes.py
constexpr int GRAD_NONFINITE = 1, TERM_OVERFLOW = 2, ADD_OVERFLOW = 3, UNSHIFT_OVERFLOW = 4;
constexpr int code(int base, int state) { return base | (state << 4); }

std::atomic<int> g_threads{1};

// --- arithmetic of the specification ------------------------------------------------------------------------

inline double f64(int64_t x) { return static_cast<double>(x); }  // cvtsi2sd: round to nearest even

// _fix: rint(y) as int64 where y ∈ [-2^63, 2^63) (NaN fails); llrint rounds half to even (default mode).
inline bool fix(double y, int64_t &out) {
    if (!(y >= -TWO63 && y < TWO63)) return false;
    out = static_cast<int64_t>(std::llrint(y));
    return true;
}

// fix2(y) for y >= 0: (yh, yl) with yh·2^62 + yl = rint(y); fails outside [0, 2^125) and for NaN.
inline bool fix2(double y, int64_t &yh, int64_t &yl) {
    if (!(y >= 0.0 && y < 0x1p125)) return false;
    const double f = std::floor(y * 0x1p-62);
    yh = static_cast<int64_t>(std::llrint(f));
    yl = static_cast<int64_t>(std::llrint(y - f * 0x1p62));  // exact subtraction
    return true;
}

// int64 arithmetic that wraps (as NumPy's does), without C++'s signed-overflow UB.
inline int64_t wadd(int64_t a, int64_t b) { return static_cast<int64_t>(uint64_t(a) + uint64_t(b)); }
inline int64_t wsub(int64_t a, int64_t b) { return static_cast<int64_t>(uint64_t(a) - uint64_t(b)); }

// _add2: (hi, lo) ± (dh, dl) with the carry (borrow) between the limbs; false where hi leaves int64.
template <bool ADD>
inline bool add2(int64_t &hi, int64_t &lo, int64_t dh, int64_t dl) {
    const int64_t lo2 = ADD ? wadd(lo, dl) : wsub(lo, dl);
    const int64_t c = lo2 >> LIMB;
    const bool over = ADD ? __builtin_add_overflow(hi, wadd(dh, c), &hi) : __builtin_sub_overflow(hi, wsub(dh, c), &hi);
    lo = lo2 & LIMB_MASK;
    return !over;
}

// --- the tape -----------------------------------------------------------------------------------------------

struct TapeArgs {           // one tape of the op; on == false: no group shifts (rows is None), no tape work
    uint16_t *heads = nullptr;
    uint16_t *words = nullptr;
    const int64_t *h = nullptr, *pend = nullptr, *rows = nullptr;
    int64_t hs = 0;         // stride of h (0: one value for every group)
    bool on = false;
};

// A tape's work on one segment (lanes of group g). h == 0: none.
struct Seg {
    int h = 0, p = 0, keep = 0;
    bool moves = false;
    uint64_t mask = 0, keepmask = 0;
    int64_t wbase = 0;      // word of lane i: words[wbase + i]
    uint16_t *heads = nullptr, *words = nullptr;
};

// push == true: this kernel pushes (forward op, or the undo of a reverse op). undo == true: the pending count is
// the one the undone op would have left (it was never committed).
inline Seg make_seg(const TapeArgs &T, int64_t g, int64_t first, bool push, bool undo) {
    Seg s;
    if (!T.on) return s;
    s.h = static_cast<int>(T.h[g * T.hs]);
    if (s.h == 0) return s;
    int p = static_cast<int>(T.pend[g]);
    const int64_t row = T.rows[g];
    s.moves = row >= 0;
    if (undo) p = push ? (s.moves ? p + 16 - s.h : p - s.h) : (s.moves ? p + s.h - 16 : p + s.h);
    s.p = p;
    s.mask = (uint64_t(1) << s.h) - 1;
    s.keep = push && s.moves ? p + s.h - 16 : 0;   // bits left in the head after a push emits its row
    s.keepmask = (uint64_t(1) << s.keep) - 1;
    s.wbase = row - first;
    s.heads = T.heads;
    s.words = T.words;
    return s;
}

struct Pushed { uint16_t head, word; };

// _Shift.forward on lane i: X >> h; the new head (and row word) are returned, stored by store_push.
inline int64_t push_lane(const Seg &s, int64_t i, int64_t x, Pushed &out) {
    const uint64_t c = (uint64_t(s.heads[i]) << s.h) | (uint64_t(x) & s.mask);
    if (s.moves) {
        out.word = static_cast<uint16_t>(c >> s.keep);
        out.head = static_cast<uint16_t>(c & s.keepmask);
    } else {
        out.head = static_cast<uint16_t>(c);
    }
    return x >> s.h;
}

inline void store_push(const Seg &s, int64_t i, const Pushed &v) {
    s.heads[i] = v.head;
    if (s.moves) s.words[s.wbase + i] = v.word;
}

// _Shift.reverse on lane i: (X << h) | the h bits recorded last; false where X << h leaves int64.
inline bool pop_lane(const Seg &s, int64_t i, int64_t &x, uint16_t &head) {
    const int64_t top = x >> (63 - s.h);
    if (top != 0 && top != -1) return false;
    uint64_t c = s.heads[i];
    if (s.moves) c |= uint64_t(s.words[s.wbase + i]) << s.p;
    head = static_cast<uint16_t>(c >> s.h);
    x = static_cast<int64_t>((uint64_t(x) << s.h) | (c & s.mask));
    return true;
}

// _Shift.forward2 on lane i: the two-limb value >> h; lo's low h bits go to the tape, hi's into lo's top.
inline void push2_lane(const Seg &s, int64_t i, int64_t &hi, int64_t &lo, Pushed &out) {
    lo = push_lane(s, i, lo, out) | static_cast<int64_t>(uint64_t(hi & int64_t(s.mask)) << (LIMB - s.h));
    hi >>= s.h;
}

// _Shift.reverse2 on lane i: (hi·2^62 + lo) << h | the bits recorded last; false where hi << h leaves int64.
inline bool pop2_lane(const Seg &s, int64_t i, int64_t &hi, int64_t &lo, uint16_t &head) {
    int64_t h2 = hi;
    if (!pop_lane(s, i, h2, head)) return false;
    const int64_t bits = h2 & int64_t(s.mask);
    hi = wsub(h2, bits) | (lo >> (LIMB - s.h));
    lo = static_cast<int64_t>((uint64_t(lo) << s.h) & uint64_t(LIMB_MASK)) | bits;
    return true;
}

// Group of lane a: the last g with off[g] <= a.
inline int64_t group_of(const int64_t *off, int64_t G, int64_t a) {
    return static_cast<int64_t>(std::upper_bound(off, off + G + 1, a) - off) - 1;
}

// --- per-group parameters -----------------------------------------------------------------------------------

struct Param {              // a per-group float64 parameter: G values or one for all (stride 0)
    const double *p = nullptr;
    int64_t s = 0;
    double operator[](int64_t g) const { return p[g * s]; }
};

// --- shift ---------------------------------------------------------------------------------------------------

struct ShiftArgs {
    int64_t *X;
    const int64_t *off;
    int64_t G;
    TapeArgs T;
};

template <bool FWD>
int64_t shift_range(const ShiftArgs &A, int64_t a, int64_t b, bool undo, int &err) {
    for (int64_t g = group_of(A.off, A.G, a), lo = a; lo < b; ++g) {
        const int64_t hi = std::min(b, A.off[g + 1]);
        const Seg s = make_seg(A.T, g, A.off[g], FWD, undo);
        if (s.h != 0) {
            for (int64_t i = lo; i < hi; ++i) {
                int64_t x = A.X[i];
                if (FWD) {
                    Pushed pu;
                    x = push_lane(s, i, x, pu);
                    store_push(s, i, pu);
                } else {
                    uint16_t head;
                    if (!pop_lane(s, i, x, head)) { err = code(UNSHIFT_OVERFLOW, 0); return i; }
                    s.heads[i] = head;
                }
                A.X[i] = x;
            }
        }
        lo = hi;
    }
    return b;
}

// --- momentum ------------------------------------------------------------------------------------------------

struct MomArgs {
    int64_t *V, *W;
    const void *G;
    const int64_t *off;
    int64_t G_;
    Param cv, cp, lam;
    double two_fv, sv, ws;
    TapeArgs T;
};

template <bool FWD, bool ST, bool PO, bool TP, class GT>
int64_t mom_seg(const MomArgs &A, int64_t lo, int64_t hi, double cv, double cp, double lam, const Seg &s,
                int &err) {
    const GT *Gp = static_cast<const GT *>(A.G);
    for (int64_t i = lo; i < hi; ++i) {
        int64_t v = A.V[i], w = A.W[i];
        Pushed pu{0, 0};
        uint16_t head = 0;
        if (!FWD && PO) {
            int64_t e;
            if (!fix((cp * f64(v)) * A.sv, e)) { err = code(TERM_OVERFLOW, 1); return i; }
            if (__builtin_sub_overflow(w, e, &w)) { err = code(ADD_OVERFLOW, 1); return i; }
        }
        if (ST) {
            double g = static_cast<double>(Gp[i]);
            if (!std::isfinite(g)) { err = code(GRAD_NONFINITE, 0); return i; }
            if (lam != 0.0) g = g + lam * (f64(w) * A.ws);   // lam = 0: g + ±0 rounds to the same integer below
            int64_t d;
            if (!fix((cv * g) * A.two_fv, d)) { err = code(TERM_OVERFLOW, 0); return i; }
            if (FWD) {
                if (TP) v = push_lane(s, i, v, pu);
                if (__builtin_add_overflow(v, d, &v)) { err = code(ADD_OVERFLOW, 0); return i; }
            } else {
                if (__builtin_sub_overflow(v, d, &v)) { err = code(ADD_OVERFLOW, 0); return i; }
                if (TP && !pop_lane(s, i, v, head)) { err = code(UNSHIFT_OVERFLOW, 0); return i; }
            }
        }
        if (FWD && PO) {
            int64_t e;
            if (!fix((cp * f64(v)) * A.sv, e)) { err = code(TERM_OVERFLOW, 1); return i; }
            if (__builtin_add_overflow(w, e, &w)) { err = code(ADD_OVERFLOW, 1); return i; }
        }
        if (ST) {
            if (TP) {
                if (FWD) store_push(s, i, pu);
                else s.heads[i] = head;
            }
            A.V[i] = v;
        }
        if (PO) A.W[i] = w;
    }
    return hi;
}

template <bool FWD, bool ST, bool PO, class GT>
int64_t mom_range(const MomArgs &A, int64_t a, int64_t b, bool undo, int &err) {
    for (int64_t g = group_of(A.off, A.G_, a), lo = a; lo < b; ++g) {
        const int64_t hi = std::min(b, A.off[g + 1]);
        const double cv = A.cv[g], cp = A.cp[g], lam = A.lam[g];
        const Seg s = ST ? make_seg(A.T, g, A.off[g], FWD, undo) : Seg{};
        const int64_t stop = s.h != 0 ? mom_seg<FWD, ST, PO, ST, GT>(A, lo, hi, cv, cp, lam, s, err)
                                      : mom_seg<FWD, ST, PO, false, GT>(A, lo, hi, cv, cp, lam, s, err);
        if (stop < hi) return stop;
        lo = hi;
    }
    return b;
}

// --- adam ----------------------------------------------------------------------------------------------------

struct AdamArgs {
    int64_t *M, *Sh, *Sl, *W;   // S = Sh·2^62 + Sl
    const void *G;
    const int64_t *off;
    int64_t G_;
    Param c1, c2, lam, am, as_, sb, eps, cu, ws;
    double two_fm, two_fs, two_fw;
    TapeArgs Tm, Ts, Tw;
};

template <bool FWD, bool ST, bool PO, class GT>
int64_t adam_range(const AdamArgs &A, int64_t a, int64_t b, bool undo, int &err) {
    const GT *Gp = static_cast<const GT *>(A.G);
    for (int64_t g = group_of(A.off, A.G_, a), lo = a; lo < b; ++g) {
        const int64_t hi = std::min(b, A.off[g + 1]), first = A.off[g];
        const double c1 = A.c1[g], c2 = A.c2[g], lam = A.lam[g], am = A.am[g], as = A.as_[g], sb = A.sb[g],
                     eps = A.eps[g], cu = A.cu[g], ws = A.ws[g], as62 = as * 0x1p62;
        const Seg sm = ST ? make_seg(A.Tm, g, first, FWD, undo) : Seg{};
        const Seg ss = ST ? make_seg(A.Ts, g, first, FWD, undo) : Seg{};
        const Seg sw = PO ? make_seg(A.Tw, g, first, FWD, undo) : Seg{};
        for (int64_t i = lo; i < hi; ++i) {
            int64_t m = A.M[i], sh = A.Sh[i], sl = A.Sl[i], w = A.W[i];
            Pushed pm{0, 0}, pss{0, 0}, pw{0, 0};
            uint16_t hm = 0, hs = 0, hw = 0;
            if (!FWD && PO) {
                const double q = (am * f64(m)) / (std::sqrt(as62 * f64(sh) + as * f64(sl)) / sb + eps);
                int64_t u;
                if (!fix((cu * q) * A.two_fw, u)) { err = code(TERM_OVERFLOW, 2); return i; }
                if (__builtin_add_overflow(w, u, &w)) { err = code(ADD_OVERFLOW, 2); return i; }
                if (sw.h && !pop_lane(sw, i, w, hw)) { err = code(UNSHIFT_OVERFLOW, 2); return i; }
            }
            if (ST) {
                double gr = static_cast<double>(Gp[i]);
                if (!std::isfinite(gr)) { err = code(GRAD_NONFINITE, 0); return i; }
                if (lam != 0.0) gr = gr + lam * (f64(w) * ws);   // as in momentum
                int64_t d1, dh, dl;
                if (!fix((c1 * gr) * A.two_fm, d1)) { err = code(TERM_OVERFLOW, 0); return i; }
                if (!fix2((c2 * (gr * gr)) * A.two_fs, dh, dl)) { err = code(TERM_OVERFLOW, 1); return i; }
                if (FWD) {
                    if (sm.h) m = push_lane(sm, i, m, pm);
                    if (__builtin_add_overflow(m, d1, &m)) { err = code(ADD_OVERFLOW, 0); return i; }
                    if (ss.h) push2_lane(ss, i, sh, sl, pss);
                    if (!add2<true>(sh, sl, dh, dl)) { err = code(ADD_OVERFLOW, 1); return i; }
                } else {
                    if (!add2<false>(sh, sl, dh, dl)) { err = code(ADD_OVERFLOW, 1); return i; }
                    if (ss.h && !pop2_lane(ss, i, sh, sl, hs)) { err = code(UNSHIFT_OVERFLOW, 1); return i; }
                    if (__builtin_sub_overflow(m, d1, &m)) { err = code(ADD_OVERFLOW, 0); return i; }
                    if (sm.h && !pop_lane(sm, i, m, hm)) { err = code(UNSHIFT_OVERFLOW, 0); return i; }
                }
            }
            if (FWD && PO) {
                if (sw.h) w = push_lane(sw, i, w, pw);
                const double q = (am * f64(m)) / (std::sqrt(as62 * f64(sh) + as * f64(sl)) / sb + eps);
                int64_t u;
                if (!fix((cu * q) * A.two_fw, u)) { err = code(TERM_OVERFLOW, 2); return i; }
                if (__builtin_sub_overflow(w, u, &w)) { err = code(ADD_OVERFLOW, 2); return i; }
            }
            if (ST) {
                if (FWD) {
                    if (sm.h) store_push(sm, i, pm);
                    if (ss.h) store_push(ss, i, pss);
                } else {
                    if (sm.h) sm.heads[i] = hm;
                    if (ss.h) ss.heads[i] = hs;
                }
                A.M[i] = m;
                A.Sh[i] = sh;
                A.Sl[i] = sl;
            }
            if (PO) {
                if (sw.h) {
                    if (FWD) store_push(sw, i, pw);
                    else sw.heads[i] = hw;
                }
                A.W[i] = w;
            }
        }
        lo = hi;
    }
    return b;
}

// --- driver --------------------------------------------------------------------------------------------------

template <class Args>
using RangeFn = int64_t (*)(const Args &, int64_t, int64_t, bool, int &);

// The P output of lanes [a, b): P = f64(W)·scale[group], written only once every lane succeeded (on error the
// spec leaves P untouched, and its old values need not equal any function of W).
struct POut {
    void *P = nullptr;
    int kind = 2;           // 0 float32, 1 float64, 2 none
    const int64_t *W = nullptr, *off = nullptr;
    int64_t G = 0;
    Param scale;
};

template <class PT>
void write_p_range(const POut &O, int64_t a, int64_t b) {
    PT *P = static_cast<PT *>(O.P);
    for (int64_t g = group_of(O.off, O.G, a), lo = a; lo < b; ++g) {
        const int64_t hi = std::min(b, O.off[g + 1]);
        const double c = O.scale[g];
        for (int64_t i = lo; i < hi; ++i) P[i] = static_cast<PT>(f64(O.W[i]) * c);
        lo = hi;
    }
}

inline void write_p(const POut &O, int64_t a, int64_t b) {
    if (O.kind == 0) write_p_range<float>(O, a, b);
    else if (O.kind == 1) write_p_range<double>(O, a, b);
}

// Runs `run` over every chunk; on error undoes every chunk's finished lanes with `inverse` and returns (code,
// lowest failing lane), else writes P and returns None.
template <class Args>
py::object drive(const Args &A, int64_t L, RangeFn<Args> run, RangeFn<Args> inverse, const POut &out) {
    const int64_t nch = (L + CHUNK - 1) / CHUNK;
    int bad_code = 0;
    int64_t bad_lane = -1;
    bool undo_failed = false;
    {
        py::gil_scoped_release nogil;
        if (nch == 1) {  // a small model: no parallel region (it would cost more than the work)
            int err = 0;
            const int64_t stop = run(A, 0, L, false, err);
            if (err) {
                int e2 = 0;
                undo_failed = inverse(A, 0, stop, true, e2) != stop || e2;
                bad_code = err;
                bad_lane = stop;
            } else {
                write_p(out, 0, L);
            }
        } else {
            std::vector<int64_t> stop(nch);
            std::vector<int> err(nch, 0);
            const int nt = static_cast<int>(std::min<int64_t>(g_threads.load(), nch));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
            for (int64_t c = 0; c < nch; ++c) stop[c] = run(A, c * CHUNK, std::min(L, (c + 1) * CHUNK), false, err[c]);
            int64_t first = -1;
            for (int64_t c = 0; c < nch && first < 0; ++c)
                if (err[c]) first = c;
            if (first >= 0) {
                bad_code = err[first];
                bad_lane = stop[first];
                std::vector<char> failed(nch, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
                for (int64_t c = 0; c < nch; ++c) {
                    int e2 = 0;
                    failed[c] = inverse(A, c * CHUNK, stop[c], true, e2) != stop[c] || e2;
                }
                for (char f : failed) undo_failed |= f != 0;
            } else if (out.kind != 2) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
                for (int64_t c = 0; c < nch; ++c) write_p(out, c * CHUNK, std::min(L, (c + 1) * CHUNK));
            }
        }
    }
    if (undo_failed) throw std::runtime_error("revsgd._cpp: undoing a failed op failed (internal error)");
    if (bad_lane < 0) return py::none();
    return py::make_tuple(bad_code, bad_lane);
}

// --- argument checks (strict: no silent conversion) ----------------------------------------------------------

template <class T>
T *data(py::handle h, const char *what, int64_t n, bool write) {
    if (!py::isinstance<py::array_t<T, 0>>(h))
        throw py::type_error(std::string(what) + ": expected a numpy array of dtype " +
                             py::str(py::dtype::of<T>()).cast<std::string>() + " (no silent conversion)");
    auto a = py::reinterpret_borrow<py::array>(h);
    if (a.ndim() != 1 || (n >= 0 && a.shape(0) != n))
        throw py::value_error(std::string(what) + ": expected a 1-D array of length " + std::to_string(n));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + ": must be contiguous");
    if (write && !a.writeable()) throw py::value_error(std::string(what) + ": must be writeable");
    return static_cast<T *>(const_cast<void *>(a.data()));
}

// A float array of length n: kind 0 = float32, 1 = float64.
void *float_data(py::handle h, const char *what, int64_t n, bool write, int &kind) {
    if (py::isinstance<py::array_t<float, 0>>(h)) {
        kind = 0;
        return data<float>(h, what, n, write);
    }
    kind = 1;
    return data<double>(h, what, n, write);
}

inline py::object attr(py::handle o, const char *name) { return o.attr(name); }

// A per-group array of G values or one value for all groups (read-only; any stride); G < 0: any length.
template <class T>
const T *group_data(py::handle h, const char *what, int64_t G, int64_t &stride) {
    if (!py::isinstance<py::array_t<T, 0>>(h))
        throw py::type_error(std::string(what) + ": expected a numpy array of dtype " +
                             py::str(py::dtype::of<T>()).cast<std::string>() + " (no silent conversion)");
    auto a = py::reinterpret_borrow<py::array>(h);
    if (a.ndim() != 1 || (G >= 0 && a.shape(0) != G && a.shape(0) != 1) || a.shape(0) < 1)
        throw py::value_error(std::string(what) + ": expected shape (" + std::to_string(G) + ",) or (1,)");
    stride = a.shape(0) == 1 ? 0 : a.strides(0) / static_cast<py::ssize_t>(sizeof(T));
    if (a.shape(0) != 1 && a.strides(0) != stride * static_cast<py::ssize_t>(sizeof(T)))
        throw py::value_error(std::string(what) + ": misaligned stride");
    return static_cast<const T *>(a.data());
}

Param param(py::handle prm, const char *name, int64_t G) {
    Param p;
    p.p = group_data<double>(attr(prm, name), name, G, p.s);
    return p;
}

int frac(py::handle prm, const char *name) {
    const int f = attr(prm, name).cast<int>();
    if (f < 0 || f > 512) throw py::value_error(std::string(name) + " must lie in [0, 512]");
    return f;
}

struct Groups {
    const int64_t *off;
    int64_t G, L;
};

// The lane groups of a tape (offsets: strictly increasing from 0 to num_lanes; checked, they guard memory).
Groups groups_of(py::handle st) {
    py::object o = attr(st, "offsets");
    auto a = py::reinterpret_borrow<py::array>(o);
    Groups g;
    g.off = data<int64_t>(o, "offsets", -1, false);
    g.G = a.shape(0) - 1;
    if (g.G < 1) throw py::value_error("offsets: at least one group");
    g.L = g.off[g.G];
    if (g.off[0] != 0) throw py::value_error("offsets must start at 0");
    for (int64_t k = 0; k < g.G; ++k)
        if (g.off[k + 1] <= g.off[k]) throw py::value_error("offsets must increase strictly");
    return g;
}

// One tape's arguments: rows None = no group shifts (h all zero), no tape work.
TapeArgs tape_args(py::handle st, py::handle h, py::handle rows, const Groups &g, const char *what) {
    TapeArgs T;
    if (st.is_none() || rows.is_none()) return T;
    Groups g2 = groups_of(st);
    if (g2.G != g.G || g2.L != g.L || !std::equal(g.off, g.off + g.G + 1, g2.off))
        throw py::value_error(std::string(what) + ": the tapes of one op must have the same groups");
    T.h = group_data<int64_t>(h, what, g.G, T.hs);
    T.heads = data<uint16_t>(attr(st, "heads"), "heads", g.L, true);
    py::object words = attr(st, "words");
    T.words = data<uint16_t>(words, "words", -1, true);
    const int64_t cap = py::reinterpret_borrow<py::array>(words).shape(0);
    T.pend = data<int64_t>(attr(st, "pending"), "pending", g.G, false);
    T.rows = data<int64_t>(rows, "rows", g.G, false);
    for (int64_t k = 0; k < g.G; ++k) {
        const int64_t hk = T.h[k * T.hs], pk = T.pend[k], rk = T.rows[k], size = g.off[k + 1] - g.off[k];
        if (hk < 0 || hk > 16 || pk < 0 || pk > 15) throw py::value_error("shift or pending count out of range");
        if (rk >= 0 && (hk == 0 || rk > cap - size)) throw py::value_error("tape row outside the word buffer");
    }
    T.on = true;
    return T;
}

template <class T>
struct Tag { using type = T; };

template <class F>
auto with_bool(bool b, F &&f) { return b ? f(std::true_type{}) : f(std::false_type{}); }

template <class F>
auto with_grad(int kind, F &&f) { return kind == 0 ? f(Tag<float>{}) : f(Tag<double>{}); }


// --- the ops -------------------------------------------------------------------------------------------------

py::object shift(py::handle st, py::handle X, py::handle h, py::handle rows, bool forward) {
    ShiftArgs A;
    const Groups g = groups_of(st);
    A.off = g.off;
    A.G = g.G;
    A.X = data<int64_t>(X, "X", g.L, true);
    A.T = tape_args(st, h, rows, g, "h");
    if (!A.T.on) return py::none();
    return forward ? drive<ShiftArgs>(A, g.L, &shift_range<true>, &shift_range<false>, POut{})
                   : drive<ShiftArgs>(A, g.L, &shift_range<false>, &shift_range<true>, POut{});
}

py::object momentum(py::handle st, py::handle V, py::handle W, py::handle G, py::handle P, py::handle prm,
                    py::handle rows, bool forward, bool state, bool position) {
    if (!state && !position) return py::none();
    MomArgs A;
    const Groups g = groups_of(st);
    A.off = g.off;
    A.G_ = g.G;
    A.V = data<int64_t>(V, "V", g.L, state);
    A.W = data<int64_t>(W, "W", g.L, position);
    if (A.V == A.W) throw py::value_error("V and W must be different arrays");
    int gk = 1;
    A.G = state ? float_data(G, "G", g.L, false, gk) : nullptr;
    A.cv = param(prm, "cv", g.G);
    A.cp = param(prm, "cp", g.G);
    A.lam = param(prm, "lam", g.G);
    const int fv = frac(prm, "frac_v"), fw = frac(prm, "frac_w");
    A.two_fv = std::ldexp(1.0, fv);   // the spec's 2.0**frac_v, 2.0**(frac_w - frac_v), 2.0**-frac_w: exact
    A.sv = std::ldexp(1.0, fw - fv);
    A.ws = std::ldexp(1.0, -fw);
    if (state) A.T = tape_args(st, attr(prm, "h"), rows, g, "h");
    auto pick = [&](bool fwd) {
        return with_bool(fwd, [&](auto F) {
            return with_bool(state, [&](auto S) {
                return with_bool(position, [&](auto Q) {
                    return with_grad(gk, [&](auto GT) -> RangeFn<MomArgs> {
                        return &mom_range<decltype(F)::value, decltype(S)::value, decltype(Q)::value,
                                          typename decltype(GT)::type>;
                    });
                });
            });
        });
    };
    POut out;
    if (position && !P.is_none()) {
        out.P = float_data(P, "P", g.L, true, out.kind);
        out.W = A.W; out.off = g.off; out.G = g.G;
        out.scale = Param{&A.ws, 0};
    }
    return drive<MomArgs>(A, g.L, pick(forward), pick(!forward), out);
}

py::object adam(py::tuple tapes, py::handle M, py::handle S, py::handle W, py::handle G, py::handle P,
                py::handle prm, py::tuple rows, bool forward, bool state, bool position) {
    if (tapes.size() != 3 || rows.size() != 3) throw py::value_error("adam: three tapes and three row plans");
    if (!state && !position) return py::none();
    AdamArgs A;
    const Groups g = groups_of(tapes[0]);
    A.off = g.off;
    A.G_ = g.G;
    if (!py::isinstance<py::tuple>(S) || py::len(S) != 2) throw py::type_error("S must be a tuple (hi, lo)");
    A.M = data<int64_t>(M, "M", g.L, state);
    A.Sh = data<int64_t>(S[py::int_(0)], "S hi", g.L, state);
    A.Sl = data<int64_t>(S[py::int_(1)], "S lo", g.L, state);
    A.W = data<int64_t>(W, "W", g.L, position);
    const int64_t *all[] = {A.M, A.Sh, A.Sl, A.W};
    for (int a = 0; a < 4; ++a)
        for (int b = a + 1; b < 4; ++b)
            if (all[a] == all[b]) throw py::value_error("M, S (hi, lo) and W must be different arrays");
    int gk = 1;
    A.G = state ? float_data(G, "G", g.L, false, gk) : nullptr;
    A.c1 = param(prm, "c1", g.G);
    A.c2 = param(prm, "c2", g.G);
    A.lam = param(prm, "lam", g.G);
    A.am = param(prm, "am", g.G);
    A.as_ = param(prm, "as_", g.G);
    A.sb = param(prm, "sb", g.G);
    A.eps = param(prm, "eps", g.G);
    A.cu = param(prm, "cu", g.G);
    A.ws = param(prm, "ws", g.G);
    A.two_fm = std::ldexp(1.0, frac(prm, "frac_m"));
    A.two_fs = std::ldexp(1.0, frac(prm, "frac_s"));
    A.two_fw = std::ldexp(1.0, frac(prm, "frac_w"));
    if (state) {
        A.Tm = tape_args(tapes[0], attr(prm, "h1"), rows[0], g, "h1");
        A.Ts = tape_args(tapes[1], attr(prm, "h2"), rows[1], g, "h2");
    }
    if (position) A.Tw = tape_args(tapes[2], attr(prm, "hw"), rows[2], g, "hw");
    auto pick = [&](bool fwd) {
        return with_bool(fwd, [&](auto F) {
            return with_bool(state, [&](auto St) {
                return with_bool(position, [&](auto Q) {
                    return with_grad(gk, [&](auto GT) -> RangeFn<AdamArgs> {
                        return &adam_range<decltype(F)::value, decltype(St)::value, decltype(Q)::value,
                                           typename decltype(GT)::type>;
                    });
                });
            });
        });
    };
    POut out;
    if (position && !P.is_none()) {
        out.P = float_data(P, "P", g.L, true, out.kind);
        out.W = A.W; out.off = g.off; out.G = g.G;
        out.scale = param(prm, "ps", g.G);
    }
    return drive<AdamArgs>(A, g.L, pick(forward), pick(!forward), out);
}

// Whether any shift of h (int64, 1-D) is non-zero: decides whether the op plans tape work at all.
bool any_shift(py::handle h) {
    int64_t s;
    const int64_t *p = group_data<int64_t>(h, "h", -1, s);
    const int64_t n = py::reinterpret_borrow<py::array>(h).shape(0);
    for (int64_t k = 0; k < n; ++k)
        if (p[k * s] != 0) return true;
    return false;
}

}  // namespace

PYBIND11_MODULE(_cpp, mod) {
    mod.doc() = "revsgd kernels: shift, momentum and adam of revsgd/kernels/vectorized.py as fused loops";
    mod.def("shift", &shift, py::arg("st"), py::arg("X"), py::arg("h"), py::arg("rows"), py::arg("forward"));
    mod.def("momentum", &momentum);
    mod.def("adam", &adam);
    mod.def("any_shift", &any_shift);
    mod.def("set_num_threads", [](int k) {
        if (k < 1) throw py::value_error("number of threads must be at least 1");
        g_threads.store(k);
    });
    mod.def("get_num_threads", []() { return g_threads.load(); });
    mod.attr("CHUNK") = CHUNK;
#ifdef _OPENMP
    mod.attr("openmp") = true;
#else
    mod.attr("openmp") = false;
#endif
}
