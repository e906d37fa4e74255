"""A training run, end to end: the process settings, its experiments (folds, seeds or the ablation)
and the seeds' summary, with the settings of a fastser.config.TrainConfig; its folder is
run_folder.py's, its corpus, features and folds inputs.py's. Nothing here sees the command line
(fastser.train is the command line).

    metrics = train(config)                     # what `python -m fastser.train` runs
    record, table = train_fold(config, 0, out)  # one fold of it, bit for bit (the experiment queue's unit)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastser import distributed as fdist
from fastser.checkpoints import SETTINGS_FILE, load_checkpoint, write_settings
from fastser.cli import prog_name
from fastser.config import SCHEMA_VERSION, TrainConfig
from fastser.data import check_classes
from fastser.errors import UserError
from fastser.threads import free_threads
from fastser.training.console import log, result
from fastser.training.experiment import Experiment
from fastser.training.graphed import cuda_graph_refusal
from fastser.training.inputs import feature_set, load_table, split_folds
from fastser.training.run_folder import with_out_dir
from fastser.training.reports import (
    metrics_of,
    run_cost,
    seed_ensemble,
    write_ablation,
    write_metrics,
    write_reports,
)

ABLATION = {"ce_only": (False, False), "center": (True, False), "recon": (False, True), "center+recon": (True, True)}


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `out` is the run's folder (what --resume continues)."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out


def train(config: TrainConfig) -> dict:
    """Train and test the experiment `config` describes: every fold of its split, once per seed
    with `seeds`, or the four objectives with `ablation`.

    Args:
        config (TrainConfig): every setting (fastser.config); the corpus-dependent defaults
            (epochs, patience, validation) are filled in. `run.out` is the run folder (default
            runs/<timestamp>/; a folder that holds a run is refused: use `run.resume`).

    Returns:
        dict: the metrics written to `<out>/metrics.json`: "wa", "ua", "macro_f1" (pooled over the
        folds' test speakers), "folds" (per test fold), the no-enrollment scores ("training_norm",
        "utterance_norm", "enroll<k>_norm" with speaker statistics), "threads", "seconds", ...;
        with `seeds` their mean and std ("ua_mean", "ua_std", ...) and "seed_ensemble".

    Raises:
        UserError: a setting out of range (`TrainConfig.problems`), a corpus that cannot be read,
            an unusable device, a folder that holds a run.

    Device: `run.device` (default: cuda if available); on the CPU the thread count is `run.threads`
    or the cores free when the run starts (fastser.threads), and the result repeats bit for bit for
    a seed at one thread count and processor.

    Example:
        >>> from fastser.config import TrainConfig
        >>> from fastser.train import train
        >>> metrics = train(TrainConfig().replace(corpus="synthetic", epochs=2, out="runs/try"))
        >>> metrics["ua"]  # doctest: +SKIP
    """
    config = config.resolved()
    problems = config.problems()
    if problems:
        raise UserError(problems[0])  # what the command line refuses, the library refuses too
    threads = torch.get_num_threads()
    chosen, why = config.run.threads, None
    if chosen is None and "OMP_NUM_THREADS" not in os.environ and _on_cpu(config.run.device):
        chosen, why = free_threads()  # torch's one per core collapses when another process holds one
    if chosen:
        torch.set_num_threads(chosen)
    if why and "busy" in why:
        log(why, config.run.no_progress)
    try:
        with deterministic_mode(config.run.deterministic), repeatable_cpu_kernels():
            info = fdist.setup(config.run.device)
            try:
                metrics = _main(config, info)
            except BaseException:
                fdist.teardown(info)
                raise
            fdist.teardown(info, finished=True)
            return metrics
    finally:
        torch.set_num_threads(threads)  # main() may be called from a notebook or a test


def train_fold(config: TrainConfig, fold: int, out, table_for=None, fold_name=None) -> tuple:
    """One fold of the run `config` describes, trained and tested exactly as `train(config)` trains
    it (the same split, seeds, batches and weights, bit for bit): the experiment queue's unit.

    Args:
        config (TrainConfig): the run's settings (its corpus-dependent defaults are filled in).
        fold (int): the fold's index in the split's folds.
        out: the fold's folder (its checkpoint is written there).
        table_for (callable, optional): (config, info) -> the feature table; default load_table
            (a caller training several folds passes one that keeps its tables).
        fold_name (str, optional): the name the fold must have (a UserError if the split differs).

    Returns:
        (the fold's result record, as Experiment.run_fold gives it; the feature table).
    """
    config = config.resolved()
    with deterministic_mode(config.run.deterministic), repeatable_cpu_kernels():
        info = fdist.setup(config.run.device)
        table = (table_for or load_table)(config, info)
        folds = split_folds(config, table)
        if fold_name is not None and folds[fold].name != fold_name:
            raise UserError(f"fold {fold + 1} is {folds[fold].name}, expected {fold_name}")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        experiment = Experiment(config, info, table, folds, out, feature_set(config, table.feats))
        return experiment.run_fold(fold), table


def _on_cpu(device: "str | None") -> bool:
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")


@contextlib.contextmanager
def repeatable_cpu_kernels():
    """oneDNN's deterministic attribute, on for every run: oneDNN may accumulate with atomics in
    some of its CPU convolution, matmul and normalisation kernels, which makes two runs of one
    command differ at the same thread count (seen on an Intel Xeon, where --deterministic, which
    also sets it, made six of six runs identical). On the AMD EPYC measured it changed neither the
    bits nor the time of ten training steps. The previous setting comes back afterwards."""
    before = torch.backends.mkldnn.deterministic
    torch.backends.mkldnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.mkldnn.deterministic = before


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Everything a run needs to be bit-identical for a seed on one device: cuBLAS's fixed workspace
    (read when cuBLAS starts, so set before any CUDA work), deterministic cuDNN algorithms without
    benchmarking, and torch's deterministic mode, which also raises on any op that has no
    deterministic kernel. The center loss gets deterministic=True from the objective. The previous
    settings come back afterwards (main() may be called from a notebook or a test)."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def _main(config: TrainConfig, info) -> dict:
    config = with_out_dir(config, info)
    out = Path(config.run.out)
    try:
        return _train(config, info, out)
    except BaseException as e:
        if info.is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            raise RunInterrupted(out) from e  # the command line's Ctrl-C line names the folder
        raise


def _train(config: TrainConfig, info, out: Path) -> dict:
    t0 = time.perf_counter()
    data, optim, objective, run_opts = config.data, config.optim, config.objective, config.run
    why = cuda_graph_refusal(run_opts, info, info.device)
    if why and info.is_main and (run_opts.cuda_graph or (run_opts.cuda_graph is None and info.device.type == "cuda")):
        log(f"no CUDA graph ({why}): the training step runs eagerly", run_opts.no_progress)
    table = load_table(config, info)
    split = data.split or table.corpus.default_split
    folds = split_folds(config, table)
    warnings = check_classes(table.corpus, folds, optim.validation)
    shared = [f.name for f in folds if not f.val_speaker_disjoint]
    if shared and optim.validation:
        warnings.append(
            f"{table.corpus.name} has too few speakers for a speaker-disjoint validation set in "
            f"{len(shared)} of {len(folds)} folds: early stopping there uses held-out utterances of "
            f"training speakers (flagged per fold in metrics.json)"
        )
    if info.is_main:
        for w in warnings:
            print(f"{prog_name('fastser.train')}: warning: {w}", file=sys.stderr)
    if info.is_main and not (run_opts.resume and (out / SETTINGS_FILE).is_file()):
        write_settings(
            out,
            {**{k: v for k, v in config.settings().items() if k not in ("out", "resume")}, "schema": SCHEMA_VERSION},
        )
    if info.is_main:
        log(
            f"{table.corpus.summary()} | split {split}: {_count(len(folds), 'fold')} | device {info.device}"
            f" x{info.world_size} | out {out}",
            run_opts.no_progress,
        )

    features = feature_set(config, table.feats)
    fold_results = {}  # run folder -> its folds' test results (for the seed ensemble)

    def experiment(sub: Path, run_config: TrainConfig, run_folds=folds) -> dict:
        if info.is_main:
            sub.mkdir(parents=True, exist_ok=True)
        run = Experiment(run_config, info, table, run_folds, sub, features)
        resume = Path(run_opts.resume) if run_opts.resume else None
        if resume is not None:
            inside = sub.relative_to(out) if sub != out else ""
            path = resume if resume.is_file() else resume / inside / "checkpoint.pt"
            if path.exists():
                run.resume_from(load_checkpoint(path, finished=False))
            elif sub == out and info.is_main:
                # stopped before its first checkpoint: nothing was trained, so it starts again with
                # the settings it was started with (the printed resume command always works)
                log(f"{out}: no epoch had finished; training starts from the beginning", run_opts.no_progress)
        metrics = metrics_of(run, run.run())
        write_reports(run, metrics)
        if info.is_main and sub != out:  # the run folder's own is written once, at the end
            write_metrics(sub, metrics)
        fold_results[sub] = run.fold_results
        return metrics

    if optim.seeds:
        # one whole experiment per seed (its own folds' order, weights and batches), then mean +- std
        per_seed = {}
        for seed in optim.seeds:
            seed_folds = split_folds(config, table, seed)
            per_seed[seed] = experiment(out / f"seed-{seed}", config.replace(seed=seed), seed_folds)
        metrics = seed_summary(per_seed, time.perf_counter() - t0)
        ensemble = seed_ensemble([fold_results[out / f"seed-{seed}"] for seed in optim.seeds], table.corpus.classes)
        if ensemble:
            metrics["seed_ensemble"] = ensemble
        if info.is_main:
            result(
                f"{len(per_seed)} seeds: "
                + "  ".join(
                    f"{k} {metrics[k + '_mean']:.3f} +- {metrics[k + '_std']:.3f}" for k in ("wa", "ua", "macro_f1")
                )
                + (f"; their models averaged (soft vote): UA {ensemble['ua']:.3f}" if ensemble else "")
            )
    elif objective.ablation:
        results = {
            name: experiment(out / name, config.replace(no_center=not c, no_recon=not r))
            for name, (c, r) in ABLATION.items()
        }
        if info.is_main:
            write_ablation(out, results, config)
        metrics = results["center+recon"]
    else:
        metrics = experiment(out, config)
    total = time.perf_counter() - t0
    metrics["phase_seconds"] = {
        **{k: round(v, 3) for k, v in table.phase_seconds.items()},
        "training": round(total - sum(table.phase_seconds.values()), 3),
        "total": round(total, 3),
    }
    if info.is_main and not objective.ablation:  # an ablation's parts each have their own metrics.json
        write_metrics(out, metrics)
    if info.is_main:
        phases = metrics["phase_seconds"]
        result(
            f"WA {metrics['wa']:.3f}  UA {metrics['ua']:.3f}  macro-F1 {metrics['macro_f1']:.3f} over "
            f"{metrics['n_test']} test utterances ({_count(len(folds), 'fold')}); "
            f"skipped files: {metrics['skipped']['count']}; "
            f"{total:.1f} s (corpus {phases['corpus']:.1f}, features {phases['features']:.1f}, training and "
            f"testing {phases['training']:.1f}); artifacts in {out}"
        )
    return metrics


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def seed_summary(per_seed: dict, seconds: float) -> dict:
    """Mean and std (over seeds) of WA, UA and macro-F1; the pooled-over-folds figures of each seed.
    "wa"/"ua"/"macro_f1" are the means, so the summary reads like one run's metrics."""
    first = next(iter(per_seed.values()))
    out = {
        k: first[k]
        for k in (
            "corpus",
            "split",
            "features",
            "classes",
            "lambda_center",
            "lambda_recon",
            "n_test",
            "skipped",
            "device",
            "backends",
            "fastser_version",
        )
    }
    out["seeds"] = {
        str(s): {**{k: m[k] for k in ("wa", "ua", "macro_f1")}, "seconds": run_cost(m)} for s, m in per_seed.items()
    }
    for key in ("wa", "ua", "macro_f1"):
        values = np.array([m[key] for m in per_seed.values()])
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1) if len(values) > 1 else 0.0)
        out[key] = out[f"{key}_mean"]
    out["seconds"] = seconds
    return out
