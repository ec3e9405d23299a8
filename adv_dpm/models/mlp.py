"""A residual MLP denoiser for 2-D toy data."""
import torch.nn.functional as F
from torch import nn

from .unet import timestep_embedding, zero


class MLPBlock(nn.Module):
    """h + W2 SiLU(W1 LN(h) + W_e emb)."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h, emb):
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """``forward(x, t, y=None)``: points x (B, dim) and timesteps t (B,) to the predicted noise
    (B, dim), followed by dim variance interpolation values when ``learn_sigma``. The output
    layer is zero at init (as ADM's); ``config`` rebuilds the model with ``build_model``."""

    def __init__(self, dim=2, hidden=256, depth=4, time_embed_dim=64, learn_sigma=False):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config = {"arch": "mlp", **args}
        self.time_embed_dim = time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(depth))
        out_dim = 2 * dim if learn_sigma else dim
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), zero(nn.Linear(hidden, out_dim)))

    def forward(self, x, t, y=None):
        if y is not None:
            raise ValueError("MLPDenoiser is unconditional: y must be None")
        t = t.reshape(-1).expand(x.shape[0])
        emb = F.silu(self.time_embed(timestep_embedding(t, self.time_embed_dim).to(x.dtype)))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
