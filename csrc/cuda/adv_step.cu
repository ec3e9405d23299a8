// CUDA adversarial step (docs/OPS.md, "adv_step"): a statistics pass and an apply pass.
//
//   stats:  g = grad (+ grad_target / c_noise[b]); per-sample sums of g*g, delta*g, delta*delta
//           (fp32) -> step, scale, skipped (step_scalars)
//   apply:  new_delta = scale * (delta + step * g) (delta when skipped), and in the fused form
//           x_adv = x_t + new_delta, target = eps (+ new_delta / c_noise[b] for mode >= 1).
//
// Two forms, chosen by the sample size alone (adv_step_one_block_per_sample):
//   sample kernel        one block of kSampleThreads per sample runs both passes; the apply pass
//                        re-reads delta and g, from cache. One launch: at these sizes (ImageNet-64
//                        and below) a launch costs about as much as the data.
//   stats + apply        grid (nblk, min(B, 65535)) blocks of kThreads each: per-(sample, block)
//                        partials partials[(b * nblk + block) * 3 + {0,1,2}]; then every warp of
//                        the apply kernel adds its sample's nblk partials in a fixed order
//                        (bit-identical in all warps and blocks of the sample).
// Deterministic (no atomics). The thread that computes a sample's scalars first (thread 0 of its
// block 0) writes grad_norm, delta_norm and skipped.
#include "common.cuh"

namespace adv_dpm_cuda {
namespace {

using namespace detail;

// One block of the sample kernel per SM suffices (its unrolled loop keeps 4 units of delta and g,
// 64 KB, in flight per block), so it may use up to 128 registers (launch bounds (512, 1)).
constexpr int kSampleThreads = 512;

// acc += (g*g, delta*g, delta*delta) over the unit at c.
template <typename T, int V, bool kStrided>
__device__ __forceinline__ void accumulate_unit(const AdvStepParams& p, const Coord& c, float cn, float (&acc)[3]) {
  float d[V], g[V];
  load<T, V>(p.grad.data, offset<kStrided>(c, p.grad), g);
  if (p.has_grad_target) {
    float gt[V];
    load<T, V>(p.grad_target.data, offset<kStrided>(c, p.grad_target), gt);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = g[k] + __fdiv_rn(gt[k], cn);
  }
  load<T, V>(p.delta.data, offset<kStrided>(c, p.delta), d);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    acc[0] += g[k] * g[k];
    acc[1] += d[k] * g[k];
    acc[2] += d[k] * d[k];
  }
}

struct StepScalars {
  float step, scale;
  bool skip;
};

// The per-sample scalars of sample b from its sums gg, dg, dd. `write`: this thread stores
// grad_norm, delta_norm and skipped of the sample.
__device__ __forceinline__ StepScalars step_scalars(const AdvStepParams& p, int64_t b, float gg, float dg, float dd,
                                                    bool write) {
  const bool skip = !finite_f32(gg);
  const float gs = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  // IEEE-rounded scalar math, in the order of docs/OPS.md (the build may use --use_fast_math).
  const float grad_norm = __fdiv_rn(__fsqrt_rn(gg), gs);
  const float step = __fdiv_rn(__fdiv_rn(p.lr, fmaxf(grad_norm, 1e-8f)), gs);
  const float sq = __fadd_rn(__fadd_rn(dd, __fmul_rn(__fmul_rn(2.f, step), dg)), __fmul_rn(__fmul_rn(step, step), gg));
  const float n = __fsqrt_rn(fmaxf(sq, 0.f));
  const bool project = n > p.radius;
  if (write) {
    p.grad_norm[b] = grad_norm;
    p.delta_norm[b] = skip ? __fsqrt_rn(dd) : (project ? p.radius : n);
    p.skipped[b] = skip;
  }
  StepScalars r;
  r.step = step;
  r.scale = project ? __fdiv_rn(p.radius, n) : 1.f;
  r.skip = skip;
  return r;
}

// The inputs of one unit of the apply pass, as raw bits (kept in flight while other work runs).
template <typename T, int V>
struct ApplyUnit {
  Coord c;
  Raw<T, V> d, g, gt, x, e;
};

template <typename T, int V, bool kStrided>
__device__ __forceinline__ ApplyUnit<T, V> load_apply_unit(const AdvStepParams& p, int64_t b, int64_t i) {
  ApplyUnit<T, V> u;
  u.c = make_coord<V, kStrided>(p.shape, b, i);
  u.d = load_raw<T, V>(p.delta.data, offset<kStrided>(u.c, p.delta));
  u.g = load_raw<T, V>(p.grad.data, offset<kStrided>(u.c, p.grad));
  if (p.has_grad_target) u.gt = load_raw<T, V>(p.grad_target.data, offset<kStrided>(u.c, p.grad_target));
  if (p.has_x_t) {
    u.x = load_raw<T, V>(p.x_t.data, offset<kStrided>(u.c, p.x_t));
    u.e = load_raw<T, V>(p.eps.data, offset<kStrided>(u.c, p.eps));
  }
  return u;
}

// Writes new_delta (and x_adv, target in the fused form) of one unit.
template <typename T, int V, bool kStrided>
__device__ __forceinline__ void apply_unit(const AdvStepParams& p, const ApplyUnit<T, V>& u, const StepScalars& sc,
                                           float cn) {
  float d[V], g[V], nd[V];
  unpack<T, V>(u.d, d);
  unpack<T, V>(u.g, g);
  if (p.has_grad_target) {
    float gt[V];
    unpack<T, V>(u.gt, gt);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = g[k] + __fdiv_rn(gt[k], cn);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) nd[k] = sc.skip ? d[k] : sc.scale * (d[k] + sc.step * g[k]);
  store<T, V>(p.new_delta.data, offset<kStrided>(u.c, p.new_delta), nd);
  if (p.has_x_t) {
    const bool delta_target = p.mode >= 1;
    float x[V], o[V];
    unpack<T, V>(u.x, x);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = x[k] + nd[k];
    store<T, V>(p.x_adv.data, offset<kStrided>(u.c, p.x_adv), o);
    unpack<T, V>(u.e, x);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = delta_target ? x[k] + __fdiv_rn(nd[k], cn) : x[k];
    store<T, V>(p.target.data, offset<kStrided>(u.c, p.target), o);
  }
}

// c_noise[b] where the step needs it (g with grad_target, or the target of mode >= 1), else 1.
__device__ __forceinline__ float step_coef(const AdvStepParams& p, int64_t b) {
  return (p.has_grad_target || (p.has_x_t && p.mode >= 1)) ? load_coef(p.c_noise, b) : 1.f;
}

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kSampleThreads, 1) adv_step_sample_kernel(const AdvStepParams p) {
  __shared__ float red[3][32];
  const int64_t count = unit_count<V, kStrided>(p.shape);
  for (int64_t b = blockIdx.x; b < p.shape.B; b += gridDim.x) {
    const float cn = step_coef(p, b);
    float acc[3] = {0.f, 0.f, 0.f};  // gg, dg, dd
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < count; i += kSampleThreads) {
      accumulate_unit<T, V, kStrided>(p, make_coord<V, kStrided>(p.shape, b, i), cn, acc);
    }
    block_allsum(acc, red);
    const StepScalars sc = step_scalars(p, b, acc[0], acc[1], acc[2], threadIdx.x == 0);
    __syncthreads();  // red is reused by the next sample
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < count; i += kSampleThreads) {
      apply_unit<T, V, kStrided>(p, load_apply_unit<T, V, kStrided>(p, b, i), sc, cn);
    }
  }
}

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) adv_step_stats_kernel(const AdvStepParams p) {
  __shared__ float smem[3][32];
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cn = step_coef(p, b);
    float acc[3] = {0.f, 0.f, 0.f};  // gg, dg, dd
    for_sample<V, kStrided>(p.shape, b, [&](const Coord& c) { accumulate_unit<T, V, kStrided>(p, c, cn, acc); });
    store_block_partials(acc, smem, p.partials, b, p.nblk);
  }
}

// The first unit's inputs are loaded before the scalars are computed, so the latency of the
// partial sums overlaps the element loads. No shared memory, no block barrier.
template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) adv_step_apply_kernel(const AdvStepParams p) {
  const int64_t count = unit_count<V, kStrided>(p.shape);
  const int64_t stride = unit_stride();
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cn = step_coef(p, b);
    int64_t i = unit_start();
    ApplyUnit<T, V> u;
    if (i < count) u = load_apply_unit<T, V, kStrided>(p, b, i);
    float s[3];
    warp_sum_partials(p.partials, b, p.nblk, s);
    const StepScalars sc = step_scalars(p, b, s[0], s[1], s[2], blockIdx.x == 0 && threadIdx.x == 0);
    while (i < count) {
      const ApplyUnit<T, V> cur = u;
      i += stride;
      if (i < count) u = load_apply_unit<T, V, kStrided>(p, b, i);
      apply_unit<T, V, kStrided>(p, cur, sc, cn);
    }
  }
}

template <typename T, int V, bool kStrided>
void launch_layout(const AdvStepParams& p, cudaStream_t stream) {
  if (adv_step_one_block_per_sample(p.shape)) {
    const unsigned rows = static_cast<unsigned>(p.shape.B < kMaxGridY ? p.shape.B : kMaxGridY);
    adv_step_sample_kernel<T, V, kStrided><<<rows, kSampleThreads, 0, stream>>>(p);
  } else {
    const dim3 grid = element_grid(p.shape, p.nblk);
    adv_step_stats_kernel<T, V, kStrided><<<grid, kThreads, 0, stream>>>(p);
    adv_step_apply_kernel<T, V, kStrided><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
cudaError_t adv_step_typed(const AdvStepParams& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  bool vec = p.dense && p.shape.N % V == 0 && aligned16(p.delta.data) && aligned16(p.grad.data) &&
             aligned16(p.new_delta.data);
  vec = vec && (!p.has_grad_target || aligned16(p.grad_target.data));
  vec = vec && (!p.has_x_t || (aligned16(p.x_t.data) && aligned16(p.eps.data) && aligned16(p.x_adv.data) &&
                               aligned16(p.target.data)));
  if (!p.dense) {
    launch_layout<T, 1, true>(p, stream);
  } else if (vec) {
    launch_layout<T, V, false>(p, stream);
  } else {
    launch_layout<T, 1, false>(p, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adv_step(const AdvStepParams& p, cudaStream_t stream) {
  // With N == 0 (B > 0) the kernels still run: the per-sample outputs are defined.
  if (p.shape.B <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return adv_step_typed<float>(p, stream);
    case DType::kFloat16: return adv_step_typed<__half>(p, stream);
    case DType::kBFloat16: return adv_step_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adv_dpm_cuda
