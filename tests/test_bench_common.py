"""benches/common.py: the GPU kernel breakdown's names and summary (the profiling itself needs a GPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
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
    assert common.summarize_kernels(kernels, calls=2) == "apply 2.5, stats 3.1 x2"
    with pytest.raises(ValueError, match="no GPU kernels"):
        common.summarize_kernels([], calls=2)
