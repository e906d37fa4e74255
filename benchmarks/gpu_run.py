"""The project's GPU session: what decides most per second, in about five minutes, in one call.

    python -m benchmarks.gpu_run prepare          # here: the wheels the GPU image lacks, into .gpu/whl
    python3 -m benchmarks.gpu_run run             # there (device tool: carry [".gpu"], timeout_s 400)
    python -m benchmarks.gpu_run run --dry-run    # any CPU: every step at tiny sizes (CI runs it)

`run` goes through STEPS in order: the wheels and the build, the profile of the decisive cases, the
benchmark cases the targets name, the default training run (its CUDA graph; eager with
--no-cuda-graph), the GPU tests without the compile gate (CPU-only work), then the remaining
benchmarks. Each step has its own time box, cut to what is left of the whole budget; a step that
runs over is killed together with everything it started (its process group: xdist workers, compile
subprocesses). Everything goes into one archive, $OUT/gpu-run.tar.gz (logs, profile, results JSON,
run metrics, summary.json with each step's exit status, seconds and box), written whatever happened;
summary.txt beside it. After a GPU run: copy the archive's results/*.json into benchmarks/results/
and run `python -m lab.report --write`."""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpu"  # excluded from git locally; travels with the device call (carry)
BUDGET_S = 300  # the whole run: start-up, one run, a fix and a second run fit in 15 device minutes
GPU_PYTHON = "3.12"  # the GPU image's python3
# What the GPU image lacks of fastser's and librosa's needs (it has torch, numpy, scipy, numba,
# scikit-learn, joblib, lazy-loader, msgpack, tqdm, matplotlib, pytest-benchmark, pytest-xdist, ...).
WHEELS = (
    "librosa==0.11.0",
    "soundfile==0.13.1",
    "soxr==0.5.0.post1",
    "audioread==3.0.1",
    "pooch==1.8.2",
    "platformdirs==4.3.8",
    "decorator==5.2.1",
    "cffi==1.17.1",
    "pycparser==2.22",
    "setuptools==80.9.0",
)  # the build backend pyproject.toml asks for (>= 77), whatever the image has
# the image's own packages that the carried wheels need: fetched for the import check only, never carried
IMAGE_STAND_INS = (
    "numpy<2.6",
    "scipy",
    "numba",
    "llvmlite",
    "scikit-learn",
    "joblib",
    "threadpoolctl",
    "lazy_loader",
    "msgpack",
    "typing_extensions",
    "packaging",
    "requests",
    "charset-normalizer",
    "idna",
    "urllib3",
    "certifi",
    "cloudpickle",
)
IMPORTS = ("soundfile", "soxr", "librosa", "audioread", "pooch")
# librosa imports its parts lazily: the check uses them as the librosa references do
EXERCISE = (
    "import io, numpy as np, soundfile as sf, soxr, librosa; y = np.sin(np.arange(16000) / 5.0); "
    "buf = io.BytesIO(); sf.write(buf, y, 16000, format='WAV'); buf.seek(0); sf.read(buf); "
    "soxr.resample(y, 16000, 8000); librosa.feature.mfcc(y=y, sr=16000, n_mfcc=13); "
    "librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=16000)); print('ok')"
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

CENTER_LOSS_CASES = (
    [
        f"benchmarks/test_center_loss.py::test_center_loss_step[{impl}-{shape}-fp32-eager]"
        for shape in ("B256_C4_D256", "B4096_C10000_D512", "B65536_C10000_D512")
        for impl in ("reference", "triton", "cuda")
    ]
    + [
        f"benchmarks/test_center_loss.py::test_center_loss_step[{impl}-B65536_C10000_D512-bf16-{mode}]"
        for impl in ("triton", "cuda")
        for mode in ("eager", "graph")
    ]
    + [f"benchmarks/test_center_loss.py::test_launch_floor[{k}]" for k in ("torch-add-1-element", "empty-cuda-kernel")]
)
FEATURE_CASES = [
    f"benchmarks/test_features.py::test_feature_throughput[{impl}-{kind}-{case}]"
    for kind in ("mfcc", "logmel")
    for case in ("", "-2048")
    for impl in ("fastser", "torchaudio")
] + [f"benchmarks/test_features.py::test_feature_throughput[librosa-loop-{kind}-]" for kind in ("mfcc", "logmel")]
TRAIN_STEP_CASES = [
    f"benchmarks/test_train_step.py::test_train_step[B64-{impl}]"
    for impl in ("reference", "fastser", "fastser-graph", "fastser-amp")
]
TARGET_CASES = CENTER_LOSS_CASES + FEATURE_CASES + TRAIN_STEP_CASES
DRY_CASES = [
    "benchmarks/test_center_loss.py::test_center_loss_step[cpp-B256_C4_D256-fp32-eager]",
    "benchmarks/test_center_loss.py::test_center_loss_step[reference-B256_C4_D256-fp32-eager]",
]
TINY_RUN = [
    "--synthetic-speakers",
    "4",
    "--synthetic-per-class",
    "2",
    "--epochs",
    "1",
    "--width",
    "4",
    "--embed-dim",
    "16",
    "--batch-size",
    "8",
    "--train-seconds",
    "1.0",
]
GPU_TESTS = [
    "tests/ops",
    "tests/features",
    "tests/test_distributed.py",
    "tests/models",
    "tests/test_train.py::test_graphed_steps_train_like_eager_steps",
    "--deselect",
    "tests/ops/test_gpu_compile.py",
    "-n",
    "4",
]


@dataclasses.dataclass
class Step:
    """One step: `command` (on the GPU) or `dry` (at tiny sizes on a CPU; None: skipped there), at
    most `box_s` seconds. Arguments may hold {arch} (the archive folder) and {python}."""

    name: str
    box_s: int
    command: list
    dry: list | None
    env: dict = dataclasses.field(default_factory=dict)


def steps() -> list:
    bench = ["{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only"]
    train = ["{python}", "-m", "fastser.train", "--no-progress"]
    results_env = {"FASTSER_BENCH_RESULTS_DIR": "{arch}/results"}
    not_targets = [arg for case in TARGET_CASES for arg in ("--deselect", case)]
    return [
        Step("wheels", 30, ["{python}", "-c", _WHEELS_STEP], ["{python}", "-c", "import soundfile, soxr, librosa"]),
        Step(
            "build",
            100,
            ["{python}", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "-e", "."],
            ["{python}", "-c", "import fastser._C, fastser.ops as o; print(o.available_backends())"],
            {"FASTSER_BUILD_CUDA": "1"},
        ),
        Step(
            "profile",
            60,
            ["{python}", "-m", "benchmarks.profile", "--out", "{arch}/profile"],
            ["{python}", "-m", "benchmarks.profile", "--out", "{arch}/profile", "center-loss-fused", "features-mfcc"],
        ),
        Step("benchmarks", 120, bench + TARGET_CASES, bench + DRY_CASES, results_env),
        Step(
            "train", 40, train + ["--out", "{arch}/train-default"], train + TINY_RUN + ["--out", "{arch}/train-default"]
        ),
        Step("train-eager", 40, train + ["--no-cuda-graph", "--out", "{arch}/train-eager"], None),
        Step(
            "tests",
            90,
            ["{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
            ["{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_native.py"],
        ),
        Step(
            "benchmarks-rest",
            600,
            bench + ["benchmarks"] + not_targets,
            ["{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *TARGET_CASES],
            {"FASTSER_BENCH_RESULTS_DIR": "{arch}/results-rest"},
        ),
    ]


# The wheels step on the GPU machine: install the carried wheels into a clean target, import them.
_WHEELS_STEP = """
import glob, subprocess, sys
wheels = sorted(glob.glob('.gpu/whl/*.whl'))
if wheels:
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                    '--no-cache-dir', '--upgrade', '--target', '/tmp/site', *wheels], check=True)
sys.path.insert(0, '/tmp/site')
import soundfile, soxr, librosa, torch, triton
print('soundfile', soundfile.__version__, 'soxr', soxr.__version__, 'librosa', librosa.__version__)
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
"""


# ----------------------------------------------------------------------------- run


def run_step(step: Step, argv: list, env: dict, log: Path, box_s: float) -> dict:
    """Runs argv in a process group of its own, at most box_s seconds; the whole group is killed at
    the end (also after a normal exit: nothing it started outlives its step)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)  # a chance to write what it has
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {
        "step": step.name,
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(seconds, 1),
        "box_s": round(box_s, 1),
        "last_line": tail[0][:300],
    }


def _kill_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(out: Path, dry_run: bool, budget_s: float, only=None) -> Path:
    """Every step in order within budget_s; returns the archive's path (always written)."""
    arch = Path(tempfile.mkdtemp(prefix="gpu-run-")) / "gpu-run"
    arch.mkdir()
    end = time.monotonic() + budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not dry_run:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, ["/tmp/site", env.get("PYTHONPATH")]))
    summary = {"dry_run": dry_run, "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    subst = {"{arch}": str(arch), "{python}": sys.executable}
    for step in steps():
        if only and step.name not in only:
            continue
        argv = step.dry if dry_run else step.command
        left = end - time.monotonic()
        if argv is None or left < 5:
            why = "needs a GPU" if argv is None else "no time left in the budget"
            summary["steps"].append({"step": step.name, "rc": None, "skipped": why})
            continue
        argv = [_fill(a, subst) for a in argv]
        step_env = {**env, **{k: _fill(v, subst) for k, v in step.env.items()}}
        summary["steps"].append(run_step(step, argv, step_env, arch / f"{step.name}.log", min(step.box_s, left)))
    summary["seconds"] = round(budget_s - (end - time.monotonic()), 1)
    summary["files"] = sorted(str(p.relative_to(arch)) for p in arch.rglob("*") if p.is_file())
    (arch / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = summary_text(summary)
    (arch / "summary.txt").write_text(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(text)
    archive = out / "gpu-run.tar.gz"
    _pack(arch, archive)
    shutil.rmtree(arch.parent, ignore_errors=True)
    print(text, end="")
    return archive


def _fill(text: str, subst: dict) -> str:
    for key, value in subst.items():
        text = text.replace(key, value)
    return text


def _pack(folder: Path, archive: Path, limit: int = 15 << 20) -> None:
    """One .tar.gz under the device tool's 16 MiB a file, without the runs' checkpoints; the Chrome
    traces are left out too if it would be bigger."""
    for keep_traces in (True, False):
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix != ".pt" and (keep_traces or not _is_trace(path)):
                    tar.add(path, arcname=str(Path(folder.name) / path.relative_to(folder)))
        if archive.stat().st_size <= limit:
            return


def _is_trace(path: Path) -> bool:
    return path.parent.name == "profile" and path.suffix == ".json" and path.name != "profile.json"


def summary_text(summary: dict) -> str:
    lines = [f"gpu_run {'dry run' if summary['dry_run'] else 'run'}: {summary['seconds']} s of {summary['budget_s']} s"]
    for s in summary["steps"]:
        if "skipped" in s:
            lines.append(f"  {s['step']:<16} skipped ({s['skipped']})")
        else:
            state = "TIMED OUT" if s["timed_out"] else f"rc={s['rc']}"
            lines.append(f"  {s['step']:<16} {state:<10} {s['seconds']:6.1f} s of {s['box_s']:5.0f}  {s['last_line']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- prepare


def prepare(kit: Path, python: str | None) -> list:
    """Downloads WHEELS for the GPU image's Python into kit/whl and checks them: each wheel's
    requirements are carried or the image's own, and with that Python (when it is installed here)
    each carried package imports from a clean target directory. Returns the problems found."""
    whl = kit / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    _exclude_from_git(kit)
    _download(WHEELS, whl)
    problems = check_requirements(sorted(whl.glob("*.whl")))
    if python:
        problems += check_imports(sorted(whl.glob("*.whl")), python)
    else:
        print(f"no python{GPU_PYTHON} here: the import check is left to the wheels step on the GPU machine")
    return problems


def _download(specs, dest: Path) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            GPU_PYTHON,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            *specs,
        ],
        check=True,
    )


def _exclude_from_git(kit: Path) -> None:
    git_dir = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True, text=True
    )
    if git_dir.returncode:
        return
    exclude = ROOT / git_dir.stdout.strip()
    line = f"/{kit.relative_to(ROOT)}/"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if line not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write(line + "\n")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_requirements(wheels: list) -> list:
    """Every non-optional requirement of a carried wheel (markers read for the GPU image: Linux,
    CPython GPU_PYTHON) must be carried too or be one of the image's packages."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {
        **default_environment(),
        "python_version": GPU_PYTHON,
        "python_full_version": GPU_PYTHON + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "implementation_name": "cpython",
    }
    carried = {_canonical(Path(w).name.split("-")[0]) for w in wheels}
    image = {_canonical(Requirement(s).name) for s in IMAGE_STAND_INS} | {"torch", "triton", "tqdm", "matplotlib"}
    problems = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            headers = email.parser.Parser().parsestr(z.read(meta).decode())
        for text in headers.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            if _canonical(req.name) not in carried | image:
                problems.append(f"{Path(wheel).name} needs {req.name}, which is neither carried nor in the GPU image")
    return problems


STAND_INS = Path.home() / ".cache" / "fastser-gpu-stand-ins"  # ~120 MB: outside the kit, which travels


def check_imports(wheels: list, python: str) -> list:
    """Installs the carried wheels alone into a clean target with the GPU image's Python and
    imports IMPORTS, with the image's own packages (stand-ins fetched into STAND_INS, never
    carried) on the path after them."""
    stand_ins = STAND_INS
    _download(IMAGE_STAND_INS, stand_ins / "whl")  # pip keeps what it fetched before
    with tempfile.TemporaryDirectory() as tmp:
        for source, target in (
            (wheels, Path(tmp) / "carried"),
            (sorted((stand_ins / "whl").glob("*.whl")), Path(tmp) / "image"),
        ):
            subprocess.run(
                [
                    python,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--target",
                    str(target),
                    *map(str, source),
                ],
                check=True,
            )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(tmp) / "carried"), str(Path(tmp) / "image")]),
            "PYTHONNOUSERSITE": "1",
        }
        done = subprocess.run(
            [
                python,
                "-I",
                "-c",
                "import sys; sys.path[:0] = sys.argv[1].split(':'); "
                + "; ".join(f"import {m}" for m in IMPORTS)
                + "; "
                + EXERCISE,
                env["PYTHONPATH"],
            ],
            capture_output=True,
            text=True,
        )
    if done.returncode:
        return [f"python{GPU_PYTHON} cannot import the carried wheels: {done.stderr.strip().splitlines()[-1]}"]
    print(f"python{GPU_PYTHON}: {', '.join(IMPORTS)} import from a clean target and compute features")
    return []


def _gpu_python() -> str | None:
    """An interpreter of the GPU image's Python version here, if there is one (pyenv's shims are
    skipped: they fail for a version that is not selected)."""
    pyenv = sorted(Path.home().glob(f".pyenv/versions/{GPU_PYTHON}.*/bin/python{GPU_PYTHON}"))
    if pyenv:
        return str(pyenv[-1])
    found = shutil.which(f"python{GPU_PYTHON}")
    return found if found and "/shims/" not in found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: download and check the wheels the GPU image lacks")
    prep.add_argument("--kit", default=str(KIT), help="folder that travels with the device call")
    go = sub.add_parser("run", help="the GPU session (or --dry-run: the same steps at tiny sizes on a CPU)")
    go.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU: checks the script and the archive")
    go.add_argument("--out", default=os.environ.get("OUT", "gpu-run-out"), help="where the archive goes ($OUT)")
    go.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    go.add_argument("--only", nargs="+", default=None, help="run only these steps")
    args = p.parse_args(argv)
    if args.command == "prepare":
        problems = prepare(Path(args.kit), _gpu_python())
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        size = sum(f.stat().st_size for f in (Path(args.kit) / "whl").glob("*.whl")) / 2**20
        print(
            f"{Path(args.kit) / 'whl'}: {len(list((Path(args.kit) / 'whl').glob('*.whl')))} wheels, {size:.1f} MiB; "
            f"device call: command 'python3 -m benchmarks.gpu_run run', carry ['{Path(args.kit).name}'], "
            f"timeout_s {BUDGET_S + 100}"
        )
        return 1 if problems else 0
    run(Path(args.out), args.dry_run, args.budget, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
