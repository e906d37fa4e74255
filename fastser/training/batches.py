"""Batches for training and evaluation, from the in-memory feature table, on the device.

    norm = Normalizer.fit(feats, frames, train_rows)      # per-bin mean/std over the fold's valid frames
    feats = norm.apply(feats, frames)                     # (B, bins, T) -> normalised, padding exactly 0
    batcher = Batcher(feats, frames, labels, norm, device, train_frames)
    batch = batcher.batch(rows, generator)                # a random crop per utterance (training)
    batch = batcher.batch(rows)                           # whole utterances (evaluation)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from fastser.features.post import valid_mask


@dataclasses.dataclass
class Normalizer:
    """Per-bin mean/std of each feature kind over the training fold's valid frames."""
    mean: dict  # kind -> (bins,) float32
    std: dict

    @classmethod
    def fit(cls, feats: dict, frames: torch.Tensor, rows: torch.Tensor) -> "Normalizer":
        """From the feature table: the rows' valid frames."""
        return cls.fit_items({k: x[i, :, : frames[i]] for k, x in feats.items()} for i in rows.tolist())

    @classmethod
    def fit_items(cls, items) -> "Normalizer":
        """From an iterable of per-utterance {kind: (bins, frames)} features (accumulated in float64)."""
        sums: dict = {}
        for item in items:
            for kind, v in item.items():
                s, ss, n = sums.get(kind, (0.0, 0.0, 0))
                v = v.double()
                sums[kind] = (s + v.sum(1), ss + v.square().sum(1), n + v.shape[1])
        mean = {k: (s / max(n, 1)).float() for k, (s, ss, n) in sums.items()}
        std = {k: (ss / max(n, 1) - (s / max(n, 1)) ** 2).clamp(min=1e-8).sqrt().float()
               for k, (s, ss, n) in sums.items()}
        return cls(mean, std)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def to(self, device) -> "Normalizer":
        return Normalizer({k: v.to(device) for k, v in self.mean.items()}, {k: v.to(device) for k, v in self.std.items()})

    def apply(self, feats: dict, frames: torch.Tensor) -> dict:
        """{kind: (B, bins, T)} -> normalised float32; frames past each item's own are exactly 0."""
        valid = valid_mask(frames, next(iter(feats.values())).shape[-1])
        return {k: ((x.float() - self.mean[k][None, :, None]) / self.std[k][None, :, None]) * valid
                for k, x in feats.items()}


class Batch(NamedTuple):
    feats: dict                # kind -> (B, bins, T) normalised, on the device
    frames: torch.Tensor       # (B,) valid frames, on the device
    labels: torch.Tensor       # (B,) on the device
    frames_host: torch.Tensor  # (B,) the same frame counts on the host (no sync to read them)


class Batcher:
    """Builds device batches from the in-memory feature table: crop -> pin -> device -> normalise."""

    def __init__(self, feats: dict, frames: torch.Tensor, labels: torch.Tensor, norm: Normalizer,
                 device: torch.device, train_frames: int):
        self.feats, self.frames, self.labels = feats, frames, labels
        self.device, self.train_frames = device, train_frames
        self.norm = norm.to(device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def batch(self, rows: torch.Tensor, gen: Optional[torch.Generator] = None) -> Batch:
        frames = self.frames[rows]
        if gen is not None:  # training: a random crop of train_frames from each utterance
            T = self.train_frames
            start = (torch.rand(len(rows), generator=gen) * (frames - T).clamp(min=0).add(1)).long()
            frames = (frames - start).clamp(max=T)
            last = next(iter(self.feats.values())).shape[-1] - 1
            t_idx = (start[:, None] + torch.arange(T)[None, :]).clamp(max=last)
        else:
            T = int(frames.max())
            t_idx = None
        frames_dev = self._to_device(frames)
        raw = {}
        for kind, x in self.feats.items():
            sel = x[rows]
            sel = sel[:, :, :T] if t_idx is None else torch.take_along_dim(sel, t_idx[:, None, :], dim=2)
            raw[kind] = self._to_device(sel)
        return Batch(self.norm.apply(raw, frames_dev), frames_dev, self._to_device(self.labels[rows]), frames)


def spec_augment(feats: dict, frames_host: torch.Tensor, gen: torch.Generator, n_masks: int = 2) -> dict:
    """Two frequency and two time masks per item (SpecAugment without warping), drawn on the CPU
    generator from host-side frame counts, so runs are reproducible on any device and need no sync."""
    out = {}
    B = frames_host.shape[0]
    t_start = (torch.rand(B, n_masks, generator=gen) * frames_host[:, None]).long()
    t_width = (torch.rand(B, n_masks, generator=gen) * (0.1 * frames_host[:, None] + 1)).long()
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
