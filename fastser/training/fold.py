"""One fold: its model, objective and optimizer, its epochs (early stopping, a checkpoint after
each) and its test.

    fold = FoldTraining(experiment, fold_index, fold)   # builds (or restores) everything the fold trains
    result = fold.run()                                 # epochs, then the test speakers scored

`experiment` (fastser.training.experiment.Experiment) gives the settings, the feature table, the
batchers, evaluation and the checkpoint; nothing here imports it.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastser import distributed as fdist
from fastser.checkpoints import cpu_state
from fastser.data import CorpusError
from fastser.metrics import summarize
from fastser.models import SERObjective
from fastser.normalization import Normalizer
from fastser.training.averaging import WeightAverages
from fastser.training.batches import PlannedBatches, mixup, spec_augment
from fastser.training.console import log
from fastser.training.graphed import GraphedTrainStep
from fastser.training.step import train_step

# input statistics a speaker-normalised model is also scored with, as predict would use them without
# enough enrollment audio: each utterance's own, the training speakers' pooled ones (saved with the
# model), or k random other clips of the test speaker ("enroll<k>", the same clips for every model)
ENROLLMENT_CLIPS = (1, 3, 10)
FALLBACKS = ("utterance", "training") + tuple(f"enroll{k}" for k in ENROLLMENT_CLIPS)


class EpochTotals:
    """Sums over an epoch's steps, on the device: adding costs no host sync; `means()` reads once."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(5, device=device)  # ce*n, center*n, recon*n, correct, n
        self._one = torch.ones((), device=device)
        self._weights: dict = {}  # batch size -> (n, n, n, 1, n) on the device, copied there once
        self._pending = None  # (pinned host copy, its event) of the sums `progress` is waiting for

    def add(self, terms, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.numel()
        weights = self._weights.get(n)
        if weights is None:
            weights = self._weights[n] = torch.tensor([n, n, n, 1, n], dtype=torch.float32).to(self.values.device)
        correct = (logits.argmax(1) == labels).sum().float()
        # one multiply-add of the step's five terms: six launches a step, not twelve
        step = torch.stack([terms.ce.detach(), terms.center.detach(), terms.recon.detach(), correct, self._one])
        self.values.addcmul_(step, weights)

    def reset(self) -> None:
        self.values.zero_()
        self._pending = None

    def all_reduce(self) -> None:
        dist.all_reduce(self.values)

    def progress(self):
        """The means as of a recent step, without stalling the device: on a GPU the sums are copied
        to pinned memory asynchronously and shown once the copy has landed (None until then)."""
        if self.values.device.type != "cuda":
            return self.means() if self.values.device.type == "cpu" else None
        pending, shown = self._pending, None
        if pending is not None and pending[1].query():
            shown, pending = _means(pending[0].tolist()), None
        if pending is None:
            host = torch.empty(self.values.shape, pin_memory=True)
            host.copy_(self.values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        return shown

    def means(self) -> dict:
        return _means(self.values.tolist())


def _means(values: list) -> dict:
    ce, center, recon, correct, n = values
    n = max(n, 1)
    return {"ce": ce / n, "center": center / n, "recon": recon / n, "train_acc": correct / n}


def cuda_graph_refusal(run, info, device) -> "str | None":
    """Why the training step cannot be one CUDA graph in this run (None: it can; the default then)."""
    if device.type != "cuda":
        return f"device {device.type}"
    if info.enabled:
        return "torchrun"
    if run.compile:
        return "--compile"
    return None


def seed_for(*parts) -> int:
    """One reproducible seed from (seed, fold, epoch, rank, ...)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**62)
    return h


def maybe_interrupt() -> None:
    """Test hook: FASTSER_INTERRUPT_AFTER_EPOCHS=N stops the process after N checkpointed epochs."""
    limit = os.environ.get("FASTSER_INTERRUPT_AFTER_EPOCHS")
    if limit is None:
        return
    maybe_interrupt.count = getattr(maybe_interrupt, "count", 0) + 1
    if maybe_interrupt.count >= int(limit):
        raise KeyboardInterrupt(f"interrupted after {limit} epochs (FASTSER_INTERRUPT_AFTER_EPOCHS)")


def steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    per_rank = max(1, batch_size // world_size)
    return max(1, -(-n_train // world_size) // per_rank)


class FoldTraining:
    """Everything one fold trains, built from the experiment's settings (and restored from its
    checkpoint when the fold was stopped part-way)."""

    def __init__(self, experiment, index: int, fold):
        self.experiment, self.index, self.fold = experiment, index, fold
        c, info = experiment.config, experiment.info
        for part in ("train", "val", "test"):
            if len(getattr(fold, part)) == 0:
                raise CorpusError(
                    f"{experiment.table.corpus.name}: fold {fold.name} has no {part} utterances "
                    f"(too few usable files for --split {experiment.split})"
                )
        self.train_rows = experiment.train_rows(fold)
        self.batcher = experiment.batcher(self.train_rows)
        # the training rows' statistics, saved with the model at every level: predict's own for
        # --normalize corpus; for the others a reference to compare fallbacks against
        self.norm = (
            self.batcher.norm
            if self.batcher.groups is None
            else Normalizer.fit(experiment.table.feats, experiment.table.frames, self.train_rows)
        )
        if c.augment.enrollment_dropout:
            norm, alternatives = experiment.statistics.mixed(
                self.train_rows, self.norm, seed_for(c.optim.seed, index, 13), ENROLLMENT_CLIPS
            )
            self.batcher.mix_statistics(norm, alternatives, c.augment.enrollment_dropout)
        self._build()
        self.averages = WeightAverages(self.model, experiment.ema_decays)
        # with --ema the first average is validated, tested and saved; the trained weights and any
        # other average are tested beside it (metrics.json: "weights")
        self.kept = next(iter(self.averages.models().values())) if self.averages else self.model
        self.train_model = self.model
        if info.enabled:
            device = experiment.device
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        if c.run.compile:  # after the DDP wrap, as torch.compile's DDP support expects
            self.train_model = torch.compile(self.train_model)
        self.totals = EpochTotals(experiment.device)
        # resident batches (a GPU): the host draws a step's crops and augmentation into one plan, one
        # copy to the device, where the batch is built (inside the CUDA graph when there is one)
        self.planned = None
        if self.batcher.resident:
            a = c.augment
            per_rank = max(1, c.optim.batch_size // info.world_size)
            self.planned = PlannedBatches(self.batcher, per_rank, a.tempo, a.mixup, a.specaugment)
        self.graphed = None
        if self.graph_serves:
            plan = torch.zeros(self.planned.size, dtype=torch.long, device=experiment.device)
            self.graphed = GraphedTrainStep(
                self.train_model,
                self.objective,
                self.opt,
                {"plan": plan},
                lambda inputs: self.planned.build(inputs["plan"]),
                totals=self.totals,
                amp=c.run.amp,
                log=lambda line: log(line, c.run.no_progress) if info.is_main else None,
            )
        self.start_epoch, self.bad_epochs = 0, 0
        self.best = {"val_ua": -1.0, "epoch": -1, "model": None, "objective": None}
        state = experiment.take_fold_state(index)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.opt.load_state_dict(state["optimizer"])
            for group in self.opt.param_groups:  # this run's kernels, whichever the checkpoint's run used
                group.update({"capturable": False, "foreach": None, "fused": None, **self._optimizer_flags()})
            self.sched.load_state_dict(state["scheduler"])
            self.averages.load_state_dict(state.get("averages", {}))
            self.start_epoch, self.best, self.bad_epochs = state["epoch"], state["best"], state["bad_epochs"]

    @property
    def graph_serves(self) -> bool:
        """The whole training step in one CUDA graph: the default on one GPU (not --no-cuda-graph)."""
        exp = self.experiment
        return (
            exp.config.run.cuda_graph is not False
            and cuda_graph_refusal(exp.config.run, exp.info, exp.device) is None
            and self.batcher.resident
        )

    def _optimizer_flags(self) -> dict:
        """Fused AdamW on CUDA (one multi-tensor kernel a step); in a CUDA graph the capturable
        single-tensor form, the one that takes beta1 (which the one-cycle schedule cycles) as a
        device tensor without reading it back: the fused kernel takes beta1 as a number, which the
        graph would bake in, and the foreach form reads a tensor beta1 with .item()."""
        if self.graph_serves:
            return {"capturable": True, "foreach": False, "fused": None}
        return {"fused": True if self.experiment.device.type == "cuda" else None}

    def _build(self) -> None:
        exp, c = self.experiment, self.experiment.config
        torch.manual_seed(seed_for(c.optim.seed, self.index, 0))  # same initial weights on every rank
        self.model = exp.new_model()
        n_classes = len(exp.classes)
        counts = torch.bincount(exp.table.labels[self.train_rows], minlength=n_classes).float()
        weights = counts.sum() / (n_classes * counts.clamp(min=1))  # balanced CE: UA matters
        self.objective = SERObjective(
            n_classes,
            c.model.embed_dim,
            lambda_center=exp.lambda_center,
            lambda_recon=exp.lambda_recon,
            center_alpha=c.objective.center_alpha,
            class_weights=weights,
            deterministic=c.run.deterministic,
        ).to(exp.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay, **self._optimizer_flags()
        )
        total = c.optim.epochs * steps_per_epoch(len(self.train_rows), c.optim.batch_size, exp.info.world_size)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=c.optim.lr, total_steps=total, pct_start=0.15)

    # -- the epochs ------------------------------------------------------------------------
    def run(self) -> dict:
        exp, c = self.experiment, self.experiment.config
        for epoch in range(self.start_epoch, c.optim.epochs):
            if self.bad_epochs >= c.optim.patience:
                break
            t0 = time.perf_counter()
            totals = self.train_epoch(epoch)
            vm = {"ua": None, "wa": None}
            if exp.validating():
                val = exp.evaluate(self.kept, self.batcher, torch.from_numpy(self.fold.val))
                vm = summarize(val["y_true"], val["y_pred"], exp.classes)
            row = {
                "fold": self.index,
                "fold_name": self.fold.name,
                "epoch": epoch + 1,
                **totals,
                "val_ua": vm["ua"],
                "val_wa": vm["wa"],
                "lr": self.sched.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
            exp.history.append(row)
            self._keep_if_best(epoch, vm["ua"])
            if exp.info.is_main:
                val_text = f" val UA {vm['ua']:.3f}" if vm["ua"] is not None else ""
                log(
                    f"fold {self.index + 1} epoch {epoch + 1}: ce {row['ce']:.3f} center {row['center']:.2f} "
                    f"recon {row['recon']:.3f} train acc {row['train_acc']:.3f}{val_text} "
                    f"({row['seconds']:.1f}s)",
                    c.run.no_progress,
                )
            exp.save(
                {
                    "fold": self.index,
                    "epoch": epoch + 1,
                    "model": cpu_state(self.model),
                    "objective": cpu_state(self.objective),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "best": self.best,
                    "bad_epochs": self.bad_epochs,
                    "averages": self.averages.state_dict(),
                }
            )
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
            if self.averages:
                others = {"trained": self.model, **self.averages.models()}
                self.best["others"] = {name: cpu_state(m) for name, m in others.items() if m is not self.kept}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def train_epoch(self, epoch: int) -> dict:
        exp, c, info = self.experiment, self.experiment.config, self.experiment.info
        torch.manual_seed(seed_for(c.optim.seed, self.index, epoch + 1, info.rank))  # dropout of this epoch
        order = self.train_rows[
            torch.randperm(
                len(self.train_rows),
                generator=torch.Generator().manual_seed(seed_for(c.optim.seed, self.index, epoch + 1)),
            )
        ]
        mine = fdist.shard(order, info, pad=True)
        if exp.table.copies:  # each row read as the original or one of its perturbed copies, uniformly
            version = torch.randint(
                0,
                1 + len(exp.table.copies),
                (len(mine),),
                generator=torch.Generator().manual_seed(seed_for(c.optim.seed, self.index, epoch + 1, info.rank, 11)),
            )
            mine = mine + version * exp.table.n_utterances
        per_rank = max(1, c.optim.batch_size // info.world_size)
        steps = steps_per_epoch(len(self.train_rows), c.optim.batch_size, info.world_size)
        if exp.resident and len(mine) < steps * per_rank:
            # on a GPU every step has the same shape (no new cuDNN plan or graph for a short last
            # batch): the last batch is filled up with the epoch's first rows
            mine = torch.cat([mine, mine[: steps * per_rank - len(mine)]])
        gen = torch.Generator().manual_seed(seed_for(c.optim.seed, self.index, epoch + 1, info.rank, 7))
        self.train_model.train()
        self.objective.train()
        totals = self.totals
        totals.reset()
        bar = None
        if info.is_main and not c.run.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=steps,
                desc=f"fold {self.index + 1}/{len(exp.folds)} epoch {epoch + 1}/{c.optim.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        try:  # an interrupt clears the bar, so the message after it starts on a line of its own
            for step in range(steps):
                rows = mine[step * per_rank : (step + 1) * per_rank]
                if self.graphed is not None:  # the sums are added inside the graph
                    self.graphed(plan=self.planned.plan(rows, gen))
                else:
                    out, terms, labels = self._eager_step(rows, gen)
                    totals.add(terms, out.logits, labels)
                self.sched.step()
                self.averages.update(self.model)
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 19 or step == steps - 1:  # every 20 steps, from an asynchronous copy
                        m = totals.progress() if step < steps - 1 else totals.means()
                        if m is not None:
                            bar.set_postfix(ce=f"{m['ce']:.3f}", center=f"{m['center']:.2f}", recon=f"{m['recon']:.3f}")
        finally:
            if bar is not None:
                bar.close()
        if self.objective.center_loss is not None:  # deferred input checks (GPU): one host read per epoch
            self.objective.center_loss.raise_on_bad_batches()
        if info.enabled:
            totals.all_reduce()
        return totals.means()

    def _eager_step(self, rows: torch.Tensor, gen: torch.Generator) -> tuple:
        """One optimizer step without a graph: the batch (from a plan copied in one piece when the
        table is on the device), then `train_step`. -> (out, terms, labels)."""
        c = self.experiment.config
        if self.planned is not None:
            plan = self.planned.plan(rows, gen)
            if self.experiment.device.type == "cuda":
                plan = plan.pin_memory()
            plan = plan.to(self.experiment.device, non_blocking=True)
            feats, targets, frames, labels, mix = self.planned.build(plan)
        else:
            batch = self.batcher.batch(rows, gen, tempo=c.augment.tempo)
            mix = None
            if c.augment.mixup:  # before SpecAugment: the decoder reconstructs the mixed input
                batch, mix = mixup(batch, gen, c.augment.mixup)
            feats = spec_augment(batch.feats, batch.frames_host, gen) if c.augment.specaugment else batch.feats
            targets, frames, labels = batch.feats, batch.frames, batch.labels
        out, terms = train_step(
            self.train_model,
            self.objective,
            self.opt,
            feats,
            targets,
            frames,
            labels,
            c.run.amp,
            clip_params=self.model.parameters(),
            mix=mix,
        )
        return out, terms, labels

    # -- the test speakers -----------------------------------------------------------------
    def test(self) -> dict:
        exp, best, fold = self.experiment, self.best, self.fold
        model, objective = self.model, self.objective
        model.load_state_dict(best["model"])
        objective.load_state_dict(best["objective"])
        test = exp.evaluate(model, self.batcher, torch.from_numpy(fold.test), embeddings=True)
        tm = summarize(test["y_true"], test["y_pred"], exp.classes)
        val_ua = best["val_ua"] if exp.validating() else None
        result = {
            "fold": self.index,
            "name": fold.name,
            "best_epoch": best["epoch"],
            "val_ua": val_ua,
            "val_speaker_disjoint": fold.val_speaker_disjoint,
            "test_speakers": sorted(set(exp.table.corpus.speakers[fold.test].tolist())),
            "test_rows": test["rows"].tolist(),
            "y_true": test["y_true"].tolist(),
            "y_pred": test["y_pred"].tolist(),
            "probs": test["probs"].round(6).tolist(),
            "wa": tm["wa"],
            "ua": tm["ua"],
            "macro_f1": tm["macro_f1"],
            "n_test": tm["n"],
        }
        if exp.normalize == "speaker":
            # what a user without enrollment audio could get from the same model (FALLBACKS)
            test_rows = torch.from_numpy(fold.test)
            fallbacks = {"utterance": exp.batcher(None, "utterance"), "training": exp.new_batcher(self.norm)}
            groups = torch.zeros(exp.table.frames.shape[0], dtype=torch.long)  # test row i -> group i
            groups[test_rows] = torch.arange(test_rows.shape[0])
            for k in ENROLLMENT_CLIPS:  # drawn by fold alone: every seed and setting gets the same clips
                norm = exp.statistics.enrollment(
                    test_rows, k, torch.Generator().manual_seed(seed_for(self.index, k, 17))
                )
                fallbacks[f"enroll{k}"] = exp.new_batcher(norm, groups)
            for level in FALLBACKS:
                alone = exp.evaluate(model, fallbacks[level], test_rows)
                result[f"y_pred_{level}_norm"] = alone["y_pred"].tolist()
        if best.get("others"):  # --ema: the weights not kept, scored on the same test speakers
            result["y_pred_weights"] = {}
            for name, state in best["others"].items():
                model.load_state_dict(state)
                scored = exp.evaluate(model, self.batcher, torch.from_numpy(fold.test))
                result["y_pred_weights"][name] = scored["y_pred"].tolist()
            model.load_state_dict(best["model"])
        exp.fold_results.append(result)
        exp.last_test = {
            "embeddings": test["embeddings"],
            "labels": test["y_true"],
            "centers": objective.center_loss.centers.detach().cpu().numpy()
            if objective.center_loss is not None
            else None,
        }
        exp.save(
            None,
            final={
                "model": best["model"],
                "objective": best["objective"],
                "norm": self.norm.state(),
                "fold": self.index,
            },
        )
        if exp.info.is_main:
            log(
                f"fold {self.index + 1}/{len(exp.folds)} {fold.name}: test WA {tm['wa']:.3f} UA {tm['ua']:.3f} "
                + (
                    f"(best epoch {best['epoch']}, val UA {val_ua:.3f})"
                    if val_ua is not None
                    else f"(last epoch {best['epoch']}, no validation)"
                ),
                exp.config.run.no_progress,
            )
        return result
