"""One fold: its training rows and statistics, its epochs (early stopping, a checkpoint after
each) and its test.

    fold = FoldTraining(context, fold_index, fold)   # builds (or restores) everything the fold trains
    result = fold.run()                              # epochs, then the test speakers scored

`context` (fastser.training.context.FoldContext) is all a fold sees of its experiment; the
experiment records the FoldResult it returns.
"""

from __future__ import annotations

import os
import time

import torch

from fastser.checkpoints import cpu_state
from fastser.data import CorpusError
from fastser.metrics import summarize
from fastser.normalization import Normalizer
from fastser.training.console import log
from fastser.training.context import FoldContext, FoldResult
from fastser.training.scoring import ENROLLMENT_CLIPS, score_test_speakers, with_functionals
from fastser.training.trainer import FoldTrainer, seed_for


def maybe_interrupt() -> None:
    """Test hook: FASTSER_INTERRUPT_AFTER_EPOCHS=N stops the process after N checkpointed epochs."""
    limit = os.environ.get("FASTSER_INTERRUPT_AFTER_EPOCHS")
    if limit is None:
        return
    maybe_interrupt.count = getattr(maybe_interrupt, "count", 0) + 1
    if maybe_interrupt.count >= int(limit):
        raise KeyboardInterrupt(f"interrupted after {limit} epochs (FASTSER_INTERRUPT_AFTER_EPOCHS)")


class FoldTraining:
    """One fold trained and tested (and restored from its checkpointed state when it was stopped
    part-way).

    Args:
        context: the fold's view of its experiment.
        index: the fold's index in the experiment.
        fold: a fastser.data.Fold: `train`, `val` and `test` rows, `name`.
    """

    def __init__(self, context: FoldContext, index: int, fold):
        self.context, self.index, self.fold = context, index, fold
        c, data = context.config, context.data
        for part in ("train", "val", "test"):
            if len(getattr(fold, part)) == 0:
                raise CorpusError(
                    f"{data.table.corpus.name}: fold {fold.name} has no {part} utterances "
                    f"(too few usable files for --split {c.data.split or data.table.corpus.default_split})"
                )
        self.train_rows = data.train_rows(fold)
        self.batcher = data.batcher(self.train_rows)
        # the training rows' statistics, saved with the model at every level: predict's own for
        # --normalize corpus; for the others a reference to compare fallbacks against
        self.norm = (
            self.batcher.norm
            if self.batcher.groups is None
            else Normalizer.fit(data.table.feats, data.table.frames, self.train_rows)
        )
        if c.augment.enrollment_dropout:
            norm, alternatives = data.statistics.mixed(
                self.train_rows, self.norm, seed_for(c.optim.seed, index, 13), ENROLLMENT_CLIPS
            )
            self.batcher.mix_statistics(norm, alternatives, c.augment.enrollment_dropout)
        self.trainer = FoldTrainer(context, index, self.batcher, self.train_rows)
        self.model, self.objective = self.trainer.model, self.trainer.objective
        averages = self.trainer.averages
        # with --ema the first average is validated, tested and saved; the trained weights and any
        # other average are tested beside it (metrics.json: "weights")
        self.kept = next(iter(averages.models().values())) if averages else self.model
        self.start_epoch, self.bad_epochs = 0, 0
        self.best = {"val_ua": -1.0, "epoch": -1, "model": None, "objective": None}
        if context.state is not None:
            self.trainer.load_state_dict(context.state)
            self.start_epoch, self.best = context.state["epoch"], context.state["best"]
            self.bad_epochs = context.state["bad_epochs"]

    def train_epoch(self, epoch: int) -> dict:
        return self.trainer.train_epoch(epoch)

    def run(self) -> FoldResult:
        """The fold's remaining epochs, each checkpointed through the context, then its test."""
        c, data, t = self.context.config, self.context.data, self.trainer
        for epoch in range(self.start_epoch, c.optim.epochs):
            if self.bad_epochs >= c.optim.patience:
                break
            t0 = time.perf_counter()
            totals = self.train_epoch(epoch)
            vm = {"ua": None, "wa": None}
            if c.optim.validation:
                val = data.evaluate(self.kept, self.batcher, torch.from_numpy(self.fold.val))
                vm = summarize(val["y_true"], val["y_pred"], data.classes)
            row = {
                "fold": self.index,
                "fold_name": self.fold.name,
                "epoch": epoch + 1,
                **totals,
                "val_ua": vm["ua"],
                "val_wa": vm["wa"],
                "lr": t.sched.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
            self._keep_if_best(epoch, vm["ua"])
            if self.context.info.is_main:
                val_text = f" val UA {vm['ua']:.3f}" if vm["ua"] is not None else ""
                log(
                    f"fold {self.index + 1} epoch {epoch + 1}: ce {row['ce']:.3f} center {row['center']:.2f} "
                    f"recon {row['recon']:.3f} train acc {row['train_acc']:.3f}{val_text} "
                    f"({row['seconds']:.1f}s)",
                    c.run.no_progress,
                )
            state = {"fold": self.index, "epoch": epoch + 1, **t.state_dict()}
            self.context.record_epoch(row, {**state, "best": self.best, "bad_epochs": self.bad_epochs})
            maybe_interrupt()
        return self.test()

    def _keep_if_best(self, epoch: int, val_ua) -> None:
        """Early stopping's bookkeeping; without validation speakers every epoch is the best so far
        (the last one is kept)."""
        if val_ua is None or val_ua > self.best["val_ua"]:
            self.best = {
                "val_ua": val_ua if val_ua is not None else -1.0,
                "epoch": epoch + 1,
                "model": cpu_state(self.kept),
                "objective": cpu_state(self.objective),
            }
            averages = self.trainer.averages
            if averages:
                others = {"trained": self.model, **averages.models()}
                self.best["others"] = {name: cpu_state(m) for name, m in others.items() if m is not self.kept}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def test(self) -> FoldResult:
        """The kept model on the test speakers (and, with --ema, the weights not kept beside it)."""
        best, fold, model, objective = self.best, self.fold, self.model, self.objective
        model.load_state_dict(best["model"])
        objective.load_state_dict(best["objective"])
        scores, test = score_test_speakers(self.context, self.index, fold, model, self.norm, self.batcher)
        head = None
        if self.context.data.table.functionals is not None:
            scores, head = with_functionals(self.context, fold, scores)
        val_ua = best["val_ua"] if self.context.config.optim.validation else None
        scores = {"fold": self.index, "name": fold.name, "best_epoch": best["epoch"], "val_ua": val_ua, **scores}
        if best.get("others"):
            scores["y_pred_weights"] = {}
            for name, state in best["others"].items():
                model.load_state_dict(state)
                scored = self.context.data.evaluate(model, self.batcher, torch.from_numpy(fold.test))
                scores["y_pred_weights"][name] = scored["y_pred"].tolist()
            model.load_state_dict(best["model"])
        centers = objective.center_loss.centers.detach().cpu().numpy() if objective.center_loss is not None else None
        if self.context.info.is_main:
            log(
                f"fold {self.index + 1}/{self.context.n_folds} {fold.name}: test WA {scores['wa']:.3f} "
                f"UA {scores['ua']:.3f} "
                + (
                    f"(best epoch {best['epoch']}, val UA {val_ua:.3f})"
                    if val_ua is not None
                    else f"(last epoch {best['epoch']}, no validation)"
                ),
                self.context.config.run.no_progress,
            )
        return FoldResult(
            scores=scores,
            embeddings={"embeddings": test["embeddings"], "labels": test["y_true"], "centers": centers},
            final={
                "model": best["model"],
                "objective": best["objective"],
                "norm": self.norm.state(),
                "fold": self.index,
                **({"functionals": head.to_checkpoint()} if head is not None else {}),
            },
        )
