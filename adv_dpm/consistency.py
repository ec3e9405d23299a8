"""Consistency models (PAPER.md, CM-AT): consistency distillation (CD) of a trained diffusion
model and consistency training (CT), with the trainer's free adversarial loop perturbing the
online network's input.

Everything lives on the discrete schedule of the project's diffusion models, as latent
consistency models do: the network is an epsilon predictor, and the consistency function is

    f(x, t) = c_skip(t) x + c_out(t) x0(x, t),   x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),

with LCM's boundary coefficients (f(x, 0) = x exactly, f ~ x0 from the first steps on), so a
student initialized from its teacher starts as the teacher's one-step denoiser. Training draws
n uniformly from the ``scales`` intervals of a grid t_0 = 0 < ... < t_N and matches
f(x_{t_{n+1}} (+ delta), t_{n+1}) to the target network's f(x_{t_n}, t_n), where x_{t_n} is one
ODE step from x_{t_{n+1}}: the teacher's (CD, DDIM or Heun), or the true noise's (CT, which
lands on sqrt(abar) x0 + sqrt(1 - abar) eps with the same eps; from a perturbed x_{t_{n+1}} + delta,
the noise it implies, eps + delta / sqrt(1 - abar_{t_{n+1}})). The grid stops at the last
timestep whose sigma = sqrt(1 - abar) / sqrt(abar) is at most EDM's sigma_max = 80: beyond it
(the cosine schedule's last steps reach sigma = 2e4) x0 = x / sqrt(abar) - sigma eps magnifies
any error in eps, or any perturbation of x, by sigma.
"""
import math

import torch
from tqdm.auto import tqdm

from .diffusion.losses import mean_flat, predict_xstart, q_sample, split_output
from .diffusion.schedule import extract

OBJECTIVES = ("diffusion", "cd", "ct")
SOLVERS = ("ddim", "heun")
LOSS_NORMS = ("l2", "l1", "pseudo_huber")
AT_TARGETS = ("invariant", "consistent")
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0   # LCM's: the boundary coefficients reach c_out ~ 1 within a few timesteps
SIGMA_MAX = 80.0


def run_label(objective, mode):
    """What a run trains how, e.g. 'free_at' (a diffusion model) or 'cd free_at'."""
    return mode if objective == "diffusion" else f"{objective} {mode}"


def timestep_grid(schedule, scales):
    """The ``scales`` + 1 ascending, distinct timestep indices t_0 = 0 ... t_N, evenly spaced up
    to the last timestep with sigma <= SIGMA_MAX."""
    top = int((schedule.sqrt_recipm1_alphas_cumprod <= SIGMA_MAX).sum()) - 1
    if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= top:
        raise ValueError(f"scales: expected an integer in [1, {top}] (the timesteps of this schedule with sigma <= "
                         f"{SIGMA_MAX:g}), got {scales!r}")
    return torch.linspace(0, top, scales + 1, dtype=torch.float64).round().long()


def boundary_coefficients(t, num_timesteps):
    """(c_skip, c_out) at timestep indices ``t``, float64: c_skip(0) = 1 and c_out(0) = 0."""
    u = t.double() * (TIMESTEP_SCALING * 1000 / num_timesteps)
    root = (u ** 2 + SIGMA_DATA ** 2).sqrt()
    return SIGMA_DATA ** 2 / root ** 2, u / root


def consistency_fn(schedule, model_output, x, t, learn_sigma):
    """f(x, t) from the network's output on x (its epsilon half with ``learn_sigma``)."""
    eps, _ = split_output(model_output, x, learn_sigma)
    x = x.to(eps.dtype)
    x0 = predict_xstart(schedule, x, t, eps)
    c_skip, c_out = (c.to(x.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1)) for c in
                     boundary_coefficients(t, schedule.num_timesteps))
    return c_skip * x + c_out * x0


def ode_step(eps_fn, schedule, x, t, s, solver="ddim"):
    """x at timesteps ``t`` moved to ``s`` along the probability-flow ODE of ``eps_fn(x, t)``.

    In y = x / sqrt(abar) and sigma = sqrt(1 - abar) / sqrt(abar) the ODE is dy/dsigma = eps:
    'ddim' is its Euler step (one evaluation), 'heun' the trapezoidal correction (two).
    """
    if solver not in SOLVERS:
        raise ValueError(f"teacher_solver: expected one of {SOLVERS}, got {solver!r}")
    a_t, a_s = (extract(schedule.sqrt_alphas_cumprod, i, x) for i in (t, s))
    sigma_t, sigma_s = (extract(schedule.sqrt_recipm1_alphas_cumprod, i, x) for i in (t, s))
    y = x / a_t
    eps = eps_fn(x, t)
    if solver == "heun":
        eps = (eps + eps_fn(a_s * (y + (sigma_s - sigma_t) * eps), s)) / 2
    return a_s * (y + (sigma_s - sigma_t) * eps)


def distance(a, b, norm):
    """Per-sample distance of two batches: mean squared ('l2'), mean absolute ('l1') error, or
    iCT's pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d)."""
    diff = a - b
    if norm == "l2":
        return mean_flat(diff ** 2)
    if norm == "l1":
        return mean_flat(diff.abs())
    if norm == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff[0].numel())
        return (diff.flatten(1).pow(2).sum(1) + c * c).sqrt() - c
    raise ValueError(f"loss_norm: expected one of {LOSS_NORMS}, got {norm!r}")


def sampling_timesteps(schedule, scales, steps):
    """The ``steps`` descending grid timesteps a multistep consistency sampler visits, t_N first."""
    grid = timestep_grid(schedule, scales)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= scales:
        raise ValueError(f"steps: expected an integer in [1, scales={scales}], got {steps!r}")
    positions = torch.linspace(scales, 0, steps + 1, dtype=torch.float64)[:-1].round().long()
    return grid[positions].tolist()


@torch.no_grad()
def sample(model_fn, schedule, shape, steps, *, scales, learn_sigma, clip_denoised=True, generator=None,
           device="cpu", progress=False, return_trajectory=False, x_T=None):
    """Multistep consistency sampling with ``steps`` model calls (NFE): x0 = f(x_T, t_N), then
    at each next timestep t, x0 = f(sqrt(abar_t) x0 + sqrt(1 - abar_t) z, t). ``model_fn(x, t)``
    is the network (t the (B,) timestep indices). Returns x0, or (x0, [(x_t, t), ...] of every
    model input) with ``return_trajectory``."""
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    trajectory = []
    for i, step in enumerate(tqdm(sampling_timesteps(schedule, scales, steps), desc="consistency",
                                  disable=not progress)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        if i:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = q_sample(schedule, x0, t, z)[0]
        if return_trajectory:
            trajectory.append((x, step))
        x0 = consistency_fn(schedule, model_fn(x, t), x, t, learn_sigma)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
    return (x0, trajectory) if return_trajectory else x0
