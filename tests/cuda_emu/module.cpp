// csrc/cuda/bindings.cpp built against the CPU emulation of CUDA (emu.h): its functions, exposed
// to Python, take CPU tensors and run the kernels of csrc/cuda/*.cu (rewritten by
// tests/test_cuda_emulated.py) on the CPU. Nothing is registered with the dispatcher.
#include <torch/extension.h>
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void emulated_registrations(torch::Library& m)
// The bindings accept CUDA tensors only; the emulation runs on CPU tensors.
#define is_cuda is_cpu

#include "bindings.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("noise_inject", &noise_inject_cuda);
  m.def("noise_inject_backward", &noise_inject_backward_cuda);
  m.def("adv_step", &adv_step_cuda);
  m.def("group_norm_act", &group_norm_act_cuda);
  m.def("group_norm_act_backward", &group_norm_act_backward_cuda);
}
