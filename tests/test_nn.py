"""GroupNormAct as a drop-in, and patch_model on the blocks of ADM, consistency models, diffusers, EDM,
DDPM, score_sde, denoising-diffusion-pytorch and imagen-pytorch: same outputs and gradients."""
import copy
import io
import types
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from adv_dpm.nn import FusedSequential, GroupNormAct, patch_model


class GroupNorm32(nn.GroupNorm):
    """ADM's normalization: fp32 statistics, output cast back to the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(8, channels)


class ResBlock(nn.Module):
    """A residual block laid out as ADM's (in_layers, emb_layers, out_layers, updown, skip)."""

    def __init__(self, channels, emb_channels, out_channels, use_scale_shift_norm, down=False):
        super().__init__()
        self.use_scale_shift_norm, self.updown = use_scale_shift_norm, down
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.h_upd = self.x_upd = nn.AvgPool2d(2) if down else nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TinyUNetPiece(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(16, 32, 16, True), ResBlock(16, 32, 24, True, down=True),
                                     ResBlock(24, 32, 24, False)])
        self.attn_norm = normalization(24)    # used alone, as ADM's attention does
        self.out = nn.Sequential(normalization(24), nn.SiLU(), nn.Conv2d(24, 3, 3, padding=1))

    def forward(self, x, emb):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        h = h + self.attn_norm(h)
        return self.out(h)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_model_gives_the_same_outputs_and_gradients(memory_format):
    torch.manual_seed(0)
    model = TinyUNetPiece()
    for p in model.parameters():   # zero-initialised convs would hide differences
        nn.init.normal_(p, std=0.2)
    patched = copy.deepcopy(model)
    replaced = patch_model(patched)
    kinds = sorted(type(r.new).__name__ for r in replaced)
    assert kinds.count("GroupNormAct") == 8    # 2 scale-shift tails, 5 in Sequentials, 1 alone
    assert sum(r.name.endswith("._forward") for r in replaced) == 2
    assert sum(r.new is FusedSequential for r in replaced) == 7   # in_layers, out_layers, out
    assert not any(isinstance(m, GroupNorm32) for m in patched.modules())

    x = torch.randn(2, 3, 16, 16).to(memory_format=memory_format)
    emb = torch.randn(2, 32)
    assert_same_outputs_and_gradients(model(x, emb), patched(x, emb), model, patched, out_tol=(1e-4, 1e-5),
                                      grad_tol=(1e-4, 1e-4))


def assert_same_outputs_and_gradients(out_ref, out, model, patched, out_tol, grad_tol):
    """The patched model's output and parameter gradients (for one random upstream gradient) are
    the model's, within the (rtol, atol) tolerances of each."""
    torch.testing.assert_close(out, out_ref, rtol=out_tol[0], atol=out_tol[1])
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, list(model.parameters()), g)
    grads = torch.autograd.grad(out, list(patched.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=grad_tol[0], atol=grad_tol[1], msg=lambda m: f"{name}: {m}")


def test_patch_shares_parameters_and_keeps_state_dict_keys():
    model = TinyUNetPiece()
    keys, params = list(model.state_dict()), {id(p) for p in model.parameters()}
    patch_model(model)
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == params
    assert patch_model(model) == []   # idempotent


def test_group_norm_act_is_a_drop_in_for_group_norm_then_silu():
    norm = nn.GroupNorm(4, 12)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    fused = GroupNormAct(4, 12)
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(3, 12, 5, 5)
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(norm(x)))
    scale, shift = torch.randn(3, 12), torch.randn(3, 12)
    expected = torch.nn.functional.silu(norm(x) * (1 + scale[..., None, None]) + shift[..., None, None])
    torch.testing.assert_close(fused(x, scale, shift), expected)
    assert "act='silu'" in repr(fused)


def test_group_norm_act_with_an_unknown_activation_fails_where_it_is_built():
    with pytest.raises(ValueError, match=r"GroupNormAct: act must be one of \('silu', None\), got 'relu'"):
        GroupNormAct(4, 12, act="relu")


def test_half_precision_activations_with_fp32_parameters_like_adm():
    norm = GroupNormAct(4, 12)
    x = torch.randn(2, 12, 4, 4, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias))
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def randomized(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():   # zero-initialised convs would hide differences
        nn.init.normal_(p, std=0.3)
    return model


def assert_same_function(model, patched, x, *rest):
    torch.testing.assert_close(patched(x, *rest), model(x, *rest), rtol=1e-4, atol=1e-5)


class RescaledResBlock(ResBlock):
    """A fork whose _forward differs from ADM's (residual scaled by 1/sqrt(2))."""

    def _forward(self, x, emb):
        return super()._forward(x, emb) / 2 ** 0.5


class InlineResBlock(ResBlock):
    """A fork that writes the scale-shift tail in forward() and calls out_layers piecewise."""

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class Swish(nn.Module):
    """improved-diffusion's own SiLU class."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class NoUpdownResBlock(ResBlock):
    """improved-diffusion's ResBlock: no updown attribute, its own SiLU class."""

    def __init__(self, *args):
        super().__init__(*args)
        del self.updown
        for seq in (self.in_layers, self.out_layers, self.emb_layers):
            for key, m in seq._modules.items():
                if isinstance(m, nn.SiLU):
                    seq._modules[key] = Swish()

    def _forward(self, x, emb):
        self.updown = False
        try:
            return super()._forward(x, emb)
        finally:
            del self.updown


def test_only_blocks_whose_forward_is_adms_get_the_fused_tail():
    """A block's _forward is replaced only where a probe shows it is ADM's; an inline tail that
    calls out_layers piecewise keeps its meaning (FusedSequential fuses only whole calls)."""
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    for block, fused_tail in [(RescaledResBlock(8, 16, 8, True), False), (InlineResBlock(8, 16, 8, True), True),
                              (NoUpdownResBlock(8, 16, 8, True), True)]:
        model = randomized(block)
        patched = copy.deepcopy(model)
        if fused_tail:
            replaced = patch_model(patched)
        else:
            with pytest.warns(UserWarning, match="stay unfused: its _forward differs from ADM.s ResBlock._forward"):
                replaced = patch_model(patched)
        assert any(r.name == "_forward" for r in replaced) == fused_tail, type(block).__name__
        assert isinstance(patched.in_layers, FusedSequential)
        assert_same_function(model, patched, x, emb)


def test_group_norms_that_compute_something_else_and_hooked_modules_are_left_alone():
    class Gained(nn.GroupNorm):   # an extra parameter
        def __init__(self, *args):
            super().__init__(*args)
            self.gain = nn.Parameter(torch.full((1,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.gain

    class Float32Out(nn.GroupNorm):   # returns fp32 whatever the input dtype
        def forward(self, x):
            return super().forward(x.float())

    model = randomized(nn.Sequential(Gained(4, 8), nn.SiLU(), Float32Out(4, 8), nn.SiLU(), nn.GroupNorm(4, 8),
                                     nn.SiLU()))
    calls = []
    model[4].register_forward_hook(lambda *a: calls.append("hook"))
    patched = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert patch_model(patched) == []
    assert list(patched.state_dict()) == keys and type(patched) is nn.Sequential
    assert_same_function(model, patched, torch.randn(2, 8, 4, 4))
    assert calls == ["hook", "hook"]


def test_patched_model_pickles_and_copies():
    model = randomized(TinyUNetPiece())
    patch_model(model)
    x, emb = torch.randn(2, 3, 16, 16), torch.randn(2, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        torch.testing.assert_close(other(x, emb), model(x, emb))
        assert other.blocks[0]._forward.args[0] is other.blocks[0]
    assert GroupNormAct.replacing(nn.GroupNorm(2, 4, affine=False), None).affine is False


def test_hooks_added_after_patching_still_run():
    model = randomized(ResBlock(8, 16, 8, True))
    patched = copy.deepcopy(model)
    patch_model(patched)
    calls = []
    for m in (patched.out_layers[0], patched.in_layers[1]):
        m.register_forward_hook(lambda *a: calls.append(1))
    assert_same_function(model, patched, torch.randn(2, 8, 8, 8), torch.randn(2, 16))
    assert len(calls) == 2


class Recompute(torch.autograd.Function):
    """ADM's gradient checkpointing (use_checkpoint): the block runs without a graph, and again
    inside the backward, whose own autograd.grad then differentiates the fused ops."""

    @staticmethod
    def forward(ctx, run, n_inputs, *args):
        ctx.run, ctx.inputs, ctx.params = run, args[:n_inputs], args[n_inputs:]
        with torch.no_grad():
            return run(*ctx.inputs)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [x.detach().requires_grad_() for x in ctx.inputs]
        with torch.enable_grad():
            out = ctx.run(*[x.view_as(x) for x in inputs])
        grads = torch.autograd.grad(out, inputs + list(ctx.params), grad_out, allow_unused=True)
        return (None, None, *grads)


class CheckpointedResBlock(ResBlock):
    def forward(self, x, emb):
        return Recompute.apply(self._forward, 2, x, emb, *self.parameters())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_block_under_adms_gradient_checkpointing(memory_format):
    model = randomized(CheckpointedResBlock(16, 32, 16, True, down=True))
    patched = copy.deepcopy(model)
    assert "_forward" in {r.name for r in patch_model(patched)}
    x = torch.randn(2, 16, 8, 8).to(memory_format=memory_format).requires_grad_()
    emb = torch.randn(2, 32)
    assert_same_outputs_and_gradients(model(x, emb), patched(x, emb), model, patched, out_tol=(1e-4, 1e-5),
                                      grad_tol=(1e-4, 1e-4))


# consistency models' blocks (openai/consistency_models, cm/nn.py and cm/unet.py): ADM's layout, with
# a GroupNorm32 that applies its SiLU itself (swish=1.0) where ADM has GroupNorm32 -> SiLU.
class SwishGroupNorm32(nn.GroupNorm):
    def __init__(self, num_groups, num_channels, swish, eps=1e-5):
        super().__init__(num_groups=num_groups, num_channels=num_channels, eps=eps)
        self.swish = swish

    def forward(self, x):
        y = super().forward(x.float()).to(x.dtype)
        if self.swish == 1.0:
            y = torch.nn.functional.silu(y)
        elif self.swish:
            y = y * torch.sigmoid(y * float(self.swish))
        return y


class CMResBlock(ResBlock):
    def __init__(self, channels, emb_channels, out_channels, use_scale_shift_norm, down=False):
        super().__init__(channels, emb_channels, out_channels, use_scale_shift_norm, down)
        self.in_layers[0], self.in_layers[1] = SwishGroupNorm32(8, channels, swish=1.0), nn.Identity()
        self.out_layers[0] = SwishGroupNorm32(8, out_channels, swish=0.0 if use_scale_shift_norm else 1.0)
        if not use_scale_shift_norm:
            self.out_layers[1] = nn.Identity()


class TinyCMPiece(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)   # (torch 2.13's CPU GroupNorm backward crashes on a
        self.blocks = nn.ModuleList([               # channels_last input whose gradient is not needed)
            CMResBlock(16, 32, 16, True), CMResBlock(16, 32, 24, True, down=True), CMResBlock(24, 32, 24, False)])

    def forward(self, x, emb):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return h


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_consistency_model_blocks_give_the_same_outputs_and_gradients(memory_format):
    model = randomized(TinyCMPiece())
    patched = copy.deepcopy(model)
    replaced = {r.name: r.new for r in patch_model(patched)}
    assert {name for name, new in replaced.items() if getattr(new, "act", "") == "silu"} == {
        "blocks.0.in_layers.0", "blocks.1.in_layers.0", "blocks.2.in_layers.0", "blocks.2.out_layers.0"}
    assert {name for name, new in replaced.items() if isinstance(new, GroupNormAct) and new.act is None} == {
        "blocks.0.out_layers.0", "blocks.1.out_layers.0"}
    assert {"blocks.0._forward", "blocks.1._forward"} <= set(replaced)
    assert not any(isinstance(m, SwishGroupNorm32) for m in patched.modules())

    x, emb = torch.randn(2, 3, 8, 8).to(memory_format=memory_format), torch.randn(2, 32)
    assert_same_outputs_and_gradients(model(x, emb), patched(x, emb), model, patched, out_tol=(1e-4, 1e-5),
                                      grad_tol=(1e-4, 1e-4))


def test_a_norm_with_another_swish_stays():
    """consistency models' GroupNorm32 with swish=0.5 computes y * sigmoid(0.5 y): neither fused form."""
    model = randomized(nn.Sequential(SwishGroupNorm32(4, 8, swish=0.5), nn.Conv2d(8, 8, 1)))
    patched = copy.deepcopy(model)
    assert patch_model(patched) == []
    assert_same_function(model, patched, torch.randn(2, 8, 4, 4))


# diffusers' blocks, as users' models have them (diffusers is a test dependency only).
def diffusers_unet(time_embedding_norm, down, up):
    """A small UNet2DModel with random weights, in float64: a patched copy must then match it to
    rounding (in fp32, 14 norms of random weights amplify the rounding past 1e-5)."""
    diffusers = pytest.importorskip("diffusers")
    return randomized(diffusers.UNet2DModel(
        sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=(down, "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", up),
        resnet_time_scale_shift=time_embedding_norm), seed=1).double()


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
@pytest.mark.parametrize("down,up", [("DownBlock2D", "UpBlock2D"),
                                     ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_diffusers_unet_gives_the_same_outputs_and_gradients(time_embedding_norm, down, up, memory_format):
    model = diffusers_unet(time_embedding_norm, down, up)
    patched = copy.deepcopy(model)
    replaced = patch_model(patched)
    resnets = [name for name, m in model.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert sorted(r.name for r in replaced) == sorted(f"{name}.forward" for name in resnets)
    assert patch_model(patched) == []   # idempotent

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64).to(memory_format=memory_format)
    t = torch.tensor([3, 700])
    assert_same_outputs_and_gradients(model(x, t).sample, patched(x, t).sample, model, patched,
                                      out_tol=(1e-10, 1e-10), grad_tol=(1e-9, 1e-9))


def test_patched_diffusers_autoencoder_gives_the_same_outputs_and_gradients():
    """AutoencoderKL: its decoder builds its up blocks' ResnetBlock2Ds with time_embedding_norm
    'group', which they ignore without a time embedding: every block of both halves is fused."""
    diffusers = pytest.importorskip("diffusers")
    model = randomized(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), seed=1).double()
    patched = copy.deepcopy(model)
    resnets = [name for name, m in model.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert any(model.get_submodule(name).time_embedding_norm == "group" for name in resnets)
    assert {f"{name}.forward" for name in resnets} <= {r.name for r in patch_model(patched)}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_same_outputs_and_gradients(model(x, sample_posterior=False).sample, patched(x, sample_posterior=False).sample,
                                      model, patched, out_tol=(1e-10, 1e-10), grad_tol=(1e-9, 1e-9))


def test_diffusers_blocks_that_compute_something_else_or_carry_hooks_keep_their_forward():
    resnet = pytest.importorskip("diffusers.models.resnet")

    class Doubled(resnet.ResnetBlock2D):   # a fork whose forward differs
        def forward(self, input_tensor, temb):
            return 2 * super().forward(input_tensor, temb)

    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    forked = randomized(Doubled(in_channels=8, temb_channels=16, groups=4))
    with pytest.warns(UserWarning, match=r"stay unfused: its forward differs from diffusers' ResnetBlock2D.forward"):
        assert patch_model(forked) == []
    assert "forward" not in forked.__dict__

    model = randomized(resnet.ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4, down=True))
    patched = copy.deepcopy(model)
    assert [r.name for r in patch_model(patched)] == ["forward"]
    calls = []
    patched.norm2.register_forward_hook(lambda *a: calls.append(1))   # added after patching: the block's own forward
    assert_same_function(model, patched, x, temb)
    assert calls == [1]
    clone = copy.deepcopy(patched)
    assert clone.forward.args[0] is clone


def test_a_method_set_on_the_instance_stays():
    """A block whose forward another library has wrapped on the instance (accelerate's hooks do)
    keeps that wrapper: patching it would drop what the wrapper adds."""
    resnet = pytest.importorskip("diffusers.models.resnet")
    block = randomized(resnet.ResnetBlock2D(in_channels=8, temb_channels=16, groups=4))
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return type(block).forward(block, *args, **kwargs)

    block.forward = wrapped
    with pytest.warns(UserWarning, match="stay unfused: its forward is set on the instance"):
        assert patch_model(block) == []
    assert block.forward is wrapped
    block(torch.randn(2, 8, 4, 4), torch.randn(2, 16))
    assert calls == [1]


# EDM's blocks (NVlabs/edm, training/networks.py: SongUNet's DDPM++ / NCSN++ and DhariwalUNet), with
# their arithmetic: a GroupNorm module of their own, an attention op in the blocks' module.
class GroupNorm(nn.Module):
    """EDM's GroupNorm: not an nn.GroupNorm; at most 32 groups of at least 4 channels."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight, self.bias = nn.Parameter(torch.ones(num_channels)), nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class AttentionOp(torch.autograd.Function):
    """EDM's attention weights softmax_k(q . k / sqrt(c)), computed in at least fp32."""

    @staticmethod
    def forward(ctx, q, k):
        wide = torch.promote_types(q.dtype, torch.float32)
        w = torch.einsum("ncq,nck->nqk", q.to(wide), k.to(wide) / k.shape[1] ** 0.5).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, grad_w):
        q, k, w = ctx.saved_tensors
        wide = torch.promote_types(q.dtype, torch.float32)
        w, grad_w = w.to(wide), grad_w.to(wide)
        grad_s = w * (grad_w - (grad_w * w).sum(dim=2, keepdim=True)) / k.shape[1] ** 0.5
        return (torch.einsum("nck,nqk->ncq", k.to(wide), grad_s).to(q.dtype),
                torch.einsum("ncq,nqk->nck", q.to(wide), grad_s).to(k.dtype))


class UNetBlock(nn.Module):
    """EDM's UNetBlock: GN -> SiLU -> conv0; the embedding as adaptive scale/shift of norm1 or added
    before it; GN -> SiLU -> conv1; scaled skip; optional self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 adaptive_scale=True):
        """adaptive_scale: as DhariwalUNet (ADM) has them; else as SongUNet (DDPM++, NCSN++)."""
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (out_channels // 16 if adaptive_scale else 1) if attention else 0
        self.dropout, self.adaptive_scale = 0.0, adaptive_scale
        self.skip_scale, eps = (1, 1e-5) if adaptive_scale else (np.sqrt(0.5), 1e-6)
        resample = [nn.Upsample(scale_factor=2)] if up else [nn.AvgPool2d(2)] if down else []
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = nn.Sequential(*resample, nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = nn.Sequential(*resample, nn.Conv2d(in_channels, out_channels, 1))
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv0(nn.functional.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = nn.functional.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = nn.functional.silu(self.norm1(h.add_(params)))
        h = self.conv1(nn.functional.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(x if self.skip is None else self.skip(x)) * self.skip_scale
        if self.num_heads:
            n, c = x.shape[:2]
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", AttentionOp.apply(q, k), v).reshape(x.shape)
            x = self.proj(a).add_(x) * self.skip_scale
        return x


class TinyEDMUNet(nn.Module):
    """EDM's blocks chained as its UNets chain them: plain, down, attention, up."""

    def __init__(self, adaptive_scale):
        super().__init__()
        self.map = nn.Linear(1, 24)
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList([UNetBlock(16, 16, 24, adaptive_scale=adaptive_scale),
                                     UNetBlock(16, 32, 24, down=True, adaptive_scale=adaptive_scale),
                                     UNetBlock(32, 32, 24, attention=True, adaptive_scale=adaptive_scale),
                                     UNetBlock(32, 16, 24, up=True, adaptive_scale=adaptive_scale)])
        self.out_norm = GroupNorm(16)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, sigma):
        emb = nn.functional.silu(self.map(sigma.log()[:, None]))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


@pytest.mark.parametrize("adaptive_scale", [True, False], ids=["dhariwal_unet", "song_unet"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_edm_unet_gives_the_same_outputs_and_gradients(adaptive_scale, memory_format):
    model = randomized(TinyEDMUNet(adaptive_scale)).double()
    patched = copy.deepcopy(model)
    assert sorted(r.name for r in patch_model(patched)) == [f"blocks.{i}.forward" for i in range(4)]
    assert patch_model(patched) == []   # idempotent
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(memory_format=memory_format)
    sigma = torch.tensor([0.02, 40.0], dtype=torch.float64)
    assert_same_outputs_and_gradients(model(x, sigma), patched(x, sigma), model, patched, out_tol=(1e-10, 1e-10),
                                      grad_tol=(1e-9, 1e-9))


def test_edm_blocks_that_compute_something_else_or_carry_hooks_keep_their_forward():
    class Unscaled(UNetBlock):   # a fork whose forward differs: no skip scale
        def forward(self, x, emb):
            return super().forward(x, emb) / self.skip_scale

    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    forked = randomized(Unscaled(16, 16, 24, adaptive_scale=False))
    with pytest.warns(UserWarning, match=r"stay unfused: its forward differs from EDM's UNetBlock.forward"):
        assert patch_model(forked) == []
    assert "forward" not in forked.__dict__

    model = randomized(UNetBlock(16, 32, 24, down=True, attention=True))
    patched = copy.deepcopy(model)
    assert [r.name for r in patch_model(patched)] == ["forward"]
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.forward.args[0] is loaded
    for other in (patched, loaded):
        assert_same_function(model, other, x, emb)
    calls = []
    patched.norm1.register_forward_hook(lambda *a: calls.append(1))   # added after patching: the block's own forward
    assert_same_function(model, patched, x, emb)
    assert calls == [1]


# denoising-diffusion-pytorch's blocks (and the many UNets written after it): Block = conv -> GroupNorm
# -> x * (scale + 1) + shift -> SiLU, two of them per ResnetBlock, the time embedding's halves as
# (B, C, 1, ...) tensors; and imagen-pytorch's, GroupNorm -> x * (scale + 1) + shift -> SiLU -> conv.
class WeightStandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) * (w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
                                                         + 1e-5).rsqrt()
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class Block(nn.Module):
    def __init__(self, dim, dim_out, conv=nn.Conv2d, groups=4):
        super().__init__()
        self.proj = conv(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class PreNormBlock(nn.Module):
    def __init__(self, dim, dim_out, conv=nn.Conv2d, groups=3):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, dim)
        self.activation = nn.SiLU()
        self.project = conv(dim, dim_out, 3, padding=1)

    def forward(self, x, scale_shift=None):
        x = self.groupnorm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        x = self.activation(x)
        return self.project(x)


class ConvResnetBlock(nn.Module):
    """The time embedding's scale and shift go to the first Block's norm (denoising-diffusion-pytorch)
    or, with pre-norm Blocks, to the second one's (imagen-pytorch): both normalize dim_out channels."""

    def __init__(self, dim, dim_out, time_dim, conv=nn.Conv2d, block=Block):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.block1, self.block2 = block(dim, dim_out, conv), block(dim_out, dim_out, conv)
        self.res_conv = nn.Conv1d(dim, dim_out, 1) if conv is nn.Conv1d else nn.Conv2d(dim, dim_out, 1)
        self.pre_norm = block is PreNormBlock

    def forward(self, x, time_emb):
        emb = self.mlp(time_emb).reshape(x.shape[0], -1, *[1] * (x.dim() - 2))
        first, second = (None, emb.chunk(2, dim=1)) if self.pre_norm else (emb.chunk(2, dim=1), None)
        return self.block2(self.block1(x, scale_shift=first), scale_shift=second) + self.res_conv(x)


class TinyConvUNet(nn.Module):
    def __init__(self, conv=nn.Conv2d, block=Block):
        super().__init__()
        self.stem = conv(3, 12, 3, padding=1)   # (torch 2.13's CPU GroupNorm backward: see TinyCMPiece)
        self.blocks = nn.ModuleList([ConvResnetBlock(12, 24, 8, conv, block), ConvResnetBlock(24, 12, 8, conv, block)])

    def forward(self, x, time_emb):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, time_emb)
        return x


@pytest.mark.parametrize("block", [Block, PreNormBlock], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("conv,shape,memory_format", [
    (nn.Conv2d, (2, 3, 8, 8), torch.contiguous_format), (nn.Conv2d, (2, 3, 8, 8), torch.channels_last),
    (WeightStandardizedConv, (2, 3, 8, 8), torch.contiguous_format), (nn.Conv1d, (2, 3, 16), torch.contiguous_format)],
    ids=["conv2d-nchw", "conv2d-nhwc", "weight-standardized", "conv1d"])
def test_patched_conv_block_unet_gives_the_same_outputs_and_gradients(conv, shape, memory_format, block):
    model = randomized(TinyConvUNet(conv, block))
    patched = copy.deepcopy(model)
    assert sorted(r.name for r in patch_model(patched)) == [
        f"blocks.{i}.block{j}.forward" for i in range(2) for j in (1, 2)]
    assert patch_model(patched) == []   # idempotent
    x, emb = torch.randn(shape).to(memory_format=memory_format), torch.randn(2, 8)
    out_ref = model(x, emb)
    with mock.patch.object(nn.GroupNorm, "forward", side_effect=AssertionError("an unfused GroupNorm ran")):
        out = patched(x, emb)
    assert_same_outputs_and_gradients(out_ref, out, model, patched, out_tol=(1e-4, 1e-5), grad_tol=(1e-4, 1e-4))


@pytest.mark.parametrize("block,whose,norm", [
    (Block, "denoising-diffusion-pytorch's", "norm"), (PreNormBlock, "imagen-pytorch's", "groupnorm")],
    ids=["post_norm", "pre_norm"])
def test_conv_blocks_that_compute_something_else_or_get_other_scales_keep_their_forward(block, whose, norm):
    class NoUnitScale(block):   # a fork whose forward differs: x * scale + shift
        def forward(self, x, scale_shift=None):
            return super().forward(x, None if scale_shift is None else (scale_shift[0] - 1, scale_shift[1]))

    forked = randomized(NoUnitScale(12, 12))
    with pytest.warns(UserWarning, match=f"stay unfused: its forward differs from {whose}"):
        assert patch_model(forked) == []
    assert "forward" not in forked.__dict__

    model = randomized(block(12, 12))
    patched = copy.deepcopy(model)
    assert [r.name for r in patch_model(patched)] == ["forward"]
    x = torch.randn(2, 12, 5, 5)
    per_pixel = (torch.randn(2, 12, 5, 5), torch.randn(2, 12, 5, 5))   # not per sample and channel: the own forward
    for scale_shift in (None, (torch.randn(2, 12, 1, 1), torch.randn(2, 12, 1, 1)), per_pixel):
        torch.testing.assert_close(patched(x, scale_shift), model(x, scale_shift), rtol=1e-4, atol=1e-5)
    calls = []
    getattr(patched, norm).register_forward_hook(lambda *a: calls.append(1))   # added after patching: its own forward
    assert_same_function(model, patched, x)
    assert calls == [1]


# DDPM's ResnetBlock as latent-diffusion writes it (its UNet's autoencoder, Stable Diffusion's VAE:
# a module-level swish), and score_sde's ResnetBlockDDPMpp (NIN is its 1x1 projection) and
# ResnetBlockBigGANpp (NCSN++ and DDPM++), which resamples through its up_or_down_sampling module.
def nonlinearity(x):
    return x * torch.sigmoid(x)


class DDPMResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, temb_channels, conv_shortcut=False):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out_channels, conv_shortcut
        self.norm1 = nn.GroupNorm(4, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(4, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb):
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class ResnetBlockDDPMpp(nn.Module):
    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, conv_shortcut=False, skip_rescale=False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = nn.GroupNorm(min(out_ch // 4, 32), out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(0.1)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            else:
                self.NIN_0 = nn.Conv2d(in_ch, out_ch, 1)
        self.skip_rescale, self.act, self.out_ch, self.conv_shortcut = skip_rescale, act, out_ch, conv_shortcut

    def forward(self, x, temb=None):
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h += self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockDDPM(nn.Module):   # score_sde's DDPM block: DDPM++'s without skip_rescale
    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, conv_shortcut=False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0, self.GroupNorm_1 = nn.GroupNorm(4, in_ch, eps=1e-6), nn.GroupNorm(4, out_ch, eps=1e-6)
        self.act = act
        self.Conv_0, self.Conv_1 = nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.Dropout_0 = nn.Dropout(0.1)
        if in_ch != out_ch:
            self.NIN_0 = nn.Conv2d(in_ch, out_ch, 1)
        self.out_ch, self.in_ch, self.conv_shortcut = out_ch, in_ch, conv_shortcut

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h += self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        return x + h if C == self.out_ch else self.NIN_0(x) + h


def fir_filter(x, kernel):
    """x through a separable FIR kernel, channel by channel ('same' size; a stand-in for upfirdn2d)."""
    k = torch.tensor(kernel, dtype=x.dtype)
    k2 = (torch.outer(k, k) / k.sum() ** 2).expand(x.shape[1], 1, len(kernel), len(kernel))
    pad = len(kernel) - 1
    return nn.functional.conv2d(nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2), k2, groups=x.shape[1])


up_or_down_sampling = types.SimpleNamespace(
    naive_upsample_2d=lambda x, factor=2: nn.functional.interpolate(x, scale_factor=factor),
    naive_downsample_2d=lambda x, factor=2: nn.functional.avg_pool2d(x, factor),
    upsample_2d=lambda x, k, factor=2: fir_filter(nn.functional.interpolate(x, scale_factor=factor), k),
    downsample_2d=lambda x, k, factor=2: fir_filter(x, k)[..., ::factor, ::factor])


class ResnetBlockBigGANpp(nn.Module):
    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, up=False, down=False, dropout=0.1, fir=False,
                 fir_kernel=(1, 3, 3, 1), skip_rescale=True):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6)
        self.up, self.down, self.fir, self.fir_kernel = up, down, fir, fir_kernel
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = nn.GroupNorm(min(out_ch // 4, 32), out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch or up or down:
            self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)
        self.skip_rescale, self.act, self.in_ch, self.out_ch = skip_rescale, act, in_ch, out_ch

    def forward(self, x, temb=None):
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            if self.fir:
                h = up_or_down_sampling.upsample_2d(h, self.fir_kernel, factor=2)
                x = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
            else:
                h = up_or_down_sampling.naive_upsample_2d(h, factor=2)
                x = up_or_down_sampling.naive_upsample_2d(x, factor=2)
        elif self.down:
            if self.fir:
                h = up_or_down_sampling.downsample_2d(h, self.fir_kernel, factor=2)
                x = up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
            else:
                h = up_or_down_sampling.naive_downsample_2d(h, factor=2)
                x = up_or_down_sampling.naive_downsample_2d(x, factor=2)
        h = self.Conv_0(h)
        if temb is not None:
            h += self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class TinyDDPMNet(nn.Module):
    """The blocks of DDPM and of score_sde (DDPM, DDPM++, BigGAN++) chained, with and without a time
    embedding, shortcuts and resampling (naive and FIR, up and down)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([
            DDPMResnetBlock(8, 16, 12), DDPMResnetBlock(16, 16, 12, conv_shortcut=True),
            ResnetBlockDDPMpp(nn.SiLU(), 16, 24, 12), ResnetBlockDDPMpp(nn.SiLU(), 24, 16, 12, conv_shortcut=True,
                                                                       skip_rescale=True),
            ResnetBlockBigGANpp(nn.SiLU(), 16, 16, 12, down=True), ResnetBlockBigGANpp(nn.SiLU(), 16, 24, 12),
            ResnetBlockBigGANpp(nn.SiLU(), 24, 16, 12, up=True, fir=True, skip_rescale=False),
            ResnetBlockDDPM(nn.SiLU(), 16, 24, 12), ResnetBlockDDPM(nn.SiLU(), 24, 16, 12)])
        self.decoder = nn.ModuleList([DDPMResnetBlock(16, 8, 0), ResnetBlockDDPMpp(nn.SiLU(), 8, 8),  # no temb
                                      ResnetBlockBigGANpp(nn.SiLU(), 8, 8, down=True, fir=True),
                                      ResnetBlockBigGANpp(nn.SiLU(), 8, 8, up=True)])

    def forward(self, x, temb):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        for block in self.decoder:
            h = block(h, None)
        return h


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_patched_ddpm_blocks_give_the_same_outputs_and_gradients(memory_format):
    model = randomized(TinyDDPMNet()).eval()   # eval: dropout off in both
    patched = copy.deepcopy(model)
    assert sorted(r.name for r in patch_model(patched)) == [
        *(f"blocks.{i}.forward" for i in range(9)), *(f"decoder.{i}.forward" for i in range(4))]
    x, temb = torch.randn(2, 3, 8, 8).to(memory_format=memory_format), torch.randn(2, 12)
    out_ref = model(x, temb)
    with mock.patch.object(nn.GroupNorm, "forward", side_effect=AssertionError("an unfused GroupNorm ran")):
        out = patched(x, temb)
    assert_same_outputs_and_gradients(out_ref, out, model, patched, out_tol=(1e-4, 1e-5), grad_tol=(1e-4, 1e-4))


def test_ddpm_blocks_that_compute_something_else_or_carry_hooks_keep_their_forward():
    class Rescaled(DDPMResnetBlock):   # a fork whose forward differs
        def forward(self, x, temb):
            return super().forward(x, temb) / 2

    class NaiveResampling(ResnetBlockBigGANpp):   # a fork that resamples without its FIR kernel
        def forward(self, x, temb=None):
            with mock.patch.object(self, "fir", False):
                return super().forward(x, temb)

    for forked, name in [(Rescaled(8, 8, 12), "DDPM's ResnetBlock"),
                         (NaiveResampling(nn.SiLU(), 8, 8, 12, up=True, fir=True), "score_sde's ResnetBlock")]:
        with pytest.warns(UserWarning, match=f"stay unfused: its forward differs from {name}"):
            assert patch_model(randomized(forked)) == []
    model = randomized(ResnetBlockDDPMpp(nn.SiLU(), 8, 16, 12)).eval()
    patched = copy.deepcopy(model)
    assert [r.name for r in patch_model(patched)] == ["forward"]
    calls = []
    patched.act.register_forward_hook(lambda *a: calls.append(1))   # added after patching: the block's own forward
    assert_same_function(model, patched, torch.randn(2, 8, 6, 6), torch.randn(2, 12))
    assert len(calls) == 3   # the block's two norms and its time embedding


def diffusers_block():
    resnet = pytest.importorskip("diffusers.models.resnet")
    return resnet.ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, down=True,
                                time_embedding_norm="scale_shift")


@pytest.mark.parametrize("make_block,second_input", [
    (diffusers_block, lambda: torch.randn(2, 12)),
    (lambda: UNetBlock(8, 16, 12, down=True, attention=True), lambda: torch.randn(2, 12)),
    (lambda: Block(8, 16), lambda: torch.randn(2, 32, 1, 1).chunk(2, dim=1)),
    (lambda: PreNormBlock(8, 16, groups=4), lambda: torch.randn(2, 16, 1, 1).chunk(2, dim=1)),
    (lambda: ResnetBlockBigGANpp(nn.SiLU(), 8, 16, 12, down=True, dropout=0.0, fir=True), lambda: torch.randn(2, 12))],
    ids=["diffusers", "edm", "conv_block", "pre_norm_block", "score_sde"])
def test_a_patched_block_compiles_without_graph_breaks(make_block, second_input):
    block = randomized(make_block())
    patched = copy.deepcopy(block)
    assert [r.name for r in patch_model(patched)] == ["forward"]
    x, second = torch.randn(2, 8, 8, 8), second_input()
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    torch.testing.assert_close(compiled(x, second), block(x, second), rtol=1e-4, atol=1e-4)
