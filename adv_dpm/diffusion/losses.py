"""Forward process, reverse-step parameters and the training loss (ADM's hybrid loss).

The model predicts epsilon. With ``learn_sigma`` it outputs 2C channels: the second half v in
[-1, 1] interpolates the log variance between the posterior variance (v = -1) and beta
(v = 1), Nichol & Dhariwal's learned range. Tensor arguments ``t`` index ``schedule``.
"""
import math

import torch

from ..ops import noise_inject
from .schedule import extract


def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _compute_dtype(*tensors):
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def q_sample(schedule, x0, t, eps, delta=None, target="delta_detach"):
    """(x_t, target) = (sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (+ delta), the matching regression
    target), through the fused ``noise_inject`` (see PAPER.md for the targets)."""
    c_signal = extract(schedule.sqrt_alphas_cumprod, t.to(x0.device), x0).reshape(-1)
    c_noise = extract(schedule.sqrt_one_minus_alphas_cumprod, t.to(x0.device), x0).reshape(-1)
    return noise_inject(x0, eps, c_signal, c_noise, delta, target)


def q_posterior(schedule, x0, x_t, t):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(schedule.posterior_log_variance_clipped, t, x_t)


def predict_xstart(schedule, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
        extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def split_output(model_output, x_t, learn_sigma):
    """(eps, v or None) from the model output, in at least float32."""
    channels = x_t.shape[1] * (2 if learn_sigma else 1)
    if model_output.shape != (x_t.shape[0], channels, *x_t.shape[2:]):
        raise ValueError(f"model_output must have {channels} channels ({'2C, learn_sigma' if learn_sigma else 'C'}) "
                         f"and the shape of x_t {tuple(x_t.shape)} otherwise, got {tuple(model_output.shape)}")
    model_output = model_output.to(_compute_dtype(model_output, x_t))
    return model_output.chunk(2, dim=1) if learn_sigma else (model_output, None)


def p_mean_variance(schedule, model_output, x_t, t, learn_sigma, clip_denoised, es_lambda=1.0):
    """Parameters of p(x_{t-1} | x_t): dict of 'mean', 'log_variance' and 'pred_xstart'.

    ``es_lambda`` is ADM-ES epsilon scaling: eps / es_lambda is used to derive x_0. Without a
    learned variance it is the posterior variance (clipped at t = 0).
    """
    eps, v = split_output(model_output, x_t, learn_sigma)
    min_log = extract(schedule.posterior_log_variance_clipped, t, eps)
    if learn_sigma:
        frac = (v + 1) / 2
        log_variance = frac * extract(schedule.log_betas, t, eps) + (1 - frac) * min_log
    else:
        log_variance = min_log.expand_as(eps)
    pred_xstart = predict_xstart(schedule, x_t, t, eps / es_lambda)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean, _ = q_posterior(schedule, pred_xstart, x_t, t)
    return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF (as ADM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data x in [-1, 1] quantized to 256 bins under N(means, exp(log_scales)^2);
    the edge bins take the tails."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_cdf_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms(schedule, model_output, x0, x_t, t, learn_sigma=True):
    """Per-sample VLB term in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0,
    the decoder NLL -log p(x_0 | x_1) at t = 0. For the hybrid loss, pass the model output with
    its eps half detached so that only the variance is trained by this term."""
    true_mean, true_log_variance = q_posterior(schedule, x0, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, learn_sigma, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_loss(schedule, model_output, x_in, x0, t, target, learn_sigma):
    """Per-sample loss terms of the model output on the network input ``x_in`` (x_t, possibly
    adversarially perturbed) against its regression ``target``: dict of 'mse', 'vb' (with
    learn_sigma: vb_terms on x_in with the mean frozen, times num_timesteps / 1000 as ADM's
    hybrid loss) and 'loss' = mse (+ vb). The timestep-sampler weights are the caller's."""
    eps, v = split_output(model_output, x_in, learn_sigma)
    terms = {"mse": mean_flat((target.to(eps.dtype) - eps) ** 2)}
    terms["loss"] = terms["mse"]
    if learn_sigma:
        frozen = torch.cat([eps.detach(), v], dim=1)
        terms["vb"] = vb_terms(schedule, frozen, x0, x_in, t) * (schedule.num_timesteps / 1000.0)
        terms["loss"] = terms["mse"] + terms["vb"]
    return terms
