"""Drop-in modules on the fused ops, and ``patch_model`` to put them into an existing model."""
import types
from typing import NamedTuple

import torch
from torch import nn

from .ops.group_norm_act import group_norm_act


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU (or nothing, ``act=None``), in one fused op.

    ``forward(x, scale=None, shift=None)`` computes act(GN(x) * (1 + scale) + shift) with
    per-sample (N, C) scale and shift, the timestep conditioning of ADM's scale-shift norm.
    Statistics in fp32, output in x's dtype (as ADM's GroupNorm32). Same parameters and
    state_dict keys as nn.GroupNorm.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act="silu", device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.act = act

    def forward(self, x, scale=None, shift=None):
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift, self.act)

    def extra_repr(self):
        return f"{super().extra_repr()}, act={self.act!r}"

    @classmethod
    def replacing(cls, norm, act):
        """A GroupNormAct sharing ``norm``'s parameters (same Parameter objects: optimizer state stays valid)."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False, act=act)
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new


class Replacement(NamedTuple):
    name: str        # qualified name in the model ("<block>._forward" for a rebound forward)
    old: object      # the module (or method) that was there
    new: object


def _scale_shift_forward(self, x, emb):
    """ADM's ResBlock._forward with its scale-shift norm + SiLU tail fused."""
    if self.updown:
        in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
        h = in_rest(x)
        h = self.h_upd(h)
        x = self.x_upd(x)
        h = in_conv(h)
    else:
        h = self.in_layers(x)
    emb_out = self.emb_layers(emb).type(h.dtype)
    scale, shift = emb_out.reshape(emb_out.shape[0], -1).chunk(2, dim=1)
    h = self.out_layers[0](h, scale, shift)   # GroupNormAct(act='silu'); out_layers[1] became Identity
    h = self.out_layers[2:](h)
    return self.skip_connection(x) + h


def _is_adm_scale_shift_block(m):
    layers = getattr(m, "out_layers", None)
    return (getattr(m, "use_scale_shift_norm", False) and hasattr(m, "emb_layers") and hasattr(m, "in_layers")
            and isinstance(layers, nn.Sequential) and len(layers) >= 2 and isinstance(layers[0], nn.GroupNorm)
            and isinstance(layers[1], nn.SiLU) and hasattr(m, "_forward"))


def patch_model(model: nn.Module) -> list[Replacement]:
    """Replace, in place, the GroupNorm patterns of ``model`` by fused GroupNormAct modules.

    - ADM-style residual blocks with ``use_scale_shift_norm`` (attributes in_layers,
      emb_layers, out_layers = [GroupNorm, SiLU, ...], updown, skip_connection): their
      GN * (1 + scale) + shift -> SiLU tail becomes one fused call (``_forward`` is rebound);
    - a GroupNorm (or subclass, e.g. ADM's GroupNorm32) directly followed by SiLU inside an
      nn.Sequential: fused, the SiLU becomes nn.Identity;
    - any other GroupNorm (or subclass): GroupNormAct(act=None).
    Parameters are shared, not copied. Returns what was replaced.
    """
    done = []

    def swap(parent, key, parent_name, new):
        name = f"{parent_name}.{key}" if parent_name else str(key)
        done.append(Replacement(name, parent._modules[str(key)], new))
        parent._modules[str(key)] = new

    for name, m in list(model.named_modules()):
        if _is_adm_scale_shift_block(m) and not isinstance(m.out_layers[0], GroupNormAct):
            prefix = f"{name}.out_layers" if name else "out_layers"
            swap(m.out_layers, 0, prefix, GroupNormAct.replacing(m.out_layers[0], "silu"))
            swap(m.out_layers, 1, prefix, nn.Identity())
            old_forward, m._forward = m._forward, types.MethodType(_scale_shift_forward, m)
            done.append(Replacement(f"{name}._forward" if name else "_forward", old_forward, m._forward))
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Sequential):
            keys = list(m._modules)
            for a, b in zip(keys, keys[1:]):
                norm, act = m._modules[a], m._modules[b]
                if isinstance(norm, nn.GroupNorm) and not isinstance(norm, GroupNormAct) and isinstance(act, nn.SiLU):
                    swap(m, a, name, GroupNormAct.replacing(norm, "silu"))
                    swap(m, b, name, nn.Identity())
    for name, m in list(model.named_modules()):
        for key, child in list(m._modules.items()):
            if isinstance(child, nn.GroupNorm) and not isinstance(child, GroupNormAct):
                swap(m, key, name, GroupNormAct.replacing(child, None))
    return done
