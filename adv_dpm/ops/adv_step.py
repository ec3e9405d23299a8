"""The single-step adversarial perturbation of free adversarial training.

Per sample: delta <- delta + lr * g / max(||g||, 1e-8), then projected onto ||delta|| <= radius
(PAPER.md step 2), from one statistics pass (||g||^2, <delta, g>, ||delta||^2) and one apply
pass. A sample whose gradient is not finite keeps its delta and is reported as skipped.
``adv_step_inject`` also writes the next perturbed input x_t + delta and its target, so a
free-AT replay touches the batch once. Neither op is differentiable: they update state, and
their outputs never require grad.
"""
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import backend, checks


class AdvStep(NamedTuple):
    delta: Tensor        # the updated perturbation
    grad_norm: Tensor    # (B,) float32 norm of the (unscaled) gradient
    delta_norm: Tensor   # (B,) float32 norm of the updated perturbation
    skipped: Tensor      # (B,) bool: non-finite gradient, delta kept


class AdvStepInject(NamedTuple):
    delta: Tensor
    x_adv: Tensor        # x_t + delta: the network's next input
    target: Tensor       # its regression target
    grad_norm: Tensor
    delta_norm: Tensor
    skipped: Tensor


def _check_step(op, delta, grad, lr, radius, grad_scale):
    checks.batch_tensor(op, "delta", delta)
    if grad is None:
        raise TypeError(f"{op}: grad must be the loss gradient w.r.t. the perturbed input (shape of delta), got None; "
                        f"did the backward reach an input with requires_grad=True?")
    checks.like(op, "grad", grad, "delta", delta)
    checks.non_negative(op, "lr", lr)
    checks.non_negative(op, "radius", radius, allow_inf=True)
    checks.loss_scale(op, "grad_scale", grad_scale, delta)


def _norms(delta):
    b = delta.shape[0]
    return delta.new_empty((b,), dtype=torch.float32), delta.new_empty((b,), dtype=torch.float32), \
        delta.new_empty((b,), dtype=torch.bool)


def _loss_scale(op, grad_scale, delta):
    """``grad_scale`` as the ops take it: None for 1, else a float32 tensor of one element on
    delta's device (a number becomes one; a tensor, such as a GradScaler's, is read by the kernels
    and never waited for)."""
    if isinstance(grad_scale, Tensor):
        return grad_scale
    grad_scale = checks.number(grad_scale)
    checks.positive(op, "grad_scale", grad_scale)
    checks.batch_tensor(op, "delta", delta)
    return None if grad_scale == 1 else torch.full((), float(grad_scale), dtype=torch.float32, device=delta.device)


def _adv_step(delta: Tensor, grad: Tensor, lr: float, radius: float,
              grad_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_step("adv_step", delta, grad, lr, radius, grad_scale)
    new, _, _, grad_norm, delta_norm, skipped = backend.run(
        "adv_step", "adv_step", delta, delta, grad, None, None, None, None, lr, radius, grad_scale, 0)
    return new, grad_norm, delta_norm, skipped


adv_step_op = torch.library.custom_op("adv_dpm::adv_step", _adv_step, mutates_args=())


@adv_step_op.register_fake
def _(delta, grad, lr, radius, grad_scale=None):
    _check_step("adv_step", delta, grad, lr, radius, grad_scale)
    return (torch.empty_like(delta), *_norms(delta))


def _check_inject(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target, grad_scale):
    op = "adv_step_inject"
    _check_step(op, delta, grad, lr, radius, grad_scale)
    checks.like(op, "x_t", x_t, "delta", delta)
    checks.like(op, "eps", eps, "delta", delta)
    checks.coefficients(op, "c_noise", c_noise, delta)
    mode = checks.target_mode(op, target)
    if (grad_target is not None) != (target == "delta"):
        raise ValueError(f"{op}: grad_target (the loss gradient w.r.t. the target) is needed with target='delta', "
                         f"where the target depends on delta, and only then; got target={target!r} and "
                         f"grad_target {'None' if grad_target is None else 'given'}")
    checks.like(op, "grad_target", grad_target, "delta", delta)
    return mode


def _adv_step_inject(x_t: Tensor, eps: Tensor, c_noise: Tensor, delta: Tensor, grad: Tensor, lr: float,
                     radius: float, target: str, grad_target: Optional[Tensor] = None,
                     grad_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mode = _check_inject(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target, grad_scale)
    return backend.run("adv_step", "adv_step", delta, delta, grad, grad_target, x_t, eps, c_noise, lr, radius,
                       grad_scale, mode)


adv_step_inject_op = torch.library.custom_op("adv_dpm::adv_step_inject", _adv_step_inject, mutates_args=())


@adv_step_inject_op.register_fake
def _(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target=None, grad_scale=None):
    _check_inject(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target, grad_scale)
    return (torch.empty_like(delta), torch.empty_like(x_t), torch.empty_like(x_t), *_norms(delta))


def adv_step(delta: Tensor, grad: Tensor, lr: float, radius: float,
             grad_scale: Union[float, Tensor] = 1.0) -> AdvStep:
    """Normalized L2 ascent on ``delta`` along ``grad``, projected onto the ball of ``radius``.

    ``grad_scale`` is the loss scale that ``grad`` still carries, divided out so that the result
    equals that of the unscaled gradient: a number, or a float32 tensor of one element on the
    device (a GradScaler's scale tensor, which the kernels read without the host waiting for it).
    """
    with torch.no_grad():
        return AdvStep(*backend.call(adv_step_op, _adv_step, None, delta, grad, checks.number(lr),
                                     checks.number(radius), _loss_scale("adv_step", grad_scale, delta)))


def adv_step_inject(x_t: Tensor, eps: Tensor, c_noise: Tensor, delta: Tensor, grad: Tensor, lr: float,
                    radius: float, target: str = "delta_detach", grad_target: Optional[Tensor] = None,
                    grad_scale: Union[float, Tensor] = 1.0) -> AdvStepInject:
    """The free-AT replay update: ``adv_step`` plus the next input x_t + delta and its target.

    ``x_t`` is the clean noisy input, ``grad`` the loss gradient w.r.t. the previous perturbed
    input. With target='delta' the target depends on delta too: pass its gradient as
    ``grad_target`` and the ascent uses grad + grad_target / c_noise (= dLoss/d delta).
    ``c_noise``: (B,) or (B, 1, ..., 1). ``grad_scale`` as in ``adv_step``.
    """
    c_noise = checks.flat_per_sample(c_noise, delta)
    with torch.no_grad():
        return AdvStepInject(*backend.call(adv_step_inject_op, _adv_step_inject, None, x_t, eps, c_noise, delta, grad,
                                           checks.number(lr), checks.number(radius), target, grad_target,
                                           _loss_scale("adv_step_inject", grad_scale, delta)))
