"""The Triton kernels compile for the H100 (sm_90) without register spills, with no GPU.

The interpreter that runs the Triton kernels on CPU in the other tests executes them as numpy
code: it accepts programs that the GPU compiler rejects and says nothing about registers. Here a
subprocess (without TRITON_INTERPRET, so the kernels are real JIT functions) calls the Triton
launchers of kernels/ on CPU tensors at the shapes of the benchmarks, with JITFunction.run
replaced by a recorder. Every recorded specialization is then compiled ahead of time for a CUDA
sm_90 target (triton.compile: Triton's own LLVM and ptxas, no driver), with the argument
specialization a launch would get (16-byte aligned pointers and multiples of 16 marked
divisible, integers equal to 1 made constants), and the cubin's resource usage is read with the
cuobjdump bundled with Triton. A kernel that does not compile, or that uses local memory
(register spills), fails its family's test. Skipped where Triton's NVIDIA tools are missing, or
where Triton is older than the compile API used here.

Run as a script (`python tests/test_triton_build.py`) it prints one JSON line per kernel.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90
FAMILIES = ("noise_inject", "adv_step", "group_norm_act")


def _cuobjdump() -> Path | None:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.exists() else None


# ------------------------------------------------------------------------------------------------
# The subprocess: record the launches, compile them.
# ------------------------------------------------------------------------------------------------
def _launches():
    """{family: [(JITFunction, args, kwargs)]} of the launchers at benchmark-like calls."""
    import torch
    from triton.runtime.jit import JITFunction

    from kernels import adv_step as ka
    from kernels import group_norm_act as kg
    from kernels import noise_inject as kn

    recorded = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: recorded.append((self, args, kwargs))
    out = {}

    def take(family):
        out.setdefault(family, []).extend(recorded)
        recorded.clear()

    for shape, dtype in [((128, 3, 32, 32), torch.float32), ((64, 3, 64, 64), torch.bfloat16),
                         ((2, 3, 96, 96), torch.float32)]:
        x = torch.empty(shape, dtype=dtype)
        cl = x.contiguous(memory_format=torch.channels_last)
        c = torch.rand(shape[0])
        for mode in (0, 2):
            kn.noise_inject(x, x, c, c, x, mode)
            kn.noise_inject_backward(x, x, x, x, c, c, x, mode, True)
        kn.noise_inject(x, cl, c, c, None, 0)
        kn.noise_inject_backward(x, cl, x, x, c, c, None, 0, False)
        take("noise_inject")
        ka.adv_step(x, x, None, None, None, None, 0.1, 1.0, None, 0)
        ka.adv_step(x, x, x, x, x, c, 0.1, 1.0, None, 2)
        ka.adv_step(x, cl, None, x, cl, c, 0.1, 1.0, torch.ones(1), 1)   # fp16's loss scale
        take("adv_step")

    # The ADM shapes of the GroupNorm benchmark and a small batch (the SPLIT plan), bf16 with fp32
    # parameters; one fp32 NCHW and one channels_last case.
    for shape, dtype, layout in [((64, 192, 64, 64), torch.bfloat16, "nchw"), ((128, 128, 32, 32), torch.bfloat16, "nchw"),
                                 ((32, 128, 16, 16), torch.bfloat16, "nchw"), ((128, 512, 4, 4), torch.bfloat16, "nchw"),
                                 ((2, 256, 64, 64), torch.bfloat16, "nchw"), ((2, 256, 64, 64), torch.float32, "cl"),
                                 ((128, 128, 32, 32), torch.float32, "cl")]:
        x = torch.empty(shape, dtype=dtype)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        n, ch = shape[:2]
        w, b = torch.ones(ch), torch.zeros(ch)
        sc, sh = torch.zeros(n, ch), torch.zeros(n, ch)
        for params in [(w, b, sc, sh), (None, None, None, None)]:
            _, mean, rstd = kg.group_norm_act(x, *params, 32, 1e-5, "silu" if params[0] is not None else None)
            kg.group_norm_act_backward(x, x, mean, rstd, *params, 32, "silu")
    take("group_norm_act")
    return out


def _specialize(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of a launch, as Triton's launcher specializes it."""
    import torch

    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
             torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "u1"}
    option_names = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
    values = dict(zip((p.name for p in fn.params), args))
    values.update({k: v for k, v in kwargs.items() if k not in option_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        divisible = False
        if p.is_constexpr or (type(v) is int and v == 1):
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name], divisible = "*" + types[v.dtype], v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name] = "u1"
        elif isinstance(v, int):
            signature[p.name], divisible = ("i32" if -2**31 <= v < 2**31 else "i64"), v % 16 == 0
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k in option_names}
    return signature, constexprs, attrs, options


def _compile_all():
    """Prints one JSON line per distinct specialization: family, kernel, constexprs, and the
    cubin's resource usage (REG, STACK, LOCAL, ...) or the compile error."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = _cuobjdump()
    target = GPUTarget("cuda", ARCH, 32)
    for family, launches in _launches().items():
        seen = set()
        for fn, args, kwargs in launches:
            signature, constexprs, attrs, options = _specialize(fn, args, kwargs)
            key = (fn.__name__, json.dumps(signature), json.dumps(constexprs), json.dumps(sorted(attrs)),
                   json.dumps(options))
            if key in seen:
                continue
            seen.add(key)
            row = dict(family=family, kernel=fn.__name__, constexprs=constexprs, options=options)
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                        target=target, options=options)
            except Exception as e:  # reported as this kernel's failure
                row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            else:
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                                           check=True).stdout
                line = next(ln for ln in usage.splitlines() if "REG:" in ln)
                row["usage"] = dict(item.split(":") for item in line.split())
            print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    if _cuobjdump() is None:
        pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    import triton
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"Triton {triton.__version__} predates the ASTSource(constexprs=...) of this ahead-of-time compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=1200)
    assert proc.returncode == 0, f"recording or compiling the Triton kernels failed:\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernels_compile_without_spills(compiled, family):
    rows = [r for r in compiled if r["family"] == family]
    assert rows, f"no {family} kernel was launched"
    print(f"\n{family}: sm_{ARCH} resource usage")
    for r in rows:
        u = r.get("usage", {})
        print(f"  {u.get('REG', '-'):>4} regs {u.get('LOCAL', '-'):>4} local  {r['kernel']} "
              f"{r['constexprs']} {r['options']}")
    failed = [f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "Triton kernels that do not compile for sm_90:\n" + "\n".join(failed)
    spilled = [f"{r['kernel']} {r['constexprs']} {r['options']}: {r['usage']}" for r in rows
               if int(r["usage"]["LOCAL"]) or int(r["usage"]["STACK"])]
    assert not spilled, "Triton kernels that use local memory (spills):\n" + "\n".join(spilled)


if __name__ == "__main__":
    _compile_all()
