"""The `adv-dpm` command: train, sample, evaluate, compare, reproduce, info."""
import argparse
import dataclasses
import inspect
import json
import os
import platform
import re
import shlex
import signal
import sys
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib


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
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"--{field.name} expects JSON such as '{{\"dropout\": 0.1}}', "
                                             f"got {text!r}") from None
    kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{field.name} expects {kind.__name__}, got {text!r}") from None


def _field_help(cls):
    """{field: help} from the comments beside a dataclass's fields (their one source)."""
    helps, last = {}, None
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):   # installed without sources
        return helps
    for line in source.splitlines():
        field = re.match(r"\s+(\w+): [^#]*#\s*(.*)", line)
        more = re.match(r"\s+#\s*(.*)", line)
        if field:
            last = field.group(1)
            helps[last] = field.group(2)
        elif more and last:
            helps[last] += " " + more.group(1)
        else:
            last = None
    return helps


def load_config(path):
    """A TOML, JSON (a run's config.json) or YAML (with PyYAML installed) file of TrainConfig fields."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"adv-dpm: config file {path} does not exist")
    try:
        if path.suffix == ".json":
            settings = json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SystemExit("adv-dpm: YAML configs need PyYAML (pip install pyyaml); TOML works without it") from None
            settings = yaml.safe_load(path.read_text()) or {}
        else:
            settings = tomllib.loads(path.read_text())
    except ValueError as e:   # json's and tomllib's decoding errors
        raise SystemExit(f"adv-dpm: config file {path} does not parse: {e}") from None
    if not isinstance(settings, dict):
        raise SystemExit(f"adv-dpm: config file {path} must hold a table of settings, got {type(settings).__name__}")
    return settings


def train(args):
    """Train (or resume, if the run directory holds a checkpoint) a diffusion or consistency model."""
    from .train import TrainConfig, Trainer
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    settings = load_config(args.config) if args.config else {}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise SystemExit(f"adv-dpm train: unknown setting(s) {unknown} in {args.config}; known: {sorted(fields)}")
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    run_dir = Trainer(TrainConfig(**settings)).train()
    print(f"run directory: {run_dir}  (checkpoint.pt, metrics.csv, samples_*.png, loss.png, config.json)")


def sample(args):
    """Sample from a checkpoint's EMA weights to a PNG grid and an npz."""
    import numpy as np

    from .evaluate import load_checkpoint, sample_shape
    from .utils import resolve_device, save_image_grid
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, args.ema, device)
    shape = (args.num, *sample_shape(loaded))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    options = {} if loaded.consistency else {"eta": args.eta, "es_lambda": args.es_lambda}
    with torch.no_grad():
        x = loaded.sample(shape, args.method, args.steps, device=device, x_T=x_T, progress=True, **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out.with_suffix(".npz"), x.cpu().numpy())
    if x.dim() == 4:
        save_image_grid(x, out.with_suffix(".png"))
    print(f"samples: {out.with_suffix('.npz')}" + (f" and {out.with_suffix('.png')}" if x.dim() == 4 else ""))


def _name_list(text):
    return [v for v in text.split(",") if v]


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def evaluate(args):
    """Score a checkpoint's EMA model over samplers x NFE: table (CSV, markdown, JSON) and plots."""
    from .evaluate import evaluate as run
    from .utils import checkpoint_file
    out = args.out or str(checkpoint_file(args.checkpoint).parent / "eval")
    rows = run(args.checkpoint, samplers=args.samplers, nfes=args.nfes, num_samples=args.num_samples, seed=args.seed,
               out_dir=out, es_lambda=args.es_lambda, exposure=args.exposure, robustness_budget=args.robustness,
               robustness_samplers=args.robustness_samplers, inception=args.inception,
               feature_cache=args.feature_cache, ema=args.ema, batch_size=args.batch_size, device=args.device)
    print(f"{len(rows)} cells: {out}/results.md (results.csv, results.json, *_vs_nfe.png)")


def compare(args):
    """Compare evaluated runs with a baseline, paired over seeds (sampler x NFE: relative change, p)."""
    from . import compare as cmp
    rows = cmp.compare(args.baseline, args.runs, args.metrics)
    print(cmp.report(rows))
    if args.out:
        print(f"written: {cmp.write(rows, args.out)} (compare.csv, compare_<metric>.png)")


def reproduce(args):
    """The paper's protocols at laptop scale (pretrain, fine-tunes per seed, grid evaluation, report); resumable."""
    from .reproduce import reproduce as run
    result = run(args.preset, args.data, args.out, args.nfes, command="adv-dpm " + shlex.join(args.argv),
                 protocol=args.protocol, robustness=args.robustness)
    print(f"report: {result['report']}")


def _respelled(argv, parser):
    """``argv`` with each long option of ``parser`` spelled as it is declared, whichever of '-' and
    '_' separates its words: train's flags are guided-diffusion's (--run_dir), the other
    commands' hyphenated (--num-samples); either spelling works everywhere."""
    declared = {o.replace("_", "-"): o for action in parser._actions for o in action.option_strings}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(declared.get(name.replace("_", "-"), name) + eq + value if name.startswith("--") else arg)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="adv-dpm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help=info.__doc__).set_defaults(run=info)

    from .diffusion import METHODS
    from .train import TrainConfig
    p = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    p.add_argument("--config", help="TOML, YAML or JSON (a run's config.json) file of settings; flags override it")
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        p.add_argument(f"--{f.name}", type=lambda text, f=f: _parse_value(f, text), default=None,
                       metavar=str(getattr(f.type, "__name__", f.type)).upper(),
                       help=f"{helps.get(f.name, '')} (default {default!r})".replace("%", "%%"))
    p.set_defaults(run=train)

    p = sub.add_parser("sample", help=sample.__doc__, description=sample.__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt of a training run (or its run directory)")
    p.add_argument("--method", default="ddim", choices=METHODS,
                   help="diffusion sampler (a consistency model is sampled by multistep consistency sampling)")
    p.add_argument("--steps", type=int, default=20,
                   help="number of model evaluations (NFE); ddim steps with an integer stride, as ADM's ddimN")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--es-lambda", type=float, default=1.0, help="ADM-ES epsilon scaling (1: off)")
    p.add_argument("--ema", type=float, default=None, help="EMA rate to use; None: the run's first")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when there is a GPU), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--out", default="samples.png", help="PNG grid; the npz goes beside it")
    p.set_defaults(run=sample)

    from .evaluate import CM_NFES, CM_SAMPLERS, ES_LAMBDA, PAPER_NFES, SAMPLERS
    p = sub.add_parser("evaluate", help=evaluate.__doc__, description=evaluate.__doc__)
    p.add_argument("checkpoint", help="checkpoint.pt of a training run, or its run directory (its EMA weights are "
                   "evaluated)")
    p.add_argument("--samplers", type=_name_list, default=None,
                   help=f"comma-separated, some of {','.join(SAMPLERS)} (default: all); "
                   f"for a consistency model {','.join(CM_SAMPLERS)}")
    p.add_argument("--nfes", type=_int_list, default=None,
                   help=f"comma-separated (default: the paper's, {','.join(map(str, PAPER_NFES))}; for a consistency "
                   f"model {','.join(map(str, CM_NFES))})")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--es-lambda", type=float, default=ES_LAMBDA, help="epsilon scaling of 'ddpm-es'")
    p.add_argument("--exposure", action="store_true", help="add the exposure-bias ratio (mean over steps)")
    p.add_argument("--robustness", type=float, default=None, metavar="BUDGET",
                   help="add the primary metric under random and adversarial input perturbations of this RMS "
                   "per element (an L2 norm of BUDGET * sqrt(d))")
    p.add_argument("--robustness-samplers", type=_name_list, default=None, metavar="SAMPLERS",
                   help="comma-separated samplers whose cells --robustness scores (default: all)")
    p.add_argument("--inception", default=None, metavar="PATH", help="local TorchScript FID Inception: adds 'fid'")
    p.add_argument("--feature-cache", default=None, help="folder of the cached feature network")
    p.add_argument("--ema", type=float, default=None, help="EMA rate to use (default: the run's first)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    p.set_defaults(run=evaluate)

    p = sub.add_parser("compare", help=compare.__doc__, description=compare.__doc__)
    p.add_argument("baseline", help="folder or quoted glob pattern: the baseline's evaluations, one results.json "
                   "per seed (e.g. 'runs/reproduce-cm-full/toy/seed*/ct'); LABEL=PATTERN names a set in the "
                   "tables and plots (e.g. 'CT=runs/reproduce-cm-full/toy/seed*/ct')")
    p.add_argument("runs", nargs="+", help="folders or quoted glob patterns of the runs to compare with it (or "
                   "LABEL=PATTERN)")
    p.add_argument("--metrics", type=_name_list, default=None,
                   help="comma-separated metric columns (default: the primary metric, swd or fd, and its scores "
                   "under perturbed inputs where evaluated)")
    p.add_argument("--out", default=None, help="also write compare.md, compare.csv and a plot per metric to this "
                   "folder")
    p.set_defaults(run=compare)

    p = sub.add_parser("reproduce", help=reproduce.__doc__, description=reproduce.__doc__)
    p.add_argument("--protocol", default="dpm", choices=["dpm", "cm"],
                   help="'dpm': diffusion fine-tunes (standard, DDPM-IP, free AT, PGD AT, free AT's replays alone) and "
                   "the four diffusion samplers; 'cm': consistency distillation and training without and with free AT")
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "full"])
    p.add_argument("--data", default="both", choices=["toy", "digits", "both"])
    p.add_argument("--out", default=None, help="run folder (default runs/reproduce-<preset>, for 'cm' "
                   "runs/reproduce-cm-<preset>); rerun to resume")
    p.add_argument("--nfes", type=_int_list, default=None, help="comma-separated NFEs (default: the preset's)")
    p.add_argument("--robustness", type=float, default=None, metavar="BUDGET",
                   help="also score and compare under adversarially perturbed network inputs of this RMS budget "
                   "per element (default: the protocol's, cm 0.05; dpm none, with a budget: the DDIM cells)")
    p.set_defaults(run=reproduce)

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in sub.choices), None)
    if command is not None:
        argv = _respelled(argv, sub.choices[command])
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.run(args)
    except KeyboardInterrupt as e:   # the trainer saved first; the exit code is the shell's 128 + signal
        name = e.args[0] if e.args and e.args[0] in signal.Signals.__members__ else "SIGINT"
        raise SystemExit(128 + signal.Signals[name].value) from None
    except (ValueError, TypeError, KeyError, OSError) as e:
        if os.environ.get("ADV_DPM_TRACEBACK") == "1":
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SystemExit(f"adv-dpm {args.command}: error: {message}\n(ADV_DPM_TRACEBACK=1 shows where)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
