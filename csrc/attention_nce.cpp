// CPU kernel for CONFORM's attention-map contrastive loss (contrastgen._cpp_attention_nce).
//
// The math is written out at the top of kernels/attention_nce.py (the Triton kernel); this file computes the same
// quantities, one prompt per OpenMP iteration, everything in double internally:
//   forward  : X = token values (optionally softmax over tokens of 100 A), Xs = separable smoothing of X
//              (reflect-padded by PAD, kernel size KS), E = Xs or its softmax over positions (stats M, L saved),
//              U = E^T E (N x N), loss from U (NT-Xent, PML convention, or the contrastive loss).
//              Saved for the backward: X (B x HW x N), U and the spatial-softmax stats, in the input dtype.
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

inline int reflect(int r, int n) {
  if (r < 0) r = -r;
  if (r > n - 1) r = 2 * (n - 1) - r;
  return r;
}

// token values of one prompt's maps A (HW x T) into X[:, col0 : col0 + KP] (HW x N, row-major)
template <typename T>
void token_values(const T* A, const int32_t* tok, const int32_t* lab, const Shape& s, int col0, double* X) {
  const int HW = s.H * s.W;
  for (int p = 0; p < HW; ++p) {
    const T* a = A + (int64_t)p * s.T;
    double* x = X + (int64_t)p * s.N + col0;
    if (s.softmax) {
      double m = -std::numeric_limits<double>::infinity();
      for (int c = 1; c < s.T - 1; ++c) m = std::max(m, 100.0 * (double)a[c]);
      double l = 0.0;
      for (int c = 1; c < s.T - 1; ++c) l += std::exp(100.0 * (double)a[c] - m);
      for (int k = 0; k < s.KP; ++k) x[k] = lab[k] >= 0 ? std::exp(100.0 * (double)a[tok[k]] - m) / l : 0.0;
      if (!std::isfinite(m) || !std::isfinite(l))   // NaN / Inf anywhere in the row: NaN row, as torch.softmax
        for (int k = 0; k < s.KP; ++k) if (lab[k] >= 0) x[k] = std::numeric_limits<double>::quiet_NaN();
    } else {
      for (int k = 0; k < s.KP; ++k) x[k] = lab[k] >= 0 ? (double)a[tok[k]] : 0.0;
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

template <typename T>
void fwd_impl(const Arrays<T>& a, const Shape& s, T* loss, T* xbuf, T* gram, T* stats) {
  const int HW = s.H * s.W, N = s.N;
  const int64_t HWo = (int64_t)s.Ho * s.Wo;
#pragma omp parallel
  {
    std::vector<double> X((size_t)HW * N), Xs((size_t)HWo * N), tmp, U((size_t)N * N), M(N, 0.0), L(N, 1.0);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < s.B; ++b) {
      const int32_t* tok = a.tok + (int64_t)b * s.KP;
      const int32_t* lab = a.lab + (int64_t)b * s.KP;
      token_values(a.maps + (int64_t)b * HW * s.T, tok, lab, s, 0, X.data());
      if (s.has_prev) token_values(a.prev + (int64_t)b * HW * s.T, tok, lab, s, s.KP, X.data());
      for (size_t i = 0; i < X.size(); ++i) xbuf[(int64_t)b * HW * N + i] = (T)X[i];
      if (s.smooth) smooth_fwd(X.data(), a.w, s, tmp, Xs.data());
      else std::copy(X.begin(), X.end(), Xs.begin());
      std::fill(M.begin(), M.end(), 0.0); std::fill(L.begin(), L.end(), 1.0);
      if (s.spatial) spatial_fwd(Xs.data(), s, M.data(), L.data());
      std::fill(U.begin(), U.end(), 0.0);
      for (int64_t o = 0; o < HWo; ++o) {
        const double* e = &Xs[o * N];
        for (int i = 0; i < N; ++i) {
          if (e[i] == 0.0) continue;
          double* u = &U[(size_t)i * N];
          for (int j = 0; j < N; ++j) u[j] += e[i] * e[j];
        }
      }
      bool bad = false;
      for (int64_t o = 0; o < HWo; ++o)
        for (int i = 0; i < N; ++i) bad |= !std::isfinite(Xs[o * N + i]);
      for (int i = 0; i < N * N; ++i) gram[(int64_t)b * N * N + i] = (T)U[i];
      for (int k = 0; k < N; ++k) { stats[(int64_t)b * 2 * N + k] = (T)M[k]; stats[(int64_t)b * 2 * N + N + k] = (T)L[k]; }
      const int kind = s.loss_mode == 2 ? a.kinds[b] : s.loss_mode;
      loss[b] = (T)epilogue(U.data(), lab, s, kind, 1.0, nullptr, bad);
    }
  }
}

template <typename T>
void bwd_impl(const Arrays<T>& a, const Shape& s, const T* grad, const T* loss, const T* xbuf, const T* gram,
              const T* stats, T* dA) {
  const int HW = s.H * s.W, N = s.N, KP = s.KP;
  const int64_t HWo = (int64_t)s.Ho * s.Wo;
#pragma omp parallel
  {
    std::vector<double> X((size_t)HW * N), Xs((size_t)HWo * N), tmp, U((size_t)N * N), G((size_t)N * N);
    std::vector<double> dXs((size_t)HWo * KP), dX((size_t)HW * KP), gfull(s.T);
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < s.B; ++b) {
      T* da = dA + (int64_t)b * HW * s.T;
      const int32_t* tok = a.tok + (int64_t)b * s.KP;
      const int32_t* lab = a.lab + (int64_t)b * s.KP;
      if (!std::isfinite(loss[b]) || !std::isfinite(grad[b])) {
        std::fill(da, da + (int64_t)HW * s.T, std::numeric_limits<T>::quiet_NaN());
        continue;
      }
      for (int i = 0; i < N * N; ++i) U[i] = gram[(int64_t)b * N * N + i];
      const int kind = s.loss_mode == 2 ? a.kinds[b] : s.loss_mode;
      epilogue(U.data(), lab, s, kind, (double)grad[b], G.data(), false);
      for (size_t i = 0; i < X.size(); ++i) X[i] = xbuf[(int64_t)b * HW * N + i];
      if (s.smooth) smooth_fwd(X.data(), a.w, s, tmp, Xs.data());
      else std::copy(X.begin(), X.end(), Xs.begin());
      if (s.spatial) {
        const T* M = stats + (int64_t)b * 2 * N;
        const T* L = M + N;
        for (int64_t o = 0; o < HWo; ++o)
          for (int k = 0; k < N; ++k) Xs[o * N + k] = std::exp(100.0 * Xs[o * N + k] - (double)M[k]) / (double)L[k];
      }
      // dE = E (G + G^T), current columns only; through the spatial softmax: dxs = 100 e (dE - sum_o dE e)
      std::vector<double> colsum(KP, 0.0);
      for (int64_t o = 0; o < HWo; ++o) {
        const double* e = &Xs[o * N];
        double* d = &dXs[o * KP];
        for (int k = 0; k < KP; ++k) {
          double acc = 0.0;
          for (int j = 0; j < N; ++j) acc += e[j] * (G[(size_t)j * N + k] + G[(size_t)k * N + j]);
          d[k] = acc;
          colsum[k] += acc * e[k];
        }
      }
      if (s.spatial)
        for (int64_t o = 0; o < HWo; ++o)
          for (int k = 0; k < KP; ++k) dXs[o * KP + k] = 100.0 * Xs[o * N + k] * (dXs[o * KP + k] - colsum[k]);
      if (s.smooth) smooth_bwd(dXs.data(), a.w, s, tmp, dX.data());
      else std::copy(dXs.begin(), dXs.end(), dX.begin());
      // through the token softmax into dA
      const T* A = a.maps + (int64_t)b * HW * s.T;
      for (int p = 0; p < HW; ++p) {
        T* out = da + (int64_t)p * s.T;
        const double* g = &dX[(int64_t)p * KP];
        std::fill(gfull.begin(), gfull.end(), 0.0);
        for (int k = 0; k < KP; ++k) if (lab[k] >= 0) gfull[tok[k]] = g[k];
        if (!s.softmax) {
          for (int c = 0; c < s.T; ++c) out[c] = (T)gfull[c];
          continue;
        }
        const T* ar = A + (int64_t)p * s.T;
        double m = -std::numeric_limits<double>::infinity();
        for (int c = 1; c < s.T - 1; ++c) m = std::max(m, 100.0 * (double)ar[c]);
        double l = 0.0;
        for (int c = 1; c < s.T - 1; ++c) l += std::exp(100.0 * (double)ar[c] - m);
        double gy = 0.0;
        for (int k = 0; k < KP; ++k) if (lab[k] >= 0) gy += g[k] * std::exp(100.0 * (double)ar[tok[k]] - m) / l;
        out[0] = 0; out[s.T - 1] = 0;
        for (int c = 1; c < s.T - 1; ++c) {
          const double y = std::exp(100.0 * (double)ar[c] - m) / l;
          out[c] = (T)(100.0 * y * (gfull[c] - gy));
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
         arr<T> loss, arr<T> xbuf, arr<T> gram, arr<T> stats) {
  Shape s = make_shape(B, H, W, Tn, KP, has_prev, softmax, smooth, spatial, loss_mode, (int)w.size(), tau);
  if (maps.size() != (py::ssize_t)B * H * W * Tn || (has_prev && prev.size() != maps.size()) ||
      tok.size() != (py::ssize_t)B * KP || lab.size() != (py::ssize_t)B * KP ||
      xbuf.size() != (py::ssize_t)B * H * W * s.N || gram.size() != (py::ssize_t)B * s.N * s.N ||
      stats.size() != (py::ssize_t)B * 2 * s.N || loss.size() != B)
    throw std::invalid_argument("attention_nce_fwd: inconsistent buffer sizes");
  auto a = arrays(maps, prev, tok, lab, kinds, w);
  T *pl = loss.mutable_data(), *px = xbuf.mutable_data(), *pg = gram.mutable_data(), *ps = stats.mutable_data();
  py::gil_scoped_release nogil;
  fwd_impl(a, s, pl, px, pg, ps);
}

template <typename T>
void bwd(arr<T> grad, arr<T> maps, arr<T> prev, arr<int32_t> tok, arr<int32_t> lab, arr<int32_t> kinds,
         arr<double> w, arr<T> loss, arr<T> xbuf, arr<T> gram, arr<T> stats, int B, int H, int W,
         int Tn, int KP, bool has_prev, bool softmax, bool smooth, bool spatial, int loss_mode, double tau,
         arr<T> dmaps) {
  Shape s = make_shape(B, H, W, Tn, KP, has_prev, softmax, smooth, spatial, loss_mode, (int)w.size(), tau);
  if (dmaps.size() != maps.size() || grad.size() != B || xbuf.size() != (py::ssize_t)B * H * W * s.N ||
      gram.size() != (py::ssize_t)B * s.N * s.N)
    throw std::invalid_argument("attention_nce_bwd: inconsistent buffer sizes");
  auto a = arrays(maps, prev, tok, lab, kinds, w);
  const T *pg = grad.data(), *pl = loss.data(), *px = xbuf.data(), *pu = gram.data(), *ps = stats.data();
  T* out = dmaps.mutable_data();
  py::gil_scoped_release nogil;
  bwd_impl(a, s, pg, pl, px, pu, ps, out);
}

template <typename T>
void bind(py::module_& m, const char* suffix) {
  using namespace pybind11::literals;
  m.def((std::string("attention_nce_fwd_") + suffix).c_str(), &fwd<T>, "forward: loss (B,), saved X, U, stats",
        py::arg("maps").noconvert(), py::arg("prev").noconvert(), py::arg("tokens").noconvert(),
        py::arg("labels").noconvert(), py::arg("kinds").noconvert(), py::arg("weights").noconvert(), "B"_a, "H"_a,
        "W"_a, "T"_a, "KP"_a, "has_prev"_a, "softmax"_a, "smooth"_a, "spatial"_a, "loss_mode"_a, "tau"_a,
        py::arg("loss").noconvert(), py::arg("xbuf").noconvert(), py::arg("gram").noconvert(),
        py::arg("stats").noconvert());
  m.def((std::string("attention_nce_bwd_") + suffix).c_str(), &bwd<T>, "backward: dmaps (B, H, W, T)",
        py::arg("grad").noconvert(), py::arg("maps").noconvert(), py::arg("prev").noconvert(),
        py::arg("tokens").noconvert(), py::arg("labels").noconvert(), py::arg("kinds").noconvert(),
        py::arg("weights").noconvert(), py::arg("loss").noconvert(), py::arg("xbuf").noconvert(),
        py::arg("gram").noconvert(), py::arg("stats").noconvert(), "B"_a, "H"_a, "W"_a, "T"_a, "KP"_a, "has_prev"_a,
        "softmax"_a, "smooth"_a, "spatial"_a, "loss_mode"_a, "tau"_a, py::arg("dmaps").noconvert());
}

}  // namespace

PYBIND11_MODULE(_cpp_attention_nce, m) {
  m.doc() = "CPU kernel for CONFORM's attention-map contrastive loss (see csrc/attention_nce.cpp)";
  bind<float>(m, "f32");
  bind<double>(m, "f64");
}
