"""The README's and docs' results tables are generated from benchmarks/results/, never typed by hand,
and the README stays a user's page."""

from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ACCURACY = (ROOT / "docs" / "accuracy.md").read_text()
DEVELOPMENT = (ROOT / "docs" / "development.md").read_text()


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_performance_table_is_the_generated_one():
    assert between(README, report.START, report.END) == "\n" + report.table()


def test_headline_table_is_the_generated_one():
    assert between(README, report.HEAD_START, report.HEAD_END) == "\n" + report.headline_table()


def test_accuracy_table_is_the_generated_one():
    assert between(ACCURACY, report.ACC_START, report.ACC_END) == "\n" + report.accuracy_table()


def test_ledger_table_is_the_generated_one():
    assert between(README, report.LEDGER_START, report.LEDGER_END) == "\n" + report.ledger_table()


def test_kernel_table_is_the_generated_one():
    assert between(DEVELOPMENT, report.KERNELS_START, report.KERNELS_END) == "\n" + report.kernel_table()


def test_readme_first_screen_shows_install_run_and_results():
    """What it is, install and run come first; the docs it links exist; every local link resolves."""
    import re

    head = README[: README.index("## Results")]
    assert "pip install torch==2.13.0" in head and "python -m fastser.train" in head
    assert README.index("## Results") < README.index("## Speed")
    for target in re.findall(r"\]\(((?:docs/|LICENSE|CITATION)[^)#]*)", README):
        assert (ROOT / target).exists(), target


def test_accuracy_rows_name_the_augmentations_they_were_made_with():
    """A row's settings column says which training options differ from the defaults, so two rows that
    differ only in an augmentation never read the same."""
    plain = {
        "features": "both",
        "prosody": True,
        "pooling": "time",
        "normalize": "speaker",
        "validation": False,
        "epochs": 24,
        "patience": 5,
        "batch_size": 16,
        "lr": 0.002,
    }
    text = report._setting_text({"kind": "fastser", "settings": plain})
    assert "batch 16, lr 0.002" in text
    assert "batch 64, lr 0.004" in report._setting_text(
        {"kind": "fastser", "settings": {**plain, "batch_size": 64, "lr": 0.004}}
    )
    assert not any(word in text for word in ("SpecAugment", "tempo", "speed", "mixup", "noise"))
    augmented = {
        **plain,
        "specaugment": True,
        "tempo": 0.1,
        "speed_perturb": [0.9, 1.1],
        "mixup": 0.2,
        "noise": [20.0, 10.0],
    }
    text = report._setting_text({"kind": "fastser", "settings": augmented})
    assert "SpecAugment" in text and "tempo ±0.1" in text and "speed perturbation 0.9,1.1" in text
    assert "mixup alpha 0.2" in text and "noise copies at 20,10 dB SNR" in text
