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
    """|STFT|**power (complex STFT for power=None), as librosa.stft / librosa's _spectrogram."""
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
    """Mel power spectrogram, as librosa.feature.melspectrogram (S: a spectrogram to project)."""
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
    """power_to_db(melspectrogram(y, ...), ref, amin, top_db) — one fused kernel after the FFT on CUDA."""
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
    """MFCCs as librosa.feature.mfcc. `norm` is the DCT's (as in librosa); the mel filters' is `mel_norm`.
    S: a log-power mel spectrogram to transform instead of audio."""
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
    """librosa.power_to_db, per utterance: for (B, bins, T) input the max (ref=np.max, top_db) is each
    item's own, over its valid `frames` when given."""
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
