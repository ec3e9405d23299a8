// A CPU emulation of the CUDA features that csrc/cuda/*.cu use, so that CI (no GPU) runs the
// CUDA kernels themselves against the oracle (the pair cpu-cuda_emulated of tests/conftest.py).
//
// The threads of a block are coroutines (ucontext) on one OS thread, switched round-robin at
// every barrier: __syncthreads, and each warp shuffle (which exchanges values through a
// per-warp buffer between two warp barriers). Blocks run one after another, in a shuffled
// order, so __shared__ becomes a function-local static. A block whose threads all wait at barriers that can never
// complete (a divergent __syncthreads or shuffle) is a deadlock: the launch fails with
// cudaErrorLaunchFailure instead of hanging.
//
// What this checks: indexing, masking, the math, the reductions and their order, the use of
// shared memory and barriers within a block. What it cannot: timing, races between blocks or
// with the non-coherent __ldg path, alignment faults, register pressure (tests/test_cuda_build.py).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <bit>
#include <memory>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
using cudaError = cudaError_t;
typedef struct CUstream_st* cudaStream_t;

namespace emu {

struct Barrier {
  unsigned size = 0, arrived = 0, generation = 0;
};

struct Thread {
  ucontext_t context;
  uint3 idx;
  unsigned linear = 0;
  bool done = false;
};

struct State {
  dim3 grid_dim, block_dim;
  uint3 block_idx;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;  // one per thread index, reused by every block
  Thread* current = nullptr;
  ucontext_t scheduler;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_lanes;  // 32 exchange slots per warp
  std::vector<unsigned char> dynamic_shared;
  const void* kernel = nullptr;  // the launch's body (a lambda), run by `call`
  void (*call)(const void*) = nullptr;
  cudaError_t last_error = cudaSuccess;
  bool deadlock = false;
  std::minstd_rand rng{12345};
};

inline State& state() {
  static State s;
  return s;
}

constexpr size_t kStackBytes = 128 * 1024;

inline void yield() {
  State& s = state();
  swapcontext(&s.current->context, &s.scheduler);
}

// Waits until every member of the barrier's group has arrived.
inline void wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation && !state().deadlock) yield();
}

// A thread that exits no longer counts at barriers (as on the hardware, where bar.sync waits for
// the threads that have not exited).
inline void leave(Barrier& b) {
  --b.size;
  if (b.arrived > 0 && b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void entry() {
  State& s = state();
  s.call(s.kernel);
  s.current->done = true;
  leave(s.block_barrier);
  leave(s.warp_barriers[s.current->linear / 32]);
  // Returning resumes uc_link: the scheduler.
}

// Runs one block: every thread as a coroutine until all are done (or deadlocked).
inline void run_block() {
  State& s = state();
  const unsigned n = s.block_dim.x * s.block_dim.y * s.block_dim.z;
  const unsigned warps = (n + 31) / 32;
  s.threads.clear();
  s.threads.resize(n);
  s.block_barrier = Barrier{n, 0, 0};
  s.warp_barriers.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w) s.warp_barriers[w].size = (w + 1 < warps || n % 32 == 0) ? 32 : n % 32;
  s.warp_lanes.assign(warps * 32, 0);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.linear = i;
    t.idx.x = i % s.block_dim.x;
    t.idx.y = (i / s.block_dim.x) % s.block_dim.y;
    t.idx.z = i / (s.block_dim.x * s.block_dim.y);
    if (s.stacks.size() <= i) s.stacks.emplace_back(new char[kStackBytes]);  // kept for later blocks
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, entry, 0);
  }
  unsigned remaining = n;
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  while (remaining > 0 && !s.deadlock) {
    // One round: every live thread runs until it finishes or waits at a barrier, in an order
    // shuffled every round (a fixed seed: reproducible), so that a missing barrier between a
    // write and a read of shared memory shows up as a wrong result. A round in which no
    // barrier completes and no thread finishes can never make progress.
    std::shuffle(order.begin(), order.end(), s.rng);
    unsigned progress = 0;
    for (unsigned i : order) {
      Thread& t = s.threads[i];
      if (t.done) continue;
      const unsigned before = s.block_barrier.generation;
      const unsigned warp_before = s.warp_barriers[t.linear / 32].generation;
      s.current = &t;
      swapcontext(&s.scheduler, &t.context);
      if (t.done) {
        --remaining;
        ++progress;
      }
      if (s.block_barrier.generation != before || s.warp_barriers[t.linear / 32].generation != warp_before) ++progress;
    }
    if (progress == 0 && remaining > 0) s.deadlock = true;
  }
  s.current = nullptr;
}

template <typename F>
void thunk(const void* f) {
  (*static_cast<const F*>(f))();
}

// kernel<<<grid, block, shared_bytes, stream>>>(args) becomes launch(grid, block, shared_bytes,
// stream, [&] { kernel(args); }) (tests/cuda_emu/build.py rewrites the sources).
template <typename F>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, const F& body) {
  State& s = state();
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
      block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535) {
    s.last_error = cudaErrorInvalidValue;
    return;
  }
  s.grid_dim = grid;
  s.block_dim = block;
  s.dynamic_shared.assign(shared_bytes, 0xff);  // NaN floats: a read of unwritten memory shows
  s.kernel = &body;
  s.call = &thunk<F>;
  s.deadlock = false;
  // Blocks in a shuffled order: a kernel must not rely on the order in which blocks run.
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), s.rng);
  for (const uint3& b : blocks) {
    if (s.deadlock) break;
    s.block_idx = b;
    run_block();
  }
  if (s.deadlock) s.last_error = cudaErrorLaunchFailure;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(state().dynamic_shared.data());
}

template <typename T>
T shuffle(T v, int src, unsigned width_check) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  State& s = state();
  const unsigned warp = s.current->linear / 32, lane = s.current->linear % 32;
  Barrier& b = s.warp_barriers[warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  s.warp_lanes[warp * 32 + lane] = bits;
  wait(b);
  T out = v;
  if (src >= 0 && static_cast<unsigned>(src) < width_check) std::memcpy(&out, &s.warp_lanes[warp * 32 + src], sizeof(T));
  wait(b);
  return out;
}

}  // namespace emu

#define threadIdx (::emu::state().current->idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)

inline void __syncthreads() { ::emu::wait(::emu::state().block_barrier); }

inline unsigned emu_lane() { return ::emu::state().current->linear % 32; }
inline unsigned emu_warp_size() {
  ::emu::State& s = ::emu::state();
  return s.warp_barriers[s.current->linear / 32].size;
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return ::emu::shuffle(v, src % 32, emu_warp_size());
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
  return ::emu::shuffle(v, static_cast<int>(emu_lane() + delta), emu_warp_size());
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::emu::shuffle(v, static_cast<int>(emu_lane() ^ mask), emu_warp_size());
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::emu::state().last_error;
  ::emu::state().last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument (emulated launch)"
                                                                    : "deadlock at a barrier (emulated launch)";
}

// ---- memory access and arithmetic intrinsics (IEEE float ops: build without -ffast-math)
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
void __stwb(T* p, T v) {
  *p = v;
}
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
using std::fmaxf;
using std::fminf;
using std::max;
using std::min;

// ---- fp16 / bf16 storage types and their conversions (round to nearest even)
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
