"""Noise schedules of the discrete-time diffusion (ADM's conventions), and timestep respacing.

A ``Schedule`` holds float64 tables indexed by timestep. ``respaced`` keeps a subset of the
timesteps and recomputes the betas so that the kept alphas_cumprod are unchanged (ADM's
SpacedDiffusion); ``timestep_map`` translates its indices to those of the original schedule,
which is what the model is always called with.
"""
import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

_ON_DEVICE = WeakIdKeyDictionary()  # a host table -> {device: its copy there}


def beta_schedule(name, num_timesteps):
    """float64 betas of the 'linear' (ADM: scaled to the number of steps) or 'cosine' schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":  # Nichol & Dhariwal: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta schedule must be 'linear' or 'cosine', got {name!r}")


def space_timesteps(num_timesteps, count):
    """Sorted timestep indices to keep: ``count`` evenly spaced (int or "N", ADM's section_counts
    with one section, first and last step included), or "ddimN": N steps of one integer stride."""
    if isinstance(count, str) and count.startswith("ddim"):
        want = int(count[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot keep exactly {want} of {num_timesteps} steps with an integer stride")
    count = int(count)
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"count must be in [1, {num_timesteps}], got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return [round(i * stride) for i in range(count)]


def on_device(table, device):
    """A schedule's host table on ``device``, copied there once: a copy at every call would make the
    host wait for every kernel queued before it (a copy from pageable memory does)."""
    if table.device == device:
        return table
    copies = _ON_DEVICE.setdefault(table, {})
    if device not in copies:
        copies[device] = table.to(device)
    return copies[device]


def extract(table, t, like):
    """``table[t]`` on ``like``'s device, shaped (B, 1, ...) to broadcast against ``like``, in
    like's dtype promoted to at least float32 (as ADM, which reads float64 tables as float32)."""
    values = on_device(table, t.device)[t].to(torch.promote_types(like.dtype, torch.float32))
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class Schedule:
    """The diffusion q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the tables derived
    from its betas (float64, 1-D over timesteps, on the CPU)."""

    def __init__(self, betas, timestep_map=None):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence of values in (0, 1]")
        self.num_timesteps = n = len(betas)
        self.timestep_map = torch.arange(n) if timestep_map is None else torch.as_tensor(timestep_map).long()
        self.betas = betas
        self.log_betas = betas.log()
        alphas = 1 - betas
        self.alphas_cumprod = ac = alphas.cumprod(0)
        self.alphas_cumprod_prev = ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = ac.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / ac - 1).sqrt()
        self.log_snr = 0.5 * (ac.log() - (-ac).log1p())  # lambda_t = log(alpha_t / sigma_t)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = pv = betas * (1 - ac_prev) / (1 - ac)
        # the variance is 0 at t = 0: its log is clipped to that of t = 1
        self.posterior_log_variance_clipped = torch.cat([pv[1:2], pv[1:]]).log() if n > 1 else pv.log()
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * alphas.sqrt() / (1 - ac)

    @classmethod
    def named(cls, name, num_timesteps):
        """The schedule of ``beta_schedule(name, num_timesteps)``."""
        return cls(beta_schedule(name, num_timesteps))

    def respaced(self, timesteps):
        """The schedule on the kept ``timesteps`` (indices into this one): new betas from the kept
        alphas_cumprod, ``timestep_map`` pointing to the original indices."""
        keep = torch.as_tensor(sorted(set(int(i) for i in timesteps)), dtype=torch.long)
        if len(keep) == 0 or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be a non-empty subset of [0, {self.num_timesteps}), got {timesteps}")
        ac = self.alphas_cumprod[keep]
        return Schedule(1 - ac / torch.cat([ac.new_ones(1), ac[:-1]]), self.timestep_map[keep])

