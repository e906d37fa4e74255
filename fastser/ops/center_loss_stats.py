"""The scratch a counting backend's forward (Triton's) fills: each class's row count, the bad
rows, the reduced loss; zeroed ahead in slabs, so a step spends no launch on zeroing it."""

from __future__ import annotations

import torch

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
