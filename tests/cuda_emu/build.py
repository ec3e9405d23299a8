"""Builds csrc/cuda (bindings and kernels) against the CPU emulation of CUDA in emu.h.

The .cu sources are copied to build/cuda_emu/*.cpp with the two constructs C++ cannot express
rewritten: `kernel<<<grid, block, shared, stream>>>(args);` becomes
`::emu::launch(grid, block, shared, stream, [&] { kernel(args); });` and
`extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory. `#line`
keeps compiler messages pointing at csrc/cuda. The build is incremental (build/cuda_emu).
"""
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emu"
_LAUNCH = re.compile(r"^(\s*)(.+?)<<<(.+)>>>\((.*)\);\s*$", re.M)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def emulated_source(cu: Path) -> str:
    text = _DYNAMIC_SHARED.sub(r"\1* \2 = ::emu::dynamic_shared<\1>();", cu.read_text())
    text, launches = _LAUNCH.subn(r"\1::emu::launch(\3, [&] { \2(\4); });", text)
    if "<<<" in text:
        raise RuntimeError(f"{cu.name}: a kernel launch the emulation cannot rewrite (one launch per line)")
    return f'#line 1 "{cu}"\n{text}'


def load():
    """The extension module: noise_inject, noise_inject_backward, adv_step, group_norm_act,
    group_norm_act_backward with the signatures of the adv_dpm_C ops, on CPU tensors."""
    from torch.utils import cpp_extension

    # ninja as pip installs it beside this interpreter (the virtual environment may not be on PATH).
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    BUILD.mkdir(parents=True, exist_ok=True)
    sources = [str(HERE / "module.cpp")]
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        dst = BUILD / f"{cu.stem}.cpp"
        text = emulated_source(cu)
        if not dst.exists() or dst.read_text() != text:  # unchanged files keep their objects
            dst.write_text(text)
        sources.append(str(dst))
    return cpp_extension.load(
        "adv_dpm_cuda_emulated", sources, build_directory=str(BUILD),
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc" / "cuda")],
        # IEEE float arithmetic (no -ffast-math), as the kernels' __f*_rn intrinsics specify.
        extra_cflags=["-O1", "-Wno-unknown-pragmas"])
