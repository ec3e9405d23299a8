"""Evaluate a checkpoint's EMA model over a grid of samplers x NFE (PAPER.md's evaluation grid).

``evaluate(checkpoint, samplers=..., nfes=..., num_samples=..., seed=..., out_dir=...)`` draws
``num_samples`` samples for every (sampler, NFE) cell from the same initial noise and scores
them: ``toy_metrics`` on 2-D data, ``image_metrics`` in the feature space of a small classifier
trained on the data set (``feature_extractor``; its held-out accuracy is reported) on images,
optionally Inception FID, the exposure-bias ratio and the quality under perturbed model inputs.
It returns one dict per cell and, with ``out_dir``, writes results.csv / .md / .json and one
``<metric>_vs_nfe.png`` per metric, each file atomically. A consistency model (objective 'cd'
or 'ct') is scored with multistep consistency sampling ('consistency', NFE 1, 2, 4 by default).
"""
import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import consistency, metrics
from .diffusion import Schedule, sample
from .models import build_model
from .utils import atomic_write, read_checkpoint, resolve_device

SAMPLERS = ("ddpm", "ddpm-es", "ddim", "dpm_solver++")
PAPER_NFES = (5, 8, 10, 20, 50)
CM_SAMPLERS = ("consistency",)
CM_NFES = (1, 2, 4)
ES_LAMBDA = 1.017          # the paper's CIFAR-10 epsilon scaling
PRIMARY = {"toy": "swd", "image": "fd"}   # the headline metric of each kind of data (lower is better)


def data_kind(data_spec):
    """'toy' (2-D points, 'toy:<name>') or 'image': which metrics score samples of ``data_spec``."""
    return "toy" if data_spec.startswith("toy:") else "image"


# ---------------------------------------------------------------------------------------------
# Files, tables and plots (also used by adv_dpm.reproduce)
# ---------------------------------------------------------------------------------------------

def write_json(path, obj):
    return atomic_write(path, json.dumps(obj, indent=1) + "\n")


def read_json(path):
    """The JSON of ``path``; a file that does not parse (cut off, edited) is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def write_csv(path, rows, columns):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buf.getvalue())


def fmt(value):
    """A table cell: floats to 4 significant digits."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_vs_nfe(panels, path, ylabel, title="", reference=None):
    """One subplot per panel, one line per label: ``panels`` = {panel: {label: [(nfe, mean, lo,
    hi), ...]}} (lo / hi may be None: no band), and a horizontal line at ``reference`` if given.
    Log-scaled NFE axis; PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 2.4, 3.2), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            points = sorted(points)
            nfe = [p[0] for p in points]
            line, = ax.plot(nfe, [p[1] for p in points], marker="o", markersize=3, label=label)
            if all(p[2] is not None and not math.isnan(p[2]) for p in points):
                ax.fill_between(nfe, [p[2] for p in points], [p[3] for p in points], color=line.get_color(), alpha=0.2)
        if reference is not None:
            ax.axhline(reference, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(sorted({p[0] for pts in lines.values() for p in pts}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(xlabel="NFE", title=panel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))   # beside the lines, not on them
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Checkpoints and the grid
# ---------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    model: torch.nn.Module     # holding the EMA weights, eval mode
    schedule: Schedule
    config: dict               # the TrainConfig of the run, as a dict
    learn_sigma: bool
    step: int

    @property
    def objective(self):
        """'diffusion', or for a consistency model 'cd' or 'ct' (runs from before objectives: 'diffusion')."""
        return self.config.get("objective", "diffusion")

    @property
    def consistency(self):
        """Whether the checkpoint holds a consistency model (objective 'cd' or 'ct')."""
        return self.objective != "diffusion"

    def sample(self, shape, method, steps, model_fn=None, **kw):
        """Samples of the model (or of ``model_fn``, a wrapper of it): ``diffusion.sample`` with
        ``method``, or (a consistency model) multistep consistency sampling."""
        model_fn = self.model if model_fn is None else model_fn
        if self.consistency:
            return consistency.sample(model_fn, self.schedule, shape, steps, scales=self.config["scales"],
                                      learn_sigma=self.learn_sigma, **kw)
        return sample(model_fn, self.schedule, shape, method, steps, learn_sigma=self.learn_sigma, **kw)

    def robustness(self, shape, method, steps, *, budget, kind, seed, **kw):
        """Samples with every model input perturbed within ``budget`` (``metrics.robustness``; the
        sampler's own state stays unperturbed), of a diffusion or a consistency model."""
        perturbed = metrics.perturbed_model_fn(self.model, budget, kind, learn_sigma=self.learn_sigma, seed=seed)
        return self.sample(shape, method, steps, perturbed, **kw)


def load_checkpoint(path, ema=None, device="cpu"):
    """The EMA model (rate ``ema``, default the run's first) of a trainer checkpoint, in the run's
    memory format (channels_last if it trained so)."""
    path = Path(path)
    device = resolve_device(device)
    state = read_checkpoint(path, device)
    if state["model_config"].get("num_classes"):
        raise ValueError(f"checkpoint: {path} holds a class-conditional model; sampling here is unconditional")
    rate = str(state["config"]["ema_rate"]).split(",")[0].strip() if ema is None else str(ema)
    rates = {float(r): params for r, params in state["ema"].items()}
    if float(rate) not in rates:
        raise ValueError(f"ema: checkpoint {path} has EMA rates {sorted(rates)}, not {rate}")
    config = state["config"]
    model = build_model(state["model_config"]).to(device)
    if config.get("channels_last"):  # the run's layout (a 2-D model has no 4-D weight to change)
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p, e in zip(model.parameters(), rates[float(rate)]):
            p.copy_(e)
    schedule = Schedule.named(config["noise_schedule"], config["diffusion_steps"])
    return Loaded(model.eval(), schedule, config, bool(state["model_config"].get("learn_sigma", False)),
                  int(state["step"]))


def sampler_method(sampler, es_lambda=ES_LAMBDA, consistency_model=False):
    """(method, keyword arguments of ``Loaded.sample``) of a grid sampler name."""
    methods = {"consistency": ("consistency", {})} if consistency_model else {
        "ddpm": ("ddpm", {}), "ddpm-es": ("ddpm", {"es_lambda": es_lambda}), "ddim": ("ddim", {"eta": 0.0}),
        "dpm_solver++": ("dpm_solver++", {})}
    if sampler not in methods:
        kind = "a consistency model" if consistency_model else "a diffusion model"
        raise ValueError(f"samplers: {sampler!r} does not sample {kind}; expected some of {tuple(methods)}")
    return methods[sampler]


def check_grid(samplers, nfes, num_samples, consistency_model=False):
    """Validate the grid arguments (a single sampler or NFE is allowed); errors name the argument."""
    samplers = [samplers] if isinstance(samplers, str) else list(samplers)
    nfes = [nfes] if isinstance(nfes, int) else list(nfes)
    if not samplers:
        raise ValueError("samplers: expected at least one of " + ", ".join(SAMPLERS))
    for s in samplers:
        sampler_method(s, consistency_model=consistency_model)
    if not nfes:
        raise ValueError("nfes: expected at least one NFE")
    for n in nfes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"nfes: every NFE must be an integer >= 1, got {n!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 4:
        raise ValueError(f"num_samples: expected an integer >= 4, got {num_samples!r}")
    return samplers, nfes


def _draw(fn, shape, method, nfe, x_T, noise_seed, batch_size, trajectory=False, **kw):
    """Samples of ``fn(shape, method, nfe, **kw)`` from x_T in batches (the sampler's own noise
    seeded by ``noise_seed``); with ``trajectory`` also the model inputs [(x_t, t)] concatenated
    over batches."""
    g = torch.Generator(device=x_T.device).manual_seed(noise_seed)
    outs, steps = [], []
    for chunk in x_T.split(batch_size):
        out = fn((len(chunk), *shape[1:]), method, nfe, generator=g, device=x_T.device, x_T=chunk,
                 return_trajectory=trajectory, **kw)
        if trajectory:
            out, path = out
            steps.append(path)
        outs.append(out)
    x = torch.cat(outs)
    if not trajectory:
        return x
    return x, [(torch.cat([p[i][0] for p in steps]), steps[0][i][1]) for i in range(len(steps[0]))]


class _Scorer:
    """The metrics of one data set: toy_metrics, or image_metrics (+ optional Inception FD)."""

    def __init__(self, data_spec, feature_cache, inception, batch_size, device, progress):
        self.data = data_spec
        self.kind = data_kind(data_spec)
        self.extra = {}
        if self.kind == "image":
            self.net, accuracy = metrics.feature_extractor(data_spec, cache_dir=feature_cache, progress=progress,
                                                           device=device)
            self.real = metrics.train_and_held_out(data_spec)[1].x   # the held-out images the accuracy is measured on
            self.extra = {"feature_acc": accuracy, "num_real": len(self.real)}
        self.inception, self.batch_size = inception, batch_size
        if inception:
            self.real_inception = metrics.inception_features(self.real, inception, device=device)

    @property
    def primary(self):
        return PRIMARY[self.kind]

    def __call__(self, x, primary_only=False):
        x = x.float().cpu()
        if self.kind == "toy":
            scores = metrics.toy_metrics(x, self.data)
        else:
            scores = metrics.image_metrics(x, self.real, self.net, batch_size=self.batch_size)
            scores.pop("class_hist")
        if primary_only:
            return scores[self.primary]
        if self.inception:
            scores["fid"] = metrics.frechet_distance(metrics.inception_features(x, self.inception),
                                                     self.real_inception)
        return scores


def evaluate(checkpoint, samplers=None, nfes=None, num_samples=1000, seed=0, out_dir=None, *,
             es_lambda=ES_LAMBDA, exposure=False, robustness_budget=None, robustness_samplers=None, inception=None,
             feature_cache=None,
             ema=None, batch_size=1000, device="cpu", progress=True, plots=True):
    """Score the EMA model of ``checkpoint`` on every (sampler, NFE) cell; returns one dict per
    cell (checkpoint, mode, step, data, sampler, nfe, num_samples, seed, the metrics, seconds).

    samplers: some of 'ddpm', 'ddpm-es' (ddpm with eps / ``es_lambda``), 'ddim' (eta 0),
    'dpm_solver++' (default: all, at the paper's NFEs); for a consistency model 'consistency'
    (default NFEs 1, 2, 4). Every cell starts from the same x_T (drawn from ``seed``) and, for ddpm,
    the same ancestral noise stream: differences between cells are not sampling noise.
    ``exposure`` adds 'exposure_ratio' (mean over the steps of ``metrics.exposure_bias``'s
    ratio); ``robustness_budget`` adds the primary metric (swd on 2-D data, fd on images) under
    'random' and 'adversarial' input perturbations of that budget (``metrics.robustness``) in the
    cells of ``robustness_samplers`` (default: every sampler; the perturbed sampling costs about six
    times the clean one);
    ``inception`` (path of a local TorchScript FID Inception) adds 'fid'; ``feature_cache`` is
    the folder of the cached feature network. With ``out_dir``: results.csv/.md/.json and, with
    ``plots``, one PNG per metric.
    """
    device = resolve_device(device)
    loaded = load_checkpoint(checkpoint, ema, device)
    if samplers is None:
        samplers = CM_SAMPLERS if loaded.consistency else SAMPLERS
    if nfes is None:
        nfes = CM_NFES if loaded.consistency else PAPER_NFES
    samplers, nfes = check_grid(samplers, nfes, num_samples, loaded.consistency)
    if robustness_budget is not None and not (robustness_budget >= 0 and math.isfinite(robustness_budget)):
        raise ValueError(f"robustness_budget: expected a finite number >= 0, got {robustness_budget!r}")
    robustness_samplers = [] if robustness_budget is None else list(robustness_samplers or samplers)
    if not set(robustness_samplers) <= set(samplers):
        raise ValueError(f"robustness_samplers: expected some of the samplers {samplers}, got {robustness_samplers!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if max(nfes) > loaded.schedule.num_timesteps:
        raise ValueError(f"nfes: {max(nfes)} exceeds the checkpoint's {loaded.schedule.num_timesteps} diffusion steps")
    spec = loaded.config["data"]
    scorer = _Scorer(spec, feature_cache, inception, batch_size, device, progress)
    shape = (num_samples, *sample_shape(loaded))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    mode = consistency.run_label(loaded.objective, loaded.config["mode"])
    base = {"checkpoint": str(checkpoint), "mode": mode, "step": loaded.step, "data": spec}
    rows = []
    cells = [(s, n) for s in samplers for n in nfes]
    for sampler, nfe in tqdm(cells, desc="evaluate", unit="cell", disable=not progress):
        method, kw = sampler_method(sampler, es_lambda, loaded.consistency)
        start = time.perf_counter()
        drawn = _draw(loaded.sample, shape, method, nfe, x_T, seed + 1, batch_size, trajectory=exposure, **kw)
        x, trajectory = drawn if exposure else (drawn, None)
        row = {**base, "sampler": sampler, "nfe": nfe, "num_samples": num_samples, "seed": seed, **scorer(x)}
        if exposure:
            ratios = [s["ratio"] for s in metrics.exposure_bias(trajectory, x, loaded.schedule)]
            row["exposure_ratio"] = sum(ratios) / len(ratios)
        if sampler in robustness_samplers:
            for kind in ("random", "adversarial"):
                xr = _draw(loaded.robustness, shape, method, nfe, x_T, seed + 1, batch_size,
                           budget=robustness_budget, kind=kind, seed=seed + 2, **kw)
                row[f"{scorer.primary}_{kind}"] = scorer(xr, primary_only=True)
        row.update(scorer.extra)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    if out_dir is not None:
        settings = {"checkpoint": str(checkpoint), "samplers": samplers, "nfes": nfes, "num_samples": num_samples,
                    "seed": seed, "es_lambda": es_lambda, "exposure": exposure,
                    "robustness_budget": robustness_budget, "robustness_samplers": robustness_samplers,
                    "inception": str(inception) if inception else None, "ema": ema}
        write_results(out_dir, rows, settings, plots)
    return rows


def sample_shape(loaded):
    """The shape of one sample of a loaded checkpoint's model."""
    c = loaded.model.config
    if c["arch"] == "mlp":
        return (c["dim"],)
    return (c["in_channels"], c["image_size"], c["image_size"])


def metric_columns(rows):
    """The metric columns present in ``rows``, in table order."""
    fixed = {"checkpoint", "mode", "step", "data", "sampler", "nfe", "num_samples", "seed", "seconds", "feature_acc",
             "num_real", "modes_total"}
    seen = []
    for r in rows:
        seen += [k for k in r if k not in fixed and k not in seen and isinstance(r[k], (int, float))]
    return seen


def write_results(out_dir, rows, settings, plots=True):
    """results.csv, results.md, results.json and (``plots``) <metric>_vs_nfe.png under ``out_dir``."""
    out = Path(out_dir)
    columns = ["mode", "step", "data", "sampler", "nfe", "num_samples", "seed", *metric_columns(rows)]
    columns += [c for c in ("modes_total", "feature_acc", "num_real") if c in rows[0]] + ["seconds", "checkpoint"]
    write_csv(out / "results.csv", rows, columns)
    write_json(out / "results.json", {"settings": settings, "rows": rows})
    r0 = rows[0]
    lines = [f"# Evaluation of {settings['checkpoint']}\n",
             f"{r0['mode']} model, step {r0['step']}, data {r0['data']}; {settings['num_samples']} samples per cell, "
             f"seed {settings['seed']}, ES lambda {settings['es_lambda']}.\n"]
    if "feature_acc" in r0:
        lines.append(f"Image metrics in the feature space of a classifier trained on {r0['data']} "
                     f"(held-out accuracy {r0['feature_acc']:.3f}), against {r0['num_real']} held-out images.\n")
    table_cols = ["sampler", "nfe", *metric_columns(rows), "seconds"]
    lines.append(markdown_table(rows, table_cols))
    for metric in metric_columns(rows) if plots else []:
        lines.append(f"![{metric}]({metric}_vs_nfe.png)\n")
        lines_by_sampler = {}
        for r in rows:
            if metric in r:
                lines_by_sampler.setdefault(r["sampler"], []).append((r["nfe"], float(r[metric]), None, None))
        plot_vs_nfe({f"{r0['mode']} ({r0['data']})": lines_by_sampler}, out / f"{metric}_vs_nfe.png", metric)
    atomic_write(out / "results.md", "\n".join(lines))
