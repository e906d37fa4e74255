"""Where the time of one call goes: `python -m benchmarks.profile [--out DIR] [CASE ...]`.

For each case (the same callables the benchmarks time) a torch.profiler trace of a few calls after
a warm-up, summarised per call: device kernels launched and their total time, host synchronisations
(stream/device syncs and device-to-host copies), allocator calls, wall time, and the ten operators
with the most device time (CPU time on a CPU-only machine). Written to DIR/profile.json and
DIR/profile.txt; DIR/<case>.json is the Chrome trace. The GPU issues ask for exactly this breakdown
before and after a change; the numbers mean something on a GPU only (here they test the script).

Cases: features-logmel, features-mfcc, torchaudio-logmel, torchaudio-mfcc (256 clips), center-loss-fused and
center-loss-usual (B, C, D = 256, 4, 256), train-step (batch 64, fp32; train-step-graph: with the step
replayed from a CUDA graph, GPU only). On a GPU each case also reports the GPU's busy fraction.
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


def _cases(device: torch.device) -> dict:
    """name -> a zero-argument callable, built lazily (each imports what it needs)."""
    def features(impl, kind):
        def build():
            from benchmarks import test_features as tf
            clips, _ = tf.make_clips(tf.N_CLIPS)
            return tf._impl_fn(impl, kind, clips, None, device)
        return build

    def center_loss(impl):
        def build():
            from benchmarks.test_center_loss import impls, make_step
            name = next(b for b in impls(device) if b not in ("reference", "torch-gather")) if impl == "fused" \
                else "reference"
            return make_step(name, 256, 4, 256, device)
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

    cases = {"features-logmel": features("fastser", "logmel"), "features-mfcc": features("fastser", "mfcc"),
             "center-loss-fused": center_loss("fused"), "center-loss-usual": center_loss("usual"),
             "train-step": train_step()}
    if device.type == "cuda":
        cases.update({"train-step-graph": train_step(graph=True), "torchaudio-logmel": features("torchaudio", "logmel"),
                      "torchaudio-mfcc": features("torchaudio", "mfcc")})
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
        "gpu_busy_fraction": (sum(e.self_device_time_total for e in kernels) / 1e3 / (1e3 * wall_s)) if on_gpu else None,
        "syncs_per_call": sum(runtime.get(name, 0) for name in SYNC_EVENTS) / calls,
        # a value read back to the host: .item()/bool()/int() (_local_scalar_dense) or a device-to-host copy
        "device_to_host_reads_per_call": sum(e.count for e in events
                                             if "DtoH" in e.key or e.key == "aten::_local_scalar_dense") / calls,
        "allocator_calls_per_call": sum(e.count for e in events if e.key in ("cudaMalloc", "cudaFree")) / calls,
        "top_ops": [{"op": e.key, "count_per_call": e.count / calls,
                     "ms_per_call": getattr(e, time_attr) / 1e3 / calls} for e in top],
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
        report["cases"][name] = summary
        lines.append(f"{name}: {summary['wall_ms_per_call']:.3f} ms wall, {summary['kernels_per_call']:.0f} kernels "
                     f"({summary['kernel_ms_per_call']:.3f} ms), {summary['syncs_per_call']:.0f} syncs, "
                     f"{summary['device_to_host_reads_per_call']:.0f} device-to-host reads per call"
                     + (f", GPU busy {summary['gpu_busy_fraction']:.0%}" if summary["gpu_busy_fraction"] is not None else ""))
        lines += [f"    {t['ms_per_call']:8.3f} ms  x{t['count_per_call']:g}  {t['op']}" for t in summary["top_ops"]]
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
