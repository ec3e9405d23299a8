"""Few-step samplers of an epsilon-prediction model: ancestral DDPM, DDIM and DPM-Solver++(2M).

Each method visits ``steps`` timesteps of the schedule, calling the model once at each (NFE =
steps), always with original timestep indices. Every step goes through ``p_mean_variance``,
so epsilon scaling (ADM-ES), clipping and the learned variance apply to all methods alike.
"""
import math

import torch
from tqdm.auto import tqdm

from .losses import p_mean_variance
from .schedule import space_timesteps

METHODS = ("ddpm", "ddim", "dpm_solver++")


def logsnr_timesteps(schedule, count):
    """``count`` distinct ascending timestep indices whose logSNR lambda_t = log(alpha_t / sigma_t)
    is nearest to a uniform grid from the last step to the first (DPM-Solver's spacing)."""
    n = schedule.num_timesteps
    if not 1 <= count <= n:
        raise ValueError(f"count must be in [1, {n}], got {count}")
    lam = schedule.log_snr
    grid = torch.linspace(lam[-1].item(), lam[0].item(), count, dtype=torch.float64).flip(0)
    idx = (lam[None, :] - grid[:, None]).abs().argmin(dim=1)
    k = torch.arange(count)
    idx = torch.minimum(torch.maximum(idx, k), n - count + k)  # leave room for distinct neighbours
    return ((idx - k).cummax(dim=0).values + k).tolist()  # strictly increasing


def method_timesteps(schedule, method, steps):
    """The indices of ``schedule`` at which ``method`` calls the model, ascending."""
    if method == "ddpm":
        return space_timesteps(schedule.num_timesteps, steps)
    if method == "ddim":
        return space_timesteps(schedule.num_timesteps, f"ddim{steps}")
    if method == "dpm_solver++":
        return logsnr_timesteps(schedule, steps)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _ddpm_step(sched, x, i, out, generator):
    """Ancestral: x_{t-1} ~ N(mean, exp(log_variance)); the last step returns the mean."""
    if i == 0:
        return out["mean"]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=out["mean"].dtype)
    return out["mean"] + (0.5 * out["log_variance"]).exp() * noise


def _ddim_step(eta):
    def step(sched, x, i, out, generator):
        """x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z, eps from the (clipped) x0."""
        ab, ab_prev = sched.alphas_cumprod[i].item(), sched.alphas_cumprod_prev[i].item()
        x0 = out["pred_xstart"]
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x
    return step


def _dpm_solver_pp_2m():
    """DPM-Solver++(2M): multistep second order in lambda with data prediction (first order on
    the first step). The model is evaluated down to t = 0; the step from there to the data
    (sigma = 0, h = inf) is x = x0_pred, as DDIM's last step."""
    previous = []  # (lambda, x0_pred) of the last step

    def step(sched, x, i, out, generator):
        x0 = out["pred_xstart"]
        if i == 0:
            return x0
        lam, lam_next = sched.log_snr[i].item(), sched.log_snr[i - 1].item()
        h = lam_next - lam
        d = x0
        if previous:
            lam_prev, x0_prev = previous.pop()
            d = x0 + (x0 - x0_prev) * (h / (lam - lam_prev) / 2)
        previous.append((lam, x0))
        sigma_ratio = sched.sqrt_one_minus_alphas_cumprod[i - 1].item() / sched.sqrt_one_minus_alphas_cumprod[i].item()
        return sigma_ratio * x - sched.sqrt_alphas_cumprod[i - 1].item() * math.expm1(-h) * d
    return step


@torch.no_grad()
def sample(model_fn, schedule, shape, method, steps, *, eta=0.0, es_lambda=1.0, learn_sigma, clip_denoised=True,
           generator=None, device="cpu", progress=False, return_trajectory=False, x_T=None):
    """Draw samples with ``steps`` model calls.

    model_fn(x, t) -> model output (C channels, or 2C with learn_sigma), t the (B,) original
    timestep indices. Methods: 'ddpm' (ancestral on evenly respaced steps, learned or posterior
    variance), 'ddim' (integer stride, ``eta``), 'dpm_solver++' (2M, logSNR-uniform steps).
    ``es_lambda`` divides the predicted eps (ADM-ES; 1 = off). ``x_T`` replaces the initial
    noise. Returns x_0, or (x_0, [(x_t, original t), ...] of every model input) with
    ``return_trajectory``.
    """
    sched = schedule.respaced(method_timesteps(schedule, method, steps))
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta is a parameter of 'ddim' only, got eta={eta} with method={method!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: DDIM, 1: DDPM's variance), got {eta}")
    if not es_lambda > 0:
        raise ValueError(f"es_lambda must be > 0 (it divides eps; 1 = off), got {es_lambda}")
    step = _ddim_step(eta) if method == "ddim" else _dpm_solver_pp_2m() if method == "dpm_solver++" else _ddpm_step
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    trajectory = []
    for i in tqdm(range(sched.num_timesteps - 1, -1, -1), desc=method, disable=not progress):
        original_t = int(sched.timestep_map[i])
        if return_trajectory:
            trajectory.append((x, original_t))
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = p_mean_variance(sched, model_fn(x, torch.full_like(t, original_t)), x, t, learn_sigma, clip_denoised,
                              es_lambda)
        x = step(sched, x, i, out, generator)
    return (x, trajectory) if return_trajectory else x
