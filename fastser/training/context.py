"""What one fold reads from its experiment, and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastser import distributed as fdist
from fastser.config import TrainConfig
from fastser.training.table import TrainingTable


@dataclass
class FoldContext:
    """A fold's whole view of its experiment (fastser.training.fold.train_and_test reads nothing else).

    Args:
        config: the run's resolved settings; the loss weights are
            `config.objective.center_weight` / `recon_weight`.
        info: this process's rank, world size and device.
        data: the feature table, its statistics, batchers and evaluation.
        new_model: builds the experiment's model (fastser.checkpoints.ModelSpec) on the device.
        n_folds: how many folds the experiment has (for progress text).
        record_epoch: keeps an epoch's history row and checkpoints the fold's state:
            `record_epoch(row, state)`.
        state: the fold's checkpointed state when it was stopped part-way, else None.
    """

    config: TrainConfig
    info: fdist.DistInfo
    data: TrainingTable
    new_model: Callable[[], torch.nn.Module]
    n_folds: int
    record_epoch: Callable[[dict, dict], None]
    state: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return self.info.device


@dataclass
class FoldResult:
    """A trained and tested fold, for the experiment to record.

    Args:
        scores: the test speakers' scores (fold name, rows, labels, predictions, probabilities,
            UA/WA, the no-enrollment fallbacks' predictions), as metrics.json and the queue read them.
        embeddings: the test embeddings, their labels and the learned centers (numpy), for plots.
        final: the kept model's and objective's states, the normalisation statistics and the fold
            index: the finished checkpoint's "final" entry.
    """

    scores: dict
    embeddings: dict
    final: dict
