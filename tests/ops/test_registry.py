"""fastser.ops.registry: each op's implementations declared once, and what "auto" and a name mean."""

import pytest
import torch

from fastser.ops import _native, available_backends, registry
from fastser.features.functional import resolve_backend as feature_backend


def test_every_op_declares_its_implementations_fastest_first_with_torch_last():
    for op, impls in registry.IMPLEMENTATIONS.items():
        assert impls[-1].name == "torch" and impls[-1].autograd, op
        assert len({i.name for i in impls}) == len(impls), op
    assert available_backends() == registry.available("center_loss")


@pytest.mark.skipif(_native.cpu is None, reason="needs the compiled CPU kernels")
def test_auto_picks_the_fused_cpu_kernel_and_torch_where_only_torch_serves():
    cpu = torch.device("cpu")
    assert registry.choose("center_loss", "auto", cpu, torch.float32) == "cpp"
    assert registry.choose("center_loss", "auto", cpu, torch.float64) == "cpp"
    assert registry.choose("mel_chain", "auto", cpu) == "cpp"
    assert registry.choose("mel_chain", "auto", cpu, requires_grad=True) == "torch"  # the only one with autograd
    assert registry.choose("center_loss", "auto", "meta", torch.float32) == "torch"
    assert feature_backend("auto", cpu) == "cpp" and feature_backend("auto", cpu, requires_grad=True) == "torch"


def test_auto_never_picks_an_interpreted_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.choose("center_loss", "auto", "cpu", torch.float32) != "triton"
    if registry.triton_importable():
        assert "triton" in registry.available("center_loss", "cpu")  # a name still reaches it
        assert registry.choose("center_loss", "triton", "cpu", torch.float32) == "triton"


def test_a_named_implementation_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.choose("center_loss", "cudnn", "cpu")
    with pytest.raises(ValueError, match="needs cpu tensors, the input is on meta"):
        registry.choose("center_loss", "cpp", "meta", torch.float32)
    with pytest.raises(ValueError, match="does not propagate gradients"):
        registry.choose("mel_chain", "cpp", "cpu", requires_grad=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available here"):
            registry.choose("center_loss", "cuda", "cpu", torch.float32)
    with pytest.raises(ValueError, match="does not propagate gradients"):
        feature_backend("librosa", torch.device("cpu"), requires_grad=True)


def test_a_float64_input_is_refused_by_a_float32_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not registry.triton_importable():
        pytest.skip("needs Triton")
    with pytest.raises(TypeError, match="computes in float32"):
        registry.choose("center_loss", "triton", "cpu", torch.float64)


def test_every_center_loss_backend_module_keeps_the_contract():
    """Each built backend's module has the Backend protocol's flags and functions, with the
    protocol's parameters (names and kinds, in order); a module missing one is not a Backend."""
    import inspect
    import types

    from fastser.ops.center_loss.backend import Backend

    def parameters(fn, skip_self=False):
        params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0 :]
        return [(p.name, p.kind) for p in params]

    checked = []
    for impl in registry.IMPLEMENTATIONS["center_loss"]:
        if not impl.built():
            continue
        module = registry.module("center_loss", impl.name)
        assert isinstance(module, Backend), impl.name
        for flag in ("COUNTS_IN_FORWARD", "GATES_IN_KERNEL", "NEEDS_LABELS_IN_RANGE"):
            assert isinstance(getattr(module, flag), bool), (impl.name, flag)
        for name in ("diff_dtype", "forward", "backward"):
            assert parameters(getattr(module, name)) == parameters(getattr(Backend, name), True), (impl.name, name)
        checked.append(impl.name)
    assert "torch" in checked
    torch_backend = registry.module("center_loss", "torch")
    partial = types.SimpleNamespace(**{k: getattr(torch_backend, k) for k in dir(torch_backend) if k != "backward"})
    assert not isinstance(partial, Backend)
