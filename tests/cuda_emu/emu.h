// A CPU emulation of the CUDA features that csrc/cuda/*.cu use, so that CI (no GPU) runs the
// CUDA kernels themselves against the oracle (the pair cpu-cuda_emulated of tests/conftest.py).
//
// The threads of a block are coroutines (ucontext) on one OS thread, switched round-robin at
// every barrier: __syncthreads, and each warp shuffle (which exchanges values through a
// per-warp buffer between two warp barriers). Blocks run one after another, in a shuffled
// order, so __shared__ becomes a function-local static. A thread block cluster (a launch through
// cudaLaunchKernelEx with a cluster dimension) runs its blocks together, the threads of all of
// them interleaved, each block with its own dynamic shared memory, which the others reach
// through cooperative_groups' cluster_group (include/cooperative_groups.h): a kernel launched in
// clusters keeps its shared memory in the dynamic allocation. Threads that all wait at barriers
// that can never complete (a divergent __syncthreads, shuffle or cluster sync) are a deadlock:
// the launch fails with cudaErrorLaunchFailure instead of hanging.
//
// The device (cudaDeviceGetAttribute) has emu::state().device's SM count and cluster support:
// by default an H100's, settable to take a launcher's other paths.
//
// What this checks: indexing, masking, the math, the reductions and their order, the use of
// shared memory and barriers within a block and a cluster. What it cannot: timing, races between
// blocks outside a cluster or with the non-coherent __ldg path, alignment faults, register
// pressure (tests/test_cuda_build.py).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
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

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrClusterLaunch = 120 };
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};

namespace emu {

struct Barrier {
  unsigned size = 0, arrived = 0, generation = 0;
};

struct Thread {
  ucontext_t context;
  uint3 idx, block;  // threadIdx, blockIdx
  unsigned rank = 0;    // its block's rank in the cluster
  unsigned linear = 0;  // in its block
  unsigned warp = 0;    // index of its warp among all warps of the cluster
  bool done = false;
};

struct Device {
  int sm_count = 132;       // an H100 SXM
  int cluster_launch = 1;   // thread block clusters (compute capability >= 9.0)
};

struct State {
  dim3 grid_dim, block_dim;
  unsigned cluster_size = 1;   // blocks per cluster (along x)
  std::vector<Thread> threads;  // of the blocks that run together: one block, or one cluster
  std::vector<std::unique_ptr<char[]>> stacks;  // one per thread index, reused by every block
  Thread* current = nullptr;
  ucontext_t scheduler;
  std::vector<Barrier> block_barriers;  // per block rank
  std::vector<Barrier> warp_barriers;
  Barrier cluster_barrier;
  std::vector<uint64_t> warp_lanes;  // 32 exchange slots per warp
  size_t dynamic_bytes = 0;
  std::vector<std::vector<unsigned char>> dynamic_shared;  // per block rank
  const void* kernel = nullptr;  // the launch's body (a lambda), run by `call`
  void (*call)(const void*) = nullptr;
  cudaError_t last_error = cudaSuccess;
  bool deadlock = false;
  unsigned long remote_waits = 0;  // yields of map_shared: progress, though no barrier completes
  Device device;
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
  Thread& t = *s.current;
  t.done = true;
  leave(s.block_barriers[t.rank]);
  leave(s.warp_barriers[t.warp]);
  leave(s.cluster_barrier);
  // A block's shared memory is gone once its threads have exited: another block of its cluster
  // reading it later reads NaN here (undefined on the hardware).
  std::vector<unsigned char>& shared = s.dynamic_shared[t.rank];
  if (s.block_barriers[t.rank].size == 0) std::fill(shared.begin(), shared.end(), 0xff);
  // Returning resumes uc_link: the scheduler.
}

// Runs blocks x0 .. x0 + cluster_size - 1 of row (y, z) together (one cluster; one block when
// cluster_size is 1): every thread as a coroutine until all are done (or deadlocked).
inline void run_cluster(unsigned x0, unsigned y, unsigned z) {
  State& s = state();
  const unsigned n = s.block_dim.x * s.block_dim.y * s.block_dim.z;
  const unsigned warps = (n + 31) / 32, blocks = s.cluster_size, total = n * blocks;
  s.threads.clear();
  s.threads.resize(total);
  s.block_barriers.assign(blocks, Barrier{n, 0, 0});
  s.cluster_barrier = Barrier{total, 0, 0};
  s.warp_barriers.assign(warps * blocks, Barrier{});
  for (unsigned w = 0; w < warps * blocks; ++w) {
    s.warp_barriers[w].size = (w % warps + 1 < warps || n % 32 == 0) ? 32 : n % 32;
  }
  s.warp_lanes.assign(warps * blocks * 32, 0);
  // Unwritten shared memory reads as NaN floats: a read before a write shows.
  s.dynamic_shared.assign(blocks, std::vector<unsigned char>(s.dynamic_bytes, 0xff));
  for (unsigned i = 0; i < total; ++i) {
    Thread& t = s.threads[i];
    t.rank = i / n;
    t.linear = i % n;
    t.warp = t.rank * warps + t.linear / 32;
    t.block = uint3{x0 + t.rank, y, z};
    t.idx.x = t.linear % s.block_dim.x;
    t.idx.y = (t.linear / s.block_dim.x) % s.block_dim.y;
    t.idx.z = t.linear / (s.block_dim.x * s.block_dim.y);
    if (s.stacks.size() <= i) s.stacks.emplace_back(new char[kStackBytes]);  // kept for later blocks
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, entry, 0);
  }
  unsigned remaining = total;
  std::vector<unsigned> order(total);
  for (unsigned i = 0; i < total; ++i) order[i] = i;
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
      const unsigned before = s.block_barriers[t.rank].generation, warp_before = s.warp_barriers[t.warp].generation,
                     cluster_before = s.cluster_barrier.generation;
      const unsigned long waits_before = s.remote_waits;
      s.current = &t;
      swapcontext(&s.scheduler, &t.context);
      if (t.done) {
        --remaining;
        ++progress;
      }
      if (s.block_barriers[t.rank].generation != before || s.warp_barriers[t.warp].generation != warp_before ||
          s.cluster_barrier.generation != cluster_before || s.remote_waits != waits_before) {
        ++progress;
      }
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
// stream, [&] { kernel(args); }) (tests/cuda_emu/build.py rewrites the sources); cudaLaunchKernelEx
// calls it with the launch's cluster size.
template <typename F>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, const F& body, unsigned cluster = 1) {
  State& s = state();
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
      block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535 || cluster == 0 || cluster > 8 ||
      grid.x % cluster != 0 || (cluster > 1 && !s.device.cluster_launch)) {
    s.last_error = cudaErrorInvalidValue;
    return;
  }
  s.grid_dim = grid;
  s.block_dim = block;
  s.cluster_size = cluster;
  s.dynamic_bytes = shared_bytes;
  s.kernel = &body;
  s.call = &thunk<F>;
  s.deadlock = false;
  // Clusters (blocks) in a shuffled order: a kernel must not rely on the order in which they run.
  std::vector<uint3> firsts;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += cluster) firsts.push_back(uint3{x, y, z});
  std::shuffle(firsts.begin(), firsts.end(), s.rng);
  for (const uint3& b : firsts) {
    if (s.deadlock) break;
    run_cluster(b.x, b.y, b.z);
  }
  if (s.deadlock) s.last_error = cudaErrorLaunchFailure;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(state().dynamic_shared[state().current->rank].data());
}

// The address in block `rank`'s dynamic shared memory of what p points to in this block's.
template <typename T>
T* map_shared(T* p, unsigned rank) {
  State& s = state();
  const auto* own = s.dynamic_shared[s.current->rank].data();
  const auto offset = reinterpret_cast<const unsigned char*>(p) - own;
  if (rank >= s.cluster_size || offset < 0 || static_cast<size_t>(offset) + sizeof(T) > s.dynamic_bytes) {
    std::fprintf(stderr, "emu: map_shared_rank of an address outside dynamic shared memory or to rank %u\n", rank);
    std::abort();
  }
  // A read of another block's shared memory takes a while: the thread yields a random number of
  // times first, so that a block of the cluster that leaves too early (no cluster sync after the
  // reads) is gone before some reader gets to it.
  for (unsigned k = s.rng() % 4; k > 0; --k) {
    ++s.remote_waits;
    yield();
  }
  return reinterpret_cast<T*>(s.dynamic_shared[rank].data() + offset);
}

template <typename T>
T shuffle(T v, int src, unsigned width_check) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  State& s = state();
  const unsigned warp = s.current->warp, lane = s.current->linear % 32;
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
#define blockIdx (::emu::state().current->block)
// Variables, not macros: cudaLaunchConfig_t has members of these names.
inline const dim3& blockDim = ::emu::state().block_dim;
inline const dim3& gridDim = ::emu::state().grid_dim;

inline void __syncthreads() { ::emu::wait(::emu::state().block_barriers[::emu::state().current->rank]); }

inline unsigned emu_lane() { return ::emu::state().current->linear % 32; }
inline unsigned emu_warp_size() { return ::emu::state().warp_barriers[::emu::state().current->warp].size; }
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
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeClusterDimension) {
      if (a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1) return ::emu::state().last_error = cudaErrorInvalidValue;
      cluster = a.val.clusterDim.x;
    }
  }
  ::emu::launch(config->gridDim, config->blockDim, config->dynamicSmemBytes, config->stream,
                [&] { kernel(static_cast<Params>(args)...); }, cluster);
  return ::emu::state().last_error;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const ::emu::Device& d = ::emu::state().device;
  *value = attr == cudaDevAttrMultiProcessorCount ? d.sm_count : d.cluster_launch;
  return cudaSuccess;
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
namespace emu {
// std::bit_cast is C++20, and older torch releases build extensions as C++17.
template <typename To, typename From>
To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}
}  // namespace emu
inline float __uint_as_float(unsigned u) { return emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return emu::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return emu::bit_cast<float>(i); }
inline int __float_as_int(float f) { return emu::bit_cast<int>(f); }
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
