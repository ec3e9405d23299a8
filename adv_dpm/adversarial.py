"""Free adversarial training (PAPER.md): the perturbation of one batch across its K replays.

Per batch, t and eps are drawn once and delta starts at zero. Each replay feeds the network
x_t + delta with the matching target; the one backward pass of the replay gives both the
parameter gradients and dLoss/d(x_t + delta), from which ``update`` takes the normalized L2
ascent step and projects onto ||delta|| <= sqrt(d) * max_norm, writing the next input and
target in the same pass (``adv_dpm.adv_step_inject``). No extra forward or backward pass.
A consistency model's perturbation moves the input alone (no ``eps``): ``adv_dpm.adv_step``.

With the 'noise' budget the step length and the radius are per sample multiples of its noise
level sqrt(1 - abar_t): the ascent runs on u = delta / sqrt(1 - abar_t), the change of the noise
eps that the perturbed input implies (the per-sample gradient normalization makes the direction
the same), so that at small t delta does not swamp the noise (DDPM-IP scales its input
perturbation the same way).

With the 'random' direction each step goes the same length along a fresh Gaussian direction
instead of the ascent: the control that tells the adversarial direction's effect from that of
any perturbation of that size.
"""
import math
from dataclasses import dataclass

import torch

from .ops import adv_step, adv_step_inject
from .ops.checks import TARGETS
from .utils import to_device

BUDGETS = ("input", "noise")
DIRECTIONS = ("gradient", "random")


@dataclass(frozen=True)
class AdversarialConfig:
    steps: int = 3                  # K: replays (optimizer updates) per batch
    lr: float = 0.1                 # adv_lr: L2 length of each ascent step
    max_norm: float = 0.1           # adv_max_norm: radius per element, rho = sqrt(d) * max_norm
    target: str = "delta_detach"    # 'delta_detach' | 'delta' | 'original'
    budget: str = "input"           # 'input': lr and max_norm in units of x_t (PAPER.md); 'noise': per sample
                                    # in units of its noise level sqrt(1 - abar_t)
    direction: str = "gradient"     # 'gradient': the ascent (PAPER.md); 'random': a Gaussian direction, the control

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"adversarial steps must be an integer >= 1, got {self.steps!r}")
        for name in ("lr", "max_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"adversarial {name} must be a finite number >= 0, got {value!r}")
        if self.target not in TARGETS:
            raise ValueError(f"adversarial target must be one of {TARGETS}, got {self.target!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"adversarial budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"adversarial direction must be one of {DIRECTIONS}, got {self.direction!r}")


class Perturbation:
    """delta of one batch, and the network input and target of the current replay.

    ``x_t`` is the clean noisy batch, ``eps`` its noise, ``c_noise`` the per-sample sqrt(1 - abar_t);
    with ``eps`` None there is no regression target to shift (consistency models: target None).
    ``generator`` (CPU) draws the 'random' direction's steps.
    """

    def __init__(self, x_t, eps, c_noise, config: AdversarialConfig, generator=None):
        self.x_t, self.eps, self.c_noise, self.config = x_t, eps, c_noise, config
        self.generator = generator
        self.delta = torch.zeros_like(x_t)
        self.u = torch.zeros_like(x_t) if config.budget == "noise" else None   # delta / c_noise
        self.x_in, self.target = x_t, eps
        self.radius = math.sqrt(x_t[0].numel()) * config.max_norm
        # Samples whose gradient was not finite (their delta was kept): a count on the device, read
        # when the trainer reports it, so that an update does not wait for the GPU.
        self.skipped = torch.zeros((), dtype=torch.long, device=x_t.device)

    def inputs(self):
        """(x_in, target) as fresh leaves: x_in requires grad, and so does target under 'delta'."""
        x_in = self.x_in.detach().requires_grad_()
        if self.target is None:
            return x_in, None
        target = self.target.detach().requires_grad_(self.config.target == "delta")
        return x_in, target

    @torch.no_grad()
    def update(self, x_in, target, grad_scale=1.0):
        """The ascent step from the gradients the replay's backward left on ``inputs()`` (the 'random'
        direction: a step of the same length along a fresh Gaussian direction)."""
        if x_in.grad is None:
            raise RuntimeError("Perturbation.update: x_in has no gradient; call backward() on the replay's loss first")
        grad_x = x_in.grad
        grad_target = target.grad if target is not None and self.config.target == "delta" else None
        if self.config.direction == "random":   # the loss gradients do not enter (a zero one for the target)
            noise = torch.randn(self.x_t.shape, generator=self.generator)
            grad_x, grad_scale = torch.empty_like(self.x_t).copy_(to_device(noise, self.x_t.device)), 1.0
            grad_target = None if grad_target is None else torch.zeros_like(grad_target)
        if self.u is not None:
            step = self._noise_step(grad_x, grad_target, grad_scale)
        elif self.eps is None:
            step = adv_step(self.delta, grad_x, self.config.lr, self.radius, grad_scale)
            self.delta, self.x_in = step.delta, self.x_t + step.delta
        else:
            step = adv_step_inject(self.x_t, self.eps, self.c_noise, self.delta, grad_x, self.config.lr,
                                   self.radius, self.config.target, grad_target, grad_scale)
            self.delta, self.x_in, self.target = step.delta, step.x_adv, step.target
        self.skipped += step.skipped.sum()
        return step

    def _noise_step(self, grad_x, grad_target, grad_scale):
        """The step of the 'noise' budget, on u = delta / c_noise: dL/du = c_noise * dL/ddelta,
        the same direction per sample, so adv_step takes dL/ddelta (with, under 'delta', the
        target's share dL/dtarget / c_noise)."""
        c = self.c_noise.reshape(-1, *[1] * (self.x_t.dim() - 1))
        grad = grad_x
        if grad_target is not None:   # target 'delta' of a diffusion model
            grad = grad_x + grad_target / c
        step = adv_step(self.u, grad, self.config.lr, self.radius, grad_scale)
        self.u = step.delta
        self.delta = (c * self.u).to(self.x_t.dtype)
        self.x_in = self.x_t + self.delta
        if self.eps is not None:
            self.target = self.eps if self.config.target == "original" else self.eps + self.u.to(self.eps.dtype)
        return step
