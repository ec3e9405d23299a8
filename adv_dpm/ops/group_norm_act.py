"""Fused GroupNorm + per-sample scale/shift + SiLU: act(GN(x) * (1 + scale) + shift).

ADM calls GroupNorm 88 times per forward at its CIFAR-10 config, each as an fp32 upcast,
GroupNorm, cast back, multiply, add and SiLU. Here it is one pass of statistics and one of
output; the backward saves only x and the fp32 (N, G) mean and rstd and recomputes the rest.
Statistics are fp32 and the output keeps x's dtype, as ADM's GroupNorm32 does, also under
autocast (the op registers no autocast rule, so x is not cast).
"""
from typing import Optional

import torch
from torch import Tensor

from . import backend, checks

OP = "group_norm_act"
ACTS = ("silu", None)


def _act_code(act):
    if act not in ACTS:
        raise ValueError(f"{OP}: act must be 'silu' or None, got {act!r}")
    return int(act == "silu")


def _check(x, weight, bias, num_groups, eps, scale, shift, act):
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"{OP}: x must be a floating-point tensor of shape (N, C, *spatial), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{OP}: num_groups must be a positive divisor of the channel count C={c}, got {num_groups!r}")
    checks.non_negative(OP, "eps", eps)
    for name, p, shape in [("weight", weight, (c,)), ("bias", bias, (c,)), ("scale", scale, (n, c)),
                           ("shift", shift, (n, c))]:
        if p is None:
            continue
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating-point tensor of shape {shape}, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        if p.shape != shape:
            expected = "(C,)" if len(shape) == 1 else "(N, C), or (N, C, 1, ..., 1) of x's rank"
            raise ValueError(f"{OP}: {name} must have shape {shape} ({expected}), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{OP}: {name} must be on the device of x ({x.device}), got {p.device}")
    return _act_code(act)


def collapse_problem(name, t):
    """Why t (N, C, *spatial) cannot be viewed as (N, C, HW) by strides, or None."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    expected = None
    for size, stride in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return f"the spatial dims of {name} (strides {t.stride()}) do not collapse into one"
        expected = stride * size
    return None


def _stats_like(x, num_groups):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], num_groups), dtype=dtype)


def _group_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                    scale: Optional[Tensor], shift: Optional[Tensor],
                    act: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, num_groups, eps, scale, shift, act)
    return _run(x, weight, bias, num_groups, eps, scale, shift, act)


def _run(x, weight, bias, num_groups, eps, scale, shift, act):
    """The op's body after ``_check``: (y, mean, rstd) from the backend chosen for x."""
    return backend.run(OP, OP, x, x, weight, bias, scale, shift, num_groups, eps, _act_code(act),
                       layout_problem=collapse_problem("x", x))


group_norm_act_op = torch.library.custom_op("adv_dpm::group_norm_act", _group_norm_act, mutates_args=())


@group_norm_act_op.register_fake
def _(x, weight, bias, num_groups, eps, scale, shift, act):
    _check(x, weight, bias, num_groups, eps, scale, shift, act)
    return torch.empty_like(x), _stats_like(x, num_groups), _stats_like(x, num_groups)


def _group_norm_act_backward(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                             num_groups: int, act: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    code = _check(x, weight, bias, num_groups, 0.0, scale, shift, act)
    checks.like(OP, "grad_y", grad_y, "x", x)
    # grad_y may have any strides: the kernels copy one whose spatial dims do not collapse.
    return backend.run(OP, "group_norm_act_backward", x, grad_y, x, mean, rstd, weight, bias, scale, shift,
                       num_groups, code, layout_problem=collapse_problem("x", x))


group_norm_act_backward_op = torch.library.custom_op("adv_dpm::group_norm_act_backward", _group_norm_act_backward,
                                                     mutates_args=())


@group_norm_act_backward_op.register_fake
def _(grad_y, x, mean, rstd, weight, bias, scale, shift, num_groups, act):
    grads = [torch.empty_like(p) if p is not None else x.new_empty((0,)) for p in (weight, bias, scale, shift)]
    return (torch.empty_like(x), *grads)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, scale, shift, act = inputs
    ctx.num_groups, ctx.eps, ctx.act, ctx.forced_backend = num_groups, eps, act, backend.forced_backend()
    ctx.save_for_backward(x, output[1], output[2], weight, bias, scale, shift)
    # The statistics' gradients are never used: autograd would otherwise fill two (N, G) tensors
    # of zeros for them at every backward (two more kernels per call on a GPU).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    if grad_y is None:  # only the statistics were used
        return (None,) * 8
    x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
    if backend.double_backward():
        return backend.recomputed_grads(_group_norm_act, (x, weight, bias, ctx.num_groups, ctx.eps, scale, shift,
                                                          ctx.act), (grad_y, None, None))
    with backend.use_backend(ctx.forced_backend):  # CUDA autograd runs this on another thread
        grad_x, gw, gb, gscale, gshift = backend.call(group_norm_act_backward_op, _group_norm_act_backward, None,
                                                      grad_y, x, mean, rstd, weight, bias, scale, shift,
                                                      ctx.num_groups, ctx.act)
    some = lambda g, p: None if p is None else g  # noqa: E731
    return grad_x, some(gw, weight), some(gb, bias), None, None, some(gscale, scale), some(gshift, shift), None


group_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
_function = backend.autograd_function(_run, _setup_context, _backward)


def _differentiable(x, weight, bias, num_groups, eps, scale, shift, act):
    """The op, recording its gradient, its arguments checked once here; on the C++ and CUDA
    kernels less host time per call than through ``_function`` (benches/bench_host.py)."""
    code = _check(x, weight, bias, num_groups, eps, scale, shift, act)
    return backend.run_recording(_function, (x, weight, bias, num_groups, eps, scale, shift, act), x, OP,
                                 (x, weight, bias, scale, shift, num_groups, eps, code), collapse_problem("x", x))


def group_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float = 1e-5,
                   scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   act: Optional[str] = "silu") -> Tensor:
    """act(GroupNorm(x) * (1 + scale) + shift) for x (N, C, *spatial); scale, shift (N, C) or
    (N, C, 1, ..., 1) (the shape that broadcasts against x).

    Statistics in fp32, output in x's dtype; weight/bias (C,) may be fp32 while x is fp16/bf16.
    NCHW and channels_last x (and gradients of either layout) run without copies.
    """
    scale, shift = checks.flat_per_sample(scale, x, 2), checks.flat_per_sample(shift, x, 2)
    return backend.call(group_norm_act_op, _group_norm_act, _differentiable, x, weight, bias,
                        checks.number(num_groups), checks.number(eps), scale, shift, act)[0]
