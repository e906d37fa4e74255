"""fastser.functionals and --functionals: the classifier against scikit-learn's, each speaker's
statistics, the cache, and a run whose fold scores, checkpoint and predict carry the fusion (the
fused export: tests/test_export.py)."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from fastser import functionals
from fastser.errors import UserError
from fastser.functionals import FunctionalsHead, fuse, score_speakers, speaker_znorm, statistics

pytest.importorskip("opensmile")
pytest.importorskip("sklearn")


def _rows(n_speakers=4, per=12, n_features=9, classes=4, seed=0):
    """Functionals whose class shows through a speaker offset and scale (what speaker statistics remove)."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(classes), n_speakers * per // classes)
    speakers = np.repeat(np.array([f"s{i}" for i in range(n_speakers)]), per)
    signal = np.eye(classes, n_features) * 2.0
    x = signal[labels] + rng.normal(0, 1, (len(labels), n_features))
    offset = rng.normal(0, 5, (n_speakers, n_features))[np.repeat(np.arange(n_speakers), per)]
    scale = rng.uniform(0.5, 3, (n_speakers, 1))[np.repeat(np.arange(n_speakers), per)]
    x = x * scale + offset
    x[:, -1] = 3.0  # a constant functional stays finite
    return x, speakers, labels


def _reference(x_train, spk_train, y_train, x_test, stats):
    """The recipe written out with scikit-learn: with a speaker's statistics, speaker z-norm then
    StandardScaler then a logistic regression; without (None), StandardScaler on the raw rows then
    a logistic regression fitted on them so."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=functionals.C, class_weight="balanced", max_iter=2000)
    if stats is None:
        scaler = StandardScaler().fit(x_train)
        lr.fit(scaler.transform(x_train), y_train)
        return lr.predict_proba(scaler.transform(x_test)), lr.classes_
    scaler = StandardScaler().fit(speaker_znorm(x_train, spk_train))
    lr.fit(scaler.transform(speaker_znorm(x_train, spk_train)), y_train)
    mean, std = stats
    return lr.predict_proba(scaler.transform((x_test - mean) / std)), lr.classes_


@pytest.mark.parametrize("classes", [4, 2])
def test_the_head_scores_as_scikit_learn_does(classes):
    x, spk, y = _rows(classes=classes)
    train = spk != "s3"
    head = FunctionalsHead.fit(x[train], spk[train], y[train], classes, "egemaps")
    test = x[~train]
    # the speaker's statistics, another set of statistics, none (the training speakers' classifier)
    for stats in (statistics(test), statistics(x[train]), None):
        want, order = _reference(x[train], spk[train], y[train], test, stats)
        got = head(torch.from_numpy(test), stats).numpy()
        np.testing.assert_allclose(got[:, order], want, rtol=1e-9, atol=1e-12)


def test_a_class_without_training_rows_gets_probability_zero():
    x, spk, y = _rows(classes=4)
    keep = y != 2
    head = FunctionalsHead.fit(x[keep], spk[keep], y[keep], 4, "egemaps")
    p = head(torch.from_numpy(x)).numpy()
    assert np.all(p[:, 2] == 0) and np.allclose(p.sum(1), 1)


def test_each_test_speaker_is_scored_with_their_own_statistics():
    x, spk, y = _rows(n_speakers=5)
    train = np.isin(spk, ["s0", "s1", "s2"])
    head = FunctionalsHead.fit(x[train], spk[train], y[train], 4, "egemaps")
    enrolled, unenrolled = score_speakers(head, x[~train], spk[~train])
    for s in ("s3", "s4"):
        mine = spk[~train] == s
        alone = head(torch.from_numpy(x[spk == s]), statistics(x[spk == s])).numpy()
        np.testing.assert_array_equal(enrolled[mine], alone)
    np.testing.assert_array_equal(unenrolled, head(torch.from_numpy(x[~train])).numpy())
    # one clip has no spread: the training speakers' statistics stand in
    one, _ = score_speakers(head, x[~train][:1], spk[~train][:1])
    np.testing.assert_array_equal(one, unenrolled[:1])


def test_the_head_survives_a_checkpoint_round_trip(tmp_path):
    x, spk, y = _rows()
    head = FunctionalsHead.fit(x, spk, y, 4, "compare")
    torch.save(head.to_checkpoint(), tmp_path / "h.pt")
    back = FunctionalsHead.from_checkpoint(torch.load(tmp_path / "h.pt", weights_only=True))
    assert back.feature_set == "compare"
    xt = torch.from_numpy(x)
    torch.testing.assert_close(back(xt, statistics(x[:5])), head(xt, statistics(x[:5])), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N, 9\)"):
        head(xt[:, :4])


def test_fuse_weights_the_model_and_the_functionals():
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(fuse(a, b), [[0.5, 0.5]])
    np.testing.assert_allclose(fuse(a, b, 0.75), [[0.75, 0.25]])


def test_without_opensmile_the_error_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensmile", None)  # import opensmile raises ImportError
    functionals._smile.cache_clear()  # as in a process that never built an extractor
    with pytest.raises(UserError, match="pip install opensmile"):
        functionals.extract([np.zeros(1600, np.float32)], "egemaps")
    with pytest.raises(UserError, match="unknown feature set"):
        functionals.extract([np.zeros(1600, np.float32)], "gemaps")


def test_corpus_functionals_are_cached_per_exact_list_of_files(tmp_path, monkeypatch):
    from fastser.data import load_corpus
    from fastser.data.cache import load_audio
    from tests.data.fixtures import make_ravdess

    make_ravdess(tmp_path / "rav")
    _, corpus = load_audio(load_corpus("ravdess", tmp_path / "rav"), 16000, max_seconds=8.0)  # the readable files
    cache = tmp_path / "cache"
    first = functionals.corpus_functionals(corpus, "egemaps", 16000, 8.0, cache)
    assert first.shape == (len(corpus.utterances), 88) and np.isfinite(first).all()
    monkeypatch.setattr(functionals, "extract", lambda *a, **k: pytest.fail("extracted again"))
    np.testing.assert_array_equal(functionals.corpus_functionals(corpus, "egemaps", 16000, 8.0, cache), first)
    fewer = dataclasses.replace(corpus, utterances=corpus.utterances[1:])
    with pytest.raises(pytest.fail.Exception, match="extracted again"):  # another list of files: not this cache
        functionals.corpus_functionals(fewer, "egemaps", 16000, 8.0, cache)


def test_the_library_and_the_command_line_refuse_an_unknown_set():
    from fastser.config import TrainConfig

    assert any(
        "functionals must be one of egemaps, compare" in p for p in TrainConfig().replace(functionals="x").problems()
    )


@pytest.mark.slow
def test_a_run_with_functionals_fuses_its_folds_and_predict_and_exports_its_model_alone(tmp_path):
    from fastser import export, predict, train
    from fastser import predictor as predictor_module
    from fastser.data.synthetic import make_corpus
    from tests.test_train import SMALL

    out = tmp_path / "run"
    train.main(SMALL + ["--epochs", "1", "--functionals", "egemaps", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"model", "training_norm", "training_norm_model"} <= set(metrics)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    (fold,) = ckpt["fold_results"]
    fused = fuse(np.asarray(fold["probs_model"]), np.asarray(fold["probs_functionals"]))
    np.testing.assert_allclose(fold["probs"], fused, atol=1e-6)
    assert fold["y_pred"] == np.asarray(fold["probs"]).argmax(1).tolist()
    assert ckpt["final"]["functionals"]["feature_set"] == "egemaps"

    clips = [u.audio.astype(np.float32) for u in make_corpus(seed=5, n_speakers=1, per_class=1).utterances]
    with pytest.warns(predict.PredictWarning):  # trained on the synthetic corpus
        predictor = predict.Predictor(out)
    got = np.stack([p.probabilities for p in predictor.predict(clips, sr=16000)])
    model_alone = predictor_module.score(predictor.models, predictor.norms, predictor.features, clips, predictor.device)
    head = predictor.heads[0]
    want = fuse(model_alone, head(torch.from_numpy(functionals.extract(clips, "egemaps"))).numpy())
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - model_alone).max() > 1e-3, "the functionals changed nothing: the comparison proves little"

    path = export.export(out, "torch", tmp_path / "model.pt2", model_only=True)
    lengths = np.array([len(c) for c in clips])
    batch = np.zeros((len(clips), lengths.max()), np.float32)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    np.testing.assert_allclose(export.run_file(path, batch, lengths), model_alone, atol=1e-5)
