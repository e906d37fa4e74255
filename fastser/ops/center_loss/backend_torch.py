"""The center loss in plain PyTorch (gather and index_put): any device, any float dtype; the
fallback where no kernel runs, and the test oracle. It keeps backend.Backend's contract
(fastser.ops.center_loss dispatches to it): `forward`, `backward`, `diff_dtype` and the flags below."""

from __future__ import annotations


import torch

from fastser.ops.center_loss.backend import class_counts, deterministic_algorithms, in_range, label_slots
from fastser.ops.center_loss.backend import BatchStats, RowWeights, Tallies, BackwardOutputs

COUNTS_IN_FORWARD = False  # the forward counts classes and bad rows into its Tallies
GATES_IN_KERNEL = False  # the backward skips the center writes of a bad batch itself
NEEDS_LABELS_IN_RANGE = False  # the backward must not see a label outside [0, C)


def diff_dtype(x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """What the forward stores diff = x - c_y in."""
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
    """Writes row_loss (B,) and diff = x - c_y (B, D), both in the compute dtype (B > 0; the
    dispatcher allocates them). A label outside [0, C) gathers row 0 and gets a NaN loss, as in the
    kernels: never an out-of-bounds read, whatever the validation mode."""
    valid = in_range(labels, centers.shape[0])
    compute = row_loss.dtype
    torch.sub(x.to(compute), centers.to(compute).index_select(0, torch.where(valid, labels, 0)), out=diff)
    torch.sum(diff.pow(2), 1, out=row_loss)
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
    """Writes `outputs`: grad_x, and either the Wen update of the centers or their gradient."""
    B, D = diff.shape
    grad_x, centers, grad_centers = outputs.grad_x, outputs.centers, outputs.grad_centers
    row_scale = weights.multiplied(diff.dtype)
    if grad_x is not None:
        grad_x.copy_(row_scale[:, None] * diff if row_scale.numel() == B else row_scale * diff)
    if centers is None and grad_centers is None:
        return
    row_weight = 1.0 if centers is not None else -row_scale.expand(B)[:, None]
    # rows with a label outside [0, C) go to a spare row that is dropped: never out of bounds
    sums = torch.zeros(num_classes + 1, D, dtype=diff.dtype, device=diff.device)
    with deterministic_algorithms(deterministic):  # selects torch's sorted accumulate path
        sums.index_put_((label_slots(labels, num_classes),), diff * row_weight, accumulate=True)
    sums = sums[:num_classes]
    if centers is not None:
        counts = class_counts(labels, num_classes).to(diff.dtype)
        centers.add_(sums * (outputs.alpha / (1.0 + counts))[:, None])
    else:
        grad_centers.copy_(sums)
