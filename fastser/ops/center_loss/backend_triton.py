"""Triton kernels for the fused center loss (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

forward : per block of rows, diff = x - c_y (fp32; stored in the features' dtype when that is
          fp16/bf16, which halves its round trip) and the row's squared distance, one pass;
          with STATS, also each class's row count (for the Wen update) and the batch's number of
          bad rows (label out of range or a non-finite feature), with integer atomics into one
          (C + 2,) int32 row of zeros — the counts and the validity flag cost no launch of their own —
          and, given a bad-batch counter, adds 1 to it when the batch has a bad row; given a
          nonzero loss_scale, also the batch's loss (the row losses times loss_scale: 1/B for a
          mean) into one fp32 slot, so the reduction costs no launch either (atomic: its order,
          and so its last bits, vary from run to run; the deterministic mode reduces with torch).
backward: per block of rows, grad_x = g_i * diff_i (g_i = the upstream gradient, read in place,
          times 2 * scale) and, in the same pass, the Wen update or the
          center gradient scattered with fp32 atomics; or, deterministic, one program per
          (class, column block) summing its rows in label-sorted order, no atomics.
          GATE (deferred validation): a device counter BAD (the forward's bad-row count, or a
          bool) is read by each program; where it is nonzero no center is written, with no host
          round trip.

Each kernel has a `*_launch` function (tensors -> a TritonLaunch with every argument by name) and
a `launch_*` function that runs it; tests/ops/test_gpu_compile.py compiles the launches for
sm_80/sm_90. `forward` and `backward` at the end are the backend interface the op dispatches to.
"""

import torch
import triton
import triton.language as tl

from fastser.ops._triton_launch import TritonLaunch, cdiv, next_power_of_2
from fastser.ops.center_loss.backend import class_segments, fused_and_segment_outputs
from fastser.ops.center_loss.backend import BatchStats, RowWeights, Tallies, BackwardOutputs

ROWS = 4  # rows per program: enough independent loads in flight for D in the hundreds
SCATTER_NONE, SCATTER_WEN, SCATTER_GRAD = 0, 1, 2


def block_d(D: int, cap: int = 512) -> int:
    return max(16, min(cap, next_power_of_2(D)))


# B changes from batch to batch and C is any class count: not specialised on their values
# (divisibility by 16, == 1), so a last short batch compiles nothing new. D is: its divisibility is
# what lets the row loads and stores be 128-bit. The counters and flags are read or added to one
# element at a time, often through a view at an odd offset (stats[C]): their alignment buys nothing.
@triton.jit(do_not_specialize=["B", "C"], do_not_specialize_on_alignment=["STATS_ptr", "BAD_BATCHES_ptr", "LOSS_ptr"])
def _forward_kernel(
    X_ptr,
    LABELS_ptr,
    CENTERS_ptr,
    ROW_LOSS_ptr,
    DIFF_ptr,
    STATS_ptr,
    BAD_BATCHES_ptr,
    LOSS_ptr,
    loss_scale,
    B,
    D,
    C,
    STATS: tl.constexpr,
    COUNT_BAD_BATCHES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    labels = tl.load(LABELS_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (labels >= 0) & (labels < C)  # the host checks labels; never read out of bounds
    labels = tl.where(valid, labels, 0)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < D)
        x = tl.load(X_ptr + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(CENTERS_ptr + labels[:, None] * D + cols[None, :], mask=m, other=0.0)
        v = x - c
        tl.store(DIFF_ptr + rows[:, None] * D + cols[None, :], v.to(DIFF_ptr.dtype.element_ty), mask=m)
        acc += v * v
    loss = tl.sum(acc, axis=1)
    row_loss = tl.where(valid, loss, float("nan"))
    tl.store(ROW_LOSS_ptr + rows, row_loss, mask=row_ok)
    if loss_scale != 0.0:  # LOSS_ptr: one fp32 zero (a slot of the stats scratch), the batch's reduced loss
        tl.atomic_add(LOSS_ptr, tl.sum(tl.where(row_ok, row_loss, 0.0), axis=0) * loss_scale, sem="relaxed")
    if STATS:  # STATS_ptr: C class counts, then the bad-row count; zeroed by the caller (a slab row)
        one = tl.full((ROWS,), 1, tl.int32)
        tl.atomic_add(STATS_ptr + labels, one, mask=valid, sem="relaxed")
        # a sum of squares is finite iff it is below inf (NaN compares False)
        bad = row_ok & ((valid & (loss < float("inf"))) == 0)
        n_bad = tl.sum(bad.to(tl.int32), axis=0)
        old = tl.atomic_add(STATS_ptr + C, n_bad, mask=n_bad > 0, sem="relaxed")
        if COUNT_BAD_BATCHES:  # the program whose bad rows arrive first counts the batch, exactly once
            tl.atomic_add(BAD_BATCHES_ptr, 1, mask=(n_bad > 0) & (old == 0), sem="relaxed")


@triton.jit(do_not_specialize=["B", "C"], do_not_specialize_on_alignment=["COUNTS_ptr", "BAD_ptr"])
def _backward_kernel(
    DIFF_ptr,
    LABELS_ptr,
    COUNTS_ptr,
    ROW_SCALE_ptr,
    row_scale_stride,
    row_scale_mult,
    GRAD_X_ptr,
    CENTERS_ptr,
    GRAD_C_ptr,
    BAD_ptr,
    alpha,
    B,
    D,
    C,
    HAS_GRAD_X: tl.constexpr,
    SCATTER: tl.constexpr,
    GATE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # SCATTER: 0 nothing, 1 Wen update into CENTERS, 2 gradient into GRAD_C
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    labels = tl.load(LABELS_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (labels >= 0) & (labels < C)
    if GATE:  # the scalar flag is broadcast as an integer (the interpreter rejects a scalar bool in a mask)
        valid = valid & ((tl.zeros((ROWS,), tl.int32) + tl.load(BAD_ptr).to(tl.int32)) == 0)
    labels = tl.where(valid, labels, 0)
    # each row's weight: its upstream gradient (read in place, any float dtype, stride 0 when shared) x 2 scale
    g = tl.load(ROW_SCALE_ptr + rows * row_scale_stride, mask=row_ok, other=0.0).to(tl.float32) * row_scale_mult
    if SCATTER == 1:
        n = tl.load(COUNTS_ptr + labels, mask=valid, other=0).to(tl.float32)
        coef = alpha / (1.0 + n)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < D)
        v = tl.load(DIFF_ptr + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_GRAD_X:
            gx = g[:, None] * v
            tl.store(GRAD_X_ptr + rows[:, None] * D + cols[None, :], gx.to(GRAD_X_ptr.dtype.element_ty), mask=m)
        mv = valid[:, None] & (cols[None, :] < D)
        if SCATTER == 1:
            tl.atomic_add(CENTERS_ptr + labels[:, None] * D + cols[None, :], coef[:, None] * v, mask=mv, sem="relaxed")
        if SCATTER == 2:
            tl.atomic_add(GRAD_C_ptr + labels[:, None] * D + cols[None, :], -g[:, None] * v, mask=mv, sem="relaxed")


@triton.jit(do_not_specialize_on_alignment=["BAD_ptr"])
def _segment_kernel(
    DIFF_ptr,
    ORDER_ptr,
    OFFSETS_ptr,
    ROW_SCALE_ptr,
    row_scale_stride,
    row_scale_mult,
    OUT_ptr,
    BAD_ptr,
    alpha,
    D,
    WEN: tl.constexpr,
    GATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # OUT is the centers (WEN: c_j += alpha * sum / (1 + n_j)) or the center gradient (written)
    cls = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    if GATE:
        m = m & ((tl.zeros((BLOCK_D,), tl.int32) + tl.load(BAD_ptr).to(tl.int32)) == 0)
    begin = tl.load(OFFSETS_ptr + cls)
    end = tl.load(OFFSETS_ptr + cls + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for k in range(begin, end):
        i = tl.load(ORDER_ptr + k)
        v = tl.load(DIFF_ptr + i * D + cols, mask=m, other=0.0).to(tl.float32)
        if WEN:
            acc += v
        else:
            acc += (tl.load(ROW_SCALE_ptr + i * row_scale_stride).to(tl.float32) * row_scale_mult) * v
    if end > begin:
        if WEN:
            c = tl.load(OUT_ptr + cls * D + cols, mask=m, other=0.0)
            tl.store(OUT_ptr + cls * D + cols, c + acc * (alpha / (1.0 + (end - begin).to(tl.float32))), mask=m)
        else:
            tl.store(OUT_ptr + cls * D + cols, -acc, mask=m)


def _row_scale_stride(row_scale) -> int:
    """row_scale: (1,) one weight for every row, or (B,) (possibly a stride-0 expanded view)."""
    return 0 if row_scale.numel() == 1 else row_scale.stride(0)


def _flag(bad, unused):
    """The gate: an int32 counter as is, a bool viewed as a byte (no copy); nonzero = bad batch."""
    if bad is None:
        return unused
    return bad.view(torch.uint8) if bad.dtype == torch.bool else bad


def forward_launch(
    x, labels, centers, row_loss, diff, stats=None, bad_batches=None, loss=None, loss_scale=0.0
) -> TritonLaunch:
    """x (B, D) any float; labels (B,) int64; centers (C, D) fp32; row_loss (B,) fp32, diff (B, D)
    fp32 or x's half-precision dtype;
    stats (optional, (C + 2,) int32 zeros): gets the class counts and the bad-row count added;
    bad_batches (optional, 0-d integer, needs stats): + 1 if the batch has a bad row;
    loss (optional, one fp32 zero, 0-d): gets the sum of the row losses times loss_scale added."""
    B, D = x.shape
    if loss is None:
        loss, loss_scale = row_loss, 0.0
    return TritonLaunch(
        _forward_kernel,
        (cdiv(B, ROWS),),
        dict(
            X_ptr=x,
            LABELS_ptr=labels,
            CENTERS_ptr=centers,
            ROW_LOSS_ptr=row_loss,
            DIFF_ptr=diff,
            STATS_ptr=stats if stats is not None else labels,
            BAD_BATCHES_ptr=bad_batches if bad_batches is not None else labels,
            LOSS_ptr=loss,
            loss_scale=float(loss_scale),
            B=B,
            D=D,
            C=centers.shape[0],
            STATS=stats is not None,
            COUNT_BAD_BATCHES=stats is not None and bad_batches is not None,
            ROWS=ROWS,
            BLOCK_D=block_d(D),
        ),
    )


def backward_launch(
    diff, labels, counts, num_classes, weights: RowWeights, outputs: BackwardOutputs, bad=None
) -> TritonLaunch:
    """outputs.grad_x (optional) and at most one of outputs.centers (Wen update, needs counts:
    int32 or int64) and outputs.grad_centers; weights.scale is read as it is, weights.mult
    multiplied in; bad (optional 0-d int32 or bool on the device): no center is written unless it
    is 0."""
    B, D = diff.shape
    grad_x, centers, grad_centers = outputs.grad_x, outputs.centers, outputs.grad_centers
    scatter = SCATTER_WEN if centers is not None else (SCATTER_GRAD if grad_centers is not None else SCATTER_NONE)
    unused = diff  # stands in for pointers that a constexpr branch never touches
    return TritonLaunch(
        _backward_kernel,
        (cdiv(B, ROWS),),
        dict(
            DIFF_ptr=diff,
            LABELS_ptr=labels,
            COUNTS_ptr=counts if counts is not None else labels,
            ROW_SCALE_ptr=weights.scale,
            row_scale_stride=_row_scale_stride(weights.scale),
            row_scale_mult=float(weights.mult),
            GRAD_X_ptr=grad_x if grad_x is not None else unused,
            CENTERS_ptr=centers if centers is not None else unused,
            GRAD_C_ptr=grad_centers if grad_centers is not None else unused,
            BAD_ptr=_flag(bad, labels),
            alpha=float(outputs.alpha),
            B=B,
            D=D,
            C=num_classes,
            HAS_GRAD_X=grad_x is not None,
            SCATTER=scatter,
            GATE=bad is not None,
            ROWS=ROWS,
            BLOCK_D=block_d(D),
        ),
    )


def segment_update_launch(
    diff, order, offsets, weights: RowWeights, outputs: BackwardOutputs, bad=None
) -> TritonLaunch:
    """Exactly one of outputs.centers (Wen update) and outputs.grad_centers (written); bad as in
    backward_launch."""
    D = diff.shape[1]
    C = offsets.numel() - 1
    BLOCK_D = block_d(D, cap=256)
    wen = outputs.centers is not None
    return TritonLaunch(
        _segment_kernel,
        (cdiv(D, BLOCK_D), C),
        dict(
            DIFF_ptr=diff,
            ORDER_ptr=order,
            OFFSETS_ptr=offsets,
            ROW_SCALE_ptr=weights.scale,
            row_scale_stride=_row_scale_stride(weights.scale),
            row_scale_mult=float(weights.mult),
            OUT_ptr=outputs.centers if wen else outputs.grad_centers,
            BAD_ptr=_flag(bad, offsets),
            alpha=float(outputs.alpha),
            D=D,
            WEN=wen,
            GATE=bad is not None,
            BLOCK_D=BLOCK_D,
        ),
    )


def launch_forward(x, labels, centers, row_loss, diff, stats=None, bad_batches=None, loss=None, loss_scale=0.0) -> None:
    forward_launch(x, labels, centers, row_loss, diff, stats, bad_batches, loss, loss_scale).launch()


def launch_backward(diff, labels, counts, num_classes, weights: RowWeights, outputs: BackwardOutputs, bad=None) -> None:
    backward_launch(diff, labels, counts, num_classes, weights, outputs, bad).launch()


def launch_segment_update(diff, order, offsets, weights: RowWeights, outputs: BackwardOutputs, bad=None) -> None:
    segment_update_launch(diff, order, offsets, weights, outputs, bad).launch()


# ----------------------------------------------------------------------------- the backend interface
# (backend.Backend, the contract): op.py dispatches here

COUNTS_IN_FORWARD = True  # the forward counts classes and bad rows into `stats`
GATES_IN_KERNEL = True  # the backward kernels read the bad-row count and skip the center writes
NEEDS_LABELS_IN_RANGE = False


def diff_dtype(x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The compute dtype, but half-precision features' own dtype (half the bytes of the round
    trip; the gradient it gives is rounded to that dtype anyway, and the update sums it in fp32)."""
    return x_dtype if x_dtype in (torch.float16, torch.bfloat16) else compute


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
    """Writes row_loss (the compute dtype) and diff (diff_dtype); a label outside [0, C) gets a NaN
    loss. With `tallies.stats` the kernel also adds the class counts and the bad-row count, 1 into
    `tallies.bad_batches` for a batch with a bad row, and the row losses times loss_scale into
    `tallies.loss`."""
    # the kernels read fp32 centers: half-precision (or strided) centers go through an fp32 copy
    cc = centers.to(torch.float32).contiguous()
    t = tallies
    bad_batches = t.bad_batches if t.stats is not None else None
    launch_forward(x, labels, cc, row_loss, diff, t.stats, bad_batches, t.loss, t.loss_scale)


def backward(
    diff: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weights: RowWeights,
    outputs: BackwardOutputs,
    deterministic: bool,
    batch: BatchStats = BatchStats(),
) -> None:
    """Writes `outputs`; batch.bad (if set) gates the center writes inside the kernels, batch.counts
    (the forward's) are the Wen update's denominators."""
    if diff.shape[0] == 0:
        return
    fused, counts, segment_pass = fused_and_segment_outputs(labels, num_classes, outputs, deterministic, batch.counts)
    launch_backward(diff, labels, counts, num_classes, weights, fused, batch.bad)
    if segment_pass:
        order, offsets = class_segments(labels, num_classes)
        launch_segment_update(diff, order, offsets, weights, outputs, batch.bad)
