// The autograd of adv_dpm_C::noise_inject, in C++ (for its CPU and CUDA kernels alike): an eager
// call records a C++ node whose backward runs the backward kernel without entering Python (the
// formula of adv_dpm/ops/noise_inject.py's _backward).
#include <torch/library.h>

#include "common.h"

namespace adv_dpm::autograd {
namespace {

using torch::autograd::AutogradContext;

constexpr int64_t kDeltaTarget = 2;  // mode of target 'delta' (docs/OPS.md)
const char* const kTargets[] = {"original", "delta_detach", "delta"};

std::tuple<Tensor, Tensor> kernel_forward(const Tensor& x0, const Tensor& eps, const Tensor& c_signal,
                                          const Tensor& c_noise, const OptTensor& delta, int64_t mode) {
  static const Kernel<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, int64_t)>
      kernel("adv_dpm_C::noise_inject");
  return kernel(x0, eps, c_signal, c_noise, delta, mode);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> kernel_backward(const Tensor& grad_x_t, const Tensor& grad_target,
                                                                   const Tensor& x0, const Tensor& eps,
                                                                   const Tensor& c_signal, const Tensor& c_noise,
                                                                   const OptTensor& delta, int64_t mode,
                                                                   bool coef_grads) {
  static const Kernel<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      int64_t, bool)>
      kernel("adv_dpm_C::noise_inject_backward");
  return kernel(grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta, mode, coef_grads);
}

struct NoiseInject : torch::autograd::Function<NoiseInject> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x0, const Tensor& eps, const Tensor& c_signal,
                               const Tensor& c_noise, const OptTensor& delta, int64_t mode) {
    auto [x_t, target] = kernel_forward(x0, eps, c_signal, c_noise, delta, mode);
    ctx->save_for_backward({x0, eps, c_signal, c_noise, delta.value_or(Tensor())});
    ctx->saved_data["mode"] = mode;
    return {x_t, target};
  }

  // One gradient per argument of forward: x0, eps, c_signal, c_noise, delta, then none for mode.
  // An output that took no gradient gets zeros (autograd materializes them).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x0 = saved[0], &eps = saved[1], &c_signal = saved[2], &c_noise = saved[3], &delta = saved[4];
    const int64_t mode = ctx->saved_data["mode"].toInt();
    variable_list grads(6);
    if (at::GradMode::is_enabled()) {
      const auto arguments = [&](const variable_list& a) {
        return torch::jit::Stack{a[0], a[1], a[2], a[3], optional_arg(a[4]), std::string(kTargets[mode])};
      };
      const variable_list g = recomputed_grads("adv_dpm::noise_inject", saved, arguments, grad_outputs);
      std::copy(g.begin(), g.end(), grads.begin());
      return grads;
    }
    const bool coef_grads = ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
    // Unless the target depends on delta ('delta') or the coefficient gradients read it,
    // grad_delta is grad_x_t itself: the kernel then gets no delta and writes no copy.
    const bool kernel_delta = delta.defined() && (mode == kDeltaTarget || coef_grads);
    auto [gx0, geps, gdelta, gcs, gcn] = kernel_backward(grad_outputs[0], grad_outputs[1], x0, eps, c_signal, c_noise,
                                                         kernel_delta ? given(delta) : std::nullopt, mode, coef_grads);
    grads[0] = gx0;
    grads[1] = geps;
    if (coef_grads) {
      grads[2] = gcs;
      grads[3] = gcn;
    }
    if (delta.defined()) grads[4] = kernel_delta ? gdelta : grad_outputs[0];
    return grads;
  }
};

std::tuple<Tensor, Tensor> noise_inject(const Tensor& x0, const Tensor& eps, const Tensor& c_signal,
                                        const Tensor& c_noise, const OptTensor& delta, int64_t mode) {
  if (!records_grad(x0, eps, c_signal, c_noise, delta)) return kernel_forward(x0, eps, c_signal, c_noise, delta, mode);
  const variable_list out = NoiseInject::apply(x0, eps, c_signal, c_noise, delta, mode);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace adv_dpm::autograd

TORCH_LIBRARY_IMPL(adv_dpm_C, Autograd, m) {
  m.impl("noise_inject", &adv_dpm::autograd::noise_inject);
}
