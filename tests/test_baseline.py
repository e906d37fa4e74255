"""The openSMILE + SVM baseline: same folds as fastser.train, same metrics format, speaker z-norm."""

import json

import numpy as np
import pytest

from fastser import baseline
from fastser.data import load_corpus, make_folds
from tests.data.fixtures import make_ravdess

pytest.importorskip("opensmile")
pytest.importorskip("sklearn")


def test_speaker_znorm_standardises_each_speaker_alone():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(5, 2, (10, 3)), rng.normal(-1, 0.5, (6, 3))])
    x[:, 2] = 7.0  # a constant feature stays finite
    spk = np.array(["a"] * 10 + ["b"] * 6)
    z = baseline.speaker_znorm(x, spk)
    for s in "ab":
        np.testing.assert_allclose(z[spk == s, :2].mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(z[spk == s, :2].std(0), 1, atol=1e-12)
    assert np.all(z[:, 2] == 0)


def test_baseline_runs_on_fastsers_folds(tmp_path, capsys):
    make_ravdess(tmp_path / "rav")
    assert (
        baseline.cli(
            [
                "--corpus",
                "ravdess",
                "--data-dir",
                str(tmp_path / "rav"),
                "--split",
                "loso",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["baselines"]
    assert set(m) == {"egemaps+linear-svm+speaker-znorm", "egemaps+rbf-svm+speaker-znorm"}
    corpus = load_corpus("ravdess", tmp_path / "rav")
    names = [f.name for f in make_folds(corpus, "loso")]
    for r in m.values():
        assert [f["name"] for f in r["folds"]] == names
        assert r["n_test"] == len(corpus.utterances) - 3  # 3 unreadable files are skipped
        assert 0 <= r["ua"] <= 1 and np.array(r["confusion"]).sum() == r["n_test"]
    assert "UA" in capsys.readouterr().out


def test_baseline_bad_data_dir_is_one_line(tmp_path, capsys):
    assert baseline.cli(["--corpus", "emodb", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
