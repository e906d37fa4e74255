"""Kernels and their autograd Functions; which implementation serves is fastser.ops.registry's
choice. User-facing modules live in fastser.nn."""

from fastser.ops.center_loss import BACKENDS, CenterLossFunction, available_backends, center_loss


def backends_in_use(device) -> dict:
    """What a run on `device` uses by default: recorded in each run's config.json and metrics.json."""
    import torch
    from fastser.ops import _native, registry

    return {
        "center_loss": registry.choose("center_loss", "auto", device, torch.float32),
        "features": registry.choose("mel_chain", "auto", device),
        "compiled_cpu_kernels": _native.cpu is not None,
        "compiled_cuda_kernels": _native.cuda is not None,
    }


__all__ = ["BACKENDS", "CenterLossFunction", "available_backends", "backends_in_use", "center_loss"]
