"""Denoisers: the ADM UNet for images, a residual MLP for 2-D toy data, and named presets.

``build_model("cifar10")``, ``build_model("digits-tiny", image_size=8)``, or
``build_model(model.config)`` to rebuild a model from the config saved with a checkpoint.
"""
from .mlp import MLPDenoiser
from .unet import UNet

ARCHS = {"unet": UNet, "mlp": MLPDenoiser}

PRESETS = {
    # The paper's CIFAR-10 ADM (improved-diffusion's CIFAR-10 model with scale-shift norm and
    # resblock up/down, as the authors' guided-diffusion fork runs it).
    "cifar10": dict(arch="unet", image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                    num_res_blocks=3, attention_resolutions=(16, 8), num_head_channels=32, dropout=0.3,
                    use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True),
    # ADM's class-conditional ImageNet 64x64 model.
    "imagenet64": dict(arch="unet", image_size=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
                       num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                       use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, num_classes=1000),
    # sklearn digits on a small CPU: 1x8x8 ('digits'; image_size=16 for 'digits16'), 0.18M parameters.
    "digits-tiny": dict(arch="unet", image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(), num_head_channels=16, dropout=0.0,
                        use_scale_shift_norm=True, resblock_updown=False, learn_sigma=True),
    # 1x16x16 digits ('digits16'), 1.9M parameters.
    "digits-small": dict(arch="unet", image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                         num_res_blocks=2, attention_resolutions=(8,), num_head_channels=32, dropout=0.1,
                         use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True),
    "toy2d": dict(arch="mlp", dim=2, hidden=256, depth=4, time_embed_dim=64, learn_sigma=False),
}


def build_model(preset_or_config, **overrides):
    """A model from a preset name or a config dict (``arch`` 'unet' or 'mlp', then constructor
    arguments), with keyword overrides, e.g. ``build_model("digits-tiny", image_size=8)``."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_config!r}; presets: {sorted(PRESETS)}")
        preset_or_config = PRESETS[preset_or_config]
    config = {**preset_or_config, **overrides}
    arch = config.pop("arch", "unet")
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch](**config)


__all__ = ["ARCHS", "PRESETS", "MLPDenoiser", "UNet", "build_model"]
