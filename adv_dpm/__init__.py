"""adv-dpm: cheap adversarial training of diffusion and consistency models.

Fused ops (noise injection, the free-AT adversarial step, GroupNorm + scale/shift + SiLU) as
torch custom ops with C++, CUDA and Triton backends (``adv_dpm.ops``), drop-in modules and
``patch_model`` (``adv_dpm.nn``).
"""
from .nn import GroupNormAct, patch_model
from .ops import adv_step, adv_step_inject, group_norm_act, noise_inject, use_backend

__version__ = "0.1.0"
__all__ = ["GroupNormAct", "adv_step", "adv_step_inject", "group_norm_act", "noise_inject", "patch_model",
           "use_backend"]
