"""The README's and docs' results tables are generated from benchmarks/results/, never typed by hand,
and the README stays a user's page."""

from pathlib import Path

from lab import report

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ACCURACY = (ROOT / "docs" / "accuracy.md").read_text()
DEVELOPMENT = (ROOT / "docs" / "development.md").read_text()
SPEED = (ROOT / "docs" / "speed.md").read_text()


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_performance_table_is_the_generated_one():
    assert between(SPEED, report.START, report.END) == "\n" + report.table()


def test_speed_summary_is_the_generated_one():
    assert between(README, report.SUMMARY_START, report.SUMMARY_END) == "\n" + report.speed_summary()


def test_headline_table_is_the_generated_one():
    assert between(README, report.HEAD_START, report.HEAD_END) == "\n" + report.headline_table()


def test_accuracy_table_is_the_generated_one():
    assert between(ACCURACY, report.ACC_START, report.ACC_END) == "\n" + report.accuracy_table()


def test_queue_comparisons_are_the_generated_ones():
    assert between(ACCURACY, report.QUEUE_START, report.QUEUE_END) == "\n" + report.queue_tables()


def test_fusion_table_is_the_generated_one():
    assert between(ACCURACY, report.FUSION_START, report.FUSION_END) == "\n" + report.fusion_table()


def test_adabn_table_is_the_generated_one():
    assert between(ACCURACY, report.ADABN_START, report.ADABN_END) == "\n" + report.adabn_table()


def test_fusion_weight_table_is_the_generated_one():
    assert between(ACCURACY, report.WEIGHT_START, report.WEIGHT_END) == "\n" + report.fusion_weight_table()


def test_ledger_table_is_the_generated_one():
    assert between(SPEED, report.LEDGER_START, report.LEDGER_END) == "\n" + report.ledger_table()


def test_kernel_table_is_the_generated_one():
    assert between(DEVELOPMENT, report.KERNELS_START, report.KERNELS_END) == "\n" + report.kernel_table()


def test_readme_first_screen_shows_install_run_and_results():
    """What it is, the install and the headline results come first, within 250 lines; every local
    link resolves."""
    import re

    head = README[: README.index("## Results")]
    assert "pip install torch==2.13.0" in head and head.count("\n## ") == 1  # the install, then the results
    assert README.index("## Results") < README.index("## Train") < README.index("## Speed")
    assert len(README.splitlines()) <= 250
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
    # the model's size, crops and loss weights too, where they depart from today's defaults
    assert not any(word in text for word in ("width", "embedding", "crops", "weight"))
    resized = {**plain, "width": 8, "embed_dim": 64, "train_seconds": 2.0, "lambda_center": 0.01, "lambda_recon": 0.0}
    text = report._setting_text({"kind": "fastser", "settings": resized})
    assert "width 8" in text and "embedding 64" in text and "2 s training crops" in text
    assert "center loss weight 0.01" in text and "reconstruction weight 0" in text


def test_training_step_flops_count_what_training_computes():
    """The meta-device count equals the count of a real CPU step of the same model, and it follows
    the settings: linear in the batch, about quadratic in the width, less without the decoder."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from instruments.flops import forward_flops_by_layer, training_step_flops
    from fastser.features.featureset import FeatureSet
    from fastser.models import SERModel

    small = {"features": "both", "prosody": True, "pooling": "time", "downsample": "pool", "width": 4}
    small.update(batch_size=2, train_seconds=0.5)
    torch.manual_seed(0)
    bins = FeatureSet.paper(["logmel", "mfcc", "prosody"]).n_bins
    model = SERModel(bins, 8, width=4, pooling="time", downsample="pool")
    feats = {k: torch.randn(2, b, 50) for k, b in bins.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        r = model(feats, torch.full((2,), 50))
        loss = F.cross_entropy(r.logits, torch.zeros(2, dtype=torch.long))
        (loss + sum(F.mse_loss(v, feats[k]) for k, v in r.reconstruction.items())).backward()
    assert training_step_flops(small) == counter.get_total_flops() > 0

    default = training_step_flops({})
    assert training_step_flops({"batch_size": 32}) == 2 * default
    assert 3.0 < default / training_step_flops({"width": 8}) < 4.0  # the convolutions' channels both halve
    assert training_step_flops({"lambda_recon": 0.0}) < default
    assert 1.95 < default / training_step_flops({"hop_ms": 20}) < 2.05  # half the frames, floored at each pooling
    # by layer: each stage once, the forward's total; early downsampling runs every encoder conv at about
    # a quarter of the positions and leaves the decoders as they are
    model = {"features": "both", "prosody": True, "pooling": "time"}  # unrecorded settings read as the oldest
    pool, early = (forward_flops_by_layer({**model, "downsample": d}) for d in ("pool", "early"))
    assert sorted(pool) == sorted(early) and len(pool) == 11  # 2 x (stem, 2 blocks, decoder), prosody, 2 heads
    with FlopCounterMode(display=False) as forward:
        SERModel(bins, 8, downsample="pool").to("meta")(
            {k: torch.empty(16, b, 300, device="meta") for k, b in bins.items()}, torch.full((16,), 300, device="meta")
        )
    assert sum(pool.values()) == forward.get_total_flops()
    for name in pool:
        if name.startswith("encoders.") and name != "encoders.prosody":
            assert 0.24 < early[name] / pool[name] <= 0.25, name  # a quarter, less an odd size's floored row
        else:
            assert early[name] == pool[name], name
    ratio = training_step_flops({**model, "downsample": "pool"}) / training_step_flops({**model, "downsample": "early"})
    assert 2.5 < ratio < 3.0


def test_the_case_names_the_readme_shows_select_benchmarks():
    """`pytest benchmarks -k "center_loss and B256_C4_D256"` picks the cases the README and
    docs/speed.md name."""
    import re
    import subprocess
    import sys

    names = sorted(set(re.findall(r"\b(B\d+_C\d+_D\d+)\b", README + SPEED)))
    assert names
    for name in names:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "benchmarks/test_center_loss.py", "--collect-only", "-q"]
            + ["-k", f"center_loss and {name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout[-1000:]
        selected = [line for line in proc.stdout.splitlines() if "::" in line]
        assert selected and all(f"-{name}-" in line for line in selected), name


def test_benchmark_results_go_outside_the_committed_tree_unless_asked(monkeypatch):
    import importlib

    from benchmarks import _harness

    monkeypatch.delenv("FASTSER_BENCH_RESULTS_DIR", raising=False)
    assert importlib.reload(_harness).RESULTS_DIR == ROOT / "runs" / "benchmarks"
    monkeypatch.setenv("FASTSER_BENCH_RESULTS_DIR", "benchmarks/results")
    assert importlib.reload(_harness).RESULTS_DIR == Path("benchmarks/results")
    monkeypatch.delenv("FASTSER_BENCH_RESULTS_DIR")
    importlib.reload(_harness)
