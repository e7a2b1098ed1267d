// CPU kernels for Dispersive Loss and uniformity (contrastgen._cpp_dispersive).
//
// Same two regimes and the same math as kernels/dispersive.py (see its docstring):
//  * Gram regime (few samples B, huge M): gram() = split-K Gram, threads split the M axis into chunks of
//    KC columns, each thread keeps a partial B x B Gram (4 x 4 register tiles of dot products, only the upper
//    tiles; mirrored at the end); stream_wz() = dZ = W Z over column blocks of 4 vectors (one read of Z, one
//    write of dZ), with the covariance batch-norm backward fused per column block; colstats() = per-column
//    mean / rstd.  The B x B epilogue (loss, W) runs in PyTorch (contrastgen/ops/_cpp_dispersive.py).
//  * Many-samples regime (N large, D small): pairs_fwd() / pairs_bwd() = tiled N^2 reduction with an online
//    log-sum-exp per row (modes 0 = l2 / uniformity, 1 = dot of normalised rows, 2 = hinge); the backward
//    recomputes the tiles.  The self-pairs are constants: d_ii = 0 in the forward, no gradient through them.
//    Tiles: 4 rows x 64 columns (4 vectors), the column block transposed into a panel (D x 64) once per
//    (row super-block, column block).
// Inputs arrive as numpy views (bf16 / fp16 as int16 bits, converted on load); accumulation in float
// (double for float64 input).  Vectors use GCC vector extensions (64 bytes: AVX-512 with -march=native).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

enum DType { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// Vector width (2026-12-01, portable builds): 64 bytes where AVX-512 is compiled in, else 32 (AVX2) -- 64-byte
// vectors on an AVX2 build are split into register pairs and spill (the avx2 variant measured 12x slower).
#ifdef __AVX512F__
#define CG_VEC_BYTES 64
#else
#define CG_VEC_BYTES 32
#endif
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(CG_VEC_BYTES), aligned(4)));
  typedef int32_t itype __attribute__((vector_size(CG_VEC_BYTES), aligned(4)));
  static constexpr int W = CG_VEC_BYTES / 4;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(CG_VEC_BYTES), aligned(8)));
  typedef int64_t itype __attribute__((vector_size(CG_VEC_BYTES), aligned(8)));
  static constexpr int W = CG_VEC_BYTES / 8;
};

template <typename T> using V = typename Vec<T>::type;

template <typename T> inline V<T> vload(const T* p) { V<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T> inline void vstore(T* p, V<T> v) { std::memcpy(p, &v, sizeof(v)); }
template <typename T> inline V<T> vsplat(T x) { return V<T>{} + x; }
template <typename T> inline T hsum(V<T> v) { T s = 0; for (int l = 0; l < Vec<T>::W; ++l) s += v[l]; return s; }
template <typename T> inline T hmax(V<T> v) {
  T s = v[0];
  for (int l = 1; l < Vec<T>::W; ++l) s = v[l] > s ? v[l] : s;
  return s;
}

// exp(x) for x <= 0 ... any finite x; -inf -> 0.  float: Cephes-style polynomial (rel. error ~2 ulp);
// double: libm per lane (used only for float64 checks).
inline V<float> vexp(V<float> x) {
  const V<float> lo = vsplat(-87.3f), hi = vsplat(88.3f);
  V<float> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V<float> magic = vsplat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  V<float> t = xc * vsplat(1.44269504088896341f) + magic;
  V<float> n = t - magic;
  V<float> r = xc - n * vsplat(0.693359375f);
  r = r - n * vsplat(-2.12194440e-4f);
  V<float> p = vsplat(1.9875691500e-4f);
  p = p * r + vsplat(1.3981999507e-3f);
  p = p * r + vsplat(8.3334519073e-3f);
  p = p * r + vsplat(4.1665795894e-2f);
  p = p * r + vsplat(1.6666665459e-1f);
  p = p * r + vsplat(5.0000001201e-1f);
  p = p * r * r + r + vsplat(1.0f);
  typedef Vec<float>::itype vi;
  vi ni = __builtin_convertvector(n, vi);
  vi bits = (ni + 127) << 23;
  V<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  V<float> res = p * scale;
  return x < lo ? vsplat(0.0f) : res;
}
inline V<double> vexp(V<double> x) {
  V<double> r;
  for (int l = 0; l < Vec<double>::W; ++l) r[l] = std::exp(x[l]);
  return r;
}

inline float bf16_to_f32(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else {  // subnormal
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      u = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f; std::memcpy(&f, &u, 4); return f;
}

template <typename T> inline T load_elem(const void* base, int dt, int64_t idx) {
  switch (dt) {
    case F32: return T(static_cast<const float*>(base)[idx]);
    case F64: return T(static_cast<const double*>(base)[idx]);
    case BF16: return T(bf16_to_f32(static_cast<const uint16_t*>(base)[idx]));
    default: return T(f16_to_f32(static_cast<const uint16_t*>(base)[idx]));
  }
}

// Copy rows [0, rows) x columns [k0, k0 + kc) of a (rows, ld) matrix into dst (rows, ldd), converting to T and
// optionally batch-normalising with per-column mean / rstd; columns kc..ldd-1 are zero-filled.
template <typename T>
void load_block(const void* src, int dt, int64_t rows, int64_t ld, int64_t k0, int64_t kc, T* dst, int64_t ldd,
                const T* mean, const T* rstd) {
  for (int64_t i = 0; i < rows; ++i) {
    T* d = dst + i * ldd;
    const int64_t off = i * ld + k0;
    if (dt == F32) {
      const float* s = static_cast<const float*>(src) + off;
      for (int64_t k = 0; k < kc; ++k) d[k] = T(s[k]);
    } else if (dt == F64) {
      const double* s = static_cast<const double*>(src) + off;
      for (int64_t k = 0; k < kc; ++k) d[k] = T(s[k]);
    } else if (dt == BF16) {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t k = 0; k < kc; ++k) d[k] = T(bf16_to_f32(s[k]));
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t k = 0; k < kc; ++k) d[k] = T(f16_to_f32(s[k]));
    }
    if (mean) for (int64_t k = 0; k < kc; ++k) d[k] = (d[k] - mean[k0 + k]) * rstd[k0 + k];
    for (int64_t k = kc; k < ldd; ++k) d[k] = T(0);
  }
}

template <typename T> constexpr bool native(int dt) { return (sizeof(T) == 4 && dt == F32) || (sizeof(T) == 8 && dt == F64); }

// ------------------------------------------------------------------------------------------- Gram regime
// acc[i][j] += sum_k a_i[k] b_j[k] for 4 x 4 rows (row pointers), k in [0, kc).
template <typename T>
inline void dot4x4(const T* const* a, const T* const* b, int64_t kc, T out[4][4]) {
  constexpr int W = Vec<T>::W;
  V<T> acc[4][4];
  for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) acc[r][c] = vsplat<T>(0);
  int64_t k = 0;
  for (; k + W <= kc; k += W) {
    V<T> va[4], vb[4];
    for (int r = 0; r < 4; ++r) va[r] = vload(a[r] + k);
    for (int c = 0; c < 4; ++c) vb[c] = vload(b[c] + k);
    for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) acc[r][c] += va[r] * vb[c];
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      T s = hsum<T>(acc[r][c]);
      for (int64_t kk = k; kk < kc; ++kk) s += a[r][kk] * b[c][kk];
      out[r][c] += s;
    }
}

template <typename T>
void gram_impl(const void* z, int dt, int64_t G, int64_t B, int64_t M, const T* mean, const T* rstd, bool normalize,
               T* out) {
  const int64_t KC = 1024;
  const int64_t nchunks = (M + KC - 1) / KC;
  const int64_t RB = (B + 3) / 4;
  const int nt = omp_get_max_threads();
  std::vector<T> partial(size_t(nt) * G * B * B, T(0));
  const bool direct = native<T>(dt) && !normalize;
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    T* part = partial.data() + size_t(tid) * G * B * B;
    std::vector<T> buf(direct ? 0 : size_t(B) * KC);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < G * nchunks; ++task) {
      const int64_t g = task / nchunks, k0 = (task % nchunks) * KC, kc = std::min(KC, M - k0);
      const T* base;
      int64_t ld;
      if (direct) {
        base = static_cast<const T*>(z) + (g * B) * M + k0;
        ld = M;
      } else {
        const size_t esz = (dt == F64) ? 8 : (dt == F32 ? 4 : 2);
        load_block<T>(static_cast<const char*>(z) + size_t(g) * B * M * esz, dt, B, M, k0, kc, buf.data(), KC,
                      normalize ? mean + g * M : nullptr, normalize ? rstd + g * M : nullptr);
        base = buf.data();
        ld = KC;
      }
      T* pg = part + g * B * B;
      for (int64_t bi = 0; bi < RB; ++bi) {
        const T* a[4];
        for (int r = 0; r < 4; ++r) a[r] = base + std::min(bi * 4 + r, B - 1) * ld;
        for (int64_t bj = bi; bj < RB; ++bj) {
          const T* b[4];
          for (int c = 0; c < 4; ++c) b[c] = base + std::min(bj * 4 + c, B - 1) * ld;
          T o[4][4] = {};
          dot4x4<T>(a, b, kc, o);
          for (int r = 0; r < 4; ++r) {
            const int64_t i = bi * 4 + r;
            if (i >= B) break;
            for (int c = 0; c < 4; ++c) {
              const int64_t j = bj * 4 + c;
              if (j < B) pg[i * B + j] += o[r][c];
            }
          }
        }
      }
    }
  }
  // reduce the per-thread partials (upper 4x4 tiles), mirror to the lower triangle
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < B; ++j) {
        const bool upper = (j / 4) >= (i / 4);
        const int64_t ii = upper ? i : j, jj = upper ? j : i;
        T s = 0;
        for (int t = 0; t < nt; ++t) s += partial[size_t(t) * G * B * B + g * B * B + ii * B + jj];
        out[g * B * B + i * B + j] = s;
      }
}

template <typename T>
void colstats_impl(const void* z, int dt, int64_t G, int64_t B, int64_t M, double eps, T* mean, T* rstd) {
  const int64_t KB = 256;
  const int64_t nblk = (M + KB - 1) / KB;
#pragma omp parallel
  {
    std::vector<T> s(KB), v(KB);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < G * nblk; ++task) {
      const int64_t g = task / nblk, k0 = (task % nblk) * KB, kc = std::min(KB, M - k0);
      const int64_t base = g * B * M + k0;
      std::fill(s.begin(), s.end(), T(0));
      std::fill(v.begin(), v.end(), T(0));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < kc; ++k) s[k] += load_elem<T>(z, dt, base + b * M + k);
      for (int64_t k = 0; k < kc; ++k) s[k] /= T(B);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < kc; ++k) {
          const T d = load_elem<T>(z, dt, base + b * M + k) - s[k];
          v[k] += d * d;
        }
      for (int64_t k = 0; k < kc; ++k) {
        mean[g * M + k0 + k] = s[k];
        rstd[g * M + k0 + k] = T(1) / std::sqrt(v[k] / T(B) + T(eps));
      }
    }
  }
}

// out[i][0:4W] = sum_j w[i][j] src[j][0:4W] for all B rows; src / out have leading dimensions lds / ldo.
template <typename T>
inline void wz_block(const T* w, int64_t B, const T* src, int64_t lds, T* out, int64_t ldo) {
  constexpr int W = Vec<T>::W;
  for (int64_t i0 = 0; i0 < B; i0 += 4) {
    int64_t rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = std::min(i0 + r, B - 1);
    V<T> acc[4][4];
    for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) acc[r][c] = vsplat<T>(0);
    for (int64_t j = 0; j < B; ++j) {
      const T* zj = src + j * lds;
      V<T> vz[4];
      for (int c = 0; c < 4; ++c) vz[c] = vload(zj + c * W);
      for (int r = 0; r < 4; ++r) {
        const V<T> wv = vsplat(w[rows[r] * B + j]);
        for (int c = 0; c < 4; ++c) acc[r][c] += wv * vz[c];
      }
    }
    for (int r = 0; r < 4 && i0 + r < B; ++r)
      for (int c = 0; c < 4; ++c) vstore(out + (i0 + r) * ldo + c * W, acc[r][c]);
  }
}

template <typename T>
void stream_wz_impl(const T* w, const void* z, int dt, int64_t G, int64_t B, int64_t M, const T* mean, const T* rstd,
                    const T* dg, bool cov, double eps, T* dz) {
  constexpr int KB = 4 * Vec<T>::W;
  const int64_t nblk = (M + KB - 1) / KB;
#pragma omp parallel
  {
    std::vector<T> zb(size_t(B) * KB), tb(size_t(B) * KB);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < G * nblk; ++task) {
      const int64_t g = task / nblk, k0 = (task % nblk) * KB, kc = std::min<int64_t>(KB, M - k0);
      const T* wg = w + g * B * B;
      T* dzg = dz + g * B * M;
      const bool direct = native<T>(dt) && !cov && kc == KB;
      if (direct) {
        wz_block<T>(wg, B, static_cast<const T*>(z) + g * B * M + k0, M, dzg + k0, M);
        continue;
      }
      const size_t esz = (dt == F64) ? 8 : (dt == F32 ? 4 : 2);
      load_block<T>(static_cast<const char*>(z) + size_t(g) * B * M * esz, dt, B, M, k0, kc, zb.data(), KB,
                    cov ? mean + g * M : nullptr, cov ? rstd + g * M : nullptr);
      wz_block<T>(wg, B, zb.data(), KB, tb.data(), KB);
      if (cov) {
        // T = W' Zn + dg c_m Zn; dZ = rstd (T - mean_b T - Zn mean_b(T Zn))
        T s1[KB], s2[KB], cd[KB];
        for (int64_t k = 0; k < KB; ++k) {
          s1[k] = s2[k] = T(0);
          const T rs = k < kc ? rstd[g * M + k0 + k] : T(0);
          cd[k] = dg[g] * (T(1) - T(eps) * rs * rs);
        }
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < KB; ++k) {
            T& t = tb[b * KB + k];
            const T zn = zb[b * KB + k];
            t += cd[k] * zn;
            s1[k] += t;
            s2[k] += t * zn;
          }
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < kc; ++k)
            dzg[b * M + k0 + k] = rstd[g * M + k0 + k] *
                                  (tb[b * KB + k] - s1[k] / T(B) - zb[b * KB + k] * s2[k] / T(B));
      } else {
        for (int64_t b = 0; b < B; ++b) std::memcpy(dzg + b * M + k0, tb.data() + b * KB, kc * sizeof(T));
      }
    }
  }
}

// ------------------------------------------------------------------------------------ many-samples regime
// X converted to T (or used in place), row norms s_i.
template <typename T> struct Rows {
  std::vector<T> own;
  const T* x;
  std::vector<T> sq;
};

template <typename T> void prepare_rows(const void* x, int dt, int64_t N, int64_t D, Rows<T>& R) {
  if (native<T>(dt)) {
    R.x = static_cast<const T*>(x);
  } else {
    R.own.resize(size_t(N) * D);
    const size_t esz = (dt == F64) ? 8 : (dt == F32 ? 4 : 2);
    (void)esz;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) R.own[i * D + d] = load_elem<T>(x, dt, i * D + d);
    R.x = R.own.data();
  }
  R.sq.resize(N);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += R.x[i * D + d] * R.x[i * D + d];
    R.sq[i] = s;
  }
}

constexpr int64_t RSB = 64;   // rows per task (row super-block)

// panel[d][c] = x[j0 + c][d] for c < nj, 0 beyond; panel is (D, 4W).
template <typename T> void make_panel(const T* x, int64_t D, int64_t j0, int64_t nj, T* panel) {
  constexpr int JB = 4 * Vec<T>::W;
  for (int64_t d = 0; d < D; ++d) {
    T* p = panel + d * JB;
    for (int64_t c = 0; c < nj; ++c) p[c] = x[(j0 + c) * D + d];
    for (int64_t c = nj; c < JB; ++c) p[c] = T(0);
  }
}

// dot[r][c] for 4 rows (pointers) x 4W panel columns.
template <typename T> inline void panel_dots(const T* const* xi, int64_t D, const T* panel, V<T> dot[4][4]) {
  constexpr int W = Vec<T>::W;
  for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) dot[r][c] = vsplat<T>(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* p = panel + d * 4 * W;
    V<T> vp[4];
    for (int c = 0; c < 4; ++c) vp[c] = vload(p + c * W);
    for (int r = 0; r < 4; ++r) {
      const V<T> b = vsplat(xi[r][d]);
      for (int c = 0; c < 4; ++c) dot[r][c] += b * vp[c];
    }
  }
}

// logits (modes 0/1) or hinge values (mode 2) of one 4 x 4W tile; invalid entries -> -inf (modes 0/1), 0 (mode 2).
// r_out (optional) receives the unclamped r_ij.
template <typename T>
inline void tile_values(int mode, T alpha, T margin, bool excl, const int64_t* irow, int64_t j0, int64_t nj,
                        const T* sq, const V<T> dot[4][4], V<T> val[4][4], V<T>* r_out) {
  constexpr int W = Vec<T>::W;
  const T ninf = -std::numeric_limits<T>::infinity();
  V<T> sj[4];
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < W; ++l) {
      const int64_t j = j0 + c * W + l;
      sj[c][l] = j < j0 + nj ? sq[j] : T(0);
    }
  for (int r = 0; r < 4; ++r) {
    const V<T> si = vsplat(sq[irow[r]]);
    for (int c = 0; c < 4; ++c) {
      V<T> v;
      if (mode == 1) {
        v = vsplat(alpha) * dot[r][c];
      } else {
        V<T> rr = si + sj[c] - vsplat<T>(2) * dot[r][c];
        // the self-pair is the constant d_ii = 0 (never its rounding noise)
        const int64_t dl = irow[r] - (j0 + c * W);
        if (!excl && dl >= 0 && dl < W) rr[dl] = T(0);
        if (r_out) r_out[r * 4 + c] = rr;
        V<T> rc = rr < vsplat<T>(0) ? vsplat<T>(0) : rr;
        v = -vsplat(alpha) * rc;
        if (mode == 2) {
          V<T> h = vsplat(margin) + v;
          h = h < vsplat<T>(0) ? vsplat<T>(0) : h;
          v = h * h;
        }
      }
      for (int l = 0; l < W; ++l) {
        const int64_t j = j0 + c * W + l;
        if (j >= j0 + nj || (excl && j == irow[r])) v[l] = mode == 2 ? T(0) : ninf;
      }
      val[r][c] = v;
    }
  }
}

template <typename T>
void pairs_fwd_impl(const void* x, int dt, int64_t G, int64_t N, int64_t D, int mode, double alpha_d,
                    double margin_d, bool excl, T* out) {
  constexpr int JB = 4 * Vec<T>::W;
  const T alpha = T(alpha_d), margin = T(margin_d);
  const T ninf = -std::numeric_limits<T>::infinity();
  const size_t esz = (dt == F64) ? 8 : (dt == F32 ? 4 : 2);
  for (int64_t g = 0; g < G; ++g) {
    Rows<T> R;
    prepare_rows<T>(static_cast<const char*>(x) + size_t(g) * N * D * esz, dt, N, D, R);
    const int64_t nsb = (N + RSB - 1) / RSB;
#pragma omp parallel
    {
      std::vector<T> panel(size_t(D) * JB);
      std::vector<T> mrun(RSB), lrun(RSB);
#pragma omp for schedule(dynamic, 1)
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const int64_t i_begin = sb * RSB, i_end = std::min(N, i_begin + RSB);
        std::fill(mrun.begin(), mrun.end(), ninf);
        std::fill(lrun.begin(), lrun.end(), T(0));
        for (int64_t j0 = 0; j0 < N; j0 += JB) {
          const int64_t nj = std::min<int64_t>(JB, N - j0);
          make_panel<T>(R.x, D, j0, nj, panel.data());
          for (int64_t i0 = i_begin; i0 < i_end; i0 += 4) {
            int64_t irow[4];
            const T* xi[4];
            for (int r = 0; r < 4; ++r) { irow[r] = std::min(i0 + r, N - 1); xi[r] = R.x + irow[r] * D; }
            V<T> dot[4][4], val[4][4];
            panel_dots<T>(xi, D, panel.data(), dot);
            tile_values<T>(mode, alpha, margin, excl, irow, j0, nj, R.sq.data(), dot, val, nullptr);
            for (int r = 0; r < 4 && i0 + r < i_end; ++r) {
              const int64_t li = i0 + r - i_begin;
              if (mode == 2) {
                lrun[li] += hsum<T>(val[r][0] + val[r][1] + val[r][2] + val[r][3]);
                continue;
              }
              V<T> mx = val[r][0];
              for (int c = 1; c < 4; ++c) mx = val[r][c] > mx ? val[r][c] : mx;
              const T mt = hmax<T>(mx);
              const T mnew = std::max(mrun[li], mt);
              if (mnew == ninf) continue;
              const V<T> mv = vsplat(mnew);
              V<T> e = vexp(val[r][0] - mv) + vexp(val[r][1] - mv) + vexp(val[r][2] - mv) + vexp(val[r][3] - mv);
              lrun[li] = lrun[li] * std::exp(mrun[li] - mnew) + hsum<T>(e);
              mrun[li] = mnew;
            }
          }
        }
        for (int64_t i = i_begin; i < i_end; ++i) {
          const int64_t li = i - i_begin;
          out[g * N + i] = mode == 2 ? lrun[li] : mrun[li] + std::log(lrun[li]);
        }
      }
    }
  }
}

template <typename T>
void pairs_bwd_impl(const void* x, int dt, int64_t G, int64_t N, int64_t D, const T* lse, const T* gout, int mode,
                    double alpha_d, double margin_d, double hscale_d, bool excl, T* dx) {
  constexpr int W = Vec<T>::W;
  constexpr int JB = 4 * W;
  const T alpha = T(alpha_d), margin = T(margin_d), hscale = T(hscale_d);
  const size_t esz = (dt == F64) ? 8 : (dt == F32 ? 4 : 2);
  for (int64_t g = 0; g < G; ++g) {
    Rows<T> R;
    prepare_rows<T>(static_cast<const char*>(x) + size_t(g) * N * D * esz, dt, N, D, R);
    const int64_t nsb = (N + RSB - 1) / RSB;
    const T gg = gout[g], L = lse[g];
#pragma omp parallel
    {
      std::vector<T> panel(size_t(D) * JB);
      std::vector<T> acc(size_t(RSB) * D), rows(RSB);
      alignas(64) T coef[4][JB];
#pragma omp for schedule(dynamic, 1)
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const int64_t i_begin = sb * RSB, i_end = std::min(N, i_begin + RSB);
        std::fill(acc.begin(), acc.end(), T(0));
        std::fill(rows.begin(), rows.end(), T(0));
        for (int64_t j0 = 0; j0 < N; j0 += JB) {
          const int64_t nj = std::min<int64_t>(JB, N - j0);
          make_panel<T>(R.x, D, j0, nj, panel.data());
          for (int64_t i0 = i_begin; i0 < i_end; i0 += 4) {
            int64_t irow[4];
            const T* xi[4];
            for (int r = 0; r < 4; ++r) { irow[r] = std::min(i0 + r, N - 1); xi[r] = R.x + irow[r] * D; }
            V<T> dot[4][4], val[4][4], rr[16];
            panel_dots<T>(xi, D, panel.data(), dot);
            // mode 2 needs the plain distances: compute the logit-like value -alpha max(r,0) via mode 0
            tile_values<T>(mode == 2 ? 0 : mode, alpha, margin, excl, irow, j0, nj, R.sq.data(), dot, val, rr);
            for (int r = 0; r < 4; ++r)
              for (int c = 0; c < 4; ++c) {
                V<T> cv;
                if (mode == 1) {
                  cv = vsplat(alpha * gg) * vexp(val[r][c] - vsplat(L));
                } else {
                  if (mode == 0) {
                    cv = vsplat(-alpha * gg) * vexp(val[r][c] - vsplat(L));
                  } else {
                    V<T> h = vsplat(margin) + val[r][c];        // margin - alpha max(r, 0)
                    h = h < vsplat<T>(0) ? vsplat<T>(0) : h;
                    cv = vsplat(T(-2) * hscale * alpha * gg) * h;
                    // invalid entries carry -inf in val: h = 0 there already except margin + (-inf) -> 0
                  }
                  cv = rr[r * 4 + c] < vsplat<T>(0) ? vsplat<T>(0) : cv;
                }
                for (int l = 0; l < W; ++l) {
                  const int64_t j = j0 + c * W + l;
                  if (j >= j0 + nj || j == irow[r]) cv[l] = T(0);   // no gradient through the self-pair
                }
                vstore(&coef[r][c * W], cv);
              }
            // acc[i] += sum_j coef_ij x_j: 4 rows x 4 vectors of D in registers, x_j loaded once per 4 rows
            const int64_t li0 = i0 - i_begin;
            for (int r = 0; r < 4; ++r) {
              T rs = 0;
              for (int64_t c = 0; c < nj; ++c) rs += coef[r][c];
              rows[li0 + r] += rs;
            }
            int64_t d0 = 0;
            for (; d0 + 4 * W <= D; d0 += 4 * W) {
              V<T> a[4][4];
              for (int r = 0; r < 4; ++r) for (int q = 0; q < 4; ++q) a[r][q] = vload(acc.data() + (li0 + r) * D + d0 + q * W);
              for (int64_t c = 0; c < nj; ++c) {
                const T* xj = R.x + (j0 + c) * D + d0;
                V<T> vx[4];
                for (int q = 0; q < 4; ++q) vx[q] = vload(xj + q * W);
                for (int r = 0; r < 4; ++r) {
                  const V<T> cv = vsplat(coef[r][c]);
                  for (int q = 0; q < 4; ++q) a[r][q] += cv * vx[q];
                }
              }
              for (int r = 0; r < 4; ++r) for (int q = 0; q < 4; ++q) vstore(acc.data() + (li0 + r) * D + d0 + q * W, a[r][q]);
            }
            for (; d0 + W <= D; d0 += W) {
              V<T> a[4];
              for (int r = 0; r < 4; ++r) a[r] = vload(acc.data() + (li0 + r) * D + d0);
              for (int64_t c = 0; c < nj; ++c) {
                const V<T> vx = vload(R.x + (j0 + c) * D + d0);
                for (int r = 0; r < 4; ++r) a[r] += vsplat(coef[r][c]) * vx;
              }
              for (int r = 0; r < 4; ++r) vstore(acc.data() + (li0 + r) * D + d0, a[r]);
            }
            for (; d0 < D; ++d0)
              for (int64_t c = 0; c < nj; ++c) {
                const T xv = R.x[(j0 + c) * D + d0];
                for (int r = 0; r < 4; ++r) acc[(li0 + r) * D + d0] += coef[r][c] * xv;
              }
          }
        }
        for (int64_t i = i_begin; i < i_end; ++i) {
          const int64_t li = i - i_begin;
          const T* a = acc.data() + li * D;
          const T* xi = R.x + i * D;
          T* o = dx + (g * N + i) * D;
          if (mode == 1) for (int64_t d = 0; d < D; ++d) o[d] = T(2) * a[d];
          else for (int64_t d = 0; d < D; ++d) o[d] = T(4) * (rows[li] * xi[d] - a[d]);
        }
      }
    }
  }
}

// -------------------------------------------------------------------------------------------- bindings
void check(const py::array& a, int64_t n, const char* name, bool allow_empty = false) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (!(allow_empty && a.size() == 0) && a.size() != n)
    throw std::invalid_argument(std::string(name) + ": wrong number of elements");
}

size_t in_itemsize(int dt) { return dt == F64 ? 8 : (dt == F32 ? 4 : 2); }

void check_in(const py::array& z, int dt, int64_t n) {
  check(z, n, "input");
  if (size_t(z.itemsize()) != in_itemsize(dt)) throw std::invalid_argument("input dtype code does not match itemsize");
}

bool is_double(const py::array& out) { return out.itemsize() == 8; }

template <typename T> T* mptr(py::array& a) { return static_cast<T*>(a.mutable_data()); }
template <typename T> const T* cptr(const py::array& a) { return a.size() ? static_cast<const T*>(a.data()) : nullptr; }

void gram(py::array z, int dt, int64_t G, int64_t B, int64_t M, py::array mean, py::array rstd, bool normalize,
          py::array out) {
  check_in(z, dt, G * B * M);
  check(out, G * B * B, "out");
  if (normalize) { check(mean, G * M, "mean"); check(rstd, G * M, "rstd"); }
  const void* zp = z.data();
  py::gil_scoped_release nogil;
  if (is_double(out)) gram_impl<double>(zp, dt, G, B, M, cptr<double>(mean), cptr<double>(rstd), normalize, mptr<double>(out));
  else gram_impl<float>(zp, dt, G, B, M, cptr<float>(mean), cptr<float>(rstd), normalize, mptr<float>(out));
}

void colstats(py::array z, int dt, int64_t G, int64_t B, int64_t M, double eps, py::array mean, py::array rstd) {
  check_in(z, dt, G * B * M);
  check(mean, G * M, "mean");
  check(rstd, G * M, "rstd");
  const void* zp = z.data();
  py::gil_scoped_release nogil;
  if (is_double(mean)) colstats_impl<double>(zp, dt, G, B, M, eps, mptr<double>(mean), mptr<double>(rstd));
  else colstats_impl<float>(zp, dt, G, B, M, eps, mptr<float>(mean), mptr<float>(rstd));
}

void stream_wz(py::array w, py::array z, int dt, int64_t G, int64_t B, int64_t M, py::array mean, py::array rstd,
               py::array dg, bool cov, double eps, py::array dz) {
  check(w, G * B * B, "w");
  check_in(z, dt, G * B * M);
  check(dz, G * B * M, "dz");
  if (cov) { check(mean, G * M, "mean"); check(rstd, G * M, "rstd"); check(dg, G, "dg"); }
  const void* zp = z.data();
  py::gil_scoped_release nogil;
  if (is_double(dz))
    stream_wz_impl<double>(cptr<double>(w), zp, dt, G, B, M, cptr<double>(mean), cptr<double>(rstd), cptr<double>(dg),
                           cov, eps, mptr<double>(dz));
  else
    stream_wz_impl<float>(cptr<float>(w), zp, dt, G, B, M, cptr<float>(mean), cptr<float>(rstd), cptr<float>(dg), cov,
                          eps, mptr<float>(dz));
}

void pairs_fwd(py::array x, int dt, int64_t G, int64_t N, int64_t D, int mode, double alpha, double margin, bool excl,
               py::array out) {
  check_in(x, dt, G * N * D);
  check(out, G * N, "out");
  const void* xp = x.data();
  py::gil_scoped_release nogil;
  if (is_double(out)) pairs_fwd_impl<double>(xp, dt, G, N, D, mode, alpha, margin, excl, mptr<double>(out));
  else pairs_fwd_impl<float>(xp, dt, G, N, D, mode, alpha, margin, excl, mptr<float>(out));
}

void pairs_bwd(py::array x, int dt, int64_t G, int64_t N, int64_t D, py::array lse, py::array gout, int mode,
               double alpha, double margin, double hscale, bool excl, py::array dx) {
  check_in(x, dt, G * N * D);
  check(lse, G, "lse");
  check(gout, G, "gout");
  check(dx, G * N * D, "dx");
  const void* xp = x.data();
  py::gil_scoped_release nogil;
  if (is_double(dx))
    pairs_bwd_impl<double>(xp, dt, G, N, D, cptr<double>(lse), cptr<double>(gout), mode, alpha, margin, hscale, excl,
                           mptr<double>(dx));
  else
    pairs_bwd_impl<float>(xp, dt, G, N, D, cptr<float>(lse), cptr<float>(gout), mode, alpha, margin, hscale, excl,
                          mptr<float>(dx));
}

}  // namespace

PYBIND11_MODULE(_cpp_dispersive, m) {
  m.doc() = "CPU kernels for Dispersive Loss and uniformity (see csrc/dispersive.cpp)";
  m.def("gram", &gram, "split-K Gram (G,B,M) -> (G,B,B)", py::arg("z"), py::arg("dtype"), py::arg("G"), py::arg("B"),
        py::arg("M"), py::arg("mean"), py::arg("rstd"), py::arg("normalize"), py::arg("out"));
  m.def("colstats", &colstats, "per-column mean / rstd", py::arg("z"), py::arg("dtype"), py::arg("G"), py::arg("B"),
        py::arg("M"), py::arg("eps"), py::arg("mean"), py::arg("rstd"));
  m.def("stream_wz", &stream_wz, "dZ = W Z (+ covariance batch-norm backward)", py::arg("w"), py::arg("z"),
        py::arg("dtype"), py::arg("G"), py::arg("B"), py::arg("M"), py::arg("mean"), py::arg("rstd"), py::arg("dg"),
        py::arg("cov"), py::arg("eps"), py::arg("dz"));
  m.def("pairs_fwd", &pairs_fwd, "tiled per-row log-sum-exp / hinge sums", py::arg("x"), py::arg("dtype"),
        py::arg("G"), py::arg("N"), py::arg("D"), py::arg("mode"), py::arg("alpha"), py::arg("margin"),
        py::arg("exclude_diag"), py::arg("out"));
  m.def("pairs_bwd", &pairs_bwd, "tiled backward", py::arg("x"), py::arg("dtype"), py::arg("G"), py::arg("N"),
        py::arg("D"), py::arg("lse"), py::arg("gout"), py::arg("mode"), py::arg("alpha"), py::arg("margin"),
        py::arg("hscale"), py::arg("exclude_diag"), py::arg("dx"));
}
