"""Triton kernels of GroupNorm + per-sample scale/shift + SiLU and its backward (docs/OPS.md).

x (N, C, *spatial) is viewed as (N, C, HW) with strides (sN, sC, sHW) (the spatial dims collapse
into one: contiguous NCHW gives sHW = 1, channels_last gives sC = 1); every big tensor (x, y,
grad_y, grad_x) is indexed by its own three strides, the constexpr flags UNIT_C / UNIT_HW
replace a stride by 1 when it is 1 in every tensor of a launch (contiguity the compiler can see:
vector loads). Offsets inside a sample are int32 unless a sample spans more than 2**31 elements
(I64); the sample base n * sN is always 64-bit.

A group is CG = C / G channels x HW positions. Group-wise kernels tile a block of GB groups as a
(GB, CGP, BHW) tile (CGP = CG padded to a power of two; channel c = g * CG + ci), the per-channel
(split backward) kernels a flat (BC, BHW) tile. Three plans, chosen per call:

  ONE     (CGP * HWP <= FUSED_MAX) one program per block of GB groups holds the whole group in
          registers: one read, exact two-pass statistics, one write. Backward: one read of x and
          grad_y, per-channel S1 / S2 and the group means A / Bg in registers, one write of
          grad_x (plus S1 / S2 to a (2, N, C) buffer when a parameter gradient is needed).
  LOOPED  (the group does not fit, N * G >= TARGET_PROGRAMS programs keep the GPU busy and a
          group is at most LOOP_MAX_BYTES) the same, with two loops over the group's HW tiles: the
          second pass re-reads the group, recently read by the same program (L2).
  SPLIT   (few large groups: small batch) statistics and gradient sums are split over HW chunks:
          forward:  _gn_fwd_stats_kernel    programs over (n, group block, chunk of HW tiles) write
                                            per-chunk (mean, M2) partials (two-pass per tile, the
                                            chunk's tiles merged in order with Chan's formula);
                    _gn_fwd_apply_kernel    fully parallel over (n, group block, HW tile): combines
                                            its groups' partials in a fixed order (Chan's parallel
                                            formula; tile 0 writes mean / rstd) and writes y. When
                                            a tile holds many groups (channels_last), a small
                                            _gn_fwd_combine_kernel combines them once instead.
          backward: _gn_bwd_partial_kernel  per-(n, c, chunk) partial S1 = sum gz, S2 = sum gz*xhat;
                    _gn_bwd_reduce_kernel   per group: S1, S2 of each (n, c) (chunks in order), A, Bg,
                                            and the parameter gradients (sum over n in order);
                    _gn_bwd_dx_kernel       fully parallel over (n, channel block, HW tile): grad_x.
The parameter gradients come from _gn_bwd_reduce_kernel in every plan. No atomics: the results
are bit-identical from run to run.

Statistics in fp32: per tile two-pass with the correction term (mean += sum(d)/n,
M2 = sum d^2 - (sum d)^2/n, d = x - mean), tiles and chunks merged with Chan's formula, never
E[x^2] - E[x]^2. weight / bias / scale / shift are read in their own dtype and strides and
converted to fp32 in the kernel (no copies); their gradients are written in their dtype.

Works on GPU and under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors.
"""
import inspect
import math
import warnings

import torch
import triton
import triton.language as tl

from ._common import INT32_MAX, TARGET_PROGRAMS, cdiv, device_guard, np2, options, store

# Plan sizes (module globals, read at every call: tests shrink them to force a plan, and
# benches/tune_group_norm.py times alternatives on a GPU).
FUSED_MAX = 8192          # largest padded group (CGP * HWP) a ONE program holds in registers
FUSED_TILE = 4096         # ONE programs pack small groups up to this many elements
TILE = 4096               # elements of a LOOPED / SPLIT tile
MIN_TILE = 1024           # SPLIT tiles shrink down to this size while there are too few programs
LOOP_MAX_BYTES = 256 * 1024  # largest group (bytes of x; x + grad_y backward) LOOPED re-reads
CL_CHANNELS = 64          # channels (padded) of a tile when channels are contiguous in memory
                          # (64 bf16 = one 128-byte line per row)
MAX_CHUNKS = 64           # chunks per group / channel of the SPLIT reductions
COMBINE_IN_APPLY = 64     # SPLIT forward: apply programs combine GB x NCP partials up to this many,
                          # else a small kernel combines them once (N * G groups)
SPLIT_PROGRAMS = 2 * TARGET_PROGRAMS  # SPLIT reductions merge tiles while this many programs remain
REDUCE_TILE = 4096        # elements of a _gn_bwd_reduce_kernel tile
WARPS = ((1024, 4), (4096, 8), (math.inf, 16))  # (largest tile in elements, num_warps) of the tiled kernels
ONE, LOOPED, SPLIT = "one", "looped", "split"
FORCE_PLAN = None         # tests: force a plan (None: automatic; a forced ONE falls back when too big)
FORCE_I64 = False         # tests: 64-bit in-sample offsets even for small tensors


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _group_channels(gb, G, CG: tl.constexpr, GB: tl.constexpr, CGP: tl.constexpr):
    """Groups gi (GB,), channels c (GB, CGP) and their mask of group block gb."""
    gi = gb * GB + tl.arange(0, GB)
    ci = tl.arange(0, CGP)
    c = gi[:, None] * CG + ci[None, :]
    cm = (gi[:, None] < G) & (ci[None, :] < CG)
    return gi, c, cm


@triton.jit
def _scaled(c, hw, sC, sHW, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """c * sC and hw * sHW, unit strides left out (Triton then sees contiguous accesses)."""
    if I64:
        c = c.to(tl.int64)
        hw = hw.to(tl.int64)
    if UNIT_C:
        oc = c
    else:
        oc = c * sC
    if UNIT_HW:
        oh = hw
    else:
        oh = hw * sHW
    return oc, oh


@triton.jit
def _off3(c, hw, sC, sHW, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """In-sample offsets (GB, CGP, BHW) of channels c (GB, CGP) at positions hw (BHW,)."""
    oc, oh = _scaled(c, hw, sC, sHW, UNIT_C, UNIT_HW, I64)
    return oc[:, :, None] + oh[None, None, :]


@triton.jit
def _off2(c, hw, sC, sHW, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """In-sample offsets (BC, BHW) of channels c (BC,) at positions hw (BHW,)."""
    oc, oh = _scaled(c, hw, sC, sHW, UNIT_C, UNIT_HW, I64)
    return oc[:, None] + oh[None, :]


@triton.jit
def _ld3(ptr, c, hw, sC, sHW, m, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """fp32 (GB, CGP, BHW) tile of a sample at ptr (masked lanes 0)."""
    return tl.load(ptr + _off3(c, hw, sC, sHW, UNIT_C, UNIT_HW, I64), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _ld2(ptr, c, hw, sC, sHW, m, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """fp32 (BC, BHW) tile of a sample at ptr (masked lanes 0)."""
    return tl.load(ptr + _off2(c, hw, sC, sHW, UNIT_C, UNIT_HW, I64), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_SHIFT: tl.constexpr):
    """fp32 weight, bias, k = 1 + scale, shift of channels c of sample n (identities if absent)."""
    zero = tl.zeros_like(c).to(tl.float32)
    w = zero + 1.0
    b = zero
    k = zero + 1.0
    s = zero
    if HAS_W:
        w = tl.load(w_ptr + c * w_s, mask=cm, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c * b_s, mask=cm, other=0.0).to(tl.float32)
    if HAS_SCALE:
        k = 1.0 + tl.load(sc_ptr + n * sc_sN + c * sc_sC, mask=cm, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        s = tl.load(sh_ptr + n * sh_sN + c * sh_sC, mask=cm, other=0.0).to(tl.float32)
    return w, b, k, s


# tl.reshape(can_reorder=True) lets _group_sum add each thread's elements first. Triton 3.9
# deprecates the flag and a later one may drop it: used while Triton takes it (its warning is known).
REORDER_SUMS = tl.constexpr("can_reorder" in inspect.signature(tl.reshape).parameters)
warnings.filterwarnings("ignore", message=r"tl\.reshape\(can_reorder=True\) is deprecated")


@triton.jit
def _group_sum(t):
    """Per-group sums (axis 0) of a (GB, CGP, BHW) tile, in one reduction: each thread first adds
    the elements it holds, whichever axes they lie on (nested sums over one axis and then the other
    move GB x CGP partial sums between threads when channels are the thread-local axis)."""
    GB: tl.constexpr = t.shape[0]
    if REORDER_SUMS:
        return tl.sum(tl.reshape(t, (GB, t.shape[1] * t.shape[2]), can_reorder=True), axis=1)
    else:
        return tl.sum(tl.reshape(t, (GB, t.shape[1] * t.shape[2])), axis=1)


@triton.jit
def _tile_moments(x, m, cnt):
    """(mean, M2) per group (axis 0) of a masked (GB, CGP, BHW) fp32 tile of cnt valid elements
    per group: two-pass with the correction term."""
    mean = _group_sum(x) / cnt
    d = tl.where(m, x - mean[:, None, None], 0.0)
    sd = _group_sum(d)
    m2 = _group_sum(d * d) - sd * sd / cnt
    return mean + sd / cnt, tl.maximum(m2, 0.0)


@triton.jit
def _range_moments(x_n, c, cm, sC, sHW, HW, t0, t1, CG: tl.constexpr, GB: tl.constexpr,
                   BHW: tl.constexpr, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """(mean, M2, count) per group of the HW tiles [t0, t1): tiles merged in order (Chan)."""
    cnt_a = 0.0
    mean_a = tl.zeros((GB,), dtype=tl.float32)
    m2_a = tl.zeros((GB,), dtype=tl.float32)
    for t in range(t0, t1):
        hw = t * BHW + tl.arange(0, BHW)
        m = cm[:, :, None] & (hw < HW)[None, None, :]
        x = _ld3(x_n, c, hw, sC, sHW, m, UNIT_C, UNIT_HW, I64)
        cnt_t = tl.cast(CG * tl.minimum(HW - t * BHW, BHW), tl.float32)
        mean_t, m2_t = _tile_moments(x, m, cnt_t)
        tot = cnt_a + cnt_t
        f = cnt_t / tot
        delta = mean_t - mean_a
        mean_a = mean_a + delta * f
        m2_a = m2_a + m2_t + delta * delta * (cnt_a * f)
        cnt_a = tot
    return mean_a, m2_a, cnt_a


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _xhat_gz(x, gy, mean, rstd, wk, bks, ACT: tl.constexpr):
    """xhat and gz = dL/dz (grad_y * silu'(z) or grad_y); per-channel terms broadcast."""
    xhat = (x - mean) * rstd
    if ACT:
        z = xhat * wk + bks
        sg = tl.sigmoid(z)
        gz = gy * (sg * (1.0 + z * (1.0 - sg)))
    else:
        gz = gy
    return xhat, gz


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gn_fwd_fused_kernel(x_ptr, y_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr,
                         G, HW, NGB, NT, cnt_f, eps,
                         x_sN, x_sC, x_sHW, y_sN, y_sC, y_sHW,
                         w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                         CG: tl.constexpr, GB: tl.constexpr, CGP: tl.constexpr, BHW: tl.constexpr,
                         ONE_TILE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                         UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """ONE / LOOPED forward: program (n, group block gb), groups gb*GB .. gb*GB+GB-1."""
    pid = tl.program_id(0)
    n = pid // NGB
    gb = pid - n * NGB
    n = n.to(tl.int64)
    eps = tl.cast(eps, tl.float32)
    gi, c, cm = _group_channels(gb, G, CG, GB, CGP)
    x_n = x_ptr + n * x_sN
    y_n = y_ptr + n * y_sN
    if ONE_TILE:
        hw = tl.arange(0, BHW)
        m = cm[:, :, None] & (hw < HW)[None, None, :]
        x = _ld3(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
        # The channel parameters are loaded beside x, so that their memory latency overlaps its
        # instead of following the reductions. (LOOPED loads them after its statistics loop: held
        # through it, they would cost registers, and so occupancy, for little gain.)
        w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                     sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        cnt = tl.cast(cnt_f, tl.float32)
        mean, m2 = _tile_moments(x, m, cnt)
    else:
        mean, m2, cnt = _range_moments(x_n, c, cm, x_sC, x_sHW, HW, 0, NT, CG, GB, BHW, UNIT_C, UNIT_HW, I64)
        w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                     sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    rstd = tl.rsqrt(m2 / cnt + eps)
    gm = gi < G
    tl.store(mean_ptr + n * G + gi, mean, mask=gm)
    tl.store(rstd_ptr + n * G + gi, rstd, mask=gm)

    alpha = (rstd[:, None] * w * k)[:, :, None]
    beta = (b * k + s)[:, :, None]
    mu = mean[:, None, None]
    if ONE_TILE:
        z = _act((x - mu) * alpha + beta, ACT)
        store(y_n, _off3(c, hw, y_sC, y_sHW, UNIT_C, UNIT_HW, I64), z, m)
    else:
        for t in range(0, NT):
            hw = t * BHW + tl.arange(0, BHW)
            m = cm[:, :, None] & (hw < HW)[None, None, :]
            x = _ld3(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
            z = _act((x - mu) * alpha + beta, ACT)
            store(y_n, _off3(c, hw, y_sC, y_sHW, UNIT_C, UNIT_HW, I64), z, m)


@triton.jit
def _gn_fwd_stats_kernel(x_ptr, part_ptr, G, HW, NGB, NT, NCHUNK, TPC, PSTRIDE,
                         x_sN, x_sC, x_sHW,
                         CG: tl.constexpr, GB: tl.constexpr, CGP: tl.constexpr, BHW: tl.constexpr,
                         GB_FAST: tl.constexpr, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr,
                         I64: tl.constexpr):
    """SPLIT forward, pass 1: (mean, M2) of chunk ch (tiles ch*TPC ..) of groups block gb of n."""
    pid = tl.program_id(0)
    n = pid // (NGB * NCHUNK)
    r = pid - n * (NGB * NCHUNK)
    if GB_FAST:
        ch = r // NGB
        gb = r - ch * NGB
    else:
        gb = r // NCHUNK
        ch = r - gb * NCHUNK
    n = n.to(tl.int64)
    gi, c, cm = _group_channels(gb, G, CG, GB, CGP)
    t0 = ch * TPC
    t1 = tl.minimum(t0 + TPC, NT)
    mean, m2, cnt = _range_moments(x_ptr + n * x_sN, c, cm, x_sC, x_sHW, HW, t0, t1, CG, GB, BHW,
                                   UNIT_C, UNIT_HW, I64)
    # part[k, n, g, ch]: k = 0 mean, 1 M2.
    po = (n * G + gi) * NCHUNK + ch
    gm = gi < G
    tl.store(part_ptr + po, mean, mask=gm)
    tl.store(part_ptr + PSTRIDE + po, m2, mask=gm)


@triton.jit
def _combine_chunks(part_ptr, rows, rm, HW, NCHUNK, CHUNK_HW, PSTRIDE, cnt, eps,
                    CG: tl.constexpr, NCP: tl.constexpr):
    """(mean, rstd) of the groups rows = n * G + g (R,) from their NCHUNK (mean, M2) partials:
    Chan's parallel formula in a fixed order, anchored at chunk 0's mean (the weighted sum of
    the means then carries deviations, not the offset)."""
    j = tl.arange(0, NCP)
    pm = rm[:, None] & (j < NCHUNK)[None, :]
    po = rows[:, None] * NCHUNK + j[None, :]
    p_mean = tl.load(part_ptr + po, mask=pm, other=0.0)
    p_m2 = tl.load(part_ptr + PSTRIDE + po, mask=pm, other=0.0)
    p_cnt = (CG * tl.minimum(tl.maximum(HW - j * CHUNK_HW, 0), CHUNK_HW)).to(tl.float32)[None, :]
    m0 = tl.sum(tl.where(j[None, :] == 0, p_mean, 0.0), axis=1)
    mean = m0 + tl.sum(p_cnt * (p_mean - m0[:, None]), axis=1) / cnt
    dm = p_mean - mean[:, None]
    m2 = tl.sum(p_m2 + p_cnt * dm * dm, axis=1)
    return mean, tl.rsqrt(m2 / cnt + eps)


@triton.jit
def _gn_fwd_combine_kernel(part_ptr, mean_ptr, rstd_ptr, ROWS, HW, NCHUNK, CHUNK_HW, PSTRIDE, cnt_f, eps,
                           CG: tl.constexpr, RB: tl.constexpr, NCP: tl.constexpr):
    """SPLIT forward, between the passes (when the apply tiles hold many groups): mean / rstd
    of RB groups (rows n * G + g) from their chunk partials."""
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    rm = rows < ROWS
    rows = rows.to(tl.int64)
    mean, rstd = _combine_chunks(part_ptr, rows, rm, HW, NCHUNK, CHUNK_HW, PSTRIDE,
                                 tl.cast(cnt_f, tl.float32), tl.cast(eps, tl.float32), CG, NCP)
    tl.store(mean_ptr + rows, mean, mask=rm)
    tl.store(rstd_ptr + rows, rstd, mask=rm)


@triton.jit
def _gn_fwd_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, part_ptr, mean_ptr, rstd_ptr,
                         G, HW, NGB, NT, NCHUNK, CHUNK_HW, PSTRIDE, cnt_f, eps,
                         x_sN, x_sC, x_sHW, y_sN, y_sC, y_sHW,
                         w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                         CG: tl.constexpr, GB: tl.constexpr, CGP: tl.constexpr, BHW: tl.constexpr,
                         NCP: tl.constexpr, COMBINE: tl.constexpr, GB_FAST: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                         UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """SPLIT forward, pass 2: HW tile t of group block gb of n. With COMBINE, the program combines
    its groups' chunk partials itself and tile 0 writes mean / rstd; otherwise it reads them."""
    pid = tl.program_id(0)
    n = pid // (NGB * NT)
    r = pid - n * (NGB * NT)
    if GB_FAST:
        t = r // NGB
        gb = r - t * NGB
    else:
        gb = r // NT
        t = r - gb * NT
    n = n.to(tl.int64)
    gi, c, cm = _group_channels(gb, G, CG, GB, CGP)
    gm = gi < G
    rows = n * G + gi
    if COMBINE:
        mean, rstd = _combine_chunks(part_ptr, rows, gm, HW, NCHUNK, CHUNK_HW, PSTRIDE,
                                     tl.cast(cnt_f, tl.float32), tl.cast(eps, tl.float32), CG, NCP)
        first = gm & ((gi * 0 + t) == 0)  # (a vector mask: t is a scalar)
        tl.store(mean_ptr + rows, mean, mask=first)
        tl.store(rstd_ptr + rows, rstd, mask=first)
    else:
        mean = tl.load(mean_ptr + rows, mask=gm, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=gm, other=0.0)

    w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                 sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    alpha = (rstd[:, None] * w * k)[:, :, None]
    beta = (b * k + s)[:, :, None]
    hw = t * BHW + tl.arange(0, BHW)
    m = cm[:, :, None] & (hw < HW)[None, None, :]
    x = _ld3(x_ptr + n * x_sN, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
    z = _act((x - mean[:, None, None]) * alpha + beta, ACT)
    store(y_ptr + n * y_sN, _off3(c, hw, y_sC, y_sHW, UNIT_C, UNIT_HW, I64), z, m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gn_bwd_fused_kernel(gy_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                         part_ptr, C, G, HW, NGB, NT, cnt_f, PSTRIDE,
                         gy_sN, gy_sC, gy_sHW, x_sN, x_sC, x_sHW, gx_sN, gx_sC, gx_sHW,
                         w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                         CG: tl.constexpr, GB: tl.constexpr, CGP: tl.constexpr, BHW: tl.constexpr,
                         ONE_TILE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                         WRITE_PART: tl.constexpr, UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr,
                         I64: tl.constexpr):
    """ONE / LOOPED backward: program (n, group block gb): S1, S2, A, Bg, grad_x."""
    pid = tl.program_id(0)
    n = pid // NGB
    gb = pid - n * NGB
    n = n.to(tl.int64)
    cnt = tl.cast(cnt_f, tl.float32)
    gi, c, cm = _group_channels(gb, G, CG, GB, CGP)
    gm = gi < G
    mean = tl.load(mean_ptr + n * G + gi, mask=gm, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + gi, mask=gm, other=0.0)
    w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                 sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    wk = w * k
    wk3 = wk[:, :, None]
    bks3 = (b * k + s)[:, :, None]
    mu3 = mean[:, None, None]
    r3 = rstd[:, None, None]
    x_n = x_ptr + n * x_sN
    gy_n = gy_ptr + n * gy_sN
    gx_n = gx_ptr + n * gx_sN
    if ONE_TILE:
        hw = tl.arange(0, BHW)
        m = cm[:, :, None] & (hw < HW)[None, None, :]
        x = _ld3(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
        gy = _ld3(gy_n, c, hw, gy_sC, gy_sHW, m, UNIT_C, UNIT_HW, I64)
        xhat, gz = _xhat_gz(x, gy, mu3, r3, wk3, bks3, ACT)
        s1 = tl.sum(gz, axis=2)
        s2 = tl.sum(gz * xhat, axis=2)
    else:
        acc1 = tl.zeros((GB, CGP, BHW), dtype=tl.float32)
        acc2 = tl.zeros((GB, CGP, BHW), dtype=tl.float32)
        for t in range(0, NT):
            hw = t * BHW + tl.arange(0, BHW)
            m = cm[:, :, None] & (hw < HW)[None, None, :]
            x = _ld3(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
            gy = _ld3(gy_n, c, hw, gy_sC, gy_sHW, m, UNIT_C, UNIT_HW, I64)
            xhat, gz = _xhat_gz(x, gy, mu3, r3, wk3, bks3, ACT)
            acc1 += gz
            acc2 += gz * xhat
        s1 = tl.sum(acc1, axis=2)
        s2 = tl.sum(acc2, axis=2)
    if WRITE_PART:
        po = n * C + c
        tl.store(part_ptr + po, s1, mask=cm)
        tl.store(part_ptr + PSTRIDE + po, s2, mask=cm)
    a3 = (tl.sum(wk * s1, axis=1) / cnt)[:, None, None]
    bg3 = (tl.sum(wk * s2, axis=1) / cnt)[:, None, None]
    if ONE_TILE:
        gx = r3 * (gz * wk3 - a3 - xhat * bg3)
        store(gx_n, _off3(c, hw, gx_sC, gx_sHW, UNIT_C, UNIT_HW, I64), gx, m)
    else:
        for t in range(0, NT):
            hw = t * BHW + tl.arange(0, BHW)
            m = cm[:, :, None] & (hw < HW)[None, None, :]
            x = _ld3(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
            gy = _ld3(gy_n, c, hw, gy_sC, gy_sHW, m, UNIT_C, UNIT_HW, I64)
            xhat, gz = _xhat_gz(x, gy, mu3, r3, wk3, bks3, ACT)
            gx = r3 * (gz * wk3 - a3 - xhat * bg3)
            store(gx_n, _off3(c, hw, gx_sC, gx_sHW, UNIT_C, UNIT_HW, I64), gx, m)


@triton.jit
def _flat_pid(NCB, NJ, CB_FAST: tl.constexpr):
    """program -> (n (int64), channel block cb, j) over (N, NCB, NJ)."""
    pid = tl.program_id(0)
    n = pid // (NCB * NJ)
    r = pid - n * (NCB * NJ)
    if CB_FAST:
        j = r // NCB
        cb = r - j * NCB
    else:
        cb = r // NJ
        j = r - cb * NJ
    return n.to(tl.int64), cb, j


@triton.jit
def _gn_bwd_partial_kernel(gy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, part_ptr,
                           C, G, HW, NCB, NT, NCHUNK, TPC, PSTRIDE,
                           gy_sN, gy_sC, gy_sHW, x_sN, x_sC, x_sHW,
                           w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                           CG: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr,
                           CB_FAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                           UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """SPLIT backward, pass 1: S1, S2 of channels block cb of n over chunk ch (its TPC tiles)."""
    n, cb, ch = _flat_pid(NCB, NCHUNK, CB_FAST)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    g = c // CG
    mean = tl.load(mean_ptr + n * G + g, mask=cm, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + n * G + g, mask=cm, other=0.0)[:, None]
    w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                 sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    wk = (w * k)[:, None]
    bks = (b * k + s)[:, None]
    x_n = x_ptr + n * x_sN
    gy_n = gy_ptr + n * gy_sN
    acc1 = tl.zeros((BC, BHW), dtype=tl.float32)
    acc2 = tl.zeros((BC, BHW), dtype=tl.float32)
    t0 = ch * TPC
    t1 = tl.minimum(t0 + TPC, NT)
    for t in range(t0, t1):
        hw = t * BHW + tl.arange(0, BHW)
        m = cm[:, None] & (hw < HW)[None, :]
        x = _ld2(x_n, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
        gy = _ld2(gy_n, c, hw, gy_sC, gy_sHW, m, UNIT_C, UNIT_HW, I64)
        xhat, gz = _xhat_gz(x, gy, mean, rstd, wk, bks, ACT)
        acc1 += gz
        acc2 += gz * xhat
    # part[k, n, c, ch]: k = 0 S1, 1 S2.
    po = (n * C + c) * NCHUNK + ch
    tl.store(part_ptr + po, tl.sum(acc1, axis=1), mask=cm)
    tl.store(part_ptr + PSTRIDE + po, tl.sum(acc2, axis=1), mask=cm)


@triton.jit
def _gn_bwd_reduce_kernel(part_ptr, w_ptr, b_ptr, sc_ptr, gw_ptr, gb_ptr, gsc_ptr, gsh_ptr, ab_ptr,
                          N, C, G, NCHUNK, PSTRIDE, cnt_f,
                          w_s, b_s, sc_sN, sc_sC,
                          CG: tl.constexpr, CGP: tl.constexpr, BN: tl.constexpr, NCP: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_SHIFT: tl.constexpr, WRITE_AB: tl.constexpr):
    """Group g: S1, S2 of every (n, c in g) from the chunk partials part[k, n, c, :] (in order),
    grad_shift / grad_scale (N, C), A / Bg (ab[0 / 1, n, g], when WRITE_AB), and
    grad_bias / grad_weight of its channels (sum over n in order)."""
    g = tl.program_id(0)
    cnt = tl.cast(cnt_f, tl.float32)
    ci = tl.arange(0, CGP)
    c = g * CG + ci
    cm = ci < CG
    zero = tl.zeros((CGP,), dtype=tl.float32)
    w = zero + 1.0
    b = zero
    if HAS_W:
        w = tl.load(w_ptr + c * w_s, mask=cm, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c * b_s, mask=cm, other=0.0).to(tl.float32)
    acc_gw = tl.zeros((CGP,), dtype=tl.float32)
    acc_gb = tl.zeros((CGP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        nm = nn < N
        nn = nn.to(tl.int64)
        m2d = nm[:, None] & cm[None, :]
        nc = nn[:, None] * C + c[None, :]
        base = nc * NCHUNK
        a1 = tl.zeros((BN, CGP, NCP), dtype=tl.float32)
        a2 = tl.zeros((BN, CGP, NCP), dtype=tl.float32)
        for j0 in range(0, NCHUNK, NCP):
            j = j0 + tl.arange(0, NCP)
            m3 = m2d[:, :, None] & (j < NCHUNK)[None, None, :]
            p = part_ptr + base[:, :, None] + j[None, None, :]
            a1 += tl.load(p, mask=m3, other=0.0)
            a2 += tl.load(p + PSTRIDE, mask=m3, other=0.0)
        s1 = tl.sum(a1, axis=2)
        s2 = tl.sum(a2, axis=2)
        if HAS_SCALE:
            k = 1.0 + tl.load(sc_ptr + nn[:, None] * sc_sN + c[None, :] * sc_sC, mask=m2d,
                              other=0.0).to(tl.float32)
            store(gsc_ptr, nc, w[None, :] * s2 + b[None, :] * s1, m2d)
        else:
            k = tl.zeros((BN, CGP), dtype=tl.float32) + 1.0
        if HAS_SHIFT:
            store(gsh_ptr, nc, s1, m2d)
        acc_gb += tl.sum(k * s1, axis=0)
        acc_gw += tl.sum(k * s2, axis=0)
        if WRITE_AB:
            wk = w[None, :] * k
            ao = nn * G + g
            tl.store(ab_ptr + ao, tl.sum(wk * s1, axis=1) / cnt, mask=nm)
            tl.store(ab_ptr + N * G + ao, tl.sum(wk * s2, axis=1) / cnt, mask=nm)
    if HAS_W:
        store(gw_ptr, c, acc_gw, cm)
    if HAS_B:
        store(gb_ptr, c, acc_gb, cm)


@triton.jit
def _gn_bwd_dx_kernel(gy_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr, ab_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,
                      N, C, G, HW, NCB, NT,
                      gy_sN, gy_sC, gy_sHW, x_sN, x_sC, x_sHW, gx_sN, gx_sC, gx_sHW,
                      w_s, b_s, sc_sN, sc_sC, sh_sN, sh_sC,
                      CG: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr, CB_FAST: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                      UNIT_C: tl.constexpr, UNIT_HW: tl.constexpr, I64: tl.constexpr):
    """SPLIT backward, pass 2: grad_x of HW tile t of channel block cb of n."""
    n, cb, t = _flat_pid(NCB, NT, CB_FAST)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    go = n * G + c // CG
    mean = tl.load(mean_ptr + go, mask=cm, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + go, mask=cm, other=0.0)[:, None]
    a = tl.load(ab_ptr + go, mask=cm, other=0.0)[:, None]
    bg = tl.load(ab_ptr + N * G + go, mask=cm, other=0.0)[:, None]
    w, b, k, s = _channel_params(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cm, w_s, b_s, sc_sN, sc_sC,
                                 sh_sN, sh_sC, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    wk = (w * k)[:, None]
    bks = (b * k + s)[:, None]
    hw = t * BHW + tl.arange(0, BHW)
    m = cm[:, None] & (hw < HW)[None, :]
    x = _ld2(x_ptr + n * x_sN, c, hw, x_sC, x_sHW, m, UNIT_C, UNIT_HW, I64)
    gy = _ld2(gy_ptr + n * gy_sN, c, hw, gy_sC, gy_sHW, m, UNIT_C, UNIT_HW, I64)
    xhat, gz = _xhat_gz(x, gy, mean, rstd, wk, bks, ACT)
    gx = rstd * (gz * wk - a - xhat * bg)
    store(gx_ptr + n * gx_sN, _off2(c, hw, gx_sC, gx_sHW, UNIT_C, UNIT_HW, I64), gx, m)


# ----------------------------------------------------------------------------------------------
# Host side: views, plans, launchers
# ----------------------------------------------------------------------------------------------
def _view3(t):
    """(sN, sC, sHW) of t viewed as (N, C, HW), or None when its spatial dims do not collapse.

    Strides of size-1 dims are irrelevant and reported as 1 (so the UNIT flags can hold)."""
    sn = t.stride(0) if t.shape[0] != 1 else 1
    sc = t.stride(1) if t.shape[1] != 1 else 1
    dims = [(sz, st) for sz, st in zip(t.shape[2:], t.stride()[2:]) if sz != 1]
    for (_, st_outer), (sz_inner, st_inner) in zip(dims, dims[1:]):
        if st_outer != st_inner * sz_inner:
            return None
    shw = dims[-1][1] if dims else 1
    return sn, sc, shw


def _readable(t):
    """t and its (sN, sC, sHW); a copy only when the spatial dims of t do not collapse."""
    v = _view3(t)
    if v is None:
        t = t.contiguous()
        v = _view3(t)
    return t, v


def _writable(out):
    """A tensor the kernel writes (out itself when its spatial dims collapse) and its strides."""
    v = _view3(out)
    if v is None:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        return tmp, _view3(tmp)
    return out, v


def _flags(C, HW, views):
    """UNIT_C, UNIT_HW, I64 for tensors of strides views (sN, sC, sHW)."""
    unit_c = all(v[1] == 1 for v in views)
    unit_hw = all(v[2] == 1 for v in views)
    # Largest in-sample offset a (padded, masked) tile lane may form: channel < 6C + 8 (group
    # blocks past G, CG padded), position < 6HW + 16K (tiles past HW).
    span = max((6 * C + 8) * abs(v[1]) + (6 * HW + 16384) * abs(v[2]) for v in views)
    return unit_c, unit_hw, FORCE_I64 or span > INT32_MAX


def _warps(tile):
    return next(warps for largest, warps in WARPS if tile <= largest)


def _chunking(rows, nt, max_chunks):
    """(TPC, NCHUNK): tiles per chunk (a power of two) and chunks, so that the chunks are at most
    max_chunks and there are at least about SPLIT_PROGRAMS (rows * NCHUNK) programs."""
    tpc = 1
    while cdiv(nt, tpc) > max_chunks:
        tpc *= 2
    while tpc < nt and rows * cdiv(nt, 2 * tpc) >= SPLIT_PROGRAMS:
        tpc *= 2
    return tpc, cdiv(nt, tpc)


def _group_plan(N, C, G, HW, channels_inner, group_bytes):
    """The plan of a call and its group tile: (plan, GB, CGP, BHW, NT)."""
    cg = C // G
    cgp, hwp = np2(cg), np2(HW)
    gp = np2(G)
    forced = FORCE_PLAN
    if (forced in (None, ONE)) and cgp * hwp <= FUSED_MAX:
        gb = 1
        while 2 * gb <= gp and 2 * gb * cgp * hwp <= FUSED_TILE and N * cdiv(G, 2 * gb) >= TARGET_PROGRAMS:
            gb *= 2
        return ONE, gb, cgp, hwp, 1
    gb = 1
    if channels_inner:
        while 2 * gb <= gp and 2 * gb * cgp <= CL_CHANNELS:
            gb *= 2
    looped = forced == LOOPED or (forced is None and N * G >= TARGET_PROGRAMS
                                  and group_bytes <= LOOP_MAX_BYTES)
    if looped:
        while gb > 1 and N * cdiv(G, gb) < TARGET_PROGRAMS:
            gb //= 2
    bhw = min(hwp, max(1, TILE // (gb * cgp)))
    if not looped:  # smaller tiles when a small batch would not give enough programs
        while bhw > 1 and gb * cgp * bhw > MIN_TILE and N * cdiv(G, gb) * cdiv(HW, bhw) < SPLIT_PROGRAMS:
            bhw //= 2
    return (LOOPED if looped else SPLIT), gb, cgp, bhw, cdiv(HW, bhw)


def _flat_plan(N, C, HW, channels_inner):
    """(BC, BHW) of the per-channel SPLIT backward kernels."""
    if channels_inner:
        bc = min(np2(C), CL_CHANNELS)
        while bc > 16 and (cdiv(C, bc) * bc - C) * 8 > C:  # at most 1/8 of the lanes idle
            bc //= 2
        bhw = min(np2(HW), max(1, TILE // bc))
    else:
        bhw = min(np2(HW), TILE)
        bc = min(np2(C), max(1, TILE // bhw))
    while bc * bhw > MIN_TILE and N * cdiv(C, bc) * cdiv(HW, bhw) < SPLIT_PROGRAMS:
        if bhw > 1 and (bc == 1 or not channels_inner):
            bhw //= 2
        else:
            bc //= 2
    return bc, bhw


def _params(x, weight, bias, scale, shift):
    """Pointers (x stands in for an absent one), strides and HAS_* flags of the parameters
    (weight, bias (C,); scale, shift (N, C): the op checked their shapes)."""
    w, b, sc, sh = weight, bias, scale, shift
    ptrs = [w if w is not None else x, b if b is not None else x,
            sc if sc is not None else x, sh if sh is not None else x]
    strides = [w.stride(0) if w is not None else 0, b.stride(0) if b is not None else 0,
               *(sc.stride() if sc is not None else (0, 0)), *(sh.stride() if sh is not None else (0, 0))]
    flags = dict(HAS_W=w is not None, HAS_B=b is not None, HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None)
    return ptrs, strides, flags


def _hw(x):
    return math.prod(x.shape[2:])


def group_norm_act(x, weight, bias, scale, shift, num_groups, eps, act):
    """(y, mean, rstd) of docs/OPS.md: y = empty_like(x) in x's dtype, mean / rstd (N, G) fp32."""
    N, C = x.shape[:2]
    G, HW = int(num_groups), _hw(x)
    y = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N, G), dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # empty groups: undefined statistics (the oracle's mean of nothing)
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, mean, rstd
    x, xv = _readable(x)
    yk, yv = _writable(y)
    unit_c, unit_hw, i64 = _flags(C, HW, [xv, yv])
    cg = C // G
    ptrs, pstrides, pflags = _params(x, weight, bias, scale, shift)
    channels_inner = xv[1] == 1 and xv[2] != 1
    plan, gb, cgp, bhw, nt = _group_plan(N, C, G, HW, channels_inner, cg * HW * x.element_size())
    ngb = cdiv(G, gb)
    common = dict(CG=cg, GB=gb, CGP=cgp, BHW=bhw, UNIT_C=unit_c, UNIT_HW=unit_hw, I64=i64)
    act_flags = dict(ACT=bool(act), **pflags)
    eps, cnt = float(eps), float(cg * HW)
    with device_guard(x):
        if plan in (ONE, LOOPED):
            _gn_fwd_fused_kernel[(N * ngb,)](
                x, yk, *ptrs, mean, rstd, G, HW, ngb, nt, cnt, eps, *xv, *yv, *pstrides,
                ONE_TILE=plan == ONE, **common, **act_flags, **options(_warps(gb * cgp * bhw)))
        else:
            tpc, nchunk = _chunking(N * ngb, nt, MAX_CHUNKS)
            ncp = np2(nchunk)
            combine_in_apply = gb * ncp <= COMBINE_IN_APPLY
            part = torch.empty((2, N, G, nchunk), dtype=torch.float32, device=x.device)
            warps = _warps(gb * cgp * bhw)
            pstride, chunk_hw = N * G * nchunk, tpc * bhw
            _gn_fwd_stats_kernel[(N * ngb * nchunk,)](
                x, part, G, HW, ngb, nt, nchunk, tpc, pstride, *xv,
                GB_FAST=channels_inner, **common, **options(warps))
            if not combine_in_apply:
                rb = max(1, min(np2(N * G), REDUCE_TILE // ncp))
                _gn_fwd_combine_kernel[(cdiv(N * G, rb),)](
                    part, mean, rstd, N * G, HW, nchunk, chunk_hw, pstride, cnt, eps,
                    CG=cg, RB=rb, NCP=ncp, **options(4))
            _gn_fwd_apply_kernel[(N * ngb * nt,)](
                x, yk, *ptrs, part, mean, rstd, G, HW, ngb, nt, nchunk, chunk_hw, pstride,
                cnt, eps, *xv, *yv, *pstrides, NCP=ncp, COMBINE=combine_in_apply, GB_FAST=channels_inner,
                **common, **act_flags, **options(warps))
    if yk is not y:
        y.copy_(yk)
    return y, mean, rstd


def _param_grads(x, weight, bias, scale, shift):
    """Outputs for the parameter gradients: in each parameter's dtype, (0,) when not given."""
    N, C = x.shape[:2]

    def new(p, shape):
        return torch.empty(shape, dtype=p.dtype, device=p.device) if p is not None else x.new_empty((0,))
    return new(weight, (C,)), new(bias, (C,)), new(scale, (N, C)), new(shift, (N, C))


def group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, scale, shift, num_groups, act):
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift) of docs/OPS.md."""
    N, C = x.shape[:2]
    G, HW = int(num_groups), _hw(x)
    grad_x = torch.empty_like(x)
    gw, gbias, gsc, gsh = _param_grads(x, weight, bias, scale, shift)
    if x.numel() == 0:  # sums over nothing
        for g in (gw, gbias, gsc, gsh):
            g.zero_()
        return grad_x, gw, gbias, gsc, gsh
    x, xv = _readable(x)
    grad_y, gyv = _readable(grad_y)
    gxk, gxv = _writable(grad_x)
    unit_c, unit_hw, i64 = _flags(C, HW, [gyv, xv, gxv])
    cg = C // G
    ptrs, pstrides, pflags = _params(x, weight, bias, scale, shift)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    channels_inner = xv[1] == 1 and xv[2] != 1
    plan, gb, cgp, bhw, nt = _group_plan(N, C, G, HW, channels_inner,
                                         cg * HW * (x.element_size() + grad_y.element_size()))
    need_params = any(pflags.values())
    cnt = float(cg * HW)
    flags = dict(UNIT_C=unit_c, UNIT_HW=unit_hw, I64=i64, ACT=bool(act), **pflags)
    param_ptrs = [ptrs[0], ptrs[1], ptrs[2]]
    with device_guard(x):
        if plan in (ONE, LOOPED):
            nchunk = 1
            part = torch.empty((2, N, C, 1) if need_params else (2,), dtype=torch.float32, device=x.device)
            ngb = cdiv(G, gb)
            _gn_bwd_fused_kernel[(N * ngb,)](
                grad_y, x, gxk, mean, rstd, *ptrs, part, C, G, HW, ngb, nt, cnt, N * C,
                *gyv, *xv, *gxv, *pstrides, CG=cg, GB=gb, CGP=cgp, BHW=bhw, ONE_TILE=plan == ONE,
                WRITE_PART=need_params, **flags, **options(_warps(gb * cgp * bhw)))
            ab = part  # not written
        else:
            bc, bhw = _flat_plan(N, C, HW, channels_inner)
            ncb, nt = cdiv(C, bc), cdiv(HW, bhw)
            tpc, nchunk = _chunking(N * ncb, nt, MAX_CHUNKS)
            part = torch.empty((2, N, C, nchunk), dtype=torch.float32, device=x.device)
            ab = torch.empty((2, N, G), dtype=torch.float32, device=x.device)
            warps = _warps(bc * bhw)
            _gn_bwd_partial_kernel[(N * ncb * nchunk,)](
                grad_y, x, mean, rstd, *ptrs, part, C, G, HW, ncb, nt, nchunk, tpc, N * C * nchunk,
                *gyv, *xv, *pstrides, CG=cg, BC=bc, BHW=bhw, CB_FAST=channels_inner, **flags,
                **options(warps))
        if need_params or plan == SPLIT:
            ncp = min(np2(nchunk), max(1, REDUCE_TILE // cgp))
            bn = min(np2(N), max(1, REDUCE_TILE // (cgp * ncp)))
            _gn_bwd_reduce_kernel[(G,)](
                part, *param_ptrs, gw if weight is not None else part, gbias if bias is not None else part,
                gsc if scale is not None else part, gsh if shift is not None else part, ab,
                N, C, G, nchunk, N * C * nchunk, cnt, *pstrides[:4],
                CG=cg, CGP=cgp, BN=bn, NCP=ncp, WRITE_AB=plan == SPLIT, **pflags,
                **options(_warps(bn * cgp * ncp // 2)))
        if plan == SPLIT:
            _gn_bwd_dx_kernel[(N * ncb * nt,)](
                grad_y, x, gxk, mean, rstd, ab, *ptrs, N, C, G, HW, ncb, nt,
                *gyv, *xv, *gxv, *pstrides, CG=cg, BC=bc, BHW=bhw, CB_FAST=channels_inner, **flags,
                **options(warps))
    if gxk is not grad_x:
        grad_x.copy_(gxk)
    return grad_x, gw, gbias, gsc, gsh
