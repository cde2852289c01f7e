// revsgd._cpp: fused exact momentum / lost-bits tape kernels (the semantics of revsgd/kernels/reference.py).
//
// Invariants (DESIGN.md §3):
//   head x ∈ [2^16, 2^32) per lane; one LIFO uint16 stream per chunk of CHUNK lanes.
//   forward (ascending lanes):  V = exact_scale(V, n); V -= fix((1-n/2^16)·G); W += fix(α·flt(V))
//   reverse (descending lanes): W -= fix(α·flt(V)); V += fix((1-n/2^16)·G); V = exact_unscale(V, n)
// A chunk stops at the first lane it cannot finish (that lane untouched), writes its progress to begin/end and
// a status code; the Python driver resumes (FULL) or undoes finished lanes with the inverse kernel (errors).
// Built with -ffp-contract=off and no -march: every product is one IEEE rounding, as in NumPy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

enum Code : int8_t {
    OK = 0, FULL = 1, GRAD_NONFINITE = 2, VEL_FIX_OVERFLOW = 3, VEL_OVERFLOW = 4,
    POS_FIX_OVERFLOW = 5, POS_OVERFLOW = 6, TAPE_EMPTY = 7, UNSCALE_OVERFLOW = 8
};

constexpr double TWO63 = 9223372036854775808.0;
constexpr int64_t TWO47 = int64_t(1) << 47;

inline bool in_int64(double y) { return y >= -TWO63 && y < TWO63; }  // false for NaN

// rint (ties to even) of a double already known to lie in [-2^63, 2^63): llrint uses the default rounding mode.
inline int64_t rint64(double y) { return static_cast<int64_t>(std::llrint(y)); }

// y div n for 0 <= y < 2^48 and 1 <= n <= 2^16: trunc((y + 0.5)·(1/n)) is exact there.
inline int64_t div48(int64_t y, double inv_n) {
    return static_cast<int64_t>((static_cast<double>(y) + 0.5) * inv_n);
}

// floor(v / n) for any int64 v. For |v| < 2^50 one float product is exact (the quotient sits at least 0.5/n
// from an integer, the float error is below 2^-2/n); otherwise split v = a·2^32 + b and divide the halves.
inline int64_t floordiv64(int64_t v, int64_t n, double inv_n, int64_t &rem) {
    if (v >= -(int64_t(1) << 50) && v < (int64_t(1) << 50)) {
        const double z = (static_cast<double>(v) + 0.5) * inv_n;
        const int64_t q = static_cast<int64_t>(z) - (z < 0.0);
        rem = v - q * n;
        return q;
    }
    const int64_t a = v >> 32;  // arithmetic shift: floor
    const double z = (static_cast<double>(a) + 0.5) * inv_n;
    const int64_t qa = static_cast<int64_t>(z) - (z < 0.0);  // z is never an integer: trunc-1 is floor below 0
    const int64_t y2 = ((a - qa * n) << 32) | (v & 0xFFFFFFFFLL);
    const int64_t q2 = div48(y2, inv_n);
    rem = y2 - q2 * n;
    return qa * 4294967296LL + q2;
}

// d = fix((1 − n/2^16)·g), the velocity update's integer.
inline int8_t velocity_term(double g, double cg, double twoF, int64_t &d) {
    if (!std::isfinite(g)) return GRAD_NONFINITE;
    const double y = (cg * g) * twoF;
    if (!in_int64(y)) return VEL_FIX_OVERFLOW;
    d = rint64(y);
    return OK;
}

// e = fix(α·flt(V)) = rint(α·float64(V)), the position update's integer.
inline int8_t position_term(double a, int64_t v, int64_t &e) {
    const double y = a * static_cast<double>(v);
    if (!in_int64(y)) return POS_FIX_OVERFLOW;
    e = rint64(y);
    return OK;
}

struct Args {
    int64_t *V; int64_t *W; const double *G; const double *alpha; const int64_t *n;
    uint32_t *heads; const uint64_t *ptrs; int64_t *lens; const int64_t *caps;
    int64_t *begin; int64_t *end; int8_t *status;
    int64_t nchunks; double twoF;
};

// A lane's n, 1/n, 1 − n/2^16 and α: loaded once per chunk when shared by all lanes (NL / AL false).
template <bool NL, bool AL>
struct LaneParams {
    int64_t n;
    double inv, cg, a;
    explicit LaneParams(const Args &A) : a(A.alpha[0]) { set_n(A.n[0]); }
    void set_n(int64_t v) {
        n = v;
        inv = 1.0 / static_cast<double>(v);
        cg = static_cast<double>(65536 - v) * 0x1p-16;
    }
    void load(const Args &A, int64_t i) {
        if (NL) set_n(A.n[i]);
        if (AL) a = A.alpha[i];
    }
};

template <bool SCALE, bool HW, bool HG, bool NL, bool AL>
void forward_impl(const Args &A) {
#pragma omp parallel for schedule(dynamic, 1) if (A.nchunks > 1)
    for (int64_t c = 0; c < A.nchunks; ++c) {
        int64_t i = A.begin[c];
        const int64_t e = A.end[c];
        uint16_t *p = reinterpret_cast<uint16_t *>(A.ptrs[c]);
        int64_t k = A.lens[c];
        const int64_t cap = A.caps[c];
        int8_t code = OK;
        LaneParams<NL, AL> P(A);
        for (; i < e; ++i) {
            P.load(A, i);
            int64_t v = A.V[i];
            int64_t x = 0, word = 0;
            bool emit = false;
            if (SCALE) {
                x = A.heads[i];
                const int64_t q = v >> 16, r = v & 0xFFFF;
                if (x >= (P.n << 16)) { emit = true; word = x & 0xFFFF; x >>= 16; }
                const int64_t y = (x << 16) | r;
                const int64_t xq = div48(y, P.inv);
                v = q * P.n + (y - xq * P.n);
                x = xq;
            }
            if (HG) {
                int64_t d;
                if ((code = velocity_term(A.G[i], P.cg, A.twoF, d)) != OK) break;
                if (__builtin_sub_overflow(v, d, &v)) { code = VEL_OVERFLOW; break; }
            }
            int64_t w2 = 0;
            if (HW) {
                int64_t e;
                if ((code = position_term(P.a, v, e)) != OK) break;
                if (__builtin_add_overflow(A.W[i], e, &w2)) { code = POS_OVERFLOW; break; }
            }
            if (emit) {
                if (k == cap) { code = FULL; break; }
                p[k++] = static_cast<uint16_t>(word);
            }
            if (SCALE) A.heads[i] = static_cast<uint32_t>(x);
            A.V[i] = v;
            if (HW) A.W[i] = w2;
        }
        A.begin[c] = i;
        A.lens[c] = k;
        A.status[c] = code;
    }
}

template <bool SCALE, bool HW, bool HG, bool NL, bool AL>
void reverse_impl(const Args &A) {
#pragma omp parallel for schedule(dynamic, 1) if (A.nchunks > 1)
    for (int64_t c = 0; c < A.nchunks; ++c) {
        const int64_t b = A.begin[c];
        int64_t i = A.end[c] - 1;
        const uint16_t *p = reinterpret_cast<const uint16_t *>(A.ptrs[c]);
        int64_t k = A.lens[c];
        int8_t code = OK;
        LaneParams<NL, AL> P(A);
        for (; i >= b; --i) {
            P.load(A, i);
            int64_t v = A.V[i];
            int64_t w2 = 0;
            if (HW) {
                int64_t e;
                if ((code = position_term(P.a, v, e)) != OK) break;
                if (__builtin_sub_overflow(A.W[i], e, &w2)) { code = POS_OVERFLOW; break; }
            }
            if (HG) {
                int64_t d;
                if ((code = velocity_term(A.G[i], P.cg, A.twoF, d)) != OK) break;
                if (__builtin_add_overflow(v, d, &v)) { code = VEL_OVERFLOW; break; }
            }
            int64_t x = 0;
            bool pop = false;
            if (SCALE) {
                int64_t s;
                const int64_t q = floordiv64(v, P.n, P.inv, s);
                if (q < -TWO47 || q >= TWO47) { code = UNSCALE_OVERFLOW; break; }
                const int64_t y = static_cast<int64_t>(A.heads[i]) * P.n + s;
                x = y >> 16;
                if (x < 65536) {
                    if (k == 0) { code = TAPE_EMPTY; break; }
                    pop = true;
                }
                v = q * 65536 + (y & 0xFFFF);
            }
            if (pop) x = (x << 16) | p[--k];
            if (SCALE) A.heads[i] = static_cast<uint32_t>(x);
            A.V[i] = v;
            if (HW) A.W[i] = w2;
        }
        A.end[c] = i + 1;
        A.lens[c] = k;
        A.status[c] = code;
    }
}

using Kernel = void (*)(const Args &);

template <template <bool, bool, bool, bool, bool> class F>
struct Table {
    template <int M>
    static constexpr Kernel at() { return &F<(M & 1) != 0, (M & 2) != 0, (M & 4) != 0, (M & 8) != 0, (M & 16) != 0>::run; }
    template <int... M>
    static constexpr Kernel pick(int m, std::integer_sequence<int, M...>) {
        constexpr Kernel all[] = {at<M>()...};
        return all[m];
    }
    static Kernel get(int m) { return pick(m, std::make_integer_sequence<int, 32>{}); }
};

template <bool S, bool W, bool G, bool N, bool A> struct Fwd { static void run(const Args &a) { forward_impl<S, W, G, N, A>(a); } };
template <bool S, bool W, bool G, bool N, bool A> struct Rev { static void run(const Args &a) { reverse_impl<S, W, G, N, A>(a); } };

template <typename T>
T *data_of(py::array &arr, const char *what, bool allow_empty = false) {
    if (!py::isinstance<py::array_t<T>>(arr) || !(arr.flags() & py::array::c_style) || arr.ndim() != 1)
        throw std::invalid_argument(std::string(what) + ": expected a 1-D C-contiguous array of the right dtype");
    if (!allow_empty && arr.size() == 0) throw std::invalid_argument(std::string(what) + ": empty");
    return static_cast<T *>(arr.mutable_data());
}

void run_kernel(bool forward, py::array V, py::array W, py::array G, py::array alpha, py::array n, py::array heads,
                py::array ptrs, py::array lens, py::array caps, py::array begin, py::array end, py::array status,
                bool do_scale, bool has_w, bool has_g, double twoF) {
    Args A;
    const py::ssize_t L = V.size();
    A.V = data_of<int64_t>(V, "V");
    A.W = data_of<int64_t>(W, "W", true);
    A.G = data_of<double>(G, "G", true);
    A.alpha = data_of<double>(alpha, "alpha");
    A.n = data_of<int64_t>(n, "n");
    A.heads = data_of<uint32_t>(heads, "heads");
    A.ptrs = data_of<uint64_t>(ptrs, "ptrs");
    A.lens = data_of<int64_t>(lens, "lens");
    A.caps = data_of<int64_t>(caps, "caps");
    A.begin = data_of<int64_t>(begin, "begin");
    A.end = data_of<int64_t>(end, "end");
    A.status = data_of<int8_t>(status, "status");
    A.nchunks = begin.size();
    A.twoF = twoF;
    if (heads.size() != L || (has_w && W.size() != L) || (has_g && G.size() != L) ||
        (n.size() != 1 && n.size() != L) || (alpha.size() != 1 && alpha.size() != L) ||
        ptrs.size() != A.nchunks || lens.size() != A.nchunks || caps.size() != A.nchunks ||
        end.size() != A.nchunks || status.size() != A.nchunks)
        throw std::invalid_argument("kernel arrays have inconsistent lengths");
    for (int64_t c = 0; c < A.nchunks; ++c)
        if (A.begin[c] < 0 || A.end[c] > L || A.begin[c] > A.end[c])
            throw std::invalid_argument("kernel lane range out of bounds");
    const int m = int(do_scale) | int(has_w) << 1 | int(has_g) << 2 | int(n.size() > 1) << 3 | int(alpha.size() > 1) << 4;
    const Kernel k = forward ? Table<Fwd>::get(m) : Table<Rev>::get(m);
    py::gil_scoped_release nogil;
    k(A);
}

}  // namespace

PYBIND11_MODULE(_cpp, mod) {
    mod.doc() = "revsgd fused exact-momentum and lost-bits tape kernels";
    mod.def("forward", [](py::array V, py::array W, py::array G, py::array alpha, py::array n, py::array heads,
                          py::array ptrs, py::array lens, py::array caps, py::array begin, py::array end,
                          py::array status, bool do_scale, bool has_w, bool has_g, double twoF) {
        run_kernel(true, V, W, G, alpha, n, heads, ptrs, lens, caps, begin, end, status, do_scale, has_w, has_g, twoF);
    });
    mod.def("reverse", [](py::array V, py::array W, py::array G, py::array alpha, py::array n, py::array heads,
                          py::array ptrs, py::array lens, py::array caps, py::array begin, py::array end,
                          py::array status, bool do_scale, bool has_w, bool has_g, double twoF) {
        run_kernel(false, V, W, G, alpha, n, heads, ptrs, lens, caps, begin, end, status, do_scale, has_w, has_g, twoF);
    });
    mod.def("set_num_threads", [](int k) {
#ifdef _OPENMP
        omp_set_num_threads(k);
#endif
    });
    mod.def("get_num_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
#ifdef _OPENMP
    mod.attr("openmp") = true;
#else
    mod.attr("openmp") = false;
#endif
}
