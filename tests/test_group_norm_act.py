"""group_norm_act: every backend against the float64 oracle, forward and backward."""
import pytest
import torch

from adv_dpm.ops import backend, eager, group_norm_act, reference, use_backend
from adv_dpm.ops.group_norm_act import collapse_problem
from conftest import (PAIRS, _pair_params, assert_within_budget, check_autograd_in_cpp, grads_of, group_norm_oracle,
                      is_interpreted, require_pair, use_pair)

OP = "group_norm_act"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (shape, groups, layout, data kind, parameters given, act); parameters: "wb" weight and bias,
# "ss" scale and shift as ADM makes them (the halves of one (N, 2C) projection: strided views),
# "SS" scale and shift as contiguous tensors of their own.
CASES = [
    ((4, 32, 8, 8), 8, "contiguous", "shifted", "wbss", "silu"),
    ((4, 32, 8, 8), 8, "channels_last", "centred", "wbSS", "silu"),
    ((3, 96, 5, 7), 32, "channels_last", "shifted", "wb", "silu"),
    ((2, 30, 4, 4), 5, "contiguous", "mean100", "ss", None),
    ((2, 30, 4, 4), 5, "channels_last", "shifted", "wbss", "silu"),  # channels not a whole vector
    ((1, 64, 1, 1), 16, "contiguous", "shifted", "wbSS", "silu"),
    ((5, 12), 4, "contiguous", "centred", "wbss", None),
    ((2, 16, 6), 4, "contiguous", "shifted", "", "silu"),
    ((2, 256, 8, 8), 1, "channels_last", "mean100", "wbss", "silu"),
    # Few, large groups: the CUDA kernels split each group over several blocks (vector and
    # scalar tiles), Triton runs its SPLIT plan on the second.
    ((2, 32, 32, 32), 8, "contiguous", "shifted", "wbSS", "silu"),
    ((1, 16, 33, 70), 2, "contiguous", "centred", "wbss", "silu"),
    # More channels per group than one CUDA tile takes (512): the group is split over channels.
    ((2, 640, 2, 2), 1, "contiguous", "shifted", "wbss", "silu"),
]


def case_id(case):
    shape, g, layout, kind, params, act = case
    return f"{'x'.join(map(str, shape))}-g{g}-{layout}-{kind}-{params or 'noparams'}-{act}"


@pytest.fixture(params=_pair_params(PAIRS))
def pair(request):
    return require_pair(request.param, OP)


def make_args(case, dtype, device, seed=0):
    shape, groups, layout, kind, params, act = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = {"shifted": -2.3 + 0.5 * x, "centred": x, "mean100": 100 + x}[kind]
    x = x.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    n, c = shape[:2]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32   # ADM keeps norm parameters in fp32
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, pdtype)  # noqa: E731
    w = 1 + 0.3 * rand(c) if "wb" in params else None
    b = 0.3 * rand(c) if "wb" in params else None
    scale = shift = None
    if "ss" in params.lower():
        emb = 0.5 * rand(n, 2 * c).to(dtype if dtype != torch.float64 else pdtype)
        scale, shift = emb.chunk(2, dim=1) if "ss" in params else (emb[:, :c].contiguous(), emb[:, c:].contiguous())
    return x, w, b, groups, 1e-5, scale, shift, act


def as64(args):
    return [a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args]


def ref_forward(args):
    x, w, b, groups, eps, scale, shift, act = as64(args)
    return reference.group_norm_act(x, w, b, scale, shift, groups, eps, int(act == "silu"))


def skip_unsupported(pair, dtype):
    if dtype == torch.float64 and pair[1] in ("triton", "cuda"):
        pytest.skip("float64 runs on the reference and C++ CPU backends only")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_oracle(pair, dtype, case):
    skip_unsupported(pair, dtype)
    check_forward(pair, dtype, case)


def check_forward(pair, dtype, case):
    args = make_args(case, dtype, pair[0])
    with use_pair(pair):
        y, mean, rstd = torch.ops.adv_dpm.group_norm_act(*args)
    ref_y, ref_mean, ref_rstd = ref_forward(args)
    assert y.dtype == dtype and y.device.type == pair[0]
    assert_within_budget("y", y.cpu(), ref_y, eager.group_norm_act(*args).cpu())
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stats_dtype and mean.shape == (case[0][0], case[1])
    # statistics of the rounded input: the kernel sees x in its dtype
    ref_mean, ref_rstd = ref_forward([args[0].double()] + list(args[1:]))[1:]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(rstd.cpu().double(), ref_rstd, rtol=tol * 10, atol=tol)
    if args[0].dim() == 4 and args[0].is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last), "output lost the input's layout"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_autograd_of_oracle(pair, dtype, case):
    skip_unsupported(pair, dtype)
    if is_interpreted(pair) and dtype != torch.float32 and case is not CASES[1]:
        pytest.skip("the interpreter is slow: low precision is covered by one case")
    check_backward(pair, dtype, case)


@pytest.mark.parametrize("plan, i64, reorder", [("looped", False, True), ("split", False, True), ("one", True, True),
                                                ("one", False, False)])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=case_id)
def test_triton_plans_match_oracle(pair, plan, i64, reorder, case, monkeypatch):
    """The Triton plans and 64-bit offsets that the CASES do not reach on their own (LOOPED takes
    N * G >= 528 groups, 64-bit offsets a sample of 2**31 elements), forced on small cases; and the
    group sums without tl.reshape's can_reorder, for a Triton that no longer takes it."""
    if pair[1] != "triton":
        pytest.skip("Triton's plans")
    if not reorder and not is_interpreted(pair):
        pytest.skip("a compiled kernel keeps the REORDER_SUMS it was first compiled with")
    kernels = pytest.importorskip("adv_dpm.kernels.group_norm_act")
    monkeypatch.setattr(kernels, "FORCE_PLAN", plan)
    monkeypatch.setattr(kernels, "FORCE_I64", i64)
    monkeypatch.setattr(kernels, "REORDER_SUMS", kernels.tl.constexpr(reorder))
    check_forward(pair, torch.float32, case)
    check_backward(pair, torch.float32, case)


def check_backward(pair, dtype, case):
    args = make_args(case, dtype, pair[0])
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(case[0], generator=g).to(pair[0], dtype)
    if grad_y.dim() == 4 and case[2] == "contiguous":   # upstream gradient in the other layout
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    with use_pair(pair):
        got = grads_of(group_norm_act, args, grad_y)

    ref = grads_of(group_norm_oracle, as64(args), grad_y.double().cpu())
    base = grads_of(eager.group_norm_act, args, grad_y)
    names = [n for n, a in zip(["x", "weight", "bias", "", "", "scale", "shift"], args) if isinstance(a, torch.Tensor)]
    for name, out, r, b in zip(names, got, ref, base):
        assert out.dtype == b.dtype or name != "x"
        assert_within_budget(f"grad_{name}", out.cpu().to(b.dtype), r, b.cpu())


def test_backward_takes_an_upstream_gradient_whose_spatial_dims_do_not_collapse(pair):
    """Every backend, the C++ autograd and the Python layer alike, takes a spatially transposed
    grad_y (the kernels copy it)."""
    case = CASES[1]
    args = make_args(case, torch.float32, pair[0])
    n, c, h, w = case[0]
    grad_y = torch.randn(n, c, w, h, generator=torch.Generator().manual_seed(1)).to(pair[0]).transpose(2, 3)
    assert collapse_problem("grad_y", grad_y)
    with use_pair(pair):
        got = grads_of(group_norm_act, args, grad_y)
    ref = grads_of(group_norm_oracle, as64(args), grad_y.double().cpu())
    base = grads_of(eager.group_norm_act, args, grad_y)
    for name, out, r, b in zip(["x", "weight", "bias", "scale", "shift"], got, ref, base):
        assert_within_budget(f"grad_{name}", out.cpu(), r, b.cpu())


@pytest.mark.parametrize("wdtype, sdtype", [(torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32),
                                             (torch.float16, torch.float64)], ids=str)
def test_parameters_in_dtypes_of_their_own(pair, wdtype, sdtype):
    """weight/bias and scale/shift each in a dtype of its own beside bf16 activations (ADM's fp32
    parameters with bf16 scale/shift are the CASES above): each is read in its dtype, and each
    gradient comes back in its parameter's dtype, within budget of the oracle."""
    x, w, b, groups, eps, scale, shift, act = make_args(CASES[0], torch.bfloat16, pair[0])
    args = (x, w.to(wdtype), b.to(wdtype), groups, eps, scale.to(sdtype), shift.to(sdtype), act)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(pair[0], x.dtype)
    with use_pair(pair):
        y = group_norm_act(*args)
        got = grads_of(group_norm_act, args, grad_y)
    assert_within_budget("y", y.cpu(), group_norm_oracle(*as64(args)), eager.group_norm_act(*args).cpu())
    ref = grads_of(group_norm_oracle, as64(args), grad_y.double().cpu())
    base = grads_of(eager.group_norm_act, args, grad_y)
    for name, out, r, e, given in zip(["x", "weight", "bias", "scale", "shift"], got, ref, base,
                                      [a for a in args if isinstance(a, torch.Tensor)]):
        assert out.dtype == given.dtype, f"grad_{name} is {out.dtype}, its input {given.dtype}"
        assert_within_budget(f"grad_{name}", out.cpu(), r, e.cpu())


@pytest.mark.parametrize("act", ["silu", None])
def test_gradcheck_float64(pair, act):
    if pair[1] in ("triton", "cuda"):
        pytest.skip("float64 runs on the reference and C++ CPU backends only")
    args = make_args(((2, 6, 3, 4), 3, "channels_last", "shifted", "wbss", act), torch.float64, pair[0])
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        assert torch.autograd.gradcheck(group_norm_act, leaves)
        assert torch.autograd.gradgradcheck(group_norm_act, leaves)   # create_graph: recomputed on the reference


def test_opcheck(pair):
    args = make_args(CASES[1], torch.float32, pair[0])
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        torch.library.opcheck(torch.ops.adv_dpm.group_norm_act.default, tuple(leaves))
        x, w, b, groups, eps, scale, shift, act = args
        _, mean, rstd = torch.ops.adv_dpm.group_norm_act(*args)
        grad_y = torch.randn_like(x).contiguous()
        torch.library.opcheck(torch.ops.adv_dpm.group_norm_act_backward.default,
                              (grad_y, x, mean, rstd, w, b, scale, shift, groups, act))
        torch.library.opcheck(torch.ops.adv_dpm.group_norm_act_backward.default,
                              (grad_y, x, mean, rstd, None, None, None, None, groups, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_saturates_at_extreme_pre_activations(pair, dtype):
    """Pre-activations far beyond exp's float range (|z| up to about 300): SiLU's limits z and 0,
    forward and backward, as the oracle."""
    x, _, _, groups, eps, scale, shift, act = make_args(CASES[0], dtype, pair[0])
    c = x.shape[1]
    w = torch.linspace(-100.0, 100.0, c, device=x.device)  # z = xhat * w: |z| up to ~300
    args = (x, w, torch.zeros(c, device=x.device), groups, eps, scale, shift, act)
    with use_pair(pair):
        y = group_norm_act(*args)
    assert torch.isfinite(y).all()
    assert_within_budget("y", y.cpu(), ref_forward(args)[0], eager.group_norm_act(*args).cpu())
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        grad_x = torch.autograd.grad(group_norm_act(*leaves), leaves[0], torch.ones_like(x))[0]
    assert torch.isfinite(grad_x).all()


def test_backward_is_deterministic(pair):
    args = make_args(((4, 64, 16, 16), 32, "channels_last", "shifted", "wbss", "silu"), torch.float32, pair[0])
    grad_y = torch.randn_like(args[0])
    with use_pair(pair):
        first, second = grads_of(group_norm_act, args, grad_y), grads_of(group_norm_act, args, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_compiled_kernels_differentiate_without_python(pair):
    check_autograd_in_cpp(pair, group_norm_act, make_args(CASES[0], torch.float32, pair[0]))


def test_backward_makes_no_zero_gradients_for_the_statistics():
    """The statistics are outputs of the op that nothing differentiates: autograd must not fill
    (N, G) tensors of zeros for their gradients at every backward (two kernels per call on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    x, w, b = torch.randn(2, 8, 4, 4, requires_grad=True), torch.ones(8, requires_grad=True), torch.zeros(8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        group_norm_act(x, w, b, 4).sum().backward()
    zero_fills = [(e.name, e.input_shapes) for e in prof.events()
                  if e.name in ("aten::zeros", "aten::zero_", "aten::fill_") and e.input_shapes[:1] == [[2, 4]]]
    assert x.grad is not None and w.grad is not None and not zero_fills


def test_autocast_keeps_the_input_dtype_like_groupnorm32():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    w, b = torch.ones(8), torch.zeros(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_norm_act(x, w, b, 4)
        y32 = group_norm_act(x.float(), w, b, 4)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32


def test_strides_the_kernels_cannot_take_fall_back_to_the_reference():
    x = torch.randn(2, 8, 4, 8)[:, :, ::2, :4]   # rows of a wider image: H, W do not collapse into one
    assert backend.select(x, OP, "problem") == "reference"
    y = group_norm_act(x, None, None, 4)
    torch.testing.assert_close(y, eager.group_norm_act(x, None, None, 4))
    if backend.unavailable("cpu", "cpu", OP) is None:
        with use_backend("cpu"), pytest.raises(RuntimeError, match="spatial dims of x .* do not collapse"):
            group_norm_act(x, None, None, 4)


@pytest.mark.parametrize("change, error, match", [
    (dict(num_groups=5), ValueError, r"num_groups must be a positive divisor of the channel count C=32, got 5"),
    (dict(scale=torch.randn(4, 16)), ValueError, r"scale must have shape \(4, 32\) \(\(N, C\), or .*\), got \(4, 16\)"),
    (dict(weight=torch.randn(31)), ValueError, r"weight must have shape \(32,\)"),
    (dict(bias=torch.ones(32, dtype=torch.int64)), TypeError, r"bias must be a floating-point tensor"),
    (dict(shift=torch.randn(4, 32, device="meta")), ValueError, r"shift must be on the device of x"),
    (dict(x=torch.ones(4, 32, 8, 8, dtype=torch.int32)), TypeError, r"x must be a floating-point tensor"),
    (dict(act="relu"), ValueError, r"act must be 'silu' or None, got 'relu'"),
    (dict(eps=-1.0), ValueError, r"eps must be a number >= 0"),
])
def test_bad_input_names_the_argument(change, error, match):
    args = dict(zip(["x", "weight", "bias", "num_groups", "eps", "scale", "shift", "act"],
                    make_args(CASES[0], torch.float32, "cpu")))
    args.update(change)
    with pytest.raises(error, match=match):
        group_norm_act(**args)


def test_scale_and_shift_in_the_shape_that_broadcasts_against_x():
    """The halves of ADM's emb_out[..., None, None], (N, C, 1, 1), go in as they are."""
    x = torch.randn(2, 8, 4, 4)
    emb = torch.randn(2, 16, 1, 1, requires_grad=True)
    scale, shift = emb.chunk(2, dim=1)
    y = group_norm_act(x, None, None, 4, scale=scale, shift=shift)
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4) * (1 + scale) + shift)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, emb, g)[0], torch.autograd.grad(expected, emb, g)[0])
