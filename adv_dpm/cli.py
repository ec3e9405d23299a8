"""The `adv-dpm` command: train, sample, info."""
import argparse
import dataclasses
import json
import platform
import sys
import tomllib
from pathlib import Path

import torch


def info(_args):
    """Print versions, devices and which fused-op backends run here (and why not)."""
    from . import __version__
    from .ops import backend

    print(f"adv-dpm {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}  (torch CUDA {torch.version.cuda or 'n/a'})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"compiled extension: {backend.extension_error() or 'loaded'}")
    if not backend.extension_error():
        print(f"  CUDA kernels compiled in: {backend.has_compiled_kernel('noise_inject', 'CUDA')}")
    forced = backend.forced_backend()
    print(f"forced backend: {forced or 'none (automatic)'}")
    for device, status in backend.report().items():
        print(f"{device} tensors (preference {' > '.join(backend.PREFERENCE[device])}):")
        for name, why in status.items():
            print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")


def _parse_value(field, text):
    if field.type in (bool, "bool"):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"--{field.name} expects true or false, got {text!r}")
    if field.type in (dict, "dict"):
        return json.loads(text)
    kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
    return kind(text)


def load_config(path):
    """A TOML (or YAML, with PyYAML installed) file of TrainConfig fields."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"adv-dpm: config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit("adv-dpm: YAML configs need PyYAML (pip install pyyaml); TOML works without it")
        return yaml.safe_load(path.read_text()) or {}
    return tomllib.loads(path.read_text())


def train(args):
    """Train (or resume, if the run directory holds a checkpoint) a diffusion model."""
    from .train import TrainConfig, Trainer
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    settings = load_config(args.config) if args.config else {}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise SystemExit(f"adv-dpm train: unknown setting(s) {unknown} in {args.config}; known: {sorted(fields)}")
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    try:
        config = TrainConfig(**settings)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"adv-dpm train: {e}")
    run_dir = Trainer(config).train()
    print(f"run directory: {run_dir}  (checkpoint.pt, metrics.csv, samples_*.png, loss.png, config.json)")


def sample(args):
    """Sample from a checkpoint's EMA weights to a PNG grid and an npz."""
    from .train import TrainConfig, Trainer
    from .utils import save_image_grid
    from .diffusion import sample as draw
    import numpy as np
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    config = TrainConfig(**{**state["config"], "run_dir": str(Path(args.checkpoint).parent), "device": args.device})
    trainer = Trainer(config)
    model = trainer.ema_model(float(args.ema) if args.ema else None)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.num, *trainer.data.x.shape[1:])
    x_T = torch.randn(shape, generator=g).to(trainer.device)
    with torch.no_grad():
        x = draw(lambda x, t: model(x, t), trainer.schedule, shape, args.method, args.steps, eta=args.eta,
                 es_lambda=args.es_lambda, learn_sigma=trainer.learn_sigma, device=trainer.device, x_T=x_T,
                 progress=True)
    out = Path(args.out)
    np.savez(out.with_suffix(".npz"), x.cpu().numpy())
    if x.dim() == 4:
        save_image_grid(x, out.with_suffix(".png"))
    print(f"samples: {out.with_suffix('.npz')}" + (f" and {out.with_suffix('.png')}" if x.dim() == 4 else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="adv-dpm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help=info.__doc__).set_defaults(run=info)

    from .train import TrainConfig
    p = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    p.add_argument("--config", help="TOML/YAML file of settings; flags override it")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name}", type=lambda text, f=f: _parse_value(f, text), default=None,
                       help=f"(default {f.default if f.default is not dataclasses.MISSING else '{}'})")
    p.set_defaults(run=train)

    p = sub.add_parser("sample", help=sample.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--method", default="ddim", choices=["ddpm", "ddim", "dpm_solver++"])
    p.add_argument("--steps", type=int, default=20, help="number of model evaluations (NFE)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--es-lambda", type=float, default=1.0, help="ADM-ES epsilon scaling (1: off)")
    p.add_argument("--ema", default="", help="EMA rate to use (default: the first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(run=sample)

    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
