"""The CPU GroupNorm kernel's form for compilers without GCC's vector extensions
(ADV_DPM_GN_NO_VECTOR_EXT: at::vec::Vectorized instead) compiles, at the SIMD level this machine
builds with and at none: torch's Vectorized differs per level (its AVX2 and AVX-512 forms have no
lane subscript). A syntax-only compile with the flags of setup.py, a few seconds each; skipped
without a C++ compiler on PATH."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def setup_module_flags():
    spec = importlib.util.spec_from_file_location("adv_dpm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # defines the flags; setup() runs only as __main__
    return module


SETUP = setup_module_flags()


@pytest.mark.parametrize("simd", sorted({"none", SETUP.cpu_simd()}))
def test_group_norm_kernel_compiles_without_vector_extensions(simd):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    includes = [arg for d in cpp_extension.include_paths() for arg in ("-isystem", d)]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DADV_DPM_GN_NO_VECTOR_EXT", *SETUP.SIMD_FLAGS[simd], *includes,
           str(ROOT / "csrc" / "cpu" / "group_norm_act.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
