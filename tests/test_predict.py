"""fastser.predict: whole recordings in windows, flags for doubtful clips, inputs, output formats."""

import csv
import io
import json
import tracemalloc

from pathlib import Path

import numpy as np
import torch
import pytest
import soundfile as sf

import fastser.predict as predict
import fastser.predictor as predictor_module
import fastser.train as train
from fastser.data.synthetic import make_corpus
from tests.test_train import SMALL

# every test here trains a model or runs a command end to end
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    train.main(SMALL + ["--epochs", "1", "--out", str(out)])  # SMALL trains on 1 s crops: 1 s windows, 0.5 s hop
    return out


@pytest.fixture(scope="module")
def corpus_run_dir(tmp_path_factory):
    """A run with the training fold's statistics (--normalize corpus), as every run of the first checkpoint format."""
    out = tmp_path_factory.mktemp("predict") / "corpus-run"
    train.main(SMALL + ["--epochs", "1", "--normalize", "corpus", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    utts = make_corpus(seed=5, n_speakers=1, per_class=2).utterances
    paths = []
    for u in utts[:2]:
        paths.append(folder / f"{u.uid}.wav")
        sf.write(paths[-1], u.audio, 16000)
    return folder, paths, utts


def test_predict_loads_a_checkpoint_and_prints(run_dir, clips, capsys):
    _, files, _ = clips
    files = [str(f) for f in files]
    capsys.readouterr()
    assert predict.main(files + ["--checkpoint", str(run_dir / "checkpoint.pt"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == files
    for r in results:
        assert r["emotion"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-3
        assert r["windows"] == 1 and not r["too_short"] and not r["near_silent"]
    assert predict.main(files[:1] + ["--checkpoint", str(run_dir)]) == 0  # the run folder works too
    assert files[0] in capsys.readouterr().out


def test_a_long_recording_is_scored_whole_in_windows(run_dir, clips, tmp_path, monkeypatch):
    """Once the first 8 s decided for the whole file: now every window counts, and the file's
    probabilities are the length-weighted mean of its windows."""
    _, _, utts = clips
    audio = np.concatenate([u.audio for u in utts] * 2)  # > 8 s: windows, not one clip
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")  # the same samples as `audio`, no 16-bit rounding
    p = predict.Predictor(run_dir)
    pred = p.predict_file(path)
    duration = len(audio) / 16000
    assert pred.duration == pytest.approx(duration, abs=1e-3)
    assert pred.segments[0].start == 0 and pred.segments[-1].end == pytest.approx(duration, abs=1e-3)
    starts = [s.start for s in pred.segments]
    assert np.allclose(np.diff(starts), p.hop_seconds) and len(pred.segments) >= 2 * duration / p.window_seconds - 2
    # each window scored alone gives the same probabilities; the file's are their weighted mean
    for s in pred.segments[::7]:
        alone = p._score([audio[round(s.start * 16000) : round(s.end * 16000)]])[0]
        np.testing.assert_allclose(s.probabilities, alone, atol=1e-5)
    w = np.array([s.end - s.start for s in pred.segments])
    np.testing.assert_allclose(
        pred.probabilities,
        (np.stack([s.probabilities for s in pred.segments]) * w[:, None]).sum(0) / w.sum(),
        atol=1e-6,
    )
    np.testing.assert_allclose(p.predict_waveform(audio).probabilities, pred.probabilities, atol=1e-4)
    bad = audio.copy()
    bad[100] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        p.predict_waveform(bad)


def test_long_files_are_streamed_in_bounded_memory(run_dir, tmp_path, monkeypatch):
    minutes = 12
    rng = np.random.default_rng(0)
    path = tmp_path / "hours.flac"
    with sf.SoundFile(path, "w", samplerate=22050, channels=1) as f:  # resampled while streaming
        for _ in range(minutes):
            f.write((0.1 * rng.standard_normal(22050 * 60)).astype(np.float32))
    decoded_bytes = minutes * 60 * 16000 * 4
    monkeypatch.setattr(predictor_module, "load", lambda *a, **k: pytest.fail("a long file must not be read whole"))
    p = predict.Predictor(run_dir, batch_size=64)
    tracemalloc.start()
    pred = p.predict_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pred.duration == pytest.approx(minutes * 60, abs=0.01)
    assert peak < decoded_bytes / 4, f"peak {peak / 2**20:.1f} MiB for {decoded_bytes / 2**20:.0f} MiB of audio"


def test_doubtful_clips_are_flagged(run_dir, clips, tmp_path, capsys):
    _, _, utts = clips
    cases = {
        "short.wav": utts[0].audio[:800],
        "one_sample.wav": utts[0].audio[:1],
        "silence.wav": np.zeros(16000, np.float32),
    }
    for name, y in cases.items():
        sf.write(tmp_path / name, y, 16000)
    capsys.readouterr()
    assert predict.main([str(tmp_path / n) for n in cases] + ["--checkpoint", str(run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    out = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads(captured.out)}
    assert out["short.wav"]["too_short"] and out["one_sample.wav"]["too_short"]
    assert not out["short.wav"]["near_silent"]
    assert out["silence.wav"]["near_silent"] and not out["silence.wav"]["too_short"]
    warnings = [line for line in captured.err.splitlines() if ": warning: " in line]
    assert "synthetic corpus" in warnings[0]  # the tests' model never heard speech
    assert "no --enroll" in warnings[1]  # once, for a speaker-normalised model without enrollment
    assert len(warnings) == 5 and all("unreliable" in w for w in warnings[2:])


def test_folders_globs_and_csv_segments(run_dir, clips, capsys):
    folder, files, _ = clips
    capsys.readouterr()
    assert predict.main([str(folder), "--checkpoint", str(run_dir), "--format", "csv", "--segments"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header, rows = rows[0], rows[1:]
    assert header[:4] == ["file", "start", "end", "emotion"] and len(header) == 8
    assert sorted({r[0] for r in rows}) == sorted(str(f) for f in files)
    assert all(abs(sum(map(float, r[4:])) - 1) < 1e-3 for r in rows)
    assert predict.main([str(folder / "*.wav"), "--checkpoint", str(run_dir)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(files)
    assert predict.cli([str(folder / "*.mp3"), "--checkpoint", str(run_dir)]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_predict_errors(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    assert predict.cli([str(bad), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert predict.cli([str(bad), "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "not a fastser checkpoint" in capsys.readouterr().err


def test_an_empty_input_path_is_an_error_not_the_working_directory(tmp_path, monkeypatch):
    """Path("") is ".": an empty argument (an unset shell variable) must not predict every audio
    file under the working directory."""
    (tmp_path / "a.wav").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    files, errors = predict.expand_inputs(["", "  "])
    assert files == [] and len(errors) == 2 and all("empty path" in e for e in errors)
    assert predict.expand_inputs(["."])[0] == [str(Path("a.wav"))]


def test_checkpoints_of_fastser_0_1_still_load(corpus_run_dir, clips, tmp_path):
    """0.1 kept the spec in the run config and called the log-mel branch "spectrogram"."""
    import torch

    run_dir = corpus_run_dir
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k != "spec"}
    rename = lambda d: {("spectrogram" if k == "logmel" else k): v for k, v in d.items()}  # noqa: E731
    old["config"] = {**ckpt["config"], "feature_configs": rename(ckpt["config"]["feature_configs"])}
    old["final"] = {
        **ckpt["final"],
        "model": {k.replace(".logmel.", ".spectrogram."): v for k, v in ckpt["final"]["model"].items()},
        "norm": {s: rename(v) for s, v in ckpt["final"]["norm"].items()},
    }
    assert any(".spectrogram." in k for k in old["final"]["model"])
    torch.save(old, tmp_path / "old.pt")
    _, files, _ = clips
    new_p = predict.Predictor(run_dir).predict_file(files[0]).probabilities
    old_p = predict.Predictor(tmp_path / "old.pt").predict_file(files[0]).probabilities
    np.testing.assert_array_equal(new_p, old_p)
    # 0.1 pooled the CNN maps globally and its config does not say so
    from fastser.checkpoints import finished_model

    del old["config"]["pooling"]
    assert finished_model(old)[0].pooling == "global"


def test_speaker_enrollment(run_dir, corpus_run_dir, clips, tmp_path, capsys):
    """Speaker-normalised models: without enrollment the training speakers' pooled statistics
    saved with the model; --enroll gives the speaker's (from unlabelled audio of that speaker),
    which changes the scores; a corpus-normalised model refuses --enroll with one line."""
    import torch

    folder, files, _ = clips
    p = predict.Predictor(run_dir)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["final"]["norm"]
    torch.testing.assert_close(p.norms[0].mean["mfcc"], saved["mean"]["mfcc"], rtol=0, atol=0)
    torch.testing.assert_close(p.norms[0].std["logmel"], saved["std"]["logmel"], rtol=0, atol=0)
    alone = p.predict_file(files[0]).probabilities
    enrolled = predict.Predictor(run_dir, enroll=[str(f) for f in files])
    assert enrolled.norms[0] is not None and enrolled.norms[0].mean["logmel"].shape == (64,)
    assert not np.allclose(enrolled.predict_file(files[0]).probabilities, alone)
    # the enrollment statistics are the speaker's valid frames, as training computes them
    from fastser.audio import load

    audio = [load(str(f), sr=16000)[0] for f in files]  # as written to disk (16-bit PCM)
    feats = [enrolled.features.extract(torch.from_numpy(a)[None], torch.tensor([len(a)])) for a in audio]
    cols = torch.cat([f[0]["mfcc"][0] for f in feats], dim=1).double()
    torch.testing.assert_close(enrolled.norms[0].mean["mfcc"], cols.mean(1).float(), atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert predict.main([str(files[0]), "--checkpoint", str(run_dir), "--enroll", str(folder)]) == 0
    assert "no --enroll" not in capsys.readouterr().err
    assert predict.cli([str(files[0]), "--checkpoint", str(corpus_run_dir), "--enroll", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--normalize speaker" in err[0]


def test_bad_enrollment_audio_is_one_clear_error(run_dir, clips, tmp_path, capsys):
    """--enroll naming nothing usable: exit 2, one line naming the problem, no prediction printed."""
    _, files, _ = clips
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    for enroll, expected in ((tmp_path / "missing.wav", "missing.wav: no such file"), (bad, "bad.wav")):
        capsys.readouterr()
        assert predict.cli([str(files[0]), "--checkpoint", str(run_dir), "--enroll", str(enroll)]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0] and expected in err[0], err
        assert captured.out == ""


def test_several_checkpoints_average_their_probabilities(run_dir, corpus_run_dir, clips, tmp_path, capsys):
    """--checkpoint A B: each file's probabilities are the mean of the two models' (a soft vote),
    with enrollment statistics applied to both; models of other settings are refused in one line."""
    _, files, _ = clips
    other = tmp_path / "seed-1"
    train.main(SMALL + ["--epochs", "1", "--seed", "1", "--out", str(other)])
    alone = [predict.Predictor(d).predict_file(files[0]).probabilities for d in (run_dir, other)]
    both = predict.Predictor([run_dir, other])
    np.testing.assert_allclose(both.predict_file(files[0]).probabilities, (alone[0] + alone[1]) / 2, atol=1e-6)
    enrolled = [predict.Predictor(d, enroll=files).predict_file(files[0]).probabilities for d in (run_dir, other)]
    np.testing.assert_allclose(
        predict.Predictor([run_dir, other], enroll=files).predict_file(files[0]).probabilities,
        (enrolled[0] + enrolled[1]) / 2,
        atol=1e-6,
    )
    assert not np.allclose(alone[0], alone[1])  # really two different models
    capsys.readouterr()
    assert predict.main([str(files[0]), "--checkpoint", str(run_dir), str(other), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)[0]["probabilities"]
    np.testing.assert_allclose([shown[c] for c in both.classes], (alone[0] + alone[1]) / 2, atol=1e-3)
    assert predict.cli([str(files[0]), "--checkpoint", str(run_dir), str(corpus_run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "normalize" in err[0] and "same setting" in err[0]


def test_enrollment_audio_is_checked_like_the_input(run_dir, clips, tmp_path, capsys):
    """Near-silent or too-short enrollment files are left out with a warning naming --enroll and the
    file; with too little usable audio the training statistics stay (the scores of no enrollment);
    an unreadable one is one error line that says it was the enrollment file."""
    _, files, _ = clips
    silence, blip, text = tmp_path / "silence.wav", tmp_path / "blip.wav", tmp_path / "notes.txt"
    sf.write(silence, np.zeros(32000, np.float32), 16000)
    sf.write(blip, np.full(1, 0.1, np.float32), 16000)
    text.write_text("the speaker's notes")
    alone = predict.Predictor(run_dir).predict_file(files[0]).probabilities
    for bad, why in ((silence, "near-silent (digital silence"), (blip, "is shorter than 0.5 s")):
        with pytest.warns(predict.PredictWarning) as record:
            fallback = predict.Predictor(run_dir, enroll=[str(bad)])
        messages = [str(w.message) for w in record]
        assert any(m.startswith(f"--enroll: {bad}: ") and why in m and "left out" in m for m in messages), messages
        assert any("the training speakers' statistics are used instead" in m for m in messages), messages
        np.testing.assert_allclose(fallback.predict_file(files[0]).probabilities, alone, atol=1e-6)
    with pytest.warns(predict.PredictWarning, match="silence.wav"):
        mixed = predict.Predictor(run_dir, enroll=[str(silence), str(files[1])])
    good = predict.Predictor(run_dir, enroll=[str(files[1])])
    np.testing.assert_allclose(mixed.predict_file(files[0]).probabilities, good.predict_file(files[0]).probabilities)
    assert not np.allclose(good.predict_file(files[0]).probabilities, alone)
    capsys.readouterr()
    assert predict.main([str(files[0]), "--checkpoint", str(run_dir), "--enroll", str(silence)]) == 0
    captured = capsys.readouterr()
    assert f"warning: --enroll: {silence}: near-silent" in captured.err and str(files[0]) in captured.out
    assert predict.cli([str(files[0]), "--checkpoint", str(run_dir), "--enroll", str(text)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"error: --enroll: {text}: not a readable audio file" in err[0], err
    assert captured.out == ""


def test_a_model_trained_on_the_synthetic_corpus_says_so(run_dir, clips, capsys):
    _, files, _ = clips
    with pytest.warns(predict.PredictWarning, match="synthetic corpus"):
        predict.Predictor(run_dir)
    capsys.readouterr()
    assert predict.main([str(files[0]), "--checkpoint", str(run_dir)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "synthetic corpus" in line]
    assert len(lines) == 1 and "warning:" in lines[0] and "mean nothing" in lines[0]


def test_a_folder_without_a_checkpoint_says_what_it_lacks(tmp_path):
    (tmp_path / "empty-run").mkdir()
    assert predict.cli(["x.wav", "--checkpoint", str(tmp_path / "empty-run")]) == 2


def test_the_python_api_takes_paths_arrays_at_their_rate_and_batches(run_dir, clips, tmp_path):
    """Predictor.predict: a path, an array at its own sample rate (resampled), or a list of both; the
    batched short clips score as each does alone, in order."""
    import soxr

    _, files, utts = clips
    predictor = predict.Predictor(run_dir, batch_size=2)
    audio = [u.audio for u in utts[:3]]
    alone = [predictor.predict_waveform(y).probabilities for y in audio]
    together = predictor.predict([audio[0], str(files[1]), audio[1], audio[2]])
    assert [p.file for p in together][1] == str(files[1])
    for got, want in zip([together[0], together[2], together[3]], alone):
        np.testing.assert_allclose(got.probabilities, want, atol=1e-5)
    np.testing.assert_allclose(together[1].probabilities, predictor.predict(files[1]).probabilities, atol=1e-6)
    at_48k = soxr.resample(audio[0], 16000, 48000, quality="HQ").astype(np.float32)
    np.testing.assert_allclose(predictor.predict(at_48k, sr=48000).probabilities, alone[0], atol=0.02)
    np.testing.assert_allclose(
        predictor.probabilities(at_48k, sr=48000).numpy(), predictor.predict(at_48k, sr=48000).probabilities
    )
    with pytest.raises(ValueError, match="mono"):
        predictor.predict(np.stack([audio[0][:8000], audio[1][:8000]]))


def test_raw_samples_without_a_rate_warn_and_every_path_gives_float32(run_dir, clips):
    """Samples without sr are taken at the model's rate with a warning naming it; the probabilities
    are float32 whichever way predict is called (one clip, a batch, a long clip's windows, a file)."""
    import warnings

    _, files, utts = clips
    predictor = predict.Predictor(run_dir, batch_size=2)
    clip = utts[0].audio
    with pytest.warns(UserWarning, match=r"without sr: taken to be at the model's 16000 Hz"):
        predictor.predict_waveform(clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given the rate, or reading a file: no warning
        results = [
            predictor.predict_waveform(clip, sr=16000),
            *predictor.predict([clip, clip], sr=16000),
            predictor.predict(np.tile(clip, 8), sr=16000),  # longer than a window: windows averaged
            predictor.predict(files[0]),
        ]
    assert [r.probabilities.dtype for r in results] == [np.float32] * 5
    assert predictor.probabilities(clip, sr=16000).dtype == torch.float32


def test_library_errors_name_the_argument_not_a_command_line_flag(run_dir):
    from fastser.errors import UserError

    with pytest.raises(UserError) as bad:
        predict.Predictor(run_dir, device="gpu")
    assert str(bad.value).startswith("device 'gpu'") and "--" not in str(bad.value)


def test_many_files_are_predicted_on_every_core_as_in_one_process(tmp_path):
    """predict_files with two worker processes gives the one-process result, file for file and in
    order (the openSMILE functionals of a fused run included), a bad file its error among them."""
    pytest.importorskip("opensmile")
    run = tmp_path / "fused"
    train.main(SMALL + ["--epochs", "1", "--functionals", "egemaps", "--out", str(run)])
    utts = make_corpus(seed=9, n_speakers=2, per_class=3).utterances
    paths = []
    for i, u in enumerate(utts):
        paths.append(tmp_path / f"clip{i:02d}.wav")
        sf.write(paths[-1], u.audio, 16000)
    long = tmp_path / "long.wav"  # past the whole-clip length: scored in windows
    sf.write(long, np.concatenate([u.audio for u in utts[:4]] * 2), 16000)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    paths[5:5] = [long, bad]
    with pytest.warns(predict.PredictWarning):
        predictor = predict.Predictor(run)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count: the one-process run computes exactly as they do
    try:
        alone = list(predictor.predict_files(paths, workers=1))
    finally:
        torch.set_num_threads(before)
    parallel = list(predictor.predict_files(paths, workers=2))
    assert [p for p, _ in parallel] == [p for p, _ in alone] == [str(p) for p in paths]
    assert isinstance(dict(parallel)[str(bad)], predict.AudioError)
    for (path, a), (_, b) in zip(alone, parallel):
        if path == str(bad):
            continue
        assert a.file == b.file == path and len(a.segments) == len(b.segments)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        np.testing.assert_allclose(a.probabilities, predictor.predict_file(path).probabilities, atol=1e-6)
    assert len(dict(alone)[str(long)].segments) > 1


def test_a_worker_count_below_one_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        predict.cli([str(tmp_path / "a.wav"), "--checkpoint", str(tmp_path), "--workers", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--workers must be positive" in err and err.count("\n") == 1


def test_adapting_the_batch_norms_to_the_enrolled_speaker(run_dir, clips, capsys):
    """--adapt-batchnorms: each encoder batch norm's running mean and variance become the average,
    over the enrollment clips scored alone, of that layer's batch statistics (captured here by hooks
    on a copy whose encoder batch norms normalise with batch statistics and keep their running
    ones); every other tensor of the model is untouched; a second enrollment starts afresh (same
    statistics whatever the model held before); without --enroll the flag is one error line."""
    import copy

    import torch

    from fastser.audio import load

    folder, files, _ = clips
    plain = predict.Predictor(run_dir, enroll=files)
    before = {k: v.clone() for k, v in plain.models[0].state_dict().items()}
    reference = copy.deepcopy(plain.models[0])
    layers = {
        n: m
        for n, m in reference.named_modules()
        if n.startswith("encoders.") and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert len(layers) >= 4
    seen = {n: [] for n in layers}
    for n, m in layers.items():
        m.train()
        m.momentum = 0.0  # batch statistics in the output, the running ones left as they are
        m.register_forward_hook(lambda m, args, out, n=n: seen[n].append(args[0].detach()))
    with torch.no_grad():
        for f in files:
            y = load(str(f), sr=plain.sr)[0]
            predictor_module.score([reference], plain.norms, plain.features, [y], plain.device)
    adapted = predict.Predictor(run_dir, enroll=files, adapt_batchnorms=True)
    state = adapted.models[0].state_dict()
    for name, inputs in seen.items():
        dims = [0] + list(range(2, inputs[0].dim()))
        mean = torch.stack([x.double().mean(dims) for x in inputs]).mean(0)
        var = torch.stack([x.double().var(dims, unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(state[f"{name}.running_mean"].double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[f"{name}.running_var"].double(), var, rtol=1e-4, atol=1e-5)
        assert not torch.equal(state[f"{name}.running_mean"], before[f"{name}.running_mean"])
    adapted_buffers = {f"{n}.{b}" for n in layers for b in ("running_mean", "running_var", "num_batches_tracked")}
    for key, value in before.items():
        if key not in adapted_buffers:
            assert torch.equal(state[key], value), key
    assert not adapted.models[0].training and not any(m.training for m in adapted.models[0].modules())
    again = {k: v.clone() for k, v in state.items()}
    adapted.enroll_speaker(files, adapt_batchnorms=True)  # from adapted statistics: the same result
    for key, value in adapted.models[0].state_dict().items():
        torch.testing.assert_close(value, again[key], rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    command = [str(files[0]), "--checkpoint", str(run_dir), "--adapt-batchnorms"]
    assert predict.main(command + ["--enroll", str(folder)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        predict.cli(command)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--adapt-batchnorms needs --enroll" in err and err.count("\n") == 1
