"""The center loss on the CPU: fastser's C++ kernels (OpenMP over rows; class sums per class
segment in order, no atomics). It keeps backend.Backend's contract."""

from __future__ import annotations


import torch

from fastser.ops import _native
from fastser.ops.center_loss.backend import in_range, raise_bad_label
from fastser.ops.center_loss.backend import BatchStats, RowWeights, Tallies, BackwardOutputs

COUNTS_IN_FORWARD = False
GATES_IN_KERNEL = False
NEEDS_LABELS_IN_RANGE = True  # its backward indexes the centers by label unchecked


def diff_dtype(x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    return compute


def forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    row_loss: torch.Tensor,
    diff: torch.Tensor,
    *,
    bad_label_is_nan: bool = False,
    tallies: Tallies = Tallies(),
) -> None:
    """Writes row_loss and diff (as backend_torch's). A label outside [0, C) raises, or with
    `bad_label_is_nan` gives its row a NaN loss."""
    compute = row_loss.dtype
    xc, cc = x.to(compute).contiguous(), centers.to(compute).contiguous()
    if _native.center_loss_forward_cpu(xc, labels, cc, row_loss, diff) >= 0:
        if not bad_label_is_nan:
            raise_bad_label(labels, cc.shape[0])
        valid = in_range(labels, cc.shape[0])  # the kernels' convention, on the error path only
        _native.center_loss_forward_cpu(xc, torch.where(valid, labels, 0), cc, row_loss, diff)
        row_loss.masked_fill_(~valid, float("nan"))


def backward(
    diff: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weights: RowWeights,
    outputs: BackwardOutputs,
    deterministic: bool,
    batch: BatchStats = BatchStats(),
) -> None:
    """Writes `outputs` (the kernels sum in a fixed order: deterministic either way)."""
    if diff.shape[0] == 0:
        return
    grad_x = outputs.grad_x
    # the C++ kernels write the compute dtype; half-precision gradients are cast afterwards
    gx = grad_x if grad_x is None or grad_x.dtype == diff.dtype else torch.empty_like(diff)
    row_scale = weights.multiplied(diff.dtype)
    _native.center_loss_backward_cpu(
        diff, labels, num_classes, row_scale, gx, outputs.centers, outputs.alpha, outputs.grad_centers
    )
    if gx is not grad_x:
        grad_x.copy_(gx)
