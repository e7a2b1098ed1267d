// contrastgen._cpp_infonce_paired: InfoNCE over per-query negatives on the CPU (contract:
// contrastgen/reference/infonce_paired.py, paired_lse_fwd_ref / paired_lse_bwd_ref).
//
// Each query q_i (D) has its own M negatives n_ij (an (N, M, D) tensor); their logits are a batched
// matrix-vector product, x_ij = scale * q_i . n_ij, with no reuse of n across queries: the op is bound by the
// bandwidth of reading n (and, backward, writing dn), not by arithmetic.  So there is no GEMM here (unlike the
// in-batch core in csrc/infonce.cpp): every pass streams n exactly once.
//
//   forward:   x_ij = scale q_i . n_ij   (saved as (N, M) float32 logits when a backward will follow)
//              lse_i = log sum_j exp(x_ij)                                   reads n once: N M D elements
//   backward:  dS_ij = g_i exp(x_ij - lse_i)       (lse_i = the lse of the whole row, in-batch columns included)
//              dq_i  = scale sum_j dS_ij n_ij,  dn_ij = scale dS_ij q_i,  dscale = sum_ij dS_ij x_ij / scale
//              one fused pass over j: reads n once and writes dn once (the saved logits spare a recompute)
//
// Parallel work items are (row, chunk of M) pairs, so that a few queries with many negatives still use every
// thread; a row split into C > 1 chunks merges its (max, sum) partials (forward) and its dq partials (backward).
// Element types of n / dn: float32, or bfloat16 passed as its int16 bit pattern (read and written without a
// float32 copy of the (N, M, D) tensor); q, logits, lse, g, dq are float32.
// Non-finite inputs propagate: a NaN or +inf logit makes that row's lse NaN (the sum sees exp(NaN) or
// exp(inf - inf)), and then every dS of the row, hence dq_i and dn_i*, is NaN.
// Arrays are declared noconvert + c_style: a wrong dtype or a non-contiguous view raises instead of copying.
#pragma GCC optimize("fp-contract=off")
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

using f32arr = py::array_t<float, py::array::c_style>;
using i16arr = py::array_t<int16_t, py::array::c_style>;

static constexpr float kStoredNegInf = -1e30f;  // the contract's "-inf" (empty set); never produced for M >= 1

static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ------------------------------------------------------------------------------------------- element types
struct F32 {
    using storage = float;
    static inline __attribute__((always_inline)) float load(const float* p, int64_t i) { return p[i]; }
    static inline __attribute__((always_inline)) void store(float* p, int64_t i, float v) { p[i] = v; }
};

struct BF16 {
    using storage = uint16_t;
    static inline __attribute__((always_inline)) float load(const uint16_t* p, int64_t i) {
        const uint32_t b = (uint32_t)p[i] << 16;
        float f;
        std::memcpy(&f, &b, 4);
        return f;
    }
    // round to nearest even; NaN stays NaN (quiet bit set)
    static inline __attribute__((always_inline)) void store(uint16_t* p, int64_t i, float v) {
        uint32_t b;
        std::memcpy(&b, &v, 4);
        const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
        p[i] = (uint16_t)(nan ? ((b >> 16) | 0x40u) : rounded);
    }
};

// ------------------------------------------------------------------------------------------- work split
struct Split {
    int64_t chunks;  // chunks per row
    int64_t len;     // columns per chunk (the last may be shorter)
};

static Split split_rows(int64_t n, int64_t m, int nt) {
    int64_t c = 1;
    if (n < 4 * (int64_t)nt) c = (4 * (int64_t)nt + n - 1) / n;
    c = std::max<int64_t>(1, std::min<int64_t>(c, (m + 255) / 256));  // at least 256 columns per chunk
    const int64_t len = (m + c - 1) / c;
    return {(m + len - 1) / len, len};
}

// four dot products q . n_j0..j3 of length d, sharing the loads of q
template <class T>
static inline __attribute__((always_inline)) void dot4(const float* q, const typename T::storage* n, int64_t d,
                                                       float* out) {
    const typename T::storage* n0 = n;
    const typename T::storage* n1 = n + d;
    const typename T::storage* n2 = n + 2 * d;
    const typename T::storage* n3 = n + 3 * d;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < d; ++k) {
        const float qk = q[k];
        a0 += qk * T::load(n0, k);
        a1 += qk * T::load(n1, k);
        a2 += qk * T::load(n2, k);
        a3 += qk * T::load(n3, k);
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
}

template <class T>
static inline __attribute__((always_inline)) float dot1(const float* q, const typename T::storage* n, int64_t d) {
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t k = 0; k < d; ++k) a += q[k] * T::load(n, k);
    return a;
}

// ------------------------------------------------------------------------------------------- forward
template <class T>
static void paired_fwd_impl(const float* q, const typename T::storage* neg, int64_t n, int64_t m, int64_t d,
                            float scale, float* logits, float* lse) {
    const int nt = num_threads();
    const Split sp = split_rows(n, m, nt);
    const int64_t items = n * sp.chunks;
    std::vector<float> part((size_t)items * 2);
    std::vector<float> scratch(logits ? 0 : (size_t)nt * sp.len);
    {
        py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num();
#else
            const int tid = 0;
#endif
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; ++it) {
                const int64_t i = it / sp.chunks, c = it % sp.chunks;
                const int64_t j0 = c * sp.len, j1 = std::min(m, j0 + sp.len);
                const float* qi = q + i * d;
                const typename T::storage* ni = neg + (i * m) * d;
                float* x = logits ? logits + i * m + j0 : scratch.data() + (size_t)tid * sp.len;
                const int64_t len = j1 - j0;
                int64_t j = 0;
                for (; j + 4 <= len; j += 4) dot4<T>(qi, ni + (j0 + j) * d, d, x + j);
                for (; j < len; ++j) x[j] = dot1<T>(qi, ni + (j0 + j) * d, d);
                float mx = -std::numeric_limits<float>::infinity();
                for (j = 0; j < len; ++j) {
                    x[j] *= scale;
                    mx = std::max(mx, x[j]);  // a NaN is skipped here but poisons the sum below
                }
                // the sum is taken relative to ref = the chunk max (0 when every logit is -inf)
                const float ref = (mx == -std::numeric_limits<float>::infinity()) ? 0.f : mx;
                float s = 0.f;
                for (j = 0; j < len; ++j) s += std::exp(x[j] - ref);
                part[2 * it] = mx;
                part[2 * it + 1] = s;
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i) {
                const float* p = part.data() + 2 * i * sp.chunks;
                const float ninf = -std::numeric_limits<float>::infinity();
                float mx = ninf;
                for (int64_t c = 0; c < sp.chunks; ++c) mx = std::max(mx, p[2 * c]);
                float s = 0.f;
                // a chunk whose logits are all -inf adds 0 (or its NaN); mx = +inf gives exp(inf - inf) = NaN
                for (int64_t c = 0; c < sp.chunks; ++c)
                    s += (p[2 * c] == ninf) ? p[2 * c + 1] * 0.f : p[2 * c + 1] * std::exp(p[2 * c] - mx);
                if (mx == ninf) lse[i] = std::isnan(s) ? s : kStoredNegInf;  // every logit -inf: the empty set
                else lse[i] = mx + std::log(s);
            }
        }
    }
}

static void check_shapes(const py::buffer_info& qb, const py::buffer_info& nb, int64_t* n, int64_t* m, int64_t* d) {
    if (qb.ndim != 2 || nb.ndim != 3) throw std::invalid_argument("q must be (N, D) and negs (N, M, D)");
    *n = qb.shape[0];
    *d = qb.shape[1];
    *m = nb.shape[1];
    if (nb.shape[0] != *n || nb.shape[2] != *d)
        throw std::invalid_argument("negs must have shape (N, M, D) with N, D those of q (" + std::to_string(*n) +
                                    ", " + std::to_string(*d) + ")");
    if (*m < 1) throw std::invalid_argument("negs must hold at least one negative per query");
}

static float* logits_ptr(f32arr& logits, int64_t n, int64_t m) {
    auto lb = logits.request();
    if (lb.ndim != 2 || lb.shape[1] != m) throw std::invalid_argument("logits must be (N, M) or (0, M)");
    if (lb.shape[0] == 0) return nullptr;
    if (lb.shape[0] != n) throw std::invalid_argument("logits must be (N, M) or (0, M)");
    return static_cast<float*>(lb.ptr);
}

template <class T, class Arr>
static void paired_fwd(f32arr q, Arr negs, float scale, f32arr logits, f32arr lse) {
    int64_t n, m, d;
    auto qb = q.request();
    auto nb = negs.request();
    check_shapes(qb, nb, &n, &m, &d);
    auto eb = lse.request(true);
    if (eb.ndim != 1 || eb.shape[0] != n) throw std::invalid_argument("lse must be (N,)");
    float* lp = logits_ptr(logits, n, m);
    paired_fwd_impl<T>(static_cast<const float*>(qb.ptr), reinterpret_cast<const typename T::storage*>(nb.ptr), n, m,
                       d, scale, lp, static_cast<float*>(eb.ptr));
}

// ------------------------------------------------------------------------------------------- backward
// dq += ds n_j and dn_j = sds q over one negative's D entries
template <class T>
static inline __attribute__((always_inline)) void row_dq_dn(float* __restrict dq, typename T::storage* __restrict dn,
                                                            const typename T::storage* __restrict n,
                                                            const float* __restrict q, float ds, float sds, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
        dq[k] += ds * T::load(n, k);
        T::store(dn, k, sds * q[k]);
    }
}

template <class T>
static inline __attribute__((always_inline)) void row_dq(float* __restrict dq, const typename T::storage* __restrict n,
                                                         float ds, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) dq[k] += ds * T::load(n, k);
}

template <class T>
static inline __attribute__((always_inline)) void row_dn(typename T::storage* __restrict dn, const float* __restrict q,
                                                         float sds, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) T::store(dn, k, sds * q[k]);
}

template <class T>
static double paired_bwd_impl(const float* q, const typename T::storage* neg, int64_t n, int64_t m, int64_t d,
                              float scale, const float* logits, const float* lse, const float* g, float* dq,
                              typename T::storage* dn) {
    const int nt = num_threads();
    const Split sp = split_rows(n, m, nt);
    const int64_t items = n * sp.chunks;
    const bool direct_dq = sp.chunks == 1;
    std::vector<float> dq_part((dq && !direct_dq) ? (size_t)items * d : 0);
    std::vector<float> ds_buf((size_t)nt * sp.len);
    double dscale = 0.0;
    {
        py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt) reduction(+ : dscale)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num();
#else
            const int tid = 0;
#endif
            float* ds = ds_buf.data() + (size_t)tid * sp.len;
#pragma omp for schedule(static)
            for (int64_t it = 0; it < items; ++it) {
                const int64_t i = it / sp.chunks, c = it % sp.chunks;
                const int64_t j0 = c * sp.len, j1 = std::min(m, j0 + sp.len);
                const int64_t len = j1 - j0;
                const float* qi = q + i * d;
                const float* xi = logits + i * m + j0;
                const float gi = g[i], li = lse[i];
                float acc = 0.f;
                for (int64_t j = 0; j < len; ++j) {
                    ds[j] = gi * std::exp(xi[j] - li);
                    acc += ds[j] * xi[j];
                }
                dscale += acc;
                float* dqi = nullptr;
                if (dq) {
                    dqi = direct_dq ? dq + i * d : dq_part.data() + (size_t)it * d;
                    std::fill(dqi, dqi + d, 0.f);
                }
                const typename T::storage* ni = neg + (i * m + j0) * d;
                typename T::storage* dni = dn ? dn + (i * m + j0) * d : nullptr;
                // one branch per call, three branch-free row loops (restrict-qualified, so each vectorises)
                if (dqi && dni) {
                    for (int64_t j = 0; j < len; ++j)
                        row_dq_dn<T>(dqi, dni + j * d, ni + j * d, qi, ds[j], scale * ds[j], d);
                } else if (dqi) {
                    for (int64_t j = 0; j < len; ++j) row_dq<T>(dqi, ni + j * d, ds[j], d);
                } else if (dni) {
                    for (int64_t j = 0; j < len; ++j) row_dn<T>(dni + j * d, qi, scale * ds[j], d);
                }
            }
            if (dq) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < n; ++i) {
                    float* dqi = dq + i * d;
                    if (!direct_dq) {
                        std::fill(dqi, dqi + d, 0.f);
                        for (int64_t c = 0; c < sp.chunks; ++c) {
                            const float* p = dq_part.data() + (size_t)(i * sp.chunks + c) * d;
#pragma omp simd
                            for (int64_t k = 0; k < d; ++k) dqi[k] += p[k];
                        }
                    }
#pragma omp simd
                    for (int64_t k = 0; k < d; ++k) dqi[k] *= scale;
                }
            }
        }
    }
    return dscale / (double)scale;
}

template <class T, class Arr>
static double paired_bwd(f32arr q, Arr negs, float scale, f32arr logits, f32arr lse, f32arr g, f32arr dq, Arr dn) {
    int64_t n, m, d;
    auto qb = q.request();
    auto nb = negs.request();
    check_shapes(qb, nb, &n, &m, &d);
    const float* lp = logits_ptr(logits, n, m);
    if (!lp) throw std::invalid_argument("the backward needs the saved (N, M) logits");
    auto eb = lse.request();
    auto gb = g.request();
    if (eb.ndim != 1 || eb.shape[0] != n || gb.ndim != 1 || gb.shape[0] != n)
        throw std::invalid_argument("lse and g must be (N,)");
    auto qdb = dq.request(true);
    float* dqp = nullptr;
    if (qdb.size > 0) {
        if (qdb.ndim != 2 || qdb.shape[0] != n || qdb.shape[1] != d) throw std::invalid_argument("dq must be (N, D) or empty");
        dqp = static_cast<float*>(qdb.ptr);
    }
    auto dnb = dn.request(true);
    typename T::storage* dnp = nullptr;
    if (dnb.size > 0) {
        if (dnb.ndim != 3 || dnb.shape[0] != n || dnb.shape[1] != m || dnb.shape[2] != d)
            throw std::invalid_argument("dnegs must be (N, M, D) or empty");
        dnp = reinterpret_cast<typename T::storage*>(dnb.ptr);
    }
    return paired_bwd_impl<T>(static_cast<const float*>(qb.ptr), reinterpret_cast<const typename T::storage*>(nb.ptr),
                              n, m, d, scale, lp, static_cast<const float*>(eb.ptr), static_cast<const float*>(gb.ptr),
                              dqp, dnp);
}

static int omp_threads() { return num_threads(); }

PYBIND11_MODULE(_cpp_infonce_paired, mod) {
    mod.doc() = "InfoNCE over per-query negatives (batched mat-vec + log-sum-exp, one pass over n), OpenMP.";
    mod.def("paired_fwd_f32", &paired_fwd<F32, f32arr>, py::arg("q").noconvert(), py::arg("negs").noconvert(),
            py::arg("scale"), py::arg("logits").noconvert(), py::arg("lse").noconvert());
    mod.def("paired_fwd_bf16", &paired_fwd<BF16, i16arr>, py::arg("q").noconvert(), py::arg("negs").noconvert(),
            py::arg("scale"), py::arg("logits").noconvert(), py::arg("lse").noconvert());
    mod.def("paired_bwd_f32", &paired_bwd<F32, f32arr>, py::arg("q").noconvert(), py::arg("negs").noconvert(),
            py::arg("scale"), py::arg("logits").noconvert(), py::arg("lse").noconvert(), py::arg("g").noconvert(),
            py::arg("dq").noconvert(), py::arg("dnegs").noconvert());
    mod.def("paired_bwd_bf16", &paired_bwd<BF16, i16arr>, py::arg("q").noconvert(), py::arg("negs").noconvert(),
            py::arg("scale"), py::arg("logits").noconvert(), py::arg("lse").noconvert(), py::arg("g").noconvert(),
            py::arg("dq").noconvert(), py::arg("dnegs").noconvert());
    mod.def("omp_threads", &omp_threads, "OpenMP threads the kernels use");
}
