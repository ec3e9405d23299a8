"""benches/common.py's GPU kernel breakdown and benches/bench_kernels.py (the profiling itself needs a GPU)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import bench_group_norm  # noqa: E402
import bench_kernels  # noqa: E402
import bench_ops  # noqa: E402
import common  # noqa: E402


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
