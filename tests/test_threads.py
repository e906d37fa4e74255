"""The CPU thread count a run takes when --threads is not given (fastser.threads)."""

import subprocess
import sys

import pytest

import fastser.train as train
from fastser.training import run as training_run
from fastser import threads
from tests.test_train import SMALL


@pytest.mark.parametrize(
    "cores, busy, expected",
    [(2, 0.05, 2), (2, 0.4, 2), (2, 0.97, 1), (2, 1.6, 1), (2, 2.0, 1), (16, 3.2, 13), (1, 0.9, 1)],
)
def test_the_team_is_the_usable_cores_less_the_busy_ones(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.25: busy)
    n, why = threads.free_threads(look_seconds=0)  # one look (the repeated look: below)
    assert n == expected
    if n < cores:  # a reduced team is said, with the flag that fixes it
        assert "busy with other work" in why and "--threads N" in why
    else:
        assert why == f"{n} CPU thread{'s' if n > 1 else ''}"


class _Clock:
    """A fake clock and busy_cores: each look advances the clock by its seconds and returns the
    load that `load(t)` gives at the look's start."""

    def __init__(self, load):
        self.t, self.load, self.looks = 0.0, load, 0

    def monotonic(self):
        return self.t

    def busy_cores(self, seconds=0.25):
        busy = self.load(self.t)
        self.t += seconds
        self.looks += 1
        return busy


@pytest.mark.parametrize(
    "load, expected, max_looks",
    [
        (lambda t: 0.1, 2, 1),  # idle: one look, every core
        (lambda t: 1.0 if t < 1.0 else 0.05, 2, 5),  # a 1-s blip at the start: every core once it ends
        (lambda t: 1.0, 1, 12),  # busy throughout the look: the free core only
        (lambda t: 2.0 if t < 0.5 else 1.0, 1, 12),  # two busy, then one for good
    ],
)
def test_a_brief_blip_at_the_start_does_not_decide_the_thread_count(monkeypatch, load, expected, max_looks):
    clock = _Clock(load)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", clock.busy_cores)
    monkeypatch.setattr(threads.time, "monotonic", clock.monotonic)
    n, why = threads.free_threads()
    assert n == expected and clock.looks <= max_looks and clock.t <= threads.LOOK_SECONDS
    if n < 2:
        assert "--threads 2 uses every core" in why


def test_busy_cores_sees_another_process_spinning():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert threads.busy_cores(0.5) > 0.6
    finally:
        spin.kill()
    assert 1 <= threads.usable_cores()


def test_a_run_beside_a_busy_process_takes_the_free_core_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.25: 1.0)
    metrics = train.main(SMALL + ["--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert metrics["threads"] == 1
    said = "1 CPU thread (2 cores, 1.0 busy with other work throughout a 3 s look); --threads 2 uses every core"
    assert said in capsys.readouterr().err
    fixed = train.main(SMALL + ["--epochs", "1", "--threads", "2", "--out", str(tmp_path / "fixed")])
    assert fixed["threads"] == 2  # given, it is never second-guessed


@pytest.mark.slow
def test_a_seed_decides_a_cpu_run_at_one_thread_count_however_busy_the_machine(tmp_path):
    """The same command, twice alone and once beside a process spinning on a core, at 2 threads:
    the same history and the same predictions, bit for bit."""
    flags = [*SMALL, "--epochs", "2", "--threads", "2", "--seed", "5"]

    def run(name):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "fastser.train", *flags, "--out", str(out)], capture_output=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        history = [line.split(', "seconds"')[0] for line in (out / "history.jsonl").read_text().splitlines()]
        return history, (out / "predictions.csv").read_bytes()

    first, second = run("a"), run("b")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = run("busy")
    finally:
        spin.kill()
    assert first == second == loaded


def test_every_run_asks_onednn_for_its_deterministic_kernels(tmp_path, monkeypatch):
    """oneDNN's deterministic attribute is on while a run trains (and restored after it)."""
    import torch

    seen = []
    real = training_run._train

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.deterministic)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_run, "_train", spy)
    before = torch.backends.mkldnn.deterministic
    train.main(SMALL + ["--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run")])
    assert seen == [True] and torch.backends.mkldnn.deterministic == before
