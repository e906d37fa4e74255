"""Prosody contours: F0 of known signals, voicing, alignment with the spectral frames, padding."""

import math

import pytest
import torch

from fastser.features import FeatureSet
from fastser.features.prosody import PROSODY_CHANNELS, ProsodyConfig, prosody

SR = 16000
F0, VOICING, HNR, ENERGY, F0_DELTA, ENERGY_DELTA = range(len(PROSODY_CHANNELS))


def harmonic(f0, seconds=1.0, weights=(1.0, 0.5, 0.33, 0.25, 0.2, 0.17)):
    """A voiced-like tone: F0 (a number or a per-sample tensor) with decaying harmonics."""
    n = int(seconds * SR)
    f = torch.full((n,), float(f0), dtype=torch.float64) if not torch.is_tensor(f0) else f0.double()
    phase = 2 * math.pi * torch.cumsum(f, 0) / SR
    return (0.3 * sum(w * torch.sin(k * phase) for k, w in enumerate(weights, 1))).float()


def hz(contours, item, frames):
    return 100.0 * 2 ** (contours[item, F0, : frames[item]] / 12)


def run(*signals):
    lengths = torch.tensor([len(s) for s in signals])
    y = torch.zeros(len(signals), int(lengths.max()))
    for i, s in enumerate(signals):
        y[i, : len(s)] = s
    return prosody(y, lengths), lengths


@pytest.mark.parametrize("f0", [75.0, 120.0, 210.0, 350.0])
def test_f0_of_a_harmonic_tone(f0):
    (c, frames), _ = run(harmonic(f0))
    inner = slice(5, int(frames[0]) - 5)  # frames whose window lies inside the signal
    assert torch.allclose(hz(c, 0, frames)[inner], torch.tensor(f0), rtol=0.005)
    assert (c[0, VOICING, inner] > 0.9).all() and (c[0, HNR, inner] > 15).all()


def test_no_octave_jump_when_the_second_harmonic_dominates():
    (c, frames), _ = run(harmonic(110.0, weights=(0.3, 1.0, 0.6, 0.3)))
    assert torch.allclose(hz(c, 0, frames)[5:-5], torch.tensor(110.0), rtol=0.01)


def test_a_glide_is_followed():
    n = SR
    f = torch.linspace(100, 200, n)
    (c, frames), _ = run(harmonic(f, seconds=1.0))
    centres = (torch.arange(int(frames[0])) * 160).clamp(max=n - 1)
    truth = f[centres]
    assert torch.allclose(hz(c, 0, frames)[6:-6], truth[6:-6], rtol=0.02)
    assert (c[0, F0_DELTA, 6:-6] > 0).all()  # semitones change from frame to frame on a glide


def test_noise_and_silence_are_unvoiced():
    torch.manual_seed(0)
    (c, frames), _ = run(0.1 * torch.randn(SR), torch.zeros(SR))
    assert (c[0, VOICING] < 0.45).float().mean() > 0.9
    assert (c[1, ENERGY] == c[1, ENERGY][0]).all() and float(c[1, ENERGY, 0]) < -90  # digital silence
    # unvoiced frames hold the utterance's mean voiced F0 (none here: 0 semitones) and no deltas
    assert (c[1, F0] == 0).all() and (c[1, F0_DELTA] == 0).all() and (c[1, ENERGY_DELTA] == 0).all()


def test_frames_match_the_spectral_features_and_padding_is_zero():
    tone, short = harmonic(150.0, 0.8), harmonic(220.0, 0.37)
    (c, frames), lengths = run(tone, short)
    fs = FeatureSet.paper(("logmel", "prosody"))
    assert frames.tolist() == fs.frame_count(lengths).tolist()
    assert c.shape == (2, len(PROSODY_CHANNELS), int(frames.max()))
    assert (c[1, :, int(frames[1]) :] == 0).all()
    alone, _ = prosody(short[None], lengths[1:])
    assert torch.allclose(alone[0], c[1, :, : alone.shape[-1]], atol=1e-4)  # padding in a batch changes nothing


def test_featureset_with_prosody_extracts_and_round_trips():
    fs = FeatureSet.paper(("logmel", "mfcc", "prosody"))
    assert fs.n_bins == {"logmel": 64, "mfcc": 40, "prosody": len(PROSODY_CHANNELS)}
    assert FeatureSet.from_dict(fs.to_dict()) == fs
    y = harmonic(180.0, 0.5)[None]
    feats, frames = fs.extract(y, torch.tensor([y.shape[1]]))
    assert {k: v.shape[-1] for k, v in feats.items()} == {k: int(frames[0]) for k in fs.kinds}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="fmin < fmax"):
        ProsodyConfig(fmin=500.0, fmax=400.0)
    with pytest.raises(ValueError, match=r"\(B, samples\)"):
        prosody(torch.zeros(100), torch.tensor([100]))
    with pytest.raises(ValueError, match="one frame grid"):
        FeatureSet.of({"logmel": FeatureSet.paper(["logmel"])["logmel"], "prosody": ProsodyConfig(hop_length=80)})


@pytest.mark.parametrize("hop", [160, 320])
def test_the_matrix_autocorrelation_of_an_exported_file_is_the_ffts(hop):
    """The "matmul" autocorrelation (an ONNX file's: two matrix products) against the FFT's, on a
    voice with a glide, noise and silence: the lags to float32 rounding, the contours alike."""
    from fastser.features.prosody import _autocorrelation

    torch.manual_seed(0)
    voice = harmonic(torch.linspace(90, 260, 2 * SR), seconds=2.0) + 0.02 * torch.randn(2 * SR)
    signals = (voice, 0.1 * torch.randn(SR), torch.cat([torch.zeros(SR // 2), harmonic(150.0, 0.7)]))
    lengths = torch.tensor([len(s) for s in signals])
    y = torch.zeros(len(signals), int(lengths.max()))
    for i, s in enumerate(signals):
        y[i, : len(s)] = s
    cfg = ProsodyConfig(sr=SR, hop_length=hop)
    frames = torch.nn.functional.pad(y, (400, 400 + hop)).unfold(1, cfg.win_length, hop)
    frames = frames - frames.mean(-1, keepdim=True)
    n_lags = cfg.lags[1] + 2
    fft, matmul = (_autocorrelation(frames, n_lags, 2048, m) for m in ("fft", "matmul"))
    scale = fft[..., :1].abs().clamp(min=1e-6)  # each frame's energy: rounding is relative to it
    assert ((matmul - fft).abs() / scale).max() < 1e-5
    (want, n), (got, m) = prosody(y, lengths, cfg), prosody(y, lengths, cfg, autocorrelation="matmul")
    assert torch.equal(n, m) and torch.equal(got[:, ENERGY], want[:, ENERGY])
    # HNR, 10 log10(p / (1 - p)), magnifies the peak's rounding where p nears 1 (1e-6 there: 0.005 dB)
    for channel, atol in ((F0, 1e-4), (VOICING, 1e-5), (HNR, 2e-2), (F0_DELTA, 1e-4), (ENERGY_DELTA, 1e-4)):
        torch.testing.assert_close(got[:, channel], want[:, channel], atol=atol, rtol=0)
    with pytest.raises(ValueError, match="fft or matmul"):
        prosody(y, lengths, cfg, autocorrelation="dft")
