"""Audio loading: soundfile for I/O, soxr for resampling, clear errors that name the file.

load(path, sr)                 -> (samples, sr): the whole file in memory
stream(path, sr, block_seconds) -> blocks of mono samples at sr, for files of any length
speed_perturb(y, sr, speed), add_noise(y, snr_db, rng) -> perturbed copies for training
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the reason."""


def load(path, sr: Optional[int] = 16000, mono: bool = True, dtype=np.float32) -> tuple[np.ndarray, int]:
    """-> (samples, sr). Float in [-1, 1] whatever the file's PCM/float format; mono=True mixes channels
    down (mean), else returns (channels, samples). sr=None keeps the file's rate; otherwise soxr resamples
    (high quality). Raises AudioError for missing, empty, truncated, non-audio or silent-length files."""
    path = _check_file(path)
    try:
        with sf.SoundFile(path) as f:
            file_sr = f.samplerate
            data = f.read(dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({_libsndfile_reason(e, path)})") from e
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


def speed_perturb(y: np.ndarray, sr: int, speed: float) -> np.ndarray:
    """The signal played `speed` times faster (Kaldi's / sox's "speed"): duration / speed, pitch and
    formants x speed — as if another, higher- or lower-voiced speaker said it faster or slower. soxr
    resamples from a nominal rate of sr * speed to sr."""
    if not 0.5 <= speed <= 2.0:
        raise ValueError(f"speed must be in [0.5, 2], got {speed}")
    return soxr.resample(y, sr * speed, sr, quality="HQ").astype(np.float32, copy=False)


NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent


def add_noise(y: np.ndarray, snr_db: float, rng: np.random.Generator, colour: Optional[str] = None) -> np.ndarray:
    """y plus Gaussian noise at `snr_db` dB below the signal's mean power (over the whole clip,
    pauses included, so the speech itself sits a little above that SNR). The noise is white, pink
    or brown (`colour`, or drawn from `rng`): without a recorded noise corpus, coloured noise
    covers the broadband hiss and rumble of real recordings. A silent clip stays silent."""
    name = colour if colour is not None else list(NOISE_COLOURS)[int(rng.integers(len(NOISE_COLOURS)))]
    if name not in NOISE_COLOURS:
        raise ValueError(f"noise colour must be one of {sorted(NOISE_COLOURS)}, got {colour!r}")
    spectrum = np.fft.rfft(rng.standard_normal(len(y)))
    freqs = np.arange(len(spectrum), dtype=np.float64)
    spectrum *= np.where(freqs > 0, np.maximum(freqs, 1.0) ** (-NOISE_COLOURS[name] / 2), 0.0)  # no DC
    noise = np.fft.irfft(spectrum, n=len(y))
    power = float(np.mean(np.square(y, dtype=np.float64)))
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / max(float(np.mean(noise**2)), 1e-30))
    return (y + noise).astype(np.float32)


def info(path) -> tuple[float, int]:
    """(duration in seconds, sample rate) from the header, without reading the samples."""
    path = _check_file(path)
    try:
        meta = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({_libsndfile_reason(e, path)})") from e
    return meta.frames / meta.samplerate, meta.samplerate


def stream(path, sr: int = 16000, block_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sr`, read and resampled block by block (soxr's streaming resampler
    keeps its state across blocks, so the concatenation equals a one-shot resample up to
    floating-point rounding): memory stays bounded by the block, however long the file."""
    path = _check_file(path)
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({_libsndfile_reason(e, path)})") from e
    with f:
        resampler = (
            soxr.ResampleStream(f.samplerate, sr, 1, dtype="float32", quality="HQ") if f.samplerate != sr else None
        )
        got = False
        for block in f.blocks(blocksize=max(1, int(block_seconds * f.samplerate)), dtype="float32", always_2d=True):
            y = np.ascontiguousarray(block.mean(axis=1), dtype=np.float32)
            if not np.isfinite(y).all():
                raise AudioError(f"{path}: contains NaN or Inf samples")
            got = got or y.size > 0
            yield resampler.resample_chunk(y) if resampler is not None else y
        if not got:
            raise AudioError(f"{path}: no audio samples (empty or truncated file)")
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def _libsndfile_reason(error: Exception, path: str) -> str:
    """libsndfile's message without the path it repeats ("Error opening '<path>': Format not recognised.")."""
    return str(error).replace(f"Error opening {path!r}: ", "").strip()


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: a folder, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    _check_riff_size(path)
    return path


def _check_riff_size(path: str) -> None:
    """libsndfile silently reads what is there of a cut-off WAV; the RIFF header says what should be."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        declared = int.from_bytes(head[4:8], "little") + 8
        actual = os.path.getsize(path)
        if declared > actual:
            raise AudioError(f"{path}: truncated WAV: header declares {declared} bytes, file has {actual}")
