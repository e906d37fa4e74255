"""An experiment: every fold of one objective setting, its shared state and its checkpoint.

    experiment = Experiment(config, info, table, folds, split, out, lambda_center, lambda_recon, features)
    experiment.resume_from(checkpoint)          # optional: continue a stopped run
    seconds = experiment.run()                  # each fold not done yet: fastser.training.fold.FoldTraining
    experiment.fold_results, experiment.history # what reports read

The settings are a fastser.config.TrainConfig; nothing here sees the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastser import __version__
from fastser import distributed as fdist
from fastser.checkpoints import ModelSpec, build_model, save_checkpoint
from fastser.config import SCHEMA_VERSION, TrainConfig, migrated
from fastser.errors import UserError
from fastser.models import SERModel
from fastser.normalization import Normalizer, TableStatistics
from fastser.ops import backends_in_use
from fastser.training.batches import Batcher
from fastser.training.console import log
from fastser.training.fold import FoldTraining


class Experiment:
    """One experiment: every fold of one objective setting, resumable from its checkpoint.

    Experiment(config, info, table, folds, split, out, lambda_center, lambda_recon, features).run()
    -> seconds; `fold_results`, `history` and `last_test` (the last fold's test embeddings) are read
    by reports. Each fold is a FoldTraining (fastser.training.fold); this holds what they share: the
    settings, the feature table and its statistics, evaluation and the checkpoint.
    """

    def __init__(
        self,
        config: TrainConfig,
        info: fdist.DistInfo,
        table,
        folds,
        split: str,
        out: Path,
        lambda_center: float,
        lambda_recon: float,
        features,
    ):
        self.config, self.info, self.table, self.folds, self.split, self.out = config, info, table, folds, split, out
        self.lambda_center, self.lambda_recon = lambda_center, lambda_recon
        self.classes = table.corpus.classes
        self.normalize = config.data.normalize
        self.ema_decays = tuple(config.optim.ema or ())  # the first average is the model kept
        self.spec = ModelSpec(
            features,
            tuple(self.classes),
            width=config.model.width,
            embed_dim=config.model.embed_dim,
            reconstruct=lambda_recon > 0,
            train_seconds=config.optim.train_seconds,
            max_seconds=config.data.max_seconds,
            normalize=self.normalize,
            bin_stats=config.model.bin_stats,
            pooling=config.model.pooling,
            downsample=config.model.downsample,
        )
        self.device = info.device
        self.ckpt_path = out / "checkpoint.pt"
        self.history: list[dict] = []
        self.resumed = False  # continued from a checkpoint: this process's wall time covers only a part
        self.fold_results: list[dict] = []
        self.state: Optional[dict] = None  # an in-progress fold's state from a checkpoint
        self.last_test: Optional[dict] = None
        self.statistics = TableStatistics(table)  # speaker, utterance, enrollment: made once, shared by folds
        # on a GPU the feature table is moved there once and every batch is gathered on the device
        self.resident = self.device.type == "cuda"
        self.feats = {k: x.to(self.device) for k, x in table.feats.items()} if self.resident else table.feats

    # -- normalisation --------------------------------------------------------------------
    def batcher(self, train_rows: torch.Tensor, level: Optional[str] = None) -> Batcher:
        """Batches normalised per `level` (default: the run's --normalize): "corpus" with the
        training rows' statistics, "speaker"/"utterance" with each row's own group's."""
        level = level or self.normalize
        if level == "corpus":
            norm, groups = Normalizer.fit(self.table.feats, self.table.frames, train_rows), None
        else:
            norm, groups = self.statistics.groups(level)
        return self.new_batcher(norm, groups)

    def new_batcher(self, norm: Normalizer, groups: Optional[torch.Tensor] = None) -> Batcher:
        return Batcher(
            self.feats,
            self.table.frames,
            self.table.labels,
            norm,
            self.device,
            int(self.config.optim.train_seconds * 100),
            groups,
            resident=self.resident,
            eval_bucket=64 if self.resident else 1,
        )  # static evaluation shapes on a GPU

    # -- checkpoint ---------------------------------------------------------------------
    def checkpoint_config(self) -> dict:
        """The settings with what this experiment made of them (its loss weights, classes, features)."""
        a = self.config.settings()
        a.update(
            lambda_center=self.lambda_center,
            lambda_recon=self.lambda_recon,
            classes_list=self.classes,
            kinds=self.spec.features.kinds,
            version=__version__,
            world_size=self.info.world_size,
            backends=backends_in_use(self.device),
            feature_configs=self.spec.features.to_dict(),
        )
        return a

    def resume_from(self, ckpt: dict) -> None:
        """Continue from a checkpoint of this experiment: every setting that decides what it computes
        (those the checkpoint records) and the number of ranks must be the checkpoint's."""
        old, new = migrated(ckpt["config"]), self.checkpoint_config()
        for key in [k for k in self.config.computed_settings() if k in old] + ["world_size"]:
            made = old.get(key)
            if made != new.get(key):
                raise UserError(f"--resume: the checkpoint was made with {key}={made!r}, this run has {new.get(key)!r}")
        self.history = ckpt["history"]
        self.resumed = True
        self.fold_results = ckpt["fold_results"]
        self.state = ckpt.get("fold_state")

    def save(self, fold_state: Optional[dict], final: Optional[dict] = None) -> None:
        if not self.info.is_main:
            return
        payload = {
            "config": self.checkpoint_config(),
            "settings": self.config.settings(),
            "schema": SCHEMA_VERSION,
            "spec": self.spec.to_dict(),
            "history": self.history,
            "fold_results": self.fold_results,
            "fold_state": fold_state,
            "classes": self.classes,
            "kinds": self.spec.features.kinds,
            "version": __version__,
        }
        if final is not None:
            payload["final"] = final
        save_checkpoint(payload, self.ckpt_path)

    # -- what the folds share ------------------------------------------------------------
    def take_fold_state(self, index: int) -> Optional[dict]:
        """The checkpointed state of fold `index` stopped part-way, once (None for any other fold)."""
        state, self.state = self.state, None
        return state if state is not None and state["fold"] == index else None

    def new_model(self) -> SERModel:
        return build_model(self.spec).to(self.device, memory_format=torch.channels_last)  # oneDNN/cuDNN layout

    def validating(self) -> bool:
        """Early stopping on the fold's validation speakers (default), or (--no-validation) the
        validation speakers trained on too and the last epoch's model kept."""
        return self.config.optim.validation

    def train_rows(self, fold) -> torch.Tensor:
        rows = fold.train if self.validating() else np.concatenate([fold.train, fold.val])
        return torch.from_numpy(np.sort(rows))

    @torch.no_grad()
    def evaluate(self, model, batcher: Batcher, rows: torch.Tensor, embeddings: bool = False) -> dict:
        """Sharded over ranks (each row exactly once), gathered, returned in the order of `rows`."""
        model.eval()
        rows = rows[torch.argsort(self.table.frames[rows], stable=True)]  # similar lengths batch together
        mine = fdist.shard(rows, self.info, pad=False)
        preds, probs, embs = [], [], []
        for start in range(0, len(mine), 64):
            batch = batcher.batch(mine[start : start + 64])
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

    # -- every fold -----------------------------------------------------------------------
    def run(self) -> float:
        """Trains the folds not done yet; returns the seconds it took."""
        t0 = time.perf_counter()
        done = {r["fold"] for r in self.fold_results}
        if self.resumed and all(i in done for i in range(len(self.folds))) and self.info.is_main:
            log(
                f"{self.out}: every fold was already trained; the results are rebuilt from its checkpoint",
                self.config.run.no_progress,
            )
        for i, fold in enumerate(self.folds):
            if i not in done:
                FoldTraining(self, i, fold).run()
        return time.perf_counter() - t0

    def last_fold_embeddings(self) -> Optional[dict]:
        """The last fold's test embeddings (recomputed from the checkpoint after a resume that had
        nothing left to train)."""
        if self.last_test is not None:
            return self.last_test
        ckpt = torch.load(self.ckpt_path, weights_only=True) if self.ckpt_path.exists() else None
        if not ckpt or "final" not in ckpt:
            return None
        fin = ckpt["final"]
        model = self.new_model()
        model.load_state_dict(fin["model"])
        batcher = self.batcher(None) if self.normalize != "corpus" else self.new_batcher(Normalizer(**fin["norm"]))
        test = self.evaluate(model, batcher, torch.from_numpy(self.folds[fin["fold"]].test), embeddings=True)
        centers = fin["objective"].get("center_loss.centers")
        return {
            "embeddings": test["embeddings"],
            "labels": test["y_true"],
            "centers": centers.numpy() if centers is not None else None,
        }
