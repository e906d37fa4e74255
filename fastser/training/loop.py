"""The training loop: one optimizer step, one fold (train with early stopping, then test), and an
experiment (every fold of one objective setting), resumable from its checkpoint.

Per fold (speaker-independent): the feature table is normalised with the training fold's
statistics; each step crops a batch on the device, runs the model (bf16 autocast with --amp)
and the joint objective CE + lambda_c * center + lambda_r * reconstruction with the fused
center loss. Loss sums stay on the device and are read once per epoch. Early stopping on the
fold's speaker-disjoint validation UA. Every epoch ends with an atomic checkpoint; all randomness
of an epoch derives from (seed, fold, epoch, rank), so a resumed run continues exactly.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastser import __version__
from fastser import distributed as fdist
from fastser.data import CorpusError
from fastser.metrics import summarize
from fastser.models import SERModel, SERObjective
from fastser.ops import backends_in_use
from fastser.training.averaging import WeightAverages
from fastser.training.batches import Batcher, Normalizer, mixup, spec_augment
from fastser.training.checkpoints import ModelSpec, build_model, cpu_state, run_setting, save_checkpoint
from fastser.training.step import train_step

# input statistics a speaker-normalised model is also scored with, as predict would use them without
# enrollment audio: each utterance's own, or the training speakers' pooled ones (saved with the model)
FALLBACKS = ("utterance", "training")


class EpochTotals:
    """Sums over an epoch's steps, on the device: adding costs no host sync; `means()` reads once."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(5, device=device)  # ce*n, center*n, recon*n, correct, n

    def add(self, terms, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.numel()
        self.values[:4] += torch.stack([terms.ce.detach() * n, terms.center.detach() * n, terms.recon.detach() * n,
                                        (logits.argmax(1) == labels).sum().float()])
        self.values[4] += n

    def all_reduce(self) -> None:
        dist.all_reduce(self.values)

    def means(self) -> dict:
        ce, center, recon, correct, n = self.values.tolist()
        return {"ce": ce / n, "center": center / n, "recon": recon / n, "train_acc": correct / n}


def seed_for(*parts) -> int:
    """One reproducible seed from (seed, fold, epoch, rank, ...)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 62)
    return h


def log(msg: str, quiet_bar: bool) -> None:
    if quiet_bar:
        print(msg, flush=True)
    else:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)


def maybe_interrupt() -> None:
    """Test hook: FASTSER_INTERRUPT_AFTER_EPOCHS=N stops the process after N checkpointed epochs."""
    limit = os.environ.get("FASTSER_INTERRUPT_AFTER_EPOCHS")
    if limit is None:
        return
    maybe_interrupt.count = getattr(maybe_interrupt, "count", 0) + 1
    if maybe_interrupt.count >= int(limit):
        raise KeyboardInterrupt(f"interrupted after {limit} epochs (FASTSER_INTERRUPT_AFTER_EPOCHS)")


class Run:
    """One experiment: every fold of one objective setting, resumable from its checkpoint.

    Run(args, info, table, folds, split, out, lambda_center, lambda_recon).run() -> fold results;
    `fold_results`, `history` and `last_test` (the last fold's test embeddings) are read by reports.
    """

    def __init__(self, args, info: fdist.DistInfo, table, folds, split: str, out: Path, lambda_center: float,
                 lambda_recon: float, features):
        self.args, self.info, self.table, self.folds, self.split, self.out = args, info, table, folds, split, out
        self.lambda_center, self.lambda_recon = lambda_center, lambda_recon
        self.classes = table.corpus.classes
        self.normalize = getattr(args, "normalize", "corpus")
        self.ema_decays = tuple(getattr(args, "ema", None) or ())  # the first average is the model kept
        self.spec = ModelSpec(features, tuple(self.classes), width=args.width, embed_dim=args.embed_dim,
                              reconstruct=lambda_recon > 0, train_seconds=args.train_seconds,
                              max_seconds=args.max_seconds, normalize=self.normalize,
                              bin_stats=getattr(args, "bin_stats", False),
                              pooling=args.pooling)
        self.device = info.device
        self.ckpt_path = out / "checkpoint.pt"
        self.history: list[dict] = []
        self.resumed = False  # continued from a checkpoint: this process's wall time covers only a part
        self.fold_results: list[dict] = []
        self.state: Optional[dict] = None  # an in-progress fold's state from a checkpoint
        self.last_test: Optional[dict] = None
        self._group_norms: dict = {}
        # on a GPU the feature table is moved there once and every batch is gathered on the device
        self.resident = self.device.type == "cuda"
        self.feats = {k: x.to(self.device) for k, x in table.feats.items()} if self.resident else table.feats

    # -- normalisation --------------------------------------------------------------------
    def group_norm(self, level: str) -> tuple:
        """(Normalizer, groups (N,)) with one set of statistics per speaker or per utterance of the
        table. They use no labels, so they are the same in every fold (a test speaker's come from
        its own unlabelled audio, as a deployed model would get them from enrollment audio)."""
        if level not in self._group_norms:
            n = self.table.frames.shape[0]
            if level == "speaker":
                names = self.table.speakers  # a speed-perturbed copy is its own speaker
                index = {s: i for i, s in enumerate(sorted(set(names.tolist())))}
                groups = torch.tensor([index[s] for s in names.tolist()], dtype=torch.long)
            else:
                groups = torch.arange(n)
            norm = Normalizer.fit_groups(self.table.feats, self.table.frames, groups, int(groups.max()) + 1)
            self._group_norms[level] = (norm, groups)
        return self._group_norms[level]

    def batcher(self, train_rows: torch.Tensor, level: Optional[str] = None) -> Batcher:
        """Batches normalised per `level` (default: the run's --normalize): "corpus" with the
        training rows' statistics, "speaker"/"utterance" with each row's own group's."""
        level = level or self.normalize
        if level == "corpus":
            norm, groups = Normalizer.fit(self.table.feats, self.table.frames, train_rows), None
        else:
            norm, groups = self.group_norm(level)
        return self.new_batcher(norm, groups)

    def new_batcher(self, norm: Normalizer, groups: Optional[torch.Tensor] = None) -> Batcher:
        return Batcher(self.feats, self.table.frames, self.table.labels, norm, self.device,
                       int(self.args.train_seconds * 100), groups, resident=self.resident,
                       eval_bucket=64 if self.resident else 1)  # static evaluation shapes on a GPU

    # -- checkpoint ---------------------------------------------------------------------
    def config(self) -> dict:
        a = vars(self.args).copy()
        a.update(lambda_center=self.lambda_center, lambda_recon=self.lambda_recon, classes_list=self.classes,
                 kinds=self.spec.features.kinds, version=__version__, world_size=self.info.world_size,
                 backends=backends_in_use(self.device),
                 feature_configs=self.spec.features.to_dict())
        return a

    def resume_from(self, ckpt: dict) -> None:
        old, new = ckpt["config"], self.config()
        for key in ("corpus", "split", "features", "prosody", "normalize", "bin_stats", "pooling", "validation", "seed",
                    "lambda_center", "lambda_recon", "world_size", "batch_size", "tempo", "speed_perturb", "ema",
                    "mixup", "noise"):
            made = run_setting(old, key)
            if made != new.get(key):
                raise ValueError(f"--resume: the checkpoint was made with {key}={made!r}, "
                                 f"this run has {new.get(key)!r}")
        self.history = ckpt["history"]
        self.resumed = True
        self.fold_results = ckpt["fold_results"]
        self.state = ckpt.get("fold_state")

    def save(self, fold_state: Optional[dict], final: Optional[dict] = None) -> None:
        if not self.info.is_main:
            return
        payload = {"config": self.config(), "settings": dict(vars(self.args)), "spec": self.spec.to_dict(),
                   "history": self.history,
                   "fold_results": self.fold_results, "fold_state": fold_state, "classes": self.classes,
                   "kinds": self.spec.features.kinds, "version": __version__}
        if final is not None:
            payload["final"] = final
        save_checkpoint(payload, self.ckpt_path)

    # -- one fold -----------------------------------------------------------------------
    def new_model(self) -> SERModel:
        return build_model(self.spec).to(self.device, memory_format=torch.channels_last)  # oneDNN/cuDNN layout

    def validating(self) -> bool:
        """Early stopping on the fold's validation speakers (default), or (--no-validation) the
        validation speakers trained on too and the last epoch's model kept."""
        return getattr(self.args, "validation", True)

    def train_rows(self, fold) -> torch.Tensor:
        rows = fold.train if self.validating() else np.concatenate([fold.train, fold.val])
        return torch.from_numpy(np.sort(rows))

    def build(self, fold_index: int, fold):
        a = self.args
        torch.manual_seed(seed_for(a.seed, fold_index, 0))  # same initial weights on every rank
        model = self.new_model()
        train_rows = self.train_rows(fold)
        counts = torch.bincount(self.table.labels[train_rows], minlength=len(self.classes)).float()
        weights = counts.sum() / (len(self.classes) * counts.clamp(min=1))  # balanced CE: UA matters
        objective = SERObjective(len(self.classes), a.embed_dim, lambda_center=self.lambda_center,
                                 lambda_recon=self.lambda_recon, center_alpha=a.center_alpha,
                                 class_weights=weights, deterministic=a.deterministic).to(self.device)
        # fused AdamW on CUDA: one multi-tensor kernel per step instead of a handful per parameter group
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                                fused=True if self.device.type == "cuda" else None)
        total = a.epochs * self.steps_per_epoch(len(train_rows))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=total, pct_start=0.15)
        return model, objective, opt, sched


    def run_fold(self, fold_index: int, fold) -> dict:
        a, info = self.args, self.info
        for part in ("train", "val", "test"):
            if len(getattr(fold, part)) == 0:
                raise CorpusError(f"{self.table.corpus.name}: fold {fold.name} has no {part} utterances "
                                  f"(too few usable files for --split {self.split})")
        train_rows = self.train_rows(fold)
        batcher = self.batcher(train_rows)
        # the training rows' statistics, saved with the model at every level: predict's own for
        # --normalize corpus; for the others a reference to compare fallbacks against
        norm = batcher.norm if batcher.groups is None else Normalizer.fit(self.table.feats, self.table.frames,
                                                                          train_rows)
        model, objective, opt, sched = self.build(fold_index, fold)
        averages = WeightAverages(model, self.ema_decays)
        # with --ema the first average is validated, tested and saved; the trained weights and any
        # other average are tested beside it (metrics.json: "weights")
        kept = next(iter(averages.models().values())) if averages else model
        train_model = model
        if info.enabled:
            train_model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None)
        if a.compile:  # after the DDP wrap, as torch.compile's DDP support expects
            train_model = torch.compile(train_model)
        graphed = None
        if getattr(a, "cuda_graph", False):
            from fastser.training.graphed import GraphedTrainStep  # a new graph per fold (a new model)
            graphed = GraphedTrainStep(train_model, objective, opt, amp=a.amp)
        start_epoch, best, bad_epochs = 0, {"val_ua": -1.0, "epoch": -1, "model": None, "objective": None}, 0
        if self.state is not None and self.state["fold"] == fold_index:
            st = self.state
            model.load_state_dict(st["model"])
            objective.load_state_dict(st["objective"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            averages.load_state_dict(st.get("averages", {}))
            start_epoch, best, bad_epochs = st["epoch"], st["best"], st["bad_epochs"]
        self.state = None

        for epoch in range(start_epoch, a.epochs):
            if bad_epochs >= a.patience:
                break
            t0 = time.perf_counter()
            totals = self.train_epoch(fold_index, epoch, train_rows, batcher, train_model, model, objective, opt,
                                      sched, averages, graphed)
            vm = {"ua": None, "wa": None}
            if self.validating():
                val = self.evaluate(kept, batcher, torch.from_numpy(fold.val))
                vm = summarize(val["y_true"], val["y_pred"], self.classes)
            row = {"fold": fold_index, "fold_name": fold.name, "epoch": epoch + 1, **totals, "val_ua": vm["ua"],
                   "val_wa": vm["wa"], "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            self.history.append(row)
            # without validation speakers every epoch is the best so far: the last one is kept
            if vm["ua"] is None or vm["ua"] > best["val_ua"]:
                best = {"val_ua": vm["ua"] if vm["ua"] is not None else -1.0, "epoch": epoch + 1,
                        "model": cpu_state(kept), "objective": cpu_state(objective)}
                if averages:
                    others = {"trained": model, **averages.models()}
                    best["others"] = {name: cpu_state(m) for name, m in others.items() if m is not kept}
                bad_epochs = 0
            else:
                bad_epochs += 1
            if info.is_main:
                val_text = f" val UA {vm['ua']:.3f}" if vm["ua"] is not None else ""
                log(f"fold {fold_index + 1} epoch {epoch + 1}: ce {row['ce']:.3f} center {row['center']:.2f} "
                    f"recon {row['recon']:.3f} train acc {row['train_acc']:.3f}{val_text} "
                    f"({row['seconds']:.1f}s)", a.no_progress)
            self.save({"fold": fold_index, "epoch": epoch + 1, "model": cpu_state(model),
                       "objective": cpu_state(objective), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "best": best, "bad_epochs": bad_epochs,
                       "averages": averages.state_dict()})
            maybe_interrupt()
        return self.test_fold(fold_index, fold, model, objective, batcher, norm, best)

    def train_epoch(self, fold_index, epoch, train_rows, batcher, train_model, model, objective, opt, sched,
                    averages: WeightAverages, graphed=None) -> dict:
        a, info = self.args, self.info
        torch.manual_seed(seed_for(a.seed, fold_index, epoch + 1, info.rank))  # dropout of this epoch
        order = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(
            seed_for(a.seed, fold_index, epoch + 1)))]
        mine = fdist.shard(order, info, pad=True)
        if self.table.copies:  # each row read as the original or one of its perturbed copies, uniformly
            version = torch.randint(0, 1 + len(self.table.copies), (len(mine),), generator=torch.Generator()
                                    .manual_seed(seed_for(a.seed, fold_index, epoch + 1, info.rank, 11)))
            mine = mine + version * self.table.n_utterances
        per_rank = max(1, a.batch_size // info.world_size)
        steps = self.steps_per_epoch(len(train_rows))
        if self.resident and len(mine) < steps * per_rank:
            # on a GPU every step has the same shape (no new cuDNN plan or graph for a short last
            # batch): the last batch is filled up with the epoch's first rows
            mine = torch.cat([mine, mine[: steps * per_rank - len(mine)]])
        gen = torch.Generator().manual_seed(seed_for(a.seed, fold_index, epoch + 1, info.rank, 7))
        train_model.train()
        objective.train()
        totals = EpochTotals(self.device)
        bar = None
        if info.is_main and not a.no_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc=f"fold {fold_index + 1}/{len(self.folds)} epoch {epoch + 1}/{a.epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr)
        try:  # an interrupt clears the bar, so the message after it starts on a line of its own
            for step in range(steps):
                batch = batcher.batch(mine[step * per_rank: (step + 1) * per_rank], gen, tempo=a.tempo)
                mix = None
                if a.mixup:  # before SpecAugment: the decoder reconstructs the mixed input
                    batch, mix = mixup(batch, gen, a.mixup)
                feats = spec_augment(batch.feats, batch.frames_host, gen) if a.specaugment else batch.feats
                if graphed is not None:
                    out, terms = graphed(feats, batch.feats, batch.frames, batch.labels, mix)
                else:
                    out, terms = train_step(train_model, objective, opt, feats, batch.feats, batch.frames, batch.labels,
                                            a.amp, clip_params=model.parameters(), mix=mix)
                sched.step()
                averages.update(model)
                totals.add(terms, out.logits, batch.labels)
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 19 or step == steps - 1:  # a host read every 20 steps, not every step
                        m = totals.means()
                        bar.set_postfix(ce=f"{m['ce']:.3f}", center=f"{m['center']:.2f}", recon=f"{m['recon']:.3f}")
        finally:
            if bar is not None:
                bar.close()
        if objective.center_loss is not None:  # deferred input checks (GPU): one host read per epoch
            objective.center_loss.raise_on_bad_batches()
        if info.enabled:
            totals.all_reduce()
        return totals.means()

    def steps_per_epoch(self, n_train: int) -> int:
        per_rank = max(1, self.args.batch_size // self.info.world_size)
        return max(1, -(-n_train // self.info.world_size) // per_rank)

    def test_fold(self, fold_index, fold, model, objective, batcher, norm, best) -> dict:
        model.load_state_dict(best["model"])
        objective.load_state_dict(best["objective"])
        test = self.evaluate(model, batcher, torch.from_numpy(fold.test), embeddings=True)
        tm = summarize(test["y_true"], test["y_pred"], self.classes)
        val_ua = best["val_ua"] if self.validating() else None
        result = {"fold": fold_index, "name": fold.name, "best_epoch": best["epoch"], "val_ua": val_ua,
                  "val_speaker_disjoint": fold.val_speaker_disjoint,
                  "test_speakers": sorted(set(self.table.corpus.speakers[fold.test].tolist())),
                  "test_rows": test["rows"].tolist(), "y_true": test["y_true"].tolist(),
                  "y_pred": test["y_pred"].tolist(), "probs": test["probs"].round(6).tolist(),
                  "wa": tm["wa"], "ua": tm["ua"], "macro_f1": tm["macro_f1"], "n_test": tm["n"]}
        if self.normalize == "speaker":
            # what a user without enrollment audio could get from the same model (FALLBACKS)
            fallbacks = {"utterance": self.batcher(None, "utterance"),
                         "training": self.new_batcher(norm)}
            for level in FALLBACKS:
                alone = self.evaluate(model, fallbacks[level], torch.from_numpy(fold.test))
                result[f"y_pred_{level}_norm"] = alone["y_pred"].tolist()
        if best.get("others"):  # --ema: the weights not kept, scored on the same test speakers
            result["y_pred_weights"] = {}
            for name, state in best["others"].items():
                model.load_state_dict(state)
                scored = self.evaluate(model, batcher, torch.from_numpy(fold.test))
                result["y_pred_weights"][name] = scored["y_pred"].tolist()
            model.load_state_dict(best["model"])
        self.fold_results.append(result)
        self.last_test = {"embeddings": test["embeddings"], "labels": test["y_true"],
                          "centers": objective.center_loss.centers.detach().cpu().numpy()
                          if objective.center_loss is not None else None}
        self.save(None, final={"model": best["model"], "objective": best["objective"], "norm": norm.state(),
                               "fold": fold_index})
        if self.info.is_main:
            log(f"fold {fold_index + 1}/{len(self.folds)} {fold.name}: test WA {tm['wa']:.3f} UA {tm['ua']:.3f} "
                + (f"(best epoch {best['epoch']}, val UA {val_ua:.3f})" if val_ua is not None
                   else f"(last epoch {best['epoch']}, no validation)"), self.args.no_progress)
        return result

    @torch.no_grad()
    def evaluate(self, model, batcher: Batcher, rows: torch.Tensor, embeddings: bool = False) -> dict:
        """Sharded over ranks (each row exactly once), gathered, returned in the order of `rows`."""
        model.eval()
        rows = rows[torch.argsort(self.table.frames[rows], stable=True)]  # similar lengths batch together
        mine = fdist.shard(rows, self.info, pad=False)
        preds, probs, embs = [], [], []
        for start in range(0, len(mine), 64):
            batch = batcher.batch(mine[start: start + 64])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
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
        return {"rows": all_rows.numpy(), "y_true": self.table.labels[all_rows].numpy(), "y_pred": pred.numpy(),
                "probs": prob[order].numpy(),
                "embeddings": emb[order].numpy() if embeddings else None}

    # -- every fold -----------------------------------------------------------------------
    def run(self) -> float:
        """Trains the folds not done yet; returns the seconds it took."""
        t0 = time.perf_counter()
        done = {r["fold"] for r in self.fold_results}
        if self.resumed and all(i in done for i in range(len(self.folds))) and self.info.is_main:
            log(f"{self.out}: every fold was already trained; the results are rebuilt from its checkpoint",
                self.args.no_progress)
        for i, fold in enumerate(self.folds):
            if i not in done:
                self.run_fold(i, fold)
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
        return {"embeddings": test["embeddings"], "labels": test["y_true"],
                "centers": centers.numpy() if centers is not None else None}
