"""The model's input, defined once: which features, with which settings, computed how.

    fs = FeatureSet.paper()                         # {"logmel": 64-band log-mel, "mfcc": 40 MFCCs}
    feats, frames = fs.extract(audio, lengths)      # (B, T) audio -> {kind: (B, bins, frames)}, (B,)
    fs.n_bins                                       # {"logmel": 64, "mfcc": 40}
    FeatureSet.from_dict(fs.to_dict()) == fs        # stored in every checkpoint

Training, the feature cache, predict, the reference pipeline (backend="librosa") and the
benchmarks all build their features through this one class. Kinds that share STFT settings
share one STFT. Inference only: features carry no gradient (see fastser.features.transforms for
modules to put in front of a model).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch

from fastser.features.functional import FeatureConfig, extract_many, frame_count, prepare
from fastser.features.prosody import ProsodyConfig, prosody

KINDS = ("logmel", "mfcc")  # the paper's two CNN branches; "prosody" (contours, a 1-D branch) is optional
ALIASES = {"spectrogram": "logmel"}  # the log-mel branch's first name, still in older checkpoints and caches


def canonical_kind(kind: str) -> str:
    return ALIASES.get(kind, kind)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """An ordered mapping kind -> FeatureConfig (the order is the model's branch order)."""

    configs: tuple  # ((kind, FeatureConfig), ...): hashable, so it can key caches

    def __post_init__(self):
        kinds = [k for k, _ in self.configs]
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"a FeatureSet needs distinct kinds, got {kinds}")
        hops = {c.hop_length for _, c in self.configs}
        if len(hops) > 1 or any(getattr(c, "center", True) is False for _, c in self.configs):
            raise ValueError(
                f"the kinds of a FeatureSet share one frame grid (one hop_length, centred frames); "
                f"got hop lengths {sorted(hops)}"
            )

    @classmethod
    def of(cls, configs: dict) -> "FeatureSet":
        return cls(tuple((canonical_kind(k), c) for k, c in configs.items()))

    @classmethod
    def paper(cls, kinds: Iterable[str] = KINDS, sr: int = 16000, n_mels: int = 64, hop_ms: int = 10) -> "FeatureSet":
        """The paper's inputs: 32 ms windows (n_fft 512 at 16 kHz), 10 ms hops (`hop_ms`).

        Args:
            kinds: any of "logmel" (an `n_mels`-band log-mel spectrogram, 80 dB range), "mfcc" (40
                MFCCs from 40 mel bands) and "prosody" (F0, voicing, HNR, level and their changes
                on the same frames, ProsodyConfig), in the model's branch order.
            sr: the audio's sample rate in Hz (the window and hop scale with it).
            n_mels: the log-mel branch's bands.
            hop_ms: milliseconds between frames, every kind's (a whole number of samples at `sr`);
                20 halves the frames, and so every convolution's work, for a coarser time grid.

        Returns:
            FeatureSet: kind -> its FeatureConfig / ProsodyConfig.

        Example:
            >>> FeatureSet.paper(["logmel", "mfcc"]).n_bins
            {'logmel': 64, 'mfcc': 40}
        """
        if sr * hop_ms % 1000:
            raise ValueError(f"a {hop_ms} ms hop is not a whole number of samples at {sr} Hz")
        hop = sr * hop_ms // 1000
        common = dict(sr=sr, n_fft=512 * sr // 16000, hop_length=hop)
        table = {
            "logmel": FeatureConfig("logmel", n_mels=n_mels, top_db=80.0, **common),
            "mfcc": FeatureConfig("mfcc", n_mels=40, n_mfcc=40, top_db=80.0, **common),
            "prosody": ProsodyConfig(sr=sr, hop_length=hop),
        }
        kinds = [canonical_kind(k) for k in kinds]
        unknown = sorted(set(kinds) - set(table))
        if unknown:
            raise ValueError(f"unknown feature kinds {unknown}; choose from {list(table)}")
        return cls(tuple((k, table[k]) for k in kinds))

    # -- mapping view ---------------------------------------------------------------------
    @property
    def kinds(self) -> list:
        return [k for k, _ in self.configs]

    def as_dict(self) -> dict:
        return dict(self.configs)

    def __getitem__(self, kind: str) -> FeatureConfig:
        return self.as_dict()[canonical_kind(kind)]

    @property
    def n_bins(self) -> dict:
        return {k: c.n_bins for k, c in self.configs}

    def frame_count(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames every kind gives for signals of these lengths: all kinds use centred frames of one
        hop (checked on construction), where the window length does not change the count."""
        return frame_count(lengths, 1, self.configs[0][1].hop_length, center=True)

    @property
    def sr(self) -> int:
        return self.configs[0][1].sr

    # -- computing ------------------------------------------------------------------------
    def extract(
        self, audio, lengths=None, backend: str = "auto", autocorrelation: str = "fft"
    ) -> tuple[dict, torch.Tensor]:
        """audio (B, T) or (T,) float tensor (padded; `lengths` (B,) gives each item's samples)
        -> ({kind: (B, bins, frames) float32}, frames (B,)); frames past each item's own are 0.
        Every kind spans the padded length's frames (T // hop + 1), known from the shape, so a
        call never waits for the device (and a traced graph serves any length). One STFT for all
        kinds that share STFT settings (one per setting otherwise). `autocorrelation`: how the
        prosody contours' is computed (fastser.features.prosody.prosody)."""
        if (
            isinstance(audio, torch.Tensor)
            and audio.dim() == 2
            and audio.is_floating_point()
            and isinstance(lengths, torch.Tensor)
        ):
            y, lens = audio, lengths  # the hot path (training, predict): no value scan, no host sync
        else:
            y, lens, _ = prepare(audio, lengths)  # everything else is checked and batched as the functional API does
        out: dict = {}
        frames: Optional[torch.Tensor] = None
        for group in self._stft_groups():
            feats, frames = extract_many(y, lens, [c for _, c in group], backend, span_padding=True)
            out.update({k: f for (k, _), f in zip(group, feats)})
        for kind, cfg in self.configs:
            if isinstance(cfg, ProsodyConfig):
                out[kind], frames = prosody(y, lens.to(y.device, non_blocking=True), cfg, autocorrelation)
        return {k: out[k] for k in self.kinds}, frames

    def _stft_groups(self) -> list:
        from fastser.features.extraction import STFT_FIELDS

        groups: dict = {}
        for kind, cfg in self.configs:
            if isinstance(cfg, FeatureConfig):
                groups.setdefault(tuple(getattr(cfg, f) for f in STFT_FIELDS), []).append((kind, cfg))
        return list(groups.values())

    # -- storing --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: dataclasses.asdict(c) for k, c in self.configs}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSet":
        return cls.of(
            {k: ProsodyConfig(**v) if v.get("kind") == "prosody" else FeatureConfig(**v) for k, v in d.items()}
        )
