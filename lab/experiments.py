"""The experiment queue: accuracy comparisons in units of one fold, each kept the moment it ends.

    python -m lab.experiments run lab/plans/PLAN.json --budget-minutes 120
    python -m lab.experiments status lab/plans/PLAN.json
    python -m lab.experiments compare lab/plans/PLAN.json [--arms BASE OTHER ...]

A plan (a JSON file, see lab/plans/) names a corpus, seeds, folds and arms; an arm is a list
of `python -m fastser.train` flags, so it is checked exactly as the command line checks it. A unit
is one fold of one arm and one seed, trained exactly as that fold of a full run is (same fold
index, same seeds), and scored with and without enrollment. Its result — per-utterance predictions,
UA/WA, the no-enrollment scores, the settings, the processor, the thread count and the seconds — is
written atomically to

    benchmarks/results/accuracy/units/<arm>/seed-<seed>/<test speaker>.json

as soon as it ends. `run` skips units that have a file, never starts one it cannot finish inside
the budget (estimated from the arm's finished units, or another arm's scaled by the training
FLOPs), and a later `run` of the same plan, on this machine or another, continues it. Units are
taken seed by seed, fold by fold, every arm of a fold before the next fold, so that pairs complete
as the queue goes. `--workers 2` runs two 1-thread processes that claim units one at a time.

`compare` pairs arms by (seed, test speaker) over whatever units exist and says how many pairs it
rests on and how many units are still missing. Unit files of one arm must share its settings: an
arm whose flags change is a new arm (a new name), never a silent mix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fastser.config import migrated
from fastser.errors import UserError
from fastser.threads import usable_cores

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "benchmarks" / "results" / "accuracy" / "units"
SCRATCH = ROOT / "runs" / "experiments"  # the units' run folders and claims (git ignores runs/)
SAFETY = 1.15  # a unit starts only if 1.15 x its estimated time fits in what is left of the budget
FIRST_GUESS_MINUTES = 5.0  # a unit's estimate before any unit of any arm has finished (--unit-minutes)


class PlanError(UserError):
    """A plan that cannot be run as written (shown as one line, exit 2)."""


@dataclass(frozen=True)
class Unit:
    arm: str
    seed: int
    fold: int  # index in the split's fold list (the same for every seed under LOSO)
    fold_name: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.fold_name.removeprefix("test=")).strip("_") or f"fold{self.fold}"

    def path(self, units: Path = UNITS) -> Path:
        return units / self.arm / f"seed-{self.seed}" / f"{self.slug}.json"


@dataclass
class Plan:
    """A plan file: what to train (arms x seeds x folds) and on what."""

    path: Path
    corpus: str
    data_dir: Optional[str]
    seeds: list
    folds: Optional[list]  # fold indices (0-based), None: every fold of the split
    common: list  # flags every arm gets
    arms: dict  # name -> flags
    units_dir: Path = UNITS  # where its unit files live: UNITS, or UNITS/<corpus> off ravdess-dev

    @staticmethod
    def home(corpus: str) -> Path:
        """A corpus's unit folder. Arms keep their names across corpora (hop20-epochs16 is the
        default on each), so each corpus has its own folder; ravdess-dev's, the first, is the top."""
        return UNITS if corpus == "ravdess" else UNITS / corpus

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        unknown = sorted(set(raw) - {"description", "corpus", "data_dir", "seeds", "folds", "args", "arms"})
        if unknown:
            raise PlanError(f"{path}: unknown keys {unknown}")
        arms = raw.get("arms")
        if not isinstance(arms, dict) or not arms:
            raise PlanError(f"{path}: 'arms' must map arm names to lists of fastser.train flags")
        for name, flags in arms.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise PlanError(f"{path}: arm name {name!r}: use letters, digits, '-', '_' and '.'")
            if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                raise PlanError(f"{path}: arm {name!r}: its flags must be a list of strings")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise PlanError(f"{path}: 'seeds' must be a non-empty list of integers")
        folds = raw.get("folds", "all")
        if folds == "all":
            folds = None
        elif isinstance(folds, list) and folds and all(isinstance(f, int) and f >= 1 for f in folds):
            folds = [f - 1 for f in folds]
        else:
            raise PlanError(f"{path}: 'folds' must be \"all\" or a list of fold numbers counted from 1")
        data_dir = raw.get("data_dir")
        if data_dir is not None and not os.path.isabs(data_dir):
            data_dir = str((ROOT / data_dir).resolve())  # relative to the repository, wherever it is run from
        corpus = raw.get("corpus", "synthetic")
        return cls(path, corpus, data_dir, seeds, folds, list(raw.get("args", [])), arms, cls.home(corpus))

    def flags(self, arm: str, seed: int, threads: Optional[int] = None) -> list:
        flags = ["--corpus", self.corpus, *self.common, *self.arms[arm], "--seed", str(seed), "--no-progress"]
        if self.data_dir:
            flags += ["--data-dir", self.data_dir]
        if threads:
            flags += ["--threads", str(threads)]
        return flags

    def config(self, arm: str, seed: int, threads: Optional[int] = None):
        """The arm's TrainConfig, parsed as the command line parses it."""
        from fastser.train import config_from_flags

        try:
            config = config_from_flags(self.flags(arm, seed, threads))
        except UserError as e:
            raise PlanError(f"{self.path}: arm {arm!r}: {e}") from None
        for key in ("seeds", "ablation", "max_folds", "resume", "out"):
            if config.settings()[key] not in (None, False):
                raise PlanError(f"{self.path}: arm {arm!r}: --{key.replace('_', '-')} has no place in a unit")
        return config

    def units(self, units_dir: Optional[Path] = None) -> list:
        """Every unit, in the order the queue takes them: seed, fold, arm."""
        names = self.fold_names(units_dir)
        chosen = range(len(names)) if self.folds is None else self.folds
        bad = [i + 1 for i in chosen if i >= len(names)]
        if bad:
            raise PlanError(f"{self.path}: folds {bad}: the split has {len(names)} folds")
        return [Unit(arm, seed, i, names[i]) for seed in self.seeds for i in chosen for arm in self.arms]

    def fold_names(self, units_dir: Optional[Path] = None) -> list:
        """The split's test folds, in order. Read from the corpus once and kept beside the units
        (`<corpus>-<split>-folds.json`), so that status and compare work where the corpus is not
        (a clone without ../shared, CI)."""
        from fastser.data import load_corpus, make_folds
        from fastser.training.inputs import corpus_options

        config = self.config(next(iter(self.arms)), self.seeds[0])
        d = config.data
        key = {
            "corpus": d.corpus,
            "data_dir": os.path.basename(os.path.normpath(d.data_dir)) if d.data_dir else None,
            "split": d.split,
            "classes": d.classes,
            **({"speakers": d.synthetic_speakers, "seed": self.seeds[0]} if d.corpus == "synthetic" else {}),
        }
        kept = (units_dir or self.units_dir) / f"{d.corpus}-{d.split}-folds.json"
        if d.split == "loso" and kept.exists():
            stored = read_unit(kept)
            if stored["key"] == key:
                return stored["folds"]
        corpus = load_corpus(d.corpus, d.data_dir, **corpus_options(config)).with_classes(d.classes)
        split = d.split or corpus.default_split
        if split != "loso":
            raise PlanError(f"{self.path}: the queue pairs folds by test speaker: use a leave-one-speaker-out split")
        names = [f.name for f in make_folds(corpus, split, n_folds=d.folds, seed=self.seeds[0])]
        write_unit(kept, {"key": key, "folds": names})
        return names


# -- one unit ---------------------------------------------------------------------------------
def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _commit() -> Optional[str]:
    """The checkout's commit, "+" when its tracked files differ from it (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fastser"], cwd=ROOT).returncode == 1
    except OSError:
        return None
    return (out.stdout.strip() + ("+" if dirty else "")) or None


class UnitRunner:
    """Trains units in this process; the feature tables are loaded once per set of inputs."""

    def __init__(self, plan: Plan, threads: Optional[int], scratch: Path):
        self.plan, self.threads, self.scratch = plan, threads, scratch
        self._tables: dict = {}
        self.load_seconds = 0.0
        # the code this process runs is the code it imports now, whatever is committed later
        self.commit = _commit()

    def _table(self, config, info):
        """The feature table of `config`'s inputs, loaded once per process (its seconds in
        self.load_seconds, which a unit's training seconds leave out)."""
        from fastser.training.inputs import load_table

        d, m, a = config.data, config.model, config.augment
        key = (d.corpus, d.classes, d.max_seconds, d.sample_rate, m.features, m.n_mels, m.hop_ms, m.prosody)
        key += (m.functionals, a.speed_perturb, a.noise, d.iemocap_subset)
        if d.corpus == "synthetic":
            key += (config.optim.seed, d.synthetic_speakers, d.synthetic_per_class)
        self.load_seconds = 0.0
        if key not in self._tables:
            t0 = time.perf_counter()
            self._tables[key] = load_table(config, info)
            self.load_seconds = time.perf_counter() - t0
        return self._tables[key]

    def run(self, unit: Unit) -> dict:
        import torch

        from lab.accuracy import machine_name
        from fastser.metrics import summarize
        from fastser.training.run import train_fold
        from fastser.training.scoring import FALLBACKS

        t0 = time.perf_counter()
        config = self.plan.config(unit.arm, unit.seed, self.threads)
        if self.threads:
            torch.set_num_threads(self.threads)
        out = self.scratch / unit.arm / f"seed-{unit.seed}" / unit.slug
        t_train = time.perf_counter()
        try:
            result, table = train_fold(config, unit.fold, out, self._table, unit.fold_name)
        except UserError as e:
            raise PlanError(str(e)) from None
        train_seconds = time.perf_counter() - t_train - self.load_seconds
        classes = table.corpus.classes
        y_true = np.asarray(result["y_true"])
        fallback = {
            level: summarize(y_true, np.asarray(result[f"y_pred_{level}_norm"]), classes)["ua"]
            for level in FALLBACKS
            if f"y_pred_{level}_norm" in result
        }
        utterances = [table.corpus.utterances[r].uid for r in result["test_rows"]]
        return {
            "arm": unit.arm,
            "flags": self.plan.arms[unit.arm],
            "seed": unit.seed,
            "fold": unit.fold,
            "fold_name": unit.fold_name,
            "test_speakers": result["test_speakers"],
            "classes": list(classes),
            "ua": result["ua"],
            "wa": result["wa"],
            "macro_f1": result["macro_f1"],
            "n_test": result["n_test"],
            "fallback_ua": fallback,
            "predictions": {
                "utterances": utterances,
                "y_true": result["y_true"],
                "y_pred": result["y_pred"],
                "probs": result["probs"],
                **{f"y_pred_{level}": result[f"y_pred_{level}_norm"] for level in fallback},
                **({"probs_training": result["probs_training_norm"]} if "probs_training_norm" in result else {}),
                # --functionals: the model alone beside the fused predictions, and the functionals' classifier
                **{key: result[name] for key, name in MODEL_ALONE.items() if name in result},
            },
            "settings": _jsonable(config.computed_settings()),
            "machine": machine_name(),
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 2),
            "train_seconds": round(train_seconds, 2),
            "commit": self.commit,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
        }


# a unit's prediction key -> the fold score it keeps, in units of a --functionals arm
MODEL_ALONE = {
    "y_pred_model": "y_pred_model",
    "probs_model": "probs_model",
    "y_pred_training_model": "y_pred_training_norm_model",
    "probs_training_model": "probs_training_norm_model",
    "probs_functionals": "probs_functionals",
}


def write_unit(path: Path, record: dict) -> None:
    """Atomically: a reader (or a later queue) sees no file or the whole of it."""
    from fastser._io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, separators=(",", ":"))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_unit(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the queue --------------------------------------------------------------------------------
def _claim(unit: Unit, claims: Path) -> Optional[int]:
    """Take the unit for this process: an exclusive lock on its claim file, held until the returned
    descriptor is closed (None: another process holds it). The system drops a lock when its process
    ends, so a dead worker's unit is free again; the file itself stays, so every claimant locks the
    same file (a pid file checked and replaced let two workers starting together both take it)."""
    path = claims / unit.arm / f"seed-{unit.seed}" / f"{unit.slug}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _epoch_cost(settings: dict) -> float:
    """Training FLOPs of one epoch, up to the corpus size: a step's FLOPs / batch x epochs."""
    from instruments.flops import training_step_flops

    return training_step_flops(settings) / settings["batch_size"] * settings["epochs"]


def estimate_seconds(
    plan: Plan,
    arm: str,
    units: Optional[Path] = None,
    threads: Optional[int] = None,
    first_guess: float = FIRST_GUESS_MINUTES,
) -> float:
    """A unit's expected time: the slowest of the arm's finished units (at this thread count where
    there are such), else another arm's scaled by training FLOPs, else `first_guess` minutes."""
    units = units or plan.units_dir

    def finished(name: str) -> list:
        records = [read_unit(p) for p in sorted((units / name).glob("seed-*/*.json"))]
        same = [r for r in records if threads is None or r.get("threads") == threads]
        return same or records

    own = finished(arm)
    if own:
        return max(r["seconds"] for r in own)
    mine = _epoch_cost(plan.config(arm, plan.seeds[0]).computed_settings())
    for other in plan.arms:
        done = finished(other)
        if done:
            return max(r["seconds"] for r in done) * mine / _epoch_cost(done[0]["settings"])
    return first_guess * 60


def check_settings(plan: Plan, unit: Unit, record: dict) -> None:
    """A unit file made with other settings than the arm now has is an error, never a silent mix."""
    expected = _jsonable(plan.config(unit.arm, unit.seed).computed_settings())
    where = unit.path(plan.units_dir)
    made = _jsonable(migrated(record["settings"]))  # a unit from before a setting existed made it so
    differ = sorted(k for k in set(expected) | set(made) if expected.get(k) != made.get(k))
    if differ:
        raise PlanError(
            f"{where}: made with other settings than arm {unit.arm!r} has now (differs in {differ}); "
            f"give the changed arm a new name"
        )


def run_queue(
    plan: Plan,
    budget_minutes: float,
    threads: Optional[int] = None,
    units_dir: Optional[Path] = None,
    scratch: Optional[Path] = None,
    max_units: Optional[int] = None,
    first_guess: float = FIRST_GUESS_MINUTES,
    log=print,
) -> list:
    """Train the plan's missing units, one at a time, while the budget allows; returns the paths written."""
    deadline = time.monotonic() + budget_minutes * 60
    units_dir = units_dir or plan.units_dir
    scratch = scratch or SCRATCH / plan.corpus
    runner, written = UnitRunner(plan, threads, scratch / "runs"), []
    todo = plan.units(units_dir)
    for unit in todo:
        path = unit.path(units_dir)
        if path.exists():
            check_settings(plan, unit, read_unit(path))
            continue
        if max_units is not None and len(written) >= max_units:
            break
        need = estimate_seconds(plan, unit.arm, units_dir, threads, first_guess) * SAFETY
        left = deadline - time.monotonic()
        if need > left:
            log(
                f"skip {unit.arm} seed {unit.seed} {unit.fold_name}: "
                f"needs about {need / 60:.1f} min, {left / 60:.1f} left"
            )
            continue
        claim = _claim(unit, scratch / "claims")
        if claim is None:
            continue  # another worker trains it
        try:
            if path.exists():  # finished by another worker between the check and the claim
                continue
            record = runner.run(unit)
            write_unit(path, record)
            written.append(path)
            log(
                f"{unit.arm} seed {unit.seed} {unit.fold_name}: UA {record['ua']:.3f} "
                f"(no enrollment {record['fallback_ua'].get('training', float('nan')):.3f}) "
                f"in {record['seconds']:.0f} s -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            )
        finally:
            os.close(claim)  # releases the claim
    return written


def _run_workers(args, plan: Plan) -> int:
    """--workers N: N processes of `run`, each with cores / N threads, claiming units one at a time."""
    per = args.threads or max(1, usable_cores() // args.workers)
    cmd = [
        sys.executable,
        "-m",
        "lab.experiments",
        "run",
        str(plan.path),
        "--budget-minutes",
        str(args.budget_minutes),
        "--threads",
        str(per),
        "--workers",
        "1",
        "--unit-minutes",
        str(args.unit_minutes),
    ]
    for flag, value in (
        ("--units-dir", args.units_dir),
        ("--scratch-dir", args.scratch_dir),
        ("--max-units", args.max_units),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    # Each worker writes to its own pipe and this process passes on whole lines: workers sharing
    # one stdout interleave their block-buffered writes, and a write over PIPE_BUF bytes can be cut
    # by the other worker's, splitting or gluing lines.
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(args.workers)]
    lock = threading.Lock()

    def relay(stream):
        for line in stream:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()

    relays = [threading.Thread(target=relay, args=(p.stdout,), daemon=True) for p in procs]
    for t in relays:
        t.start()
    codes = [p.wait() for p in procs]
    for t in relays:
        t.join()
    return max(codes)


def paired_summary(base, other, names: tuple = ("ua_base", "ua_other")) -> dict:
    """One figure per unit under two settings, paired: the two means (keyed by `names`), the mean
    difference per unit (other - base), how many units are better / worse, a paired t-test's p
    (NaN with one unit or no difference)."""
    from scipy.stats import ttest_rel

    base, other = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    delta = other - base
    return {
        "units": len(base),
        names[0]: float(base.mean()),
        names[1]: float(other.mean()),
        "delta_per_fold": float(delta.mean()),
        "better": int((delta > 0).sum()),
        "worse": int((delta < 0).sum()),
        "p": float(ttest_rel(other, base).pvalue) if len(base) > 1 and delta.any() else float("nan"),
    }


def paired_cells(summary: dict) -> str:
    """A paired_summary's last three table cells: Δ UA per fold, better / worse, p."""
    s = summary
    return f"{100 * s['delta_per_fold']:+.1f} | {s['better']} / {s['worse']} | {s['p']:.3f} |"


def kept_results(folder: Path) -> list:
    """The result files a lab study keeps in `folder` (--write), in name order."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def keep_result(folder: Path, name: str, result: dict) -> Path:
    """Writes a lab study's result as folder/name.json; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


# -- reading the units ------------------------------------------------------------------------
def load_units(plan: Plan, units_dir: Optional[Path] = None) -> dict:
    """{(arm, seed, fold_name): record} of the plan's units that have a file."""
    units_dir = units_dir or plan.units_dir
    found = {}
    for unit in plan.units(units_dir):
        path = unit.path(units_dir)
        if path.exists():
            record = read_unit(path)
            check_settings(plan, unit, record)
            found[(unit.arm, unit.seed, unit.fold_name)] = record
    return found


def pooled_ua(records: list, level: Optional[str] = None, metric: str = "ua") -> float:
    """UA (or another of fastser.metrics.summarize's metrics) over the utterances of `records`
    pooled, as a full run's metrics.json scores its folds; `level`: the predictions with other
    statistics ("training", "utterance", "enroll1", ...)."""
    from fastser.metrics import summarize

    key = "y_pred" if level is None else f"y_pred_{level}"
    if any(key not in r["predictions"] for r in records):
        return float("nan")
    y_true = np.concatenate([r["predictions"]["y_true"] for r in records])
    y_pred = np.concatenate([r["predictions"][key] for r in records])
    return summarize(y_true, y_pred, records[0]["classes"])[metric]


def arm_result(plan: Plan, arm: str, units_dir: Optional[Path] = None) -> Optional[dict]:
    """An arm's result as a full run of its seeds would report it, from its units, once every planned
    unit is in (else None): UA and WA pooled over each seed's folds, mean and std over the seeds
    ("ua_mean", "ua_std", "wa_mean", ...; "training_norm_ua_*": the training speakers' statistics;
    "model_ua_*", "model_training_ua_*": a fused arm's model alone, with and without enrollment),
    and the units' training seconds per seed ("unit_seconds_per_seed", each unit on one thread)."""
    found = load_units(plan, units_dir)
    units = [u for u in plan.units(units_dir) if u.arm == arm]
    if not units or any((arm, u.seed, u.fold_name) not in found for u in units):
        return None
    out = {"seeds": [str(s) for s in plan.seeds], "folds": len({u.fold_name for u in units})}
    per_seed = {s: [found[(arm, u.seed, u.fold_name)] for u in units if u.seed == s] for s in plan.seeds}
    measures = [("ua", None, "ua"), ("wa", None, "wa"), ("training_norm_ua", "training", "ua")]
    if all("y_pred_model" in r["predictions"] for rs in per_seed.values() for r in rs):  # a fused arm
        measures += [("model_ua", "model", "ua"), ("model_training_ua", "training_model", "ua")]
    for name, level, metric in measures:
        values = [pooled_ua(records, level, metric) for records in per_seed.values()]
        out[f"{name}_mean"], out[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    out["unit_seconds_per_seed"] = float(np.mean([sum(r["seconds"] for r in rs) for rs in per_seed.values()]))
    return out


def compare(plan: Plan, arms: Optional[list] = None, units_dir: Optional[Path] = None) -> str:
    """Each arm against the first, on the (seed, test speaker) pairs both have: a markdown table."""
    from scipy.stats import ttest_rel

    arms = arms or list(plan.arms)
    unknown = [a for a in arms if a not in plan.arms]
    if unknown:
        raise PlanError(f"{plan.path}: no arm {unknown[0]!r} (arms: {', '.join(plan.arms)})")
    found = load_units(plan, units_dir)
    planned = {(u.seed, u.fold_name) for u in plan.units(units_dir)}
    base = arms[0]
    # the predictions a unit keeps beside its own: other statistics, and a fused arm's model alone
    levels = {
        "training": "training statistics",
        "utterance": "utterance statistics",
        "enroll1": "enroll1 statistics",
        "model": "model alone",
        "training_model": "model alone, training statistics",
    }
    lines = [
        f"**{plan.path.stem}** ({plan.corpus}): each arm against `{base}` on the (seed, test speaker) pairs "
        "both have; UA pooled over a seed's folds, mean ± std over seeds; Δ per fold: mean, better / worse, "
        "paired t-test p",
        "",
        "| arm | pairs | missing | UA % | UA % base | Δ UA per fold | better / worse | p | "
        + " | ".join(f"UA % {text} (base)" for text in levels.values())
        + " | minutes per fold (base) |",
        "|---|---:|---:|---:|---:|---:|---|---:|" + "---:|" * len(levels) + "---:|",
    ]
    for arm in arms:
        pairs = sorted(k for k in planned if (arm, *k) in found and (base, *k) in found)
        missing = sum((arm, *k) not in found for k in planned)
        if not pairs:
            lines.append(f"| {arm} | 0 | {missing} |" + " |" * (6 + len(levels)))
            continue

        def by_seed(name: str, level: Optional[str] = None) -> str:
            values = [
                pooled_ua([found[(name, s, f)] for (s2, f) in pairs if s2 == s], level)
                for s in sorted({s for s, _ in pairs})
            ]
            mean, std = 100 * float(np.mean(values)), 100 * float(np.std(values))
            return "" if math.isnan(mean) else f"{mean:.1f}" + (f" ± {std:.1f}" if len(values) > 1 else "")

        delta = np.array([found[(arm, *k)]["ua"] - found[(base, *k)]["ua"] for k in pairs])
        p = float("nan")  # a paired test needs two pairs
        if len(pairs) > 1:
            p = ttest_rel([found[(arm, *k)]["ua"] for k in pairs], [found[(base, *k)]["ua"] for k in pairs]).pvalue
        minutes = np.mean([found[(arm, *k)]["seconds"] for k in pairs]) / 60
        minutes_base = np.mean([found[(base, *k)]["seconds"] for k in pairs]) / 60
        cells = [f"{by_seed(arm, lv)} ({by_seed(base, lv)})" for lv in levels]
        lines.append(
            f"| {arm} | {len(pairs)} | {missing} | {by_seed(arm)} | {by_seed(base)} | {100 * delta.mean():+.1f} | "
            f"{int((delta > 0).sum())} / {int((delta < 0).sum())} | "
            f"{'' if arm == base or math.isnan(p) else f'{p:.3f}'} | "
            + " | ".join(cells)
            + f" | {minutes:.1f} ({minutes_base:.1f}) |"
        )
    return "\n".join(lines)


def status(plan: Plan, units_dir: Optional[Path] = None, threads: Optional[int] = None) -> str:
    found = load_units(plan, units_dir)
    lines = []
    for arm in plan.arms:
        units = [u for u in plan.units(units_dir) if u.arm == arm]
        done = [u for u in units if (arm, u.seed, u.fold_name) in found]
        left = len(units) - len(done)
        eta = estimate_seconds(plan, arm, units_dir, threads) * left / 60
        lines.append(f"{arm}: {len(done)} of {len(units)} units done; about {eta:.0f} min of training left")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the plan's missing units inside a time budget")
    r.add_argument("plan")
    r.add_argument("--budget-minutes", type=float, required=True, help="start no unit that would end after this")
    r.add_argument("--threads", type=int, help="torch threads per process (default: cores / workers)")
    r.add_argument(
        "--workers",
        type=int,
        help="processes claiming units (default: one per core, each with one thread: on 2 cores two "
        "1-thread processes train 1.2x the epochs of one 2-thread process, docs/accuracy.md)",
    )
    r.add_argument("--max-units", type=int, help="stop after this many units")
    r.add_argument(
        "--unit-minutes",
        type=float,
        default=FIRST_GUESS_MINUTES,
        help="a unit's estimated time while no arm of the plan has a finished unit",
    )
    r.add_argument("--units-dir", help=argparse.SUPPRESS)
    r.add_argument("--scratch-dir", help=argparse.SUPPRESS)
    s = sub.add_parser("status", help="units done and left per arm")
    s.add_argument("plan")
    s.add_argument("--units-dir", help=argparse.SUPPRESS)
    c = sub.add_parser("compare", help="paired comparison of the arms on the units that exist")
    c.add_argument("plan")
    c.add_argument("--arms", nargs="+", help="the base arm first (default: the plan's arms, in order)")
    c.add_argument("--units-dir", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan.load(args.plan)
    units_dir = Path(args.units_dir) if args.units_dir else plan.units_dir
    if args.command == "compare":
        print(compare(plan, args.arms, units_dir))
    elif args.command == "status":
        print(status(plan, units_dir))
    elif (args.workers or usable_cores()) > 1:
        args.workers = args.workers or usable_cores()
        return _run_workers(args, plan)
    else:
        threads = args.threads or usable_cores()
        written = run_queue(
            plan,
            args.budget_minutes,
            threads,
            units_dir,
            scratch=Path(args.scratch_dir) if args.scratch_dir else None,
            max_units=args.max_units,
            first_guess=args.unit_minutes,
            log=lambda line: print(line, flush=True),
        )
        print(f"{len(written)} units written; " + status(plan, units_dir, threads).replace("\n", "; "), flush=True)
    return 0


def cli(argv=None) -> int:
    from fastser.cli import run_cli

    return run_cli(main, "lab.experiments", argv)


if __name__ == "__main__":
    sys.exit(cli())
