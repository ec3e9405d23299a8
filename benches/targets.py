"""The issues' speed targets, checked against benchmark result files.

    python benches/targets.py [FILE.json | FOLDER ...]     (default: benches/results)

Prints a markdown table: for every result file and every target that applies to its benchmark
and device, the rows the target speaks of, the measured value and whether it is met. The GPU
check writes it beside its results (targets.md).
"""
import json
import operator
import sys
from pathlib import Path

# (benchmark, device type, row filter, value, comparison, threshold, what is asked)
TARGETS = [
    ("bench_ops", "cpu", dict(op="adv_step", shape="128x3x32x32", provider="cpu"), "vs_eager", ">=", 5.0,
     "adv_step, C++, CIFAR-10 batch: >= 5x eager"),
    ("bench_ops", "cpu", dict(op="adv_step", shape="128x3x32x32", provider="cpu"), "vs_compile", ">=", 1.5,
     "adv_step, C++, CIFAR-10 batch: >= 1.5x torch.compile"),
    ("bench_ops", "cpu", dict(op="noise_inject fwd", shape="128x3x32x32", provider="cpu"), "vs_eager", ">=", 1.5,
     "noise_inject, C++, CIFAR-10 batch: >= 1.5x eager"),
    ("bench_ops", "cpu", dict(op="noise_inject fwd", shape="128x3x32x32", provider="cpu"), "vs_compile", ">=", 1.1,
     "noise_inject, C++, CIFAR-10 batch: >= 1.1x torch.compile"),
    ("bench_ops", "cuda", dict(shape="64x3x64x64", provider="cuda"), "of_copy", ">=", 0.8,
     "each op, CUDA, ImageNet-64 batch: >= 80% of copy bandwidth"),
    ("bench_group_norm", "cpu", {"shape": "32x128x16x16", "dtype": "float32", "pass": "fwd+bwd", "provider": "cpu"},
     "vs_eager", ">=", 2.0, "GroupNorm+SiLU fwd+bwd, C++, 32x128x16x16 fp32: >= 2x ADM eager"),
    ("bench_group_norm", "cpu", {"shape": "32x128x16x16", "dtype": "float32", "pass": "fwd+bwd", "provider": "cpu"},
     "vs_compile", ">=", 1.3, "GroupNorm+SiLU fwd+bwd, C++, 32x128x16x16 fp32: >= 1.3x torch.compile"),
    ("bench_group_norm", "cuda", {"dtype": "bfloat16", "provider": "cuda"}, "of_copy", ">=", 0.8,
     "GroupNorm+SiLU, CUDA, bf16: >= 80% of copy bandwidth"),
    ("bench_group_norm", "cuda", {"dtype": "bfloat16", "pass": "fwd+bwd", "provider": "cuda"}, "vs_compile", ">", 1.0,
     "GroupNorm+SiLU fwd+bwd, CUDA, bf16: faster than torch.compile"),
    ("bench_train", "cpu", dict(mode="free_at", ops="fused"), "vs_standard", "<=", 1.05,
     "free AT per update: <= 5% over standard training"),
    ("bench_train", "cpu", dict(mode="standard", ops="fused"), "fused_speedup", ">=", 1.15,
     "training step, fused ops: >= 1.15x plain PyTorch"),
    ("bench_train", "cuda", dict(mode="standard", ops="fused"), "fused_speedup", ">=", 1.2,
     "training step, CIFAR-10 config, fused ops: >= 1.2x plain PyTorch"),
]
COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le}
DESCRIBE = ("op", "shape", "dtype", "pass", "model", "mode")


def check(path):
    """Markdown lines for the targets that the result file ``path`` speaks to."""
    data = json.loads(Path(path).read_text())
    bench, device = Path(path).name.split("-")[0], data["meta"]["device_type"]
    lines = []
    for t_bench, t_device, where, key, cmp, threshold, asked in TARGETS:
        if (t_bench, t_device) != (bench, device):
            continue
        for row in data["rows"]:
            if any(row.get(k) != v for k, v in where.items()) or row.get(key) is None:
                continue
            value = row[key]
            what = " ".join(str(row[k]) for k in DESCRIBE if row.get(k))
            lines.append(f"| {Path(path).name} | {asked} | {what} | {key} = {value:.3g} | "
                         f"{'met' if COMPARE[cmp](value, threshold) else '**not met**'} |")
    return lines


def main(argv=None):
    args = (sys.argv[1:] if argv is None else argv) or [str(Path(__file__).resolve().parent / "results")]
    files = sorted(f for a in args for f in ([Path(a)] if Path(a).is_file() else Path(a).glob("bench_*.json")))
    print("| result file | target | row | measured | |\n|---|---|---|---|---|")
    for f in files:
        print("\n".join(check(f)) or f"| {f.name} | (no target applies) | | | |")


if __name__ == "__main__":
    main()
