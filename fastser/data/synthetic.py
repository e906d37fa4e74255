"""A built-in synthetic emotional-speech corpus: deterministic for a seed, generated (or read from a cache).

Source-filter model. The source is a glottal pulse train (Rosenberg pulses) whose F0 follows a
per-class level, range and contour shape (rising for happy, falling for sad, peaked for angry,
flat for neutral) with per-class jitter and shimmer; syllables come at a per-class speaking rate
with per-class energy, and a per-class spectral tilt shapes the source. The filter is a cascade
of formant resonators whose frequencies are scaled by each speaker's vocal-tract length, plus
breath and background noise. Class parameters are drawn with wide per-utterance spread so the
classes overlap: the task is learnable but not trivial, and speaker-independent by construction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.signal

from fastser._io import atomic_write
from fastser.data.base import Corpus, Utterance

CLASSES = ["neutral", "happy", "sad", "angry"]
# per class: F0 factor, F0 range (semitones), contour, jitter, shimmer, level (dB),
# syllables/s, spectral tilt (dB/octave above 1 kHz; less negative = brighter)
PROSODY = {
    "neutral": dict(f0=1.00, range=2.0, contour="flat", jitter=0.010, shimmer=0.04, level=0.0, rate=4.0, tilt=-12.0),
    "happy": dict(f0=1.18, range=5.0, contour="rise", jitter=0.012, shimmer=0.05, level=3.0, rate=4.8, tilt=-9.0),
    "sad": dict(f0=0.90, range=1.5, contour="fall", jitter=0.018, shimmer=0.07, level=-5.0, rate=3.0, tilt=-15.0),
    "angry": dict(f0=1.22, range=4.0, contour="peak", jitter=0.014, shimmer=0.06, level=6.0, rate=5.0, tilt=-7.0),
}
VOWELS = [
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (660, 1720, 2410),
    (490, 1350, 1690),
    (440, 1020, 2240),
]  # (F1, F2, F3) Hz of an adult male voice


def _contour(shape: str, n: int) -> np.ndarray:
    x = np.linspace(0.0, 1.0, n)
    return {"flat": np.zeros(n), "rise": x - 0.3, "fall": 0.3 - x, "peak": np.exp(-((x - 0.35) ** 2) / 0.04) - 0.3}[
        shape
    ]


def _glottal_source(f0: np.ndarray, sr: int, jitter: float, shimmer: float, rng) -> np.ndarray:
    """Rosenberg pulse train following the F0 track, with cycle-to-cycle jitter and shimmer."""
    out = np.zeros(f0.size)
    t = 0
    while t < f0.size:
        period = max(8, int(sr / (f0[t] * (1.0 + jitter * rng.standard_normal()))))
        open_n, close_n = int(0.4 * period), int(0.16 * period)
        pulse = np.concatenate(
            [
                0.5 * (1 - np.cos(np.pi * np.arange(open_n) / max(open_n, 1))),
                np.cos(0.5 * np.pi * np.arange(close_n) / max(close_n, 1)),
            ]
        )
        seg = pulse[: f0.size - t] * (1.0 + shimmer * rng.standard_normal())
        out[t : t + seg.size] += seg
        t += period
    return np.diff(out, prepend=0.0)  # lip radiation


def _tilt(x: np.ndarray, sr: int, db_per_octave: float) -> np.ndarray:
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(x.size, 1.0 / sr)
    gain_db = db_per_octave * np.log2(np.maximum(f, 1000.0) / 1000.0)
    return np.fft.irfft(spec * 10 ** (gain_db / 20.0), n=x.size)


def _formants(x: np.ndarray, sr: int, formants, bandwidths=(80, 100, 140)) -> np.ndarray:
    for fc, bw in zip(formants, bandwidths):
        if fc >= sr / 2 - 200:
            continue
        r = np.exp(-np.pi * bw / sr)
        a = [1.0, -2 * r * np.cos(2 * np.pi * fc / sr), r * r]
        x = scipy.signal.lfilter([1.0 - r], a, x)
    return x


def synthesize(label: str, speaker: dict, rng, sr: int = 16000, seconds: float = 2.0) -> np.ndarray:
    p = PROSODY[label]
    n = int(seconds * sr * rng.uniform(0.8, 1.2))
    spread = lambda v, s: v * (1.0 + s * rng.standard_normal())  # noqa: E731 - wide per-utterance spread
    f0 = speaker["f0"] * spread(p["f0"], 0.06)
    semitones = spread(p["range"], 0.25) * _contour(p["contour"], n) + 0.6 * np.sin(
        2 * np.pi * rng.uniform(0.5, 1.5) * np.arange(n) / sr + rng.uniform(0, 6.3)
    )
    f0_track = f0 * 2.0 ** (semitones / 12.0)
    source = _glottal_source(f0_track, sr, max(0.0, spread(p["jitter"], 0.3)), max(0.0, spread(p["shimmer"], 0.3)), rng)
    source = _tilt(source, sr, spread(p["tilt"], 0.2))
    # syllables: a vowel each, an amplitude envelope at the speaking rate, short pauses between
    rate = max(1.5, spread(p["rate"], 0.15))
    n_syl = max(1, int(rate * n / sr))
    bounds = np.linspace(0, n, n_syl + 1).astype(int)
    voice = np.zeros(n)
    for a, b in zip(bounds[:-1], bounds[1:]):
        vowel = np.array(VOWELS[rng.integers(len(VOWELS))]) * speaker["vtl"] * rng.uniform(0.95, 1.05, 3)
        seg = _formants(source[a:b], sr, vowel)
        env = np.sin(np.pi * np.linspace(0, 1, b - a)) ** rng.uniform(0.5, 1.5)
        voice[a:b] = seg * env * rng.uniform(0.6, 1.0)
    voice /= np.abs(voice).max() + 1e-9
    level = 10 ** ((p["level"] + 1.5 * rng.standard_normal()) / 20.0) * speaker["gain"]
    breath = _formants(rng.standard_normal(n), sr, [1500, 2500]) * 0.02
    snr_db = rng.uniform(15.0, 35.0)
    noise = rng.standard_normal(n) * 10 ** (-snr_db / 20.0) * 0.3
    return (0.3 * level * voice + breath + noise).astype(np.float32)


def make_corpus(
    seed: int = 0, n_speakers: int = 16, per_class: int = 8, sr: int = 16000, seconds: float = 2.0
) -> Corpus:
    """n_speakers x len(CLASSES) x per_class utterances; speakers alternate female/male."""
    rng = np.random.default_rng(seed)
    utterances = []
    for s in range(n_speakers):
        female = s % 2 == 0
        speaker = dict(
            f0=rng.uniform(180, 240) if female else rng.uniform(95, 140),
            vtl=rng.uniform(1.1, 1.22) if female else rng.uniform(0.9, 1.02),
            gain=10 ** (rng.uniform(-4, 4) / 20),
        )
        for label in CLASSES:
            for k in range(per_class):
                uid = f"spk{s:02d}_{label}_{k:02d}"
                utterances.append(
                    Utterance(
                        uid=uid,
                        label=label,
                        speaker=f"spk{s:02d}",
                        gender="F" if female else "M",
                        audio=synthesize(label, speaker, rng, sr, seconds),
                    )
                )
    return Corpus("synthetic", list(CLASSES), utterances, sample_rate=sr, default_split="holdout")


def cached_corpus(
    cache_dir, seed: int = 0, n_speakers: int = 16, per_class: int = 8, sr: int = 16000, seconds: float = 2.0
) -> Corpus:
    """make_corpus(...), read back from `cache_dir` after the first time: the corpus is a pure function
    of these arguments and of this module's code (both in the file's key), and generating it costs
    about 20 ms an utterance on one core, as much as the features and a few epochs of training of the
    default run together. `cache_dir=None` generates it every time."""
    args = dict(seed=seed, n_speakers=n_speakers, per_class=per_class, sr=sr, seconds=seconds)
    if cache_dir is None:
        return make_corpus(**args)
    key = hashlib.sha256(Path(__file__).read_bytes() + json.dumps(args, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"synthetic-{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            utterances = [
                Utterance(uid=m["uid"], label=m["label"], speaker=m["speaker"], gender=m["gender"], audio=z[f"a{i}"])
                for i, m in enumerate(meta)
            ]
        return Corpus("synthetic", list(CLASSES), utterances, sample_rate=sr, default_split="holdout")
    except (OSError, KeyError, ValueError):  # not there yet, or unreadable: build it (again)
        pass
    corpus = make_corpus(**args)
    meta = [{"uid": u.uid, "label": u.label, "speaker": u.speaker, "gender": u.gender} for u in corpus.utterances]
    audio = {f"a{i}": u.audio for i, u in enumerate(corpus.utterances)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, meta=np.array(json.dumps(meta)), **audio)

    try:
        atomic_write(path, write)
    except OSError:  # a read-only or full cache folder costs the next run the generation, nothing else
        pass
    return corpus
