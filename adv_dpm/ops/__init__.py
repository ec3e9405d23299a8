"""The fused ops of adv-dpm: torch.library custom ops in the ``adv_dpm`` namespace.

One module per op family; the pure-PyTorch oracle of all of them is ``reference``; the
backend choice lives in ``backend``. See docs/OPS.md for the contract.
"""
from .adv_step import AdvStep, AdvStepInject, adv_step, adv_step_inject
from .backend import BACKENDS, use_backend
from .group_norm_act import group_norm_act
from .noise_inject import noise_inject

__all__ = ["AdvStep", "AdvStepInject", "BACKENDS", "adv_step", "adv_step_inject", "group_norm_act", "noise_inject",
           "use_backend"]
