"""Shared test set-up: which (device, backend) pairs run, and the oracle comparison.

Without a GPU the Triton kernels run on CPU tensors under the interpreter, which must be
switched on before triton is imported: hence here, at collection time. The CUDA kernels run
on CPU tensors too, through the emulation of tests/cuda_emu (the pair ("cpu", "cuda")): the
same sources and bindings, built with the host compiler against emulated threads, barriers and
shuffles.
"""
import contextlib
import functools
import os
import sys
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adv_dpm.ops import backend, reference  # noqa: E402

# Backends that `make test` builds and installs: missing ones fail there instead of skipping.
REQUIRED = {b for b in os.environ.get("ADV_DPM_REQUIRE_BACKENDS", "").split(",") if b}

EMULATED_CUDA = ("cpu", "cuda")
PAIRS = [("cpu", "reference"), ("cpu", "cpu"), ("cpu", "triton"), EMULATED_CUDA,
         ("cuda", "reference"), ("cuda", "cuda"), ("cuda", "triton")]


def pair_id(pair):
    return "cpu-cuda_emulated" if pair == EMULATED_CUDA else f"{pair[0]}-{pair[1]}"


@functools.cache
def emulated_cuda_module():
    from cuda_emu import build
    return build.load()


@contextlib.contextmanager
def emulated_cuda():
    """Backend 'cuda' on CPU tensors: the CUDA bindings and kernels under the CPU emulation."""
    module = emulated_cuda_module()
    unavailable, implementation = backend.unavailable, backend.implementation

    def emulated_unavailable(name, device_type, op="noise_inject"):
        return None if (name, device_type) == EMULATED_CUDA[::-1] else unavailable(name, device_type, op)

    def emulated_implementation(name, family, op):
        return getattr(module, op) if name == "cuda" else implementation(name, family, op)

    backend._select.cache_clear()
    try:
        with mock.patch.object(backend, "unavailable", emulated_unavailable), \
                mock.patch.object(backend, "implementation", emulated_implementation):
            yield
    finally:
        backend._select.cache_clear()


def _pair_params(pairs):
    return [pytest.param(p, id=pair_id(p), marks=[pytest.mark.cuda] if p[0] == "cuda" else []) for p in pairs]


def require_pair(pair, op="noise_inject"):
    """Skip (or fail, if required) when the (device, backend) pair cannot run ``op`` here."""
    device, name = pair
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if pair == EMULATED_CUDA:
        if torch.cuda.is_available():
            pytest.skip("a GPU is here: the CUDA kernels run on it (pairs cuda-*)")
        emulated_cuda_module()  # a build error fails the test
        return pair
    why = backend.unavailable(name, device, op)
    if why:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required (ADV_DPM_REQUIRE_BACKENDS) but unavailable: {why}")
        pytest.skip(why)
    return pair


@contextlib.contextmanager
def use_pair(pair):
    """A context that forces the pair's backend."""
    with emulated_cuda() if pair == EMULATED_CUDA else contextlib.nullcontext(), backend.use_backend(pair[1]):
        yield


@pytest.fixture(params=_pair_params(PAIRS))
def pair(request):
    return require_pair(request.param)


@pytest.fixture(params=_pair_params([p for p in PAIRS if p[1] != "reference"]))
def kernel_pair(request):
    """Only the compiled and Triton backends (the reference is the oracle itself)."""
    return require_pair(request.param)


def is_interpreted(pair):
    return pair[1] == "triton" and pair[0] == "cpu"


def adv_dpm_python_calls(fn):
    """The files of the adv_dpm Python functions that ``fn()`` calls (sys.setprofile)."""
    called = []
    sys.setprofile(lambda frame, event, _: called.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return [f for f in called if "adv_dpm" in f]


def check_autograd_in_cpp(pair, op, args):
    """On their own device the C++ and CUDA kernels come with their autograd in C++: an eager call
    of ``op`` records a C++ node, and on the CPU its backward calls no Python function of adv_dpm
    (the Python autograd layer costs more host time than a GPU kernel at the CIFAR-10 batch)."""
    if pair[1] != pair[0]:
        pytest.skip("the C++ autograd serves the C++ and CUDA kernels on their own device")
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with use_pair(pair):
        outputs = op(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert not isinstance(outputs[0].grad_fn, torch.autograd.function.BackwardCFunction)
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    assert not adv_dpm_python_calls(loss.backward)
    assert all(a.grad is not None for a in leaves if isinstance(a, torch.Tensor))


def group_norm_oracle(x, weight, bias, groups, eps, scale, shift, act):
    """y of group_norm_act on the reference, with the public op's arguments (the float64 oracle)."""
    return reference.group_norm_act(x, weight, bias, scale, shift, groups, eps, int(act == "silu"))[0]


def outputs_and_grads(fn, args, upstream):
    """The outputs of fn(*args) on detached aliases of its tensor arguments (their strides kept),
    and the gradients of <outputs, upstream> w.r.t. every tensor argument (None where unused);
    ``upstream``: one tensor per output (a single tensor for a single output)."""
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = upstream if isinstance(upstream, (list, tuple)) else [upstream]
    grads = torch.autograd.grad(outputs, [a for a in leaves if isinstance(a, torch.Tensor)],
                                [g.to(o.dtype) for o, g in zip(outputs, upstream)], allow_unused=True)
    return [o.detach() for o in outputs], grads


def grads_of(fn, args, upstream):
    """The gradients of ``outputs_and_grads``."""
    return outputs_and_grads(fn, args, upstream)[1]


ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def max_err(t, ref64):
    return (t.double() - ref64).abs().max().item() if t.numel() else 0.0


def assert_within_budget(name, out, ref64, eager_same_dtype):
    """err(kernel) <= 2 * err(eager composite in the same dtype) + atol (relative to the largest
    reference value when that exceeds 1); NaN never passes."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    magnitude = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    budget = 2 * max_err(eager_same_dtype, ref64) + ATOL[out.dtype] * magnitude
    err = max_err(out, ref64)
    assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} ({out.dtype})"


def make_input(shape, dtype, device, kind, generator):
    """Fresh random data; 'shifted' has a non-zero mean (-2.3 + 0.5 * randn)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "shifted":
        x = -2.3 + 0.5 * x
    return x.to(device=device, dtype=dtype)


def relayout(t, layout):
    """The same values in another memory layout: contiguous, channels_last, or a strided view."""
    if layout == "contiguous" or t.dim() != 4:
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":   # a non-dense view: every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed":  # dense but batch dim not outermost in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)
