"""Speaker-independent, deterministic folds: no speaker is ever in two of train/val/test of a fold.

    loso     one fold per speaker (test = that speaker)
    session  one fold per recording session (IEMOCAP: 5 folds)
    kfold    k folds of whole speakers (grouped folds; CREMA-D, RAVDESS)
    holdout  a single fold: fixed test and validation speakers

In every fold a speaker-disjoint validation set is carved out of the training speakers for early
stopping and model selection (about `val_fraction` of them, at least one). Only where a corpus has
too few speakers for that (TESS: 2) does validation fall back to a stratified utterance sample of
the training speakers, and the fold says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fastser.data.base import Corpus, CorpusError

SPLITS = ("loso", "session", "kfold", "holdout")


@dataclasses.dataclass
class Fold:
    name: str
    train: np.ndarray  # utterance indices
    val: np.ndarray
    test: np.ndarray
    val_speaker_disjoint: bool = True


def _speaker_order(speakers, seed: int) -> list[str]:
    uniq = sorted(set(speakers))
    rng = np.random.default_rng(seed)
    return [uniq[i] for i in rng.permutation(len(uniq))]


def _fold(name, corpus: Corpus, test_speakers, val_fraction: float, seed: int) -> Fold:
    spk = corpus.speakers
    test_mask = np.isin(spk, list(test_speakers))
    rest = [s for s in _speaker_order(spk[~test_mask], seed) if s not in test_speakers]
    n_val = max(1, int(round(val_fraction * len(rest)))) if len(rest) >= 3 else 0
    if n_val:
        val_mask = np.isin(spk, rest[:n_val])
        return Fold(name, np.flatnonzero(~test_mask & ~val_mask), np.flatnonzero(val_mask), np.flatnonzero(test_mask))
    # too few speakers for a speaker-disjoint validation set: stratified sample of training utterances
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~test_mask)
    labels = corpus.labels[pool]
    val = np.concatenate(
        [rng.permutation(pool[labels == c])[: max(1, int(0.15 * (labels == c).sum()))] for c in np.unique(labels)]
    )
    return Fold(name, np.setdiff1d(pool, val), np.sort(val), np.flatnonzero(test_mask), val_speaker_disjoint=False)


def make_folds(
    corpus: Corpus,
    split: str,
    *,
    n_folds: int = 5,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    speakers = sorted(set(corpus.speakers.tolist()))
    if len(speakers) < 2:
        raise CorpusError(
            f"{corpus.name}: a speaker-independent split needs at least 2 speakers, found {len(speakers)}"
        )
    if split == "loso":
        return [_fold(f"test={s}", corpus, {s}, val_fraction, seed) for s in speakers]
    if split == "session":
        sessions = sorted({u.session for u in corpus.utterances if u.session is not None})
        if len(sessions) < 2 or any(u.session is None for u in corpus.utterances):
            raise CorpusError(f"{corpus.name} has no recording sessions; use --split loso, kfold or holdout")
        folds = []
        for sess in sessions:
            test_spk = {u.speaker for u in corpus.utterances if u.session == sess}
            folds.append(_fold(f"test={sess}", corpus, test_spk, val_fraction, seed))
        return folds
    order = _speaker_order(speakers, seed)
    if split == "kfold":
        k = min(n_folds, len(order))
        groups = [order[i::k] for i in range(k)]
        return [_fold(f"fold{i + 1}", corpus, set(g), val_fraction, seed) for i, g in enumerate(groups)]
    n_test = max(1, int(round(test_fraction * len(order))))
    return [_fold("holdout", corpus, set(order[:n_test]), val_fraction, seed)]


def check_classes(corpus: Corpus, folds: list[Fold], validating: bool) -> list[str]:
    """What makes a run's scores misleading, found before any training: a CorpusError for a corpus
    with fewer than two classes (every prediction would be right); warnings (returned) for a class
    that a fold's training speakers never show (that class cannot be learnt there) and for a test
    fold of one class (its UA is that class's recall alone)."""
    labels = corpus.labels
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        only = corpus.classes[present[0]] if present else "none"
        raise CorpusError(
            f"{corpus.name}: every usable utterance has the same emotion ({only}); emotion "
            f"recognition needs at least two classes (check the corpus folder or --classes)"
        )
    warnings = []
    for fold in folds:
        train = np.concatenate([fold.train, fold.val]) if not validating else fold.train
        trained = set(labels[train].tolist())
        missing = [corpus.classes[c] for c in present if c not in trained]
        if missing:
            warnings.append(
                f"fold {fold.name}: the training speakers have no {', '.join(missing)} utterances, "
                f"so the model cannot learn {'that class' if len(missing) == 1 else 'those classes'} "
                f"there"
            )
        test_classes = sorted(set(labels[fold.test].tolist()))
        if len(test_classes) == 1:
            warnings.append(
                f"fold {fold.name}: every test utterance is {corpus.classes[test_classes[0]]}, so "
                f"its UA is that one class's recall"
            )
    return warnings
