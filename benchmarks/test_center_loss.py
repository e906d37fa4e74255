"""One center-loss training step (forward + backward + center update): fastser vs the usual module.

The reference is fastser.reference.ReferenceCenterLoss (B x C distance matrix) with its separate
SGD optimizer for the centers; "torch-gather" is the plain gather/index_put form (our "torch"
backend). Targets from the issue: CPU cpp >= 2x the reference at (256, 4, 256) and >= 50x at
(4096, 10000, 512); GPU triton/cuda >= 5x and >= 50x (fp32, eager), and >= 70% of the HBM
roofline (the minimum bytes of a step over the time) at (65536, 10000, 512).

On a GPU the same steps are also timed with bf16 features (fp32 centers and accumulation) and
captured in a CUDA graph (each call one replay), each compared with the reference run the same
way; the fused modules validate their inputs on the device ("deferred"), as fastser's training
does there. `test_launch_floor` records what one launch and a synchronisation cost on the
machine, beside which the small shapes are read.
"""

import pytest
import torch

from benchmarks import _harness
from fastser.nn import CenterLoss
from fastser.ops import available_backends
from fastser.reference.center_loss import ReferenceCenterLoss

SHAPES = [(256, 4, 256), (256, 7, 1024), (1024, 1000, 512), (4096, 10000, 512), (65536, 10000, 512)]
GPU_ONLY_SHAPES = {(65536, 10000, 512)}  # the reference's 65536 x 10000 distance matrix alone is 2.6 GB
CPU_TARGETS = {(256, 4, 256): 2.0, (4096, 10000, 512): 50.0}
GPU_TARGETS = {(256, 4, 256): 5.0, (4096, 10000, 512): 50.0}
ROOFLINE_TARGETS = {(65536, 10000, 512): 70.0}  # % of the HBM peak, GPU
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def impls(device):
    fused = [b for b in available_backends(device) if b != "torch" and not (b == "triton" and device.type == "cpu")]
    return ["reference", "torch-gather"] + fused


def make_step(impl, B, C, D, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    if impl == "reference":
        crit = ReferenceCenterLoss(C, D, use_gpu=False).to(device)
        opt = torch.optim.SGD(crit.parameters(), lr=0.5)

        def step():
            opt.zero_grad(set_to_none=True)
            x.grad = None
            crit(x.float(), labels).backward()  # its centers are fp32: bf16 features are cast first
            opt.step()

        return step
    backend = "torch" if impl == "torch-gather" else impl
    crit = CenterLoss(C, D, backend=backend, validate="deferred" if device.type == "cuda" else False).to(device)

    def step():
        x.grad = None
        crit(x, labels).backward()  # the Wen update of the centers is fused into this backward

    return step


def captured(step):
    """The same step captured once in a CUDA graph (after warm-up on a side stream); each call replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def min_bytes(B, C, D, dtype_bytes=4):
    """Least traffic for one fused step: read x and the centers it needs, write grad_x, write those centers."""
    touched = min(B, C) * D * 4
    return B * D * dtype_bytes * 2 + 2 * touched + B * 8


def hbm_peak_bytes_per_s(device):
    """The GPU's memory bandwidth from its properties (DDR: two transfers a clock), or None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B,C,D", SHAPES, ids=[f"B{b}_C{c}_D{d}" for b, c, d in SHAPES])
@pytest.mark.parametrize("impl", ["reference", "torch-gather", "cpp", "triton", "cuda"])
def test_center_loss_step(benchmark, device, impl, B, C, D, dtype, mode):
    if impl not in impls(device):
        pytest.skip(f"{impl} does not run on {device} here")
    if device.type != "cuda" and ((B, C, D) in GPU_ONLY_SHAPES or dtype != "fp32" or mode != "eager"):
        pytest.skip("GPU-only case (bf16 features, CUDA graphs, 65536 rows)")
    if dtype == "bf16" and B < 4096:
        pytest.skip("bf16 features are timed where bytes matter (B >= 4096); small steps are launch-bound")
    fused = impl not in ("reference", "torch-gather")
    plain = (dtype, mode) == ("fp32", "eager")  # the targets apply to the step as users run it
    targets = GPU_TARGETS if device.type == "cuda" else CPU_TARGETS
    target = targets.get((B, C, D)) if fused and plain else None
    step = make_step(impl, B, C, D, device, DTYPES[dtype])
    if mode == "graph":
        step = captured(step)
    extra = {
        "min_bytes": min_bytes(B, C, D, DTYPES[dtype].itemsize),
        "dtype": dtype,
        "mode": mode,
        "peak_bytes_per_s": hbm_peak_bytes_per_s(device),
    }
    if fused and device.type == "cuda" and (B, C, D) in ROOFLINE_TARGETS:
        extra["roofline_target_pct"] = ROOFLINE_TARGETS[(B, C, D)]
    group = f"B{B}_C{C}_D{D}" + ("" if plain else f"_{dtype}_{mode}")
    _harness.run(
        benchmark,
        step,
        device,
        suite="center_loss",
        group=group,
        impl=impl,
        baseline="reference",
        target=target,
        extra=extra,
        budget_s=2.0 if impl == "reference" and B >= 4096 else 1.0,
    )


@pytest.mark.parametrize("kind", ["torch-add-1-element", "empty-cuda-kernel"])
def test_launch_floor(benchmark, device, kind):
    """One launch and the synchronisation every timed call ends with: the floor under any step here."""
    if kind == "empty-cuda-kernel" and device.type != "cuda":
        pytest.skip("needs a GPU")
    x = torch.zeros(1, device=device)

    def launch():
        if kind == "empty-cuda-kernel":
            torch.cuda._sleep(0)  # a kernel that spins for 0 cycles: a launch and nothing else
        else:
            torch.add(x, 1.0, out=x)

    _harness.run(benchmark, launch, device, suite="center_loss", group="launch_floor", impl=kind, baseline=kind)


B_HOST, C_HOST, D_HOST = 256, 4, 256


class _EmptyFunction(torch.autograd.Function):
    """An autograd Function that computes nothing: what any custom loss's step costs the host at least."""

    @staticmethod
    def forward(ctx, x):
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return torch.empty((B_HOST, D_HOST))


@pytest.mark.parametrize("impl", ["fastser-triton", "empty-autograd-function", "reference"])
def test_center_loss_host_side(benchmark, monkeypatch, impl):
    """The host's share of one step at an SER size, where a GPU waits for the host: fastser's Python
    and dispatch for the Triton path (deferred validation, Wen update) with the kernel launches
    stubbed out, beside an autograd Function that computes nothing (the floor for any custom loss)
    and the usual module + SGD (CPU tensors: at this size its time is almost all dispatch)."""
    x = torch.randn(B_HOST, D_HOST, requires_grad=True)
    labels = torch.randint(0, C_HOST, (B_HOST,))
    if impl == "fastser-triton":
        pytest.importorskip("triton")
        from fastser.ops._triton_launch import TritonLaunch

        monkeypatch.setattr(TritonLaunch, "launch", lambda self: None)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the registry pick Triton for CPU tensors
        crit = CenterLoss(C_HOST, D_HOST, backend="triton", validate="deferred")

        def step():
            x.grad = None
            crit(x, labels).backward()

    elif impl == "empty-autograd-function":

        def step():
            x.grad = None
            _EmptyFunction.apply(x).backward()

    else:
        step = make_step("reference", B_HOST, C_HOST, D_HOST, torch.device("cpu"))
    _harness.run(
        benchmark,
        step,
        torch.device("cpu"),
        suite="center_loss",
        group=f"host_B{B_HOST}_C{C_HOST}_D{D_HOST}",
        impl=impl,
        baseline="reference",
        extra={"kernels": "stubbed" if impl == "fastser-triton" else "run"},
    )
