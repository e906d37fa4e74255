"""The feature table as training reads it: on the device when batches are built there, normalised
per level, scored in batches.

    data = TrainingTable(config, info, table)
    batcher = data.batcher(train_rows)                 # the run's --normalize level
    scores = data.evaluate(model, batcher, test_rows)  # predictions in the order of test_rows
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fastser import distributed as fdist
from fastser.config import TrainConfig, crop_frames
from fastser.normalization import Normalizer, TableStatistics
from fastser.training.batches import Batcher

EVAL_BATCH = 64


class TrainingTable:
    """What every fold of an experiment reads: the feature table, its normalisation statistics
    (made once, fastser.normalization.TableStatistics), batchers and evaluation.

    Args:
        config: the run's settings (normalisation level, crop length, validation, AMP).
        info: the process's place among ranks (fastser.distributed.DistInfo) and its device.
        table: a feature table (fastser.data.cache): `feats` {kind: (N, bins, T)}, `frames` (N,),
            `labels` (N,), `corpus`.
    """

    def __init__(self, config: TrainConfig, info: fdist.DistInfo, table):
        self.config, self.info, self.table = config, info, table
        self.device = info.device
        self.classes = table.corpus.classes
        self.statistics = TableStatistics(table)
        # on a GPU the feature table is moved there once and every batch is gathered on the device
        self.resident = self.device.type == "cuda"
        self.feats = {k: x.to(self.device) for k, x in table.feats.items()} if self.resident else table.feats

    def batcher(self, train_rows: Optional[torch.Tensor], level: Optional[str] = None) -> Batcher:
        """Batches normalised per `level` (default: the run's --normalize): "corpus" with the
        training rows' statistics, "speaker" / "utterance" with each row's own group's."""
        return self.new_batcher(*self.statistics.for_level(level or self.config.data.normalize, train_rows))

    def new_batcher(self, norm: Normalizer, groups: Optional[torch.Tensor] = None) -> Batcher:
        return Batcher(
            self.feats,
            self.table.frames,
            self.table.labels,
            norm,
            self.device,
            crop_frames(self.config.optim.train_seconds, self.config.model.hop_ms),
            groups,
            resident=self.resident,
            eval_bucket=EVAL_BATCH if self.resident else 1,  # static evaluation shapes on a GPU
        )

    def train_rows(self, fold) -> torch.Tensor:
        """The rows a fold trains on, sorted: its training speakers', and with --no-validation its
        validation speakers' too (the last epoch's model is then kept)."""
        rows = fold.train if self.config.optim.validation else np.concatenate([fold.train, fold.val])
        return torch.from_numpy(np.sort(rows))

    @torch.no_grad()
    def evaluate(self, model, batcher: Batcher, rows: torch.Tensor, embeddings: bool = False) -> dict:
        """Scores `rows` sharded over ranks (each row exactly once), gathered.

        Returns:
            dict of numpy arrays in the order of `rows`: "rows" (n,), "y_true" (n,), "y_pred" (n,),
            "probs" (n, classes) float32, "embeddings" (n, embed_dim) or None.
        """
        model.eval()
        rows = rows[torch.argsort(self.table.frames[rows], stable=True)]  # similar lengths batch together
        mine = fdist.shard(rows, self.info, pad=False)
        preds, probs, embs = [], [], []
        for start in range(0, len(mine), EVAL_BATCH):
            batch = batcher.batch(mine[start : start + EVAL_BATCH])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.run.amp):
                out = model(batch.feats, batch.frames)
            preds.append(out.logits.argmax(1))
            probs.append(out.logits.float().softmax(1))
            embs.append(out.embedding.float())
        pred = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
        prob = torch.cat(probs).cpu() if probs else torch.zeros(0, len(self.classes))
        emb = torch.cat(embs).cpu() if embs else torch.zeros(0, model.embed_dim)
        all_rows = fdist.gather_cat(mine, self.info)
        pred, prob = fdist.gather_cat(pred, self.info), fdist.gather_cat(prob, self.info)
        if embeddings:
            emb = fdist.gather_cat(emb, self.info)
        order = torch.argsort(all_rows)
        all_rows, pred = all_rows[order], pred[order]
        return {
            "rows": all_rows.numpy(),
            "y_true": self.table.labels[all_rows].numpy(),
            "y_pred": pred.numpy(),
            "probs": prob[order].numpy(),
            "embeddings": emb[order].numpy() if embeddings else None,
        }
