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
    with pytest.raises(ValueError, match=r"ADV_DPM_BACKEND must be one of \('reference', 'cpu', 'triton', 'cuda'\)"):
        backend.select(torch.randn(2, 3))


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass


@pytest.mark.parametrize("triton_version, numpy_version, problem", [
    ("3.0.0", "2.2.6", "computes wrong results"), ("3.1.0", "2.0.0", "computes wrong results"),
    ("3.1.0", "1.26.4", None), ("3.2.0", "2.3.5", None), ("3.6.0", "2.4.6", "fails on loops"),
    ("3.7.0", "2.4.6", None), ("3.9.0+git1a2b3c", "2.4.6", None)])
def test_triton_interpreters_that_fail_under_this_numpy_are_refused(triton_version, numpy_version, problem):
    found = backend.interpreter_problem(triton_version, numpy_version)
    assert (found is None) == (problem is None)
    assert problem is None or f"Triton {triton_version}'s interpreter {problem} with numpy {numpy_version}" in found


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


def test_an_extension_that_does_not_load_is_told_apart_from_a_missing_one(monkeypatch):
    def load(error):
        def import_module(name):
            raise error
        monkeypatch.setattr(backend.importlib, "import_module", import_module)
        return backend.extension_error.__wrapped__()

    undefined = ImportError("_C.abi3.so: undefined symbol: _ZN3c104impl22getGlobalPyInterpreterEv")
    assert "does not load" in load(undefined) and "rebuild it" in load(undefined)
    assert "is not built" in load(ModuleNotFoundError("No module named 'adv_dpm._C'"))


def test_call_runs_the_implementation_directly_only_in_plain_eager():
    """backend.call: plain eager tensors take the implementation; a dispatch mode, a tensor
    subclass, or a gradient through an op without a formula take the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    op = lambda *a: "op"  # noqa: E731
    impl = lambda *a: "impl"  # noqa: E731
    x = torch.randn(2, 3)
    assert backend.call(op, impl, None, x, 1.0) == "impl"
    assert backend.call(op, impl, None, torch.nn.Parameter(x, requires_grad=False), 1.0) == "impl"
    assert backend.call(op, impl, None, x.requires_grad_(), 1.0) == "op"  # no autograd formula: the op decides
    with torch.no_grad():
        assert backend.call(op, impl, None, x, 1.0) == "impl"
    with Passthrough():
        assert backend.call(op, impl, None, torch.randn(2), 1.0) == "op"
    assert backend.call(op, impl, None, torch.randn(2).as_subclass(Subclass), 1.0) == "op"


class Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("family", ["noise_inject", "group_norm_act"])
def test_direct_eager_path_equals_the_registered_op_with_gradients(family):
    """The eager fast path and the custom op (with its registered autograd) run the same code:
    identical outputs and gradients."""
    module = sys.modules[f"adv_dpm.ops.{family}"]
    g = torch.Generator().manual_seed(0)
    if family == "noise_inject":
        big = [torch.randn(3, 2, 4, 5, generator=g) for _ in range(3)]
        coef = [torch.rand(3, generator=g) + 0.1 for _ in range(2)]
        args = (big[0], big[1], coef[0], coef[1], big[2], "delta")
        public, op = module.noise_inject, module.noise_inject_op
    else:
        args = (torch.randn(3, 8, 4, 5, generator=g), torch.rand(8, generator=g), torch.randn(8, generator=g), 4, 1e-5,
                torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), "silu")
        public, op = module.group_norm_act, lambda *a: module.group_norm_act_op(*a)[0]  # y, without the statistics
    results = []
    for fn in (public, op):
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, [a for a in leaves if isinstance(a, torch.Tensor)],
                                    [torch.ones_like(o) for o in outs])
        results.append((outs, grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        assert torch.equal(a, b)


def test_direct_eager_path_equals_the_registered_op_for_adv_step():
    from adv_dpm.ops import adv_step
    module = sys.modules["adv_dpm.ops.adv_step"]
    delta, grad = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    for a, b in zip(adv_step(delta, grad, 0.5, 2.0), module.adv_step_op(delta, grad, 0.5, 2.0)):
        assert torch.equal(a, b)


def test_a_forced_backend_holds_for_the_backward_run_on_another_thread(monkeypatch):
    """CUDA autograd runs backward on its own thread, outside the caller's use_backend block;
    the backend forced for the forward must still run the backward."""
    import threading

    from adv_dpm.ops import reference
    calls = []
    original = reference.noise_inject_backward
    monkeypatch.setattr(reference, "noise_inject_backward", lambda *a: calls.append(1) or original(*a))
    backend.implementation.cache_clear()
    try:
        x = torch.randn(2, 3, requires_grad=True)
        with use_backend("reference"):
            x_t, _ = noise_inject(x, torch.randn(2, 3), torch.ones(2), torch.ones(2))
        worker = threading.Thread(target=lambda: x_t.sum().backward())
        worker.start()
        worker.join()
    finally:
        backend.implementation.cache_clear()
    assert calls and x.grad is not None


@pytest.mark.parametrize("family", ["noise_inject", "group_norm_act"])
def test_forward_mode_and_functorch_transforms_differentiate_the_op(family):
    """The kernels' autograd formulas are first-order reverse mode; under torch.func.jvp,
    torch.func.grad, vmap and dual tensors the ops run on the reference and give the
    derivatives of the PyTorch composite, not zeros or errors."""
    from torch.autograd import forward_ad

    from adv_dpm.ops import eager
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 5, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if family == "noise_inject":
        eps, delta = torch.randn(x.shape, generator=g, dtype=torch.float64), 0.1 * v
        coef = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
        fused = lambda x: sum(noise_inject(x, eps, coef, coef, delta, "delta"))  # noqa: E731
        plain = lambda x: sum(eager.noise_inject(x, eps, coef, coef, delta, "delta"))  # noqa: E731
    else:
        from adv_dpm.ops import group_norm_act
        w, b, scale, shift = (torch.randn(s, generator=g, dtype=torch.float64) for s in (8, 8, (3, 8), (3, 8)))
        fused = lambda x: group_norm_act(x, w, b, 4, 1e-5, scale, shift)  # noqa: E731
        plain = lambda x: eager.group_norm_act(x, w, b, 4, 1e-5, scale, shift)  # noqa: E731
    expected = torch.func.jvp(plain, (x,), (v,))[1]
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(torch.func.jvp(fused, (x,), (v,))[1], expected)
    with forward_ad.dual_level():
        torch.testing.assert_close(forward_ad.unpack_dual(fused(forward_ad.make_dual(x, v))).tangent, expected)
    loss = lambda f: lambda x: (f(x) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(fused))(x), torch.func.grad(loss(plain))(x))
    torch.testing.assert_close(torch.func.vmap(fused)(x[None].expand(2, *x.shape)), plain(x)[None].expand(2, *x.shape))


def test_double_backward_gives_each_argument_its_own_share():
    """create_graph=True recomputes on the reference; a tensor passed in two places (or one
    argument computed from another) must get the same gradient as without create_graph."""
    from adv_dpm.ops import group_norm_act
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = (torch.rand(3, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cases = [(lambda: sum(noise_inject(a, a, c, (1 - c ** 2).sqrt(), a, "delta")), (a, c)),
             (lambda: group_norm_act(x, None, None, 2, 1e-5, s, s), (x, s))]
    for fn, wrt in cases:
        out = fn()
        weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
        plain = torch.autograd.grad((out * weight).sum(), wrt)
        graph = torch.autograd.grad((fn() * weight).sum(), wrt, create_graph=True)
        for p, q in zip(plain, graph):
            torch.testing.assert_close(q, p)
