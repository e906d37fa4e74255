"""Where the time of one call goes: `python -m benchmarks.profile [--out DIR] [CASE ...]`.

For each case (the same callables the benchmarks time) a torch.profiler trace of a few calls after
a warm-up, summarised per call: device kernels launched and their total time, host synchronisations
(stream/device syncs and device-to-host copies), allocator calls, wall time, and the ten operators
with the most device time (CPU time on a CPU-only machine). Written to DIR/profile.json and
DIR/profile.txt; DIR/<case>.json is the Chrome trace. The GPU issues ask for exactly this breakdown
before and after a change; the numbers mean something on a GPU only (here they test the script).

Cases: center-loss-fused and center-loss-usual (B, C, D = 256, 4, 256; on a GPU also -4096x10000x512 and
-65536x10000x512), features-logmel and features-mfcc (256 clips; on a GPU also -2048 and torchaudio-logmel /
torchaudio-mfcc beside each), train-step (batch 64, fp32; train-step-graph: the step replayed from a CUDA
graph, GPU only). On a GPU each case also reports the GPU's busy fraction.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import _harness

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CALLS = 5


CENTER_LOSS_SHAPES = ((256, 4, 256), (4096, 10000, 512), (65536, 10000, 512))  # the targets' (B, C, D)
FEATURE_CLIPS = (256, 2048)


def _cases(device: torch.device) -> dict:
    """name -> a zero-argument callable, built lazily (each imports what it needs). The unsuffixed
    names are the smallest target sizes; on a GPU every target size is a case of its own."""

    def features(impl, kind, n_clips):
        def build():
            from benchmarks import test_features as tf

            clips, _ = tf.make_clips(n_clips)
            return tf._impl_fn(impl, kind, clips, None, device)

        return build

    def center_loss(impl, shape):
        def build():
            from benchmarks.test_center_loss import impls, make_step

            name = (
                next(b for b in impls(device) if b not in ("reference", "torch-gather"))
                if impl == "fused"
                else "reference"
            )
            return make_step(name, *shape, device)

        return build

    def train_step(graph=False):
        def build():
            from benchmarks import test_train_step as ts
            import numpy as np

            rng = np.random.default_rng(0)
            batch = ts.BATCHES[0]
            audio = (0.1 * rng.standard_normal((batch, int(ts.SR * ts.SECONDS)))).astype(np.float32)
            return ts.fastser_step(audio, rng.integers(0, ts.CLASSES, batch), device, graph=graph)

        return build

    on_gpu = device.type == "cuda"
    cases = {}
    for shape in CENTER_LOSS_SHAPES[: None if on_gpu else 1]:
        tag = "" if shape == CENTER_LOSS_SHAPES[0] else "-" + "x".join(map(str, shape))
        cases[f"center-loss-fused{tag}"] = center_loss("fused", shape)
        cases[f"center-loss-usual{tag}"] = center_loss("usual", shape)
    for n_clips in FEATURE_CLIPS[: None if on_gpu else 1]:
        tag = "" if n_clips == FEATURE_CLIPS[0] else f"-{n_clips}"
        for kind in ("logmel", "mfcc"):
            cases[f"features-{kind}{tag}"] = features("fastser", kind, n_clips)
            if on_gpu:
                cases[f"torchaudio-{kind}{tag}"] = features("torchaudio", kind, n_clips)
    cases["train-step"] = train_step()
    if on_gpu:
        cases["train-step-graph"] = train_step(graph=True)
    return cases


def summarise(prof, calls: int, wall_s: float, on_gpu: bool) -> dict:
    events = prof.key_averages()
    kernels = [e for e in events if on_gpu and e.device_type == torch.autograd.DeviceType.CUDA]
    runtime = {e.key: e.count for e in events}
    time_attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    top = sorted((e for e in events if getattr(e, time_attr, 0) > 0), key=lambda e: -getattr(e, time_attr))[:10]
    return {
        "calls": calls,
        "wall_ms_per_call": 1e3 * wall_s / calls,
        "kernels_per_call": sum(e.count for e in kernels) / calls,
        "kernel_ms_per_call": sum(e.self_device_time_total for e in kernels) / 1e3 / calls,
        # the share of the wall time the GPU spends in kernels (overlapping kernels counted twice)
        "gpu_busy_fraction": (sum(e.self_device_time_total for e in kernels) / 1e3 / (1e3 * wall_s))
        if on_gpu
        else None,
        "syncs_per_call": sum(runtime.get(name, 0) for name in SYNC_EVENTS) / calls,
        # a value read back to the host: .item()/bool()/int() (_local_scalar_dense) or a device-to-host copy
        "device_to_host_reads_per_call": sum(
            e.count for e in events if "DtoH" in e.key or e.key == "aten::_local_scalar_dense"
        )
        / calls,
        "allocator_calls_per_call": sum(e.count for e in events if e.key in ("cudaMalloc", "cudaFree")) / calls,
        "top_ops": [
            {"op": e.key, "count_per_call": e.count / calls, "ms_per_call": getattr(e, time_attr) / 1e3 / calls}
            for e in top
        ],
    }


def profile_case(fn, device: torch.device, trace: Path) -> dict:
    on_gpu = device.type == "cuda"
    fn()
    fn()  # warm-up: compilation, caches, cuDNN plans
    _harness.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, profile_memory=False) as prof:
        t = time.perf_counter()
        for _ in range(CALLS):
            fn()
        _harness.sync(device)
        wall = time.perf_counter() - t
    prof.export_chrome_trace(str(trace))
    return summarise(prof, CALLS, wall, on_gpu)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help="cases to profile (default: all that run here)")
    p.add_argument("--out", default="profile", help="output folder")
    args = p.parse_args(argv)
    device = _harness.bench_device()
    cases = _cases(device)
    unknown = set(args.cases) - set(cases)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)} on {device}; choose from {sorted(cases)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": _harness.environment(device), "cases": {}}
    lines = []
    for name in args.cases or list(cases):
        summary = profile_case(cases[name](), device, out / f"{name}.json")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the large center-loss cases hold gigabytes
        report["cases"][name] = summary
        lines.append(
            f"{name}: {summary['wall_ms_per_call']:.3f} ms wall, {summary['kernels_per_call']:.0f} kernels "
            f"({summary['kernel_ms_per_call']:.3f} ms), {summary['syncs_per_call']:.0f} syncs, "
            f"{summary['device_to_host_reads_per_call']:.0f} device-to-host reads per call"
            + (f", GPU busy {summary['gpu_busy_fraction']:.0%}" if summary["gpu_busy_fraction"] is not None else "")
        )
        lines += [f"    {t['ms_per_call']:8.3f} ms  x{t['count_per_call']:g}  {t['op']}" for t in summary["top_ops"]]
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
