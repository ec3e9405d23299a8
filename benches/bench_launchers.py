"""Host time of the Triton launchers: what a call costs the CPU before Triton launches its kernels.

    python benches/bench_launchers.py [--out DIR]          (any machine: no GPU needed)

A training step of a small model on a fast GPU is host-bound: the GPU waits for the next kernel
while Python prepares it, so a launcher's host time adds to every step. Here each Triton
launcher runs on CPU tensors of the GPU benchmarks' shapes with Triton's own launch replaced by
a counter: the figure is our Python (plans, strides, output allocation), to which a real call
adds Triton's launch of each kernel counted.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("layout", "layout", "{}"),
           ("launches", "kernels launched", "{}"), ("us", "host us per call", "{:.1f}")]


def calls():
    """{(op, shape, layout): call} of every Triton launcher at the GPU benchmarks' shapes."""
    from adv_dpm.kernels import adv_step, group_norm_act, noise_inject
    out = {}
    for shape in [(128, 128, 32, 32), (64, 192, 64, 64), (2, 256, 64, 64)]:
        for layout in ("nchw", "channels_last"):
            x = torch.empty(shape, dtype=torch.bfloat16)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            n, c = shape[:2]
            emb = torch.zeros(n, 2 * c, dtype=torch.bfloat16)  # scale, shift: its halves, as ADM makes them
            params = (torch.ones(c), torch.zeros(c), emb[:, :c], emb[:, c:])
            mean, rstd = torch.zeros(n, 32), torch.ones(n, 32)
            key = "x".join(map(str, shape)), layout
            out[("group_norm_act", *key)] = lambda x=x, p=params: group_norm_act.group_norm_act(x, *p, 32, 1e-5, "silu")
            out[("group_norm_act_backward", *key)] = lambda x=x, p=params, m=mean, r=rstd: (
                group_norm_act.group_norm_act_backward(x, x, m, r, *p, 32, "silu"))
    for shape in [(128, 3, 32, 32), (64, 3, 64, 64)]:
        x, c = torch.empty(shape), torch.rand(shape[0])
        key = "x".join(map(str, shape)), "nchw"
        out[("noise_inject", *key)] = lambda x=x, c=c: noise_inject.noise_inject(x, x, c, c, x, 2)
        out[("noise_inject_backward", *key)] = lambda x=x, c=c: noise_inject.noise_inject_backward(
            x, x, x, x, c, c, x, 2, False)
        out[("adv_step", *key)] = lambda x=x: adv_step.adv_step(x, x, None, None, None, None, 0.1, 1.0, None, 0)
        out[("adv_step_inject", *key)] = lambda x=x, c=c: adv_step.adv_step(x, x, None, x, x, c, 0.1, 1.0, None, 2)
    return out


def fill(rows, min_run_time=0.5):
    """Every launcher timed side by side in alternating rounds (common.compare), ``min_run_time``
    seconds each."""
    from triton.runtime.jit import JITFunction
    launched = []
    real_run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launched.append(self)
    try:
        cases, counts = calls(), {}
        for key, call in cases.items():
            launched.clear()
            call()
            counts[key] = len(launched)
        times = common.compare(cases, "cpu", min_run_time)
    finally:
        JITFunction.run = real_run
    for (op, shape, layout), t in times.items():
        rows.append(dict(op=op, shape=shape, layout=layout, launches=counts[(op, shape, layout)], us=t["us"]))
    common.print_rows(rows, COLUMNS)


def main(argv=None):
    args = common.out_args(__doc__, argv)
    torch.set_num_threads(1)
    meta = common.machine("cpu")
    common.run_table("bench_launchers", f"host time of the Triton launchers on {meta['device']} "
                     f"(torch {meta['torch']})", fill, meta, COLUMNS, args.out)


if __name__ == "__main__":
    main()
