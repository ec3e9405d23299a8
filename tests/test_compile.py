"""torch.compile(fullgraph=True) over a free-AT replay that uses both ops: no graph break,
same values and gradients as eager."""
import pytest
import torch

import adv_dpm
from conftest import use_pair


def replay(x0, eps, c_signal, c_noise, delta, grad, loss_scale):
    """The op calls of one free-AT replay (the gradient comes from the caller's backward), with the
    loss scale as a device tensor (a GradScaler's) and as a number."""
    x_t, _ = adv_dpm.noise_inject(x0, eps, c_signal, c_noise)
    step = adv_dpm.adv_step_inject(x_t, eps, c_noise, delta, grad * loss_scale, 0.1, 1.0, grad_scale=loss_scale)
    plain = adv_dpm.adv_step(delta, grad * 4.0, 0.1, 1.0, grad_scale=4.0)
    x_in, target = adv_dpm.noise_inject(x0, eps, c_signal, c_noise, step.delta, "delta")
    return x_in, target, plain.delta


def loss_of(x0, eps, c_signal, c_noise, delta, weight):
    x_in, target = adv_dpm.noise_inject(x0, eps, c_signal, c_noise, delta, "delta")
    return ((x_in * weight - target) ** 2).mean()


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    return torch.compile(loss_of, fullgraph=True), torch.compile(adv_dpm.adv_step_inject, fullgraph=True)


def inputs(device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g).to(device)
    eps = torch.randn(4, 3, 8, 8, generator=g).to(device)
    cs = torch.rand(4, generator=g).to(device)
    return x0, eps, cs, (1 - cs**2).sqrt(), 0.01 * torch.randn(4, 3, 8, 8, generator=g).to(device)


def test_fullgraph_matches_eager(pair, compiled):
    if pair[1] == "triton" and pair[0] == "cpu":
        pytest.skip("the compiled graph calls the op as a black box; backends are covered by the op tests")
    compiled_loss, compiled_step = compiled
    x0, eps, cs, cn, delta = inputs(pair[0])
    weight = torch.ones(1, 3, 1, 1, device=pair[0], requires_grad=True)
    delta.requires_grad_()
    with use_pair(pair):
        loss_c = compiled_loss(x0, eps, cs, cn, delta, weight)
        grads_c = torch.autograd.grad(loss_c, [weight, delta])
        loss_e = loss_of(x0, eps, cs, cn, delta, weight)
        grads_e = torch.autograd.grad(loss_e, [weight, delta])
        step_c = compiled_step(x0, eps, cn, delta.detach(), grads_c[1], 0.1, 1.0)
        step_e = adv_dpm.adv_step_inject(x0, eps, cn, delta.detach(), grads_e[1], 0.1, 1.0)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c + tuple(step_c), grads_e + tuple(step_e)):
        torch.testing.assert_close(a, b)


def test_no_graph_breaks():
    x0, eps, cs, cn, delta = inputs("cpu")
    explained = torch._dynamo.explain(replay)(x0, eps, cs, cn, delta, torch.randn_like(x0), torch.full((1,), 1024.0))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_the_unet_with_fused_group_norm_compiles_without_a_graph_break():
    """The trainer's --compile: dynamo takes the whole ADM UNet, fused GroupNorm calls included."""
    from adv_dpm.models import build_model
    model = build_model("digits-tiny", image_size=8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    explained = torch._dynamo.explain(model)(x, torch.tensor([3, 500]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1 and "torch.ops.adv_dpm.group_norm_act" in explained.graphs[0].code


def test_a_loss_scale_number_that_changes_recompiles_without_failing():
    """A GradScaler's get_scale() changes during training: dynamo then passes it as a symbolic
    float, which the argument checks must take (they compare instead of calling math.isfinite)."""
    torch._dynamo.reset()
    step = torch.compile(lambda d, g, s: adv_dpm.adv_step(d, g * s, 0.1, 1.0, grad_scale=s).delta, fullgraph=True)
    delta, grad = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = adv_dpm.adv_step(delta, grad, 0.1, 1.0).delta
    for scale in (1024.0, 2048.0, 512.0):
        torch.testing.assert_close(step(delta, grad, scale), expected)
