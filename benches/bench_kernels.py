"""Where the fused ops' GPU time goes: the kernels one call launches, with their median times,
for each GPU backend of ours, at the GPU benchmarks' shapes (torch.profiler).

    python benches/bench_kernels.py [--out DIR]          (needs a CUDA device)

GroupNorm + scale/shift + SiLU forward + backward in bf16 at bench_group_norm's shapes, then
each op of bench_ops at its ImageNet-64 and CIFAR-10 batches in fp32. The timing benchmarks
say how fast each backend is; this says how many kernels each one runs and which takes the
time. It runs in its own process, which captures no CUDA graph (see common.kernel_breakdown).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_group_norm  # noqa: E402
import bench_ops  # noqa: E402
import common  # noqa: E402

from adv_dpm.ops import group_norm_act  # noqa: E402

COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("provider", "provider", "{}"),
           ("total_us", "sum of kernels us", "{:.1f}"), ("launches", "launches", "{:g}"),
           ("kernels", "kernels (median us each)", "{}")]
OPS_SHAPES = ("imagenet64", "cifar10")


def row(op, shape, dtype, provider, fn):
    """One call's kernels; where the profiler fails, the row says why and the table goes on."""
    r = dict(op=op, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1], provider=provider)
    try:
        summary = common.kernel_breakdown(fn)
    except Exception as e:  # noqa: BLE001 (a diagnostic: the other rows still count)
        return dict(r, kernels=f"no breakdown: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return dict(r, total_us=sum(us * n for _, us, n in summary), launches=sum(n for *_, n in summary),
                kernels=common.kernels_text(summary))


def fill(rows, device="cuda"):
    """Appends (and prints) a row per op, shape and backend of ours."""
    def add(r):
        rows.append(r)
        common.print_rows([r], COLUMNS)

    ours = bench_ops.kernel_backends(device)
    for shape in bench_group_norm.GPU_SHAPES:
        x, p, grad_y = bench_group_norm.inputs(shape, torch.bfloat16, device)
        for b in ours:
            run = common.forced(b, lambda: bench_group_norm.passes(group_norm_act, x, p, grad_y)["fwd+bwd"])
            add(row("group_norm_act fwd+bwd", shape, torch.bfloat16, b, run))
    for shape_name in OPS_SHAPES:
        shape = bench_ops.SHAPES[shape_name]
        t = bench_ops.inputs(shape, torch.float32, device)
        for op, (_, factory, impl, _) in bench_ops.cases(t).items():
            for b in ours:
                add(row(op, shape, torch.float32, b, common.forced(b, factory, impl)))


def main(argv=None):
    args = common.out_args(__doc__, argv, needs_cuda="the kernel breakdown")
    meta = common.machine("cuda")
    common.run_table("bench_kernels", f"GPU kernels per call on {meta['device']} (torch {meta['torch']})", fill, meta,
                     COLUMNS, args.out)


if __name__ == "__main__":
    main()
