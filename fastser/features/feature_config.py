"""What defines a feature (FeatureConfig: kind, STFT, mel filters, dB, DCT) and how many frames
a signal gives (frame_count, librosa's count); hashable, so it keys caches of windows and filters."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import numpy as np
import torch

from fastser.features import post

PAD_MODES = ("constant", "reflect", "edge", "wrap", "symmetric")
KINDS = ("spectrogram", "mel", "logmel", "mfcc")
Ref = Union[float, Callable, str]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Everything that defines a feature; hashable, so it keys caches of windows and filters."""

    kind: str = "logmel"
    sr: int = 22050
    n_fft: int = 2048
    hop_length: Optional[int] = None
    win_length: Optional[int] = None
    window: str = "hann"
    center: bool = True
    pad_mode: str = "constant"
    power: Optional[float] = 2.0
    n_mels: int = 128
    fmin: float = 0.0
    fmax: Optional[float] = None
    htk: bool = False
    mel_norm: Union[str, float, None] = "slaney"
    ref: Union[float, str] = 1.0  # a number, or "max" (librosa's ref=np.max), per utterance
    amin: float = 1e-10
    top_db: Optional[float] = 80.0
    n_mfcc: int = 20
    dct_type: int = 2
    dct_norm: Optional[str] = "ortho"
    lifter: float = 0.0

    def __post_init__(self):
        win = self.win_length if self.win_length is not None else self.n_fft
        object.__setattr__(self, "win_length", win)
        if self.hop_length is None:
            object.__setattr__(self, "hop_length", win // 4)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_fft < 1 or self.hop_length < 1 or not 1 <= win <= self.n_fft:
            raise ValueError(
                f"need n_fft >= 1, hop_length >= 1 and 1 <= win_length <= n_fft; got n_fft="
                f"{self.n_fft}, hop_length={self.hop_length}, win_length={win}"
            )
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if self.amin <= 0:
            raise ValueError(f"amin must be strictly positive, got {self.amin}")
        if self.top_db is not None and self.top_db < 0:
            raise ValueError(f"top_db must be non-negative, got {self.top_db}")
        if self.power is None and self.kind != "spectrogram":
            raise ValueError("power=None (complex STFT) is only defined for spectrogram()")
        if self.kind != "spectrogram" and self.sr <= 0:
            raise ValueError(f"sr must be positive, got {self.sr}")
        if self.kind == "mfcc" and not 1 <= self.n_mfcc <= self.n_mels:
            raise ValueError(f"need 1 <= n_mfcc <= n_mels, got n_mfcc={self.n_mfcc}, n_mels={self.n_mels}")

    @property
    def n_bins(self) -> int:
        return {"spectrogram": 1 + self.n_fft // 2, "mel": self.n_mels, "logmel": self.n_mels, "mfcc": self.n_mfcc}[
            self.kind
        ]

    @property
    def log_ref(self) -> float:
        return 0.0 if self.ref == "max" else post.log_reference(self.ref, self.amin)


def normalise_ref(ref: Ref) -> Union[float, str]:
    if callable(ref):
        if ref in (np.max, np.amax, torch.max, torch.amax, max):
            return "max"
        raise ValueError("ref must be a number or np.max (per-utterance maximum); other callables are not supported")
    if ref == "max":
        return "max"
    return float(ref)


def frame_count(lengths: Union[torch.Tensor, int], n_fft: int, hop_length: int, center: bool):
    """Frames librosa produces for signals of these lengths (a tensor, or one length as an int)."""
    if center:
        return 1 + lengths // hop_length
    shortest = lengths if isinstance(lengths, int) else (lengths.min() if len(lengths) else n_fft)
    if shortest < n_fft:
        raise ValueError(
            f"with center=False every signal needs at least n_fft={n_fft} samples; the shortest has {int(shortest)}"
        )
    return 1 + (lengths - n_fft) // hop_length
