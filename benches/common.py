"""Shared benchmark machinery: timing, the copy ceiling, the machine tag, atomic result files.

Conventions: inputs and upstream gradients are made outside the timed region; every figure
is a median over repeated runs (torch.utils.benchmark, which synchronizes CUDA); bandwidth is
the op's minimal-bytes model (each input read once, each output written once) over the
median time, and "of copy" divides it by the bandwidth of a same-size copy measured in the
same run, the practical ceiling of a memory-bound op.

On CUDA each call is timed twice: as called from Python (host dispatch included) and as the
GPU work alone, replaying the calls captured in a CUDA graph. A small op on a fast GPU is
host-bound, so the first measures dispatch overhead; bandwidth, copy ratios and speed-ups
use the second there.
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

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from adv_dpm.ops import use_backend  # noqa: E402
from adv_dpm.utils import atomic_write, cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def retain_freed_memory():
    """Keep freed host memory in the process (glibc: trim and mmap thresholds raised to 1 GiB),
    as a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator) does. With glibc's
    defaults, freeing a few MiB-sized tensors returns their pages to the OS and the next
    allocation faults them in again: one fused GroupNorm forward+backward at 32x128x16x16 took
    about 2000 page faults and 3.6x its time. The same setting holds for every provider.
    ``ADV_DPM_BENCH_MALLOC=default`` keeps glibc's defaults. Returns what is in force."""
    if os.environ.get("ADV_DPM_BENCH_MALLOC") == "default":
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1:
            return "freed memory retained (glibc trim/mmap thresholds 1 GiB)"
    except (OSError, AttributeError, TypeError):
        pass
    return "default (mallopt unavailable)"


ALLOCATOR = retain_freed_memory()


def median_seconds(fn, min_run_time):
    """Median seconds per call of fn over repeated runs of at least ``min_run_time`` in all."""
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=min_run_time).median


def graph_seconds(fn, min_run_time, calls=10):
    """Seconds per call of fn's GPU work alone: ``calls`` calls captured in one CUDA graph and
    replayed back to back (host dispatch is out; the gaps between kernels stay in). None, with
    the reason printed, where fn cannot be captured. Captures on the current stream, where fn's
    inputs (and any autograd graph it runs backward through) were made: see ``measure``."""
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():  # the legacy default stream cannot capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream
        fn()
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    except Exception as e:  # an optional figure: the row keeps its other timings
        print(f"  (not capturable in a CUDA graph, no GPU-only time: {str(e).splitlines()[0]})", flush=True)
        return None
    return median_seconds(graph.replay, min_run_time) / calls


def compare(fns, device, min_run_time, rounds=5):
    """{name: timing} of the callables ``fns`` ({name: fn}) measured side by side: ``rounds``
    rounds each time every fn in turn for min_run_time / rounds, and a figure is the median
    over the rounds, so a drift of the machine's speed (other tenants, clocks) reaches every
    provider alike instead of whichever ran during it. A timing is {'us': median µs as called,
    'gpu_us': µs of the GPU work alone (CUDA, else None), 'basis_s': the seconds rates use,
    the GPU-only time where there is one}."""
    for fn in fns.values():
        fn()  # warm-up (compilation, autotuning, allocator)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(median_seconds(fn, min_run_time / rounds))
    timings = {}
    for name, fn in fns.items():
        wall = statistics.median(samples[name])
        gpu = graph_seconds(fn, min_run_time) if device == "cuda" else None
        timings[name] = {"us": wall * 1e6, "gpu_us": None if gpu is None else gpu * 1e6, "basis_s": gpu or wall}
    return timings


def short_kernel_name(name):
    """A GPU kernel's name without return type, namespaces, parameter list and nested template
    arguments: 'gn_fwd_tile_kernel<bf16,8,2,0>', 'vectorized_elementwise_kernel'."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    base, bracket, args = name.partition("<")
    base = base.rsplit("::", 1)[-1].strip()
    args = args.rstrip(" >").replace("__nv_bfloat16", "bf16").replace("__half", "half").replace(" ", "")
    return f"{base}<{args}>" if bracket and not any(c in args for c in "<:(") else base


def kernel_breakdown(fn, calls=5):
    """The GPU kernels one call of fn launches, from the profiler over ``calls`` calls:
    [(name, median µs, launches per call)] in first-launch order (see ``summarize_kernels``).
    Profile in a process that captures no CUDA graph: CUPTI and graph capture have crashed
    each other in some CUDA versions."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    return summarize_kernels([(short_kernel_name(e.name), e.time_range.elapsed_us()) for e in kernels], calls)


def summarize_kernels(kernels, calls):
    """[(name, median µs, launches per call)] from the (name, µs) of ``calls`` calls' kernels in
    launch order, one entry per kernel name."""
    if not kernels:
        raise ValueError("the profiler saw no GPU kernels")
    times = {}
    for name, us in kernels:
        times.setdefault(name, []).append(us)
    return [(name, statistics.median(t), len(t) / calls) for name, t in times.items()]


def kernels_text(summary):
    """'name µs, name µs xN, ...' (xN: launched N times a call)."""
    return ", ".join(f"{name} {us:.1f}" + (f" x{n:g}" if n != 1 else "") for name, us, n in summary)


def copy_of(nbytes, device):
    """A same-size copy, dst.copy_(src) moving ``nbytes`` in all (read + write): the practical
    ceiling of a memory-bound op."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@contextlib.contextmanager
def module_globals(module, overrides):
    """``module``'s globals set to ``overrides`` ({name: value}) inside the block, restored after,
    also on an error: a launcher timed under other sizes than its defaults."""
    saved = {name: getattr(module, name) for name in overrides}
    try:
        for name, value in overrides.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def forced(backend, factory, *args):
    """The callable ``factory(*args)``, built and run with the fused ops' backend ``backend``
    forced (None: automatic). Building matters too: an autograd graph made there runs its
    backward on the backend of its forward."""
    with use_backend(backend):
        fn = factory(*args)

    def run():
        with use_backend(backend):
            return fn()
    return run


def rate_row(t, nbytes, copy_bw, **fields):
    """A result row from a timing ``t`` of ``compare``: times, GB/s and fraction of copy bandwidth."""
    sec = t["basis_s"]
    return dict(fields, us=t["us"], gpu_us=t["gpu_us"], gbps=nbytes / sec / 1e9, of_copy=nbytes / sec / copy_bw,
                bytes=nbytes)


def device_columns(columns, device):
    """The table columns for ``device``: the GPU-side timings (gpu_*) on CUDA only."""
    return [c for c in columns if device == "cuda" or not c[0].startswith("gpu_")]


def add_speedups(rows, eager, compiled):
    """Each row's speed-up over the rows of providers ``eager`` and ``compiled`` (same basis)."""
    sec = {r["provider"]: r["gpu_us"] or r["us"] for r in rows}
    for r in rows:
        r["vs_eager"] = sec[eager] / sec[r["provider"]]
        r["vs_compile"] = sec[compiled] / sec[r["provider"]]


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
        name = f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        # Changes to result files (an earlier benchmark of the same run) do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benches/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        commit = (commit + ("+dirty" if dirty else "")) or None
    except OSError:
        commit = None
    return {"device": name, "device_type": device, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "commit": commit, "threads": torch.get_num_threads(),
            "host_allocator": ALLOCATOR}


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join("" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def print_rows(rows, columns):
    """The rows as markdown table lines under a header printed earlier."""
    print(markdown_table(rows, columns).split("\n", 2)[2], flush=True)


def measure(fill, meta):
    """rows that ``fill(rows)`` appends; interrupted (Ctrl-C, ``timeout -s INT``), the rows
    measured so far, with ``meta['partial'] = True``."""
    rows = []
    # On CUDA everything runs on a side stream: the backward of a forward run there runs there
    # too, so ``graph_seconds`` can capture it (the legacy default stream cannot capture).
    side = torch.cuda.stream(torch.cuda.Stream()) if meta["device_type"] == "cuda" else contextlib.nullcontext()
    try:
        with side:
            fill(rows)
    except KeyboardInterrupt:
        meta["partial"] = True
        print("\ninterrupted: keeping the rows measured so far", flush=True)
    return rows


def out_args(doc, argv, needs_cuda=None):
    """The arguments (--out) of a benchmark whose options are the results folder alone;
    ``needs_cuda``: what needs a CUDA device, an error without one."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if needs_cuda and not torch.cuda.is_available():
        parser.error(f"{needs_cuda} needs a CUDA device (torch.cuda.is_available() is False)")
    return args


def run_table(name, title, fill, meta, columns, out_dir=RESULTS):
    """A benchmark's whole run: prints ``title`` and the table's header, measures the rows that
    ``fill(rows)`` appends (and prints), saves them (``save``); returns the rows."""
    print(f"# {title}\n")
    print(markdown_table([], columns))
    rows = measure(fill, meta)
    path = save(name, meta, rows, columns, out_dir)
    print(f"\nresults: {path} (and .json)")
    return rows


def save(name, meta, rows, columns, out_dir=RESULTS):
    """benches/results/<name>-<device>-<date>.{json,md}; returns the markdown path."""
    tag = "".join(c if c.isalnum() else "-" for c in meta["device"].split("(")[0].strip()).strip("-").lower()
    if meta["device_type"] == "cpu":
        tag += f"-{meta['threads']}t"
    stem = Path(out_dir) / f"{name}-{tag}-{meta['date']}"
    atomic_write(stem.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"# {name}\n\n{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
              f"CUDA {meta['cuda']}, commit {meta['commit']}; host allocator: {meta.get('host_allocator', 'default')}"
              f"{' (interrupted: partial)' if meta.get('partial') else ''}\n\n")
    atomic_write(stem.with_suffix(".md"), header + markdown_table(rows, columns) + "\n")
    return stem.with_suffix(".md")
