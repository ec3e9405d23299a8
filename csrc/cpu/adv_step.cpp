// CPU kernel of adv_dpm_C::adv_step (docs/OPS.md): a statistics pass gives per-sample
// gg = sum g*g, dg = sum delta*g, dd = sum delta*delta as block partials added in block order
// (deterministic, no atomics), then an apply pass writes the new delta (and x_adv, target).
// When there are enough samples, each task runs both passes on one sample at a time, so the apply
// pass re-reads data the statistics pass just brought into cache.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace adv_dpm::cpu {
namespace {

// Largest sample (elements) whose inputs stay in a core's cache between the two passes.
constexpr int64_t kFuseSpan = 32768;

// What the apply pass needs of sample b's statistics.
template <typename acc>
struct StepParams {
  bool skipped;
  acc step, scale;
};

// g at one element from x = (delta, grad, grad_target if kGt, ...): grad (+ grad_target / c_noise[b]).
template <bool kGt, typename T, size_t N, typename acc>
T gradient(const std::array<T, N>& x, acc c) {
  if constexpr (kGt) {
    return x[1] + x[2] / T(c);
  } else {
    return x[1];
  }
}

// kGt: grad_target given. kFused: 0 no x_t; 1 x_adv and target = eps; 2 x_adv and
// target = eps + new_delta / c_noise.
template <typename scalar_t, bool kGt, int kFused>
void adv_step_kernel(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor* grad_target,
                     const at::Tensor* x_t, const at::Tensor* eps, const at::Tensor& c_noise, double lr,
                     double radius, double grad_scale, const at::Tensor& new_delta, const at::Tensor& x_adv,
                     const at::Tensor& target, const at::Tensor& grad_norm, const at::Tensor& delta_norm,
                     const at::Tensor& skipped) {
  using acc = acc_t<scalar_t>;
  constexpr size_t NS = kGt ? 3 : 2, NI = NS + (kFused ? 2 : 0), NO = kFused ? 3 : 1;
  std::array<at::Tensor, NS> stats_in;
  stats_in[0] = delta;
  stats_in[1] = grad;
  if constexpr (kGt) stats_in[2] = *grad_target;
  std::array<at::Tensor, NI> in;
  std::array<at::Tensor, NO> out;
  std::copy(stats_in.begin(), stats_in.end(), in.begin());
  out[0] = new_delta;
  if constexpr (kFused) {
    in[NS] = *x_t;
    in[NS + 1] = *eps;
    out[1] = x_adv;
    out[2] = target;
  }
  const Operands<scalar_t, NS, 0> stats(stats_in, {});
  const Operands<scalar_t, NI, NO> apply(in, out);

  const int64_t B = delta.size(0);
  const acc* cn = c_noise.defined() ? c_noise.const_data_ptr<acc>() : nullptr;
  float* gnorm = grad_norm.mutable_data_ptr<float>();
  float* dnorm = delta_norm.mutable_data_ptr<float>();
  bool* skip = skipped.mutable_data_ptr<bool>();
  const Blocks blocks(stats.span());
  std::vector<std::array<acc, 3>> partial(B * blocks.per_sample);

  const auto stats_block = [&](int64_t b, int64_t j) {
    const acc c = cn ? cn[b] : acc(0);
    partial[b * blocks.per_sample + j] =
        stats.template run<3>(b, blocks.lo(j), blocks.hi(j), [c](const auto& x, auto&, auto& r) {
          const auto g = gradient<kGt>(x, c);
          r[0] = g * g;
          r[1] = x[0] * g;
          r[2] = x[0] * x[0];
        });
  };
  // Folds sample b's partials and writes its norms and skip flag.
  const auto finish = [&](int64_t b) {
    std::array<acc, 3> s{};
    for (int64_t j = 0; j < blocks.per_sample; ++j) {
      for (const auto r : c10::irange(3)) s[r] += partial[b * blocks.per_sample + j][r];
    }
    const acc gg = s[0], dg = s[1], dd = s[2], gs = static_cast<acc>(grad_scale), rad = static_cast<acc>(radius);
    const bool skip_b = !std::isfinite(gg) || !(std::isfinite(gs) && gs > 0);
    const acc gn = std::sqrt(gg) / gs;
    const acc step = static_cast<acc>(lr) / std::max(gn, acc(1e-8)) / gs;
    const acc n = std::sqrt(std::max(dd + 2 * step * dg + step * step * gg, acc(0)));
    gnorm[b] = static_cast<float>(gn);
    dnorm[b] = static_cast<float>(skip_b ? std::sqrt(dd) : std::min(n, rad));
    skip[b] = skip_b;
    return StepParams<acc>{skip_b, step, n > rad ? rad / n : acc(1)};
  };
  const auto apply_block = [&](int64_t b, int64_t j, const StepParams<acc>& p) {
    const acc c = cn ? cn[b] : acc(0);
    apply.template run<0>(b, blocks.lo(j), blocks.hi(j), [c, p](const auto& x, auto& y, auto&) {
      using T = std::decay_t<decltype(x[0])>;
      const T nd = p.skipped ? x[0] : T(p.scale) * (x[0] + T(p.step) * gradient<kGt>(x, c));
      y[0] = nd;
      if constexpr (kFused) {
        y[1] = x[NS] + nd;
        y[2] = x[NS + 1];
        if constexpr (kFused == 2) y[2] = x[NS + 1] + nd / T(c);
      }
    });
  };

  if (B >= 4 * at::get_num_threads() && blocks.span <= kFuseSpan) {
    at::parallel_for(0, B, Blocks::grain(blocks.span), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t j = 0; j < blocks.per_sample; ++j) stats_block(b, j);
        const StepParams<acc> p = finish(b);
        for (int64_t j = 0; j < blocks.per_sample; ++j) apply_block(b, j, p);
      }
    });
  } else {
    for_each_block(B, blocks, stats_block);
    std::vector<StepParams<acc>> params(B);
    for (int64_t b = 0; b < B; ++b) params[b] = finish(b);
    for_each_block(B, blocks, [&](int64_t b, int64_t j) { apply_block(b, j, params[b]); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adv_step(
    const at::Tensor& delta, const at::Tensor& grad, const std::optional<at::Tensor>& grad_target,
    const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& c_noise, double lr, double radius, const std::optional<at::Tensor>& grad_scale,
    int64_t mode) {
  check_main(delta, "delta");
  check_like(grad, "grad", delta, "delta");
  if (grad_target) check_like(*grad_target, "grad_target", delta, "delta");
  if (x_t) {
    check_like(*x_t, "x_t", delta, "delta");
    TORCH_CHECK(eps.has_value(), "eps must be given with x_t");
    check_like(*eps, "eps", delta, "delta");
  }
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  const bool needs_cn = grad_target || (x_t && mode >= 1);
  TORCH_CHECK(!needs_cn || c_noise.has_value(), "c_noise must be given with grad_target or with x_t and mode >= 1");
  if (c_noise) check_coef(*c_noise, "c_noise", delta);
  double gs = 1.0;
  if (grad_scale) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat && grad_scale->device().is_cpu(),
                "grad_scale must be a CPU float32 tensor of one element, got ", grad_scale->scalar_type(), " of shape ",
                grad_scale->sizes(), " on ", grad_scale->device());
    gs = *grad_scale->const_data_ptr<float>();
  }
  TORCH_CHECK(lr >= 0 && radius >= 0, "adv_step: need lr >= 0 and radius >= 0, got lr=", lr, ", radius=", radius);

  const int64_t B = delta.size(0);
  const at::Tensor cn = c_noise ? coef_values(*c_noise, delta.scalar_type()) : at::Tensor();
  at::Tensor new_delta = at::empty_like(delta);
  at::Tensor x_adv = x_t ? at::empty_like(*x_t) : at::empty({0}, delta.options());
  at::Tensor target = x_t ? at::empty_like(*x_t) : at::empty({0}, delta.options());
  at::Tensor grad_norm = at::empty({B}, delta.options().dtype(at::kFloat));
  at::Tensor delta_norm = at::empty({B}, delta.options().dtype(at::kFloat));
  at::Tensor skipped = at::empty({B}, delta.options().dtype(at::kBool));
  const at::Tensor* gt = grad_target ? &*grad_target : nullptr;
  const at::Tensor* xt = x_t ? &*x_t : nullptr;
  const at::Tensor* e = x_t ? &*eps : nullptr;
  const int fused = !x_t ? 0 : mode == 0 ? 1 : 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "adv_step", [&] {
    with_choice(fused, [&](auto kf) {
      const auto run = [&](auto kgt) {
        adv_step_kernel<scalar_t, kgt, kf>(delta, grad, gt, xt, e, cn, lr, radius, gs, new_delta, x_adv,
                                           target, grad_norm, delta_norm, skipped);
      };
      gt ? run(std::true_type{}) : run(std::false_type{});
    });
  });
  return {new_delta, x_adv, target, grad_norm, delta_norm, skipped};
}

}  // namespace
}  // namespace adv_dpm::cpu

TORCH_LIBRARY_IMPL(adv_dpm_C, CPU, m) {
  m.impl("adv_step", &adv_dpm::cpu::adv_step);
}
