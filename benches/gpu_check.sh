#!/usr/bin/env bash
# Every GPU check in one call, for a machine with a CUDA build of torch and a GPU:
# build adv_dpm._C with its CUDA kernels, run the CUDA tests (CUDA C++ and Triton on the GPU),
# run the GPU benchmarks. Everything lands in the folder given (default benches/results/gpu):
# gpu_check.log (every step's output, then a summary), the benchmarks'
# <name>-<device>-<date>.{md,json} and targets.md. GPU_CHECK_ARCHIVE=FILE.tar.gz also packs that
# folder into FILE after every step (atomically), so that a run stopped from outside still hands
# back, in one file, all that its finished steps wrote (a device call returns at most 8 files).
# Each step has a time limit (seconds, GPU_CHECK_LIMITS="build tests ops gn tune kernels train patch"),
# about 8 minutes in all (plus info, 60 s at most, and bench_host, 30 s); a benchmark stopped at
# its limit keeps the rows it measured. The steps of the open speed targets come first, and each
# benchmark measures the targets' rows first.
# Usage: bash benches/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benches/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
read -r T_BUILD T_TESTS T_OPS T_GN T_TUNE T_KERNELS T_TRAIN T_PATCH EXTRA <<<"${GPU_CHECK_LIMITS:-100 60 90 90 40 30 50 30}"
if [ -z "$T_PATCH" ] || [ -n "$EXTRA" ]; then
  echo "GPU_CHECK_LIMITS must be 8 numbers of seconds (build tests ops gn tune kernels train patch), got '$GPU_CHECK_LIMITS'" >&2
  exit 2
fi
status=0
LOG=$OUT/gpu_check.log
: >"$LOG"
summary=""
pack() {  # the whole OUT folder into GPU_CHECK_ARCHIVE, if set
  [ -n "${GPU_CHECK_ARCHIVE:-}" ] || return 0
  tar -czf "$GPU_CHECK_ARCHIVE.tmp" -C "$OUT" . && mv -f "$GPU_CHECK_ARCHIVE.tmp" "$GPU_CHECK_ARCHIVE"
}
step() {  # step NAME LIMIT CMD...: run under a time limit and log; remember a failure, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  summary+="$name: exit $rc in $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ' (time limit)')"$'\n'
  [ "$rc" -eq 0 ] || status=1
  pack
  return "$rc"
}
finish() { printf '== summary\n%sresults in %s\n' "$summary" "$OUT" | tee -a "$LOG"; pack; exit $status; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"
# As `make build` does: an editable install of the package alone (it maps kernels/ to
# adv_dpm.kernels), then the extension in place (one build, not two).
# Kernels for this GPU's architecture only, unless ADV_DPM_CUDA_ARCH says otherwise: half the build.
arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
export ADV_DPM_BUILD_CUDA=1 MAX_JOBS="$(nproc)" ADV_DPM_CUDA_ARCH="${ADV_DPM_CUDA_ARCH:-$arch}"
step build "$T_BUILD" bash -c "ADV_DPM_BUILD_EXT=0 '$PY' -m pip install -q --no-build-isolation --no-deps --no-index -e . &&
                               '$PY' setup.py -q build_ext --inplace" || finish
step info 60 "$PY" -m adv_dpm.cli info
# Extras for a machine without a network, from a wheelhouse .wheels/ carried beside the tree, made
# where there is a network with (the device's Python version)
#   pip download pytest-xdist diffusers --python-version 3.12 --only-binary=:all: -d .wheels
# pytest-xdist runs the CUDA tests in 6 processes; diffusers is what bench_patch patches.
if [ -d .wheels ]; then
  for pkg in pytest-xdist diffusers; do
    "$PY" -m pip install -q --no-index --find-links .wheels "$pkg" 2>&1 | tee -a "$LOG"
  done
fi
workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
step tests "$T_TESTS" env ADV_DPM_REQUIRE_BACKENDS=cuda,triton "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    --durations=10 --continue-on-collection-errors $workers tests
# The open targets first: the ops (ImageNet-64 batch), then GroupNorm in bf16 (the benchmark, the
# Triton plan sizes that come nearest a copy, and where each backend's GPU time goes: the kernel
# breakdown runs in its own process, so that no CUDA graph meets the profiler).
step bench_ops "$T_OPS" "$PY" benches/bench_ops.py --device cuda --out "$OUT"
step bench_group_norm "$T_GN" "$PY" benches/bench_group_norm.py --device cuda --out "$OUT"
step tune_group_norm "$T_TUNE" "$PY" benches/tune_group_norm.py --out "$OUT"
step bench_kernels "$T_KERNELS" "$PY" benches/bench_kernels.py --out "$OUT"
step bench_train "$T_TRAIN" "$PY" benches/bench_train.py --device cuda --out "$OUT"
step bench_host 30 "$PY" benches/bench_host.py --device cuda --out "$OUT"
# patch_model on diffusers' UNet2DModel.
if "$PY" -c "import diffusers" 2>/dev/null; then
  step bench_patch "$T_PATCH" "$PY" benches/bench_patch.py --device cuda --out "$OUT"
else
  echo "== bench_patch: skipped (diffusers is not installed)" | tee -a "$LOG"
fi
"$PY" benches/targets.py "$OUT" >"$OUT/targets.md" 2>>"$LOG"  # the issues' targets, met or not
finish
