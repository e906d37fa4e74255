"""fastser.config: every training setting and default in one place, the command line checked against it."""

import argparse
import json

import pytest

import fastser.train as train
from fastser.config import BEFORE_RECORDED, RESOLVED_SETTINGS, RUN_OPTIONS, SETTING_SECTION, TrainConfig, migrated


def test_the_command_line_has_a_flag_for_every_setting_and_takes_its_defaults_from_the_config():
    parser = train.build_parser()
    dests = {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(dests) == set(SETTING_SECTION)
    assert dests == TrainConfig().settings()
    assert vars(train.parse_args([])) == TrainConfig().resolved().settings()


def test_every_default_a_help_text_states_is_the_configurations():
    """What --help says of a default is read from fastser.config: the formatter's "(default: X)",
    the per-corpus table, enrollment dropout by normalisation, a choice marked "(default)"."""
    import re

    from fastser.config import CORPUS_DEFAULTS, ENROLLMENT_DROPOUT_DEFAULTS

    parser = train.build_parser()
    formatter = parser._get_formatter()
    config, where = TrainConfig().settings(), {"real corpora": "real", "the synthetic corpus": "synthetic"}
    checked = set()
    for action in parser._actions:
        if not action.option_strings or action.dest not in config:
            continue
        text = " ".join(formatter._get_help_string(action).split())
        for clause in re.findall(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if action.dest in CORPUS_DEFAULTS["real"]:
                stated = dict(
                    (where[w], v) for v, w in re.findall(r"(\S+) on (real corpora|the synthetic corpus)", clause)
                )
                assert set(stated) == set(CORPUS_DEFAULTS), (action.dest, clause)
                for corpus, value in stated.items():
                    want = CORPUS_DEFAULTS[corpus][action.dest]
                    if isinstance(want, bool):
                        want = f"--{'' if want else 'no-'}{action.dest.replace('_', '-')}"
                    assert value == str(want), (action.dest, clause)
            elif action.dest == "enrollment_dropout":
                stated = {k: float(v) for v, k in re.findall(r"([\d.]+) with --normalize (\w+)", clause)}
                assert stated == ENROLLMENT_DROPOUT_DEFAULTS and clause.endswith("else 0")
            elif clause.startswith("off") or clause.endswith(": off"):
                assert config[action.dest] in (None, False, 0), (action.dest, clause)
            elif re.fullmatch(r"[\w.]+", clause) and config[action.dest] is not None:
                assert clause == str(config[action.dest]), (action.dest, clause)
            else:  # a default the config leaves to the run (None): said in words, never as a number
                assert config[action.dest] is None and not re.search(r"\d", clause), (action.dest, clause)
            checked.add(action.dest)
        for choice in re.findall(r"'(\w+)' \(default\)", text):
            assert choice == config[action.dest], (action.dest, choice)
            checked.add(action.dest)
        if "off by default" in text:
            assert config[action.dest] in (False, None, 0, 0.0), action.dest
    assert {"epochs", "patience", "validation", "functionals", "enrollment_dropout", "lr", "width"} <= checked


def test_sections_flat_settings_and_replace():
    config = TrainConfig()
    assert (config.model.width, config.optim.lr, config.data.normalize) == (16, 2e-3, "speaker")
    changed = config.replace(width=8, seed=3, ema=[0.99])
    assert (changed.model.width, changed.optim.seed, changed.optim.ema) == (8, 3, (0.99,))
    assert config.model.width == 16  # frozen: replace makes a copy
    assert TrainConfig.from_settings(json.loads(json.dumps(changed.settings()))) == changed
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_settings({"widht": 8})


def test_resolved_fills_exactly_the_settings_it_names():
    before, after = TrainConfig().settings(), TrainConfig().resolved().settings()
    filled = {k for k in before if before[k] is None and after[k] is not None}
    assert filled == set(RESOLVED_SETTINGS)


def test_enrollment_dropout_is_on_where_speaker_statistics_are():
    assert TrainConfig().resolved().augment.enrollment_dropout == 0.5
    for normalize in ("corpus", "utterance"):
        assert TrainConfig().replace(normalize=normalize).resolved().augment.enrollment_dropout == 0.0
    assert TrainConfig().replace(enrollment_dropout=0.0).resolved().augment.enrollment_dropout == 0.0
    assert vars(train.parse_args(["--normalize", "corpus"]))["enrollment_dropout"] == 0.0


def test_defaults_that_depend_on_the_corpus_are_resolved_once():
    assert TrainConfig().resolved().optim.epochs == 12
    real = TrainConfig().replace(corpus="ravdess").resolved().optim
    assert (real.epochs, real.patience, real.validation) == (16, 5, False)
    assert TrainConfig().replace(corpus="ravdess", epochs=3).resolved().optim.epochs == 3


def test_real_corpora_fuse_compare_functionals_and_the_synthetic_one_does_not():
    assert TrainConfig().resolved().model.functionals_set is None
    assert TrainConfig().replace(corpus="emodb").resolved().model.functionals_set == "compare"
    assert TrainConfig().replace(corpus="emodb", functionals="none").resolved().model.functionals_set is None
    assert TrainConfig().replace(functionals="egemaps").resolved().model.functionals_set == "egemaps"
    assert migrated({"corpus": "emodb"})["functionals"] == "none"  # a run stored before the setting: no fusion
    assert vars(train.parse_args(["--corpus", "ravdess", "--data-dir", "x"]))["functionals"] == "compare"


def test_stored_settings_are_read_through_one_migration():
    old = {"corpus": "emodb", "epochs": 3, "speed_perturb": [0.9, 1.1], "schema": 1}
    m = migrated(old)
    assert m["pooling"] == BEFORE_RECORDED["pooling"] == "global" and m["speed_perturb"] == (0.9, 1.1)
    assert "schema" not in m


def test_run_options_say_where_and_how_not_what():
    assert {"out", "resume", "device", "threads", "data_dir", "cache_dir", "max_folds"} <= RUN_OPTIONS
    assert not {"width", "lr", "seed", "epochs", "normalize", "amp"} & RUN_OPTIONS
    assert not {"out", "device"} & set(TrainConfig().computed_settings())


def test_the_library_takes_a_config_not_a_namespace(tmp_path):
    metrics = train.train(
        TrainConfig().replace(
            synthetic_speakers=6,
            synthetic_per_class=4,
            width=4,
            embed_dim=16,
            epochs=1,
            train_seconds=1.0,
            no_progress=True,
            out=str(tmp_path / "run"),
        )
    )
    assert metrics["n_test"] > 0
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert saved["schema"] == 1 and TrainConfig.from_settings(migrated(saved)).model.width == 4
    assert not isinstance(train.parse_config([]), argparse.Namespace)


@pytest.mark.parametrize(
    "changes, flags, message",
    [
        ({"epochs": 0}, ["--epochs", "0"], "epochs must be a positive integer, got 0"),
        ({"batch_size": -4}, ["--batch-size", "-4"], "batch_size must be a positive integer, got -4"),
        ({"threads": 0}, ["--threads", "0"], "threads must be a positive integer, got 0"),
        ({"lr": 0.0}, ["--lr", "0"], "lr must be a positive number, got 0.0"),
        ({"train_seconds": float("nan")}, ["--train-seconds", "nan"], "train_seconds must be a positive number"),
        ({"lambda_center": -1.0}, ["--lambda-center", "-1"], "lambda_center must be a number >= 0, got -1.0"),
        ({"seeds": (0, 1), "ablation": True}, ["--seeds", "0,1", "--ablation"], "seeds and ablation do not combine"),
        (
            {"enrollment_dropout": 0.5, "normalize": "corpus"},
            ["--enrollment-dropout", "0.5", "--normalize", "corpus"],
            "enrollment_dropout needs normalize speaker (got normalize corpus)",
        ),
    ],
)
def test_the_library_refuses_what_the_command_line_refuses(tmp_path, capsys, changes, flags, message):
    """One set of checks (TrainConfig.problems): fastser.train.train(config) raises a UserError
    naming the setting; the command line exits 2 naming the flag. Nothing is written."""
    from fastser.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train(TrainConfig().replace(out=str(out), **changes))
    assert not out.exists()
    with pytest.raises(SystemExit) as exited:
        train.parse_args(flags + ["--out", str(out)])
    assert exited.value.code == 2
    flag = "--" + message.split(" ")[0].replace("_", "-")
    assert flag in capsys.readouterr().err and not out.exists()
