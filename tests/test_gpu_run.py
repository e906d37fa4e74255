"""benchmarks.gpu_run, the project's GPU session: its dry run goes through every step on the CPU and
writes the archive a GPU run would bring back, so the script cannot rot between the rare GPU runs."""

import json
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from benchmarks import gpu_run


@pytest.mark.slow
def test_dry_run_goes_through_every_step_and_writes_the_archive(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_run", "run", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=gpu_run.ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "summary.txt").read_text() == proc.stdout
    with tarfile.open(tmp_path / "gpu-run.tar.gz") as tar:
        names = set(tar.getnames())
        summary = json.load(tar.extractfile("gpu-run/summary.json"))
        metrics = json.load(tar.extractfile("gpu-run/train-default/metrics.json"))
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gpu_run.steps()]
    assert steps["train-eager"]["skipped"] == "needs a GPU"
    ran = [s for s in steps.values() if "skipped" not in s]
    assert all(s["rc"] == 0 and not s["timed_out"] and s["seconds"] <= s["box_s"] for s in ran), ran
    assert {f"gpu-run/{s['step']}.log" for s in ran} <= names
    assert {"gpu-run/profile/profile.json", "gpu-run/summary.txt"} <= names
    assert any(n.startswith("gpu-run/results/") and n.endswith(".json") for n in names)
    assert not any(n.endswith(".pt") for n in names)  # checkpoints stay behind
    assert set(metrics["phase_seconds"]) == {"corpus", "features", "training", "total"}
    # the GPU selection still names cases that exist (the dry run collects them)
    assert f"{len(gpu_run.TARGET_CASES)} tests collected" in steps["benchmarks-rest"]["last_line"]


def test_a_step_past_its_box_is_killed_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    step = gpu_run.Step("slow", 1, [], None)
    argv = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    t0 = time.perf_counter()
    result = gpu_run.run_step(step, argv, {}, tmp_path / "slow.log", box_s=1.0)
    assert result["timed_out"] and time.perf_counter() - t0 < 15
    child = int(pid_file.read_text())
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert state in ("", "Z"), f"the step's child {child} outlived its box ({state})"


def test_prepare_flags_a_requirement_that_is_neither_carried_nor_in_the_image(tmp_path):
    def wheel(name, requires):
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(
                f"{name}-1.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: %s\nVersion: 1.0\n%s"
                % (name, "".join(f"Requires-Dist: {r}\n" for r in requires)),
            )
        return path

    carried = [
        wheel("soundfile", ["cffi>=1.0", "numpy"]),
        wheel("cffi", ["pycparser"]),
        wheel("extra", ["pytest; extra == 'test'", "tomli; python_version < '3.11'"]),
    ]
    problems = gpu_run.check_requirements(carried)
    assert problems == ["cffi-1.0-py3-none-any.whl needs pycparser, which is neither carried nor in the GPU image"]
