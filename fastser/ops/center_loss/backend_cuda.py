"""The center loss on a GPU with fastser's CUDA kernels (built with nvcc): one row pass forward,
one backward (grad_x and the atomically scattered center update), and, in the deterministic mode,
a per-class segment pass for the centers. It keeps backend.Backend's contract."""

from __future__ import annotations


import torch

from fastser.ops import _native
from fastser.ops.center_loss.backend import class_segments, fused_and_segment_outputs
from fastser.ops.center_loss.backend import BatchStats, RowWeights, Tallies, BackwardOutputs

COUNTS_IN_FORWARD = False
GATES_IN_KERNEL = False
NEEDS_LABELS_IN_RANGE = False


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
    """Writes row_loss and diff (as backend_torch's); a label outside [0, C) gets a NaN loss."""
    # the kernels read fp32 centers: half-precision (or strided) centers go through an fp32 copy
    _native.center_loss_forward_cuda(x, labels, centers.to(torch.float32).contiguous(), row_loss, diff)


def backward(
    diff: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weights: RowWeights,
    outputs: BackwardOutputs,
    deterministic: bool,
    batch: BatchStats = BatchStats(),
) -> None:
    """Writes `outputs`; the caller gates a bad batch's center writes."""
    if diff.shape[0] == 0:
        return
    fused, counts, segment_pass = fused_and_segment_outputs(labels, num_classes, outputs, deterministic, None)
    row_scale = weights.multiplied(diff.dtype)
    _native.center_loss_backward_cuda(
        diff, labels, counts, num_classes, row_scale, fused.grad_x, fused.centers, fused.alpha, fused.grad_centers
    )
    if segment_pass:
        order, offsets = class_segments(labels, num_classes)
        _native.center_loss_segment_update_cuda(
            diff, order, offsets, row_scale, outputs.centers, outputs.alpha, outputs.grad_centers
        )
