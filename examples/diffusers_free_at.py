"""Free adversarial training of a diffusers UNet2DModel on diffusers' own noise schedule.

The model, the schedule and the sampler are diffusers'; adv-dpm adds one line to the model,
``patch_model`` (its GroupNorm -> SiLU pairs run fused), and the free-AT batch of
examples/free_at_loop.py (two fused ops). Trains on scikit-learn's bundled 8x8 digits:
standard updates first, then free-AT updates (PAPER.md's defaults), then samples the EMA with
diffusers' DDIMScheduler.

    python examples/diffusers_free_at.py --out digits_diffusers.png    # about 3 min on a 2-core CPU
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import adv_dpm
from adv_dpm.data import digits
from adv_dpm.utils import save_image_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))   # examples/ is not a package
from free_at_loop import free_at_batch  # noqa: E402


class EpsPredictor(nn.Module):
    """A UNet2DModel as the epsilon predictor ``model(x, t)`` that free_at_batch trains."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


@torch.no_grad()
def ddim_samples(model, num, steps, generator):
    """``num`` 1x8x8 samples of ``model`` with diffusers' DDIM (eta 0) on the training schedule."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    scheduler.set_timesteps(steps)
    x = torch.randn((num, 1, 8, 8), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(num)), t, x).prev_sample
    return x.clamp(-1, 1)


def main(argv=None):
    """Train a small UNet2DModel on digits, standard then free AT, and save a grid of its EMA's
    DDIM samples; returns the samples and each batch's last loss."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", type=int, default=1500, help="standard updates first (one per batch)")
    parser.add_argument("--updates", type=int, default=600, help="free-AT updates (3 per batch)")
    parser.add_argument("--out", default="digits_diffusers.png", help="PNG of 64 samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = digits().x
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    replaced = adv_dpm.patch_model(unet)   # the one line: the same model, its norms and SiLUs fused
    print(f"patch_model: {len(replaced)} blocks fused")
    model = EpsPredictor(unet)
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    losses = []
    for steps, count in [(1, args.pretrain), (3, math.ceil(args.updates / 3))]:   # steps=1: plain training
        for _ in tqdm(range(count), desc="standard" if steps == 1 else "free AT", unit="batch"):
            x0 = data[torch.randint(len(data), (64,), generator=generator)]
            t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            losses.append(free_at_batch(model, optimizer, x0, t, eps, alphas_cumprod, steps=steps, ema=ema))
    samples = ddim_samples(ema.module.eval(), 64, 20, generator)
    save_image_grid(samples, args.out)
    print(f"samples: {args.out}")
    return samples, losses


if __name__ == "__main__":
    main()
