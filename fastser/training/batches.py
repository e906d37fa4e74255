"""Batches for training and evaluation, from the in-memory feature table, on the device.

norm = Normalizer.fit(feats, frames, train_rows)      # fastser.normalization: the fold's statistics
batcher = Batcher(feats, frames, labels, norm, device, train_frames, groups=speaker_of_row)
batch = batcher.batch(rows, generator)                # a random crop per utterance (training)
batch = batcher.batch(rows)                           # whole utterances (evaluation)
batch, mix = mixup(batch, generator, alpha=0.2)       # training items mixed in pairs (--mixup)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from fastser.models.objective import Mix
from fastser.normalization import NORMALIZE, Normalizer, utterance_stats  # noqa: F401 - re-exported


class Batch(NamedTuple):
    feats: dict  # kind -> (B, bins, T) normalised, on the device
    frames: torch.Tensor  # (B,) valid frames, on the device
    labels: torch.Tensor  # (B,) on the device
    frames_host: torch.Tensor  # (B,) the same frame counts on the host (no sync to read them)


class Batcher:
    """Builds device batches from the in-memory feature table: crop -> device -> normalise.

    Host mode (the CPU default): rows are cropped on the host, pinned and copied to the device.
    Resident mode (`resident=True`, the default on a GPU): the table lives on the device (one
    copy, about 160 MB per hour of audio for log-mel + MFCC + prosody in fp32) and each batch is one
    gather there; only the row and crop indices, drawn on the host generator (so a run
    reproduces on any device), cross the bus, without a sync. `eval_bucket` rounds the length of
    evaluation batches up to a multiple of that many frames (static shapes for cuDNN's autotuner and
    CUDA graphs; the model ignores the padding)."""

    def __init__(
        self,
        feats: dict,
        frames: torch.Tensor,
        labels: torch.Tensor,
        norm: Normalizer,
        device: torch.device,
        train_frames: int,
        groups: Optional[torch.Tensor] = None,
        resident: Optional[bool] = None,
        eval_bucket: int = 1,
    ):
        self.resident = device.type != "cpu" if resident is None else resident
        if self.resident:  # no copy when the caller already placed the table there
            feats = {k: x.to(device) for k, x in feats.items()}
            self.labels_dev = labels.to(device)
            self.groups_dev = groups.to(device) if groups is not None else None
        self.feats, self.frames, self.labels = feats, frames, labels
        self.device, self.train_frames, self.eval_bucket = device, train_frames, eval_bucket
        self.width = next(iter(feats.values())).shape[-1]
        self.norm = norm.to(device)
        self.groups = groups  # (N,) each row's group of statistics in `norm` (speaker or utterance), or None

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def batch(self, rows: torch.Tensor, gen: Optional[torch.Generator] = None, tempo: float = 0.0) -> Batch:
        """rows (B,) of the table -> a Batch. With `gen` (training): a random crop of train_frames
        per utterance; `tempo` > 0 also plays each crop at a random rate in [1 - tempo, 1 + tempo]
        (frames dropped or repeated, see `tempo_crop`). Without `gen`: whole utterances."""
        frames = self.frames[rows]
        if gen is not None:
            frames, t_idx = tempo_crop(frames, self.train_frames, gen, tempo)
            t_idx = t_idx.clamp(max=self.width - 1)
            T = self.train_frames
        else:
            T = min(self.width, -(-int(frames.max()) // self.eval_bucket) * self.eval_bucket)
            t_idx = None
        frames_dev = self._to_device(frames)
        if self.resident:
            raw, labels, groups = self._gather_resident(rows, t_idx, T)
        else:
            raw = {}
            for kind, x in self.feats.items():
                sel = x[rows]
                sel = sel[:, :, :T] if t_idx is None else torch.take_along_dim(sel, t_idx[:, None, :], dim=2)
                raw[kind] = self._to_device(sel)
            labels = self._to_device(self.labels[rows])
            groups = self._to_device(self.groups[rows]) if self.groups is not None else None
        return Batch(self.norm.apply(raw, frames_dev, groups), frames_dev, labels, frames)

    def _gather_resident(self, rows: torch.Tensor, t_idx: Optional[torch.Tensor], T: int):
        """One gather per kind on the device: (B, bins, T) straight from the resident table."""
        rows_dev = self._to_device(rows)
        if t_idx is None:
            raw = {k: x[:, :, :T].index_select(0, rows_dev) for k, x in self.feats.items()}
        else:
            t_dev = self._to_device(t_idx)[:, None, :]
            raw = {
                k: x[rows_dev[:, None, None], torch.arange(x.shape[1], device=self.device)[None, :, None], t_dev]
                for k, x in self.feats.items()
            }
        groups = self.groups_dev.index_select(0, rows_dev) if self.groups_dev is not None else None
        return raw, self.labels_dev.index_select(0, rows_dev), groups


def tempo_crop(frames: torch.Tensor, T: int, gen: torch.Generator, tempo: float = 0.0) -> tuple:
    """A random crop of T output frames from each utterance, at a random playback rate.

    frames (B,) valid frames per utterance (host). Returns (frames_out (B,), t_idx (B, T)): output
    frame j of item i reads source frame t_idx[i, j]; frames_out[i] of them are valid.
    With tempo = 0 this is a plain crop (start + j); with tempo > 0 each item draws a rate r in
    [1 - tempo, 1 + tempo] and reads start + floor(j * r): r > 1 drops frames (faster speech),
    r < 1 repeats them (slower). Tempo changes the duration of phones and pauses but not the
    spectrum, pitch or level, so the labels stay true. Draws come from the host generator `gen` (a
    run reproduces on any device); tempo = 0 draws exactly what the plain crop always drew."""
    B = frames.shape[0]
    if tempo > 0:
        if not tempo < 1:
            raise ValueError(f"tempo must be in [0, 1), got {tempo}")
        rate = 1 + tempo * (2 * torch.rand(B, generator=gen, dtype=torch.float64) - 1)
        span = (T * rate).ceil().long()  # source frames a full crop covers
    else:
        rate, span = None, torch.full((B,), T, dtype=torch.long)
    start = (torch.rand(B, generator=gen) * (frames - span).clamp(min=0).add(1)).long()
    j = torch.arange(T)
    if rate is None:
        return (frames - start).clamp(max=T), start[:, None] + j[None, :]
    t_idx = start[:, None] + (j[None, :] * rate[:, None]).floor().long()
    # output frame j is valid while its source frame is: j * r < frames - start
    return ((frames - start) / rate).ceil().long().clamp(max=T), t_idx


def mixup(batch: Batch, gen: torch.Generator, alpha: float) -> tuple:
    """Mixup (Zhang et al., 2018) within a training batch: item i becomes lam_i * item i +
    (1 - lam_i) * item perm(i), every feature kind alike, lam ~ Beta(alpha, alpha) folded to
    [0.5, 1] (the item keeps the larger share, so its own label stays the dominant one: the center
    loss and the training accuracy use it, while the cross-entropy weighs both labels, `Mix`).
    A mixed item is valid as far as the longer of the two (padding is 0, so past the shorter one
    only the longer one remains). The pairing and the weights are drawn on the CPU generator (a
    run reproduces on any device, no sync). -> (mixed Batch, Mix)."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    B = batch.frames_host.shape[0]
    perm = torch.randperm(B, generator=gen)
    lam = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(alpha, alpha, size=B)
    lam = torch.from_numpy(np.maximum(lam, 1 - lam)).float()
    device = batch.frames.device
    perm_dev, lam_dev = perm.to(device, non_blocking=True), lam.to(device, non_blocking=True)
    w = lam_dev[:, None, None]
    feats = {k: x * w + x[perm_dev] * (1 - w) for k, x in batch.feats.items()}
    mixed = Batch(
        feats,
        torch.maximum(batch.frames, batch.frames[perm_dev]),
        batch.labels,
        torch.maximum(batch.frames_host, batch.frames_host[perm]),
    )
    return mixed, Mix(batch.labels[perm_dev], lam_dev)


def spec_augment(feats: dict, frames_host: torch.Tensor, gen: torch.Generator, n_masks: int = 2) -> dict:
    """Two frequency and two time masks per item (SpecAugment without warping), drawn on the CPU
    generator from host-side frame counts, so runs are reproducible on any device and need no sync.
    Only the masks' bounds, one (2 + 2 * kinds, B, n_masks) int64 tensor, travel to the device (one
    non-blocking copy from pinned memory); the masks themselves are built there."""
    B = frames_host.shape[0]
    t_start = (torch.rand(B, n_masks, generator=gen) * frames_host[:, None]).long()
    t_width = (torch.rand(B, n_masks, generator=gen) * (0.1 * frames_host[:, None] + 1)).long()
    bounds = [t_start, t_start + t_width]
    for x in feats.values():
        bins = x.shape[1]
        f_start = (torch.rand(B, n_masks, generator=gen) * bins).long()
        f_width = (torch.rand(B, n_masks, generator=gen) * (bins // 8 + 1)).long()
        bounds += [f_start, f_start + f_width]
    device = next(iter(feats.values())).device
    bounds = torch.stack(bounds)
    if device.type != "cpu":
        bounds = (bounds.pin_memory() if torch.cuda.is_available() else bounds).to(device, non_blocking=True)
    t_lo, t_hi = bounds[0, ..., None], bounds[1, ..., None]
    out = {}
    for i, (kind, x) in enumerate(feats.items()):
        bins, T = x.shape[1], x.shape[2]
        f_lo, f_hi = bounds[2 + 2 * i, ..., None], bounds[3 + 2 * i, ..., None]
        t = torch.arange(T, device=device)
        f = torch.arange(bins, device=device)
        tmask = ((t >= t_lo) & (t < t_hi)).any(1)
        fmask = ((f >= f_lo) & (f < f_hi)).any(1)
        out[kind] = x * ~(fmask[:, :, None] | tmask[:, None, :])
    return out
