// CPU kernel for CONFORM's attention-map contrastive loss (contrastgen._cpp_attention_nce).
//
// The math is written out at the top of kernels/attention_nce.py (the Triton kernel); this file computes the same
// quantities, one prompt per OpenMP iteration, everything in double internally:
//   forward  : X = token values (optionally softmax over tokens of 100 A), Xs = separable smoothing of X
//              (reflect-padded by PAD, kernel size KS), E = Xs or its softmax over positions (stats M, L saved),
//              U = E^T E (N x N), loss from U (NT-Xent, PML convention, or the contrastive loss).
//              Saved for the backward: X (B x HW x N), U and the spatial-softmax stats, in the input dtype, and
//              with the token softmax its output y (B x HW x T), so that the backward computes no exp.
//   backward : dL/dU (N x N) from U, dE = E (G + G^T), through the spatial softmax, dX = S^T dXs, through the
//              token softmax (y recomputed from A) into dA (B x H x W x T, zeros outside the selected tokens).
// Columns 0..KP-1 are the prompt's tokens (label -1: padding), KP..2KP-1 the previous-step maps (no gradient).
// Non-finite rule: a prompt whose loss is not finite gets NaN in every entry of its gradient.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

constexpr double NEG = -1.0e300;
constexpr double NORM_EPS = 1e-12;   // F.normalize's eps

struct Shape {
  int B, H, W, T, KP, N, KS, PAD, Ho, Wo;
  bool has_prev, softmax, smooth, spatial;
  int loss_mode;   // 0 ntxent, 1 contrastive, 2 per prompt (kinds[b])
  double tau;
};

// exp for the token softmax of float maps: Cephes-style polynomial (rel. error ~2 ulp), branch-free so that the
// per-pixel loops over the 75 token channels vectorise; NaN propagates; x < -87 returns ~1e-38 (the softmax
// denominator is >= 1, so this is far below float resolution).  Double maps use std::exp.
inline float fexp(float x) {
  x = std::max(x, -87.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)fx + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// softmax over tokens 1..T-2 of 100 a (one pixel): writes the max m and the sum l; y_c = texp(100 a_c - m) / l
template <typename T> inline double texp(double x) { return std::exp(x); }
template <> inline double texp<float>(double x) { return (double)fexp((float)x); }

template <typename T>
inline void softmax_stats(const T* a, int Tn, double& m_out, double& l_out) {
  if constexpr (std::is_same<T, float>::value) {
    float m = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int c = 1; c < Tn - 1; ++c) { m = std::max(m, 100.0f * a[c]); nan |= a[c] != a[c]; }
    double l = 0.0;
#pragma omp simd reduction(+ : l)
    for (int c = 1; c < Tn - 1; ++c) l += (double)fexp(100.0f * a[c] - m);
    m_out = nan ? std::numeric_limits<double>::quiet_NaN() : (double)m;
    l_out = l;
  } else {
    double m = -std::numeric_limits<double>::infinity();
    bool nan = false;
    for (int c = 1; c < Tn - 1; ++c) { m = std::max(m, 100.0 * (double)a[c]); nan |= a[c] != a[c]; }
    double l = 0.0;
    for (int c = 1; c < Tn - 1; ++c) l += std::exp(100.0 * (double)a[c] - m);
    m_out = nan ? std::numeric_limits<double>::quiet_NaN() : m;
    l_out = l;
  }
}

// 16 float lanes (GCC vector extensions; AVX-512 with -march=native): the scalar fexp above does not vectorise
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f vexp16(v16f x) {
  const v16f lo = v16f{} - 87.0f;
  x = x < lo ? lo : x;                                   // NaN compares false: stays NaN
  const v16f t = x * 1.44269504088896341f + 0.5f;
  v16f fx = __builtin_convertvector(__builtin_convertvector(t, v16i), v16f);
  fx = fx > t ? fx - 1.0f : fx;                          // floor
  const v16f r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  v16f p = v16f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(fx, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// y = softmax over tokens 1..T-2 of 100 a (one pixel, 0 at the first and last channel): one exp per channel.
// float: the row is copied into a padded buffer of whole 16-lane vectors (padding lanes: -1e30 -> exp ~1e-38,
// far below the sum's resolution since the sum is >= 1); max, exp, sum and scaling all in vectors.
template <typename T>
inline void softmax_row(const T* a, int Tn, T* y) {
  const int n = Tn - 2;
  if constexpr (std::is_same<T, float>::value) {
    constexpr int MAXC = 256;   // channels handled in vectors; longer rows take the scalar path below
    if (n <= MAXC) {
      alignas(64) float buf[MAXC];
      const int nv = (n + 15) / 16;
      std::memcpy(buf, a + 1, sizeof(float) * n);
      for (int k = n; k < nv * 16; ++k) buf[k] = -1e30f;
      v16f vm = v16f{} - std::numeric_limits<float>::infinity();
      v16i bad = v16i{};
      for (int c = 0; c < nv; ++c) {
        v16f v;
        std::memcpy(&v, buf + 16 * c, sizeof(v));
        bad |= (v != v);
        vm = v > vm ? v : vm;
      }
      float m = vm[0];
      int anybad = 0;
      for (int k = 0; k < 16; ++k) { m = std::max(m, vm[k]); anybad |= bad[k]; }
      m *= 100.0f;
      v16f vs = v16f{};
      for (int c = 0; c < nv; ++c) {
        v16f v;
        std::memcpy(&v, buf + 16 * c, sizeof(v));
        v = vexp16(v * 100.0f - m);
        vs += v;
        std::memcpy(buf + 16 * c, &v, sizeof(v));
      }
      double l = 0.0;
      for (int k = 0; k < 16; ++k) l += (double)vs[k];
      const float inv = (anybad || !std::isfinite(m) || !std::isfinite(l)) ? std::numeric_limits<float>::quiet_NaN()
                                                                          : (float)(1.0 / l);
      for (int c = 0; c < nv; ++c) {
        v16f v;
        std::memcpy(&v, buf + 16 * c, sizeof(v));
        v *= inv;
        std::memcpy(buf + 16 * c, &v, sizeof(v));
      }
      std::memcpy(y + 1, buf, sizeof(float) * n);
      y[0] = 0; y[Tn - 1] = 0;
      return;
    }
  }
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int c = 1; c < Tn - 1; ++c) { m = std::max(m, (T)100 * a[c]); nan |= a[c] != a[c]; }
  double l = 0.0;
  for (int c = 1; c < Tn - 1; ++c) { y[c] = (T)texp<T>(100.0 * (double)a[c] - (double)m); l += (double)y[c]; }
  const T inv = (nan || !std::isfinite((double)m) || !std::isfinite(l)) ? std::numeric_limits<T>::quiet_NaN() : (T)(1.0 / l);
  y[0] = 0; y[Tn - 1] = 0;
  for (int c = 1; c < Tn - 1; ++c) y[c] *= inv;
}

inline int reflect(int r, int n) {
  if (r < 0) r = -r;
  if (r > n - 1) r = 2 * (n - 1) - r;
  return r;
}

// token values of one prompt's maps A (HW x T) into X[:, col0 : col0 + KP] (HW x N, row-major); with Y != nullptr
// (token softmax only) also the whole softmax y (HW x T, 0 at the first and last channel), saved for the backward
template <typename T>
void token_values(const T* A, const int32_t* tok, const int32_t* lab, const Shape& s, int col0, double* X,
                  T* Y = nullptr) {
  const int HW = s.H * s.W;
  std::vector<T> row(s.softmax && !Y ? s.T : 0);
  for (int p = 0; p < HW; ++p) {
    const T* a = A + (int64_t)p * s.T;
    double* x = X + (int64_t)p * s.N + col0;
    if (s.softmax) {
      T* y = Y ? Y + (int64_t)p * s.T : row.data();
      softmax_row(a, s.T, y);
      for (int k = 0; k < s.KP; ++k) x[k] = (double)y[tok[k]];
    } else {
      for (int k = 0; k < s.KP; ++k) x[k] = (double)a[tok[k]];
    }
  }
}

// Xs (HoWo x N) = separable smoothing of X (HW x N): rows then columns
void smooth_fwd(const double* X, const double* w, const Shape& s, std::vector<double>& tmp, double* Xs) {
  const int N = s.N;
  tmp.assign((int64_t)s.H * s.Wo * N, 0.0);
  for (int y = 0; y < s.H; ++y)
    for (int j = 0; j < s.Wo; ++j) {
      double* t = &tmp[((int64_t)y * s.Wo + j) * N];
      for (int e = 0; e < s.KS; ++e) {
        const double* x = X + ((int64_t)y * s.W + reflect(j + e - s.PAD, s.W)) * N;
        for (int k = 0; k < N; ++k) t[k] += w[e] * x[k];
      }
    }
  std::fill(Xs, Xs + (int64_t)s.Ho * s.Wo * N, 0.0);
  for (int i = 0; i < s.Ho; ++i)
    for (int d = 0; d < s.KS; ++d) {
      const int y = reflect(i + d - s.PAD, s.H);
      for (int j = 0; j < s.Wo; ++j) {
        const double* t = &tmp[((int64_t)y * s.Wo + j) * N];
        double* o = Xs + ((int64_t)i * s.Wo + j) * N;
        for (int k = 0; k < N; ++k) o[k] += w[d] * t[k];
      }
    }
}

// dX (HW x KP, only the current columns) += S^T dXs (HoWo x KP)
void smooth_bwd(const double* dXs, const double* w, const Shape& s, std::vector<double>& tmp, double* dX) {
  const int KP = s.KP;
  tmp.assign((int64_t)s.H * s.Wo * KP, 0.0);
  for (int i = 0; i < s.Ho; ++i)
    for (int d = 0; d < s.KS; ++d) {
      const int y = reflect(i + d - s.PAD, s.H);
      for (int j = 0; j < s.Wo; ++j) {
        const double* g = dXs + ((int64_t)i * s.Wo + j) * KP;
        double* t = &tmp[((int64_t)y * s.Wo + j) * KP];
        for (int k = 0; k < KP; ++k) t[k] += w[d] * g[k];
      }
    }
  std::fill(dX, dX + (int64_t)s.H * s.W * KP, 0.0);
  for (int y = 0; y < s.H; ++y)
    for (int j = 0; j < s.Wo; ++j) {
      const double* t = &tmp[((int64_t)y * s.Wo + j) * KP];
      for (int e = 0; e < s.KS; ++e) {
        double* g = dX + ((int64_t)y * s.W + reflect(j + e - s.PAD, s.W)) * KP;
        for (int k = 0; k < KP; ++k) g[k] += w[e] * t[k];
      }
    }
}

// loss of one prompt from its Gram U (N x N); with G != nullptr also G = g * dL/dU.  ``bad``: some embedding
// holds a NaN / Inf, so the loss is NaN whenever it has a term (as the reference's).
double epilogue(const double* U, const int32_t* lab, const Shape& s, int kind, double g, double* G, bool bad) {
  const int N = s.N, KP = s.KP;
  std::vector<int> label(N), valid(N);
  for (int i = 0; i < N; ++i) {
    label[i] = lab[i % KP];
    valid[i] = label[i] >= 0 && (i < KP || s.has_prev);
  }
  auto pos = [&](int i, int j) { return valid[i] && valid[j] && i != j && label[i] == label[j]; };
  auto neg = [&](int i, int j) { return valid[i] && valid[j] && label[i] != label[j]; };
  std::vector<double> nrm(N), m(N), cos((size_t)N * N, 0.0), dcos((size_t)N * N, 0.0);
  for (int i = 0; i < N; ++i) {
    nrm[i] = std::sqrt(std::max(U[(size_t)i * N + i], 0.0));
    m[i] = std::max(nrm[i], NORM_EPS);
  }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) cos[(size_t)i * N + j] = U[(size_t)i * N + j] / (m[i] * m[j]);
  double loss = 0.0, terms = 0.0;
  if (kind == 0) {   // PML NT-Xent: mean over ordered positive pairs of softplus(lse_neg(i) - s_ij)
    const double inv_tau = 1.0 / s.tau;
    std::vector<double> lse(N, NEG);
    for (int i = 0; i < N; ++i) {
      double mx = NEG;
      for (int j = 0; j < N; ++j) if (neg(i, j)) mx = std::max(mx, cos[(size_t)i * N + j] * inv_tau);
      if (mx > NEG) {
        double acc = 0.0;
        for (int j = 0; j < N; ++j) if (neg(i, j)) acc += std::exp(cos[(size_t)i * N + j] * inv_tau - mx);
        lse[i] = mx + std::log(acc);
      }
      for (int j = 0; j < N; ++j) {
        if (!pos(i, j)) continue;
        const double x = lse[i] - cos[(size_t)i * N + j] * inv_tau;
        loss += std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x)));
        terms += 1.0;
      }
    }
    const double scale = terms > 0 ? 1.0 / terms : 0.0;
    loss *= scale;
    if (G) {
      for (int i = 0; i < N; ++i) {
        double c = 0.0;
        for (int j = 0; j < N; ++j) {
          if (!pos(i, j)) continue;
          const double sg = 1.0 / (1.0 + std::exp(cos[(size_t)i * N + j] * inv_tau - lse[i]));
          dcos[(size_t)i * N + j] -= sg * scale * inv_tau;
          c += sg * scale;
        }
        if (lse[i] > NEG)
          for (int j = 0; j < N; ++j)
            if (neg(i, j)) dcos[(size_t)i * N + j] += c * std::exp(cos[(size_t)i * N + j] * inv_tau - lse[i]) * inv_tau;
      }
    }
  } else {   // PML ContrastiveLoss (cosine, pos_margin 1, neg_margin 0): averages over the non-zero terms
    double psum = 0, pn = 0, nsum = 0, nn = 0;
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j) {
        const double c = cos[(size_t)i * N + j];
        if (pos(i, j)) { const double v = std::max(1.0 - c, 0.0); psum += v; pn += v > 0; terms += 1; }
        if (neg(i, j)) { const double v = std::max(c, 0.0); nsum += v; nn += v > 0; terms += 1; }
      }
    loss = (pn > 0 ? psum / pn : 0.0) + (nn > 0 ? nsum / nn : 0.0);
    if (G) {
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          const double c = cos[(size_t)i * N + j];
          if (pos(i, j) && 1.0 - c > 0) dcos[(size_t)i * N + j] = -1.0 / pn;
          if (neg(i, j) && c > 0) dcos[(size_t)i * N + j] = 1.0 / nn;
        }
    }
  }
  if (bad && terms > 0) return std::numeric_limits<double>::quiet_NaN();
  if (G) {
    // cos_ij = U_ij / (m_i m_j), m_i = max(sqrt(U_ii), eps); gradient through m_i only where sqrt(U_ii) > eps
    std::vector<double> dm(N, 0.0);
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j) {
        const double dc = g * dcos[(size_t)i * N + j];
        G[(size_t)i * N + j] = dc / (m[i] * m[j]);
        dm[i] -= dc * cos[(size_t)i * N + j] / m[i];
        dm[j] -= dc * cos[(size_t)i * N + j] / m[j];
      }
    for (int i = 0; i < N; ++i)
      if (nrm[i] > NORM_EPS) G[(size_t)i * N + i] += dm[i] / (2.0 * nrm[i]);
  }
  return loss;
}

template <typename T>
struct Arrays {
  const T* maps; const T* prev; const int32_t* tok; const int32_t* lab; const int32_t* kinds; const double* w;
};

Shape make_shape(int B, int H, int W, int T, int KP, bool has_prev, bool softmax, bool smooth, bool spatial,
                 int loss_mode, int KS, double tau) {
  Shape s;
  s.B = B; s.H = H; s.W = W; s.T = T; s.KP = KP; s.N = KP * (has_prev ? 2 : 1);
  s.KS = smooth ? KS : 1; s.PAD = smooth ? 1 : 0;
  s.Ho = H + 2 * s.PAD - s.KS + 1; s.Wo = W + 2 * s.PAD - s.KS + 1;
  s.has_prev = has_prev; s.softmax = softmax; s.smooth = smooth; s.spatial = spatial; s.loss_mode = loss_mode;
  s.tau = tau;
  if (s.Ho < 1 || s.Wo < 1) throw std::invalid_argument("attention_nce: kernel larger than the padded maps");
  return s;
}

// E (HoWo x N) from Xs in place: softmax over positions of 100 Xs per column (stats M, L), or Xs itself
void spatial_fwd(double* E, const Shape& s, double* M, double* L) {
  const int64_t HWo = (int64_t)s.Ho * s.Wo;
  for (int k = 0; k < s.N; ++k) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t o = 0; o < HWo; ++o) mx = std::max(mx, 100.0 * E[o * s.N + k]);
    double l = 0.0;
    for (int64_t o = 0; o < HWo; ++o) l += std::exp(100.0 * E[o * s.N + k] - mx);
    for (int64_t o = 0; o < HWo; ++o) E[o * s.N + k] = std::exp(100.0 * E[o * s.N + k] - mx) / l;
    M[k] = mx; L[k] = l;
  }
}

// The valid token slots of prompt b, compacted: tokens / labels of length Kv and a Shape with KP = Kv, N = Kv (x2).
// All the loops run over these Kv (x2) columns only; xbuf / gram / stats keep the full (KP-padded) layout of the
// Triton kernel (column c of the compact layout is column full_col(c) of the padded one).
struct Compact {
  std::vector<int32_t> tok, lab;
  Shape s;
  int full_col(int c) const { return c < s.KP ? c : full_kp + (c - s.KP); }
  int full_kp;
};

Compact compact(const int32_t* tok, const int32_t* lab, const Shape& s) {
  Compact c;
  for (int k = 0; k < s.KP; ++k)
    if (lab[k] >= 0) { c.tok.push_back(tok[k]); c.lab.push_back(lab[k]); }
  c.s = s;
  c.s.KP = (int)c.tok.size();
  c.s.N = c.s.KP * (s.has_prev ? 2 : 1);
  c.full_kp = s.KP;
  return c;
}

template <typename T>
void fwd_impl(const Arrays<T>& a, const Shape& S, T* loss, T* xbuf, T* gram, T* stats, T* ybuf) {
  const int HW = S.H * S.W, NF = S.N;
  const int64_t HWo = (int64_t)S.Ho * S.Wo;
#pragma omp parallel
  {
    std::vector<double> X, Xs, tmp, U, M, L;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < S.B; ++b) {
      const Compact c = compact(a.tok + (int64_t)b * S.KP, a.lab + (int64_t)b * S.KP, S);
      const Shape& s = c.s;
      const int N = s.N;
      X.assign((size_t)HW * N, 0.0); Xs.assign((size_t)HWo * N, 0.0); U.assign((size_t)N * N, 0.0);
      M.assign(N, 0.0); L.assign(N, 1.0);
      token_values(a.maps + (int64_t)b * HW * S.T, c.tok.data(), c.lab.data(), s, 0, X.data(),
                   ybuf ? ybuf + (int64_t)b * HW * S.T : nullptr);
      if (s.has_prev) token_values(a.prev + (int64_t)b * HW * S.T, c.tok.data(), c.lab.data(), s, s.KP, X.data());
      T* xb = xbuf + (int64_t)b * HW * NF;
      std::fill(xb, xb + (int64_t)HW * NF, (T)0);
      for (int p = 0; p < HW; ++p)
        for (int k = 0; k < N; ++k) xb[(int64_t)p * NF + c.full_col(k)] = (T)X[(size_t)p * N + k];
      if (s.smooth) smooth_fwd(X.data(), a.w, s, tmp, Xs.data());
      else std::copy(X.begin(), X.end(), Xs.begin());
      if (s.spatial) spatial_fwd(Xs.data(), s, M.data(), L.data());
      bool bad = false;
      for (int64_t o = 0; o < HWo; ++o) {
        const double* e = &Xs[o * N];
        for (int i = 0; i < N; ++i) {
          bad |= !std::isfinite(e[i]);
          double* u = &U[(size_t)i * N];
          for (int j = 0; j < N; ++j) u[j] += e[i] * e[j];
        }
      }
      T* g = gram + (int64_t)b * NF * NF;
      std::fill(g, g + (int64_t)NF * NF, (T)0);
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) g[(int64_t)c.full_col(i) * NF + c.full_col(j)] = (T)U[(size_t)i * N + j];
      T* st = stats + (int64_t)b * 2 * NF;
      for (int k = 0; k < NF; ++k) { st[k] = (T)0; st[NF + k] = (T)1; }
      for (int k = 0; k < N; ++k) { st[c.full_col(k)] = (T)M[k]; st[NF + c.full_col(k)] = (T)L[k]; }
      const int kind = s.loss_mode == 2 ? a.kinds[b] : s.loss_mode;
      loss[b] = (T)epilogue(U.data(), c.lab.data(), s, kind, 1.0, nullptr, bad);
    }
  }
}

template <typename T>
void bwd_impl(const Arrays<T>& a, const Shape& S, const T* grad, const T* loss, const T* xbuf, const T* gram,
              const T* stats, const T* ybuf, T* dA) {
  const int HW = S.H * S.W, NF = S.N;
  const int64_t HWo = (int64_t)S.Ho * S.Wo;
#pragma omp parallel
  {
    std::vector<double> X, Xs, tmp, U, G, dXs, dX, gfull(S.T), colsum;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < S.B; ++b) {
      T* da = dA + (int64_t)b * HW * S.T;
      if (!std::isfinite((double)loss[b]) || !std::isfinite((double)grad[b])) {
        std::fill(da, da + (int64_t)HW * S.T, std::numeric_limits<T>::quiet_NaN());
        continue;
      }
      const Compact c = compact(a.tok + (int64_t)b * S.KP, a.lab + (int64_t)b * S.KP, S);
      const Shape& s = c.s;
      const int N = s.N, KP = s.KP;
      X.assign((size_t)HW * N, 0.0); Xs.assign((size_t)HWo * N, 0.0); U.assign((size_t)N * N, 0.0);
      G.assign((size_t)N * N, 0.0); dXs.assign((size_t)HWo * KP, 0.0); dX.assign((size_t)HW * KP, 0.0);
      colsum.assign(KP, 0.0);
      const T* g0 = gram + (int64_t)b * NF * NF;
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) U[(size_t)i * N + j] = (double)g0[(int64_t)c.full_col(i) * NF + c.full_col(j)];
      const int kind = s.loss_mode == 2 ? a.kinds[b] : s.loss_mode;
      epilogue(U.data(), c.lab.data(), s, kind, (double)grad[b], G.data(), false);
      const T* xb = xbuf + (int64_t)b * HW * NF;
      for (int p = 0; p < HW; ++p)
        for (int k = 0; k < N; ++k) X[(size_t)p * N + k] = (double)xb[(int64_t)p * NF + c.full_col(k)];
      if (s.smooth) smooth_fwd(X.data(), a.w, s, tmp, Xs.data());
      else std::copy(X.begin(), X.end(), Xs.begin());
      if (s.spatial) {
        const T* st = stats + (int64_t)b * 2 * NF;
        for (int64_t o = 0; o < HWo; ++o)
          for (int k = 0; k < N; ++k)
            Xs[o * N + k] = std::exp(100.0 * Xs[o * N + k] - (double)st[c.full_col(k)]) / (double)st[NF + c.full_col(k)];
      }
      // dE = E (G + G^T), current columns only; through the spatial softmax: dxs = 100 e (dE - sum_o dE e)
      std::vector<double> Gt((size_t)N * KP);
      for (int j = 0; j < N; ++j)
        for (int k = 0; k < KP; ++k) Gt[(size_t)j * KP + k] = G[(size_t)j * N + k] + G[(size_t)k * N + j];
      for (int64_t o = 0; o < HWo; ++o) {
        const double* e = &Xs[o * N];
        double* d = &dXs[o * KP];
        for (int j = 0; j < N; ++j) {
          const double ej = e[j];
          const double* gt = &Gt[(size_t)j * KP];
          for (int k = 0; k < KP; ++k) d[k] += ej * gt[k];
        }
        for (int k = 0; k < KP; ++k) colsum[k] += d[k] * e[k];
      }
      if (s.spatial)
        for (int64_t o = 0; o < HWo; ++o)
          for (int k = 0; k < KP; ++k) dXs[o * KP + k] = 100.0 * Xs[o * N + k] * (dXs[o * KP + k] - colsum[k]);
      if (s.smooth) smooth_bwd(dXs.data(), a.w, s, tmp, dX.data());
      else std::copy(dXs.begin(), dXs.end(), dX.begin());
      // through the token softmax into dA
      const T* A = a.maps + (int64_t)b * HW * S.T;
      for (int p = 0; p < HW; ++p) {
        T* out = da + (int64_t)p * S.T;
        const double* g = &dX[(int64_t)p * KP];
        if (!s.softmax) {
          std::fill(out, out + S.T, (T)0);
          for (int k = 0; k < KP; ++k) out[c.tok[k]] = (T)g[k];
          continue;
        }
        if (ybuf) {   // the forward's softmax: no exp here
          const T* y = ybuf + (int64_t)b * HW * S.T + (int64_t)p * S.T;
          double gy = 0.0;
          for (int k = 0; k < KP; ++k) gy += g[k] * (double)y[c.tok[k]];
          std::fill(gfull.begin(), gfull.end(), -gy);
          for (int k = 0; k < KP; ++k) gfull[c.tok[k]] += g[k];
          out[0] = 0; out[S.T - 1] = 0;
          for (int c2 = 1; c2 < S.T - 1; ++c2) out[c2] = (T)(100.0 * (double)y[c2] * gfull[c2]);
          continue;
        }
        const T* ar = A + (int64_t)p * S.T;
        double m, l;
        softmax_stats(ar, S.T, m, l);
        std::fill(gfull.begin(), gfull.end(), 0.0);
        double gy = 0.0;
        for (int k = 0; k < KP; ++k) {
          gfull[c.tok[k]] = g[k];
          gy += g[k] * texp<T>(100.0 * (double)ar[c.tok[k]] - m) / l;
        }
        out[0] = 0; out[S.T - 1] = 0;
        const double inv_l = 1.0 / l;
        if constexpr (std::is_same<T, float>::value) {
          const float mf = (float)m;
#pragma omp simd
          for (int c2 = 1; c2 < S.T - 1; ++c2) {
            const double y = (double)fexp(100.0f * ar[c2] - mf) * inv_l;
            out[c2] = (T)(100.0 * y * (gfull[c2] - gy));
          }
        } else {
          for (int c2 = 1; c2 < S.T - 1; ++c2) {
            const double y = std::exp(100.0 * (double)ar[c2] - m) * inv_l;
            out[c2] = (T)(100.0 * y * (gfull[c2] - gy));
          }
        }
      }
    }
  }
}

template <typename T>
using arr = py::array_t<T, py::array::c_style>;

template <typename T>
Arrays<T> arrays(const arr<T>& maps, const arr<T>& prev, const arr<int32_t>& tok, const arr<int32_t>& lab,
                 const arr<int32_t>& kinds, const arr<double>& w) {
  return Arrays<T>{maps.data(), prev.size() ? prev.data() : nullptr, tok.data(), lab.data(), kinds.data(), w.data()};
}

template <typename T>
void fwd(arr<T> maps, arr<T> prev, arr<int32_t> tok, arr<int32_t> lab, arr<int32_t> kinds, arr<double> w, int B, int H,
         int W, int Tn, int KP, bool has_prev, bool softmax, bool smooth, bool spatial, int loss_mode, double tau,
         arr<T> loss, arr<T> xbuf, arr<T> gram, arr<T> stats, arr<T> ybuf) {
  Shape s = make_shape(B, H, W, Tn, KP, has_prev, softmax, smooth, spatial, loss_mode, (int)w.size(), tau);
  if (maps.size() != (py::ssize_t)B * H * W * Tn || (has_prev && prev.size() != maps.size()) ||
      tok.size() != (py::ssize_t)B * KP || lab.size() != (py::ssize_t)B * KP ||
      xbuf.size() != (py::ssize_t)B * H * W * s.N || gram.size() != (py::ssize_t)B * s.N * s.N ||
      stats.size() != (py::ssize_t)B * 2 * s.N || loss.size() != B)
    throw std::invalid_argument("attention_nce_fwd: inconsistent buffer sizes");
  auto a = arrays(maps, prev, tok, lab, kinds, w);
  if (ybuf.size() != 0 && ybuf.size() != maps.size())
    throw std::invalid_argument("attention_nce_fwd: ybuf must be empty or of the maps' size");
  T *pl = loss.mutable_data(), *px = xbuf.mutable_data(), *pg = gram.mutable_data(), *ps = stats.mutable_data();
  T* py_ = (softmax && ybuf.size()) ? ybuf.mutable_data() : nullptr;
  py::gil_scoped_release nogil;
  fwd_impl(a, s, pl, px, pg, ps, py_);
}

template <typename T>
void bwd(arr<T> grad, arr<T> maps, arr<T> prev, arr<int32_t> tok, arr<int32_t> lab, arr<int32_t> kinds,
         arr<double> w, arr<T> loss, arr<T> xbuf, arr<T> gram, arr<T> stats, arr<T> ybuf, int B, int H, int W,
         int Tn, int KP, bool has_prev, bool softmax, bool smooth, bool spatial, int loss_mode, double tau,
         arr<T> dmaps) {
  Shape s = make_shape(B, H, W, Tn, KP, has_prev, softmax, smooth, spatial, loss_mode, (int)w.size(), tau);
  if (dmaps.size() != maps.size() || grad.size() != B || xbuf.size() != (py::ssize_t)B * H * W * s.N ||
      gram.size() != (py::ssize_t)B * s.N * s.N)
    throw std::invalid_argument("attention_nce_bwd: inconsistent buffer sizes");
  auto a = arrays(maps, prev, tok, lab, kinds, w);
  const T *pg = grad.data(), *pl = loss.data(), *px = xbuf.data(), *pu = gram.data(), *ps = stats.data();
  T* out = dmaps.mutable_data();
  const T* py_ = (softmax && ybuf.size() == maps.size()) ? ybuf.data() : nullptr;
  py::gil_scoped_release nogil;
  bwd_impl(a, s, pg, pl, px, pu, ps, py_, out);
}

template <typename T>
void bind(py::module_& m, const char* suffix) {
  using namespace pybind11::literals;
  m.def((std::string("attention_nce_fwd_") + suffix).c_str(), &fwd<T>, "forward: loss (B,), saved X, U, stats",
        py::arg("maps").noconvert(), py::arg("prev").noconvert(), py::arg("tokens").noconvert(),
        py::arg("labels").noconvert(), py::arg("kinds").noconvert(), py::arg("weights").noconvert(), "B"_a, "H"_a,
        "W"_a, "T"_a, "KP"_a, "has_prev"_a, "softmax"_a, "smooth"_a, "spatial"_a, "loss_mode"_a, "tau"_a,
        py::arg("loss").noconvert(), py::arg("xbuf").noconvert(), py::arg("gram").noconvert(),
        py::arg("stats").noconvert(), py::arg("ybuf").noconvert());
  m.def((std::string("attention_nce_bwd_") + suffix).c_str(), &bwd<T>, "backward: dmaps (B, H, W, T)",
        py::arg("grad").noconvert(), py::arg("maps").noconvert(), py::arg("prev").noconvert(),
        py::arg("tokens").noconvert(), py::arg("labels").noconvert(), py::arg("kinds").noconvert(),
        py::arg("weights").noconvert(), py::arg("loss").noconvert(), py::arg("xbuf").noconvert(),
        py::arg("gram").noconvert(), py::arg("stats").noconvert(), py::arg("ybuf").noconvert(), "B"_a, "H"_a, "W"_a,
        "T"_a, "KP"_a, "has_prev"_a,
        "softmax"_a, "smooth"_a, "spatial"_a, "loss_mode"_a, "tau"_a, py::arg("dmaps").noconvert());
}

}  // namespace

PYBIND11_MODULE(_cpp_attention_nce, m) {
  m.doc() = "CPU kernel for CONFORM's attention-map contrastive loss (see csrc/attention_nce.cpp)";
  bind<float>(m, "f32");
  bind<double>(m, "f64");
}
