"""A training pass (forward + backward) of diffusers' UNet2DModel as it comes and after
``adv_dpm.patch_model``, side by side: what fusing an existing model's GroupNorm -> SiLU pairs
buys a user who changes one line.

    python benches/bench_patch.py [--device cpu|cuda] [--batch N] [--precision fp32|bf16] [--out DIR]

The model is DDPM's CIFAR-10 UNet (35.7M parameters; ``google/ddpm-cifar10-32``'s config,
random weights: the time does not depend on them), called as a training step calls it: a batch
of 32x32 images and per-sample timesteps, an MSE loss, backward. On CUDA the default is
batch 128 in bf16 autocast with channels_last, on CPU batch 8 in fp32. Both models time in
alternating rounds (benches/common.py's ``compare``); "x diffusers" is the ratio of medians.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adv_dpm import patch_model  # noqa: E402

COLUMNS = [("model", "model", "{}"), ("batch", "batch", "{}"), ("precision", "precision", "{}"),
           ("provider", "model as", "{}"), ("replaced", "blocks fused", "{}"), ("ms", "ms / pass", "{:.1f}"),
           ("gpu_ms", "GPU-only ms", "{:.1f}"), ("speedup", "x diffusers", "{:.2f}"),
           ("peak_mib", "peak MiB", "{:.0f}")]


def ddpm_cifar10_unet():
    """DDPM's CIFAR-10 UNet as diffusers configures it (google/ddpm-cifar10-32)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def training_pass(model, batch, device, precision):
    """One forward + backward as a trainer runs it (gradients reset, not accumulated)."""
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if device == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device, memory_format=layout)
    noise = torch.randn(x.shape, generator=gen).to(device, memory_format=layout)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.mse_loss(model(x, t).sample.float(), noise)
        loss.backward()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 8 on CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per model (default 2 CUDA, 10 CPU)")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    batch = args.batch or (128 if gpu else 8)
    precision = args.precision or ("bf16" if gpu else "fp32")
    meta = common.machine(args.device)
    columns = common.device_columns(COLUMNS, args.device)
    print(f"# diffusers UNet2DModel (DDPM CIFAR-10), forward + backward on {meta['device']}: batch {batch}, "
          f"{precision}\n", flush=True)

    def fill(rows):
        torch.manual_seed(0)
        model = ddpm_cifar10_unet().to(args.device)
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        patched = copy.deepcopy(model)
        replaced = patch_model(patched)
        models = {"diffusers": model, "patched": patched}
        fns = {name: training_pass(m, batch, args.device, precision) for name, m in models.items()}
        timings = common.compare(fns, args.device, args.min_run_time or (2.0 if gpu else 10.0))
        base = timings["diffusers"]["basis_s"]
        for name, t in timings.items():
            rows.append(dict(model="ddpm-cifar10", batch=batch, precision=precision, provider=name,
                             replaced=len(replaced) if name == "patched" else 0, ms=t["us"] / 1e3,
                             gpu_ms=None if t["gpu_us"] is None else t["gpu_us"] / 1e3, speedup=base / t["basis_s"],
                             peak_mib=None if not gpu else common.peak_memory(fns[name], args.device) / 2**20))

    rows = common.measure(fill, meta)
    print(common.markdown_table(rows, columns), flush=True)
    path = common.save("bench_patch", meta, rows, columns, args.out)
    print(f"\nresults: {path} (and .json)")


if __name__ == "__main__":
    main()
