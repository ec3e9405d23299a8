# Developer entry points. Each target sets up .venv (pinned dependencies) and builds the
# C++ extension incrementally before running.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
INST   := $(VENV)/.adv-dpm-installed

.PHONY: demo test bench reproduce gpu-check build clean

demo: build
	$(PY) -m adv_dpm.cli train --config configs/demo.toml

test: build
	ADV_DPM_REQUIRE_BACKENDS=cpu,triton $(PY) -m pytest -q

# The paper's protocols at laptop scale (docs/RESULTS.md): PROTOCOL=dpm|cm, PRESET=smoke|quick|full.
PROTOCOL ?= dpm
PRESET ?= quick
reproduce: build
	$(PY) -m adv_dpm.cli reproduce --protocol $(PROTOCOL) --preset $(PRESET)

bench: build
	$(PY) benches/bench_ops.py
	$(PY) benches/bench_group_norm.py
	$(PY) benches/bench_train.py
	$(PY) benches/bench_patch.py
	$(PY) benches/bench_launchers.py
	$(PY) benches/bench_host.py

# On a machine with a CUDA build of torch and a GPU: build the CUDA kernels, run the CUDA
# tests and the GPU benchmarks, and leave everything in $(OUT) (default benches/results/gpu).
gpu-check:
	bash benches/gpu_check.sh $(OUT)

build: $(INST)
	$(PY) setup.py -q build_ext --inplace

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The package alone (ADV_DPM_BUILD_EXT=0): `build` makes the extension, incrementally.
$(INST): $(DEPS) setup.py pyproject.toml
	ADV_DPM_BUILD_EXT=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build adv_dpm/*.so *.egg-info
