"""WA (overall accuracy), UA (mean per-class recall), macro-F1 and the confusion matrix."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def summarize(y_true, y_pred, classes) -> dict:
    """UA averages the recall of the classes that occur in y_true (a class absent from a test fold
    has no recall); macro-F1 likewise."""
    cm = confusion_matrix(y_true, y_pred, len(classes))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(float)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    n = int(cm.sum())
    return {
        "n": n,
        "wa": float(tp.sum() / n) if n else 0.0,
        "ua": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(recall[i]) for i, c in enumerate(classes) if present[i]},
        "confusion": cm.tolist(),
    }
