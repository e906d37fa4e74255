"""A fold's test speakers scored: with their own speaker statistics (enrollment), and as predict
would score them without enough enrollment audio.

    scores = score_test_speakers(context, index, fold, model, norm)
"""

from __future__ import annotations

import numpy as np
import torch

from fastser.functionals import FunctionalsHead, fuse, score_speakers
from fastser.metrics import summarize
from fastser.normalization import Normalizer
from fastser.training.context import FoldContext
from fastser.training.trainer import seed_for

# input statistics a speaker-normalised model is also scored with, as predict would use them without
# enough enrollment audio: each utterance's own, the training speakers' pooled ones (saved with the
# model), or k random other clips of the test speaker ("enroll<k>", the same clips for every model)
ENROLLMENT_CLIPS = (1, 3, 10)
FALLBACKS = ("utterance", "training") + tuple(f"enroll{k}" for k in ENROLLMENT_CLIPS)


def score_test_speakers(context: FoldContext, index: int, fold, model, norm: Normalizer, batcher) -> tuple:
    """Scores a fold's test speakers with a trained model.

    Args:
        context: the fold's view of its experiment.
        index: the fold's index (draws the enrollment clips, the same for every seed and setting).
        fold: a fastser.data.Fold (`test` rows, `name`, `val_speaker_disjoint`).
        model: the trained model, in the state to test.
        norm: the training rows' pooled statistics (predict's fallback without enrollment).
        batcher: the fold's batcher, normalised as the run trains.

    Returns:
        (scores, test): `scores` as metrics.json keeps them per fold (rows, labels, predictions,
        probabilities rounded to 6 places, WA / UA / macro-F1, with --normalize speaker each
        fallback's predictions as "y_pred_<level>_norm" and the training statistics' probabilities
        as "probs_training_norm"); `test` the evaluation's arrays,
        embeddings included.
    """
    data = context.data
    test_rows = torch.from_numpy(fold.test)
    test = data.evaluate(model, batcher, test_rows, embeddings=True)
    tm = summarize(test["y_true"], test["y_pred"], data.classes)
    scores = {
        "fold": index,
        "name": fold.name,
        "val_speaker_disjoint": fold.val_speaker_disjoint,
        "test_speakers": sorted(set(data.table.corpus.speakers[fold.test].tolist())),
        "test_rows": test["rows"].tolist(),
        "y_true": test["y_true"].tolist(),
        "y_pred": test["y_pred"].tolist(),
        "probs": test["probs"].round(6).tolist(),
        "wa": tm["wa"],
        "ua": tm["ua"],
        "macro_f1": tm["macro_f1"],
        "n_test": tm["n"],
    }
    if context.config.data.normalize == "speaker":
        fallbacks = {"utterance": data.batcher(None, "utterance"), "training": data.new_batcher(norm)}
        groups = torch.zeros(data.table.frames.shape[0], dtype=torch.long)  # test row i -> group i
        groups[test_rows] = torch.arange(test_rows.shape[0])
        for k in ENROLLMENT_CLIPS:  # drawn by fold alone: every seed and setting gets the same clips
            clips = data.statistics.enrollment(test_rows, k, torch.Generator().manual_seed(seed_for(index, k, 17)))
            fallbacks[f"enroll{k}"] = data.new_batcher(clips, groups)
        for level in FALLBACKS:
            scored = data.evaluate(model, fallbacks[level], test_rows)
            scores[f"y_pred_{level}_norm"] = scored["y_pred"].tolist()
            if level == "training":  # predict's path without enrollment: its probabilities too
                scores["probs_training_norm"] = scored["probs"].round(6).tolist()
    return scores, test


def with_functionals(context: FoldContext, fold, scores: dict) -> tuple:
    """A fold's scores fused with the openSMILE functionals' classifier (fastser.functionals), fitted
    on every utterance of the other speakers.

    Args:
        context: the fold's view of its experiment; its table holds the functionals.
        fold: the fastser.data.Fold scored.
        scores: score_test_speakers's scores.

    Returns:
        (scores, head): the scores with the fused predictions, probabilities, WA / UA / macro-F1 in
        place of the model's (kept as "<key>_model"; the classifier's own probabilities as
        "probs_functionals"), each test speaker's functionals standardised with that speaker's
        statistics as the model's input is; with --normalize speaker the training statistics'
        "probs_training_norm" and "y_pred_training_norm" fused likewise (the functionals with the
        training speakers' statistics: predict without enrollment). `head` the fitted classifier.
    """
    data, config = context.data, context.config
    x = data.table.functionals
    speakers, labels = np.asarray(data.table.corpus.speakers), np.asarray(data.table.corpus.labels)
    rows = np.asarray(scores["test_rows"])
    train = ~np.isin(speakers, scores["test_speakers"])
    feature_set = config.model.functionals_set
    head = FunctionalsHead.fit(x[train], speakers[train], labels[train], len(data.classes), feature_set)
    own, pooled = score_speakers(head, x[rows], speakers[rows])
    if config.data.normalize != "speaker":  # no speaker statistics: the training-statistics classifier only
        own = pooled
    fused = fuse(np.asarray(scores["probs"]), own)
    tm = summarize(np.asarray(scores["y_true"]), fused.argmax(1), data.classes)
    scores = {**scores, **{f"{k}_model": scores[k] for k in ("y_pred", "probs", "wa", "ua", "macro_f1")}}
    scores.update(
        probs_functionals=own.round(6).tolist(),
        y_pred=fused.argmax(1).tolist(),
        probs=fused.round(6).tolist(),
        wa=tm["wa"],
        ua=tm["ua"],
        macro_f1=tm["macro_f1"],
    )
    if "probs_training_norm" in scores:
        fused = fuse(np.asarray(scores["probs_training_norm"]), pooled)
        scores["probs_training_norm_model"] = scores["probs_training_norm"]
        scores["y_pred_training_norm_model"] = scores["y_pred_training_norm"]
        scores["probs_training_norm"] = fused.round(6).tolist()
        scores["y_pred_training_norm"] = fused.argmax(1).tolist()
    return scores, head
