// Device helpers shared by the kernels of csrc/cuda/*.cu (no torch). Only explicit conversion
// intrinsics are used for __half / __nv_bfloat16: torch's extension build defines
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace adv_dpm_cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Element types: raw bits <-> fp32.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_f32(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_f32(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_f32(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_f32(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_f32(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_f32(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Elements per 128-bit vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(typename Elem<T>::Bits));

// ---------------------------------------------------------------------------------------------
// Loads and stores of V consecutive elements at element offset `off` (V == kVec<T>: one 128-bit
// access, the address must be 16-byte aligned; V == 1: one scalar access). load_raw/unpack split
// a load so that the raw bits (4 registers per 128-bit vector) can be kept in flight.
template <typename T, int V>
struct Raw {
  static_assert(V * sizeof(typename Elem<T>::Bits) == 16, "vector accesses are 128-bit");
  uint4 v;
};
template <typename T>
struct Raw<T, 1> {
  typename Elem<T>::Bits v;
};

template <typename T, int V>
__device__ __forceinline__ Raw<T, V> load_raw(const void* base, int64_t off) {
  using Bits = typename Elem<T>::Bits;
  const Bits* p = static_cast<const Bits*>(base) + off;
  Raw<T, V> r;
  if constexpr (V == 1) {
    r.v = __ldg(p);
  } else {
    r.v = __ldg(reinterpret_cast<const uint4*>(p));
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Raw<T, V>& r, float (&out)[V]) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  if constexpr (V == 1) {
    out[0] = E::to_f32(r.v);
  } else {
    const uint32_t w[4] = {r.v.x, r.v.y, r.v.z, r.v.w};
    if constexpr (sizeof(Bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = E::to_f32(w[k]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = E::to_f32(static_cast<Bits>(w[k] & 0xffffu));
        out[2 * k + 1] = E::to_f32(static_cast<Bits>(w[k] >> 16));
      }
    }
  }
}

template <typename T, int V>
__device__ __forceinline__ void load(const void* base, int64_t off, float (&out)[V]) {
  unpack<T, V>(load_raw<T, V>(base, off), out);
}

template <typename T, int V>
__device__ __forceinline__ void store(void* base, int64_t off, const float (&in)[V]) {
  using E = Elem<T>;
  using Bits = typename E::Bits;
  Bits* p = static_cast<Bits*>(base) + off;
  if constexpr (V == 1) {
    *p = E::from_f32(in[0]);
  } else {
    static_assert(V * sizeof(Bits) == 16, "vector accesses are 128-bit");
    uint32_t w[4];
    if constexpr (sizeof(Bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = E::from_f32(in[k]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = static_cast<uint32_t>(E::from_f32(in[2 * k])) |
               (static_cast<uint32_t>(E::from_f32(in[2 * k + 1])) << 16);
      }
    }
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
}

// ---------------------------------------------------------------------------------------------
// Coefficients.
// Element i of c's storage (an offset in elements), in fp32.
__device__ __forceinline__ float load_coef_at(const CoefView& c, int64_t i) {
  switch (c.dtype) {
    case DType::kFloat16: return __half2float(__ushort_as_half(__ldg(static_cast<const uint16_t*>(c.data) + i)));
    case DType::kBFloat16:
      return __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const uint16_t*>(c.data) + i)) << 16);
    case DType::kFloat64: return static_cast<float>(__ldg(static_cast<const double*>(c.data) + i));
    case DType::kFloat32:
    default: return __ldg(static_cast<const float*>(c.data) + i);
  }
}

// Element b of a coefficient vector.
__device__ __forceinline__ float load_coef(const CoefView& c, int64_t b) { return load_coef_at(c, b * c.stride); }

__device__ __forceinline__ void store_coef(const CoefOut& c, int64_t b, float v) {
  switch (c.dtype) {
    case DType::kFloat16: static_cast<__half*>(c.data)[b] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(c.data)[b] = __float2bfloat16_rn(v); break;
    case DType::kFloat64: static_cast<double*>(c.data)[b] = static_cast<double>(v); break;
    case DType::kFloat32:
    default: static_cast<float*>(c.data)[b] = v; break;
  }
}

// isfinite on the bits (independent of fast-math flags).
__device__ __forceinline__ bool finite_f32(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// ---------------------------------------------------------------------------------------------
// Iteration over the elements of sample b handled by this block.
//   kStrided == false: element group v covers flat elements [b*N + v*V, b*N + v*V + V) of every
//                      tensor (dense layout shared by all tensors).
//   kStrided == true:  V == 1, element i of the sample is (i1, i2, i3) and each tensor is indexed
//                      through its own strides.
struct Coord {
  int64_t flat;            // dense: element offset of the group (shared by all tensors)
  int64_t b, i1, i2, i3;   // strided
};

template <bool kStrided>
__device__ __forceinline__ int64_t offset(const Coord& c, const View& v) {
  if constexpr (kStrided) {
    return c.b * v.stride[0] + c.i1 * v.stride[1] + c.i2 * v.stride[2] + c.i3 * v.stride[3];
  } else {
    return c.flat;
  }
}

// Number of iteration units of one sample: element groups of V (dense) or elements (strided).
template <int V, bool kStrided>
__device__ __forceinline__ int64_t unit_count(const Shape& s) {
  return kStrided ? s.N : s.N / V;
}

// Coordinate of unit i of sample b.
template <int V, bool kStrided>
__device__ __forceinline__ Coord make_coord(const Shape& s, int64_t b, int64_t i) {
  Coord c;
  c.b = b;
  if constexpr (!kStrided) {
    c.flat = b * s.N + i * V;
    c.i1 = c.i2 = c.i3 = 0;
  } else {
    c.flat = 0;
    if (s.N <= static_cast<int64_t>(UINT32_MAX)) {  // 32-bit div/mod where the sample allows
      const uint32_t s2 = static_cast<uint32_t>(s.s2), s3 = static_cast<uint32_t>(s.s3);
      const uint32_t ii = static_cast<uint32_t>(i);
      const uint32_t q = ii / s3;
      c.i3 = ii - q * s3;
      c.i2 = q % s2;
      c.i1 = q / s2;
    } else {
      const int64_t q = i / s.s3;
      c.i3 = i - q * s.s3;
      c.i2 = q % s.s2;
      c.i1 = q / s.s2;
    }
  }
  return c;
}

// First unit of this thread and the stride between its units: block blockIdx.x of the
// gridDim.x == nblk blocks of a sample takes units blockIdx.x * kThreads + threadIdx.x + k * stride.
__device__ __forceinline__ int64_t unit_start() {
  return static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
}
__device__ __forceinline__ int64_t unit_stride() { return static_cast<int64_t>(gridDim.x) * kThreads; }

// Calls f(coord) for every unit of sample b given to this thread, in a fixed order.
template <int V, bool kStrided, typename F>
__device__ __forceinline__ void for_sample(const Shape& s, int64_t b, F&& f) {
  const int64_t count = unit_count<V, kStrided>(s);
  const int64_t step = unit_stride();
  for (int64_t i = unit_start(); i < count; i += step) f(make_coord<V, kStrided>(s, b, i));
}

// Division of n < 2^31 by a divisor d >= 1 fixed on the host: a multiply-high, an add and a shift
// (Granlund-Montgomery: s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1) in place of the
// dependent chain of some fifteen instructions of a division by a runtime value.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;

  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>((uint64_t{1} << 32) * ((uint64_t{1} << s) - d) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// Butterfly sum: every lane ends with the same (bit-identical) value.
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block sums of NV values over blockDim.x (a multiple of 32, at most 1024) threads, the results in
// every thread: warp totals through shared memory, then every warp adds them with the same fixed
// butterfly (bit-identical everywhere). One barrier for all NV sums. `smem` holds NV x 32 floats
// and must not be written again before every thread has passed a later __syncthreads().
template <int NV>
__device__ __forceinline__ void block_allsum(float (&v)[NV], float (*smem)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = warp_allsum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) smem[k][warp] = v[k];
  }
  __syncthreads();
  const bool has = lane < static_cast<int>(blockDim.x >> 5);
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = warp_allsum(has ? smem[k][lane] : 0.f);
}

// Block-sums the 3 per-thread values and stores them as partial (b, blockIdx.x) of the
// [(b * nblk + block) * 3 + k] layout that warp_sum_partials reads. Ends with the block
// synchronized, so `smem` may be reused.
__device__ __forceinline__ void store_block_partials(float (&acc)[3], float (*smem)[32], float* partials, int64_t b,
                                                     int64_t nblk) {
  block_allsum(acc, smem);
  if (threadIdx.x == 0) {
    float* out = partials + (b * nblk + blockIdx.x) * 3;
    out[0] = acc[0];
    out[1] = acc[1];
    out[2] = acc[2];
  }
  __syncthreads();
}

// Deterministic warp sum of the 3-float partials [(b * nblk + j) * 3 + k], j < nblk, of one
// sample: lane l sums j = l, l + 32, ... in order, then a fixed shuffle tree. Result in all lanes.
__device__ __forceinline__ void warp_sum_partials(const float* partials, int64_t b, int64_t nblk, float (&s)[3]) {
  const int lane = threadIdx.x & 31;
  s[0] = s[1] = s[2] = 0.f;
  const float* p = partials + b * nblk * 3;
  for (int64_t j = lane; j < nblk; j += 32) {
    s[0] += p[j * 3 + 0];
    s[1] += p[j * 3 + 1];
    s[2] += p[j * 3 + 2];
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s[k] += __shfl_xor_sync(0xffffffffu, s[k], o);
  }
}

// Whether the dense 128-bit path is possible: every pointer 16-byte aligned and N a multiple of
// the vector width (a vector never straddles two samples).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline dim3 element_grid(const Shape& s, int64_t nblk) {
  const int64_t rows = s.B < kMaxGridY ? s.B : kMaxGridY;
  return dim3(static_cast<unsigned>(nblk), static_cast<unsigned>(rows), 1);
}

}  // namespace detail
}  // namespace adv_dpm_cuda
