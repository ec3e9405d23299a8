"""Fused noise injection: x_t = c_signal * x0 + c_noise * eps (+ delta) and the regression target.

One pass writes both the (perturbed) noisy input and the target that matches it
(PAPER.md: x_t + delta = a_t x0 + s_t (eps + delta / s_t)); the backward is one pass too.
"""
from typing import Optional

import torch
from torch import Tensor

from . import backend, checks

OP = "noise_inject"


def _check(x0, eps, c_signal, c_noise, delta, target):
    checks.batch_tensor(OP, "x0", x0)
    checks.like(OP, "eps", eps, "x0", x0)
    checks.like(OP, "delta", delta, "x0", x0)
    checks.coefficients(OP, "c_signal", c_signal, x0)
    checks.coefficients(OP, "c_noise", c_noise, x0)
    return checks.target_mode(OP, target)


def _noise_inject(x0: Tensor, eps: Tensor, c_signal: Tensor, c_noise: Tensor, delta: Optional[Tensor],
                  target: str) -> tuple[Tensor, Tensor]:
    _check(x0, eps, c_signal, c_noise, delta, target)
    return _run(x0, eps, c_signal, c_noise, delta, target)


def _run(x0, eps, c_signal, c_noise, delta, target):
    """The op's body after ``_check``: (x_t, target) from the backend chosen for x0."""
    return backend.run(OP, OP, x0, x0, eps, c_signal, c_noise, delta, checks.target_mode(OP, target))


noise_inject_op = torch.library.custom_op("adv_dpm::noise_inject", _noise_inject, mutates_args=())


@noise_inject_op.register_fake
def _(x0, eps, c_signal, c_noise, delta, target):
    _check(x0, eps, c_signal, c_noise, delta, target)
    return torch.empty_like(x0), torch.empty_like(x0)


def _noise_inject_backward(grad_x_t: Tensor, grad_target: Tensor, x0: Tensor, eps: Tensor, c_signal: Tensor,
                           c_noise: Tensor, delta: Optional[Tensor], target: str,
                           coef_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    mode = _check(x0, eps, c_signal, c_noise, delta, target)
    checks.like(OP, "grad_x_t", grad_x_t, "x0", x0)
    checks.like(OP, "grad_target", grad_target, "x0", x0)
    return backend.run(OP, "noise_inject_backward", x0, grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta,
                       mode, coef_grads)


noise_inject_backward_op = torch.library.custom_op("adv_dpm::noise_inject_backward", _noise_inject_backward,
                                                   mutates_args=())


@noise_inject_backward_op.register_fake
def _(grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta, target, coef_grads):
    checks.target_mode(OP, target)
    empty = x0.new_empty((0,))
    grad_delta = empty if delta is None else torch.empty_like(x0)
    grad_cs, grad_cn = (torch.empty_like(c_signal), torch.empty_like(c_noise)) if coef_grads else (
        c_signal.new_empty((0,)), c_noise.new_empty((0,)))
    return torch.empty_like(x0), torch.empty_like(x0), grad_delta, grad_cs, grad_cn


def _setup_context(ctx, inputs, output):
    x0, eps, c_signal, c_noise, delta, target = inputs
    ctx.target, ctx.forced_backend = target, backend.forced_backend()
    ctx.save_for_backward(x0, eps, c_signal, c_noise, delta)


def _backward(ctx, grad_x_t, grad_target):
    x0, eps, c_signal, c_noise, delta = ctx.saved_tensors
    if backend.double_backward():
        return backend.recomputed_grads(_noise_inject, (x0, eps, c_signal, c_noise, delta, ctx.target),
                                        (grad_x_t, grad_target))
    coef_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    # Unless the target depends on delta ('delta') or the coefficient gradients read it,
    # grad_delta is grad_x_t itself: the kernel then gets no delta and writes no copy.
    kernel_delta = delta if delta is not None and (ctx.target == "delta" or coef_grads) else None
    with backend.use_backend(ctx.forced_backend):  # CUDA autograd runs this on another thread
        grad_x0, grad_eps, grad_delta, grad_cs, grad_cn = backend.call(
            noise_inject_backward_op, _noise_inject_backward, None,
            grad_x_t, grad_target, x0, eps, c_signal, c_noise, kernel_delta, ctx.target, coef_grads)
    if delta is None:
        grad_delta = None
    elif kernel_delta is None:
        grad_delta = grad_x_t
    return (grad_x0, grad_eps, grad_cs if coef_grads else None, grad_cn if coef_grads else None, grad_delta, None)


noise_inject_op.register_autograd(_backward, setup_context=_setup_context)
_function = backend.autograd_function(_run, _setup_context, _backward)


def _differentiable(x0, eps, c_signal, c_noise, delta, target):
    """The op, recording its gradient, its arguments checked once here."""
    mode = _check(x0, eps, c_signal, c_noise, delta, target)
    return backend.run_recording(_function, (x0, eps, c_signal, c_noise, delta, target), x0, OP,
                                 (x0, eps, c_signal, c_noise, delta, mode))


def noise_inject(x0: Tensor, eps: Tensor, c_signal: Tensor, c_noise: Tensor, delta: Optional[Tensor] = None,
                 target: str = "delta_detach") -> tuple[Tensor, Tensor]:
    """(x_t, target): x_t = c_signal * x0 + c_noise * eps (+ delta), per-sample coefficients of
    shape (B,) or (B, 1, ..., 1) (the shape that broadcasts against x0).

    ``target`` is the regression target of PAPER.md: 'original' (eps), 'delta' (eps + delta /
    c_noise, gradient flows through delta) or 'delta_detach' (the same value, delta detached).
    Differentiable in every tensor argument.
    """
    c_signal, c_noise = checks.flat_per_sample(c_signal, x0), checks.flat_per_sample(c_noise, x0)
    return backend.call(noise_inject_op, _noise_inject, _differentiable, x0, eps, c_signal, c_noise, delta, target)
