"""The commands as a user runs them: the installed console scripts and `python -m`, in subprocesses.

Exit status 0 on success, 2 with exactly one stderr line naming the problem on bad input, 130 with
one line saying how to resume on Ctrl-C; the same from either way of running a command.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fastser.data.synthetic import make_corpus
from tests.test_train import SMALL

BIN = Path(sys.executable).parent


def command(name: str, way: str) -> list:
    if way == "script":
        script = BIN / f"fastser-{name}"
        assert script.is_file(), f"{script} is missing: install the package (pip install -e .) to get its scripts"
        return [str(script)]
    return [sys.executable, "-m", f"fastser.{name}"]


def shows(name: str, way: str) -> str:
    return f"fastser-{name}" if way == "script" else f"python -m fastser.{name}"


def run(cmd, *args, env=None, cwd=None):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


def one_error_line(proc, prog: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through the installed script; its checkpoint and two clips for predict."""
    tmp = tmp_path_factory.mktemp("cli")
    proc = run(command("train", "script"), *SMALL, "--epochs", "1", "--out", tmp / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]  # a script that returned its metrics exited 1 once
    clips = []
    for u in make_corpus(seed=5, n_speakers=1, per_class=1).utterances[:2]:
        clips.append(tmp / f"{u.uid}.wav")
        sf.write(clips[-1], u.audio, 16000)
    return tmp / "run", clips


@pytest.mark.parametrize("way", ["script", "module"])
def test_predict_succeeds_with_exit_0(trained, way):
    run_dir, clips = trained
    proc = run(command("predict", way), *clips, "--checkpoint", run_dir / "checkpoint.pt")
    assert proc.returncode == 0, proc.stderr
    assert all(str(c) in proc.stdout for c in clips)


@pytest.mark.parametrize("way", ["script", "module"])
def test_train_bad_input_exits_2_with_one_line(tmp_path, way):
    prog = shows("train", way)
    missing = run(command("train", way), "--corpus", "emodb", "--data-dir", tmp_path / "missing", "--out",
                  tmp_path / "o")
    assert missing.returncode == 2
    assert "does not exist" in one_error_line(missing, prog)
    assert not (tmp_path / "o").exists()  # no empty run folder left behind
    bad_device = run(command("train", way), "--device", "gpu", "--out", tmp_path / "o")
    assert bad_device.returncode == 2 and "--device 'gpu'" in one_error_line(bad_device, prog)
    if not torch.cuda.is_available():
        no_cuda = run(command("train", way), "--device", "cuda", "--out", tmp_path / "o")
        assert no_cuda.returncode == 2 and "CUDA is not available" in one_error_line(no_cuda, prog)


@pytest.mark.parametrize("way", ["script", "module"])
def test_predict_bad_checkpoints_exit_2_with_one_line(tmp_path, way):
    prog = shows("predict", way)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"foo": 1}, tmp_path / "dict.pt")
    cases = {"missing.pt": "no such checkpoint", "text.pt": "not a PyTorch checkpoint file",
             "tensor.pt": "no fastser metadata", "dict.pt": "no fastser metadata"}
    for name, expected in cases.items():
        proc = run(command("predict", way), tmp_path / "x.wav", "--checkpoint", tmp_path / name)
        assert proc.returncode == 2, (name, proc.stderr)
        line = one_error_line(proc, prog)
        assert expected in line and "weights_only=False" not in line, line


def test_predict_bad_device_and_bad_audio_exit_2(trained, tmp_path):
    run_dir, clips = trained
    proc = run(command("predict", "script"), clips[0], "--checkpoint", run_dir, "--device", "gpu")
    assert proc.returncode == 2 and "--device 'gpu'" in one_error_line(proc, "fastser-predict")
    (tmp_path / "bad.wav").write_text("nope")
    proc = run(command("predict", "script"), tmp_path / "bad.wav", clips[0], "--checkpoint", run_dir)
    assert proc.returncode == 2 and "bad.wav" in one_error_line(proc, "fastser-predict")
    assert str(clips[0]) in proc.stdout  # the good file still got its prediction


@pytest.mark.parametrize("way", ["script", "module"])
def test_help_names_the_program_that_was_run(way):
    for name in ("train", "predict"):
        proc = run(command(name, way), "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {shows(name, way)} "), proc.stdout[:200]


def test_interrupt_prints_one_line_with_the_resume_command(tmp_path):
    proc = run(command("train", "script"), *SMALL, "--epochs", "3", "--out", tmp_path / "cut",
               env={"FASTSER_INTERRUPT_AFTER_EPOCHS": "1"})
    assert proc.returncode == 130
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"fastser-train: interrupted; continue with --resume {tmp_path / 'cut'}"
