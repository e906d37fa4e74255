"""Kernels and their autograd Functions. User-facing modules live in fastser.nn."""
from fastser.ops.center_loss import BACKENDS, CenterLossFunction, available_backends, center_loss


def backends_in_use(device) -> dict:
    """What a run on `device` uses by default: recorded in each run's config.json and metrics.json."""
    import torch
    from fastser.features.functional import resolve_backend as feature_backend
    from fastser.ops import _native
    from fastser.ops.center_loss import resolve_backend as center_backend
    device = torch.device(device)
    probe = torch.empty(0, 1, device=device)
    return {"center_loss": center_backend("auto", probe, probe), "features": feature_backend("auto", device),
            "compiled_cpu_kernels": _native.cpu is not None, "compiled_cuda_kernels": _native.cuda is not None}


__all__ = ["BACKENDS", "CenterLossFunction", "available_backends", "backends_in_use", "center_loss"]
