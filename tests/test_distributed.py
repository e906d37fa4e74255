"""torch.distributed on CPU (gloo, 2 processes): centers identical on every rank and equal to one
process fed the whole batches; gradient mode under DDP; a bad label on one rank cannot hang the
other; `torchrun -m fastser.train` end to end. Processes rendezvous through a file in tmp_path,
so parallel test runs never fight over a port."""

import datetime
import json
import os
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastser import distributed as fdist
from fastser.nn import CenterLoss
from fastser.ops import available_backends

C, D, B, STEPS = 5, 8, 12, 20
CPU_BACKENDS = [b for b in available_backends("cpu") if b in ("cpp", "torch", "triton")]

# every test here trains a model or runs a command end to end
pytestmark = pytest.mark.slow


def batches():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, B, D, generator=gen), torch.randint(0, C, (STEPS, B), generator=gen)


class WithHead(nn.Module):
    """A model that holds the center loss inside it (the DDP-wrapped case)."""

    def __init__(self, crit):
        super().__init__()
        self.head = nn.Linear(D, D)
        self.crit = crit

    def forward(self, x, y):
        return self.crit(self.head(x), y)


def make(update, backend, seed, inside):
    torch.manual_seed(seed)
    crit = CenterLoss(C, D, update=update, backend=backend)
    torch.manual_seed(1)  # the same head everywhere (DDP would broadcast it anyway)
    return WithHead(crit) if inside else crit


def train(module, xs, ys, rows, update, inside):
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for x, y in zip(xs, ys):
        x = x[rows].clone().requires_grad_(not inside)
        loss = module(x, y[rows])
        if opt:
            opt.zero_grad()
        loss.backward()
        if opt:
            opt.step()


def _worker(rank, world, store, out_dir, update, backend, inside, bad_label_rank):
    result = {"rank": rank}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=8)
        )
        module = make(update, backend, seed=100 + rank, inside=inside)  # different seeds on purpose
        if inside:
            module = DDP(module)
        xs, ys = batches()
        if bad_label_rank == rank:
            ys[3, rank * (B // world)] = C  # out of range, on this rank only
        half = B // world
        train(module, xs, ys, slice(rank * half, (rank + 1) * half), update, inside)
        crit = module.module.crit if inside else module
        torch.save(crit.centers.detach().clone(), os.path.join(out_dir, f"centers{rank}.pt"))
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the test
        result.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
            json.dump(result, f)
        # the package's teardown: a rank that shut gloo down while the other was still on its
        # last step could abort in the shutdown, so a finished rank waits for the other first
        fdist.teardown(fdist.DistInfo(rank=rank, world_size=world), finished=result.get("ok", False))


def spawn(tmp_path, update, backend, inside, bad_label_rank=-1):
    mp.spawn(
        _worker,
        args=(2, str(tmp_path / "store"), str(tmp_path), update, backend, inside, bad_label_rank),
        nprocs=2,
        join=True,
    )
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]


def single_process(update, backend, inside):
    module = make(update, backend, seed=100, inside=inside)  # rank 0's initial centers
    xs, ys = batches()
    train(module, xs, ys, slice(0, B), update, inside)
    return (module.crit if inside else module).centers.detach()


@pytest.mark.parametrize("inside", [False, True], ids=["beside-ddp", "inside-ddp"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wen_centers_equal_one_process_and_identical_across_ranks(tmp_path, backend, inside):
    results = spawn(tmp_path, "wen", backend, inside)
    assert all(r["ok"] for r in results), results
    c0, c1 = (torch.load(tmp_path / f"centers{r}.pt") for r in range(2))
    assert torch.equal(c0, c1), "ranks disagree"
    torch.testing.assert_close(c0, single_process("wen", backend, inside), rtol=1e-6, atol=1e-6)


def test_gradient_mode_under_ddp_matches_one_process(tmp_path):
    results = spawn(tmp_path, "gradient", "cpp", inside=True)
    assert all(r["ok"] for r in results), results
    c0, c1 = (torch.load(tmp_path / f"centers{r}.pt") for r in range(2))
    assert torch.equal(c0, c1)
    torch.testing.assert_close(c0, single_process("gradient", "cpp", True), rtol=1e-5, atol=1e-6)


def test_bad_label_on_one_rank_raises_there_and_nothing_hangs(tmp_path):
    results = spawn(tmp_path, "wen", "cpp", inside=False, bad_label_rank=1)
    assert not results[1]["ok"] and "out of range" in results[1]["error"]
    assert not results[0]["ok"]  # its collective timed out instead of waiting forever
    assert not (tmp_path / "centers1.pt").exists()


def _teardown_worker(rank, store, out_dir):
    import time

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    if rank == 0:
        time.sleep(1.5)  # rank 0 still busy (writing the reports) after the last collective
    fdist.teardown(fdist.DistInfo(rank=rank, world_size=2), finished=True)
    with open(os.path.join(out_dir, f"left{rank}"), "w") as f:
        f.write(repr(time.time()))


def test_a_finished_rank_leaves_the_process_group_only_when_every_rank_has_finished(tmp_path):
    """A gloo rank that shut down while another was still busy could abort in its shutdown; a
    finished run's teardown waits for every rank first."""
    mp.spawn(_teardown_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    left = [float((tmp_path / f"left{r}").read_text()) for r in range(2)]
    assert abs(left[0] - left[1]) < 1.0, left  # rank 1 waited for rank 0's 1.5 s


def test_torchrun_train_writes_one_set_of_artifacts(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "fastser.train",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    total = sum(map(sum, metrics["confusion"]))
    assert total == metrics["n_test"] == 96  # the default corpus's 2 test speakers x 48, each counted once
    assert len((out / "history.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL.md",
        "checkpoint.pt",
        "config.json",
        "confusion.png",
        "embeddings.png",
        "history.jsonl",
        "metrics.json",
        "predictions.csv",
        "settings.json",
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(reason="NCCL needs a GPU"))])
def test_torchrun_with_one_process_is_ddp_and_gives_the_plain_runs_metrics(tmp_path, device):
    """torchrun --nproc_per_node=1 runs the distributed code (process group: gloo on the CPU, NCCL on
    a GPU; DDP; the center sync) and ends with exactly the plain run's metrics. The DDP overhead (the
    same epochs' seconds, utterances per second) is printed for the GPU session's log."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["-m", "fastser.train", "--epochs", "2", "--no-progress", "--device", device, "--deterministic"]
    args += "--synthetic-speakers 6 --synthetic-per-class 4 --width 4 --embed-dim 16".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("plain", [sys.executable]), ("ddp", [torchrun, "--standalone", "--nproc_per_node=1"])):
        proc = subprocess.run(
            [*launcher, *args, "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=900, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (
            json.loads((tmp_path / name / "metrics.json").read_text()),
            [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()],
        )
    (plain, plain_hist), (ddp, ddp_hist) = runs["plain"], runs["ddp"]
    assert ddp["ddp"] and not plain["ddp"] and ddp["world_size"] == plain["world_size"] == 1
    assert ddp["confusion"] == plain["confusion"] and ddp["ua"] == plain["ua"]
    for a, b in zip(plain_hist, ddp_hist):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-6) and a["center"] == pytest.approx(b["center"], rel=1e-6)
    seconds = {name: sum(h["seconds"] for h in hist) for name, (_, hist) in runs.items()}
    print(
        f"\n{device}: 2 epochs plain {seconds['plain']:.2f} s, torchrun 1 rank (DDP) {seconds['ddp']:.2f} s "
        f"({seconds['ddp'] / seconds['plain']:.2f}x)"
    )
