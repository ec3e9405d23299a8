"""Drop-in modules on the fused ops, and ``patch_model`` to put them into an existing model."""
import copy
import functools
import inspect
import sys
import warnings
from typing import Callable, NamedTuple

import torch
from torch import nn

from .ops.checks import per_sample
from .ops.group_norm_act import ACTS, group_norm_act


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU (or nothing, ``act=None``), in one fused op.

    ``forward(x, scale=None, shift=None)`` computes act(GN(x) * (1 + scale) + shift) with
    per-sample scale and shift, (N, C) or (N, C, 1, 1): the timestep conditioning of ADM's
    scale-shift norm.
    Statistics in fp32, output in x's dtype (as ADM's GroupNorm32). Same parameters and
    state_dict keys as nn.GroupNorm.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act="silu", device=None, dtype=None):
        if act not in ACTS:  # at construction: a bad module fails where it is built
            raise ValueError(f"GroupNormAct: act must be one of {ACTS}, got {act!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.act = act

    def forward(self, x, scale=None, shift=None):
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift, self.act)

    def extra_repr(self):
        return f"{super().extra_repr()}, act={self.act!r}"

    @classmethod
    def replacing(cls, norm, act):
        """A GroupNormAct sharing ``norm``'s parameters (same Parameter objects: optimizer state stays valid)."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps, affine=norm.affine, act=act)
        if norm.affine:
            new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new


def _hooked(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _is_plain_norm(m):
    """A module whose forward is exactly GroupNorm(x) with its weight, bias, num_groups and eps."""
    return not _hooked(m) and ((isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward)
                               or (type(m) is GroupNormAct and m.act is None))


def _is_edm_norm(m):
    """EDM's GroupNorm: a module of its own (not an nn.GroupNorm) with weight, bias, num_groups and
    eps and nothing else, computing GroupNorm with them (checked with its block's probe)."""
    return (type(m).__name__ == "GroupNorm" and not isinstance(m, nn.GroupNorm) and not _hooked(m)
            and isinstance(getattr(m, "num_groups", None), int) and isinstance(getattr(m, "eps", None), float)
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and isinstance(getattr(m, "bias", None), nn.Parameter) and not _holds_state(m, ("weight", "bias")))


def _norm_silu(norm, x, scale=None, shift=None):
    """SiLU(norm(x) * (1 + scale) + shift) in one fused call, with ``norm``'s parameters."""
    return group_norm_act(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift, "silu")


def _is_silu(m):
    return type(m) is nn.SiLU and not _hooked(m)


def _holds_state(m, params=()):
    """Whether ``m`` has parameters other than ``params``, buffers or submodules."""
    return bool({n for n, _ in m.named_parameters()} - set(params) or any(True for _ in m.buffers()) or m._modules)


class FusedSequential(nn.Sequential):
    """nn.Sequential whose GroupNorm -> SiLU pairs run as one fused call. Its modules are
    unchanged, so indexing or slicing it (as ADM's blocks do) still gives each module alone."""

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            m = modules[i]
            if i + 1 < len(modules) and _is_plain_norm(m) and _is_silu(modules[i + 1]):
                x = _norm_silu(m, x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


class Replacement(NamedTuple):
    name: str        # qualified name in the model ("<block>._forward" or "<block>.forward": a rebound method)
    old: object      # the module, method or class that was there
    new: object


def _adm_forward(self, x, emb):
    """ADM's ResBlock._forward with its scale-shift norm + SiLU tail as one fused call (the
    block's own _forward while a hook sits on that norm or SiLU)."""
    norm, act = self.out_layers[0], self.out_layers[1]
    if _hooked(norm) or _hooked(act):
        return type(self)._forward(self, x, emb)
    if getattr(self, "updown", False):
        in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
        h = in_rest(x)
        h = self.h_upd(h)
        x = self.x_upd(x)
        h = in_conv(h)
    else:
        h = self.in_layers(x)
    emb_out = self.emb_layers(emb).type(h.dtype)
    scale, shift = emb_out.reshape(emb_out.shape[0], -1).chunk(2, dim=1)
    h = self.out_layers[2:](_norm_silu(norm, h, scale, shift))
    return self.skip_connection(x) + h


def _diffusers_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with both GroupNorm -> SiLU pairs as fused calls, the
    ``scale_shift`` time embedding folded into the second (the block's own forward while a hook
    sits on a norm or the SiLU, or for its deprecated extra arguments)."""
    norm1, norm2, act = self.norm1, self.norm2, self.nonlinearity
    embed = self.time_emb_proj is not None
    if args or kwargs or _hooked(norm1) or _hooked(norm2) or _hooked(act) or (
            self.time_embedding_norm == "scale_shift" and not (embed and temb is not None)):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    x = input_tensor
    h = _norm_silu(norm1, x)
    resample = self.upsample if self.upsample is not None else self.downsample
    if resample is not None:
        x, h = resample(x), resample(h)
    h = self.conv1(h)
    if embed:
        temb = self.time_emb_proj(temb if self.skip_time_act else act(temb))
    scale = shift = None
    if self.time_embedding_norm == "scale_shift":
        scale, shift = temb.chunk(2, dim=1)
    elif self.time_embedding_norm == "default" and temb is not None:   # added before the norm
        h = h + (temb[:, :, None, None] if embed else temb)
    h = self.conv2(self.dropout(_norm_silu(norm2, h, scale, shift)))
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x)
    return (x + h) / self.output_scale_factor


def _edm_forward(self, x, emb):
    """EDM's UNetBlock.forward with both GroupNorm -> SiLU pairs as fused calls, the adaptive
    scale/shift folded into the second (the block's own forward while a hook sits on a norm)."""
    if _hooked(self.norm0) or _hooked(self.norm1):
        return type(self).forward(self, x, emb)
    h = self.conv0(_norm_silu(self.norm0, x))
    params = self.affine(emb).to(h.dtype)
    if self.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        h = _norm_silu(self.norm1, h, scale, shift)
    else:   # the embedding is added before the norm
        h = _norm_silu(self.norm1, h + params[:, :, None, None])
    h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
    x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
    return _edm_attention(self, x) if self.num_heads else x


def _forward_global(self, name):
    """``name`` as the block's own forward sees it: a global of the module that defines it
    (AttributeError if none). In a form that torch.compile traces from torch 2.4 on."""
    return getattr(sys.modules[type(self).forward.__module__], name)


def _edm_attention(self, x):
    """The self-attention tail of EDM's UNetBlock, through the AttentionOp of its forward's module
    (fp32 softmax, inputs and saved tensors in their own dtype)."""
    attention = _forward_global(self, "AttentionOp")
    heads = x.shape[0] * self.num_heads
    q, k, v = self.qkv(self.norm2(x)).reshape(heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
    out = torch.einsum("nqk,nck->ncq", attention.apply(q, k), v).reshape(x.shape)
    return (self.proj(out) + x) * self.skip_scale


def _scale_shift_pair(scale_shift, x, channels):
    """(scale, shift) of a block's scale_shift argument when it is a pair per sample and channel
    of the norm's ``channels`` for x's batch and rank, (None, None) for None, else None."""
    if scale_shift is None:
        return None, None
    pair = tuple(scale_shift)
    if len(pair) != 2:
        return None
    scale, shift = (per_sample(t, (x.shape[0], channels), x.dim()) for t in pair)
    return None if scale is None or shift is None else (scale, shift)


def _conv_block_forward(self, x, scale_shift=None):
    """denoising-diffusion-pytorch's Block.forward, convolution -> GroupNorm -> x * (scale + 1) +
    shift -> SiLU, with all but the convolution as one fused call (the block's own forward while
    a hook sits on its norm or SiLU, or for a scale_shift that is not a pair per sample and channel)."""
    pair = _scale_shift_pair(scale_shift, x, self.norm.num_channels)
    if pair is None or _hooked(self.norm) or _hooked(self.act):
        return type(self).forward(self, x, scale_shift)
    return _norm_silu(self.norm, self.proj(x), *pair)


def _pre_norm_block_forward(self, x, scale_shift=None):
    """imagen-pytorch's Block.forward, GroupNorm -> x * (scale + 1) + shift -> SiLU -> convolution,
    with all but the convolution as one fused call (the block's own forward as above)."""
    pair = _scale_shift_pair(scale_shift, x, self.groupnorm.num_channels)
    if pair is None or _hooked(self.groupnorm) or _hooked(self.activation):
        return type(self).forward(self, x, scale_shift)
    return self.project(_norm_silu(self.groupnorm, x, *pair))


def _ddpm_forward(self, x, temb):
    """DDPM's ResnetBlock.forward (as latent-diffusion's and Stable Diffusion's autoencoder write
    it) with both GroupNorm -> SiLU pairs as fused calls (the block's own forward while a hook
    sits on a norm)."""
    if _hooked(self.norm1) or _hooked(self.norm2):
        return type(self).forward(self, x, temb)
    h = self.conv1(_norm_silu(self.norm1, x))
    if temb is not None:
        h = h + self.temb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
    h = self.conv2(self.dropout(_norm_silu(self.norm2, h)))
    if self.in_channels != self.out_channels:
        x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
    return x + h


def _score_sde_forward(self, x, temb=None):
    """score_sde's ResnetBlockDDPM.forward (its DDPM), ResnetBlockDDPMpp.forward and
    ResnetBlockBigGANpp.forward (the block of its NCSN++ and of DDPM++ as its configs build it)
    with both GroupNorm -> SiLU pairs as fused calls (the block's own forward while a hook sits on
    a norm or its SiLU). BigGAN++'s resampling goes through the ``up_or_down_sampling`` functions
    that the block's own forward calls."""
    if _hooked(self.GroupNorm_0) or _hooked(self.GroupNorm_1) or _hooked(self.act):
        return type(self).forward(self, x, temb)
    h = _norm_silu(self.GroupNorm_0, x)
    resampling = getattr(self, "up", False) or getattr(self, "down", False)
    if resampling:
        x, h = _biggan_resample(self, x), _biggan_resample(self, h)
    h = self.Conv_0(h)
    if temb is not None:
        h = h + self.Dense_0(self.act(temb))[:, :, None, None]
    h = self.Conv_1(self.Dropout_0(_norm_silu(self.GroupNorm_1, h)))
    if x.shape[1] != self.out_ch or resampling:
        x = self.Conv_2(x) if getattr(self, "conv_shortcut", True) else self.NIN_0(x)
    return (x + h) / 2 ** 0.5 if getattr(self, "skip_rescale", False) else x + h


def _biggan_resample(self, x):
    """x up- or downsampled by 2 as score_sde's ResnetBlockBigGANpp does it: with its FIR kernel or
    naively, through the ``up_or_down_sampling`` module its forward refers to."""
    ops = _forward_global(self, "up_or_down_sampling")
    name = "upsample_2d" if self.up else "downsample_2d"
    return getattr(ops, name)(x, self.fir_kernel, factor=2) if self.fir else getattr(ops, f"naive_{name}")(x, factor=2)


def _close(out, ref):
    """Whether a probe's output matches the original's (dtype, shape, values within the dtype's rounding)."""
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)) or out.dtype != ref.dtype \
            or out.shape != ref.shape:
        return False
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(((out.float() - ref.float()).abs().max() <= tol * max(1.0, ref.float().abs().max().item())).item())


def _randn(shape, like, gen):
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


def _silu_equivalent(m):
    """A parameterless SiLU/Swish module of another class (improved-diffusion writes its own)
    that computes SiLU: checked on a probe."""
    name = type(m).__name__.lower()
    if type(m) is nn.SiLU or not ("silu" in name or "swish" in name) or _hooked(m) or _holds_state(m):
        return False
    x = torch.linspace(-8, 8, 257).reshape(1, 257)
    try:
        return _close(m(x.clone()), torch.nn.functional.silu(x))
    except Exception:  # noqa: BLE001 (any failure means "not SiLU")
        return False


def _fused_norm_equivalent(m):
    """A GroupNormAct sharing the parameters of ``m``, a GroupNorm subclass with its own forward,
    that computes what ``m`` does, or None: act=None for ADM's GroupNorm32 (fp32 statistics,
    output in the input dtype), act='silu' for a norm that applies SiLU itself (consistency
    models' GroupNorm32 with swish=1.0). No state beyond weight and bias; the same outputs on
    fp32 and bf16 probes."""
    if not isinstance(m, nn.GroupNorm) or _is_plain_norm(m) or isinstance(m, GroupNormAct) or _hooked(m) \
            or _holds_state(m, ("weight", "bias")):
        return None
    gen = torch.Generator().manual_seed(0)
    like = m.weight if m.affine else torch.empty(0)
    x = 1 + 2 * _randn((2, m.num_channels, 3, 3), like, gen).float()
    try:
        with torch.no_grad():
            refs = [m(x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)]
            for act in (None, "silu"):
                fused = GroupNormAct.replacing(m, act)
                if all(_close(fused(ref_x), ref) for ref_x, ref in zip((x, x.bfloat16()), refs)):
                    return fused
    except Exception:  # noqa: BLE001 (any failure means "not equivalent")
        return None
    return None


def _is_adm_block(m):
    """Laid out as ADM's ResBlock with use_scale_shift_norm (in_layers, emb_layers, out_layers =
    [GroupNorm, SiLU, ...], ``_forward(x, emb)``)."""
    layers = getattr(m, "out_layers", None)
    return (getattr(m, "use_scale_shift_norm", False) and isinstance(getattr(m, "in_layers", None), nn.Sequential)
            and isinstance(getattr(m, "emb_layers", None), nn.Module) and isinstance(layers, nn.Sequential)
            and len(layers) >= 2 and _is_plain_norm(layers[0]) and _is_silu(layers[1]) and hasattr(m, "_forward"))


def _adm_probe_inputs(m, gen):
    conv = next((c for c in m.in_layers.modules() if isinstance(c, nn.modules.conv._ConvNd)), None)
    linear = next((c for c in m.emb_layers.modules() if isinstance(c, nn.Linear)), None)
    if conv is None or linear is None or not isinstance(m.in_layers[0], nn.GroupNorm):
        raise ValueError("no GroupNorm, convolution or Linear where ADM's ResBlock has them")
    x = _randn((2, m.in_layers[0].num_channels, *[8] * len(conv.kernel_size)), conv.weight, gen)
    return x, _randn((2, linear.in_features), linear.weight, gen)


def _is_diffusers_block(m):
    """Laid out as diffusers' ResnetBlock2D (norm1, conv1, time_emb_proj, norm2, dropout, conv2,
    nonlinearity = SiLU, upsample / downsample, conv_shortcut; a 'default' or 'scale_shift' time
    embedding, or one that the block ignores, as the VAE decoder's 'group')."""
    norms = [getattr(m, key, None) for key in ("norm1", "norm2")]
    return (isinstance(getattr(m, "time_embedding_norm", None), str)
            and all(isinstance(n, nn.Module) and _is_plain_norm(n) for n in norms)
            and _is_silu(getattr(m, "nonlinearity", None)) and all(hasattr(m, key) for key in (
                "conv1", "conv2", "dropout", "time_emb_proj", "skip_time_act", "upsample", "downsample",
                "conv_shortcut", "output_scale_factor")))


def _diffusers_probe_inputs(m, gen):
    x = _randn((2, m.norm1.num_channels, 8, 8), m.conv1.weight, gen)
    proj = m.time_emb_proj
    return x, None if proj is None else _randn((2, proj.in_features), proj.weight, gen)


def _is_edm_block(m):
    """Laid out as EDM's UNetBlock (norm0, conv0, affine, norm1, conv1, skip, adaptive_scale,
    dropout, skip_scale; attention with norm2, qkv, proj when num_heads)."""
    norms = [getattr(m, key, None) for key in ("norm0", "norm1")]
    return all(isinstance(n, nn.Module) and (_is_edm_norm(n) or _is_plain_norm(n)) for n in norms) \
        and isinstance(getattr(m, "num_heads", None), int) and all(hasattr(m, key) for key in (
            "conv0", "affine", "conv1", "skip", "adaptive_scale", "dropout", "skip_scale", "in_channels",
            "emb_channels")) and (not m.num_heads or all(hasattr(m, key) for key in ("norm2", "qkv", "proj")))


def _edm_probe_inputs(m, gen):
    like = m.norm0.weight
    return _randn((2, m.in_channels, 8, 8), like, gen), _randn((2, m.emb_channels), like, gen)


def _is_ddpm_block(m):
    """Laid out as DDPM's ResnetBlock (norm1, conv1, temb_proj if a time embedding, norm2, dropout,
    conv2, conv_shortcut or nin_shortcut; in_channels, out_channels, use_conv_shortcut)."""
    return all(isinstance(getattr(m, key, None), nn.Module) and _is_plain_norm(getattr(m, key))
               for key in ("norm1", "norm2")) and not hasattr(m, "time_embedding_norm") and all(
        hasattr(m, key) for key in ("conv1", "dropout", "conv2", "in_channels", "out_channels", "use_conv_shortcut"))


def _ddpm_probe_inputs(m, gen):
    x = _randn((2, m.in_channels, 8, 8), m.conv1.weight, gen)
    proj = getattr(m, "temb_proj", None)
    return x, None if proj is None else _randn((2, proj.in_features), proj.weight, gen)


def _is_score_sde_block(m):
    """Laid out as score_sde's ResnetBlockDDPMpp (GroupNorm_0, Conv_0, Dense_0 if a time embedding,
    GroupNorm_1, Dropout_0, Conv_1, Conv_2 or NIN_0, act = SiLU; out_ch, skip_rescale,
    conv_shortcut), ResnetBlockDDPM (the same without skip_rescale) or ResnetBlockBigGANpp (with
    Conv_2 alone; up, down, fir, fir_kernel)."""
    return all(isinstance(getattr(m, key, None), nn.Module) and _is_plain_norm(getattr(m, key))
               for key in ("GroupNorm_0", "GroupNorm_1")) and _is_silu(getattr(m, "act", None)) and all(
        hasattr(m, key) for key in ("Conv_0", "Dropout_0", "Conv_1", "out_ch")) and (hasattr(m, "conv_shortcut") or all(
            hasattr(m, key) for key in ("up", "down", "fir", "fir_kernel", "skip_rescale")))


def _score_sde_probe_inputs(m, gen):
    x = _randn((2, m.GroupNorm_0.num_channels, 8, 8), m.Conv_0.weight, gen)
    dense = getattr(m, "Dense_0", None)
    return x, None if dense is None else _randn((2, dense.in_features), dense.weight, gen)


def _is_conv_block(m):
    """Laid out as denoising-diffusion-pytorch's Block: proj (a convolution), norm (GroupNorm), act
    (SiLU) and nothing else, ``forward(x, scale_shift=None)``."""
    return (set(m._modules) == {"proj", "norm", "act"} and isinstance(m.proj, nn.modules.conv._ConvNd)
            and _is_plain_norm(m.norm) and _is_silu(m.act)
            and "scale_shift" in inspect.signature(type(m).forward).parameters)


def _is_pre_norm_block(m):
    """Laid out as imagen-pytorch's Block: groupnorm (GroupNorm), activation (SiLU), project (a
    convolution) and nothing else, ``forward(x, scale_shift=None)`` and no other argument."""
    return (set(m._modules) == {"groupnorm", "activation", "project"}
            and isinstance(m.project, nn.modules.conv._ConvNd) and _is_plain_norm(m.groupnorm)
            and _is_silu(m.activation) and list(inspect.signature(type(m).forward).parameters)[2:] == ["scale_shift"])


def _scale_shift_probe_inputs(conv, in_channels, norm_channels, gen):
    """x for a block whose convolution is ``conv``, and a (scale, shift) pair for its norm."""
    spatial = [8] * len(conv.kernel_size)
    x = _randn((2, in_channels, *spatial), conv.weight, gen)
    return x, tuple(_randn((2, norm_channels, *[1] * len(spatial)), conv.weight, gen) for _ in range(2))


def _conv_block_probe_inputs(m, gen):
    return _scale_shift_probe_inputs(m.proj, m.proj.in_channels, m.norm.num_channels, gen)


def _pre_norm_block_probe_inputs(m, gen):
    return _scale_shift_probe_inputs(m.project, m.groupnorm.num_channels, m.groupnorm.num_channels, gen)


class _Block(NamedTuple):
    """A residual block layout whose GroupNorm -> SiLU code a fused method can replace."""
    name: str                                # whose block it is, with the method ("ADM's ResBlock._forward")
    method: str                              # the method replaced
    fused: Callable                          # fused(block, *inputs): that method with fused calls
    laid_out: Callable[[nn.Module], bool]    # whether a module has the block's layout
    probe_inputs: Callable                   # probe_inputs(block, generator): inputs of a probe call


_BLOCKS = (_Block("ADM's ResBlock._forward", "_forward", _adm_forward, _is_adm_block, _adm_probe_inputs),
           _Block("diffusers' ResnetBlock2D.forward", "forward", _diffusers_forward, _is_diffusers_block,
                  _diffusers_probe_inputs),
           _Block("EDM's UNetBlock.forward", "forward", _edm_forward, _is_edm_block, _edm_probe_inputs),
           _Block("denoising-diffusion-pytorch's Block.forward", "forward", _conv_block_forward, _is_conv_block,
                  _conv_block_probe_inputs),
           _Block("imagen-pytorch's Block.forward", "forward", _pre_norm_block_forward, _is_pre_norm_block,
                  _pre_norm_block_probe_inputs),
           _Block("DDPM's ResnetBlock.forward", "forward", _ddpm_forward, _is_ddpm_block, _ddpm_probe_inputs),
           _Block("score_sde's ResnetBlock{DDPM,DDPMpp,BigGANpp}.forward", "forward", _score_sde_forward,
                  _is_score_sde_block, _score_sde_probe_inputs))


def _patched(m, block):
    method = m.__dict__.get(block.method)
    return isinstance(method, functools.partial) and method.func is block.fused


def _probe_problem(m, block):
    """Why ``block.fused`` cannot replace ``m``'s method, or None: the method must be the class's
    (one set on the instance, such as accelerate's device hooks, stays), and ``block.fused`` must
    reproduce it on a probe, a copy with random weights (ADM zero-initialises the last
    convolution, which would hide the tail) in eval mode."""
    if block.method in m.__dict__:
        return f"its {block.method} is set on the instance ({m.__dict__[block.method]!r:.80})"
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(m).eval()
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(0.5 * _randn(p.shape, p, gen))
            inputs = block.probe_inputs(probe, gen)
            ref, out = getattr(probe, block.method)(*inputs), block.fused(probe, *inputs)
    except Exception as e:  # noqa: BLE001 (whatever fails, the block stays as it is)
        return f"the probe fails ({type(e).__name__}: {e})"
    return None if _close(out, ref) else f"its {block.method} differs from {block.name} on a probe"


def patch_model(model: nn.Module) -> list[Replacement]:
    """Replace, in place, the GroupNorm patterns of ``model`` by fused calls; returns what was replaced.

    - GroupNorm subclasses with their own forward become GroupNormAct when they compute the
      same thing (checked on a probe): act=None for ADM's GroupNorm32, act='silu' for one that
      applies SiLU itself, as consistency models' GroupNorm32(swish=1.0) does;
      parameterless SiLU classes of other libraries become nn.SiLU (checked likewise);
    - nn.Sequentials with a GroupNorm directly followed by SiLU become FusedSequential, which
      runs the pair as one call when the Sequential is called as a whole (its modules stay);
    - residual blocks get their method with fused calls where a probe shows the block's own
      method computes the same (else the block stays as it is, with a warning), when laid out as
      one of ``_BLOCKS``: ADM's ResBlock with ``use_scale_shift_norm`` (the GN * (1 + scale) +
      shift -> SiLU tail of ``_forward``), diffusers' ResnetBlock2D and EDM's UNetBlock (both
      GN -> SiLU pairs of ``forward``, a 'scale_shift' or adaptive-scale embedding folded in),
      DDPM's ResnetBlock (latent-diffusion's, Stable Diffusion's autoencoder's) and score_sde's
      ResnetBlockDDPM, ResnetBlockDDPMpp and ResnetBlockBigGANpp (both pairs),
      denoising-diffusion-pytorch's conv -> GN -> scale/shift -> SiLU Block and imagen-pytorch's
      GN -> scale/shift -> SiLU -> conv Block.
    Modules with hooks, and blocks whose method is set on the instance (accelerate wraps
    forward so), are left as they are. Parameters are shared, not copied: state_dicts
    and optimizers keep working. Patching twice changes nothing.
    """
    done = []
    for name, m in list(model.named_modules()):
        for key, child in list(m._modules.items()):
            new = _fused_norm_equivalent(child)
            if new is None and _silu_equivalent(child):
                new = nn.SiLU()
            if new is not None:
                done.append(Replacement(f"{name}.{key}" if name else key, child, new))
                m._modules[key] = new
    for name, m in list(model.named_modules()):
        block = next((b for b in _BLOCKS if b.laid_out(m) and not _patched(m, b)), None)
        if block is None:
            continue
        problem = _probe_problem(m, block)
        if problem is None:
            old, fused = getattr(m, block.method), functools.partial(block.fused, m)
            setattr(m, block.method, fused)
            done.append(Replacement(f"{name}.{block.method}" if name else block.method, old, fused))
        else:
            warnings.warn(f"patch_model: the GroupNorm -> SiLU calls of {name or 'the model'} ({type(m).__name__}) "
                          f"stay unfused: {problem}", stacklevel=2)
    for name, m in list(model.named_modules()):
        items = list(m._modules.values())
        if type(m) is nn.Sequential and not _hooked(m) and any(
                _is_plain_norm(a) and _is_silu(b) for a, b in zip(items, items[1:])):
            m.__class__ = FusedSequential
            done.append(Replacement(name, nn.Sequential, FusedSequential))
    return done
