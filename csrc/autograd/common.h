// What the C++ autograd of the ops (csrc/autograd/<op>.cpp) shares: the compiled kernels called
// below autograd, the no-gradient shortcut, and the recomputed (differentiable) gradients of a
// backward under create_graph=True.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace adv_dpm::autograd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::variable_list;

inline OptTensor given(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

inline bool requires_grad(const Tensor& t) {
  return t.defined() && t.requires_grad();
}
inline bool requires_grad(const OptTensor& t) {
  return t && requires_grad(*t);
}

// Whether a call on these arguments records a gradient. Otherwise the op's autograd kernel calls
// the kernel directly: a torch::autograd::Function builds its node even when it records nothing.
template <typename... Ts>
bool records_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

// The compiled kernel adv_dpm_C::<name> of signature Signature (its CPU or CUDA implementation,
// chosen by the dispatcher from the tensors), called below autograd.
template <typename Signature>
class Kernel;

template <typename Result, typename... Args>
class Kernel<Result(Args...)> {
 public:
  explicit Kernel(const char* name)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Result(Args...)>()) {}

  template <typename... Given>
  Result operator()(Given&&... args) const {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op_.call(std::forward<Given>(args)...);
  }

 private:
  c10::TypedOperatorHandle<Result(Args...)> op_;
};

inline c10::IValue optional_arg(const Tensor& t) {
  return t.defined() ? c10::IValue(t) : c10::IValue();
}

// The gradients, as a differentiable graph, for a backward under create_graph=True (the backward
// kernels are first order): the public op `name` (adv_dpm::<op>, whose Python autograd recomputes
// on the reference, adv_dpm/ops/backend.py) called again and differentiated. `arguments` makes its
// boxed argument stack from the tensor inputs; grad_outputs are the upstream gradients of its first
// outputs (undefined: unused). One gradient per input (undefined where it needs none). Each input
// gets an alias, so that a tensor passed twice gets its own share of the gradient at each place.
// Called boxed: the schema that torch.library infers from the Python signature (SymInt, str?)
// differs between torch versions, a boxed call takes any of them.
inline variable_list recomputed_grads(const char* name, const variable_list& inputs,
                                      const std::function<torch::jit::Stack(const variable_list&)>& arguments,
                                      const variable_list& grad_outputs) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  variable_list aliases, wrt;
  for (const Tensor& t : inputs) {
    aliases.push_back(requires_grad(t) ? t.view_as(t) : t);
    if (requires_grad(aliases.back())) wrt.push_back(aliases.back());
  }
  torch::jit::Stack stack = arguments(aliases);
  op.callBoxed(&stack);
  variable_list outputs, grads;
  for (size_t i = 0; i < grad_outputs.size(); ++i) {
    const Tensor out = stack[i].toTensor();
    if (grad_outputs[i].defined() && out.requires_grad()) {
      outputs.push_back(out);
      grads.push_back(grad_outputs[i]);
    }
  }
  const variable_list found = wrt.empty() || outputs.empty()
      ? variable_list(wrt.size())
      : torch::autograd::grad(outputs, wrt, grads, /*retain_graph=*/true, /*create_graph=*/true,
                              /*allow_unused=*/true);
  variable_list result;
  size_t next = 0;
  for (const Tensor& a : aliases) result.push_back(requires_grad(a) ? found[next++] : Tensor());
  return result;
}

}  // namespace adv_dpm::autograd
