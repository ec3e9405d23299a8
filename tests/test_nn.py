"""GroupNormAct as a drop-in, and patch_model on an ADM-style UNet piece: same outputs and gradients."""
import copy

import pytest
import torch
from torch import nn

from adv_dpm.nn import GroupNormAct, patch_model


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
    assert not any(isinstance(m, GroupNorm32) for m in patched.modules())

    x = torch.randn(2, 3, 16, 16).to(memory_format=memory_format)
    emb = torch.randn(2, 32)
    out_ref, out = model(x, emb), patched(x, emb)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, list(model.parameters()), g)
    grads = torch.autograd.grad(out, list(patched.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


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


def test_half_precision_activations_with_fp32_parameters_like_adm():
    norm = GroupNormAct(4, 12)
    x = torch.randn(2, 12, 4, 4, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias))
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
