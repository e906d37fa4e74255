"""What more than one center-loss backend uses: label bookkeeping (a label outside [0, C) never
reads or writes out of bounds), the class segments of the deterministic sums, and the GPU backends'
split of a backward into a fused pass and a deterministic segment pass."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fastser.ops.center_loss_types import Targets


def compute_dtype(x: torch.Tensor, centers: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, centers.dtype) else torch.float32


def in_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) bool: the label is a class index in [0, num_classes)."""
    return (labels >= 0) & (labels < num_classes)


def label_slots(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each label, or num_classes (a spare slot after every class) where it is out of range."""
    return torch.where(in_range(labels, num_classes), labels, num_classes)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) int64 count of each label. Not torch.bincount: on CUDA it reads the largest
    label back to the host to size its output (a sync every step); the size is known here.
    Integer sums are exact in any order, so this is deterministic on every device. Labels outside
    [0, num_classes) (possible when validation is off) count into a spare slot: never an
    out-of-bounds write, which on a GPU would be a device-side assert."""
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    return counts.scatter_add_(0, label_slots(labels, num_classes), torch.ones_like(labels))[:num_classes]


def class_segments(labels: torch.Tensor, num_classes: int):
    """Rows sorted by label (stable) and the class offsets into them, for deterministic sums."""
    counts = class_counts(labels, num_classes)
    offsets = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return torch.sort(label_slots(labels, num_classes), stable=True).indices, offsets  # out-of-range rows last


def raise_bad_label(labels: torch.Tensor, num_classes: int) -> None:
    first = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
    raise ValueError(
        f"labels must lie in [0, {num_classes}): label {int(labels[first])} at index {first} "
        f"is out of range (num_classes={num_classes}); the centers were not changed"
    )


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled and not previous:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not previous:
            torch.use_deterministic_algorithms(False)


def fused_and_segment_targets(
    labels: torch.Tensor, num_classes: int, targets: Targets, deterministic: bool, counts: Optional[torch.Tensor]
) -> tuple[Targets, Optional[torch.Tensor], bool]:
    """A GPU backward's two passes: (what the fused row pass writes, the class counts its Wen update
    needs, whether a segment pass writes the centers after it). The fused pass scatters with
    atomics; the deterministic mode leaves the centers to the segment pass (fixed order sums).
    `counts`: the forward's class counts where it made them (else they are made here)."""
    scatter = targets.centers is not None or targets.grad_centers is not None
    fused_scatter = scatter and not deterministic
    if fused_scatter and targets.centers is not None:
        counts = counts if counts is not None else class_counts(labels, num_classes)
    else:
        counts = None
    fused = Targets(
        targets.grad_x,
        targets.centers if fused_scatter else None,
        targets.alpha,
        targets.grad_centers if fused_scatter else None,
    )
    return fused, counts, scatter and deterministic
