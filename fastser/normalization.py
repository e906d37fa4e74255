"""Input statistics: per-bin mean and std of each feature kind, for training and for inference.

    norm = Normalizer.fit(feats, frames, train_rows)      # per-bin mean/std over the rows' valid frames
    feats = norm.apply(feats, frames)                     # (B, bins, T) -> normalised, padding exactly 0
    norm = Normalizer.fit_groups(feats, frames, speaker_of_row, n_speakers)   # or per speaker
    feats = norm.apply(feats, frames, groups)             # groups (B,): each item's speaker
    norm = Normalizer.fit_items(per_utterance_feats)      # from enrollment audio (predict)

Training, predict, export and the reference pipeline share it; it depends on nothing of training.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fastser.features.post import valid_mask
from fastser.functionals import CLIP_KINDS

NORMALIZE = ("speaker", "utterance", "corpus")


@dataclasses.dataclass
class Normalizer:
    """Per-bin mean/std of each feature kind, for one group of frames or for many.

    mean[kind], std[kind]: (bins,) — one set for every item (`fit`: the training fold's frames) —
    or (G, bins), one set per group (`fit_groups`: per speaker or per utterance), where `apply`
    takes each item's group index. Statistics never use labels, so a test speaker's own
    (unlabelled) audio may give its statistics."""

    mean: dict
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
        return cls._from_sums(
            {k: s for k, (s, _, _) in sums.items()},
            {k: ss for k, (_, ss, _) in sums.items()},
            {k: torch.tensor(float(n), dtype=torch.float64) for k, (_, _, n) in sums.items()},
        )

    @classmethod
    def fit_groups(
        cls, feats: dict, frames: torch.Tensor, groups: torch.Tensor, n_groups: int, chunk: int = 64
    ) -> "Normalizer":
        """From the feature table ({kind: (N, bins, T)}, zero past frames[i]): one set of statistics
        per group, groups (N,) in [0, n_groups) — e.g. each row's speaker, or arange(N) for
        utterance-level statistics. Float64 sums, `chunk` rows at a time."""
        counts, sums, sqs = {}, {}, {}
        for kind, x in feats.items():
            weight = torch.ones_like(frames) if kind in CLIP_KINDS else frames
            counts[kind] = torch.zeros(n_groups, 1, dtype=torch.float64, device=frames.device)
            counts[kind].index_add_(0, groups, weight.double()[:, None])
            s, ss = _row_sums(x, None, chunk)
            sums[kind] = s.new_zeros(n_groups, x.shape[1]).index_add_(0, groups, s)
            sqs[kind] = torch.zeros_like(sums[kind]).index_add_(0, groups, ss)
        return cls._from_sums(sums, sqs, counts)

    @classmethod
    def fit_subsets(
        cls, feats: dict, frames: torch.Tensor, members: torch.Tensor, n_groups: int, chunk: int = 64
    ) -> "Normalizer":
        """One set of statistics per group of rows of the feature table, where groups may share rows
        (a few enrollment clips per utterance): members (P, 2) of (group, row) pairs, every group in
        [0, n_groups) with at least one row. Float64 sums, each row's computed once."""
        group, row = members[:, 0], members[:, 1]
        rows, inverse = torch.unique(row, return_inverse=True)
        counts, sums, sqs = {}, {}, {}
        for kind, x in feats.items():
            weight = torch.ones_like(row) if kind in CLIP_KINDS else frames[row]
            counts[kind] = torch.zeros(n_groups, 1, dtype=torch.float64).index_add_(0, group, weight.double()[:, None])
            s, ss = _row_sums(x, rows, chunk)  # each shared row's once
            sums[kind] = s.new_zeros(n_groups, x.shape[1]).index_add_(0, group, s[inverse])
            sqs[kind] = torch.zeros_like(sums[kind]).index_add_(0, group, ss[inverse])
        return cls._from_sums(sums, sqs, counts)

    @classmethod
    def concat(cls, norms: list) -> "Normalizer":
        """The groups of several Normalizers one after the other (a single set counts as one group)."""
        kinds = norms[0].mean
        as_groups = lambda t: t if t.dim() == 2 else t[None]  # noqa: E731
        return cls(
            {k: torch.cat([as_groups(n.mean[k]) for n in norms]) for k in kinds},
            {k: torch.cat([as_groups(n.std[k]) for n in norms]) for k in kinds},
        )

    @classmethod
    def _from_sums(cls, sums: dict, sqs: dict, counts: dict) -> "Normalizer":
        stats = {k: mean_std(sums[k], sqs[k], counts[k]) for k in sums}
        return cls({k: m for k, (m, _) in stats.items()}, {k: s for k, (_, s) in stats.items()})

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def to(self, device) -> "Normalizer":
        return Normalizer(
            {k: v.to(device) for k, v in self.mean.items()}, {k: v.to(device) for k, v in self.std.items()}
        )

    def apply(self, feats: dict, frames: torch.Tensor, groups: Optional[torch.Tensor] = None) -> dict:
        """{kind: (B, bins, T)} -> normalised float32; frames past each item's own are exactly 0.
        groups (B,): each item's row of per-group statistics (required when there are several). A
        kind of CLIP_KINDS ((B, F, 1), one column per clip) has no padding: it is not masked."""
        valid = valid_mask(frames, max(x.shape[-1] for k, x in feats.items() if k not in CLIP_KINDS))
        out = {}
        for k, x in feats.items():
            mean, std = self.mean[k], self.std[k]
            if mean.dim() == 1:
                mean, std = mean[None, :, None], std[None, :, None]
            elif groups is None:
                raise ValueError(f"this Normalizer has {mean.shape[0]} groups of statistics: pass each item's group")
            else:
                mean, std = mean[groups][:, :, None], std[groups][:, :, None]
            out[k] = (x.float() - mean) / std if k in CLIP_KINDS else ((x.float() - mean) / std) * valid
        return out


def mean_std(sums: torch.Tensor, sq_sums: torch.Tensor, counts: torch.Tensor) -> tuple:
    """(mean, std) float32 from float64 sums of values and of their squares over `counts` frames
    (at least 1; broadcastable), the std floored at 1e-4: the one formula of every statistic here."""
    n = counts.clamp(min=1)
    m = sums / n
    return m.float(), (sq_sums / n - m.square()).clamp(min=1e-8).sqrt().float()


def _row_sums(x: torch.Tensor, rows: Optional[torch.Tensor] = None, chunk: int = 64) -> tuple:
    """Each row's (of `rows`, or all of x (N, bins, T)) float64 sum and sum of squares over time,
    (R, bins) each, `chunk` rows at a time. Padding is exactly 0: it adds nothing to the sums."""
    n = x.shape[0] if rows is None else rows.shape[0]
    s = torch.empty(n, x.shape[1], dtype=torch.float64, device=x.device)
    ss = torch.empty_like(s)
    for start in range(0, n, chunk):
        v = (x[start : start + chunk] if rows is None else x[rows[start : start + chunk]]).double()
        s[start : start + chunk], ss[start : start + chunk] = v.sum(-1), v.square().sum(-1)
    return s, ss


def utterance_stats(feats: dict, frames: torch.Tensor) -> Normalizer:
    """Each item's own per-bin statistics ({kind: (B, bins, T)} zero past frames) -> Normalizer with
    B groups; apply it with groups=arange(B). The fallback when no speaker audio is at hand."""
    return Normalizer.fit_groups(feats, frames, torch.arange(frames.shape[0], device=frames.device), frames.shape[0])


def enrollment_subsets(speakers: torch.Tensor, rows: torch.Tensor, k: int, gen: torch.Generator, draws: int = 1):
    """What a user with k enrollment clips has: for each of `rows` (R,), `draws` random sets of k
    other rows of the same speaker (speakers (N,) int: each row's; all the others when the speaker
    has k or fewer). -> members (P, 2) of (group, row) pairs for `Normalizer.fit_subsets`, group
    i * draws + d for rows[i]'s d-th draw. Drawn on the host generator `gen`."""
    by_speaker = {int(s): torch.nonzero(speakers == s).flatten() for s in torch.unique(speakers[rows]).tolist()}
    members = []
    for i, r in enumerate(rows.tolist()):
        others = by_speaker[int(speakers[r])]
        others = others[others != r]
        if others.numel() == 0:  # a speaker with one clip: its own is all there is
            others = torch.tensor([r])
        for d in range(draws):
            pick = others[torch.randperm(others.numel(), generator=gen)[:k]]
            members.append(torch.stack([torch.full_like(pick, i * draws + d), pick], 1))
    return torch.cat(members)


class TableStatistics:
    """The statistics a feature table's rows can be normalised with, each made on first use and
    kept: one set per speaker or per utterance (`groups`), from k random other clips of a row's
    speaker (`enrollment`), and the mixtures enrollment dropout trains with (`mixed`). They use no
    labels, so every fold of an experiment shares them.

    Args:
        table: a feature table (fastser.data.cache): `feats` {kind: (N, bins, T)}, `frames` (N,),
            `speakers` (N,), `n_utterances` and `copies` (perturbed copies appended after the
            originals, each its own speaker).
    """

    def __init__(self, table):
        self.table = table
        self._groups: dict = {}

    def groups(self, level: str) -> tuple:
        """(Normalizer, groups (N,)) with one set of statistics per speaker or per utterance of the
        table. They use no labels, so they are the same in every fold (a test speaker's come from
        its own unlabelled audio, as a deployed model would get them from enrollment audio)."""
        if level not in self._groups:
            n = self.table.frames.shape[0]
            if level == "speaker":
                names = self.table.speakers  # a speed-perturbed copy is its own speaker
                index = {s: i for i, s in enumerate(sorted(set(names.tolist())))}
                groups = torch.tensor([index[s] for s in names.tolist()], dtype=torch.long)
            else:
                groups = torch.arange(n)
            norm = Normalizer.fit_groups(self.table.feats, self.table.frames, groups, int(groups.max()) + 1)
            self._groups[level] = (norm, groups)
        return self._groups[level]

    def for_level(self, level: str, train_rows: Optional[torch.Tensor] = None) -> tuple:
        """(Normalizer, groups (N,) or None) for a normalisation level: "corpus" the training rows'
        pooled statistics (no groups), "speaker" / "utterance" each row's own group's."""
        if level == "corpus":
            return Normalizer.fit(self.table.feats, self.table.frames, train_rows), None
        return self.groups(level)

    def enrollment(self, rows: torch.Tensor, k: int, gen: torch.Generator, draws: int = 1) -> Normalizer:
        """For each of `rows`, `draws` sets of statistics from k random other clips of its speaker
        (all of them when it has k or fewer): what predict computes from k enrollment clips.
        Group i * draws + d is rows[i]'s d-th draw."""
        _, speakers = self.groups("speaker")
        members = enrollment_subsets(speakers, rows, k, gen, draws)
        return Normalizer.fit_subsets(self.table.feats, self.table.frames, members, rows.shape[0] * draws)

    def mixed(self, train_rows: torch.Tensor, corpus_norm: Normalizer, seed: int, clips: tuple) -> tuple:
        """Enrollment dropout: what a training item may be normalised with instead of its
        speaker's statistics, each source an equal share: the training rows' pooled ones
        (`corpus_norm`, predict's fallback without enrollment), the item's own, and k other clips
        of its speaker for each k in `clips` (4 random sets each). -> (Normalizer, alternatives (N, A)) for
        `Batcher.mix_statistics`; the Normalizer's first groups are the speakers', as before."""
        speaker_norm, speakers = self.groups("speaker")
        utterance_norm, _ = self.groups("utterance")
        n, n_speakers, draws = speakers.shape[0], speaker_norm.mean[next(iter(speaker_norm.mean))].shape[0], 4
        # the training rows with their perturbed copies (each copy is its own speaker)
        rows = torch.cat([train_rows + c * self.table.n_utterances for c in range(1 + len(self.table.copies))])
        gen = torch.Generator().manual_seed(seed)
        parts, offset = [speaker_norm, corpus_norm, utterance_norm], n_speakers + 1 + n
        columns = [torch.full((rows.shape[0], draws), n_speakers), (n_speakers + 1 + rows)[:, None].repeat(1, draws)]
        for k in clips:
            parts.append(self.enrollment(rows, k, gen, draws))
            columns.append(offset + torch.arange(rows.shape[0] * draws).view(-1, draws))
            offset += rows.shape[0] * draws
        alternatives = speakers[:, None].repeat(1, len(columns) * draws)  # rows not trained on: unused
        alternatives[rows] = torch.cat(columns, 1)
        return Normalizer.concat(parts), alternatives
