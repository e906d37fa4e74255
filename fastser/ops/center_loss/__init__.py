"""The fused center loss, one op in one package.

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

Files: op.py, the functional, the autograd Function, the torch.library ops and the input checks;
backend.py, the contract every backend keeps (`Backend`, a typing.Protocol), the structures it
takes and the helpers backends share; one module per backend — backend_triton.py and
backend_cuda.py (CUDA tensors), backend_cpp.py (CPU, OpenMP), backend_torch.py (gather/index_put,
any device: the fallback and the test oracle); distributed.py, the Wen update across ranks.
ops/registry.py's table says which backends exist, where each runs and which module computes it.
One forward and backward on one backend reads op.py, backend.py and that backend's file.

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

from fastser.ops.center_loss.backend import STATS_SLAB, Backend, StatsSlab, class_counts, new_stats
from fastser.ops.center_loss.op import (
    BACKENDS,
    REDUCTIONS,
    VALIDATE,
    CenterLossFunction,
    available_backends,
    backend_module,
    center_loss,
    check_inputs,
    validate_mode,
)

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "STATS_SLAB",
    "VALIDATE",
    "Backend",
    "CenterLossFunction",
    "StatsSlab",
    "available_backends",
    "backend_module",
    "center_loss",
    "check_inputs",
    "class_counts",
    "new_stats",
    "validate_mode",
]
