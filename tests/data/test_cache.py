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
