"""Free adversarial training (PAPER.md) inside your own diffusion training loop.

Your model, noise schedule, data and optimizer stay yours; adv-dpm adds two fused ops. Per
batch, t and eps are drawn once; the batch is replayed K times, each replay an optimizer
update on x_t + delta against the noise that input implies, and between replays delta moves
along the input gradient that the replay's own backward pass already left on x_in. No extra
forward or backward pass.

    python examples/free_at_loop.py --out free_at_gmm.png    # about 40 s on a laptop CPU

trains adv-dpm's toy MLP on 8 Gaussians in 2-D, fine-tunes it with free AT and plots DDIM
samples of its EMA; any epsilon predictor, schedule and data go through ``free_at_batch`` alike. With a
GradScaler, x_in.grad carries the loss scale: pass it as ``grad_scale`` to ``adv_step_inject``
(``scaler.get_scale()``, or the scale as a float32 tensor on the device, which the kernels read
without the host waiting for the GPU: one taken before ``scaler.update()``, which changes it in
place).
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import adv_dpm
from adv_dpm.data import toy2d
from adv_dpm.diffusion import Schedule, sample
from adv_dpm.models.mlp import MLPDenoiser


def free_at_batch(model, optimizer, x0, t, eps, alphas_cumprod, steps=3, adv_lr=0.1, adv_max_norm=0.1, ema=None):
    """K = ``steps`` updates of ``model`` (an epsilon predictor) on one batch, each followed by one of
    ``ema`` (an AveragedModel) if given; the last replay's loss."""
    a_t, s_t = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
    x_t, target = adv_dpm.noise_inject(x0, eps, a_t, s_t)        # the clean x_t; its target is eps
    delta, x_in = torch.zeros_like(x0), x_t
    radius = adv_max_norm * math.sqrt(x0[0].numel())             # PAPER.md: sqrt(d) * adv_max_norm
    for k in range(steps):
        x_in = x_in.detach().requires_grad_()
        loss = F.mse_loss(model(x_in, t), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                                           # parameter gradients and dLoss/dx_in
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if k < steps - 1:                                         # ascend, project, next input and target
            step = adv_dpm.adv_step_inject(x_t, eps, s_t, delta, x_in.grad, lr=adv_lr, radius=radius)
            delta, x_in, target = step.delta, step.x_adv, step.target
    return loss.item()


def main(argv=None):
    """Train adv-dpm's toy MLP on 8 Gaussians, then fine-tune it with free AT (as the paper does), and
    plot DDIM samples of its EMA."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", type=int, default=3000, help="standard updates first (one per batch)")
    parser.add_argument("--updates", type=int, default=1500, help="free-AT updates (3 per batch)")
    parser.add_argument("--adv-max-norm", type=float, default=0.02,
                        help="RMS radius of delta per element (PAPER.md's 0.1 is for images: with it, this "
                             "example's samples smear along the circle between the modes)")
    parser.add_argument("--out", default="free_at_gmm.png", help="PNG of the samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    schedule = Schedule.named("cosine", 1000)
    alphas_cumprod = schedule.alphas_cumprod.float()
    data = toy2d("gmm", n=20000, seed=args.seed).x
    model = MLPDenoiser(hidden=128, depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.995))
    for steps, count in [(1, args.pretrain), (3, math.ceil(args.updates / 3))]:   # steps=1: plain training
        for _ in tqdm(range(count), desc="standard" if steps == 1 else "free AT", unit="batch"):
            x0 = data[torch.randint(len(data), (256,), generator=generator)]
            t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            free_at_batch(model, optimizer, x0, t, eps, alphas_cumprod, steps=steps, adv_max_norm=args.adv_max_norm,
                          ema=ema)
    samples = sample(ema.module, schedule, (2000, 2), "ddim", 50, learn_sigma=False, generator=generator)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(*data[:2000].T, s=1, alpha=0.3, label="data")
    ax.scatter(*samples.T, s=1, label="EMA model, DDIM 50 steps")
    ax.set(aspect="equal", title=f"{args.pretrain} standard + {3 * math.ceil(args.updates / 3)} free-AT updates "
                                 f"(radius {args.adv_max_norm})")
    ax.legend(loc="upper right", markerscale=8, fontsize=8)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"samples: {args.out}")
    return samples


if __name__ == "__main__":
    main()
