// CPU kernels of adv_dpm_C::group_norm_act and adv_dpm_C::group_norm_act_backward (docs/OPS.md).
//
// Layout. x is viewed as (N, C, HW) with strides (sN, sC, sHW) and walked as rows of contiguous
// runs:
//   channel rows (contiguous NCHW, sHW == 1, and any other collapsible layout): row (n, c) is the
//     HW run of one channel, its per-channel coefficients are scalars broadcast over the row;
//   pixel rows (channels_last, sC == 1): row (n, p) is the C run of one pixel, the per-channel
//     coefficients are vectors over C, and a sample is cut into fixed blocks of pixels.
// Every tensor (x, y, grad_y, grad_x) is indexed by its own strides; a row that is not contiguous
// in a tensor is gathered into (or scattered from) a scratch run, so grad_y may have another
// layout than x.
//
// Passes. Forward: per channel row (or per pixel block and channel) the sum and the sum of squared
// deviations from the partial's own mean (two-pass, in cache), combined per group with Chan's
// formula in a fixed order; then y. Backward: per channel row (or pixel block and channel) the
// partial sums S1 = sum gz and S2 = sum gz xhat, combined in a fixed order into the per-group terms
// and the parameter gradients (summed over n in order); then grad_x. When a group (channel rows) or
// a sample (pixel rows) fits in cache, one task runs both passes over it (the backward keeps gz in
// scratch instead of recomputing it), otherwise each pass is parallel over rows / blocks. Both
// schedules do the same arithmetic on the same shape-determined partials, so results do not depend
// on the thread count or schedule (no atomics). Element arithmetic is in the accumulation type
// (fp32, fp64 for fp64 x); the few per-channel combinations run in double.
//
// SIMD. setup.py builds with the SIMD flags of torch's CPU capability (ADV_DPM_CPU_SIMD=none
// builds for any x86-64 CPU). With GCC or Clang the kernels use the compilers' vector extensions:
// 16-byte vectors (the x86-64 / AArch64 baseline), and on x86-64 32- or 64-byte vectors in AVX2 /
// AVX-512F clones chosen at run time; where the build enables AVX-512F, the 64-byte float exp
// uses vscalefps. Lanes only change the order of the per-row vector sums (and so their rounding),
// not the partition. Other compilers use at::vec::Vectorized.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

#if defined(__GNUC__) && !defined(ADV_DPM_GN_NO_VECTOR_EXT)  // (the macro: to test the fallback)
#define ADV_DPM_GN_VECTOR_EXT 1
// Wide vectors never cross a non-inlined call. (Not popped: the templates are instantiated at the
// end of the file.)
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define ADV_DPM_GN_VECTOR_EXT 0
#endif
#if ADV_DPM_GN_VECTOR_EXT && defined(__x86_64__)
#define ADV_DPM_GN_X86_CLONES 1
#else
#define ADV_DPM_GN_X86_CLONES 0
#endif

namespace adv_dpm::cpu {
namespace {

// Pixel-row blocks: about kPixelBlockElems elements, at most kMaxBlockPixels pixels (per-channel
// sums over a block run in the accumulation type).
constexpr int64_t kPixelBlockElems = 8192;
constexpr int64_t kMaxBlockPixels = 256;
// Elements of a channel row summed in the accumulation type before the total moves to double.
constexpr int64_t kChunk = 4096;
// Largest group (channel rows) or sample (pixel rows) that one task runs both passes over.
constexpr int64_t kFuseElems = 65536;
// Fewest such tasks worth fusing (fewer run each pass in parallel over rows / blocks instead).
constexpr int64_t kMinFusedTasks = 8;
// Widest vector of any path, in bytes: per-channel arrays and scratch rows are padded to it.
constexpr int64_t kMaxVecBytes = 64;

template <typename acc>
constexpr int64_t kPad = kMaxVecBytes / sizeof(acc);

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// SIMD policies: V (a vector of kW lanes of acc), broadcast, loads and stores (of scalar_t,
// converted once), the lane sum in lane order, and exp.

#if ADV_DPM_GN_VECTOR_EXT
template <typename acc_, int kBytes>
struct Simd {
  using acc = acc_;
  typedef acc V __attribute__((vector_size(kBytes)));
  static constexpr int64_t kW = kBytes / sizeof(acc);
  static_assert(kBytes <= kMaxVecBytes, "padding");

  static C10_ALWAYS_INLINE V bcast(acc s) { return V{} + s; }
  static C10_ALWAYS_INLINE V loadu(const acc* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static C10_ALWAYS_INLINE void storeu(acc* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

  // c[I] + x c[I + 1] + x^2 c[I + 2] + ... by Horner's rule, unrolled at compile time.
  template <size_t I = 0, size_t N>
  static C10_ALWAYS_INLINE V poly(const V& x, const float (&c)[N]) {
    if constexpr (I + 1 == N) {
      return bcast(c[I]);
    } else {
      return poly<I + 1>(x, c) * x + c[I];
    }
  }

  // exp on every lane. float: Cephes' polynomial (about 1 ulp); below about -87.3 it flushes to
  // 0 and above about 88.0 it may give inf, which suits its one use, sigmoid(z) = 1 / (1 + exp(-z)),
  // where both ends are the exact limits. double: std::exp.
  static C10_ALWAYS_INLINE V exp(const V& v) {
    if constexpr (std::is_same_v<acc, float>) {
#if defined(__AVX512F__)
      if constexpr (kBytes == 64) {
        // 2^t, t = v log2(e): n = round(t), f = t - n in [-1/2, 1/2], 2^f by its Taylor
        // polynomial of degree 6 (relative error about 1e-7), 2^n by vscalefps, which also
        // gives the limits 0 and inf for large |v|: half the instructions of the form below.
        const V t = v * 1.44269504088896341f;
        const V n = (V)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const V p = poly(t - n, {1.0f, 6.9314718055994531e-1f, 2.4022650695910071e-1f, 5.5504108664821580e-2f,
                                 9.6181291076284772e-3f, 1.3333558146428443e-3f, 1.5403530393381609e-4f});
        return (V)_mm512_scalef_ps((__m512)p, (__m512)n);
      }
#endif
      typedef int32_t I __attribute__((vector_size(kBytes)));
      const V hi = bcast(88.3762626647949f), lo = bcast(-88.3762626647949f);
      V x = v > hi ? hi : v;  // NaN compares false: stays NaN
      x = x < lo ? lo : x;
      const V magic = bcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
      const V t = x * 1.44269504088896341f + magic;
      const V fn = t - magic;
      I bits;
      std::memcpy(&bits, &t, sizeof(bits));
      const I p2 = (bits - 0x4B400000 + 127) << 23;  // 2^n, n = round(x / ln 2)
      V pow2n;
      std::memcpy(&pow2n, &p2, sizeof(pow2n));
      const V r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
      const V p = poly(r, {5.0000001201e-1f, 1.6666665459e-1f, 4.1665795894e-2f, 8.3334519073e-3f,
                           1.3981999507e-3f, 1.9875691500e-4f});
      return (p * r * r + r + 1.0f) * pow2n;
    } else {
      V out = v;
      for (int64_t i = 0; i < kW; ++i) out[i] = std::exp(v[i]);
      return out;
    }
  }
};
#else
template <typename acc_>
struct VecSimd {
  using acc = acc_;
  using V = at::vec::Vectorized<acc>;
  static constexpr int64_t kW = V::size();
  static_assert(kW * sizeof(acc) <= kMaxVecBytes, "padding");

  static C10_ALWAYS_INLINE V bcast(acc s) { return V(s); }
  static C10_ALWAYS_INLINE V loadu(const acc* p) { return V::loadu(p); }
  static C10_ALWAYS_INLINE void storeu(acc* p, const V& v) { v.store(p); }
  static C10_ALWAYS_INLINE V exp(const V& v) { return v.exp(); }
};
#endif

// Loads / stores of kW elements of scalar_t, and of the first n < kW (zero-padded).
template <typename P, typename scalar_t>
C10_ALWAYS_INLINE typename P::V load(const scalar_t* p) {
  using acc = typename P::acc;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return P::loadu(p);
  } else {
    __at_align__ acc a[P::kW];
    for (int64_t i = 0; i < P::kW; ++i) a[i] = static_cast<acc>(p[i]);
    return P::loadu(a);
  }
}

template <typename P, typename scalar_t>
C10_ALWAYS_INLINE void store(scalar_t* p, const typename P::V& v) {
  using acc = typename P::acc;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    P::storeu(p, v);
  } else {
    __at_align__ acc a[P::kW];
    P::storeu(a, v);
    for (int64_t i = 0; i < P::kW; ++i) p[i] = static_cast<scalar_t>(a[i]);
  }
}

template <typename P, typename scalar_t>
C10_ALWAYS_INLINE typename P::V load_first(const scalar_t* p, int64_t n) {
  scalar_t a[P::kW];
  for (int64_t i = 0; i < P::kW; ++i) a[i] = i < n ? p[i] : scalar_t(0);
  return load<P>(a);
}

template <typename P, typename scalar_t>
C10_ALWAYS_INLINE void store_first(scalar_t* p, const typename P::V& v, int64_t n) {
  scalar_t a[P::kW];
  store<P>(a, v);
  for (int64_t i = 0; i < n; ++i) p[i] = a[i];
}

// The sum of v's lanes, in lane order.
template <typename P>
C10_ALWAYS_INLINE typename P::acc fold(const typename P::V& v) {
  __at_align__ typename P::acc a[P::kW];
  P::storeu(a, v);
  typename P::acc s = 0;
  for (int64_t i = 0; i < P::kW; ++i) s += a[i];
  return s;
}

template <typename P>
C10_ALWAYS_INLINE typename P::V sigmoid(const typename P::V& z) {
  return P::bcast(1) / (P::bcast(1) + P::exp(P::bcast(0) - z));
}

// silu'(z) = s (1 + z (1 - s))
template <typename P>
C10_ALWAYS_INLINE typename P::V silu_grad(const typename P::V& z) {
  const auto s = sigmoid<P>(z);
  return s * (P::bcast(1) + z * (P::bcast(1) - s));
}

// ---------------------------------------------------------------------------------------------
// Layout.

// A tensor (N, C, *spatial) viewed as (N, C, HW).
struct View {
  int64_t sN = 0, sC = 0, sHW = 1;
};

// The (N, C, HW) view of t, or false when its spatial dims do not collapse into one.
bool collapse(const at::Tensor& t, int64_t hw, View& v) {
  v.sN = t.stride(0);
  v.sC = t.stride(1);
  v.sHW = 1;
  if (hw <= 1) return true;
  int64_t expected = -1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (expected < 0) {
      v.sHW = t.stride(d);
    } else if (t.stride(d) != expected) {
      return false;
    }
    expected = t.stride(d) * t.size(d);
  }
  return true;
}

// Rows of one tensor: row (n, a) starts at n * sN + a * sA, its elements are sE apart.
template <typename T>
struct Rows {
  T* base;
  int64_t sN, sA, sE;

  T* row(int64_t n, int64_t a) const { return base + n * sN + a * sA; }
  // Scratch elements that in() / out() need for rows of len elements.
  int64_t scratch(int64_t len) const { return sE == 1 ? 0 : len; }
  // The row as a contiguous run: in place when it is one, else gathered into scratch.
  T* in(int64_t n, int64_t a, int64_t len, std::remove_const_t<T>* scratch) const {
    T* p = row(n, a);
    if (sE == 1 || len <= 1) return p;
    for (int64_t j = 0; j < len; ++j) scratch[j] = p[j * sE];
    return scratch;
  }
  // Where to write the row: in place, or scratch that commit() scatters.
  T* out(int64_t n, int64_t a, int64_t len, T* scratch) const { return sE == 1 || len <= 1 ? row(n, a) : scratch; }
  void commit(int64_t n, int64_t a, int64_t len, const T* written) const {
    T* p = row(n, a);
    if (written == p) return;
    for (int64_t j = 0; j < len; ++j) p[j * sE] = written[j];
  }
};

template <typename T>
Rows<T> rows_of(T* p, const View& v, bool pixel) {
  return pixel ? Rows<T>{p, v.sN, v.sHW, v.sC} : Rows<T>{p, v.sN, v.sC, v.sHW};
}

struct Shape {
  int64_t N, C, G, HW, Cg;
  bool pixel;          // pixel rows (channels_last) rather than channel rows
  int64_t len;         // elements per row: HW (channel rows) or C (pixel rows)
  int64_t Cpad;        // C padded to the widest vector (per-channel arrays)
  int64_t pb, blocks;  // pixel rows: pixels per block, blocks per sample (channel rows: HW, 1)
  int64_t P;           // partials per sample: blocks * Cpad

  int64_t block_pixels(int64_t b) const { return std::min(pb, HW - b * pb); }
  // Elements behind each partial (n, block, c).
  int64_t count(int64_t b) const { return pixel ? block_pixels(b) : HW; }
};

Shape make_shape(int64_t N, int64_t C, int64_t G, int64_t HW, const View& xv, int64_t pad) {
  Shape s{};
  s.N = N;
  s.C = C;
  s.G = G;
  s.HW = HW;
  s.Cg = C / G;
  s.pixel = C > 1 && xv.sC == 1 && !(HW > 1 && xv.sHW == 1);
  s.len = s.pixel ? C : HW;
  s.Cpad = round_up(C, pad);
  if (s.pixel) {
    s.pb = std::clamp<int64_t>(kPixelBlockElems / C, 1, std::min<int64_t>(kMaxBlockPixels, HW));
    s.blocks = (HW + s.pb - 1) / s.pb;
  } else {
    s.pb = HW;
    s.blocks = 1;
  }
  s.P = s.blocks * s.Cpad;
  return s;
}

// Per-channel coefficients of one row (channel rows: the (n, c) entries, broadcast) or of one
// sample (pixel rows: entries c = 0..C, read as vectors).
template <typename acc>
struct Coefs {
  const acc *m, *r, *kw, *cz;  // group mean, group rstd, w (1 + scale), b (1 + scale) + shift
  const acc *ga, *gb;          // backward: A and Bg of the channel's group
};

template <bool kPixel, typename P>
C10_ALWAYS_INLINE typename P::V coef(const typename P::acc* p, int64_t i) {
  if constexpr (kPixel) {
    return P::loadu(p + i);
  } else {
    return P::bcast(p[0]);
  }
}

// Everything a pass reads and writes. The (N, Cpad) coefficient arrays and (N, blocks, Cpad)
// partials are indexed n * Cpad + c and n * P + b * Cpad + c.
template <typename scalar_t>
struct Job {
  using acc = acc_t<scalar_t>;
  Shape s;
  Rows<const scalar_t> x, gy;
  Rows<scalar_t> out;              // y or grad_x
  acc *m, *r, *kw, *cz, *ga, *gb;  // coefficients
  double *p1, *p2;                 // partials: sums and squared deviations, or S1 and S2
  acc *mean, *rstd;                // (N, G)
  double eps;

  Coefs<acc> coefs(int64_t n, int64_t c) const {
    const int64_t o = n * s.Cpad + c;
    return {m + o, r + o, kw + o, cz + o, ga + o, gb + o};
  }
};

// Group statistics of (n, g): Chan's combination of the partials in (block, channel) order; sets
// mean, rstd and the channels' m, r coefficients.
template <typename scalar_t>
void combine_stats(const Job<scalar_t>& j, int64_t n, int64_t g) {
  using acc = acc_t<scalar_t>;
  const Shape& s = j.s;
  const int64_t c0 = g * s.Cg, c1 = c0 + s.Cg;
  const double M = static_cast<double>(s.Cg * s.HW);
  const double* p1 = j.p1 + n * s.P;
  const double* p2 = j.p2 + n * s.P;
  double sum = 0;
  for (int64_t b = 0; b < s.blocks; ++b) {
    for (int64_t c = c0; c < c1; ++c) sum += p1[b * s.Cpad + c];
  }
  const double mu = sum / M;
  double m2 = 0;
  for (int64_t b = 0; b < s.blocks; ++b) {
    const double cnt = static_cast<double>(s.count(b));
    for (int64_t c = c0; c < c1; ++c) {
      const double d = p1[b * s.Cpad + c] / cnt - mu;
      m2 += p2[b * s.Cpad + c] + cnt * d * d;
    }
  }
  const acc mean = static_cast<acc>(mu), rstd = static_cast<acc>(1.0 / std::sqrt(m2 / M + j.eps));
  j.mean[n * s.G + g] = mean;
  j.rstd[n * s.G + g] = rstd;
  std::fill(j.m + n * s.Cpad + c0, j.m + n * s.Cpad + c1, mean);
  std::fill(j.r + n * s.Cpad + c0, j.r + n * s.Cpad + c1, rstd);
}

// Backward terms of (n, g): S1, S2 of its channels summed over blocks in order (left in the
// partials of block 0), then A = sum k w S1 / M and Bg = sum k w S2 / M into ga, gb.
template <typename scalar_t>
void group_terms(const Job<scalar_t>& j, int64_t n, int64_t g) {
  using acc = acc_t<scalar_t>;
  const Shape& s = j.s;
  const int64_t c0 = g * s.Cg, c1 = c0 + s.Cg;
  double* p1 = j.p1 + n * s.P;
  double* p2 = j.p2 + n * s.P;
  for (int64_t b = 1; b < s.blocks; ++b) {
    for (int64_t c = c0; c < c1; ++c) {
      p1[c] += p1[b * s.Cpad + c];
      p2[c] += p2[b * s.Cpad + c];
    }
  }
  double a = 0, bg = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const double kw = j.kw[n * s.Cpad + c];
    a += kw * p1[c];
    bg += kw * p2[c];
  }
  const double M = static_cast<double>(s.Cg * s.HW);
  std::fill(j.ga + n * s.Cpad + c0, j.ga + n * s.Cpad + c1, static_cast<acc>(a / M));
  std::fill(j.gb + n * s.Cpad + c0, j.gb + n * s.Cpad + c1, static_cast<acc>(bg / M));
}

// ---------------------------------------------------------------------------------------------
// Rows (always inlined into the ISA clones below).

// A channel row: its sum and the sum of squared deviations from its mean, into *sum, *m2. The
// first pass sums x - x[0] (small even for data far from 0); chunks are summed in vectors, their
// totals in double.
template <typename P, typename scalar_t>
C10_ALWAYS_INLINE void row_stats(const scalar_t* x, int64_t len, double* sum_out, double* m2_out) {
  using acc = typename P::acc;
  using V = typename P::V;
  constexpr int64_t W = P::kW;
  const acc x0 = static_cast<acc>(x[0]);
  const V v0 = P::bcast(x0);
  double dsum = 0;
  for (int64_t lo = 0; lo < len; lo += kChunk) {
    const int64_t hi = std::min(len, lo + kChunk);
    V vs = P::bcast(0);
    int64_t i = lo;
    for (; i + W <= hi; i += W) vs = vs + (load<P>(x + i) - v0);
    acc t = fold<P>(vs);
    for (; i < hi; ++i) t += static_cast<acc>(x[i]) - x0;
    dsum += t;
  }
  const double sum = static_cast<double>(x0) * static_cast<double>(len) + dsum;
  const acc mean = static_cast<acc>(sum / static_cast<double>(len));
  const V vm = P::bcast(mean);
  double m2 = 0;
  for (int64_t lo = 0; lo < len; lo += kChunk) {
    const int64_t hi = std::min(len, lo + kChunk);
    V vs = P::bcast(0);
    int64_t i = lo;
    for (; i + W <= hi; i += W) {
      const V d = load<P>(x + i) - vm;
      vs = vs + d * d;
    }
    acc t = fold<P>(vs);
    for (; i < hi; ++i) {
      const acc d = static_cast<acc>(x[i]) - mean;
      t += d * d;
    }
    m2 += t;
  }
  // The deviations were taken from the rounded mean: the sum of squares about the exact one.
  const double dm = sum / static_cast<double>(len) - static_cast<double>(mean);
  *sum_out = sum;
  *m2_out = std::max(0.0, m2 - static_cast<double>(len) * dm * dm);
}

// A block of np pixel rows from p0: per-channel sums and squared deviations from the block's
// per-channel means, into psum, pm2 (C entries). work: 3 * Cpad entries.
template <typename P, typename scalar_t>
C10_ALWAYS_INLINE void block_stats(const Job<scalar_t>& j, int64_t n, int64_t p0, int64_t np, double* psum,
                                   double* pm2, typename P::acc* work, scalar_t* scratch) {
  using acc = typename P::acc;
  constexpr int64_t W = P::kW;
  const Shape& s = j.s;
  acc *sum = work, *m2 = work + s.Cpad, *mean = work + 2 * s.Cpad;
  std::fill(work, work + 3 * s.Cpad, acc(0));
  // The first pass sums x - (the block's first pixel), kept in mean[] meanwhile.
  {
    const scalar_t* x = j.x.in(n, p0, s.C, scratch);
    for (int64_t c = 0; c < s.C; ++c) mean[c] = static_cast<acc>(x[c]);
  }
  for (int64_t p = p0; p < p0 + np; ++p) {
    const scalar_t* x = j.x.in(n, p, s.C, scratch);
    int64_t i = 0;
    for (; i + W <= s.C; i += W) P::storeu(sum + i, P::loadu(sum + i) + (load<P>(x + i) - P::loadu(mean + i)));
    if (i < s.C) P::storeu(sum + i, P::loadu(sum + i) + (load_first<P>(x + i, s.C - i) - P::loadu(mean + i)));
  }
  for (int64_t c = 0; c < s.C; ++c) {
    psum[c] = static_cast<double>(mean[c]) * static_cast<double>(np) + static_cast<double>(sum[c]);
    mean[c] = static_cast<acc>(psum[c] / static_cast<double>(np));
  }
  for (int64_t p = p0; p < p0 + np; ++p) {
    const scalar_t* x = j.x.in(n, p, s.C, scratch);
    int64_t i = 0;
    for (; i + W <= s.C; i += W) {
      const auto d = load<P>(x + i) - P::loadu(mean + i);
      P::storeu(m2 + i, P::loadu(m2 + i) + d * d);
    }
    if (i < s.C) {
      const auto d = load_first<P>(x + i, s.C - i) - P::loadu(mean + i);
      P::storeu(m2 + i, P::loadu(m2 + i) + d * d);
    }
  }
  for (int64_t c = 0; c < s.C; ++c) {
    // The deviations were taken from the rounded mean: the sum of squares about the exact one.
    const double dm = psum[c] / static_cast<double>(np) - static_cast<double>(mean[c]);
    pm2[c] = std::max(0.0, static_cast<double>(m2[c]) - static_cast<double>(np) * dm * dm);
  }
}

// y = act((x - m) r kw + cz) of one vector at element i.
template <typename P, bool kAct, bool kPixel>
C10_ALWAYS_INLINE typename P::V y_of(const typename P::V& x, const Coefs<typename P::acc>& c, int64_t i) {
  const auto xh = (x - coef<kPixel, P>(c.m, i)) * coef<kPixel, P>(c.r, i);
  const auto z = xh * coef<kPixel, P>(c.kw, i) + coef<kPixel, P>(c.cz, i);
  if constexpr (kAct) {
    return z / (P::bcast(1) + P::exp(P::bcast(0) - z));  // z sigmoid(z)
  } else {
    return z;
  }
}

template <typename P, typename scalar_t, bool kAct, bool kPixel>
C10_ALWAYS_INLINE void forward_row(const scalar_t* x, scalar_t* y, int64_t len, const Coefs<typename P::acc>& c) {
  constexpr int64_t W = P::kW;
  int64_t i = 0;
  for (; i + W <= len; i += W) store<P>(y + i, y_of<P, kAct, kPixel>(load<P>(x + i), c, i));
  if (i < len) store_first<P>(y + i, y_of<P, kAct, kPixel>(load_first<P>(x + i, len - i), c, i), len - i);
}

// xhat and gz of one vector at element i: xh = (x - m) r, gz = grad_y silu'(xh kw + cz) (or grad_y).
template <typename P, bool kAct, bool kPixel>
C10_ALWAYS_INLINE void recompute(const typename P::V& x, const typename P::V& gy, const Coefs<typename P::acc>& c,
                                 int64_t i, typename P::V& xh, typename P::V& gz) {
  xh = (x - coef<kPixel, P>(c.m, i)) * coef<kPixel, P>(c.r, i);
  if constexpr (kAct) {
    gz = gy * silu_grad<P>(xh * coef<kPixel, P>(c.kw, i) + coef<kPixel, P>(c.cz, i));
  } else {
    gz = gy;
  }
}

// Backward pass 1 over a channel row: sum gz and sum gz xhat into *s1, *s2 (chunks summed in
// vectors, totals in double); gz also into gz_out (len rounded up to the vector) when given. The
// zero-padded tail adds gz = 0 (grad_y = 0).
template <typename P, typename scalar_t, bool kAct>
C10_ALWAYS_INLINE void channel_sums(const scalar_t* x, const scalar_t* gy, int64_t len,
                                    const Coefs<typename P::acc>& c, typename P::acc* gz_out, double* s1_out,
                                    double* s2_out) {
  using V = typename P::V;
  constexpr int64_t W = P::kW;
  double t1 = 0, t2 = 0;
  for (int64_t lo = 0; lo < len; lo += kChunk) {
    const int64_t hi = std::min(len, lo + kChunk);
    V s1 = P::bcast(0), s2 = P::bcast(0), xh, gz;
    int64_t i = lo;
    for (; i + W <= hi; i += W) {
      recompute<P, kAct, false>(load<P>(x + i), load<P>(gy + i), c, i, xh, gz);
      s1 = s1 + gz;
      s2 = s2 + gz * xh;
      if (gz_out) P::storeu(gz_out + i, gz);
    }
    if (i < hi) {
      recompute<P, kAct, false>(load_first<P>(x + i, hi - i), load_first<P>(gy + i, hi - i), c, i, xh, gz);
      s1 = s1 + gz;
      s2 = s2 + gz * xh;
      if (gz_out) P::storeu(gz_out + i, gz);
    }
    t1 += fold<P>(s1);
    t2 += fold<P>(s2);
  }
  *s1_out = t1;
  *s2_out = t2;
}

// Backward pass 1 over a pixel row: adds gz and gz xhat to the per-channel sums s1, s2 (Cpad
// entries); gz also into gz_out (Cpad entries) when given.
template <typename P, typename scalar_t, bool kAct>
C10_ALWAYS_INLINE void pixel_sums(const scalar_t* x, const scalar_t* gy, int64_t len, const Coefs<typename P::acc>& c,
                                  typename P::acc* gz_out, typename P::acc* s1, typename P::acc* s2) {
  using V = typename P::V;
  constexpr int64_t W = P::kW;
  V xh, gz;
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    recompute<P, kAct, true>(load<P>(x + i), load<P>(gy + i), c, i, xh, gz);
    P::storeu(s1 + i, P::loadu(s1 + i) + gz);
    P::storeu(s2 + i, P::loadu(s2 + i) + gz * xh);
    if (gz_out) P::storeu(gz_out + i, gz);
  }
  if (i < len) {
    recompute<P, kAct, true>(load_first<P>(x + i, len - i), load_first<P>(gy + i, len - i), c, i, xh, gz);
    P::storeu(s1 + i, P::loadu(s1 + i) + gz);
    P::storeu(s2 + i, P::loadu(s2 + i) + gz * xh);
    if (gz_out) P::storeu(gz_out + i, gz);
  }
}

// grad_x = r (gz kw - A - xhat Bg) of one vector at element i.
template <typename P, bool kPixel>
C10_ALWAYS_INLINE typename P::V dx_of(const typename P::V& xh, const typename P::V& gz,
                                      const Coefs<typename P::acc>& c, int64_t i) {
  return coef<kPixel, P>(c.r, i) *
         (gz * coef<kPixel, P>(c.kw, i) - coef<kPixel, P>(c.ga, i) - xh * coef<kPixel, P>(c.gb, i));
}

// Backward pass 2 over a row: gz recomputed, or read from gz_in (kStored).
template <typename P, typename scalar_t, bool kAct, bool kPixel, bool kStored>
C10_ALWAYS_INLINE void grad_x_row(const scalar_t* x, const scalar_t* gy, const typename P::acc* gz_in, scalar_t* gx,
                                  int64_t len, const Coefs<typename P::acc>& c) {
  using V = typename P::V;
  constexpr int64_t W = P::kW;
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    V xh, gz;
    if constexpr (kStored) {
      xh = (load<P>(x + i) - coef<kPixel, P>(c.m, i)) * coef<kPixel, P>(c.r, i);
      gz = P::loadu(gz_in + i);
    } else {
      recompute<P, kAct, kPixel>(load<P>(x + i), load<P>(gy + i), c, i, xh, gz);
    }
    store<P>(gx + i, dx_of<P, kPixel>(xh, gz, c, i));
  }
  if (i < len) {
    V xh, gz;
    if constexpr (kStored) {
      xh = (load_first<P>(x + i, len - i) - coef<kPixel, P>(c.m, i)) * coef<kPixel, P>(c.r, i);
      gz = P::loadu(gz_in + i);
    } else {
      recompute<P, kAct, kPixel>(load_first<P>(x + i, len - i), load_first<P>(gy + i, len - i), c, i, xh, gz);
    }
    store_first<P>(gx + i, dx_of<P, kPixel>(xh, gz, c, i), len - i);
  }
}

// ---------------------------------------------------------------------------------------------
// Tasks: each stage runs tasks [lo, hi). Pass tasks are channel rows (n * C + c) or pixel blocks
// (n * blocks + b); fused tasks are groups (n * G + g, channel rows) or samples (n, pixel rows).

enum class Stage { kStats, kY, kForward, kSums, kGradX, kBackward };

// Per-task buffers: row scratch for gathers and scatters, pixel-block work arrays, stored gz.
template <typename scalar_t>
struct Buffers {
  using acc = acc_t<scalar_t>;
  std::vector<scalar_t> xs, gs, os;
  std::vector<acc> work, gz;

  Buffers(const Job<scalar_t>& j, int64_t gz_elems)
      : xs(j.x.scratch(j.s.len)),
        gs(j.gy.base ? j.gy.scratch(j.s.len) : 0),
        os(j.out.scratch(j.s.len)),
        work(j.s.pixel ? 3 * j.s.Cpad : 0),
        gz(gz_elems) {}
};

template <typename P, typename scalar_t>
C10_ALWAYS_INLINE void stats_task(const Job<scalar_t>& j, Buffers<scalar_t>& buf, int64_t t) {
  const Shape& s = j.s;
  if (s.pixel) {
    const int64_t n = t / s.blocks, b = t % s.blocks;
    block_stats<P>(j, n, b * s.pb, s.block_pixels(b), j.p1 + n * s.P + b * s.Cpad, j.p2 + n * s.P + b * s.Cpad,
                   buf.work.data(), buf.xs.data());
  } else {
    const int64_t n = t / s.C, c = t % s.C;
    row_stats<P>(j.x.in(n, c, s.len, buf.xs.data()), s.len, j.p1 + n * s.P + c, j.p2 + n * s.P + c);
  }
}

template <typename P, typename scalar_t, bool kAct>
C10_ALWAYS_INLINE void y_task(const Job<scalar_t>& j, Buffers<scalar_t>& buf, int64_t t) {
  const Shape& s = j.s;
  const int64_t n = s.pixel ? t / s.blocks : t / s.C;
  const int64_t a0 = s.pixel ? t % s.blocks * s.pb : t % s.C, na = s.pixel ? s.block_pixels(t % s.blocks) : 1;
  for (int64_t a = a0; a < a0 + na; ++a) {
    const scalar_t* x = j.x.in(n, a, s.len, buf.xs.data());
    scalar_t* y = j.out.out(n, a, s.len, buf.os.data());
    if (s.pixel) {
      forward_row<P, scalar_t, kAct, true>(x, y, s.len, j.coefs(n, 0));
    } else {
      forward_row<P, scalar_t, kAct, false>(x, y, s.len, j.coefs(n, a));
    }
    j.out.commit(n, a, s.len, y);
  }
}

// Pass 1 of the backward over a task; gz into gz (rows at stride round_up(len)) when given.
template <typename P, typename scalar_t, bool kAct>
C10_ALWAYS_INLINE void sums_task(const Job<scalar_t>& j, Buffers<scalar_t>& buf, int64_t t, acc_t<scalar_t>* gz) {
  using acc = acc_t<scalar_t>;
  const Shape& s = j.s;
  const int64_t stride = round_up(s.len, kPad<acc>);
  if (s.pixel) {
    const int64_t n = t / s.blocks, b = t % s.blocks, p0 = b * s.pb;
    acc *s1 = buf.work.data(), *s2 = s1 + s.Cpad;
    std::fill(s1, s1 + 2 * s.Cpad, acc(0));
    for (int64_t p = p0; p < p0 + s.block_pixels(b); ++p) {
      const scalar_t* x = j.x.in(n, p, s.len, buf.xs.data());
      const scalar_t* g = j.gy.in(n, p, s.len, buf.gs.data());
      pixel_sums<P, scalar_t, kAct>(x, g, s.len, j.coefs(n, 0), gz ? gz + (p - p0) * stride : nullptr, s1, s2);
    }
    std::copy(s1, s1 + s.C, j.p1 + n * s.P + b * s.Cpad);
    std::copy(s2, s2 + s.C, j.p2 + n * s.P + b * s.Cpad);
  } else {
    const int64_t n = t / s.C, c = t % s.C;
    const scalar_t* x = j.x.in(n, c, s.len, buf.xs.data());
    const scalar_t* g = j.gy.in(n, c, s.len, buf.gs.data());
    channel_sums<P, scalar_t, kAct>(x, g, s.len, j.coefs(n, c), gz, j.p1 + n * s.P + c, j.p2 + n * s.P + c);
  }
}

// Pass 2 of the backward over a task; gz from gz (as sums_task left it) when given.
template <typename P, typename scalar_t, bool kAct>
C10_ALWAYS_INLINE void grad_x_task(const Job<scalar_t>& j, Buffers<scalar_t>& buf, int64_t t,
                                   const acc_t<scalar_t>* gz) {
  using acc = acc_t<scalar_t>;
  const Shape& s = j.s;
  const int64_t stride = round_up(s.len, kPad<acc>);
  const int64_t n = s.pixel ? t / s.blocks : t / s.C;
  const int64_t a0 = s.pixel ? t % s.blocks * s.pb : t % s.C, na = s.pixel ? s.block_pixels(t % s.blocks) : 1;
  for (int64_t a = a0; a < a0 + na; ++a) {
    const scalar_t* x = j.x.in(n, a, s.len, buf.xs.data());
    scalar_t* o = j.out.out(n, a, s.len, buf.os.data());
    const Coefs<acc> c = j.coefs(n, s.pixel ? 0 : a);
    if (gz) {
      const acc* g = gz + (a - a0) * stride;
      if (s.pixel) {
        grad_x_row<P, scalar_t, kAct, true, true>(x, nullptr, g, o, s.len, c);
      } else {
        grad_x_row<P, scalar_t, kAct, false, true>(x, nullptr, g, o, s.len, c);
      }
    } else {
      const scalar_t* g = j.gy.in(n, a, s.len, buf.gs.data());
      if (s.pixel) {
        grad_x_row<P, scalar_t, kAct, true, false>(x, g, nullptr, o, s.len, c);
      } else {
        grad_x_row<P, scalar_t, kAct, false, false>(x, g, nullptr, o, s.len, c);
      }
    }
    j.out.commit(n, a, s.len, o);
  }
}

// Elements of gz scratch a fused backward task needs.
template <typename scalar_t>
int64_t fused_gz_elems(const Shape& s) {
  const int64_t stride = round_up(s.len, kPad<acc_t<scalar_t>>);
  return s.pixel ? s.HW * stride : s.Cg * stride;
}

template <typename P, typename scalar_t, bool kAct, Stage kStage>
C10_ALWAYS_INLINE void run_stage(const Job<scalar_t>& j, int64_t lo, int64_t hi) {
  using acc = acc_t<scalar_t>;
  const Shape& s = j.s;
  Buffers<scalar_t> buf(j, kStage == Stage::kBackward ? fused_gz_elems<scalar_t>(s) : 0);
  for (int64_t t = lo; t < hi; ++t) {
    if constexpr (kStage == Stage::kStats) {
      stats_task<P>(j, buf, t);
    } else if constexpr (kStage == Stage::kY) {
      y_task<P, scalar_t, kAct>(j, buf, t);
    } else if constexpr (kStage == Stage::kSums) {
      sums_task<P, scalar_t, kAct>(j, buf, t, nullptr);
    } else if constexpr (kStage == Stage::kGradX) {
      grad_x_task<P, scalar_t, kAct>(j, buf, t, nullptr);
    } else {
      // Fused: the pass tasks of group t (channel rows) or sample t (pixel rows).
      const int64_t n = s.pixel ? t : t / s.G;
      const int64_t g0 = s.pixel ? 0 : t % s.G, g1 = s.pixel ? s.G : g0 + 1;
      const int64_t t0 = s.pixel ? n * s.blocks : n * s.C + g0 * s.Cg;
      const int64_t t1 = s.pixel ? t0 + s.blocks : t0 + s.Cg;
      const int64_t stride = round_up(s.len, kPad<acc>);
      // gz of pass task u starts at gz + offset(u): a block's pb rows, or one channel row.
      const auto offset = [&](int64_t u) { return (u - t0) * (s.pixel ? s.pb : 1) * stride; };
      if constexpr (kStage == Stage::kForward) {
        for (int64_t u = t0; u < t1; ++u) stats_task<P>(j, buf, u);
        for (int64_t g = g0; g < g1; ++g) combine_stats(j, n, g);
        for (int64_t u = t0; u < t1; ++u) y_task<P, scalar_t, kAct>(j, buf, u);
      } else {
        for (int64_t u = t0; u < t1; ++u) sums_task<P, scalar_t, kAct>(j, buf, u, buf.gz.data() + offset(u));
        for (int64_t g = g0; g < g1; ++g) group_terms(j, n, g);
        for (int64_t u = t0; u < t1; ++u) grad_x_task<P, scalar_t, kAct>(j, buf, u, buf.gz.data() + offset(u));
      }
    }
  }
}

// The stage compiled for each instruction set.
template <typename scalar_t>
using StageFn = void (*)(const Job<scalar_t>&, int64_t, int64_t);

#if ADV_DPM_GN_VECTOR_EXT
template <typename scalar_t, bool kAct, Stage kStage>
void stage_base(const Job<scalar_t>& j, int64_t lo, int64_t hi) {
  run_stage<Simd<acc_t<scalar_t>, 16>, scalar_t, kAct, kStage>(j, lo, hi);
}
#else
template <typename scalar_t, bool kAct, Stage kStage>
void stage_base(const Job<scalar_t>& j, int64_t lo, int64_t hi) {
  run_stage<VecSimd<acc_t<scalar_t>>, scalar_t, kAct, kStage>(j, lo, hi);
}
#endif

#if ADV_DPM_GN_X86_CLONES
template <typename scalar_t, bool kAct, Stage kStage>
__attribute__((target("avx2"))) void stage_avx2(const Job<scalar_t>& j, int64_t lo, int64_t hi) {
  run_stage<Simd<acc_t<scalar_t>, 32>, scalar_t, kAct, kStage>(j, lo, hi);
}

template <typename scalar_t, bool kAct, Stage kStage>
__attribute__((target("avx512f"))) void stage_avx512(const Job<scalar_t>& j, int64_t lo, int64_t hi) {
  run_stage<Simd<acc_t<scalar_t>, 64>, scalar_t, kAct, kStage>(j, lo, hi);
}

enum class Isa { kBase, kAvx2, kAvx512 };

Isa cpu_isa() {
#if defined(ADV_DPM_GN_FORCE_ISA)
  return static_cast<Isa>(ADV_DPM_GN_FORCE_ISA);  // testing: 0 base, 1 AVX2, 2 AVX-512F
#else
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#endif
}
#endif

template <typename scalar_t, bool kAct, Stage kStage>
StageFn<scalar_t> stage_fn() {
#if ADV_DPM_GN_X86_CLONES
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &stage_avx512<scalar_t, kAct, kStage>;
    case Isa::kAvx2:
      return &stage_avx2<scalar_t, kAct, kStage>;
    default:
      break;
  }
#endif
  return &stage_base<scalar_t, kAct, kStage>;
}

// Runs tasks [0, count) of task_elems elements each in parallel: cut into chunks of about
// kMinTaskElems elements that the threads take in turn, so that a thread slowed down (by other
// work on the machine) leaves its share to the others. Tasks write disjoint outputs: the results
// do not depend on which thread runs a chunk.
template <typename scalar_t>
void parallel_tasks(StageFn<scalar_t> fn, const Job<scalar_t>& j, int64_t count, int64_t task_elems) {
  const int64_t per_chunk = std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, task_elems));
  const int64_t chunks = (count + per_chunk - 1) / per_chunk;
  const int64_t threads = std::min<int64_t>(chunks, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    fn(j, 0, count);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      fn(j, c * per_chunk, std::min(count, (c + 1) * per_chunk));
    }
  });
}

// Whether one task runs both passes over each group (channel rows) or sample (pixel rows): when
// it fits in cache and there are enough of them to share out. Either schedule does the same
// arithmetic; the choice depends on the shape only (not on the thread count), so that even a
// compiler contracting a * b + c differently in the two schedules cannot make results depend on
// the number of threads.
bool fused(const Shape& s) {
  return s.pixel ? (s.C * s.HW <= kFuseElems && s.N >= kMinFusedTasks)
                 : (s.Cg * s.HW <= kFuseElems && s.N * s.G >= kMinFusedTasks);
}

// ---------------------------------------------------------------------------------------------
// Drivers.

// The per-channel parameters in the accumulation type: w, b (C), k = 1 + scale, shift (N, C).
template <typename acc>
struct Params {
  std::vector<acc> w, b, k, sh;
};

template <typename acc>
std::vector<acc> values(const std::optional<at::Tensor>& t, int64_t n, acc fill, acc add = 0) {
  std::vector<acc> v(n, fill);
  if (t) {
    const at::Tensor c = t->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const acc* p = c.const_data_ptr<acc>();
    for (int64_t i = 0; i < n; ++i) v[i] = add + p[i];
  }
  return v;
}

template <typename acc>
Params<acc> params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t N,
                   int64_t C) {
  return {values<acc>(weight, C, 1), values<acc>(bias, C, 0), values<acc>(scale, N * C, 1, 1),
          values<acc>(shift, N * C, 0)};
}

// Storage of a Job's coefficient arrays and partials; kw, cz from the parameters.
template <typename acc>
struct JobStore {
  std::vector<acc> m, r, kw, cz, ga, gb;
  std::vector<double> p1, p2;

  JobStore(const Shape& s, const Params<acc>& p)
      : m(s.N * s.Cpad, 0),
        r(s.N * s.Cpad, 0),
        kw(s.N * s.Cpad, 0),
        cz(s.N * s.Cpad, 0),
        ga(s.N * s.Cpad, 0),
        gb(s.N * s.Cpad, 0),
        p1(s.N * s.P, 0),
        p2(s.N * s.P, 0) {
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t c = 0; c < s.C; ++c) {
        const acc k = p.k[n * s.C + c];
        kw[n * s.Cpad + c] = p.w[c] * k;
        cz[n * s.Cpad + c] = p.b[c] * k + p.sh[n * s.C + c];
      }
    }
  }
  template <typename scalar_t>
  void attach(Job<scalar_t>& j) {
    j.m = m.data();
    j.r = r.data();
    j.kw = kw.data();
    j.cz = cz.data();
    j.ga = ga.data();
    j.gb = gb.data();
    j.p1 = p1.data();
    j.p2 = p2.data();
  }
};

template <typename scalar_t, bool kAct>
void forward_impl(const at::Tensor& x, const View& xv, const at::Tensor& y, const View& yv, const Shape& s,
                  const Params<acc_t<scalar_t>>& prm, double eps, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd) {
  using acc = acc_t<scalar_t>;
  Job<scalar_t> j{};
  j.s = s;
  j.x = rows_of(x.const_data_ptr<scalar_t>(), xv, s.pixel);
  j.gy = {nullptr, 0, 0, 1};
  j.out = rows_of(y.mutable_data_ptr<scalar_t>(), yv, s.pixel);
  j.mean = mean;
  j.rstd = rstd;
  j.eps = eps;
  JobStore<acc> store(s, prm);
  store.attach(j);
  if (fused(s)) {
    parallel_tasks(stage_fn<scalar_t, kAct, Stage::kForward>(), j, s.pixel ? s.N : s.N * s.G,
                   s.pixel ? s.C * s.HW : s.Cg * s.HW);
    return;
  }
  const int64_t tasks = s.pixel ? s.N * s.blocks : s.N * s.C, task_elems = s.pixel ? s.pb * s.C : s.HW;
  parallel_tasks(stage_fn<scalar_t, kAct, Stage::kStats>(), j, tasks, task_elems);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) combine_stats(j, n, g);
  }
  parallel_tasks(stage_fn<scalar_t, kAct, Stage::kY>(), j, tasks, task_elems);
}

template <typename scalar_t, bool kAct>
void backward_impl(const at::Tensor& gy, const View& gv, const at::Tensor& x, const View& xv, const at::Tensor& gx,
                   const View& gxv, const Shape& s, const Params<acc_t<scalar_t>>& prm, const acc_t<scalar_t>* mean,
                   const acc_t<scalar_t>* rstd, acc_t<scalar_t>* gw, acc_t<scalar_t>* gb, acc_t<scalar_t>* gscale,
                   acc_t<scalar_t>* gshift) {
  using acc = acc_t<scalar_t>;
  Job<scalar_t> j{};
  j.s = s;
  j.x = rows_of(x.const_data_ptr<scalar_t>(), xv, s.pixel);
  j.gy = rows_of(gy.const_data_ptr<scalar_t>(), gv, s.pixel);
  j.out = rows_of(gx.mutable_data_ptr<scalar_t>(), gxv, s.pixel);
  j.eps = 0;
  JobStore<acc> store(s, prm);
  store.attach(j);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      store.m[n * s.Cpad + c] = mean[n * s.G + c / s.Cg];
      store.r[n * s.Cpad + c] = rstd[n * s.G + c / s.Cg];
    }
  }
  if (fused(s)) {
    parallel_tasks(stage_fn<scalar_t, kAct, Stage::kBackward>(), j, s.pixel ? s.N : s.N * s.G,
                   s.pixel ? s.C * s.HW : s.Cg * s.HW);
  } else {
    const int64_t tasks = s.pixel ? s.N * s.blocks : s.N * s.C, task_elems = s.pixel ? s.pb * s.C : s.HW;
    parallel_tasks(stage_fn<scalar_t, kAct, Stage::kSums>(), j, tasks, task_elems);
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t g = 0; g < s.G; ++g) group_terms(j, n, g);
    }
    parallel_tasks(stage_fn<scalar_t, kAct, Stage::kGradX>(), j, tasks, task_elems);
  }

  // Parameter gradients from S1, S2 (left in block 0 of the partials), summed over n in order.
  const auto S1 = [&](int64_t n, int64_t c) { return store.p1[n * s.P + c]; };
  const auto S2 = [&](int64_t n, int64_t c) { return store.p2[n * s.P + c]; };
  for (int64_t c = 0; c < s.C; ++c) {
    double a = 0, b = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const double k = prm.k[n * s.C + c];
      a += k * S2(n, c);
      b += k * S1(n, c);
    }
    if (gw) gw[c] = static_cast<acc>(a);
    if (gb) gb[c] = static_cast<acc>(b);
  }
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) {
      const double w = prm.w[c], b = prm.b[c];
      if (gscale) gscale[n * s.C + c] = static_cast<acc>(w * S2(n, c) + b * S1(n, c));
      if (gshift) gshift[n * s.C + c] = static_cast<acc>(S1(n, c));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ops.

int64_t spatial_size(const at::Tensor& x) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return hw;
}

void check_x(const at::Tensor& x, int64_t num_groups, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op, ": x must have shape (N, C, *spatial) of rank 2 to 4, got ",
              x.sizes());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, op, ": num_groups must be a positive divisor of C = ",
              x.size(1), ", got ", num_groups);
}

void check_param(const std::optional<at::Tensor>& p, const char* name, at::IntArrayRef shape, const char* op) {
  if (!p) return;
  TORCH_CHECK(p->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", p->sizes());
  TORCH_CHECK(p->is_floating_point(), op, ": ", name, " must be floating point, got ", p->scalar_type());
  TORCH_CHECK(p->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", p->device());
}

void check_params(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const char* op) {
  const int64_t N = x.size(0), C = x.size(1);
  check_param(weight, "weight", {C}, op);
  check_param(bias, "bias", {C}, op);
  check_param(scale, "scale", {N, C}, op);
  check_param(shift, "shift", {N, C}, op);
}

// t itself when its spatial dims collapse, else a contiguous copy; v gets the view.
at::Tensor collapsible(const at::Tensor& t, int64_t hw, View& v) {
  if (collapse(t, hw, v)) return t;
  at::Tensor c = t.contiguous();
  collapse(c, hw, v);
  return c;
}

// Where to write an output: out itself when its spatial dims collapse, else a contiguous buffer
// (copied into out afterwards).
at::Tensor writable(const at::Tensor& out, int64_t hw, View& v) {
  if (collapse(out, hw, v)) return out;
  at::Tensor c = at::empty(out.sizes(), out.options());
  collapse(c, hw, v);
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    int64_t act) {
  constexpr const char* op = "group_norm_act";
  check_x(x_in, num_groups, op);
  check_params(x_in, weight, bias, scale, shift, op);
  TORCH_CHECK(act == 0 || act == 1, op, ": act must be 0 or 1, got ", act);
  const int64_t N = x_in.size(0), C = x_in.size(1), G = num_groups, HW = spatial_size(x_in);
  const at::ScalarType acc_dtype = acc_type(x_in.scalar_type());
  at::Tensor y = at::empty_like(x_in);
  at::Tensor mean = at::empty({N, G}, x_in.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({N, G}, x_in.options().dtype(acc_dtype));
  if (N == 0 || C == 0) return {y, mean, rstd};
  if (HW == 0) {  // empty groups: statistics of nothing
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  View xv, yv;
  const at::Tensor x = collapsible(x_in, HW, xv);
  const at::Tensor yk = writable(y, HW, yv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const Shape s = make_shape(N, C, G, HW, xv, kPad<acc>);
    const Params<acc> prm = params<acc>(weight, bias, scale, shift, N, C);
    acc* m = mean.mutable_data_ptr<acc>();
    acc* r = rstd.mutable_data_ptr<acc>();
    if (act) {
      forward_impl<scalar_t, true>(x, xv, yk, yv, s, prm, eps, m, r);
    } else {
      forward_impl<scalar_t, false>(x, xv, yk, yv, s, prm, eps, m, r);
    }
  });
  if (!yk.is_same(y)) y.copy_(yk);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, int64_t act) {
  constexpr const char* op = "group_norm_act_backward";
  check_x(x_in, num_groups, op);
  check_params(x_in, weight, bias, scale, shift, op);
  TORCH_CHECK(act == 0 || act == 1, op, ": act must be 0 or 1, got ", act);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), op, ": grad_y must have the shape of x ", x_in.sizes(), ", got ",
              grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.device().is_cpu(), op, ": grad_y must be a CPU tensor, got ", grad_y_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), G = num_groups, HW = spatial_size(x_in);
  TORCH_CHECK(mean_in.numel() == N * G && rstd_in.numel() == N * G, op, ": mean and rstd must have shape (N, G) = (",
              N, ", ", G, "), got ", mean_in.sizes(), " and ", rstd_in.sizes());
  const at::ScalarType acc_dtype = acc_type(x_in.scalar_type());
  const auto grad_of = [&](const std::optional<at::Tensor>& p, at::IntArrayRef shape) {
    return p ? at::empty(shape, x_in.options().dtype(acc_dtype)) : at::empty({0}, x_in.options());
  };
  at::Tensor grad_x = at::empty_like(x_in);
  at::Tensor gw = grad_of(weight, {C}), gb = grad_of(bias, {C});
  at::Tensor gscale = grad_of(scale, {N, C}), gshift = grad_of(shift, {N, C});
  const auto result = [&] {
    const auto cast = [](const at::Tensor& g, const std::optional<at::Tensor>& p) {
      return p ? g.to(p->scalar_type()) : g;
    };
    return std::make_tuple(grad_x, cast(gw, weight), cast(gb, bias), cast(gscale, scale), cast(gshift, shift));
  };
  if (N == 0 || C == 0 || HW == 0) {  // nothing to reduce: zero gradients
    for (at::Tensor* g : {&grad_x, &gw, &gb, &gscale, &gshift}) g->zero_();
    return result();
  }
  View gv, xv, gxv;
  const at::Tensor x = collapsible(x_in, HW, xv);
  const at::Tensor gy = collapsible(grad_y_in.to(x_in.scalar_type()), HW, gv);
  const at::Tensor gxk = writable(grad_x, HW, gxv);
  const at::Tensor mean = mean_in.to(acc_dtype).contiguous(), rstd = rstd_in.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const Shape s = make_shape(N, C, G, HW, xv, kPad<acc>);
    const Params<acc> prm = params<acc>(weight, bias, scale, shift, N, C);
    const auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<acc>() : nullptr; };
    const acc* m = mean.const_data_ptr<acc>();
    const acc* r = rstd.const_data_ptr<acc>();
    if (act) {
      backward_impl<scalar_t, true>(gy, gv, x, xv, gxk, gxv, s, prm, m, r, ptr(gw), ptr(gb), ptr(gscale),
                                    ptr(gshift));
    } else {
      backward_impl<scalar_t, false>(gy, gv, x, xv, gxk, gxv, s, prm, m, r, ptr(gw), ptr(gb), ptr(gscale),
                                     ptr(gshift));
    }
  });
  if (!gxk.is_same(grad_x)) grad_x.copy_(gxk);
  return result();
}

}  // namespace
}  // namespace adv_dpm::cpu

TORCH_LIBRARY_IMPL(adv_dpm_C, CPU, m) {
  m.impl("group_norm_act", &adv_dpm::cpu::group_norm_act);
  m.impl("group_norm_act_backward", &adv_dpm::cpu::group_norm_act_backward);
}
