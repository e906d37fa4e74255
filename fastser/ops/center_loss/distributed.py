"""The Wen update across ranks: every rank moves its centers by the sums and counts of all ranks'
rows, all-reduced in one buffer that overlaps the rest of the backward, so the centers stay
bit-identical across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastser.ops.center_loss.backend import in_range


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


def wen_update_global(diff, labels, centers, alpha, process_group, bad=None):
    """All-reduce the per-class sums and counts (one fp32 buffer of C*D + C), then update every
    rank alike, so the centers stay bit-identical across ranks.

    The all-reduce is issued asynchronously and waited for in a callback that autograd runs at
    the end of this backward pass, so it overlaps with the rest of the model's backward.
    """
    C, D = centers.shape
    buffer = _sync_buffer(centers)
    sums = buffer[: C * D].view(C, D)
    keep = in_range(labels, C)  # a bad label's row, or (bad batch) every row, adds nothing
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
