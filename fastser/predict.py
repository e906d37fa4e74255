"""Predict emotions: `python -m fastser.predict AUDIO... --checkpoint runs/<ts>/ [--segments] [--format json|csv]`.

Uses the model a training run kept last (the best epoch of its last fold), with that run's
feature configuration and normalisation. A recording up to the run's --max-seconds (8 s by
default) is scored whole, exactly as the run's test utterances were. A longer one is cut into
windows of the training crop (--train-seconds, 3 s) with half a window of hop, scored in batches
and averaged (weighted by window length) into one prediction for the file; `--segments` also
prints the per-window timeline. Long recordings are read and resampled block by block, so memory
stays bounded for files of hours.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import soxr
import torch

from fastser.audio import AudioError, info, load, stream
from fastser.cli import ArgumentParser, prog_name, run_cli
from fastser.errors import UserError
from fastser.distributed import parse_device
from fastser.normalization import Normalizer, utterance_stats
from fastser.checkpoints import build_model, finished_model, load_checkpoint

MIN_SECONDS = 0.5  # below this a clip holds less than a syllable: the prediction is flagged unreliable
SILENT_DBFS = -60.0  # RMS level (dB re full scale) below which a recording is flagged near-silent
MIN_ENROLL_SECONDS = 1.0  # usable enrollment audio below this: too few frames for a speaker's statistics


class PredictWarning(UserWarning):
    """Something that makes predictions doubtful (enrollment audio left out, a model that never heard
    speech); the command line prints each as one "warning:" line."""


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}


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


class Predictor:
    """A trained model ready to score audio.

    Predictor(checkpoint, device="cpu", batch_size=32, enroll=None)
    `checkpoint` may be a list: the models (e.g. one per --seeds run) are averaged, each window's
    class probabilities the mean of theirs (a soft-vote ensemble); they must share their classes,
    features, input normalisation and windows.
    predict(x, sr=None) -> Prediction, or a list of them for a list: `x` a path, a 1-D array or
    tensor of mono samples (at `sr`, default the model's `self.sr`; resampled with soxr otherwise),
    or a list of those (short clips are scored together, `batch_size` at a time);
    predict_file(path) -> Prediction; predict_waveform(samples, sr=None) -> Prediction;
    probabilities(samples, sr=None) -> (classes,) tensor. Inference only (no autograd).

    Input statistics follow the run's --normalize: "corpus" uses the training statistics stored in
    the checkpoint; "speaker" uses the speaker's statistics from `enroll` (audio files of the same
    speaker, unlabelled; or call `enroll_speaker`), else the training speakers' pooled statistics
    stored in the checkpoint (the fallback whose accuracy the run reports as "training_norm": it
    measured about twice the accuracy of each clip's own statistics, "utterance_norm");
    "utterance" always each window's own.
    """

    def __init__(self, checkpoint, device: str = "cpu", batch_size: int = 32, enroll=None):
        paths = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        if not paths:
            raise UserError("no checkpoint given")
        checkpoints = [load_checkpoint(p) for p in paths]
        loaded = [finished_model(c) for c in checkpoints]
        configs = [c.get("config", {}) for c in checkpoints]
        self.spec, final = loaded[0]
        for path, (spec, _) in zip(paths[1:], loaded[1:]):
            for what in ("classes", "normalize", "train_seconds", "max_seconds"):
                if getattr(spec, what) != getattr(self.spec, what):
                    raise UserError(
                        f"checkpoint: {path} has {what} {getattr(spec, what)!r}, {paths[0]} has "
                        f"{getattr(self.spec, what)!r}: an ensemble needs models of the same setting"
                    )
            if spec.features.to_dict() != self.spec.features.to_dict():
                raise UserError(f"checkpoint: {path} was trained on other features than {paths[0]}")
        self.classes = list(self.spec.classes)
        self.features = self.spec.features
        self.sr = self.features.sr
        self.whole_seconds = self.spec.max_seconds  # scored whole, as the run's test utterances
        self.window_seconds = self.spec.train_seconds
        self.hop_seconds = self.window_seconds / 2
        self.batch_size = batch_size
        self.device = parse_device(device)
        self.trained_on = sorted({c.get("corpus") for c in configs if c.get("corpus")})
        if "synthetic" in self.trained_on:
            warnings.warn(
                "the model was trained on fastser's synthetic corpus (generated voiced tones, not "
                "speech): its predictions on real recordings mean nothing; train on a real corpus "
                "(README: Train)",
                PredictWarning,
                stacklevel=2,
            )
        self.models, self.norms = [], []  # one per checkpoint, each with its training statistics
        for spec, fin in loaded:
            model = build_model(spec)
            model.load_state_dict(fin["model"])
            self.models.append(model.to(self.device).eval())
            self.norms.append(Normalizer(**fin["norm"]).to(self.device) if spec.normalize != "utterance" else None)
        if enroll:
            self.enroll_speaker(enroll)

    def enroll_speaker(self, paths) -> bool:
        """Speaker statistics from unlabelled audio files of the speaker to be scored (runs trained
        with --normalize speaker); they replace the training statistics for every later prediction.

        Each file goes through the input's checks: an unreadable one is a UserError naming `enroll`
        and the file; one shorter than MIN_SECONDS or near-silent is left out (a PredictWarning).
        With less than MIN_ENROLL_SECONDS of usable audio in all, the training speakers' statistics
        stay (a PredictWarning). Returns whether the speaker's statistics are in use."""
        if self.spec.normalize != "speaker":
            raise UserError(
                f"--enroll needs a model trained with --normalize speaker; this one used "
                f"--normalize {self.spec.normalize}"
            )
        paths = list(paths)
        if not paths:
            raise UserError("enroll: no audio files")
        items, usable = [], 0.0
        for path in paths:
            try:
                y, _ = load(path, sr=self.sr)
            except AudioError as e:
                raise UserError(f"enroll: {e}") from None
            y = y[: int(self.whole_seconds * self.sr)]
            level = _Level()
            level.add(y)
            problems = audio_problems(level.seconds(self.sr), level.dbfs())
            if problems:
                warnings.warn(
                    f"--enroll: {path}: {'; '.join(problems)}: left out of the speaker's statistics",
                    PredictWarning,
                    stacklevel=2,
                )
                continue
            y = torch.from_numpy(y).to(self.device)
            feats, frames = self.features.extract(y[None], torch.tensor([y.shape[0]], device=self.device))
            items.append({k: x[0, :, : int(frames[0])].cpu() for k, x in feats.items()})
            usable += level.seconds(self.sr)
        if usable < MIN_ENROLL_SECONDS:
            warnings.warn(
                f"--enroll: {usable:.2g} s of usable audio is less than {MIN_ENROLL_SECONDS:g} s, too "
                f"little for a speaker's statistics: the training speakers' statistics are used instead",
                PredictWarning,
                stacklevel=2,
            )
            return False
        speaker = Normalizer.fit_items(items).to(self.device)
        self.norms = [speaker] * len(self.models)
        return True

    # -- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, clips: list) -> np.ndarray:
        """Clips (1-D float32 arrays) -> (n, classes) probabilities, one batch."""
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
        batch = torch.zeros(len(clips), int(lengths.max()))
        for i, c in enumerate(clips):
            batch[i, : len(c)] = torch.from_numpy(c)
        raw, frames = self.features.extract(batch.to(self.device), lengths.to(self.device))
        own = None
        probs = 0.0
        for model, norm in zip(self.models, self.norms):
            if norm is not None:
                feats = norm.apply(raw, frames)
            else:  # each window's own statistics
                if own is None:  # the same for every model: computed once
                    own = utterance_stats(raw, frames).apply(raw, frames, torch.arange(len(clips), device=self.device))
                feats = own
            probs = probs + torch.softmax(model(feats, frames).logits.float(), dim=1)
        return (probs / len(self.models)).cpu().numpy()

    def _windows(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple]:
        """(start sample, samples) windows over a stream of blocks: full windows every hop, then
        the tail past the last full window as a shorter final window."""
        win, hop = round(self.window_seconds * self.sr), round(self.hop_seconds * self.sr)
        buf, buf_start, covered = np.zeros(0, np.float32), 0, 0
        for block in blocks:
            buf = np.concatenate([buf, block])
            while len(buf) >= win:
                yield buf_start, buf[:win]
                covered = buf_start + win
                buf, buf_start = buf[hop:], buf_start + hop
        if buf_start + len(buf) > covered:
            yield buf_start, buf

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

    def _waveform(self, samples, sr) -> np.ndarray:
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
                f"samples given without sr: taken to be at the model's {self.sr} Hz; pass sr= to say their rate",
                stacklevel=3,
            )
        elif sr != self.sr:
            y = soxr.resample(y, sr, self.sr, quality="HQ").astype(np.float32, copy=False)
        return y

    def predict_waveform(self, samples, sr: Optional[int] = None, name: str = "<waveform>") -> Prediction:
        """Mono samples (NumPy or torch, 1-D) at `sr` (without it: the model's rate, `self.sr`, with
        a warning)."""
        y = self._waveform(samples, sr)
        level = _Level()
        level.add(y)
        if y.size <= self.whole_seconds * self.sr:
            return self._predict(name, iter([(0, y)]), level)
        return self._predict(name, self._windows([y]), level)

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

        return self._predict(path, self._windows(blocks()), level)

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
            y = self._waveform(item, sr)
            if y.size > self.whole_seconds * self.sr:
                results[i] = self.predict_waveform(y, self.sr)
            else:
                short.append((i, y))
        for start in range(0, len(short), self.batch_size):
            chunk = short[start : start + self.batch_size]
            for (i, y), probs in zip(chunk, self._score([y for _, y in chunk])):
                level = _Level()
                level.add(y)
                results[i] = Prediction(
                    f"<waveform {i}>",
                    self.classes,
                    probs,
                    [Segment(0.0, y.size / self.sr, probs)],
                    level.seconds(self.sr),
                    level.dbfs(),
                )
        return results


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


# ----------------------------------------------------------------------------- command line


def expand_inputs(items) -> tuple[list, list]:
    """Files, folders (searched recursively for audio files) and glob patterns -> (files, errors)."""
    files, errors = [], []
    for item in items:
        p = Path(item)
        if not item.strip():  # Path("") is the working directory: an empty argument is a mistake, not "."
            errors.append(f"{item!r}: an empty path (give a file, a folder or a pattern)")
        elif p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file())
            files += found
            if not found:
                errors.append(f"{item}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder")
        elif p.exists():
            files.append(str(p))
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            files += found
            if not found:
                errors.append(f"{item}: the pattern matches no file")
        else:
            errors.append(f"{item}: no such file")
    return files, errors


def _csv_rows(pred: Prediction, segments: bool) -> list:
    rows = (
        [(s.start, s.end, s.probabilities) for s in pred.segments]
        if segments
        else [(0.0, pred.duration, pred.probabilities)]
    )
    return [
        [pred.file, f"{a:.3f}", f"{b:.3f}", pred.classes[int(np.argmax(p))], *(f"{v:.4f}" for v in p)]
        for a, b, p in rows
    ]


def _text(pred: Prediction, segments: bool) -> str:
    order = lambda p: "  ".join(f"{pred.classes[i]} {p[i]:.2f}" for i in np.argsort(-p))  # noqa: E731
    lines = [
        f"{pred.file}: {pred.emotion}  ({order(pred.probabilities)})"
        + (f"  [{len(pred.segments)} windows over {pred.duration:.1f} s]" if len(pred.segments) > 1 else "")
    ]
    if segments:
        lines += [
            f"  {s.start:8.2f}-{s.end:8.2f} s  {pred.classes[int(np.argmax(s.probabilities))]:<10} "
            f"({order(s.probabilities)})"
            for s in pred.segments
        ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog=prog_name("fastser.predict"), description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
    )
    ap.add_argument(
        "inputs",
        nargs="+",
        metavar="AUDIO",
        help="audio files (any format soundfile reads), folders (searched recursively) or glob patterns",
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="a training run's folder or its checkpoint.pt; several (e.g. the seed-N folders of a "
        "--seeds run): their probabilities are averaged",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument(
        "--format",
        choices=("text", "json", "csv"),
        default="text",
        help="text: a line per file; json: one list; csv: a row per file or segment (default: text)",
    )
    ap.add_argument("--json", action="store_true", help="the same as --format json")
    ap.add_argument(
        "--segments",
        action="store_true",
        help="also the per-window timeline (start, end, emotion, probabilities) of each file",
    )
    ap.add_argument(
        "--enroll",
        nargs="+",
        metavar="AUDIO",
        default=None,
        help="unlabelled audio of the speaker being scored (files, folders or globs): speaker-level "
        "input statistics for models trained with --normalize speaker (the default)",
    )
    ap.add_argument("--batch-size", type=int, default=32, help="windows scored per batch (default: 32)")
    ap.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown for several files on a terminal)"
    )
    args = ap.parse_args(argv)
    if args.json:
        args.format = "json"
    if args.batch_size < 1:
        ap.error("--batch-size must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = prog_name("fastser.predict")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PredictWarning)
        predictor = Predictor(args.checkpoint, args.device, batch_size=args.batch_size)
        if args.enroll:
            enroll, enroll_errors = expand_inputs(args.enroll)
            if enroll_errors:
                raise UserError("--enroll: " + "; ".join(enroll_errors))
            try:
                predictor.enroll_speaker(enroll)
            except UserError as e:  # the library names its argument; the command line, its flag
                raise UserError(f"--{e}" if str(e).startswith("enroll: ") else str(e)) from None
    # said once, with the first prediction (a run that only fails keeps its one error line)
    notes = []
    for w in caught:
        if issubclass(w.category, PredictWarning):
            notes.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not args.enroll and predictor.spec.normalize == "speaker":
        notes.append(
            "no --enroll audio: the training speakers' statistics stand in for this speaker's, which "
            "costs this kind of model much of its accuracy (README: Results); give --enroll with "
            "unlabelled audio of the speaker"
        )
    files, errors = expand_inputs(args.inputs)
    if not files:
        raise UserError("; ".join(errors) if errors else "no audio files given")
    for e in errors:
        print(f"{prog}: error: {e}", file=sys.stderr)
    status = 2 if errors else 0
    results = []
    writer = None
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", "start", "end", "emotion", *predictor.classes])
    iterator = files
    if len(files) > 1 and not args.no_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="predicting", unit="file", file=sys.stderr, disable=None, leave=False)
    for path in iterator:
        try:
            pred = predictor.predict_file(path)
        except AudioError as e:  # one bad file does not stop the others; the exit status says so
            print(f"{prog}: error: {e}", file=sys.stderr)
            status = 2
            continue
        for note in notes:
            print(f"{prog}: warning: {note}", file=sys.stderr)
        notes.clear()
        for w in pred.warnings():
            print(f"{prog}: warning: {path}: {w}", file=sys.stderr)
        if args.format == "json":
            results.append(pred.to_dict(args.segments))
        elif writer is not None:
            writer.writerows(_csv_rows(pred, args.segments))
        else:
            print(_text(pred, args.segments), flush=True)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    return status


def cli(argv=None) -> int:
    """`fastser-predict` / `python -m fastser.predict`: exit 0, or 2 with one line naming a bad input."""
    return run_cli(main, "fastser.predict", argv)


if __name__ == "__main__":
    sys.exit(cli())
