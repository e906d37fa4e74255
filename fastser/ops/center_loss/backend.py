"""The contract every center-loss backend keeps, written once: `Backend` (a module per backend,
backend_torch.py the reference), the structures its functions take, and what more than one backend
uses — label bookkeeping (a label outside [0, C) never reads or writes out of bounds), the class
segments of the deterministic sums, the GPU backends' split of a backward into a fused pass and a
deterministic segment pass, and the scratch a counting forward (Triton's) fills."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch


# ---------------------------------------------------------------------------- the arguments


@dataclass(frozen=True)
class CallSettings:
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
class BackwardOutputs:
    """What a backward pass writes; each may be None. centers: moved in place by Wen's rule with
    step alpha; grad_centers: filled with the gradient of the loss with respect to the centers."""

    grad_x: Optional[torch.Tensor] = None
    centers: Optional[torch.Tensor] = None
    alpha: float = 0.0
    grad_centers: Optional[torch.Tensor] = None


@dataclass
class Tallies:
    """What a counting forward (a backend with COUNTS_IN_FORWARD) adds into, on the device: `stats`
    (new_stats) the class counts and the bad-row count, `bad_batches` 1 for a batch
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


@runtime_checkable
class Backend(Protocol):
    """What the op (op.py) calls on a backend module. The three flags say what the backend does
    itself: its forward counts classes and bad rows into `tallies` (COUNTS_IN_FORWARD), its backward
    skips a bad batch's center writes on the device (GATES_IN_KERNEL), its backward must not see a
    label outside [0, C) (NEEDS_LABELS_IN_RANGE)."""

    COUNTS_IN_FORWARD: bool
    GATES_IN_KERNEL: bool
    NEEDS_LABELS_IN_RANGE: bool

    def diff_dtype(self, x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
        """What the forward stores diff = x - c_y in."""

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        centers: torch.Tensor,
        row_loss: torch.Tensor,
        diff: torch.Tensor,
        *,
        bad_label_is_nan: bool = False,
        tallies: Tallies = ...,
    ) -> None:
        """Writes row_loss (B,) (the compute dtype) and diff (B, D) (diff_dtype), allocated by the
        op, B > 0. A label outside [0, C) gives its row a NaN loss (or raises, where the backend
        cannot, unless bad_label_is_nan)."""

    def backward(
        self,
        diff: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        weights: RowWeights,
        outputs: BackwardOutputs,
        deterministic: bool,
        batch: BatchStats = ...,
    ) -> None:
        """Writes `outputs`: grad_x, and the Wen update of the centers or their gradient."""


# ---------------------------------------------------------------------------- shared by backends


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


def fused_and_segment_outputs(
    labels: torch.Tensor,
    num_classes: int,
    outputs: BackwardOutputs,
    deterministic: bool,
    counts: Optional[torch.Tensor],
) -> tuple[BackwardOutputs, Optional[torch.Tensor], bool]:
    """A GPU backward's two passes: (what the fused row pass writes, the class counts its Wen update
    needs, whether a segment pass writes the centers after it). The fused pass scatters with
    atomics; the deterministic mode leaves the centers to the segment pass (fixed order sums).
    `counts`: the forward's class counts where it made them (else they are made here)."""
    scatter = outputs.centers is not None or outputs.grad_centers is not None
    fused_scatter = scatter and not deterministic
    if fused_scatter and outputs.centers is not None:
        counts = counts if counts is not None else class_counts(labels, num_classes)
    else:
        counts = None
    fused = BackwardOutputs(
        outputs.grad_x,
        outputs.centers if fused_scatter else None,
        outputs.alpha,
        outputs.grad_centers if fused_scatter else None,
    )
    return fused, counts, scatter and deterministic


# ---------------------------------------------------------------------------- a counting forward's scratch

STATS_LOSS = 1  # the slot after the bad-row count: the batch's reduced loss, as fp32 bits


def new_stats(num_classes: int, device) -> torch.Tensor:
    """(num_classes + 2,) int32 zeros for the Triton forward to fill: each class's row count, the
    number of bad rows (label outside [0, C) or a non-finite feature), then the reduced loss (its
    fp32 bits: `loss_slot`)."""
    return torch.zeros(num_classes + 1 + STATS_LOSS, dtype=torch.int32, device=device)


def loss_slot(stats: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`stats`' loss slot as a 0-d fp32 tensor of its own: the kernel adds into it and the forward
    returns it (same memory, not an autograd view: a caller may change its loss in place or keep it,
    and the slot is never handed out again)."""
    out = torch.empty(0, dtype=torch.float32, device=stats.device)
    return out.set_(stats.untyped_storage(), stats.storage_offset() + num_classes + 1, (), ())


class StatsSlab:
    """The Triton forward's scratch, zeroed ahead: a (K, C + 2) int32 block is zeroed by one
    launch and each forward takes its next unused row, instead of a zeroing launch a step. A row is
    never handed out twice, so nothing that still reads one (a step's autograd graph, a loss kept
    for logging, a second forward before the first backward) can see it reused; a used-up block is
    freed by the tensors still viewing it. One block per (device, stream, C): a row zeroed on one
    stream is taken on that stream only. While a CUDA graph is being captured the row is zeroed
    inside the graph instead (a row taken once would be replayed with its old counts)."""

    BYTES = 1 << 22  # per block: 64 rows up to C = 16382, fewer (at least one) above

    def __init__(self):
        self._blocks: dict = {}

    def clear(self) -> None:
        """Forget every block: the next take zeroes a new one (rows handed out stay valid)."""
        self._blocks.clear()

    def take(self, num_classes: int, device: torch.device) -> torch.Tensor:
        stream = None
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return new_stats(num_classes, device)
            stream = torch.cuda.current_stream(device).stream_id
        key = (device, stream, num_classes)
        entry = self._blocks.get(key)
        row = next(entry[1], None) if entry is not None else None
        if row is None:
            width = num_classes + 1 + STATS_LOSS
            block = torch.zeros(max(1, min(64, self.BYTES // (4 * width))), width, dtype=torch.int32, device=device)
            entry = self._blocks[key] = (block, iter(range(block.shape[0])))
            row = next(entry[1])
            if len(self._blocks) > 64:  # many class counts or streams: keep the newest blocks only
                del self._blocks[next(iter(self._blocks))]
        return entry[0][row]


STATS_SLAB = StatsSlab()
