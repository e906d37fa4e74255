"""Confusion matrix and embedding plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(confusion: np.ndarray, classes, path, title: str = "") -> None:
    cm = np.asarray(confusion, dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.8 * len(classes)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_embeddings(
    embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray, classes, path, title: str = ""
) -> None:
    """2-D PCA of the test embeddings (fitted on them), with the learned centers projected alike."""
    mean = embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    proj = (embeddings - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(classes):
        sel = labels == c
        ax.scatter(proj[sel, 0], proj[sel, 1], s=10, alpha=0.6, color=cmap(c % 10), label=name)
    if centers is not None and len(centers):
        cp = (centers - mean) @ vt[:2].T
        for c in range(len(classes)):
            ax.scatter(cp[c, 0], cp[c, 1], marker="X", s=160, color=cmap(c % 10), edgecolors="black", linewidths=1.2)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_title(title + ("  (X = learned centers)" if centers is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
