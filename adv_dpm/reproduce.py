"""The paper's protocols at laptop scale, in one resumable command (``adv-dpm reproduce``).

For each data set (2-D 'rings' with the MLP, the bundled 8x8 digits with the small UNet):
  (a) pretrain a standard diffusion model (once; as the paper fine-tunes one standard checkpoint);
  (b) for each seed, fine-tune it for the same number of optimizer updates in each of the protocol's
      ways. Protocol 'dpm' (ADM-AT): standard, DDPM-IP (gamma 0.1), free AT and PGD AT (PAPER.md
      defaults: K = 3, adv_lr 0.1, adv_max_norm 0.1, target delta_detach; free AT takes K updates per
      batch, so it sees 1/K as many batches; PGD AT one update per K passes) and, as the control,
      free AT's replays without the perturbation (adv_lr 0), each from the weights (``init_from``,
      fresh optimizer). Protocol 'cm' (CM-AT): consistency distillation of the pretrained model
      (the student starts as its teacher) without AT, with free AT and the 'invariant' target and
      with the 'consistent' target, and consistency training from its weights in the same three
      ways;
  (c) evaluate each fine-tuned EMA model over the protocol's samplers and NFEs (``adv_dpm.evaluate``;
      'dpm': DDPM, DDPM-ES, DDIM and DPM-Solver++ at the paper's NFEs; 'cm': multistep consistency
      sampling at NFE 1, 2, 4), from the same initial noise for every method;
  (d) aggregate over seeds (mean, 95% t interval) and compare each AT method with its baselines by a
      paired t test over seeds (the fine-tunes of a seed share the pretrained weights, the batch
      order, the noise draws and the evaluation noise).

Everything lands in the output folder: report.md, results.csv (one row per seed and cell),
summary.csv (means and intervals), comparisons.csv, results.json, plots/*.png. Every training
and evaluation writes its result atomically and is skipped when the command is run again, so
a killed run resumes where it stopped (a training resumes from its own checkpoint).
"""
import dataclasses
import json
import math
import os
import platform
import shlex
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .evaluate import (CM_NFES, CM_SAMPLERS, PAPER_NFES, PRIMARY, SAMPLERS, data_kind, evaluate, fmt,
                       markdown_table, metric_columns, plot_vs_nfe, read_json, write_csv, write_json)
from .train import TrainConfig, train
from .utils import atomic_write, cpu_name


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a protocol fine-tunes from each data set's pretrained model, how it samples the results,
    which pairs it compares and at which budgets."""
    question: str      # the report's headline
    methods: dict      # name -> (label, TrainConfig settings): the fine-tunes of every seed
    comparisons: tuple  # (AT method, baseline method, baseline label, {sampler: baseline's sampler} or None: same)
    samplers: tuple    # the first is the one of the headline statements
    presets: dict      # name -> seeds, nfes and per data set the budgets (TrainConfig settings of the
                       # pretraining and, under 'finetune', of the fine-tunes where they differ)
    text: str          # the report's protocol section
    robustness: float = None   # also score and compare under adversarially perturbed network inputs of this
                               # budget (``evaluate``'s robustness_budget; ``reproduce(robustness=...)`` overrides)
    robustness_samplers: tuple = None   # ... in the cells of these samplers (None: all)


AT = dict(adv_steps=3, adv_lr=0.1, adv_max_norm=0.1)   # PAPER.md's defaults
DATA = {   # the model and optimizer of each data set; presets set the budgets
    "toy": dict(data="toy:rings", model="toy2d", model_overrides={"hidden": 128, "depth": 3}, lr=1e-3),
    "digits": dict(data="digits", model="digits-tiny", lr=1e-3),
}
PRETRAIN_SEED = 0   # one pretrained model per data set; the seeds vary the fine-tuning and the evaluation
COMMON = dict(diffusion_steps=1000, noise_schedule="cosine", log_interval=25, num_samples=64, sample_method="ddim",
              sample_steps=20)

DPM = Protocol(
    question="Does free AT beat standard training?",
    methods={
        "standard": ("standard", dict(mode="standard")),
        "ip": ("DDPM-IP", dict(mode="ip", ip_gamma=0.1)),
        "free_at": ("free AT", dict(mode="free_at", **AT, adv_target="delta_detach")),
        "pgd_at": ("PGD AT", dict(mode="pgd_at", **AT, adv_target="delta_detach")),
        # the control: free AT's K updates per batch without the perturbation (a third as many fresh batches)
        "replays": ("replays only", dict(AT, mode="free_at", adv_lr=0.0, adv_target="delta_detach")),
    },
    comparisons=(("free_at", "standard", "standard", None), ("free_at", "ip", "DDPM-IP", None),
                 ("free_at", "standard", "standard + ES", {"ddpm": "ddpm-es"}), ("free_at", "pgd_at", "PGD AT", None),
                 ("free_at", "replays", "replays only", None)),
    samplers=SAMPLERS,
    robustness_samplers=("ddim",),   # perturbed sampling costs about six times the clean one
    # Budgets sized from speeds measured on a 2-core CPU (2 torch threads): digits-tiny at batch 64 takes 53 / 58 /
    # 153 ms per update (standard / free AT / PGD AT), the toy MLP at batch 256 9 / 9 / 17 ms; one grid evaluation
    # (4 samplers x 93 NFE) 15-18 s for 256 digits, 5-6 s for 2000 toy points. Measured end to end: smoke about
    # 30 s, quick 13.3 min (limit 20); full about 45 min estimated from the quick run's jobs (limit 75). With the
    # replay control and --robustness 0.05, quick took 13.0 min on a 2-core AMD EPYC, full's jobs 90 min.
    presets={
        "smoke": dict(seeds=[0], nfes=[5, 10],
                      toy=dict(batch_size=64, pretrain_steps=60, finetune_steps=30, ema_rate="0.9", eval_samples=256),
                      digits=dict(batch_size=32, pretrain_steps=30, finetune_steps=15, ema_rate="0.9",
                                  eval_samples=64)),
        "quick": dict(seeds=[0, 1, 2], nfes=list(PAPER_NFES),
                      toy=dict(batch_size=256, pretrain_steps=3000, finetune_steps=600, ema_rate="0.99",
                               eval_samples=2000),
                      digits=dict(batch_size=64, pretrain_steps=1500, finetune_steps=240, ema_rate="0.98",
                                  eval_samples=256)),
        "full": dict(seeds=[0, 1, 2, 3, 4], nfes=list(PAPER_NFES),
                     toy=dict(batch_size=256, pretrain_steps=6000, finetune_steps=1500, ema_rate="0.995",
                              eval_samples=4000),
                     digits=dict(batch_size=64, pretrain_steps=4000, finetune_steps=600, ema_rate="0.99",
                                 eval_samples=500)),
    },
    text="""## Protocol

Per data set: pretrain one standard model (seed {pretrain_seed}); then, for each seed, fine-tune it (weights
only, fresh AdamW) for the same number of optimizer updates as standard, DDPM-IP (gamma 0.1), free AT
and PGD AT (K = 3, adv_lr 0.1, adv_max_norm 0.1, target delta_detach; free AT makes K updates per
batch, PGD AT one per K passes), and as free AT's replays alone (adv_lr 0: K updates per batch on
the clean input), the control that tells the perturbation's effect from that of seeing a third as
many batches. Each fine-tuned EMA model is sampled with DDPM, DDPM-ES (lambda 1.017), DDIM (eta 0)
and DPM-Solver++(2M) from the same initial noise.
""")


def _cm(objective, mode="standard", target="invariant"):
    at = dict(**AT, adv_cm_target=target) if mode != "standard" else {}
    return dict(objective=objective, mode=mode, sample_steps=2, **at)


CM = Protocol(
    question="Does free AT help consistency distillation and consistency training?",
    methods={
        "cd": ("CD", _cm("cd")),
        "cd_free_at": ("CD + free AT", _cm("cd", "free_at")),
        "cd_free_at_consistent": ("CD + free AT (consistent)", _cm("cd", "free_at", "consistent")),
        "ct": ("CT", _cm("ct")),
        "ct_free_at": ("CT + free AT", _cm("ct", "free_at")),
        "ct_free_at_consistent": ("CT + free AT (consistent)", _cm("ct", "free_at", "consistent")),
    },
    comparisons=(("cd_free_at", "cd", "CD", None), ("cd_free_at_consistent", "cd", "CD", None),
                 ("ct_free_at", "ct", "CT", None), ("ct_free_at_consistent", "ct", "CT", None)),
    samplers=CM_SAMPLERS,
    # Sized on a 2-core CPU: CD of digits-tiny at batch 64 takes about 90 ms per update (with or without free AT),
    # of the toy MLP at batch 256 about 12 ms. Measured in three invocations that resumed one another: five
    # methods without the perturbed-input scoring, quick 13.9 min and full 54.6 min; that scoring of the full
    # preset's 50 models, 5.1 min; the sixth method, full 10.8 min; on quick, the sixth method and the scoring
    # of all 36 models, 3.5 min. The full preset's digits settings are those of docs/RESULTS.md's consistency
    # distillation experiment.
    presets={
        "smoke": dict(seeds=[0], nfes=[1, 2],
                      toy=dict(batch_size=64, pretrain_steps=60, finetune_steps=30, ema_rate="0.9", eval_samples=256,
                               finetune=dict(lr=1e-4)),
                      digits=dict(batch_size=32, pretrain_steps=30, finetune_steps=15, ema_rate="0.9",
                                  eval_samples=64, finetune=dict(lr=1e-4))),
        "quick": dict(seeds=[0, 1, 2], nfes=list(CM_NFES),
                      toy=dict(batch_size=256, pretrain_steps=3000, finetune_steps=600, ema_rate="0.99",
                               eval_samples=2000, finetune=dict(lr=1e-4)),
                      digits=dict(batch_size=64, pretrain_steps=1500, finetune_steps=600, ema_rate="0.995",
                                  eval_samples=500, finetune=dict(lr=1e-4))),
        "full": dict(seeds=[0, 1, 2, 3, 4], nfes=list(CM_NFES),
                     toy=dict(batch_size=256, pretrain_steps=6000, finetune_steps=1500, ema_rate="0.995",
                              eval_samples=4000, finetune=dict(lr=1e-4)),
                     digits=dict(batch_size=64, pretrain_steps=3000, finetune_steps=1500, ema_rate="0.999",
                                 eval_samples=500, finetune=dict(lr=1e-4))),
    },
    text="""## Protocol

Per data set: pretrain one standard diffusion model (seed {pretrain_seed}), the teacher; then, for each
seed, train for the same number of optimizer updates (fresh AdamW): consistency distillation (CD) of
the teacher's EMA model, the student starting as its teacher, without AT, with free AT and the
'invariant' target (the clean trajectory's), and with free AT and the 'consistent' target (the
teacher's step from the perturbed input); consistency training (CT) from the teacher's weights in
the same three ways (CT's 'consistent' step: the noise the perturbed input implies, eps + delta /
sqrt(1 - abar_t)). Free AT: K = 3, adv_lr 0.1, adv_max_norm 0.1, K updates per batch. All use the
defaults of `adv_dpm.consistency`: 50 grid intervals, DDIM teacher step, pseudo-Huber distance,
target EMA 0.95. Each EMA model is sampled by multistep consistency sampling from the same initial
noise, and again with every network input moved adversarially within an RMS of {robustness} per
element (`adv-dpm evaluate --robustness`).
""",
    robustness=0.05)
PROTOCOLS = {"dpm": DPM, "cm": CM}
SHARED_TEXT = """Primary metrics (lower is better): on 2-D data the sliced Wasserstein distance to fresh true
samples (swd); on images the Frechet distance (fd) to the held-out images in the feature space of a
classifier trained on the data set.

Seeds: {seeds}. NFEs: {nfes}. Intervals: mean ± half-width of the 95% t interval over seeds.
**Comparisons are paired over seeds**: the fine-tunes of a seed share the pretrained weights,
batch order, noise draws and evaluation noise, so each seed gives one difference AT method − baseline;
reported are its mean, its 95% t interval, the relative change and the paired t test's p value.
*Beyond the seed spread* means that the interval excludes 0.
"""


def plan(preset, data="both", nfes=None, protocol="dpm", robustness=None):
    """The resolved settings of a run: protocol, seeds, NFEs, samplers, the robustness budget (``robustness``,
    else the protocol's) and its samplers, and per data set the budgets."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    presets = PROTOCOLS[protocol].presets
    if preset not in presets:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(presets)}")
    names = {"both": list(DATA), "toy": ["toy"], "digits": ["digits"]}
    if data not in names:
        raise ValueError(f"data: expected 'toy', 'digits' or 'both', got {data!r}")
    p = presets[preset]
    nfes = list(p["nfes"] if nfes is None else nfes)
    if not nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nfes):
        raise ValueError(f"nfes: every NFE must be an integer >= 1, got {nfes!r}")
    proto = PROTOCOLS[protocol]
    robustness = proto.robustness if robustness is None else robustness
    if robustness is not None and not (isinstance(robustness, (int, float)) and 0 < robustness < math.inf):
        raise ValueError(f"robustness: expected a finite budget > 0, got {robustness!r}")
    robust = [] if robustness is None else list(proto.robustness_samplers or proto.samplers)
    return {"protocol": protocol, "preset": preset, "seeds": p["seeds"], "nfes": nfes,
            "samplers": list(proto.samplers), "robustness": robustness, "robustness_samplers": robust,
            "data": {name: {**DATA[name], **p[name]} for name in names[data]}}


def _train_config(settings, run_dir, seed, **overrides):
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in settings.items() if k in keys}
    return TrainConfig(**{**COMMON, **fields, "run_dir": str(run_dir), "seed": seed, **overrides})


def _cached(path):
    """A job's record ``path``, or None where there is none or it does not parse (the job runs again)."""
    try:
        return read_json(path) if Path(path).exists() else None
    except ValueError:
        return None


def _train_job(config, log):
    """Train ``config`` unless its run directory says it is done; returns (seconds, ran)."""
    run_dir = Path(config.run_dir)
    done = run_dir / "done.json"
    if (run_dir / "config.json").exists():
        as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))   # noqa: E731 (tuples become lists)
        # a setting added to TrainConfig after the run was written, at its default, is not a change
        before = {**as_json(TrainConfig()), **read_json(run_dir / "config.json")}
        wanted = as_json(config)
        # the paths are the out folder's own: they differ only when it was moved
        changed = sorted(k for k in wanted if k not in ("run_dir", "init_from", "teacher") and before[k] != wanted[k])
        if changed:
            raise ValueError(f"out: {run_dir} holds a run with other settings ({', '.join(changed)}); "
                             f"use another --out folder")
    if (finished := _cached(done)) is not None and (run_dir / "checkpoint.pt").exists():
        return finished["seconds"], False
    log(f"train {run_dir} ({config.mode}, {config.total_steps} updates)")
    start = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - start
    write_json(done, {"seconds": seconds, "step": config.total_steps})
    return seconds, True


def _eval_job(checkpoint, out_dir, settings, p, seed, log):
    """Evaluate unless ``out_dir`` holds results of the same grid; returns (rows, seconds, ran)."""
    path = Path(out_dir) / "results.json"
    if (stored := _cached(path)) is not None:
        s = stored["settings"]
        # results from before robustness_samplers existed scored every sampler under a budget
        robust = s.get("robustness_samplers", s["samplers"] if s.get("robustness_budget") is not None else [])
        grid = (s["samplers"], s["nfes"], s["num_samples"], s["seed"], s.get("robustness_budget"), robust)
        if grid == (p["samplers"], p["nfes"], settings["eval_samples"], seed, p["robustness"],
                    p["robustness_samplers"]):
            return stored["rows"], sum(r["seconds"] for r in stored["rows"]), False
    log(f"evaluate {checkpoint}")
    rows = evaluate(checkpoint, samplers=p["samplers"], nfes=p["nfes"], num_samples=settings["eval_samples"], seed=seed,
                    out_dir=out_dir, exposure=True, robustness_budget=p["robustness"],
                    robustness_samplers=p["robustness_samplers"], progress=False, plots=False)
    return rows, sum(r["seconds"] for r in rows), True


def default_out(protocol, preset):
    """runs/reproduce-<preset> for the DPM protocol, runs/reproduce-<protocol>-<preset> for the others."""
    return Path("runs") / (f"reproduce-{preset}" if protocol == "dpm" else f"reproduce-{protocol}-{preset}")


def reproduce(preset="quick", data="both", out=None, nfes=None, command=None, progress=True, protocol="dpm",
              robustness=None):
    """Run (or resume) a protocol ('dpm' or 'cm'); returns {'out', 'report', 'trained', 'evaluated',
    'skipped'} (the run and evaluation folders of each kind of outcome in this call). ``robustness``:
    the budget of the perturbed-input scoring (default: the protocol's)."""
    p = plan(preset, data, nfes, protocol, robustness)
    methods = PROTOCOLS[protocol].methods
    out = Path(out or default_out(protocol, preset))
    flags = ["--protocol", protocol, "--preset", preset, "--data", data, "--out", str(out)]
    flags += ["--nfes", ",".join(map(str, nfes))] if nfes else []
    flags += ["--robustness", str(robustness)] if robustness is not None else []
    command = command or "adv-dpm reproduce " + shlex.join(flags)
    start = time.perf_counter()
    total = len(p["data"]) * (1 + 2 * len(methods) * len(p["seeds"]))
    bar = tqdm(total=total, desc=f"reproduce {protocol} {preset}", unit="job", disable=not progress)
    log = (lambda m: bar.write(f"[{bar.n + 1}/{total}] {m}")) if progress else (lambda m: None)
    done = {"trained": [], "evaluated": [], "skipped": []}
    timings = {"pretrain": 0.0, **{f"fine-tune {m}": 0.0 for m in methods}, "feature net": 0.0, "evaluation": 0.0}
    features, rows = {}, []
    for name, settings in p["data"].items():
        steps = settings["pretrain_steps"]
        pre = _train_config(settings, out / name / "pretrain", PRETRAIN_SEED, mode="standard", total_steps=steps,
                            save_interval=max(1, steps // 4))
        seconds, ran = _train_job(pre, log)
        timings["pretrain"] += seconds
        done["trained" if ran else "skipped"].append(pre.run_dir)
        bar.update()
        if data_kind(settings["data"]) == "image":
            features[name] = _feature_net(settings["data"], out, progress)
            timings["feature net"] += features[name]["seconds"]
        pretrained = str(Path(pre.run_dir) / "checkpoint.pt")
        for seed in p["seeds"]:
            for method, (_, overrides) in methods.items():
                run_dir = out / name / f"seed{seed}" / method
                # a distillation starts as its teacher; every other fine-tune from the pretrained weights
                begin = (dict(teacher=pretrained) if overrides.get("objective") == "cd" else
                         dict(init_from=pretrained, init_ema="weights"))
                cfg = _train_config(settings, run_dir, seed, **settings.get("finetune", {}), **overrides, **begin,
                                    total_steps=settings["finetune_steps"],
                                    save_interval=max(1, settings["finetune_steps"] // 3))
                seconds, ran = _train_job(cfg, log)
                timings[f"fine-tune {method}"] += seconds
                done["trained" if ran else "skipped"].append(cfg.run_dir)
                bar.update()
                result, seconds, ran = _eval_job(run_dir / "checkpoint.pt", run_dir / "eval", settings, p, seed, log)
                timings["evaluation"] += seconds
                done["evaluated" if ran else "skipped"].append(str(run_dir / "eval"))
                rows += [{"dataset": name, "method": method, **r} for r in result]
                bar.update()
    bar.close()
    summary, comparisons = aggregate(rows, p)
    wall = {"this invocation": time.perf_counter() - start}
    path = write_report(out, p, rows, summary, comparisons, features, timings, wall, command)
    return {"out": out, "report": path, **done}


def _feature_net(spec, out, progress):
    """Train (or load from its cache, $ADV_DPM_CACHE or ~/.cache/adv_dpm) the feature network of an
    image data set; its held-out accuracy and what it cost."""
    path = out / "features" / f"{spec.replace(':', '_')}.json"
    if (info := _cached(path)) is not None:
        return info
    start = time.perf_counter()
    _, accuracy = metrics.feature_extractor(spec, progress=progress)
    info = {"data": spec, "accuracy": accuracy, "seconds": time.perf_counter() - start}
    write_json(path, info)
    return info


# ---------------------------------------------------------------------------------------------
# Statistics over seeds
# ---------------------------------------------------------------------------------------------

def mean_ci(values, level=0.95):
    """(mean, low, high): the t interval of the mean over seeds (nan bounds with one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sem = float(stats.sem(values))
    if sem == 0:
        return mean, mean, mean
    lo, hi = stats.t.interval(level, n - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi)


def paired(a, b):
    """Paired comparison of per-seed values a and b (same seed order): the mean of a - b, its 95%
    t interval, the two-sided p value of the paired t test and the relative change (a - b) / |mean b|."""
    from scipy import stats

    diff = [x - y for x, y in zip(a, b)]
    mean, lo, hi = mean_ci(diff)
    if len(diff) < 2:
        p_value = math.nan
    elif lo == hi:  # every seed differs by the same amount: no spread to test against
        p_value = float(mean == 0)
    else:
        p_value = float(stats.ttest_rel(a, b).pvalue)
    base = sum(b) / len(b)
    return {"diff": mean, "diff_lo": lo, "diff_hi": hi, "p": p_value, "rel": mean / abs(base) if base else math.nan}


def verdict(c, n_seeds):
    """Whether a (lower-is-better) paired difference is beyond the seed spread."""
    if n_seeds < 2:
        return "cannot tell with one seed"
    if c["diff_hi"] < 0:
        return "better beyond the seed spread"
    if c["diff_lo"] > 0:
        return "worse beyond the seed spread"
    return "no difference beyond the seed spread"


def sections(p):
    """(heading, metric suffix, samplers) of the report's comparison sections: the primary metric and,
    with a robustness budget, the primary metric under adversarially perturbed network inputs."""
    clean = [(PROTOCOLS[p["protocol"]].question, "", p["samplers"])]
    if p["robustness"] is None:
        return clean
    return clean + [(f"Under adversarially perturbed network inputs (RMS {p['robustness']} per element)",
                     "_adversarial", p["robustness_samplers"])]


def primary_metric(p, name):
    """The primary metric of data set ``name``: swd on 2-D data, fd on images."""
    return PRIMARY[data_kind(p["data"][name]["data"])]


def aggregate(rows, p):
    """Summary rows (mean and interval of every metric per data set, method, sampler, NFE) and the
    protocol's comparisons (each AT method against its baselines) in each of the report's ``sections``."""
    cells = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["method"], r["sampler"], r["nfe"]), []).append(r)
    summary = []
    for (name, method, sampler, nfe), group in cells.items():
        group = sorted(group, key=lambda r: r["seed"])
        for metric in metric_columns(group):
            mean, lo, hi = mean_ci([float(r[metric]) for r in group])
            summary.append({"dataset": name, "method": method, "sampler": sampler, "nfe": nfe, "metric": metric,
                            "n": len(group), "mean": mean, "lo": lo, "hi": hi})
    comparisons = []
    for name in p["data"]:
        def values(method, sampler, nfe, metric):
            group = sorted(cells.get((name, method, sampler, nfe), []), key=lambda r: r["seed"])
            return [float(r[metric]) for r in group]

        for _, suffix, samplers in sections(p):
            metric = primary_metric(p, name) + suffix
            for method, baseline, label, baseline_sampler in PROTOCOLS[p["protocol"]].comparisons:
                for sampler in samplers if baseline_sampler is None else [s for s in baseline_sampler if s in samplers]:
                    for nfe in p["nfes"]:
                        at = values(method, sampler, nfe, metric)
                        base = values(baseline, sampler if baseline_sampler is None else baseline_sampler[sampler],
                                      nfe, metric)
                        c = {"dataset": name, "metric": metric, "sampler": sampler, "nfe": nfe, "method": method,
                             "baseline": label, "n": len(at), "mean": sum(at) / len(at),
                             "baseline_mean": sum(base) / len(base), **paired(at, base)}
                        c["verdict"] = verdict(c, len(at))
                        comparisons.append(c)
    return summary, comparisons


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _machine():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {os.cpu_count()} cores, torch threads {threads}, {gpu}; {platform.platform()}"


def _versions():
    import numpy
    from . import __version__
    return (f"adv_dpm {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
            f"numpy {numpy.__version__}")


def _ci(mean, lo, hi):
    return f"{fmt(mean)}" if math.isnan(lo) else f"{fmt(mean)} ± {fmt((hi - lo) / 2)}"


def _statement(name, nfe, method, metric, samplers, comps, p):
    """One data set, NFE and AT method: against each of its baselines with the first of ``samplers``,
    then against its first baseline with the others."""
    label = PROTOCOLS[p["protocol"]].methods[method][0]
    mine = [c for c in comps if (c["dataset"], c["nfe"], c["method"], c["metric"]) == (name, nfe, method, metric)]
    first = samplers[0]
    head, *rest = [c for c in mine if c["sampler"] == first]
    text = (f"- **{name}, NFE {nfe}** ({first}, {head['metric']}): {label} {fmt(head['mean'])} vs {head['baseline']} "
            f"{fmt(head['baseline_mean'])}, difference {_diff(head)}: **{label}: {head['verdict']}**.")
    for c in rest:
        text += f" Against {c['baseline']} ({fmt(c['baseline_mean'])}): {_diff(c)}, {c['verdict']}."
    others = [f"{c['sampler']} {_diff(c)}, {c['verdict']}" for c in mine
              if c["sampler"] != first and c["baseline"] == head["baseline"]]
    if others:
        text += f" {label[0].upper() + label[1:]} against {head['baseline']} with the other samplers: " + "; ".join(
            others) + "."
    return text


def _overview(name, method, metric, samplers, comps, p):
    """One line per data set and AT method: at which NFEs it is better / worse than its first
    baseline with the first of ``samplers``."""
    first, groups = samplers[0], {}
    mine = [c for c in comps if (c["dataset"], c["method"], c["sampler"], c["metric"]) == (name, method, first, metric)]
    for c in mine:
        if c["baseline"] == mine[0]["baseline"]:
            groups.setdefault(c["verdict"], []).append(str(c["nfe"]))
    label = PROTOCOLS[p["protocol"]].methods[method][0]
    return f"**{name}** ({first} sampler), {label} against {mine[0]['baseline']}: " + "; ".join(
        f"{v} at NFE {', '.join(nfes)}" for v, nfes in groups.items()) + "."


def _diff(c):
    """'difference [interval] (relative, p = ...)' of a comparison."""
    ci = "" if math.isnan(c["diff_lo"]) else f" [{fmt(c['diff_lo'])}, {fmt(c['diff_hi'])}]"
    notes = [] if math.isnan(c["rel"]) else [f"{c['rel'] * 100:+.1f}%"]
    notes += [] if math.isnan(c["p"]) else [f"p = {c['p']:.2g}"]
    return f"{fmt(c['diff'])}{ci}" + (f" ({', '.join(notes)})" if notes else "")


def _metric_tables(name, metric, samplers, summary, p):
    """Markdown: per sampler, methods x NFE of ``metric`` (mean ± interval)."""
    lines = []
    for sampler in samplers:
        table = []
        for method, (label, _) in PROTOCOLS[p["protocol"]].methods.items():
            row = {"method": label}
            for s in summary:
                if (s["dataset"], s["method"], s["sampler"], s["metric"]) == (name, method, sampler, metric):
                    row[f"NFE {s['nfe']}"] = _ci(s["mean"], s["lo"], s["hi"])
            table.append(row)
        lines += [f"**{sampler}**\n", markdown_table(table, ["method"] + [f"NFE {n}" for n in p["nfes"]])]
    return lines


def write_report(out, p, rows, summary, comparisons, features, timings, wall, command):
    """report.md, results.csv, summary.csv, comparisons.csv, results.json and plots/ under ``out``."""
    out = Path(out)
    metric_names = metric_columns(rows)
    write_csv(out / "results.csv", rows, ["dataset", "method", "seed", "sampler", "nfe", *metric_names, "seconds",
                                          "checkpoint"])
    write_csv(out / "summary.csv", summary, ["dataset", "method", "sampler", "nfe", "metric", "n", "mean", "lo", "hi"])
    write_csv(out / "comparisons.csv", comparisons, list(comparisons[0]) if comparisons else ["dataset"])
    write_json(out / "results.json", {"plan": p, "command": command, "timings": timings, "wall": wall,
                                      "features": features, "rows": rows, "summary": summary,
                                      "comparisons": comparisons})
    protocol = PROTOCOLS[p["protocol"]]
    settings = [{"data set": n, **s, "model_overrides": json.dumps(s.get("model_overrides", {})),
                 "finetune": json.dumps(s.get("finetune", {}))} for n, s in p["data"].items()]
    lines = [f"# Reproduction report: protocol `{p['protocol']}`, preset `{p['preset']}`\n",
             f"Command: `{command}`\n",
             f"Versions: {_versions()}  \nMachine: {_machine()}  \nWritten: {time.strftime('%Y-%m-%d %H:%M:%S')}\n",
             protocol.text.format(pretrain_seed=PRETRAIN_SEED, robustness=p["robustness"]),
             SHARED_TEXT.format(seeds=p["seeds"], nfes=p["nfes"]),
             markdown_table(settings, ["data set", "data", "model", "model_overrides", "batch_size", "lr",
                                       "pretrain_steps", "finetune_steps", "finetune", "ema_rate", "eval_samples"])]
    lines += [f"Feature network for {info['data']}: held-out accuracy {info['accuracy']:.3f}.\n"
              for info in features.values()]
    at_methods = list(dict.fromkeys(c[0] for c in protocol.comparisons))
    for heading, suffix, samplers in sections(p):
        lines += [f"## {heading}\n"]
        if suffix:
            lines += [f"Every network input moved adversarially within an RMS of {p['robustness']} per element "
                      f"(`adv-dpm evaluate --robustness`), sampler(s) {', '.join(samplers)}.\n"]
        lines += [_overview(name, m, primary_metric(p, name) + suffix, samplers, comparisons, p) + "  "
                  for name in p["data"] for m in at_methods]
        lines += ["\nDifference = AT method − baseline on the metric (negative: the AT method is better) "
                  "[95% paired interval] (relative to the baseline, paired t test).\n"]
        for name in p["data"]:
            lines += [_statement(name, nfe, m, primary_metric(p, name) + suffix, samplers, comparisons, p)
                      for m in at_methods for nfe in p["nfes"]] + [""]
    for name in p["data"]:
        compared = []
        for _, suffix, samplers in sections(p):
            metric = primary_metric(p, name) + suffix
            compared.append(metric)
            lines.append(f"## {name}: {metric} (mean ± 95% interval over {len(p['seeds'])} seed(s))\n")
            lines += _metric_tables(name, metric, samplers, summary, p)
            lines.append(f"![{name} {metric}](plots/{_plot(out, name, metric, samplers, summary, p).name})\n")
        other = [m for m in metric_names if m not in compared and any((s["dataset"], s["metric"]) == (name, m)
                                                                      for s in summary)]
        lines.append(f"Other metrics ({', '.join(other)}): summary.csv; per seed: results.csv.\n")
    phases = [{"phase": k, "seconds": v} for k, v in {**timings, **wall}.items()]
    lines += ["## Wall time\n", markdown_table(phases, ["phase", "seconds"]),
              "Phase times are those recorded when each job ran (a job resumed after a kill counts its last "
              "segment); 'this invocation' is the wall time of the command that wrote this report.\n"]
    atomic_write(out / "report.md", "\n".join(lines))
    return out / "report.md"


def _plot(out, name, metric, samplers, summary, p):
    panels = {s: {} for s in samplers}
    for s in summary:
        if s["dataset"] == name and s["metric"] == metric and s["sampler"] in panels:
            label = PROTOCOLS[p["protocol"]].methods[s["method"]][0]
            panels[s["sampler"]].setdefault(label, []).append((s["nfe"], s["mean"], s["lo"], s["hi"]))
    return plot_vs_nfe(panels, out / "plots" / f"{name}_{metric}.png", metric, f"{name}: {metric}, mean ± 95% CI")
