"""Backend choice: automatic order, forcing, clear refusals, and life without the extension."""
import os
import subprocess
import sys

import pytest
import torch

from adv_dpm.ops import backend, noise_inject, use_backend


def test_cpu_tensor_prefers_the_cpp_kernels_when_built():
    x = torch.randn(2, 3)
    assert backend.select(x) == ("cpu" if backend.unavailable("cpu", "cpu") is None else "reference")


def test_float64_beyond_the_gpu_kernels_falls_back_to_reference_automatically():
    assert backend.unsupported("triton", torch.float64, 4) is not None
    assert backend.unsupported("cuda", torch.float32, 5) is not None
    assert backend.unsupported("cpu", torch.float64, 4) is None


def test_forcing_a_backend_that_cannot_run_raises_with_the_reason():
    x = torch.randn(2, 3)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was forced .* take cuda tensors"):
        noise_inject(x, x, torch.ones(2), torch.ones(2))


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("ADV_DPM_BACKEND", raising=False)
    with use_backend("reference"):
        with use_backend(None):
            assert backend.forced_backend() is None
        assert backend.forced_backend() == "reference"
    assert backend.forced_backend() is None


def test_environment_variable_forces_and_is_validated(monkeypatch):
    monkeypatch.setenv("ADV_DPM_BACKEND", "reference")
    assert backend.select(torch.randn(2, 3)) == "reference"
    monkeypatch.setenv("ADV_DPM_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"backend must be one of \('reference', 'cpu', 'triton', 'cuda'\)"):
        backend.select(torch.randn(2, 3))


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True)


def test_package_works_without_the_extension():
    code = ("import torch, adv_dpm; from adv_dpm.ops import backend; x = torch.randn(2, 3);"
            "assert backend.select(x) == 'reference';"
            "x_t, t = adv_dpm.noise_inject(x, x, torch.ones(2), torch.zeros(2));"
            "assert torch.equal(x_t, x); print('ok')")
    assert run_python(code, ADV_DPM_DISABLE_EXT="1").stdout.strip() == "ok"


def test_info_says_what_runs_and_why_not():
    out = run_python("from adv_dpm.cli import main; main(['info'])", ADV_DPM_DISABLE_EXT="1").stdout
    assert "compiled extension: disabled by ADV_DPM_DISABLE_EXT=1" in out
    assert "reference  available" in out
    assert "cpu        unavailable: disabled by ADV_DPM_DISABLE_EXT=1" in out
