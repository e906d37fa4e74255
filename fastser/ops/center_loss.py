"""The fused center loss: one autograd Function and the one place that picks a backend.

    loss   = scale * sum_i ||x_i - c_{y_i}||^2          scale = 1/B ("mean") or 1 ("sum")
    dL/dx_i = 2 * scale * (x_i - c_{y_i}) * grad_output
    dL/dc_j = -2 * scale * sum_{i: y_i = j} (x_i - c_j) * grad_output      (centers.requires_grad)
    Wen update, once per backward (wen_alpha given):
           c_j <- c_j + alpha * sum_{i: y_i = j} (x_i - c_j) / (1 + n_j)

Every backend has the same two steps. The forward reads x and the gathered centers once and
writes the per-row squared distance and diff = x - c_y in fp32 (fp64 for float64 inputs; the
Triton kernels keep half-precision features' diff in their dtype): that
is all the backward needs, so a later in-place update of the centers cannot change the gradient.
The backward reads diff once, writes grad_x and, in the same pass, updates the centers (or
writes their gradient). Extra memory is O(B*D + C); nothing of size B x C is ever built.

Backends: "triton" and "cuda" (CUDA tensors), "cpp" (CPU, OpenMP), "torch" (gather/index_put,
any device; the fallback and the test oracle).

Validation (`validate`): "eager" (True) checks labels and finiteness before anything is written and
raises, at the price of one host read a step, after the forward (free on the CPU, a stream stall
on a GPU); "deferred" keeps
every check on the device: a batch with a non-finite feature or a label outside [0, C) has NaN row
losses, its Wen update is skipped as a whole (and its center gradient is zero), and a device
counter records it, to be read when the caller chooses (CenterLoss.raise_on_bad_batches());
"off" (False) checks shapes only (a bad label's row is left out of the update, never written
out of bounds).

The Triton backend's forward also counts each class's rows and the batch's bad rows into one small
int32 buffer (`stats`), so a step is: zero the buffer, the forward kernel, the loss mean, the
backward kernel (grad_x + Wen update, gated on the bad-row count) — no class-count or
finiteness ops between them, and nothing read back to the host.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from fastser.ops import _native, registry
from fastser.ops.center_loss_types import BatchStats, Plan, RowWeights, Saved, Targets

BACKENDS = registry.names("center_loss")
REDUCTIONS = ("mean", "sum", "none")
VALIDATE = ("eager", "deferred", "off")

try:  # Triton is optional: the CUDA wheels of torch bring it, the CPU wheel does not
    from fastser.ops import center_loss_triton as _triton
except ImportError:  # pragma: no cover - depends on the environment
    _triton = None


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Backends built and usable here, fastest first; with `device`, those that run on it."""
    return registry.available("center_loss", device)


def resolve_backend(backend: str, x: torch.Tensor, centers: torch.Tensor) -> str:
    return registry.choose("center_loss", backend, x.device, _compute_dtype(x, centers))


def _compute_dtype(x: torch.Tensor, centers: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, centers.dtype) else torch.float32


def _diff_dtype(backend: str, x_dtype: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """What the forward stores diff in: the compute dtype, but half-precision features' own dtype
    on the Triton backend (half the bytes of the round trip; the gradient it gives is rounded to
    that dtype anyway, and the update sums it in fp32)."""
    return x_dtype if backend == "triton" and x_dtype in (torch.float16, torch.bfloat16) else compute


# ----------------------------------------------------------------------------- input checks


def validate_mode(validate) -> str:
    """True/False (the older spelling) or one of VALIDATE -> one of VALIDATE."""
    if validate is True or validate is False:
        return "eager" if validate else "off"
    if validate not in VALIDATE:
        raise ValueError(f"validate must be True, False or one of {VALIDATE}, got {validate!r}")
    return validate


def check_inputs(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, label_range: bool = True) -> None:
    """Raise a ValueError/TypeError that names what is wrong; touches nothing. label_range=False skips
    the one check that reads a value back to the host."""
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("features and labels must be torch tensors")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (batch, feat_dim), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"batch size mismatch: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    num_classes, feat_dim = centers.shape
    if features.shape[1] != feat_dim:
        raise ValueError(f"features have dimension {features.shape[1]} but the centers have feat_dim={feat_dim}")
    if features.device != centers.device or labels.device != features.device:
        raise ValueError(
            f"tensors on different devices: features on {features.device}, labels on "
            f"{labels.device}, centers on {centers.device}"
        )
    if label_range and labels.numel():
        lo, hi = torch.aminmax(labels)
        if lo.item() < 0 or hi.item() >= num_classes:
            _raise_bad_label(labels, num_classes)


def _raise_bad_label(labels: torch.Tensor, num_classes: int) -> None:
    first = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
    raise ValueError(
        f"labels must lie in [0, {num_classes}): label {int(labels[first])} at index {first} "
        f"is out of range (num_classes={num_classes}); the centers were not changed"
    )


def _raise_if_bad(
    features: torch.Tensor, labels: torch.Tensor, row_loss: torch.Tensor, num_classes: int, check_features: bool
) -> None:
    """Eager validation after the forward (which gives a bad label's row a NaN loss), in one host
    read: a finite total proves every label in range and every feature finite, so the scans that
    name the culprit run only on the bad path. Before the backward: nothing was written yet."""
    if torch.isfinite(row_loss.sum()).item():
        return
    if not bool(_in_range(labels, num_classes).all()):
        _raise_bad_label(labels, num_classes)
    if check_features:
        bad = ~torch.isfinite(features).all(dim=1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"features contain NaN or Inf (first in row {row}); the centers were not updated")


# ----------------------------------------------------------------------------- a call's plan, the kernels' arguments


# ----------------------------------------------------------------------------- backends


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


def _forward(
    backend: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    bad_label_is_nan: bool = False,
    stats: Optional[torch.Tensor] = None,
    bad_batches: Optional[torch.Tensor] = None,
    loss: Optional[torch.Tensor] = None,
    loss_scale: float = 0.0,
):
    """-> (row_loss (B,) in the compute dtype, diff (B, D) in _diff_dtype). A label outside [0, C) gives a
    NaN row loss (the C++ backend raises instead unless bad_label_is_nan). stats (Triton only, from
    `new_stats`): the kernel adds the class counts and the bad-row count into it, 1 into
    `bad_batches` (if given) for a batch with a bad row, and into `loss` (its `loss_slot`, if given)
    the sum of the row losses times loss_scale."""
    compute = _compute_dtype(x, centers)
    B, D = x.shape
    if backend == "torch":
        # a label outside [0, C) gathers row 0 and gets a NaN loss, as in the kernels: never an
        # out-of-bounds read, whatever the validation mode
        valid = _in_range(labels, centers.shape[0])
        diff = x.to(compute) - centers.to(compute).index_select(0, torch.where(valid, labels, 0))
        return diff.pow(2).sum(1).masked_fill(~valid, float("nan")), diff
    row_loss = torch.empty(B, dtype=compute, device=x.device)
    diff = torch.empty(B, D, dtype=_diff_dtype(backend, x.dtype, compute), device=x.device)
    if B == 0:
        return row_loss, diff
    if backend == "cpp":
        xc, cc = x.to(compute).contiguous(), centers.to(compute).contiguous()
        if _native.center_loss_forward_cpu(xc, labels, cc, row_loss, diff) >= 0:
            if not bad_label_is_nan:
                _raise_bad_label(labels, cc.shape[0])
            valid = _in_range(labels, cc.shape[0])  # the kernels' convention, on the error path only
            _native.center_loss_forward_cpu(xc, torch.where(valid, labels, 0), cc, row_loss, diff)
            row_loss.masked_fill_(~valid, float("nan"))
        return row_loss, diff
    # the GPU kernels read fp32 centers: half-precision (or strided) centers go through an fp32 copy
    cc = centers.to(torch.float32).contiguous()
    if backend == "cuda":
        _native.center_loss_forward_cuda(x, labels, cc, row_loss, diff)
    else:
        bad_batches = bad_batches if stats is not None else None
        _triton.forward(x, labels, cc, row_loss, diff, stats, bad_batches, loss, loss_scale)
    return row_loss, diff


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled and not previous:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not previous:
            torch.use_deterministic_algorithms(False)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) int64 count of each label. Not torch.bincount: on CUDA it reads the largest
    label back to the host to size its output (a sync every step); the size is known here.
    Integer sums are exact in any order, so this is deterministic on every device. Labels outside
    [0, num_classes) (possible when validation is off) count into a spare slot: never an
    out-of-bounds write, which on a GPU would be a device-side assert."""
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    return counts.scatter_add_(0, _slots(labels, num_classes), torch.ones_like(labels))[:num_classes]


def _slots(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each label, or num_classes (a spare slot after every class) where it is out of range."""
    return torch.where(_in_range(labels, num_classes), labels, num_classes)


def _in_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) bool: the label is a class index in [0, num_classes)."""
    return (labels >= 0) & (labels < num_classes)


def _segments(labels: torch.Tensor, num_classes: int):
    """Rows sorted by label (stable) and the class offsets into them, for deterministic sums."""
    counts = class_counts(labels, num_classes)
    offsets = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return torch.sort(_slots(labels, num_classes), stable=True).indices, offsets  # out-of-range rows last


def _backward(
    backend: str,
    diff: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weights: RowWeights,
    targets: Targets,
    deterministic: bool,
    batch: BatchStats = BatchStats(),
) -> None:
    """Writes `targets`: grad_x, and either the Wen update of the centers or their gradient.
    batch.bad gates the center writes inside the Triton kernels only (the other backends are gated
    by the caller); batch.counts (Triton) are the forward's class counts, otherwise made here."""
    B, D = diff.shape
    grad_x, centers, grad_centers = targets.grad_x, targets.centers, targets.grad_centers
    if backend == "torch":
        row_scale = weights.multiplied(diff.dtype)
        if grad_x is not None:
            grad_x.copy_(row_scale[:, None] * diff if row_scale.numel() == B else row_scale * diff)
        if centers is not None or grad_centers is not None:
            row_weight = 1.0 if centers is not None else -row_scale.expand(B)[:, None]
            # rows with a label outside [0, C) go to a spare row that is dropped: never out of bounds
            sums = torch.zeros(num_classes + 1, D, dtype=diff.dtype, device=diff.device)
            with _deterministic_algorithms(deterministic):  # selects torch's sorted accumulate path
                sums.index_put_((_slots(labels, num_classes),), diff * row_weight, accumulate=True)
            sums = sums[:num_classes]
            if centers is not None:
                counts = class_counts(labels, num_classes).to(diff.dtype)
                centers.add_(sums * (targets.alpha / (1.0 + counts))[:, None])
            else:
                grad_centers.copy_(sums)
        return
    if B == 0:
        return
    if backend == "cpp":
        # the C++ kernels write the compute dtype; half-precision gradients are cast afterwards
        gx = grad_x if grad_x is None or grad_x.dtype == diff.dtype else torch.empty_like(diff)
        row_scale = weights.multiplied(diff.dtype)
        _native.center_loss_backward_cpu(diff, labels, num_classes, row_scale, gx, centers, targets.alpha, grad_centers)
        if gx is not grad_x:
            grad_x.copy_(gx)
        return
    scatter = centers is not None or grad_centers is not None
    fused_scatter = scatter and not deterministic
    counts = None
    if fused_scatter and centers is not None:
        counts = batch.counts if batch.counts is not None and backend == "triton" else class_counts(labels, num_classes)
    # the deterministic path leaves the scatter to the segment kernels below
    fused = Targets(grad_x, centers if fused_scatter else None, targets.alpha, grad_centers if fused_scatter else None)
    if backend == "cuda":
        row_scale = weights.multiplied(diff.dtype)
        _native.center_loss_backward_cuda(
            diff, labels, counts, num_classes, row_scale, fused.grad_x, fused.centers, fused.alpha, fused.grad_centers
        )
    else:
        _triton.backward(diff, labels, counts, num_classes, weights, fused, batch.bad)
    if scatter and deterministic:
        order, offsets = _segments(labels, num_classes)
        if backend == "cuda":
            _native.center_loss_segment_update_cuda(
                diff, order, offsets, row_scale, centers, targets.alpha, grad_centers
            )
        else:
            _triton.segment_update(diff, order, offsets, weights, targets, batch.bad)


# ----------------------------------------------------------------------------- distributed Wen update


def _distributed_world(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


_SYNC_BUFFERS: dict = {}  # one reusable buffer per centers tensor: no 20 MB page-faulting allocation per step


def _sync_buffer(centers: torch.Tensor) -> torch.Tensor:
    C, D = centers.shape
    key = (centers.data_ptr(), C, D, centers.device)
    buffer = _SYNC_BUFFERS.get(key)
    if buffer is None:
        if len(_SYNC_BUFFERS) > 16:
            _SYNC_BUFFERS.clear()
        buffer = _SYNC_BUFFERS[key] = torch.empty(C * D + C, dtype=torch.float32, device=centers.device)
    return buffer.zero_()


def _wen_update_global(diff, labels, centers, alpha, process_group, bad=None):
    """All-reduce the per-class sums and counts (one fp32 buffer of C*D + C), then update every
    rank alike, so the centers stay bit-identical across ranks.

    The all-reduce is issued asynchronously and waited for in a callback that autograd runs at
    the end of this backward pass, so it overlaps with the rest of the model's backward.
    """
    C, D = centers.shape
    buffer = _sync_buffer(centers)
    sums = buffer[: C * D].view(C, D)
    keep = _in_range(labels, C)  # a bad label's row, or (bad batch) every row, adds nothing
    if bad is not None:
        keep = keep & (bad == 0)
    labels = torch.where(keep, labels, 0)
    sums.index_put_((labels,), torch.where(keep[:, None], diff.float(), 0.0), accumulate=True)
    buffer[C * D :].index_put_((labels,), keep.to(torch.float32), accumulate=True)
    work = dist.all_reduce(buffer, group=process_group, async_op=True)

    def finish():
        work.wait()
        counts = buffer[C * D :]
        if centers.device.type == "cpu":  # touch only the classes some rank saw (nonzero is free here)
            rows = counts.nonzero().squeeze(1)
            step = sums.index_select(0, rows) * (alpha / (1.0 + counts[rows]))[:, None]
            centers.index_add_(0, rows, step.to(centers.dtype))
        else:  # dense on the GPU: no host sync for nonzero()
            centers.add_((sums * (alpha / (1.0 + counts))[:, None]).to(centers.dtype))

    torch.autograd.Variable._execution_engine.queue_callback(finish)


# ----------------------------------------------------------------------------- autograd
# One autograd formula, CenterLossFunction, for eager execution and torch.compile alike. Its two
# halves are also registered as torch.library custom ops (below) with fake implementations, which
# is what lets torch.compile(fullgraph=True) keep the fused loss, and the Wen update (a mutation of
# the centers inside the backward), in its graph. Eager calls run the ops' bodies directly: the
# dispatcher would add a few microseconds a call to the step's host time and change nothing else.


class CenterLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, labels, centers, plan: Plan, bad_batches):
        compiling = torch.compiler.is_compiling()
        C = plan.num_classes
        labels = labels.long().contiguous()
        x = features.contiguous()
        writes = plan.wen_alpha is not None or centers.requires_grad
        # a compiled step cannot read the host, so it validates on the device, as "deferred" does
        validate = "deferred" if compiling and plan.validate == "eager" else plan.validate
        count = plan.backend == "triton" and writes  # the Triton forward counts classes and bad rows
        B = x.shape[0]
        # ... and, called eagerly, reduces the loss itself (atomically: not in the deterministic mode)
        fused_total = (
            count
            and not compiling
            and plan.reduction != "none"
            and not plan.deterministic
            and B > 0
            and _compute_dtype(x, centers) == torch.float32
        )
        args = (x, labels, centers.detach(), plan.backend, validate != "off", count)
        if compiling:
            row_loss, diff, stats = _op_forward(*args)
        else:
            row_loss, diff, stats, total = _forward_op_body(
                *args,
                bad_batches=bad_batches if validate == "deferred" else None,
                loss_scale=(1.0 / B if plan.reduction == "mean" else 1.0) if fused_total else 0.0,
                pooled=True,
            )
        batch = BatchStats(counts=stats[:C] if count else None)
        if validate == "eager":
            # labels out of range, and, when something will write the centers (the Wen update, or an
            # optimizer from their gradient), non-finite features stop the step here
            _raise_if_bad(x, labels, row_loss, C, check_features=writes)
        elif validate == "deferred" and writes:
            if count:  # the kernel counted the bad rows (and, called eagerly, the bad batch)
                batch.bad = stats[C]
                if compiling and bad_batches is not None:
                    bad_batches.add_(batch.bad > 0)
            else:
                batch.bad = _batch_bad(row_loss, bad_batches)
        if plan.backend == "cpp" and validate == "deferred":  # its backward reads the labels unchecked (the
            labels = torch.where(_in_range(labels, C), labels, 0)  # batch is dropped anyway)
        ctx.save_for_backward(diff, labels)
        ctx.plan, ctx.batch, ctx.centers = plan, batch, centers
        ctx.dtypes = (x.dtype, centers.dtype)
        ctx.scale = 1.0 / max(B, 1) if plan.reduction == "mean" else 1.0
        out_dtype = torch.promote_types(features.dtype, centers.dtype)
        if plan.reduction == "none":
            return row_loss if row_loss.dtype == out_dtype else row_loss.to(out_dtype)
        if not fused_total:
            total = row_loss.mean() if plan.reduction == "mean" and B > 0 else row_loss.sum()  # one op, not sum * scale
        return total if total.dtype == out_dtype else total.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        diff, labels = ctx.saved_tensors
        plan, batch, centers = ctx.plan, ctx.batch, ctx.centers
        want_gx, want_gc = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        # d(row loss)/dx = 2 diff, so each row's weight is 2 * scale * upstream gradient
        weights = RowWeights(grad_output.reshape(-1), 2.0 * ctx.scale)
        if torch.compiler.is_compiling() and _distributed_world(plan.process_group) == 1:
            empty = diff.new_empty(0)
            grad_x, grad_c = _op_backward(
                diff,
                labels,
                weights.scale,
                weights.mult,
                centers,
                plan.wen_alpha or 0.0,
                plan.wen_alpha is not None,
                want_gx,
                want_gc,
                ctx.dtypes[0],
                plan.backend,
                plan.deterministic,
                batch.bad if batch.bad is not None else empty,
                batch.counts if batch.counts is not None else empty,
            )
            grad_x, grad_c = (grad_x if want_gx else None), (grad_c if want_gc else None)
        else:
            wen_centers = centers if plan.wen_alpha is not None else None
            saved = Saved(diff, labels, wen_centers, ctx.dtypes[1], ctx.dtypes[0], batch)
            grad_x, grad_c = _backward_step(plan, saved, weights, want_gx, want_gc)
        return grad_x, None, grad_c, None, None


def _batch_bad(row_loss: torch.Tensor, bad_batches: Optional[torch.Tensor]) -> torch.Tensor:
    """0-d bool on the device: the batch has a bad row (a non-finite feature or a label outside
    [0, C) makes its row's loss NaN or Inf) — for the backends whose forward counts nothing. Counts a
    bad batch into `bad_batches`; reads nothing to the host."""
    bad = ~torch.isfinite(row_loss.sum())
    if bad_batches is not None:
        bad_batches.add_(bad)
    return bad


def _backward_step(
    plan: Plan, saved: Saved, weights: RowWeights, want_grad_x: bool, want_grad_centers: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """-> (grad_x or None, grad_centers or None); moves saved.centers by Wen's rule when it is
    given. saved.batch.bad (deferred validation): where nonzero, no center moves and the center
    gradient is zero — decided on the device, in the Triton kernels themselves or by a select here."""
    diff, labels, centers, bad = saved.diff, saved.labels, saved.centers, saved.batch.bad
    C = plan.num_classes
    grad_x = torch.empty(diff.shape, dtype=saved.x_dtype, device=diff.device) if want_grad_x else None
    compute = torch.float64 if diff.dtype == torch.float64 else torch.float32  # diff may be stored in half
    grad_c = torch.zeros(C, diff.shape[1], dtype=compute, device=diff.device) if want_grad_centers else None
    update_here, work_centers = None, None
    gated_in_kernel = bad is not None and plan.backend == "triton"
    if centers is not None:
        if _distributed_world(plan.process_group) > 1:
            _wen_update_global(diff, labels, centers, plan.wen_alpha, plan.process_group, bad)
        else:
            # the kernels update fp32/fp64 contiguous centers in place; anything else via a copy
            # (so is an update gated by `bad` outside a kernel: it is kept or dropped as a whole)
            direct = centers.dtype == compute and centers.is_contiguous() and (bad is None or gated_in_kernel)
            work_centers = centers.data if direct else centers.detach().to(compute, copy=True).contiguous()
            update_here = work_centers
    kernel_batch = BatchStats(bad if gated_in_kernel else None, saved.batch.counts)
    run = (plan.backend, diff, labels, C, weights)
    if update_here is not None and grad_c is not None:
        # both wanted (unusual): two passes, the update first would change nothing the gradient reads
        _backward(*run, Targets(grad_x=grad_x, grad_centers=grad_c), plan.deterministic)
        _backward(*run, Targets(centers=update_here, alpha=plan.wen_alpha), plan.deterministic, kernel_batch)
    else:
        targets = Targets(grad_x, update_here, plan.wen_alpha or 0.0, grad_c)
        _backward(*run, targets, plan.deterministic, kernel_batch)
    if work_centers is not None and not direct:
        if bad is not None and not gated_in_kernel:
            work_centers = torch.where(bad.bool(), centers.data.to(work_centers.dtype), work_centers)
        centers.data.copy_(work_centers)
    if grad_c is not None and bad is not None:
        grad_c = torch.where(bad.bool(), 0.0, grad_c)
    return grad_x, (grad_c.to(saved.centers_dtype) if grad_c is not None else None)


# ----------------------------------------------------------------------------- torch.library ops


def _forward_op_body(
    features, labels, centers, backend, bad_label_is_nan, count, bad_batches=None, loss_scale=0.0, pooled=False
):
    """-> (row_loss, diff, stats, the reduced loss or None). pooled: the stats come from STATS_SLAB
    (eager calls; an op's output must be a fresh tensor); a nonzero loss_scale (needs `count`):
    the kernel reduces the loss too."""
    C = centers.shape[0]
    if count:
        stats = STATS_SLAB.take(C, features.device) if pooled else new_stats(C, features.device)
    else:
        stats = torch.empty(0, dtype=torch.int32, device=features.device)
    total = loss_slot(stats, C) if count and loss_scale else None
    row_loss, diff = _forward(
        backend,
        features,
        labels,
        centers.contiguous(),
        bad_label_is_nan,
        stats if count else None,
        bad_batches,
        total,
        loss_scale,
    )
    return row_loss, diff, stats, total


@torch.library.custom_op("fastser::center_loss_forward", mutates_args=())
def _op_forward(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    backend: str,
    bad_label_is_nan: bool,
    count: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (row_loss (B,), diff (B, D), stats): with `count` (Triton only) stats is (C + 2,) int32,
    each class's row count, the bad rows, the loss slot (unused here); otherwise empty."""
    return _forward_op_body(features, labels.long().contiguous(), centers, backend, bad_label_is_nan, count)[:3]


@_op_forward.register_fake
def _(features, labels, centers, backend, bad_label_is_nan, count):
    compute = _compute_dtype(features, centers)
    B, D = features.shape
    return (
        features.new_empty(B, dtype=compute),
        features.new_empty(B, D, dtype=_diff_dtype(backend, features.dtype, compute)),
        features.new_empty(centers.shape[0] + 1 + STATS_LOSS if count else 0, dtype=torch.int32),
    )


@torch.library.custom_op("fastser::center_loss_backward", mutates_args=("centers",))
def _op_backward(
    diff: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor,
    row_mult: float,
    centers: torch.Tensor,
    wen_alpha: float,
    update_centers: bool,
    want_grad_x: bool,
    want_grad_centers: bool,
    x_dtype: torch.dtype,
    backend: str,
    deterministic: bool,
    bad: torch.Tensor,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CenterLossFunction's backward as an op (a custom op's arguments are flat): bad and counts
    are BatchStats' fields, empty for None. Returns empty tensors for unwanted gradients (an op
    never returns None)."""
    plan = Plan(centers.shape[0], backend, wen_alpha=wen_alpha if update_centers else None, deterministic=deterministic)
    batch = BatchStats(bad if bad.numel() else None, counts if counts.numel() else None)
    saved = Saved(diff, labels.long(), centers if update_centers else None, centers.dtype, x_dtype, batch)
    grad_x, grad_c = _backward_step(
        plan, saved, RowWeights(row_scale.contiguous(), row_mult), want_grad_x, want_grad_centers
    )
    return (
        grad_x if grad_x is not None else diff.new_empty(0, dtype=x_dtype),
        grad_c if grad_c is not None else diff.new_empty(0, dtype=centers.dtype),
    )


@_op_backward.register_fake
def _(diff, labels, row_scale, row_mult, centers, wen_alpha, update, want_grad_x, want_grad_centers, x_dtype, *rest):
    return (
        diff.new_empty(diff.shape if want_grad_x else (0,), dtype=x_dtype),
        diff.new_empty(centers.shape if want_grad_centers else (0,), dtype=centers.dtype),
    )


def center_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    *,
    reduction: str = "mean",
    wen_alpha: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = False,
    process_group=None,
    validate="eager",
    bad_batches: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused center loss (functional form behind `fastser.nn.CenterLoss`).

    features (B, D) float; labels (B,) integer class indices; centers (C, D).
    wen_alpha: if given, the centers are updated in place by the Wen et al. rule when the
        backward runs (once per backward); the forward never changes them.
    centers.requires_grad: the centers receive their gradient (the usual module's).
    validate: "eager" (or True): check shapes, devices, label range and, when the centers will be
        written (Wen update or centers.requires_grad), finiteness, raising a clear error before
        anything is written; on CUDA this costs a host sync. "deferred": the same checks on the
        device, no sync: a bad batch leaves the centers untouched (zero center gradient), its loss
        is NaN, and it is counted into `bad_batches` (an integer tensor on the device, optional).
        "off" (or False): shapes only (a bad label's row is left out of the update).
        Under torch.compile "eager" acts as "deferred": the host read would break the graph.
    """
    validate = validate_mode(validate)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if centers.dim() != 2:
        raise ValueError(f"centers must be 2-D (num_classes, feat_dim), got shape {tuple(centers.shape)}")
    if validate != "off":  # the checks that need no host read (shapes, dtypes, devices); eager checks the
        check_inputs(features, labels, centers, label_range=False)  # values after the forward, in one read
    plan = Plan(
        centers.shape[0],
        resolve_backend(backend, features, centers),
        reduction,
        wen_alpha,
        deterministic,
        validate,
        process_group,
    )
    return CenterLossFunction.apply(features, labels, centers, plan, bad_batches)
