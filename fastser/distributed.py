"""torch.distributed plumbing for `torchrun ... -m fastser.train` (and a no-op in one process).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we use NCCL on CUDA and gloo on CPU, one device
per local rank. Under torchrun the run is distributed even with one process (a process group, DDP,
the center sync), so `--nproc_per_node=1` runs the code of N ranks on one device: the way to test
it, and to measure what DDP costs against a plain run. Every collective has a timeout, so one rank's
error cannot hang the others forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from fastser.errors import UserError

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("FASTSER_DIST_TIMEOUT", "300")))


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun (one process included)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def parse_device(device_arg: Optional[str] = None) -> torch.device:
    """cpu, cuda or cuda:N (default: cuda if available). A UserError names what is wrong (the
    commands' --device and the library's `device` argument alike)."""
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(want)
    except RuntimeError:
        raise UserError(f"device {want!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {want!r}: fastser runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {want!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {want!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup(device_arg: Optional[str] = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, with one process too
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device_arg)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if (world > 1 or launched) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local, device, launched)


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group. `finished` (the run ended without an error on this rank): first
    wait for every rank, so that none shuts its connections down while another is still busy
    (rank 0 writes the reports after the last collective; a gloo rank that left meanwhile could
    abort in its shutdown). After an error no rank waits: the others may never arrive."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def shard(indices: torch.Tensor, info: DistInfo, *, pad: bool) -> torch.Tensor:
    """This rank's share of `indices`. pad=True repeats the first items so every rank gets the same
    count (training: same number of steps everywhere); pad=False gives disjoint, possibly unequal
    shares that together hold every index exactly once (evaluation)."""
    if not info.enabled:
        return indices
    n = len(indices)
    if pad and n % info.world_size:
        extra = info.world_size - n % info.world_size
        indices = torch.cat([indices, indices[:extra]])
    return indices[info.rank :: info.world_size]


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's rows (unequal row counts allowed), in rank order."""
    if not info.enabled:
        return tensor
    objs = [None] * info.world_size
    dist.all_gather_object(objs, tensor.cpu())
    return torch.cat(objs)
