// csrc/cuda/bindings.cpp built against the CPU emulation of CUDA (emu.h): its functions, exposed
// to Python, take CPU tensors and run the kernels of csrc/cuda/*.cu (rewritten by build.py) on the
// CPU. Nothing is registered with the dispatcher. Also exposed: helpers of common.cuh, to be
// checked on their own (tests/test_cuda_emulated.py).
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("noise_inject", &noise_inject_cuda);
  m.def("noise_inject_backward", &noise_inject_backward_cuda);
  m.def("adv_step", &adv_step_cuda);
  m.def("group_norm_act", &group_norm_act_cuda);
  m.def("group_norm_act_backward", &group_norm_act_backward_cuda);
  m.def("fast_div", &fast_div);
}
