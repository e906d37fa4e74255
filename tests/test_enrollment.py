"""Few-clip enrollment statistics: the k-clip fallbacks a model is scored with, and
--enrollment-dropout, which trains with them (and the others predict falls back to)."""

import pytest
import torch

import fastser.train as train
from fastser.features.featureset import FeatureSet
from fastser.training import inputs as training_inputs
from fastser.training import run as training_run
from fastser.errors import UserError
from fastser.normalization import Normalizer, enrollment_subsets
from fastser.training import Batcher, Experiment
from fastser.training.batches import PlannedBatches
from fastser.training.scoring import ENROLLMENT_CLIPS, FALLBACKS

from tests.test_train import SMALL, run


def _table(n=12, bins=3, width=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(5, width + 1, (n,), generator=gen)
    feats = {
        "mfcc": (torch.randn(n, bins, width, generator=gen) * 2 + 1) * (torch.arange(width) < frames[:, None, None]),
        "logmel": torch.randn(n, bins + 2, width, generator=gen) * (torch.arange(width) < frames[:, None, None]),
    }
    return feats, frames


def test_subset_statistics_are_each_subsets_plain_statistics():
    """fit_subsets: each group's statistics are Normalizer.fit's over its rows, rows shared
    between groups and a group of one row included."""
    feats, frames = _table()
    subsets = [[0, 3, 5], [3], [11, 0], [2, 4, 6, 8, 10], [3, 5]]
    members = torch.tensor([[g, r] for g, rows in enumerate(subsets) for r in rows])
    norm = Normalizer.fit_subsets(feats, frames, members, len(subsets), chunk=2)
    for g, rows in enumerate(subsets):
        plain = Normalizer.fit(feats, frames, torch.tensor(rows))
        for kind in feats:
            torch.testing.assert_close(norm.mean[kind][g], plain.mean[kind], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(norm.std[kind][g], plain.std[kind], rtol=1e-6, atol=1e-6)


def test_enrollment_subsets_draw_k_other_clips_of_the_same_speaker():
    speakers = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 0, 1])
    rows = torch.tensor([0, 5, 7, 8])
    for k in (1, 3, 10):
        members = enrollment_subsets(speakers, rows, k, torch.Generator().manual_seed(k), draws=3)
        for i, r in enumerate(rows.tolist()):
            for d in range(3):
                picked = members[members[:, 0] == i * 3 + d, 1]
                same = torch.nonzero(speakers == speakers[r]).flatten()
                others = same[same != r]
                if others.numel() == 0:  # speaker 2 has one clip: its own statistics are all there are
                    assert picked.tolist() == [r]
                    continue
                assert picked.numel() == min(k, others.numel()) == picked.unique().numel()
                assert r not in picked.tolist() and bool((speakers[picked] == speakers[r]).all())
    # the draws differ between sets (speaker 0 has 4 other clips to choose 1 of)
    members = enrollment_subsets(speakers, torch.tensor([0]), 1, torch.Generator().manual_seed(0), draws=20)
    assert members[:, 1].unique().numel() > 1
    again = enrollment_subsets(speakers, torch.tensor([0]), 1, torch.Generator().manual_seed(0), draws=20)
    assert torch.equal(members, again)  # reproducible from the generator


def test_concat_keeps_each_normalizers_groups_in_order():
    feats, frames = _table()
    groups = torch.arange(12) % 4
    per_group = Normalizer.fit_groups(feats, frames, groups, 4)
    pooled = Normalizer.fit(feats, frames, torch.arange(12))
    both = Normalizer.concat([per_group, pooled])
    for kind in feats:
        assert both.mean[kind].shape == (5, feats[kind].shape[1])
        assert torch.equal(both.mean[kind][:4], per_group.mean[kind])
        assert torch.equal(both.std[kind][4], pooled.std[kind])


def _mixing_batchers(p=0.5):
    feats, frames = _table(n=16, width=60)
    labels = torch.arange(16) % 4
    groups = torch.arange(16) % 4  # four speakers
    own = Normalizer.fit_groups(feats, frames, groups, 4)
    extended = Normalizer.concat(
        [
            own,
            Normalizer.fit(feats, frames, torch.arange(16)),
            Normalizer.fit_groups(feats, frames, torch.arange(16), 16),
        ]
    )
    alternatives = torch.stack([torch.full((16,), 4), 5 + torch.arange(16)], 1)  # the pooled set, its own
    batchers = []
    for resident in (False, True):
        b = Batcher(feats, frames, labels, own, torch.device("cpu"), 30, groups, resident=resident)
        b.mix_statistics(extended, alternatives, p)
        batchers.append(b)
    return feats, frames, groups, extended, alternatives, batchers


def test_mixed_statistics_normalise_each_item_with_its_drawn_group():
    """A mixing batcher normalises each training item with the group it draws: its own with
    probability 1 - p, else one of its alternatives; host, resident and planned batches agree;
    evaluation batches keep the rows' own groups."""
    feats, frames, groups, extended, alternatives, (host, resident) = _mixing_batchers()
    rows = torch.tensor([3, 0, 9, 12, 7, 5, 15, 1])
    drawn = host.draw_groups(rows, torch.Generator().manual_seed(3))
    assert all(int(g) == int(groups[r]) or int(g) in alternatives[r].tolist() for r, g in zip(rows, drawn))
    gen = torch.Generator().manual_seed(3)
    crop_frames, t_idx = host.draw_crops(rows, gen)
    expected_groups = host.draw_groups(rows, gen)
    raw = {k: torch.take_along_dim(x[rows], t_idx[:, None, :], dim=2) for k, x in feats.items()}
    expected = extended.apply(raw, crop_frames, expected_groups)
    a = host.batch(rows, torch.Generator().manual_seed(3))
    b = resident.batch(rows, torch.Generator().manual_seed(3))
    planned = PlannedBatches(resident, 8)
    built = planned.build(planned.plan(rows, torch.Generator().manual_seed(3)))
    for kind in feats:
        torch.testing.assert_close(a.feats[kind], expected[kind], rtol=0, atol=0)
        torch.testing.assert_close(b.feats[kind], expected[kind], rtol=0, atol=0)
        torch.testing.assert_close(built[0][kind], expected[kind], rtol=0, atol=0)
    evaluated = host.batch(rows)
    whole = {k: x[rows][:, :, : evaluated.feats[k].shape[-1]] for k, x in feats.items()}
    reference = extended.apply(whole, frames[rows], groups[rows])
    for kind in feats:
        torch.testing.assert_close(evaluated.feats[kind], reference[kind], rtol=0, atol=0)
    # over many draws the share of swapped items is p, each alternative drawn alike
    many = host.draw_groups(torch.arange(16).repeat(500), torch.Generator().manual_seed(0))
    swapped = many != groups.repeat(500)
    assert abs(swapped.float().mean().item() - 0.5) < 0.03
    pooled_share = (many[swapped] == 4).float().mean().item()
    assert abs(pooled_share - 0.5) < 0.04
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        host.mix_statistics(extended, alternatives, 1.0)
    ungrouped = Batcher(feats, frames, groups, extended, torch.device("cpu"), 30)
    with pytest.raises(ValueError, match="groups"):
        ungrouped.mix_statistics(extended, alternatives, 0.5)


def test_experiment_alternatives_are_the_fallbacks_of_each_training_row(tmp_path):
    """TableStatistics.mixed: the speakers' groups first, then for each training row the
    training rows' pooled statistics, its own, and k-clip sets of other clips of its speaker."""
    config = train.parse_config(SMALL + ["--out", str(tmp_path / "x")]).resolved()
    info = training_run.fdist.setup("cpu")
    table = training_inputs.load_table(config, info)
    from fastser.data.splits import make_folds

    folds = make_folds(table.corpus, "holdout")
    exp = Experiment(config, info, table, folds, tmp_path, FeatureSet.paper(table.feats))
    train_rows = exp.data.train_rows(folds[0])
    pooled = Normalizer.fit(table.feats, table.frames, train_rows)
    norm, alternatives = exp.data.statistics.mixed(train_rows, pooled, seed=1, clips=ENROLLMENT_CLIPS)
    speaker_norm, speakers = exp.data.statistics.groups("speaker")
    utterance_norm, _ = exp.data.statistics.groups("utterance")
    n_speakers, n = speaker_norm.mean["mfcc"].shape[0], speakers.shape[0]
    assert torch.equal(norm.mean["mfcc"][:n_speakers], speaker_norm.mean["mfcc"])
    assert alternatives.shape == (n, 4 * (2 + len(ENROLLMENT_CLIPS)))
    for r in train_rows[:5].tolist():
        alt = alternatives[r]
        assert (alt[:4] == n_speakers).all()  # the pooled training statistics
        torch.testing.assert_close(norm.mean["mfcc"][n_speakers], pooled.mean["mfcc"])
        assert (alt[4:8] == n_speakers + 1 + r).all()
        torch.testing.assert_close(norm.mean["mfcc"][n_speakers + 1 + r], utterance_norm.mean["mfcc"][r])
        for g in alt[8:].tolist():  # a few other clips of the same speaker: not its speaker's, not its own
            assert g >= n_speakers + 1 + n
            assert not torch.equal(norm.mean["mfcc"][g], utterance_norm.mean["mfcc"][r])
    # the rows not trained on keep their own speaker's group, never drawn
    test_row = int(folds[0].test[0])
    assert (alternatives[test_row] == speakers[test_row]).all()


@pytest.mark.slow
def test_enrollment_dropout_trains_scores_the_k_clip_fallbacks_and_guards_resume(tmp_path):
    metrics, out = run(tmp_path, "drop", "--epochs", "1", "--enrollment-dropout", "0.5")
    for level in FALLBACKS:
        assert 0 <= metrics[f"{level}_norm"]["ua"] <= 1
    assert {f"enroll{k}" for k in ENROLLMENT_CLIPS} <= set(FALLBACKS)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["enrollment_dropout"] == 0.5
    with pytest.raises(UserError, match="--enrollment-dropout 0.5"):
        train.main(SMALL + ["--out", str(out), "--epochs", "1", "--resume", str(out), "--enrollment-dropout", "0"])
    for bad in ("1", "-0.2", "x"):
        with pytest.raises(SystemExit):
            train.parse_args(["--enrollment-dropout", bad])
    with pytest.raises(SystemExit):
        train.parse_args(["--enrollment-dropout", "0.5", "--normalize", "utterance"])
