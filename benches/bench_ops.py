"""Benchmark the fused noise-injection and adversarial-step ops against the plain PyTorch
composite (eager, as ADM / the authors' code write it) and torch.compile of it, side by side.

    python benches/bench_ops.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16] [--out DIR]

Prints a table and writes JSON + markdown under benches/results/ (see benches/common.py for
the conventions: medians, minimal-bytes bandwidth, ratio to a same-size copy). On a GPU the
adversarial step also has a 'triton 2-kernel' row: Triton's other form of it, for comparison.
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adv_dpm.ops import adv_step, adv_step_inject, backend, eager, noise_inject  # noqa: E402

# An ImageNet-64 batch (first: the GPU target's, measured before a time limit can stop the run),
# the paper's CIFAR-10 batch, and a tiny batch whose time is the per-call overhead (Python,
# dispatch, launch) of each provider.
SHAPES = {"imagenet64": (64, 3, 64, 64), "cifar10": (128, 3, 32, 32), "tiny": (2, 1, 1, 1)}
LR, RADIUS_PER_ELEMENT = 0.1, 0.1
COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("provider", "provider", "{}"),
           ("us", "median us", "{:.1f}"), ("gpu_us", "GPU-only us", "{:.1f}"),
           ("gbps", "GB/s", "{:.1f}"), ("of_copy", "of copy", "{:.0%}"),
           ("vs_eager", "x eager", "{:.2f}"), ("vs_compile", "x compile", "{:.2f}"),
           ("peak_mib", "peak MiB", "{:.1f}")]


def inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    big = lambda: torch.randn(shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    c_signal = torch.rand(shape[0], generator=g, device=device)
    radius = RADIUS_PER_ELEMENT * (torch.tensor(shape[1:]).prod().item() ** 0.5)
    return dict(x0=big(), eps=big(), delta=0.01 * big(), grad=big(), gxt=big(), gt=big(),
                c_signal=c_signal, c_noise=(1 - c_signal**2).sqrt(), radius=radius)


def cases(t):
    """op name -> (minimal bytes, {provider kind: callable factory}); a factory takes the op impl."""
    n = t["x0"].numel() * t["x0"].element_size()

    def inject_fwd(fn):
        return lambda: fn(t["x0"], t["eps"], t["c_signal"], t["c_noise"], t["delta"], "delta_detach")

    def inject_graph(fn):
        leaves = [t[k].detach().requires_grad_() for k in ("x0", "eps")] + [t["c_signal"], t["c_noise"],
                                                                             t["delta"].detach().requires_grad_()]
        return leaves, fn(*leaves, "delta_detach")

    def inject_bwd(fn):
        (x0, eps, _, _, delta), outs = inject_graph(fn)
        return lambda: torch.autograd.grad(outs, (x0, eps, delta), (t["gxt"], t["gt"]), retain_graph=True)

    def inject_both(fn):
        def run():
            (x0, eps, _, _, delta), outs = inject_graph(fn)
            return torch.autograd.grad(outs, (x0, eps, delta), (t["gxt"], t["gt"]))
        return run

    def step(fn):
        return lambda: fn(t["delta"], t["grad"], LR, t["radius"])

    def step_inject(fn):
        return lambda: fn(t["x0"], t["eps"], t["c_noise"], t["delta"], t["grad"], LR, t["radius"], "delta_detach")

    return {
        "noise_inject fwd": (5 * n, inject_fwd, noise_inject, eager.noise_inject),
        "noise_inject bwd": (5 * n, inject_bwd, noise_inject, eager.noise_inject),
        "noise_inject fwd+bwd": (10 * n, inject_both, noise_inject, eager.noise_inject),
        "adv_step": (3 * n, step, adv_step, eager.adv_step),
        "adv_step_inject": (7 * n, step_inject, adv_step_inject, eager.adv_step_inject),
    }


def triton_two_kernel_step():
    """Triton's adversarial step as two kernels (per-block partials, then the update) at every
    sample size, instead of one program per sample up to kernels.adv_step.SAMPLE_MAX elements."""
    from adv_dpm.kernels import adv_step as kernels
    return common.module_globals(kernels, {"SAMPLE_MAX": 0})


def two_kernel(factory, ours):
    """A provider beside Triton's own choice: its two-kernel step. One program per sample leaves
    SMs idle where a batch has fewer samples than the GPU has SMs (ImageNet-64: 64 of an H100's
    132); this row says whether the two kernels then do better."""
    run = common.forced("triton", factory, ours)

    def fn():
        with triton_two_kernel_step():
            return run()
    return fn


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def kernel_backends(device):
    ours = [b for b in ("cpu", "cuda", "triton") if backend.unavailable(b, device) is None]
    return [b for b in ours if not (b == "triton" and device == "cpu")]  # the interpreter is no benchmark


def bench(rows, shape_names, dtypes, device, min_run_time):
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        for dtype in dtypes:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no stale graphs
            t = inputs(shape, dtype, device)
            for op, (nbytes, factory, ours, composite) in cases(t).items():
                providers = {"eager": factory(composite), "compile": factory(compiled(composite))}
                providers.update({b: common.forced(b, factory, ours) for b in kernel_backends(device)})
                if op.startswith("adv_step") and "triton" in providers:
                    providers["triton 2-kernel"] = two_kernel(factory, ours)
                times = common.compare({"copy": common.copy_of(nbytes, device), **providers}, device, min_run_time)
                copy_bw = nbytes / times["copy"]["basis_s"]
                for name, fn in providers.items():
                    peak = common.peak_memory(fn, device) if "bwd" in op else None
                    rows.append(common.rate_row(times[name], nbytes, copy_bw, op=op, shape="x".join(map(str, shape)),
                                                dtype=str(dtype).split(".")[-1], provider=name,
                                                peak_mib=None if peak is None else peak / 2**20))
                common.add_speedups(rows[-len(providers):], "eager", "compile")
                common.print_rows(rows[-len(providers):], common.device_columns(COLUMNS, device))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CIFAR-10 batch only, short timing (the demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default float32 on CPU, "
                                                       "float32,bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or ("float32" if args.device == "cpu" else "float32,bfloat16")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    shapes = ["cifar10"] if args.quick else list(SHAPES)
    meta = common.machine(args.device)
    # CUDA launches are microseconds: a short run already holds thousands of them.
    min_run_time = 0.1 if args.device == "cuda" else 0.3 if args.quick else 1.0
    common.run_table("bench_ops" + ("-quick" if args.quick else ""),
                     f"fused ops on {meta['device']} (torch {meta['torch']}); medians of repeated runs",
                     lambda rows: bench(rows, shapes, dtypes, args.device, min_run_time), meta,
                     common.device_columns(COLUMNS, args.device), args.out)


if __name__ == "__main__":
    main()
