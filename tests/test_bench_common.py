"""benches/common.py's GPU kernel breakdown, benches/bench_kernels.py and benches/tune_group_norm.py
(the profiling and the timings themselves need a GPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import bench_group_norm  # noqa: E402
import bench_host  # noqa: E402
import bench_kernels  # noqa: E402
import bench_ops  # noqa: E402
import common  # noqa: E402
import tune_group_norm  # noqa: E402

from adv_dpm.ops import reference  # noqa: E402


@pytest.mark.parametrize("name,short", [
    ("void adv_dpm_cuda::(anonymous namespace)::gn_fwd_tile_kernel<__nv_bfloat16, 8, 2, 0>"
     "(adv_dpm_cuda::GroupNormActParams, adv_dpm_cuda::(anonymous namespace)::TileGeom)",
     "gn_fwd_tile_kernel<bf16,8,2,0>"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
     "at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, std::array<char*, 3ul>)",
     "vectorized_elementwise_kernel"),
    ("triton_per_fused_native_group_norm_silu_0", "triton_per_fused_native_group_norm_silu_0"),
    ("Memset (Device)", "Memset"),
])
def test_kernel_names_keep_the_kernel_and_its_simple_template_arguments(name, short):
    assert common.short_kernel_name(name) == short


def test_kernel_summary_gives_medians_in_launch_order_and_launches_per_call():
    kernels = [("apply", 2.0), ("stats", 5.0), ("stats", 1.0), ("apply", 3.0), ("stats", 6.0), ("stats", 1.2)]
    summary = common.summarize_kernels(kernels, calls=2)
    assert summary == [("apply", 2.5, 1.0), ("stats", 3.1, 2.0)]
    assert common.kernels_text(summary) == "apply 2.5, stats 3.1 x2"
    with pytest.raises(ValueError, match="no GPU kernels"):
        common.summarize_kernels([], calls=2)


def test_the_two_kernel_step_provider_restores_the_per_sample_limit():
    kernels = pytest.importorskip("adv_dpm.kernels.adv_step")
    limit = kernels.SAMPLE_MAX
    with pytest.raises(RuntimeError, match="stop"):
        with bench_ops.triton_two_kernel_step():
            assert kernels.SAMPLE_MAX == 0   # the launcher reads it at every call
            raise RuntimeError("stop")
    assert kernels.SAMPLE_MAX == limit


def test_the_kernel_table_covers_every_op_and_backend(monkeypatch):
    """bench_kernels' rows, with the profiler replaced by a stand-in that runs each call once (on
    CPU: the C++ backend, at small shapes)."""
    monkeypatch.setattr(bench_group_norm, "GPU_SHAPES", [(2, 64, 4, 4)])
    monkeypatch.setattr(bench_ops, "SHAPES", {"imagenet64": (2, 3, 4, 4), "cifar10": (3, 1, 2, 2)})
    ran = []
    monkeypatch.setattr(common, "kernel_breakdown",
                        lambda fn: (ran.append(fn()), [("apply", 2.0, 1.0), ("stats", 1.5, 2.0)])[1])
    rows = []
    bench_kernels.fill(rows, device="cpu")
    ours = bench_ops.kernel_backends("cpu")
    ops = ["group_norm_act fwd+bwd"] + [op for _ in bench_kernels.OPS_SHAPES for op in bench_ops.cases(
        bench_ops.inputs((1, 1, 1, 1), torch.float32, "cpu"))]
    assert [(r["op"], r["provider"]) for r in rows] == [(op, b) for op in ops for b in ours]
    assert len(ran) == len(rows) and rows[0]["total_us"] == 5.0 and rows[0]["launches"] == 3
    assert rows[0]["kernels"] == "apply 2.0, stats 1.5 x2" and rows[0]["shape"] == "2x64x4x4"


def test_a_row_whose_profile_fails_says_why(monkeypatch):
    def failing(fn):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\ndetails")
    monkeypatch.setattr(common, "kernel_breakdown", failing)
    r = bench_kernels.row("adv_step", (2, 3), torch.float32, "cuda", lambda: None)
    assert r["kernels"] == "no breakdown: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" and "total_us" not in r


def test_every_plan_candidate_changes_what_some_case_launches():
    """A candidate that launches the defaults' kernels at every case would spend GPU time for nothing."""
    for name, overrides in tune_group_norm.CANDIDATES.items():
        if name == "default":
            continue
        assert any(tune_group_norm.launch_plan(shape, layout, p, overrides)
                   != tune_group_norm.launch_plan(shape, layout, p, {})
                   for shape, layout in tune_group_norm.CASES for p in tune_group_norm.PASSES), name


def test_plan_sizes_are_restored_after_a_candidate_even_when_it_fails():
    kernels = tune_group_norm.kernels
    before = (kernels.TILE, kernels.WARPS)
    with pytest.raises(RuntimeError, match="launch failed"):
        with tune_group_norm.plan_sizes({"TILE": 64, "WARPS": ((math.inf, 1),)}):
            assert (kernels.TILE, kernels._warps(4096)) == (64, 1)
            raise RuntimeError("launch failed")
    assert (kernels.TILE, kernels.WARPS) == before


def test_the_tuning_table_times_each_distinct_plan_and_keeps_going_past_a_failure(monkeypatch):
    """tune_group_norm's rows on CPU (Triton under its interpreter), one small case whose plan the
    candidates change; the timing is replaced by one call of each provider. Each candidate's
    output is checked against the float64 oracle while its plan sizes are set."""
    kernels = tune_group_norm.kernels
    monkeypatch.setattr(tune_group_norm, "CASES", [((2, 64, 4, 4), "nchw")])
    monkeypatch.setattr(tune_group_norm, "CANDIDATES", {
        "default": {}, "split": {"FUSED_MAX": 16}, "fewer warps": {"WARPS": ((math.inf, 1),)},
        "same as default": {"LOOP_MAX_BYTES": 2 * kernels.LOOP_MAX_BYTES}, "broken": {"FUSED_MAX": 16, "TILE": 8}})
    x, p, grad_y = bench_group_norm.inputs((2, 64, 4, 4), torch.bfloat16, "cpu")
    expected = reference.group_norm_act(x.double(), *(p[k].double() for k in ("weight", "bias", "scale", "shift")),
                                        bench_group_norm.GROUPS, 1e-5, 1)[0]
    outputs, planned = {}, []  # by candidate: its forward's output and plan; the plans launched
    real_pass, real_plan = tune_group_norm.candidate_pass, kernels._group_plan
    monkeypatch.setattr(kernels, "_group_plan", lambda *a: planned.append(real_plan(*a)) or planned[-1])

    def checked_pass(name, name_pass, *args):
        if name == "broken":
            raise RuntimeError("out of resources\ndetails")
        run = real_pass(name, name_pass, *args)
        if name_pass == "fwd":
            planned.clear()
            outputs[name] = (run(), planned[0][0])
        return run
    monkeypatch.setattr(tune_group_norm, "candidate_pass", checked_pass)
    fake_times = {"copy": 1.0, "default": 2.0, "split": 4.0, "fewer warps": 1.6}
    monkeypatch.setattr(common, "compare", lambda fns, device, min_run_time: {
        name: {"us": fake_times[name], "gpu_us": None, "basis_s": fake_times[name] * 1e-6} for name in fns})
    rows = []
    tune_group_norm.fill(rows, device="cpu")
    assert [(r["pass"], r["candidate"]) for r in rows] == [
        (p_, c) for p_ in ("fwd", "bwd") for c in ("default", "split", "fewer warps", "broken")]
    fwd = {r["candidate"]: r for r in rows if r["pass"] == "fwd"}
    assert fwd["default"]["plan"].startswith("one") and fwd["split"]["plan"].startswith("split")
    assert fwd["fewer warps"]["plan"].endswith("w1")
    assert fwd["split"]["of_copy"] == pytest.approx(0.25) and fwd["split"]["vs_default"] == pytest.approx(0.5)
    assert fwd["broken"]["error"] == "RuntimeError: out of resources" and "of_copy" not in fwd["broken"]
    assert {name: plan for name, (_, plan) in outputs.items()} == {"default": "one", "split": "split",
                                                                    "fewer warps": "one"}  # what ran
    for name, (y, _) in outputs.items():
        torch.testing.assert_close(y.double(), expected, atol=0.05, rtol=0.02, msg=name)
    assert tune_group_norm.best(rows)[0] == ("2x64x4x4 nchw fwd", "fewer warps", pytest.approx(0.625), pytest.approx(1.25))


def test_the_launcher_benchmark_times_every_triton_launcher_without_a_gpu(tmp_path):
    """bench_launchers runs as a script (real Triton JIT functions, not the interpreter, whose
    launch the script replaces) and leaves a row per launcher with its kernels counted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benches" / "bench_launchers.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("bench_launchers-*.json")).read_text())["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"group_norm_act", "group_norm_act_backward", "noise_inject", "noise_inject_backward",
                   "adv_step", "adv_step_inject"}
    assert all(r["launches"] >= 1 and r["us"] > 0 for r in rows)


def test_the_host_time_benchmark_times_each_provider_forward_and_with_its_backward():
    """Each provider computes what its op computes (scale and shift are zeros) and gets both
    timings."""
    made = bench_host.providers("cpu")
    for (op, provider), (fn, args) in made.items():
        fused, fused_args = made[(op, f"adv_dpm.{op}")]
        torch.testing.assert_close(fn(*args), fused(*fused_args), msg=lambda m: f"{op}, {provider}: {m}")
    rows = []
    bench_host.fill(rows, "cpu", min_run_time=0.02)
    assert [(r["op"], r["provider"]) for r in rows] == list(made)
    assert all(r["forward_us"] > 0 and r["both_us"] > 0 for r in rows)
