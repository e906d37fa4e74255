"""Shared benchmark plumbing: device choice, timing rounds, peak extra memory, results JSON.

Every benchmark records (suite, group, implementation) -> seconds per call and peak extra
memory; at the end of the session the figures and the ratios against each group's baseline
are printed and written to runs/benchmarks/<date>_<device>_<suites>.json (outside the committed
tree); FASTSER_BENCH_RESULTS_DIR=benchmarks/results keeps a run for the README's tables, which
python -m lab.report generates from that folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

# FASTSER_BENCH_RESULTS_DIR: write this session's results file elsewhere (benchmarks/results to keep
# it for the README's tables, the GPU run's archive); by default runs/, which git ignores
RESULTS_DIR = Path(
    os.environ.get("FASTSER_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent.parent / "runs" / "benchmarks"
)
RECORDS: list[dict] = []
_SESSION_STAMP = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def bench_device() -> torch.device:
    name = os.environ.get("FASTSER_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounds_for(fn, device, budget_s: float = 1.0, lo: int = 3, hi: int = 200) -> int:
    """How many rounds fit in about `budget_s`, from one timed call after a warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t, 1e-6)
    return int(max(lo, min(hi, budget_s / one)))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_rss_extra_bytes(fn) -> int:
    """Peak resident memory of the process during one call of fn above its resident memory before it
    (Linux: writing 5 to clear_refs resets the peak): for libraries with their own allocator, which
    neither torch's profiler nor tracemalloc sees (onnxruntime)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so reusing it counts again
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def peak_extra_bytes(fn, device: torch.device, rss: bool = False) -> int:
    """Peak memory allocated by one call of fn above what was allocated before it."""
    if rss:
        return peak_rss_extra_bytes(fn)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile

    # torch's CPU allocations come from the profiler's memory events, NumPy's (librosa) from
    # tracemalloc, which NumPy reports its buffers to; the sum bounds the true peak from above.
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak + numpy_peak


def run(
    benchmark,
    fn,
    device,
    *,
    suite,
    group,
    impl,
    baseline,
    target=None,
    extra=None,
    budget_s=1.0,
    also_vs=(),
    rss_memory=False,
    memory_fn=None,
):
    """Time fn with pytest-benchmark and record the figures for the results file. rss_memory: the
    peak is the process's resident memory (peak_rss_extra_bytes), for every implementation of a
    group alike when one of them allocates outside torch and NumPy. memory_fn: what the peak is
    measured on instead of fn (the same work, without a cache that would hide it)."""

    def call():
        fn()
        sync(device)

    rounds = rounds_for(call, device, budget_s)
    benchmark.group = f"{suite}:{group}"
    benchmark.extra_info.update({"impl": impl, **(extra or {})})
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    peak = peak_extra_bytes(memory_fn or fn, device, rss=rss_memory)
    stats = benchmark.stats.stats
    RECORDS.append(
        {
            "suite": suite,
            "group": group,
            "impl": impl,
            "baseline": baseline,
            "target": target,
            "median_s": stats.median,
            "mean_s": stats.mean,
            "stddev_s": stats.stddev,
            "rounds": rounds,
            "peak_extra_bytes": peak,
            "memory": "resident" if rss_memory else "allocated",
            "also_vs": list(also_vs),
            **(extra or {}),
        }
    )
    write_results(device)  # after every case: a session stopped by a time limit keeps what it measured


def _cpu_model() -> dict:
    """The CPU's name and the vector extensions that decide CPU figures (AVX-512, bf16 for --amp)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"cpu_model": name, "cpu_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def environment(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["device_name"] = f"CPU ({os.cpu_count()} cores)"
        info.update(_cpu_model())
    for mod in ("triton", "librosa", "cupy", "torchaudio", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return info


def with_ratios(records: list[dict]) -> list[dict]:
    """Adds speedup = baseline time / this time, per (suite, group), from this one run."""
    by_key = {(r["suite"], r["group"], r["impl"]): r for r in records}
    out = []
    for r in records:
        base = by_key.get((r["suite"], r["group"], r["baseline"]))
        r = dict(r)
        r["speedup_vs_baseline"] = base["median_s"] / r["median_s"] if base else None
        for other in r.get("also_vs", []):  # secondary comparisons, e.g. librosa given the whole batch
            o = by_key.get((r["suite"], r["group"], other))
            r[f"speedup_vs_{other}"] = o["median_s"] / r["median_s"] if o else None
        if r["target"] is not None and r["speedup_vs_baseline"] is not None:
            r["target_met"] = r["speedup_vs_baseline"] >= r["target"]
        if r.get("min_bytes") and r.get("peak_bytes_per_s"):  # memory-bound kernels: % of the HBM roofline
            r["achieved_bytes_per_s"] = r["min_bytes"] / r["median_s"]
            r["roofline_pct"] = 100.0 * r["achieved_bytes_per_s"] / r["peak_bytes_per_s"]
            if r.get("roofline_target_pct") is not None:
                r["roofline_target_met"] = r["roofline_pct"] >= r["roofline_target_pct"]
        out.append(r)
    return out


_WRITTEN: list = []  # the file this session last wrote (renamed as suites are added)


def write_results(device: torch.device) -> Path | None:
    """Writes every record so far to one results file per session (atomically: a reader, or a run
    killed mid-write, never sees half a file), named by the session's start, device and suites."""
    if not RECORDS:
        return None
    records = with_ratios(RECORDS)
    env = environment(device)
    suites = "-".join(sorted({r["suite"] for r in records}))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = env["device_name"].replace(" ", "_").replace("(", "").replace(")", "")
    path = RESULTS_DIR / f"{_SESSION_STAMP}_{tag}_{suites}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "results": records}, indent=2) + "\n")
    os.replace(tmp, path)
    if _WRITTEN and _WRITTEN[-1] != path:
        _WRITTEN[-1].unlink(missing_ok=True)  # the same session's file under its earlier suite list
    _WRITTEN[:] = [path]
    return path


def summary_lines(records: list[dict]) -> list[str]:
    lines = [f"{'suite:group':42s} {'impl':22s} {'median':>11s} {'peak extra':>11s} {'speedup':>8s} target"]
    for r in with_ratios(records):
        sp = r["speedup_vs_baseline"]
        tgt = "" if r["target"] is None else f">={r['target']}x {'met' if r.get('target_met') else 'MISSED'}"
        tgt += "".join(
            f"; {r[f'speedup_vs_{o}']:.2f}x vs {o}"
            for o in r.get("also_vs", [])
            if r.get(f"speedup_vs_{o}") is not None
        )
        lines.append(
            f"{r['suite'] + ':' + r['group']:42s} {r['impl']:22s} {r['median_s'] * 1e3:9.3f}ms "
            f"{r['peak_extra_bytes'] / 2**20:9.2f}MB {'' if sp is None else f'{sp:7.2f}x'} {tgt}"
        )
    return lines
