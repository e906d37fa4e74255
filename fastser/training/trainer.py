"""A fold's model and what trains it, one epoch at a time.

trainer = FoldTrainer(context, fold_index, batcher, train_rows)
means = trainer.train_epoch(epoch)   # {"ce", "center", "recon", "train_acc"} over the epoch
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastser import distributed as fdist
from fastser.checkpoints import cpu_state
from fastser.models import SERObjective
from fastser.training.averaging import WeightAverages
from fastser.training.batches import Augmentation, Batcher, PlannedBatches, augmented_batch
from fastser.training.console import log, progress_bar
from fastser.training.context import FoldContext
from fastser.training.graphed import GraphedTrainStep, cuda_graph_refusal
from fastser.training.step import train_step


def seed_for(*parts) -> int:
    """One reproducible seed from (seed, fold, epoch, rank, ...)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**62)
    return h


def steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    per_rank = max(1, batch_size // world_size)
    return max(1, -(-n_train // world_size) // per_rank)


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


class FoldTrainer:
    """A fold's model, its objective (cross-entropy, center loss, reconstruction; classes weighted
    to balance), AdamW on a one-cycle schedule, the weight averages (--ema) and the wrappers a run
    asks for (DistributedDataParallel, torch.compile, the step in one CUDA graph).

    Args:
        context: the fold's view of its experiment (fastser.training.context.FoldContext).
        index: the fold's index (seeds its initial weights and its epochs' order).
        batcher: the fold's training batches (normalised as the run trains).
        train_rows: (n,) int64, the rows the fold trains on.
    """

    def __init__(self, context: FoldContext, index: int, batcher: Batcher, train_rows: torch.Tensor):
        self.context, self.index, self.batcher, self.train_rows = context, index, batcher, train_rows
        c, info, device = context.config, context.info, context.device
        torch.manual_seed(seed_for(c.optim.seed, index, 0))  # same initial weights on every rank
        self.model = context.new_model()
        classes = context.data.classes
        counts = torch.bincount(context.data.table.labels[train_rows], minlength=len(classes)).float()
        self.objective = SERObjective(
            len(classes),
            c.model.embed_dim,
            lambda_center=c.objective.center_weight,
            lambda_recon=c.objective.recon_weight,
            center_alpha=c.objective.center_alpha,
            class_weights=counts.sum() / (len(classes) * counts.clamp(min=1)),  # balanced CE: UA matters
            deterministic=c.run.deterministic,
        ).to(device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay, **self.optimizer_flags()
        )
        total = c.optim.epochs * steps_per_epoch(len(train_rows), c.optim.batch_size, info.world_size)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=c.optim.lr, total_steps=total, pct_start=0.15)
        self.averages = WeightAverages(self.model, tuple(c.optim.ema or ()))
        self.train_model = self.model
        if info.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        if c.run.compile:  # after the DDP wrap, as torch.compile's DDP support expects
            self.train_model = torch.compile(self.train_model)
        self.totals = EpochTotals(device)
        self.augmentation = Augmentation.of(c.augment)
        self.per_rank = max(1, c.optim.batch_size // info.world_size)
        # resident batches (a GPU): the host draws a step's crops and augmentation into one plan, one
        # copy to the device, where the batch is built (inside the CUDA graph when there is one)
        self.planned = PlannedBatches(batcher, self.per_rank, self.augmentation) if batcher.resident else None
        self.graphed = graphed_step(self) if self.graph_serves else None

    @property
    def graph_serves(self) -> bool:
        """The whole training step in one CUDA graph: the default on one GPU (not --no-cuda-graph)."""
        c = self.context
        refused = cuda_graph_refusal(c.config.run, c.info, c.device)
        return c.config.run.cuda_graph is not False and refused is None and self.batcher.resident

    def optimizer_flags(self) -> dict:
        """Fused AdamW on CUDA (one multi-tensor kernel a step); in a CUDA graph the capturable
        single-tensor form, the one that takes beta1 (which the one-cycle schedule cycles) as a
        device tensor without reading it back: the fused kernel takes beta1 as a number, which the
        graph would bake in, and the foreach form reads a tensor beta1 with .item()."""
        if self.graph_serves:
            return {"capturable": True, "foreach": False, "fused": None}
        return {"fused": True if self.context.device.type == "cuda" else None}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the training (weights on the CPU)."""
        return {
            "model": cpu_state(self.model),
            "objective": cpu_state(self.objective),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "averages": self.averages.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state, with this run's optimizer kernels (whichever the
        checkpoint's run used)."""
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:
            group.update({"capturable": False, "foreach": None, "fused": None, **self.optimizer_flags()})
        self.sched.load_state_dict(state["scheduler"])
        self.averages.load_state_dict(state.get("averages", {}))

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of optimizer steps -> the means of its loss terms and its training accuracy."""
        c, info = self.context.config, self.context.info
        torch.manual_seed(seed_for(c.optim.seed, self.index, epoch + 1, info.rank))  # dropout of this epoch
        mine = epoch_rows(self.context, self.index, self.train_rows, epoch, self.per_rank, self.batcher.resident)
        steps = steps_per_epoch(len(self.train_rows), c.optim.batch_size, info.world_size)
        gen = torch.Generator().manual_seed(seed_for(c.optim.seed, self.index, epoch + 1, info.rank, 7))
        self.train_model.train()
        self.objective.train()
        totals = self.totals
        totals.reset()
        desc = f"fold {self.index + 1}/{self.context.n_folds} epoch {epoch + 1}/{c.optim.epochs}"
        bar = progress_bar(steps, desc, info.is_main and not c.run.no_progress)
        try:  # an interrupt clears the bar, so the message after it starts on a line of its own
            for step in range(steps):
                rows = mine[step * self.per_rank : (step + 1) * self.per_rank]
                if self.graphed is not None:  # the sums are added inside the graph
                    self.graphed(plan=self.planned.plan(rows, gen))
                else:
                    out, terms, labels = self.eager_step(rows, gen)
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

    def eager_step(self, rows: torch.Tensor, gen: torch.Generator) -> tuple:
        """One optimizer step without a graph: the batch (from a plan copied in one piece when the
        table is on the device), then `train_step`. -> (out, terms, labels)."""
        device = self.context.device
        if self.planned is not None:
            plan = self.planned.plan(rows, gen)
            if device.type == "cuda":
                plan = plan.pin_memory()
            feats, targets, frames, labels, mix = self.planned.build(plan.to(device, non_blocking=True))
        else:
            feats, targets, frames, labels, mix = augmented_batch(self.batcher, rows, gen, self.augmentation)
        out, terms = train_step(
            self.train_model,
            self.objective,
            self.opt,
            feats,
            targets,
            frames,
            labels,
            self.context.config.run.amp,
            clip_params=self.model.parameters(),
            mix=mix,
        )
        return out, terms, labels


def epoch_rows(context: FoldContext, index: int, train_rows: torch.Tensor, epoch: int, per_rank: int, fill: bool):
    """This rank's rows for an epoch, in the epoch's order (with perturbed copies: each row read as
    the original or one of its copies, uniformly); with `fill` (a GPU) whole batches only."""
    c, info, table = context.config, context.info, context.data.table
    order_seed = seed_for(c.optim.seed, index, epoch + 1)
    order = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(order_seed))]
    mine = fdist.shard(order, info, pad=True)
    if table.copies:
        copy_seed = seed_for(c.optim.seed, index, epoch + 1, info.rank, 11)
        version = torch.randint(
            0, 1 + len(table.copies), (len(mine),), generator=torch.Generator().manual_seed(copy_seed)
        )
        mine = mine + version * table.n_utterances
    steps = steps_per_epoch(len(train_rows), c.optim.batch_size, info.world_size)
    if fill and len(mine) < steps * per_rank:
        # every step has the same shape (no new cuDNN plan or graph for a short last batch): the
        # last batch is filled up with the epoch's first rows
        mine = torch.cat([mine, mine[: steps * per_rank - len(mine)]])
    return mine


def graphed_step(trainer: FoldTrainer) -> GraphedTrainStep:
    """The trainer's whole step (the batch built from a plan, forward, losses, backward, AdamW, the
    epoch's sums) captured in one CUDA graph."""
    c, info = trainer.context.config, trainer.context.info
    return GraphedTrainStep(
        trainer.train_model,
        trainer.objective,
        trainer.opt,
        {"plan": torch.zeros(trainer.planned.size, dtype=torch.long, device=trainer.context.device)},
        lambda inputs: trainer.planned.build(inputs["plan"]),
        totals=trainer.totals,
        amp=c.run.amp,
        log=lambda line: log(line, c.run.no_progress) if info.is_main else None,
    )
