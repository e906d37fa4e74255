"""Kernels and their autograd Functions. User-facing modules live in fastser.nn."""
from fastser.ops.center_loss import BACKENDS, CenterLossFunction, available_backends, center_loss

__all__ = ["BACKENDS", "CenterLossFunction", "available_backends", "center_loss"]
