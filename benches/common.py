"""Shared benchmark machinery: timing, the copy ceiling, the machine tag, atomic result files.

Conventions: inputs and upstream gradients are made outside the timed region; every figure
is a median over repeated runs (torch.utils.benchmark, which synchronizes CUDA); bandwidth is
the op's minimal-bytes model (each input read once, each output written once) over the
median time, and "of copy" divides it by the bandwidth of a same-size copy measured in the
same run, the practical ceiling of a memory-bound op.
"""
import os

# Inductor compiles in a pool of worker processes that keep the CPU busy after compiling and
# stall the timed threads on a small machine; there, compile in-process instead.
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Idle OpenMP threads spin, and on a 2-core machine the spinning team of one provider (eager,
# inductor's code, our kernels) stalls the next one's threads by whole scheduler quanta (8 ms
# steps were measured here); passive waiting keeps the providers independent.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

from adv_dpm.utils import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn, min_run_time):
    fn()  # warm-up (compilation, autotuning, allocator)
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(nbytes, device, min_run_time):
    """Bytes per second of dst.copy_(src) moving ``nbytes`` in total (read + write)."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), min_run_time)


def peak_memory(fn, device):
    """Peak bytes allocated by one call beyond what was allocated before (CUDA only, else None)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def machine(device):
    """What ran the benchmark: device, versions, commit."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        commit = (commit + ("+dirty" if dirty else "")) or None
    except OSError:
        commit = None
    return {"device": name, "device_type": device, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "commit": commit, "threads": torch.get_num_threads()}


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join("" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def measure(fill, meta):
    """rows that ``fill(rows)`` appends; interrupted (Ctrl-C, ``timeout -s INT``), the rows
    measured so far, with ``meta['partial'] = True``."""
    rows = []
    try:
        fill(rows)
    except KeyboardInterrupt:
        meta["partial"] = True
        print("\ninterrupted: keeping the rows measured so far", flush=True)
    return rows


def save(name, meta, rows, columns, out_dir=RESULTS):
    """benches/results/<name>-<device>-<date>.{json,md}; returns the markdown path."""
    tag = "".join(c if c.isalnum() else "-" for c in meta["device"].split("(")[0].strip()).strip("-").lower()
    if meta["device_type"] == "cpu":
        tag += f"-{meta['threads']}t"
    stem = Path(out_dir) / f"{name}-{tag}-{meta['date']}"
    atomic_write(stem.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"# {name}\n\n{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
              f"CUDA {meta['cuda']}, commit {meta['commit']}"
              f"{' (interrupted: partial)' if meta.get('partial') else ''}\n\n")
    atomic_write(stem.with_suffix(".md"), header + markdown_table(rows, columns) + "\n")
    return stem.with_suffix(".md")
