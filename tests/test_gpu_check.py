"""The GPU check (benches/gpu_check.sh) without a GPU: its shell logic, run with stand-ins for
python and nvidia-smi, and the flags it passes to each benchmark. A GPU session gets one call of
the script: a mistake found there costs the session's device time."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_check.sh"
# The benchmarks in the order the script runs them: the open speed targets' first.
BENCHES = ["bench_ops", "bench_group_norm", "tune_group_norm", "bench_kernels", "bench_train", "bench_host"]

# Logs its arguments, answers the capability query, writes DIR/<benchmark>.md when given --out
# DIR, and fails where FAIL_ON matches its arguments.
STAND_IN_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
[ -n "$FAIL_ON" ] && [[ "$*" == *$FAIL_ON* ]] && exit 3
[[ "$*" == *get_device_capability* ]] && echo 90
prev=
for a in "$@"; do
  [ "$prev" = --out ] && echo "rows" > "$a/$(basename "$1" .py).md"
  prev=$a
done
exit 0
"""


def run_check(tmp_path, fail_on=""):
    """(exit status, the stand-in python's calls, the archive's member names, the log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("python", STAND_IN_PYTHON), ("nvidia-smi", "#!/bin/sh\necho 'stand-in GPU'\n")]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls, out, archive = tmp_path / "calls.txt", tmp_path / "out", tmp_path / "check.tar.gz"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               CALLS=str(calls), FAIL_ON=fail_on, GPU_CHECK_ARCHIVE=str(archive))
    env.pop("GPU_CHECK_LIMITS", None)
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120)
    with tarfile.open(archive) as tar:
        members = {Path(m).name for m in tar.getnames()}
    return done.returncode, calls.read_text().splitlines(), members, (out / "gpu_check.log").read_text()


def bench_calls(calls):
    return [(m[1], m[2]) for c in calls if (m := re.match(r"benches/(\w+)\.py ?(.*)", c))]


@pytest.fixture(scope="module")
def passed_check(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_every_step_runs_in_order_and_the_archive_holds_what_they_wrote(passed_check):
    rc, calls, members, log = passed_check
    assert rc == 0, log
    ran = [name for name, _ in bench_calls(calls)]
    assert ran[:len(BENCHES)] == BENCHES and ran[-1] == "targets", ran
    assert any(c.startswith("setup.py") and "build_ext" in c for c in calls)
    assert any("-m pytest" in c and "-m cuda" in c for c in calls)
    summary = log.split("== summary", 1)[1]
    for step in ["build", "info", "tests", *BENCHES]:
        assert f"{step}: exit 0" in summary, summary
    assert {"gpu_check.log", "targets.md", *(f"{b}.md" for b in BENCHES)} <= members, members


def test_a_failed_build_stops_the_check_and_says_so(tmp_path):
    rc, calls, members, log = run_check(tmp_path, fail_on="build_ext")
    assert rc != 0
    assert "build: exit 3" in log.split("== summary", 1)[1]
    assert not bench_calls(calls) and "gpu_check.log" in members


def test_each_benchmark_takes_the_flags_the_check_passes(passed_check):
    _, calls, _, _ = passed_check
    for name, args in bench_calls(calls):
        flags = set(re.findall(r"(?<!\S)--[\w-]+", args))
        shown = subprocess.run([sys.executable, str(ROOT / "benches" / f"{name}.py"), "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", shown.stdout)]
        assert not missing, f"benches/{name}.py does not take {missing}"


@pytest.mark.parametrize("limits", ["1 2 3", "1 2 3 4 5 6 7 8 9"])
def test_a_wrong_count_of_step_limits_is_refused(tmp_path, limits):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, GPU_CHECK_LIMITS=limits), timeout=60)
    assert done.returncode == 2 and "GPU_CHECK_LIMITS must be 8 numbers" in done.stderr
