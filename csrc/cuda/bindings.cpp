// CUDA implementations of the adv_dpm_C ops (schemas in csrc/ops.cpp, contract in docs/OPS.md):
// tensors -> the POD parameter structs of kernels.h -> the launchers of csrc/cuda/*.cu, on the
// current stream of the inputs' device. The only file of csrc/cuda/ that includes torch headers.
//
// The public ops (adv_dpm/ops/) have validated the arguments already; the checks here are cheap
// guards with messages that name the argument.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using adv_dpm_cuda::CoefOut;
using adv_dpm_cuda::CoefView;
using adv_dpm_cuda::DType;
using adv_dpm_cuda::Shape;
using adv_dpm_cuda::View;

// ---------------------------------------------------------------------------------------------
// Argument checks.

void check_mode(int64_t mode, const char* op) {
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 ('original'), 1 ('delta_detach') or 2 ('delta'), got ",
              mode);
}

DType big_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": the CUDA kernels take float32, float16 or bfloat16 tensors; ", name, " is ",
              t.scalar_type());
  return DType::kFloat32;  // unreachable
}

// `t` (named `name`) must be a CUDA tensor with the shape, dtype and device of `ref`.
void check_big(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes());
}

Shape make_shape(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 4, op, ": ", name, " must have rank 1 to 4 (B, ...), got shape ",
              t.sizes());
  Shape s;
  s.B = t.size(0);
  int64_t* inner[3] = {&s.s1, &s.s2, &s.s3};
  for (int64_t d = 1; d < t.dim(); ++d) *inner[d - 1] = t.size(d);
  s.N = s.s1 * s.s2 * s.s3;
  return s;
}

// (B, s1, s2, s3) view: trailing padded dimensions have size 1 and stride 0.
View make_view(const at::Tensor& t) {
  View v;
  v.data = t.data_ptr();
  for (int64_t d = 0; d < t.dim(); ++d) v.stride[d] = t.stride(d);
  return v;
}

// Every given tensor has the strides of the first (on dimensions of size > 1), and the first is
// dense with the batch dimension outermost (contiguous, channels_last, ...): the kernels may then
// index all of them by one flat per-sample offset.
bool dense_layout(std::initializer_list<const at::Tensor*> tensors, int64_t N) {
  const at::Tensor* ref = nullptr;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr) continue;
    if (ref == nullptr) {
      ref = t;
      if (!t->is_non_overlapping_and_dense()) return false;
      if (t->size(0) > 1 && t->stride(0) != N) return false;
      continue;
    }
    for (int64_t d = 0; d < ref->dim(); ++d) {
      if (ref->size(d) != 1 && t->stride(d) != ref->stride(d)) return false;
    }
  }
  return ref != nullptr;
}

bool coef_dtype(at::ScalarType st, DType* out) {
  switch (st) {
    case at::kFloat: *out = DType::kFloat32; return true;
    case at::kDouble: *out = DType::kFloat64; return true;
    case at::kHalf: *out = DType::kFloat16; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    default: return false;
  }
}

// The CoefView of `t`, 1-D or 2-D ((N, C)), with its strides. Dtypes the kernels do not read are
// converted to float32 into `keep` (which must outlive the launch).
CoefView coef_view(at::Tensor t, at::Tensor& keep) {
  CoefView v;
  if (!coef_dtype(t.scalar_type(), &v.dtype)) {
    keep = t = t.to(at::kFloat);
    v.dtype = DType::kFloat32;
  }
  v.data = t.data_ptr();
  v.stride = t.stride(t.dim() - 1);
  v.row_stride = t.dim() == 2 ? t.stride(0) : 0;
  return v;
}

// A coefficient vector (B,), any floating dtype, any stride (see coef_view).
CoefView make_coef(const at::Tensor& c, const at::Tensor& ref, int64_t B, const char* op, const char* name,
                   at::Tensor& keep) {
  TORCH_CHECK(c.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(c.device() == ref.device(), op, ": ", name, " is on ", c.device(), " but the data is on ",
              ref.device());
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B, op, ": ", name, " must have shape (B,) = (", B, ",), got ",
              c.sizes());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), op, ": ", name, " must be floating point, got ",
              c.scalar_type());
  return coef_view(c, keep);
}

// A coefficient gradient of shape `sizes` in the dtype of `c`. Written directly when the kernels
// can store that dtype, else through a float32 buffer converted afterwards (see finish_coef_out).
CoefOut make_coef_out(const at::Tensor& c, at::IntArrayRef sizes, at::Tensor& out, at::Tensor& buffer) {
  CoefOut o;
  DType dt;
  if (coef_dtype(c.scalar_type(), &dt)) {
    out = at::empty(sizes, c.options());
    o.data = out.data_ptr();
    o.dtype = dt;
  } else {
    buffer = at::empty(sizes, c.options().dtype(at::kFloat));
    o.data = buffer.data_ptr();
    o.dtype = DType::kFloat32;
  }
  return o;
}

void finish_coef_out(const at::Tensor& c, at::Tensor& out, const at::Tensor& buffer) {
  if (buffer.defined()) out = buffer.to(c.scalar_type());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------------
// noise_inject(x0, eps, c_signal, c_noise, delta?, mode) -> (x_t, target)

std::tuple<at::Tensor, at::Tensor> noise_inject_cuda(const at::Tensor& x0, const at::Tensor& eps,
                                                     const at::Tensor& c_signal, const at::Tensor& c_noise,
                                                     const std::optional<at::Tensor>& delta, int64_t mode) {
  constexpr const char* op = "adv_dpm_C::noise_inject (CUDA)";
  check_mode(mode, op);
  TORCH_CHECK(x0.defined() && x0.is_cuda(), op, ": x0 must be a CUDA tensor");
  const DType dtype = big_dtype(x0, op, "x0");
  const Shape shape = make_shape(x0, op, "x0");
  check_big(eps, x0, op, "eps", "x0");
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) check_big(*delta, x0, op, "delta", "x0");

  const c10::cuda::CUDAGuard device_guard(x0.device());
  at::Tensor x_t = at::empty_like(x0);
  at::Tensor target = at::empty_like(x0);

  adv_dpm_cuda::NoiseInjectParams p;
  p.dtype = dtype;
  p.shape = shape;
  p.has_delta = has_delta;
  p.mode = static_cast<int32_t>(mode);
  p.nblk = adv_dpm_cuda::blocks_per_sample(shape.B, shape.N, dtype);
  p.dense = dense_layout({&x0, &eps, has_delta ? &*delta : nullptr, &x_t, &target}, shape.N);
  p.x0 = make_view(x0);
  p.eps = make_view(eps);
  if (has_delta) p.delta = make_view(*delta);
  p.x_t = make_view(x_t);
  p.target = make_view(target);
  at::Tensor keep_cs, keep_cn;
  p.c_signal = make_coef(c_signal, x0, shape.B, op, "c_signal", keep_cs);
  p.c_noise = make_coef(c_noise, x0, shape.B, op, "c_noise", keep_cn);

  C10_CUDA_CHECK(adv_dpm_cuda::launch_noise_inject(p, current_stream()));
  return std::make_tuple(x_t, target);
}

// ---------------------------------------------------------------------------------------------
// noise_inject_backward(grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta?, mode, coef_grads)
//   -> (grad_x0, grad_eps, grad_delta, grad_c_signal, grad_c_noise)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> noise_inject_backward_cuda(
    const at::Tensor& grad_x_t, const at::Tensor& grad_target, const at::Tensor& x0, const at::Tensor& eps,
    const at::Tensor& c_signal, const at::Tensor& c_noise, const std::optional<at::Tensor>& delta, int64_t mode,
    bool coef_grads) {
  constexpr const char* op = "adv_dpm_C::noise_inject_backward (CUDA)";
  check_mode(mode, op);
  TORCH_CHECK(grad_x_t.defined() && grad_x_t.is_cuda(), op, ": grad_x_t must be a CUDA tensor");
  const DType dtype = big_dtype(grad_x_t, op, "grad_x_t");
  const Shape shape = make_shape(grad_x_t, op, "grad_x_t");
  check_big(grad_target, grad_x_t, op, "grad_target", "grad_x_t");
  const bool has_delta = delta.has_value() && delta->defined();
  // x0, eps (and delta's data) are only read for the coefficient gradients.
  const bool reads_delta = coef_grads && has_delta && mode >= 1;
  if (coef_grads) {
    check_big(x0, grad_x_t, op, "x0", "grad_x_t");
    check_big(eps, grad_x_t, op, "eps", "grad_x_t");
  }
  if (reads_delta) check_big(*delta, grad_x_t, op, "delta", "grad_x_t");

  const c10::cuda::CUDAGuard device_guard(grad_x_t.device());
  at::Tensor grad_x0 = at::empty_like(grad_x_t);
  at::Tensor grad_eps = at::empty_like(grad_x_t);
  at::Tensor grad_delta = has_delta ? at::empty_like(grad_x_t) : at::empty({0}, grad_x_t.options());

  adv_dpm_cuda::NoiseInjectBackwardParams p;
  p.dtype = dtype;
  p.shape = shape;
  p.has_delta = has_delta;
  p.coef_grads = coef_grads;
  p.mode = static_cast<int32_t>(mode);
  p.nblk = adv_dpm_cuda::blocks_per_sample(shape.B, shape.N, dtype);
  p.dense = dense_layout({&grad_x_t, &grad_target, coef_grads ? &x0 : nullptr, coef_grads ? &eps : nullptr,
                          reads_delta ? &*delta : nullptr, &grad_x0, &grad_eps, has_delta ? &grad_delta : nullptr},
                         shape.N);
  p.grad_x_t = make_view(grad_x_t);
  p.grad_target = make_view(grad_target);
  if (coef_grads) {
    p.x0 = make_view(x0);
    p.eps = make_view(eps);
  }
  if (reads_delta) p.delta = make_view(*delta);
  p.grad_x0 = make_view(grad_x0);
  p.grad_eps = make_view(grad_eps);
  if (has_delta) p.grad_delta = make_view(grad_delta);
  at::Tensor keep_cs, keep_cn;
  p.c_signal = make_coef(c_signal, grad_x_t, shape.B, op, "c_signal", keep_cs);
  p.c_noise = make_coef(c_noise, grad_x_t, shape.B, op, "c_noise", keep_cn);

  at::Tensor grad_c_signal, grad_c_noise, buf_cs, buf_cn, partials;
  if (coef_grads) {
    p.grad_c_signal = make_coef_out(c_signal, {shape.B}, grad_c_signal, buf_cs);
    p.grad_c_noise = make_coef_out(c_noise, {shape.B}, grad_c_noise, buf_cn);
    partials = at::empty({adv_dpm_cuda::partials_floats(shape.B, p.nblk)}, grad_x_t.options().dtype(at::kFloat));
    p.partials = partials.data_ptr<float>();
  } else {
    grad_c_signal = at::empty({0}, c_signal.options());
    grad_c_noise = at::empty({0}, c_noise.options());
  }

  C10_CUDA_CHECK(adv_dpm_cuda::launch_noise_inject_backward(p, current_stream()));
  if (coef_grads) {
    finish_coef_out(c_signal, grad_c_signal, buf_cs);
    finish_coef_out(c_noise, grad_c_noise, buf_cn);
  }
  return std::make_tuple(grad_x0, grad_eps, grad_delta, grad_c_signal, grad_c_noise);
}

// ---------------------------------------------------------------------------------------------
// adv_step(delta, grad, grad_target?, x_t?, eps?, c_noise?, lr, radius, grad_scale?, mode)
//   -> (new_delta, x_adv, target, grad_norm, delta_norm, skipped)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adv_step_cuda(
    const at::Tensor& delta, const at::Tensor& grad, const std::optional<at::Tensor>& grad_target,
    const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& c_noise, double lr, double radius, const std::optional<at::Tensor>& grad_scale,
    int64_t mode) {
  constexpr const char* op = "adv_dpm_C::adv_step (CUDA)";
  check_mode(mode, op);
  TORCH_CHECK(delta.defined() && delta.is_cuda(), op, ": delta must be a CUDA tensor");
  const DType dtype = big_dtype(delta, op, "delta");
  const Shape shape = make_shape(delta, op, "delta");
  check_big(grad, delta, op, "grad", "delta");
  const bool has_gt = grad_target.has_value() && grad_target->defined();
  const bool has_xt = x_t.has_value() && x_t->defined();
  const bool has_eps = eps.has_value() && eps->defined();
  const bool has_cn = c_noise.has_value() && c_noise->defined();
  if (has_gt) check_big(*grad_target, delta, op, "grad_target", "delta");
  if (has_xt) {
    check_big(*x_t, delta, op, "x_t", "delta");
    TORCH_CHECK(has_eps, op, ": eps must be given with x_t");
    check_big(*eps, delta, op, "eps", "delta");
  }
  const bool needs_cn = has_gt || (has_xt && mode >= 1);
  TORCH_CHECK(!needs_cn || has_cn, op, ": c_noise must be given with grad_target, and with x_t when mode >= 1");
  const bool has_gs = grad_scale.has_value() && grad_scale->defined();
  if (has_gs) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat &&
                    grad_scale->device() == delta.device(),
                op, ": grad_scale must be a float32 tensor of one element on ", delta.device(), ", got ",
                grad_scale->scalar_type(), " of shape ", grad_scale->sizes(), " on ", grad_scale->device());
  }
  TORCH_CHECK(lr >= 0, op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(radius >= 0, op, ": radius must be >= 0, got ", radius);

  const c10::cuda::CUDAGuard device_guard(delta.device());
  at::Tensor new_delta = at::empty_like(delta);
  at::Tensor x_adv = has_xt ? at::empty_like(*x_t) : at::empty({0}, delta.options());
  at::Tensor target = has_xt ? at::empty_like(*x_t) : at::empty({0}, delta.options());
  const at::TensorOptions f32 = delta.options().dtype(at::kFloat);
  at::Tensor grad_norm = at::empty({shape.B}, f32);
  at::Tensor delta_norm = at::empty({shape.B}, f32);
  at::Tensor skipped = at::empty({shape.B}, delta.options().dtype(at::kBool));

  adv_dpm_cuda::AdvStepParams p;
  p.dtype = dtype;
  p.shape = shape;
  p.has_grad_target = has_gt;
  p.has_x_t = has_xt;
  p.mode = static_cast<int32_t>(mode);
  p.nblk = adv_dpm_cuda::blocks_per_sample(shape.B, shape.N, dtype);
  p.lr = static_cast<float>(lr);
  p.radius = static_cast<float>(radius);
  if (has_gs) p.grad_scale = grad_scale->data_ptr<float>();
  p.dense = dense_layout({&delta, &grad, has_gt ? &*grad_target : nullptr, has_xt ? &*x_t : nullptr,
                          has_xt ? &*eps : nullptr, &new_delta, has_xt ? &x_adv : nullptr, has_xt ? &target : nullptr},
                         shape.N);
  p.delta = make_view(delta);
  p.grad = make_view(grad);
  if (has_gt) p.grad_target = make_view(*grad_target);
  if (has_xt) {
    p.x_t = make_view(*x_t);
    p.eps = make_view(*eps);
    p.x_adv = make_view(x_adv);
    p.target = make_view(target);
  }
  p.new_delta = make_view(new_delta);
  at::Tensor keep_cn;
  if (needs_cn) p.c_noise = make_coef(*c_noise, delta, shape.B, op, "c_noise", keep_cn);
  p.grad_norm = grad_norm.data_ptr<float>();
  p.delta_norm = delta_norm.data_ptr<float>();
  p.skipped = skipped.data_ptr<bool>();
  const adv_dpm_cuda::AdvStepPlan plan = adv_dpm_cuda::adv_step_plan(p);
  at::Tensor partials;
  if (plan.kind == adv_dpm_cuda::AdvStepPlan::kTwoKernels) {
    partials = at::empty({adv_dpm_cuda::partials_floats(shape.B, p.nblk)}, f32);
    p.partials = partials.data_ptr<float>();
  }

  C10_CUDA_CHECK(adv_dpm_cuda::launch_adv_step(p, plan, current_stream()));
  return std::make_tuple(new_delta, x_adv, target, grad_norm, delta_norm, skipped);
}

}  // namespace

// =============================================================================================
// group_norm_act, group_norm_act_backward (csrc/cuda/group_norm_act.cu, docs/OPS.md). Section
// appended for that op; it uses the helpers above (big_dtype, check_big, current_stream).
namespace {

using adv_dpm_cuda::GNTensor;

// prod(x.shape[2:]), 1 without spatial dims.
int64_t gn_spatial(const at::Tensor& t) {
  int64_t hw = 1;
  for (int64_t d = 2; d < t.dim(); ++d) hw *= t.size(d);
  return hw;
}

// The spatial dims collapse into one strided dim (dims of size 1 ignored): contiguous and
// channels_last do; e.g. x.transpose(2, 3) does not.
bool gn_collapsible(const at::Tensor& t) {
  int64_t expect = -1;  // stride the next outer spatial dim must have
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (expect >= 0 && t.stride(d) != expect) return false;
    expect = t.stride(d) * t.size(d);
  }
  return true;
}

// (N, C, HW) view of a collapsible tensor: sHW is the stride of the innermost spatial dim of
// size > 1 (0 when there is none: HW == 1).
GNTensor gn_view(const at::Tensor& t) {
  GNTensor v;
  v.data = t.data_ptr();
  v.sN = t.stride(0);
  v.sC = t.stride(1);
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1) {
      v.sHW = t.stride(d);
      break;
    }
  }
  return v;
}

// An optional small input (weight, bias: (C,); scale, shift: (N, C)), any floating dtype and strides,
// read by the kernels in its own dtype and strides where they can (no copy kernel per call, as
// ADM's scale and shift, halves of one projection, would need); `keep` holds a float32 copy where
// one is needed and must outlive the launch. data == nullptr: not given.
CoefView gn_small(const std::optional<at::Tensor>& t, const at::Tensor& x, const std::vector<int64_t>& shape,
                  const char* op, const char* name, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return CoefView();
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t->sizes());
  return coef_view(*t, keep);
}

// The four small inputs of a call (weight, bias: (C,); scale, shift: (N, C)) into p's views (see
// gn_small); keep[i] must outlive the launch.
template <typename Params>
void gn_set_small(Params& p, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& x,
                  const char* op, at::Tensor (&keep)[4]) {
  const int64_t N = x.size(0), C = x.size(1);
  p.weight = gn_small(weight, x, {C}, op, "weight", keep[0]);
  p.bias = gn_small(bias, x, {C}, op, "bias", keep[1]);
  p.scale = gn_small(scale, x, {N, C}, op, "scale", keep[2]);
  p.shift = gn_small(shift, x, {N, C}, op, "shift", keep[3]);
}

void gn_check_args(const at::Tensor& x, int64_t num_groups, int64_t act, const char* op) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op, ": x must have shape (N, C, *spatial) with 0 to 2 spatial dims, got ",
              x.sizes());
  TORCH_CHECK(num_groups >= 1 && x.size(1) % num_groups == 0, op, ": num_groups must be >= 1 and divide C = ",
              x.size(1), ", got ", num_groups);
  TORCH_CHECK(act == 0 || act == 1, op, ": act must be 0 (identity) or 1 (SiLU), got ", act);
}

// group_norm_act(x, weight?, bias?, scale?, shift?, num_groups, eps, act) -> (y, mean, rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    int64_t act) {
  constexpr const char* op = "adv_dpm_C::group_norm_act (CUDA)";
  TORCH_CHECK(x.defined() && x.is_cuda(), op, ": x must be a CUDA tensor");
  const DType dtype = big_dtype(x, op, "x");
  gn_check_args(x, num_groups, act, op);
  const int64_t N = x.size(0), C = x.size(1), HW = gn_spatial(x);

  const c10::cuda::CUDAGuard device_guard(x.device());
  // Spatial dims that do not collapse into one (rare): work on contiguous copies.
  const at::Tensor xw = gn_collapsible(x) ? x : x.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor yw = gn_collapsible(y) ? y : at::empty_like(xw);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, num_groups}, f32);
  at::Tensor rstd = at::empty({N, num_groups}, f32);

  adv_dpm_cuda::GroupNormActParams p;
  p.dtype = dtype;
  p.N = N;
  p.C = C;
  p.HW = HW;
  p.G = num_groups;
  p.eps = static_cast<float>(eps);
  p.act = static_cast<int32_t>(act);
  p.x = gn_view(xw);
  p.y = gn_view(yw);
  at::Tensor keep[4];
  gn_set_small(p, weight, bias, scale, shift, x, op, keep);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  const int64_t ws_floats = adv_dpm_cuda::group_norm_act_workspace_floats(p);
  at::Tensor workspace;
  if (ws_floats > 0) {
    workspace = at::empty({ws_floats}, f32);
    p.workspace = workspace.data_ptr<float>();
  }

  C10_CUDA_CHECK(adv_dpm_cuda::launch_group_norm_act(p, current_stream()));
  if (!yw.is_same(y)) y.copy_(yw);
  return std::make_tuple(y, mean, rstd);
}

// group_norm_act_backward(grad_y, x, mean, rstd, weight?, bias?, scale?, shift?, num_groups, act)
//   -> (grad_x, grad_weight, grad_bias, grad_scale, grad_shift)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, int64_t act) {
  constexpr const char* op = "adv_dpm_C::group_norm_act_backward (CUDA)";
  TORCH_CHECK(x.defined() && x.is_cuda(), op, ": x must be a CUDA tensor");
  const DType dtype = big_dtype(x, op, "x");
  gn_check_args(x, num_groups, act, op);
  check_big(grad_y, x, op, "grad_y", "x");
  const int64_t N = x.size(0), C = x.size(1), HW = gn_spatial(x);
  for (const at::Tensor* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    TORCH_CHECK(s->defined() && s->device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
                ")");
    TORCH_CHECK(at::isFloatingType(s->scalar_type()), op, ": ", name, " must be floating point, got ",
                s->scalar_type());
    TORCH_CHECK(s->dim() == 2 && s->size(0) == N && s->size(1) == num_groups, op, ": ", name,
                " must have shape (N, num_groups) = (", N, ", ", num_groups, "), got ", s->sizes());
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xw = gn_collapsible(x) ? x : x.contiguous();
  const at::Tensor gyw = gn_collapsible(grad_y) ? grad_y : grad_y.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gxw = gn_collapsible(grad_x) ? grad_x : at::empty_like(xw);
  const at::Tensor mean32 = mean.to(at::kFloat).contiguous();
  const at::Tensor rstd32 = rstd.to(at::kFloat).contiguous();
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);

  adv_dpm_cuda::GroupNormActBackwardParams p;
  p.dtype = dtype;
  p.N = N;
  p.C = C;
  p.HW = HW;
  p.G = num_groups;
  p.act = static_cast<int32_t>(act);
  p.grad_y = gn_view(gyw);
  p.x = gn_view(xw);
  p.grad_x = gn_view(gxw);
  p.mean = mean32.data_ptr<float>();
  p.rstd = rstd32.data_ptr<float>();
  at::Tensor keep[4];
  gn_set_small(p, weight, bias, scale, shift, x, op, keep);
  // Parameter gradients in each parameter's dtype (an empty tensor where it was not given).
  at::Tensor grads[4], buffers[4];
  const std::optional<at::Tensor>* params[4] = {&weight, &bias, &scale, &shift};
  bool given[4];
  CoefOut* outs[4] = {&p.grad_weight, &p.grad_bias, &p.grad_scale, &p.grad_shift};
  for (int i = 0; i < 4; ++i) {
    given[i] = params[i]->has_value() && (*params[i])->defined();
    if (given[i]) *outs[i] = make_coef_out(**params[i], (*params[i])->sizes(), grads[i], buffers[i]);
  }
  const int64_t ws_floats = adv_dpm_cuda::group_norm_act_backward_workspace_floats(p);
  at::Tensor workspace;
  if (ws_floats > 0) {
    workspace = at::empty({ws_floats}, f32);
    p.workspace = workspace.data_ptr<float>();
  }

  C10_CUDA_CHECK(adv_dpm_cuda::launch_group_norm_act_backward(p, current_stream()));
  if (!gxw.is_same(grad_x)) grad_x.copy_(gxw);
  for (int i = 0; i < 4; ++i) {
    if (given[i]) {
      finish_coef_out(**params[i], grads[i], buffers[i]);
    } else {
      grads[i] = at::empty({0}, x.options());
    }
  }
  return std::make_tuple(grad_x, grads[0], grads[1], grads[2], grads[3]);
}

}  // namespace

TORCH_LIBRARY_IMPL(adv_dpm_C, CUDA, m) {
  m.impl("noise_inject", TORCH_FN(noise_inject_cuda));
  m.impl("noise_inject_backward", TORCH_FN(noise_inject_backward_cuda));
  m.impl("adv_step", TORCH_FN(adv_step_cuda));
  m.impl("group_norm_act", TORCH_FN(group_norm_act_cuda));
  m.impl("group_norm_act_backward", TORCH_FN(group_norm_act_backward_cuda));
}
