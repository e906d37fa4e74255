"""The classic SER baseline on fastser's folds: `python -m fastser.baseline --corpus ravdess --data-dir PATH`.

openSMILE functionals (eGeMAPSv02, 88 features; ComParE_2016, 6373) per utterance, per-speaker
z-normalisation (each speaker's features standardised with that speaker's own utterances, labels
unused — the test speaker's too, as speaker normalisation is done in practice), and a class-balanced
SVM (linear, C = 0.01; RBF, C = 1) trained on each fold's training and validation speakers and
tested on its test speakers. The folds are exactly those of `python -m fastser.train` for the same
--corpus/--split/--folds/--seed, and metrics.json has the same format, so every results table can
show the baseline beside the model. openSMILE and scikit-learn come with fastser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fastser.audio import AudioError, load
from fastser.cli import ArgumentParser, prog_name, run_cli
from fastser.data import SPLITS, load_corpus, make_folds
from fastser.functionals import SETS, extract, speaker_znorm
from fastser.metrics import summarize

FEATURE_SETS = SETS
SVMS = {"linear": dict(kernel="linear", C=0.01), "rbf": dict(kernel="rbf", C=1.0, gamma="scale")}


def functionals(audio: list, feature_set: str, sr: int = 16000) -> np.ndarray:
    """(N, F) openSMILE functionals, one row per utterance."""
    return extract(audio, feature_set, sr)


def evaluate(x: np.ndarray, labels: np.ndarray, folds, svm: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Pooled test (y_true, y_pred) over the folds, and each fold's test rows."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    y_true, y_pred, per_fold = [], [], []
    for fold in folds:
        train = np.concatenate([fold.train, fold.val])
        model = make_pipeline(StandardScaler(), SVC(class_weight="balanced", **SVMS[svm]))
        model.fit(x[train], labels[train])
        pred = model.predict(x[fold.test])
        y_true.append(labels[fold.test])
        y_pred.append(pred)
        per_fold.append((fold, labels[fold.test], pred))
    return np.concatenate(y_true), np.concatenate(y_pred), per_fold


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog=prog_name("fastser.baseline"), description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
    )
    ap.add_argument("--corpus", required=True, help="emodb, ravdess, cremad, tess, iemocap, emovo (as fastser.train)")
    ap.add_argument("--data-dir", required=True, help="corpus root, in the layout the corpus ships in")
    ap.add_argument("--split", choices=SPLITS, default="loso", help="speaker-independent folds (default: loso)")
    ap.add_argument("--folds", type=int, default=5, help="number of folds for --split kfold (default: 5)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the folds, as in fastser.train (default: 0)")
    ap.add_argument(
        "--features",
        choices=(*FEATURE_SETS, "both"),
        default="egemaps",
        help="openSMILE functionals (default: egemaps)",
    )
    ap.add_argument("--svm", choices=(*SVMS, "both"), default="both", help="SVM kernel(s) (default: both)")
    ap.add_argument("--no-speaker-norm", action="store_true", help="skip the per-speaker z-normalisation")
    ap.add_argument("--out", default=None, help="output folder (default: runs/baseline-<corpus>/)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    corpus = load_corpus(args.corpus, args.data_dir)
    audio, kept, skipped = [], [], list(corpus.skipped)
    for u in corpus.utterances:
        try:
            audio.append(load(u.path, sr=16000)[0])
            kept.append(u)
        except AudioError as e:
            skipped.append((u.path, str(e)))
    corpus.utterances = kept
    folds = make_folds(corpus, args.split, n_folds=args.folds, seed=args.seed)
    speakers, labels = corpus.speakers, corpus.labels
    out = Path(args.out or f"runs/baseline-{args.corpus}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for fs in FEATURE_SETS if args.features == "both" else [args.features]:
        x = functionals(audio, fs)
        if not args.no_speaker_norm:
            x = speaker_znorm(x, speakers)
        for svm in SVMS if args.svm == "both" else [args.svm]:
            y_true, y_pred, per_fold = evaluate(x, labels, folds, svm)
            m = summarize(y_true, y_pred, corpus.classes)
            name = f"{fs}+{svm}-svm" + ("" if args.no_speaker_norm else "+speaker-znorm")
            folds_m = []
            for fold, yt, yp in per_fold:
                fm = summarize(yt, yp, corpus.classes)
                folds_m.append(
                    {"name": fold.name, "n_test": fm["n"], "wa": fm["wa"], "ua": fm["ua"], "macro_f1": fm["macro_f1"]}
                )
            results[name] = {
                "corpus": args.corpus,
                "split": args.split,
                "features": fs,
                "svm": svm,
                "speaker_norm": not args.no_speaker_norm,
                "classes": corpus.classes,
                "n_test": m["n"],
                "wa": m["wa"],
                "ua": m["ua"],
                "macro_f1": m["macro_f1"],
                "per_class_recall": m["per_class_recall"],
                "confusion": m["confusion"],
                "folds": folds_m,
                "skipped": {"count": len(skipped)},
            }
            print(
                f"{name}: WA {m['wa']:.3f}  UA {m['ua']:.3f}  macro-F1 {m['macro_f1']:.3f} "
                f"({m['n']} test utterances, {len(folds)} folds)",
                flush=True,
            )
    payload = {"baselines": results, "seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{time.perf_counter() - t0:.0f}s; metrics in {out / 'metrics.json'}")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, "fastser.baseline", argv)


if __name__ == "__main__":
    sys.exit(cli())
