"""Batched spectrogram, mel spectrogram, log-mel and MFCC with librosa's names, defaults and results.

    spectrogram(y, n_fft=2048, hop_length=None, win_length=None, window="hann", center=True,
                pad_mode="constant", power=2.0)                          -> (..., 1 + n_fft // 2, frames)
    melspectrogram(y, sr=22050, ..., n_mels=128, fmin=0, fmax=None, htk=False, norm="slaney")
    power_to_db(S, ref=1.0, amin=1e-10, top_db=80.0)
    log_melspectrogram(y, ...)  == power_to_db(melspectrogram(y, ...)), fused on the GPU
    mfcc(y, sr=22050, n_mfcc=20, dct_type=2, norm="ortho", lifter=0, ...)  (mel filter norm: mel_norm)

`y` is a 1-D signal or a padded (B, T) batch, a torch tensor or a NumPy array (NumPy in, NumPy
out). With `lengths` (B,) the functions return `(features, frames)`: each item is framed from its
own samples only (its own padding at its own end, as if it were called alone), and frames at or
beyond `frames[b]` are zero. top_db and ref=max act per utterance, over its valid frames.

`backend` picks how they are computed (fastser.features.extraction: "auto", "torch" — the only one
that keeps gradients —, "cpp", "triton", "cupy", "dali", "librosa"); `check_finite` whether NaN/Inf
audio raises (None: on the CPU, where it is free).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fastser.features import post
from fastser.features.extraction import BACKENDS, compute, constants, extract_many, prepare, resolve_backend
from fastser.features.feature_config import FeatureConfig, Ref, normalise_ref, frame_count
from fastser.features.filters import dct_matrix, lifter_weights, mel_filterbank

__all__ = [
    "spectrogram",
    "melspectrogram",
    "log_melspectrogram",
    "mfcc",
    "power_to_db",
    "mel_filterbank",
    "dct_matrix",
    "frame_count",
    "BACKENDS",
    "FeatureConfig",
    "constants",
    "extract_many",
    "prepare",
    "resolve_backend",
]


# ----------------------------------------------------------------------------- public API


def spectrogram(
    y,
    *,
    n_fft: int = 2048,
    hop_length: Optional[int] = None,
    win_length: Optional[int] = None,
    window="hann",
    center: bool = True,
    pad_mode: str = "constant",
    power: Optional[float] = 2.0,
    lengths=None,
    backend: str = "auto",
    check_finite: Optional[bool] = None,
):
    """|STFT|**power of a signal or a padded batch, as librosa.stft / librosa's _spectrogram.

    Args:
        y (Tensor or ndarray): (T,) or padded (B, T) float audio, on any device.
        n_fft, hop_length (default n_fft // 4), win_length (default n_fft), window, center,
            pad_mode: the framing, as librosa's.
        power (float or None): 2 a power, 1 a magnitude spectrogram; None the complex STFT.
        lengths (Tensor, optional): (B,) each item's samples; then `(features, frames)` is
            returned, each item framed from its own samples, frames past `frames[b]` zero.
        backend (str): "auto", "torch" (the only one that keeps gradients), "cpp", "triton",
            "cupy", "dali" or "librosa".
        check_finite (bool or None): NaN/Inf audio raises (None: on the CPU, where it is free).

    Returns:
        (..., 1 + n_fft // 2, frames) float32 (complex64 with power=None) on y's device; NumPy in,
        NumPy out. With `lengths`: (that, frames (B,) int64).

    Example:
        >>> spectrogram(torch.randn(2, 16000), n_fft=512, hop_length=160).shape
        torch.Size([2, 257, 101])
    """
    cfg = FeatureConfig(
        "spectrogram",
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=center,
        pad_mode=pad_mode,
        power=power,
    )
    return compute(y, lengths, cfg, backend, check_finite)


def melspectrogram(
    y=None,
    *,
    sr: int = 22050,
    S=None,
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
    lengths=None,
    backend: str = "auto",
    check_finite: Optional[bool] = None,
):
    """Mel power spectrogram, as librosa.feature.melspectrogram.

    Args:
        y (Tensor or ndarray): (T,) or padded (B, T) float audio (or None with `S`).
        sr (int): the audio's sample rate in Hz.
        S (Tensor or ndarray, optional): a (..., 1 + n_fft // 2, frames) spectrogram to project
            instead of audio.
        n_fft, hop_length, win_length, window, center, pad_mode, power: as `spectrogram`.
        n_mels, fmin, fmax (default sr / 2), htk, norm: the mel filters, as librosa.filters.mel.
        lengths, backend, check_finite: as `spectrogram`.

    Returns:
        (..., n_mels, frames) float32 on y's device (NumPy in, NumPy out); with `lengths`:
        (that, frames (B,) int64).

    Example:
        >>> melspectrogram(torch.randn(2, 16000), sr=16000, n_fft=512, hop_length=160, n_mels=64).shape
        torch.Size([2, 64, 101])
    """
    if S is not None:
        fb = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm)
        St = torch.from_numpy(np.asarray(S)) if isinstance(S, np.ndarray) else S
        out = torch.matmul(fb.to(St.device, St.dtype), St)
        return out.numpy() if isinstance(S, np.ndarray) else out
    cfg = FeatureConfig(
        "mel",
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
    )
    return compute(y, lengths, cfg, backend, check_finite)


def log_melspectrogram(
    y,
    *,
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
    ref: Ref = 1.0,
    amin: float = 1e-10,
    top_db: Optional[float] = 80.0,
    lengths=None,
    backend: str = "auto",
    check_finite: Optional[bool] = None,
):
    """power_to_db(melspectrogram(y, ...), ref, amin, top_db): one fused kernel after the FFT on CUDA.

    Args:
        y (Tensor or ndarray): (T,) or padded (B, T) float audio.
        sr, n_fft, hop_length, win_length, window, center, pad_mode, power, n_mels, fmin, fmax,
            htk, norm: as `melspectrogram`.
        ref, amin, top_db: as `power_to_db` (ref=np.max and top_db per utterance, over its valid
            frames).
        lengths, backend, check_finite: as `spectrogram`.

    Returns:
        (..., n_mels, frames) float32 dB on y's device (NumPy in, NumPy out); with `lengths`:
        (that, frames (B,) int64).

    Example:
        >>> S, frames = log_melspectrogram(torch.randn(2, 16000), sr=16000, n_fft=512, hop_length=160,
        ...                                n_mels=64, lengths=torch.tensor([16000, 8000]))
        >>> S.shape, frames.tolist()
        (torch.Size([2, 64, 101]), [101, 51])
    """
    cfg = FeatureConfig(
        "logmel",
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
    return compute(y, lengths, cfg, backend, check_finite)


def mfcc(
    y=None,
    *,
    sr: int = 22050,
    S=None,
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
    ref: Ref = 1.0,
    amin: float = 1e-10,
    top_db: Optional[float] = 80.0,
    lengths=None,
    backend: str = "auto",
    check_finite: Optional[bool] = None,
):
    """MFCCs as librosa.feature.mfcc.

    Args:
        y (Tensor or ndarray): (T,) or padded (B, T) float audio (or None with `S`).
        sr (int): the audio's sample rate in Hz.
        S (Tensor or ndarray, optional): a (..., n_mels, frames) log-power mel spectrogram to
            transform instead of audio.
        n_mfcc, dct_type, norm, lifter: the DCT, as librosa's (`norm` is the DCT's).
        n_fft, hop_length, win_length, window, center, pad_mode, power, n_mels, fmin, fmax, htk:
            as `melspectrogram`; mel_norm: the mel filters' norm.
        ref, amin, top_db: the dB scaling before the DCT, as `power_to_db`.
        lengths, backend, check_finite: as `spectrogram`.

    Returns:
        (..., n_mfcc, frames) float32 on y's device (NumPy in, NumPy out); with `lengths`:
        (that, frames (B,) int64).

    Example:
        >>> mfcc(torch.randn(2, 16000), sr=16000, n_mfcc=40, n_fft=512, hop_length=160, n_mels=40).shape
        torch.Size([2, 40, 101])
    """
    if S is not None:
        St = torch.from_numpy(np.asarray(S)) if isinstance(S, np.ndarray) else S
        basis = dct_matrix(n_mfcc, St.shape[-2], dct_type, norm).to(St.device, St.dtype)
        out = torch.matmul(basis, St) * lifter_weights(n_mfcc, lifter).to(St.device, St.dtype)[:, None]
        return out.numpy() if isinstance(S, np.ndarray) else out
    cfg = FeatureConfig(
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
    return compute(y, lengths, cfg, backend, check_finite)


def power_to_db(S, *, ref: Ref = 1.0, amin: float = 1e-10, top_db: Optional[float] = 80.0, frames=None):
    """librosa.power_to_db, per utterance.

    Args:
        S (Tensor or ndarray): (..., bins, T) real power spectrogram(s).
        ref (float or callable): the reference power (np.max / torch.amax: each item's own
            maximum over its valid frames).
        amin (float): the floor before the log (> 0).
        top_db (float or None): each item clipped to its maximum minus top_db.
        frames (Tensor, optional): (B,) each item's valid frames (the rest ignored by ref / top_db).

    Returns:
        S's shape, float dB, on S's device (NumPy in, NumPy out).

    Example:
        >>> power_to_db(np.full((64, 10), 0.01, dtype=np.float32))[0, 0]
        np.float32(-20.0)
    """
    if amin <= 0:
        raise ValueError(f"amin must be strictly positive, got {amin}")
    if top_db is not None and top_db < 0:
        raise ValueError(f"top_db must be non-negative, got {top_db}")
    was_numpy = isinstance(S, np.ndarray)
    St = torch.from_numpy(np.asarray(S)) if was_numpy else S
    if St.is_complex():
        raise TypeError("power_to_db expects a real power spectrogram; pass abs(S)**2")
    shape = St.shape
    St = St.reshape(-1, *shape[-2:]) if St.dim() >= 2 else St.reshape(1, 1, -1)
    f = (
        torch.full((St.shape[0],), St.shape[-1], dtype=torch.int64)
        if frames is None
        else torch.as_tensor(frames, dtype=torch.int64).reshape(-1)
    )
    out = post.to_db(St, f.to(St.device), normalise_ref(ref), amin, top_db).reshape(shape)
    return out.numpy() if was_numpy else out
