"""Predict emotions: `python -m fastser.predict AUDIO... --checkpoint runs/<ts>/ [--segments] [--format json|csv]`.

Uses the model a training run kept last (the best epoch of its last fold), with that run's
feature configuration and normalisation. A recording up to the run's --max-seconds (8 s by
default) is scored whole, exactly as the run's test utterances were. A longer one is cut into
windows of the training crop (--train-seconds, 3 s) with half a window of hop, scored in batches
and averaged (weighted by window length) into one prediction for the file; `--segments` also
prints the per-window timeline. Long recordings are read and resampled block by block, so memory
stays bounded for files of hours. Several files are read, featurised (openSMILE included) and
scored by one process per usable core, one thread each, short ones batched (`--workers`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from fastser.audio import AudioError
from fastser.cli import ArgumentParser, prog_name, run_cli
from fastser.errors import UserError
from fastser.predictor import Prediction, PredictWarning, Predictor, Segment, audio_problems

__all__ = ["Prediction", "PredictWarning", "Predictor", "Segment", "audio_problems", "expand_inputs", "main", "cli"]

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}


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
    ap.add_argument(
        "--adapt-batchnorms",
        action="store_true",
        help="with --enroll: the encoders' batch norms also re-estimate their statistics on the enrollment "
        "audio (test-time adaptation, no labels; docs/accuracy.md: Adapting to the speaker)",
    )
    ap.add_argument("--batch-size", type=int, default=32, help="windows scored per batch (default: 32)")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that read, extract (openSMILE included) and score the files, one thread each "
        "(default: the usable cores on the CPU, 1 on a GPU)",
    )
    ap.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown for several files on a terminal)"
    )
    args = ap.parse_args(argv)
    if args.json:
        args.format = "json"
    if args.batch_size < 1:
        ap.error("--batch-size must be positive")
    if args.workers is not None and args.workers < 1:
        ap.error("--workers must be positive")
    if args.adapt_batchnorms and not args.enroll:
        ap.error("--adapt-batchnorms needs --enroll: the batch norms adapt to the enrollment audio")
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
                predictor.enroll_speaker(enroll, args.adapt_batchnorms)
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
    iterator = predictor.predict_files(files, workers=args.workers)
    if len(files) > 1 and not args.no_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            iterator, total=len(files), desc="predicting", unit="file", file=sys.stderr, disable=None, leave=False
        )
    for path, pred in iterator:
        if isinstance(pred, AudioError):  # one bad file does not stop the others; the exit status says so
            print(f"{prog}: error: {pred}", file=sys.stderr)
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
