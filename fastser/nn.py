"""User-facing modules. `CenterLoss` is a drop-in for the usual PyTorch center-loss module.

    from fastser.nn import CenterLoss
    center_loss = CenterLoss(num_classes=10, feat_dim=2, use_gpu=True, update="gradient")

Two ways to move the centers:
  update="wen" (default): Wen et al. (ECCV 2016). `centers` is a buffer the model's optimizer
      never sees; the fused backward updates it in place, c_j += alpha * sum(x_i - c_j) / (1 + n_j),
      with the centers the forward saw. Training mode only; the forward never changes them.
  update="gradient": `centers` is an nn.Parameter receiving exactly the usual module's gradient,
      for the common recipe with a second SGD optimizer (grads rescaled by 1/weight).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from fastser.ops.center_loss import REDUCTIONS, center_loss, validate_mode

UPDATES = ("wen", "gradient")


def _module_mode(validate) -> str:
    """A CenterLoss validation mode: the functional's (fastser.ops.center_loss.validate_mode),
    "reported" or "auto"."""
    return validate if validate in ("auto", "reported") else validate_mode(validate)


class BadBatchReports:
    """The host side of "reported" validation: the device's bad-batch counter copied to host
    memory behind the computation (no wait), read once the copy has landed."""

    def __init__(self):
        self.count: Optional[torch.Tensor] = None  # the host's copy of the counter
        self.ready = None  # the event after which `count` is readable (True on the CPU); None: no copy
        self.raised = 0  # bad batches raised already (the device counter only grows)

    def send(self, counter: torch.Tensor) -> None:
        """Copy the counter to the host behind the kernels queued so far, without waiting."""
        if self.count is None:
            self.count = torch.zeros((), dtype=counter.dtype, pin_memory=counter.is_cuda)
        self.count.copy_(counter, non_blocking=True)
        self.ready = torch.cuda.Event() if counter.is_cuda else True
        if counter.is_cuda:
            self.ready.record()

    def arrived(self) -> int:
        """Bad batches whose count has reached the host since the last report (0 as well while a
        copy is still in flight: it is left for a later call, no sync)."""
        if self.ready is None or (self.ready is not True and not self.ready.query()):
            return 0
        self.ready = None
        count = int(self.count)  # host memory
        new, self.raised = max(count - self.raised, 0), max(count, self.raised)
        return new


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016), fused: sum_i ||x_i - c_{y_i}||^2, scaled by 1/B ("mean").

    Args:
        num_classes (C), feat_dim (D): the centers are a (C, D) tensor, initialised N(0, 1).
        use_gpu: put the centers on CUDA at construction (the usual module's argument); or `.to()`.
            Without CUDA they stay on the CPU, with a warning.
        update: "wen" — `centers` is a buffer moved in place by Wen's rule inside the backward,
            c_j += alpha * sum_{i: y_i=j} (x_i - c_j) / (1 + n_j), once per backward and only in
            training mode; "gradient" — `centers` is an nn.Parameter receiving the usual gradient.
        alpha: Wen's update rate.  reduction: "mean" | "sum" | "none" (per-row losses, (B,)).
        backend: "auto" | "triton" | "cuda" | "cpp" | "torch" (fastser.ops.available_backends()).
        deterministic: no floating-point atomics (bit-identical centers, and loss, run to run).
        process_group: under torch.distributed, the Wen update sums over this group's ranks.
        validate: "auto" (default) — "eager" on the CPU, "reported" on a GPU. "eager" (True) —
            check shapes, devices, labels and finiteness first, so a bad batch raises before any
            center is written (on a GPU a host sync, a stall of the stream, per call); "deferred" —
            the same checks on the device, no sync: a bad batch (non-finite features, a label
            outside [0, C)) gets a NaN loss, moves no center (zero center gradient) and is counted
            in `bad_batches`; call `raise_on_bad_batches()` when a host read is cheap (end of an
            epoch, every N steps); "reported" — deferred, and the count travels to the host
            behind the computation (a non-blocking copy), so a later call raises the ValueError
            once it has arrived (the next call, or the one after on a busy GPU), with no call of
            your own and no sync; "off" (False) — shapes only. A mapping {device type: mode} picks
            per device, "*" for the device types it does not name (e.g. {"cpu": "eager", "*":
            "deferred"}: what training uses, checks a CUDA graph can capture).

    Shapes: forward(features (B, D) float32/float16/bfloat16/float64, labels (B,) integer in [0, C))
    -> scalar loss ((B,) with reduction="none"), in the promoted dtype of features and centers.
    Autograd: gradients flow to the features (and to `centers` with update="gradient"); float64
    passes torch.autograd.gradcheck.

    Example (where the usual `CenterLoss(num_classes, feat_dim, use_gpu)` was):
        >>> center_loss = CenterLoss(num_classes=8, feat_dim=128)
        >>> embeddings, labels = torch.randn(16, 128, requires_grad=True), torch.randint(0, 8, (16,))
        >>> loss = center_loss(embeddings, labels)  # add it, weighted, to the cross-entropy
        >>> loss.backward()  # the centers move here, by Wen's rule: no optimizer of their own
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        use_gpu: Optional[bool] = None,
        *,
        update: str = "wen",
        alpha: float = 0.5,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool = False,
        process_group=None,
        validate="auto",
    ):
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be positive, got {num_classes}, {feat_dim}")
        if use_gpu and not torch.cuda.is_available():
            # code written on a GPU machine keeps working where there is none, as the model it
            # trains beside does once moved with .to(); one line says where the centers are
            warnings.warn("CenterLoss(use_gpu=True): CUDA is not available, the centers stay on the CPU", stacklevel=2)
            use_gpu = False
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.update, self.alpha, self.reduction = update, alpha, reduction
        self.backend, self.deterministic = backend, deterministic
        if isinstance(validate, dict):  # {device type: mode}; "*": any other device type
            self.validate = {kind: _module_mode(mode) for kind, mode in validate.items()}
        else:
            self.validate = _module_mode(validate)
        self.process_group = process_group
        centers = torch.randn(num_classes, feat_dim, device="cuda" if use_gpu else None)
        if update == "gradient":
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        # batches skipped by deferred validation since the last check; not in the state dict
        self.register_buffer("bad_batches", torch.zeros((), dtype=torch.int64, device=centers.device), persistent=False)
        self._centers_synced = False
        self._reports = BadBatchReports()

    def _broadcast_centers_once(self) -> None:
        """Start every rank from rank 0's centers, even when their seeds differ. Outside
        torch.distributed the flag is never read, so torch.compile does not guard on it (a flag
        that flips after the first call would cost a recompilation)."""
        if not (dist.is_available() and dist.is_initialized()) or self._centers_synced:
            return
        if dist.get_world_size(self.process_group) > 1:
            src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
            with torch.no_grad():
                dist.broadcast(self.centers.data, src=src, group=self.process_group)
        self._centers_synced = True

    def validation(self, device: torch.device) -> str:
        """The mode a call on `device` uses: "auto" is "eager" on the CPU and "reported" elsewhere; a
        {device type: mode} mapping its entry, else its "*" entry (default "reported")."""
        modes = {"cpu": "eager"} if self.validate == "auto" else self.validate
        if isinstance(modes, dict):
            return modes.get(device.type, modes.get("*", "reported"))
        return modes

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._broadcast_centers_once()
        wen_alpha = self.alpha if (self.update == "wen" and self.training and torch.is_grad_enabled()) else None
        mode = self.validation(features.device)
        reported = mode == "reported" and not torch.compiler.is_compiling()
        new = self._reports.arrived() if reported else 0
        if new:
            raise ValueError(self._bad_batch_message(new))
        loss = center_loss(
            features,
            labels,
            self.centers,
            reduction=self.reduction,
            wen_alpha=wen_alpha,
            backend=self.backend,
            deterministic=self.deterministic,
            process_group=self.process_group,
            validate="deferred" if mode == "reported" else mode,
            bad_batches=self.bad_batches,
        )
        if reported:
            self._reports.send(self.bad_batches)
        return loss

    def raise_on_bad_batches(self) -> None:
        """Deferred validation's report (one host read): a ValueError if any batch since the last
        call had non-finite features or an out-of-range label. Those batches moved no center."""
        total = int(self.bad_batches)
        n = total - self._reports.raised
        self._reports = BadBatchReports()
        if total:
            self.bad_batches.zero_()
        if n:
            raise ValueError(self._bad_batch_message(n))

    def _bad_batch_message(self, n: int) -> str:
        return (
            f"CenterLoss: {n} batch{'es' if n > 1 else ''} had non-finite features or labels "
            f"outside [0, {self.num_classes}); their center updates were skipped "
            f"(the centers are unchanged by them)"
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, update={self.update!r}, "
            f"alpha={self.alpha}, reduction={self.reduction!r}, backend={self.backend!r}"
        )
