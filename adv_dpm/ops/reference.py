"""Pure-PyTorch oracle of every fused op: the executable form of docs/OPS.md.

Each function has the arguments of the private compiled op of the same name (``mode`` as an
int, optional tensors as None) and computes in ``promote_types(dtype, float32)``, so that
float64 inputs give float64 results for gradcheck. Outputs are written into ``empty_like``
tensors so their layout matches the fake functions and the kernels.
"""
import torch
from torch import Tensor

ORIGINAL, DELTA_DETACH, DELTA = 0, 1, 2
GRAD_NORM_FLOOR = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def per_sample(c: Tensor, like: Tensor) -> Tensor:
    """(B,) coefficients as (B, 1, ..., 1) in the compute dtype of ``like``."""
    return c.to(compute_dtype(like.dtype)).reshape(-1, *([1] * (like.dim() - 1)))


def sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def written_like(ref: Tensor, value: Tensor) -> Tensor:
    out = torch.empty_like(ref)
    out.copy_(value)
    return out


def empty(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


def noise_inject(x0, eps, c_signal, c_noise, delta, mode):
    ct = compute_dtype(x0.dtype)
    e = eps.to(ct)
    cn = per_sample(c_noise, x0)
    x_t = per_sample(c_signal, x0) * x0.to(ct) + cn * e
    target = e
    if delta is not None:
        x_t = x_t + delta.to(ct)
        if mode != ORIGINAL:  # autograd through this oracle follows the target's stop-gradient
            target = e + (delta.detach() if mode == DELTA_DETACH else delta).to(ct) / cn
    return written_like(x0, x_t), written_like(x0, target)


def noise_inject_backward(grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta, mode, coef_grads):
    ct = compute_dtype(x0.dtype)
    gx, gt = grad_x_t.to(ct), grad_target.to(ct)
    cs, cn = per_sample(c_signal, x0), per_sample(c_noise, x0)
    grad_x0 = written_like(x0, cs * gx)
    grad_eps = written_like(x0, cn * gx + gt)
    grad_delta = empty(x0)
    if delta is not None:
        grad_delta = written_like(x0, gx + gt / cn if mode == DELTA else gx)
    grad_cs, grad_cn = empty(c_signal), empty(c_noise)
    if coef_grads:
        grad_cs = sample_sum(gx * x0.to(ct))
        grad_cn = sample_sum(gx * eps.to(ct))
        if delta is not None and mode != ORIGINAL:
            grad_cn = grad_cn - sample_sum(gt * delta.to(ct)) / c_noise.to(ct) ** 2
        grad_cs, grad_cn = grad_cs.to(c_signal.dtype), grad_cn.to(c_noise.dtype)
    return grad_x0, grad_eps, grad_delta, grad_cs, grad_cn


def adv_step(delta, grad, grad_target, x_t, eps, c_noise, lr, radius, grad_scale, mode):
    ct = compute_dtype(delta.dtype)
    d, g = delta.to(ct), grad.to(ct)
    if grad_target is not None:
        g = g + grad_target.to(ct) / per_sample(c_noise, delta)
    b = (-1, *([1] * (delta.dim() - 1)))
    gg = sample_sum(g * g)
    skipped = ~torch.isfinite(gg)   # a non-finite element of g, or an overflowing norm
    gs = 1.0 if grad_scale is None else grad_scale.reshape(()).to(ct)
    if grad_scale is not None:   # or a loss scale that is not a finite number > 0
        skipped |= ~(torch.isfinite(gs) & (gs > 0))
    grad_norm = gg.sqrt() / gs
    step = lr / grad_norm.clamp_min(GRAD_NORM_FLOOR) / gs
    moved = d + step.reshape(b) * g
    n = sample_sum(moved * moved).sqrt()
    scale = torch.where(n > radius, radius / n, torch.ones_like(n))
    new = torch.where(skipped.reshape(b), d, moved * scale.reshape(b))
    delta_norm = torch.where(skipped, sample_sum(d * d).sqrt(), n.clamp_max(radius))
    x_adv, target = empty(delta), empty(delta)
    if x_t is not None:
        x_adv = written_like(x_t, x_t.to(ct) + new)
        e = eps.to(ct)
        target = written_like(x_t, e + new / per_sample(c_noise, x_t) if mode != ORIGINAL else e)
    return (written_like(delta, new), x_adv, target, grad_norm.float(), delta_norm.float(), skipped)


def group_view(x, num_groups):
    """x (N, C, *spatial) as (N, G, C/G, HW) in the compute dtype."""
    n, c = x.shape[:2]
    return x.to(compute_dtype(x.dtype)).reshape(n, num_groups, c // num_groups, -1)


def channel_params(x, weight, bias, scale, shift):
    """weight, bias as (1, C, 1); 1 + scale, shift as (N, C, 1); identities where not given."""
    ct = compute_dtype(x.dtype)
    n, c = x.shape[:2]
    ones, zeros = x.new_ones((1, c, 1), dtype=ct), x.new_zeros((1, c, 1), dtype=ct)
    w = ones if weight is None else weight.to(ct).reshape(1, c, 1)
    b = zeros if bias is None else bias.to(ct).reshape(1, c, 1)
    k = ones if scale is None else 1 + scale.to(ct).reshape(n, c, 1)
    s = zeros if shift is None else shift.to(ct).reshape(n, c, 1)
    return w, b, k, s


def group_norm_act(x, weight, bias, scale, shift, num_groups, eps, act):
    n, c = x.shape[:2]
    xg = group_view(x, num_groups)
    mean = xg.mean(dim=(2, 3), keepdim=True)
    var = (xg - mean).square().mean(dim=(2, 3), keepdim=True)
    rstd = (var + eps).rsqrt()
    xhat = ((xg - mean) * rstd).reshape(n, c, -1)
    w, b, k, s = channel_params(x, weight, bias, scale, shift)
    z = (xhat * w + b) * k + s
    y = torch.nn.functional.silu(z) if act else z
    return written_like(x, y.reshape(x.shape)), mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


def group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, scale, shift, num_groups, act):
    ct = compute_dtype(x.dtype)
    n, c = x.shape[:2]
    m = x[0].numel() // num_groups
    mean_, rstd_ = mean.to(ct).reshape(n, num_groups, 1, 1), rstd.to(ct).reshape(n, num_groups, 1, 1)
    xhat = ((group_view(x, num_groups) - mean_) * rstd_).reshape(n, c, -1)
    w, b, k, s = channel_params(x, weight, bias, scale, shift)
    a = xhat * w + b
    gz = grad_y.to(ct).reshape(n, c, -1)
    if act:
        z = a * k + s
        sig = torch.sigmoid(z)
        gz = gz * sig * (1 + z * (1 - sig))
    s1, s2 = gz.sum(2, keepdim=True), (gz * xhat).sum(2, keepdim=True)
    kw = (k * w)
    dxhat = (gz * kw).reshape(n, num_groups, -1)
    xh = xhat.reshape(n, num_groups, -1)
    grad_x = rstd_.reshape(n, num_groups, 1) * (dxhat - dxhat.sum(2, keepdim=True) / m
                                                 - xh * (dxhat * xh).sum(2, keepdim=True) / m)
    grads = [written_like(x, grad_x.reshape(x.shape))]
    for p, g in [(weight, (k * s2).sum((0, 2))), (bias, (k * s1).sum((0, 2))),
                 (scale, (w * s2 + b * s1).reshape(n, c)), (shift, s1.reshape(n, c))]:
        grads.append(empty(x) if p is None else g.to(p.dtype))
    return tuple(grads)
