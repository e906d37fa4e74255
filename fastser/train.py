"""Train the paper's model: `python -m fastser.train` (synthetic corpus, no arguments needed), or
`python -m fastser.train --corpus emodb --data-dir PATH --split loso`; the same under torchrun.

Per fold (speaker-independent): features for the whole corpus are computed once on the training
device (cached on disk for real corpora); each step crops and augments a feature batch on the
device, runs the model (bf16 autocast with --amp) and the joint objective CE + lambda_c * center
+ lambda_r * reconstruction with the fused center loss. Metrics accumulate on the device and are
read once per epoch. Early stopping on the fold's speaker-disjoint validation UA. Every epoch ends
with an atomic checkpoint; --resume continues to the same result as an uninterrupted run, because
all randomness of an epoch is derived from (seed, fold, epoch, rank) rather than carried over.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastser import __version__
from fastser.cli import prog_name, run_cli
from fastser._io import atomic_torch_save
from fastser import distributed as fdist
from fastser.data import SPLITS, CorpusError, load_corpus, make_folds
from fastser.data.cache import FEATURE_KINDS, build_feature_table, feature_configs
from fastser.metrics import summarize
from fastser.models import SERModel, SERObjective
from fastser.ops import backends_in_use

CORPORA = ("synthetic", "iemocap", "emodb", "ravdess", "cremad", "tess")
ABLATION = {"ce_only": (False, False), "center": (True, False), "recon": (False, True), "center+recon": (True, True)}
DEFAULT_EPOCHS = {"synthetic": 12}


class _DefaultsOnce(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already speaks of its default, or
    there is none to show (flags that are off, options that are unset)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("fastser.train"), description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsOnce)
    corpus = p.add_argument_group("corpus and folds")
    corpus.add_argument("--corpus", choices=CORPORA, default="synthetic",
                        help="which corpus; 'synthetic' is generated, the others are read from --data-dir")
    corpus.add_argument("--data-dir", default=None, help="corpus root, in the layout the corpus ships in (README)")
    corpus.add_argument("--split", choices=SPLITS, default=None,
                        help="speaker-independent folds (default: the corpus's own, see README)")
    corpus.add_argument("--folds", type=int, default=5, help="number of folds for --split kfold")
    corpus.add_argument("--max-folds", type=int, default=None, help="run only the first N folds (smoke runs)")
    corpus.add_argument("--classes", default=None,
                        help='restrict/map labels, e.g. "neutral,happy=happy+excited,sad,angry"')
    corpus.add_argument("--iemocap-subset", choices=("all", "improvised", "scripted"), default="all",
                        help="IEMOCAP sessions to use")
    corpus.add_argument("--strict", action="store_true", help="a bad audio file is an error, not a skip")
    corpus.add_argument("--max-seconds", type=float, default=8.0, help="longer utterances are cut")
    corpus.add_argument("--cache-dir", default=None, help="feature cache (default: <data-dir>/.fastser-cache)")
    corpus.add_argument("--no-cache", action="store_true", help="compute the features without reading or "
                                                                 "writing the cache")
    corpus.add_argument("--synthetic-speakers", type=int, default=16, help="speakers of the synthetic corpus")
    corpus.add_argument("--synthetic-per-class", type=int, default=8,
                        help="synthetic utterances per speaker and class")
    model = p.add_argument_group("model and objective")
    model.add_argument("--features", choices=("spectrogram", "mfcc", "both"), default="both",
                       help="input branches: the log-mel spectrogram CNN, the MFCC CNN, or both")
    model.add_argument("--width", type=int, default=16, help="channels per stem branch (model size)")
    model.add_argument("--embed-dim", type=int, default=128, help="size of the embedding the center loss acts on")
    model.add_argument("--lambda-center", type=float, default=0.003, help="weight of the center loss")
    model.add_argument("--lambda-recon", type=float, default=0.1, help="weight of the reconstruction loss")
    model.add_argument("--center-alpha", type=float, default=0.5, help="Wen et al.'s center update rate")
    model.add_argument("--no-center", action="store_true", help="train without the center loss")
    model.add_argument("--no-recon", action="store_true", help="train without the reconstruction decoder")
    model.add_argument("--ablation", action="store_true", help="CE only, +center, +recon, both on the same folds")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=None,
                     help="maximum epochs per fold (default: 12 synthetic, 40 real corpora)")
    opt.add_argument("--patience", type=int, default=8, help="early stopping: epochs without a better validation UA")
    opt.add_argument("--batch-size", type=int, default=16, help="global batch (split across ranks under torchrun)")
    opt.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle AdamW schedule")
    opt.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW weight decay")
    opt.add_argument("--train-seconds", type=float, default=3.0,
                     help="random crop length for training (also predict's window)")
    opt.add_argument("--specaugment", action="store_true",
                     help="time/frequency masks in training (off by default: they lowered UA in the sweep)")
    opt.add_argument("--seed", type=int, default=0, help="seeds the folds, the weights, the batches and dropout")
    run = p.add_argument_group("running")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--deterministic", action="store_true",
                     help="bit-identical runs for a seed on one device (deterministic kernels and center "
                          "update, torch.use_deterministic_algorithms; slower on a GPU)")
    run.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>/)")
    run.add_argument("--resume", default=None, help="checkpoint.pt (or its folder) to continue from")
    run.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS.get(args.corpus, 40)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be positive")
    return args


# ----------------------------------------------------------------------------- batches

@dataclasses.dataclass
class Normalizer:
    """Per-bin mean/std of each feature kind over the training fold's valid frames."""
    mean: dict
    std: dict

    @classmethod
    def fit(cls, feats: dict, frames: torch.Tensor, rows: torch.Tensor) -> "Normalizer":
        mean, std = {}, {}
        for kind, x in feats.items():
            s = torch.zeros(x.shape[1], dtype=torch.float64)
            ss = torch.zeros_like(s)
            n = 0
            for i in rows.tolist():
                v = x[i, :, : frames[i]].double()
                s += v.sum(1)
                ss += v.square().sum(1)
                n += int(frames[i])
            m = s / max(n, 1)
            mean[kind] = m.float()
            std[kind] = (ss / max(n, 1) - m.square()).clamp(min=1e-8).sqrt().float()
        return cls(mean, std)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std}


class Batcher:
    """Builds device batches from the in-memory feature table: crop -> pin -> device -> normalise.
    batch() -> (feats, frames, labels) on the device and the frames on the host (no sync to read
    them back). Padding frames are exactly 0 after normalisation."""

    def __init__(self, feats: dict, frames: torch.Tensor, labels: torch.Tensor, norm: Normalizer,
                 device: torch.device, train_frames: int):
        self.feats, self.frames, self.labels = feats, frames, labels
        self.device, self.train_frames = device, train_frames
        self.mean = {k: v.to(device)[None, :, None] for k, v in norm.mean.items()}
        self.std = {k: v.to(device)[None, :, None] for k, v in norm.std.items()}

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def batch(self, rows: torch.Tensor, gen: Optional[torch.Generator] = None):
        frames = self.frames[rows]
        if gen is not None:  # training: a random crop of train_frames from each utterance
            T = self.train_frames
            start = (torch.rand(len(rows), generator=gen) * (frames - T).clamp(min=0).add(1)).long()
            frames = (frames - start).clamp(max=T)
            t_idx = (start[:, None] + torch.arange(T)[None, :]).clamp(max=next(iter(self.feats.values())).shape[-1] - 1)
        else:
            T = int(frames.max())
            t_idx = None
        out = {}
        valid = self._to_device(torch.arange(T)[None, :] < frames[:, None])[:, None, :]
        for kind, x in self.feats.items():
            sel = x[rows]
            sel = sel[:, :, :T] if t_idx is None else torch.take_along_dim(sel, t_idx[:, None, :], dim=2)
            v = self._to_device(sel).float()
            out[kind] = ((v - self.mean[kind]) / self.std[kind]) * valid
        return out, self._to_device(frames), self._to_device(self.labels[rows]), frames


def spec_augment(feats: dict, frames_host: torch.Tensor, gen: torch.Generator, n_masks: int = 2) -> dict:
    """Two frequency and two time masks per item (SpecAugment without warping), drawn on the CPU
    generator from host-side frame counts, so runs are reproducible on any device and need no sync."""
    out = {}
    B = frames_host.shape[0]
    f_cpu = frames_host
    t_start = (torch.rand(B, n_masks, generator=gen) * f_cpu[:, None]).long()
    t_width = (torch.rand(B, n_masks, generator=gen) * (0.1 * f_cpu[:, None] + 1)).long()
    for kind, x in feats.items():
        bins, T = x.shape[1], x.shape[2]
        f_start = (torch.rand(B, n_masks, generator=gen) * bins).long()
        f_width = (torch.rand(B, n_masks, generator=gen) * (bins // 8 + 1)).long()
        t = torch.arange(T)[None, None, :]
        f = torch.arange(bins)[None, None, :]
        tmask = ((t >= t_start[..., None]) & (t < (t_start + t_width)[..., None])).any(1)
        fmask = ((f >= f_start[..., None]) & (f < (f_start + f_width)[..., None])).any(1)
        keep = ~(fmask[:, :, None] | tmask[:, None, :])
        out[kind] = x * keep.to(x.device)
    return out


# ----------------------------------------------------------------------------- one fold

def train_step(model, objective, opt, feats: dict, targets: dict, frames, labels, amp: bool = False,
               clip_params=None):
    """One optimizer step: forward (bf16 autocast with amp), joint loss in fp32, backward (the fused
    center loss updates its centers inside it), clip, step. No host synchronisation."""
    device_type = frames.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        out = model(feats, frames)
    terms = objective(out, labels, targets, frames)
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 5.0)
    opt.step()
    return out, terms


def _seed_for(*parts) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 62)
    return h


class Run:
    """One experiment (all folds of one objective setting), resumable from its checkpoint."""

    def __init__(self, args, info: fdist.DistInfo, table, folds, out: Path, lambda_center: float,
                 lambda_recon: float):
        self.args, self.info, self.table, self.folds, self.out = args, info, table, folds, out
        self.lambda_center, self.lambda_recon = lambda_center, lambda_recon
        self.classes = table.corpus.classes
        self.kinds = list(table.feats)
        self.device = info.device
        self.ckpt_path = out / "checkpoint.pt"
        self.history: list[dict] = []
        self.fold_results: list[dict] = []
        self.state: Optional[dict] = None  # in-progress fold state from a checkpoint

    # -- checkpoint -----------------------------------------------------------------
    def config(self) -> dict:
        a = vars(self.args).copy()
        a.update(lambda_center=self.lambda_center, lambda_recon=self.lambda_recon, classes_list=self.classes,
                 kinds=self.kinds, version=__version__, world_size=self.info.world_size,
                 backends=backends_in_use(self.device),
                 feature_configs={k: dataclasses.asdict(v) for k, v in feature_configs(self.kinds).items()})
        return a

    def resume_from(self, ckpt: dict) -> None:
        old, new = ckpt["config"], self.config()
        for key in ("corpus", "split", "features", "seed", "lambda_center", "lambda_recon", "world_size", "batch_size"):
            if old.get(key) != new.get(key):
                raise ValueError(f"--resume: the checkpoint was made with {key}={old.get(key)!r}, "
                                 f"this run has {new.get(key)!r}")
        self.history = ckpt["history"]
        self.fold_results = ckpt["fold_results"]
        self.state = ckpt.get("fold_state")

    def save(self, fold_state: Optional[dict], final: Optional[dict] = None) -> None:
        if not self.info.is_main:
            return
        payload = {"config": self.config(), "history": self.history, "fold_results": self.fold_results,
                   "fold_state": fold_state, "classes": self.classes, "kinds": self.kinds, "version": __version__}
        if final is not None:
            payload["final"] = final
        atomic_torch_save(payload, self.ckpt_path)

    # -- training ---------------------------------------------------------------------
    def build(self, fold_index: int, fold):
        a = self.args
        torch.manual_seed(_seed_for(a.seed, fold_index, 0))  # same initial weights on every rank
        model = self.new_model()
        counts = torch.bincount(self.table.labels[torch.from_numpy(fold.train)], minlength=len(self.classes)).float()
        weights = counts.sum() / (len(self.classes) * counts.clamp(min=1))  # balanced CE: UA matters
        objective = SERObjective(len(self.classes), a.embed_dim, lambda_center=self.lambda_center,
                                 lambda_recon=self.lambda_recon, center_alpha=a.center_alpha,
                                 class_weights=weights, deterministic=a.deterministic).to(self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * self.steps_per_epoch(fold),
                                                    pct_start=0.15)
        return model, objective, opt, sched

    def new_model(self) -> SERModel:
        model = SERModel({k: self.table.feats[k].shape[1] for k in self.kinds}, len(self.classes),
                         width=self.args.width, embed_dim=self.args.embed_dim, reconstruct=self.lambda_recon > 0)
        return model.to(self.device, memory_format=torch.channels_last)  # oneDNN/cuDNN's preferred layout

    def steps_per_epoch(self, fold) -> int:
        per_rank = max(1, self.args.batch_size // self.info.world_size)
        n = math.ceil(len(fold.train) / self.info.world_size)
        return max(1, n // per_rank)

    def run_fold(self, fold_index: int, fold) -> dict:
        a, info = self.args, self.info
        for part in ("train", "val", "test"):
            if len(getattr(fold, part)) == 0:
                raise CorpusError(f"{self.table.corpus.name}: fold {fold.name} has no {part} utterances "
                                  f"(too few usable files for --split {self.folds_split})")
        train_rows = torch.from_numpy(fold.train)
        norm = Normalizer.fit(self.table.feats, self.table.frames, train_rows)
        batcher = Batcher(self.table.feats, self.table.frames, self.table.labels, norm, self.device,
                          int(a.train_seconds * 100))
        model, objective, opt, sched = self.build(fold_index, fold)
        train_model = model
        if info.enabled:
            train_model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None)
        if a.compile:  # after the DDP wrap, as torch.compile's DDP support expects
            train_model = torch.compile(train_model)
        start_epoch, best, bad_epochs = 0, {"val_ua": -1.0, "epoch": -1, "model": None, "objective": None}, 0
        if self.state is not None and self.state["fold"] == fold_index:
            st = self.state
            model.load_state_dict(st["model"])
            objective.load_state_dict(st["objective"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start_epoch, best, bad_epochs = st["epoch"], st["best"], st["bad_epochs"]
        self.state = None

        per_rank = max(1, a.batch_size // info.world_size)
        steps = self.steps_per_epoch(fold)
        for epoch in range(start_epoch, a.epochs):
            if bad_epochs >= a.patience:
                break
            t0 = time.perf_counter()
            torch.manual_seed(_seed_for(a.seed, fold_index, epoch + 1, info.rank))  # dropout of this epoch
            order = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(
                _seed_for(a.seed, fold_index, epoch + 1)))]
            mine = fdist.shard(order, info, pad=True)
            gen = torch.Generator().manual_seed(_seed_for(a.seed, fold_index, epoch + 1, info.rank, 7))
            train_model.train()
            objective.train()
            sums = torch.zeros(5, device=self.device)  # ce, center, recon, correct, n (read once per epoch)
            bar = None
            if info.is_main and not a.no_progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps, desc=f"fold {fold_index + 1}/{len(self.folds)} epoch {epoch + 1}/{a.epochs}",
                           leave=False, dynamic_ncols=True, file=sys.stderr)
            for step in range(steps):
                rows = mine[step * per_rank: (step + 1) * per_rank]
                clean, frames, labels, frames_host = batcher.batch(rows, gen)
                feats = spec_augment(clean, frames_host, gen) if a.specaugment else clean
                out, terms = train_step(train_model, objective, opt, feats, clean, frames, labels, a.amp,
                                        clip_params=model.parameters())
                sched.step()
                n = labels.numel()
                sums[:4] += torch.stack([terms.ce.detach() * n, terms.center.detach() * n, terms.recon.detach() * n,
                                         (out.logits.argmax(1) == labels).sum().float()])
                sums[4] += n
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 19 or step == steps - 1:  # a host read every 20 steps, not every step
                        s = sums.tolist()
                        bar.set_postfix(ce=f"{s[0] / s[4]:.3f}", center=f"{s[1] / s[4]:.2f}", recon=f"{s[2] / s[4]:.3f}")
            if bar is not None:
                bar.close()
            if info.enabled:
                dist.all_reduce(sums)
            s = sums.tolist()
            val = self.evaluate(model, batcher, torch.from_numpy(fold.val))
            vm = summarize(val["y_true"], val["y_pred"], self.classes)
            row = {"fold": fold_index, "fold_name": fold.name, "epoch": epoch + 1, "ce": s[0] / s[4],
                   "center": s[1] / s[4], "recon": s[2] / s[4], "train_acc": s[3] / s[4], "val_ua": vm["ua"],
                   "val_wa": vm["wa"], "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            self.history.append(row)
            if vm["ua"] > best["val_ua"]:
                best = {"val_ua": vm["ua"], "epoch": epoch + 1, "model": _cpu_state(model),
                        "objective": _cpu_state(objective)}
                bad_epochs = 0
            else:
                bad_epochs += 1
            if info.is_main:
                _log(f"fold {fold_index + 1} epoch {epoch + 1}: ce {row['ce']:.3f} center {row['center']:.2f} "
                     f"recon {row['recon']:.3f} train acc {row['train_acc']:.3f} val UA {vm['ua']:.3f} "
                     f"({row['seconds']:.1f}s)", a)
            self.save({"fold": fold_index, "epoch": epoch + 1, "model": _cpu_state(model),
                       "objective": _cpu_state(objective), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "best": best, "bad_epochs": bad_epochs,
                       "norm": norm.state()})
            _maybe_interrupt()

        model.load_state_dict(best["model"])
        objective.load_state_dict(best["objective"])
        test = self.evaluate(model, batcher, torch.from_numpy(fold.test), embeddings=True)
        tm = summarize(test["y_true"], test["y_pred"], self.classes)
        result = {"fold": fold_index, "name": fold.name, "best_epoch": best["epoch"], "val_ua": best["val_ua"],
                  "val_speaker_disjoint": fold.val_speaker_disjoint,
                  "test_speakers": sorted(set(self.table.corpus.speakers[fold.test].tolist())),
                  "test_rows": test["rows"].tolist(), "y_true": test["y_true"].tolist(),
                  "y_pred": test["y_pred"].tolist(), "wa": tm["wa"], "ua": tm["ua"], "macro_f1": tm["macro_f1"],
                  "n_test": tm["n"]}
        self.fold_results.append(result)
        self.last = {"embeddings": test["embeddings"], "labels": test["y_true"],
                     "centers": objective.center_loss.centers.detach().cpu().numpy()
                     if objective.center_loss is not None else None}
        final = {"model": best["model"], "objective": best["objective"], "norm": norm.state(), "fold": fold_index}
        self.save(None, final=final)
        if info.is_main:
            _log(f"fold {fold_index + 1}/{len(self.folds)} {fold.name}: test WA {tm['wa']:.3f} UA {tm['ua']:.3f} "
                 f"(best epoch {best['epoch']}, val UA {best['val_ua']:.3f})", a)
        return result

    @torch.no_grad()
    def evaluate(self, model, batcher: Batcher, rows: torch.Tensor, embeddings: bool = False) -> dict:
        """Sharded over ranks (each row exactly once), gathered, returned in the order of `rows`."""
        model.eval()
        rows = rows[torch.argsort(self.table.frames[rows], stable=True)]  # similar lengths batch together
        mine = fdist.shard(rows, self.info, pad=False)
        preds, embs = [], []
        for start in range(0, len(mine), 64):
            feats, frames, _, _ = batcher.batch(mine[start: start + 64])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
                out = model(feats, frames)
            preds.append(out.logits.argmax(1))
            embs.append(out.embedding.float())
        pred = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
        emb = torch.cat(embs).cpu() if embs else torch.zeros(0, model.embed_dim)
        all_rows = fdist.gather_cat(mine, self.info)
        pred = fdist.gather_cat(pred, self.info)
        if embeddings:
            emb = fdist.gather_cat(emb, self.info)
        order = torch.argsort(all_rows)
        all_rows, pred = all_rows[order], pred[order]
        return {"rows": all_rows.numpy(), "y_true": self.table.labels[all_rows].numpy(), "y_pred": pred.numpy(),
                "embeddings": emb[order].numpy() if embeddings else None}

    def run(self) -> dict:
        t0 = time.perf_counter()
        done = {r["fold"] for r in self.fold_results}
        self.last = None
        for i, fold in enumerate(self.folds):
            if i in done:
                continue
            self.run_fold(i, fold)
        return self.finish(time.perf_counter() - t0)

    def finish(self, seconds: float) -> dict:
        a = self.args
        y_true = np.concatenate([r["y_true"] for r in self.fold_results])
        y_pred = np.concatenate([r["y_pred"] for r in self.fold_results])
        m = summarize(y_true, y_pred, self.classes)
        corpus = self.table.corpus
        metrics = {
            "corpus": a.corpus, "split": self.folds_split, "features": a.features, "classes": self.classes,
            "lambda_center": self.lambda_center, "lambda_recon": self.lambda_recon, "center_alpha": a.center_alpha,
            "n_test": m["n"], "wa": m["wa"], "ua": m["ua"], "macro_f1": m["macro_f1"],
            "per_class_recall": m["per_class_recall"], "confusion": m["confusion"],
            "folds": [{k: r[k] for k in ("name", "n_test", "wa", "ua", "macro_f1", "best_epoch", "val_ua",
                                         "val_speaker_disjoint", "test_speakers")} for r in self.fold_results],
            "n_utterances": len(corpus.utterances), "n_speakers": len(set(corpus.speakers.tolist())),
            "skipped": {"count": len(corpus.skipped), "files": [{"path": p, "reason": r} for p, r in corpus.skipped]},
            "world_size": self.info.world_size, "device": str(self.device), "seconds": seconds,
            "backends": backends_in_use(self.device),
            "fastser_version": __version__,
        }
        if self.info.is_main:
            from fastser.plots import plot_confusion, plot_embeddings
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            with open(self.out / "history.jsonl", "w") as f:
                for row in self.history:
                    f.write(json.dumps(row) + "\n")
            (self.out / "config.json").write_text(json.dumps(self.config(), indent=2, default=str) + "\n")
            plot_confusion(np.array(m["confusion"]), self.classes, self.out / "confusion.png",
                           f"{a.corpus} {self.folds_split}: WA {m['wa']:.1%}  UA {m['ua']:.1%}")
            last = self.last or self._last_from_checkpoint()
            if last is not None and last["embeddings"] is not None and len(last["embeddings"]) > 2:
                plot_embeddings(last["embeddings"], last["labels"], last["centers"], self.classes,
                                self.out / "embeddings.png", f"test embeddings, {self.fold_results[-1]['name']}")
        return metrics

    def _last_from_checkpoint(self):
        """After a resume that had nothing left to train: recompute the last fold's test embeddings."""
        ckpt = torch.load(self.ckpt_path, weights_only=True) if self.ckpt_path.exists() else None
        if not ckpt or "final" not in ckpt:
            return None
        fin = ckpt["final"]
        fold = self.folds[fin["fold"]]
        model = self.new_model()
        model.load_state_dict(fin["model"])
        norm = Normalizer(**fin["norm"])
        batcher = Batcher(self.table.feats, self.table.frames, self.table.labels, norm, self.device, 300)
        test = self.evaluate(model, batcher, torch.from_numpy(fold.test), embeddings=True)
        centers = fin["objective"].get("center_loss.centers")
        return {"embeddings": test["embeddings"], "labels": test["y_true"],
                "centers": centers.numpy() if centers is not None else None}


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _log(msg: str, args) -> None:
    if args.no_progress:
        print(msg, flush=True)
    else:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)


def _maybe_interrupt() -> None:
    """Test hook: FASTSER_INTERRUPT_AFTER_EPOCHS=N stops the process after N checkpointed epochs."""
    limit = os.environ.get("FASTSER_INTERRUPT_AFTER_EPOCHS")
    if limit is None:
        return
    _maybe_interrupt.count = getattr(_maybe_interrupt, "count", 0) + 1
    if _maybe_interrupt.count >= int(limit):
        raise KeyboardInterrupt(f"interrupted after {limit} epochs (FASTSER_INTERRUPT_AFTER_EPOCHS)")


# ----------------------------------------------------------------------------- entry point

def _out_dir(args, info) -> Path:
    if args.out is None and args.resume is not None:
        res = Path(args.resume)
        args.out = str(res if res.is_dir() else res.parent)
    if args.out is None:
        stamp = [dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if info.enabled:
            dist.broadcast_object_list(stamp, src=0)  # one folder for all ranks
        args.out = str(Path("runs") / stamp[0])
    out = Path(args.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _LAST_OUT.append(out)
    return out


def load_table(args, info):
    kinds = list(FEATURE_KINDS) if args.features == "both" else [args.features]
    options = {"subset": args.iemocap_subset} if args.corpus == "iemocap" else {}
    if args.corpus == "synthetic":
        options = {"seed": args.seed, "n_speakers": args.synthetic_speakers, "per_class": args.synthetic_per_class}
    corpus = load_corpus(args.corpus, args.data_dir, **options)
    corpus = corpus.with_classes(args.classes)
    cache_dir = None
    if args.corpus != "synthetic" and not args.no_cache:
        cache_dir = args.cache_dir or os.path.join(args.data_dir, ".fastser-cache")
        if not os.access(os.path.dirname(os.path.abspath(cache_dir)) or ".", os.W_OK):
            cache_dir = os.path.join(tempfile.gettempdir(), "fastser-cache")
    table = build_feature_table(corpus, kinds, info.device, cache_dir=cache_dir, strict=args.strict,
                                max_seconds=args.max_seconds, progress=info.is_main and not args.no_progress,
                                is_builder=info.is_main, wait=info.barrier)
    if table.corpus.skipped and info.is_main:
        listing = "\n  ".join(f"{p}: {r}" for p, r in table.corpus.skipped[:50])
        more = f"\n  ... and {len(table.corpus.skipped) - 50} more" if len(table.corpus.skipped) > 50 else ""
        print(f"warning: skipped {len(table.corpus.skipped)} bad files (listed in metrics.json; --strict makes "
              f"them an error):\n  {listing}{more}", file=sys.stderr)
    return table


def main(argv=None) -> dict:
    """Train as the command line would and return the metrics (the CLI itself is `cli`)."""
    args = parse_args(argv)
    with deterministic_mode(args.deterministic):
        info = fdist.setup(args.device)
        try:
            return _main(args, info)
        finally:
            fdist.teardown(info)


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Everything a run needs to be bit-identical for a seed on one device: cuBLAS's fixed workspace
    (read when cuBLAS starts, so set before any CUDA work), deterministic cuDNN algorithms without
    benchmarking, and torch's deterministic mode, which also raises on any op that has no
    deterministic kernel. The center loss gets deterministic=True from the objective. The previous
    settings come back afterwards (main() may be called from a notebook or a test)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


_LAST_OUT: list = []  # the run folder, for the one-line Ctrl-C message


def _resume_hint() -> str:
    return f"continue with --resume {_LAST_OUT[-1]}" if _LAST_OUT else ""


def cli(argv=None) -> int:
    """`fastser-train` / `python -m fastser.train`: exit 0, or 2 with one line naming a bad input."""
    return run_cli(main, "fastser.train", argv, interrupted_hint=_resume_hint)


def _main(args, info) -> dict:
    out = _out_dir(args, info)
    try:
        return _train(args, info, out)
    except BaseException:
        if info.is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        raise


def _train(args, info, out: Path) -> dict:
    t0 = time.perf_counter()
    table = load_table(args, info)
    split = args.split or table.corpus.default_split
    folds = make_folds(table.corpus, split, n_folds=args.folds, seed=args.seed)
    if args.max_folds:
        folds = folds[: args.max_folds]
    shared = [f.name for f in folds if not f.val_speaker_disjoint]
    if shared and info.is_main:
        print(f"warning: {table.corpus.name} has too few speakers for a speaker-disjoint validation set in "
              f"{len(shared)} of {len(folds)} folds: early stopping there uses held-out utterances of training "
              f"speakers (flagged per fold in metrics.json)", file=sys.stderr)
    if info.is_main:
        _log(f"{table.corpus.summary()} | split {split}: {len(folds)} folds | device {info.device}"
             f" x{info.world_size} | out {out}", args)

    def experiment(sub: Path, use_center: bool, use_recon: bool) -> dict:
        if info.is_main:
            sub.mkdir(parents=True, exist_ok=True)
        run = Run(args, info, table, folds, sub, args.lambda_center if use_center else 0.0,
                  args.lambda_recon if use_recon else 0.0)
        run.folds_split = split
        resume = Path(args.resume) if args.resume else None
        if resume is not None:
            path = resume if resume.is_file() else resume / (sub.relative_to(out) if sub != out else "") / "checkpoint.pt"
            if path.exists():
                run.resume_from(torch.load(path, weights_only=True))
            elif sub == out:
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        return run.run()

    if args.ablation:
        results = {name: experiment(out / name, c, r) for name, (c, r) in ABLATION.items()}
        if info.is_main:
            _write_ablation(out, results, args)
        metrics = results["center+recon"]
    else:
        metrics = experiment(out, not args.no_center, not args.no_recon)
    if info.is_main:
        _log(f"WA {metrics['wa']:.3f}  UA {metrics['ua']:.3f}  macro-F1 {metrics['macro_f1']:.3f} over "
             f"{metrics['n_test']} test utterances ({len(folds)} folds); skipped files: {metrics['skipped']['count']}; "
             f"{time.perf_counter() - t0:.0f}s; artifacts in {out}", args)
    return metrics


def _write_ablation(out: Path, results: dict, args) -> None:
    rows = {name: {k: m[k] for k in ("wa", "ua", "macro_f1", "n_test", "lambda_center", "lambda_recon")}
            for name, m in results.items()}
    (out / "ablation.json").write_text(json.dumps({"corpus": args.corpus, "seed": args.seed, "results": rows},
                                                  indent=2) + "\n")
    lines = ["| objective | lambda_center | lambda_recon | WA | UA | macro-F1 |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['lambda_center']} | {r['lambda_recon']} | {r['wa']:.1%} | {r['ua']:.1%} | "
                     f"{r['macro_f1']:.1%} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    _log("\n" + "\n".join(lines), args)


if __name__ == "__main__":
    sys.exit(cli())
