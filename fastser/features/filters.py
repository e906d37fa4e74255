"""Mel filterbank, DCT matrix and analysis window, defined exactly as librosa defines them.

They are computed once in float64 with NumPy/SciPy and handed to the feature code as tensors.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import scipy.fft
import scipy.signal
import torch


def hz_to_mel(frequencies, htk: bool = False):
    f = np.asanyarray(frequencies, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp = 200.0 / 3  # Slaney's Auditory Toolbox: linear below 1 kHz, logarithmic above
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mels)


def mel_to_hz(mels, htk: bool = False):
    m = np.asanyarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(
    sr: float,
    n_fft: int,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: Optional[float] = None,
    htk: bool = False,
    norm: Union[str, float, None] = "slaney",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triangular mel filters (n_mels, 1 + n_fft // 2), as librosa.filters.mel."""
    if fmax is None:
        fmax = sr / 2.0
    if not 0 <= fmin < fmax:
        raise ValueError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    elif norm is not None:
        if isinstance(norm, str) or norm <= 0:
            raise ValueError(f"norm must be 'slaney', None or a positive number, got {norm!r}")
        length = np.sum(np.abs(weights) ** norm, axis=1, keepdims=True) ** (1.0 / norm)
        weights = np.where(length > np.finfo(np.float32).tiny, weights / np.maximum(length, 1e-300), weights)
    return torch.from_numpy(weights).to(dtype)


def dct_matrix(
    n_mfcc: int, n_mels: int, dct_type: int = 2, norm: Optional[str] = "ortho", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(n_mfcc, n_mels) matrix T with T @ S == scipy.fft.dct(S, type, axis=-2, norm)[:n_mfcc]."""
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"need 1 <= n_mfcc <= n_mels, got n_mfcc={n_mfcc}, n_mels={n_mels}")
    basis = scipy.fft.dct(np.eye(n_mels), type=dct_type, norm=norm, axis=0)
    return torch.from_numpy(basis[:n_mfcc]).to(dtype)


def lifter_weights(n_mfcc: int, lifter: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cepstral liftering 1 + (L/2) sin(pi k / L), k = 1..n_mfcc (librosa's), or ones for L = 0."""
    if lifter < 0:
        raise ValueError(f"lifter must be >= 0, got {lifter}")
    if lifter == 0:
        return torch.ones(n_mfcc, dtype=dtype)
    k = np.arange(1, 1 + n_mfcc, dtype=np.float64)
    return torch.from_numpy(1.0 + (lifter / 2.0) * np.sin(np.pi * k / lifter)).to(dtype)


def analysis_window(window, win_length: int, n_fft: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Periodic window (scipy's get_window with fftbins=True, as librosa), zero-padded to n_fft, centred."""
    if isinstance(window, (torch.Tensor, np.ndarray, list)):
        w = np.asarray(window.cpu() if isinstance(window, torch.Tensor) else window, dtype=np.float64)
        if w.shape != (win_length,):
            raise ValueError(f"window has shape {w.shape}, expected ({win_length},)")
    else:
        w = scipy.signal.get_window(window, win_length, fftbins=True)
    if win_length > n_fft:
        raise ValueError(f"win_length={win_length} must be <= n_fft={n_fft}")
    left = (n_fft - win_length) // 2
    padded = np.zeros(n_fft)
    padded[left : left + win_length] = w
    return torch.from_numpy(padded).to(dtype)
