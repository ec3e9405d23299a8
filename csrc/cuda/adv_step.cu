// CUDA adversarial step (docs/OPS.md, "adv_step"): one statistics pass and one apply pass.
//
//   stats:  g = grad (+ grad_target / c_noise[b]); per-(sample, block) partial sums of
//           g*g, delta*g, delta*delta (fp32) -> partials[(b * nblk + block) * 3 + {0,1,2}]
//   apply:  every warp adds its sample's nblk partials in a fixed order (bit-identical in all
//           warps and blocks of the sample), derives skipped/step/scale, then writes
//           new_delta = scale * (delta + step * g) (delta when skipped), and in the fused form
//           x_adv = x_t + new_delta, target = eps (+ new_delta / c_noise[b] for mode >= 1).
//           Thread 0 of block 0 of each sample writes grad_norm, delta_norm and skipped.
//
// Grid of both: (nblk, min(B, 65535)) blocks of kThreads. Deterministic (no atomics).
#include "common.cuh"

namespace adv_dpm_cuda {
namespace {

using namespace detail;

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) adv_step_stats_kernel(const AdvStepParams p) {
  __shared__ float smem[3 * (kThreads / 32)];
  const bool has_gt = p.has_grad_target;
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cn = has_gt ? load_coef(p.c_noise, b) : 1.f;
    float acc[3] = {0.f, 0.f, 0.f};  // gg, dg, dd
    for_sample<V, kStrided>(p.shape, b, [&](const Coord& c) {
      float d[V], g[V];
      load<T, V>(p.grad.data, offset<kStrided>(c, p.grad), g);
      if (has_gt) {
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
    });
    block_sum<3>(acc, smem);
    if (threadIdx.x == 0) {
      float* out = p.partials + (b * p.nblk + blockIdx.x) * 3;
      out[0] = acc[0];
      out[1] = acc[1];
      out[2] = acc[2];
    }
  }
}

struct StepScalars {
  float step, scale;
  bool skip;
};

// The per-sample scalars of sample b from its nblk partials. Called by every warp with all 32
// lanes; every lane of every block gets bit-identical values (fixed summation order). `write`:
// this thread stores grad_norm, delta_norm and skipped of the sample.
__device__ __forceinline__ StepScalars step_scalars(const AdvStepParams& p, int64_t b, bool write) {
  float s[3];
  warp_sum_partials(p.partials, b, p.nblk, s);
  const float gg = s[0], dg = s[1], dd = s[2];
  const bool skip = !finite_f32(gg);
  // IEEE-rounded scalar math, in the order of docs/OPS.md (the build may use --use_fast_math).
  const float grad_norm = __fdiv_rn(__fsqrt_rn(gg), p.grad_scale);
  const float step = __fdiv_rn(__fdiv_rn(p.lr, fmaxf(grad_norm, 1e-8f)), p.grad_scale);
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

// The first unit's inputs are loaded before the scalars are computed, so the latency of the
// partial sums overlaps the element loads. No shared memory, no block barrier.
template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) adv_step_apply_kernel(const AdvStepParams p) {
  const bool has_gt = p.has_grad_target;
  const bool has_xt = p.has_x_t;
  const bool delta_target = has_xt && p.mode >= 1;
  const int64_t count = unit_count<V, kStrided>(p.shape);
  const int64_t stride = unit_stride();
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cn = (has_gt || delta_target) ? load_coef(p.c_noise, b) : 1.f;
    int64_t i = unit_start();
    bool has = i < count;
    Coord c;
    Raw<T, V> rd, rg, rgt, rx, re;  // raw bits of the unit in flight
    auto load_unit = [&]() {
      c = make_coord<V, kStrided>(p.shape, b, i);
      rd = load_raw<T, V>(p.delta.data, offset<kStrided>(c, p.delta));
      rg = load_raw<T, V>(p.grad.data, offset<kStrided>(c, p.grad));
      if (has_gt) rgt = load_raw<T, V>(p.grad_target.data, offset<kStrided>(c, p.grad_target));
      if (has_xt) {
        rx = load_raw<T, V>(p.x_t.data, offset<kStrided>(c, p.x_t));
        re = load_raw<T, V>(p.eps.data, offset<kStrided>(c, p.eps));
      }
    };
    if (has) load_unit();
    const StepScalars sc = step_scalars(p, b, blockIdx.x == 0 && threadIdx.x == 0);
    while (has) {
      float d[V], g[V], nd[V];
      unpack<T, V>(rd, d);
      unpack<T, V>(rg, g);
      if (has_gt) {
        float gt[V];
        unpack<T, V>(rgt, gt);
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = g[k] + __fdiv_rn(gt[k], cn);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) nd[k] = sc.skip ? d[k] : sc.scale * (d[k] + sc.step * g[k]);
      store<T, V>(p.new_delta.data, offset<kStrided>(c, p.new_delta), nd);
      if (has_xt) {
        float x[V], o[V];
        unpack<T, V>(rx, x);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = x[k] + nd[k];
        store<T, V>(p.x_adv.data, offset<kStrided>(c, p.x_adv), o);
        unpack<T, V>(re, x);
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = delta_target ? x[k] + __fdiv_rn(nd[k], cn) : x[k];
        store<T, V>(p.target.data, offset<kStrided>(c, p.target), o);
      }
      i += stride;
      has = i < count;
      if (has) load_unit();
    }
  }
}

template <typename T>
cudaError_t adv_step_typed(const AdvStepParams& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const dim3 grid = element_grid(p.shape, p.nblk);
  bool vec = p.dense && p.shape.N % V == 0 && aligned16(p.delta.data) && aligned16(p.grad.data) &&
             aligned16(p.new_delta.data);
  vec = vec && (!p.has_grad_target || aligned16(p.grad_target.data));
  vec = vec && (!p.has_x_t || (aligned16(p.x_t.data) && aligned16(p.eps.data) && aligned16(p.x_adv.data) &&
                               aligned16(p.target.data)));
  if (!p.dense) {
    adv_step_stats_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(p);
    adv_step_apply_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (vec) {
    adv_step_stats_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(p);
    adv_step_apply_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    adv_step_stats_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(p);
    adv_step_apply_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(p);
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
