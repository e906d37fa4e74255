"""The experiment queue (lab/experiments.py) on a tiny synthetic corpus."""

import json
import os

import numpy as np
import pytest
import torch

import fastser.train as train
from lab import experiments as ex
from fastser.training import fold as fold_training
from fastser.training import scoring

TINY = [
    "--synthetic-speakers",
    "4",
    "--synthetic-per-class",
    "2",
    "--width",
    "4",
    "--embed-dim",
    "16",
    "--epochs",
    "2",
    "--train-seconds",
    "1.0",
    "--split",
    "loso",
]


def write_plan(tmp_path, arms=None, folds=(1, 2), seeds=(0, 1)):
    plan = {
        "corpus": "synthetic",
        "seeds": list(seeds),
        "folds": list(folds),
        "args": TINY + ["--cache-dir", str(tmp_path / "cache")],
        "arms": arms or {"base": [], "heavy-center": ["--lambda-center", "0.05"]},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return ex.Plan.load(path)


def files(units_dir):
    """Every unit file and any stray one (a temporary left behind), not the split's fold list."""
    return {
        p.relative_to(units_dir): p.read_bytes()
        for p in sorted(units_dir.rglob("*"))
        if p.is_file() and not p.name.endswith("-folds.json")
    }


@pytest.fixture
def queue(tmp_path):
    def run(plan, **kwargs):
        kwargs.setdefault("budget_minutes", 10)
        kwargs.setdefault("first_guess", 0.1)
        return ex.run_queue(plan, threads=1, units_dir=tmp_path / "units", scratch=tmp_path / "scratch", **kwargs)

    return run


def test_units_go_seed_by_seed_and_fold_by_fold_with_every_arm_of_a_fold_together(tmp_path):
    plan = write_plan(tmp_path)
    order = [(u.seed, u.fold_name, u.arm) for u in plan.units(tmp_path / "units")]
    assert order == [
        (0, "test=spk00", "base"),
        (0, "test=spk00", "heavy-center"),
        (0, "test=spk01", "base"),
        (0, "test=spk01", "heavy-center"),
        (1, "test=spk00", "base"),
        (1, "test=spk00", "heavy-center"),
        (1, "test=spk01", "base"),
        (1, "test=spk01", "heavy-center"),
    ]
    assert plan.units(tmp_path / "units")[0].path(tmp_path).relative_to(tmp_path).as_posix() == "base/seed-0/spk00.json"


# the default, and the openSMILE functionals as a branch of the network (one more input column per clip)
@pytest.mark.parametrize(
    "arm", [[], ["--functionals", "egemaps", "--functionals-fusion", "input"]], ids=["default", "input"]
)
def test_a_unit_is_that_fold_of_a_full_run_bit_for_bit(tmp_path, queue, arm):
    if arm:
        pytest.importorskip("opensmile")
    plan = write_plan(tmp_path, arms={"base": arm}, folds=(2,), seeds=(1,))
    [path] = queue(plan)
    unit = json.loads(path.read_text())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        metrics = train.main(plan.flags("base", 1, threads=1) + ["--max-folds", "2", "--out", str(tmp_path / "full")])
    finally:
        torch.set_num_threads(threads)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["fold_results"][1]
    assert metrics["folds"][1]["name"] == unit["fold_name"] == "test=spk01"
    assert unit["predictions"]["y_pred"] == full["y_pred"] and unit["predictions"]["probs"] == full["probs"]
    assert unit["ua"] == full["ua"] and unit["predictions"]["y_pred_training"] == full["y_pred_training_norm"]
    assert unit["threads"] == 1 and unit["seconds"] > 0 and unit["settings"]["lambda_center"] == 0.003
    assert set(unit["fallback_ua"]) == set(scoring.FALLBACKS)
    assert len(unit["predictions"]["utterances"]) == unit["n_test"] == len(unit["predictions"]["y_true"])


def test_an_interrupted_queue_resumes_without_redoing_a_unit(tmp_path, queue, monkeypatch):
    plan = write_plan(tmp_path)
    units_dir = tmp_path / "units"
    first = queue(plan, max_units=3)
    assert len(first) == 3
    before = files(units_dir)
    # the fourth unit is stopped by Ctrl-C after its first epoch: nothing of it is kept
    monkeypatch.setenv("FASTSER_INTERRUPT_AFTER_EPOCHS", "1")
    monkeypatch.setattr(fold_training.maybe_interrupt, "count", 0, raising=False)
    with pytest.raises(KeyboardInterrupt):
        queue(plan)
    assert files(units_dir) == before  # no partial file, no temporary left behind
    assert not any((tmp_path / "units").rglob("*.tmp")) and not any((tmp_path / "scratch").rglob("*.pid"))
    monkeypatch.delenv("FASTSER_INTERRUPT_AFTER_EPOCHS")
    rest = queue(plan)
    assert len(rest) == 5 and not set(rest) & set(first)
    after = files(units_dir)
    assert {k: after[k] for k in before} == before  # the first three untouched
    assert len(after) == 8 and queue(plan) == []  # a third run has nothing to do


def test_a_unit_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "units" / "a" / "seed-0" / "spk00.json"
    ex.write_unit(path, {"ua": 0.5})
    real_dump = json.dump

    def dies_halfway(obj, f, **kwargs):
        f.write('{"ua": 0.')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dies_halfway)
    with pytest.raises(OSError):
        ex.write_unit(path, {"ua": 0.75})
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.loads(path.read_text()) == {"ua": 0.5}  # the old file, whole
    assert os.listdir(path.parent) == ["spk00.json"]


def test_the_queue_starts_no_unit_it_cannot_finish_inside_the_budget(tmp_path, queue):
    plan = write_plan(tmp_path)
    logged = []
    assert queue(plan, budget_minutes=1, first_guess=2, log=logged.append) == []
    assert len(logged) == 8 and all("needs about 2.3 min" in line for line in logged)
    # once an arm has finished units, the estimate is theirs; another arm's is scaled by its FLOPs
    queue(plan, max_units=1)
    own = ex.estimate_seconds(plan, "base", tmp_path / "units")
    assert own == json.loads(next((tmp_path / "units" / "base").rglob("*.json")).read_text())["seconds"]
    wide = write_plan(tmp_path, arms={"base": [], "wide": ["--width", "8"]})
    assert ex.estimate_seconds(wide, "wide", tmp_path / "units") > 2.5 * own


def test_an_arm_whose_flags_change_is_refused_not_mixed(tmp_path, queue):
    queue(write_plan(tmp_path, arms={"base": []}), max_units=1)
    changed = write_plan(tmp_path, arms={"base": ["--embed-dim", "8"]})
    with pytest.raises(ex.PlanError, match=r"differs in \['embed_dim'\].*new name"):
        queue(changed)


def test_a_unit_from_before_a_setting_existed_counts_as_made_the_old_way(tmp_path, queue):
    """A setting added to fastser after a unit was made is absent from its file: the unit was made as
    fastser did before (fastser.config.BEFORE_RECORDED), so it still matches an arm that leaves the
    setting at that value, and is refused by one that changes it."""
    plan = write_plan(tmp_path, arms={"base": ["--downsample", "pool"]})
    queue(plan, max_units=1)
    (path,) = (tmp_path / "units").glob("base/seed-*/*.json")
    record = json.loads(path.read_text())
    del record["settings"]["downsample"]
    path.write_text(json.dumps(record))
    unit = next(u for u in plan.units(tmp_path / "units") if u.path(tmp_path / "units") == path)
    ex.check_settings(plan, unit, ex.read_unit(path))
    changed = write_plan(tmp_path, arms={"base": ["--downsample", "early"]})
    with pytest.raises(ex.PlanError, match=r"differs in \['downsample'\]"):
        ex.check_settings(changed, unit, ex.read_unit(path))


def test_compare_pairs_by_seed_and_test_speaker_and_counts_what_is_missing(tmp_path, queue):
    plan = write_plan(tmp_path)
    queue(plan, max_units=5)  # both arms of seed 0, the base arm alone of seed 1's first fold
    table = ex.compare(plan, units_dir=tmp_path / "units")
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    rows = {cells[0].lstrip("| "): cells for cells in lines}
    assert rows["base"][1:3] == ["3", "1"] and rows["heavy-center"][1:3] == ["2", "2"]
    found = ex.load_units(plan, tmp_path / "units")
    pairs = [("heavy-center", 0, "test=spk00"), ("heavy-center", 0, "test=spk01")]
    delta = np.mean([found[k]["ua"] - found[("base", *k[1:])]["ua"] for k in pairs])
    assert rows["heavy-center"][5] == f"{100 * delta:+.1f}"


def test_plan_mistakes_are_one_line_each(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"corpus": "synthetic", "arms": {"x": ["--width", "many"]}, "args": TINY}))
    assert ex.cli(["status", str(bad)]) == 2
    err = capsys.readouterr().err  # fastser.train's own reason, in the queue's one line
    assert "arm 'x': argument --width: invalid int value: 'many'" in err and err.count("\n") == 1
    bad.write_text(json.dumps({"corpus": "synthetic", "arms": {"x": []}, "folds": [0]}))
    assert ex.cli(["status", str(bad)]) == 2
    assert "fold numbers counted from 1" in capsys.readouterr().err
    bad.write_text(json.dumps({"corpus": "synthetic", "arms": {"x": []}, "args": TINY[:-2]}))
    assert ex.cli(["status", str(bad)]) == 2
    assert "leave-one-speaker-out" in capsys.readouterr().err


def test_two_workers_share_the_units_and_train_each_once(tmp_path):
    import subprocess
    import sys

    plan = write_plan(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lab.experiments", "run", str(plan.path), "--budget-minutes", "5"]
        + ["--workers", "2", "--unit-minutes", "0.1", "--units-dir", str(tmp_path / "units")]
        + ["--scratch-dir", str(tmp_path / "scratch")],
        cwd=ex.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = [line.split(" -> ")[1] for line in proc.stdout.splitlines() if " -> " in line]
    records = [json.loads(p.read_text()) for p in (tmp_path / "units").glob("*/seed-*/*.json")]
    # on a failure, the workers' own output and the unit files found say which unit went missing and why
    assert len(trained) == len(set(trained)) == 8, (len(records), proc.stdout, proc.stderr[-3000:])
    assert len(records) == 8 and {r["threads"] for r in records} == {1}


def test_a_unit_is_claimed_by_one_worker_and_freed_when_its_process_ends(tmp_path):
    """Of workers claiming one unit at the same instant exactly one gets it (repeated, threads with
    a barrier: each claim is its own open file, as in two processes); a held claim is refused, and
    a claim whose process ended without releasing it is free."""
    import subprocess
    import sys
    import threading

    claims = tmp_path / "claims"
    for i in range(60):  # the pid-file claim this replaced gave one unit to two claimants in 8 % of such races
        unit, barrier, got = ex.Unit("arm", 0, i, f"test=s{i}"), threading.Barrier(6), []

        def claim(unit=unit, barrier=barrier, got=got):
            barrier.wait()
            got.append(ex._claim(unit, claims))

        threads = [threading.Thread(target=claim) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = [fd for fd in got if fd is not None]
        assert len(held) == 1, (i, got)
        assert ex._claim(unit, claims) is None
        os.close(held[0])
        again = ex._claim(unit, claims)
        assert again is not None
        os.close(again)
    unit = ex.Unit("arm", 1, 0, "test=dead")
    code = (
        "import os, sys; from pathlib import Path; import lab.experiments as ex; "
        f"fd = ex._claim(ex.Unit('arm', 1, 0, 'test=dead'), Path({str(claims)!r})); "
        "sys.stdout.write(str(fd is not None)); sys.stdout.flush(); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ex.ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout == "True", out.stderr[-2000:]
    fd = ex._claim(unit, claims)  # its process ended holding it
    assert fd is not None
    os.close(fd)


def test_status_and_compare_need_no_corpus_once_the_folds_are_kept(tmp_path, queue, monkeypatch):
    """The split's fold list is kept beside the units, so a clone without the corpus (CI) still
    compares and counts what is missing."""
    import fastser.data

    plan = write_plan(tmp_path)
    queue(plan, max_units=2)

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(fastser.data, "load_corpus", no_corpus)
    table = ex.compare(plan, units_dir=tmp_path / "units")
    assert "| heavy-center | 1 | 3 |" in table
    assert ex.status(plan, tmp_path / "units").startswith("base: 1 of 4 units done")
