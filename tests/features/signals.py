"""Test signals made by the tests: every one the feature issue names, at 16 kHz."""

import numpy as np
import scipy.signal

SR = 16000


def make_signals(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * SR)) / SR
    white = rng.standard_normal(t.size)
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    pink = np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(spectrum.size), 1)), n=t.size)
    impulses = np.zeros(t.size)
    impulses[::4000] = 1.0
    signals = {
        "chirp": 0.5 * scipy.signal.chirp(t, f0=50, t1=t[-1], f1=7000, method="logarithmic"),
        "tones": 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t),
        "white": 0.1 * white,
        "pink": 0.5 * pink / np.abs(pink).max(),
        "silence": np.zeros(t.size),
        "impulses": impulses,
        "short": 0.2 * rng.standard_normal(300),  # shorter than n_fft = 512
        "odd": 0.1 * rng.standard_normal(12347),  # odd length, not a multiple of the hop
    }
    return {k: v.astype(np.float32) for k, v in signals.items()}


def pad_batch(signals):
    lengths = np.array([len(s) for s in signals])
    batch = np.zeros((len(signals), lengths.max()), np.float32)
    for i, s in enumerate(signals):
        batch[i, : len(s)] = s
    return batch, lengths
