"""Triton kernels of the single-step adversarial update of free AT (docs/OPS.md, adv_step).

A statistics pass (gg = sum g*g, dg = sum delta*g, dd = sum delta*delta, with
g = grad (+ grad_target / c_noise)) and an apply pass, in one of two forms:
  _adv_sample_kernel  samples of at most SAMPLE_MAX elements in a dense layout shared by every
                      tensor: one program per sample runs both passes (the apply pass re-reads
                      delta and g from cache). One launch: at these sizes a launch costs about as
                      much as the data.
  _adv_stats_kernel   otherwise, per (sample, block) partials of gg, dg, dd, then
  _adv_apply_kernel   in which every program sums its sample's partials in a fixed order
                      (deterministic, no atomics), computes step / scale / skip itself and writes
                      new_delta (and x_adv, target in the fused form); block 0 of each sample
                      writes grad_norm, delta_norm and skipped.

Works on GPU and under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""
import torch
import triton
import triton.language as tl

from ._common import (MIN_BLOCK, coef32, device_guard, fast_path, geometry, index_is_64bit, load32, np2, offset,
                      options, split, store, stride_args, tile, tiling)

GRAD_NORM_FLOOR = tl.constexpr(1e-8)
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest float32: x <= FLT_MAX is isfinite for x >= 0
# Partials are summed PART_CHUNK at a time (a power of two): fixed shapes, hence a fixed order.
PART_CHUNK = 128
# Samples of at most this many elements (ImageNet-64: 3 x 64 x 64 = 12288) take one program each,
# SAMPLE_BLOCK elements at a time.
SAMPLE_MAX, SAMPLE_BLOCK = 16384, 8192


@triton.jit
def _c_noise(cn_ptr, b, NEEDED: tl.constexpr):
    """c_noise[b] where the step needs it, else 1."""
    if NEEDED:
        return tl.load(cn_ptr + b)
    else:
        return 1.0


@triton.jit
def _grad(grad_ptr, gt_ptr, o_g, o_gt, m, c_n, HAS_GT: tl.constexpr):
    """g = grad (+ grad_target / c_noise) in fp32."""
    g = load32(grad_ptr, o_g, m)
    if HAS_GT:
        g = g + load32(gt_ptr, o_gt, m) / c_n
    return g


@triton.jit
def _apply_inputs(delta_ptr, grad_ptr, gt_ptr, xt_ptr, eps_ptr, o_d, o_g, o_gt, o_xt, o_e, m, c_n,
                  HAS_GT: tl.constexpr, HAS_XT: tl.constexpr):
    """(delta, g, x_t, eps) of the apply pass in fp32 (x_t, eps: delta when not HAS_XT, unused)."""
    d = load32(delta_ptr, o_d, m)
    g = _grad(grad_ptr, gt_ptr, o_g, o_gt, m, c_n, HAS_GT)
    if HAS_XT:
        return d, g, load32(xt_ptr, o_xt, m), load32(eps_ptr, o_e, m)
    else:
        return d, g, d, d


@triton.jit
def _step_scalars(gg, dg, dd, lr, radius, gs_ptr, HAS_SCALE: tl.constexpr):
    """(ok, grad_norm, step, scale, delta_norm) of one sample from its statistics (docs/OPS.md);
    the loss scale is read from gs_ptr (HAS_SCALE), else 1."""
    lr = tl.cast(lr, tl.float32)
    radius = tl.cast(radius, tl.float32)
    ok = gg <= FLT_MAX  # false for inf and nan: a non-finite element of g, or overflow
    if HAS_SCALE:
        grad_scale = tl.load(gs_ptr)
        ok = ok & (grad_scale > 0.0) & (grad_scale <= FLT_MAX)  # a loss scale that is a finite number > 0
    else:
        grad_scale = 1.0
    grad_norm = tl.sqrt(gg) / grad_scale
    step = lr / tl.maximum(grad_norm, GRAD_NORM_FLOOR) / grad_scale
    step = tl.where(ok, step, 0.0)
    n = tl.sqrt(tl.maximum(dd + 2.0 * step * dg + step * step * gg, 0.0))
    over = n > radius
    scale = tl.where(over, radius / tl.where(over, n, 1.0), 1.0)
    delta_norm = tl.where(ok, tl.minimum(n, radius), tl.sqrt(dd))
    return ok, grad_norm, step, scale, delta_norm


@triton.jit
def _write(nd_ptr, xadv_ptr, tgt_ptr, o_nd, o_xa, o_tg, m, d, g, x_t, e, c_n, ok, step, scale,
           HAS_XT: tl.constexpr, DELTA_TARGET: tl.constexpr):
    """new_delta (delta itself when the sample is skipped), and x_adv, target in the fused form."""
    new = tl.where(ok, scale * (d + step * g), d)
    store(nd_ptr, o_nd, new, m)
    if HAS_XT:
        store(xadv_ptr, o_xa, x_t + new, m)
        if DELTA_TARGET:
            store(tgt_ptr, o_tg, e + new / c_n, m)
        else:
            store(tgt_ptr, o_tg, e, m)


@triton.jit
def _store_norms(gnorm_ptr, dnorm_ptr, skip_ptr, b, ok, grad_norm, delta_norm):
    tl.store(gnorm_ptr + b, grad_norm)
    tl.store(dnorm_ptr + b, delta_norm)
    tl.store(skip_ptr + b, tl.where(ok, 0, 1).to(tl.int8))


@triton.jit
def _adv_sample_kernel(delta_ptr, grad_ptr, gt_ptr, xt_ptr, eps_ptr, cn_ptr,
                       nd_ptr, xadv_ptr, tgt_ptr, gnorm_ptr, dnorm_ptr, skip_ptr,
                       lr, radius, gs_ptr, N,
                       HAS_GT: tl.constexpr, HAS_XT: tl.constexpr, DELTA_TARGET: tl.constexpr,
                       HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    c_n = _c_noise(cn_ptr, b, HAS_GT or DELTA_TARGET)
    acc_gg = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_dg = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_dd = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < N
        o = base + i
        d = load32(delta_ptr, o, m)
        g = _grad(grad_ptr, gt_ptr, o, o, m, c_n, HAS_GT)
        acc_gg += g * g
        acc_dg += d * g
        acc_dd += d * d
    ok, grad_norm, step, scale, delta_norm = _step_scalars(
        tl.sum(acc_gg, axis=0), tl.sum(acc_dg, axis=0), tl.sum(acc_dd, axis=0), lr, radius, gs_ptr, HAS_SCALE)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < N
        o = base + i
        d, g, x_t, e = _apply_inputs(delta_ptr, grad_ptr, gt_ptr, xt_ptr, eps_ptr, o, o, o, o, o, m, c_n,
                                     HAS_GT, HAS_XT)
        _write(nd_ptr, xadv_ptr, tgt_ptr, o, o, o, m, d, g, x_t, e, c_n, ok, step, scale, HAS_XT, DELTA_TARGET)
    _store_norms(gnorm_ptr, dnorm_ptr, skip_ptr, b, ok, grad_norm, delta_norm)


@triton.jit
def _adv_stats_kernel(delta_ptr, grad_ptr, gt_ptr, cn_ptr, part_ptr,
                      B, N, NB, s2, s3,
                      d_s0, d_s1, d_s2, d_s3, g_s0, g_s1, g_s2, g_s3, gt_s0, gt_s1, gt_s2, gt_s3,
                      HAS_GT: tl.constexpr, FAST: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    b, blk, i, m = tile(NB, N, BLOCK, I64)
    if FAST:
        o = b * N + i
        o_d = o
        o_g = o
        o_gt = o
    else:
        i1, i2, i3 = split(i, s2, s3)
        o_d = offset(b, i1, i2, i3, d_s0, d_s1, d_s2, d_s3)
        o_g = offset(b, i1, i2, i3, g_s0, g_s1, g_s2, g_s3)
        o_gt = offset(b, i1, i2, i3, gt_s0, gt_s1, gt_s2, gt_s3)
    d = load32(delta_ptr, o_d, m)
    g = _grad(grad_ptr, gt_ptr, o_g, o_gt, m, _c_noise(cn_ptr, b, HAS_GT), HAS_GT)
    # part[k, b, blk]: k = 0 gg, 1 dg, 2 dd.
    pb = part_ptr + b * NB + blk
    tl.store(pb, tl.sum(g * g, axis=0))
    tl.store(pb + B * NB, tl.sum(d * g, axis=0))
    tl.store(pb + 2 * B * NB, tl.sum(d * d, axis=0))


@triton.jit
def _adv_apply_kernel(delta_ptr, grad_ptr, gt_ptr, xt_ptr, eps_ptr, cn_ptr, part_ptr,
                      nd_ptr, xadv_ptr, tgt_ptr, gnorm_ptr, dnorm_ptr, skip_ptr,
                      lr, radius, gs_ptr,
                      B, N, NB, s2, s3,
                      d_s0, d_s1, d_s2, d_s3, g_s0, g_s1, g_s2, g_s3, gt_s0, gt_s1, gt_s2, gt_s3,
                      xt_s0, xt_s1, xt_s2, xt_s3, e_s0, e_s1, e_s2, e_s3,
                      nd_s0, nd_s1, nd_s2, nd_s3, xa_s0, xa_s1, xa_s2, xa_s3, tg_s0, tg_s1, tg_s2, tg_s3,
                      HAS_GT: tl.constexpr, HAS_XT: tl.constexpr, DELTA_TARGET: tl.constexpr, HAS_SCALE: tl.constexpr,
                      FAST: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    b, blk, i, m = tile(NB, N, BLOCK, I64)

    # The element loads first: their latency then overlaps the (small) partial reduction.
    if FAST:
        o = b * N + i
        o_d = o
        o_g = o
        o_gt = o
        o_xt = o
        o_e = o
        o_nd = o
        o_xa = o
        o_tg = o
    else:
        i1, i2, i3 = split(i, s2, s3)
        o_d = offset(b, i1, i2, i3, d_s0, d_s1, d_s2, d_s3)
        o_g = offset(b, i1, i2, i3, g_s0, g_s1, g_s2, g_s3)
        o_gt = offset(b, i1, i2, i3, gt_s0, gt_s1, gt_s2, gt_s3)
        o_xt = offset(b, i1, i2, i3, xt_s0, xt_s1, xt_s2, xt_s3)
        o_e = offset(b, i1, i2, i3, e_s0, e_s1, e_s2, e_s3)
        o_nd = offset(b, i1, i2, i3, nd_s0, nd_s1, nd_s2, nd_s3)
        o_xa = offset(b, i1, i2, i3, xa_s0, xa_s1, xa_s2, xa_s3)
        o_tg = offset(b, i1, i2, i3, tg_s0, tg_s1, tg_s2, tg_s3)
    c_n = _c_noise(cn_ptr, b, HAS_GT or DELTA_TARGET)
    d, g, x_t, e = _apply_inputs(delta_ptr, grad_ptr, gt_ptr, xt_ptr, eps_ptr, o_d, o_g, o_gt, o_xt, o_e, m, c_n,
                                 HAS_GT, HAS_XT)

    # This sample's statistics: its NB partials, CHUNK at a time, then one tree sum (fixed order).
    acc_gg = tl.zeros((CHUNK,), dtype=tl.float32)
    acc_dg = tl.zeros((CHUNK,), dtype=tl.float32)
    acc_dd = tl.zeros((CHUNK,), dtype=tl.float32)
    pb = part_ptr + b * NB
    for start in range(0, NB, CHUNK):
        k = start + tl.arange(0, CHUNK)
        km = k < NB
        acc_gg += tl.load(pb + k, mask=km, other=0.0)
        acc_dg += tl.load(pb + B * NB + k, mask=km, other=0.0)
        acc_dd += tl.load(pb + 2 * B * NB + k, mask=km, other=0.0)
    ok, grad_norm, step, scale, delta_norm = _step_scalars(
        tl.sum(acc_gg, axis=0), tl.sum(acc_dg, axis=0), tl.sum(acc_dd, axis=0), lr, radius, gs_ptr, HAS_SCALE)

    _write(nd_ptr, xadv_ptr, tgt_ptr, o_nd, o_xa, o_tg, m, d, g, x_t, e, c_n, ok, step, scale, HAS_XT, DELTA_TARGET)
    if blk == 0:
        _store_norms(gnorm_ptr, dnorm_ptr, skip_ptr, b, ok, grad_norm, delta_norm)


def adv_step(delta, grad, grad_target, x_t, eps, c_noise, lr, radius, grad_scale, mode):
    """(new_delta, x_adv, target, grad_norm, delta_norm, skipped) of docs/OPS.md.

    new_delta is empty_like(delta); x_adv and target are empty_like(x_t) ((0,) without x_t, as
    in the reference and the fake functions); grad_norm, delta_norm float32 (B,); skipped bool.
    grad_target (if given) enters g = grad + grad_target / c_noise whatever the mode. grad_scale:
    None or a float32 tensor of one element, read by the kernels.
    """
    mode = int(mode)
    has_gt, has_xt = grad_target is not None, x_t is not None
    if (has_gt or (has_xt and mode != 0)) and c_noise is None:
        raise ValueError("adv_step: c_noise is required with grad_target or with x_t and mode >= 1")
    if has_xt and eps is None:
        raise ValueError("adv_step: eps is required with x_t")
    batch, n, s2, s3 = geometry(delta)
    new_delta = torch.empty_like(delta)
    if has_xt:
        x_adv, target = torch.empty_like(x_t), torch.empty_like(x_t)
    else:
        x_adv = target = delta.new_empty((0,))
    grad_norm = torch.empty((batch,), dtype=torch.float32, device=delta.device)
    delta_norm = torch.empty((batch,), dtype=torch.float32, device=delta.device)
    skipped = torch.empty((batch,), dtype=torch.bool, device=delta.device)
    cn32 = coef32(c_noise) if c_noise is not None else grad_norm
    gt = grad_target if has_gt else grad
    xt, e = (x_t, eps) if has_xt else (delta, delta)
    xa, tg = (x_adv, target) if has_xt else (new_delta, new_delta)
    stats_tensors = [delta, grad] + ([grad_target] if has_gt else [])
    apply_tensors = stats_tensors + [new_delta] + ([x_t, eps, x_adv, target] if has_xt else [])
    flags = dict(HAS_GT=has_gt, HAS_XT=has_xt, DELTA_TARGET=has_xt and mode != 0, HAS_SCALE=grad_scale is not None)
    step_args = (float(lr), float(radius), grad_norm if grad_scale is None else grad_scale)  # grad_norm: unread
    outputs = (new_delta, xa, tg, grad_norm, delta_norm, skipped.view(torch.int8))
    with device_guard(delta):
        if n <= SAMPLE_MAX and fast_path(*apply_tensors):
            block = min(SAMPLE_BLOCK, max(MIN_BLOCK, np2(n)))
            _adv_sample_kernel[(batch,)](delta, grad, gt, xt, e, cn32, *outputs, *step_args, n, **flags,
                                         BLOCK=block, **options(max(1, min(16, block // 512))))
        else:
            block, nb, warps = tiling(batch, n)
            part = torch.empty((3, batch, nb), dtype=torch.float32, device=delta.device)
            i64 = index_is_64bit(n)
            grid = (batch * nb,)
            _adv_stats_kernel[grid](
                delta, grad, gt, cn32, part, batch, n, nb, s2, s3, *stride_args(delta, grad, gt),
                HAS_GT=has_gt, FAST=fast_path(*stats_tensors), I64=i64, BLOCK=block, **options(warps))
            _adv_apply_kernel[grid](
                delta, grad, gt, xt, e, cn32, part, *outputs, *step_args,
                batch, n, nb, s2, s3, *stride_args(delta, grad, gt, xt, e, new_delta, xa, tg), **flags,
                FAST=fast_path(*apply_tensors), I64=i64, BLOCK=block,
                CHUNK=min(PART_CHUNK, np2(nb)), **options(warps))
    return new_delta, x_adv, target, grad_norm, delta_norm, skipped
