"""The center-loss op's argument structures, shared by its dispatch (center_loss.py) and its
kernels' launchers (center_loss_triton.py, _native.py) without either importing the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Plan:
    """What one call does besides its tensors, fixed from its forward to its backward."""

    num_classes: int
    backend: str  # resolved: "triton", "cuda", "cpp" or "torch"
    reduction: str = "mean"
    wen_alpha: Optional[float] = None  # given: the backward moves the centers by Wen's rule
    deterministic: bool = False
    validate: str = "eager"  # one of VALIDATE
    process_group: object = None


@dataclass
class RowWeights:
    """Row i's gradient weight is scale[i] * mult: scale (1,) or (B,) is the upstream gradient as
    autograd hands it over (the Triton kernels read it as it is and multiply by mult themselves)."""

    scale: torch.Tensor
    mult: float = 1.0

    def multiplied(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.scale.to(dtype) * self.mult).contiguous()


@dataclass
class Targets:
    """What a backward pass writes; each may be None. centers: moved in place by Wen's rule with
    step alpha; grad_centers: filled with the gradient of the loss with respect to the centers."""

    grad_x: Optional[torch.Tensor] = None
    centers: Optional[torch.Tensor] = None
    alpha: float = 0.0
    grad_centers: Optional[torch.Tensor] = None


@dataclass
class Tallies:
    """What a counting forward (a backend with COUNTS_IN_FORWARD) adds into, on the device: `stats`
    (center_loss_stats.new_stats) the class counts and the bad-row count, `bad_batches` 1 for a batch
    with a bad row, `loss` the sum of the row losses times `loss_scale`. Other backends ignore it."""

    stats: Optional[torch.Tensor] = None
    bad_batches: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    loss_scale: float = 0.0


@dataclass
class BatchStats:
    """What the forward learnt about the batch. bad: 0-d device tensor (int32 count or bool),
    nonzero = a bad row, so no center may be written (deferred validation); counts: (C,) the class
    counts the Triton forward made (the Wen update's denominators)."""

    bad: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None


@dataclass
class Saved:
    """What the forward leaves for the backward."""

    diff: torch.Tensor  # (B, D) in _diff_dtype
    labels: torch.Tensor  # (B,) int64
    centers: Optional[torch.Tensor]  # the tensor the Wen update moves, or None
    centers_dtype: torch.dtype
    x_dtype: torch.dtype
    batch: BatchStats
