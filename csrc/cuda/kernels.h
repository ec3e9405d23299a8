// Launch interface of the CUDA kernels (csrc/cuda/*.cu). Plain C++: no torch headers, so the
// kernels compile with nvcc alone; csrc/cuda/bindings.cpp turns tensors into these structs.
// The math, dtypes and layouts are those of docs/OPS.md.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace adv_dpm_cuda {

// Element type of a tensor. Big tensors are kFloat32, kFloat16 or kBFloat16; coefficient
// vectors (read or written) may also be kFloat64.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

constexpr int kThreads = 128;          // threads per block of every element kernel
constexpr int64_t kTargetBlocks = 2048; // ~ one full wave of 128-thread blocks on an H100 (132 SMs x 16)
constexpr int64_t kMaxGridY = 65535;    // samples beyond this are looped over inside a block

// Shape of every big tensor of one call, viewed as (B, s1, s2, s3); N = s1 * s2 * s3 (per sample).
struct Shape {
  int64_t B = 0;
  int64_t s1 = 1, s2 = 1, s3 = 1;
  int64_t N = 0;
};

// A big tensor viewed as (B, s1, s2, s3): data pointer (storage offset applied) and strides in
// elements. Strides of padded dimensions are 0.
struct View {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// A small input in fp32/fp64/fp16/bf16, any strides (elements): a vector (per sample; group_norm_act:
// per channel), element i at i * stride, or group_norm_act's (N, C) scale / shift, element (n, c) at
// n * row_stride + c * stride (ADM's are the two halves of one (N, 2C) projection: row_stride 2C).
struct CoefView {
  const void* data = nullptr;
  int64_t stride = 1;
  int64_t row_stride = 0;
  DType dtype = DType::kFloat32;
};

// A contiguous 1-D coefficient output (per sample; group_norm_act: per channel or (n, c)).
struct CoefOut {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
};

// Ceiling of a / b (a >= 0, b > 0).
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per sample of every kernel of one call (and so the number of per-sample partial sums):
// one 16-byte vector per thread where that fills the GPU, capped so that the grid stays within
// about one wave of kTargetBlocks blocks. Depends on shapes only, so results are run-to-run
// deterministic. Always >= 1.
inline int64_t blocks_per_sample(int64_t B, int64_t N, DType dtype) {
  const int64_t vec = 16 / dtype_size(dtype);
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  int64_t nblk = cdiv(N, per_block);
  const int64_t rows = B < kMaxGridY ? B : kMaxGridY;
  const int64_t cap = rows > 0 ? kTargetBlocks / rows : kTargetBlocks;
  if (nblk > cap) nblk = cap;
  if (nblk < 1) nblk = 1;
  return nblk;
}

// Number of floats of the partial-sum workspace of noise_inject_backward (coef_grads) and
// adv_step: 3 per (sample, block).
inline int64_t partials_floats(int64_t B, int64_t nblk) { return B * nblk * 3; }

// `dense`: every big tensor of the call (inputs and outputs that are read or written) has the
// same strides and is dense with the batch dimension outermost, so element j of sample b of every
// tensor is at data[b * N + j] for one common j -> (i1, i2, i3) map. The launchers then use flat
// (and, where pointers are 16-byte aligned and N is a multiple of the vector width, 128-bit
// vector) accesses; otherwise each tensor is indexed through its own strides.

struct NoiseInjectParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  bool dense = false;
  bool has_delta = false;
  int32_t mode = 0;
  int64_t nblk = 1;
  View x0, eps, delta;       // inputs (delta only if has_delta)
  CoefView c_signal, c_noise;
  View x_t, target;          // outputs
};

struct NoiseInjectBackwardParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  bool dense = false;
  bool has_delta = false;
  bool coef_grads = false;
  int32_t mode = 0;
  int64_t nblk = 1;
  View grad_x_t, grad_target;  // inputs
  View x0, eps, delta;         // inputs, read only if coef_grads (delta: and has_delta, mode >= 1)
  CoefView c_signal, c_noise;
  View grad_x0, grad_eps, grad_delta;    // outputs (grad_delta only if has_delta)
  CoefOut grad_c_signal, grad_c_noise;   // outputs (coef_grads only)
  float* partials = nullptr;             // partials_floats(B, nblk) floats (coef_grads only)
};

struct AdvStepParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  bool dense = false;
  bool has_grad_target = false;  // then c_noise is given
  bool has_x_t = false;          // the fused form: eps and c_noise are given
  int32_t mode = 0;
  int64_t nblk = 1;
  float lr = 0.f, radius = 0.f;
  const float* grad_scale = nullptr;        // the loss scale on the device (one float); nullptr: 1
  View delta, grad, grad_target, x_t, eps;  // inputs
  CoefView c_noise;
  View new_delta, x_adv, target;            // outputs (x_adv, target only if has_x_t)
  float* grad_norm = nullptr;               // (B,) float32
  float* delta_norm = nullptr;              // (B,) float32
  bool* skipped = nullptr;                  // (B,) bool
  float* partials = nullptr;                // partials_floats(B, nblk) floats for the two-kernel plan
};

// How adv_step runs on the current device (csrc/cuda/adv_step.cu): `cluster` blocks per sample
// holding it in registers (a thread block cluster when > 1, on devices that launch them), one
// block per sample re-reading it from cache, or two kernels through per-block partial sums.
// Depends on the shape and the device only, so a call's reduction order is fixed.
struct AdvStepPlan {
  enum Kind : int32_t { kResident = 0, kSample = 1, kTwoKernels = 2 } kind = kTwoKernels;
  int32_t cluster = 1;
};
// Computed once per call: the launch takes it, and the caller gives the two-kernel plan its partials.
AdvStepPlan adv_step_plan(const AdvStepParams& p);

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError() (cudaSuccess when
// there is nothing to do, i.e. B == 0).
cudaError_t launch_noise_inject(const NoiseInjectParams& p, cudaStream_t stream);
cudaError_t launch_noise_inject_backward(const NoiseInjectBackwardParams& p, cudaStream_t stream);
cudaError_t launch_adv_step(const AdvStepParams& p, const AdvStepPlan& plan, cudaStream_t stream);

}  // namespace adv_dpm_cuda

// =============================================================================================
// GroupNorm + per-sample scale/shift + SiLU: csrc/cuda/group_norm_act.cu (docs/OPS.md,
// "group_norm_act" and "group_norm_act_backward"). Section appended for that op.
namespace adv_dpm_cuda {

// A big tensor of the op viewed as (N, C, HW) (the spatial dims collapsed into one): data pointer
// (storage offset applied) and strides in elements. The stride of a dimension of size 1 is
// ignored (any value).
struct GNTensor {
  void* data = nullptr;
  int64_t sN = 0, sC = 0, sHW = 0;
};

// group_norm_act(x, weight?, bias?, scale?, shift?, num_groups, eps, act) -> (y, mean, rstd).
// x, y: kFloat32 / kFloat16 / kBFloat16 (dtype), each with its own strides. The small inputs are
// read in their own dtype (stride 1: contiguous, flat index c or n * C + c), so a call needs no cast
// kernel around it (ADM keeps norm parameters in float32 beside bf16 activations and scale/shift);
// data == nullptr: not given.
struct GroupNormActParams {
  DType dtype = DType::kFloat32;
  int64_t N = 0, C = 0, HW = 0, G = 1;  // C % G == 0
  float eps = 1e-5f;
  int32_t act = 1;                      // 1: SiLU, 0: identity
  GNTensor x;                           // input
  GNTensor y;                           // output
  CoefView weight, bias;                // (C,)
  CoefView scale, shift;                // (N, C)
  float* mean = nullptr;                // (N, G) output
  float* rstd = nullptr;                // (N, G) output
  float* workspace = nullptr;           // group_norm_act_workspace_floats(*this) floats, 16-byte aligned
};

// group_norm_act_backward(grad_y, x, mean, rstd, weight?, bias?, scale?, shift?, num_groups, act)
//   -> (grad_x, grad_weight, grad_bias, grad_scale, grad_shift).
// grad_y, x, grad_x: one dtype, each with its own strides. Parameter gradients are written in
// their parameter's dtype (contiguous); data == nullptr: not wanted (the parameter was not given).
struct GroupNormActBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t N = 0, C = 0, HW = 0, G = 1;
  int32_t act = 1;
  GNTensor grad_y, x;                   // inputs
  GNTensor grad_x;                      // output
  const float* mean = nullptr;          // (N, G) float32 contiguous
  const float* rstd = nullptr;          // (N, G)
  CoefView weight, bias;                // (C,)
  CoefView scale, shift;                // (N, C)
  CoefOut grad_weight, grad_bias;       // (C,) outputs
  CoefOut grad_scale, grad_shift;       // (N, C) outputs
  float* workspace = nullptr;           // group_norm_act_backward_workspace_floats(*this) floats, 16-byte aligned
};

// Floats of workspace a call needs (0: none). Depends on the shapes, strides, dtype, pointer
// alignment and on which gradients are wanted: call it on the filled-in parameters.
int64_t group_norm_act_workspace_floats(const GroupNormActParams& p);
int64_t group_norm_act_backward_workspace_floats(const GroupNormActBackwardParams& p);

// Enqueue the kernels on `stream`; cudaGetLastError() (cudaErrorInvalidValue for invalid
// dimensions, an unsupported dtype or a missing / misaligned workspace).
cudaError_t launch_group_norm_act(const GroupNormActParams& p, cudaStream_t stream);
cudaError_t launch_group_norm_act_backward(const GroupNormActBackwardParams& p, cudaStream_t stream);

}  // namespace adv_dpm_cuda
