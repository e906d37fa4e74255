"""fastser.export: one file, audio in, probabilities out, checked against fastser.predict."""

from pathlib import Path

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


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess-dev"


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """A run that fuses openSMILE functionals, as the default does on real corpora (ComParE)."""
    pytest.importorskip("opensmile")
    out = tmp_path_factory.mktemp("fused") / "run"
    train.main(SMALL + ["--epochs", "1", "--functionals", "compare", "--out", str(out)])
    return out


def _speech(speaker: str, n: int) -> list:
    """n clips of real speech (ravdess-dev, where the shared data is) or of the synthetic corpus."""
    if REAL.is_dir():
        return [sf.read(p, dtype="float32")[0] for p in sorted((REAL / speaker).glob("*.wav"))[:: 60 // n][:n]]
    seed = int(speaker[-2:])
    return [u.audio.astype(np.float32) for u in make_corpus(seed=seed, n_speakers=1, per_class=2).utterances[:n]]


def _padded(audio: list):
    lengths = np.array([len(a) for a in audio])
    batch = np.zeros((len(audio), lengths.max() + 555), np.float32)
    for i, a in enumerate(audio):
        batch[i, : len(a)] = a
    return batch, lengths


@pytest.mark.parametrize("fmt,atol", [("onnx", 1e-4), ("torch", 1e-5)])
def test_the_fused_default_exports_whole_and_scores_as_predict(fused_run, tmp_path, fmt, atol):
    """The file takes each clip's openSMILE functionals and gives predict's fused probabilities: with
    the training statistics, with a speaker's fed in (ONNX) or assigned (torch), and baked in by
    --enroll; --model-only still writes the model alone."""
    import opensmile

    from fastser import functionals

    audio, enroll_audio = _speech("Actor_03", 6), _speech("Actor_03", 12)[1::2]
    batch, lengths = _padded(audio)
    enroll = []
    for i, y in enumerate(enroll_audio):
        enroll.append(tmp_path / f"enroll{i}.wav")
        sf.write(enroll[-1], y, 16000)
    enroll_audio = [sf.read(p, dtype="float32")[0] for p in enroll]  # as predict reads them (16-bit PCM)
    _, want = _predicted(fused_run, audio)
    _, want_enrolled = _predicted(fused_run, audio, enroll=enroll)
    predictor, _ = _predicted(fused_run, audio)
    predictor.heads = []
    model_alone = np.stack([p.probabilities for p in predictor.predict(audio)])
    assert np.abs(want - model_alone).max() > 1e-3, "the functionals must change the scores for this test to mean much"
    assert np.abs(want - want_enrolled).max() > 1e-3, "enrollment must change the scores for this test to mean much"

    # the functionals as a user computes them, with openSMILE alone
    smile = opensmile.Smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.Functionals)
    x = np.concatenate([smile.process_signal(y, 16000).to_numpy(np.float32) for y in audio])
    path = export.export(fused_run, fmt, out=tmp_path / export.FORMATS[fmt])
    np.testing.assert_allclose(export.run_file(path, batch, lengths, x), want, atol=atol)
    np.testing.assert_allclose(export.run_file(path, audio[4][None], lengths[4:5], x[4:5]), want[4:5], atol=atol)

    # a speaker's statistics: the spectral ones from the file's sums, the functionals' mean and std
    e_batch, e_lengths = _padded(enroll_audio)
    e_x = np.concatenate([smile.process_signal(y, 16000).to_numpy(np.float32) for y in enroll_audio])
    f_mean, f_std = functionals.speaker_statistics(e_x.astype(np.float64))
    if fmt == "onnx":
        session, meta = export.load_onnx(path)
        e_feed = {"audio": e_batch, "lengths": e_lengths, "functionals": e_x}  # every input, every call
        sums, sq, n = session.run(["feature_sum", "feature_sq_sum", "frames"], e_feed)
        mean, std = export.speaker_statistics(sums, sq, n)
        feed = {"audio": batch, "lengths": lengths, "functionals": x, "speaker_mean": mean, "speaker_std": std}
        feed.update(functionals_mean=f_mean, functionals_std=f_std, functionals_enrolled=np.array(True))
        np.testing.assert_allclose(session.run(["probabilities"], feed)[0], want_enrolled, atol=atol)
        assert meta["functionals"]["opensmile_feature_set"] == "ComParE_2016" and meta["functionals"]["size"] == 6373
        assert meta["inputs"] == ["audio", "lengths", "functionals"]
    else:
        program, meta = export.load_torch(path)
        module = program.module()
        with torch.no_grad():
            _, sums, sq, n = module(*(torch.from_numpy(v) for v in (e_batch, e_lengths, e_x)))
        mean, std = export.speaker_statistics(sums, sq, n)
        assigned = dict(speaker_mean=mean, speaker_std=std, functionals_mean=f_mean, functionals_std=f_std)
        for name, value in assigned.items():
            getattr(module, name).copy_(torch.from_numpy(np.asarray(value)))
        module.functionals_enrolled.fill_(True)
        with torch.no_grad():
            got = module(*(torch.from_numpy(v) for v in (batch, lengths, x)))[0].numpy()
        np.testing.assert_allclose(got, want_enrolled, atol=atol)
    with pytest.warns(predict.PredictWarning):
        baked = export.export(fused_run, fmt, out=tmp_path / f"speaker-{export.FORMATS[fmt]}", enroll=enroll)
    np.testing.assert_allclose(export.run_file(baked, batch, lengths, x), want_enrolled, atol=atol)

    alone = export.export(fused_run, fmt, out=tmp_path / f"alone-{export.FORMATS[fmt]}", model_only=True)
    np.testing.assert_allclose(export.run_file(alone, batch, lengths), model_alone, atol=atol)


def test_the_readmes_fused_snippet_runs_without_fastser(fused_run, tmp_path):
    """The README's onnxruntime + openSMILE snippet, run as written in a process that cannot import
    fastser or torch, gives predict's probabilities."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "opensmile" in b]
    model = export.export(fused_run, "onnx", out=tmp_path / "model.onnx")
    sf.write(tmp_path / "clip.wav", _speech("Actor_05", 1)[0], 16000)
    clip = sf.read(tmp_path / "clip.wav", dtype="float32")[0]  # as the snippet reads it (16-bit PCM)
    _, want = _predicted(fused_run, [clip])
    code = (
        "import sys\nsys.modules['fastser'] = sys.modules['torch'] = None  # neither may be imported\n"
        + snippet.replace("runs/<ts>/model.onnx", str(model)).replace("clip.wav", str(tmp_path / "clip.wav"))
        + "\nnp.save(sys.argv[1], probabilities)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, atol=1e-4)
