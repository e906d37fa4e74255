"""Score audio with a trained run: `Predictor(RUN).predict(x)` (the library behind `python -m fastser.predict`).

Uses the model a training run kept last (the best epoch of its last fold), with that run's
feature configuration and normalisation. A recording up to the run's --max-seconds (8 s by
default) is scored whole, exactly as the run's test utterances were. A longer one is cut into
windows of the training crop (--train-seconds, 3 s) with half a window of hop, scored in batches
and averaged (weighted by window length) into one prediction; its segments are the per-window
timeline. Long files are read and resampled block by block, so memory stays bounded for hours.

Input statistics follow the run's --normalize: "corpus" uses the training statistics stored in the
checkpoint; "speaker" uses the speaker's statistics from enrollment audio (files of the same
speaker, unlabelled; `Predictor(enroll=...)` or `enroll_speaker`), else the training speakers'
pooled statistics stored in the checkpoint (the fallback whose accuracy the run reports as
"training_norm"; models trained with enrollment dropout are trained for it); "utterance" always
each window's own.

A run trained with openSMILE functionals (`--functionals`, the default on real corpora) also
extracts each clip's (or window's) functionals and averages the probabilities of the classifier
kept in its checkpoint with the model's (fastser.functionals), standardised with the enrolled
speaker's functionals statistics, or without enrollment scored by its training-statistics classifier.
A run whose network reads them (`--functionals-fusion input`) gets each clip's functionals as one
more input, normalised like the others (the enrollment audio's statistics, else the training ones).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Iterable, Iterator, Optional

import numpy as np
import soxr
import torch

from fastser.audio import AudioError, info, load, stream
from fastser.checkpoints import build_model, finished_model, load_checkpoint
from fastser.distributed import parse_device
from fastser.errors import UserError
from fastser.features.featureset import FeatureSet
from fastser.functionals import INPUT_KIND, FunctionalsHead, extract, fuse, input_columns
from fastser.functionals import speaker_statistics as functional_statistics
from fastser.normalization import Normalizer, utterance_stats

MIN_SECONDS = 0.5  # below this a clip holds less than a syllable: the prediction is flagged unreliable
SILENT_DBFS = -60.0  # RMS level (dB re full scale) below which a recording is flagged near-silent
MIN_ENROLL_SECONDS = 1.0  # usable enrollment audio below this: too few frames for a speaker's statistics
FILES_PER_TASK = 8  # files a worker process takes at a time in predict_files: small enough to balance


class PredictWarning(UserWarning):
    """Something that makes predictions doubtful (enrollment audio left out, a model that never heard
    speech); the command line prints each as one "warning:" line."""


def audio_problems(seconds: float, rms_dbfs: float) -> list:
    """What makes audio a poor sample of speech (for a prediction or for enrollment): too short,
    near-silent."""
    out = []
    if seconds < MIN_SECONDS:
        out.append(f"{seconds:.3g} s is shorter than {MIN_SECONDS} s")
    if rms_dbfs < SILENT_DBFS:
        level = "digital silence" if math.isinf(rms_dbfs) else f"RMS {rms_dbfs:.0f} dBFS"
        out.append(f"near-silent ({level}; below {SILENT_DBFS:.0f} dBFS)")
    return out


@dataclasses.dataclass
class Segment:
    start: float  # seconds
    end: float
    probabilities: np.ndarray  # (classes,)


@dataclasses.dataclass
class Prediction:
    """One file: the aggregated prediction, its windows, and what makes it doubtful."""

    file: str
    classes: list
    probabilities: np.ndarray
    segments: list
    duration: float
    rms_dbfs: float

    @property
    def emotion(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def too_short(self) -> bool:
        return self.duration < MIN_SECONDS

    @property
    def near_silent(self) -> bool:
        return self.rms_dbfs < SILENT_DBFS

    def problems(self) -> list:
        return audio_problems(self.duration, self.rms_dbfs)

    def warnings(self) -> list:
        return [f"{p}: the prediction is unreliable" for p in self.problems()]

    def to_dict(self, segments: bool = False) -> dict:
        probs = lambda p: {c: round(float(v), 4) for c, v in zip(self.classes, p)}  # noqa: E731
        d = {
            "file": self.file,
            "emotion": self.emotion,
            "probabilities": probs(self.probabilities),
            "duration": round(self.duration, 3),
            "windows": len(self.segments),
            "too_short": self.too_short,
            "near_silent": self.near_silent,
            "warnings": self.warnings(),
        }
        if segments:
            d["segments"] = [
                {
                    "start": round(s.start, 3),
                    "end": round(s.end, 3),
                    "emotion": self.classes[int(np.argmax(s.probabilities))],
                    "probabilities": probs(s.probabilities),
                }
                for s in self.segments
            ]
        return d


class _Level:
    """Running RMS level of a stream, for the near-silence flag."""

    def __init__(self):
        self.sum_sq, self.n = 0.0, 0

    def add(self, y: np.ndarray) -> None:
        self.sum_sq += float(np.dot(y, y))  # float32 accumulation: ample for a level in dB, no copy
        self.n += y.size

    def seconds(self, sr: int) -> float:
        return self.n / sr

    def dbfs(self) -> float:
        ms = self.sum_sq / max(self.n, 1)
        return 10.0 * math.log10(ms) if ms > 0 else float("-inf")


class Predictor:
    """A trained model ready to score audio (inference only, no autograd).

    Args:
        checkpoint: a run folder or its checkpoint.pt, or a list of them: the models (e.g. one per
            --seeds run) are averaged, each window's probabilities the mean of theirs (soft vote);
            they must share classes, features, input normalisation and windows.
        device (str): "cpu", "cuda" or "cuda:N".  batch_size (int): short clips scored together.
        enroll: audio files of the speaker (unlabelled) whose statistics normalise the input of a
            --normalize speaker model (without them: the training speakers', module docstring).

    Methods: predict(x, sr=None) -> Prediction, a list for a list (x: a path, or 1-D mono samples
    at `sr`, default `self.sr`, resampled with soxr); predict_file(path); predict_waveform(samples,
    sr=None); probabilities(samples, sr=None) -> (classes,) float32 tensor.

    Example:
        >>> predictor = Predictor("runs/demo", enroll=["spk/a.wav", "spk/b.wav"])  # doctest: +SKIP
        >>> predictor.predict("clip.wav").emotion  # doctest: +SKIP
        'angry'
    """

    def __init__(
        self, checkpoint, device: str = "cpu", batch_size: int = 32, enroll=None, adapt_batchnorms: bool = False
    ):
        self.device = parse_device(device)
        self.spec, self.models, self.norms, self.heads, self.trained_on = load_models(checkpoint, self.device)
        self.functionals_speaker = None  # the enrolled speaker's functionals statistics (runs with --functionals)
        self.classes = list(self.spec.classes)
        self.features = self.spec.features
        self.sr = self.features.sr
        self.whole_seconds = self.spec.max_seconds  # scored whole, as the run's test utterances
        self.window_seconds = self.spec.train_seconds
        self.hop_seconds = self.window_seconds / 2
        self.batch_size = batch_size
        if "synthetic" in self.trained_on:
            warnings.warn(
                "the model was trained on fastser's synthetic corpus (generated voiced tones, not "
                "speech): its predictions on real recordings mean nothing; train on a real corpus "
                "(README: Train)",
                PredictWarning,
                stacklevel=2,
            )
        if enroll:
            self.enroll_speaker(enroll, adapt_batchnorms)

    def enroll_speaker(self, paths, adapt_batchnorms: bool = False) -> bool:
        """Speaker statistics from unlabelled audio files of the speaker to be scored (runs trained
        with --normalize speaker); they replace the training statistics for every later prediction.

        Each file goes through the input's checks: an unreadable one is a UserError naming `enroll`
        and the file; one shorter than MIN_SECONDS or near-silent is left out (a PredictWarning).
        With less than MIN_ENROLL_SECONDS of usable audio in all, the training speakers' statistics
        stay (a PredictWarning). With `adapt_batchnorms` the encoders' batch norms also re-estimate
        their statistics on the speaker's clips (adapt_batchnorms below). Returns whether the
        speaker's statistics are in use."""
        if self.spec.normalize != "speaker":
            raise UserError(
                f"--enroll needs a model trained with --normalize speaker; this one used "
                f"--normalize {self.spec.normalize}"
            )
        clips = enrollment_clips(paths, self.sr, self.whole_seconds)
        if clips is None:
            return False
        self.norms = [input_statistics(clips, self.features, self.device, self.spec.functionals_input)] * len(
            self.models
        )
        if self.heads:
            self.functionals_speaker = functional_statistics(extract(clips, self.heads[0].feature_set, self.sr))
        if adapt_batchnorms:
            for model, norm in zip(self.models, self.norms):
                adapt_batchnorms_to(model, norm, self.features, clips, self.device, self.spec.functionals_input)
        return True

    # -- scoring ------------------------------------------------------------------------
    def _score(self, clips: list) -> np.ndarray:
        probs = score(self.models, self.norms, self.features, clips, self.device, self.spec.functionals_input)
        return fuse_functionals(probs, clips, self.heads, self.functionals_speaker, self.sr) if self.heads else probs

    def _windows_of(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple]:
        return windows(blocks, round(self.window_seconds * self.sr), round(self.hop_seconds * self.sr))

    def _predict(self, name: str, windows: Iterator[tuple], level: "_Level") -> Prediction:
        segments, pending = [], []

        def flush():
            probs = self._score([w for _, w in pending])
            segments.extend(Segment(s / self.sr, (s + len(w)) / self.sr, p) for (s, w), p in zip(pending, probs))
            pending.clear()

        for start, samples in windows:
            pending.append((start, samples))
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        weights = np.array([s.end - s.start for s in segments])
        probs = (np.stack([s.probabilities for s in segments]) * weights[:, None]).sum(0) / weights.sum()
        probs = probs.astype(np.float32)  # the windows' dtype, as a batch of clips gives
        return Prediction(name, self.classes, probs, segments, level.seconds(self.sr), level.dbfs())

    def predict_waveform(self, samples, sr: Optional[int] = None, name: str = "<waveform>") -> Prediction:
        """Mono samples (NumPy or torch, 1-D) at `sr` (without it: the model's rate, `self.sr`, with
        a warning)."""
        y = mono_samples(samples, sr, self.sr)
        level = _Level()
        level.add(y)
        if y.size <= self.whole_seconds * self.sr:
            return self._predict(name, iter([(0, y)]), level)
        return self._predict(name, self._windows_of([y]), level)

    def predict_file(self, path) -> Prediction:
        path = str(path)
        seconds, _ = info(path)
        if seconds <= self.whole_seconds:
            y, _ = load(path, sr=self.sr)
            return self.predict_waveform(y, self.sr, name=path)
        level = _Level()

        def blocks():
            for block in stream(path, sr=self.sr, block_seconds=10.0):
                level.add(block)
                yield block

        return self._predict(path, self._windows_of(blocks()), level)

    def probabilities(self, samples, sr: Optional[int] = None) -> torch.Tensor:
        """(classes,) probabilities for mono samples at `sr` (default `self.sr`)."""
        return torch.from_numpy(self.predict_waveform(samples, sr).probabilities)

    def predict(self, x, sr: Optional[int] = None):
        """A path or mono samples (at `sr`) -> Prediction; a list of them -> a list of Predictions, in
        order. Clips up to the model's whole-clip length are scored together in batches (each exactly
        as alone: features and pooling use each clip's own frames); files and longer clips one by one."""
        if not isinstance(x, (list, tuple)):
            return self.predict_file(x) if isinstance(x, (str, os.PathLike)) else self.predict_waveform(x, sr)
        results, short = [None] * len(x), []
        for i, item in enumerate(x):
            if isinstance(item, (str, os.PathLike)):
                results[i] = self.predict_file(item)
                continue
            y = mono_samples(item, sr, self.sr)
            if y.size > self.whole_seconds * self.sr:
                results[i] = self.predict_waveform(y, self.sr)
            else:
                short.append((i, f"<waveform {i}>", y))
        for i, pred in self._predict_short(short):
            results[i] = pred
        return results

    def _predict_short(self, items: list) -> Iterator[tuple]:
        """(key, Prediction) of each (key, name, samples) clip up to the whole-clip length, scored
        together in batches of batch_size."""
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            for (key, name, y), probs in zip(chunk, self._score([y for _, _, y in chunk])):
                level = _Level()
                level.add(y)
                segments = [Segment(0.0, y.size / self.sr, probs)]
                yield key, Prediction(name, self.classes, probs, segments, level.seconds(self.sr), level.dbfs())

    def predict_files(self, paths, workers: Optional[int] = None) -> Iterator[tuple]:
        """Predictions of many files, in their order, on every core.

        Args:
            paths: audio files.
            workers (int, optional): processes that each read, extract (openSMILE included) and
                score their share of the files with one thread, the short ones batched; None: the
                usable cores on the CPU (one process on a GPU, or for a single file).

        Returns:
            an iterator of (path, Prediction or AudioError), in the order of `paths`: a file that
            cannot be read is its error, the others go on.
        """
        from fastser.threads import usable_cores

        paths = [str(p) for p in paths]
        if workers is None:
            workers = usable_cores() if self.device.type == "cpu" else 1
        chunks = [paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
        workers = max(1, min(workers, len(chunks)))
        if workers == 1:
            for chunk in chunks:
                yield from self._predict_chunk(chunk)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork shares the loaded model with the workers at no cost; elsewhere each gets a pickled copy
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(self,)) as pool:
            for results in pool.map(_predict_chunk_in_worker, chunks):
                yield from results

    def _predict_chunk(self, paths: list) -> list:
        """[(path, Prediction or AudioError)] of some files: those up to the whole-clip length
        scored in batches, longer ones window by window."""
        results, short = {}, []
        for path in paths:
            try:
                seconds, _ = info(path)
                if seconds <= self.whole_seconds:
                    y, _ = load(path, sr=self.sr)
                    short.append((path, path, y))
                else:
                    results[path] = self.predict_file(path)
            except AudioError as e:
                results[path] = e
        results.update(self._predict_short(short))
        return [(path, results[path]) for path in paths]


@torch.no_grad()
def score(
    models: list,
    norms: list,
    features: FeatureSet,
    clips: list,
    device: torch.device,
    functionals: Optional[str] = None,
) -> np.ndarray:
    """Clips (1-D float32 arrays at the features' rate) -> (n, classes) float32 probabilities, one
    batch: the mean of the models' softmax, each model's input normalised by its `norms` entry (None:
    each clip's own statistics). Every clip is scored as alone (features and pooling use its frames).
    `functionals`: the openSMILE set the models read as an input branch (--functionals-fusion input)."""
    lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = torch.from_numpy(c)
    raw, frames = features.extract(batch.to(device), lengths.to(device))
    if functionals:
        raw[INPUT_KIND] = input_columns(extract(clips, functionals, features.sr)).to(device)
    own = None
    probs = 0.0
    for model, norm in zip(models, norms):
        if norm is not None:
            feats = norm.apply(raw, frames)
        else:  # each window's own statistics
            if own is None:  # the same for every model: computed once
                own = utterance_stats(raw, frames).apply(raw, frames, torch.arange(len(clips), device=device))
            feats = own
        probs = probs + torch.softmax(model(feats, frames).logits.float(), dim=1)
    return (probs / len(models)).cpu().numpy()


def load_models(checkpoint, device: torch.device) -> tuple:
    """(spec, models, norms, heads, corpora) of one checkpoint or a list of them (an ensemble): the
    first one's ModelSpec, each model in eval mode on `device` with its training statistics (None
    where the run used each utterance's own), the functionals classifiers of runs trained with
    --functionals (fastser.functionals.FunctionalsHead; else none), and the corpora they were
    trained on. Models of an
    ensemble must share classes, features, input normalisation and windows (a UserError otherwise)."""
    paths = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    if not paths:
        raise UserError("no checkpoint given")
    checkpoints = [load_checkpoint(p) for p in paths]
    loaded = [finished_model(c) for c in checkpoints]
    configs = [c.get("config", {}) for c in checkpoints]
    first = loaded[0][0]
    for path, (spec, _) in zip(paths[1:], loaded[1:]):
        for what in ("classes", "normalize", "train_seconds", "max_seconds", "functionals_input"):
            if getattr(spec, what) != getattr(first, what):
                raise UserError(
                    f"checkpoint: {path} has {what} {getattr(spec, what)!r}, {paths[0]} has "
                    f"{getattr(first, what)!r}: an ensemble needs models of the same setting"
                )
        if spec.features.to_dict() != first.features.to_dict():
            raise UserError(f"checkpoint: {path} was trained on other features than {paths[0]}")
    heads = [FunctionalsHead.from_checkpoint(fin["functionals"]) if "functionals" in fin else None for _, fin in loaded]
    sets = {h.feature_set if h is not None else None for h in heads}
    if len(sets) > 1:
        raise UserError(
            "checkpoint: an ensemble's models must all fuse the same openSMILE functionals or none "
            f"(these use {sorted(str(s) for s in sets)})"
        )
    models, norms = [], []
    for spec, fin in loaded:
        model = build_model(spec)
        model.load_state_dict(fin["model"])
        models.append(model.to(device).eval())
        norms.append(Normalizer(**fin["norm"]).to(device) if spec.normalize != "utterance" else None)
    trained_on = sorted({c.get("corpus") for c in configs if c.get("corpus")})
    return first, models, norms, [h for h in heads if h is not None], trained_on


@torch.no_grad()
def fuse_functionals(probs: np.ndarray, clips: list, heads: list, speaker, sr: int) -> np.ndarray:
    """(n, classes) float32: the models' probabilities averaged with their functionals classifiers'
    (fastser.functionals; the mean over an ensemble's), the clips' functionals standardised with the
    enrolled speaker's statistics `speaker`, or scored by the training-statistics classifier (None)."""
    x = torch.from_numpy(extract(clips, heads[0].feature_set, sr))
    functionals = sum(head(x, speaker) for head in heads) / len(heads)
    return fuse(probs, functionals.numpy()).astype(np.float32)


def enrollment_clips(paths, sr: int, max_seconds: float) -> Optional[list]:
    """The usable enrollment audio: the first `max_seconds` of each file at `sr`, a file that is too
    short or near-silent left out (a PredictWarning); an unreadable one is a UserError. None (a
    PredictWarning) when less than MIN_ENROLL_SECONDS of it is usable."""
    paths = list(paths)
    if not paths:
        raise UserError("enroll: no audio files")
    clips = []
    for path in paths:
        try:
            y, _ = load(path, sr=sr)
        except AudioError as e:
            raise UserError(f"enroll: {e}") from None
        y = y[: int(max_seconds * sr)]
        level = _Level()
        level.add(y)
        problems = audio_problems(level.seconds(sr), level.dbfs())
        if problems:
            warnings.warn(
                f"--enroll: {path}: {'; '.join(problems)}: left out of the speaker's statistics",
                PredictWarning,
                stacklevel=3,
            )
            continue
        clips.append(y)
    usable = sum(len(y) for y in clips) / sr
    if usable < MIN_ENROLL_SECONDS:
        warnings.warn(
            f"--enroll: {usable:.2g} s of usable audio is less than {MIN_ENROLL_SECONDS:g} s, too little "
            f"for a speaker's statistics: the training speakers' statistics are used instead",
            PredictWarning,
            stacklevel=3,
        )
        return None
    return clips


@torch.no_grad()
def adapt_batchnorms_to(
    model: torch.nn.Module,
    norm,
    features: FeatureSet,
    clips: list,
    device: torch.device,
    functionals: Optional[str] = None,
) -> None:
    """Test-time adaptation to a speaker (AdaBN, Li et al. 2016): the running mean and variance of
    every batch norm in the model's encoders are re-estimated on the speaker's unlabelled clips,
    each clip passed alone (no padding enters them), their average over the clips kept; no weight
    changes and the rest of the model stays in evaluation mode. The result does not depend on the
    statistics before (a second speaker's adaptation starts afresh).

    Args:
        model: an SERModel in eval mode (changed in place).  norm: the input statistics the clips
            are normalised with (the speaker's, Normalizer).  features: the model's FeatureSet.
        clips (list): 1-D float32 arrays at the features' rate.  device: where the model is.
        functionals (str, optional): the openSMILE set the model reads as an input branch.
    """
    layers = [
        m
        for name, m in model.named_modules()
        if name.startswith("encoders.") and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    for m in layers:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        # momentum None: each clip's statistics weigh 1 / (clips so far), a plain average; a
        # loaded model may carry no batch count
        m.num_batches_tracked = torch.zeros((), dtype=torch.long, device=m.running_mean.device)
        m.momentum = None
        m.train()
    try:
        for clip in clips:
            score([model], [norm], features, [clip], device, functionals)
    finally:
        for m in layers:
            m.eval()


def input_statistics(
    clips: list, features: FeatureSet, device: torch.device, functionals: Optional[str] = None
) -> Normalizer:
    """A speaker's input statistics (the model's features; with `functionals`, the openSMILE set the
    model reads as a branch, one column per clip) from clips of their audio."""
    items = []
    columns = input_columns(extract(clips, functionals, features.sr)) if functionals else None
    for i, y in enumerate(clips):
        y = torch.from_numpy(y).to(device)
        feats, frames = features.extract(y[None], torch.tensor([y.shape[0]], device=device))
        items.append({k: x[0, :, : int(frames[0])].cpu() for k, x in feats.items()})
        if columns is not None:
            items[-1][INPUT_KIND] = columns[i]
    return Normalizer.fit_items(items).to(device)


def windows(blocks: Iterable[np.ndarray], win: int, hop: int) -> Iterator[tuple]:
    """(start sample, samples) windows of `win` samples every `hop` over a stream of blocks, then
    the tail past the last full window as a shorter final window."""
    buf, buf_start, covered = np.zeros(0, np.float32), 0, 0
    for block in blocks:
        buf = np.concatenate([buf, block])
        while len(buf) >= win:
            yield buf_start, buf[:win]
            covered = buf_start + win
            buf, buf_start = buf[hop:], buf_start + hop
    if buf_start + len(buf) > covered:
        yield buf_start, buf


def mono_samples(samples, sr: Optional[int], model_sr: int) -> np.ndarray:
    """Mono samples (NumPy or torch, 1-D or (1, n)) as float32 at `model_sr`: resampled with soxr
    from `sr`; without `sr` taken to be at `model_sr` (a warning). Empty, multi-channel or
    non-finite samples are a ValueError."""
    y = np.ascontiguousarray(torch.as_tensor(samples).detach().cpu().numpy(), dtype=np.float32)
    if y.ndim != 1 and not (y.ndim == 2 and 1 in y.shape):
        raise ValueError(f"expected mono samples (1-D), got an array of shape {tuple(y.shape)}")
    y = y.reshape(-1)
    if y.size == 0:
        raise ValueError("empty waveform")
    if not np.isfinite(y).all():  # on the host, where it is free (the device's features do not check)
        raise ValueError("the waveform contains NaN or Inf samples")
    if sr is None:
        warnings.warn(
            f"samples given without sr: taken to be at the model's {model_sr} Hz; pass sr= to say their rate",
            stacklevel=3,
        )
    elif sr != model_sr:
        y = soxr.resample(y, sr, model_sr, quality="HQ").astype(np.float32, copy=False)
    return y


_WORKER_PREDICTOR = None  # the Predictor a predict_files worker process scores with


def _start_worker(predictor: "Predictor") -> None:
    """A predict_files worker: one thread each (the workers fill the cores), the parent's predictor."""
    global _WORKER_PREDICTOR
    torch.set_num_threads(1)
    _WORKER_PREDICTOR = predictor


def _predict_chunk_in_worker(paths: list) -> list:
    return _WORKER_PREDICTOR._predict_chunk(paths)
