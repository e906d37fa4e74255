import pytest
import torch

from fastser.data import CorpusError, load_corpus, make_folds
from fastser.data.cache import build_feature_table
from fastser.data.corpora import CREMAD_LABELS, EMODB_LABELS, EMOVO_LABELS, RAVDESS_LABELS, TESS_LABELS
from tests.data import fixtures

CPU = torch.device("cpu")


def test_emodb_labels_speakers_and_bad_files(tmp_path):
    expected = fixtures.make_emodb(tmp_path)
    c = load_corpus("emodb", tmp_path)
    got = {u.uid: (u.speaker, u.label) for u in c.utterances if u.uid in expected}
    assert got == {k: (spk, EMODB_LABELS[e]) for k, (spk, e) in expected.items()}
    assert {u.gender for u in c.utterances if u.speaker == "03"} == {"M"}
    assert [p for p, _ in c.skipped] == [str(tmp_path / "wav" / "readme.wav")]  # name does not parse
    table = build_feature_table(c, ["mfcc"], CPU)
    assert len(table.corpus.utterances) == len(expected)  # the 3 unreadable files are skipped at load
    reasons = " ".join(r for _, r in table.corpus.skipped)
    assert len(table.corpus.skipped) == 4 and "empty file" in reasons and "truncated" in reasons
    with pytest.raises(CorpusError, match="--strict"):
        build_feature_table(c, ["mfcc"], CPU, strict=True)


def test_ravdess_speech_audio_only(tmp_path):
    expected = fixtures.make_ravdess(tmp_path)
    c = load_corpus("ravdess", tmp_path)
    assert {u.uid: (u.speaker, u.label) for u in c.utterances} == {
        k: (spk, RAVDESS_LABELS[e]) for k, (spk, e) in expected.items()
    } | {
        n: ("Actor_02", RAVDESS_LABELS[n[6:8]])
        for n in ["03-01-03-01-01-02-02", "03-01-04-01-01-02-02", "03-01-06-01-01-02-02"]
    }
    assert {u.gender for u in c.utterances if u.speaker == "Actor_01"} == {"M"}
    assert len(c.skipped) == 1  # notes.wav
    table = build_feature_table(c, ["spectrogram"], CPU)
    assert len(table.corpus.utterances) == len(expected) and len(table.corpus.skipped) == 4


def test_cremad(tmp_path):
    expected = fixtures.make_cremad(tmp_path)
    c = load_corpus("cremad", tmp_path)
    good = {u.uid: (u.speaker, u.label) for u in c.utterances if u.uid in expected}
    assert good == {k: (a, CREMAD_LABELS[e]) for k, (a, e) in expected.items()}
    assert any("1001_XYZ_ANG_XX" in p for p, _ in c.skipped)


def test_tess(tmp_path):
    expected = fixtures.make_tess(tmp_path)
    c = load_corpus("tess", tmp_path)
    good = {u.uid: (u.speaker, u.label) for u in c.utterances if u.uid in expected}
    assert good == {k: (s, TESS_LABELS[e]) for k, (s, e) in expected.items()}
    assert "surprised" in c.classes and any("furious" in p for p, _ in c.skipped)
    folds = make_folds(c, "loso")
    assert len(folds) == 2 and not folds[0].val_speaker_disjoint  # 2 speakers: validation cannot be disjoint


def test_emovo_actors_labels_and_bad_files(tmp_path):
    expected = fixtures.make_emovo(tmp_path)
    c = load_corpus("emovo", tmp_path)
    good = {u.uid: (u.speaker, u.label) for u in c.utterances if u.uid in expected}
    assert good == {k: (a, EMOVO_LABELS[e]) for k, (a, e) in expected.items()}
    assert {u.gender for u in c.utterances if u.speaker == "m2"} == {"M"}
    assert {u.gender for u in c.utterances if u.speaker == "f1"} == {"F"}
    assert sorted(p.rsplit("/", 1)[1] for p, _ in c.skipped) == ["rab-m2-b1-copy.wav", "xyz-f1-b1.wav"]
    assert c.classes == ["angry", "fearful", "happy", "neutral", "sad", "surprised"]  # no disgust here
    assert c.default_split == "loso" and len(make_folds(c, "loso")) == 3
    table = build_feature_table(c, ["mfcc"], CPU)
    assert len(table.corpus.utterances) == len(expected) and len(table.corpus.skipped) == 5


def test_iemocap_four_class_sessions_and_subsets(tmp_path):
    expected = fixtures.make_iemocap(tmp_path)
    c = load_corpus("iemocap", tmp_path)
    assert c.classes == ["neutral", "happy", "sad", "angry"]
    assert {u.uid: (u.speaker, u.label, u.session) for u in c.utterances} == expected
    assert next(u for u in c.utterances if u.uid == "Ses01F_impro01_F000").text == "Excuse me."
    impro = load_corpus("iemocap", tmp_path, subset="improvised")
    assert all("impro" in u.uid for u in impro.utterances) and len(impro.utterances) == len(expected) // 2
    folds = make_folds(c, "session")
    assert [f.name for f in folds] == ["test=Session1", "test=Session2", "test=Session3"]
    assert len(make_folds(c, "loso")) == 6
    table = build_feature_table(c, ["mfcc"], CPU)
    assert len(table.corpus.skipped) == 1 and "Ses03F_impro01_F002" in table.corpus.skipped[0][0]


@pytest.mark.parametrize(
    "make, name",
    [
        (fixtures.make_emodb, "emodb"),
        (fixtures.make_ravdess, "ravdess"),
        (fixtures.make_cremad, "cremad"),
        (fixtures.make_iemocap, "iemocap"),
    ],
)
def test_every_fold_is_speaker_independent(tmp_path, make, name):
    make(tmp_path)
    c = load_corpus(name, tmp_path)
    spk = c.speakers
    for split in ("loso", "kfold", "holdout") + (("session",) if name == "iemocap" else ()):
        folds = make_folds(c, split, n_folds=2)
        for a, b in zip(folds, make_folds(c, split, n_folds=2)):  # deterministic
            assert a.name == b.name and all((getattr(a, k) == getattr(b, k)).all() for k in ("train", "val", "test"))
        tested = []
        for f in folds:
            tr, va, te = set(spk[f.train]), set(spk[f.val]), set(spk[f.test])
            assert not tr & te and not te & va
            if f.val_speaker_disjoint:
                assert not tr & va
            assert len(f.train) + len(f.val) + len(f.test) == len(c.utterances)
            tested += f.test.tolist()
        if split in ("loso", "kfold", "session"):
            assert sorted(tested) == list(range(len(c.utterances)))  # every utterance tested exactly once


def test_classes_option_maps_and_restricts(tmp_path):
    fixtures.make_ravdess(tmp_path)
    c = load_corpus("ravdess", tmp_path).with_classes("neutral=neutral+fearful,angry")
    assert c.classes == ["neutral", "angry"] and {u.label for u in c.utterances} == {"neutral", "angry"}
    with pytest.raises(CorpusError, match="does not have"):
        load_corpus("ravdess", tmp_path).with_classes("happy,excited")


@pytest.mark.parametrize("name", ["emodb", "ravdess", "cremad", "tess", "iemocap", "emovo"])
def test_missing_or_empty_data_dir_says_which_layout(tmp_path, name):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(name, tmp_path / "nope")
    with pytest.raises(CorpusError, match="expected layout"):
        load_corpus(name, tmp_path)
    with pytest.raises(CorpusError, match="--data-dir is required"):
        load_corpus(name, None)


def test_degenerate_class_sets_are_found_before_training(tmp_path):
    """One class only: a clear error before any training (every prediction would score 100%); a class
    missing from a fold's training speakers, or a test fold of one class: a warning naming the fold."""
    from fastser.data import Corpus, CorpusError, Utterance, check_classes, make_folds

    def corpus(rows):
        return Corpus(
            "toy",
            sorted({label for _, label in rows}),
            [Utterance(f"u{i}", label, spk) for i, (spk, label) in enumerate(rows)],
        )

    with pytest.raises(CorpusError, match="same emotion \\(angry\\).*at least two classes"):
        one = corpus([(s, "angry") for s in "abcde"])
        check_classes(one, make_folds(one, "loso"), validating=False)
    rows = [(s, label) for s in "abcd" for label in ("angry", "sad")] + [("e", "happy"), ("e", "angry")]
    toy = corpus(rows)
    folds = make_folds(toy, "loso")
    warnings = check_classes(toy, folds, validating=False)
    assert any("fold test=e: the training speakers have no happy utterances" in w for w in warnings)
    assert not any("test=a: the training speakers" in w for w in warnings)
    assert sum("every test utterance is" in w for w in warnings) == 0
    single = corpus([(s, "angry") for s in "abc"] + [(s, "sad") for s in "abc"] + [("d", "sad")])
    assert any(
        "fold test=d: every test utterance is sad" in w
        for w in check_classes(single, make_folds(single, "loso"), validating=False)
    )


def test_a_one_class_corpus_fails_in_one_line(tmp_path):
    """Ten EmoDB-named files of one emotion: exit 2 and one line, no run folder, no 100% score."""
    import subprocess
    import sys

    for i, speaker in enumerate(["03", "08", "09", "10", "11"] * 2):
        fixtures.write_wav(tmp_path / "emodb" / "wav" / f"{speaker}a0{i // 5 + 1}Wa.wav", seed=i)
    proc = subprocess.run(
        [sys.executable, "-m", "fastser.train", "--corpus", "emodb", "--data-dir", str(tmp_path / "emodb")]
        + ["--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "same emotion (angry)" in err[0] and "at least two classes" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_synthetic_corpus_is_generated_once_then_read_back_unchanged(tmp_path, monkeypatch):
    """The generated corpus is cached by its arguments and the generator's code: the second load reads
    the file (the generator is not called) and gives the same utterances, bit for bit; other
    arguments are another file; a damaged file is rebuilt."""
    import numpy as np

    from fastser.data import synthetic

    first = load_corpus("synthetic", seed=3, n_speakers=2, per_class=1, cache_dir=tmp_path)
    files = list(tmp_path.glob("synthetic-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(synthetic, "make_corpus", lambda **kw: pytest.fail("generated again"))
    again = load_corpus("synthetic", seed=3, n_speakers=2, per_class=1, cache_dir=tmp_path)
    assert [(u.uid, u.label, u.speaker, u.gender) for u in again.utterances] == [
        (u.uid, u.label, u.speaker, u.gender) for u in first.utterances
    ]
    assert all(
        np.array_equal(a.audio, b.audio) and a.audio.dtype == b.audio.dtype
        for a, b in zip(first.utterances, again.utterances)
    )
    assert again.classes == first.classes and again.default_split == "holdout"
    monkeypatch.undo()
    load_corpus("synthetic", seed=4, n_speakers=2, per_class=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("synthetic-*.npz"))) == 2
    files[0].write_bytes(b"not an npz")
    rebuilt = load_corpus("synthetic", seed=3, n_speakers=2, per_class=1, cache_dir=tmp_path)
    assert np.array_equal(rebuilt.utterances[0].audio, first.utterances[0].audio)
