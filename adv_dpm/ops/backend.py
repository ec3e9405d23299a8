"""Which implementation of a fused op runs, and why.

On a CUDA tensor the order is CUDA C++ > Triton > reference; on a CPU tensor C++ > reference.
Triton also runs on CPU tensors under its interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how CI exercises the Triton kernels. A backend can be forced
with ``ADV_DPM_BACKEND=reference|cpu|triton|cuda`` or ``with use_backend(name):``; forcing one
that cannot run the call raises instead of silently falling back.
"""
import contextlib
import contextvars
import functools
import importlib
import os

import torch
from torch.torch_version import TorchVersion

from . import reference

BACKENDS = ("reference", "cpu", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_RANK = 4
PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_forced = contextvars.ContextVar("adv_dpm_backend", default=None)


def _checked(name):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Force every fused op inside the block to run on backend ``name`` (None: automatic); the
    backward of an op run in the block runs there too, wherever autograd runs it."""
    token = _forced.set(_checked(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend():
    forced = _forced.get()
    if forced is None and (forced := os.environ.get("ADV_DPM_BACKEND") or None) not in (None, *BACKENDS):
        raise ValueError(f"ADV_DPM_BACKEND must be one of {BACKENDS}, got {forced!r}")
    return forced


@functools.cache
def extension_error():
    """None when adv_dpm._C loaded, else why not."""
    if os.environ.get("ADV_DPM_DISABLE_EXT") == "1":
        return "disabled by ADV_DPM_DISABLE_EXT=1"
    try:
        importlib.import_module("adv_dpm._C")
    except ModuleNotFoundError as e:
        return f"the C++ extension adv_dpm._C is not built ({e})"
    except ImportError as e:  # typically an undefined symbol of torch's
        return (f"the C++ extension adv_dpm._C does not load ({e}): if it was built against another torch, "
                f"rebuild it (`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`)")
    return None


@functools.cache
def triton_error():
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed"
    return None


# (Triton release that fixed it, numpy release that exposes it, what its interpreter does before):
# 3.0 and 3.1 turned a kernel doubling x into garbage; 3.2 to 3.6 raise in a loop over a scalar bound.
_INTERPRETER_BUGS = (("3.2", "2", "computes wrong results"), ("3.7", "2.4", "fails on loops"))


def interpreter_problem(triton_version, numpy_version):
    """Why Triton's interpreter, at these versions, cannot run the kernels, or None."""
    for fixed, exposed, what in _INTERPRETER_BUGS:
        if TorchVersion(triton_version) < fixed and TorchVersion(numpy_version) >= exposed:
            return (f"Triton {triton_version}'s interpreter {what} with numpy {numpy_version} "
                    f"(numpy<{exposed} or Triton >= {fixed} fixes it)")
    return None


@functools.cache
def interpreter_error():
    """``interpreter_problem`` of the installed Triton and numpy."""
    import numpy
    import triton
    return interpreter_problem(triton.__version__, numpy.__version__)


def has_compiled_kernel(op, dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"adv_dpm_C::{op}", dispatch_key)


def unavailable(backend, device_type, op="noise_inject"):
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors, or None if it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend} kernels take {backend} tensors, got {device_type} tensors"
        if extension_error():
            return extension_error()
        if not has_compiled_kernel(op, backend.upper()):
            return f"adv_dpm._C has no {backend} kernel for {op} (for CUDA: a CPU build of torch or ADV_DPM_BUILD_CUDA=0)"
        return None
    if triton_error():
        return triton_error()
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before start)"
    if device_type == "cpu" and interpreter_error():
        return interpreter_error()
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels take cuda tensors, got {device_type} tensors"
    return None


def unsupported(backend, dtype, ndim):
    """Why ``backend`` does not handle this dtype / rank, or None."""
    if backend == "reference":
        return None
    kernel_dtypes = KERNEL_DTYPES + ((torch.float64,) if backend == "cpu" else ())
    if dtype not in kernel_dtypes:
        return f"the {backend} kernels take {[str(d) for d in kernel_dtypes]}, got {dtype}"
    if ndim > MAX_KERNEL_RANK:
        return f"the {backend} kernels take tensors of rank <= {MAX_KERNEL_RANK}, got rank {ndim}"
    return None


def select(t, op="noise_inject", layout_problem=None):
    """The backend that runs private op ``op`` whose main tensor is ``t``; ``layout_problem``
    says why the kernels cannot take this call's strides (None when they can)."""
    return _select(op, t.device.type, t.dtype, t.dim(), layout_problem, forced_backend())


@functools.cache
def _select(op, device_type, dtype, ndim, layout_problem, forced):
    # Cached: availability is fixed for a process (extension loaded, TRITON_INTERPRET read at start).
    def why_not(backend):
        return unavailable(backend, device_type, op) or unsupported(backend, dtype, ndim) or (
            layout_problem if backend != "reference" else None)

    if forced:
        if why_not(forced):
            raise RuntimeError(f"adv_dpm backend {forced!r} was forced but cannot run this call: {why_not(forced)}")
        return forced
    return next((b for b in PREFERENCE.get(device_type, ()) if not why_not(b)), "reference")


@functools.cache
def implementation(backend, family, op):
    """The function ``op`` (from the op family module ``family``) of ``backend``."""
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        return getattr(importlib.import_module(f"adv_dpm.kernels.{family}"), op)
    return getattr(torch.ops.adv_dpm_C, op)


def run(family, op, main, *args, layout_problem=None):
    """Run private op ``op`` of ``family`` on the backend chosen for tensor ``main``."""
    return implementation(select(main, op, layout_problem), family, op)(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def call(op, impl, differentiable, *args):
    """Call a fused op. Eager calls on plain tensors run its implementation ``impl`` (the body
    of the registered custom op ``op``) directly, or ``differentiable`` (the same with the op's
    own autograd formula) when a gradient is needed: the same code and results without the
    custom-op dispatch layers (50-100 µs of Python per call, more than a GPU kernel at the
    CIFAR-10 batch). Compiling, tracing, tensor subclasses and gradients through an op without
    a formula (``differentiable`` None) go through ``op``. The ops' autograd formulas are
    first-order reverse mode, so under forward-mode AD and functorch transforms (jvp, grad,
    jacrev, vmap) the op runs on the reference backend, plain PyTorch that every mode differentiates."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        with use_backend("reference"):  # pure PyTorch: differentiable in every mode
            return impl(*args)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if torch._C._len_torch_dispatch_stack() or any(type(t) not in _PLAIN for t in tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return op(*args) if differentiable is None else differentiable(*args)
    return impl(*args)


def double_backward():
    """Whether an op's backward runs under create_graph=True (its result must be differentiable)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def recomputed_grads(impl, args, grads):
    """The gradients of ``impl(*args)`` for its tensor arguments (None for the others) as a
    differentiable graph: the forward recomputed on the reference backend and differentiated
    with create_graph=True. The double backward of an op whose kernels' backward is first order."""
    # One alias per argument: a tensor passed twice (or computed from another argument) gets its
    # own share of the gradient at each position, as the op's formula gives it.
    args = [a.view_as(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
    with use_backend("reference"), torch.enable_grad():
        outputs = impl(*args)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True) if pairs and wrt else [None] * len(wrt))
    return tuple(next(found) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)


def run_recording(function, args, main, op, kernel_args, layout_problem=None):
    """Private op ``op`` (its family's namesake) run recording its gradient, arguments already
    checked. The C++ and CUDA kernels on their own device have their autograd in C++
    (csrc/autograd/<op>.cpp), whose backward runs no Python: they take ``kernel_args`` directly.
    Any other backend runs through ``function``, the op's Python autograd.Function, on ``args``."""
    chosen = select(main, op, layout_problem)
    if chosen == main.device.type:
        return implementation(chosen, op, op)(*kernel_args)
    return function.apply(*args)


def autograd_function(impl, setup_context, backward):
    """An autograd.Function that runs ``impl`` with the autograd formula registered for its op.
    Called with every argument positional (as ``call`` is). Its forward takes ``ctx`` itself: a
    Function with a separate setup_context binds its arguments to forward's signature with
    ``inspect`` on every call, about 100 µs of Python, more than the op."""
    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output
    return type(f"{impl.__name__}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def report():
    """{device type: {backend: None if usable else the reason}} for `adv-dpm info`."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {dev: {b: unavailable(b, dev) for b in BACKENDS} for dev in devices}
