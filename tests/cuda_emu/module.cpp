// csrc/cuda/bindings.cpp built against the CPU emulation of CUDA (emu.h): its functions, exposed
// to Python, take CPU tensors and run the kernels of csrc/cuda/*.cu (rewritten by build.py) on the
// CPU. Nothing is registered with the dispatcher. Also exposed: helpers of common.cuh, to be
// checked on their own (tests/test_cuda_emulated.py), the emulated device's properties and the
// plans that the launchers choose from them.
#include <torch/extension.h>
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void emulated_registrations(torch::Library& m)
// The bindings accept CUDA tensors only; the emulation runs on CPU tensors.
#define is_cuda is_cpu

#include "bindings.cpp"
#include "common.cuh"

// FastDiv(d).div(n) for every element of n (int64, 1-D, values in [0, 2^31)).
torch::Tensor fast_div(const torch::Tensor& n, int64_t d) {
  const adv_dpm_cuda::detail::FastDiv f(static_cast<uint32_t>(d));
  torch::Tensor out = torch::empty_like(n);
  const auto in = n.accessor<int64_t, 1>();
  auto res = out.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n.size(0); ++i) res[i] = f.div(static_cast<uint32_t>(in[i]));
  return out;
}

// Sets the emulated device's SM count and whether it launches thread block clusters; returns
// the previous ones.
std::tuple<int64_t, bool> set_device(int64_t sm_count, bool cluster_launch) {
  ::emu::Device& d = ::emu::state().device;
  const std::tuple<int64_t, bool> previous{d.sm_count, d.cluster_launch != 0};
  d = ::emu::Device{static_cast<int>(sm_count), cluster_launch ? 1 : 0};
  return previous;
}

// adv_step's plan on the emulated device for a batch of B samples of N elements:
// (kind: 0 resident, 1 one block per sample, 2 two kernels; blocks per sample of the resident kernel).
std::tuple<int64_t, int64_t> adv_step_plan(int64_t B, int64_t N) {
  adv_dpm_cuda::AdvStepParams p;
  p.shape.B = B;
  p.shape.s1 = p.shape.N = N;
  const adv_dpm_cuda::AdvStepPlan plan = adv_dpm_cuda::adv_step_plan(p);
  return {plan.kind, plan.cluster};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("noise_inject", &noise_inject_cuda);
  m.def("noise_inject_backward", &noise_inject_backward_cuda);
  m.def("adv_step", &adv_step_cuda);
  m.def("group_norm_act", &group_norm_act_cuda);
  m.def("group_norm_act_backward", &group_norm_act_backward_cuda);
  m.def("fast_div", &fast_div);
  m.def("set_device", &set_device);
  m.def("adv_step_plan", &adv_step_plan);
}
