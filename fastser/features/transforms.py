"""nn.Module front-ends (torchaudio's transforms, librosa's parameters). Window, mel filters and
DCT are buffers, so `.to(device)` moves them and the module can be a model's first layer.

    forward(waveform (T,) or (B, T), lengths=None) -> features (..., bins, frames),
            or (features, frames (B,)) when lengths (B,) is given (padding frames are 0)

Autograd: with backend "auto" (the default) audio that requires grad goes through the "torch"
backend and gets its gradient; the fused backends raise instead of dropping it. `check_finite`:
the NaN/Inf check of the audio, as in fastser.features.functional (by default on the CPU only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastser.features import functional as F
from fastser.features.extraction import extract
from fastser.features.feature_config import normalise_ref


class _Feature(nn.Module):
    def __init__(self, cfg: F.FeatureConfig, backend: str = "auto", check_finite: Optional[bool] = None):
        super().__init__()
        self.cfg = cfg
        self.backend, self.check_finite = backend, check_finite  # check_finite: as fastser.features.functional
        for name, value in F.constants(cfg, torch.device("cpu")).items():
            self.register_buffer(name, value.clone(), persistent=False)  # the cached copy stays pristine

    def forward(self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        y, lens, restore = F.prepare(waveform, lengths, self.check_finite)
        const = {name: buf for name, buf in self.named_buffers()}
        out, frames = extract(y, lens, self.cfg, self.backend, const, uniform=lengths is None)
        return restore(out) if lengths is None else (restore(out), frames)

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frame count for signals of these lengths (to build masks before computing features)."""
        return F.frame_count(lengths, self.cfg.n_fft, self.cfg.hop_length, self.cfg.center)

    @property
    def n_bins(self) -> int:
        return self.cfg.n_bins

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self.cfg).items() if k != "kind")
        return f"{fields}, backend={self.backend!r}"


class Spectrogram(_Feature):
    """|STFT|**power, (..., T) -> (..., 1 + n_fft // 2, frames); power=None gives the complex STFT."""

    def __init__(
        self,
        n_fft: int = 2048,
        hop_length: Optional[int] = None,
        win_length: Optional[int] = None,
        window="hann",
        center: bool = True,
        pad_mode: str = "constant",
        power: Optional[float] = 2.0,
        backend: str = "auto",
        check_finite: Optional[bool] = None,
    ):
        super().__init__(
            F.FeatureConfig(
                "spectrogram",
                n_fft=n_fft,
                hop_length=hop_length,
                win_length=win_length,
                window=window,
                center=center,
                pad_mode=pad_mode,
                power=power,
            ),
            backend,
            check_finite,
        )


class MelSpectrogram(_Feature):
    """Mel power spectrogram, (..., T) -> (..., n_mels, frames); `to_db=True` gives the log-mel
    (power_to_db with ref, amin and top_db per utterance, as librosa on each item alone)."""

    def __init__(
        self,
        sr: int = 22050,
        n_fft: int = 2048,
        hop_length: Optional[int] = None,
        win_length: Optional[int] = None,
        window="hann",
        center: bool = True,
        pad_mode: str = "constant",
        power: float = 2.0,
        n_mels: int = 128,
        fmin: float = 0.0,
        fmax: Optional[float] = None,
        htk: bool = False,
        norm="slaney",
        to_db: bool = False,
        ref=1.0,
        amin: float = 1e-10,
        top_db: Optional[float] = 80.0,
        backend: str = "auto",
        check_finite: Optional[bool] = None,
    ):
        cfg = F.FeatureConfig(
            "logmel" if to_db else "mel",
            sr=sr,
            n_fft=n_fft,
            hop_length=hop_length,
            win_length=win_length,
            window=window,
            center=center,
            pad_mode=pad_mode,
            power=power,
            n_mels=n_mels,
            fmin=fmin,
            fmax=fmax,
            htk=htk,
            mel_norm=norm,
            ref=normalise_ref(ref),
            amin=amin,
            top_db=top_db,
        )
        super().__init__(cfg, backend, check_finite)


class MFCC(_Feature):
    """MFCCs as librosa.feature.mfcc, (..., T) -> (..., n_mfcc, frames): log-mel (mel_norm, ref, amin,
    top_db) then a DCT (dct_type, norm) and a lifter."""

    def __init__(
        self,
        sr: int = 22050,
        n_mfcc: int = 20,
        dct_type: int = 2,
        norm: Optional[str] = "ortho",
        lifter: float = 0.0,
        n_fft: int = 2048,
        hop_length: Optional[int] = None,
        win_length: Optional[int] = None,
        window="hann",
        center: bool = True,
        pad_mode: str = "constant",
        power: float = 2.0,
        n_mels: int = 128,
        fmin: float = 0.0,
        fmax: Optional[float] = None,
        htk: bool = False,
        mel_norm="slaney",
        ref=1.0,
        amin: float = 1e-10,
        top_db: Optional[float] = 80.0,
        backend: str = "auto",
        check_finite: Optional[bool] = None,
    ):
        cfg = F.FeatureConfig(
            "mfcc",
            sr=sr,
            n_fft=n_fft,
            hop_length=hop_length,
            win_length=win_length,
            window=window,
            center=center,
            pad_mode=pad_mode,
            power=power,
            n_mels=n_mels,
            fmin=fmin,
            fmax=fmax,
            htk=htk,
            mel_norm=mel_norm,
            ref=normalise_ref(ref),
            amin=amin,
            top_db=top_db,
            n_mfcc=n_mfcc,
            dct_type=dct_type,
            dct_norm=norm,
            lifter=lifter,
        )
        super().__init__(cfg, backend, check_finite)
