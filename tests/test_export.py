"""fastser.export: one file, audio in, probabilities out, checked against fastser.predict."""

import numpy as np
import pytest
import soundfile as sf
import torch

import fastser.export as export
import fastser.predict as predict
import fastser.train as train
from fastser.data.synthetic import make_corpus
from tests.test_train import SMALL

pytest.importorskip("onnxruntime", reason="the [export] extra (CI installs it)")
pytestmark = pytest.mark.slow  # each test trains a model and traces it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The default kind of run: speaker statistics, log-mel + MFCC + prosody."""
    out = tmp_path_factory.mktemp("export") / "run"
    train.main(SMALL + ["--epochs", "2", "--prosody", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def clips():
    """Real-length utterances (1.6 to 3.4 s) and the same zero-padded into one batch."""
    utts = make_corpus(seed=7, n_speakers=2, per_class=2).utterances
    audio = [u.audio.astype(np.float32) for u in utts[:5]]
    lengths = np.array([len(a) for a in audio])
    batch = np.zeros((len(audio), lengths.max() + 777), np.float32)  # more padding than any clip needs
    for i, a in enumerate(audio):
        batch[i, : len(a)] = a
    return audio, batch, lengths


@pytest.fixture(scope="module")
def files(run_dir, clips):
    return {fmt: export.export(run_dir, fmt) for fmt in export.FORMATS}


def _predicted(run_dir, audio, **kw):
    with pytest.warns(predict.PredictWarning):  # trained on the synthetic corpus: said once
        predictor = predict.Predictor(run_dir, **kw)
    return predictor, np.stack([p.probabilities for p in predictor.predict(audio)])


@pytest.mark.parametrize("fmt,atol", [("onnx", 1e-4), ("torch", 1e-5)])
def test_the_exported_file_scores_as_predict_does(run_dir, clips, files, fmt, atol):
    audio, batch, lengths = clips
    predictor, want = _predicted(run_dir, audio)
    assert np.ptp(want, axis=0).max() > 1e-3, "the clips must score differently, or the comparison proves little"
    got = export.run_file(files[fmt], batch, lengths)
    np.testing.assert_allclose(got, want, atol=atol)
    # dynamic batch and length: one clip alone, exactly its own length
    np.testing.assert_allclose(export.run_file(files[fmt], audio[2][None], lengths[2:3]), want[2:3], atol=atol)
    # the features inside are predict's: their sums over each clip's frames
    feats, frames = predictor.features.extract(torch.from_numpy(batch), torch.from_numpy(lengths))
    raw = torch.cat([feats[k] for k in predictor.features.kinds], dim=1).double()
    if fmt == "onnx":
        session, meta = export.load_onnx(files[fmt])
        sums, sq, n = session.run(["feature_sum", "feature_sq_sum", "frames"], {"audio": batch, "lengths": lengths})
    else:
        program, meta = export.load_torch(files[fmt])
        with torch.no_grad():
            _, sums, sq, n = (t.numpy() for t in program.module()(torch.from_numpy(batch), torch.from_numpy(lengths)))
    np.testing.assert_array_equal(n, frames.numpy())
    np.testing.assert_allclose(sums, raw.sum(-1).numpy(), rtol=1e-4, atol=1e-2 * n.max())
    assert meta["classes"] == predictor.classes and meta["sample_rate"] == 16000
    assert meta["bins"] == [64, 40, 6] and meta["optional_inputs"] == ["speaker_mean", "speaker_std"]


def test_speaker_statistics_go_in_as_inputs_or_are_baked_in(run_dir, clips, files, tmp_path):
    """Enrollment without fastser: the file's own sums over the speaker's clips give the statistics,
    fed as inputs (ONNX) or assigned to the buffers (torch); --enroll bakes them in as defaults."""
    audio, batch, lengths = clips
    enroll = make_corpus(seed=11, n_speakers=1, per_class=2).utterances[:4]
    paths = []
    for i, u in enumerate(enroll):
        paths.append(tmp_path / f"enroll{i}.wav")
        sf.write(paths[-1], u.audio, 16000)
    _, want = _predicted(run_dir, audio, enroll=paths)
    _, untouched = _predicted(run_dir, audio)
    assert np.abs(want - untouched).max() > 1e-3, "enrollment must change the scores for this test to mean anything"

    session, _ = export.load_onnx(files["onnx"])
    e_len = np.array([len(u.audio) for u in enroll])
    e_batch = np.zeros((len(enroll), e_len.max()), np.float32)
    for i, u in enumerate(enroll):
        e_batch[i, : e_len[i]] = u.audio
    sums, sq, n = session.run(["feature_sum", "feature_sq_sum", "frames"], {"audio": e_batch, "lengths": e_len})
    mean, std = export.speaker_statistics(sums, sq, n)
    fed = session.run(
        ["probabilities"], {"audio": batch, "lengths": lengths, "speaker_mean": mean, "speaker_std": std}
    )[0]
    np.testing.assert_allclose(fed, want, atol=1e-4)

    program, _ = export.load_torch(files["torch"])
    module = program.module()
    module.speaker_mean.copy_(torch.from_numpy(mean))
    module.speaker_std.copy_(torch.from_numpy(std))
    with torch.no_grad():
        assigned = module(torch.from_numpy(batch), torch.from_numpy(lengths))[0].numpy()
    np.testing.assert_allclose(assigned, want, atol=1e-4)

    with pytest.warns(predict.PredictWarning):
        baked = export.export(run_dir, "onnx", out=tmp_path / "speaker.onnx", enroll=paths)
    np.testing.assert_allclose(export.run_file(baked, batch, lengths), want, atol=1e-4)


def test_a_run_with_each_clips_own_statistics_exports(tmp_path, clips):
    audio, batch, lengths = clips
    run = tmp_path / "utterance"
    train.main(SMALL + ["--epochs", "1", "--normalize", "utterance", "--out", str(run)])
    _, want = _predicted(run, audio)
    path = export.export(run, "torch")
    np.testing.assert_allclose(export.run_file(path, batch, lengths), want, atol=1e-5)
    _, meta = export.load_torch(path)
    assert meta["optional_inputs"] == [] and meta["normalize"] == "utterance"


@pytest.mark.parametrize("fmt,atol", [("onnx", 1e-4), ("torch", 1e-5)])
def test_a_run_with_early_downsampling_exports(tmp_path, clips, fmt, atol):
    """The stride-2 stem and the masked pooling before each conv trace into a graph that scores a
    padded batch as predict scores each clip alone."""
    audio, batch, lengths = clips
    run = tmp_path / "early"
    train.main(SMALL + ["--epochs", "1", "--downsample", "early", "--out", str(run)])
    _, want = _predicted(run, audio)
    np.testing.assert_allclose(export.run_file(export.export(run, fmt), batch, lengths), want, atol=atol)


def test_the_command_line(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt2"
    assert export.cli([str(run_dir), "--format", "torch", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and "synthetic corpus" in printed.err
    assert export.cli([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        export.cli([str(run_dir), "--format", "tflite"])
    assert exited.value.code == 2
    assert "--format" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # the [export] extra not installed
    assert export.cli([str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "fastser[export]" in err


def test_export_and_the_readme_load_print_only_fastser_lines(run_dir, tmp_path):
    """No exporter or onnxruntime notes a user cannot act on: the command's stderr holds its own
    warning lines only, and the README's way of loading the file prints nothing."""
    import subprocess
    import sys

    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "fastser.export", str(run_dir), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("python -m fastser.export: warning: ") for line in lines), lines
    load = (
        "import onnxruntime as ort\n"
        "options = ort.SessionOptions()\n"
        "options.log_severity_level = 3\n"
        f"session = ort.InferenceSession({str(out)!r}, options)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout == loaded.stderr == "", loaded.stderr
