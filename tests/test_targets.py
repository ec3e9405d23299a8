"""benches/targets.py: the issues' speed targets read from benchmark result files."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import targets  # noqa: E402


def test_targets_are_read_from_a_result_file(tmp_path):
    rows = [dict(op="adv_step", shape="128x3x32x32", dtype="float32", provider="cpu", vs_eager=6.0, vs_compile=1.2),
            dict(op="adv_step", shape="128x3x32x32", dtype="float32", provider="eager", vs_eager=1.0, vs_compile=0.3)]
    path = tmp_path / "bench_ops-some-cpu-2t-2026-01-01.json"
    path.write_text(json.dumps({"meta": {"device_type": "cpu"}, "rows": rows}))
    lines = targets.check(path)
    assert len(lines) == 2   # the C++ row, against eager and against compile; the eager row is no target
    assert "vs_eager = 6" in lines[0] and lines[0].endswith("| met |")
    assert "vs_compile = 1.2" in lines[1] and lines[1].endswith("| **not met** |")
    gpu = tmp_path / "bench_ops-some-gpu-2026-01-01.json"
    gpu.write_text(json.dumps({"meta": {"device_type": "cuda"}, "rows": rows}))
    assert targets.check(gpu) == []   # the CPU targets do not apply to a GPU file
