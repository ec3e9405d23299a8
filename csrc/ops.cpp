// The schemas of the compiled kernels, in one place. Implementations register per device:
// csrc/cpu/<op>.cpp for CPU, csrc/cuda/bindings.cpp for CUDA, and csrc/autograd/<op>.cpp the
// autograd of both where it is written in C++. The public ops in
// adv_dpm/ops/ call these after validating their arguments (see docs/OPS.md).
#include <Python.h>
#include <torch/library.h>

// Importing adv_dpm._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(adv_dpm_C, m) {
  m.def("noise_inject(Tensor x0, Tensor eps, Tensor c_signal, Tensor c_noise, Tensor? delta, int mode)"
        " -> (Tensor, Tensor)");
  m.def("noise_inject_backward(Tensor grad_x_t, Tensor grad_target, Tensor x0, Tensor eps, Tensor c_signal,"
        " Tensor c_noise, Tensor? delta, int mode, bool coef_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("adv_step(Tensor delta, Tensor grad, Tensor? grad_target, Tensor? x_t, Tensor? eps, Tensor? c_noise,"
        " float lr, float radius, Tensor? grad_scale, int mode)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("group_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int num_groups,"
        " float eps, int act) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_act_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias,"
        " Tensor? scale, Tensor? shift, int num_groups, int act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
