"""One fold: its training rows and statistics, its epochs (early stopping, a checkpoint after
each) and its test.

    result = train_and_test(context, fold_index, fold)   # its epochs, then its test speakers scored

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


def train_and_test(context: FoldContext, index: int, fold) -> FoldResult:
    """One fold trained and tested: its training rows and statistics, its remaining epochs (early
    stopping, each checkpointed through the context; restored from the checkpointed state when the
    fold was stopped part-way), then its test speakers scored.

    Args:
        context: the fold's view of its experiment.
        index: the fold's index in the experiment.
        fold: a fastser.data.Fold: `train`, `val` and `test` rows, `name`.

    Returns:
        the FoldResult the experiment records.
    """
    c, data = context.config, context.data
    for part in ("train", "val", "test"):
        if len(getattr(fold, part)) == 0:
            raise CorpusError(
                f"{data.table.corpus.name}: fold {fold.name} has no {part} utterances "
                f"(too few usable files for --split {c.data.split or data.table.corpus.default_split})"
            )
    train_rows = data.train_rows(fold)
    batcher = data.batcher(train_rows)
    # the training rows' statistics, saved with the model at every level: predict's own for
    # --normalize corpus; for the others a reference to compare fallbacks against
    norm = batcher.norm if batcher.groups is None else Normalizer.fit(data.table.feats, data.table.frames, train_rows)
    if c.augment.enrollment_dropout:
        seed = seed_for(c.optim.seed, index, 13)
        mixed, alternatives = data.statistics.mixed(train_rows, norm, seed, ENROLLMENT_CLIPS)
        batcher.mix_statistics(mixed, alternatives, c.augment.enrollment_dropout)
    trainer = FoldTrainer(context, index, batcher, train_rows)
    # with --ema the first average is validated, tested and saved; the trained weights and any
    # other average are tested beside it (metrics.json: "weights")
    kept = next(iter(trainer.averages.models().values())) if trainer.averages else trainer.model
    start_epoch, bad_epochs = 0, 0
    best = {"val_ua": -1.0, "epoch": -1, "model": None, "objective": None}
    if context.state is not None:
        trainer.load_state_dict(context.state)
        start_epoch, best, bad_epochs = context.state["epoch"], context.state["best"], context.state["bad_epochs"]

    for epoch in range(start_epoch, c.optim.epochs):
        if bad_epochs >= c.optim.patience:
            break
        t0 = time.perf_counter()
        totals = trainer.train_epoch(epoch)
        vm = {"ua": None, "wa": None}
        if c.optim.validation:
            val = data.evaluate(kept, batcher, torch.from_numpy(fold.val))
            vm = summarize(val["y_true"], val["y_pred"], data.classes)
        row = {
            "fold": index,
            "fold_name": fold.name,
            "epoch": epoch + 1,
            **totals,
            "val_ua": vm["ua"],
            "val_wa": vm["wa"],
            "lr": trainer.sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        # early stopping's bookkeeping; without validation speakers every epoch is the best so far
        if vm["ua"] is None or vm["ua"] > best["val_ua"]:
            best, bad_epochs = best_so_far(trainer, kept, epoch, vm["ua"]), 0
        else:
            bad_epochs += 1
        if context.info.is_main:
            val_text = f" val UA {vm['ua']:.3f}" if vm["ua"] is not None else ""
            log(
                f"fold {index + 1} epoch {epoch + 1}: ce {row['ce']:.3f} center {row['center']:.2f} "
                f"recon {row['recon']:.3f} train acc {row['train_acc']:.3f}{val_text} "
                f"({row['seconds']:.1f}s)",
                c.run.no_progress,
            )
        state = {"fold": index, "epoch": epoch + 1, **trainer.state_dict()}
        context.record_epoch(row, {**state, "best": best, "bad_epochs": bad_epochs})
        maybe_interrupt()
    return score_best_epoch(context, index, fold, trainer, norm, batcher, best)


def best_so_far(trainer: FoldTrainer, kept, epoch: int, val_ua) -> dict:
    """What early stopping keeps of the best epoch: the kept weights and objective (CPU), and with
    --ema the weights not kept beside them."""
    best = {
        "val_ua": val_ua if val_ua is not None else -1.0,
        "epoch": epoch + 1,
        "model": cpu_state(kept),
        "objective": cpu_state(trainer.objective),
    }
    if trainer.averages:
        others = {"trained": trainer.model, **trainer.averages.models()}
        best["others"] = {name: cpu_state(m) for name, m in others.items() if m is not kept}
    return best


def score_best_epoch(
    context: FoldContext, index: int, fold, trainer: FoldTrainer, norm, batcher, best: dict
) -> FoldResult:
    """The best epoch's model on the test speakers (and, with --ema, the weights not kept beside it)."""
    model, objective = trainer.model, trainer.objective
    model.load_state_dict(best["model"])
    objective.load_state_dict(best["objective"])
    scores, scored_test = score_test_speakers(context, index, fold, model, norm, batcher)
    head = None
    if context.data.table.functionals is not None:
        scores, head = with_functionals(context, fold, scores)
    val_ua = best["val_ua"] if context.config.optim.validation else None
    scores = {"fold": index, "name": fold.name, "best_epoch": best["epoch"], "val_ua": val_ua, **scores}
    if best.get("others"):
        scores["y_pred_weights"] = {}
        for name, state in best["others"].items():
            model.load_state_dict(state)
            scored = context.data.evaluate(model, batcher, torch.from_numpy(fold.test))
            scores["y_pred_weights"][name] = scored["y_pred"].tolist()
        model.load_state_dict(best["model"])
    centers = objective.center_loss.centers.detach().cpu().numpy() if objective.center_loss is not None else None
    if context.info.is_main:
        log(
            f"fold {index + 1}/{context.n_folds} {fold.name}: test WA {scores['wa']:.3f} "
            f"UA {scores['ua']:.3f} "
            + (
                f"(best epoch {best['epoch']}, val UA {val_ua:.3f})"
                if val_ua is not None
                else f"(last epoch {best['epoch']}, no validation)"
            ),
            context.config.run.no_progress,
        )
    return FoldResult(
        scores=scores,
        embeddings={"embeddings": scored_test["embeddings"], "labels": scored_test["y_true"], "centers": centers},
        final={
            "model": best["model"],
            "objective": best["objective"],
            "norm": norm.state(),
            "fold": index,
            **({"functionals": head.to_checkpoint()} if head is not None else {}),
        },
    )
