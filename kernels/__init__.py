"""Triton kernels of the fused ops (installed as ``adv_dpm.kernels``).

``noise_inject`` and ``adv_step`` hold the kernels and their Python launchers, with the
arguments and outputs of the private ops of docs/OPS.md. Nothing is imported here: the
modules import triton themselves and are only loaded when the Triton backend runs
(adv_dpm/ops/backend.py), so importing this package never needs triton.
"""
