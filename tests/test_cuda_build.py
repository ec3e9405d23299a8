"""The CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90 without register spills.

Needs only nvcc (no GPU, no CUDA build of torch): each .cu is compiled on its own, in parallel,
with ptxas resource usage on. The test fails on a compile error or on any kernel with non-zero
spill stores/loads, and prints the registers/spills of every kernel (pytest -s, or on failure).
Skipped where nvcc is not on PATH.

Alongside, csrc/cuda/bindings.cpp is syntax-checked with the host C++ compiler against the
installed torch headers and the CUDA toolkit headers (a CPU build of torch ships the c10/cuda
headers but not the generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is supplied
when it is missing). Skipped where torch, a C++ compiler or the CUDA headers are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))

# torch.utils.cpp_extension builds as C++17 up to some release and as C++20 since: the kernels,
# which include no torch header, are held to C++17 (torch 2.4, the floor), the bindings to
# C++20 (which the headers of torch 2.14 need and those of 2.4 accept).
KERNEL_STD, BINDINGS_STD = "-std=c++17", "-std=c++20"
NVCC_FLAGS = [
    "-c", KERNEL_STD, "-O3",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "--resource-usage", "-Xptxas", "-warn-spills",
    "--threads", "2",  # the two -gencode targets of a file in parallel (no effect on the code)
    # What torch.utils.cpp_extension adds to every nvcc command of the real build: the kernels
    # must not rely on implicit __half / __nv_bfloat16 operators or conversions.
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL_WARNING = re.compile(r"ptxas warning.*spill", re.IGNORECASE)


def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> list[dict]:
    """One record per (kernel, arch): registers, stack frame, spill stores and loads (bytes)."""
    records: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0}
            records.append(current)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _REGS.search(line)
        if m:
            current["regs"] = int(m.group(1))
    return records


def _short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|adv_dpm_cuda::", "", name)
    name = re.sub(r"\(adv_dpm_cuda::\w+\)|\(\w+Params\)", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def _compile(nvcc: str, src: Path, outdir: str) -> tuple[Path, int, str]:
    obj = Path(outdir) / (src.stem + ".o")
    proc = subprocess.run([nvcc, *NVCC_FLAGS, str(src), "-o", str(obj)], capture_output=True, text=True,
                          cwd=str(CUDA_DIR))
    return src, proc.returncode, proc.stdout + proc.stderr


def _bindings_command(outdir: str) -> tuple[list[str] | None, str]:
    """The syntax-check command for bindings.cpp, or None and the reason it cannot run."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None, "no host C++ compiler on PATH"
    try:
        import sysconfig

        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means: cannot check here
        return None, f"torch is not importable ({exc})"
    cuda_home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    cuda_inc = Path(cuda_home) / "include"
    if not (cuda_inc / "cuda_runtime_api.h").exists():
        return None, f"no CUDA headers under {cuda_inc}"
    torch_incs = cpp_extension.include_paths()
    stub_dir = Path(outdir) / "stub"
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in torch_incs):
        (stub_dir / "c10/cuda/impl").mkdir(parents=True)
        (stub_dir / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, BINDINGS_STD, "-fsyntax-only", "-Wall", "-Wextra", "-DPy_LIMITED_API=0x030A0000",
           "-DADV_DPM_WITH_CUDA"]
    for inc in [str(stub_dir), *torch_incs, str(cuda_inc), sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    return cmd + [str(CUDA_DIR / "bindings.cpp")], ""


def _check_bindings(outdir: str) -> tuple[int | None, str]:
    if not (CUDA_DIR / "bindings.cpp").exists():
        return None, "there is no csrc/cuda/bindings.cpp"
    cmd, reason = _bindings_command(outdir)
    if cmd is None:
        return None, reason
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(CUDA_DIR))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled(request):
    """Compiles, in parallel, the sources whose tests were selected (and checks bindings.cpp when
    its test was selected): {file name: (exit status or None, output)}."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled here")
    items = request.session.items
    wanted = {item.callspec.params["source"] for item in items
              if hasattr(item, "callspec") and "source" in item.callspec.params}
    sources = [s for s in SOURCES if s.name in wanted]
    check_bindings = any(item.name == "test_bindings_syntax" for item in items)
    with tempfile.TemporaryDirectory(prefix="adv_dpm_nvcc_") as outdir:
        workers = max(1, min(len(sources) + int(check_bindings), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            bindings = pool.submit(_check_bindings, outdir) if check_bindings else None
            results = list(pool.map(lambda s: _compile(nvcc, s, outdir), sources))
            out = {src.name: (rc, log) for src, rc, log in results}
            out["bindings.cpp"] = bindings.result() if bindings is not None else (None, "not selected")
    return out


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_cu_compiles_without_spills(compiled, source):
    rc, log = compiled[source]
    assert rc == 0, f"nvcc failed on {source} (exit {rc}):\n{log}"
    records = parse_ptxas(log)
    assert records, f"no ptxas resource usage in the output for {source}:\n{log}"
    names = _demangle(sorted({r["kernel"] for r in records}))
    print(f"\n{source}: ptxas resource usage")
    print(f"  {'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for r in sorted(records, key=lambda r: (names[r["kernel"]], r["arch"])):
        print(f"  {r['arch']:6} {r['regs'] if r['regs'] is not None else '?':>4} {r['stack']:>5} "
              f"{r['spill_stores']:>8} {r['spill_loads']:>8}  {_short(names[r['kernel']])}")
    spilled = [f"{_short(names[r['kernel']])} [{r['arch']}]: {r['spill_stores']} B stores, "
               f"{r['spill_loads']} B loads" for r in records if r["spill_stores"] or r["spill_loads"]]
    warnings = [line for line in log.splitlines() if _SPILL_WARNING.search(line)]
    assert not spilled and not warnings, (
        f"register spills in {source}:\n" + "\n".join(spilled + warnings))


def test_bindings_syntax(compiled):
    rc, log = compiled["bindings.cpp"]
    if rc is None:
        pytest.skip(f"bindings.cpp cannot be checked here: {log}")
    assert rc == 0, f"bindings.cpp does not compile against the installed torch headers:\n{log}"


def test_parse_ptxas_detects_spills():
    """The parser itself (runs without nvcc): a spilling kernel is seen as one."""
    text = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers\n"
        "ptxas info    : Compiling entry function '_Z1jv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1jv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 48 bytes smem\n"
    )
    recs = parse_ptxas(text)
    assert [(r["kernel"], r["arch"], r["regs"], r["spill_stores"], r["spill_loads"]) for r in recs] == [
        ("_Z1kv", "sm_90", 255, 8, 4), ("_Z1jv", "sm_80", 32, 0, 0)]
