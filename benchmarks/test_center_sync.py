"""Cost of keeping the centers identical across ranks (gloo, 2 processes on this machine).

Per step the Wen update all-reduces one fp32 buffer of (C*D + C) * 4 bytes. For C in {4, 1000,
10000}, D = 512 we time: the all-reduce alone; a whole fused center-loss step (B = 256 per rank)
on 2 ranks; and the same step in one process without communication (baseline). A helper process
(rank 1) makes the same collective calls in lockstep, case by case in the order of CASES (run the
file whole: a deselected case would leave the helper waiting until its timeout).
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import _harness
from fastser.nn import CenterLoss

D, B_PER_RANK, ROUNDS, WARMUP = 512, 256, 30, 2
CASES = [(C, impl) for C in (4, 1000, 10000) for impl in ("step-1process", "allreduce-2ranks", "step-2ranks")]


def _step_fn(C, rank, group=None):
    torch.manual_seed(rank)
    crit = CenterLoss(C, D, backend="cpp", validate=False, process_group=group)
    x = torch.randn(B_PER_RANK, D, requires_grad=True)
    y = torch.randint(0, C, (B_PER_RANK,))

    def step():
        x.grad = None
        crit(x, y).backward()

    return step


def _case_fn(C, impl, rank, solo_group):
    if impl == "allreduce-2ranks":
        buf = torch.ones(C * D + C)
        return lambda: dist.all_reduce(buf)
    return _step_fn(C, rank, solo_group if impl == "step-1process" else None)


def _helper(store):
    torch.set_num_threads(1)  # two processes share this machine's cores: no oversubscription
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=1, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    dist.new_group([0])  # collective: every rank takes part in creating every group
    solo = dist.new_group([1])
    for C, impl in CASES:
        if impl == "step-1process":
            continue
        fn = _case_fn(C, impl, 1, solo)
        for _ in range(ROUNDS + WARMUP):
            fn()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def solo_group(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("sync") / "store")
    helper = mp.get_context("spawn").Process(target=_helper, args=(store,))
    helper.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    solo = dist.new_group([0])
    dist.new_group([1])
    yield solo
    dist.barrier()
    dist.destroy_process_group()
    helper.join(timeout=60)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("C, impl", CASES, ids=[f"C{c}-{i}" for c, i in CASES])
def test_center_sync(benchmark, solo_group, C, impl):
    fn = _case_fn(C, impl, 0, solo_group)
    group = f"C{C}_D{D}"
    benchmark.group = f"center_sync:{group}"
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    s = benchmark.stats.stats
    _harness.RECORDS.append(
        {
            "suite": "center_sync",
            "group": group,
            "impl": impl,
            "baseline": "step-1process",
            "target": None,
            "median_s": s.median,
            "mean_s": s.mean,
            "stddev_s": s.stddev,
            "rounds": ROUNDS,
            "peak_extra_bytes": (C * D + C) * 4 if impl != "step-1process" else 0,
            "also_vs": [],
            "sync_bytes_per_step": (C * D + C) * 4,
            "world_size": 2,
            "dist_backend": "gloo",
            "batch_per_rank": B_PER_RANK,
        }
    )
