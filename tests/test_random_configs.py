"""Seeded random configurations of the three fused ops on every kernel backend against the float64
oracle: shapes, layouts, dtypes and optional arguments in combinations that the curated cases of
each op's tests do not list (and, for the emulated CUDA adv_step, devices with and without thread
block clusters, so that random cluster sizes run)."""
import math
import random

import pytest
import torch

from adv_dpm.ops import adv_step, adv_step_inject, eager, group_norm_act, noise_inject, reference
from conftest import (EMULATED_CUDA, PAIRS, _pair_params, assert_within_budget, emulated_cuda_module,
                      group_norm_oracle, outputs_and_grads, relayout, require_pair, use_pair)

SEEDS = range(24)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGETS = ("original", "delta_detach", "delta")


@pytest.fixture(params=_pair_params([p for p in PAIRS if p[1] != "reference"]))
def kernel_pair(request):
    return request.param


def max_numel(pair):
    return 4096 if pair == ("cpu", "triton") else 65536   # the Triton interpreter is slow


def require(pair, op, seed):
    """The pair's requirements for ``op``; on a GPU, Triton compiles each new specialization (about
    a second each): the GPU check runs it on the first few seeds only."""
    require_pair(pair, op)
    if pair == ("cuda", "triton") and seed >= 8:
        pytest.skip("Triton on the GPU: the first 8 seeds (each new configuration compiles its kernels)")


def group_norm_config(seed, limit, device):
    """(x, weight, bias, groups, eps, scale, shift, act), an upstream gradient, and a description.
    Groups of one element are left out: their exact input gradient is 0, which no float32 budget
    relative to it can hold (rounding times rstd = eps^-1/2)."""
    rng = random.Random(seed)
    while True:
        groups = rng.choice([1, 2, 3, 4, 8, 32])
        shape = (rng.choice([1, 2, 3, 5]), groups * rng.choice([1, 2, 3, 5, 8, 16]),
                 *[rng.choice([1, 2, 3, 5, 8, 16, 33]) for _ in range(rng.choice([0, 1, 2, 2]))])
        if shape[1] // groups * math.prod(shape[2:]) > 1 and math.prod(shape) <= limit:
            break
    dtype, params, act = rng.choice(DTYPES), rng.choice(["", "wb", "ss", "wbss", "wbSS"]), rng.choice(["silu", None])
    layouts = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    pdtype = rng.choice([torch.float32, dtype])
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = relayout((rng.choice([0.0, -2.3, 100.0]) + rand(shape)).to(device, dtype), layouts[0])
    n, c = shape[:2]
    weight, bias = ((1 + 0.3 * rand(c)).to(device, pdtype), (0.3 * rand(c)).to(device, pdtype)) if "wb" in params \
        else (None, None)
    scale = shift = None
    if "ss" in params.lower():
        emb = (0.5 * rand(n, 2 * c)).to(device, pdtype)
        scale, shift = emb.chunk(2, dim=1) if "ss" in params else (emb[:, :c].contiguous(), emb[:, c:].contiguous())
    grad_y = relayout(rand(shape).to(device, dtype), layouts[1])
    return (x, weight, bias, groups, 1e-5, scale, shift, act), grad_y, (
        f"{shape} groups={groups} {dtype} layouts={layouts} params={params!r} in {pdtype} act={act}")


@pytest.mark.parametrize("seed", SEEDS)
def test_group_norm_act(kernel_pair, seed):
    require(kernel_pair, "group_norm_act", seed)
    args, grad_y, described = group_norm_config(seed, max_numel(kernel_pair), kernel_pair[0])
    ref = outputs_and_grads(group_norm_oracle, [a.double() if isinstance(a, torch.Tensor) else a for a in args],
                          [grad_y])
    same_dtype = outputs_and_grads(eager.group_norm_act, args, [grad_y])
    with use_pair(kernel_pair):
        out = outputs_and_grads(group_norm_act, args, [grad_y])
    assert_within_budget(f"y of {described}", out[0][0], ref[0][0], same_dtype[0][0])
    for i, (got, want, eager_grad) in enumerate(zip(out[1], ref[1], same_dtype[1])):
        assert got.dtype == eager_grad.dtype, f"gradient {i} of {described}: dtype {got.dtype}"
        assert_within_budget(f"gradient {i} of {described}", got, want, eager_grad)


def noise_inject_config(seed, limit, device):
    """(x0, eps, c_signal, c_noise, delta, target) with the coefficients as (B,) or (B, 1, ..., 1),
    the upstream gradients of x_t and target, the (B,) coefficients, and a description."""
    rng = random.Random(seed)
    while True:
        spatial = [rng.choice([1, 3, 5, 8, 33]) for _ in range(rng.choice([0, 1, 2, 3]))]
        shape = (rng.choice([1, 2, 3, 17, 70]), *spatial)
        if math.prod(shape) <= limit:
            break
    dtype, target, layouts = rng.choice(DTYPES), rng.choice(TARGETS), [rng.choice(LAYOUTS) for _ in range(5)]
    with_delta, broadcast = rng.random() < 0.7, rng.random() < 0.5
    cdtype = rng.choice([torch.float32, torch.float64, dtype])
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    x0, eps, delta, grad_x_t, grad_target = (relayout(t.to(device, dtype), layout) for t, layout in zip(
        (rand(), rand(), 0.05 * rand(), rand(), rand()), layouts))
    c_signal, c_noise = (torch.rand(shape[0], generator=g, dtype=torch.float64).to(device, cdtype) * 0.9 + 0.1
                         for _ in range(2))
    given = [c.reshape(-1, *[1] * (len(shape) - 1)) if broadcast else c for c in (c_signal, c_noise)]
    return (x0, eps, *given, delta if with_delta else None, target), (grad_x_t, grad_target), (c_signal, c_noise), (
        f"{shape} {dtype} layouts={layouts} target={target} delta={with_delta} coefficients in {cdtype}"
        f"{' as (B, 1, ..., 1)' if broadcast else ''}")


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_inject(kernel_pair, seed):
    require(kernel_pair, "noise_inject", seed)
    args, grads_out, flat, described = noise_inject_config(seed, max_numel(kernel_pair), kernel_pair[0])
    x0, eps, _, _, delta, target = args
    mode = TARGETS.index(target)
    ref = outputs_and_grads(lambda *a: reference.noise_inject(*a, mode),
                          [None if t is None else t.double() for t in (x0, eps, *flat, delta)], grads_out)
    same_dtype = outputs_and_grads(eager.noise_inject, [x0, eps, *flat, delta, target], grads_out)
    with use_pair(kernel_pair):
        out = outputs_and_grads(noise_inject, args, grads_out)
    for name, got, want, eager_value in zip(["x_t", "target"], out[0], ref[0], same_dtype[0]):
        assert_within_budget(f"{name} of {described}", got, want, eager_value)
    names = ["x0", "eps", "c_signal", "c_noise", "delta"]
    for name, got, want, eager_grad in zip(names, out[1], ref[1], same_dtype[1]):
        assert got.shape == args[names.index(name)].shape and got.dtype == args[names.index(name)].dtype, name
        if got.dtype == torch.float64:   # float64 coefficients' gradients: sums accumulated in float32
            got, eager_grad = got.float(), eager_grad.float()
        assert_within_budget(f"gradient of {name}, {described}", got.reshape(want.shape), want,
                             eager_grad.reshape(want.shape))


# Emulated devices for the CUDA adv_step: an H100's SM count with clusters, an A100's without, a
# small one with clusters (larger clusters per sample at the same batch).
EMULATED_DEVICES = [(132, True), (108, False), (16, True)]


def adv_step_config(seed, limit, device):
    """adv_step_inject's arguments (x_t, eps, c_noise, delta, grad, lr, radius, target,
    grad_target), whether to call the plain adv_step instead, an emulated device, a description.
    Sample sizes around the CUDA and Triton plans' bounds (2048, 16384 elements)."""
    rng = random.Random(seed)
    while True:
        batch, n = rng.choice([1, 2, 3, 5, 17, 70]), rng.choice([1, 7, 100, 2048, 2049, 3000, 12288, 16384, 16385])
        rank = rng.choice([2, 3, 4, 4])
        if rank == 2:
            shape = (batch, n)
        elif rank == 3:
            shape = (batch, max(1, n // 7), 7)
        else:
            c = rng.choice([1, 3, 4])
            h = max(1, int(math.sqrt(n // c)))
            shape = (batch, c, h, max(1, n // c // h))
        if math.prod(shape) <= limit:
            break
    dtype, target, plain = rng.choice(DTYPES), rng.choice(TARGETS), rng.random() < 0.3
    layouts = [rng.choice(LAYOUTS) for _ in range(4)]
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    delta = 0.05 * rand()
    delta[::2] = 0   # as at the start of a batch
    grad = rand() * rng.choice([1e-3, 1.0, 100.0])
    non_finite = batch > 1 and rng.random() < 0.3
    if non_finite:
        grad[(1,) + (0,) * (grad.dim() - 1)] = rng.choice([math.inf, math.nan])   # that sample is skipped
    delta, grad, x_t, eps = (relayout(t.to(device, dtype), layout)
                             for t, layout in zip((delta, grad, rand(), rand()), layouts))
    c_noise = (0.1 + 0.9 * torch.rand(batch, generator=g, dtype=torch.float64)).to(device, torch.float32)
    grad_target = (0.3 * rand()).to(device, dtype) if target == "delta" and not plain else None
    d = math.prod(shape[1:])
    lr, radius = 0.01 * math.sqrt(d), rng.choice([0.0, 0.5, 2.0, math.inf]) * 0.01 * math.sqrt(d)
    emulated = rng.choice(EMULATED_DEVICES)
    return (x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target), plain, emulated, (
        f"{shape} {dtype} layouts={layouts} {'adv_step' if plain else f'target={target}'} radius={radius:.3g}"
        f"{' a non-finite gradient' if non_finite else ''}")


@pytest.mark.parametrize("seed", SEEDS)
def test_adv_step(kernel_pair, seed):
    require(kernel_pair, "adv_step", seed)
    (x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target), plain, emulated, described = adv_step_config(
        seed, max_numel(kernel_pair), kernel_pair[0])
    as64 = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    if plain:
        ref = reference.adv_step(as64(delta), as64(grad), None, None, None, None, lr, radius, None, 0)
        same_dtype = eager.adv_step(delta, grad, lr, radius)
        names = ["delta"]
    else:
        ref = reference.adv_step(as64(delta), as64(grad), as64(grad_target), as64(x_t), as64(eps), as64(c_noise), lr,
                                 radius, None, TARGETS.index(target))
        folded = grad if grad_target is None else grad + grad_target / c_noise.to(grad.dtype).reshape(
            -1, *[1] * (grad.dim() - 1))
        same_dtype = eager.adv_step_inject(x_t, eps, c_noise, delta, folded, lr, radius, target)
        names = ["delta", "x_adv", "target"]
    if kernel_pair == EMULATED_CUDA:
        described += f" on an emulated device of {emulated[0]} SMs {'with' if emulated[1] else 'without'} clusters"
        module = emulated_cuda_module()
        default = module.set_device(*emulated)
    try:
        with use_pair(kernel_pair):
            out = (adv_step(delta, grad, lr, radius) if plain
                   else adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target))
    finally:
        if kernel_pair == EMULATED_CUDA:
            module.set_device(*default)
    assert torch.equal(out.skipped.cpu(), ref[5]), f"skipped of {described}"
    for i, name in enumerate(names):
        assert_within_budget(f"{name} of {described}", out[i].cpu(), ref[i], same_dtype[i].cpu())
    tol = 1e-5 if delta.dtype == torch.float32 else 2e-3
    for name, got, want in [("grad_norm", out.grad_norm, ref[3]), ("delta_norm", out.delta_norm, ref[4])]:
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name} of {described}: {m}")
