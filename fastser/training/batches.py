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

from fastser.functionals import CLIP_KINDS
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
        self.width = max(x.shape[-1] for k, x in feats.items() if k not in CLIP_KINDS)
        self.norm = norm.to(device)
        self.groups = groups  # (N,) each row's group of statistics in `norm` (speaker or utterance), or None
        self.alternatives, self.p_alternative = None, 0.0

    def mix_statistics(self, norm: Normalizer, alternatives: torch.Tensor, p: float) -> None:
        """Training batches then normalise each item, with probability p, with another group of
        `norm`'s statistics: one of alternatives[row] (N, A), drawn uniformly. `norm` extends the
        batcher's own (its first groups are those `groups` index), so evaluation is unchanged."""
        if self.groups is None:
            raise ValueError("mix_statistics needs per-group statistics (groups)")
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.norm, self.alternatives, self.p_alternative = norm.to(self.device), alternatives, p

    def draw_groups(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Each training item's group of statistics (host, (B,)): its own, or with probability
        p_alternative one of its alternatives (see `mix_statistics`)."""
        own = self.groups[rows]
        swap = torch.rand(rows.shape[0], generator=gen) < self.p_alternative
        pick = torch.randint(self.alternatives.shape[1], (rows.shape[0],), generator=gen)
        return torch.where(swap, self.alternatives[rows, pick], own)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def batch(self, rows: torch.Tensor, gen: Optional[torch.Generator] = None, tempo: float = 0.0) -> Batch:
        """rows (B,) of the table -> a Batch. With `gen` (training): a random crop of train_frames
        per utterance; `tempo` > 0 also plays each crop at a random rate in [1 - tempo, 1 + tempo]
        (frames dropped or repeated, see `tempo_crop`). Without `gen`: whole utterances."""
        frames = self.frames[rows]
        groups = self.groups[rows] if self.groups is not None else None
        if gen is not None:
            frames, t_idx = self.draw_crops(rows, gen, tempo)
            T = self.train_frames
            if self.alternatives is not None:
                groups = self.draw_groups(rows, gen)
        else:
            T = min(self.width, -(-int(frames.max()) // self.eval_bucket) * self.eval_bucket)
            t_idx = None
        frames_dev = self._to_device(frames)
        if self.resident:
            rows_dev = self._to_device(rows)
            t_dev = self._to_device(t_idx) if t_idx is not None else None
            drawn = self._to_device(groups) if self.alternatives is not None and gen is not None else None
            return self.gather(rows_dev, t_dev, frames_dev, frames, T, groups=drawn)
        raw = {}
        for kind, x in self.feats.items():
            sel = x[rows]
            if kind not in CLIP_KINDS:  # one column per clip: nothing to crop
                sel = sel[:, :, :T] if t_idx is None else torch.take_along_dim(sel, t_idx[:, None, :], dim=2)
            raw[kind] = self._to_device(sel)
        labels = self._to_device(self.labels[rows])
        groups = self._to_device(groups) if groups is not None else None
        return Batch(self.norm.apply(raw, frames_dev, groups), frames_dev, labels, frames)

    def draw_crops(self, rows: torch.Tensor, gen: torch.Generator, tempo: float = 0.0) -> tuple:
        """The host half of a training batch: (frames (B,), t_idx (B, train_frames)) of each row's
        random crop, drawn on `gen` (see `tempo_crop`); `gather` builds the batch from them."""
        frames, t_idx = tempo_crop(self.frames[rows], self.train_frames, gen, tempo)
        return frames, t_idx.clamp(max=self.width - 1)

    def gather(
        self,
        rows: torch.Tensor,
        t_idx: Optional[torch.Tensor],
        frames: torch.Tensor,
        frames_host: Optional[torch.Tensor] = None,
        T: Optional[int] = None,
        groups: Optional[torch.Tensor] = None,
    ) -> Batch:
        """The device half (resident mode): rows (B,), t_idx (B, T) or None (the first T frames)
        and frames (B,), all on the device -> the normalised Batch, without a host read (a CUDA
        graph captures it). groups (B,) on the device: each item's statistics, when not its row's
        own (`draw_groups`)."""
        raw, labels, own = self._gather_resident(rows, t_idx, T if T is not None else t_idx.shape[1])
        groups = own if groups is None else groups
        return Batch(self.norm.apply(raw, frames, groups), frames, labels, frames_host)

    def _gather_resident(self, rows_dev: torch.Tensor, t_idx: Optional[torch.Tensor], T: int):
        """One gather per kind on the device: (B, bins, T) straight from the resident table."""
        if t_idx is None:
            raw = {k: x[:, :, :T].index_select(0, rows_dev) for k, x in self.feats.items()}
        else:
            t_dev = t_idx[:, None, :]
            raw = {
                k: x.index_select(0, rows_dev)  # one column per clip: nothing to crop
                if k in CLIP_KINDS
                else x[rows_dev[:, None, None], torch.arange(x.shape[1], device=self.device)[None, :, None], t_dev]
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
    run reproduces on any device, no sync). -> (mixed Batch, Mix).
    `draw_mixup` (host) and `apply_mixup` (device) are its two halves."""
    perm, lam = draw_mixup(batch.frames_host.shape[0], gen, alpha)
    device = batch.frames.device
    mixed, mix = apply_mixup(batch, perm.to(device, non_blocking=True), lam.to(device, non_blocking=True))
    return mixed._replace(frames_host=torch.maximum(batch.frames_host, batch.frames_host[perm])), mix


def draw_mixup(B: int, gen: torch.Generator, alpha: float) -> tuple:
    """The host half of `mixup`: (perm (B,) int64, lam (B,) float32 in [0.5, 1])."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    perm = torch.randperm(B, generator=gen)
    lam = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(alpha, alpha, size=B)
    return perm, torch.from_numpy(np.maximum(lam, 1 - lam)).float()


def apply_mixup(batch: Batch, perm: torch.Tensor, lam: torch.Tensor) -> tuple:
    """The device half of `mixup`: perm and lam on the batch's device -> (mixed Batch, Mix); the
    mixed batch's frames_host is left as it was (the host computes it from its own perm)."""
    w = lam[:, None, None]
    feats = {k: x * w + x[perm] * (1 - w) for k, x in batch.feats.items()}
    mixed = Batch(feats, torch.maximum(batch.frames, batch.frames[perm]), batch.labels, batch.frames_host)
    return mixed, Mix(batch.labels[perm], lam)


def spec_augment(feats: dict, frames_host: torch.Tensor, gen: torch.Generator, n_masks: int = 2) -> dict:
    """Two frequency and two time masks per item (SpecAugment without warping), drawn on the CPU
    generator from host-side frame counts, so runs are reproducible on any device and need no sync.
    Only the masks' bounds, one (2 + 2 * kinds, B, n_masks) int64 tensor, travel to the device (one
    non-blocking copy from pinned memory); the masks themselves are built there.
    `draw_spec_masks` (host) and `apply_spec_masks` (device) are its two halves."""
    bins = [x.shape[1] for x in feats.values()]
    bounds = draw_spec_masks(frames_host, bins, gen, n_masks)
    device = next(iter(feats.values())).device
    if device.type != "cpu":
        bounds = (bounds.pin_memory() if torch.cuda.is_available() else bounds).to(device, non_blocking=True)
    return apply_spec_masks(feats, bounds)


def draw_spec_masks(frames_host: torch.Tensor, bins: list, gen: torch.Generator, n_masks: int = 2) -> torch.Tensor:
    """The host half of `spec_augment`: frames_host (B,) and each kind's bin count -> the masks'
    [start, end) bounds, (2 + 2 * len(bins), B, n_masks) int64: time, then each kind's frequency."""
    B = frames_host.shape[0]
    t_start = (torch.rand(B, n_masks, generator=gen) * frames_host[:, None]).long()
    t_width = (torch.rand(B, n_masks, generator=gen) * (0.1 * frames_host[:, None] + 1)).long()
    bounds = [t_start, t_start + t_width]
    for n in bins:
        f_start = (torch.rand(B, n_masks, generator=gen) * n).long()
        f_width = (torch.rand(B, n_masks, generator=gen) * (n // 8 + 1)).long()
        bounds += [f_start, f_start + f_width]
    return torch.stack(bounds)


def apply_spec_masks(feats: dict, bounds: torch.Tensor) -> dict:
    """The device half of `spec_augment`: the masks of `bounds` (on the features' device) applied."""
    device = bounds.device
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


class Augmentation(NamedTuple):
    """How training batches are augmented, declared once for both ways a batch is made: on the host
    (`augmented_batch`) and planned on the host, built on the device (`PlannedBatches`).

    Args:
        tempo: crops read at a random tempo in [1 - tempo, 1 + tempo] (0: off).
        mixup: the Beta(alpha, alpha) of mixup (0: off).
        specaugment: two time and two frequency masks per input kind.
    """

    tempo: float = 0.0
    mixup: float = 0.0
    specaugment: bool = False

    @classmethod
    def of(cls, augment) -> "Augmentation":
        """From a fastser.config.AugmentConfig."""
        return cls(augment.tempo, augment.mixup, augment.specaugment)


def augmented_batch(batcher: Batcher, rows: torch.Tensor, gen: torch.Generator, augmentation: Augmentation) -> tuple:
    """A training batch made on the host: -> (feats, targets, frames, labels, mix), as
    `PlannedBatches.build` returns it: the inputs (SpecAugment masked), the reconstruction targets
    (unmasked), valid frames, labels and the Mix (or None)."""
    batch = batcher.batch(rows, gen, tempo=augmentation.tempo)
    mix = None
    if augmentation.mixup:  # before SpecAugment: the decoder reconstructs the mixed input
        batch, mix = mixup(batch, gen, augmentation.mixup)
    feats = spec_augment(batch.feats, batch.frames_host, gen) if augmentation.specaugment else batch.feats
    return feats, batch.feats, batch.frames, batch.labels, mix


class PlannedBatches:
    """Training batches of a resident Batcher in two halves, so that one copy a step crosses the bus
    and the device half can live in a CUDA graph:

        batches = PlannedBatches(batcher, batch_size, Augmentation(mixup=0.4))
        plan = batches.plan(rows, gen)          # host: every random draw of the step, packed (int64)
        feats, targets, frames, labels, mix = batches.build(plan.to(device))   # device: no host read

    `plan` draws on `gen` exactly what `Batcher.batch`, `mixup` and `spec_augment` draw, in their
    order, so a run gives the same batches either way. Layout of the (size,) int64 plan: rows (B),
    crop frames (B), crop indices (B x T), then when the batcher mixes statistics each item's group
    (B), with mixup the partners (B) and the weights (B, float64 bits), then with SpecAugment the
    mask bounds ((2 + 2 x kinds) x B x 2)."""

    N_MASKS = 2

    def __init__(self, batcher: Batcher, batch_size: int, augmentation: Augmentation = Augmentation()):
        if not batcher.resident:
            raise ValueError("PlannedBatches needs a resident Batcher (the feature table on the device)")
        self.batcher, self.B, self.T = batcher, batch_size, batcher.train_frames
        self.tempo, self.mixup, self.specaugment = augmentation
        self.bins = [x.shape[1] for x in batcher.feats.values()]
        self.mixes_groups = batcher.alternatives is not None
        self.size = (2 + self.T + self.mixes_groups) * self.B + (2 * self.B if self.mixup else 0)
        self.size += (2 + 2 * len(self.bins)) * self.B * self.N_MASKS if self.specaugment else 0

    def plan(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if rows.shape != (self.B,):
            raise ValueError(f"a planned batch has {self.B} rows, got {tuple(rows.shape)}")
        frames, t_idx = self.batcher.draw_crops(rows, gen, self.tempo)
        parts = [rows, frames, t_idx.reshape(-1)]
        if self.mixes_groups:
            parts.append(self.batcher.draw_groups(rows, gen))
        if self.mixup:
            perm, lam = draw_mixup(self.B, gen, self.mixup)
            parts += [perm, lam.double().view(torch.int64)]
            frames = torch.maximum(frames, frames[perm])
        if self.specaugment:
            parts.append(draw_spec_masks(frames, self.bins, gen, self.N_MASKS).reshape(-1))
        return torch.cat(parts)

    def build(self, plan: torch.Tensor) -> tuple:
        """plan (size,) int64 on the device -> (feats, targets, frames, labels, mix): the step's
        inputs (SpecAugment masked), the reconstruction targets (unmasked), valid frames, labels and
        the Mix (or None)."""
        B, T = self.B, self.T
        rows, frames, t_idx = plan[:B], plan[B : 2 * B], plan[2 * B : (2 + T) * B].view(B, T)
        at, mix, groups = (2 + T) * B, None, None
        if self.mixes_groups:
            groups, at = plan[at : at + B], at + B
        batch = self.batcher.gather(rows, t_idx, frames, groups=groups)
        if self.mixup:
            perm, lam = plan[at : at + B], plan[at + B : at + 2 * B].view(torch.float64).float()
            batch, mix = apply_mixup(batch, perm, lam)
            at += 2 * B
        feats = batch.feats
        if self.specaugment:
            bounds = plan[at:].view(2 + 2 * len(self.bins), B, self.N_MASKS)
            feats = apply_spec_masks(feats, bounds)
        return feats, batch.feats, batch.frames, batch.labels, mix
