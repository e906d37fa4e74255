"""The commands as a user runs them: the installed console scripts and `python -m`, in subprocesses.

Exit status 0 on success, 2 with exactly one stderr line naming the problem on bad input, 130 with
one line saying how to resume on Ctrl-C; the same from either way of running a command.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import soundfile as sf
import torch

from fastser.data.synthetic import make_corpus
from tests.test_train import SMALL

pytestmark = pytest.mark.slow  # every test here runs a command end to end


def installed_script(name: str) -> str:
    """Where pip put the console script: beside this Python (a venv), in this scheme's scripts folder
    (a system or --user install), or on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    assert found, f"{name} is missing: install the package (pip install -e .) to get its scripts"
    return found


def command(name: str, way: str) -> list:
    if way == "script":
        return [installed_script(f"fastser-{name}")]
    return [sys.executable, "-m", f"fastser.{name}"]


def shows(name: str, way: str) -> str:
    return f"fastser-{name}" if way == "script" else f"python -m fastser.{name}"


def run(cmd, *args, env=None, cwd=None):
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, **(env or {})}
    )


def parser_of(parse_args, argv):
    """The ArgumentParser a command builds inside its parse_args(argv)."""
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        return original(self, *a, **k)

    argparse.ArgumentParser.parse_args = grab
    try:
        parse_args(argv)
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


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
    missing = run(
        command("train", way), "--corpus", "emodb", "--data-dir", tmp_path / "missing", "--out", tmp_path / "o"
    )
    assert missing.returncode == 2
    assert "does not exist" in one_error_line(missing, prog)
    assert not (tmp_path / "o").exists()  # no empty run folder left behind
    bad_device = run(command("train", way), "--device", "gpu", "--out", tmp_path / "o")
    assert bad_device.returncode == 2 and "device 'gpu'" in one_error_line(bad_device, prog)
    bad_value = run(command("train", way), "--noise", "100", "--out", tmp_path / "o")  # argparse's own errors too
    assert bad_value.returncode == 2 and "argument --noise" in one_error_line(bad_value, prog)
    unknown = run(command("train", way), "--learning-rate", "3", "--out", tmp_path / "o")
    assert unknown.returncode == 2 and "--learning-rate" in one_error_line(unknown, prog)
    if not torch.cuda.is_available():
        no_cuda = run(command("train", way), "--device", "cuda", "--out", tmp_path / "o")
        assert no_cuda.returncode == 2 and "CUDA is not available" in one_error_line(no_cuda, prog)


@pytest.mark.parametrize("way", ["script", "module"])
def test_predict_bad_checkpoints_exit_2_with_one_line(tmp_path, way):
    prog = shows("predict", way)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"foo": 1}, tmp_path / "dict.pt")
    cases = {
        "missing.pt": "no such checkpoint",
        "text.pt": "not a PyTorch checkpoint file",
        "tensor.pt": "no fastser metadata",
        "dict.pt": "no fastser metadata",
    }
    for name, expected in cases.items():
        proc = run(command("predict", way), tmp_path / "x.wav", "--checkpoint", tmp_path / name)
        assert proc.returncode == 2, (name, proc.stderr)
        line = one_error_line(proc, prog)
        assert expected in line and "weights_only=False" not in line, line


def test_predict_bad_device_and_bad_audio_exit_2(trained, tmp_path):
    run_dir, clips = trained
    proc = run(command("predict", "script"), clips[0], "--checkpoint", run_dir, "--device", "gpu")
    assert proc.returncode == 2 and "device 'gpu'" in one_error_line(proc, "fastser-predict")
    (tmp_path / "bad.wav").write_text("nope")
    proc = run(
        command("predict", "script"), tmp_path / "bad.wav", clips[0], "--checkpoint", run_dir, "--enroll", clips[0]
    )  # enrolled: no hint about enrollment beside the one error line
    lines = proc.stderr.strip().splitlines()
    # the tests' model was trained on the synthetic corpus, which the good file's prediction says once
    assert sum("synthetic corpus" in line for line in lines) == 1
    errors = [line for line in lines if "synthetic corpus" not in line]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("fastser-predict: error: ")
    assert "bad.wav" in errors[0]
    assert str(clips[0]) in proc.stdout  # the good file still got its prediction


@pytest.mark.parametrize("way", ["script", "module"])
def test_help_names_the_program_that_was_run(way):
    for name in ("train", "predict"):
        proc = run(command(name, way), "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {shows(name, way)} "), proc.stdout[:200]


def test_interrupt_prints_the_command_that_continues_the_run(tmp_path):
    """Ctrl-C: the message, then the exact command on a line of its own; that command alone (the run's
    settings come from its folder) finishes the run as if it had never stopped."""
    settings = [*SMALL, "--epochs", "3", "--seed", "4", "--synthetic-speakers", "5"]
    proc = run(
        command("train", "script"), *settings, "--out", tmp_path / "cut", env={"FASTSER_INTERRUPT_AFTER_EPOCHS": "1"}
    )
    assert proc.returncode == 130
    lines = proc.stderr.strip().splitlines()
    assert lines[-2:] == [
        "fastser-train: interrupted; continue it with:",
        f"  fastser-train --resume {tmp_path / 'cut'}",
    ]
    words = shlex.split(lines[-1])
    assert words[0] == "fastser-train"
    resumed = run(command("train", "script"), *words[1:])  # the installed script the hint names
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = run(command("train", "script"), *settings, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    def history(d):
        return [
            {k: v for k, v in json.loads(r).items() if k != "seconds"}
            for r in (tmp_path / d / "history.jsonl").read_text().splitlines()
        ]

    assert len(history("cut")) == 3 and history("cut") == history("full")


def test_predict_without_cuda_and_json_checkpoint(trained, tmp_path):
    run_dir, clips = trained
    if not torch.cuda.is_available():
        proc = run(command("predict", "script"), clips[0], "--checkpoint", run_dir, "--device", "cuda")
        assert proc.returncode == 2 and "CUDA is not available" in one_error_line(proc, "fastser-predict")
    (tmp_path / "metrics.json").write_text('{"wa": 0.5}')
    proc = run(command("predict", "script"), clips[0], "--checkpoint", tmp_path / "metrics.json")
    line = one_error_line(proc, "fastser-predict")
    assert proc.returncode == 2 and "not a fastser checkpoint" in line and "weights_only" not in line


def test_strict_and_skipped_files_name_each_file_once(tmp_path):
    from tests.data.fixtures import make_ravdess

    make_ravdess(tmp_path / "rav")
    base = [
        *command("train", "script"),
        *("--corpus", "ravdess", "--data-dir", tmp_path / "rav"),
        *"--no-cache --width 4 --embed-dim 16 --epochs 1 --no-progress --max-folds 1".split(),
    ]
    strict = run(base, "--strict", "--out", tmp_path / "s")
    line = one_error_line(strict, "fastser-train")
    assert strict.returncode == 2 and "--strict" in line and str(tmp_path / "rav") in line  # names the file
    ok = run(base, "--out", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-2000:]
    warning = [line for line in ok.stderr.splitlines() if line.startswith("warning: skipped")]
    listed = [line.strip() for line in ok.stderr.splitlines() if line.startswith("  ")]
    assert len(warning) == 1 and listed and all(line.count(str(tmp_path / "rav")) == 1 for line in listed)
    assert "warnings.warn" not in ok.stderr and "UserWarning" not in ok.stderr


def test_few_speakers_warn_on_stderr(tmp_path):
    from tests.data.fixtures import make_tess, write_wav

    make_tess(tmp_path / "tess")  # two speakers: no speaker-disjoint validation set is possible
    for spk in ("OAF", "YAF"):  # enough words per speaker for a train and a validation part
        for i, word in enumerate(("bean", "cab", "chain", "dip", "fall", "gun")):
            write_wav(tmp_path / "tess" / f"{spk}_angry" / f"{spk}_{word}_angry.wav", seed=10 + i)
            write_wav(tmp_path / "tess" / f"{spk}_neutral" / f"{spk}_{word}_neutral.wav", seed=20 + i)
    flags = ["--corpus", "tess", "--data-dir", tmp_path / "tess"]
    flags += "--no-cache --width 4 --embed-dim 16 --epochs 1 --no-progress --max-folds 1 --batch-size 2".split()
    proc = run(command("train", "script"), *flags, "--validation", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "too few speakers for a speaker-disjoint validation set" in proc.stderr
    # without validation (the real corpora's default) nothing early-stops, and the warnings say so
    proc = run(command("train", "script"), *flags, "--out", tmp_path / "p")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert not any("validation" in w or "early stopping" in w for w in warnings), warnings


def test_every_train_flag_is_documented_with_its_default_once():
    import fastser.train as train

    parser = parser_of(train.parse_args, [])
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented, undocumented
    text = parser.format_help()
    assert "(default: None)" not in text and text.count("(default:") >= 10
    for chunk in text.split("\n  -")[1:]:
        assert " ".join(chunk.split()).count("default") <= 1, chunk


def test_artifacts_have_the_usual_file_mode_and_record_backends(trained):
    import json

    run_dir, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "metrics.json", "config.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    for name in ("metrics.json", "config.json"):
        backends = json.loads((run_dir / name).read_text())["backends"]
        assert backends["center_loss"] in ("cpp", "torch", "triton", "cuda") and "compiled_cpu_kernels" in backends


BLOCK_C = """
import sys
class NoCompiledKernels:  # as in a source tree that was never built
    def find_spec(self, name, path=None, target=None):
        if name == "fastser._C":
            raise ImportError("No module named 'fastser._C'")
sys.meta_path.insert(0, NoCompiledKernels())
import fastser.ops, fastser.features
print(fastser.ops.available_backends("cpu"))
"""


def test_missing_compiled_kernels_warn_once_and_say_why():
    proc = run([sys.executable, "-c", BLOCK_C])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("compiled CPU kernels are not importable") == 1, proc.stderr
    assert "was not built" in proc.stderr or "shadows" in proc.stderr
    assert "cpp" not in proc.stdout


def test_a_source_tree_shadowing_the_installed_package_is_named(monkeypatch, tmp_path):
    import importlib.metadata
    from fastser.ops import _native

    class Found:
        metadata = {"Name": "fastser"}

        def __init__(self, root):
            self.root = root

        def locate_file(self, name):
            (self.root / name).mkdir(parents=True, exist_ok=True)
            return self.root / name

    source_tree = Path(_native.__file__).resolve().parent.parent.parent  # its fastser.egg-info is found first
    found = [Found(source_tree), Found(tmp_path / "site-packages")]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(found))
    why = _native._explain_missing_cpu_kernels(ImportError("No module named 'fastser._C'"))
    assert "shadows" in why and str(tmp_path / "site-packages" / "fastser") in why


def test_every_predict_argument_is_documented():
    proc = run(command("predict", "script"), "--help")
    text = " ".join(proc.stdout.split())
    for arg in (
        "AUDIO",
        "--checkpoint",
        "--device",
        "--format",
        "--json",
        "--segments",
        "--batch-size",
        "--no-progress",
    ):
        assert arg in text
    import fastser.predict as predict

    undocumented = [
        a.dest for a in parser_of(predict.parse_args, ["x.wav", "--checkpoint", "c.pt"])._actions if not a.help
    ]
    assert not undocumented, undocumented
