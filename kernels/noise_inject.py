"""Triton kernels of noise injection and its backward (docs/OPS.md).

    noise_inject:          x_t = c_signal*x0 + c_noise*eps (+ delta), target = eps (+ delta/c_noise)
    noise_inject_backward: element gradients in one pass, plus (coef_grads) per-(sample, block)
                           partials of the coefficient gradients, reduced in a fixed order by a
                           second tiny kernel (deterministic, no atomics).

Works on GPU and under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""
import torch
import triton
import triton.language as tl

from ._common import (cdiv, coef32, device_guard, fast_path, geometry, index_is_64bit, load32, np2, offset,
                      options, split, store, stride_args, tile, tiling)

ORIGINAL, DELTA_DETACH, DELTA = 0, 1, 2


@triton.jit
def _noise_inject_kernel(x0_ptr, eps_ptr, delta_ptr, cs_ptr, cn_ptr, xt_ptr, tgt_ptr,
                         N, NB, s2, s3,
                         x0_s0, x0_s1, x0_s2, x0_s3, eps_s0, eps_s1, eps_s2, eps_s3,
                         d_s0, d_s1, d_s2, d_s3, xt_s0, xt_s1, xt_s2, xt_s3,
                         tg_s0, tg_s1, tg_s2, tg_s3,
                         HAS_DELTA: tl.constexpr, DELTA_TARGET: tl.constexpr, FAST: tl.constexpr,
                         I64: tl.constexpr, BLOCK: tl.constexpr):
    b, blk, i, m = tile(NB, N, BLOCK, I64)
    if FAST:
        o = b * N + i
        o_x0 = o
        o_eps = o
        o_d = o
        o_xt = o
        o_tg = o
    else:
        i1, i2, i3 = split(i, s2, s3)
        o_x0 = offset(b, i1, i2, i3, x0_s0, x0_s1, x0_s2, x0_s3)
        o_eps = offset(b, i1, i2, i3, eps_s0, eps_s1, eps_s2, eps_s3)
        o_d = offset(b, i1, i2, i3, d_s0, d_s1, d_s2, d_s3)
        o_xt = offset(b, i1, i2, i3, xt_s0, xt_s1, xt_s2, xt_s3)
        o_tg = offset(b, i1, i2, i3, tg_s0, tg_s1, tg_s2, tg_s3)
    c_s = tl.load(cs_ptr + b)
    c_n = tl.load(cn_ptr + b)
    x0 = load32(x0_ptr, o_x0, m)
    e = load32(eps_ptr, o_eps, m)
    x_t = c_s * x0 + c_n * e
    target = e
    if HAS_DELTA:
        d = load32(delta_ptr, o_d, m)
        x_t = x_t + d
        if DELTA_TARGET:
            target = e + d / c_n
    store(xt_ptr, o_xt, x_t, m)
    store(tgt_ptr, o_tg, target, m)


@triton.jit
def _noise_inject_backward_kernel(gxt_ptr, gt_ptr, x0_ptr, eps_ptr, delta_ptr, cs_ptr, cn_ptr,
                                  gx0_ptr, geps_ptr, gd_ptr, part_ptr,
                                  B, N, NB, s2, s3,
                                  gxt_s0, gxt_s1, gxt_s2, gxt_s3, gt_s0, gt_s1, gt_s2, gt_s3,
                                  x0_s0, x0_s1, x0_s2, x0_s3, eps_s0, eps_s1, eps_s2, eps_s3,
                                  d_s0, d_s1, d_s2, d_s3, gx0_s0, gx0_s1, gx0_s2, gx0_s3,
                                  ge_s0, ge_s1, ge_s2, ge_s3, gd_s0, gd_s1, gd_s2, gd_s3,
                                  HAS_DELTA: tl.constexpr, MODE: tl.constexpr, COEF: tl.constexpr,
                                  FAST: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    b, blk, i, m = tile(NB, N, BLOCK, I64)
    if FAST:
        o = b * N + i
        o_gxt = o
        o_gt = o
        o_x0 = o
        o_eps = o
        o_d = o
        o_gx0 = o
        o_ge = o
        o_gd = o
    else:
        i1, i2, i3 = split(i, s2, s3)
        o_gxt = offset(b, i1, i2, i3, gxt_s0, gxt_s1, gxt_s2, gxt_s3)
        o_gt = offset(b, i1, i2, i3, gt_s0, gt_s1, gt_s2, gt_s3)
        o_x0 = offset(b, i1, i2, i3, x0_s0, x0_s1, x0_s2, x0_s3)
        o_eps = offset(b, i1, i2, i3, eps_s0, eps_s1, eps_s2, eps_s3)
        o_d = offset(b, i1, i2, i3, d_s0, d_s1, d_s2, d_s3)
        o_gx0 = offset(b, i1, i2, i3, gx0_s0, gx0_s1, gx0_s2, gx0_s3)
        o_ge = offset(b, i1, i2, i3, ge_s0, ge_s1, ge_s2, ge_s3)
        o_gd = offset(b, i1, i2, i3, gd_s0, gd_s1, gd_s2, gd_s3)
    c_s = tl.load(cs_ptr + b)
    c_n = tl.load(cn_ptr + b)
    gx = load32(gxt_ptr, o_gxt, m)
    gt = load32(gt_ptr, o_gt, m)
    store(gx0_ptr, o_gx0, c_s * gx, m)
    store(geps_ptr, o_ge, c_n * gx + gt, m)
    if HAS_DELTA:
        if MODE == 2:
            store(gd_ptr, o_gd, gx + gt / c_n, m)
        else:
            store(gd_ptr, o_gd, gx, m)
    if COEF:
        # Partials of this (sample, block): part[k, b, blk], k = 0: sum gx*x0, 1: sum gx*eps,
        # 2: sum gt*delta (only when the target depends on delta).
        pb = part_ptr + b * NB + blk
        x0 = load32(x0_ptr, o_x0, m)
        tl.store(pb, tl.sum(gx * x0, axis=0))
        e = load32(eps_ptr, o_eps, m)
        tl.store(pb + B * NB, tl.sum(gx * e, axis=0))
        if HAS_DELTA and MODE >= 1:
            d = load32(delta_ptr, o_d, m)
            tl.store(pb + 2 * B * NB, tl.sum(gt * d, axis=0))


@triton.jit
def _coef_grads_kernel(part_ptr, cn_ptr, gcs_ptr, gcn_ptr, B, NB,
                       DELTA_TERM: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """grad_c_signal, grad_c_noise of ROWS samples from their NB partials, in a fixed order."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * NB
    acc_s = tl.zeros((ROWS, COLS), dtype=tl.float32)
    acc_n = tl.zeros((ROWS, COLS), dtype=tl.float32)
    acc_d = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for start in range(0, NB, COLS):
        cols = start + tl.arange(0, COLS)
        mk = rmask[:, None] & (cols[None, :] < NB)
        p = part_ptr + base + cols[None, :]
        acc_s += tl.load(p, mask=mk, other=0.0)
        acc_n += tl.load(p + B * NB, mask=mk, other=0.0)
        if DELTA_TERM:
            acc_d += tl.load(p + 2 * B * NB, mask=mk, other=0.0)
    s_s = tl.sum(acc_s, axis=1)
    s_n = tl.sum(acc_n, axis=1)
    if DELTA_TERM:
        c_n = tl.load(cn_ptr + rows, mask=rmask, other=1.0)
        s_n = s_n - tl.sum(acc_d, axis=1) / (c_n * c_n)
    tl.store(gcs_ptr + rows, s_s.to(gcs_ptr.dtype.element_ty), mask=rmask)
    tl.store(gcn_ptr + rows, s_n.to(gcn_ptr.dtype.element_ty), mask=rmask)


def noise_inject(x0, eps, c_signal, c_noise, delta, mode):
    """(x_t, target) of docs/OPS.md, both in x0's dtype and layout (empty_like(x0))."""
    mode = int(mode)
    has_delta = delta is not None
    x_t, target = torch.empty_like(x0), torch.empty_like(x0)
    d = delta if has_delta else x0
    batch, n, s2, s3 = geometry(x0)
    block, nb, warps = tiling(batch, n)
    with device_guard(x0):
        _noise_inject_kernel[(batch * nb,)](
            x0, eps, d, coef32(c_signal), coef32(c_noise), x_t, target,
            n, nb, s2, s3, *stride_args(x0, eps, d, x_t, target),
            HAS_DELTA=has_delta, DELTA_TARGET=has_delta and mode != ORIGINAL,
            FAST=fast_path(x0, eps, d, x_t, target), I64=index_is_64bit(n), BLOCK=block, **options(warps))
    return x_t, target


def noise_inject_backward(grad_x_t, grad_target, x0, eps, c_signal, c_noise, delta, mode, coef_grads):
    """(grad_x0, grad_eps, grad_delta, grad_c_signal, grad_c_noise) of docs/OPS.md.

    Element gradients are empty_like(x0) (the layout of the forward's input, as the reference and
    the fake function allocate them); grad_delta is (0,) without delta; the coefficient gradients
    are (B,) in the coefficients' dtypes, or (0,) when coef_grads is false (x0, eps and delta are
    then not read).
    """
    mode, coef_grads = int(mode), bool(coef_grads)
    has_delta = delta is not None
    grad_x0, grad_eps = torch.empty_like(x0), torch.empty_like(x0)
    grad_delta = torch.empty_like(x0) if has_delta else x0.new_empty((0,))
    d = delta if has_delta else x0
    gd = grad_delta if has_delta else grad_x0
    batch, n, s2, s3 = geometry(x0)
    block, nb, warps = tiling(batch, n)
    delta_term = coef_grads and has_delta and mode != ORIGINAL
    cn32 = coef32(c_noise)
    if coef_grads:
        part = torch.empty((3 if delta_term else 2, batch, nb), dtype=torch.float32, device=x0.device)
        grad_cs = torch.empty((batch,), dtype=c_signal.dtype, device=c_signal.device)
        grad_cn = torch.empty((batch,), dtype=c_noise.dtype, device=c_noise.device)
    else:
        part = cn32  # not touched
        grad_cs, grad_cn = c_signal.new_empty((0,)), c_noise.new_empty((0,))
    # Tensors not read (x0/eps/delta without coef_grads) still pass their strides but do not
    # decide the fast path.
    touched = [grad_x_t, grad_target, grad_x0, grad_eps] + ([grad_delta] if has_delta else [])
    if coef_grads:
        touched += [x0, eps] + ([delta] if delta_term else [])
    with device_guard(x0):
        _noise_inject_backward_kernel[(batch * nb,)](
            grad_x_t, grad_target, x0, eps, d, coef32(c_signal), cn32, grad_x0, grad_eps, gd, part,
            batch, n, nb, s2, s3, *stride_args(grad_x_t, grad_target, x0, eps, d, grad_x0, grad_eps, gd),
            HAS_DELTA=has_delta, MODE=mode, COEF=coef_grads, FAST=fast_path(*touched),
            I64=index_is_64bit(n), BLOCK=block, **options(warps))
        if coef_grads:
            rows = min(32, np2(batch))
            cols = min(128, np2(nb))
            _coef_grads_kernel[(cdiv(batch, rows),)](
                part, cn32, grad_cs, grad_cn, batch, nb, DELTA_TERM=delta_term, ROWS=rows, COLS=cols,
                **options(4))
    return grad_x0, grad_eps, grad_delta, grad_cs, grad_cn
