// The autograd of adv_dpm_C::group_norm_act, in C++ (for its CPU and CUDA kernels alike): an eager
// call records a C++ node whose backward runs the backward kernel without entering Python. The
// Python autograd layer (adv_dpm/ops/group_norm_act.py) costs more host time per call than the
// kernels take on a GPU at the CIFAR-10 batch, and ADM's UNet calls this op 88 times per forward.
#include <torch/library.h>

#include "common.h"

namespace adv_dpm::autograd {
namespace {

using torch::autograd::AutogradContext;

std::tuple<Tensor, Tensor, Tensor> kernel_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& scale, const OptTensor& shift, int64_t num_groups,
                                                  double eps, int64_t act) {
  static const Kernel<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                         const OptTensor&, const OptTensor&, int64_t, double,
                                                         int64_t)>
      kernel("adv_dpm_C::group_norm_act");
  return kernel(x, weight, bias, scale, shift, num_groups, eps, act);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> kernel_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, int64_t num_groups, int64_t act) {
  static const Kernel<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, int64_t, int64_t)>
      kernel("adv_dpm_C::group_norm_act_backward");
  return kernel(grad_y, x, mean, rstd, weight, bias, scale, shift, num_groups, act);
}

struct GroupNormAct : torch::autograd::Function<GroupNormAct> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& scale, const OptTensor& shift, int64_t num_groups, double eps,
                               int64_t act) {
    auto [y, mean, rstd] = kernel_forward(x, weight, bias, scale, shift, num_groups, eps, act);
    ctx->save_for_backward({x, mean, rstd, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            scale.value_or(Tensor()), shift.value_or(Tensor())});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({mean, rstd});
    // Only y has a gradient: autograd would otherwise fill two (N, G) tensors of zeros for the
    // statistics at every backward.
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  // One gradient per argument of forward: x, weight, bias, scale, shift, then none for
  // num_groups, eps, act.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_y = grad_outputs[0];
    variable_list grads(8);
    if (!grad_y.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2];
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt(), act = ctx->saved_data["act"].toInt();
    const variable_list inputs = {x, saved[3], saved[4], saved[5], saved[6]};
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      const auto arguments = [&](const variable_list& a) {
        return torch::jit::Stack{a[0], optional_arg(a[1]), optional_arg(a[2]), num_groups, eps, optional_arg(a[3]),
                                 optional_arg(a[4]), act ? c10::IValue(std::string("silu")) : c10::IValue()};
      };
      const variable_list g = recomputed_grads("adv_dpm::group_norm_act", inputs, arguments, {grad_y});
      std::copy(g.begin(), g.end(), grads.begin());
      return grads;
    }
    auto [gx, gw, gb, gscale, gshift] = kernel_backward(grad_y, x, mean, rstd, given(inputs[1]), given(inputs[2]),
                                                        given(inputs[3]), given(inputs[4]), num_groups, act);
    const Tensor computed[5] = {gx, gw, gb, gscale, gshift};
    for (int i = 0; i < 5; ++i) grads[i] = inputs[i].defined() ? computed[i] : Tensor();
    return grads;
  }
};

std::tuple<Tensor, Tensor, Tensor> group_norm_act(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& scale, const OptTensor& shift, int64_t num_groups,
                                                  double eps, int64_t act) {
  if (!records_grad(x, weight, bias, scale, shift)) {
    return kernel_forward(x, weight, bias, scale, shift, num_groups, eps, act);
  }
  const variable_list out = GroupNormAct::apply(x, weight, bias, scale, shift, num_groups, eps, act);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace adv_dpm::autograd

TORCH_LIBRARY_IMPL(adv_dpm_C, Autograd, m) {
  m.impl("group_norm_act", &adv_dpm::autograd::group_norm_act);
}
