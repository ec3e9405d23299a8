"""The plain PyTorch composites that the fused ops replace, written as ADM and the authors'
free-AT code write them (one kernel per operation, in the input dtype).

They are the baseline of the benchmarks and set the error budget of the tests: a fused
kernel in a low-precision dtype may be off the float64 oracle by about what these are.
"""
import torch


def _per_sample(c, like):
    return c.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noise_inject(x0, eps, c_signal, c_noise, delta=None, target="delta_detach"):
    cn = _per_sample(c_noise, x0)
    x_t = _per_sample(c_signal, x0) * x0 + cn * eps
    if delta is None:
        return x_t, eps
    shifted = {"original": eps, "delta": eps + delta / cn, "delta_detach": eps + delta.detach() / cn}[target]
    return x_t + delta, shifted


def adv_step(delta, grad, lr, radius, grad_scale=1.0):
    """Normalized L2 ascent + projection, with the non-finite guard; returns (delta, ||g||, ||delta||, skipped)."""
    b, view = delta.shape[0], (-1, *([1] * (delta.dim() - 1)))
    grad = grad / grad_scale
    grad_norm = grad.reshape(b, -1).norm(dim=1)
    skipped = ~torch.isfinite(grad_norm)
    moved = delta + lr * grad / grad_norm.clamp_min(1e-8).reshape(view)
    moved_norm = moved.reshape(b, -1).norm(dim=1)
    factor = (radius / moved_norm).clamp(max=1.0)
    new = torch.where(skipped.reshape(view), delta, moved * factor.reshape(view))
    return new, grad_norm, new.reshape(b, -1).norm(dim=1), skipped


def adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, target="delta_detach"):
    new, grad_norm, delta_norm, skipped = adv_step(delta, grad, lr, radius)
    x_adv = x_t + new
    tgt = eps if target == "original" else eps + new / _per_sample(c_noise, x_t)
    return new, x_adv, tgt, grad_norm, delta_norm, skipped


def group_norm_act(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu"):
    """ADM's way: GroupNorm32 (fp32 upcast, GroupNorm, cast back), * (1 + scale) + shift, SiLU."""
    ct = torch.promote_types(x.dtype, torch.float32)
    cast = lambda p: None if p is None else p.to(ct)  # noqa: E731
    h = torch.nn.functional.group_norm(x.to(ct), num_groups, cast(weight), cast(bias), eps).type(x.dtype)
    spatial = (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.to(x.dtype).reshape(*scale.shape, *spatial))
    if shift is not None:
        h = h + shift.to(x.dtype).reshape(*shift.shape, *spatial)
    return torch.nn.functional.silu(h) if act == "silu" else h


def group_norm_act_native(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu"):
    """The plainest form: F.group_norm, scale/shift and SiLU all in the input dtype."""
    cast = lambda p: None if p is None else p.to(x.dtype)  # noqa: E731
    h = torch.nn.functional.group_norm(x, num_groups, cast(weight), cast(bias), eps)
    spatial = (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + cast(scale).reshape(*scale.shape, *spatial))
    if shift is not None:
        h = h + cast(shift).reshape(*shift.shape, *spatial)
    return torch.nn.functional.silu(h) if act == "silu" else h
