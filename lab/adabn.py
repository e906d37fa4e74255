"""Test-time adaptation of the encoders' batch norms to the enrolled speaker, judged on kept units.

    python -m lab.adabn lab/plans/PLAN.json ARM [--write]

The enrollment audio (unlabelled clips of the speaker to be scored) already gives the model its
input statistics. `predict --enroll ... --adapt-batchnorms` also re-estimates the running
statistics of every batch norm in the encoders on it (fastser.predictor.adapt_batchnorms_to: AdaBN,
Li et al. 2016, the layers' means and variances on the new speaker, no labels, no gradient).
Each unit whose run folder (with its checkpoint) the queue still keeps is scored as
`predict --enroll` scores (the model alone, enrolled with all of the test speaker's clips, as the
units' "with enrollment" figures are), without and with the adaptation, and both fused with the
unit's functionals classifier at the run's fixed weight. `--write` keeps the result in
benchmarks/results/accuracy/adabn/<plan>-<arm>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lab.experiments import ROOT, SCRATCH, Plan, keep_result, load_units, paired_cells, paired_summary
from lab.experiments import kept_results as read_kept

OUT = ROOT / "benchmarks" / "results" / "accuracy" / "adabn"
KEYS = ("model", "model_adapted", "fused", "fused_adapted")


def unit_scores(checkpoint: Path, paths: list) -> tuple:
    """(the model alone's (N, C) probabilities enrolled with `paths`, the same after adapting)."""
    from fastser.predictor import Predictor

    predictor = Predictor(checkpoint)
    predictor.heads = []  # the model alone
    predictor.enroll_speaker(paths)
    plain = np.stack([p.probabilities for p in predictor.predict(paths)])
    predictor.enroll_speaker(paths, adapt_batchnorms=True)  # fastser.predictor.adapt_batchnorms_to
    adapted = np.stack([p.probabilities for p in predictor.predict(paths)])
    return plain, adapted


def judge(plan: Plan, arm: str, runs: Path = None, log=print) -> dict:
    """Every unit of `arm` whose run folder is in `runs` (default: the queue's scratch for the
    plan's corpus), scored without and with the adaptation."""
    from fastser.data import load_corpus
    from fastser.functionals import fuse
    from fastser.metrics import summarize

    corpus = load_corpus(plan.corpus, plan.data_dir)
    path_of = {u.uid: u.path for u in corpus.utterances}
    rows = []
    for (unit_arm, seed, fold_name), record in sorted(load_units(plan).items()):
        folder = (runs or SCRATCH / plan.corpus / "runs") / arm / f"seed-{seed}" / fold_name.split("=", 1)[-1]
        checkpoint = folder / "checkpoint.pt"
        if unit_arm != arm or not checkpoint.is_file():
            continue
        pred = record["predictions"]
        plain, adapted = unit_scores(checkpoint, [path_of[u] for u in pred["utterances"]])
        functionals = np.asarray(pred["probs_functionals"])
        y = np.asarray(pred["y_true"])
        probs = {"model": plain, "model_adapted": adapted}
        probs.update(fused=fuse(plain, functionals), fused_adapted=fuse(adapted, functionals))
        row = {"seed": seed, "fold": fold_name}
        row.update({k: summarize(y, p.argmax(1), record["classes"])["ua"] for k, p in probs.items()})
        # the unit's own model-alone figure (training-time scoring), beside predict's above
        row["unit_model"] = summarize(y, np.asarray(pred["y_pred_model"]), record["classes"])["ua"]
        log(
            f"seed {seed} {fold_name}: model alone {100 * row['model']:.1f} (unit {100 * row['unit_model']:.1f}) -> "
            f"{100 * row['model_adapted']:.1f}, "
            f"fused {100 * row['fused']:.1f} -> {100 * row['fused_adapted']:.1f}"
        )
        rows.append(row)
    return {"plan": plan.path.stem, "corpus": plan.corpus, "arm": arm, "units": rows, "summary": summary(rows)}


def summary(rows: list) -> dict:
    """Per figure (the model alone, fused): mean UA without and with the adaptation, paired."""
    names = ("ua", "ua_adapted")
    return {
        f: paired_summary([r[f] for r in rows], [r[f"{f}_adapted"] for r in rows], names) for f in ("model", "fused")
    }


def table_text(results: list) -> str:
    """A markdown table of kept results: one row per (arm, figure)."""
    lines = [
        "| corpus | arm | figure | units | UA % enrolled (units' mean) | UA % enrolled + batch norms adapted "
        "| Δ UA per fold | better / worse | p |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    names = {"model": "the model alone", "fused": "fused"}
    for r in results:
        for figure, s in r["summary"].items():
            lines.append(
                f"| {r['corpus']} | {r['arm']} | {names[figure]} | {s['units']} | {100 * s['ua']:.1f} | "
                f"{100 * s['ua_adapted']:.1f} | " + paired_cells(s)
            )
    return "\n".join(lines) + "\n"


def kept_results() -> list:
    return read_kept(OUT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.adabn", description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("arm")
    p.add_argument("--write", action="store_true", help="keep the result in benchmarks/results/accuracy/adabn/")
    p.add_argument("--runs-dir", type=Path, help="where the units' run folders are (default: the queue's scratch)")
    args = p.parse_args(argv)
    result = judge(Plan.load(args.plan), args.arm, args.runs_dir, log=lambda line: print(line, flush=True))
    for figure, s in result["summary"].items():
        print(
            f"{figure}: {s['units']} units, UA {100 * s['ua']:.1f} -> {100 * s['ua_adapted']:.1f}, "
            f"{100 * s['delta_per_fold']:+.1f} per fold, {s['better']} better / {s['worse']} worse, p {s['p']:.3f}"
        )
    if args.write:
        path = keep_result(OUT, f"{result['plan']}-{args.arm}", result)
        print(f"-> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
