"""lab.fusion: the units' probabilities averaged with a functionals classifier (fastser's,
or the baseline's SVM) that never sees the units' test speakers."""

import numpy as np
import pytest

from lab import fusion
from lab.experiments import pooled_ua

CLASSES = ["a", "b", "c"]


def _table(rng, speakers=4, per_speaker=30):
    labels = np.tile(np.arange(3), speakers * per_speaker // 3)
    spk = np.repeat([f"s{i}" for i in range(speakers)], per_speaker)
    x = rng.normal(size=(len(labels), 5))
    x[:, 0] += 2.0 * labels  # one informative functional
    return {"x": x, "uids": [f"u{i}" for i in range(len(labels))], "speakers": spk, "labels": labels}


def _record(table, speaker, seed, rng):
    rows = np.flatnonzero(table["speakers"] == speaker)
    probs = rng.dirichlet(np.ones(3), size=len(rows))
    return {
        "seed": seed,
        "test_speakers": [speaker],
        "classes": CLASSES,
        "predictions": {
            "utterances": [table["uids"][r] for r in rows],
            "y_true": table["labels"][rows].tolist(),
            "y_pred": probs.argmax(1).tolist(),
            "probs": probs.tolist(),
        },
    }


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_the_classifier_scores_only_the_test_speakers_and_never_trains_on_them(monkeypatch, classifier):
    rng = np.random.default_rng(0)
    table = _table(rng)
    fitted = []
    name = "svm_probabilities" if classifier == "svm" else "head_probabilities"
    real = getattr(fusion, name)

    def spy(t, speakers, *args, **kwargs):
        out = real(t, speakers, *args, **kwargs)
        fitted.append((set(speakers), out if classifier == "svm" else out[0]))
        return out

    monkeypatch.setattr(fusion, name, spy)
    records = [_record(table, s, seed, rng) for seed in (0, 1) for s in ("s0", "s1")]
    fused = fusion.fuse(records, table, classifier=classifier, feature_set="compare")
    assert len(fitted) == 2  # one classifier per set of test speakers, shared by the seeds
    for speakers, probs in fitted:
        rows = [i for i, u in enumerate(table["uids"]) if u in probs]
        assert set(table["speakers"][rows]) == speakers
        assert np.allclose([p.sum() for p in probs.values()], 1.0)
    # weight 1 is the arm alone, pooled per seed as the queue pools it
    for seed in (0, 1):
        mine = [r for r in records if r["seed"] == seed]
        assert np.isclose(fused["seeds"][seed][1.0], pooled_ua(mine))
    # the informative functional makes the classifier alone better than the random "model"
    alone = np.mean([fused["seeds"][s][0.0] for s in (0, 1)])
    model = np.mean([fused["seeds"][s][1.0] for s in (0, 1)])
    assert alone > model + 0.2


def test_fastsers_classifier_is_the_one_a_functionals_run_fits():
    """The benchmark's probabilities are fastser.functionals' head fitted on the other speakers."""
    from fastser.functionals import FunctionalsHead, score_speakers

    table = _table(np.random.default_rng(2))
    enrolled, unenrolled = fusion.head_probabilities(table, ["s2"], "compare")
    test = table["speakers"] == "s2"
    head = FunctionalsHead.fit(table["x"][~test], table["speakers"][~test], table["labels"][~test], 3, "compare")
    want = score_speakers(head, table["x"][test], table["speakers"][test])
    uids = [u for u, t in zip(table["uids"], test) if t]
    np.testing.assert_array_equal(np.stack([enrolled[u] for u in uids]), want[0])
    np.testing.assert_array_equal(np.stack([unenrolled[u] for u in uids]), want[1])


def test_without_enrollment_the_test_functionals_take_the_training_rows_statistics():
    """level "training": the test speakers' functionals are standardised with the training rows'
    pooled statistics (a test speaker's own offset stays), the model's training-statistics
    probabilities are fused."""
    rng = np.random.default_rng(1)
    table = _table(rng)
    table["x"][table["speakers"] == "s0"] += 50.0  # a speaker far from the others
    with_own = fusion.svm_probabilities(table, ["s0"], enrollment=True)
    with_training = fusion.svm_probabilities(table, ["s0"], enrollment=False)
    assert with_own.keys() == with_training.keys()
    assert not np.allclose(np.stack(list(with_own.values())), np.stack(list(with_training.values())))
    record = _record(table, "s1", 0, rng)
    record["predictions"]["probs_training"] = record["predictions"]["probs"]
    fused = fusion.fuse([record], table, level="training", classifier="svm")
    assert np.isclose(fused["seeds"][0][1.0], pooled_ua([record]))


def test_the_table_reports_the_fixed_weight_against_the_arm():
    r = {
        "arm": "x",
        "features": "compare",
        "units": 24,
        "weight": 0.5,
        "ua": {"1.0": 0.626, "0.75": 0.66, "0.5": 0.692, "0.25": 0.665, "0.0": 0.634},
        "delta_per_fold": 0.066,
        "better": 20,
        "worse": 2,
        "p": 0.0001,
    }
    row = fusion.table_text([r]).splitlines()[-1]
    # a result kept before the classifier was recorded was the SVM's
    assert row == (
        "| x | compare | linear SVM + Platt | speaker's (enrollment) | 24 | 62.6 | 63.4 | 69.2 | 0.5 | +6.6 "
        "| 20 / 2 | 0.000 |"
    )
    r["classifier"] = "logistic"
    assert "| fastser's logistic regression |" in fusion.table_text([r])
