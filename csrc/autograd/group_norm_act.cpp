// The autograd of adv_dpm_C::group_norm_act, in C++ (for its CPU and CUDA kernels alike): an eager
// call records a C++ node whose backward runs the backward kernel without entering Python. The
// Python autograd layer (adv_dpm/ops/group_norm_act.py) costs more host time per call than the
// kernels take on a GPU at the CIFAR-10 batch, and ADM's UNet calls this op 88 times per forward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor given(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

std::tuple<Tensor, Tensor, Tensor> kernel_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& scale, const OptTensor& shift, int64_t num_groups,
                                                  double eps, int64_t act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adv_dpm_C::group_norm_act", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                       const OptTensor&, const OptTensor&,
                                                                       const OptTensor&, int64_t, double, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, scale, shift, num_groups, eps, act);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> kernel_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, int64_t num_groups, int64_t act) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("adv_dpm_C::group_norm_act_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, int64_t, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_y, x, mean, rstd, weight, bias, scale, shift, num_groups, act);
}

// The gradients as a differentiable graph, for a backward under create_graph=True (the backward
// kernels are first order): the public op adv_dpm::group_norm_act recomputed and differentiated,
// whose own autograd then recomputes on the reference (adv_dpm/ops/group_norm_act.py). Each input
// gets an alias, so that a tensor passed twice gets its own share of the gradient at each place.
variable_list recomputed_grads(const variable_list& inputs, const Tensor& grad_y, int64_t num_groups, double eps,
                               int64_t act) {
  // Called boxed: the schema that torch.library infers from the Python signature (SymInt, str?)
  // differs between torch versions, a boxed call takes any of them.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("adv_dpm::group_norm_act", "");
  variable_list aliases, wrt;
  for (const Tensor& t : inputs) {
    aliases.push_back(t.defined() && t.requires_grad() ? t.view_as(t) : t);
    if (aliases.back().defined() && aliases.back().requires_grad()) wrt.push_back(aliases.back());
  }
  const auto optional = [](const Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); };
  torch::jit::Stack stack = {aliases[0], optional(aliases[1]), optional(aliases[2]), num_groups, eps,
                             optional(aliases[3]), optional(aliases[4]),
                             act ? c10::IValue(std::string("silu")) : c10::IValue()};
  op.callBoxed(&stack);
  const Tensor y = stack[0].toTensor();
  variable_list found = wrt.empty() || !y.requires_grad()
      ? variable_list(wrt.size())
      : torch::autograd::grad({y}, wrt, {grad_y}, /*retain_graph=*/true, /*create_graph=*/true,
                              /*allow_unused=*/true);
  variable_list grads;
  size_t next = 0;
  for (const Tensor& a : aliases) grads.push_back(a.defined() && a.requires_grad() ? found[next++] : Tensor());
  return grads;
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
      const variable_list g = recomputed_grads(inputs, grad_y, num_groups, ctx->saved_data["eps"].toDouble(), act);
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

std::tuple<Tensor, Tensor, Tensor> group_norm_act_autograd(const Tensor& x, const OptTensor& weight,
                                                           const OptTensor& bias, const OptTensor& scale,
                                                           const OptTensor& shift, int64_t num_groups, double eps,
                                                           int64_t act) {
  const variable_list out = GroupNormAct::apply(x, weight, bias, scale, shift, num_groups, eps, act);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(adv_dpm_C, Autograd, m) {
  m.impl("group_norm_act", &group_norm_act_autograd);
}
