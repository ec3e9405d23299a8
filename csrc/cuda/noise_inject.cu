// CUDA noise injection (docs/OPS.md, "noise_inject" and "noise_inject_backward").
//
//   forward:  x_t = c_signal[b] * x0 + c_noise[b] * eps (+ delta)
//             target = eps, or eps + delta / c_noise[b] (delta given and mode >= 1)
//   backward: grad_x0 = c_signal[b] * g_xt, grad_eps = c_noise[b] * g_xt + g_t,
//             grad_delta = g_xt (+ g_t / c_noise[b] for mode 2),
//             coefficient gradients from per-(sample, block) partial sums that a second kernel
//             adds in a fixed order (deterministic, no atomics).
//
// Grid: (nblk, min(B, 65535)) blocks of kThreads; block (j, r) handles element groups
// j*kThreads + t (+ k*nblk*kThreads) of samples r, r + gridDim.y, ... All arithmetic in fp32.
#include "common.cuh"

namespace adv_dpm_cuda {
namespace {

using namespace detail;

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) noise_inject_kernel(const NoiseInjectParams p) {
  const bool has_delta = p.has_delta;
  const bool delta_target = has_delta && p.mode != 0;
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cs = load_coef(p.c_signal, b);
    const float cn = load_coef(p.c_noise, b);
    for_sample<V, kStrided>(p.shape, b, [&](const Coord& c) {
      float x0[V], eps[V], d[V], xt[V], tg[V];
      load<T, V>(p.x0.data, offset<kStrided>(c, p.x0), x0);
      load<T, V>(p.eps.data, offset<kStrided>(c, p.eps), eps);
      if (has_delta) {
        load<T, V>(p.delta.data, offset<kStrided>(c, p.delta), d);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xt[k] = cs * x0[k] + cn * eps[k] + d[k];
        tg[k] = delta_target ? eps[k] + __fdiv_rn(d[k], cn) : eps[k];
      }
      store<T, V>(p.x_t.data, offset<kStrided>(c, p.x_t), xt);
      store<T, V>(p.target.data, offset<kStrided>(c, p.target), tg);
    });
  }
}

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads) noise_inject_backward_kernel(const NoiseInjectBackwardParams p) {
  __shared__ float smem[3][32];
  const bool has_delta = p.has_delta;
  const bool coef = p.coef_grads;
  const bool mode2 = has_delta && p.mode == 2;
  const bool td = coef && has_delta && p.mode >= 1;  // sum g_t * delta needed
  for (int64_t b = blockIdx.y; b < p.shape.B; b += gridDim.y) {
    const float cs = load_coef(p.c_signal, b);
    const float cn = load_coef(p.c_noise, b);
    float acc[3] = {0.f, 0.f, 0.f};  // sum g_xt*x0, sum g_xt*eps, sum g_t*delta
    for_sample<V, kStrided>(p.shape, b, [&](const Coord& c) {
      float gxt[V], gt[V], o[V];
      load<T, V>(p.grad_x_t.data, offset<kStrided>(c, p.grad_x_t), gxt);
      load<T, V>(p.grad_target.data, offset<kStrided>(c, p.grad_target), gt);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = cs * gxt[k];
      store<T, V>(p.grad_x0.data, offset<kStrided>(c, p.grad_x0), o);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = cn * gxt[k] + gt[k];
      store<T, V>(p.grad_eps.data, offset<kStrided>(c, p.grad_eps), o);
      if (has_delta) {
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = mode2 ? gxt[k] + __fdiv_rn(gt[k], cn) : gxt[k];
        store<T, V>(p.grad_delta.data, offset<kStrided>(c, p.grad_delta), o);
      }
      if (coef) {
        float x[V];
        load<T, V>(p.x0.data, offset<kStrided>(c, p.x0), x);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[0] += gxt[k] * x[k];
        load<T, V>(p.eps.data, offset<kStrided>(c, p.eps), x);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[1] += gxt[k] * x[k];
        if (td) {
          load<T, V>(p.delta.data, offset<kStrided>(c, p.delta), x);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[2] += gt[k] * x[k];
        }
      }
    });
    if (coef) store_block_partials(acc, smem, p.partials, b, p.nblk);  // coef: uniform across the block
  }
}

// One warp per sample: adds the sample's nblk partials in a fixed order and writes the
// coefficient gradients in their dtype.
__global__ void __launch_bounds__(kThreads) noise_inject_coef_grads_kernel(const NoiseInjectBackwardParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (b >= p.shape.B) return;  // whole warps leave together
  float s[3];
  warp_sum_partials(p.partials, b, p.nblk, s);
  if ((threadIdx.x & 31) == 0) {
    const float cn = load_coef(p.c_noise, b);
    float gcn = s[1];
    if (p.has_delta && p.mode >= 1) gcn = gcn - __fdiv_rn(s[2], cn * cn);
    store_coef(p.grad_c_signal, b, s[0]);
    store_coef(p.grad_c_noise, b, gcn);
  }
}

template <typename T>
cudaError_t forward_typed(const NoiseInjectParams& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const dim3 grid = element_grid(p.shape, p.nblk);
  if (!p.dense) {
    noise_inject_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.shape.N % V == 0 && aligned16(p.x0.data) && aligned16(p.eps.data) &&
             (!p.has_delta || aligned16(p.delta.data)) && aligned16(p.x_t.data) && aligned16(p.target.data)) {
    noise_inject_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    noise_inject_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const NoiseInjectBackwardParams& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const dim3 grid = element_grid(p.shape, p.nblk);
  const bool reads_delta = p.coef_grads && p.has_delta && p.mode >= 1;
  bool vec = p.dense && p.shape.N % V == 0 && aligned16(p.grad_x_t.data) && aligned16(p.grad_target.data) &&
             aligned16(p.grad_x0.data) && aligned16(p.grad_eps.data);
  vec = vec && (!p.has_delta || aligned16(p.grad_delta.data));
  vec = vec && (!p.coef_grads || (aligned16(p.x0.data) && aligned16(p.eps.data)));
  vec = vec && (!reads_delta || aligned16(p.delta.data));
  if (!p.dense) {
    noise_inject_backward_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (vec) {
    noise_inject_backward_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    noise_inject_backward_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(p);
  }
  if (p.coef_grads) {
    const int64_t per_block = kThreads / 32;
    const unsigned blocks = static_cast<unsigned>(cdiv(p.shape.B, per_block));
    noise_inject_coef_grads_kernel<<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_noise_inject(const NoiseInjectParams& p, cudaStream_t stream) {
  if (p.shape.B <= 0 || p.shape.N <= 0) return cudaSuccess;  // no elements to write
  switch (p.dtype) {
    case DType::kFloat32: return forward_typed<float>(p, stream);
    case DType::kFloat16: return forward_typed<__half>(p, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_noise_inject_backward(const NoiseInjectBackwardParams& p, cudaStream_t stream) {
  // With N == 0 and coef_grads the kernels still run: they write zero coefficient gradients.
  if (p.shape.B <= 0 || (p.shape.N <= 0 && !p.coef_grads)) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return backward_typed<float>(p, stream);
    case DType::kFloat16: return backward_typed<__half>(p, stream);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adv_dpm_cuda
