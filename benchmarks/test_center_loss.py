"""One center-loss training step (forward + backward + center update): fastser vs the usual module.

The reference is fastser.reference.ReferenceCenterLoss (B x C distance matrix) with its separate
SGD optimizer for the centers; "torch-gather" is the plain gather/index_put form (our "torch"
backend). Targets from the issue: CPU cpp >= 2x the reference at (256, 4, 256) and >= 50x at
(4096, 10000, 512); GPU triton/cuda >= 5x and >= 50x.
"""
import pytest
import torch

from benchmarks import _harness
from fastser.nn import CenterLoss
from fastser.ops import available_backends
from fastser.reference.center_loss import ReferenceCenterLoss

SHAPES = [(256, 4, 256), (256, 7, 1024), (1024, 1000, 512), (4096, 10000, 512)]
CPU_TARGETS = {(256, 4, 256): 2.0, (4096, 10000, 512): 50.0}
GPU_TARGETS = {(256, 4, 256): 5.0, (4096, 10000, 512): 50.0}


def impls(device):
    fused = [b for b in available_backends(device) if b != "torch" and not (b == "triton" and device.type == "cpu")]
    return ["reference", "torch-gather"] + fused


def make_step(impl, B, C, D, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    if impl == "reference":
        crit = ReferenceCenterLoss(C, D, use_gpu=False).to(device)
        opt = torch.optim.SGD(crit.parameters(), lr=0.5)

        def step():
            opt.zero_grad(set_to_none=True)
            x.grad = None
            crit(x, labels).backward()
            opt.step()
        return step
    backend = "torch" if impl == "torch-gather" else impl
    crit = CenterLoss(C, D, backend=backend, validate=False).to(device)

    def step():
        x.grad = None
        crit(x, labels).backward()  # the Wen update of the centers is fused into this backward
    return step


def min_bytes(B, C, D, dtype_bytes=4):
    """Least traffic for one fused step: read x and the centers it needs, write grad_x, write those centers."""
    touched = min(B, C) * D * 4
    return B * D * dtype_bytes * 2 + 2 * touched + B * 8


@pytest.mark.parametrize("B,C,D", SHAPES, ids=[f"{b}x{c}x{d}" for b, c, d in SHAPES])
@pytest.mark.parametrize("impl", ["reference", "torch-gather", "cpp", "triton", "cuda"])
def test_center_loss_step(benchmark, device, impl, B, C, D):
    if impl not in impls(device):
        pytest.skip(f"{impl} does not run on {device} here")
    targets = GPU_TARGETS if device.type == "cuda" else CPU_TARGETS
    target = targets.get((B, C, D)) if impl not in ("reference", "torch-gather") else None
    step = make_step(impl, B, C, D, device)
    _harness.run(benchmark, step, device, suite="center_loss", group=f"B{B}_C{C}_D{D}", impl=impl,
                 baseline="reference", target=target, extra={"min_bytes": min_bytes(B, C, D)},
                 budget_s=2.0 if impl == "reference" and B >= 4096 else 1.0)
