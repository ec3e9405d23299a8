// CUDA adversarial step (docs/OPS.md, "adv_step"): a statistics pass and an apply pass.
//
//   stats:  g = grad (+ grad_target / c_noise[b]); per-sample sums of g*g, delta*g, delta*delta
//           (fp32) -> step, scale, skipped (step_scalars)
//   apply:  new_delta = scale * (delta + step * g) (delta when skipped), and in the fused form
//           x_adv = x_t + new_delta, target = eps (+ new_delta / c_noise[b] for mode >= 1).
//
// Three forms (adv_step_plan: from the sample size, the batch and the device):
//   resident kernel      K blocks per sample hold it in registers (delta and g read once), sum
//                        their statistics through distributed shared memory (a thread block
//                        cluster: compute capability >= 9.0, K <= 8, samples of up to 16384
//                        elements; K = 1 elsewhere, up to 2048) and write from the registers.
//                        One launch, the data read once, and K chosen so that small batches
//                        (ImageNet-64: B = 64) still fill every SM.
//   sample kernel        (larger samples of up to kSampleMax elements, without clusters) one
//                        block of kSampleThreads per sample runs both passes; the apply pass
//                        re-reads delta and g, from cache. One launch: at these sizes a launch
//                        costs about as much as the data.
//   stats + apply        grid (nblk, min(B, 65535)) blocks of kThreads each: per-(sample, block)
//                        partials partials[(b * nblk + block) * 3 + {0,1,2}]; then every warp of
//                        the apply kernel adds its sample's nblk partials in a fixed order
//                        (bit-identical in all warps and blocks of the sample).
// Deterministic (no atomics). The thread that computes a sample's scalars first (thread 0 of its
// block 0) writes grad_norm, delta_norm and skipped.
#include <algorithm>

#include <cooperative_groups.h>

#include "common.cuh"

namespace adv_dpm_cuda {
namespace {

using namespace detail;

// One block of the sample kernel per SM suffices (its unrolled loop keeps 4 units of delta and g,
// 64 KB, in flight per block), so it may use up to 128 registers (launch bounds (512, 1)).
constexpr int kSampleThreads = 512;
constexpr int64_t kSampleMax = 16384;  // elements (ImageNet-64: 3 x 64 x 64 = 12288)

// Resident kernel: kResidentElems elements of delta and g per thread in registers (fp32: 2
// vectors of 4), up to kMaxCluster blocks (the portable cluster size) per sample: samples of up
// to 16384 elements. A block takes 74 to 108 registers per thread (ptxas, no spills), so
// kResidentBlocksPerSm blocks fit an SM (one's loads overlap another's reductions and stores): a
// small batch gets about that many blocks per SM (one wave) where its samples have at least
// kResidentMinElems elements per thread to give.
constexpr int kResidentThreads = 256;
constexpr int kResidentElems = 8;
constexpr int kResidentMinElems = 4;
constexpr int kMaxCluster = 8;
constexpr int kResidentBlocksPerSm = 2;
// Dynamic shared memory of a resident block: block_allsum's 3 x 32 floats, then the block's 3
// sums that the other blocks of its cluster read.
constexpr int kResidentSmemFloats = 3 * 32 + 3;

// g = grad (+ grad_target / c_noise[b] when given) of one unit, from its raw bits.
template <typename T, int V>
__device__ __forceinline__ void unpack_grad(const AdvStepParams& p, const Raw<T, V>& grad, const Raw<T, V>& grad_target,
                                            float cn, float (&g)[V]) {
  unpack<T, V>(grad, g);
  if (p.has_grad_target) {
    float gt[V];
    unpack<T, V>(grad_target, gt);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = g[k] + __fdiv_rn(gt[k], cn);
  }
}

// acc += (g*g, delta*g, delta*delta) over one unit.
template <int V>
__device__ __forceinline__ void accumulate(const float (&d)[V], const float (&g)[V], float (&acc)[3]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    acc[0] += g[k] * g[k];
    acc[1] += d[k] * g[k];
    acc[2] += d[k] * d[k];
  }
}

// acc += (g*g, delta*g, delta*delta) over the unit at c.
template <typename T, int V, bool kStrided>
__device__ __forceinline__ void accumulate_unit(const AdvStepParams& p, const Coord& c, float cn, float (&acc)[3]) {
  float d[V], g[V];
  const Raw<T, V> grad = load_raw<T, V>(p.grad.data, offset<kStrided>(c, p.grad));
  Raw<T, V> gt;
  if (p.has_grad_target) gt = load_raw<T, V>(p.grad_target.data, offset<kStrided>(c, p.grad_target));
  load<T, V>(p.delta.data, offset<kStrided>(c, p.delta), d);
  unpack_grad<T, V>(p, grad, gt, cn, g);
  accumulate<V>(d, g, acc);
}

struct StepScalars {
  float step, scale;
  bool skip;
};

// The per-sample scalars of sample b from its sums gg, dg, dd. `write`: this thread stores
// grad_norm, delta_norm and skipped of the sample.
__device__ __forceinline__ StepScalars step_scalars(const AdvStepParams& p, int64_t b, float gg, float dg, float dd,
                                                    bool write) {
  const float gs = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  const bool skip = !finite_f32(gg) || !(gs > 0.f && finite_f32(gs));  // or a loss scale that is not finite > 0
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

// Writes new_delta of the unit at c from its delta d and g (and, in the fused form, x_adv =
// x_t + new_delta and target = eps (+ new_delta / c_noise for mode >= 1) from its raw x_t, eps).
template <typename T, int V, bool kStrided>
__device__ __forceinline__ void write_unit(const AdvStepParams& p, const Coord& c, const float (&d)[V],
                                           const float (&g)[V], const Raw<T, V>& x_t, const Raw<T, V>& eps,
                                           const StepScalars& sc, float cn) {
  float nd[V];
#pragma unroll
  for (int k = 0; k < V; ++k) nd[k] = sc.skip ? d[k] : sc.scale * (d[k] + sc.step * g[k]);
  store<T, V>(p.new_delta.data, offset<kStrided>(c, p.new_delta), nd);
  if (!p.has_x_t) return;
  float x[V], o[V];
  unpack<T, V>(x_t, x);
#pragma unroll
  for (int k = 0; k < V; ++k) o[k] = x[k] + nd[k];
  store<T, V>(p.x_adv.data, offset<kStrided>(c, p.x_adv), o);
  unpack<T, V>(eps, x);
#pragma unroll
  for (int k = 0; k < V; ++k) o[k] = p.mode >= 1 ? x[k] + __fdiv_rn(nd[k], cn) : x[k];
  store<T, V>(p.target.data, offset<kStrided>(c, p.target), o);
}

// Writes new_delta (and x_adv, target in the fused form) of one unit.
template <typename T, int V, bool kStrided>
__device__ __forceinline__ void apply_unit(const AdvStepParams& p, const ApplyUnit<T, V>& u, const StepScalars& sc,
                                           float cn) {
  float d[V], g[V];
  unpack<T, V>(u.d, d);
  unpack_grad<T, V>(p, u.g, u.gt, cn, g);
  write_unit<T, V, kStrided>(p, u.c, d, g, u.x, u.e, sc, cn);
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

// The sums v (every thread of every block of the cluster holds its block's) -> the cluster's, in
// every thread: each block publishes its sums in `part` (its shared memory), and every thread
// adds the cluster's blocks' in rank order (bit-identical in all of them). `part` may be written
// again once this returns.
__device__ __forceinline__ void cluster_allsum(float (&v)[3], float* part) {
#if defined(_CG_HAS_CLUSTER_GROUP)
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) part[k] = v[k];
  }
  cluster.sync();
  float s[3] = {0.f, 0.f, 0.f};
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const float* q = cluster.map_shared_rank(part, static_cast<int>(r));
#pragma unroll
    for (int k = 0; k < 3; ++k) s[k] += q[k];
  }
  cluster.sync();  // no block rewrites or leaves its `part` while another reads it
#pragma unroll
  for (int k = 0; k < 3; ++k) v[k] = s[k];
#else
  __trap();  // never launched: adv_step_plan uses clusters only on devices that launch them
#endif
}

// gridDim.x == cluster blocks per sample (one thread block cluster when > 1). Unit i of a sample
// (k * cluster + block) * kResidentThreads + thread: for each k, the cluster's threads take
// consecutive units.
template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kResidentThreads, kResidentBlocksPerSm)
    adv_step_resident_kernel(const AdvStepParams p) {
  constexpr int R = kResidentElems / V;
  extern __shared__ float resident_smem[];
  float(*red)[32] = reinterpret_cast<float(*)[32]>(resident_smem);
  float* part = resident_smem + 3 * 32;
  const int64_t count = unit_count<V, kStrided>(p.shape);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kResidentThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kResidentThreads;
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cn = step_coef(p, b);
    Raw<T, V> rd[R], rg[R], rgt[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t i = first + k * stride;
      if (i < count) {
        const Coord c = make_coord<V, kStrided>(p.shape, b, i);
        rd[k] = load_raw<T, V>(p.delta.data, offset<kStrided>(c, p.delta));
        rg[k] = load_raw<T, V>(p.grad.data, offset<kStrided>(c, p.grad));
        if (p.has_grad_target) rgt[k] = load_raw<T, V>(p.grad_target.data, offset<kStrided>(c, p.grad_target));
      }
    }
    float d[R][V], g[R][V];
    float acc[3] = {0.f, 0.f, 0.f};  // gg, dg, dd
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (first + k * stride < count) {
        unpack<T, V>(rd[k], d[k]);
        unpack_grad<T, V>(p, rg[k], rgt[k], cn, g[k]);
        accumulate<V>(d[k], g[k], acc);
      }
    }
    // The fused form's x_t and eps, in flight during the reductions.
    Raw<T, V> rx[R], re[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t i = first + k * stride;
      if (p.has_x_t && i < count) {
        const Coord c = make_coord<V, kStrided>(p.shape, b, i);
        rx[k] = load_raw<T, V>(p.x_t.data, offset<kStrided>(c, p.x_t));
        re[k] = load_raw<T, V>(p.eps.data, offset<kStrided>(c, p.eps));
      }
    }
    block_allsum(acc, red);
    if (gridDim.x > 1) cluster_allsum(acc, part);
    const StepScalars sc = step_scalars(p, b, acc[0], acc[1], acc[2], blockIdx.x == 0 && threadIdx.x == 0);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t i = first + k * stride;
      if (i < count) {
        write_unit<T, V, kStrided>(p, make_coord<V, kStrided>(p.shape, b, i), d[k], g[k], rx[k], re[k], sc, cn);
      }
    }
    __syncthreads();  // red is reused by the next sample
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

// The kernels of `plan`; the error of a cluster launch (cudaLaunchKernelEx returns it).
template <typename T, int V, bool kStrided>
cudaError_t launch_layout(const AdvStepParams& p, const AdvStepPlan& plan, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.shape.B < kMaxGridY ? p.shape.B : kMaxGridY);
  if (plan.kind == AdvStepPlan::kResident) {
    const dim3 grid(static_cast<unsigned>(plan.cluster), rows);
    constexpr size_t smem = kResidentSmemFloats * sizeof(float);
    if (plan.cluster == 1) {
      adv_step_resident_kernel<T, V, kStrided><<<grid, kResidentThreads, smem, stream>>>(p);
      return cudaSuccess;
    }
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kResidentThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, adv_step_resident_kernel<T, V, kStrided>, p);
  }
  if (plan.kind == AdvStepPlan::kSample) {
    adv_step_sample_kernel<T, V, kStrided><<<rows, kSampleThreads, 0, stream>>>(p);
  } else {
    const dim3 grid = element_grid(p.shape, p.nblk);
    adv_step_stats_kernel<T, V, kStrided><<<grid, kThreads, 0, stream>>>(p);
    adv_step_apply_kernel<T, V, kStrided><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t adv_step_typed(const AdvStepParams& p, const AdvStepPlan& plan, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  bool vec = p.dense && p.shape.N % V == 0 && aligned16(p.delta.data) && aligned16(p.grad.data) &&
             aligned16(p.new_delta.data);
  vec = vec && (!p.has_grad_target || aligned16(p.grad_target.data));
  vec = vec && (!p.has_x_t || (aligned16(p.x_t.data) && aligned16(p.eps.data) && aligned16(p.x_adv.data) &&
                               aligned16(p.target.data)));
  const cudaError_t launched = !p.dense ? launch_layout<T, 1, true>(p, plan, stream)
                               : vec     ? launch_layout<T, V, false>(p, plan, stream)
                                         : launch_layout<T, 1, false>(p, plan, stream);
  const cudaError_t last = cudaGetLastError();
  return launched != cudaSuccess ? launched : last;
}

// An attribute of the current device; 0 where the query fails (its error cleared: no launch failed).
int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return value;
}

}  // namespace

AdvStepPlan adv_step_plan(const AdvStepParams& p) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const bool clusters = device_attribute(cudaDevAttrClusterLaunch) != 0;
  const int64_t n = p.shape.N, rows = p.shape.B < kMaxGridY ? p.shape.B : kMaxGridY;
  const int64_t need = std::max<int64_t>(1, cdiv(n, static_cast<int64_t>(kResidentThreads) * kResidentElems));
  AdvStepPlan plan;
  if (need <= (clusters ? kMaxCluster : 1)) {
    plan.kind = AdvStepPlan::kResident;
    int64_t k = need;
    if (clusters) {
      const int64_t wanted = static_cast<int64_t>(kResidentBlocksPerSm) * sms / std::max<int64_t>(rows, 1);
      const int64_t useful = std::max<int64_t>(1, n / (static_cast<int64_t>(kResidentThreads) * kResidentMinElems));
      k = std::max(need, std::min({wanted, useful, static_cast<int64_t>(kMaxCluster)}));
    }
    plan.cluster = static_cast<int32_t>(k);
  } else if (n <= kSampleMax) {
    plan.kind = AdvStepPlan::kSample;
  }
  return plan;
}

cudaError_t launch_adv_step(const AdvStepParams& p, const AdvStepPlan& plan, cudaStream_t stream) {
  // With N == 0 (B > 0) the kernels still run: the per-sample outputs are defined.
  if (p.shape.B <= 0) return cudaSuccess;
  if (plan.kind == AdvStepPlan::kTwoKernels && p.partials == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return adv_step_typed<float>(p, plan, stream);
    case DType::kFloat16: return adv_step_typed<__half>(p, plan, stream);
    case DType::kBFloat16: return adv_step_typed<__nv_bfloat16>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adv_dpm_cuda
