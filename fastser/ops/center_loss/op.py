"""The center-loss op: the functional `center_loss`, its autograd Function (one formula for eager
execution and torch.compile), the torch.library ops that let torch.compile keep it, its input
checks, and the one place that picks a backend module (fastser.ops.center_loss's docstring: the
formulas, validation modes and files)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from fastser.ops import registry
from fastser.ops.center_loss.backend import (
    STATS_LOSS,
    STATS_SLAB,
    Backend,
    BackwardOutputs,
    BatchStats,
    CallSettings,
    RowWeights,
    Saved,
    Tallies,
    compute_dtype,
    in_range,
    loss_slot,
    new_stats,
    raise_bad_label,
)
from fastser.ops.center_loss.distributed import wen_update_global

BACKENDS = registry.names("center_loss")
REDUCTIONS = ("mean", "sum", "none")
VALIDATE = ("eager", "deferred", "off")


# the modules of the backends built here, imported once (a traced step must find them, not import
# them); ops/registry.py's table says which backends exist, where each runs and which module it is
_MODULES: dict = {
    impl.name: registry.module("center_loss", impl.name)
    for impl in registry.IMPLEMENTATIONS["center_loss"]
    if impl.built()
}


def backend_module(name: str) -> Backend:
    """The module that computes backend `name` (one of available_backends())."""
    return _MODULES[name]


def distributed_world(process_group) -> int:
    """The ranks the Wen update sums over (1 outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Backends built and usable here, fastest first; with `device`, those that run on it."""
    return registry.available("center_loss", device)


def resolve_backend(backend: str, x: torch.Tensor, centers: torch.Tensor) -> str:
    return registry.choose("center_loss", backend, x.device, compute_dtype(x, centers))


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
            raise_bad_label(labels, num_classes)


def _raise_if_bad(
    features: torch.Tensor, labels: torch.Tensor, row_loss: torch.Tensor, num_classes: int, check_features: bool
) -> None:
    """Eager validation after the forward (which gives a bad label's row a NaN loss), in one host
    read: a finite total proves every label in range and every feature finite, so the scans that
    name the culprit run only on the bad path. Before the backward: nothing was written yet."""
    if torch.isfinite(row_loss.sum()).item():
        return
    if not bool(in_range(labels, num_classes).all()):
        raise_bad_label(labels, num_classes)
    if check_features:
        bad = ~torch.isfinite(features).all(dim=1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"features contain NaN or Inf (first in row {row}); the centers were not updated")


# ----------------------------------------------------------------------------- backends


def _forward(
    backend: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    bad_label_is_nan: bool = False,
    tallies: Tallies = Tallies(),
):
    """-> (row_loss (B,) in the compute dtype, diff (B, D) in the backend's diff_dtype), allocated
    here and written by the backend. A label outside [0, C) gives a NaN row loss (the C++ backend
    raises instead unless bad_label_is_nan). `tallies` (backends that count in the forward): what
    the kernel adds the class and bad-row counts, the bad batch and the scaled loss into."""
    impl, compute = backend_module(backend), compute_dtype(x, centers)
    B, D = x.shape
    row_loss = torch.empty(B, dtype=compute, device=x.device)
    diff = torch.empty(B, D, dtype=impl.diff_dtype(x.dtype, compute), device=x.device)
    if B > 0:
        impl.forward(x, labels, centers, row_loss, diff, bad_label_is_nan=bad_label_is_nan, tallies=tallies)
    return row_loss, diff


# ----------------------------------------------------------------------------- autograd
# One autograd formula, CenterLossFunction, for eager execution and torch.compile alike. Its two
# halves are also registered as torch.library custom ops (below) with fake implementations, which
# is what lets torch.compile(fullgraph=True) keep the fused loss, and the Wen update (a mutation of
# the centers inside the backward), in its graph. Eager calls run the ops' bodies directly: the
# dispatcher would add a few microseconds a call to the step's host time and change nothing else.


class CenterLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, labels, centers, plan: CallSettings, bad_batches):
        compiling = torch.compiler.is_compiling()
        C = plan.num_classes
        labels = labels.long().contiguous()
        x = features.contiguous()
        writes = plan.wen_alpha is not None or centers.requires_grad
        # a compiled step cannot read the host, so it validates on the device, as "deferred" does
        validate = "deferred" if compiling and plan.validate == "eager" else plan.validate
        count = backend_module(plan.backend).COUNTS_IN_FORWARD and writes  # classes and bad rows
        B = x.shape[0]
        # ... and, called eagerly, reduces the loss itself (atomically: not in the deterministic mode)
        fused_total = (
            count
            and not compiling
            and plan.reduction != "none"
            and not plan.deterministic
            and B > 0
            and compute_dtype(x, centers) == torch.float32
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
        if backend_module(plan.backend).NEEDS_LABELS_IN_RANGE and validate == "deferred":
            labels = torch.where(in_range(labels, C), labels, 0)  # the batch is dropped anyway
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
        if torch.compiler.is_compiling() and distributed_world(plan.process_group) == 1:
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
    plan: CallSettings, saved: Saved, weights: RowWeights, want_grad_x: bool, want_grad_centers: bool
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
    gated_in_kernel = bad is not None and backend_module(plan.backend).GATES_IN_KERNEL
    if centers is not None:
        if distributed_world(plan.process_group) > 1:
            wen_update_global(diff, labels, centers, plan.wen_alpha, plan.process_group, bad)
        else:
            # the kernels update fp32/fp64 contiguous centers in place; anything else via a copy
            # (so is an update gated by `bad` outside a kernel: it is kept or dropped as a whole)
            direct = centers.dtype == compute and centers.is_contiguous() and (bad is None or gated_in_kernel)
            work_centers = centers.data if direct else centers.detach().to(compute, copy=True).contiguous()
            update_here = work_centers
    kernel_batch = BatchStats(bad if gated_in_kernel else None, saved.batch.counts)
    # the backend writes the outputs; batch.bad gates the center writes inside the kernels of a
    # backend that GATES_IN_KERNEL (the others are gated here), batch.counts are the forward's
    backend, run = backend_module(plan.backend), (diff, labels, C, weights)
    if update_here is not None and grad_c is not None:
        # both wanted (unusual): two passes, the update first would change nothing the gradient reads
        backend.backward(*run, BackwardOutputs(grad_x=grad_x, grad_centers=grad_c), plan.deterministic, BatchStats())
        outputs = BackwardOutputs(centers=update_here, alpha=plan.wen_alpha)
        backend.backward(*run, outputs, plan.deterministic, kernel_batch)
    else:
        outputs = BackwardOutputs(grad_x, update_here, plan.wen_alpha or 0.0, grad_c)
        backend.backward(*run, outputs, plan.deterministic, kernel_batch)
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
    tallies = Tallies(stats if count else None, bad_batches, total, loss_scale)
    row_loss, diff = _forward(backend, features, labels, centers.contiguous(), bad_label_is_nan, tallies)
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
    compute = compute_dtype(features, centers)
    B, D = features.shape
    return (
        features.new_empty(B, dtype=compute),
        features.new_empty(B, D, dtype=backend_module(backend).diff_dtype(features.dtype, compute)),
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
    plan = CallSettings(
        centers.shape[0], backend, wen_alpha=wen_alpha if update_centers else None, deterministic=deterministic
    )
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
    """Fused center loss, sum_i ||x_i - c_{y_i}||^2 (the functional form of `fastser.nn.CenterLoss`).

    Args:
        features (Tensor): (B, D) float32 / float16 / bfloat16 / float64, on the centers' device.
        labels (Tensor): (B,) integer class indices in [0, C).
        centers (Tensor): (C, D); with requires_grad they receive their gradient (the usual
            module's), else none.
        reduction (str): "mean" (divided by B), "sum" or "none" (per-row losses).
        wen_alpha (float, optional): the centers are moved in place by Wen et al.'s rule,
            c_j += wen_alpha * sum_{i: y_i=j} (x_i - c_j) / (1 + n_j), when the backward runs (once
            per backward); the forward never changes them.
        backend (str): "auto", "triton", "cuda", "cpp" or "torch" (fastser.ops.available_backends()).
        deterministic (bool): no floating-point atomics (bit-identical results run to run).
        process_group: under torch.distributed, the Wen update sums over this group's ranks.
        validate: "eager" (or True): shapes, devices, label range and, when the centers will be
            written, finiteness checked first, raising before anything is written (on CUDA a host
            sync). "deferred": the same checks on the device, no sync: a bad batch leaves the
            centers untouched (zero center gradient), its loss is NaN, and it is counted into
            `bad_batches`. "off" (or False): shapes only (a bad label's row is left out of the
            update). Under torch.compile "eager" acts as "deferred".
        bad_batches (Tensor, optional): an integer counter on the device, for "deferred".

    Returns:
        Tensor: a scalar ((B,) with reduction="none") in the promoted dtype of features and
        centers, with gradients to `features` (and to `centers` when they require them).

    Example:
        >>> centers = torch.zeros(4, 2)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> loss = center_loss(x, torch.tensor([0, 1]), centers, wen_alpha=0.5)
        >>> loss.item()
        2.5
        >>> loss.backward(); centers[:2].tolist()
        [[0.25, 0.0], [0.0, 0.5]]
    """
    validate = validate_mode(validate)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if centers.dim() != 2:
        raise ValueError(f"centers must be 2-D (num_classes, feat_dim), got shape {tuple(centers.shape)}")
    if validate != "off":  # the checks that need no host read (shapes, dtypes, devices); eager checks the
        check_inputs(features, labels, centers, label_range=False)  # values after the forward, in one read
    plan = CallSettings(
        centers.shape[0],
        resolve_backend(backend, features, centers),
        reduction,
        wen_alpha,
        deterministic,
        validate,
        process_group,
    )
    return CenterLossFunction.apply(features, labels, centers, plan, bad_batches)
