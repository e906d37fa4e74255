import os

import torch

from fastser.data import load_corpus
from fastser.data.cache import build_feature_table
from tests.data import fixtures

CPU = torch.device("cpu")


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    fixtures.make_emodb(tmp_path / "emodb")
    cache = tmp_path / "cache"
    corpus = load_corpus("emodb", tmp_path / "emodb")
    first = build_feature_table(corpus, ["mfcc"], CPU, cache_dir=cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".pt") and not any(f.endswith(".tmp") for f in files)

    import fastser.data.cache as cache_mod

    calls = []
    original = cache_mod._build
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = build_feature_table(load_corpus("emodb", tmp_path / "emodb"), ["mfcc"], CPU, cache_dir=cache)
    assert calls == []  # served from the cache
    assert torch.equal(again.feats["mfcc"], first.feats["mfcc"]) and again.corpus.skipped == first.corpus.skipped

    build_feature_table(corpus, ["spectrogram"], CPU, cache_dir=cache)  # another feature config
    assert len(calls) == 1 and len(os.listdir(cache)) == 2
    victim = corpus.utterances[0].path
    fixtures.write_wav(__import__("pathlib").Path(victim), seconds=0.5, seed=99)  # a changed file
    build_feature_table(load_corpus("emodb", tmp_path / "emodb"), ["mfcc"], CPU, cache_dir=cache)
    assert len(calls) == 2 and len(os.listdir(cache)) == 3


def test_interrupted_cache_write_leaves_no_cache_file(tmp_path, monkeypatch):
    fixtures.make_emodb(tmp_path / "emodb")
    corpus = load_corpus("emodb", tmp_path / "emodb")

    def boom(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    try:
        build_feature_table(corpus, ["mfcc"], CPU, cache_dir=tmp_path / "cache")
    except KeyboardInterrupt:
        pass
    assert os.listdir(tmp_path / "cache") == []


def test_speed_perturb_moves_pitch_and_duration_together():
    """speed 1.1: 1/1.1 of the duration and 1.1 x the frequency (Kaldi's / sox's speed)."""
    import numpy as np
    from fastser.audio import speed_perturb

    sr = 16000
    t = np.arange(sr) / sr
    y = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    for speed in (0.9, 1.1):
        z = speed_perturb(y, sr, speed)
        assert z.dtype == np.float32 and abs(len(z) - sr / speed) <= 2
        spectrum = np.abs(np.fft.rfft(z * np.hanning(len(z))))
        peak_hz = np.argmax(spectrum) * sr / len(z)
        assert abs(peak_hz - 200 * speed) < 2, (speed, peak_hz)
    import pytest

    with pytest.raises(ValueError, match="speed"):
        speed_perturb(y, sr, 3.0)


def test_speed_copies_append_rows_with_their_own_speakers(tmp_path):
    """with_copies: copy k of row i at k*N + i, same labels, speaker "<name>@speed<s>", frames
    scaled by 1/speed; every copy cached under its own key (the originals' key unchanged)."""
    from fastser.data.cache import Perturbation, with_copies
    from fastser.features.featureset import FeatureSet

    fixtures.make_emodb(tmp_path / "emodb")
    cache = tmp_path / "cache"
    corpus = load_corpus("emodb", tmp_path / "emodb")
    features = FeatureSet.paper(["mfcc", "prosody"])
    base = build_feature_table(corpus, features, CPU, cache_dir=cache)
    speeds = (Perturbation("speed", 0.9), Perturbation("speed", 1.1))
    table = with_copies(base, features, CPU, speeds, cache_dir=cache)
    N = base.n_utterances
    assert len(os.listdir(cache)) == 3 and table.n_utterances == N and table.copies == speeds
    assert table.frames.shape == (3 * N,) and table.feats["mfcc"].shape[0] == 3 * N
    assert torch.equal(table.labels, base.labels.repeat(3))
    assert table.speakers[0] == base.corpus.speakers[0]
    assert table.speakers[N] == base.corpus.speakers[0] + "@speed0.9"
    assert table.speakers[2 * N + 1] == base.corpus.speakers[1] + "@speed1.1"
    ratio = table.frames[N : 2 * N].double() / base.frames.double()
    assert ((ratio > 1.0) & (ratio < 1.2)).all()  # slower: about 1/0.9 the frames
    ratio = table.frames[2 * N :].double() / base.frames.double()
    assert ((ratio > 0.8) & (ratio < 1.0)).all()
    w = base.feats["mfcc"].shape[-1]
    assert torch.equal(table.feats["mfcc"][:N, :, :w], base.feats["mfcc"])  # the originals untouched
    assert not table.feats["mfcc"][:N, :, w:].any()  # padded with zeros to the widest copy
    assert not torch.equal(table.feats["mfcc"][N : 2 * N, :, :w], base.feats["mfcc"])


def test_add_noise_has_the_asked_snr_and_colour():
    """The noise (output - input) is SNR dB below the clip's mean power; its spectrum falls as
    1/f^0 (white), 1/f (pink), 1/f^2 (brown): the fitted log-log slope of its power over 100 Hz-6 kHz;
    a silent clip stays silent; an unknown colour is refused."""
    import numpy as np
    import pytest
    from fastser.audio import add_noise

    sr = 16000
    y = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4 * sr) / sr)).astype(np.float32)
    for colour, exponent in (("white", 0.0), ("pink", 1.0), ("brown", 2.0)):
        for snr in (20.0, 5.0):
            z = add_noise(y, snr, np.random.default_rng(1), colour)
            assert z.dtype == np.float32 and z.shape == y.shape
            noise = z.astype(np.float64) - y
            assert abs(10 * np.log10(np.mean(y.astype(np.float64) ** 2) / np.mean(noise**2)) - snr) < 0.01
        power = np.abs(np.fft.rfft(noise)) ** 2
        f = np.fft.rfftfreq(len(noise), 1 / sr)
        band = (f > 100) & (f < 6000)
        slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
        assert abs(slope + exponent) < 0.1, (colour, slope)
    assert not add_noise(np.zeros(sr, np.float32), 10.0, np.random.default_rng(0)).any()
    with pytest.raises(ValueError, match="colour"):
        add_noise(y, 10.0, np.random.default_rng(0), "blue")


def test_noise_copies_are_fixed_per_utterance_and_cached_apart(tmp_path):
    """A noise copy: speaker "<name>@snr<s>", the same frames as the originals (noise adds no
    length), features that differ from the originals', the same noise in a rebuilt table (seeded
    by utterance id), and its own cache file beside the originals' and the speed copies'."""
    from fastser.data.cache import Perturbation, cache_key, with_copies
    from fastser.features.featureset import FeatureSet

    fixtures.make_emodb(tmp_path / "emodb")
    cache = tmp_path / "cache"
    corpus = load_corpus("emodb", tmp_path / "emodb")
    features = FeatureSet.paper(["mfcc"])
    base = build_feature_table(corpus, features, CPU, cache_dir=cache)
    copies = (Perturbation("noise", 10.0), Perturbation("speed", 1.1))
    table = with_copies(base, features, CPU, copies, cache_dir=cache)
    N = base.n_utterances
    assert len(os.listdir(cache)) == 3 and table.copies == copies
    assert table.speakers[N + 2] == base.corpus.speakers[2] + "@snr10"
    assert torch.equal(table.frames[N : 2 * N], base.frames)
    w = base.feats["mfcc"].shape[-1]
    assert not torch.equal(table.feats["mfcc"][N : 2 * N, :, :w], base.feats["mfcc"])
    rebuilt = with_copies(base, features, CPU, copies[:1])  # no cache: computed again
    torch.testing.assert_close(rebuilt.feats["mfcc"][N:], table.feats["mfcc"][N : 2 * N, :, :w])
    keys = {
        cache_key(corpus, features, 8.0, p)
        for p in (None, Perturbation("noise", 10.0), Perturbation("noise", 20.0), Perturbation("speed", 1.1))
    }
    assert len(keys) == 4
