import json

import soundfile as sf

import fastser.predict as predict
import fastser.train as train
from fastser.data.synthetic import make_corpus
from tests.test_train import SMALL


def test_predict_loads_a_checkpoint_and_prints(tmp_path, capsys):
    train.main(SMALL + ["--epochs", "1", "--out", str(tmp_path / "run")])
    corpus = make_corpus(seed=5, n_speakers=1, per_class=1)
    files = []
    for u in corpus.utterances[:2]:
        path = tmp_path / f"{u.uid}.wav"
        sf.write(path, u.audio, 16000)
        files.append(str(path))
    capsys.readouterr()
    assert predict.main(files + ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == files
    for r in results:
        assert r["emotion"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-3
    assert predict.main(files[:1] + ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt")]) == 0
    assert files[0] in capsys.readouterr().out


def test_predict_errors(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    assert predict.cli([str(bad), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert predict.cli([str(bad), "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "not a fastser checkpoint" in capsys.readouterr().err
