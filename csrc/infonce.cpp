// contrastgen._cpp_infonce: fused CPU epilogues for the InfoNCE / CLIP / SigLIP core (contract:
// contrastgen/reference/core.py).
//
// Design (2026-11-24): the products S = Q_blk K^T, dQ_blk = dS K and dK += dS^T Q_blk go through
// torch's BLAS in the Python wrapper (contrastgen/ops/_cpp_infonce.py), one row block of B queries at a
// time; this file does everything between the GEMMs, in place on the (B x C) block buffer, with OpenMP
// over rows.  Measured on the 2-core Zen4 machine: hand-written loops cannot reach MKL's ~130 GFLOP/s,
// and the epilogue is memory/exp bound, so this split keeps the products at BLAS speed and the extra
// memory at O(B*C + N*D) (never N x M).
//
// InfoNCE, logits x_ij = scale * S_ij (S_ij = q_i . key_j, C = M in-batch columns then K bank columns):
//   forward, per row:    lse_i = log sum_{j in R_i} exp(x_ij)   (R_i = valid, or valid & !pos for pml)
//                        supcon: loss_i = lse_i - mean_{p pos} x_ip, max-shifted, and with one positive the
//                        positive-relative softplus(log sum_{j in R_i, j != p} exp(x_ij - mx) + mx - x_ip);
//                        pml: loss_i = sum_p softplus(lse_i - x_ip)
//   forward, per column (symmetric): online (max, sums of exp over the non-positive and the positive rows),
//                        across row blocks.
//   backward: dS_ij = g_i (P_ij[valid] - [pos]/npos_i)                          (supcon rows)
//                   = -g_i r_ij [pos] + g_i (sum_p r_ip) P_ij [neg]               (pml, r = sigmoid(lse - x))
//                   + gc_j (P^c_ij[valid] - [pos]/nposc_j)                        (symmetric columns)
//             with P_ij = exp(x_ij - lse_i) / T_i renormalised in the row (T_i = its sum with the stored float32
//             lse) and the lone positive's term written -g T_np / T; the block is overwritten with scale * dS;
//             dscale = sum dS_ij S_ij is returned.  See "Non-finite logits" and "Positive-relative losses" below.
// SigLIP, z_ij = scale S_ij + bias, y_ij = +1 on the diagonal, -1 elsewhere:
//   loss_i = sum_j softplus(-y_ij z_ij);  dZ_ij = -g_i y_ij sigmoid(-y_ij z_ij); block <- scale dZ;
//   returns (sum dZ_ij S_ij, sum dZ_ij).
//
// Arrays are declared noconvert + c_style: a wrong dtype or a non-contiguous view raises instead of copying.
// No implicit FMA contraction (2026-11-24): with -march=native GCC fuses `scale * x - m` into one FMA, so the
// exponent of the row maximum becomes its product's rounding residual instead of 0 and a lone positive's loss
// comes out as -1 ulp instead of 0.  Products are rounded as written; the polynomials use explicit fmaf.
#pragma GCC optimize("fp-contract=off")
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

using f32arr = py::array_t<float, py::array::c_style>;
using f64arr = py::array_t<double, py::array::c_style>;
using i64arr = py::array_t<int64_t, py::array::c_style>;

static constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static constexpr float kStoredNegInf = -1e30f;  // contract: "-inf may be stored as any value <= -1e30"
// Largest spread of log-magnitudes for which one exponential per element serves rows and columns
// (forward: e^-87 underflow of terms costs < b e^-27 relative; backward: factors stay below e^40).
static constexpr float kFactorRange = 60.0f;
static constexpr float kBwdFactorRange = 40.0f;

// ----------------------------------------------------------------------------------------------------
// Vectorisable exp / log1p (Cephes polynomials).  Plain C++ so that `#pragma omp simd` loops compile to
// AVX-512 (or whatever -march=native offers) without -ffast-math and without libmvec.
static inline __attribute__((always_inline)) float bits_to_float(int32_t i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

// exp(x) with ~2 ulp error on [-87, 88]; 0 below -87 (so exp(-inf) == 0), clamped to exp(88) above.
static inline __attribute__((always_inline)) float fast_exp(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = xc * 1.44269504088896341f;
    const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest (default rounding mode)
    float r = std::fma(fn, -0.693359375f, xc);
    r = std::fma(fn, 2.12194440e-4f, r);
    float p = 1.9875691500E-4f;
    p = std::fma(p, r, 1.3981999507E-3f);
    p = std::fma(p, r, 8.3334519073E-3f);
    p = std::fma(p, r, 4.1665795894E-2f);
    p = std::fma(p, r, 1.6666665459E-1f);
    p = std::fma(p, r, 5.0000001201E-1f);
    p = std::fma(p * r, r, r + 1.0f);
    const int32_t n = (int32_t)fn;
    const float res = p * bits_to_float((n + 127) << 23);
    return x < -87.0f ? 0.0f : res;
}

// log(u) for u in [1, 2] (Cephes logf after the frexp step).
static inline __attribute__((always_inline)) float log_1_2(float u) {
    const bool big = u > 1.41421356237f;
    const float e = big ? 1.0f : 0.0f;
    const float x = (big ? 0.5f * u : u) - 1.0f;
    const float z = x * x;
    float y = 7.0376836292E-2f;
    y = std::fma(y, x, -1.1514610310E-1f);
    y = std::fma(y, x, 1.1676998740E-1f);
    y = std::fma(y, x, -1.2420140846E-1f);
    y = std::fma(y, x, 1.4249322787E-1f);
    y = std::fma(y, x, -1.6668057665E-1f);
    y = std::fma(y, x, 2.0000714765E-1f);
    y = std::fma(y, x, -2.4999993993E-1f);
    y = std::fma(y, x, 3.3333331174E-1f);
    y = y * x * z;
    y = std::fma(e, -2.12194440e-4f, y);
    y = std::fma(-0.5f, z, y);
    return x + y + e * 0.693359375f;
}

// softplus(v) = log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)); log1p(t) = log(1+t) * t / ((1+t) - 1).
static inline __attribute__((always_inline)) float fast_softplus(float v) {
    const float a = v < 0.0f ? -v : v;
    const float t = fast_exp(-a);
    const float u = 1.0f + t;
    const float d = u - 1.0f;
    const float l1p = d == 0.0f ? t : log_1_2(u) * (t / d);
    return (v > 0.0f ? v : 0.0f) + l1p;
}

static inline float sigmoid_scalar(float v) { return 1.0f / (1.0f + std::exp(-v)); }
static inline float softplus_scalar(double v) { return (float)(v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v))); }

static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
static int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// ----------------------------------------------------------------------------------------------------
// Argument checks (shapes only; dtype/layout are enforced by noconvert + c_style).
static void check(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument("contrastgen._cpp_infonce: " + msg);
}
static void check_shape(const py::array& a, std::vector<py::ssize_t> shape, const char* name) {
    bool ok = a.ndim() == (py::ssize_t)shape.size();
    for (size_t d = 0; ok && d < shape.size(); ++d) ok = a.shape(d) == shape[d];
    if (!ok) {
        std::string want = "(", got = "(";
        for (auto s : shape) want += std::to_string(s) + ",";
        for (py::ssize_t d = 0; d < a.ndim(); ++d) got += std::to_string(a.shape(d)) + ",";
        check(false, std::string(name) + " must have shape " + want + ") got " + got + ")");
    }
}

// Masks of in-batch column j for global row gi (see core.py): positive / valid.  The label and self-exclusion
// switches are template parameters (2026-11-24): as run-time flags the per-element mask kept the label paths
// ~8x slower than the diagonal path (the vectorised loop evaluated every alternative under masks); the
// epilogues are instantiated once per (labels, exclude_self) pair.
template <bool LAB, bool EXCL>
struct Masks {
    const int64_t* kl;
    int64_t qli;
    int64_t gi;
    bool ibn;
    inline __attribute__((always_inline)) bool pos(int64_t j) const {
        const bool self = j == gi;
        const bool p = LAB ? (qli == kl[j]) : self;
        return EXCL ? (p && !self) : p;
    }
    inline __attribute__((always_inline)) bool valid(int64_t j, bool p) const {
        if (EXCL) return p || (ibn && j != gi);
        return p || ibn;
    }
};

// ----------------------------------------------------------------------------------------------------
// Non-finite logits (2026-12-01, issue 9 item 1).  A NaN logit must reach the loss and every gradient entry it
// touches, as in the float64 reference.  The maxima skip NaN (`v > m ? v : m`), so a NaN shows up in the sums of
// exponentials instead (fast_exp(NaN) = NaN; +inf logits give inf - inf = NaN); an empty set is recognised by a
// sum that is exactly 0, never by `!(sum > 0)`, which NaN also satisfies and which used to turn a NaN row into the
// -1e30 placeholder.  Entries the reference multiplies by an exact 0 (no positive, not valid) are selected to 0.
//
// Positive-relative losses (2026-12-01, issue 9 item 4).  With one positive p the loss lse - x_p is computed as
//     softplus(log(sum_{j valid, j != p} exp(x_j - mx)) + mx - x_p)   (= log1p(sum_{j != p} exp(x_j - x_p)))
// from the sum over the other columns alone, so a dominating positive (loss 1e-7) keeps its relative precision
// instead of vanishing in fl(1 + 1e-7); two or more positives give a loss >= log 2, where lse - mean is exact.
// The backward renormalises in the row (see infonce_bwd_impl), so the float32 rounding of the stored lse
// (half an ulp: 5e-4 at |lse| = 1e4) does not bias the gradients.

// ----------------------------------------------------------------------------------------------------
// InfoNCE forward epilogue on one row block.
//   S        (b, C) raw dot products q_i . key_j of rows row0 .. row0+b-1, C = m + bank
//   q_labels (N,) / k_labels (m,) int64 (ignored unless has_labels)
//   row_loss (b,), row_stats (b, 2) outputs for this block
//   col_state (5, m) float64, symmetric only: running [max, sum over valid non-positive rows of exp(x - max),
//             the same over positive rows, sum of positive x, npos] (initialise to [-inf, 0, 0, 0, 0]; finish with
//             infonce_col_finalize)
// Sums of positive logits are accumulated max-shifted (x_p - mx in float32, exact for nearby values), so that
// lse - mean_p x_p keeps its precision at |x| = 1e4 where float32 sums of x_p would not.
static constexpr int kColState = 5;

static inline double softplus_d(double v) { return v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v)); }

template <bool LAB, bool EXCL>
static void infonce_fwd_impl(f32arr& S, double scale_d, int64_t row0, int64_t m, i64arr& q_labels, i64arr& k_labels,
                             bool in_batch_negatives, bool pml, bool symmetric, f32arr& row_loss, f32arr& row_stats,
                             f64arr& col_state) {
    constexpr bool has_labels = LAB, exclude_self = EXCL;
    check(S.ndim() == 2, "S must be 2-D");
    const int64_t b = S.shape(0), C = S.shape(1);
    check(m >= 0 && m <= C, "m must be in [0, S.shape[1]]");
    check_shape(row_loss, {b}, "row_loss");
    check_shape(row_stats, {b, 2}, "row_stats");
    if (has_labels) {
        check(q_labels.ndim() == 1 && q_labels.shape(0) >= row0 + b, "q_labels too short");
        check_shape(k_labels, {m}, "k_labels");
    }
    if (symmetric) {
        check(!pml && C == m && !exclude_self, "symmetric needs supcon, no bank and no exclude_self");
        check_shape(col_state, {kColState, m}, "col_state");
    }
    // CLIP fast path: diagonal positives, every in-batch column valid, nothing excluded.
    const bool fast = !has_labels && !exclude_self && in_batch_negatives && !pml;
    const float scale = (float)scale_d;
    const float* Sp = S.data();
    float* loss = row_loss.mutable_data();
    float* stats = row_stats.mutable_data();
    const int64_t* ql = has_labels ? q_labels.data() : nullptr;
    const int64_t* kl = has_labels ? k_labels.data() : nullptr;
    double* cs = symmetric ? col_state.mutable_data() : nullptr;
    const int nt = num_threads();
    // per-thread column partials: [thread][max | non-positive sum | positive sum | possum | npos][m]
    std::vector<float> colpart(symmetric ? (size_t)nt * kColState * m : 0);
    std::vector<float> colref(symmetric ? m : 0);
    std::vector<float> rowmax(b);
    float bmax = kNegInf, bmin = std::numeric_limits<float>::infinity();

    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
    {
        const int tid = thread_id();
        float* cmax = symmetric ? colpart.data() + (size_t)tid * kColState * m : nullptr;
        float* csn = symmetric ? cmax + m : nullptr;
        float* csp = symmetric ? cmax + 2 * m : nullptr;
        float* cpos = symmetric ? cmax + 3 * m : nullptr;
        float* cnp = symmetric ? cmax + 4 * m : nullptr;
        if (symmetric)
            for (int64_t j = 0; j < m; ++j) cmax[j] = kNegInf, csn[j] = 0.f, csp[j] = 0.f, cpos[j] = 0.f, cnp[j] = 0.f;

        // Phase 1: row maxima over the row's lse set, column maxima over valid entries.
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b; ++r) {
            const float* x = Sp + r * C;
            const int64_t gi = row0 + r;
            const Masks<LAB, EXCL> mk{kl, has_labels ? ql[gi] : 0, gi, in_batch_negatives};
            float mx = kNegInf;
            if (fast) {
                if (symmetric) {
#pragma omp simd reduction(max : mx)
                    for (int64_t j = 0; j < m; ++j) {
                        const float v = scale * x[j];
                        mx = v > mx ? v : mx;
                        cmax[j] = v > cmax[j] ? v : cmax[j];
                    }
                } else {
#pragma omp simd reduction(max : mx)
                    for (int64_t j = 0; j < m; ++j) {
                        const float v = scale * x[j];
                        mx = v > mx ? v : mx;
                    }
                }
            } else if (!symmetric && !pml) {
                // label / exclude_self rows: a separate loop without the column and pml alternatives, which kept
                // GCC on the scalar fallback of the loop below (2026-11-24)
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const float w = mk.valid(j, mk.pos(j)) ? v : kNegInf;
                    mx = w > mx ? w : mx;
                }
            } else if (!symmetric) {
                // pml rows: max over the negatives (valid, not positive), same separate-loop reason (2026-11-24)
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const bool p = mk.pos(j);
                    const float w = (mk.valid(j, p) && !p) ? v : kNegInf;
                    mx = w > mx ? w : mx;
                }
            } else {
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const float w = mk.valid(j, mk.pos(j)) ? v : kNegInf;
                    mx = w > mx ? w : mx;
                    cmax[j] = w > cmax[j] ? w : cmax[j];
                }
            }
#pragma omp simd reduction(max : mx)
            for (int64_t j = m; j < C; ++j) {
                const float v = scale * x[j];
                mx = v > mx ? v : mx;
            }
            rowmax[r] = mx;
        }
        // (implicit barrier) block column maxima; the block max R and the smallest column max decide
        // whether the column sums can reuse the row exponentials (see `factored` below).
        if (symmetric) {
#pragma omp for schedule(static) reduction(max : bmax) reduction(min : bmin)
            for (int64_t j = 0; j < m; ++j) {
                float c = kNegInf;
                for (int t = 0; t < nt; ++t) {
                    const float v = colpart[(size_t)t * kColState * m + j];
                    c = v > c ? v : c;
                }
                colref[j] = c;
                bmax = c > bmax ? c : bmax;
                bmin = c < bmin ? c : bmin;
            }
        }
        // factored: exp(x_ij - R) = exp(x_ij - m_i) * exp(m_i - R), so one exponential per element serves the
        // row and the column sums.  Exact up to terms below e^-87 relative to R, which are negligible (relative
        // error < b e^-27) as long as every column's max is within 60 of R; otherwise two exponentials.
        const bool factored = fast && symmetric && (bmax - bmin) <= kFactorRange;
        // Phase 2: sums of exp (the non-positive and the positive columns apart), positive logits, pml terms;
        // column sums against colref.
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b; ++r) {
            const float* x = Sp + r * C;
            const int64_t gi = row0 + r;
            const Masks<LAB, EXCL> mk{kl, has_labels ? ql[gi] : 0, gi, in_batch_negatives};
            const float mx = rowmax[r];
            // sn: valid non-positive columns (pml: the negatives); sp: positive columns (supcon only)
            float sn = 0.f, sp = 0.f, possum = 0.f, npos = 0.f;
            if (fast) {
                const int64_t dg = gi < m ? gi : m;  // the diagonal column (m if this row has none)
                if (factored) {
                    const float alpha = std::exp(mx - bmax);
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = 0; j < dg; ++j) {
                        const float e = fast_exp(scale * x[j] - mx);
                        sn += e;
                        csn[j] += alpha * e;
                    }
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = dg + 1; j < m; ++j) {
                        const float e = fast_exp(scale * x[j] - mx);
                        sn += e;
                        csn[j] += alpha * e;
                    }
                    if (gi < m) csp[gi] += alpha * fast_exp(scale * x[gi] - mx);
                } else if (symmetric) {
                    const float* cr = colref.data();
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = 0; j < dg; ++j) {
                        const float v = scale * x[j];
                        sn += fast_exp(v - mx);
                        csn[j] += fast_exp(v - cr[j]);
                    }
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = dg + 1; j < m; ++j) {
                        const float v = scale * x[j];
                        sn += fast_exp(v - mx);
                        csn[j] += fast_exp(v - cr[j]);
                    }
                    if (gi < m) csp[gi] += fast_exp(scale * x[gi] - cr[gi]);
                } else {
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = 0; j < dg; ++j) sn += fast_exp(scale * x[j] - mx);
#pragma omp simd reduction(+ : sn)
                    for (int64_t j = dg + 1; j < m; ++j) sn += fast_exp(scale * x[j] - mx);
                }
                if (gi < m) {
                    const float v = scale * x[gi];
                    possum = v - mx;
                    sp = fast_exp(possum);
                    npos = 1.f;
                    if (symmetric) cpos[gi] += v - colref[gi], cnp[gi] += 1.f;
                }
            } else if (!symmetric && !pml) {
#pragma omp simd reduction(+ : sn, sp, possum, npos)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const bool p = mk.pos(j);
                    const float e = fast_exp(v - mx);
                    sn += (mk.valid(j, p) && !p) ? e : 0.f;
                    sp += p ? e : 0.f;
                    possum += p ? v - mx : 0.f;
                    npos += p ? 1.f : 0.f;
                }
            } else if (!symmetric) {
                // pml rows: sum of exp over the negatives; the positives only count here (softplus terms below)
#pragma omp simd reduction(+ : sn, possum, npos)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const bool p = mk.pos(j);
                    const float e = fast_exp(v - mx);
                    sn += (mk.valid(j, p) && !p) ? e : 0.f;
                    possum += p ? v : 0.f;
                    npos += p ? 1.f : 0.f;
                }
            } else {
                const float* cr = colref.data();
#pragma omp simd reduction(+ : sn, sp, possum, npos)
                for (int64_t j = 0; j < m; ++j) {
                    const float v = scale * x[j];
                    const bool p = mk.pos(j);
                    const bool va = mk.valid(j, p);
                    const float e = fast_exp(v - mx);
                    sn += (va && !p) ? e : 0.f;
                    sp += p ? e : 0.f;
                    possum += p ? v - mx : 0.f;
                    npos += p ? 1.f : 0.f;
                    const float ec = fast_exp(v - cr[j]);
                    csn[j] += (va && !p) ? ec : 0.f;
                    csp[j] += p ? ec : 0.f;
                    cpos[j] += p ? v - cr[j] : 0.f;
                    cnp[j] += p ? 1.f : 0.f;
                }
            }
#pragma omp simd reduction(+ : sn)
            for (int64_t j = m; j < C; ++j) sn += fast_exp(scale * x[j] - mx);
            const double sum = (double)sn + (double)sp;
            const bool empty = sum == 0.0;  // NaN is not empty
            const double lse = empty ? (double)kStoredNegInf : (double)mx + std::log(sum);
            float l = 0.f;
            if (pml) {
                // sum over the positives of softplus(lse - x_ip).  Without labels the only positive is the diagonal
                // (none under exclude_self): one scalar term; with labels a branch-free vectorised pass over the
                // row (2026-11-24: the scalar loop with a per-column branch was the bulk of the pml forward).
                if (empty) {
                    // no negatives: softplus(-inf - x_p) = 0 for every finite x_p; NaN / -inf positives poison it
                    l = std::isnan(possum) ? std::numeric_limits<float>::quiet_NaN()
                                           : (possum == kNegInf ? std::numeric_limits<float>::infinity() : 0.f);
                } else if (!LAB) {
                    if (!EXCL && gi < m) l = (float)softplus_d(lse - (double)(scale * x[gi]));
                } else {
                    // argument (mx - v) + log(sum): rounded at its own magnitude, not at lse's (issue 9 item 4)
                    const float lsum = (float)std::log(sum);
                    float facc = 0.f;
#pragma omp simd reduction(+ : facc)
                    for (int64_t j = 0; j < m; ++j) {
                        const float sp_ = fast_softplus((mx - scale * x[j]) + lsum);
                        facc += mk.pos(j) ? sp_ : 0.f;
                    }
                    l = facc;
                }
            } else if (npos == 1.f) {  // possum = x_p - mx: softplus(log(sn) + mx - x_p)
                l = (float)softplus_d(std::log((double)sn) - (double)possum);
            } else if (npos > 0.f) {   // lse - mean_p x_p = log(sum) - mean_p (x_p - mx): max-shifted
                l = (float)(std::log(sum) - (double)possum / (double)npos);
            }
            loss[r] = l;
            stats[2 * r] = (float)lse;
            stats[2 * r + 1] = npos;
        }
        // Merge the column partial sums into the running state (rescaled to the new reference max).
        if (symmetric) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < m; ++j) {
                const double cref = factored ? (double)bmax : (double)colref[j];
                double sn = 0.0, sp = 0.0, ps = 0.0, np = 0.0;
                for (int t = 0; t < nt; ++t) {
                    const float* base = colpart.data() + (size_t)t * kColState * m;
                    sn += base[m + j];
                    sp += base[2 * m + j];
                    ps += base[3 * m + j];
                    np += base[4 * m + j];
                }
                if (np > 0.0) ps += np * (double)colref[j];  // the partials hold x - colref_j (max-shifted)
                if (sn + sp != 0.0) {  // (NaN != 0): running (max, sums) <- merge with (cref, sums)
                    const double oldmax = cs[j];
                    if (cs[m + j] + cs[2 * m + j] == 0.0) {
                        cs[j] = cref;
                        cs[m + j] = sn;
                        cs[2 * m + j] = sp;
                    } else {
                        const double nm = oldmax > cref ? oldmax : cref;
                        const double fo = std::exp(oldmax - nm), fn = std::exp(cref - nm);
                        cs[m + j] = cs[m + j] * fo + sn * fn;
                        cs[2 * m + j] = cs[2 * m + j] * fo + sp * fn;
                        cs[j] = nm;
                    }
                }
                cs[3 * m + j] += ps;
                cs[4 * m + j] += np;
            }
        }
    }
}

void infonce_fwd_block(f32arr S, double scale_d, int64_t row0, int64_t m, i64arr q_labels, i64arr k_labels,
                       bool has_labels, bool exclude_self, bool in_batch_negatives, bool pml, bool symmetric,
                       f32arr row_loss, f32arr row_stats, f64arr col_state) {
    auto run = [&](auto lab, auto excl) {
        infonce_fwd_impl<decltype(lab)::value, decltype(excl)::value>(S, scale_d, row0, m, q_labels, k_labels,
                                                                      in_batch_negatives, pml, symmetric, row_loss,
                                                                      row_stats, col_state);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (has_labels) exclude_self ? run(T{}, T{}) : run(T{}, F{});
    else exclude_self ? run(F{}, T{}) : run(F{}, F{});
}

// col_state (5, m) -> col_loss (m,), col_stats (m, 2); the loss of a column with one positive is positive-relative.
void infonce_col_finalize(f64arr col_state, f32arr col_loss, f32arr col_stats) {
    check(col_state.ndim() == 2 && col_state.shape(0) == kColState, "col_state must have shape (5, m)");
    const int64_t m = col_state.shape(1);
    check_shape(col_loss, {m}, "col_loss");
    check_shape(col_stats, {m, 2}, "col_stats");
    const double* cs = col_state.data();
    float* loss = col_loss.mutable_data();
    float* st = col_stats.mutable_data();
    for (int64_t j = 0; j < m; ++j) {
        const double mx = cs[j], sn = cs[m + j], sp = cs[2 * m + j], ps = cs[3 * m + j], np = cs[4 * m + j];
        const double s = sn + sp;
        const bool empty = s == 0.0;  // NaN is not empty
        const double lse = empty ? (double)kStoredNegInf : mx + std::log(s);
        double l = 0.0;
        if (np == 1.0) l = softplus_d(std::log(sn) + mx - ps);
        else if (np > 0.0) l = lse - ps / np;
        loss[j] = (float)l;
        st[2 * j] = (float)lse;
        st[2 * j + 1] = (float)np;
    }
}

// ----------------------------------------------------------------------------------------------------
// Symmetric column normalisers (backward pre-pass, used when the stored float32 column lse is too coarse:
// half an ulp of |lse| > COL_NORM_LSE in _cpp_infonce.py).  Accumulates, over the rows of this block,
//   col_acc[0, j] += sum_{i valid, not positive} exp(x_ij - col_lse_j),  col_acc[1, j] += sum_{i positive} (same)
// so that exp(x_ij - col_lse_j) / (col_acc[0, j] + col_acc[1, j]) is the exactly normalised column softmax.
template <bool LAB>
static void infonce_col_norm_impl(f32arr& S, double scale_d, int64_t row0, i64arr& q_labels, i64arr& k_labels,
                                  bool in_batch_negatives, f32arr& col_lse, f64arr& col_acc) {
    check(S.ndim() == 2, "S must be 2-D");
    const int64_t b = S.shape(0), m = S.shape(1);
    check_shape(col_lse, {m}, "col_lse");
    check_shape(col_acc, {2, m}, "col_acc");
    if (LAB) {
        check(q_labels.ndim() == 1 && q_labels.shape(0) >= row0 + b, "q_labels too short");
        check_shape(k_labels, {m}, "k_labels");
    }
    const float scale = (float)scale_d;
    const float* Sp = S.data();
    const float* clse = col_lse.data();
    const int64_t* ql = LAB ? q_labels.data() : nullptr;
    const int64_t* kl = LAB ? k_labels.data() : nullptr;
    double* acc = col_acc.mutable_data();
    const int nt = num_threads();
    std::vector<float> part((size_t)nt * 2 * m, 0.f);
    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
    {
        float* pn = part.data() + (size_t)thread_id() * 2 * m;
        float* pp = pn + m;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b; ++r) {
            const float* x = Sp + r * m;
            const int64_t gi = row0 + r;
            const Masks<LAB, false> mk{kl, LAB ? ql[gi] : 0, gi, in_batch_negatives};
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) {
                const bool p = mk.pos(j);
                const bool va = mk.valid(j, p);
                const float e = fast_exp(scale * x[j] - clse[j]);
                pn[j] += (va && !p) ? e : 0.f;
                pp[j] += p ? e : 0.f;
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < m; ++j)
            for (int t = 0; t < nt; ++t) {
                acc[j] += part[(size_t)t * 2 * m + j];
                acc[m + j] += part[(size_t)t * 2 * m + m + j];
            }
    }
}

void infonce_col_norm_block(f32arr S, double scale_d, int64_t row0, i64arr q_labels, i64arr k_labels, bool has_labels,
                            bool in_batch_negatives, f32arr col_lse, f64arr col_acc) {
    if (has_labels) infonce_col_norm_impl<true>(S, scale_d, row0, q_labels, k_labels, in_batch_negatives, col_lse, col_acc);
    else infonce_col_norm_impl<false>(S, scale_d, row0, q_labels, k_labels, in_batch_negatives, col_lse, col_acc);
}

// A row whose dS is 0: zeroes it and returns 0, or NaN when the row holds a non-finite product (see `Poison`).
static inline float zero_row(float* x, int64_t C) {
    float bad = 0.f;
#pragma omp simd reduction(+ : bad)
    for (int64_t j = 0; j < C; ++j) {
        bad += std::isfinite(x[j]) ? 0.f : 1.f;
        x[j] = 0.f;
    }
    return bad > 0.f ? std::numeric_limits<float>::quiet_NaN() : 0.f;
}

// Row passes of the backward as plain functions (2026-12-01): written as lambdas capturing the sums by reference,
// GCC 12 did not vectorise them ("complicated access pattern") and the CLIP backward epilogue ran 4-15x slower.
struct RowSums { float t, es, ecs; };
static constexpr int kLanes = 16;  // explicit accumulator lanes (one AVX-512 vector of floats)

// x_j <- e_j = exp(scale x_j - lse) on [j0, j1); returns (sum e, sum e s, sum e cb s) (cb may be null: no third sum)
static inline __attribute__((always_inline)) RowSums row_exp_inplace(float* __restrict x, const float* __restrict cb,
                                                                     int64_t j0, int64_t j1, float scale, float lse) {
    float t = 0.f, es = 0.f, ecs = 0.f;
    if (cb) {
#pragma omp simd reduction(+ : t, es, ecs)
        for (int64_t j = j0; j < j1; ++j) {
            const float s = x[j];
            const float e = fast_exp(scale * s - lse);
            t += e;
            es += e * s;
            ecs += (e * cb[j]) * s;
            x[j] = e;
        }
    } else {
#pragma omp simd reduction(+ : t, es)
        for (int64_t j = j0; j < j1; ++j) {
            const float s = x[j];
            const float e = fast_exp(scale * s - lse);
            t += e;
            es += e * s;
            x[j] = e;
        }
    }
    return {t, es, ecs};
}

// x_j <- x_j (sw + sa cb_j) on [j0, j1) (cb null: x_j sw)
static inline __attribute__((always_inline)) void row_scale_inplace(float* __restrict x, const float* __restrict cb,
                                                                    int64_t j0, int64_t j1, float sw, float sa) {
    if (cb) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) x[j] *= sw + sa * cb[j];
    } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) x[j] *= sw;
    }
}

// er_j <- exp(scale x_j - lse) on [j0, j1), x unchanged; returns the sum
static inline __attribute__((always_inline)) float row_exp_store(const float* __restrict x, float* __restrict er,
                                                                 int64_t j0, int64_t j1, float scale, float lse) {
    float t = 0.f;
#pragma omp simd reduction(+ : t)
    for (int64_t j = j0; j < j1; ++j) {
        const float e = fast_exp(scale * x[j] - lse);
        er[j] = e;
        t += e;
    }
    return t;
}

// Two-exponential symmetric pass on [j0, j1): dS = w er_j + cw_j exp(scale s - clse_j) (w = 0: column term only);
// x <- scale dS, returns sum dS s
static inline __attribute__((always_inline)) float row_two_exp(float* __restrict x, const float* __restrict er,
                                                               const float* __restrict cw, const float* __restrict clse,
                                                               int64_t j0, int64_t j1, float scale, float w, bool rows) {
    float acc = 0.f;
    if (rows) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = j0; j < j1; ++j) {
            const float s = x[j];
            const float d = w * er[j] + cw[j] * fast_exp(scale * s - clse[j]);
            acc += d * s;
            x[j] = scale * d;
        }
    } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = j0; j < j1; ++j) {
            const float s = x[j];
            const float d = cw[j] * fast_exp(scale * s - clse[j]);
            acc += d * s;
            x[j] = scale * d;
        }
    }
    return acc;
}

// ----------------------------------------------------------------------------------------------------
// InfoNCE backward epilogue on one row block: S (b, C) raw dots in, scale * dS out; returns sum_ij dS_ij S_ij.
//   row_stats (b, 2), g_row (b,) of this block.  Rows are renormalised in the row (issue 9 item 4): with
//   e_j = exp(x_j - lse_i) from the stored float32 lse and T = sum of e_j over the row's set, the kernel uses
//   e_j / T, the exactly normalised softmax (one exponential per element, as before; a per-thread row of scratch
//   holds e between the passes), and the single positive of a row gets -g T_np / T (T_np: the other columns)
//   instead of g (e_p / T - 1), which cancels.  pml: lse_exact = lse + log T, r_p = T / (T + e_p).
//   Symmetric columns, (m,) each: col_lse (the stored lse; +inf where the column has no positive, so that those
//   columns give an exact 0), col_w (weight of exp(x_ij - col_lse_j) on valid entries, g_col / T_col),
//   col_pk / col_pc (positive entries get col_pk * col_w * exp(..) - col_pc), col_cb = col_w exp(R - col_lse)
//   for the one-exponential (factored) path, R = col_ref.
//   renorm = false (label rows, not pml): the row stats are external -- merged over more keys than this call
//   sees (a ring block of torch.distributed, contrastgen/distributed/_blocks.py) -- so the row is not
//   renormalised: P_ij = exp(x_ij - lse_i) as is, positives g (P_ip - 1/npos) even when npos = 1.
template <bool LAB, bool EXCL>
static double infonce_bwd_impl(f32arr& S, double scale_d, int64_t row0, int64_t m, i64arr& q_labels, i64arr& k_labels,
                               bool in_batch_negatives, bool pml, bool symmetric, f32arr& row_stats, f32arr& g_row,
                               f32arr& col_lse, f32arr& col_w, f32arr& col_pk, f32arr& col_pc, f32arr& col_cb,
                               double col_ref, bool want_dscale, bool renorm) {
    constexpr bool has_labels = LAB, exclude_self = EXCL;
    check(S.ndim() == 2, "S must be 2-D");
    const int64_t b = S.shape(0), C = S.shape(1);
    check(m >= 0 && m <= C, "m must be in [0, S.shape[1]]");
    check_shape(row_stats, {b, 2}, "row_stats");
    check_shape(g_row, {b}, "g_row");
    check(renorm || (has_labels && !pml), "external row stats (renormalize=False) need labels and no pml");
    if (has_labels) {
        check(q_labels.ndim() == 1 && q_labels.shape(0) >= row0 + b, "q_labels too short");
        check_shape(k_labels, {m}, "k_labels");
    }
    if (symmetric) {
        check(!pml && C == m && !exclude_self, "symmetric needs supcon, no bank and no exclude_self");
        check_shape(col_lse, {m}, "col_lse");
        check_shape(col_w, {m}, "col_w");
        check_shape(col_pk, {m}, "col_pk");
        check_shape(col_pc, {m}, "col_pc");
        check_shape(col_cb, {m}, "col_cb");
    }
    const bool fast = !has_labels && !exclude_self && in_batch_negatives && !pml;
    const float scale = (float)scale_d;
    float* Sp = S.mutable_data();
    const float* st = row_stats.data();
    const float* g = g_row.data();
    const int64_t* ql = has_labels ? q_labels.data() : nullptr;
    const int64_t* kl = has_labels ? k_labels.data() : nullptr;
    const float* clse = symmetric ? col_lse.data() : nullptr;
    const float* cw = symmetric ? col_w.data() : nullptr;
    const float* cpk = symmetric ? col_pk.data() : nullptr;
    const float* cpc = symmetric ? col_pc.data() : nullptr;
    const float* ccb = symmetric ? col_cb.data() : nullptr;
    const int nt = num_threads();
    std::vector<float> scratch((size_t)nt * C);
    double dscale = 0.0;

    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt) reduction(+ : dscale)
    {
        float* er = scratch.data() + (size_t)thread_id() * C;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b; ++r) {
            float* x = Sp + r * C;
            const int64_t gi = row0 + r;
            const Masks<LAB, EXCL> mk{kl, has_labels ? ql[gi] : 0, gi, in_batch_negatives};
            const float lse = st[2 * r] <= -1e30f ? kNegInf : st[2 * r];
            const float npos = st[2 * r + 1];
            const float gr = g[r];
            float acc = 0.f;
            if (pml) {
                if (npos == 0.f) {
                    acc = zero_row(x, C);  // no positive pair: dS = 0 (NaN if the row holds a NaN, see below)
                } else if (lse == kNegInf) {
                    // no negatives: every r_ip = 0; a NaN / inf positive logit still poisons its entry (0 * x)
#pragma omp simd reduction(+ : acc)
                    for (int64_t j = 0; j < m; ++j) {
                        const float s = x[j];
                        const float d = mk.pos(j) ? 0.f * s : 0.f;
                        acc += d * s;
                        x[j] = d;
                    }
                    for (int64_t j = m; j < C; ++j) x[j] = 0.f;  // (a bank makes the set non-empty: unreachable)
                } else {
                    // pass A: e_j for every column, T over the negatives
                    float T = 0.f;
#pragma omp simd reduction(+ : T)
                    for (int64_t j = 0; j < m; ++j) {
                        const bool p = mk.pos(j);
                        const float e = fast_exp(scale * x[j] - lse);
                        er[j] = e;
                        T += (mk.valid(j, p) && !p) ? e : 0.f;
                    }
#pragma omp simd reduction(+ : T)
                    for (int64_t j = m; j < C; ++j) {
                        const float e = fast_exp(scale * x[j] - lse);
                        er[j] = e;
                        T += e;
                    }
                    // r_p = sigmoid(lse + log T - x_p) = T / (T + e_p);  dS_p = -g r_p;  dS_n = g (sum_p r_p) e_n / T
                    float rsum = 0.f;
                    if (!LAB) {
                        if (!EXCL && gi < m) rsum = T / (T + er[gi]);
                    } else {
#pragma omp simd reduction(+ : rsum)
                        for (int64_t j = 0; j < m; ++j) rsum += mk.pos(j) ? T / (T + er[j]) : 0.f;
                    }
                    const float gn = gr * rsum / T;
#pragma omp simd reduction(+ : acc)
                    for (int64_t j = 0; j < m; ++j) {
                        const float s = x[j];
                        const bool p = mk.pos(j);
                        const bool va = mk.valid(j, p);
                        const float d = p ? -gr * (T / (T + er[j])) : (va ? gn * er[j] : 0.f);
                        acc += d * s;
                        x[j] = scale * d;
                    }
#pragma omp simd reduction(+ : acc)
                    for (int64_t j = m; j < C; ++j) {
                        const float s = x[j];
                        const float d = gn * er[j];
                        acc += d * s;
                        x[j] = scale * d;
                    }
                }
            } else if (fast) {
                const bool has_row = gi < m;              // npos = 1 exactly when the row has its diagonal
                const int64_t dg = has_row ? gi : m;      // the diagonal column (m if this row has none)
                const int64_t d1 = has_row ? gi + 1 : m;  // first column after it
                // factored: exp(x - lsec_j) = exp(x - lse_i) * exp(lse_i - R) * exp(R - lsec_j), with
                // col_cb_j = col_w_j exp(R - lsec_j) and R = min_j lsec_j (over columns with a gradient), so one
                // exponential per element; valid while exp(lse_i - R) <= e^40 (terms lost to the e^-87 underflow
                // of exp(x - lse_i) are then below e^-47 in absolute value).  NaN lse or R: not factored.
                const bool factored = symmetric && std::isfinite(col_ref) && (double)lse - col_ref <= kBwdFactorRange;
                const float s_diag = has_row ? x[gi] : 0.f;
                const float ed = has_row ? fast_exp(scale * s_diag - lse) : 0.f;
                float ddiag = 0.f;  // dS of the diagonal entry (row term + column term)
                if (factored || !symmetric) {
                    // pass A, in place: x_j <- e_j = exp(x_j - lse); T_n (all but the diagonal), sum e s, sum e cb s
                    const float a = factored ? (float)std::exp((double)lse - col_ref) : 0.f;
                    const int64_t end = symmetric ? m : C;
                    const float* cb = factored ? ccb : nullptr;
                    float Tn = 0.f, es = 0.f, ecs = 0.f;
                    if (has_row || factored) {
                        const RowSums r0 = row_exp_inplace(x, cb, 0, dg, scale, lse);
                        const RowSums r1 = row_exp_inplace(x, cb, d1, end, scale, lse);
                        Tn = r0.t + r1.t, es = r0.es + r1.es, ecs = r0.ecs + r1.ecs;
                    }
                    const float T = Tn + ed;
                    const float w = has_row ? gr / T : 0.f;
                    if (has_row || factored) {
                        // pass B: x_j <- scale e_j (w + a cb_j)
                        row_scale_inplace(x, cb, 0, dg, scale * w, scale * a);
                        row_scale_inplace(x, cb, d1, end, scale * w, scale * a);
                        acc = w * es + a * ecs;
                    } else {
                        acc = zero_row(x, C);  // no positive, no columns: the row's dS is 0
                    }
                    if (has_row) {
                        ddiag = -gr * (Tn / T);  // the diagonal's row term g (e_d / T - 1), without cancellation
                        if (factored) ddiag += cpk[gi] * (ed * a * ccb[gi]) - cpc[gi];
                    }
                } else {
                    // symmetric, lse spread too wide to factor: two exponentials per element, row exps in scratch
                    const float Tn = has_row ? row_exp_store(x, er, 0, dg, scale, lse) + row_exp_store(x, er, d1, m, scale, lse)
                                             : 0.f;
                    const float T = Tn + ed;
                    const float w = has_row ? gr / T : 0.f;
                    acc = row_two_exp(x, er, cw, clse, 0, dg, scale, w, has_row) +
                          row_two_exp(x, er, cw, clse, d1, m, scale, w, has_row);
                    if (has_row)
                        ddiag = -gr * (Tn / T) + (cpk[gi] * (cw[gi] * fast_exp(scale * s_diag - clse[gi])) - cpc[gi]);
                }
                if (has_row) {
                    acc += ddiag * s_diag;
                    x[gi] = scale * ddiag;
                }
            } else if (!symmetric) {
                const bool has_row = npos > 0.f;
                if (!has_row) {
                    acc = zero_row(x, C);  // no positive: the row's dS is 0
                } else {
                    // pass A, in place: x_j <- e_j over the valid set; sums for T and (want_dscale) for dscale
                    float Tn = 0.f, Tp = 0.f, esn = 0.f, esp = 0.f, ps = 0.f;
                    // Explicit lanes, not `omp simd reduction` (2026-12-01): under `omp simd` GCC 12 kept these
                    // masked reductions in per-lane stack arrays and, in the vector epilogue, read past them (stack
                    // garbage in the sums: wrong rows of dS, NaN, a segfault at M = 8192; caught by
                    // tests/test_infonce_cpp.py::test_every_diagonal_position and benches).  The inner fixed-width
                    // loop has no reduction to privatise and vectorises plainly.
                    float ln[kLanes] = {}, lp[kLanes] = {}, lsn[kLanes] = {}, lsp[kLanes] = {}, lps[kLanes] = {};
                    // (a macro, not a lambda: GCC 12 does not vectorise a lambda that updates captured arrays)
#define CG_LABEL_PASS_A(J, L, DSCALE)                                                                         \
    {                                                                                                        \
        const int64_t j_ = (J);                                                                              \
        const float s_ = x[j_];                                                                              \
        const bool p_ = mk.pos(j_);                                                                          \
        const bool va_ = mk.valid(j_, p_);                                                                   \
        const float e_ = va_ ? fast_exp(scale * s_ - lse) : 0.f;                                             \
        const float pf_ = p_ ? 1.f : 0.f, nf_ = 1.f - pf_;                                                   \
        ln[L] += nf_ * e_;                                                                                   \
        lp[L] += pf_ * e_;                                                                                   \
        if (DSCALE) {                                                                                        \
            lsn[L] += nf_ * (e_ * s_);                                                                       \
            lsp[L] += pf_ * (e_ * s_);                                                                       \
            lps[L] += pf_ * s_;                                                                              \
        }                                                                                                    \
        x[j_] = p_ ? -e_ : e_; /* the sign bit marks the positives for pass B (no second mask pass) */      \
    }
                    const int64_t mv = m - m % kLanes;
                    if (want_dscale) {
                        for (int64_t j0 = 0; j0 < mv; j0 += kLanes) {
#pragma omp simd
                            for (int l = 0; l < kLanes; ++l) CG_LABEL_PASS_A(j0 + l, l, true)
                        }
                        for (int64_t j = mv; j < m; ++j) CG_LABEL_PASS_A(j, 0, true)
                    } else {
                        for (int64_t j0 = 0; j0 < mv; j0 += kLanes) {
#pragma omp simd
                            for (int l = 0; l < kLanes; ++l) CG_LABEL_PASS_A(j0 + l, l, false)
                        }
                        for (int64_t j = mv; j < m; ++j) CG_LABEL_PASS_A(j, 0, false)
                    }
#undef CG_LABEL_PASS_A
                    for (int l = 0; l < kLanes; ++l) Tn += ln[l], Tp += lp[l], esn += lsn[l], esp += lsp[l], ps += lps[l];
#pragma omp simd reduction(+ : Tn, esn)
                    for (int64_t j = m; j < C; ++j) {
                        const float s = x[j];
                        const float e = fast_exp(scale * s - lse);
                        Tn += e;
                        esn += e * s;
                        x[j] = e;
                    }
                    const float T = Tn + Tp;
                    // external stats (renorm false): e_j is the softmax as is (T is this block's share of the row)
                    const float w = renorm ? gr / T : gr;
                    // positives: g (e_p / T - 1 / npos); with one positive -g T_n / T (no cancellation)
                    const bool lone = renorm && npos == 1.f;
                    const float kp = lone ? 0.f : 1.f;
                    const float cp = lone ? gr * (Tn / T) : gr / npos;
                    const float sw = scale * w, skp = scale * kp * w, scp = scale * cp;
                    // entries outside the valid set hold e = +0 -> 0 (a NaN row is poisoned as a whole below)
#pragma omp simd
                    for (int64_t j = 0; j < m; ++j) {
                        const float e = x[j];
                        x[j] = std::signbit(e) ? -e * skp - scp : e * sw;
                    }
#pragma omp simd
                    for (int64_t j = m; j < C; ++j) x[j] *= sw;
                    acc = w * (esn + kp * esp) - cp * ps;
                }
            } else {
                // symmetric with labels: row exponentials in scratch, the column exponential in the second pass
                const bool has_row = npos > 0.f;
                float Tn = 0.f, Tp = 0.f;
                if (has_row) {  // explicit lanes (see the label path above)
                    float ln[kLanes] = {}, lp[kLanes] = {};
                    const int64_t mv = m - m % kLanes;
                    for (int64_t j0 = 0; j0 < m; j0 += kLanes) {
                        const bool tail = j0 >= mv;
#pragma omp simd
                        for (int l = 0; l < kLanes; ++l) {
                            const int64_t j = j0 + l;
                            if (tail && j >= m) continue;
                            const bool p = mk.pos(j);
                            const bool va = mk.valid(j, p);
                            const float e = va ? fast_exp(scale * x[j] - lse) : 0.f;
                            const float pf = p ? 1.f : 0.f;
                            er[j] = e;
                            ln[l] += (1.f - pf) * e;
                            lp[l] += pf * e;
                        }
                    }
                    for (int l = 0; l < kLanes; ++l) Tn += ln[l], Tp += lp[l];
                }
                const float T = Tn + Tp;
                const float w = has_row ? (renorm ? gr / T : gr) : 0.f;
                const bool lone = renorm && npos == 1.f;
                const float kp = lone ? 0.f : 1.f;
                const float cp = !has_row ? 0.f : (lone ? gr * (Tn / T) : gr / npos);
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < m; ++j) {
                    const float s = x[j];
                    const float v = scale * s;
                    const bool p = mk.pos(j);
                    const bool va = mk.valid(j, p);
                    float rw = (has_row && va) ? w * er[j] : 0.f;
                    rw = p ? kp * rw - cp : rw;
                    float c = va ? cw[j] * fast_exp(v - clse[j]) : 0.f;
                    c = p ? cpk[j] * c - cpc[j] : c;
                    const float d = rw + c;
                    acc += d * s;
                    x[j] = scale * d;
                }
            }
            // Poison (issue 9 item 1): a NaN anywhere in the row's products, valid entry or not, makes the whole dS
            // row NaN.  The reference's gradient is NaN there too, through its softmax / where() backward (0 * NaN),
            // also for a row without positives; acc = sum_j dS_ij S_ij carries the NaN (0 * NaN terms included).
            if (std::isnan(acc))
                for (int64_t j = 0; j < C; ++j) x[j] = std::numeric_limits<float>::quiet_NaN();
            dscale += acc;
        }
    }
    return dscale;
}

double infonce_bwd_block(f32arr S, double scale_d, int64_t row0, int64_t m, i64arr q_labels, i64arr k_labels,
                         bool has_labels, bool exclude_self, bool in_batch_negatives, bool pml, bool symmetric,
                         f32arr row_stats, f32arr g_row, f32arr col_lse, f32arr col_w, f32arr col_pk, f32arr col_pc,
                         f32arr col_cb, double col_ref, bool want_dscale, bool renormalize) {
    auto run = [&](auto lab, auto excl) {
        return infonce_bwd_impl<decltype(lab)::value, decltype(excl)::value>(
            S, scale_d, row0, m, q_labels, k_labels, in_batch_negatives, pml, symmetric, row_stats, g_row, col_lse,
            col_w, col_pk, col_pc, col_cb, col_ref, want_dscale, renormalize);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (has_labels) return exclude_self ? run(T{}, T{}) : run(T{}, F{});
    return exclude_self ? run(F{}, T{}) : run(F{}, F{});
}

// ----------------------------------------------------------------------------------------------------
// SigLIP forward epilogue: row_loss (b,) = sum_j softplus(-y_ij (scale S_ij + bias)).
void siglip_fwd_block(f32arr S, double scale_d, double bias_d, int64_t row0, f32arr row_loss) {
    check(S.ndim() == 2, "S must be 2-D");
    const int64_t b = S.shape(0), C = S.shape(1);
    check_shape(row_loss, {b}, "row_loss");
    const float scale = (float)scale_d, bias = (float)bias_d;
    const float* Sp = S.data();
    float* loss = row_loss.mutable_data();
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < b; ++r) {
        const float* x = Sp + r * C;
        const int64_t gi = row0 + r;
        const int64_t d = gi < C ? gi : C;  // the diagonal column (C if this row has none)
        float acc = 0.f;
        // y = -1 off the diagonal: softplus(z)
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < d; ++j) acc += fast_softplus(scale * x[j] + bias);
#pragma omp simd reduction(+ : acc)
        for (int64_t j = d + 1; j < C; ++j) acc += fast_softplus(scale * x[j] + bias);
        double l = acc;
        if (gi < C) l += softplus_scalar(-((double)scale * x[gi] + (double)bias));  // y = +1: softplus(-z)
        loss[r] = (float)l;
    }
}

// SigLIP backward epilogue: S (b, C) raw dots in, scale * dZ out; returns (sum dZ S, sum dZ).
py::tuple siglip_bwd_block(f32arr S, double scale_d, double bias_d, int64_t row0, f32arr g_row) {
    check(S.ndim() == 2, "S must be 2-D");
    const int64_t b = S.shape(0), C = S.shape(1);
    check_shape(g_row, {b}, "g_row");
    const float scale = (float)scale_d, bias = (float)bias_d;
    float* Sp = S.mutable_data();
    const float* g = g_row.data();
    double ds = 0.0, db = 0.0;
    {
        py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) reduction(+ : ds, db)
        for (int64_t r = 0; r < b; ++r) {
            float* x = Sp + r * C;
            const int64_t gi = row0 + r;
            const float gr = g[r];
            float a_s = 0.f, a_b = 0.f;
            const int64_t dg = gi < C ? gi : C;  // the diagonal column (C if this row has none)
            // y = -1 off the diagonal: dZ = g sigmoid(z) = g / (1 + exp(-z))
#pragma omp simd reduction(+ : a_s, a_b)
            for (int64_t j = 0; j < dg; ++j) {
                const float s = x[j];
                const float d = gr / (1.0f + fast_exp(-(scale * s + bias)));
                a_s += d * s;
                a_b += d;
                x[j] = scale * d;
            }
#pragma omp simd reduction(+ : a_s, a_b)
            for (int64_t j = dg + 1; j < C; ++j) {
                const float s = x[j];
                const float d = gr / (1.0f + fast_exp(-(scale * s + bias)));
                a_s += d * s;
                a_b += d;
                x[j] = scale * d;
            }
            double dsr = a_s, dbr = a_b;
            if (gi < C) {  // y = +1: dZ = -g sigmoid(-z)
                const float s = x[gi];
                const float d = -gr * sigmoid_scalar(-(scale * s + bias));
                dsr += (double)d * s;
                dbr += d;
                x[gi] = scale * d;
            }
            ds += dsr;
            db += dbr;
        }
    }
    return py::make_tuple(ds, db);
}

// ----------------------------------------------------------------------------------------------------
// Route (b) for the logits product (2026-11-24): S = Q_blk K^T with a register-blocked AVX-512 micro-kernel
// (12 rows x 32 columns, 24 zmm accumulators) over K packed once per call into 32-column panels
// (ceil(M/32), D, 32), zero-padded.  Measured against MKL's sgemm (torch.matmul) on the 2-core Zen4 machine
// in benches/cpu_infonce.py; the wrapper picks it when the extension was built with AVX-512.
// keys (C, D) float32 -> panels (ceil(C/32), D, 32)
void pack_keys(f32arr keys, f32arr panels) {
    check(keys.ndim() == 2, "keys must be 2-D");
    const int64_t C = keys.shape(0), D = keys.shape(1), np_ = (C + 31) / 32;
    check_shape(panels, {np_, D, 32}, "panels");
    const float* k = keys.data();
    float* p = panels.mutable_data();
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
    for (int64_t pn = 0; pn < np_; ++pn)
        for (int64_t c = 0; c < 32; ++c) {
            const int64_t j = pn * 32 + c;
            for (int64_t d = 0; d < D; ++d) p[(pn * D + d) * 32 + c] = j < C ? k[j * D + d] : 0.f;
        }
}

#ifdef __AVX512F__
template <int R>
static inline void qkt_micro(const float* a, int64_t D, const float* bp, float* c, int64_t ldc, __mmask16 m0,
                             __mmask16 m1) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 b0 = _mm512_loadu_ps(bp + d * 32), b1 = _mm512_loadu_ps(bp + d * 32 + 16);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            const __m512 av = _mm512_set1_ps(a[r * D + d]);
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
        _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
    }
}

template <int R>
static void qkt_rows(const float* a, int64_t D, const float* bp, float* c, int64_t ldc, __mmask16 m0, __mmask16 m1,
                     int64_t rows) {
    if constexpr (R > 0) {
        if (rows == R) return qkt_micro<R>(a, D, bp, c, ldc, m0, m1);
        return qkt_rows<R - 1>(a, D, bp, c, ldc, m0, m1, rows);
    }
}
#endif

bool has_avx512_product() {
#ifdef __AVX512F__
    return true;
#else
    return false;
#endif
}

// S (b, C) = q[row0 : row0 + b] @ keys^T from the packed panels of the C keys.
void qkt_block(f32arr q, int64_t row0, f32arr panels, f32arr S) {
    check(q.ndim() == 2 && S.ndim() == 2 && panels.ndim() == 3, "q, S must be 2-D and panels 3-D");
    const int64_t D = q.shape(1), b = S.shape(0), C = S.shape(1), np_ = (C + 31) / 32;
    check(row0 >= 0 && row0 + b <= q.shape(0), "rows out of range");
    check_shape(panels, {np_, D, 32}, "panels");
#ifdef __AVX512F__
    const float* a = q.data() + row0 * D;
    const float* p = panels.data();
    float* c = S.mutable_data();
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
    for (int64_t pn = 0; pn < np_; ++pn) {
        const int64_t left = C - pn * 32;
        const __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : (left <= 16 ? (__mmask16)0 : (__mmask16)((1u << (left - 16)) - 1u));
        for (int64_t i = 0; i < b; i += 12) {
            const int64_t rows = b - i < 12 ? b - i : 12;
            qkt_rows<12>(a + i * D, D, p + pn * D * 32, c + i * C + pn * 32, C, m0, m1, rows);
        }
    }
#else
    (void)q; (void)row0; (void)panels; (void)S;
    check(false, "qkt_block needs a build with AVX-512 (-march=native on an AVX-512 machine)");
#endif
}

int omp_threads() { return num_threads(); }

PYBIND11_MODULE(_cpp_infonce, mod) {
    mod.doc() = "Fused CPU epilogues (OpenMP) of the InfoNCE / CLIP / SigLIP core; GEMMs run in torch's BLAS.";
    mod.def("infonce_fwd_block", &infonce_fwd_block, py::arg("S").noconvert(), py::arg("scale"), py::arg("row0"),
            py::arg("m"), py::arg("q_labels").noconvert(), py::arg("k_labels").noconvert(), py::arg("has_labels"),
            py::arg("exclude_self"), py::arg("in_batch_negatives"), py::arg("pml"), py::arg("symmetric"),
            py::arg("row_loss").noconvert(), py::arg("row_stats").noconvert(), py::arg("col_state").noconvert());
    mod.def("infonce_col_finalize", &infonce_col_finalize, py::arg("col_state").noconvert(),
            py::arg("col_loss").noconvert(), py::arg("col_stats").noconvert());
    mod.def("infonce_bwd_block", &infonce_bwd_block, py::arg("S").noconvert(), py::arg("scale"), py::arg("row0"),
            py::arg("m"), py::arg("q_labels").noconvert(), py::arg("k_labels").noconvert(), py::arg("has_labels"),
            py::arg("exclude_self"), py::arg("in_batch_negatives"), py::arg("pml"), py::arg("symmetric"),
            py::arg("row_stats").noconvert(), py::arg("g_row").noconvert(), py::arg("col_lse").noconvert(),
            py::arg("col_w").noconvert(), py::arg("col_pk").noconvert(), py::arg("col_pc").noconvert(),
            py::arg("col_cb").noconvert(), py::arg("col_ref"), py::arg("want_dscale") = true,
            py::arg("renormalize") = true);
    mod.def("infonce_col_norm_block", &infonce_col_norm_block, py::arg("S").noconvert(), py::arg("scale"),
            py::arg("row0"), py::arg("q_labels").noconvert(), py::arg("k_labels").noconvert(), py::arg("has_labels"),
            py::arg("in_batch_negatives"), py::arg("col_lse").noconvert(), py::arg("col_acc").noconvert());
    mod.def("siglip_fwd_block", &siglip_fwd_block, py::arg("S").noconvert(), py::arg("scale"), py::arg("bias"),
            py::arg("row0"), py::arg("row_loss").noconvert());
    mod.def("siglip_bwd_block", &siglip_bwd_block, py::arg("S").noconvert(), py::arg("scale"), py::arg("bias"),
            py::arg("row0"), py::arg("g_row").noconvert());
    mod.def("omp_threads", &omp_threads, "OpenMP threads the epilogues use");
    mod.def("has_avx512_product", &has_avx512_product, "qkt_block is compiled (AVX-512 build)");
    mod.def("pack_keys", &pack_keys, py::arg("keys").noconvert(), py::arg("panels").noconvert());
    mod.def("qkt_block", &qkt_block, py::arg("q").noconvert(), py::arg("row0"), py::arg("panels").noconvert(),
            py::arg("S").noconvert());
}
