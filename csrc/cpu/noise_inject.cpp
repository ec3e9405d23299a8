// CPU kernels of adv_dpm_C::noise_inject and adv_dpm_C::noise_inject_backward (docs/OPS.md).
// Each is one pass over the data, parallel over (sample, block) pairs; the backward's per-sample
// coefficient sums are block partials added in block order (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"

namespace adv_dpm::cpu {
namespace {

// x_t = cs * x0 + cn * eps (+ delta when kDelta); target = eps (+ delta / cn when kShift).
template <typename scalar_t, bool kDelta, bool kShift>
void noise_inject_kernel(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor* delta,
                         const at::Tensor& c_signal, const at::Tensor& c_noise, const at::Tensor& x_t,
                         const at::Tensor& target) {
  using acc = acc_t<scalar_t>;
  const auto ops = [&] {
    if constexpr (kDelta) {
      return Operands<scalar_t, 3, 2>({x0, eps, *delta}, {x_t, target});
    } else {
      return Operands<scalar_t, 2, 2>({x0, eps}, {x_t, target});
    }
  }();
  const acc* cs = c_signal.const_data_ptr<acc>();
  const acc* cn = c_noise.const_data_ptr<acc>();
  const Blocks blocks(ops.span());
  for_each_block(x0.size(0), blocks, [&](int64_t b, int64_t j) {
    const acc a = cs[b], c = cn[b];
    ops.template run<0>(b, blocks.lo(j), blocks.hi(j), [a, c](const auto& x, auto& y, auto&) {
      using T = std::decay_t<decltype(x[0])>;
      y[0] = T(a) * x[0] + T(c) * x[1];
      y[1] = x[1];
      if constexpr (kDelta) y[0] = y[0] + x[2];
      if constexpr (kShift) y[1] = x[1] + x[2] / T(c);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> noise_inject(const at::Tensor& x0, const at::Tensor& eps,
                                                const at::Tensor& c_signal, const at::Tensor& c_noise,
                                                const std::optional<at::Tensor>& delta, int64_t mode) {
  check_main(x0, "x0");
  check_like(eps, "eps", x0, "x0");
  if (delta) check_like(*delta, "delta", x0, "x0");
  check_coef(c_signal, "c_signal", x0);
  check_coef(c_noise, "c_noise", x0);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  at::Tensor x_t = at::empty_like(x0), target = at::empty_like(x0);
  const at::Tensor cs = coef_values(c_signal, x0.scalar_type()), cn = coef_values(c_noise, x0.scalar_type());
  const at::Tensor* d = delta ? &*delta : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "noise_inject", [&] {
    if (!d) {
      noise_inject_kernel<scalar_t, false, false>(x0, eps, d, cs, cn, x_t, target);
    } else if (mode == 0) {
      noise_inject_kernel<scalar_t, true, false>(x0, eps, d, cs, cn, x_t, target);
    } else {
      noise_inject_kernel<scalar_t, true, true>(x0, eps, d, cs, cn, x_t, target);
    }
  });
  return {x_t, target};
}

// grad_x0 = cs * gx, grad_eps = cn * gx + gt, and
//   kDeltaGrad: 0 no grad_delta, 1 grad_delta = gx, 2 grad_delta = gx + gt / cn;
//   kCoef:      0 no sums, 1 sums of gx * x0 and gx * eps, 2 also of gt * delta;
// the sums give grad_c_signal = sum gx * x0 and grad_c_noise = sum gx * eps - sum gt * delta / cn^2.
template <typename scalar_t, int kDeltaGrad, int kCoef>
void backward_kernel(const at::Tensor& grad_x_t, const at::Tensor& grad_target, const at::Tensor& x0,
                     const at::Tensor& eps, const at::Tensor* delta, const at::Tensor& c_signal,
                     const at::Tensor& c_noise, const at::Tensor& grad_x0, const at::Tensor& grad_eps,
                     const at::Tensor& grad_delta, const at::Tensor& grad_cs, const at::Tensor& grad_cn) {
  using acc = acc_t<scalar_t>;
  constexpr size_t NI = kCoef == 0 ? 2 : kCoef == 1 ? 4 : 5, NO = kDeltaGrad ? 3 : 2, NR = kCoef ? kCoef + 1 : 0;
  std::array<at::Tensor, NI> in;
  std::array<at::Tensor, NO> out;
  in[0] = grad_x_t;
  in[1] = grad_target;
  if constexpr (kCoef >= 1) {
    in[2] = x0;
    in[3] = eps;
  }
  if constexpr (kCoef == 2) in[4] = *delta;
  out[0] = grad_x0;
  out[1] = grad_eps;
  if constexpr (kDeltaGrad) out[2] = grad_delta;
  const Operands<scalar_t, NI, NO> ops(in, out);

  const int64_t B = x0.size(0);
  const acc* cs = c_signal.const_data_ptr<acc>();
  const acc* cn = c_noise.const_data_ptr<acc>();
  const Blocks blocks(ops.span());
  std::vector<std::array<acc, NR>> partial(NR ? B * blocks.per_sample : 0);
  for_each_block(B, blocks, [&](int64_t b, int64_t j) {
    const acc a = cs[b], c = cn[b];
    const auto sums = ops.template run<NR>(b, blocks.lo(j), blocks.hi(j), [a, c](const auto& x, auto& y, auto& r) {
      using T = std::decay_t<decltype(x[0])>;
      y[0] = T(a) * x[0];
      y[1] = T(c) * x[0] + x[1];
      if constexpr (kDeltaGrad == 1) y[2] = x[0];
      if constexpr (kDeltaGrad == 2) y[2] = x[0] + x[1] / T(c);
      if constexpr (kCoef >= 1) {
        r[0] = x[0] * x[2];
        r[1] = x[0] * x[3];
      }
      if constexpr (kCoef == 2) r[2] = x[1] * x[4];
    });
    if constexpr (NR > 0) partial[b * blocks.per_sample + j] = sums;
  });
  if constexpr (NR > 0) {
    acc* gcs = grad_cs.mutable_data_ptr<acc>();
    acc* gcn = grad_cn.mutable_data_ptr<acc>();
    for (int64_t b = 0; b < B; ++b) {
      std::array<acc, NR> s{};
      for (int64_t j = 0; j < blocks.per_sample; ++j) {
        for (const auto r : c10::irange(NR)) s[r] += partial[b * blocks.per_sample + j][r];
      }
      gcs[b] = s[0];
      gcn[b] = s[1];
      if constexpr (kCoef == 2) gcn[b] = s[1] - s[2] / (cn[b] * cn[b]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> noise_inject_backward(
    const at::Tensor& grad_x_t, const at::Tensor& grad_target, const at::Tensor& x0, const at::Tensor& eps,
    const at::Tensor& c_signal, const at::Tensor& c_noise, const std::optional<at::Tensor>& delta, int64_t mode,
    bool coef_grads) {
  check_main(x0, "x0");
  check_like(grad_x_t, "grad_x_t", x0, "x0");
  check_like(grad_target, "grad_target", x0, "x0");
  check_like(eps, "eps", x0, "x0");
  if (delta) check_like(*delta, "delta", x0, "x0");
  check_coef(c_signal, "c_signal", x0);
  check_coef(c_noise, "c_noise", x0);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  const at::ScalarType acc_dtype = acc_type(x0.scalar_type());
  const at::Tensor cs = coef_values(c_signal, x0.scalar_type()), cn = coef_values(c_noise, x0.scalar_type());
  at::Tensor grad_x0 = at::empty_like(x0), grad_eps = at::empty_like(x0);
  at::Tensor grad_delta = delta ? at::empty_like(x0) : at::empty({0}, x0.options());
  at::Tensor grad_cs = at::empty({coef_grads ? x0.size(0) : 0}, c_signal.options().dtype(acc_dtype));
  at::Tensor grad_cn = at::empty({coef_grads ? x0.size(0) : 0}, c_noise.options().dtype(acc_dtype));
  const at::Tensor* d = delta ? &*delta : nullptr;
  const int delta_grad = !d ? 0 : mode == 2 ? 2 : 1;
  const int coef = !coef_grads ? 0 : d && mode >= 1 ? 2 : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "noise_inject_backward", [&] {
    with_choice(delta_grad, [&](auto kd) {
      with_choice(coef, [&](auto kc) {
        if constexpr (!(kc == 2 && kd == 0)) {
          backward_kernel<scalar_t, kd, kc>(grad_x_t, grad_target, x0, eps, d, cs, cn, grad_x0, grad_eps,
                                            grad_delta, grad_cs, grad_cn);
        }
      });
    });
  });
  return {grad_x0, grad_eps, grad_delta, grad_cs.to(c_signal.scalar_type()), grad_cn.to(c_noise.scalar_type())};
}

}  // namespace
}  // namespace adv_dpm::cpu

TORCH_LIBRARY_IMPL(adv_dpm_C, CPU, m) {
  m.impl("noise_inject", &adv_dpm::cpu::noise_inject);
  m.impl("noise_inject_backward", &adv_dpm::cpu::noise_inject_backward);
}
