"""The fusion weight chosen per fold on its validation speakers, judged on the test speakers.

    python -m lab.fusion_weight lab/plans/PLAN.json ARM [--write]

A fused run averages the model's probabilities with the functionals classifier's at a fixed weight
(fastser.functionals.MODEL_WEIGHT, 0.5). Here each fold chooses its own weight from what training
may see: its validation speakers (never trained on by the model, which only used them to pick its
epoch). On them the fold's model (its kept checkpoint, scored as `fastser.predict` scores, the
model alone) and a functionals classifier fitted on the training speakers only (not the validation
ones) are fused at each weight of GRID; the weight with the best validation UA (ties: the one
nearest 0.5) then fuses the fold's test predictions, where the classifier is the run's own (fitted
on every speaker but the test speaker's). With enrollment each validation speaker is scored with
their own statistics, without it with the training statistics — each level chooses its own weight.
Only units whose run folder (with its checkpoint) is still in the queue's scratch take part.
`--write` keeps the result in benchmarks/results/accuracy/fusion-weight/<plan>-<arm>.json, where
docs/accuracy.md's table of chosen weights is generated from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lab.experiments import ROOT, SCRATCH, Plan, keep_result, load_units, paired_cells, paired_summary
from lab.experiments import kept_results as read_kept
from lab.fusion import STATISTICS, functionals_table, head_probabilities

OUT = ROOT / "benchmarks" / "results" / "accuracy" / "fusion-weight"
GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # never one source alone: one or two speakers choose it
LEVELS = {"enrollment": ("probs_model", 0), "training": ("probs_training_model", 1)}


def choose(model_p: np.ndarray, functionals_p: np.ndarray, y: np.ndarray, classes: list) -> float:
    """The weight of GRID whose fusion has the best UA on (y, the rows' labels); ties: nearest 0.5."""
    from fastser.functionals import fuse
    from fastser.metrics import summarize

    scored = [(summarize(y, fuse(model_p, functionals_p, w).argmax(1), classes)["ua"], -abs(w - 0.5), w) for w in GRID]
    return max(scored)[2]


def validation_probabilities(checkpoint: Path, paths: list, speakers: np.ndarray) -> tuple:
    """The model alone's (N, C) probabilities of the validation clips, with each speaker's own
    statistics (enrolled with all their clips) and with the training statistics."""
    from fastser.predictor import Predictor

    def model_alone():
        predictor = Predictor(checkpoint)
        predictor.heads = []  # the fused run's classifier is not what is being weighed
        return predictor

    plain = model_alone()
    training = np.stack([p.probabilities for p in plain.predict(paths)])
    enrolled = np.empty_like(training)
    for s in np.unique(speakers):
        mine = np.flatnonzero(speakers == s)
        predictor = model_alone()
        predictor.enroll_speaker([paths[i] for i in mine])
        enrolled[mine] = np.stack([p.probabilities for p in predictor.predict([paths[i] for i in mine])])
    return enrolled, training


def judge(plan: Plan, arm: str, scratch: Path = SCRATCH, log=print) -> dict:
    """Every unit of `arm` with a kept checkpoint, at 0.5 and at its chosen weights."""
    from fastser.data import load_corpus
    from fastser.data.splits import make_folds
    from fastser.functionals import FunctionalsHead, fuse, score_speakers
    from fastser.metrics import summarize

    corpus = load_corpus(plan.corpus, plan.data_dir)
    speakers, labels = np.asarray(corpus.speakers), np.asarray(corpus.labels)
    table = functionals_table(plan.corpus, plan.data_dir, "compare")
    units, rows = load_units(plan), []
    for (unit_arm, seed, fold_name), record in sorted(units.items()):
        slug = fold_name.split("=", 1)[-1]
        checkpoint = scratch / plan.corpus / "runs" / arm / f"seed-{seed}" / slug / "checkpoint.pt"
        if unit_arm != arm or not checkpoint.is_file():
            continue
        fold = next(f for f in make_folds(corpus, "loso", seed=seed) if f.name == fold_name)
        val = np.asarray(fold.val)
        fit = ~np.isin(np.arange(len(labels)), np.concatenate([val, fold.test]))
        head = FunctionalsHead.fit(table["x"][fit], speakers[fit], labels[fit], len(record["classes"]), "compare")
        f_val = score_speakers(head, table["x"][val], speakers[val])  # (enrolled, pooled)
        m_val = validation_probabilities(checkpoint, [corpus.utterances[i].path for i in val], speakers[val])
        test_f = head_probabilities(table, record["test_speakers"], "compare")
        pred, y_test = record["predictions"], np.asarray(record["predictions"]["y_true"])
        row = {"seed": seed, "fold": fold_name, "val_speakers": sorted(set(speakers[val].tolist()))}
        for level, (key, i) in LEVELS.items():
            w = choose(m_val[i], f_val[i], labels[val], record["classes"])
            model_p = np.asarray(pred[key])
            functionals_p = np.stack([test_f[i][u] for u in pred["utterances"]])
            for name, weight in (("fixed", 0.5), ("chosen", w)):
                y_pred = fuse(model_p, functionals_p, weight).argmax(1)
                row[f"{level}_{name}"] = summarize(y_test, y_pred, record["classes"])["ua"]
            row[f"{level}_weight"] = w
        log(
            f"seed {seed} {fold_name}: weights {row['enrollment_weight']} / {row['training_weight']}, UA "
            f"{100 * row['enrollment_fixed']:.1f} -> {100 * row['enrollment_chosen']:.1f} (enrollment), "
            f"{100 * row['training_fixed']:.1f} -> {100 * row['training_chosen']:.1f} (training statistics)"
        )
        rows.append(row)
    kept = {"plan": plan.path.stem, "corpus": plan.corpus, "arm": arm, "grid": list(GRID), "units": rows}
    return {**kept, "summary": summary(rows)}


def summary(rows: list) -> dict:
    """Per level: mean UA at 0.5 and at the chosen weight, paired; the mean weight chosen."""
    out = {}
    for level in LEVELS:
        fixed, chosen = [r[f"{level}_fixed"] for r in rows], [r[f"{level}_chosen"] for r in rows]
        out[level] = paired_summary(fixed, chosen, ("ua_fixed", "ua_chosen"))
        out[level]["mean_weight"] = float(np.mean([r[f"{level}_weight"] for r in rows]))
    return out


def table_text(results: list) -> str:
    """A markdown table of kept results: one row per (arm, level)."""
    lines = [
        "| corpus | arm | statistics | units | UA % at 0.5 (units' mean) | UA % chosen | mean weight chosen "
        "| Δ UA per fold | better / worse | p |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        for level, s in r["summary"].items():
            lines.append(
                f"| {r.get('corpus', '')} | {r['arm']} | {STATISTICS[level]} | {s['units']} | "
                f"{100 * s['ua_fixed']:.1f} | {100 * s['ua_chosen']:.1f} | {s['mean_weight']:.2f} | " + paired_cells(s)
            )
    return "\n".join(lines) + "\n"


def kept_results() -> list:
    return read_kept(OUT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.fusion_weight", description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("arm")
    p.add_argument("--write", action="store_true", help="keep the result in benchmarks/results/accuracy/fusion-weight/")
    args = p.parse_args(argv)
    plan = Plan.load(args.plan)
    result = judge(plan, args.arm, log=lambda line: print(line, flush=True))
    for level, s in result["summary"].items():
        print(
            f"{level}: {s['units']} units, UA {100 * s['ua_fixed']:.1f} at 0.5 -> {100 * s['ua_chosen']:.1f} chosen "
            f"(mean weight {s['mean_weight']:.2f}), {100 * s['delta_per_fold']:+.1f} per fold, "
            f"{s['better']} better / {s['worse']} worse, p {s['p']:.3f}"
        )
    if args.write:
        path = keep_result(OUT, f"{result['plan']}-{args.arm}", result)
        print(f"-> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
