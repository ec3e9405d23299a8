"""The ADM UNet (Dhariwal & Nichol, "Diffusion Models Beat GANs", 2021), on the fused norms of adv_dpm.nn.

Same architecture and initialisation as guided-diffusion's UNetModel: a sinusoidal timestep
embedding through an MLP (plus an optional class embedding) conditions residual blocks, which
are stacked into an encoder / middle / decoder with skip connections and self-attention at
chosen resolutions; the last conv of every residual branch and of the output is zero at init.
Every GroupNorm is a GroupNormAct: GN + SiLU in one call, and with ``use_scale_shift_norm``
the whole ``SiLU(GN(h) * (1 + scale) + shift)`` tail of a block is one call too.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GroupNormAct


def num_groups(channels, max_groups=32):
    """The largest divisor of ``channels`` that is <= ``max_groups`` (32 groups, as ADM, when possible)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def norm(channels, act="silu"):
    return GroupNormAct(num_groups(channels), channels, act=act)


def zero(module):
    """``module`` with its parameters zeroed (ADM's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B, dim) of timesteps t (B,), integer or fractional: [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs
    return F.pad(torch.cat([args.cos(), args.sin()], dim=1), (0, dim % 2))


def _resample(x, mode):
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; ``resample`` = 'up' / 'down' makes it an
    up/downsampling block (ADM's resblock_updown)."""

    def __init__(self, channels, emb_channels, out_channels=None, dropout=0.0, use_scale_shift_norm=False,
                 resample=None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.in_norm = norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels     # (scale, shift) or a bias
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_norm = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_conv(_resample(self.in_norm(x), self.resample))
        x = _resample(x, self.resample)
        e = self.emb_layers(emb).to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h, scale, shift)
        else:
            h = self.out_norm(h + e[:, :, None, None])
        return self.skip(x) + self.out_conv(self.dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, with a residual connection. The qkv channels
    are grouped per head ([q, k, v] of head 0, then head 1, ...) as ADM's legacy ordering."""

    def __init__(self, channels, num_heads):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = norm(channels, act=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.num_heads, 3 * c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).chunk(3, dim=-1)                 # (B, heads, HW, head_channels)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(a.transpose(-1, -2).reshape(b, c, h, w))


class EmbedSequential(nn.Sequential):
    """A Sequential that also hands the embedding to the residual blocks in it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet: ``forward(x, t, y=None)`` maps noisy images (B, C, H, W), timesteps t (B,) and,
    when ``num_classes`` is set, class labels y (B,) to the predicted noise (B, out_channels, H, W),
    followed by as many variance interpolation channels when ``learn_sigma``.

    ``attention_resolutions`` are feature-map sizes (e.g. (16, 8)); the head count is
    ``channels // num_head_channels`` when that is given, else ``num_heads``. ``config`` holds
    the constructor arguments (and ``arch``) so that ``build_model(model.config)`` rebuilds it.
    """

    def __init__(self, image_size=32, in_channels=3, model_channels=128, out_channels=None, num_res_blocks=2,
                 attention_resolutions=(16, 8), channel_mult=(1, 2, 2, 2), dropout=0.0, num_heads=4,
                 num_head_channels=None, use_scale_shift_norm=True, resblock_updown=False, learn_sigma=False,
                 num_classes=None):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config = {"arch": "unet", **args}
        resolutions = [image_size // 2 ** i for i in range(len(channel_mult))]
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult {tuple(channel_mult)} has {len(channel_mult)} levels)")
        if not set(attention_resolutions) <= set(resolutions):
            raise ValueError(f"attention_resolutions {tuple(attention_resolutions)} must be among the model's "
                             f"resolutions {resolutions}")
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)

        def res_block(cin, cout, resample=None):
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm, resample)

        def attention(ch):
            if num_head_channels and ch % num_head_channels:
                raise ValueError(f"attention: {ch} channels do not split into heads of {num_head_channels}")
            return AttentionBlock(ch, ch // num_head_channels if num_head_channels else num_heads)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None

        ch = channel_mult[0] * model_channels
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = res_block(ch, ch, "down") if resblock_updown else nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, (mult, res) in reversed(list(enumerate(zip(channel_mult, resolutions)))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, "up") if resblock_updown else
                                  nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                nn.Conv2d(ch, ch, 3, padding=1)))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, t, y=None):
        if (y is None) != (self.label_emb is None):
            raise ValueError("class labels y are required by a class-conditional UNet (num_classes set) and "
                             f"refused by an unconditional one; num_classes={self.config['num_classes']}, "
                             f"y={'None' if y is None else tuple(y.shape)}")
        t = t.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
