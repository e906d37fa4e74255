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
    """|STFT|**power as a module (torchaudio.transforms.Spectrogram's role, librosa's parameters).

    Args:
        n_fft, hop_length (default n_fft // 4), win_length (default n_fft), window, center,
            pad_mode: the framing, as librosa.stft's.
        power (float or None): 2 a power, 1 a magnitude spectrogram; None the complex STFT.
        backend, check_finite: as fastser.features.functional.spectrogram.

    Shapes: forward(waveform (T,) or padded (B, T) float, lengths (B,) optional) -> (..., 1 + n_fft // 2, frames)
    float32 on the module's device, or (that, frames (B,) int64) with `lengths` (frames past
    each item's own are 0); `frames(lengths)` gives the counts without computing anything.

    Example:
        >>> Spectrogram(n_fft=512, hop_length=160)(torch.randn(2, 16000)).shape
        torch.Size([2, 257, 101])
    """

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
    """Mel power spectrogram as a module, or with `to_db=True` the log-mel.

    Args:
        sr (int): the audio's sample rate in Hz.
        n_fft, hop_length, win_length, window, center, pad_mode, power: as `Spectrogram`.
        n_mels, fmin, fmax (default sr / 2), htk, norm: the mel filters, as librosa.filters.mel.
        to_db (bool): power_to_db with `ref`, `amin` and `top_db`, per utterance (as librosa on
            each item alone).
        backend, check_finite: as fastser.features.functional.melspectrogram.

    Shapes: forward(waveform (T,) or padded (B, T) float, lengths (B,) optional) -> (..., n_mels, frames)
    float32 on the module's device, or (that, frames (B,) int64) with `lengths` (frames past
    each item's own are 0); `frames(lengths)` gives the counts without computing anything.

    Example:
        >>> logmel = MelSpectrogram(sr=16000, n_fft=512, hop_length=160, n_mels=64, to_db=True)
        >>> logmel(torch.randn(2, 16000)).shape
        torch.Size([2, 64, 101])
    """

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
    """MFCCs as a module: the log-mel, then a DCT and a lifter (librosa.feature.mfcc's results).

    Args:
        sr (int): the audio's sample rate in Hz.
        n_mfcc, dct_type, norm, lifter: the DCT, as librosa's (`norm` is the DCT's).
        n_fft, hop_length, win_length, window, center, pad_mode, power, n_mels, fmin, fmax, htk:
            as `MelSpectrogram`; mel_norm: the mel filters' norm.
        ref, amin, top_db: the dB scaling before the DCT, per utterance.
        backend, check_finite: as fastser.features.functional.mfcc.

    Shapes: forward(waveform (T,) or padded (B, T) float, lengths (B,) optional) -> (..., n_mfcc, frames)
    float32 on the module's device, or (that, frames (B,) int64) with `lengths` (frames past
    each item's own are 0); `frames(lengths)` gives the counts without computing anything.

    Example:
        >>> MFCC(sr=16000, n_mfcc=40, n_fft=512, hop_length=160, n_mels=40)(torch.randn(2, 16000)).shape
        torch.Size([2, 40, 101])
    """

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
