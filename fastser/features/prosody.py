"""Prosody and voice-quality contours, batched in torch (any device, no host sync, no Python loop
over utterances): what eGeMAPS summarises and a spectrogram CNN sees poorly.

    prosody(y, lengths, sr=16000, hop_length=160) -> (contours (B, 6, frames), frames (B,))

One frame every `hop_length` samples, aligned with the spectral features' frames (centred
frames: 1 + samples // hop_length of them), zero past each utterance's own. Channels
(PROSODY_CHANNELS):

    f0_semitones   F0 in semitones re 100 Hz; unvoiced frames hold the utterance's mean voiced F0
    voicing        peak of the normalised autocorrelation in the F0 range (0..1)
    hnr_db         harmonics-to-noise ratio from that peak, 10 log10(r / (1 - r)) (Boersma 1993)
    energy_db      frame RMS level, dB re full scale
    f0_delta       |F0 change| between consecutive voiced frames, semitones (a jitter proxy)
    energy_delta   |level change| between consecutive voiced frames, dB (a shimmer proxy)

F0 follows Boersma's autocorrelation method (Praat's "To Pitch (ac)") without its Viterbi path:
each Hann-windowed frame of three periods of `fmin` is autocorrelated by FFT, divided by the
window's own autocorrelation (which removes the taper's bias toward short lags), the best lag in
[sr/fmax, sr/fmin] is picked with Praat's small octave cost and refined by parabolic
interpolation. A frame is voiced when that peak passes `voicing_threshold` and its level is
within `silence_db` of the utterance's loudest frame. Inference features: no autograd promise
(argmax picks the lag).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from fastser.features.functional import frame_count

PROSODY_CHANNELS = ("f0_semitones", "voicing", "hnr_db", "energy_db", "f0_delta", "energy_delta")


@dataclasses.dataclass(frozen=True)
class ProsodyConfig:
    """Settings of the prosody contours; hashable and stored in checkpoints like a FeatureConfig."""

    kind: str = "prosody"
    sr: int = 16000
    hop_length: int = 160
    fmin: float = 60.0
    fmax: float = 400.0
    voicing_threshold: float = 0.45  # Praat's default
    silence_db: float = 40.0  # voiced frames are at most this far below the loudest frame
    octave_cost: float = 0.01  # Praat's default: favours the higher of two near-equal candidates

    def __post_init__(self):
        if self.kind != "prosody":
            raise ValueError(f"a ProsodyConfig has kind 'prosody', got {self.kind!r}")
        if self.sr <= 0 or self.hop_length < 1:
            raise ValueError(f"need sr > 0 and hop_length >= 1, got sr={self.sr}, hop_length={self.hop_length}")
        if not 0 < self.fmin < self.fmax < self.sr / 2:
            raise ValueError(f"need 0 < fmin < fmax < sr / 2, got fmin={self.fmin}, fmax={self.fmax}, sr={self.sr}")

    @property
    def n_bins(self) -> int:
        return len(PROSODY_CHANNELS)

    @property
    def win_length(self) -> int:
        return 2 * math.ceil(1.5 * self.sr / self.fmin)  # three periods of the lowest F0, even

    @property
    def lags(self) -> tuple:
        return math.floor(self.sr / self.fmax), math.ceil(self.sr / self.fmin)


@functools.lru_cache(maxsize=8)
def _window_terms(win: int, n_fft: int, device_str: str):
    """Hann window and its normalised autocorrelation (the divisor of Boersma's correction)."""
    w = torch.hann_window(win, periodic=False, dtype=torch.float64)
    rw = torch.fft.irfft(torch.fft.rfft(w, n=n_fft).abs().square(), n=n_fft)[: win // 2 + 2]
    rw = rw / rw[0]
    return w.float().to(device_str), rw.float().to(device_str)


@functools.lru_cache(maxsize=8)
def _dft_matrices(win: int, n_lags: int, device_str: str):
    """The autocorrelation's two transforms as matrices, for runtimes whose FFT is slow: `forward`
    (win, 2 * bins), the Hann window times the real DFT's cosines then sines at n points, and
    `inverse` (bins, n_lags), the inverse real DFT's first n_lags lags; n >= win + n_lags, so the
    correlation is linear up to those lags, as the FFT path's (n a multiple of 16: tidy matrices)."""
    n = -(-(win + n_lags) // 16) * 16
    bins = n // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(win, dtype=torch.float64)[:, None] * k[None, :] / n
    w = torch.hann_window(win, periodic=False, dtype=torch.float64)[:, None]
    forward = torch.cat([w * torch.cos(angle), w * torch.sin(angle)], dim=1)
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)  # each bin but 0 and n/2 stands for two
    weight[0] = weight[-1] = 1.0
    lag = torch.arange(n_lags, dtype=torch.float64)
    inverse = weight * torch.cos(2 * math.pi * k[:, None] * lag[None, :] / n) / n
    return forward.float().to(device_str), inverse.float().to(device_str)


def _autocorrelation(x: torch.Tensor, n_lags: int, n_fft: int, method: str) -> torch.Tensor:
    """(..., win) mean-removed frames -> (..., n_lags) autocorrelation of each Hann-windowed frame.
    method "fft": rfft / irfft of n_fft points (training and predict); "matmul": the same sums as
    two matrix products (_dft_matrices: an exported graph, whose runtime's FFT is slow)."""
    win = x.shape[-1]
    if method == "fft":
        window, _ = _window_terms(win, n_fft, str(x.device))
        return torch.fft.irfft(torch.fft.rfft(x * window, n=n_fft).abs().square(), n=n_fft)[..., :n_lags]
    if method != "matmul":
        raise ValueError(f"autocorrelation method must be fft or matmul, got {method!r}")
    forward, inverse = _dft_matrices(win, n_lags, str(x.device))
    real, imag = (x @ forward).split(inverse.shape[0], dim=-1)
    return (real.square() + imag.square()) @ inverse


def prosody(y: torch.Tensor, lengths: torch.Tensor, cfg: ProsodyConfig = ProsodyConfig(), autocorrelation="fft"):
    """y (B, samples) float, zero-padded; lengths (B,) -> (contours (B, 6, frames) float32, frames (B,)).

    autocorrelation: "fft" (the default), or "matmul" where a runtime's FFT is slow (onnxruntime's
    DFT operator: an exported file); the two agree to float32 rounding (about 1e-6 relative)."""
    if y.dim() != 2 or lengths.dim() != 1 or lengths.shape[0] != y.shape[0]:
        raise ValueError(
            f"prosody needs audio (B, samples) and lengths (B,), got {tuple(y.shape)} and {tuple(lengths.shape)}"
        )
    y = y.float()
    win, hop = cfg.win_length, cfg.hop_length
    lag_lo, lag_hi = cfg.lags
    n_fft = 1 << (2 * win - 1).bit_length()  # linear (not circular) correlation up to win lags
    frames = frame_count(lengths, win, hop, center=True)
    T = y.shape[1] // hop + 1
    # centred frames: frame t covers samples [t*hop - win/2, t*hop + win/2); zeros outside the signal
    pos = torch.arange(y.shape[1], device=y.device)
    y = y * (pos[None, :] < lengths[:, None])
    padded = torch.nn.functional.pad(y, (win // 2, win // 2 + hop))
    x = padded.unfold(1, win, hop)[:, :T]  # (B, T, win)
    x = x - x.mean(-1, keepdim=True)
    energy_db = 10.0 * torch.log10(x.square().mean(-1) + 1e-10)  # (B, T)
    _, rw = _window_terms(win, n_fft, str(y.device))
    r = _autocorrelation(x, lag_hi + 2, n_fft, autocorrelation)
    r = r / r[..., :1].clamp(min=1e-12)
    r = r / rw[: lag_hi + 2].clamp(min=1e-3)  # Boersma: undo the window's taper
    lags = torch.arange(lag_lo, lag_hi + 1, device=y.device)
    cand = r[..., lag_lo : lag_hi + 1]
    score = cand - cfg.octave_cost * torch.log2(lags * (cfg.fmin / cfg.sr))
    k = score.argmax(-1, keepdim=True)  # (B, T, 1) index into the lag range
    idx = k + lag_lo
    left, mid, right = (r.gather(-1, (idx + d).clamp(0, lag_hi + 1)).squeeze(-1) for d in (-1, 0, 1))
    curve = left - 2 * mid + right
    shift = torch.where(curve < 0, 0.5 * (left - right) / curve.clamp(max=-1e-9), torch.zeros_like(mid))
    shift = shift.clamp(-0.5, 0.5)
    peak = (mid - 0.25 * (left - right) * shift).clamp(0.0, 1.0)
    f0 = cfg.sr / (idx.squeeze(-1).float() + shift)

    valid = torch.arange(T, device=y.device)[None, :] < frames[:, None]
    loudest = energy_db.masked_fill(~valid, -1e4).amax(1, keepdim=True)
    voiced = valid & (peak > cfg.voicing_threshold) & (energy_db > loudest - cfg.silence_db)
    st = 12.0 * torch.log2(f0 / 100.0)
    n_voiced = voiced.sum(1, keepdim=True)
    mean_st = (st * voiced).sum(1, keepdim=True) / n_voiced.clamp(min=1)
    st = torch.where(voiced, st, mean_st)
    p = peak.clamp(1e-4, 1 - 1e-4)
    hnr = (10.0 * torch.log10(p / (1 - p))).clamp(-20.0, 40.0)
    both = voiced[:, 1:] & voiced[:, :-1]
    f0_delta = torch.nn.functional.pad((st[:, 1:] - st[:, :-1]).abs() * both, (1, 0))
    energy_delta = torch.nn.functional.pad((energy_db[:, 1:] - energy_db[:, :-1]).abs() * both, (1, 0))
    out = torch.stack([st, peak, hnr, energy_db, f0_delta, energy_delta], dim=1)  # (B, 6, T)
    return out * valid[:, None, :], frames
