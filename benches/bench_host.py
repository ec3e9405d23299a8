"""Host time of an eager call of a fused op, forward and forward + backward, against the
PyTorch composites it replaces: what a call costs before its kernels run.

    python benches/bench_host.py [--device cpu|cuda] [--out DIR]

A training step of a small model on a fast GPU is host-bound (the GPU waits while Python and
the dispatcher prepare the next kernel), and ADM's UNet calls GroupNorm 88 times per forward.
The shapes are tiny, so that the kernels take next to no time and the figures are the per-call
costs of Python, autograd and dispatch. The backward is ``torch.autograd.backward(y, grad_y)``
with a ready upstream gradient.
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adv_dpm.ops import eager  # noqa: E402

COLUMNS = [("op", "op", "{}"), ("provider", "provider", "{}"), ("forward_us", "forward us", "{:.1f}"),
           ("both_us", "forward + backward us", "{:.1f}")]


def python_autograd(family):
    """The op of ``family`` on its kernels through its Python autograd.Function, checks included:
    the path of the Triton kernels, and of the C++ and CUDA ones before their autograd in C++."""
    module = importlib.import_module(f"adv_dpm.ops.{family}")

    def call(*args):
        module._check(*args)
        return module._function.apply(*args)[0]
    return call


def providers(device):
    """{(op, provider): (forward function, its tensor arguments)}."""
    from adv_dpm.ops import group_norm_act, noise_inject
    x = torch.randn(2, 8, 2, 2, device=device)
    weight, bias = torch.ones(8, device=device), torch.zeros(8, device=device)
    scale, shift = torch.zeros(2, 8, device=device), torch.zeros(2, 8, device=device)
    gn = (x, weight, bias, scale, shift)
    x0, eps, delta = torch.randn(3, *x.shape, device=device).unbind(0)
    c = torch.rand(2, device=device)
    ni = (x0, eps, delta)
    gn_python, ni_python = python_autograd("group_norm_act"), python_autograd("noise_inject")
    return {
        ("group_norm_act", "adv_dpm.group_norm_act"):
            (lambda x, w, b, s, h: group_norm_act(x, w, b, 4, 1e-5, s, h), gn),
        ("group_norm_act", "same kernels, Python autograd"):
            (lambda x, w, b, s, h: gn_python(x, w, b, 4, 1e-5, s, h, "silu"), gn),
        ("group_norm_act", "ADM composite (eager)"):
            (lambda x, w, b, s, h: eager.group_norm_act(x, w, b, 4, 1e-5, s, h), gn),
        ("group_norm_act", "F.group_norm + SiLU (no scale/shift)"):
            (lambda x, w, b, s, h: F.silu(F.group_norm(x, 4, w, b)), gn),
        ("noise_inject", "adv_dpm.noise_inject"):
            (lambda x0, e, d: noise_inject(x0, e, c, c, d, "delta")[0], ni),
        ("noise_inject", "same kernels, Python autograd"):
            (lambda x0, e, d: ni_python(x0, e, c, c, d, "delta"), ni),
        ("noise_inject", "composite (eager)"):
            (lambda x0, e, d: eager.noise_inject(x0, e, c, c, d, "delta")[0], ni),
    }


def fill(rows, device, min_run_time=1.0):
    """Every provider timed side by side (common.compare), forward alone and with its backward, in
    15 short rounds: calls of tens of µs feel a shared machine's speed changes, which many
    alternations spread over every provider alike."""
    calls = {}
    for (op, name), (fn, tensors) in providers(device).items():
        leaves = [t.detach().requires_grad_() for t in tensors]
        grad_y = torch.randn_like(fn(*leaves))
        with torch.no_grad():
            calls[(op, name, "forward_us")] = lambda fn=fn, t=tensors: fn(*t)
        calls[(op, name, "both_us")] = lambda fn=fn, t=leaves, g=grad_y: torch.autograd.backward(fn(*t), g)
    timings = common.compare(calls, None, min_run_time, rounds=15)  # host time as called: no GPU-only timing
    for op, name in dict.fromkeys((op, name) for op, name, _ in calls):
        rows.append(dict(op=op, provider=name, **{k: timings[(op, name, k)]["us"] for k in ("forward_us", "both_us")}))
    common.print_rows(rows, COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (torch.cuda.is_available() is False)")
    torch.set_num_threads(1)
    meta = common.machine(args.device)
    common.run_table("bench_host", f"host time per eager call on {meta['device']} (torch {meta['torch']})",
                     lambda rows: fill(rows, args.device), meta, COLUMNS, args.out)


if __name__ == "__main__":
    main()
