"""fastser.train end to end on small synthetic corpora (CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastser.train as train
from fastser.training import inputs as training_inputs
from fastser.training import run as training_run
from fastser.config import TrainConfig
from fastser.errors import UserError
from fastser.training import Batch, Batcher, Experiment, FoldTrainer, Normalizer, mixup, tempo_crop, train_step
from fastser.training import fold as fold_training
from fastser.training import scoring
from fastser._io import atomic_torch_save
from fastser.data.synthetic import make_corpus
from fastser.features.featureset import FeatureSet

SMALL = (
    "--synthetic-speakers 6 --synthetic-per-class 4 --width 4 --embed-dim 16 --batch-size 16 --no-progress "
    "--train-seconds 1.0"
).split()


def run(tmp_path, name, *extra, env=None):
    out = tmp_path / name
    return train.main(SMALL + ["--out", str(out), *extra]), out


def test_one_epoch_reduces_the_loss():
    from fastser.data.cache import build_feature_table
    from fastser.data.splits import make_folds
    from fastser.models import SERModel, SERObjective

    corpus = make_corpus(seed=0, n_speakers=4, per_class=4, seconds=1.0)
    table = build_feature_table(corpus, ["mfcc"], torch.device("cpu"))
    fold = make_folds(corpus, "holdout")[0]
    norm = Normalizer.fit(table.feats, table.frames, torch.from_numpy(fold.train))
    batcher = Batcher(table.feats, table.frames, table.labels, norm, torch.device("cpu"), 100)
    torch.manual_seed(0)
    model = SERModel({"mfcc": 40}, 4, width=4, embed_dim=16)
    objective = SERObjective(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = torch.from_numpy(fold.train)
    feats, frames, labels, _ = batcher.batch(rows)

    def loss():
        model.eval()
        with torch.no_grad():
            out = model(feats, frames)
            return torch.nn.functional.cross_entropy(out.logits, labels).item()

    before = loss()
    for _ in range(3):  # three passes of one epoch's batches
        for i in range(0, len(rows), 8):
            model.train()
            f, fr, y, _ = batcher.batch(rows[i : i + 8], torch.Generator().manual_seed(i))
            train_step(model, objective, opt, f, f, fr, y)
    assert loss() < before


@pytest.mark.slow
def test_cli_writes_every_artifact(tmp_path):
    metrics, out = run(tmp_path, "a", "--epochs", "2")
    for name in (
        "metrics.json",
        "history.jsonl",
        "confusion.png",
        "embeddings.png",
        "config.json",
        "checkpoint.pt",
        "predictions.csv",
        "settings.json",
        "MODEL.md",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    card = (out / "MODEL.md").read_text()  # the model card: what it was trained and measured on, what it needs
    assert "corpus `synthetic`" in card and "speaker-independent fold" in card and "never heard" not in card
    assert f"UA {100 * metrics['ua']:.1f}%" in card and "without enrollment audio" in card
    assert "--enroll" in card and "real speech" in card
    m = json.loads((out / "metrics.json").read_text())
    for key in ("wa", "ua", "macro_f1", "per_class_recall", "confusion", "folds", "skipped"):
        assert key in m
    cm = np.array(m["confusion"])
    assert cm.sum() == m["n_test"] == m["folds"][0]["n_test"] > 0
    assert m["wa"] == pytest.approx(np.trace(cm) / cm.sum())
    assert m["ua"] == pytest.approx(np.mean([r for r in m["per_class_recall"].values()]))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(k in history[0] for k in ("ce", "center", "recon", "val_ua"))
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def _history(path):
    return [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in path.read_text().splitlines()]


def _cut_and_resume(tmp_path, monkeypatch, *args):
    """Run to the end ("full"), run again but stop mid-way through the second fold ("cut"), resume it."""
    full, full_out = run(tmp_path, "full", *args)
    monkeypatch.setenv("FASTSER_INTERRUPT_AFTER_EPOCHS", "4")  # mid-way through the second fold
    monkeypatch.setattr(fold_training.maybe_interrupt, "count", 0, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", *args)
    monkeypatch.delenv("FASTSER_INTERRUPT_AFTER_EPOCHS")
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["fold_results"]) == 1 and ckpt["fold_state"]["epoch"] == 1
    resumed = train.main(SMALL + [*args, "--resume", str(tmp_path / "cut")])
    return full, resumed, _history(full_out / "history.jsonl"), _history(tmp_path / "cut" / "history.jsonl")


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """--deterministic: bit-identical on any device (on a GPU too: deterministic kernels and center update)."""
    full, resumed, h_full, h_res = _cut_and_resume(
        tmp_path, monkeypatch, "--epochs", "3", "--split", "kfold", "--folds", "2", "--deterministic"
    )
    for key in ("wa", "ua", "macro_f1", "confusion"):
        assert resumed[key] == full[key], key
    assert h_full == h_res
    assert not torch.are_deterministic_algorithms_enabled()  # main() restored the global setting
    # the run's cost counts the epochs trained before the resume too (seconds: this session's only)
    assert full["resumed"] is False and resumed["resumed"] is True
    every_epoch = [json.loads(r)["seconds"] for r in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert len(every_epoch) == 6 and resumed["epoch_seconds"] == pytest.approx(sum(every_epoch))
    from lab.accuracy import collect_runs

    assert collect_runs([tmp_path / "cut"], "resumed")["seeds"]["0"]["seconds"] == resumed["epoch_seconds"]
    seeds = training_run.seed_summary({0: full, 1: resumed}, 1.0)["seeds"]  # a --seeds run with a resumed seed
    assert seeds["0"]["seconds"] == full["seconds"] and seeds["1"]["seconds"] == resumed["epoch_seconds"]


@pytest.mark.slow
def test_resume_without_deterministic_mode(tmp_path, monkeypatch):
    """Without --deterministic a GPU run may differ in the last bits (float atomics, cuDNN's choice of
    algorithm), so what is guaranteed is the schedule: the same folds, epochs, learning rates and test
    set, continued from the exact checkpointed state. On the CPU every kernel is deterministic anyway."""
    full, resumed, h_full, h_res = _cut_and_resume(
        tmp_path, monkeypatch, "--epochs", "3", "--split", "kfold", "--folds", "2"
    )
    schedule = lambda rows: [(h["fold"], h["epoch"], h["lr"]) for h in rows]  # noqa: E731
    assert schedule(h_full) == schedule(h_res)
    assert resumed["n_test"] == full["n_test"] and [f["name"] for f in resumed["folds"]] == [
        f["name"] for f in full["folds"]
    ]
    if not torch.cuda.is_available():
        assert h_full == h_res and resumed["confusion"] == full["confusion"]


@pytest.mark.slow
def test_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, out = run(tmp_path, "a", "--epochs", "1")
    before = (out / "checkpoint.pt").read_bytes()

    def dies_midway(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": 1}, out / "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.slow
def test_ablation_writes_table(tmp_path):
    _, out = run(tmp_path, "abl", "--epochs", "1", "--ablation")
    table = json.loads((out / "ablation.json").read_text())["results"]
    assert list(table) == ["ce_only", "center", "recon", "center+recon"]
    assert table["ce_only"]["lambda_center"] == 0 and table["center+recon"]["lambda_recon"] > 0
    assert "| center+recon |" in (out / "ablation.md").read_text()
    for name in table:
        assert (out / name / "metrics.json").is_file()


@pytest.mark.slow
def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "0"])
    proc = subprocess.run(
        [sys.executable, "-m", "fastser.train", "--corpus", "emodb", "--data-dir", str(tmp_path / "missing")]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "expected layout" in proc.stderr


@pytest.mark.slow
def test_default_run_completes(tmp_path):
    """`python -m fastser.train` with no arguments (only --out, to keep the test's files apart)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastser.train", "--out", str(tmp_path / "default"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert m["n_test"] > 0 and m["ua"] > 0.35  # chance is 0.25


@pytest.mark.slow
def test_seeds_protocol_aggregates_mean_and_std(tmp_path):
    """--seeds 0,1: one experiment per seed (each equal to a run with that --seed), mean +- std over seeds."""
    metrics, out = run(tmp_path, "multi", "--epochs", "1", "--seeds", "0,1")
    single, _ = run(tmp_path, "one", "--epochs", "1", "--seed", "0")  # (the synthetic corpus itself comes from --seed)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["seeds"]) == {"0", "1"}
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert per_seed[0]["confusion"] == single["confusion"]
    uas = [m["ua"] for m in per_seed]
    assert saved["ua_mean"] == pytest.approx(np.mean(uas)) and saved["ua_std"] == pytest.approx(np.std(uas, ddof=1))
    assert metrics["ua"] == saved["ua_mean"] and saved["seeds"]["0"]["ua"] == uas[0]
    with pytest.raises(SystemExit):
        train.parse_args(["--seeds", "0,x"])
    # resuming one seed's folder would run every seed again inside it: the line names the run's folder
    for part in (out / "seed-1", out / "seed-1" / "checkpoint.pt"):
        with pytest.raises(UserError, match=f"one part \\(seed-1\\) of the --seeds run in {out}; .*--resume {out}$"):
            train.parse_args(["--resume", str(part)])
    assert not (out / "seed-1" / "seed-0").exists()
    train.parse_args(["--resume", str(out)])  # the run's own folder resumes it


def test_group_statistics_match_a_plain_computation():
    """Normalizer.fit_groups: each group's per-bin mean/std over its rows' valid frames only."""
    torch.manual_seed(0)
    frames = torch.tensor([50, 20, 35, 50, 8])
    feats = {"mfcc": torch.randn(5, 3, 50) * 3 + 1}
    for i, n in enumerate(frames.tolist()):
        feats["mfcc"][i, :, n:] = 0  # the table's padding
    groups = torch.tensor([1, 0, 1, 2, 0])
    norm = Normalizer.fit_groups(feats, frames, groups, 3, chunk=2)
    for g in range(3):
        cols = torch.cat([feats["mfcc"][i, :, : frames[i]] for i in range(5) if groups[i] == g], dim=1).double()
        torch.testing.assert_close(norm.mean["mfcc"][g], cols.mean(1).float())
        torch.testing.assert_close(norm.std["mfcc"][g], cols.std(1, unbiased=False).float())
    out = norm.apply(feats, frames, groups)["mfcc"]
    ref = (feats["mfcc"] - norm.mean["mfcc"][groups][:, :, None]) / norm.std["mfcc"][groups][:, :, None]
    for i, n in enumerate(frames.tolist()):
        torch.testing.assert_close(out[i, :, :n], ref[i, :, :n])
        assert (out[i, :, n:] == 0).all()
    with pytest.raises(ValueError, match="groups"):
        norm.apply(feats, frames)
    # one group over every row is the corpus-level Normalizer
    whole = Normalizer.fit_groups(feats, frames, torch.zeros(5, dtype=torch.long), 1)
    flat = Normalizer.fit(feats, frames, torch.arange(5))
    torch.testing.assert_close(whole.mean["mfcc"][0], flat.mean["mfcc"])
    torch.testing.assert_close(whole.std["mfcc"][0], flat.std["mfcc"])


def test_sample_rate_and_mel_bands_are_settings_the_model_and_predict_follow(tmp_path):
    """--sample-rate and --n-mels reach the features (the checkpoint's feature set, the model's
    input), and predict resamples a clip to the model's rate."""
    from fastser.predictor import Predictor

    metrics, out = run(tmp_path, "8k", "--epochs", "1", "--sample-rate", "8000", "--n-mels", "32")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    features = ckpt["spec"]["features"]
    assert features["logmel"]["sr"] == 8000 and features["logmel"]["n_mels"] == 32
    assert features["logmel"]["n_fft"] == 256 and features["logmel"]["hop_length"] == 8 * TrainConfig().model.hop_ms
    assert ckpt["settings"]["sample_rate"] == 8000 and ckpt["settings"]["n_mels"] == 32
    predictor = Predictor(out)
    assert predictor.sr == 8000
    rng = np.random.default_rng(0)
    at_16k = predictor.predict_waveform(rng.standard_normal(32000).astype(np.float32), sr=16000)
    assert at_16k.probabilities.shape == (len(metrics["classes"]),)
    assert TrainConfig().replace(n_mels=300).problems() != []
    assert TrainConfig().replace(sample_rate=100).problems() != []


def test_hop_is_a_setting_the_features_crops_predict_and_resume_follow(tmp_path):
    """--hop-ms sets every input kind's frame step (the checkpoint's feature set), the training
    crops' frame count (1 s at 20 ms: 50 frames) and predict's frames; a resume with another hop
    is refused, and a hop that is no whole number of samples or outside [5, 32] ms is one sentence."""
    from fastser.predictor import Predictor
    from fastser.training.table import TrainingTable

    metrics, out = run(tmp_path, "hop20", "--epochs", "1", "--hop-ms", "20")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {kind: c["hop_length"] for kind, c in ckpt["spec"]["features"].items()} == {
        "logmel": 320,
        "mfcc": 320,
        "prosody": 320,
    }
    assert ckpt["settings"]["hop_ms"] == 20
    config = train.parse_config(SMALL + ["--out", str(tmp_path / "x"), "--hop-ms", "20"]).resolved()
    info = training_run.fdist.setup("cpu")
    table = training_inputs.load_table(config, info)
    assert config.optim.train_seconds == 1.0
    assert TrainingTable(config, info, table).batcher(torch.arange(4)).train_frames == 50
    predictor = Predictor(out)
    _, frames = predictor.features.extract(torch.zeros(1, 16000), torch.tensor([16000]))
    assert int(frames[0]) == 1 + 16000 // 320
    pred = predictor.predict_waveform(np.random.default_rng(0).standard_normal(32000).astype(np.float32))
    assert pred.probabilities.shape == (len(metrics["classes"]),)
    with pytest.raises(UserError, match="made with --hop-ms 20; --hop-ms 10 would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--hop-ms", "10", "--resume", str(out)])
    assert TrainConfig().replace(hop_ms=3).resolved().problems() == [
        "hop_ms must be an integer number of milliseconds in [5, 32], got 3"
    ]
    assert TrainConfig().replace(sample_rate=22050, hop_ms=10).resolved().problems() == [
        "hop_ms 10 is not a whole number of samples at 22050 Hz"
    ]
    with pytest.raises(ValueError, match="not a whole number of samples"):
        FeatureSet.paper(sr=22050)


@pytest.mark.slow
@pytest.mark.parametrize("level", ["speaker", "utterance", "corpus"])
def test_normalize_levels(tmp_path, level):
    """--normalize: speaker statistics by default (and the fallbacks without enrollment audio,
    utterance-level and training-fold statistics, reported beside them), utterance or the training
    fold's; the checkpoint records the choice."""
    metrics, out = run(tmp_path, level, "--epochs", "1", "--normalize", level)
    assert metrics["normalize"] == level
    for fallback in scoring.FALLBACKS:
        assert (f"{fallback}_norm" in metrics) == (level == "speaker")
        if level == "speaker":
            assert 0 <= metrics[f"{fallback}_norm"]["ua"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["spec"]["normalize"] == level
    assert train.parse_args([]).normalize == "speaker"


def test_speaker_statistics_come_from_each_rows_own_speaker(tmp_path):
    """In speaker mode a batch is normalised with its rows' speakers' statistics, computed from
    every utterance of that speaker (labels unused): a test speaker's rows are standardised."""
    config = train.parse_config(SMALL + ["--out", str(tmp_path / "x")]).resolved()
    info = training_run.fdist.setup("cpu")
    table = training_inputs.load_table(config, info)
    from fastser.data.splits import make_folds

    folds = make_folds(table.corpus, "holdout")
    r = Experiment(config, info, table, folds, tmp_path, FeatureSet.paper(table.feats))
    test_rows = torch.from_numpy(folds[0].test)
    speaker = table.corpus.speakers[folds[0].test[0]]
    rows = test_rows[torch.from_numpy(table.corpus.speakers[folds[0].test] == speaker)]
    batch = r.data.batcher(torch.from_numpy(folds[0].train)).batch(rows)
    for kind, x in batch.feats.items():
        valid = torch.cat([x[i, :, : batch.frames[i]] for i in range(len(rows))], dim=1)
        torch.testing.assert_close(valid.mean(1), torch.zeros(x.shape[1]), atol=2e-3, rtol=0)
        torch.testing.assert_close(valid.std(1, unbiased=False), torch.ones(x.shape[1]), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_prosody_branch_trains_and_predicts(tmp_path):
    metrics, out = run(tmp_path, "pro", "--epochs", "1", "--prosody")
    assert metrics["kinds"] == ["logmel", "mfcc", "prosody"]
    from fastser.predict import Predictor
    from fastser.data.synthetic import make_corpus as corpus

    pred = Predictor(out).predict_waveform(corpus(seed=3, n_speakers=1, per_class=1).utterances[0].audio)
    assert abs(pred.probabilities.sum() - 1) < 1e-5


@pytest.mark.slow
def test_bin_stats_train_predict_and_guard_resume(tmp_path):
    """--bin-stats is stored in the checkpoint's spec (predict rebuilds the same model) and a resume
    with the other setting is refused rather than mixing two models."""
    metrics, out = run(tmp_path, "bins", "--epochs", "1", "--bin-stats")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["spec"]["bin_stats"] is True and ckpt["config"]["bin_stats"] is True
    from fastser.predict import Predictor

    predictor = Predictor(out)
    assert predictor.models[0].encoders["mfcc"].bin_stats
    pred = predictor.predict_waveform(make_corpus(seed=3, n_speakers=1, per_class=1).utterances[0].audio)
    assert abs(pred.probabilities.sum() - 1) < 1e-5
    with pytest.raises(UserError, match="made with --bin-stats; --no-bin-stats would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--no-bin-stats", "--resume", str(out)])


@pytest.mark.slow
def test_global_pooling_train_predict_and_guard_resume(tmp_path):
    """--pooling global (the earlier model) is stored in the checkpoint's spec (predict rebuilds the
    same model: strict weight loading would fail otherwise) and a resume with the default pooling is
    refused rather than mixing two models."""
    metrics, out = run(tmp_path, "pool", "--epochs", "1", "--pooling", "global")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["spec"]["pooling"] == "global" and ckpt["config"]["pooling"] == "global"
    from fastser.predict import Predictor

    predictor = Predictor(out)
    assert predictor.models[0].encoders["logmel"].pooling == "global"
    pred = predictor.predict_waveform(make_corpus(seed=3, n_speakers=1, per_class=1).utterances[0].audio)
    assert abs(pred.probabilities.sum() - 1) < 1e-5
    with pytest.raises(UserError, match="made with --pooling global; --pooling time would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--pooling", "time", "--resume", str(out)])
    # a checkpoint from before the option (no "pooling" anywhere, nor the run's settings) is the
    # global model it was made as
    del ckpt["spec"]["pooling"], ckpt["config"]["pooling"], ckpt["settings"]
    torch.save(ckpt, out / "checkpoint.pt")
    (out / "settings.json").unlink()
    assert Predictor(out).models[0].encoders["logmel"].pooling == "global"
    with pytest.raises(UserError, match="pooling='global'"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--resume", str(out)])


@pytest.mark.slow
def test_early_downsampling_train_predict_and_guard_resume(tmp_path):
    """--downsample early is stored in the checkpoint's spec (predict rebuilds the strided model),
    a resume with the paper's order is refused, and a checkpoint from before the option is the
    conv-then-pool model it was made as."""
    metrics, out = run(tmp_path, "early", "--epochs", "1", "--downsample", "early")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["spec"]["downsample"] == "early" and ckpt["config"]["downsample"] == "early"
    from fastser.predict import Predictor

    predictor = Predictor(out)
    stem = predictor.models[0].encoders["logmel"].stem
    assert stem.strided and stem.branches[0][1].stride == (2, 2)
    pred = predictor.predict_waveform(make_corpus(seed=3, n_speakers=1, per_class=1).utterances[0].audio)
    assert abs(pred.probabilities.sum() - 1) < 1e-5
    with pytest.raises(UserError, match="made with --downsample early; --downsample pool would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--downsample", "pool", "--resume", str(out)])
    _, before = run(tmp_path, "before-the-option", "--epochs", "1")
    ckpt = torch.load(before / "checkpoint.pt", weights_only=True)
    del ckpt["spec"]["downsample"], ckpt["config"]["downsample"], ckpt["settings"]
    torch.save(ckpt, before / "checkpoint.pt")
    (before / "settings.json").unlink()
    assert not Predictor(before).models[0].encoders["logmel"].stem.strided  # strict loading of its weights passed


@pytest.mark.slow
def test_no_validation_trains_on_the_validation_speakers_and_keeps_the_last_epoch(tmp_path):
    """--no-validation: the fold's validation speakers join the training rows (never the test
    speakers), every epoch runs (no early stopping), and the model tested is the last epoch's."""
    config = train.parse_config(SMALL + ["--out", str(tmp_path / "x"), "--no-validation"]).resolved()
    info = training_run.fdist.setup("cpu")
    table = training_inputs.load_table(config, info)
    from fastser.data.splits import make_folds

    fold = make_folds(table.corpus, "holdout")[0]
    r = Experiment(config, info, table, [fold], tmp_path, FeatureSet.paper(table.feats))
    rows = set(r.data.train_rows(fold).tolist())
    assert rows == set(fold.train.tolist()) | set(fold.val.tolist()) and not rows & set(fold.test.tolist())
    metrics, out = run(tmp_path, "noval", "--epochs", "3", "--patience", "1", "--no-validation")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3] and all(h["val_ua"] is None for h in ckpt["history"])
    assert metrics["folds"][0]["best_epoch"] == 3 and metrics["folds"][0]["val_ua"] is None
    assert ckpt["config"]["validation"] is False
    # the defaults: real corpora train on the validation speakers, the synthetic run stops early
    assert train.parse_args(["--corpus", "ravdess", "--data-dir", "x"]).validation is False
    assert train.parse_args([]).validation is True


@pytest.mark.parametrize("grouped", [False, True])
def test_resident_batches_equal_host_batches(grouped):
    """The GPU's resident mode (table on the device, one gather per batch) gives the same training
    crops and evaluation batches as the host mode, from the same host generator; evaluation
    lengths are bucketed without changing a valid frame."""
    corpus = make_corpus(seed=2, n_speakers=3, per_class=3, seconds=1.5)
    from fastser.data.cache import build_feature_table

    table = build_feature_table(corpus, ["logmel", "mfcc"], torch.device("cpu"))
    n = table.frames.shape[0]
    groups = torch.arange(n) % 3 if grouped else None
    norm = (
        Normalizer.fit_groups(table.feats, table.frames, groups, 3)
        if grouped
        else Normalizer.fit(table.feats, table.frames, torch.arange(n))
    )
    host = Batcher(table.feats, table.frames, table.labels, norm, torch.device("cpu"), 60, groups, resident=False)
    resident = Batcher(
        table.feats, table.frames, table.labels, norm, torch.device("cpu"), 60, groups, resident=True, eval_bucket=64
    )
    rows = torch.tensor([5, 0, 7, 3, 11])
    a = host.batch(rows, torch.Generator().manual_seed(4))
    b = resident.batch(rows, torch.Generator().manual_seed(4))
    for kind in a.feats:
        assert b.feats[kind].shape == a.feats[kind].shape == (5, a.feats[kind].shape[1], 60)
        torch.testing.assert_close(b.feats[kind], a.feats[kind], rtol=0, atol=0)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    a, b = host.batch(rows), resident.batch(rows)
    T = a.feats["mfcc"].shape[-1]
    assert b.feats["mfcc"].shape[-1] == min(table.feats["mfcc"].shape[-1], -(-T // 64) * 64)
    for kind in a.feats:
        torch.testing.assert_close(b.feats[kind][..., :T], a.feats[kind], rtol=0, atol=0)
        assert not b.feats[kind][..., T:].any()  # the bucket's padding is exactly zero


def test_tempo_zero_is_the_plain_crop():
    """--tempo 0 (the default) draws and crops exactly as the plain crop always did, so earlier
    runs, checkpoints and resumes reproduce."""
    frames = torch.tensor([50, 300, 120, 80])
    got_frames, got_idx = tempo_crop(frames, 100, torch.Generator().manual_seed(3), tempo=0.0)
    start = (torch.rand(4, generator=torch.Generator().manual_seed(3)) * (frames - 100).clamp(min=0).add(1)).long()
    assert torch.equal(got_idx, start[:, None] + torch.arange(100)[None, :])
    assert torch.equal(got_frames, (frames - start).clamp(max=100))


def test_tempo_reads_each_crop_at_its_own_rate_within_the_utterance():
    """With tempo x each item reads source frames start + floor(j * r), r in [1-x, 1+x]: indices
    never decrease, advance by r on average, and exactly the output frames whose source frame
    lies inside the utterance are counted valid."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(20, 400, (256,))
    T = 100
    out_frames, idx = tempo_crop(frames, T, gen, tempo=0.2)
    steps = idx.diff(dim=1)
    assert (steps >= 0).all() and (steps <= 2).all()  # rates 0.8..1.2: a frame repeated or skipped
    rates = (idx[:, -1] - idx[:, 0]).double() / (T - 1)
    assert rates.min() > 0.78 and rates.max() < 1.22 and rates.std() > 0.05  # really varies per item
    for i in range(256):
        inside = idx[i] < frames[i]
        assert int(inside.sum()) == int(out_frames[i])  # the valid prefix is exactly the in-range frames
        assert inside[: out_frames[i]].all()
    long = frames > 130  # long enough for the whole stretched crop: all T frames valid
    assert (out_frames[long] == T).all()
    with pytest.raises(ValueError, match="tempo"):
        tempo_crop(frames, T, gen, tempo=1.0)


@pytest.mark.slow
def test_tempo_trains_and_guards_resume(tmp_path):
    """--tempo is validated, trains, is stored in the checkpoint's config, and a resume with another
    tempo is refused (the epochs would mix two augmentations)."""
    for bad in ("1.5", "-0.1", "fast"):
        with pytest.raises(SystemExit):
            train.parse_args(["--tempo", bad])
    metrics, out = run(tmp_path, "tempo", "--epochs", "1", "--tempo", "0.15")
    assert metrics["n_test"] > 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["tempo"] == 0.15
    with pytest.raises(UserError, match="made with --tempo 0.15; --tempo 0.0 would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--tempo", "0", "--resume", str(out)])


def test_mixup_mixes_each_item_with_one_partner_of_the_batch():
    """Every item becomes lam * itself + (1 - lam) * one other item of the batch, the same partner in
    every feature kind, lam in [0.5, 1]; Mix names the partner's label; the mixed item is valid as
    far as the longer of the two and exactly 0 past it. Items here are constants (item i is i + 1 in
    'a', 10 (i + 1) in 'b' over its valid frames), so each partner can be read back from the values."""
    B, T = 12, 30
    frames = torch.randint(5, T + 1, (B,), generator=torch.Generator().manual_seed(0))
    valid = (torch.arange(T)[None, :] < frames[:, None]).float()
    ids = torch.arange(1, B + 1, dtype=torch.float32)
    feats = {
        "a": ids[:, None, None] * valid[:, None, :].expand(B, 3, T).clone(),
        "b": 10 * ids[:, None, None] * valid[:, None, :].expand(B, 2, T).clone(),
    }
    labels = torch.arange(B) % 4
    batch = Batch(feats, frames, labels, frames.clone())
    mixed, mix = mixup(batch, torch.Generator().manual_seed(3), alpha=1.0)
    assert mix.lam.shape == (B,) and bool(((mix.lam >= 0.5) & (mix.lam <= 1)).all())
    assert bool((mix.lam < 0.99).any())  # alpha 1: lam uniform on [0.5, 1], so some items really mix
    torch.testing.assert_close(mixed.labels, labels)
    for i in range(B):
        lam = float(mix.lam[i])
        head_a = float(mixed.feats["a"][i, 0, 0])  # both items are valid at frame 0
        if lam > 0.999:
            torch.testing.assert_close(mixed.feats["a"][i], feats["a"][i], rtol=1e-2, atol=1e-2)
            continue
        j = round((head_a - lam * (i + 1)) / (1 - lam)) - 1
        assert 0 <= j < B
        assert int(mix.partner[i]) == int(labels[j])
        torch.testing.assert_close(mixed.feats["a"][i], lam * feats["a"][i] + (1 - lam) * feats["a"][j])
        torch.testing.assert_close(mixed.feats["b"][i], lam * feats["b"][i] + (1 - lam) * feats["b"][j])
        assert int(mixed.frames[i]) == int(mixed.frames_host[i]) == max(int(frames[i]), int(frames[j]))
        assert float(mixed.feats["a"][i, :, int(mixed.frames[i]) :].abs().sum()) == 0.0
    again, mix_again = mixup(batch, torch.Generator().manual_seed(3), alpha=1.0)  # the CPU generator decides
    torch.testing.assert_close(again.feats["a"], mixed.feats["a"])
    torch.testing.assert_close(mix_again.lam, mix.lam)
    with pytest.raises(ValueError, match="alpha"):
        mixup(batch, torch.Generator(), alpha=0.0)


@pytest.mark.slow
def test_mixup_trains_and_guards_resume(tmp_path):
    """--mixup is validated, trains, is stored in the checkpoint's config, and a resume with another
    setting is refused."""
    for bad in ("0", "-0.2", "11", "much"):
        with pytest.raises(SystemExit):
            train.parse_args(["--mixup", bad])
    metrics, out = run(tmp_path, "mixup", "--epochs", "1", "--mixup", "0.4")
    assert metrics["n_test"] > 0 and np.isfinite(metrics["ua"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["mixup"] == 0.4
    with pytest.raises(UserError, match="made with --mixup 0.4; --mixup 0.2 would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--mixup", "0.2", "--resume", str(out)])


@pytest.mark.slow
def test_noise_copies_train_and_guard_resume(tmp_path):
    """--noise is validated, adds one training copy per SNR (the originals and the copies drawn like
    speed copies), is stored in the checkpoint's config, and a resume with other SNRs is refused."""
    for bad in ("100", "20,20", "-10", "loud"):
        with pytest.raises(SystemExit):
            train.parse_args(["--noise", bad])
    metrics, out = run(tmp_path, "noise", "--epochs", "1", "--noise", "20,10")
    assert metrics["n_test"] > 0 and np.isfinite(metrics["ua"])
    assert tuple(torch.load(out / "checkpoint.pt", weights_only=True)["config"]["noise"]) == (20.0, 10.0)
    with pytest.raises(UserError, match="made with --noise 20,10; --noise 20 would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--noise", "20", "--resume", str(out)])


@pytest.mark.slow
def test_speed_perturbation_trains_on_copies_and_tests_on_originals(tmp_path, monkeypatch):
    """--speed-perturb 0.9,1.1: training batches draw originals and copies (the same number of
    steps per epoch), while validation and test rows are only originals; the flag is checked and
    recorded, and a resume with other speeds is refused."""
    for bad in ("1.0", "0.9,0.9", "3", "fast"):
        with pytest.raises(SystemExit):
            train.parse_args(["--speed-perturb", bad])
    seen = {"train": [], "eval": []}
    real = Batcher.batch

    def spy(self, rows, gen=None, **kwargs):
        seen["train" if gen is not None else "eval"].append(rows.clone())
        return real(self, rows, gen, **kwargs)

    monkeypatch.setattr(Batcher, "batch", spy)
    metrics, out = run(tmp_path, "speed", "--epochs", "2", "--speed-perturb", "0.9,1.1")
    n = metrics["n_utterances"]
    train_rows = torch.cat(seen["train"])
    assert (train_rows >= n).any() and (train_rows < n).any() and train_rows.max() < 3 * n
    assert all((rows < n).all() for rows in seen["eval"])
    plain_steps = len(seen["train"])
    seen["train"].clear()
    run(tmp_path, "plain", "--epochs", "2")
    assert len(seen["train"]) == plain_steps  # an epoch costs the same
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert tuple(ckpt["config"]["speed_perturb"]) == (0.9, 1.1)
    with pytest.raises(UserError, match="made with --speed-perturb 0.9,1.1; --speed-perturb 0.9 would change"):
        train.main(SMALL + ["--out", str(out), "--epochs", "2", "--speed-perturb", "0.9", "--resume", str(out)])


def test_weight_average_is_the_bias_corrected_ema_of_every_step():
    """WeightAverages after T steps equals sum_s (1-d) d^(T-s) w_s / (1-d^T) for every float parameter
    and BatchNorm buffer, computed plainly here; integer buffers follow the model."""
    from fastser.training.averaging import WeightAverages

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    averages = WeightAverages(model, (0.9, 0.99))
    history = []
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 5))  # moves the running statistics and num_batches_tracked
        averages.update(model)
        history.append({k: v.clone() for k, v in model.state_dict().items()})
    assert set(averages.models()) == {"ema_0.9", "ema_0.99"}
    for decay in (0.9, 0.99):
        got = averages.models()[f"ema_{decay:g}"].state_dict()
        T = len(history)
        for key, value in history[-1].items():
            if not value.is_floating_point():
                assert torch.equal(got[key], value), key
                continue
            expected = sum((1 - decay) * decay ** (T - 1 - s) * h[key].double() for s, h in enumerate(history))
            expected = expected / (1 - decay**T)
            torch.testing.assert_close(got[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.allclose(got["0.weight"], history[-1]["0.weight"])  # really an average


@pytest.mark.slow
def test_ema_keeps_the_average_scores_the_trained_weights_and_resumes(tmp_path, monkeypatch):
    """--ema D1,D2: training itself is unchanged (the last trained weights score exactly as a run
    without --ema), the kept model is the first average, the others are scored beside it; the averages
    are checkpointed, so an interrupted run resumes to the same result; another --ema is refused."""
    for bad in ("1", "0", "0.9,0.9", "slow"):
        with pytest.raises(SystemExit):
            train.parse_args(["--ema", bad])
    args = ("--epochs", "3", "--split", "kfold", "--folds", "2", "--no-validation")  # both keep the last epoch
    plain, plain_out = run(tmp_path, "plain", *args)
    full, resumed, h_full, h_res = _cut_and_resume(tmp_path, monkeypatch, *args, "--ema", "0.9,0.95")
    assert set(full["weights"]) == {"trained", "ema_0.95"}
    assert full["weights"]["trained"]["ua"] == plain["ua"] and full["weights"]["trained"]["wa"] == plain["wa"]
    assert h_full == h_res and resumed["weights"] == full["weights"] and resumed["confusion"] == full["confusion"]
    kept = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["final"]["model"]
    last = torch.load(plain_out / "checkpoint.pt", weights_only=True)["final"]["model"]
    assert kept.keys() == last.keys()
    assert not all(torch.equal(kept[k], last[k]) for k in kept)  # the average, not the last weights
    with pytest.raises(UserError, match="made with --ema 0.9,0.95; --ema 0.99 would change"):
        train.main(SMALL + [*args, "--ema", "0.99", "--resume", str(tmp_path / "full")])
    # the accuracy table's collector reads either set of weights of the same run
    from lab.accuracy import collect_runs

    kept_row = collect_runs([tmp_path / "full"], "kept")
    trained_row = collect_runs([tmp_path / "full"], "trained", weights="trained")
    assert kept_row["ua_mean"] == full["ua"] and kept_row["seeds"]["0"]["fold_ua"] == [f["ua"] for f in full["folds"]]
    assert trained_row["ua_mean"] == full["weights"]["trained"]["ua"] and "fold_ua" not in trained_row["seeds"]["0"]
    assert kept_row["settings"]["ema"] == [0.9, 0.95]
    first = collect_runs([tmp_path / "full"], "first fold", max_folds=1, weights="trained")["seeds"]["0"]
    assert first["n_test"] == full["folds"][0]["n_test"] and "fold_ua" not in first


@pytest.mark.slow
def test_cuda_graph_where_none_can_serve_is_one_line_and_an_eager_run(tmp_path, capsys):
    """--cuda-graph on the CPU (or with --compile, or under torchrun) says in one line that the step
    runs eagerly, and trains exactly as without it."""
    args = SMALL + ["--epochs", "1", "--device", "cpu", "--no-progress"]
    asked = train.main(args + ["--out", str(tmp_path / "g"), "--cuda-graph"])
    said = capsys.readouterr()
    assert (said.out + said.err).count("no CUDA graph (device cpu): the training step runs eagerly") == 1
    plain = train.main(args + ["--out", str(tmp_path / "p")])
    said = capsys.readouterr()
    assert "no CUDA graph" not in said.out + said.err  # the default says nothing where no graph was due
    assert asked["ua"] == plain["ua"] and asked["wa"] == plain["wa"]
    assert (tmp_path / "g" / "predictions.csv").read_text() == (tmp_path / "p" / "predictions.csv").read_text()


@pytest.mark.gpu(reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("amp,augment", [(False, False), (True, False), (False, True)])
def test_graphed_steps_train_like_eager_steps(amp, augment):
    """GraphedTrainStep (two eager warm-up steps, then capture and replays of the whole step: batch
    gather, forward, loss, backward, clipping, AdamW, sums) against the loop's eager step on the same
    plans from the same initial weights: the same losses at every step, the same weights and centers
    at the end (`augment`: mixup and SpecAugment drawn into the plan). Dropout off (a graph draws its
    random numbers differently) and deterministic cuDNN and center update, so what remains are
    rounding differences."""
    from fastser.models import SERModel, SERObjective
    from fastser.training.batches import Augmentation, PlannedBatches
    from fastser.training.trainer import EpochTotals
    from fastser.training.graphed import GraphedTrainStep

    dev = torch.device("cuda")
    bins = {"logmel": 64, "mfcc": 40, "prosody": 6}
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(60, 201, (64,), generator=gen)
    table = {
        k: torch.randn(64, n, 200, generator=gen) * (torch.arange(200) < frames[:, None, None]) for k, n in bins.items()
    }
    labels = torch.randint(0, 4, (64,), generator=gen)
    batcher = Batcher(table, frames, labels, Normalizer.fit(table, frames, torch.arange(64)), dev, 100)
    planned = PlannedBatches(batcher, 8, Augmentation(mixup=0.4 if augment else 0.0, specaugment=augment))

    def make(**flags):
        torch.manual_seed(0)
        model = SERModel(bins, 4, width=4, embed_dim=16, dropout=0.0).to(dev, memory_format=torch.channels_last)
        objective = SERObjective(4, 16, deterministic=True).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, **flags)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=7)
        return model, objective, opt, sched

    eager, graphed_parts = make(fused=True), make(capturable=True, foreach=False)
    totals = EpochTotals(dev)
    plan = torch.zeros(planned.size, dtype=torch.long, device=dev)
    graphed = GraphedTrainStep(
        *graphed_parts[:3], {"plan": plan}, lambda i: planned.build(i["plan"]), totals=totals, amp=amp, warmup=2
    )
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    draws = torch.Generator().manual_seed(2)
    try:
        for step in range(7):
            host_plan = planned.plan(torch.randperm(64, generator=draws)[:8], draws)
            feats, targets, fr, y, mix = planned.build(host_plan.to(dev))
            out_e, terms_e = train_step(
                *eager[:3], feats, targets, fr, y, amp, clip_params=list(eager[0].parameters()), mix=mix
            )
            out_g, terms_g = graphed(plan=host_plan)
            eager[3].step()
            graphed_parts[3].step()
            for name in ("total", "ce", "center", "recon"):
                torch.testing.assert_close(
                    getattr(terms_g, name), getattr(terms_e, name), **tol, msg=f"{name}, step {step}"
                )
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    assert graphed.replay is not None and not graphed.eager and graphed.steps == 7
    for (name, pe), pg in zip(eager[0].named_parameters(), graphed_parts[0].parameters()):
        torch.testing.assert_close(pg, pe, **tol, msg=name)
    torch.testing.assert_close(graphed_parts[1].center_loss.centers, eager[1].center_loss.centers, **tol)
    assert int(graphed_parts[1].center_loss.bad_batches) == 0 and int(totals.values[4]) == 7 * 8


def _predictions(path):
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return rows, classes, probs


@pytest.mark.slow
def test_predictions_file_and_seed_ensemble(tmp_path, monkeypatch):
    """Every run writes predictions.csv (one line per test utterance: fold, id, speaker, label,
    prediction, class probabilities) agreeing with metrics.json; a --seeds run also scores the
    seeds' models averaged (mean probability per utterance), recomputed here from the files."""
    from fastser.metrics import summarize

    metrics, out = run(tmp_path, "multi", "--epochs", "1", "--seeds", "0,1", "--split", "kfold", "--folds", "2")
    per_seed = {}
    for seed in (0, 1):
        m = json.loads((out / f"seed-{seed}" / "metrics.json").read_text())
        rows, classes, probs = _predictions(out / f"seed-{seed}" / "predictions.csv")
        assert len(rows) == m["n_test"] == len({r["uid"] for r in rows})  # each utterance tested once
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        assert [r["predicted"] for r in rows] == [classes[i] for i in probs.argmax(1)]
        y_true = np.array([classes.index(r["label"]) for r in rows])
        assert summarize(y_true, probs.argmax(1), classes)["confusion"] == m["confusion"]
        per_seed[seed] = {r["uid"]: (classes.index(r["label"]), p) for r, p in zip(rows, probs)}
    uids = sorted(per_seed[0])
    assert uids == sorted(per_seed[1])
    mean = np.array([(per_seed[0][u][1] + per_seed[1][u][1]) / 2 for u in uids])
    expected = summarize(np.array([per_seed[0][u][0] for u in uids]), mean.argmax(1), classes)
    saved = json.loads((out / "metrics.json").read_text())["seed_ensemble"]
    assert saved["n_seeds"] == 2 and saved["ua"] == pytest.approx(expected["ua"], abs=1e-9)
    assert saved["wa"] == pytest.approx(expected["wa"], abs=1e-9) and metrics["seed_ensemble"] == saved
    from lab.accuracy import collect_runs

    row = collect_runs([out / "seed-0", out / "seed-1"], "two seeds")  # seeds run as separate processes
    assert row["seed_ensemble"] == saved
    # a seed run in a later session is added to the kept row: the same row as collecting both at once
    import shutil
    import lab.accuracy as accuracy

    monkeypatch.setattr(accuracy, "OUT", tmp_path / "rows")
    kept = accuracy.write(collect_runs([out / "seed-0"], "two seeds"))
    merged = accuracy.add_seeds(kept, [out / "seed-1"])
    assert merged["seeds"] == row["seeds"] and "seed_ensemble" not in merged
    for key in ("ua_mean", "ua_std", "wa_mean", "wa_std", "macro_f1_mean", "macro_f1_std", "seconds_per_seed"):
        assert merged[key] == pytest.approx(row[key], abs=1e-12), key
    with pytest.raises(SystemExit, match="already has seed 1"):
        accuracy.add_seeds(accuracy.write(merged), [out / "seed-1"])
    # a third seed (seed 1's folder relabelled): the soft vote stays the two seeds' and says so
    third = tmp_path / "seed-2"
    shutil.copytree(out / "seed-1", third)
    config = json.loads((third / "config.json").read_text())
    (third / "config.json").write_text(json.dumps({**config, "seed": 2}))
    three = accuracy.add_seeds(accuracy.write(row), [third])
    assert sorted(three["seeds"]) == ["0", "1", "2"] and three["seed_ensemble"] == {**saved, "seeds": ["0", "1"]}
    assert three["ua_mean"] == pytest.approx(np.mean([row["seeds"][s]["ua"] for s in ("0", "1", "1")]), abs=1e-12)
    # another experiment is refused, naming the setting
    (third / "config.json").write_text(json.dumps({**config, "seed": 2, "epochs": 99}))
    with pytest.raises(SystemExit, match="epochs"):
        accuracy.add_seeds(kept, [third])
    # a row kept before a setting was recorded takes seeds that had it off, and refuses one that had it on
    older = collect_runs([out / "seed-0"], "older row")
    del older["settings"]["speed_perturb"]
    older = accuracy.write(older)
    assert sorted(accuracy.add_seeds(older, [out / "seed-1"])["seeds"]) == ["0", "1"]
    (third / "config.json").write_text(json.dumps({**config, "seed": 2, "speed_perturb": [0.9, 1.1]}))
    with pytest.raises(SystemExit, match="speed_perturb"):
        accuracy.add_seeds(older, [third])
    # a seed tested on other folds (here only the first) is refused; so is a row that is not there
    (third / "config.json").write_text(json.dumps({**config, "seed": 2}))
    (third / "metrics.json").unlink()  # a run stopped early: read from its checkpoint
    ckpt = torch.load(third / "checkpoint.pt", weights_only=True)
    ckpt["config"]["seed"] = 2
    torch.save(ckpt, third / "checkpoint.pt")
    with pytest.raises(SystemExit, match="other folds"):
        accuracy.add_seeds(older, [third], max_folds=1)
    with pytest.raises(SystemExit, match="no such results row"):
        accuracy.add_seeds(tmp_path / "rows" / "missing.json", [third])
    # a run from before mixup and noise were recorded joins a row collected since
    for key in ("mixup", "noise"):
        del ckpt["config"][key]
    torch.save(ckpt, third / "checkpoint.pt")
    assert sorted(accuracy.add_seeds(older, [third], max_folds=2)["seeds"]) == ["0", "2"]


def test_compare_pairs_rows_on_shared_seeds_and_test_speakers():
    """lab.accuracy.compare pairs only the same seed on the same test speakers (other seeds and
    folds are left out) and counts better / worse / equal pairs."""
    from lab.accuracy import compare

    base = {
        "name": "base",
        "seeds": {
            "0": {"folds": ["A", "B", "C"], "fold_ua": [0.5, 0.6, 0.7]},
            "1": {"folds": ["A", "B", "C"], "fold_ua": [0.4, 0.5, 0.6]},
            "2": {"folds": ["A"], "fold_ua": [0.9]},
        },
    }
    changed = {
        "name": "changed",
        "seeds": {
            "0": {"folds": ["A", "B"], "fold_ua": [0.6, 0.6]},
            "1": {"folds": ["B", "C", "D"], "fold_ua": [0.3, 0.8, 1.0]},
            "3": {"folds": ["A"], "fold_ua": [0.0]},
        },
    }
    c = compare(changed, base)  # pairs: (0.6, 0.5), (0.6, 0.6), (0.3, 0.5), (0.8, 0.6)
    assert (c["pairs"], c["better"], c["worse"], c["equal"]) == (4, 2, 1, 1)
    assert c["changed_fold_ua"] == pytest.approx(57.5) and c["base_fold_ua"] == pytest.approx(55.0)
    assert c["difference"] == pytest.approx(2.5)
    # paired t-test on the differences (10, 0, -20, 20): t = mean / (sd / sqrt(4)), 3 degrees of freedom
    from scipy.stats import t as student

    d = np.array([10.0, 0.0, -20.0, 20.0])
    t = d.mean() / (d.std(ddof=1) / 2)
    assert c["p_paired_t"] == pytest.approx(2 * student.sf(t, 3), rel=1e-9) and 0.7 < c["p_paired_t"] < 0.9
    with pytest.raises(SystemExit, match="share no seed"):
        compare({"name": "x", "seeds": {"5": {"folds": ["A"], "fold_ua": [0.1]}}}, base)


@pytest.mark.slow
def test_resume_of_a_finished_run_refuses_new_epochs_and_continues_into_another_folder(tmp_path):
    """A finished run resumed with another --epochs is refused in one line naming the flag (the
    one-cycle schedule of every fold was laid out for the epochs it was made with), not silently
    ignored; --resume RUN --out NEW continues in NEW, which gets its own checkpoint.pt (so predict
    works on it), and RUN is left untouched."""
    metrics, out = run(tmp_path, "done", "--epochs", "2", "--seed", "3")
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    new = tmp_path / "new"
    with pytest.raises(UserError, match="made with --epochs 2; --epochs 3 would change what it computes"):
        train.main(["--resume", str(out), "--epochs", "3", "--out", str(new)])
    assert not (new / "checkpoint.pt").exists()
    again = train.main(["--resume", str(out), "--out", str(new), "--no-progress"])
    assert (new / "checkpoint.pt").is_file() and (new / "settings.json").is_file()
    assert again["confusion"] == metrics["confusion"] and again["ua"] == metrics["ua"]
    assert json.loads((new / "config.json").read_text())["epochs"] == 2
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before
    from fastser.predict import Predictor

    clip = make_corpus(seed=3, n_speakers=1, per_class=1).utterances[0].audio
    np.testing.assert_allclose(
        Predictor(new).predict_waveform(clip).probabilities, Predictor(out).predict_waveform(clip).probabilities
    )
    with pytest.raises(UserError, match="already holds a run's checkpoint"):
        train.main(["--resume", str(out), "--out", str(new)])


def test_bad_numbers_name_their_flag_before_any_work(capsys):
    for argv, flag in (
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--threads", "0"], "--threads"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--train-seconds", "inf"], "--train-seconds"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"error: {flag} must be" in err[0], err


@pytest.mark.slow
def test_threads_are_recorded_and_a_run_repeats_bit_for_bit_at_a_thread_count(tmp_path):
    """--threads sets torch's (and so fastser's kernels') thread count for the run and is restored
    afterwards; metrics.json records it. At one thread count a CPU run repeats exactly. Across thread
    counts it need not: oneDNN's convolutions and torch's reductions split their sums by thread, so
    the float rounding differs and training carries the difference on."""
    before = torch.get_num_threads()
    a, _ = run(tmp_path, "a", "--epochs", "2", "--threads", "1")
    b, _ = run(tmp_path, "b", "--epochs", "2", "--threads", "1")
    assert torch.get_num_threads() == before
    assert a["threads"] == b["threads"] == 1
    assert a["confusion"] == b["confusion"] and a["folds"] == b["folds"]


def test_epoch_totals_are_the_batch_weighted_means_of_the_steps():
    from types import SimpleNamespace

    from fastser.training.trainer import EpochTotals

    totals = EpochTotals(torch.device("cpu"))
    steps = [(16, 1.5, 20.0, 0.5, [0] * 12 + [1] * 4), (5, 0.5, 10.0, 0.25, [1] * 5)]  # n, ce, center, recon, labels
    for n, ce, center, recon, labels in steps:
        terms = SimpleNamespace(ce=torch.tensor(ce), center=torch.tensor(center), recon=torch.tensor(recon))
        logits = torch.zeros(n, 2)
        logits[:, 0] = 1.0  # predicts class 0 everywhere
        totals.add(terms, logits, torch.tensor(labels))
    means = totals.means()
    assert means["ce"] == pytest.approx((16 * 1.5 + 5 * 0.5) / 21)
    assert means["center"] == pytest.approx((16 * 20.0 + 5 * 10.0) / 21)
    assert means["recon"] == pytest.approx((16 * 0.5 + 5 * 0.25) / 21)
    assert means["train_acc"] == pytest.approx(12 / 21)


def test_interrupt_before_the_first_checkpoint_prints_a_command_that_works(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 1: nothing was checkpointed, yet the printed command continues the run (it
    starts again with the run's own settings) instead of failing on a missing checkpoint."""
    out = tmp_path / "cut"

    def ctrl_c(self, epoch):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(FoldTrainer, "train_epoch", ctrl_c)
        assert train.cli(SMALL + ["--epochs", "1", "--seed", "2", "--out", str(out)]) == 130
    hint = capsys.readouterr().err.strip().splitlines()
    assert hint[-2].endswith("interrupted; continue it with:") and not (out / "checkpoint.pt").exists()
    words = hint[-1].split()
    assert words[-2:] == ["--resume", str(out)]
    assert train.cli(words[-2:]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert "no epoch had finished" in capsys.readouterr().err
    fresh = train.main(SMALL + ["--epochs", "1", "--seed", "2", "--out", str(tmp_path / "fresh")])
    assert resumed["folds"][0]["ua"] == fresh["folds"][0]["ua"]


def test_out_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli(SMALL + ["--epochs", "1", "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert train.cli(SMALL + ["--epochs", "1", "--seed", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --out" in err[0] and f"--resume {out}" in err[0] and "new folder" in err[0]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert train.cli(SMALL + ["--epochs", "1", "--out", str(tmp_path / "empty-is-fine")]) == 0


@pytest.mark.parametrize("progress", [True, False])
def test_results_go_to_stdout_and_progress_to_stderr_with_or_without_the_bar(tmp_path, capsys, progress):
    flags = [f for f in SMALL if f != "--no-progress"] + ([] if progress else ["--no-progress"])
    assert train.cli(flags + ["--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("WA ") and " UA " in out[0]
    assert "epoch 1" in captured.err and not any(line.startswith("WA ") for line in captured.err.splitlines())
