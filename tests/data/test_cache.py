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
    """with_speed_copies: copy k of row i at k*N + i, same labels, speaker "<name>@speed<s>", frames
    scaled by 1/speed; every copy cached under its own key (the originals' key unchanged)."""
    from fastser.data.cache import with_speed_copies
    from fastser.features.featureset import FeatureSet
    fixtures.make_emodb(tmp_path / "emodb")
    cache = tmp_path / "cache"
    corpus = load_corpus("emodb", tmp_path / "emodb")
    features = FeatureSet.paper(["mfcc", "prosody"])
    base = build_feature_table(corpus, features, CPU, cache_dir=cache)
    table = with_speed_copies(base, features, CPU, (0.9, 1.1), cache_dir=cache)
    N = base.n_utterances
    assert len(os.listdir(cache)) == 3 and table.n_utterances == N and table.copy_speeds == (0.9, 1.1)
    assert table.frames.shape == (3 * N,) and table.feats["mfcc"].shape[0] == 3 * N
    assert torch.equal(table.labels, base.labels.repeat(3))
    assert table.speakers[0] == base.corpus.speakers[0]
    assert table.speakers[N] == base.corpus.speakers[0] + "@speed0.9"
    assert table.speakers[2 * N + 1] == base.corpus.speakers[1] + "@speed1.1"
    ratio = table.frames[N:2 * N].double() / base.frames.double()
    assert ((ratio > 1.0) & (ratio < 1.2)).all()  # slower: about 1/0.9 the frames
    ratio = table.frames[2 * N:].double() / base.frames.double()
    assert ((ratio > 0.8) & (ratio < 1.0)).all()
    w = base.feats["mfcc"].shape[-1]
    assert torch.equal(table.feats["mfcc"][:N, :, :w], base.feats["mfcc"])  # the originals untouched
    assert not table.feats["mfcc"][:N, :, w:].any()  # padded with zeros to the widest copy
    assert not torch.equal(table.feats["mfcc"][N:2 * N, :, :w], base.feats["mfcc"])
