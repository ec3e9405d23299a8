"""Benchmark the fused GroupNorm + scale/shift + SiLU against ADM's eager composite (fp32
upcast, GroupNorm, cast back, * (1 + scale) + shift, SiLU), the same in the input dtype
(F.group_norm ... in fp16/bf16), and torch.compile of ADM's composite, side by side.

    python benches/bench_group_norm.py [--device cpu|cuda] [--dtypes float32] [--out DIR]

Forward, backward and both; median time, minimal bytes, GB/s, ratio to a same-size copy,
the bytes saved for backward (all devices) and peak memory of forward+backward (CUDA).
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adv_dpm.ops import backend, eager, group_norm_act  # noqa: E402

GROUPS = 32
# ADM's CIFAR-10 (N=128) and ImageNet-64 (N=64) activation shapes; the CPU target case first. On
# a GPU the largest first (nearest the memory bound, where a copy ratio means most), then the CPU
# target case: the GPU check's time limit may stop the run before the end.
CPU_SHAPES = [(32, 128, 16, 16), (128, 128, 32, 32), (128, 256, 16, 16)]
GPU_SHAPES = [(64, 192, 64, 64), (128, 128, 32, 32), (64, 384, 32, 32), (32, 128, 16, 16), (128, 256, 16, 16),
              (64, 576, 16, 16), (128, 256, 8, 8), (64, 768, 8, 8), (128, 512, 4, 4)]
COLUMNS = [("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("pass", "pass", "{}"), ("provider", "provider", "{}"),
           ("us", "median us", "{:.1f}"), ("gpu_us", "GPU-only us", "{:.1f}"),
           ("gbps", "GB/s", "{:.1f}"), ("of_copy", "of copy", "{:.0%}"),
           ("vs_eager", "x ADM eager", "{:.2f}"), ("vs_compile", "x compile", "{:.2f}"),
           ("saved_mib", "saved for bwd MiB", "{:.2f}"), ("peak_mib", "peak MiB", "{:.1f}")]


def inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, device=device) * 0.5 - 2.3).to(dtype)
    params = dict(weight=1 + 0.1 * torch.randn(c, generator=g, device=device),   # fp32, as ADM keeps them
                  bias=0.1 * torch.randn(c, generator=g, device=device),
                  scale=(0.1 * torch.randn(n, c, generator=g, device=device)).to(dtype),
                  shift=(0.1 * torch.randn(n, c, generator=g, device=device)).to(dtype))
    return x, params, torch.randn(shape, generator=g, device=device).to(dtype)


def call(fn, x, p):
    return fn(x, p["weight"], p["bias"], GROUPS, 1e-5, p["scale"], p["shift"], "silu")


@functools.cache
def compiled_adm():
    return torch.compile(eager.group_norm_act, dynamic=False)


def saved_bytes(fn, x, p):
    """Bytes of the distinct tensors autograd saves for backward in one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    leaves = x.detach().requires_grad_(), {k: v.detach().requires_grad_() for k, v in p.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(fn, *leaves)
    return sum(seen.values())


def passes(fn, x, p, grad_y):
    def graph():
        leaves = x.detach().requires_grad_(), {k: v.detach().requires_grad_() for k, v in p.items()}
        return leaves, call(fn, *leaves)

    def bwd():
        (xl, pl), y = graph()
        return lambda: torch.autograd.grad(y, [xl, *pl.values()], grad_y, retain_graph=True)

    def both():
        (xl, pl), y = graph()
        return torch.autograd.grad(y, [xl, *pl.values()], grad_y)
    return {"fwd": lambda: call(fn, x, p), "bwd": bwd(), "fwd+bwd": both}


def bench(rows, shapes, dtypes, device, min_run_time):
    ours = [b for b in ("cpu", "cuda", "triton") if backend.unavailable(b, device, "group_norm_act") is None
            and not (b == "triton" and device == "cpu")]
    for shape in shapes:
        for dtype in dtypes:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no stale graphs
            x, p, grad_y = inputs(shape, dtype, device)
            n = x.numel() * x.element_size()
            fns = {"ADM eager": (None, eager.group_norm_act), "eager in dtype": (None, eager.group_norm_act_native),
                   "compile": (None, compiled_adm())}
            fns.update({b: (b, group_norm_act) for b in ours})
            for name_pass, nbytes in (("fwd", 2 * n), ("bwd", 3 * n), ("fwd+bwd", 5 * n)):
                providers = {name: common.forced(forced, lambda fn=fn: passes(fn, x, p, grad_y)[name_pass])
                             for name, (forced, fn) in fns.items()}
                times = common.compare({"copy": common.copy_of(nbytes, device), **providers}, device, min_run_time)
                copy_bw = nbytes / times["copy"]["basis_s"]
                for name, run in providers.items():
                    extra = {}
                    if name_pass == "fwd+bwd":
                        peak = common.peak_memory(run, device)
                        extra = dict(saved_mib=saved_bytes(fns[name][1], x, p) / 2**20,
                                     peak_mib=None if peak is None else peak / 2**20)
                    rows.append(common.rate_row(times[name], nbytes, copy_bw, shape="x".join(map(str, shape)),
                                                dtype=str(dtype).split(".")[-1], **{"pass": name_pass},
                                                provider=name, **extra))
                common.add_speedups(rows[-len(providers):], "ADM eager", "compile")
                common.print_rows(rows[-len(providers):], common.device_columns(COLUMNS, device))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="the first shape only (on CPU, the target case)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32" if args.device == "cpu" else "bfloat16")).split(",")]
    shapes = (CPU_SHAPES if args.device == "cpu" else GPU_SHAPES)[:1 if args.quick else None]
    meta = common.machine(args.device)
    min_run_time = 0.5 if args.device == "cpu" else 0.1
    common.run_table("bench_group_norm" + ("-quick" if args.quick else ""),
                     f"group_norm_act on {meta['device']} (torch {meta['torch']}), {GROUPS} groups, scale/shift + SiLU",
                     lambda rows: bench(rows, shapes, dtypes, args.device, min_run_time), meta,
                     common.device_columns(COLUMNS, args.device), args.out)


if __name__ == "__main__":
    main()
