"""Helpers of csrc/cuda/common.cuh checked on their own under the CPU emulation of tests/cuda_emu
(the op tests run the kernels that use them against the oracle, pair cpu-cuda_emulated)."""
import torch

from conftest import emulated_cuda_module


def test_fast_div_matches_integer_division():
    """FastDiv: n / d as a multiply-high, an add and a shift, for every n < 2^31 and divisor >= 1."""
    g = torch.Generator().manual_seed(0)
    n = torch.cat([torch.arange(5000), torch.randint(0, 2**31, (20000,), generator=g), torch.tensor([2**31 - 1])])
    divisors = [*range(1, 600), 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536, 2**31 - 1,
                *torch.randint(1, 2**31, (50,), generator=g).tolist()]
    module = emulated_cuda_module()
    for d in divisors:
        assert torch.equal(module.fast_div(n, d), n // d), f"divisor {d}"
