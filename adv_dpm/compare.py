"""Paired comparison of evaluated runs over seeds: ``adv-dpm compare BASELINE RUN [RUN ...]``.

Each argument names a set of evaluations, a folder or a glob pattern: every results.json under it
(written by ``adv-dpm evaluate``) is one seed's evaluation, keyed by its evaluation seed;
``LABEL=PATTERN`` gives the set a short name for the tables and plots. Each
run set is compared with the baseline set cell by cell (sampler, NFE), paired over the seeds both
have, as ``reproduce`` compares its methods: the mean difference, its 95% t interval, the paired
t test's p and the relative change. This is the table an ablation needs, e.g. a setting changed
with ``adv-dpm train --config <run>/config.json --<setting> ...`` for each seed of a protocol.
"""
import glob
import json
import math
from pathlib import Path

from .evaluate import PRIMARY, data_kind, markdown_table, metric_columns, plot_vs_nfe, read_json, write_csv
from .reproduce import paired, verdict
from .utils import atomic_write


def load_set(pattern):
    """{seed: {(sampler, nfe): row}} of the evaluations under ``pattern`` (a folder or a glob)."""
    roots = [Path(r) for r in sorted(glob.glob(str(pattern))) or [str(pattern)]]
    files = sorted({f for root in roots for f in ([root] if root.is_file() else root.rglob("results.json"))})
    if not files:
        raise ValueError(f"compare: no results.json (written by adv-dpm evaluate) under {str(pattern)!r}")
    seeds, where = {}, {}
    for f in files:
        stored = read_json(f)
        if not isinstance(stored, dict) or "rows" not in stored or "settings" not in stored:
            raise ValueError(f"compare: {f} is not a results.json of adv-dpm evaluate")
        seed = stored["settings"]["seed"]
        if seed in seeds:
            raise ValueError(f"compare: {where[seed]} and {f} under {str(pattern)!r} both evaluate seed {seed}; "
                             "give each set one evaluation per seed")
        seeds[seed], where[seed] = {(r["sampler"], r["nfe"]): r for r in stored["rows"]}, f
    return seeds


def labelled(arg):
    """(label, pattern) of a set argument: 'LABEL=PATTERN' names the set (a label has no '/', and an
    existing path with '=' in its name stays a path), else the pattern is its own label."""
    label, eq, pattern = arg.partition("=")
    if eq and label and pattern and "/" not in label and not glob.glob(arg):
        return label, pattern
    return arg, arg


def default_metrics(rows):
    """The primary metric of the rows' data and its scores under perturbed inputs, where present."""
    primary = PRIMARY[data_kind(rows[0]["data"])]
    return [m for m in (primary, f"{primary}_random", f"{primary}_adversarial") if m in rows[0]]


def compare(baseline, runs, metrics=None):
    """Rows of the paired comparison of each set of ``runs`` with ``baseline`` (patterns, see load_set,
    or LABEL=PATTERN, see labelled)."""
    baseline, base_pattern = labelled(baseline)
    base = load_set(base_pattern)
    first = next(iter(base.values()))
    metrics = metrics or default_metrics(list(first.values()))
    available = metric_columns(list(first.values()))
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"compare: metrics {unknown} are not in the baseline's evaluations, which have {available}")
    out = []
    for name, pattern in map(labelled, runs):
        other = load_set(pattern)
        seeds = sorted(set(base) & set(other))
        if not seeds:
            raise ValueError(f"compare: {name!r} has no seed in common with the baseline {baseline!r} "
                             f"(seeds {sorted(other)} and {sorted(base)})")
        for cell in first:
            if any(cell not in other[s] or cell not in base[s] for s in seeds):
                continue
            for metric in metrics:
                if any(metric not in other[s][cell] for s in seeds):   # e.g. not scored under perturbed inputs
                    continue
                a = [other[s][cell][metric] for s in seeds]
                b = [base[s][cell][metric] for s in seeds]
                c = paired(a, b)
                every = [v[cell][metric] for v in base.values() if cell in v]
                out.append({"run": name, "baseline": baseline, "metric": metric, "sampler": cell[0], "nfe": cell[1],
                            "n": len(seeds), "mean": sum(a) / len(a), "baseline_mean": sum(b) / len(b), **c,
                            "verdict": verdict(c, len(seeds)), "baseline_all_seeds": sum(every) / len(every)})
    if not out:
        raise ValueError(f"compare: no sampler, NFE and metric evaluated in both {baseline!r} and {list(runs)}")
    return out


def _cell(c):
    text = f"{100 * c['rel']:+.1f}% ({c['p']:.2g})"
    return f"**{text}**" if c["verdict"].split()[0] in ("better", "worse") else text


def _by_metric(rows):
    """{metric: its rows}, in the rows' order."""
    groups = {}
    for r in rows:
        groups.setdefault(r["metric"], []).append(r)
    return groups


def report(rows):
    """Markdown: per metric, a table of (sampler, NFE) x [baseline mean, each run's relative change (p)]."""
    lines = [f"Each run − the baseline {rows[0]['baseline']} (column 'baseline': its mean over all its seeds), "
             "relative to the baseline's mean over the seeds both have (n), with the paired t test's p; lower is "
             "better; bold: beyond the seed spread (the 95% interval of the difference excludes 0).\n"]
    for metric, group in _by_metric(rows).items():
        table = {}
        for r in group:
            t = table.setdefault((r["sampler"], r["nfe"]), {"sampler": r["sampler"], "nfe": r["nfe"],
                                                            "baseline": r["baseline_all_seeds"]})
            t[f"{r['run']} (n={r['n']})"] = _cell(r)
        columns = ["sampler", "nfe", "baseline", *[c for c in dict.fromkeys(k for t in table.values() for k in t)
                                                    if c not in ("sampler", "nfe", "baseline")]]
        lines += [f"## {metric}\n", markdown_table(list(table.values()), columns)]
    return "\n".join(lines)


def plot(rows, out_dir):
    """compare_<metric>.png: per sampler, each run's relative change against NFE with its 95% interval."""
    for metric, group in _by_metric(rows).items():
        panels = {}
        for r in group:
            scale = 100 / abs(r["baseline_mean"]) if r["baseline_mean"] else math.nan
            panels.setdefault(r["sampler"], {}).setdefault(r["run"], []).append(
                (r["nfe"], r["diff"] * scale, r["diff_lo"] * scale, r["diff_hi"] * scale))
        plot_vs_nfe(panels, Path(out_dir) / f"compare_{metric}.png", f"{metric}: change vs baseline (%)",
                    f"each run − {rows[0]['baseline']} (95% interval over seeds; lower is better)", reference=0)


def write(rows, out_dir):
    """compare.md, compare.csv and the plots under ``out_dir`` (atomically); returns the markdown path."""
    out = Path(out_dir)
    write_csv(out / "compare.csv", rows, list(rows[0]))
    plot(rows, out)
    return atomic_write(out / "compare.md", report(rows))
