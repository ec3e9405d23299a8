"""Which plan sizes bring the Triton GroupNorm nearest a same-size copy on this GPU.

    python benches/tune_group_norm.py [--out DIR]          (needs a CUDA device)

The Triton kernels of group_norm_act take their tile sizes, groups per program and warps from
module globals of kernels/group_norm_act.py. Here each candidate below (a few of those globals
changed) is timed against the defaults and a same-size copy, side by side, forward and backward,
in bf16 at the largest ADM shapes, NCHW and channels_last (GPU time alone, from CUDA graphs).
The table says which defaults to change; nothing changes by itself. The cases the bf16 target
is judged on come first: the GPU check's time limit may stop the run before the end.
"""
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_group_norm  # noqa: E402
import common  # noqa: E402

from adv_dpm.kernels import group_norm_act as kernels  # noqa: E402
from adv_dpm.ops import group_norm_act  # noqa: E402

CANDIDATES = {
    "default": {},
    "half the warps": {"WARPS": tuple((tile, max(1, warps // 2)) for tile, warps in kernels.WARPS)},
    "twice the warps": {"WARPS": tuple((tile, min(32, 2 * warps)) for tile, warps in kernels.WARPS)},
    "2x groups per program": {"FUSED_TILE": 2 * kernels.FUSED_TILE},
    "4x larger one-read groups": {"FUSED_MAX": 4 * kernels.FUSED_MAX},
    "half the tile": {"TILE": kernels.TILE // 2},
    "twice the tile": {"TILE": 2 * kernels.TILE},
}
CASES = [((128, 128, 32, 32), "nchw"), ((64, 192, 64, 64), "nchw"), ((128, 128, 32, 32), "channels_last"),
         ((64, 192, 64, 64), "channels_last"), ((64, 384, 32, 32), "nchw"), ((128, 256, 16, 16), "channels_last")]
PASSES = {"fwd": 2, "bwd": 3}  # minimal bytes in units of x's size: x (and grad_y) read, one written
COLUMNS = [("shape", "shape", "{}"), ("layout", "layout", "{}"), ("pass", "pass", "{}"),
           ("candidate", "candidate", "{}"), ("plan", "plan", "{}"), ("gpu_us", "GPU-only us", "{:.1f}"),
           ("of_copy", "of copy", "{:.0%}"), ("vs_default", "x default", "{:.2f}"), ("error", "error", "{}")]


def plan_sizes(overrides):
    """kernels/group_norm_act.py's globals set to ``overrides`` inside the block, restored after."""
    return common.module_globals(kernels, overrides)


def launch_plan(shape, layout, name_pass, overrides, itemsize=2):
    """'plan GBxCGPxBHW wN': the group kernels' plan, tile and warps for a bf16 call under
    ``overrides`` (a SPLIT backward tiles its per-channel kernels otherwise)."""
    n, c, h, w = shape
    group_bytes = c // bench_group_norm.GROUPS * h * w * itemsize * (PASSES[name_pass] - 1)
    with plan_sizes(overrides):
        plan, gb, cgp, bhw, _ = kernels._group_plan(n, c, bench_group_norm.GROUPS, h * w, layout == "channels_last",
                                                    group_bytes)
        return f"{plan} {gb}x{cgp}x{bhw} w{kernels._warps(gb * cgp * bhw)}"


def candidate_pass(name, name_pass, x, p, grad_y):
    """Pass ``name_pass`` of the Triton op on (x, p, grad_y), built (a backward's forward graph
    included) and run under candidate ``name``'s plan sizes."""
    overrides = CANDIDATES[name]
    with plan_sizes(overrides):
        fn = common.forced("triton", lambda: bench_group_norm.passes(group_norm_act, x, p, grad_y)[name_pass])

    def run():
        with plan_sizes(overrides):
            return fn()
    return run


def fill(rows, device="cuda", min_run_time=0.1):
    """Appends (and prints) a row per case, pass and candidate."""
    for shape, layout in CASES:
        x, p, grad_y = bench_group_norm.inputs(shape, torch.bfloat16, device)
        if layout == "channels_last":
            x, grad_y = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_y))
        nbytes_x = x.numel() * x.element_size()
        for name_pass, units in PASSES.items():
            # Only the candidates that launch something else here than the defaults do.
            plans = {}
            for name, overrides in CANDIDATES.items():
                plan = launch_plan(shape, layout, name_pass, overrides)
                if plan not in plans.values():
                    plans[name] = plan
            makers = {name: functools.partial(candidate_pass, name, name_pass, x, p, grad_y) for name in plans}
            case = dict(shape="x".join(map(str, shape)), layout=layout, **{"pass": name_pass})
            rows_here = timed_rows(makers, units * nbytes_x, device, min_run_time, case, plans)
            rows.extend(rows_here)
            common.print_rows(rows_here, COLUMNS)


def timed_rows(makers, nbytes, device, min_run_time, case, plans):
    """The rows of one case and pass: the callables that ``makers`` make, timed side by side with a
    copy of ``nbytes`` (``case``: the rows' fields; ``plans``: each one's launch plan). A candidate
    that fails to build or run says why; the others still count."""
    providers, failed = {}, {}
    for name, make in makers.items():
        try:
            fn = make()
            fn()
            providers[name] = fn
        except Exception as e:  # noqa: BLE001 (e.g. out of resources at one tile size)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    times = common.compare({"copy": common.copy_of(nbytes, device), **providers}, device, min_run_time)
    copy_bw = nbytes / times["copy"]["basis_s"]
    default = times.get("default", {}).get("basis_s")
    out = []
    for name in plans:
        row = dict(case, candidate=name, plan=plans[name])
        if name in failed:
            out.append(dict(row, error=failed[name]))
            continue
        row = common.rate_row(times[name], nbytes, copy_bw, **row)
        row["vs_default"] = None if default is None else default / times[name]["basis_s"]
        out.append(row)
    return out


def best(rows):
    """The fastest candidate of each case and pass: [(case text, candidate, of copy, x default)]."""
    cases = {}
    for r in rows:
        if r.get("of_copy") is not None:
            key = f"{r['shape']} {r['layout']} {r['pass']}"
            if key not in cases or r["of_copy"] > cases[key]["of_copy"]:
                cases[key] = r
    return [(key, r["candidate"], r["of_copy"], r["vs_default"]) for key, r in cases.items()]


def main(argv=None):
    args = common.out_args(__doc__, argv, needs_cuda="the tuning (Triton kernels on the GPU)")
    meta = common.machine("cuda")
    rows = common.run_table("tune_group_norm", f"Triton group_norm_act plan sizes on {meta['device']} "
                            f"(torch {meta['torch']}), bf16", fill, meta, COLUMNS, args.out)
    print("\nfastest per case:")
    for key, name, of_copy, vs_default in best(rows):
        print(f"  {key}: {name}, {of_copy:.0%} of copy" + ("" if vs_default is None else f", {vs_default:.2f}x default"))


if __name__ == "__main__":
    main()
