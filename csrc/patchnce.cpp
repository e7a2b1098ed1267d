// contrastgen._cpp_patchnce: fused CPU PatchNCE (CUT), every layer in one call per direction.
//
// Math: the header of kernels/patchnce.py (spec: contrastgen/reference/patchnce.py).  Per layer l, queries q and keys
// k (N_l x C_l, N_l = groups * n_l), per group s_ij = q_i.k_j, x = s / tau, the row's logits are every x_ij plus
// CUT's fill -10 / tau, loss_i = lse_i - x_ii, and with P_ij = exp(x_ij - lse_i):
//     gq_i = (sum_j P_ij k_j - k_i) / tau       (dL_l/dq_i = gq_i / N_l; computed with the forward)
//     dk_j = w_l / tau (sum_i P_ij q_i - q_j)   (the backward's column pass, only when a key needs a gradient)
//
// Design (2026-12-01).  One OpenMP parallel region per call (one fork/join): first the key (or query) tiles of
// every (layer, group) are packed into NR-column panels (d-major, zero-padded to a multiple of NR rows), then the
// work items -- (layer, group, block of R rows) over every layer -- are scheduled dynamically.  A forward item
// keeps its R x C accumulator O and its running (max, sum) on the thread, and loops over column chunks of NC keys:
//     S = Q_blk K_chunk^T          register-blocked micro-kernel (MR x NR tile, MR broadcasts x 2 vectors per d)
//     online log-sum-exp over the chunk (exp in place in S), O *= alpha
//     O += S K_chunk               the same micro-kernel shape, K rows read in place (stride C)
// so loss and gq cost 2 matmul-equivalents and O(threads (R C + R NC)) scratch; the backward of the CUT default
// (keys detached) is the scaling dq = w_l gq.  Vectors are GCC vector extensions of 64 bytes (AVX-512 with
// -march=native, pairs of AVX2 registers otherwise), float or double: the same code serves float32 (the bf16 /
// fp16 inputs are converted to float32 by the launcher) and float64 (gradcheck).  Measured on the 2-core
// Xeon (AVX-512) machine: the micro-kernels run at torch.mm's (MKL) speed on 252 x 256 x 256 blocks, one thread
// (162 vs 159 GFLOP/s for S, 166 vs 162 for O; under load ~2), so no BLAS is linked.
//
// Non-finite input: the running max skips a NaN, but exp(NaN - m) = NaN enters the sum, so a NaN/Inf in a row's
// logits gives a NaN/Inf lse, loss and gradient row (a NaN is never read as an empty set); the fill entry keeps
// the initial max finite.
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
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int MR = 12;       // rows of a micro tile
constexpr int64_t R = 48;    // rows (queries, or keys in the column pass) of a work item
constexpr int64_t NC = 256;  // columns of a chunk (a multiple of every NR)
constexpr double FILL = -10.0;

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("contrastgen._cpp_patchnce: " + msg);
}

template <typename T> struct Vec {
  // unaligned, may alias T: loads / stores through pointer casts compile to single vmovups (a memcpy-based load
  // was split into 32-byte copies through the stack under GCC's default prefer-vector-width=256: 5x slower)
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  static constexpr int W = 64 / sizeof(T);
};
template <typename T> using V = typename Vec<T>::type;
template <typename T> constexpr int NR = 2 * Vec<T>::W;  // panel width: two vectors (32 floats, 16 doubles)

template <typename T> inline V<T> vload(const T* p) { return *reinterpret_cast<const V<T>*>(p); }
template <typename T> inline void vstore(T* p, V<T> v) { *reinterpret_cast<V<T>*>(p) = v; }
// broadcast: one vbroadcastss / vbroadcastsd with AVX-512 (`V<T>{} + x` costs an extra add, for 0 + -0)
template <typename T> inline V<T> vsplat(T x) { return V<T>{} + x; }
#ifdef __AVX512F__
template <> inline V<float> vsplat<float>(float x) { return (V<float>)_mm512_set1_ps(x); }
template <> inline V<double> vsplat<double>(double x) { return (V<double>)_mm512_set1_pd(x); }
#endif

// exp(x): float, Cephes-style polynomial after range reduction (~2 ulp), 0 below -87.3 (exp(-inf) = 0), NaN in ->
// NaN out, +inf -> +inf; vectorisable under `omp simd`.  double: libm.
inline float exp_scalar(float x) {
  float xc = x < -87.3f ? -87.3f : x;  // branch-free (blends under omp simd); a NaN stays NaN
  xc = xc > 88.7f ? 88.7f : xc;
  const float t = xc * 1.44269504088896341f;
  const float fn = std::nearbyint(t);
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
  // 2^n as two factors so that n = 128 (x near 88.7) does not overflow the exponent field
  const int32_t n1 = n / 2, n2 = n - n1;
  const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
  float f1, f2;
  std::memcpy(&f1, &b1, 4);
  std::memcpy(&f2, &b2, 4);
  float res = p * f1 * f2;
  res = x > 88.7f ? std::numeric_limits<float>::infinity() : res;
  return x < -87.3f ? 0.0f : res;
}
inline double exp_scalar(double x) { return std::exp(x); }

// ------------------------------------------------------------------------------------------------ micro-kernels
// C[r][0, NR) = sum_d A[r lda + d] Bp[d NR + c]  (r < rows <= MR; Bp one packed panel; all NR columns stored)
template <typename T, int M>
inline void abt_micro(const T* a, int64_t lda, int64_t D, const T* bp, T* c, int64_t ldc) {
  constexpr int W = Vec<T>::W;
  V<T> acc0[M], acc1[M];
  for (int r = 0; r < M; ++r) acc0[r] = V<T>{}, acc1[r] = V<T>{};
  for (int64_t d = 0; d < D; ++d) {
    const V<T> b0 = vload(bp + d * NR<T>), b1 = vload(bp + d * NR<T> + W);
#pragma GCC unroll 12
    for (int r = 0; r < M; ++r) {
      const V<T> av = vsplat(a[r * lda + d]);
      acc0[r] += av * b0;
      acc1[r] += av * b1;
    }
  }
  for (int r = 0; r < M; ++r) {
    vstore(c + r * ldc, acc0[r]);
    vstore(c + r * ldc + W, acc1[r]);
  }
}

template <typename T, int M = MR>
inline void abt_rows(const T* a, int64_t lda, int64_t D, const T* bp, T* c, int64_t ldc, int rows) {
  if constexpr (M > 0) {
    if (rows == M) return abt_micro<T, M>(a, lda, D, bp, c, ldc);
    return abt_rows<T, M - 1>(a, lda, D, bp, c, ldc, rows);
  }
}

// C[r][0, NR) += sum_{j < nj} A[r lda + j] B[j ldb + c]  (r < rows <= MR; B rows read in place).  The
// accumulators stay in registers (one code path per function: GCC spilled them when a partial-panel branch
// shared the arrays).
template <typename T, int M>
inline void ab_micro(const T* a, int64_t lda, int64_t nj, const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int W = Vec<T>::W;
  V<T> acc0[M], acc1[M];
  for (int r = 0; r < M; ++r) acc0[r] = V<T>{}, acc1[r] = V<T>{};
  for (int64_t j = 0; j < nj; ++j) {
    const V<T> b0 = vload(b + j * ldb), b1 = vload(b + j * ldb + W);
#pragma GCC unroll 12
    for (int r = 0; r < M; ++r) {
      const V<T> av = vsplat(a[r * lda + j]);
      acc0[r] += av * b0;
      acc1[r] += av * b1;
    }
  }
  for (int r = 0; r < M; ++r) {
    vstore(c + r * ldc, vload(c + r * ldc) + acc0[r]);
    vstore(c + r * ldc + W, vload(c + r * ldc + W) + acc1[r]);
  }
}

// the same for a partial panel of w < NR columns (C not a multiple of NR): scalar accumulation
template <typename T>
void ab_partial(const T* a, int64_t lda, int64_t nj, const T* b, int64_t ldb, T* c, int64_t ldc, int w, int rows) {
  for (int r = 0; r < rows; ++r) {
    T acc[NR<T>] = {};
    for (int64_t j = 0; j < nj; ++j) {
      const T av = a[r * lda + j];
      for (int k = 0; k < w; ++k) acc[k] += av * b[j * ldb + k];
    }
    for (int k = 0; k < w; ++k) c[r * ldc + k] += acc[k];
  }
}

template <typename T, int M = MR>
inline void ab_rows(const T* a, int64_t lda, int64_t nj, const T* b, int64_t ldb, T* c, int64_t ldc, int w, int rows) {
  if (w < NR<T>) return ab_partial<T>(a, lda, nj, b, ldb, c, ldc, w, rows);
  if constexpr (M > 0) {
    if (rows == M) return ab_micro<T, M>(a, lda, nj, b, ldb, c, ldc);
    return ab_rows<T, M - 1>(a, lda, nj, b, ldb, c, ldc, w, rows);
  }
}

// S (rows x ldS, first ceil(nc / NR) panels) = A (rows x D) Panels^T
template <typename T>
void product_abt(const T* a, int64_t D, int64_t rows, const T* panels, int64_t npan, T* S, int64_t ldS) {
  for (int64_t i = 0; i < rows; i += MR) {
    const int mr = (int)std::min<int64_t>(MR, rows - i);
    for (int64_t p = 0; p < npan; ++p)
      abt_rows<T>(a + i * D, D, D, panels + p * D * NR<T>, S + i * ldS + p * NR<T>, ldS, mr);
  }
}

// O (rows x C) += S (rows x nj, stride ldS) B (nj x C)
template <typename T>
void product_ab(const T* S, int64_t ldS, int64_t rows, int64_t nj, const T* b, int64_t C, T* O) {
  for (int64_t i = 0; i < rows; i += MR) {
    const int mr = (int)std::min<int64_t>(MR, rows - i);
    for (int64_t c0 = 0; c0 < C; c0 += NR<T>) {
      const int w = (int)std::min<int64_t>(NR<T>, C - c0);
      ab_rows<T>(S + i * ldS, ldS, nj, b + c0, C, O + i * C + c0, C, w, mr);
    }
  }
}

// ------------------------------------------------------------------------------------------------ layers
template <typename T> struct Layer {
  const T* q;        // (N, C) queries
  const T* k;        // (N, C) keys
  const T* panels;   // packed operand of S: (groups, ceil(n / NR), C, NR)
  int64_t n, C;      // group size, channels
  int64_t row0;      // offset of the layer's rows in the flat per-row arrays
  T* out;            // forward: gq (N, C) or null; backward: dk (N, C) or null
  const T* gq;       // backward: saved gq (N, C)
  T* dq;             // backward: dq (N, C)
  int64_t npan() const { return (n + NR<T> - 1) / NR<T>; }
};

template <typename T> const T* carray(const py::handle& h, const char* what, int64_t* rows, int64_t* cols) {
  check(py::isinstance<py::array>(h), std::string(what) + " must be numpy arrays");
  py::array a = py::reinterpret_borrow<py::array>(h);
  check(a.dtype().is(py::dtype::of<T>()), std::string(what) + ": wrong dtype");
  check((a.flags() & py::array::c_style) != 0, std::string(what) + " must be C-contiguous");
  if (rows) {
    check(a.ndim() == 2, std::string(what) + " must be 2-D (N, C)");
    *rows = a.shape(0);
    *cols = a.shape(1);
  }
  return static_cast<const T*>(a.data());
}

template <typename T> T* marray(const py::handle& h, const char* what, int64_t expect) {
  check(py::isinstance<py::array>(h), std::string(what) + " must be numpy arrays");
  py::array a = py::reinterpret_borrow<py::array>(h);
  check(a.dtype().is(py::dtype::of<T>()), std::string(what) + ": wrong dtype");
  check((a.flags() & py::array::c_style) != 0 && a.writeable(), std::string(what) + " must be writeable C-contiguous");
  check(expect < 0 || a.size() == expect, std::string(what) + ": wrong size");
  return static_cast<T*>(a.mutable_data());
}

// Layers of a call: q, k (N, C) per layer, panels (groups * npan * C * NR,) per layer.
template <typename T>
std::vector<Layer<T>> make_layers(const py::list& qs, const py::list& ks, const py::list& panels, int64_t groups) {
  const size_t L = qs.size();
  check(L > 0 && ks.size() == L && panels.size() == L, "qs, ks and panels must be non-empty lists of one length");
  std::vector<Layer<T>> out(L);
  int64_t row0 = 0;
  for (size_t l = 0; l < L; ++l) {
    int64_t N, C, Nk, Ck;
    Layer<T>& y = out[l];
    y.q = carray<T>(qs[l], "qs", &N, &C);
    y.k = carray<T>(ks[l], "ks", &Nk, &Ck);
    check(N == Nk && C == Ck, "query and key of a layer must have one shape");
    check(groups > 0 && N % groups == 0 && N > 0 && C > 0, "rows must be a positive multiple of groups");
    y.n = N / groups;
    y.C = C;
    y.row0 = row0;
    row0 += N;
    py::array p = py::reinterpret_borrow<py::array>(panels[l]);
    check(p.size() == 0 || p.size() == groups * y.npan() * C * NR<T>, "panel buffer of the wrong size");
    y.panels = p.size() ? marray<T>(panels[l], "panels", -1) : nullptr;
    y.out = nullptr;
    y.gq = nullptr;
    y.dq = nullptr;
  }
  return out;
}

int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// pack rows [g n, (g + 1) n) of src (N x C) into the panels of group g: panel p holds rows p NR .. p NR + NR - 1
// as (C, NR), zero-padded past n.  Called inside the parallel region (omp for over (layer, group, panel)).
template <typename T> void pack_all(const std::vector<Layer<T>>& layers, int64_t groups, bool from_queries) {
  std::vector<int64_t> start(layers.size() + 1, 0);
  for (size_t l = 0; l < layers.size(); ++l) start[l + 1] = start[l] + groups * layers[l].npan();
#pragma omp for schedule(static)
  for (int64_t it = 0; it < start.back(); ++it) {
    const size_t l = std::upper_bound(start.begin(), start.end(), it) - start.begin() - 1;
    const Layer<T>& y = layers[l];
    const int64_t gp = it - start[l], g = gp / y.npan(), p = gp % y.npan();
    const T* src = (from_queries ? y.q : y.k) + g * y.n * y.C;
    T* dst = const_cast<T*>(y.panels) + gp * y.C * NR<T>;
    for (int c = 0; c < NR<T>; ++c) {
      const int64_t j = p * NR<T> + c;
      if (j < y.n)
        for (int64_t d = 0; d < y.C; ++d) dst[d * NR<T> + c] = src[j * y.C + d];
      else
        for (int64_t d = 0; d < y.C; ++d) dst[d * NR<T> + c] = T(0);
    }
  }
}

struct Item { int32_t layer; int64_t grp, r0, rows; };

template <typename T> std::vector<Item> items_of(const std::vector<Layer<T>>& layers, int64_t groups) {
  std::vector<Item> items;
  for (size_t l = 0; l < layers.size(); ++l)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t r0 = 0; r0 < layers[l].n; r0 += R)
        items.push_back({(int32_t)l, g, r0, std::min<int64_t>(R, layers[l].n - r0)});
  return items;
}

// ------------------------------------------------------------------------------------------------ forward
// One item: rows r0 .. r0 + rows of group g.  Writes per-row loss / lse / dlt (flat, at row0 + g n + r) and gq.
template <typename T>
void fwd_item(const Layer<T>& y, const Item& it, T inv_tau, bool need_dq, bool need_dt, std::vector<T>& S,
              std::vector<T>& O, double* row_loss, T* lse_out, double* row_dlt) {
  const int64_t n = y.n, C = y.C, rows = it.rows;
  const T* Q = y.q + (it.grp * n + it.r0) * C;
  const T* Kg = y.k + it.grp * n * C;
  const T* Pg = y.panels + it.grp * y.npan() * C * NR<T>;
  const T fill = T(FILL) * inv_tau;
  T m[R], l[R], ax[R], pos[R];
  for (int64_t r = 0; r < rows; ++r) m[r] = fill, l[r] = T(1), ax[r] = fill, pos[r] = T(0);
  if (need_dq) std::fill(O.begin(), O.begin() + rows * C, T(0));
  for (int64_t c0 = 0; c0 < n; c0 += NC) {
    const int64_t nc = std::min<int64_t>(NC, n - c0);
    product_abt<T>(Q, C, rows, Pg + (c0 / NR<T>) * C * NR<T>, (nc + NR<T> - 1) / NR<T>, S.data(), NC);
    for (int64_t r = 0; r < rows; ++r) {
      T* x = S.data() + r * NC;
      T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < nc; ++j) {
        x[j] *= inv_tau;
        mx = x[j] > mx ? x[j] : mx;
      }
      const int64_t jd = it.r0 + r - c0;
      if (jd >= 0 && jd < nc) pos[r] = x[jd];
      const T mnew = mx > m[r] ? mx : m[r];
      const T alpha = exp_scalar(m[r] - mnew);
      T sum = 0, sx = 0;
#pragma omp simd reduction(+ : sum, sx)
      for (int64_t j = 0; j < nc; ++j) {
        const T e = exp_scalar(x[j] - mnew);
        sum += e;
        sx += e * x[j];
        x[j] = e;
      }
      l[r] = l[r] * alpha + sum;
      ax[r] = ax[r] * alpha + sx;
      if (need_dq && !(alpha == T(1))) {
        T* o = O.data() + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] *= alpha;
      }
      m[r] = mnew;
    }
    if (need_dq) product_ab<T>(S.data(), NC, rows, nc, Kg + c0 * C, C, O.data());
  }
  const int64_t base = y.row0 + it.grp * n + it.r0;
  for (int64_t r = 0; r < rows; ++r) {
    const T lse = m[r] + std::log(l[r]);
    row_loss[base + r] = (double)(lse - pos[r]);
    if (lse_out) lse_out[base + r] = lse;
    if (need_dt) row_dlt[base + r] = (double)(ax[r] / l[r] - pos[r]);
    if (need_dq) {
      const T inv_l = T(1) / l[r];
      const T* kd = Kg + (it.r0 + r) * C;
      const T* o = O.data() + r * C;
      T* g = y.out + (it.grp * n + it.r0 + r) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) g[c] = (o[c] * inv_l - kd[c]) * inv_tau;
    }
  }
}

// fwd(qs, ks, panels, groups, inv_tau, need_dq, need_dt, gq, lse, layer_loss, layer_dlt, threads)
//   qs / ks: (N_l, C_l) per layer; panels: per layer (groups ceil(n_l / NR) C_l NR,) scratch for the packed keys;
//   gq: per layer (N_l, C_l) output (empty list without need_dq); lse: (sum N_l,) output or an empty array;
//   layer_loss / layer_dlt: (L,) float64 outputs = mean_i loss_i and mean_i (E_P[x]_i - x_ii) per layer.
template <typename T>
void fwd_impl(const py::list& qs, const py::list& ks, const py::list& panels, int64_t groups, double inv_tau_d,
              bool need_dq, bool need_dt, const py::list& gq, const py::array& lse, const py::array& layer_loss,
              const py::array& layer_dlt, int threads) {
  std::vector<Layer<T>> layers = make_layers<T>(qs, ks, panels, groups);
  const size_t L = layers.size();
  int64_t total_rows = 0;
  for (auto& y : layers) total_rows += groups * y.n, check(y.panels != nullptr, "fwd needs the panel buffers");
  check(!need_dq || gq.size() == L, "gq must hold one array per layer");
  for (size_t l = 0; need_dq && l < L; ++l)
    layers[l].out = marray<T>(gq[l], "gq", groups * layers[l].n * layers[l].C);
  T* lse_out = lse.size() ? marray<T>(lse, "lse", total_rows) : nullptr;
  double* ll = marray<double>(layer_loss, "layer_loss", (int64_t)L);
  double* ld = marray<double>(layer_dlt, "layer_dlt", (int64_t)L);
  const std::vector<Item> items = items_of(layers, groups);
  std::vector<double> row_loss(total_rows), row_dlt(need_dt ? total_rows : 0);
  int64_t cmax = 0;
  for (auto& y : layers) cmax = std::max(cmax, y.C);
  const T inv_tau = (T)inv_tau_d;
  const int nt = resolve_threads(threads);
  {
    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
    {
      pack_all(layers, groups, false);
      std::vector<T> S(R * NC), O(need_dq ? R * cmax : 0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < (int64_t)items.size(); ++i)
        fwd_item<T>(layers[items[i].layer], items[i], inv_tau, need_dq, need_dt, S, O, row_loss.data(), lse_out,
                    row_dlt.data());
    }
  }
  for (size_t l = 0; l < L; ++l) {  // fixed summation order: deterministic
    const int64_t N = groups * layers[l].n, r0 = layers[l].row0;
    double a = 0, b = 0;
    for (int64_t r = 0; r < N; ++r) a += row_loss[r0 + r];
    if (need_dt)
      for (int64_t r = 0; r < N; ++r) b += row_dlt[r0 + r];
    ll[l] = a / (double)N;
    ld[l] = b / (double)N;
  }
}

// ------------------------------------------------------------------------------------------------ backward
// Column item: keys r0 .. r0 + rows of group g: dk_j = w / tau sum_i (P_ij - [i = j]) q_i.
template <typename T>
void dk_item(const Layer<T>& y, const Item& it, T inv_tau, T w, const T* lse, std::vector<T>& S, std::vector<T>& O) {
  const int64_t n = y.n, C = y.C, rows = it.rows;
  const T* Kb = y.k + (it.grp * n + it.r0) * C;
  const T* Qg = y.q + it.grp * n * C;
  const T* Pg = y.panels + it.grp * y.npan() * C * NR<T>;
  const T* lg = lse + y.row0 + it.grp * n;
  std::fill(O.begin(), O.begin() + rows * C, T(0));
  for (int64_t c0 = 0; c0 < n; c0 += NC) {
    const int64_t nc = std::min<int64_t>(NC, n - c0);
    product_abt<T>(Kb, C, rows, Pg + (c0 / NR<T>) * C * NR<T>, (nc + NR<T> - 1) / NR<T>, S.data(), NC);
    for (int64_t r = 0; r < rows; ++r) {
      T* x = S.data() + r * NC;
      const T* lc = lg + c0;
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) x[j] = exp_scalar(x[j] * inv_tau - lc[j]);
      const int64_t jd = it.r0 + r - c0;
      if (jd >= 0 && jd < nc) x[jd] -= T(1);
    }
    product_ab<T>(S.data(), NC, rows, nc, Qg + c0 * C, C, O.data());
  }
  const T f = w * inv_tau;
  for (int64_t r = 0; r < rows; ++r) {
    const T* o = O.data() + r * C;
    T* d = y.out + (it.grp * n + it.r0 + r) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) d[c] = o[c] * f;
  }
}

// bwd(qs, ks, panels, groups, inv_tau, w, gq, dq, lse, dk, threads)
//   w: (L,) float64 per-layer weights (upstream gradient / N_l [/ L]); gq / dq: per layer (N_l, C_l) (empty lists:
//   no dq); lse: (sum N_l,); dk: per layer (N_l, C_l) outputs (empty list: no dk; panels then unused).
template <typename T>
void bwd_impl(const py::list& qs, const py::list& ks, const py::list& panels, int64_t groups, double inv_tau_d,
              const py::array& w_arr, const py::list& gq, const py::list& dq, const py::array& lse, const py::list& dk,
              int threads) {
  std::vector<Layer<T>> layers = make_layers<T>(qs, ks, panels, groups);
  const size_t L = layers.size();
  const bool need_dq = gq.size() > 0, need_dk = dk.size() > 0;
  check(!need_dq || (gq.size() == L && dq.size() == L), "gq and dq must hold one array per layer");
  check(!need_dk || dk.size() == L, "dk must hold one array per layer");
  for (auto& y : layers) check(!need_dk || y.panels != nullptr, "dk needs the panel buffers");
  int64_t total_rows = 0;
  for (auto& y : layers) total_rows += groups * y.n;
  const double* w = carray<double>(w_arr, "w", nullptr, nullptr);
  check(w_arr.size() == (int64_t)L, "w must have one weight per layer");
  const T* lse_p = need_dk ? carray<T>(lse, "lse", nullptr, nullptr) : nullptr;
  check(!need_dk || lse.size() == total_rows, "lse has the wrong size");
  for (size_t l = 0; l < L; ++l) {
    const int64_t e = groups * layers[l].n * layers[l].C;
    if (need_dq) {
      int64_t a, b;
      layers[l].gq = carray<T>(gq[l], "gq", &a, &b);
      check(a * b == e, "gq has the wrong size");
      layers[l].dq = marray<T>(dq[l], "dq", e);
    }
    if (need_dk) layers[l].out = marray<T>(dk[l], "dk", e);
  }
  std::vector<int64_t> estart(L + 1, 0);
  for (size_t l = 0; l < L; ++l) estart[l + 1] = estart[l] + groups * layers[l].n * layers[l].C;
  const std::vector<Item> items = need_dk ? items_of(layers, groups) : std::vector<Item>();
  int64_t cmax = 0;
  for (auto& y : layers) cmax = std::max(cmax, y.C);
  const T inv_tau = (T)inv_tau_d;
  const int nt = resolve_threads(threads);
  constexpr int64_t EB = 16384;  // elements per dq-scaling chunk
  const int64_t nchunks = need_dq ? (estart[L] + EB - 1) / EB : 0;
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
  {
    if (need_dk) {
      pack_all(layers, groups, true);
      std::vector<T> S(R * NC), O(R * cmax);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t i = 0; i < (int64_t)items.size(); ++i)
        dk_item<T>(layers[items[i].layer], items[i], inv_tau, (T)w[items[i].layer], lse_p, S, O);
    }
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      int64_t e0 = ch * EB;
      const int64_t e1 = std::min(estart[L], e0 + EB);
      while (e0 < e1) {
        const size_t l = std::upper_bound(estart.begin(), estart.end(), e0) - estart.begin() - 1;
        const int64_t end = std::min(e1, estart[l + 1]);
        const T wl = (T)w[l];
        const T* src = layers[l].gq - estart[l];
        T* dst = layers[l].dq - estart[l];
#pragma omp simd
        for (int64_t e = e0; e < end; ++e) dst[e] = src[e] * wl;
        e0 = end;
      }
    }
  }
}

bool is_f64(const py::list& qs) {
  check(qs.size() > 0, "qs must be a non-empty list");
  py::array a = py::reinterpret_borrow<py::array>(qs[0]);
  if (a.dtype().is(py::dtype::of<double>())) return true;
  check(a.dtype().is(py::dtype::of<float>()), "qs must be float32 or float64 arrays");
  return false;
}

void fwd(py::list qs, py::list ks, py::list panels, int64_t groups, double inv_tau, bool need_dq, bool need_dt,
         py::list gq, py::array lse, py::array layer_loss, py::array layer_dlt, int threads) {
  if (is_f64(qs))
    fwd_impl<double>(qs, ks, panels, groups, inv_tau, need_dq, need_dt, gq, lse, layer_loss, layer_dlt, threads);
  else
    fwd_impl<float>(qs, ks, panels, groups, inv_tau, need_dq, need_dt, gq, lse, layer_loss, layer_dlt, threads);
}

void bwd(py::list qs, py::list ks, py::list panels, int64_t groups, double inv_tau, py::array w, py::list gq,
         py::list dq, py::array lse, py::list dk, int threads) {
  if (is_f64(qs))
    bwd_impl<double>(qs, ks, panels, groups, inv_tau, w, gq, dq, lse, dk, threads);
  else
    bwd_impl<float>(qs, ks, panels, groups, inv_tau, w, gq, dq, lse, dk, threads);
}

int64_t panel_width(bool f64) { return f64 ? NR<double> : NR<float>; }

}  // namespace

PYBIND11_MODULE(_cpp_patchnce, mod) {
  mod.doc() = "Fused CPU PatchNCE (CUT): every layer in one OpenMP call per direction (see csrc/patchnce.cpp).";
  mod.def("fwd", &fwd, py::arg("qs"), py::arg("ks"), py::arg("panels"), py::arg("groups"), py::arg("inv_tau"),
          py::arg("need_dq"), py::arg("need_dt"), py::arg("gq"), py::arg("lse"), py::arg("layer_loss"),
          py::arg("layer_dlt"), py::arg("threads"));
  mod.def("bwd", &bwd, py::arg("qs"), py::arg("ks"), py::arg("panels"), py::arg("groups"), py::arg("inv_tau"),
          py::arg("w"), py::arg("gq"), py::arg("dq"), py::arg("lse"), py::arg("dk"), py::arg("threads"));
  mod.def("panel_width", &panel_width, py::arg("f64"), "columns of a packed panel (NR) for float32 / float64");
  mod.attr("ROWS_PER_ITEM") = R;
}
