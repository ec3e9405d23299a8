// CUDA GroupNorm + per-sample scale/shift + SiLU (docs/OPS.md, "group_norm_act" and
// "group_norm_act_backward").
//
//   forward:  mean, rstd per (n, g) (fp32: corrected two-pass over a tile held in registers, or
//             Welford per thread on the nhwc path; Chan combine of the partials, never
//             E[x^2] - E[x]^2), y = act((x - mean) * rstd * w (1 + scale) + b (1 + scale) + shift)
//   backward: S1 = sum_hw gz, S2 = sum_hw gz * xhat per (n, c); parameter gradients from S1, S2;
//             grad_x = rstd * (gz * k - A - xhat * Bg) with the group means A, Bg of gz*k and
//             gz*k*xhat (k = w * (1 + scale)).
//
// x is viewed as (N, C, HW) with strides (sN, sC, sHW); every big tensor of a call (x, y; x,
// grad_y, grad_x) is indexed through its own strides. One of three kernel families ("paths") runs,
// chosen by make_plan from shapes, strides and alignment only:
//
//   tile/vector  every tensor NCHW-like (sHW == 1), HW % V == 0, sC, sN multiples of V, 16-byte
//                aligned pointers: 128-bit accesses of V = 16 / sizeof(T) elements.
//   nhwc         every tensor channels_last-like (sC == 1), C <= 256 V: a block takes one
//                sample's chunk of rows (pixels) over all channels; thread t always handles the
//                same V channels (128-bit accesses when C % V == 0, sHW, sN multiples of V and
//                pointers aligned; else V = 1).
//   tile/scalar  anything else (any strides): the tile kernels with one element per access.
//
// Tile kernels: a tile is (n, g, channel chunk, hw chunk): a rectangle of at most 4096 vectors
// (Dt <= 512 channels x Lc hw vectors), one block of bt <= 512 threads, each thread holding R <= 8
// vectors in registers (vector j of the tile: thread j % bt, register j / bt; channel j / Lc).
// The tile's channel coefficients (w, b, w (1 + scale), ...) go to shared memory once per tile,
// loaded beside the tile's data.
//   fused (the group is one tile and N * G * bt >= kFusedMinThreads, or it cannot be split
//     further): one kernel reads x (and grad_y) once: statistics, then the output from the
//     registers (DRAM traffic of a copy: read once, write once).
//   split (large groups or too few of them, e.g. small batches): a partials kernel over the tiles
//     (fixed-order block reductions), a finalize kernel (one warp per (n, g), fixed-order
//     combine; writes a per-(n, c) coefficient table), then an elementwise apply kernel.
// nhwc kernels: always split (stats/pass 1 per (n, row chunk), finalize, apply/pass 2).
//
// Backward parameter gradients: grad_shift, grad_scale per (n, c) from the per-(n, c) S1, S2
// (fused kernel or finalize), grad_weight, grad_bias per c summed over n in a fixed order by a
// small last kernel. No atomics anywhere: every sum has an order fixed by the shapes, so two
// calls with the same inputs give bit-identical results.
//
// Divisions are __fdividef (2 ulp, no slow-path subroutine: same code with or without
// --use_fast_math); rsqrtf and __expf are the hardware approximations.
#include <algorithm>

#include "common.cuh"

namespace adv_dpm_cuda {
namespace {

using namespace detail;

constexpr int kTileMaxThreads = 512;
constexpr int kTileMaxR = 8;   // vectors per thread of the large vector tiles
constexpr int kSmallR = 2;     // of the vector tiles up to 256 * kSmallR vectors
constexpr int kScalarR = 4;    // of the scalar tiles (elements)
constexpr int64_t kTileMaxVecs = static_cast<int64_t>(kTileMaxThreads) * kTileMaxR;  // 4096
constexpr int64_t kTileMaxChannels = 512;  // per tile: its coefficient table is 8 KiB of shared memory
constexpr int kNhwcThreads = 256;
// Every __launch_bounds__ names its minimum blocks per SM: with the thread count alone, ptxas
// (CUDA 13) picks its own lower register target and may spill.
constexpr int kNhwcUnroll = 4;           // rows loaded before use (memory-level parallelism)
constexpr int kNhwcBwdUnroll = 2;        // same, backward (twice the inputs, more constants)
constexpr int kNhwcMinRowsPerThread = 8;  // amortizes the block reductions of the nhwc partial kernels
constexpr int kFinalizeThreads = 128;     // one warp per (n, g)
constexpr int kParamThreads = 256;        // 32 channels x 8 slices of n
constexpr int64_t kFusedMinThreads = 32768;      // below: split the groups for parallelism
constexpr int64_t kSplitTargetThreads = 262144;  // ~ one full wave on an H100 (132 SMs x 2048)
constexpr int64_t kMinChunkVecs = 32;            // shortest hw chunk (vectors) of a split tile
constexpr int64_t kMaxGrid = 0x7fffffff;

enum Mode : int { kFused = 0, kPartials = 1 };
constexpr int kApplyUnroll = 4;  // vectors loaded before use by the apply kernels

// ---------------------------------------------------------------------------------------------
// Math.
// __fdividef(1, d) is 0 for d > 2^126 (and inf): sigmoid(-large) = 0 without a NaN.
__device__ __forceinline__ float sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

__device__ __forceinline__ float act_fwd(float z, bool act) { return act ? z * sigmoid(z) : z; }

// d silu / dz = s (1 + z (1 - s)).
__device__ __forceinline__ float act_grad(float g, float z, bool act) {
  if (!act) return g;
  const float s = sigmoid(z);
  return g * (s * fmaf(z, 1.f - s, 1.f));
}

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fffffff); }

// Welford / Chan statistics: count, mean, sum of squared deviations.
struct Stat {
  float n, mean, m2;
};

__device__ __forceinline__ Stat combine(const Stat& a, const Stat& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float d = b.mean - a.mean;
  const float f = __fdividef(b.n, n);
  Stat r;
  r.n = n;
  r.mean = fmaf(d, f, a.mean);
  r.m2 = a.m2 + b.m2 + d * d * (a.n * f);
  return r;
}

__device__ __forceinline__ Stat shfl_down_stat(const Stat& s, int o) {
  Stat r;
  r.n = __shfl_down_sync(0xffffffffu, s.n, o);
  r.mean = __shfl_down_sync(0xffffffffu, s.mean, o);
  r.m2 = __shfl_down_sync(0xffffffffu, s.m2, o);
  return r;
}

// Fixed tree over the 32 lanes; the result is valid in lane 0.
__device__ __forceinline__ Stat warp_combine(Stat s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s = combine(s, shfl_down_stat(s, o));
  return s;
}

// Per-channel affine map of xhat: z = xhat * wk + bks, wk = w (1 + scale), bks = b (1 + scale) + shift
// (16 bytes: one shared-memory access in the tile kernels' coefficient table).
struct alignas(16) ChanCoef {
  float w, b, wk, bks;
};

// weight or bias of channel c, in fp32; `absent` where not given.
__device__ __forceinline__ float channel_at(const CoefView& t, int64_t c, float absent) {
  return t.data != nullptr ? load_coef(t, c) : absent;
}

// scale or shift of sample n, channel c, in fp32; `absent` where not given.
__device__ __forceinline__ float sample_channel_at(const CoefView& t, int64_t n, int64_t c, float absent) {
  return t.data != nullptr ? load_coef_at(t, n * t.row_stride + c * t.stride) : absent;
}

__device__ __forceinline__ ChanCoef chan_coef(const CoefView& weight, const CoefView& bias, const CoefView& scale,
                                              const CoefView& shift, int64_t n, int64_t c) {
  ChanCoef r;
  r.w = channel_at(weight, c, 1.f);
  r.b = channel_at(bias, c, 0.f);
  const float k = 1.f + sample_channel_at(scale, n, c, 0.f);
  const float s = sample_channel_at(shift, n, c, 0.f);
  r.wk = r.w * k;
  r.bks = fmaf(r.b, k, s);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Tile geometry (see the file comment). Tile index = ((n * G + g) * ncc + cc) * nhc + hc, which is
// also the index of the forward partial of (n, g, chunk = cc * nhc + hc).
// Counts of tiles, (n, g) and (n, c) pairs are < 2^31 (checked by the launchers), so the index
// decompositions use 32-bit division (64-bit division is a subroutine call), by FastDiv where the
// divisor is fixed per call.
struct TileGeom {
  int64_t N, C, HW, G, D;
  int64_t HWv;      // HW / V
  int64_t Dc;       // channels per channel chunk
  int64_t Lv;       // hw vectors per hw chunk
  int64_t ncc, nhc;
  int64_t ntiles;   // N * G * ncc * nhc
  int64_t tv_max;   // Dc * Lv: vectors of the largest tile (sizes the backward's shared memory)
  FastDiv by_nhc, by_ncc, by_G;
  FastDiv by_Lv, by_Llast;  // by the hw vectors per channel of every hw chunk but the last; of the last
};

struct TileCoord {
  int64_t n, g, c0, h0;  // first channel, first hw vector
  int64_t hc;            // hw chunk index
  uint32_t Lc, tv;       // hw vectors per channel, vectors in the tile (Dt * Lc)
  int64_t Dt;            // channels in the tile
  FastDiv by_Lc;
};

__device__ __forceinline__ TileCoord tile_coord(int64_t tile, const TileGeom& tg) {
  TileCoord t;
  uint32_t q = static_cast<uint32_t>(tile);
  uint32_t r = tg.by_nhc.div(q);
  t.hc = q - r * tg.by_nhc.d;
  q = r;
  r = tg.by_ncc.div(q);
  const int64_t cc = q - r * tg.by_ncc.d;
  q = r;
  r = tg.by_G.div(q);
  t.g = q - r * tg.by_G.d;
  t.n = r;
  t.c0 = t.g * tg.D + cc * tg.Dc;
  t.Dt = min(tg.Dc, tg.D - cc * tg.Dc);
  t.h0 = t.hc * tg.Lv;
  t.by_Lc = t.hc + 1 < tg.nhc ? tg.by_Lv : tg.by_Llast;
  t.Lc = t.by_Lc.d;
  t.tv = static_cast<uint32_t>(t.Dt) * t.Lc;
  return t;
}

// Vector j < tv of a tile: hw vector r of the tile's channel l (j = l * Lc + r).
struct TilePos {
  uint32_t l, r;
};

__device__ __forceinline__ TilePos tile_pos(const TileCoord& t, uint32_t j) {
  const uint32_t l = t.by_Lc.div(j);
  return {l, j - l * t.Lc};
}

// Calls f(k, j) for each vector j = threadIdx.x + k * blockDim.x, k < R, of tile t that exists:
// the vectors a thread of the tile kernels holds in its registers [k].
template <int R, typename F>
__device__ __forceinline__ void for_own_vectors(const TileCoord& t, F&& f) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const uint32_t j = threadIdx.x + k * blockDim.x;
    if (j < t.tv) f(k, j);
  }
}

// Element offset in ts of vector (l, r) of tile t (on the vector path sHW == 1).
template <int V>
__device__ __forceinline__ int64_t tile_offset(const GNTensor& ts, const TileCoord& t, const TilePos& q) {
  const int64_t hw = (t.h0 + q.r) * V;
  return t.n * ts.sN + (t.c0 + q.l) * ts.sC + (V > 1 ? hw : hw * ts.sHW);
}

// The tile's channel coefficients -> table[l], l < Dt (shared memory): loaded once per tile and
// while the tile's own loads are in flight, so that their latency overlaps those. Readable after
// the next __syncthreads().
template <typename Params>
__device__ __forceinline__ void load_tile_coefs(ChanCoef* table, const Params& p, const TileCoord& t) {
  for (uint32_t l = threadIdx.x; l < t.Dt; l += blockDim.x) {
    const int64_t c = t.c0 + l;
    table[l] = chan_coef(p.weight, p.bias, p.scale, p.shift, t.n, c);
  }
}

// Workspace pointers and the chunk count of the partials (per (n, g) forward, per (n, c) backward).
struct Work {
  float* partials = nullptr;
  float* table = nullptr;  // per (n, c): forward 4 floats, backward 8 floats
  float* S = nullptr;      // per (n, c): S1, S2 (backward, when grad_weight or grad_bias is wanted)
  int64_t nchunk = 0;
};

// ---------------------------------------------------------------------------------------------
// Forward, tile kernels.
//   kFused:    tile == group: statistics, mean/rstd out, y from the registers.
//   kPartials: (count, mean, m2) of the tile -> partials[tile * 3].
// Dynamic shared memory (kFused): the coefficient table, Dc ChanCoef.
template <typename T, int V, int R, int kMode>
__global__ void __launch_bounds__(kTileMaxThreads, 1)
    gn_fwd_tile_kernel(const GroupNormActParams p, const TileGeom tg, const Work w) {
  extern __shared__ ChanCoef gn_coef[];
  __shared__ float red[3][32];  // [0]: sum x; [1], [2]: sum d, sum d^2
  const bool act = p.act != 0;
  for (int64_t tile = blockIdx.x; tile < tg.ntiles; tile += gridDim.x) {
    const TileCoord t = tile_coord(tile, tg);
    Raw<T, V> raw[R];
    for_own_vectors<R>(t, [&](int k, uint32_t j) {
      raw[k] = load_raw<T, V>(p.x.data, tile_offset<V>(p.x, t, tile_pos(t, j)));
    });
    if constexpr (kMode == kFused) load_tile_coefs(gn_coef, p, t);
    // Corrected two-pass statistics of the tile from the registers: mean0 = sum x / n, then
    // d = x - mean0: mean = mean0 + sum d / n, m2 = sum d^2 - (sum d)^2 / n.
    float s[1] = {0.f};
    for_own_vectors<R>(t, [&](int k, uint32_t) {
      float v[V];
      unpack<T, V>(raw[k], v);
#pragma unroll
      for (int e = 0; e < V; ++e) s[0] += v[e];
    });
    block_allsum(s, red);
    const float cnt = static_cast<float>(t.tv) * V;
    const float mean0 = __fdividef(s[0], cnt);
    float dev[2] = {0.f, 0.f};  // sum d, sum d^2
    for_own_vectors<R>(t, [&](int k, uint32_t) {
      float v[V];
      unpack<T, V>(raw[k], v);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = v[e] - mean0;
        dev[0] += d;
        dev[1] = fmaf(d, d, dev[1]);
      }
    });
    block_allsum(dev, red + 1);
    const float corr = __fdividef(dev[0], cnt);
    const float mean = mean0 + corr;
    const float m2 = fmaxf(fmaf(-dev[0], corr, dev[1]), 0.f);
    if constexpr (kMode == kPartials) {
      if (threadIdx.x == 0) {
        float* out = w.partials + tile * 3;
        out[0] = cnt;
        out[1] = mean;
        out[2] = m2;
      }
    } else {
      const float rstd = rsqrtf(__fdividef(m2, cnt) + p.eps);
      if (threadIdx.x == 0) {
        p.mean[t.n * tg.G + t.g] = mean;
        p.rstd[t.n * tg.G + t.g] = rstd;
      }
      for_own_vectors<R>(t, [&](int k, uint32_t j) {
        const TilePos q = tile_pos(t, j);
        const ChanCoef cf = gn_coef[q.l];
        const float a = rstd * cf.wk;
        float v[V];
        unpack<T, V>(raw[k], v);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = act_fwd(fmaf(v[e] - mean, a, cf.bks), act);
        store<T, V>(p.y.data, tile_offset<V>(p.y, t, q), v);
      });
      __syncthreads();  // gn_coef is rewritten by the next tile
    }
  }
}

// Forward apply of the split path: y from the per-(n, c) table {mean, rstd * wk, bks} of
// gn_fwd_finalize_kernel, over the same tiles, kApplyUnroll vectors loaded before use.
template <typename T, int V>
__global__ void __launch_bounds__(kTileMaxThreads, 1)
    gn_fwd_tile_apply_kernel(const GroupNormActParams p, const TileGeom tg, const Work w) {
  const uint32_t bt = blockDim.x;
  const bool act = p.act != 0;
  for (int64_t tile = blockIdx.x; tile < tg.ntiles; tile += gridDim.x) {
    const TileCoord t = tile_coord(tile, tg);
    const float4* table = reinterpret_cast<const float4*>(w.table) + t.n * tg.C + t.c0;
    for (uint32_t j0 = threadIdx.x; j0 < t.tv; j0 += kApplyUnroll * bt) {
      Raw<T, V> raw[kApplyUnroll];
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t j = j0 + u * bt;
        if (j < t.tv) raw[u] = load_raw<T, V>(p.x.data, tile_offset<V>(p.x, t, tile_pos(t, j)));
      }
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t j = j0 + u * bt;
        if (j < t.tv) {
          const TilePos q = tile_pos(t, j);
          const float4 tb = __ldg(table + q.l);
          float v[V];
          unpack<T, V>(raw[u], v);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] = act_fwd(fmaf(v[e] - tb.x, tb.y, tb.z), act);
          store<T, V>(p.y.data, tile_offset<V>(p.y, t, q), v);
        }
      }
    }
  }
}

// One warp per (n, g): combines the nchunk partials (count, mean, m2) in a fixed order, writes
// mean and rstd, and (split paths) the per-(n, c) table {mean, rstd * wk, bks, 0}. With no
// elements (HW == 0), mean = rstd = NaN like the reference.
__global__ void __launch_bounds__(kFinalizeThreads, 4)
    gn_fwd_finalize_kernel(const GroupNormActParams p, const Work w) {
  const int lane = threadIdx.x & 31;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kFinalizeThreads / 32) + (threadIdx.x >> 5);
  if (ng >= p.N * p.G) return;  // whole warps leave together
  Stat st{0.f, 0.f, 0.f};
  const float* part = w.partials + ng * w.nchunk * 3;
  for (int64_t k = lane; k < w.nchunk; k += 32) st = combine(st, Stat{part[k * 3], part[k * 3 + 1], part[k * 3 + 2]});
  st = warp_combine(st);
  float mean = 0.f, rstd = 0.f;
  if (lane == 0) {
    if (st.n > 0.f) {
      mean = st.mean;
      rstd = rsqrtf(__fdividef(st.m2, st.n) + p.eps);
    } else {
      mean = rstd = nan_f32();
    }
    p.mean[ng] = mean;
    p.rstd[ng] = rstd;
  }
  if (w.table == nullptr) return;  // warp-uniform
  mean = __shfl_sync(0xffffffffu, mean, 0);
  rstd = __shfl_sync(0xffffffffu, rstd, 0);
  const int64_t n = static_cast<uint32_t>(ng) / static_cast<uint32_t>(p.G), g = ng - n * p.G;
  const int64_t D = static_cast<uint32_t>(p.C) / static_cast<uint32_t>(p.G);
  for (int64_t cl = lane; cl < D; cl += 32) {
    const int64_t c = g * D + cl, nc = n * p.C + c;
    const ChanCoef cf = chan_coef(p.weight, p.bias, p.scale, p.shift, n, c);
    reinterpret_cast<float4*>(w.table)[nc] = make_float4(mean, rstd * cf.wk, cf.bks, 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, tile kernels.
// Writes S and the per-(n, c) parameter gradients of channel c from its sums S1, S2.
__device__ __forceinline__ void write_channel_grads(const GroupNormActBackwardParams& p, const Work& w, int64_t nc,
                                                    const ChanCoef& cf, float s1, float s2) {
  if (w.S != nullptr) {
    w.S[nc * 2] = s1;
    w.S[nc * 2 + 1] = s2;
  }
  if (p.grad_shift.data != nullptr) store_coef(p.grad_shift, nc, s1);
  if (p.grad_scale.data != nullptr) store_coef(p.grad_scale, nc, fmaf(cf.w, s2, cf.b * s1));
}

//   kFused:    tile == group: per-vector (sum gz, sum gz*xhat) -> shared memory, per-channel
//              fixed-order sums S1, S2 (-> grad_shift, grad_scale, S), group means A, Bg, then
//              grad_x from the registers.
//   kPartials: per-channel sums of the tile -> partials[((n * C + c) * nhc + hc) * 2].
// Dynamic shared memory: the coefficient table (Dc ChanCoef), then 2 * tv_max floats.
template <typename T, int V, int R, int kMode>
__global__ void __launch_bounds__(kTileMaxThreads, 1)
    gn_bwd_tile_kernel(const GroupNormActBackwardParams p, const TileGeom tg, const Work w) {
  extern __shared__ ChanCoef gn_coef[];
  __shared__ float s_ab[2];
  float* s1v = reinterpret_cast<float*>(gn_coef + tg.Dc);
  float* s2v = s1v + tg.tv_max;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const bool act = p.act != 0;
  for (int64_t tile = blockIdx.x; tile < tg.ntiles; tile += gridDim.x) {
    const TileCoord t = tile_coord(tile, tg);
    Raw<T, V> rx[R], rg[R];
    for_own_vectors<R>(t, [&](int k, uint32_t j) {
      const TilePos q = tile_pos(t, j);
      rx[k] = load_raw<T, V>(p.x.data, tile_offset<V>(p.x, t, q));
      rg[k] = load_raw<T, V>(p.grad_y.data, tile_offset<V>(p.grad_y, t, q));
    });
    load_tile_coefs(gn_coef, p, t);
    const float mean = __ldg(p.mean + t.n * tg.G + t.g);
    const float rstd = __ldg(p.rstd + t.n * tg.G + t.g);
    __syncthreads();  // gn_coef
    for_own_vectors<R>(t, [&](int k, uint32_t j) {
      const ChanCoef cf = gn_coef[tile_pos(t, j).l];
      float x[V], g[V];
      unpack<T, V>(rx[k], x);
      unpack<T, V>(rg[k], g);
      float a1 = 0.f, a2 = 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = (x[e] - mean) * rstd;
        const float gz = act_grad(g[e], fmaf(xh, cf.wk, cf.bks), act);
        a1 += gz;
        a2 = fmaf(gz, xh, a2);
      }
      s1v[j] = a1;
      s2v[j] = a2;
    });
    __syncthreads();
    // Per-channel sums: warp per channel, lane l adds the channel's vectors l, l + 32, ... in
    // order, then a butterfly. Lane 0 writes the channel's result (in place of its vector 0).
    for (uint32_t cl = warp; cl < t.Dt; cl += nw) {
      const uint32_t base = cl * t.Lc;
      float a1 = 0.f, a2 = 0.f;
      for (uint32_t i = lane; i < t.Lc; i += 32) {
        a1 += s1v[base + i];
        a2 += s2v[base + i];
      }
      a1 = warp_allsum(a1);
      a2 = warp_allsum(a2);
      if (lane == 0) {
        const int64_t c = t.c0 + cl, nc = t.n * tg.C + c;
        if constexpr (kMode == kPartials) {
          float* out = w.partials + (nc * tg.nhc + t.hc) * 2;
          out[0] = a1;
          out[1] = a2;
        } else {
          const ChanCoef cf = gn_coef[cl];
          write_channel_grads(p, w, nc, cf, a1, a2);
          s1v[base] = cf.wk * a1;
          s2v[base] = cf.wk * a2;
        }
      }
    }
    __syncthreads();
    if constexpr (kMode == kFused) {
      if (warp == 0) {
        float a = 0.f, b = 0.f;
        for (uint32_t cl = lane; cl < t.Dt; cl += 32) {
          a += s1v[cl * t.Lc];
          b += s2v[cl * t.Lc];
        }
        a = warp_allsum(a);
        b = warp_allsum(b);
        if (lane == 0) {
          const float M = static_cast<float>(tg.D) * static_cast<float>(tg.HW);
          s_ab[0] = rstd * __fdividef(a, M);
          s_ab[1] = rstd * __fdividef(b, M);
        }
      }
      __syncthreads();
      const float rA = s_ab[0], rB = s_ab[1];
      for_own_vectors<R>(t, [&](int k, uint32_t j) {
        const TilePos q = tile_pos(t, j);
        const ChanCoef cf = gn_coef[q.l];
        const float rk = rstd * cf.wk;
        float x[V], g[V];
        unpack<T, V>(rx[k], x);
        unpack<T, V>(rg[k], g);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xh = (x[e] - mean) * rstd;
          const float gz = act_grad(g[e], fmaf(xh, cf.wk, cf.bks), act);
          x[e] = fmaf(gz, rk, -fmaf(xh, rB, rA));
        }
        store<T, V>(p.grad_x.data, tile_offset<V>(p.grad_x, t, q), x);
      });
      __syncthreads();  // gn_coef, s1v, s2v, s_ab are rewritten by the next tile
    }
    // kPartials: the next tile rewrites gn_coef, s1v, s2v after the __syncthreads() above.
  }
}

// Backward pass 2 of the split path: grad_x from the per-(n, c) table of gn_bwd_finalize_kernel
// {mean, rstd, wk, bks}, {rstd wk, rstd A, rstd Bg, 0}, over the same tiles.
template <typename T, int V>
__global__ void __launch_bounds__(kTileMaxThreads, 1)
    gn_bwd_tile_apply_kernel(const GroupNormActBackwardParams p, const TileGeom tg, const Work w) {
  const uint32_t bt = blockDim.x;
  const bool act = p.act != 0;
  for (int64_t tile = blockIdx.x; tile < tg.ntiles; tile += gridDim.x) {
    const TileCoord t = tile_coord(tile, tg);
    const float4* table = reinterpret_cast<const float4*>(w.table) + (t.n * tg.C + t.c0) * 2;
    for (uint32_t j0 = threadIdx.x; j0 < t.tv; j0 += kApplyUnroll * bt) {
      Raw<T, V> rx[kApplyUnroll], rg[kApplyUnroll];
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t j = j0 + u * bt;
        if (j < t.tv) {
          const TilePos q = tile_pos(t, j);
          rx[u] = load_raw<T, V>(p.x.data, tile_offset<V>(p.x, t, q));
          rg[u] = load_raw<T, V>(p.grad_y.data, tile_offset<V>(p.grad_y, t, q));
        }
      }
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t j = j0 + u * bt;
        if (j < t.tv) {
          const TilePos q = tile_pos(t, j);
          const float4 t0 = __ldg(table + q.l * 2), t1 = __ldg(table + q.l * 2 + 1);
          float x[V], g[V];
          unpack<T, V>(rx[u], x);
          unpack<T, V>(rg[u], g);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xh = (x[e] - t0.x) * t0.y;
            const float gz = act_grad(g[e], fmaf(xh, t0.z, t0.w), act);
            x[e] = fmaf(gz, t1.x, -fmaf(xh, t1.z, t1.y));
          }
          store<T, V>(p.grad_x.data, tile_offset<V>(p.grad_x, t, q), x);
        }
      }
    }
  }
}

// One warp per (n, g): per channel, adds the nchunk partials (S1, S2) in order; writes S,
// grad_shift, grad_scale; group means A, Bg; the per-(n, c) table of the apply pass
// {mean, rstd, wk, bks}, {rstd wk, rstd A, rstd Bg, 0} (table may be null: HW == 0).
__global__ void __launch_bounds__(kFinalizeThreads, 4)
    gn_bwd_finalize_kernel(const GroupNormActBackwardParams p, const Work w) {
  const int lane = threadIdx.x & 31;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kFinalizeThreads / 32) + (threadIdx.x >> 5);
  if (ng >= p.N * p.G) return;  // whole warps leave together
  const int64_t n = static_cast<uint32_t>(ng) / static_cast<uint32_t>(p.G), g = ng - n * p.G;
  const int64_t D = static_cast<uint32_t>(p.C) / static_cast<uint32_t>(p.G);
  float a = 0.f, b = 0.f;
  for (int64_t cl = lane; cl < D; cl += 32) {
    const int64_t c = g * D + cl, nc = n * p.C + c;
    float s1 = 0.f, s2 = 0.f;
    const float* part = w.partials + nc * w.nchunk * 2;
    for (int64_t k = 0; k < w.nchunk; ++k) {
      s1 += part[k * 2];
      s2 += part[k * 2 + 1];
    }
    const ChanCoef cf = chan_coef(p.weight, p.bias, p.scale, p.shift, n, c);
    write_channel_grads(p, w, nc, cf, s1, s2);
    a = fmaf(cf.wk, s1, a);
    b = fmaf(cf.wk, s2, b);
  }
  if (w.table == nullptr) return;  // warp-uniform
  a = warp_allsum(a);
  b = warp_allsum(b);
  const float mean = __ldg(p.mean + ng), rstd = __ldg(p.rstd + ng);
  const float M = static_cast<float>(D) * static_cast<float>(p.HW);
  const float rA = rstd * __fdividef(a, M), rB = rstd * __fdividef(b, M);
  for (int64_t cl = lane; cl < D; cl += 32) {
    const int64_t c = g * D + cl, nc = n * p.C + c;
    const ChanCoef cf = chan_coef(p.weight, p.bias, p.scale, p.shift, n, c);
    float4* tb = reinterpret_cast<float4*>(w.table) + nc * 2;
    tb[0] = make_float4(mean, rstd, cf.wk, cf.bks);
    tb[1] = make_float4(rstd * cf.wk, rA, rB, 0.f);
  }
}

// grad_weight[c] = sum_n (1 + scale[n, c]) S2[n, c], grad_bias[c] = sum_n (1 + scale[n, c]) S1[n, c]:
// a block takes 32 channels; warp s adds n = s, s + 8, ... in order, then the 8 slices in order.
__global__ void __launch_bounds__(kParamThreads, 2) gn_bwd_params_kernel(const GroupNormActBackwardParams p, const Work w) {
  constexpr int kSlices = kParamThreads / 32;
  __shared__ float sm[2][kSlices][32];
  const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float gw = 0.f, gb = 0.f;
  if (c < p.C) {
    for (int64_t n = slice; n < p.N; n += kSlices) {
      const int64_t nc = n * p.C + c;
      const float k = 1.f + sample_channel_at(p.scale, n, c, 0.f);
      gb = fmaf(k, w.S[nc * 2], gb);
      gw = fmaf(k, w.S[nc * 2 + 1], gw);
    }
  }
  sm[0][slice][lane] = gw;
  sm[1][slice][lane] = gb;
  __syncthreads();
  if (slice == 0 && c < p.C) {
    for (int s = 1; s < kSlices; ++s) {
      gw += sm[0][s][lane];
      gb += sm[1][s][lane];
    }
    if (p.grad_weight.data != nullptr) store_coef(p.grad_weight, c, gw);
    if (p.grad_bias.data != nullptr) store_coef(p.grad_bias, c, gb);
  }
}

// ---------------------------------------------------------------------------------------------
// nhwc kernels: block = (n, row chunk rc) of rows [rc * LR, min(HW, rc * LR + LR)); thread
// t < RP * CV takes the channels [col * V, col * V + V) (col = t % CV) of rows r0 + slot,
// r0 + slot + RP, ... (slot = t / CV). Offsets: n * sN + row * sHW + channel (sC == 1).
struct NhwcGeom {
  int64_t N, C, HW, G, D;
  int64_t CV;  // C / V
  int64_t RP;  // row slots: kNhwcThreads / CV
  int64_t LR;  // rows per chunk
  int64_t nrc;
  int64_t nblocks;  // N * nrc
};

struct NhwcCoord {
  int64_t n, rc, r0, r1;
};

__device__ __forceinline__ NhwcCoord nhwc_coord(int64_t blk, const NhwcGeom& ng) {
  NhwcCoord r;
  r.n = static_cast<uint32_t>(blk) / static_cast<uint32_t>(ng.nrc);
  r.rc = blk - r.n * ng.nrc;
  r.r0 = r.rc * ng.LR;
  r.r1 = min(ng.HW, r.r0 + ng.LR);
  return r;
}

// Forward statistics: per-thread per-channel Welford over its rows, then per channel over the
// row slots (in slot order), then per group over its channels (warp per group, fixed tree).
template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads, 2) gn_fwd_nhwc_stats_kernel(const GroupNormActParams p, const NhwcGeom ng,
                                                                        const Work w) {
  __shared__ float s_mean[kNhwcThreads * V], s_m2[kNhwcThreads * V], s_cnt[kNhwcThreads];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t slot = static_cast<uint32_t>(t) / static_cast<uint32_t>(ng.CV), col = t - slot * ng.CV;
  const bool active = slot < ng.RP;
  for (int64_t blk = blockIdx.x; blk < ng.nblocks; blk += gridDim.x) {
    const NhwcCoord b = nhwc_coord(blk, ng);
    if (active) {
      float mean[V], m2[V];
#pragma unroll
      for (int e = 0; e < V; ++e) mean[e] = m2[e] = 0.f;
      float cnt = 0.f;
      const int64_t base = b.n * p.x.sN + col * V;
      for (int64_t r = b.r0 + slot; r < b.r1; r += kNhwcUnroll * ng.RP) {
        Raw<T, V> raw[kNhwcUnroll];
#pragma unroll
        for (int u = 0; u < kNhwcUnroll; ++u) {
          const int64_t rr = r + u * ng.RP;
          if (rr < b.r1) raw[u] = load_raw<T, V>(p.x.data, base + rr * p.x.sHW);
        }
#pragma unroll
        for (int u = 0; u < kNhwcUnroll; ++u) {
          if (r + u * ng.RP < b.r1) {
            float v[V];
            unpack<T, V>(raw[u], v);
            cnt += 1.f;
            const float inv = __fdividef(1.f, cnt);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float d = v[e] - mean[e];
              mean[e] = fmaf(d, inv, mean[e]);
              m2[e] = fmaf(d, v[e] - mean[e], m2[e]);
            }
          }
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        s_mean[t * V + e] = mean[e];  // == [slot * C + channel]
        s_m2[t * V + e] = m2[e];
      }
      if (col == 0) s_cnt[slot] = cnt;
    }
    __syncthreads();
    for (int64_t c = t; c < ng.C; c += kNhwcThreads) {
      Stat st{s_cnt[0], s_mean[c], s_m2[c]};
      for (int64_t s = 1; s < ng.RP; ++s) st = combine(st, Stat{s_cnt[s], s_mean[s * ng.C + c], s_m2[s * ng.C + c]});
      s_mean[c] = st.mean;  // slot 0's entry of channel c: read only by this thread
      s_m2[c] = st.m2;
    }
    __syncthreads();
    const float rows = static_cast<float>(b.r1 - b.r0);
    for (int64_t g = warp; g < ng.G; g += kNhwcThreads / 32) {
      Stat st{0.f, 0.f, 0.f};
      for (int64_t cl = lane; cl < ng.D; cl += 32) st = combine(st, Stat{rows, s_mean[g * ng.D + cl], s_m2[g * ng.D + cl]});
      st = warp_combine(st);
      if (lane == 0) {
        float* out = w.partials + ((b.n * ng.G + g) * ng.nrc + b.rc) * 3;
        out[0] = st.n;
        out[1] = st.mean;
        out[2] = st.m2;
      }
    }
    __syncthreads();  // shared memory is rewritten by the next block
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads, 2) gn_fwd_nhwc_apply_kernel(const GroupNormActParams p, const NhwcGeom ng,
                                                                        const Work w) {
  const int t = threadIdx.x;
  const int64_t slot = static_cast<uint32_t>(t) / static_cast<uint32_t>(ng.CV), col = t - slot * ng.CV;
  if (slot >= ng.RP) return;  // no block synchronization in this kernel
  const bool act = p.act != 0;
  for (int64_t blk = blockIdx.x; blk < ng.nblocks; blk += gridDim.x) {
    const NhwcCoord b = nhwc_coord(blk, ng);
    float m[V], a[V], bks[V];
    const float4* tb = reinterpret_cast<const float4*>(w.table) + b.n * ng.C + col * V;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float4 c = __ldg(tb + e);
      m[e] = c.x;
      a[e] = c.y;
      bks[e] = c.z;
    }
    const int64_t xb = b.n * p.x.sN + col * V, yb = b.n * p.y.sN + col * V;
    for (int64_t r = b.r0 + slot; r < b.r1; r += kNhwcUnroll * ng.RP) {
      Raw<T, V> raw[kNhwcUnroll];
#pragma unroll
      for (int u = 0; u < kNhwcUnroll; ++u) {
        const int64_t rr = r + u * ng.RP;
        if (rr < b.r1) raw[u] = load_raw<T, V>(p.x.data, xb + rr * p.x.sHW);
      }
#pragma unroll
      for (int u = 0; u < kNhwcUnroll; ++u) {
        const int64_t rr = r + u * ng.RP;
        if (rr < b.r1) {
          float v[V];
          unpack<T, V>(raw[u], v);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] = act_fwd(fmaf(v[e] - m[e], a[e], bks[e]), act);
          store<T, V>(p.y.data, yb + rr * p.y.sHW, v);
        }
      }
    }
  }
}

// Backward pass 1: per-thread per-channel sums over its rows, then per channel over the row
// slots in order -> partials[((n * C + c) * nrc + rc) * 2].
template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads, 2)
    gn_bwd_nhwc_partials_kernel(const GroupNormActBackwardParams p, const NhwcGeom ng, const Work w) {
  __shared__ float s_1[kNhwcThreads * V], s_2[kNhwcThreads * V];
  const int t = threadIdx.x;
  const int64_t slot = static_cast<uint32_t>(t) / static_cast<uint32_t>(ng.CV), col = t - slot * ng.CV;
  const bool active = slot < ng.RP;
  const bool act = p.act != 0;
  for (int64_t blk = blockIdx.x; blk < ng.nblocks; blk += gridDim.x) {
    const NhwcCoord b = nhwc_coord(blk, ng);
    if (active) {
      float mean[V], rstd[V], wk[V], bks[V], a1[V], a2[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int64_t c = col * V + e;
        const int64_t ngi = b.n * ng.G + static_cast<uint32_t>(c) / static_cast<uint32_t>(ng.D);
        mean[e] = __ldg(p.mean + ngi);
        rstd[e] = __ldg(p.rstd + ngi);
        const ChanCoef cf = chan_coef(p.weight, p.bias, p.scale, p.shift, b.n, c);
        wk[e] = cf.wk;
        bks[e] = cf.bks;
        a1[e] = a2[e] = 0.f;
      }
      const int64_t xb = b.n * p.x.sN + col * V, gb = b.n * p.grad_y.sN + col * V;
      for (int64_t r = b.r0 + slot; r < b.r1; r += kNhwcBwdUnroll * ng.RP) {
        Raw<T, V> rx[kNhwcBwdUnroll], rg[kNhwcBwdUnroll];
#pragma unroll
        for (int u = 0; u < kNhwcBwdUnroll; ++u) {
          const int64_t rr = r + u * ng.RP;
          if (rr < b.r1) {
            rx[u] = load_raw<T, V>(p.x.data, xb + rr * p.x.sHW);
            rg[u] = load_raw<T, V>(p.grad_y.data, gb + rr * p.grad_y.sHW);
          }
        }
#pragma unroll
        for (int u = 0; u < kNhwcBwdUnroll; ++u) {
          if (r + u * ng.RP < b.r1) {
            float x[V], g[V];
            unpack<T, V>(rx[u], x);
            unpack<T, V>(rg[u], g);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float xh = (x[e] - mean[e]) * rstd[e];
              const float gz = act_grad(g[e], fmaf(xh, wk[e], bks[e]), act);
              a1[e] += gz;
              a2[e] = fmaf(gz, xh, a2[e]);
            }
          }
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        s_1[t * V + e] = a1[e];  // == [slot * C + channel]
        s_2[t * V + e] = a2[e];
      }
    }
    __syncthreads();
    for (int64_t c = t; c < ng.C; c += kNhwcThreads) {
      float a1 = s_1[c], a2 = s_2[c];
      for (int64_t s = 1; s < ng.RP; ++s) {
        a1 += s_1[s * ng.C + c];
        a2 += s_2[s * ng.C + c];
      }
      float* out = w.partials + ((b.n * ng.C + c) * ng.nrc + b.rc) * 2;
      out[0] = a1;
      out[1] = a2;
    }
    __syncthreads();  // shared memory is rewritten by the next block
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads, 2)
    gn_bwd_nhwc_apply_kernel(const GroupNormActBackwardParams p, const NhwcGeom ng, const Work w) {
  const int t = threadIdx.x;
  const int64_t slot = static_cast<uint32_t>(t) / static_cast<uint32_t>(ng.CV), col = t - slot * ng.CV;
  if (slot >= ng.RP) return;  // no block synchronization in this kernel
  const bool act = p.act != 0;
  for (int64_t blk = blockIdx.x; blk < ng.nblocks; blk += gridDim.x) {
    const NhwcCoord b = nhwc_coord(blk, ng);
    float mean[V], rstd[V], wk[V], bks[V], rA[V], rB[V];
    const float4* tb = reinterpret_cast<const float4*>(w.table) + (b.n * ng.C + col * V) * 2;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float4 t0 = __ldg(tb + 2 * e), t1 = __ldg(tb + 2 * e + 1);
      mean[e] = t0.x;
      rstd[e] = t0.y;
      wk[e] = t0.z;
      bks[e] = t0.w;
      rA[e] = t1.y;
      rB[e] = t1.z;
    }
    const int64_t xb = b.n * p.x.sN + col * V, gb = b.n * p.grad_y.sN + col * V;
    const int64_t ob = b.n * p.grad_x.sN + col * V;
    for (int64_t r = b.r0 + slot; r < b.r1; r += kNhwcBwdUnroll * ng.RP) {
      Raw<T, V> rx[kNhwcBwdUnroll], rg[kNhwcBwdUnroll];
#pragma unroll
      for (int u = 0; u < kNhwcBwdUnroll; ++u) {
        const int64_t rr = r + u * ng.RP;
        if (rr < b.r1) {
          rx[u] = load_raw<T, V>(p.x.data, xb + rr * p.x.sHW);
          rg[u] = load_raw<T, V>(p.grad_y.data, gb + rr * p.grad_y.sHW);
        }
      }
#pragma unroll
      for (int u = 0; u < kNhwcBwdUnroll; ++u) {
        const int64_t rr = r + u * ng.RP;
        if (rr < b.r1) {
          float x[V], g[V];
          unpack<T, V>(rx[u], x);
          unpack<T, V>(rg[u], g);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xh = (x[e] - mean[e]) * rstd[e];
            const float gz = act_grad(g[e], fmaf(xh, wk[e], bks[e]), act);
            x[e] = fmaf(gz, rstd[e] * wk[e], -fmaf(xh, rB[e], rA[e]));
          }
          store<T, V>(p.grad_x.data, ob + rr * p.grad_x.sHW, x);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the plan (path, geometry, workspace) of a call. Depends only on shapes, strides,
// dtype and pointer alignment, so a call's reduction order is fixed.
enum class Path { kTileVec, kTileScalar, kNhwcVec, kNhwcScalar, kEmpty };

struct Plan {
  bool ok = true;  // false: counts beyond the 32-bit index decompositions
  Path path = Path::kEmpty;
  bool fused = false;
  int R = 1, bt = 32;
  TileGeom tile{};
  NhwcGeom nhwc{};
  int64_t nchunk = 0;
  int64_t ws_table = 0, ws_S = 0, ws_partials = 0, ws_total = 0;  // float offsets / total
};

int64_t round4(int64_t a) { return (a + 3) / 4 * 4; }

// Strides of size-1 dimensions do not matter: 0.
GNTensor normalized(GNTensor t, int64_t N, int64_t C, int64_t HW) {
  if (N == 1) t.sN = 0;
  if (C == 1) t.sC = 0;
  if (HW == 1) t.sHW = 0;
  return t;
}

// Registers per thread and threads of a tile of tv vectors (tv <= max_vecs(V)).
void tile_config(int64_t tv, int V, int* R, int* bt) {
  const int r = V == 1 ? kScalarR : (tv <= static_cast<int64_t>(256) * kSmallR ? kSmallR : kTileMaxR);
  int64_t b = cdiv(cdiv(tv, r), 32) * 32;
  if (b < 32) b = 32;
  if (b > kTileMaxThreads) b = kTileMaxThreads;
  *R = r;
  *bt = static_cast<int>(b);
}

void plan_tile(Plan& pl, int64_t N, int64_t C, int64_t HW, int64_t G, int V) {
  TileGeom& tg = pl.tile;
  tg.N = N;
  tg.C = C;
  tg.HW = HW;
  tg.G = G;
  tg.D = C / G;
  tg.HWv = HW / V;
  const int64_t cap = V == 1 ? static_cast<int64_t>(kTileMaxThreads) * kScalarR : kTileMaxVecs;
  tg.Dc = std::min({tg.D, cap, kTileMaxChannels});
  tg.ncc = cdiv(tg.D, tg.Dc);
  const int64_t lmax = cap / tg.Dc;
  tg.nhc = cdiv(tg.HWv, lmax);
  tg.Lv = cdiv(tg.HWv, tg.nhc);
  tile_config(tg.Dc * tg.Lv, V, &pl.R, &pl.bt);
  const int64_t groups = N * G * tg.ncc;
  if (groups * tg.nhc * pl.bt < kFusedMinThreads) {
    // Too little parallelism: split the hw range further (down to kMinChunkVecs per chunk).
    while (groups * tg.nhc * pl.bt < kSplitTargetThreads && tg.Lv > kMinChunkVecs) {
      int64_t lv = cdiv(tg.Lv, 2);
      if (lv < kMinChunkVecs) lv = kMinChunkVecs;
      tg.nhc = cdiv(tg.HWv, lv);
      tg.Lv = cdiv(tg.HWv, tg.nhc);
      tile_config(tg.Dc * tg.Lv, V, &pl.R, &pl.bt);
    }
  }
  tg.ntiles = groups * tg.nhc;
  tg.tv_max = tg.Dc * tg.Lv;
  tg.by_nhc = FastDiv(static_cast<uint32_t>(tg.nhc));
  tg.by_ncc = FastDiv(static_cast<uint32_t>(tg.ncc));
  tg.by_G = FastDiv(static_cast<uint32_t>(G));
  tg.by_Lv = FastDiv(static_cast<uint32_t>(tg.Lv));
  tg.by_Llast = FastDiv(static_cast<uint32_t>(tg.HWv - (tg.nhc - 1) * tg.Lv));
  pl.fused = tg.ncc == 1 && tg.nhc == 1;
}

void plan_nhwc(Plan& pl, int64_t N, int64_t C, int64_t HW, int64_t G, int V) {
  NhwcGeom& ng = pl.nhwc;
  ng.N = N;
  ng.C = C;
  ng.HW = HW;
  ng.G = G;
  ng.D = C / G;
  ng.CV = C / V;
  ng.RP = kNhwcThreads / ng.CV;
  int64_t max_nrc = cdiv(HW, kNhwcMinRowsPerThread * ng.RP);
  if (max_nrc < 1) max_nrc = 1;
  int64_t nrc = cdiv(kSplitTargetThreads, N * kNhwcThreads);
  if (nrc > max_nrc) nrc = max_nrc;
  if (nrc < 1) nrc = 1;
  ng.LR = cdiv(HW, nrc);
  ng.nrc = cdiv(HW, ng.LR);
  ng.nblocks = N * ng.nrc;
  pl.fused = false;
}

bool aligned_all(const GNTensor* ts, int nt) {
  for (int i = 0; i < nt; ++i) {
    if (!aligned16(ts[i].data)) return false;
  }
  return true;
}

// ts: the big tensors of the call, already normalized. elem: bytes per element.
Plan make_plan(int64_t N, int64_t C, int64_t HW, int64_t G, int elem, const GNTensor* ts, int nt) {
  Plan pl;
  pl.ok = N * C < kMaxGrid;
  if (N <= 0 || G <= 0 || C <= 0 || HW <= 0) return pl;  // kEmpty: no elements
  const int V = 16 / elem;
  bool nchw_like = true, nhwc_like = true, nchw_vec = HW % V == 0, nhwc_vec = C % V == 0;
  for (int i = 0; i < nt; ++i) {
    const GNTensor& t = ts[i];
    nchw_like = nchw_like && (HW == 1 || t.sHW == 1);
    nhwc_like = nhwc_like && (C == 1 || t.sC == 1);
    nchw_vec = nchw_vec && t.sC % V == 0 && t.sN % V == 0;
    nhwc_vec = nhwc_vec && t.sHW % V == 0 && t.sN % V == 0;
  }
  const bool aligned = aligned_all(ts, nt);
  nchw_vec = nchw_vec && nchw_like && aligned;
  nhwc_vec = nhwc_vec && nhwc_like && aligned && C / V <= kNhwcThreads;
  if (nchw_vec) {
    pl.path = Path::kTileVec;
    plan_tile(pl, N, C, HW, G, V);
  } else if (nhwc_vec) {
    pl.path = Path::kNhwcVec;
    plan_nhwc(pl, N, C, HW, G, V);
  } else if (nhwc_like && C <= kNhwcThreads && !(nchw_like && HW > 1)) {
    pl.path = Path::kNhwcScalar;
    plan_nhwc(pl, N, C, HW, G, 1);
  } else {
    pl.path = Path::kTileScalar;
    plan_tile(pl, N, C, HW, G, 1);
  }
  int64_t blocks;
  if (pl.path == Path::kTileVec || pl.path == Path::kTileScalar) {
    pl.nchunk = pl.tile.ncc * pl.tile.nhc;
    blocks = pl.tile.ntiles;
  } else {
    pl.nchunk = pl.nhwc.nrc;
    blocks = pl.nhwc.nblocks;
  }
  pl.ok = blocks < kMaxGrid && N * C < kMaxGrid;
  return pl;
}


Plan forward_plan(const GroupNormActParams& p) {
  const GNTensor ts[2] = {normalized(p.x, p.N, p.C, p.HW), normalized(p.y, p.N, p.C, p.HW)};
  Plan pl = make_plan(p.N, p.C, p.HW, p.G, dtype_size(p.dtype), ts, 2);
  if (pl.path != Path::kEmpty && !pl.fused) {
    pl.ws_table = 0;
    pl.ws_partials = round4(p.N * p.C * 4);
    pl.ws_total = pl.ws_partials + round4(p.N * p.G * pl.nchunk * 3);
  }
  return pl;
}

Plan backward_plan(const GroupNormActBackwardParams& p) {
  const GNTensor ts[3] = {normalized(p.x, p.N, p.C, p.HW), normalized(p.grad_y, p.N, p.C, p.HW),
                          normalized(p.grad_x, p.N, p.C, p.HW)};
  Plan pl = make_plan(p.N, p.C, p.HW, p.G, dtype_size(p.dtype), ts, 3);
  // nchunk of the backward partials: per (n, c), the hw chunks only (tile) or the row chunks (nhwc).
  if (pl.path == Path::kTileVec || pl.path == Path::kTileScalar) pl.nchunk = pl.tile.nhc;
  int64_t off = 0;
  const bool split = pl.path != Path::kEmpty && !pl.fused;
  if (split) {
    pl.ws_table = off;
    off += round4(p.N * p.C * 8);
  }
  if (p.grad_weight.data != nullptr || p.grad_bias.data != nullptr) {
    pl.ws_S = off;
    off += round4(p.N * p.C * 2);
  } else {
    pl.ws_S = -1;
  }
  if (split) {
    pl.ws_partials = off;
    off += round4(p.N * p.C * pl.nchunk * 2);
  }
  pl.ws_total = off;
  return pl;
}

unsigned grid_of(int64_t blocks) {
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

GroupNormActParams normalized_params(GroupNormActParams p) {
  p.x = normalized(p.x, p.N, p.C, p.HW);
  p.y = normalized(p.y, p.N, p.C, p.HW);
  return p;
}

GroupNormActBackwardParams normalized_params(GroupNormActBackwardParams p) {
  p.x = normalized(p.x, p.N, p.C, p.HW);
  p.grad_y = normalized(p.grad_y, p.N, p.C, p.HW);
  p.grad_x = normalized(p.grad_x, p.N, p.C, p.HW);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Forward launches.
template <typename T, int V, int R>
void fwd_tile(const GroupNormActParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  const unsigned grid = grid_of(pl.tile.ntiles);
  if (pl.fused) {
    const size_t smem = static_cast<size_t>(pl.tile.Dc) * sizeof(ChanCoef);
    gn_fwd_tile_kernel<T, V, R, kFused><<<grid, pl.bt, smem, stream>>>(p, pl.tile, w);
    return;
  }
  gn_fwd_tile_kernel<T, V, R, kPartials><<<grid, pl.bt, 0, stream>>>(p, pl.tile, w);
  gn_fwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
  gn_fwd_tile_apply_kernel<T, V><<<grid, pl.bt, 0, stream>>>(p, pl.tile, w);
}

template <typename T, int V>
void fwd_tile_r(const GroupNormActParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  if constexpr (V == 1) {
    fwd_tile<T, 1, kScalarR>(p, pl, w, stream);
  } else if (pl.R == kSmallR) {
    fwd_tile<T, V, kSmallR>(p, pl, w, stream);
  } else {
    fwd_tile<T, V, kTileMaxR>(p, pl, w, stream);
  }
}

template <typename T, int V>
void fwd_nhwc(const GroupNormActParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  const unsigned grid = grid_of(pl.nhwc.nblocks);
  gn_fwd_nhwc_stats_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(p, pl.nhwc, w);
  gn_fwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
  gn_fwd_nhwc_apply_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(p, pl.nhwc, w);
}

template <typename T>
void fwd_typed(const GroupNormActParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  switch (pl.path) {
    case Path::kTileVec: fwd_tile_r<T, V>(p, pl, w, stream); break;
    case Path::kTileScalar: fwd_tile_r<T, 1>(p, pl, w, stream); break;
    case Path::kNhwcVec: fwd_nhwc<T, V>(p, pl, w, stream); break;
    case Path::kNhwcScalar: fwd_nhwc<T, 1>(p, pl, w, stream); break;
    case Path::kEmpty: break;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward launches.
template <typename T, int V, int R>
void bwd_tile(const GroupNormActBackwardParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  const unsigned grid = grid_of(pl.tile.ntiles);
  const size_t smem = static_cast<size_t>(pl.tile.Dc) * sizeof(ChanCoef) + static_cast<size_t>(pl.tile.tv_max) * 2 * sizeof(float);
  if (pl.fused) {
    gn_bwd_tile_kernel<T, V, R, kFused><<<grid, pl.bt, smem, stream>>>(p, pl.tile, w);
    return;
  }
  gn_bwd_tile_kernel<T, V, R, kPartials><<<grid, pl.bt, smem, stream>>>(p, pl.tile, w);
  gn_bwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
  gn_bwd_tile_apply_kernel<T, V><<<grid, pl.bt, 0, stream>>>(p, pl.tile, w);
}

template <typename T, int V>
void bwd_tile_r(const GroupNormActBackwardParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  if constexpr (V == 1) {
    bwd_tile<T, 1, kScalarR>(p, pl, w, stream);
  } else if (pl.R == kSmallR) {
    bwd_tile<T, V, kSmallR>(p, pl, w, stream);
  } else {
    bwd_tile<T, V, kTileMaxR>(p, pl, w, stream);
  }
}

template <typename T, int V>
void bwd_nhwc(const GroupNormActBackwardParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  const unsigned grid = grid_of(pl.nhwc.nblocks);
  gn_bwd_nhwc_partials_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(p, pl.nhwc, w);
  gn_bwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
  gn_bwd_nhwc_apply_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(p, pl.nhwc, w);
}

template <typename T>
void bwd_typed(const GroupNormActBackwardParams& p, const Plan& pl, const Work& w, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  switch (pl.path) {
    case Path::kTileVec: bwd_tile_r<T, V>(p, pl, w, stream); break;
    case Path::kTileScalar: bwd_tile_r<T, 1>(p, pl, w, stream); break;
    case Path::kNhwcVec: bwd_nhwc<T, V>(p, pl, w, stream); break;
    case Path::kNhwcScalar: bwd_nhwc<T, 1>(p, pl, w, stream); break;
    case Path::kEmpty: break;
  }
}

bool valid_dims(int64_t N, int64_t C, int64_t HW, int64_t G) {
  return N >= 0 && C >= 0 && HW >= 0 && G >= 1 && C % G == 0;
}

}  // namespace

int64_t group_norm_act_workspace_floats(const GroupNormActParams& p) {
  if (!valid_dims(p.N, p.C, p.HW, p.G)) return 0;
  return forward_plan(p).ws_total;
}

int64_t group_norm_act_backward_workspace_floats(const GroupNormActBackwardParams& p) {
  if (!valid_dims(p.N, p.C, p.HW, p.G)) return 0;
  return backward_plan(p).ws_total;
}

cudaError_t launch_group_norm_act(const GroupNormActParams& params, cudaStream_t stream) {
  if (!valid_dims(params.N, params.C, params.HW, params.G)) return cudaErrorInvalidValue;
  if (params.N == 0) return cudaSuccess;  // no outputs
  const GroupNormActParams p = normalized_params(params);
  const Plan pl = forward_plan(params);
  if (!pl.ok) return cudaErrorInvalidValue;
  if (pl.ws_total > 0 && (p.workspace == nullptr || !aligned16(p.workspace))) return cudaErrorInvalidValue;
  Work w;
  if (pl.path == Path::kEmpty) {
    // No elements (C == 0 or HW == 0): mean = rstd = NaN from an empty combine.
    gn_fwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
    return cudaGetLastError();
  }
  if (!pl.fused) {
    w.table = p.workspace + pl.ws_table;
    w.partials = p.workspace + pl.ws_partials;
    w.nchunk = pl.nchunk;
  }
  switch (p.dtype) {
    case DType::kFloat32: fwd_typed<float>(p, pl, w, stream); break;
    case DType::kFloat16: fwd_typed<__half>(p, pl, w, stream); break;
    case DType::kBFloat16: fwd_typed<__nv_bfloat16>(p, pl, w, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_group_norm_act_backward(const GroupNormActBackwardParams& params, cudaStream_t stream) {
  if (!valid_dims(params.N, params.C, params.HW, params.G)) return cudaErrorInvalidValue;
  const GroupNormActBackwardParams p = normalized_params(params);
  const Plan pl = backward_plan(params);
  if (!pl.ok) return cudaErrorInvalidValue;
  if (pl.ws_total > 0 && (p.workspace == nullptr || !aligned16(p.workspace))) return cudaErrorInvalidValue;
  Work w;
  if (pl.ws_S >= 0) w.S = p.workspace + pl.ws_S;
  const bool param_grads = p.grad_weight.data != nullptr || p.grad_bias.data != nullptr;
  if (p.N > 0 && p.C > 0) {
    if (pl.path == Path::kEmpty) {
      // No elements (HW == 0): S1 = S2 = 0, every parameter gradient is 0; grad_x is empty.
      gn_bwd_finalize_kernel<<<grid_of(cdiv(p.N * p.G, kFinalizeThreads / 32)), kFinalizeThreads, 0, stream>>>(p, w);
    } else {
      if (!pl.fused) {
        w.table = p.workspace + pl.ws_table;
        w.partials = p.workspace + pl.ws_partials;
        w.nchunk = pl.nchunk;
      }
      switch (p.dtype) {
        case DType::kFloat32: bwd_typed<float>(p, pl, w, stream); break;
        case DType::kFloat16: bwd_typed<__half>(p, pl, w, stream); break;
        case DType::kBFloat16: bwd_typed<__nv_bfloat16>(p, pl, w, stream); break;
        default: return cudaErrorInvalidValue;
      }
    }
  }
  if (param_grads && p.C > 0) {
    // With N == 0 the sums over n are empty: zeros (w.S is not read).
    gn_bwd_params_kernel<<<grid_of(cdiv(p.C, 32)), kParamThreads, 0, stream>>>(p, w);
  }
  return cudaGetLastError();
}

}  // namespace adv_dpm_cuda
