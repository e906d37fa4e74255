"""How many CPU threads a run uses when `--threads` is not given: the cores that are free for it.

torch's own default is one thread per core of the machine. Its OpenMP team spin-waits at every
parallel region's barrier, so when another process holds one of the cores, the thread that waits
burns its time slice while its peer is descheduled: measured on a 2-core AMD EPYC (synthetic
default run, 2026-12-06), an epoch took 3.0 s alone with 2 threads and 10.6-13.6 s beside one busy
process, against 5.4 s with 1 thread (4.9 s alone). Passive waiting (OMP_WAIT_POLICY=PASSIVE)
helps the loaded case (6.8 s) but costs 1.6x alone, so the team is sized instead: the cores this
process may run on (its affinity mask and any cgroup CPU quota, as a container sets), less those
other processes kept busy, from /proc/stat when the run starts. The count decides the result, so
it is chosen once; one look of 0.25 s suffices when the machine is idle, and while it sees other
work the look goes on, up to LOOK_SECONDS, the least busy moment counting: a brief blip (a
predict beside the start) no longer halves a long run's speed, a process busy throughout still
leaves its core to it.

A run's result depends on its thread count, so the count chosen is logged and recorded in the
run's metrics; `--threads N` fixes it for a run that must repeat bit for bit on a busy machine.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def _cgroup_quota() -> Optional[float]:
    """cpu.max of this process's cgroup (v2) as a number of cores; None when unlimited or unknown."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        limit = Path("/sys/fs/cgroup") / line.split(":", 2)[2].lstrip("/") / "cpu.max"
        quota, period = limit.read_text().split()[:2]
    except (OSError, IndexError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def busy_cores(seconds: float = 0.25) -> float:
    """Cores kept busy by other processes over `seconds` (this one sleeps meanwhile), from the
    kernel's counters in /proc/stat; 0.0 where they cannot be read."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / elapsed)


LOOK_SECONDS = 3.0  # the longest look at the other processes' load, while it keeps a core busy
SAMPLE_SECONDS = 0.25  # one look


def free_threads(look_seconds: float = LOOK_SECONDS) -> tuple:
    """(threads, why): the usable cores less those other processes keep busy, at least 1, and a
    line saying so. Busy is the least of repeated looks of SAMPLE_SECONDS, taken while some core
    looks busy, for up to `look_seconds` in all (one look when the machine is idle)."""
    cores = usable_cores()
    deadline = time.monotonic() + look_seconds
    busy = busy_cores(SAMPLE_SECONDS)
    while round(cores - busy) < cores and time.monotonic() + SAMPLE_SECONDS <= deadline:
        busy = min(busy, busy_cores(SAMPLE_SECONDS))
    threads = max(1, min(cores, round(cores - busy)))
    why = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    if threads < cores:
        why += (
            f" ({cores} cores, {busy:.1f} busy with other work throughout a {look_seconds:g} s look); "
            f"--threads {cores} uses every core, --threads N sets the count"
        )
    return threads, why
