"""Argument checks shared by the fused ops: each error names the argument and what was expected."""
import math
import numbers
import sys

import torch

TARGETS = ("original", "delta_detach", "delta")


def target_mode(op, target):
    if target not in TARGETS:
        raise ValueError(f"{op}: target must be one of {TARGETS}, got {target!r}")
    return TARGETS.index(target)


def batch_tensor(op, name, t):
    """A floating tensor with a non-empty batch dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{op}: {name} must have shape (B, ...) with B >= 1, got {tuple(t.shape)}")


def like(op, name, t, ref_name, ref):
    """``t`` (if given) has the shape, dtype and device of ``ref``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def coefficients(op, name, c, ref):
    """A floating (B,) vector on the device of ``ref``."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor of shape ({ref.shape[0]},), got {type(c).__name__}")
    if c.shape != (ref.shape[0],):
        raise ValueError(f"{op}: {name} must have shape (B,) = ({ref.shape[0]},), or (B, 1, ..., 1) of the data's "
                         f"rank: one value per sample; got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {c.dtype}")
    if c.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of the inputs ({ref.device}), got {c.device}")


def per_sample(t, lead, ndim):
    """``t`` viewed as ``lead`` (such as (B,) or (N, C)) where it holds per-sample values in the
    shape that broadcasts against data of ``ndim`` dims, (*lead, 1, ..., 1), as trainers keep
    them; None for anything else."""
    if isinstance(t, torch.Tensor) and t.dim() == ndim >= len(lead) and tuple(t.shape[:len(lead)]) == tuple(lead) \
            and all(s == 1 for s in t.shape[len(lead):]):
        return t.reshape(lead)
    return None


def flat_per_sample(t, data, lead_dims=1):
    """``t`` as the ops take it, (B,) (``lead_dims`` 2: (N, C)), where it is in the broadcasting
    shape (B, 1, ..., 1) of ``data``'s rank; anything else unchanged, for the op's checks to judge."""
    view = per_sample(t, data.shape[:lead_dims], data.dim()) if isinstance(data, torch.Tensor) else None
    return t if view is None else view


def number(value):
    """``value`` as the ops take it: numpy's scalars become Python numbers."""
    return value.item() if isinstance(value, numbers.Real) and not isinstance(value, (int, float)) else value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Range checks compare (no math.isnan / isfinite): torch.compile passes a float whose value
# changes between calls as a symbolic float, which takes comparisons only.
def non_negative(op, name, value, allow_inf=False):
    if not _is_number(value) or not 0 <= value <= (math.inf if allow_inf else sys.float_info.max):
        expected = "a number >= 0" + (" (inf allowed)" if allow_inf else " and finite")
        raise ValueError(f"{op}: {name} must be {expected}, got {value!r}")


def positive(op, name, value):
    if not _is_number(value) or not 0 < value <= sys.float_info.max:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")


def loss_scale(op, name, t, ref):
    """None, or a float32 tensor of one element on the device of ``ref`` (a GradScaler's scale;
    its value is not checked: reading it would wait for the device)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be None or a float32 tensor of one element, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be a float32 tensor of one element, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of the inputs ({ref.device}), got {t.device}")
