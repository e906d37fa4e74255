"""--functionals-fusion input: openSMILE functionals as a branch of the network, one column per clip.
Their statistics count each clip once, batches never crop them, the model fuses them before the
embedding, and a run's predict feeds them as training did."""

import json

import numpy as np
import pytest
import torch

from fastser.config import TrainConfig
from fastser.errors import UserError
from fastser.functionals import INPUT_KIND, input_columns
from fastser.models.cnn import FunctionalsEncoder, SERModel
from fastser.normalization import Normalizer
from fastser.training.batches import Batcher


def _table(n=12, bins=3, width=20, n_features=5, seed=0):
    """A spectral kind with frames of every length beside a clip kind (raw functionals of every scale)."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(4, width + 1, (n,), generator=gen)
    spectral = torch.randn(n, bins, width, generator=gen) * (torch.arange(width)[None, None, :] < frames[:, None, None])
    rows = np.random.default_rng(seed).normal(0, 1, (n, n_features)) * np.logspace(0, 5, n_features) + 7.0
    return {"logmel": spectral, INPUT_KIND: input_columns(rows)}, frames, rows


def _population(rows):
    std = rows.std(0)
    return rows.mean(0), np.maximum(std, 1e-4)


def test_each_clip_counts_once_in_the_statistics_of_a_clip_kind():
    feats, frames, rows = _table()
    speakers = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    by_speaker = Normalizer.fit_groups(feats, frames, speakers, 3)
    for s in range(3):
        mean, std = _population(rows[speakers.numpy() == s])
        np.testing.assert_allclose(by_speaker.mean[INPUT_KIND][s], mean, rtol=1e-5)
        np.testing.assert_allclose(by_speaker.std[INPUT_KIND][s], std, rtol=1e-4)
    # the spectral kind still counts frames: its mean is over the valid frames, not the clips
    mine = speakers == 0
    spectral = torch.cat([feats["logmel"][i, :, : frames[i]] for i in torch.nonzero(mine).flatten()], 1)
    np.testing.assert_allclose(by_speaker.mean["logmel"][0], spectral.double().mean(1), rtol=1e-5, atol=1e-6)

    train = torch.arange(8)
    pooled = Normalizer.fit(feats, frames, train)
    np.testing.assert_allclose(pooled.mean[INPUT_KIND], _population(rows[:8])[0], rtol=1e-5)
    members = torch.tensor([[0, 1], [0, 4], [0, 6], [1, 2], [1, 9]])  # (group, row): two subsets of rows
    subsets = Normalizer.fit_subsets(feats, frames, members, 2)
    for g, chosen in ((0, [1, 4, 6]), (1, [2, 9])):
        np.testing.assert_allclose(subsets.mean[INPUT_KIND][g], _population(rows[chosen])[0], rtol=1e-5)
        np.testing.assert_allclose(subsets.std[INPUT_KIND][g], _population(rows[chosen])[1], rtol=1e-4)
    items = Normalizer.fit_items({k: x[i, :, : frames[i]] for k, x in feats.items()} for i in range(8))
    np.testing.assert_allclose(items.mean[INPUT_KIND], pooled.mean[INPUT_KIND], rtol=1e-6)


def test_a_clip_kind_is_normalised_but_never_masked_or_cropped():
    feats, frames, rows = _table()
    speakers = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    norm = Normalizer.fit_groups(feats, frames, speakers, 3)
    want = (feats[INPUT_KIND][:, :, 0] - norm.mean[INPUT_KIND][speakers]) / norm.std[INPUT_KIND][speakers]
    out = norm.apply(feats, frames, speakers)
    assert out[INPUT_KIND].shape == (12, 5, 1)
    torch.testing.assert_close(out[INPUT_KIND][:, :, 0], want)
    assert (out["logmel"][0, :, frames[0] :] == 0).all(), "the spectral kind's padding stays 0"

    labels = torch.zeros(12, dtype=torch.long)
    rows_ = torch.tensor([2, 5, 11])
    batches = []
    for resident in (False, True):
        batcher = Batcher(feats, frames, labels, norm, torch.device("cpu"), 4, groups=speakers, resident=resident)
        assert batcher.width == 20
        batch = batcher.batch(rows_, torch.Generator().manual_seed(3))
        assert batch.feats["logmel"].shape == (3, 3, 4) and batch.feats[INPUT_KIND].shape == (3, 5, 1)
        torch.testing.assert_close(batch.feats[INPUT_KIND][:, :, 0], want[rows_])
        batches.append(batch)
        whole = batcher.batch(rows_)  # evaluation: whole utterances
        torch.testing.assert_close(whole.feats[INPUT_KIND][:, :, 0], want[rows_])
    for kind in batches[0].feats:  # host and resident batches are the same batch
        torch.testing.assert_close(batches[0].feats[kind], batches[1].feats[kind])


def test_the_network_fuses_the_functionals_before_the_embedding():
    torch.manual_seed(0)
    model = SERModel({"logmel": 16, INPUT_KIND: 30}, 4, width=4, embed_dim=8).eval()
    assert list(model.decoders) == ["logmel"], "only the spectral kinds are reconstructed"
    frames = torch.tensor([20, 12])
    feats = {"logmel": torch.randn(2, 16, 20), INPUT_KIND: torch.randn(2, 30, 1)}
    first = model(feats, frames).embedding
    changed = model({**feats, INPUT_KIND: feats[INPUT_KIND] + 1.0}, frames).embedding
    assert (first - changed).abs().max() > 1e-3, "the functionals reach the embedding"
    # z-scores from too few clips are clipped: beyond the clip nothing changes
    encoder = model.encoders[INPUT_KIND]
    big = torch.full((2, 30, 1), 1e4)
    torch.testing.assert_close(encoder(big), encoder(torch.full((2, 30, 1), FunctionalsEncoder.CLIP)))

    model.train()
    out = model(feats, frames)
    assert set(out.reconstruction) == {"logmel"}
    out.logits.sum().backward()
    grad = encoder.net[1].weight.grad
    assert grad is not None and grad.abs().sum() > 0, "the branch trains"


def test_input_fusion_needs_a_set_and_clips_as_recorded():
    def problems(**changes):
        return TrainConfig().replace(**changes).resolved().problems(lambda k: "--" + k.replace("_", "-"))

    assert any("--functionals-fusion must be one of late, input" in p for p in problems(functionals_fusion="x"))
    assert any("input needs a feature set" in p for p in problems(functionals_fusion="input", functionals="none"))
    found = problems(functionals_fusion="input", functionals="egemaps", speed_perturb=(0.9, 1.1))
    assert any("does not combine with --speed-perturb" in p for p in found)
    assert not problems(functionals_fusion="input", functionals="egemaps")


@pytest.mark.slow
def test_a_run_with_functionals_as_input_trains_predicts_and_refuses_export(tmp_path, capsys):
    pytest.importorskip("opensmile")
    from fastser import export, functionals, predict, train
    from fastser.data.synthetic import make_corpus
    from tests.test_train import SMALL

    out = tmp_path / "run"
    train.main(
        SMALL + ["--epochs", "1", "--functionals", "egemaps", "--functionals-fusion", "input", "--out", str(out)]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "model" not in metrics, "no classifier beside the model: its predictions are the run's"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["spec"]["functionals_input"] == "egemaps" and "functionals" not in ckpt["final"]
    assert ckpt["final"]["norm"]["mean"][INPUT_KIND].shape == (88,)

    clips = [u.audio.astype(np.float32) for u in make_corpus(seed=5, n_speakers=1, per_class=2).utterances]
    with pytest.warns(predict.PredictWarning):  # trained on the synthetic corpus
        predictor = predict.Predictor(out, enroll=None)
    got = np.stack([p.probabilities for p in predictor.predict(clips, sr=16000)])
    # what predict must compute: the clips' features and functionals through the stored statistics
    lengths = torch.tensor([len(c) for c in clips])
    audio = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(c)
    raw, frames = predictor.features.extract(audio, lengths)
    raw[INPUT_KIND] = input_columns(functionals.extract(clips, "egemaps"))
    norm = Normalizer(**ckpt["final"]["norm"])
    with torch.no_grad():
        want = torch.softmax(predictor.models[0](norm.apply(raw, frames), frames).logits, 1).numpy()
        raw[INPUT_KIND] = torch.zeros_like(raw[INPUT_KIND])
        blind = torch.softmax(predictor.models[0](norm.apply(raw, frames), frames).logits, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - blind).max() > 1e-4, "the functionals changed nothing: the comparison proves little"

    # enrollment: the speaker's statistics of the functionals, each clip counted once
    with pytest.warns(predict.PredictWarning):
        enrolled = predict.Predictor(out)
    enrolled.enroll_speaker([_wav(tmp_path, i, c) for i, c in enumerate(clips)])
    rows = functionals.extract(clips, "egemaps")
    np.testing.assert_allclose(enrolled.norms[0].mean[INPUT_KIND], rows.mean(0), rtol=1e-4, atol=1e-4)

    plain = tmp_path / "plain"  # the model alone: no ensemble with a model that reads functionals
    train.main(SMALL + ["--epochs", "1", "--functionals", "none", "--out", str(plain)])
    with pytest.raises(UserError, match="functionals_input"):
        predict.Predictor([out, plain])

    capsys.readouterr()
    assert export.cli([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--functionals-fusion input" in err and len(err.splitlines()) == 1
    assert export.cli([str(out), "--model-only"]) == 2


def _wav(folder, i, samples):
    import soundfile

    path = folder / f"enroll{i}.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    return str(path)


def test_functionals_of_another_size_than_the_model_expects_stop_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("opensmile")
    from fastser import train
    from fastser.training import inputs as training_inputs
    from tests.test_train import SMALL

    monkeypatch.setitem(training_inputs.SIZES, "egemaps", 87)  # as another openSMILE version might give
    out = tmp_path / "run"
    argv = SMALL + ["--epochs", "1", "--functionals", "egemaps", "--functionals-fusion", "input", "--out", str(out)]
    capsys.readouterr()
    assert train.cli(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "openSMILE gave 88 egemaps functionals a clip, the model expects 87" in err[0], err
    assert not (out / "checkpoint.pt").exists(), "nothing trained, nothing saved"
