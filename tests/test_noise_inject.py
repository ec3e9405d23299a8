"""noise_inject: every backend against the float64 oracle, forward and backward."""
import pytest
import torch

from adv_dpm.ops import eager, noise_inject, reference
from conftest import (assert_within_budget, check_autograd_in_cpp, grads_of, is_interpreted, make_input, relayout,
                      use_pair)

TARGETS = ("original", "delta_detach", "delta")
# (shape, layout of x0, layout of eps/delta, data kind, with delta, target)
CASES = [
    ((4, 3, 8, 8), "contiguous", "contiguous", "shifted", True, "delta_detach"),
    ((4, 3, 8, 8), "channels_last", "channels_last", "centred", True, "delta"),
    ((3, 5, 7, 9), "channels_last", "contiguous", "shifted", True, "original"),
    ((2, 4, 6, 6), "strided", "transposed", "centred", True, "delta"),
    ((1, 3, 5, 7), "contiguous", "contiguous", "shifted", False, "delta_detach"),
    ((5, 1, 1, 1), "contiguous", "contiguous", "centred", True, "delta_detach"),
    ((16, 2), "contiguous", "contiguous", "shifted", True, "delta"),
    ((7,), "contiguous", "contiguous", "centred", True, "delta_detach"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def case_id(case):
    shape, lx, le, kind, with_delta, target = case
    return f"{'x'.join(map(str, shape))}-{lx}-{le}-{kind}-{'delta' if with_delta else 'nodelta'}-{target}"


def make_args(case, dtype, device, seed=0):
    shape, lx, le, kind, with_delta, target = case
    g = torch.Generator().manual_seed(seed)
    x0 = relayout(make_input(shape, dtype, device, kind, g), lx)
    eps = relayout(make_input(shape, dtype, device, "centred", g), le)
    delta = relayout(0.1 * make_input(shape, dtype, device, "centred", g), le) if with_delta else None
    b = shape[0]
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    c_signal = (torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(device, coef_dtype)
    c_noise = (1 - c_signal**2).sqrt()
    return x0, eps, c_signal, c_noise, delta, target


def as64(args):
    return [a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args]


def skip_unsupported(pair, dtype):
    if dtype == torch.float64 and pair[1] in ("triton", "cuda"):
        pytest.skip("float64 runs on the reference and C++ CPU backends only")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_oracle(pair, dtype, case):
    skip_unsupported(pair, dtype)
    args = make_args(case, dtype, pair[0])
    with use_pair(pair):
        x_t, target = noise_inject(*args)
    mode = TARGETS.index(case[-1])
    ref_x_t, ref_target = reference.noise_inject(*as64(args[:5]), mode)
    eager_x_t, eager_target = eager.noise_inject(*args)
    for name, out, ref, base in [("x_t", x_t, ref_x_t, eager_x_t), ("target", target, ref_target, eager_target)]:
        assert out.dtype == dtype and out.device.type == pair[0]
        assert_within_budget(name, out.cpu(), ref, base.cpu())
    if args[0].is_contiguous(memory_format=torch.channels_last) and args[0].dim() == 4:
        assert x_t.is_contiguous(memory_format=torch.channels_last), "output lost the input's layout"


BACKWARD_CASES = [CASES[0], CASES[1], CASES[2], CASES[3], CASES[4], CASES[6]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_backward_matches_autograd_of_oracle(pair, dtype, case):
    """The closed-form backward against autograd through the float64 reference forward."""
    skip_unsupported(pair, dtype)
    if is_interpreted(pair) and dtype != torch.float32 and case is not CASES[1]:
        pytest.skip("the interpreter is slow: low precision is covered by one case")
    args = make_args(case, dtype, pair[0])
    g = torch.Generator().manual_seed(1)
    up = [relayout(make_input(args[0].shape, dtype, pair[0], "centred", g), lay)
          for lay in ("channels_last", "contiguous")]
    with use_pair(pair):
        got = grads_of(noise_inject, args, up)
    mode = TARGETS.index(case[-1])
    ref = grads_of(lambda *a: reference.noise_inject(*a, mode), as64(args[:5]), as64(up))
    base = grads_of(eager.noise_inject, args, up)
    for name, out, r, b in zip(["x0", "eps", "c_signal", "c_noise", "delta"], got, ref, base):
        if r is None:
            assert out is None or not out.abs().any(), f"grad_{name}: expected no gradient"
            continue
        assert out.dtype == args[["x0", "eps", "c_signal", "c_noise", "delta"].index(name)].dtype
        assert_within_budget(f"grad_{name}", out.cpu(), r, b.cpu().to(out.dtype))


@pytest.mark.parametrize("target", ["original", "delta"])
def test_gradcheck_float64(pair, target):
    """('delta_detach' cuts a gradient on purpose, which finite differences cannot see; the
    autograd-oracle test above covers it.)"""
    if pair[1] in ("triton", "cuda"):
        pytest.skip("float64 runs on the reference and C++ CPU backends only")
    args = make_args(((2, 3, 4, 5), "channels_last", "contiguous", "shifted", True, target), torch.float64, pair[0])
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        assert torch.autograd.gradcheck(noise_inject, leaves)
        assert torch.autograd.gradgradcheck(noise_inject, leaves)   # create_graph: recomputed on the reference


def test_opcheck(pair):
    args = make_args(CASES[1], torch.float32, pair[0])
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        torch.library.opcheck(torch.ops.adv_dpm.noise_inject.default, tuple(leaves))
        x0, eps, cs, cn, delta, target = args
        up = [torch.randn_like(x0), torch.randn_like(x0)]
        for coef_grads in (True, False):
            torch.library.opcheck(torch.ops.adv_dpm.noise_inject_backward.default,
                                  (*up, x0, eps, cs, cn, delta, target, coef_grads))
        torch.library.opcheck(torch.ops.adv_dpm.noise_inject_backward.default,
                              (*up, x0, eps, cs, cn, None, "original", True))


def test_backward_is_deterministic(pair):
    args = make_args(((6, 4, 16, 16), "contiguous", "contiguous", "shifted", True, "delta"), torch.float32, pair[0])
    up = [torch.randn_like(args[0]), torch.randn_like(args[0])]
    with use_pair(pair):
        first, second = grads_of(noise_inject, args, up), grads_of(noise_inject, args, up)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_coefficient_gradients_only_when_needed(pair):
    """Without coefficient gradients the backward skips the per-sample sums (and returns none)."""
    x0, eps, cs, cn, delta, target = make_args(CASES[0], torch.float32, pair[0])
    x0.requires_grad_()
    with use_pair(pair):
        x_t, _ = noise_inject(x0, eps, cs, cn, delta, target)
        x_t.sum().backward()
    assert torch.equal(x0.grad.cpu(), cs.cpu().reshape(-1, 1, 1, 1).expand_as(x0).to(x0.dtype))
    assert cs.grad is None and cn.grad is None


@pytest.mark.parametrize("target", TARGETS)
def test_delta_gradient_without_coefficient_gradients(pair, target):
    """The usual free-AT backward (coefficients without gradient): grad_delta is grad_x_t for
    'original' and 'delta_detach' (passed through, no copy written), plus grad_target / c_noise
    for 'delta'; grad_eps and grad_x0 as the formulas say."""
    x0, eps, cs, cn, delta, _ = make_args(CASES[0], torch.float32, pair[0])
    x0, eps, delta = (t.detach().requires_grad_() for t in (x0, eps, delta))
    g_xt, g_t = torch.randn_like(x0), torch.randn_like(x0)
    with use_pair(pair):
        grad_x0, grad_eps, grad_delta = torch.autograd.grad(noise_inject(x0, eps, cs, cn, delta, target),
                                                            (x0, eps, delta), (g_xt, g_t))
    per_sample = lambda c: c.reshape(-1, 1, 1, 1)  # noqa: E731
    expected_delta = g_xt + g_t / per_sample(cn) if target == "delta" else g_xt
    torch.testing.assert_close(grad_delta, expected_delta)
    torch.testing.assert_close(grad_eps, per_sample(cn) * g_xt + g_t)
    torch.testing.assert_close(grad_x0, per_sample(cs) * g_xt)


def test_compiled_kernels_differentiate_without_python(pair):
    check_autograd_in_cpp(pair, noise_inject, make_args(CASES[1], torch.float32, pair[0]))


@pytest.mark.parametrize("change, error, match", [
    (dict(eps=torch.randn(4, 3, 8, 7)), ValueError, r"eps must have the shape of x0 \(4, 3, 8, 8\)"),
    (dict(delta=torch.randn(4, 3, 8, 8, dtype=torch.float64)), TypeError, r"delta must have the dtype of x0"),
    (dict(c_noise=torch.rand(3)), ValueError, r"c_noise must have shape \(B,\) = \(4,\)"),
    (dict(c_signal=torch.rand(4, 1)), ValueError, r"c_signal must have shape \(B,\)"),
    (dict(c_signal=torch.ones(4, dtype=torch.int64)), TypeError, r"c_signal must be floating point"),
    (dict(x0=torch.ones(4, 3, 8, 8, dtype=torch.int32)), TypeError, r"x0 must be a floating-point tensor"),
    (dict(target="shifted"), ValueError, r"target must be one of \('original', 'delta_detach', 'delta'\)"),
    (dict(eps=torch.randn(4, 3, 8, 8, device="meta")), ValueError, r"eps must be on the device of x0"),
])
def test_bad_input_names_the_argument(change, error, match):
    args = dict(zip(["x0", "eps", "c_signal", "c_noise", "delta", "target"],
                    make_args(CASES[0], torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(error, match=match):
        noise_inject(**args)


def test_coefficients_in_the_shape_that_broadcasts_against_x0():
    """Per-sample coefficients kept as (B, 1, 1, 1), as trainers keep them for x0 * c, go in as they are."""
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    c_signal, c_noise = torch.rand(3, 1, 1, 1, requires_grad=True), torch.rand(3, 1, 1, 1, requires_grad=True)
    x_t, target = noise_inject(x0, eps, c_signal, c_noise, target="original")
    torch.testing.assert_close(x_t, c_signal * x0 + c_noise * eps)
    torch.testing.assert_close(target, eps)
    g = torch.randn_like(x_t)
    grads = torch.autograd.grad(x_t, [c_signal, c_noise], g)
    torch.testing.assert_close(grads, torch.autograd.grad(c_signal * x0 + c_noise * eps, [c_signal, c_noise], g))
