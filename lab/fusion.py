"""What the classic baseline adds to the model: a queue arm's test probabilities averaged with
those of a linear classifier over openSMILE functionals, fold by fold.

    python -m lab.fusion lab/plans/cheaper-default.json width16-enrollment-dropout-0.5 \
        --features compare [--classifier logistic|svm] [--level enrollment|training] [--weight 0.5] [--write]

For every unit of the arm, the classifier is fitted on the functionals of every speaker but the
unit's test speakers and the test utterances scored with `weight * model + (1 - weight) *
classifier`. `--classifier logistic` (the default) is fastser.functionals' classifier, fitted and
applied by the same functions as `python -m fastser.train --functionals` (so these are the numbers
such a run gives on the arm's folds: its model is the arm's, the classifier is added after
training); `svm` is the baseline's linear SVM with Platt-scaled probabilities. Both standardise
each speaker's functionals with that speaker's statistics (the test speaker's own unlabelled audio,
as the model's input), or with `--level training` the training speakers' (predict without
enrollment; units that keep those probabilities). The table pairs the fused predictions with the
arm's own on the same (seed, test speaker) units. The weight is fixed before looking (0.5, equal);
the other weights it prints are for information, not to be chosen on these test speakers.
`--write` keeps the result in benchmarks/results/accuracy/fusion/, where docs/accuracy.md's fusion
table is generated from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np

from lab.experiments import ROOT, Plan, load_units

OUT = ROOT / "benchmarks" / "results" / "accuracy" / "fusion"
WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
CLASSIFIERS = {"logistic": "fastser's logistic regression", "svm": "linear SVM + Platt"}
STATISTICS = {"enrollment": "speaker's (enrollment)", "training": "training speakers' (no enrollment)"}


def functionals_table(corpus_name: str, data_dir: str, feature_set: str) -> dict:
    """{"x": (N, F) float64, "uids": [N], "speakers": (N,), "labels": (N,)} of a corpus's utterances,
    computed as `python -m fastser.train --functionals` computes them, kept in the same cache."""
    from fastser.config import DataConfig
    from fastser.data import load_corpus
    from fastser.functionals import corpus_functionals

    corpus = load_corpus(corpus_name, data_dir)
    data = DataConfig()
    x = corpus_functionals(corpus, feature_set, data.sample_rate, data.max_seconds, Path(data_dir) / ".fastser-cache")
    uids = [u.uid for u in corpus.utterances]
    return {"x": x, "uids": uids, "speakers": np.asarray(corpus.speakers), "labels": np.asarray(corpus.labels)}


def head_probabilities(table: dict, test_speakers: list, feature_set: str) -> tuple:
    """({uid: probabilities} with each test speaker's statistics, the same with the training
    speakers'): fastser.functionals' classifier, fitted on every other speaker, exactly as a
    `--functionals` run fits and scores it."""
    from fastser.functionals import FunctionalsHead, score_speakers

    test = np.isin(table["speakers"], test_speakers)
    n_classes = int(table["labels"].max()) + 1
    head = FunctionalsHead.fit(
        table["x"][~test], table["speakers"][~test], table["labels"][~test], n_classes, feature_set
    )
    enrolled, unenrolled = score_speakers(head, table["x"][test], table["speakers"][test])
    uids = [table["uids"][r] for r in np.flatnonzero(test)]
    return dict(zip(uids, enrolled)), dict(zip(uids, unenrolled))


def svm_probabilities(table: dict, test_speakers: list, enrollment: bool = True) -> dict:
    """{uid: (classes,) probabilities} of the test speakers' utterances from a linear SVM (the
    baseline's C) fitted on every other speaker's, speaker z-normalised. Without `enrollment` the
    test utterances are standardised with the training rows' pooled statistics instead of their
    speaker's (what predict has without enrollment audio)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from fastser.baseline import SVMS, speaker_znorm

    test = np.isin(table["speakers"], test_speakers)
    x = speaker_znorm(table["x"], table["speakers"])
    if not enrollment:
        raw = table["x"]
        mu, sd = raw[~test].mean(0), raw[~test].std(0)
        x[test] = (raw[test] - mu) / np.where(sd > 1e-12, sd, 1.0)
    svm = SVC(class_weight="balanced", probability=True, random_state=0, **SVMS["linear"])
    model = make_pipeline(StandardScaler(), svm).fit(x[~test], table["labels"][~test])
    probs = np.zeros((int(test.sum()), int(table["labels"].max()) + 1))
    probs[:, model.classes_] = model.predict_proba(x[test])
    return {table["uids"][r]: p for r, p in zip(np.flatnonzero(test), probs)}


def fuse(
    records: list, table: dict, weights=WEIGHTS, level: str = "enrollment", classifier: str = "logistic", feature_set=""
) -> dict:
    """The units' test predictions with the functionals classifier's (`classifier` "logistic" or
    "svm", on `feature_set`) averaged in, at each weight of the model; `level` "training": both
    without enrollment (the model's training-statistics probabilities, the functionals standardised
    with the training rows' statistics).

    Returns:
        {"seeds": {seed: {weight: UA pooled over the seed's units}}, "folds": {weight: [UA of each
        unit, in `records` order]}}; weight 1.0 is the arm alone, 0.0 the classifier alone.
    """
    from fastser.functionals import fuse as fused_probabilities
    from fastser.metrics import summarize

    scored: dict = {}
    pooled: dict = {}
    folds: dict = {w: [] for w in weights}
    for r in records:
        speakers = tuple(r["test_speakers"])
        if speakers not in scored:
            if classifier == "svm":
                scored[speakers] = svm_probabilities(table, list(speakers), enrollment=level == "enrollment")
            else:
                enrolled, unenrolled = head_probabilities(table, list(speakers), feature_set)
                scored[speakers] = enrolled if level == "enrollment" else unenrolled
        pred = r["predictions"]
        model_p = np.asarray(pred["probs"] if level == "enrollment" else pred["probs_training"])
        functionals_p = np.stack([scored[speakers][u] for u in pred["utterances"]])
        y_true = np.asarray(pred["y_true"])
        for w in weights:
            y_pred = fused_probabilities(model_p, functionals_p, w).argmax(1)
            folds[w].append(summarize(y_true, y_pred, r["classes"])["ua"])
            seed = pooled.setdefault(r["seed"], {}).setdefault(w, ([], []))
            seed[0].append(y_true)
            seed[1].append(y_pred)
    classes = records[0]["classes"]
    seeds = {
        s: {w: summarize(np.concatenate(t), np.concatenate(p), classes)["ua"] for w, (t, p) in by_w.items()}
        for s, by_w in pooled.items()
    }
    return {"seeds": seeds, "folds": folds}


def result(
    plan: Plan,
    arm: str,
    feature_set: str,
    weight: float,
    level: str = "enrollment",
    classifier: str = "logistic",
    table: Optional[dict] = None,
) -> dict:
    """The arm's units fused with the functionals' classifier: what --write keeps."""
    from scipy.stats import ttest_rel

    records = [r for (a, _, _), r in sorted(load_units(plan).items(), key=lambda kv: kv[0]) if a == arm]
    if level == "training":  # units made before they kept these probabilities cannot take part
        records = [r for r in records if "probs_training" in r["predictions"]]
    if not records:
        raise SystemExit(f"{plan.path}: arm {arm!r} has no units with {level} probabilities yet")
    table = table or functionals_table(plan.corpus, plan.data_dir, feature_set)
    fused = fuse(records, table, level=level, classifier=classifier, feature_set=feature_set)
    alone, mixed = np.asarray(fused["folds"][1.0]), np.asarray(fused["folds"][weight])
    delta = mixed - alone
    return {
        "plan": plan.path.stem,
        "arm": arm,
        "features": feature_set,
        "classifier": classifier,
        "level": level,
        "weight": weight,
        "units": len(records),
        "seeds": sorted({r["seed"] for r in records}),
        "ua": {str(w): float(np.mean([s[w] for s in fused["seeds"].values()])) for w in WEIGHTS},
        "delta_per_fold": float(delta.mean()),
        "better": int((delta > 0).sum()),
        "worse": int((delta < 0).sum()),
        "p": float(ttest_rel(mixed, alone).pvalue) if len(delta) > 1 and delta.any() else float("nan"),
    }


def table_text(results: list) -> str:
    """A markdown table of kept fusion results."""
    lines = [
        "| arm | functionals | classifier | statistics | units | UA % arm | UA % classifier | UA % fused | weight "
        "| Δ UA per fold | better / worse | p |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        ua, stats = r["ua"], STATISTICS[r.get("level", "enrollment")]
        lines.append(
            f"| {r['arm']} | {r['features']} | {CLASSIFIERS[r.get('classifier', 'svm')]} | {stats} | {r['units']} | "
            f"{100 * ua['1.0']:.1f} | {100 * ua['0.0']:.1f} | "
            f"{100 * ua[str(r['weight'])]:.1f} | {r['weight']} | {100 * r['delta_per_fold']:+.1f} | "
            f"{r['better']} / {r['worse']} | {r['p']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def kept_results() -> list:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.fusion", description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("arm")
    p.add_argument("--features", choices=("egemaps", "compare"), default="compare")
    p.add_argument(
        "--classifier",
        choices=tuple(CLASSIFIERS),
        default="logistic",
        help="fastser.functionals' classifier (what --functionals trains), or the baseline's SVM",
    )
    p.add_argument("--weight", type=float, default=0.5, choices=WEIGHTS, help="the model's share")
    p.add_argument(
        "--level",
        choices=tuple(STATISTICS),
        default="enrollment",
        help="the test speaker's statistics, or the training speakers' (units that keep those probabilities)",
    )
    p.add_argument("--write", action="store_true", help="keep the result under benchmarks/results/accuracy/fusion/")
    args = p.parse_args(argv)
    plan = Plan.load(args.plan)
    if args.arm not in plan.arms:
        raise SystemExit(f"{plan.path}: no arm {args.arm!r} (arms: {', '.join(plan.arms)})")
    r = result(plan, args.arm, args.features, args.weight, args.level, args.classifier)
    print(table_text([r]), end="")
    print("UA % by the model's weight: " + ", ".join(f"{w}: {100 * u:.1f}" for w, u in r["ua"].items()))
    if args.write:
        OUT.mkdir(parents=True, exist_ok=True)
        # (the SVM's results were kept first, without a classifier in their name)
        suffix = ("" if args.classifier == "svm" else f"-{args.classifier}") + (
            "" if args.level == "enrollment" else f"-{args.level}"
        )
        path = OUT / f"{r['plan']}-{r['arm']}-{r['features']}{suffix}.json"
        path.write_text(json.dumps(r, indent=2) + "\n")
        print(f"-> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
