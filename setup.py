"""Build adv_dpm._C: the C++ CPU kernels always, the CUDA kernels against a CUDA build of torch.

ADV_DPM_BUILD_CUDA=1 forces the CUDA kernels (error if impossible), =0 skips them;
unset, they are built when torch has CUDA and nvcc is found. ADV_DPM_CPU_SIMD=none|avx2|avx512 sets
the SIMD level of the CPU kernels (default: the level torch uses on the build machine).
ADV_DPM_BUILD_EXT=0 installs the Python package alone: an editable install builds the extension
from scratch in a throwaway folder every time, so `make` installs with it and then builds the
extension in place (`setup.py build_ext --inplace`), incrementally in build/.
"""
import glob
import os
import platform
import shlex
import subprocess
import sys
import sysconfig

from setuptools import setup
from torch.utils import cpp_extension


def cuda_wanted() -> bool:
    flag = os.environ.get("ADV_DPM_BUILD_CUDA", "").strip()
    possible = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if flag == "1" and not possible:
        raise RuntimeError("ADV_DPM_BUILD_CUDA=1 but torch is a CPU build or nvcc/CUDA_HOME was not found")
    return possible if flag == "" else flag == "1"


def openmp_flags() -> list:
    """at::parallel_for is header code that runs serially unless compiled with OpenMP, like torch.

    The module then needs libgomp.so.1, which resolves to the one torch has already loaded.
    """
    import torch
    return ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


# at::vec::Vectorized picks its implementation at compile time: without these flags the CPU
# kernels get its generic (barely vectorized) version.
SIMD_FLAGS = {
    "none": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_simd() -> str:
    """SIMD level of the CPU kernels: ADV_DPM_CPU_SIMD=none|avx2|avx512 (none: runs on any x86-64 CPU).

    Unset, the level torch uses on the build machine; set it when building for other machines.
    """
    flag = os.environ.get("ADV_DPM_CPU_SIMD", "").strip().lower()
    if flag:
        if flag not in SIMD_FLAGS:
            raise RuntimeError(f"ADV_DPM_CPU_SIMD must be one of {sorted(SIMD_FLAGS)}, got {flag!r}")
        return flag
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    import torch
    return {"AVX2": "avx2", "AVX512": "avx512"}.get(torch.backends.cpu.get_cpu_capability(), "none")


def cxx_is_clang() -> bool:
    """Whether the C++ compiler (CXX, else the one Python was built with) is clang (macOS's c++ is)."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        version = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in version.lower()


def extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/autograd/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -g0: Python's own flags ask for debug info, which makes the CPU kernels compile 1.6x slower.
    # The two warnings off fire only inside torch's vectorized headers (its `#pragma unroll`, and
    # a false maybe-uninitialized in gcc's AVX-512 intrinsics): 30,000 lines of build log, none ours.
    # (clang has no maybe-uninitialized, and would warn of the unknown option at every file.)
    cxx = ["-O3", "-g0", "-Wno-unknown-pragmas", *([] if cxx_is_clang() else ["-Wno-maybe-uninitialized"]),
           "-fvisibility=hidden", *openmp_flags(), *SIMD_FLAGS[cpu_simd()]]
    link = openmp_flags()
    if not cuda_wanted():
        return cpp_extension.CppExtension("adv_dpm._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=link, py_limited_api=True)
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    arches = os.environ.get("ADV_DPM_CUDA_ARCH", "80;90").split(";")
    nvcc = ["-O3", "-lineinfo"]  # the C++ standard: torch's default for its version
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return cpp_extension.CUDAExtension("adv_dpm._C", sources, define_macros=[("ADV_DPM_WITH_CUDA", None)],
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
                                       py_limited_api=True)


if __name__ == "__main__":  # (as pip and setuptools run it; tests import the flags above)
    setup(
        ext_modules=[] if os.environ.get("ADV_DPM_BUILD_EXT", "").strip() == "0" else [extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},  # the stable ABI of requires-python's floor
    )
