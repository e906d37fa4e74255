"""Audio loading: soundfile for I/O, soxr for resampling, clear errors that name the file."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the reason."""


def load(path, sr: Optional[int] = 16000, mono: bool = True, dtype=np.float32) -> tuple[np.ndarray, int]:
    """-> (samples, sr). Float in [-1, 1] whatever the file's PCM/float format; mono=True mixes channels
    down (mean), else returns (channels, samples). sr=None keeps the file's rate; otherwise soxr resamples
    (high quality). Raises AudioError for missing, empty, truncated, non-audio or silent-length files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    _check_riff_size(path)
    try:
        with sf.SoundFile(path) as f:
            file_sr = f.samplerate
            data = f.read(dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples (empty or truncated file)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or Inf samples")
    y = data.mean(axis=1) if mono else data.T
    if sr is not None and sr != file_sr:
        if sr <= 0:
            raise ValueError(f"sr must be positive, got {sr}")
        y = soxr.resample(y.T if y.ndim == 2 else y, file_sr, sr, quality="HQ")
        y = y.T if y.ndim == 2 else y
    return np.ascontiguousarray(y, dtype=dtype), (sr if sr is not None else file_sr)


def _check_riff_size(path: str) -> None:
    """libsndfile silently reads what is there of a cut-off WAV; the RIFF header says what should be."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        declared = int.from_bytes(head[4:8], "little") + 8
        actual = os.path.getsize(path)
        if declared > actual:
            raise AudioError(f"{path}: truncated WAV: header declares {declared} bytes, file has {actual}")
