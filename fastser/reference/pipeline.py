"""The usual SER training pipeline, as practitioners glue it together today — the baseline that
fastser is measured against, and an independent cross-check of its accuracy:

  * librosa features computed one utterance at a time in torch DataLoader workers (CPU, fp32;
    as many workers as cores and pinned memory when the model is on a GPU: `reference_loader`);
  * the same model as fastser (fastser.models.SERModel) in fp32, on the GPU when there is one;
  * the usual center-loss module (B x C distance matrix) whose centers a second SGD optimizer moves,
    with their gradient rescaled by 1/lambda_c (the common recipe);
  * CE + lambda_c * center + lambda_r * masked MSE, as in fastser.

`python -m fastser.reference` trains it on the same synthetic holdout fold as `python -m fastser.train`
and prints WA/UA.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fastser.features.featureset import FeatureSet
from fastser.metrics import summarize
from fastser.models import masked_mse
from fastser.reference.center_loss import ReferenceCenterLoss
from fastser.normalization import Normalizer
from fastser.checkpoints import ModelSpec, build_model


FEATURES = FeatureSet.paper()  # the same settings as fastser's, computed by librosa


def librosa_features(y: np.ndarray) -> dict:
    """The model's inputs for one utterance, computed the way a librosa user would: one librosa call
    per feature kind on this utterance alone (FeatureSet's "librosa" backend)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa's "n_fft too large" for very short clips
        feats, _ = FEATURES.extract(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)), backend="librosa")
    return {k: v[0].numpy() for k, v in feats.items()}


class LibrosaDataset(Dataset):
    def __init__(self, audio, labels, kinds, crop_frames=None, seed: int = 0):
        self.audio, self.labels, self.kinds = audio, labels, kinds
        self.crop = crop_frames
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        feats = librosa_features(self.audio[i])
        T = next(iter(feats.values())).shape[1]
        start = 0
        if self.crop is not None and T > self.crop:
            start = int(self.rng.integers(0, T - self.crop + 1))
        end = T if self.crop is None else start + self.crop
        return {k: torch.from_numpy(feats[k][:, start:end]) for k in self.kinds}, int(self.labels[i])


def collate(items):
    T = max(next(iter(f.values())).shape[1] for f, _ in items)
    frames = torch.tensor([next(iter(f.values())).shape[1] for f, _ in items])
    feats = {k: torch.stack([F.pad(f[k], (0, T - f[k].shape[1])) for f, _ in items]) for k in items[0][0]}
    return feats, frames, torch.tensor([label for _, label in items])


def reference_loader(
    dataset,
    batch_size: int,
    device,
    *,
    shuffle: bool = False,
    seed: int = 0,
    workers: Optional[int] = None,
    drop_last: bool = False,
) -> DataLoader:
    """The DataLoader a practitioner sets up: one worker per core computing librosa features
    (kept alive between epochs), pinned batches when the model trains on a GPU."""
    workers = os.cpu_count() or 1 if workers is None else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


class ReferenceTrainer:
    def __init__(
        self,
        input_bins: dict,
        num_classes: int,
        *,
        lambda_center=0.003,
        lambda_recon=0.1,
        lr=2e-3,
        center_lr=0.5,
        width=16,
        embed_dim=128,
        class_weights=None,
        norm: Normalizer = None,
        device="cpu",
    ):
        spec = ModelSpec(
            FeatureSet.paper(input_bins),
            tuple(range(num_classes)),
            width=width,
            embed_dim=embed_dim,
            reconstruct=lambda_recon > 0,
            normalize="corpus",
        )
        self.device = torch.device(device)
        self.model = build_model(spec).to(self.device)
        self.center_loss = ReferenceCenterLoss(num_classes, embed_dim, use_gpu=self.device.type == "cuda")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-3)
        self.opt_center = torch.optim.SGD(self.center_loss.parameters(), lr=center_lr)
        self.lambda_center, self.lambda_recon = lambda_center, lambda_recon
        self.class_weights = class_weights.to(self.device) if class_weights is not None else None
        self.norm = norm.to(self.device) if norm is not None else None

    def to_device(self, feats, frames, labels):
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731  (pinned by the loader)
        return {k: move(v) for k, v in feats.items()}, move(frames), move(labels)

    def normalise(self, feats, frames):
        return self.norm.apply(feats, frames) if self.norm is not None else feats

    def step(self, feats, frames, labels) -> float:
        """One optimizer step; returns the loss as a float (a host sync, as the usual loop logs it)."""
        self.model.train()
        feats, frames, labels = self.to_device(feats, frames, labels)
        feats = self.normalise(feats, frames)
        out = self.model(feats, frames)
        loss = F.cross_entropy(out.logits, labels, weight=self.class_weights)
        if self.lambda_center > 0:
            loss = loss + self.lambda_center * self.center_loss(out.embedding, labels)
        if self.lambda_recon > 0:
            loss = loss + self.lambda_recon * sum(
                masked_mse(r, feats[k], frames) for k, r in out.reconstruction.items()
            ) / len(out.reconstruction)
        self.opt.zero_grad()
        self.opt_center.zero_grad()
        loss.backward()
        if self.lambda_center > 0:
            for p in self.center_loss.parameters():  # undo lambda_c's scaling of the centers' gradient
                p.grad.data *= 1.0 / self.lambda_center
        self.opt.step()
        self.opt_center.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, loader) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        ys, ps = [], []
        for feats, frames, labels in loader:
            feats, frames, _ = self.to_device(feats, frames, labels)
            ps.append(self.model(self.normalise(feats, frames), frames).logits.argmax(1).cpu())
            ys.append(labels)
        return torch.cat(ys).numpy(), torch.cat(ps).numpy()


def fit_stats(dataset: LibrosaDataset) -> Normalizer:
    """Per-bin mean/std over the training utterances' features (fastser's Normalizer)."""
    return Normalizer.fit_items(dataset[i][0] for i in range(len(dataset)))


def main(argv=None) -> dict:
    from fastser.data import load_corpus, make_folds

    ap = argparse.ArgumentParser(prog="python -m fastser.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: one per core)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    corpus = load_corpus("synthetic")
    fold = make_folds(corpus, "holdout", seed=args.seed)[0]
    audio = [u.audio for u in corpus.utterances]
    labels = corpus.labels
    kinds = FEATURES.kinds
    train = LibrosaDataset([audio[i] for i in fold.train], labels[fold.train], kinds, crop_frames=300, seed=args.seed)
    norm = fit_stats(LibrosaDataset(train.audio, train.labels, kinds))
    counts = np.bincount(train.labels, minlength=len(corpus.classes))
    weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    trainer = ReferenceTrainer(FEATURES.n_bins, len(corpus.classes), class_weights=weights, norm=norm, device=device)
    loader = reference_loader(
        train, args.batch_size, device, shuffle=True, seed=args.seed, workers=args.workers, drop_last=True
    )
    for epoch in range(args.epochs):
        losses = [trainer.step(*batch) for batch in loader]
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.3f}", flush=True)
    test = LibrosaDataset([audio[i] for i in fold.test], labels[fold.test], kinds)
    y, p = trainer.predict(reference_loader(test, 64, device, workers=args.workers))
    m = summarize(y, p, corpus.classes)
    print(f"reference pipeline, synthetic holdout: WA {m['wa']:.3f} UA {m['ua']:.3f}")
    return m
