"""adv_step / adv_step_inject: every backend against the float64 oracle, and the guard."""
import math

import numpy as np
import pytest
import torch

from adv_dpm.ops import adv_step, adv_step_inject, eager, reference
from conftest import (ATOL, EMULATED_CUDA, assert_within_budget, emulated_cuda_module, is_interpreted, make_input,
                      relayout, require_pair, use_pair)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TARGETS = ("original", "delta_detach", "delta")
# (shape, layout of delta, layout of grad, data kind of grad, radius as a fraction of a typical ||delta||)
CASES = [
    ((4, 3, 8, 8), "contiguous", "contiguous", "centred", 0.5),
    ((4, 3, 8, 8), "channels_last", "contiguous", "shifted", 2.0),
    ((3, 5, 7, 9), "channels_last", "channels_last", "shifted", math.inf),
    ((2, 4, 6, 6), "strided", "transposed", "centred", 0.5),
    ((1, 3, 5, 7), "contiguous", "contiguous", "shifted", 0.0),
    ((5, 1, 1, 1), "contiguous", "contiguous", "centred", 0.5),
    ((16, 2), "contiguous", "contiguous", "shifted", 0.5),
    # A sample above the Triton and CUDA kernels' one-program-per-sample size (16384 elements),
    # and one that the per-sample kernels walk in more than one block.
    ((2, 3, 96, 80), "contiguous", "contiguous", "centred", 0.5),
    ((2, 3, 64, 64), "channels_last", "channels_last", "shifted", 2.0),
]


def case_id(case):
    shape, ld, lg, kind, radius = case
    return f"{'x'.join(map(str, shape))}-{ld}-{lg}-{kind}-r{radius}"


def make_state(case, dtype, device, seed=0):
    """delta (some samples zero, as at the start of a batch), grad, x_t, eps, c_noise, lr, radius."""
    shape, ld, lg, kind, radius_frac = case
    g = torch.Generator().manual_seed(seed)
    delta = 0.05 * make_input(shape, dtype, device, "centred", g)
    delta[::2] = 0
    delta = relayout(delta, ld)
    grad = relayout(make_input(shape, dtype, device, kind, g), lg)
    x_t = relayout(make_input(shape, dtype, device, "shifted", g), ld)
    eps = relayout(make_input(shape, dtype, device, "centred", g), lg)
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c_noise = (torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.1).to(device, coef_dtype)
    d = math.prod(shape[1:])
    return delta, grad, x_t, eps, c_noise, 0.1 * math.sqrt(d) * 0.1, radius_frac * 0.1 * math.sqrt(d) * 0.1


def as64(t):
    return None if t is None else t.detach().double().cpu()


def skip_unsupported(pair, dtype):
    if dtype == torch.float64 and pair[1] in ("triton", "cuda"):
        pytest.skip("float64 runs on the reference and C++ CPU backends only")


def check_norms(name, out, ref, dtype):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.double(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_matches_oracle(pair, dtype, case):
    skip_unsupported(pair, dtype)
    if is_interpreted(pair) and dtype == torch.float64:
        pytest.skip("unsupported")
    delta, grad, _, _, _, lr, radius = make_state(case, dtype, pair[0])
    with use_pair(pair):
        out = adv_step(delta, grad, lr, radius)
    ref = reference.adv_step(as64(delta), as64(grad), None, None, None, None, lr, radius, None, 0)
    base = eager.adv_step(delta, grad, lr, radius)
    assert out.delta.dtype == dtype and out.delta.device.type == pair[0]
    assert_within_budget("delta", out.delta.cpu(), ref[0], base[0].cpu())
    check_norms("grad_norm", out.grad_norm, ref[3], dtype)
    check_norms("delta_norm", out.delta_norm, ref[4], dtype)
    assert not out.skipped.any()
    assert (out.delta_norm <= radius * (1 + 1e-5) + ATOL[dtype]).all(), "projection left the ball"
    if delta.dim() == 4 and delta.is_contiguous(memory_format=torch.channels_last):
        assert out.delta.is_contiguous(memory_format=torch.channels_last), "output lost the input's layout"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=case_id)
def test_inject_matches_oracle(pair, dtype, target, case):
    skip_unsupported(pair, dtype)
    if is_interpreted(pair) and (dtype != torch.float32 and target != "delta"):
        pytest.skip("the interpreter is slow: low precision is covered by one target")
    check_inject(pair, dtype, target, case)


def check_inject(pair, dtype, target, case):
    """adv_step_inject on ``pair`` against the float64 oracle, within the eager composite's error."""
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(case, dtype, pair[0])
    grad_target = 0.3 * torch.randn_like(grad) if target == "delta" else None
    with use_pair(pair):
        out = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, target, grad_target)
    mode = TARGETS.index(target)
    ref = reference.adv_step(as64(delta), as64(grad), as64(grad_target), as64(x_t), as64(eps), as64(c_noise),
                             lr, radius, None, mode)
    # the eager composite of the same step: the target's gradient folded in first
    g_eff = grad if grad_target is None else grad + grad_target / c_noise.to(dtype).reshape(-1, *[1] * (grad.dim() - 1))
    base = eager.adv_step_inject(x_t, eps, c_noise, delta, g_eff, lr, radius, target)
    for i, name in enumerate(["delta", "x_adv", "target"]):
        assert_within_budget(name, out[i].cpu(), ref[i], base[i].cpu())
    check_norms("grad_norm", out.grad_norm, ref[3], dtype)
    check_norms("delta_norm", out.delta_norm, ref[4], dtype)


# The CUDA launcher's forms of the step on an emulated device with thread block clusters (an
# H100's SM count) and one without (an A100's): device (SMs, clusters), shape, and the plan
# (0 resident in registers, blocks per sample; 1 one block per sample; 2 two kernels).
CUDA_PLANS = [
    pytest.param((132, True), (2, 3, 16, 16), (0, 1), id="clusters-resident"),
    pytest.param((132, True), (2, 3, 32, 32), (0, 3), id="clusters-resident-cluster-of-3"),
    pytest.param((132, True), (8, 3, 64, 64), (0, 8), id="clusters-resident-cluster-of-8"),
    pytest.param((132, True), (1, 3, 128, 128), (2, 1), id="clusters-two-kernels"),
    pytest.param((108, False), (2, 3, 16, 16), (0, 1), id="no-clusters-resident"),
    pytest.param((108, False), (2, 3, 64, 64), (1, 1), id="no-clusters-one-block-per-sample"),
    pytest.param((108, False), (1, 3, 96, 80), (2, 1), id="no-clusters-two-kernels"),
]


@pytest.mark.parametrize("device, shape, plan", CUDA_PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_cuda_plan_matches_oracle(device, shape, plan, dtype):
    """Every form of the CUDA step: the launcher picks the expected one for the device and
    shape, and the fused step (delta target, grad_target folded in) matches the oracle."""
    pair = require_pair(EMULATED_CUDA)
    module = emulated_cuda_module()
    default = module.set_device(*device)
    try:
        assert module.adv_step_plan(shape[0], math.prod(shape[1:])) == plan
        check_inject(pair, dtype, "delta", (shape, "contiguous", "contiguous", "shifted", 0.5))
    finally:
        module.set_device(*default)


@pytest.mark.parametrize("form", ["number", "tensor", "GradScaler's (1,) tensor"])
def test_grad_scale_is_divided_out(pair, form):
    """The loss scale as a number, or as a tensor on the device that the kernels read there (a
    GradScaler's scale), whatever the size of the gradient: near the 1e-8 floor of its norm too."""
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, pair[0])
    grad[1] *= 1e-10   # a norm below the 1e-8 floor, which applies to the unscaled norm
    s = 4096.0
    scale = {"number": s, "tensor": torch.tensor(s, device=pair[0]),
             "GradScaler's (1,) tensor": torch.full((1,), s, device=pair[0])}[form]
    with use_pair(pair):
        plain = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius)
        scaled = adv_step_inject(x_t, eps, c_noise, delta, grad * s, lr, radius, grad_scale=scale)
    ref = reference.adv_step(as64(delta), as64(grad), None, as64(x_t), as64(eps), as64(c_noise), lr, radius, None, 1)
    for i, name in enumerate(["delta", "x_adv", "target"]):
        torch.testing.assert_close(scaled[i].cpu().double(), ref[i], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(scaled[i], plain[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.grad_norm.cpu(), ref[3], rtol=1e-5, atol=1e-12)


def test_non_finite_gradient_keeps_delta_and_is_reported(pair):
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, pair[0])
    delta = delta + 0.01  # no sample at zero: "kept" must mean kept
    grad[1, 0, 0, 0] = float("inf")
    grad[2, 2, 3, 1] = float("nan")
    with use_pair(pair):
        out = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius)
    assert out.skipped.tolist() == [False, True, True, False]
    assert torch.equal(out.delta[1:3], delta[1:3]), "a skipped sample must keep its delta exactly"
    assert torch.isfinite(out.delta).all() and torch.isfinite(out.x_adv).all() and torch.isfinite(out.target).all()
    assert not torch.equal(out.delta[0], delta[0]) and not torch.equal(out.delta[3], delta[3])
    torch.testing.assert_close(out.x_adv[1:3], x_t[1:3] + delta[1:3])
    torch.testing.assert_close(out.delta_norm[1:3], delta[1:3].reshape(2, -1).norm(dim=1))


def test_zero_gradient_leaves_delta_inside_the_ball(pair):
    delta, grad, _, _, _, lr, radius = make_state(CASES[0], torch.float32, pair[0])
    delta = delta * (0.5 * radius / delta.reshape(4, -1).norm(dim=1).clamp_min(1e-12)).reshape(-1, 1, 1, 1)
    with use_pair(pair):
        out = adv_step(delta, torch.zeros_like(grad), lr, radius)
    assert torch.equal(out.delta, delta)
    assert not out.skipped.any() and (out.grad_norm == 0).all()


def test_opcheck(pair):
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[1], torch.float32, pair[0])
    with use_pair(pair):
        scale = torch.full((1,), 2.0, device=pair[0])
        torch.library.opcheck(torch.ops.adv_dpm.adv_step.default, (delta, grad, lr, radius, scale))
        torch.library.opcheck(torch.ops.adv_dpm.adv_step.default, (delta, grad, lr, radius, None))
        torch.library.opcheck(torch.ops.adv_dpm.adv_step_inject.default,
                              (x_t, eps, c_noise, delta, grad, lr, radius, "delta", torch.randn_like(grad), scale))
        torch.library.opcheck(torch.ops.adv_dpm.adv_step_inject.default,
                              (x_t, eps, c_noise, delta, grad, lr, radius, "original", None, None))


def test_batch_beyond_the_launch_grid(kernel_pair):
    """More samples than a CUDA grid has rows (65535): the kernels loop over the rest."""
    if kernel_pair == EMULATED_CUDA or is_interpreted(kernel_pair):
        pytest.skip("70000 samples take minutes in an emulation or the interpreter")
    case = ((70000, 5), "contiguous", "contiguous", "shifted", 0.5)
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(case, torch.float32, kernel_pair[0])
    with use_pair(kernel_pair):
        out = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, "delta_detach")
    ref = reference.adv_step(as64(delta), as64(grad), None, as64(x_t), as64(eps), as64(c_noise), lr, radius, None, 1)
    for i, name in enumerate(["delta", "x_adv", "target"]):
        torch.testing.assert_close(out[i].cpu().double(), ref[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    check_norms("grad_norm", out.grad_norm, ref[3], torch.float32)


@pytest.mark.parametrize("shape", [(3, 8, 32, 32), (1, 3, 96, 64)], ids=lambda s: "x".join(map(str, s)))
def test_is_deterministic(pair, shape):
    delta, grad, x_t, eps, c_noise, lr, radius = make_state((shape, "contiguous", "contiguous", "shifted", 0.5),
                                                            torch.float32, pair[0])
    with use_pair(pair):
        first = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius)
        second = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, error, match", [
    (dict(lr=-0.1), ValueError, r"lr must be a number >= 0 and finite, got -0.1"),
    (dict(radius=-1.0), ValueError, r"radius must be a number >= 0 \(inf allowed\), got -1.0"),
    (dict(radius=float("nan")), ValueError, r"radius must be a number >= 0"),
    (dict(grad_scale=0.0), ValueError, r"grad_scale must be a finite number > 0"),
    (dict(lr=True), ValueError, r"lr must be a number >= 0 and finite, got True"),
    (dict(grad_scale=torch.tensor(2.0, dtype=torch.float64)), ValueError,
     r"grad_scale must be a float32 tensor of one element, got torch.float64 of shape \(\)"),
    (dict(grad_scale=torch.ones(2)), ValueError, r"grad_scale must be a float32 tensor of one element"),
    (dict(grad_scale=torch.ones(1, device="meta")), ValueError, r"grad_scale must be on the device of the inputs"),
    (dict(grad=torch.randn(4, 3, 8)), ValueError, r"grad must have the shape of delta \(4, 3, 8, 8\)"),
    (dict(grad=torch.randn(4, 3, 8, 8, dtype=torch.float16)), TypeError, r"grad must have the dtype of delta"),
    (dict(x_t=torch.randn(2, 3, 8, 8)), ValueError, r"x_t must have the shape of delta"),
    (dict(c_noise=torch.rand(5)), ValueError, r"c_noise must have shape \(B,\) = \(4,\)"),
    (dict(target="eps"), ValueError, r"target must be one of"),
    (dict(grad_target=torch.randn(4, 3, 8, 8)), ValueError, r"grad_target .* is needed with target='delta'.* only then"),
    (dict(target="delta"), ValueError, r"got target='delta' and grad_target None"),
    (dict(grad=None), TypeError, r"adv_step_inject: grad must be the loss gradient .* got None"),
])
def test_bad_input_names_the_argument(change, error, match):
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, "cpu")
    args = dict(x_t=x_t, eps=eps, c_noise=c_noise, delta=delta, grad=grad, lr=lr, radius=radius)
    args.update(change)
    with pytest.raises(error, match=match):
        adv_step_inject(**args)


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf")])
def test_a_loss_scale_tensor_that_is_not_a_finite_number_above_zero_skips_every_sample(pair, value):
    """Its value is read on the device, where it cannot raise: every backend keeps delta and
    flags the samples instead of writing what such a scale would make of them."""
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, pair[0])
    scale = torch.tensor(value, device=pair[0])
    with use_pair(pair):
        step = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, grad_scale=scale)
        plain = adv_step(delta, grad, lr, radius, grad_scale=scale)
    for out in (step, plain):
        assert out.skipped.all() and torch.equal(out.delta, delta)
        torch.testing.assert_close(out.delta_norm, delta.flatten(1).norm(dim=1))
    torch.testing.assert_close(step.x_adv, x_t + delta)


def test_numpy_scalars_are_numbers():
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, "cpu")
    plain = adv_step_inject(x_t, eps, c_noise, delta, grad, lr, radius, grad_scale=2.0)
    from_numpy = adv_step_inject(x_t, eps, c_noise, delta, grad, np.float32(lr), np.float64(radius),
                                 grad_scale=np.float32(2.0))
    for a, b in zip(plain, from_numpy):
        torch.testing.assert_close(a, b)


def test_outputs_never_require_grad():
    """The ops update state: inputs that require grad (x_t through learnable coefficients) do
    not make outputs that fail on backward."""
    delta, grad, x_t, eps, c_noise, lr, radius = make_state(CASES[0], torch.float32, "cpu")
    step = adv_step_inject(x_t.requires_grad_(), eps, c_noise.requires_grad_(), delta, grad, lr, radius)
    assert not any(t.requires_grad for t in step)
    assert not any(t.requires_grad for t in adv_step(delta.requires_grad_(), grad, lr, radius))


def test_c_noise_in_the_shape_that_broadcasts_against_delta():
    x_t, eps, delta, grad = (torch.randn(3, 2, 4, 4) for _ in range(4))
    c_noise = torch.rand(3) + 0.1
    flat = adv_step_inject(x_t, eps, c_noise, delta, grad, lr=0.1, radius=1.0)
    broadcast = adv_step_inject(x_t, eps, c_noise.reshape(3, 1, 1, 1), delta, grad, lr=0.1, radius=1.0)
    for a, b in zip(broadcast, flat):
        torch.testing.assert_close(a, b)
