// Helpers shared by the CPU kernels of csrc/cpu/*.cpp: argument checks, the (B, s1, s2, s3) view
// of a big tensor, the fast-path test, and the loop that runs an element function over a block of
// one sample, vectorized with at::vec::Vectorized on every layout (see docs/OPS.md).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace adv_dpm::cpu {

// Elements per block. A sample is cut into blocks of this size; its sums are the block partial
// sums added in block order, so results do not depend on the thread count or schedule.
constexpr int64_t kBlock = 8192;
// Elements below which a parallel task is not worth its start-up cost.
constexpr int64_t kMinTaskElems = 16384;

// float for float / half / bfloat16, double for double.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The first big tensor of an op: floating point, rank 1..4, on the CPU.
inline void check_main(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_floating_point(), name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 4, name, " must have rank 1 to 4, got ", t.dim());
}

// Another big tensor: the shape, dtype and device of the main one.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, ", got ", t.device());
}

// A per-sample coefficient vector: floating point, shape (B,), on the CPU.
inline void check_coef(const at::Tensor& c, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == ref.size(0), name, " must have shape (B,) = (", ref.size(0),
              ",), got ", c.sizes());
  TORCH_CHECK(c.is_floating_point(), name, " must be floating point, got ", c.scalar_type());
  TORCH_CHECK(c.device().is_cpu(), name, " must be a CPU tensor, got ", c.device());
}

// A coefficient vector as B contiguous values of the accumulation type (B elements: negligible).
inline at::Tensor coef_values(const at::Tensor& c, at::ScalarType big) {
  return c.to(acc_type(big)).contiguous();
}

// True when every tensor is non-overlapping and dense with the batch dimension outermost, and all
// share strides on the dimensions of size > 1 (contiguous, channels_last, ...): sample b is then
// the span [b * numel / B, (b + 1) * numel / B) of each tensor, same element at same position.
inline bool same_dense_layout(at::TensorList ts) {
  const at::Tensor& first = ts[0];
  const int64_t B = first.size(0);
  for (const at::Tensor& t : ts) {
    if (!t.is_non_overlapping_and_dense() || (B > 1 && t.stride(0) * B != t.numel())) return false;
    for (const auto d : c10::irange(t.dim())) {
      if (t.size(d) > 1 && t.stride(d) != first.stride(d)) return false;
    }
  }
  return true;
}

// A big tensor viewed as (B, s1, s2, s3): missing dims padded after B, with stride 0.
template <typename T>
struct Strided {
  T* ptr;
  std::array<int64_t, 4> stride;

  Strided() = default;
  Strided(T* p, const at::Tensor& t) : ptr(p), stride{t.stride(0), 0, 0, 0} {
    for (int64_t d = 1; d < t.dim(); ++d) stride[4 - t.dim() + d] = t.stride(d);
  }
  T& at(int64_t b, int64_t i1, int64_t i2, int64_t i3) const {
    return ptr[b * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3]];
  }
};

// Loads and stores Vectorized<scalar_t>::size() elements as kParts vectors of the accumulation type.
template <typename scalar_t>
struct Lanes {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  static constexpr int64_t kStep = at::vec::Vectorized<scalar_t>::size();
  static constexpr int kParts = static_cast<int>(kStep / V::size());
  using Pack = std::array<V, kParts>;

  static Pack load(const scalar_t* p) {
    if constexpr (kParts == 1) {
      return {V::loadu(p)};
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
      return {lo, hi};
    }
  }
  static void store(scalar_t* p, const Pack& v) {
    if constexpr (kParts == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
};

// Sums of NR terms over a range: vector lanes, folded in lane order, plus scalar elements.
template <typename acc, size_t NR>
struct Sums {
  using V = at::vec::Vectorized<acc>;
  std::array<V, NR> lanes;
  std::array<acc, NR> rest{};

  Sums() { lanes.fill(V(acc(0))); }
  std::array<acc, NR> total() const {
    std::array<acc, NR> sum{};
    for (const auto r : c10::irange(NR)) {
      __at_align__ acc l[V::size()];
      lanes[r].store(l);
      for (const auto i : c10::irange(V::size())) sum[r] += l[i];
      sum[r] += rest[r];
    }
    return sum;
  }
};

// The NI inputs and NO outputs of an element-wise pass over big tensors of one shape and dtype.
// run(b, lo, hi, f) applies the element function to elements [lo, hi) of sample b, where
//   f(const std::array<T, NI>& x, std::array<T, NO>& y, std::array<T, NR>& r)
// sets the outputs y from the inputs x and the NR terms r summed over the range, returned in acc.
// f is generic: it is called with T = acc (scalar) and T = Vectorized<acc>. On the fast path
// (same_dense_layout) positions are memory order in the sample's span. Otherwise they are the
// logical (s1, s2, s3) order, walked row by row along s3 with each tensor's own strides; a row is
// run in place when every tensor has stride 1 along s3 (e.g. a crop of a contiguous tensor), else
// through small contiguous buffers.
template <typename scalar_t, size_t NI, size_t NO>
class Operands {
 public:
  using acc = acc_t<scalar_t>;
  static_assert(NI > 0, "the first input gives the shape");

  Operands(const std::array<at::Tensor, NI>& in, const std::array<at::Tensor, NO>& out) {
    const at::Tensor& ref = in[0];
    std::vector<at::Tensor> all(in.begin(), in.end());
    all.insert(all.end(), out.begin(), out.end());
    fast_ = same_dense_layout(all);
    const int64_t B = ref.size(0);
    span_ = B > 0 ? ref.numel() / B : 0;
    inner_ = {1, 1, 1};
    for (int64_t d = 1; d < ref.dim(); ++d) inner_[3 - ref.dim() + d] = ref.size(d);
    unit_rows_ = true;
    for (const auto k : c10::irange(NI)) {
      in_[k] = Strided<const scalar_t>(in[k].template const_data_ptr<scalar_t>(), in[k]);
      unit_rows_ = unit_rows_ && in_[k].stride[3] == 1;
    }
    for (const auto k : c10::irange(NO)) {
      out_[k] = Strided<scalar_t>(out[k].template mutable_data_ptr<scalar_t>(), out[k]);
      unit_rows_ = unit_rows_ && out_[k].stride[3] == 1;
    }
  }

  // Elements per sample.
  int64_t span() const { return span_; }

  template <size_t NR, typename F>
  std::array<acc, NR> run(int64_t b, int64_t lo, int64_t hi, const F& f) const {
    Sums<acc, NR> sums;
    std::array<const scalar_t*, NI> x;
    std::array<scalar_t*, NO> y;
    if (fast_) {
      for (const auto k : c10::irange(NI)) x[k] = in_[k].ptr + b * span_ + lo;
      for (const auto k : c10::irange(NO)) y[k] = out_[k].ptr + b * span_ + lo;
      contiguous(x, y, hi - lo, f, sums);
      return sums.total();
    }
    const int64_t s2 = inner_[1], s3 = inner_[2];
    int64_t i1 = lo / (s2 * s3), i2 = lo / s3 % s2, i3 = lo % s3;
    for (int64_t j = lo; j < hi; i3 = 0) {
      const int64_t n = std::min(hi - j, s3 - i3);
      for (const auto k : c10::irange(NI)) x[k] = &in_[k].at(b, i1, i2, i3);
      for (const auto k : c10::irange(NO)) y[k] = &out_[k].at(b, i1, i2, i3);
      if (unit_rows_) {
        contiguous(x, y, n, f, sums);
      } else {
        gathered(x, y, n, f, sums);
      }
      j += n;
      if (++i2 == s2) {
        i2 = 0;
        ++i1;
      }
    }
    return sums.total();
  }

 private:
  // n consecutive elements at x and y: vectorized, then a scalar tail.
  template <size_t NR, typename F>
  static void contiguous(const std::array<const scalar_t*, NI>& x, const std::array<scalar_t*, NO>& y, int64_t n,
                         const F& f, Sums<acc, NR>& sums) {
    using L = Lanes<scalar_t>;
    using V = typename L::V;
    int64_t i = 0;
    for (; i + L::kStep <= n; i += L::kStep) {
      std::array<typename L::Pack, NI> xv;
      std::array<typename L::Pack, NO> yv;
      for (const auto k : c10::irange(NI)) xv[k] = L::load(x[k] + i);
      for (const auto p : c10::irange(L::kParts)) {
        std::array<V, NI> xp;
        std::array<V, NO> yp;
        std::array<V, NR> rp;
        for (const auto k : c10::irange(NI)) xp[k] = xv[k][p];
        f(xp, yp, rp);
        for (const auto k : c10::irange(NO)) yv[k][p] = yp[k];
        for (const auto r : c10::irange(NR)) sums.lanes[r] = sums.lanes[r] + rp[r];
      }
      for (const auto k : c10::irange(NO)) L::store(y[k] + i, yv[k]);
    }
    for (int64_t t = i; t < n; ++t) {
      std::array<acc, NI> xs;
      std::array<acc, NO> ys;
      std::array<acc, NR> rs;
      for (const auto k : c10::irange(NI)) xs[k] = static_cast<acc>(x[k][t]);
      f(xs, ys, rs);
      for (const auto k : c10::irange(NO)) y[k][t] = static_cast<scalar_t>(ys[k]);
      for (const auto r : c10::irange(NR)) sums.rest[r] += rs[r];
    }
  }

  // n elements at x[k] + t * (stride along s3), same for y: gathered kTile at a time into
  // contiguous buffers, run there, and scattered back.
  template <size_t NR, typename F>
  void gathered(const std::array<const scalar_t*, NI>& x, const std::array<scalar_t*, NO>& y, int64_t n,
                const F& f, Sums<acc, NR>& sums) const {
    constexpr int64_t kTile = 256;
    __at_align__ scalar_t xbuf[NI][kTile];
    __at_align__ scalar_t ybuf[NO > 0 ? NO : 1][kTile];
    std::array<const scalar_t*, NI> xt;
    std::array<scalar_t*, NO> yt;
    for (const auto k : c10::irange(NI)) xt[k] = xbuf[k];
    for (const auto k : c10::irange(NO)) yt[k] = ybuf[k];
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t m = std::min(kTile, n - t0);
      for (const auto k : c10::irange(NI)) {
        for (int64_t t = 0; t < m; ++t) xbuf[k][t] = x[k][(t0 + t) * in_[k].stride[3]];
      }
      contiguous(xt, yt, m, f, sums);
      for (const auto k : c10::irange(NO)) {
        for (int64_t t = 0; t < m; ++t) y[k][(t0 + t) * out_[k].stride[3]] = ybuf[k][t];
      }
    }
  }

  std::array<Strided<const scalar_t>, NI> in_;
  std::array<Strided<scalar_t>, NO> out_;
  std::array<int64_t, 3> inner_;
  int64_t span_;
  bool fast_, unit_rows_;
};

// A sample of `span` elements cut into blocks of kBlock: block j covers [lo(j), hi(j)).
struct Blocks {
  int64_t span, per_sample;

  explicit Blocks(int64_t n) : span(n), per_sample((n + kBlock - 1) / kBlock) {}
  int64_t lo(int64_t j) const { return j * kBlock; }
  int64_t hi(int64_t j) const { return std::min(span, (j + 1) * kBlock); }
  // How many work units of `unit_elems` elements make one worthwhile parallel task.
  static int64_t grain(int64_t unit_elems) {
    return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, unit_elems));
  }
};

// Runs body(b, j) for every block j of every sample b < B, in parallel over (sample, block) pairs.
template <typename F>
void for_each_block(int64_t B, const Blocks& blocks, const F& body) {
  const int64_t n = blocks.per_sample;
  at::parallel_for(0, B * n, Blocks::grain(std::min(blocks.span, kBlock)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) body(k / n, k % n);
  });
}

// Calls f(std::integral_constant<int, v>{}) for a runtime choice v in {0, 1, 2}, so that each
// variant of a kernel is compiled without branches in its inner loop.
template <typename F>
void with_choice(int v, const F& f) {
  switch (v) {
    case 0:
      f(std::integral_constant<int, 0>{});
      break;
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    default:
      f(std::integral_constant<int, 2>{});
  }
}

}  // namespace adv_dpm::cpu
