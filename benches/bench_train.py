"""Time per optimizer update of standard training, free AT and PGD AT (K=3), with the fused ops
and with plain PyTorch ops (the reference backend), for the same model and batch, side by side.

    python benches/bench_train.py [--device cpu|cuda] [--model digits-tiny] [--batch 64]
                                  [--objective diffusion|cd|ct] [--compile [--compile-mode M]] [--out DIR]

Free AT should cost about what standard training costs per update (its perturbation is
free); PGD AT about K times as much. Each mode is timed in rounds alternating with standard
training, fused with plain ops; "x standard" is the median of the rounds' ratios. On CUDA the default is the paper's CIFAR-10 model in bf16.
``--objective cd|ct`` times consistency distillation (from a teacher of the same architecture)
or consistency training instead, written as bench_train_<objective>-*.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from adv_dpm.ops import use_backend  # noqa: E402
from adv_dpm.train import COMPILE_MODES, TrainConfig, Trainer  # noqa: E402

COLUMNS = [("model", "model", "{}"), ("objective", "objective", "{}"), ("mode", "mode", "{}"), ("ops", "ops", "{}"),
           ("ms_per_update", "ms / update", "{:.2f}"), ("gpu_busy_ms", "GPU busy ms", "{:.2f}"),
           ("vs_standard", "x standard", "{:.3f}"),
           ("fused_speedup", "fused speed-up", "{:.2f}"), ("peak_mib", "peak MiB", "{:.0f}")]
OPS = {"fused": None, "plain": "reference"}  # backend forced for each: automatic, or plain PyTorch


def seconds_per_update(trainer, batches):
    """Wall seconds per optimizer update over ``batches`` batches."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start, step = time.perf_counter(), trainer.step
    for _ in range(batches):
        trainer.train_batch()
    sync()
    return (time.perf_counter() - start) / (trainer.step - step)


def gpu_busy_per_update(trainer):
    """Seconds of GPU kernels and copies per optimizer update over one batch (the profiler's
    device events); beside the wall time it tells a host-bound step from a GPU-bound one."""
    if trainer.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    step = trainer.step
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.train_batch()
            torch.cuda.synchronize()
        busy_us = sum(e.self_device_time_total for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # an optional figure: the row keeps its wall time
        print(f"  (no GPU-busy time: {str(e).splitlines()[0]})", flush=True)
        return None
    return busy_us / 1e6 / (trainer.step - step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="preset (default digits-tiny on CPU, cifar10 on CUDA)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--batches", type=int, default=None, help="batches per timing")
    parser.add_argument("--repeats", type=int, default=None, help="timings per case (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--objective", default="diffusion", choices=["diffusion", "cd", "ct"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as train --compile does")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="its mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    model = args.model or ("cifar10" if gpu else "digits-tiny")
    data = args.data or ("npz:" + str(random_npz(3, 32)) if gpu else "digits")
    batch = args.batch or (128 if gpu else 64)
    precision = args.precision or ("bf16" if gpu else "fp32")
    batches = args.batches or (4 if gpu else 6)
    args.repeats = args.repeats or 5
    meta = common.machine(args.device)
    print(f"# training step on {meta['device']}: {model} ({args.objective}), batch {batch}, {precision}"
          f"{f', compiled ({args.compile_mode})' if args.compile else ''}; medians of {args.repeats}\n")
    columns = common.device_columns(COLUMNS, args.device)
    print(common.markdown_table([], columns))

    def fill(rows):
        with tempfile.TemporaryDirectory() as tmp:
            settings = dict(data=data, model=model, adv_steps=3, batch_size=batch, precision=precision,
                            device=args.device, channels_last=gpu, compile=args.compile,
                            compile_mode=args.compile_mode)
            if args.objective == "cd":   # a teacher of the same architecture (its weights do not change the time)
                Trainer(TrainConfig(**settings, mode="standard", run_dir=f"{tmp}/teacher")).save()
                settings.update(objective="cd", teacher=f"{tmp}/teacher/checkpoint.pt")
            elif args.objective == "ct":
                settings.update(objective="ct")
            def build(mode):
                trainers = {}
                for ops, backend in OPS.items():
                    torch.manual_seed(0)
                    with use_backend(backend):
                        trainers[ops] = Trainer(TrainConfig(**settings, mode=mode, run_dir=f"{tmp}/{ops}-{mode}"))
                        for _ in range(2):  # warm-up: allocator, cuDNN algorithm choice
                            trainers[ops].train_batch()
                return trainers

            standard = build("standard")
            for mode in ("standard", "free_at", "pgd_at"):
                trainers = standard if mode == "standard" else build(mode)
                # Each mode alternates with standard training, fused with plain, so a drift of the
                # machine's speed hits all alike; x standard is the median of the rounds' ratios.
                cases = {(m, ops): t for m, ts in {"standard": standard, mode: trainers}.items()
                         for ops, t in ts.items()}
                samples = {case: [] for case in cases}
                for _ in range(args.repeats):
                    for (m, ops), trainer in cases.items():
                        with use_backend(OPS[ops]):
                            samples[(m, ops)].append(seconds_per_update(trainer, batches))
                for ops, backend in OPS.items():
                    with use_backend(backend):
                        peak = common.peak_memory(trainers[ops].train_batch, args.device)
                        busy = gpu_busy_per_update(trainers[ops])
                    sec = statistics.median(samples[(mode, ops)])
                    ratio = statistics.median(a / b for a, b in zip(samples[(mode, ops)], samples[("standard", ops)]))
                    rows.append(dict(model=model, objective=args.objective, mode=mode, ops=ops,
                                     ms_per_update=sec * 1e3, vs_standard=ratio,
                                     gpu_busy_ms=None if busy is None else busy * 1e3,
                                     peak_mib=None if peak is None else peak / 2**20))
                    print(f"{ops} {mode}: {sec * 1e3:.2f} ms / update, {ratio:.3f}x standard", flush=True)
                if mode != "standard":
                    del trainers

    rows = common.measure(fill, meta)
    time_of = {(r["ops"], r["mode"]): r["ms_per_update"] for r in rows}
    for row in rows:
        plain = time_of.get(("plain", row["mode"]))
        row["fused_speedup"] = plain and plain / row["ms_per_update"]
    print(common.markdown_table(rows, columns), flush=True)
    mode = "" if args.compile_mode == "default" else f"-{args.compile_mode}"
    compiled = f"-compiled{mode}" if args.compile else ""
    name = ("bench_train" if args.objective == "diffusion" else f"bench_train_{args.objective}") + compiled
    path = common.save(name, meta, rows, columns, args.out)
    print(f"\nresults: {path} (and .json)")


def random_npz(channels, size, n=512):
    """A throwaway image set of the right shape (timing does not depend on the pixels)."""
    import numpy as np
    path = Path(tempfile.gettempdir()) / f"adv_dpm_bench_{channels}x{size}.npz"
    if not path.exists():
        np.savez(path, np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8))
    return path


if __name__ == "__main__":
    main()
