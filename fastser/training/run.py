"""A training run, end to end: its folder, its corpus and features, and its experiments (folds, seeds
or the ablation), with the settings of a fastser.config.TrainConfig; nothing here sees the command
line (fastser.train is the command line).

    metrics = train(config)            # what `python -m fastser.train` runs
    table = load_table(config, info)   # the corpus and its features (cached on disk for real corpora)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastser import distributed as fdist
from fastser.checkpoints import SETTINGS_FILE, load_checkpoint, write_settings
from fastser.cli import prog_name
from fastser.config import SCHEMA_VERSION, TrainConfig
from fastser.data import check_classes, load_corpus, make_folds
from fastser.data.cache import Perturbation, build_feature_table, with_copies
from fastser.errors import UserError
from fastser.features.featureset import KINDS, FeatureSet, canonical_kind
from fastser.functionals import CLIP_KINDS, INPUT_KIND, SIZES, corpus_functionals, input_columns
from fastser.threads import free_threads
from fastser.training.console import log, result
from fastser.training.experiment import Experiment
from fastser.training.graphed import cuda_graph_refusal
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


def _with_out_dir(config: TrainConfig, info) -> TrainConfig:
    """The config with its run folder decided (and made): --out, the resumed run's folder, or
    runs/<timestamp>/; --resume A --out B continues A's copy in B."""
    out, resume = config.run.out, config.run.resume
    if resume is not None:
        res = Path(resume)
        folder = res if res.is_dir() else res.parent
        out = out or str(folder)
        if Path(out).resolve() != folder.resolve():
            if info.is_main:
                _fork_run(folder, Path(out))
            info.barrier()  # under torchrun the other ranks read the copy
            resume = out  # continued in the new folder; the original stays as it was
    elif out is not None and _holds_run(Path(out)):
        raise UserError(
            f"--out {out}: already holds a run; continue it with --resume {shlex.quote(out)}, "
            f"or give a new folder to --out"
        )
    if out is None:
        stamp = [dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if info.enabled:
            dist.broadcast_object_list(stamp, src=0)  # one folder for all ranks
        out = str(Path("runs") / stamp[0])
    if info.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
    return config.replace(out=out, resume=resume)


def _holds_run(folder: Path) -> bool:
    """A folder a run has written to (its settings, a checkpoint or its metrics, or a part's)."""
    return folder.is_dir() and any(
        next(folder.rglob(name), None) is not None for name in (SETTINGS_FILE, "checkpoint.pt", "metrics.json")
    )


def _fork_run(source: Path, target: Path) -> None:
    """--resume A --out B: B starts as a copy of A's checkpoints and settings (A is left untouched),
    so the continued run and everything it writes, checkpoint.pt included, are in B."""
    if target.exists() and any(target.rglob("checkpoint.pt")):
        raise UserError(
            f"--out {target}: already holds a run's checkpoint; give an empty or new folder to continue {source} in"
        )
    copied = 0
    for name in ("checkpoint.pt", SETTINGS_FILE):
        for path in sorted(source.rglob(name)):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied += 1
    if not copied:
        raise FileNotFoundError(f"--resume: no checkpoint in {source}")


def default_cache_dir() -> str:
    """Where generated corpora are kept between runs: $XDG_CACHE_HOME/fastser (~/.cache/fastser)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastser")


def corpus_options(config: TrainConfig) -> dict:
    """fastser.data.load_corpus's options for the corpus `config` names (the synthetic corpus's
    size and seed, IEMOCAP's subset)."""
    data = config.data
    if data.corpus == "synthetic":
        return {
            "seed": config.optim.seed,
            "n_speakers": data.synthetic_speakers,
            "per_class": data.synthetic_per_class,
            "sr": data.sample_rate,
            "cache_dir": None if data.no_cache else data.cache_dir or default_cache_dir(),
        }
    return {"subset": data.iemocap_subset} if data.corpus == "iemocap" else {}


def feature_set(config: TrainConfig, kinds) -> FeatureSet:
    """The model's frame features as `config` sets them (rate, log-mel bands, hop), for these kinds
    (a table's kinds: its functionals column, one per clip, is no frame feature and is left out)."""
    model = config.model
    return FeatureSet.paper(
        [k for k in kinds if k not in CLIP_KINDS], sr=config.data.sample_rate, n_mels=model.n_mels, hop_ms=model.hop_ms
    )


def load_table(config: TrainConfig, info):
    """The corpus's feature table for `config` (its `phase_seconds`: the corpus read or generated,
    the features computed or read from the cache)."""
    t0 = time.perf_counter()
    data, model = config.data, config.model
    kinds = list(KINDS) if model.features == "both" else [canonical_kind(model.features)]
    if model.prosody:
        kinds.append("prosody")
    corpus = load_corpus(data.corpus, data.data_dir, **corpus_options(config))
    corpus = corpus.with_classes(data.classes)
    corpus_seconds = time.perf_counter() - t0
    cache_dir = None
    if data.corpus != "synthetic" and not data.no_cache:
        cache_dir = data.cache_dir or os.path.join(data.data_dir, ".fastser-cache")
        if not os.access(os.path.dirname(os.path.abspath(cache_dir)) or ".", os.W_OK):
            cache_dir = os.path.join(tempfile.gettempdir(), "fastser-cache")
    build = dict(
        cache_dir=cache_dir,
        strict=data.strict,
        max_seconds=data.max_seconds,
        progress=info.is_main and not config.run.no_progress,
        is_builder=info.is_main,
        wait=info.barrier,
    )
    table = build_feature_table(corpus, feature_set(config, kinds), info.device, **build)
    if table.corpus.skipped and info.is_main:
        listing = "\n  ".join(f"{p}: {r}" for p, r in table.corpus.skipped[:50])
        more = f"\n  ... and {len(table.corpus.skipped) - 50} more" if len(table.corpus.skipped) > 50 else ""
        print(
            f"warning: skipped {len(table.corpus.skipped)} bad files (listed in metrics.json; --strict makes "
            f"them an error):\n  {listing}{more}",
            file=sys.stderr,
        )
    # training-only copies, appended after the originals (folds index only those)
    copies = [Perturbation("speed", s) for s in config.augment.speed_perturb or ()] + [
        Perturbation("noise", snr) for snr in config.augment.noise or ()
    ]
    table = with_copies(table, feature_set(config, kinds), info.device, copies, **build)
    if model.functionals_late:
        table.functionals = _functionals(table, config, cache_dir, info)
    elif model.functionals_input:  # one more input kind of the table: normalised, batched, fed like the others
        x = _functionals(table, config, cache_dir, info)
        expected = SIZES[model.functionals_input]
        if x.shape[1] != expected:
            raise UserError(
                f"openSMILE gave {x.shape[1]} {model.functionals_input} functionals a clip, the model "
                f"expects {expected} (another openSMILE version?)"
            )
        table.feats[INPUT_KIND] = input_columns(x)
    table.phase_seconds = {"corpus": corpus_seconds, "features": time.perf_counter() - t0 - corpus_seconds}
    return table


def _functionals(table, config: TrainConfig, cache_dir, info):
    """The corpus's openSMILE functionals; with a cache, rank 0 builds it and the others read it."""
    args = (table.corpus, config.model.functionals_set, config.data.sample_rate, config.data.max_seconds, cache_dir)
    if cache_dir is None:
        return corpus_functionals(*args)
    x = corpus_functionals(*args) if info.is_main else None
    info.barrier()
    return x if x is not None else corpus_functionals(*args)


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


def split_folds(config: TrainConfig, table, seed=None) -> list:
    """The run's test folds: its split (the corpus's own when unset) for `seed` (the run's when
    None), cut to its max_folds."""
    data = config.data
    split = data.split or table.corpus.default_split
    folds = make_folds(table.corpus, split, n_folds=data.folds, seed=config.optim.seed if seed is None else seed)
    return folds[: data.max_folds] if data.max_folds else folds


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
    config = _with_out_dir(config, info)
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
