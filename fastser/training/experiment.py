"""An experiment: every fold of one configuration, what they share and its checkpoint.

    experiment = Experiment(config, info, table, folds, out, features)
    experiment.resume_from(checkpoint)          # optional: continue a stopped run
    seconds = experiment.run()                  # each fold not done yet: fastser.training.fold.train_and_test
    experiment.fold_results, experiment.history # what reports read

The settings are a fastser.config.TrainConfig; nothing here sees the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from fastser import __version__
from fastser import distributed as fdist
from fastser.checkpoints import ModelSpec, build_model, save_checkpoint
from fastser.config import SCHEMA_VERSION, TrainConfig, migrated
from fastser.errors import UserError
from fastser.models import SERModel
from fastser.normalization import Normalizer
from fastser.ops import backends_in_use
from fastser.training.console import log
from fastser.training.context import FoldContext
from fastser.training.fold import train_and_test
from fastser.training.table import TrainingTable


def model_spec(config: TrainConfig, features, classes) -> ModelSpec:
    """The model a configuration trains (what a checkpoint needs to rebuild it)."""
    return ModelSpec(
        features,
        tuple(classes),
        width=config.model.width,
        embed_dim=config.model.embed_dim,
        reconstruct=config.objective.recon_weight > 0,
        train_seconds=config.optim.train_seconds,
        max_seconds=config.data.max_seconds,
        normalize=config.data.normalize,
        bin_stats=config.model.bin_stats,
        pooling=config.model.pooling,
        downsample=config.model.downsample,
        functionals_input=config.model.functionals_input,
    )


class Experiment:
    """Every fold of one configuration, resumable from its checkpoint.

    Args:
        config: the resolved settings (an ablation's parts and each seed are variants of it).
        info: this process's rank, world size and device.
        table: the feature table (fastser.data.cache) of the corpus.
        folds: the speaker-independent folds (fastser.data.Fold) to train and test.
        out: the run folder; the checkpoint is out / "checkpoint.pt".
        features: the model's input kinds (fastser.features.featureset.FeatureSet).

    `run()` -> seconds; `fold_results`, `history` and `last_fold_embeddings()` are what reports read.
    """

    def __init__(self, config: TrainConfig, info: fdist.DistInfo, table, folds, out: Path, features):
        self.config, self.info, self.table, self.folds, self.out = config, info, table, folds, out
        self.split = config.data.split or table.corpus.default_split
        self.classes = table.corpus.classes
        self.normalize = config.data.normalize
        self.spec = model_spec(config, features, self.classes)
        self.device = info.device
        self.ckpt_path = out / "checkpoint.pt"
        self.data = TrainingTable(config, info, table)
        self.history: list[dict] = []
        self.resumed = False  # continued from a checkpoint: this process's wall time covers only a part
        self.fold_results: list[dict] = []
        self.state: Optional[dict] = None  # an in-progress fold's state from a checkpoint
        self.last_test: Optional[dict] = None

    @property
    def lambda_center(self) -> float:
        return self.config.objective.center_weight

    @property
    def lambda_recon(self) -> float:
        return self.config.objective.recon_weight

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

    def new_model(self) -> SERModel:
        return build_model(self.spec).to(self.device, memory_format=torch.channels_last)  # oneDNN/cuDNN layout

    def _record_epoch(self, row: dict, fold_state: dict) -> None:
        self.history.append(row)
        self.save(fold_state)

    def run_fold(self, index: int) -> dict:
        """Trains and tests fold `index` (from its checkpointed state if it was stopped part-way),
        records it and checkpoints; -> its test scores."""
        state, self.state = self.state, None  # an in-progress state belongs to one fold, used once
        context = FoldContext(
            self.config,
            self.info,
            self.data,
            self.new_model,
            len(self.folds),
            self._record_epoch,
            state if state is not None and state["fold"] == index else None,
        )
        result = train_and_test(context, index, self.folds[index])
        self.fold_results.append(result.scores)
        self.last_test = result.embeddings
        self.save(None, final=result.final)
        return result.scores

    def run(self) -> float:
        """Trains the folds not done yet; returns the seconds it took."""
        t0 = time.perf_counter()
        done = {r["fold"] for r in self.fold_results}
        if self.resumed and all(i in done for i in range(len(self.folds))) and self.info.is_main:
            log(
                f"{self.out}: every fold was already trained; the results are rebuilt from its checkpoint",
                self.config.run.no_progress,
            )
        for i in range(len(self.folds)):
            if i not in done:
                self.run_fold(i)
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
        data = self.data
        batcher = data.batcher(None) if self.normalize != "corpus" else data.new_batcher(Normalizer(**fin["norm"]))
        test = data.evaluate(model, batcher, torch.from_numpy(self.folds[fin["fold"]].test), embeddings=True)
        centers = fin["objective"].get("center_loss.centers")
        return {
            "embeddings": test["embeddings"],
            "labels": test["y_true"],
            "centers": centers.numpy() if centers is not None else None,
        }
