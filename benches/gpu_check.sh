#!/usr/bin/env bash
# Every GPU check in one call, for a machine with a CUDA build of torch and a GPU:
# build adv_dpm._C with its CUDA kernels, run the test suite (CUDA tests included, Triton on
# the GPU), run the GPU benchmarks. Everything lands in the folder given (default
# benches/results/gpu): gpu_check.log (every step's output, then a summary) and the
# benchmarks' <name>-<device>-<date>.{md,json}. (Few files: a device call returns at most 8.)
# Usage: bash benches/gpu_check.sh [OUT_DIR]      (about 5 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benches/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
LOG=$OUT/gpu_check.log
: >"$LOG"
summary=""
step() {  # step NAME CMD...: run and log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  summary+="$name: exit $rc in $((SECONDS - t0)) s"$'\n'
  [ "$rc" -eq 0 ] || status=1
}
step build env ADV_DPM_BUILD_CUDA=1 MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace
step info "$PY" -m adv_dpm.cli info
step tests env ADV_DPM_REQUIRE_BACKENDS=cpu,cuda,triton "$PY" -m pytest -q -p no:cacheprovider tests
step bench_ops "$PY" benches/bench_ops.py --device cuda --out "$OUT"
step bench_group_norm "$PY" benches/bench_group_norm.py --device cuda --out "$OUT"
step bench_train "$PY" benches/bench_train.py --device cuda --out "$OUT"
printf '== summary\n%sresults in %s\n' "$summary" "$OUT" | tee -a "$LOG"
exit $status
