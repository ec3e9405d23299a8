"""Helpers shared by the Triton kernels: (B, s1, s2, s3) views, the fast-path test, tiling.

Every big tensor of an op has one shape (B, ...) of rank 1..4. It is viewed as (B, s1, s2, s3)
(missing dims are padded after B with size 1, stride 0) and each tensor is indexed by its own
four strides. When every tensor (outputs included) is dense with the batch dimension outermost
and all share strides (contiguous, channels_last, ...), sample b is the contiguous span
[b*N, (b+1)*N) of every tensor, with the same element at the same position, so the kernels take
the constexpr FAST path: offset = b*N + i, no index arithmetic.

Each sample is tiled into NB blocks of BLOCK elements; the grid is flat: program p handles block
p % NB of sample p // NB (consecutive programs walk memory in order).
"""
import contextlib

import torch
import triton
import triton.language as tl

INT32_MAX = 2**31 - 1
# Triton grids are at most 2**31 - 1 programs on the x axis.
MAX_PROGRAMS = 2**31 - 1
# About the number of programs that fills an H100 (132 SMs) several times over: below this the
# tile is shrunk so that small batches (B=128 of 3x32x32) still spread over every SM.
TARGET_PROGRAMS = 4 * 132
MIN_BLOCK, MAX_BLOCK = 128, 4096


def np2(n) -> int:
    """The smallest power of two >= max(n, 1). Plain Python: the launchers run on every call, and
    triton.next_power_of_2 (a constexpr function) costs microseconds each."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a, b) -> int:
    """ceil(a / b) for integers (triton.cdiv, without its per-call cost)."""
    return -(-int(a) // int(b))


def options(num_warps: int) -> dict:
    """The compile options of every launch: ``num_warps``, and floating-point contraction (a * b + c
    as one fma) stated rather than left to Triton's default, which Triton 3.9 says will change."""
    return dict(num_warps=num_warps, enable_fp_fusion=True)


def sizes4(t: torch.Tensor):
    """(B, s1, s2, s3): t's shape, padded after the batch dimension with ones to rank 4."""
    return (t.shape[0],) + (1,) * (4 - t.dim()) + tuple(t.shape[1:])


def geometry(t: torch.Tensor):
    """(B, n, s2, s3): batch, elements per sample, and the two inner sizes that split an
    in-sample index (clamped to >= 1 so that an empty sample never divides by zero)."""
    batch, s1, s2, s3 = sizes4(t)
    return batch, s1 * s2 * s3, max(s2, 1), max(s3, 1)


def strides4(t: torch.Tensor):
    """t's strides in the (B, s1, s2, s3) view of sizes4 (padded dims have stride 0)."""
    return (t.stride(0),) + (0,) * (4 - t.dim()) + tuple(t.stride()[1:])


def _dense_batch_outer(t: torch.Tensor) -> bool:
    """Non-overlapping and dense, and the batch dimension outermost (stride numel / B)."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return t.shape[0] <= 1 or t.stride(0) == t.numel() // t.shape[0]


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides on every dimension that matters (sizes > 1); shapes are equal."""
    return all(sa == sb for sz, sa, sb in zip(a.shape, a.stride(), b.stride()) if sz > 1)


def fast_path(*tensors) -> bool:
    """True when every tensor is dense, batch outermost, with the strides of the first (the
    tensors have one shape, so the others are dense when the first is)."""
    first = tensors[0]
    strides = first.stride()
    return _dense_batch_outer(first) and all(t.stride() == strides or _same_strides(first, t) for t in tensors[1:])


def stride_args(*tensors):
    """The (B, s1, s2, s3) strides of each tensor, flattened in order (4 ints per tensor)."""
    return [s for t in tensors for s in strides4(t)]


def tiling(batch: int, n: int):
    """(BLOCK, NB, num_warps) for B samples of n elements.

    BLOCK is a power of two in [128, 4096], no larger than needed for one sample, and the
    largest that still gives about TARGET_PROGRAMS programs; NB = cdiv(n, BLOCK) >= 1.
    """
    block = min(MAX_BLOCK, max(MIN_BLOCK, np2(n)))
    while block > MIN_BLOCK and batch * cdiv(n, block) < TARGET_PROGRAMS:
        block //= 2
    nb = max(1, cdiv(n, block))
    if batch * nb > MAX_PROGRAMS:
        raise ValueError(f"adv_dpm Triton kernels: {batch} x {nb} blocks exceed the grid limit")
    # 8 fp32 elements (2 x 16-byte accesses) per thread up to 2048, 16 at 4096.
    num_warps = max(1, min(8, block // 256))
    return block, nb, num_warps


def coef32(c: torch.Tensor) -> torch.Tensor:
    """A (B,) coefficient vector as float32 contiguous (B elements: negligible)."""
    return c.to(torch.float32).contiguous()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def index_is_64bit(n: int) -> bool:
    """Whether in-sample indices need 64 bits (n plus a tile past it exceeds int32)."""
    return n + MAX_BLOCK > INT32_MAX


@triton.jit
def tile(NB, N, BLOCK: tl.constexpr, I64: tl.constexpr):
    """(b, blk, i, mask) of this program: sample b (int64), block blk, in-sample indices i."""
    pid = tl.program_id(0)
    b = pid // NB
    blk = pid - b * NB
    if I64:
        i = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = blk * BLOCK + tl.arange(0, BLOCK)
    return b.to(tl.int64), blk, i, i < N


@triton.jit
def split(i, s2, s3):
    """In-sample index i -> (i1, i2, i3) of the (s1, s2, s3) view, as int64."""
    i3 = i % s3
    t = i // s3
    i2 = t % s2
    i1 = t // s2
    return i1.to(tl.int64), i2.to(tl.int64), i3.to(tl.int64)


@triton.jit
def offset(b, i1, i2, i3, st0, st1, st2, st3):
    """Element offset of (b, i1, i2, i3) in a tensor of strides (st0..st3), int64."""
    return b * st0 + i1 * st1 + i2 * st2 + i3 * st3


@triton.jit
def load32(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store(ptr, off, value, mask):
    tl.store(ptr + off, value.to(ptr.dtype.element_ty), mask=mask)
