"""What a finished experiment writes: metrics.json, history.jsonl, config.json, predictions.csv,
MODEL.md (the model card), the confusion matrix and embedding plots, and the ablation table; the
ensemble of several seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from fastser import __version__
from fastser.metrics import summarize
from fastser.ops import backends_in_use
from fastser.training.console import result
from fastser.training.experiment import Experiment
from fastser.training.scoring import ENROLLMENT_CLIPS, FALLBACKS


def metrics_of(run: Experiment, seconds: float) -> dict:
    """Test predictions of every fold pooled into WA, UA, macro-F1, per-class recall and the confusion."""
    a = run.config
    y_true = np.concatenate([r["y_true"] for r in run.fold_results])
    y_pred = np.concatenate([r["y_pred"] for r in run.fold_results])
    m = summarize(y_true, y_pred, run.classes)
    corpus = run.table.corpus
    extra = other_scores(run.fold_results, run.classes)
    return {
        "corpus": a.data.corpus,
        "split": run.split,
        "features": a.model.features,
        "kinds": run.spec.features.kinds,
        "classes": run.classes,
        "lambda_center": run.lambda_center,
        "lambda_recon": run.lambda_recon,
        "center_alpha": a.objective.center_alpha,
        "n_test": m["n"],
        "wa": m["wa"],
        "ua": m["ua"],
        "macro_f1": m["macro_f1"],
        "per_class_recall": m["per_class_recall"],
        "confusion": m["confusion"],
        "folds": [
            {
                k: r[k]
                for k in (
                    "name",
                    "n_test",
                    "wa",
                    "ua",
                    "macro_f1",
                    "best_epoch",
                    "val_ua",
                    "val_speaker_disjoint",
                    "test_speakers",
                )
            }
            for r in run.fold_results
        ],
        "n_utterances": len(corpus.utterances),
        "n_speakers": len(set(corpus.speakers.tolist())),
        "skipped": {"count": len(corpus.skipped), "files": [{"path": p, "reason": r} for p, r in corpus.skipped]},
        "world_size": run.info.world_size,
        "ddp": run.info.enabled,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        # seconds: this process's wall time (after a --resume, only what it trained); epoch_seconds: every
        # epoch's training and validation, the sessions before a resume included (the run's cost)
        "seconds": seconds,
        "resumed": run.resumed,
        "epoch_seconds": float(sum(h["seconds"] for h in run.history)),
        "backends": backends_in_use(run.device),
        "fastser_version": __version__,
        "normalize": run.normalize,
        **extra,
    }


def run_cost(metrics: dict) -> float:
    """A run's cost in seconds: its wall time, or for a resumed run (whose wall time is only its last
    session's) every epoch's time over all its sessions."""
    return metrics["epoch_seconds"] if metrics.get("resumed") else metrics["seconds"]


def other_scores(fold_results: list, classes: list) -> dict:
    """The same test utterances scored otherwise, pooled over folds when every fold has them:
    "<level>_norm" (a speaker-normalised model with another level's input statistics, as predict
    without enrollment audio), "weights" (--ema: the trained weights and the other averages) and,
    with --functionals, "model" and "training_norm_model" (the model alone, unfused)."""
    if not fold_results:
        return {}
    y_true = np.concatenate([r["y_true"] for r in fold_results])

    def pooled(preds: list) -> dict:
        m = summarize(y_true, np.concatenate(preds), classes)
        return {k: m[k] for k in ("wa", "ua", "macro_f1")}

    out = {}
    for level in FALLBACKS:
        if all(f"y_pred_{level}_norm" in r for r in fold_results):
            out[f"{level}_norm"] = pooled([r[f"y_pred_{level}_norm"] for r in fold_results])
    for key, preds in (("model", "y_pred_model"), ("training_norm_model", "y_pred_training_norm_model")):
        if all(preds in r for r in fold_results):
            out[key] = pooled([r[preds] for r in fold_results])
    if all("y_pred_weights" in r for r in fold_results):
        out["weights"] = {
            name: pooled([r["y_pred_weights"][name] for r in fold_results])
            for name in fold_results[0]["y_pred_weights"]
        }
    return out


def write_metrics(folder: Path, metrics: dict) -> None:
    """A run folder's metrics.json (written once per folder, by fastser.training.run)."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def write_reports(run: Experiment, metrics: dict) -> None:
    """Rank 0 only: the run folder's artifacts besides metrics.json."""
    if not run.info.is_main:
        return
    from fastser.plots import plot_confusion, plot_embeddings

    out = run.out
    with open(out / "history.jsonl", "w") as f:
        for row in run.history:
            f.write(json.dumps(row) + "\n")
    (out / "config.json").write_text(json.dumps(run.checkpoint_config(), indent=2, default=str) + "\n")
    write_predictions(out / "predictions.csv", run.fold_results, run.table.corpus, run.classes)
    (out / "MODEL.md").write_text(model_card(run, metrics))
    plot_confusion(
        np.array(metrics["confusion"]),
        run.classes,
        out / "confusion.png",
        f"{run.config.data.corpus} {run.split}: WA {metrics['wa']:.1%}  UA {metrics['ua']:.1%}",
    )
    last = run.last_fold_embeddings()
    if last is not None and last["embeddings"] is not None and len(last["embeddings"]) > 2:
        plot_embeddings(
            last["embeddings"],
            last["labels"],
            last["centers"],
            run.classes,
            out / "embeddings.png",
            f"test embeddings, {run.fold_results[-1]['name']}",
        )


NORMALIZE_NEEDS = {
    "speaker": "each speaker's own feature statistics: give predict unlabelled audio of the speaker (`--enroll`, "
    "or `Predictor(..., enroll=[...])`); without it the training speakers' statistics stand in, at the "
    "cost shown above",
    "corpus": "the training fold's statistics, saved with the model: nothing to give",
    "utterance": "each clip's own statistics: nothing to give",
}


def model_card(run: Experiment, metrics: dict) -> str:
    """MODEL.md: what the run's model is, what it was trained and measured on, what it expects at
    prediction time, and what it has never seen."""
    corpus, a = run.table.corpus, run.config
    pct = lambda m: f"UA {100 * m['ua']:.1f}%, WA {100 * m['wa']:.1f}%, macro-F1 {100 * m['macro_f1']:.1f}%"  # noqa: E731
    speakers = sorted(set(corpus.speakers.tolist()))
    lines = [
        f"# Model card: {run.out.name}",
        "",
        f"fastser {__version__}: the CNN + center loss + reconstruction model of Tripathi et al. (2020), "
        f"inputs {' + '.join(run.spec.features.kinds)} at {run.spec.features.sr} Hz"
        + (
            f" and openSMILE {a.model.functionals_input} functionals (a branch of the network)."
            if a.model.functionals_input
            else "."
        )
        + (
            f" Its probabilities are averaged with those of a logistic regression over openSMILE "
            f"{a.model.functionals_late} functionals (fastser.functionals); the figures below are the average's."
            if a.model.functionals_late
            else ""
        ),
        "",
        "## Trained on",
        "",
        f"- corpus `{a.data.corpus}`: {len(corpus.utterances)} utterances, {len(speakers)} speakers; classes "
        + ", ".join(f"{c} ({n})" for c, n in zip(run.classes, np.bincount(corpus.labels, minlength=len(run.classes)))),
        f"- protocol: split `{run.split}`, {len(run.fold_results)} speaker-independent fold"
        f"{'s' if len(run.fold_results) != 1 else ''} (no test speaker is ever trained on); the model saved "
        f"is the last fold's ({run.fold_results[-1]['name'] if run.fold_results else '-'})",
        f"- {a.optim.epochs} epoch{'s' if a.optim.epochs != 1 else ''}, batch {a.optim.batch_size}, "
        f"lr {a.optim.lr:g}, seed {a.optim.seed}, "
        f"center loss weight {run.lambda_center:g}, reconstruction weight {run.lambda_recon:g}",
        "",
        "## Measured (test speakers, pooled over the folds)",
        "",
        f"- with the speaker's statistics (enrollment audio): {pct(metrics)} on {metrics['n_test']} utterances"
        if run.normalize == "speaker"
        else f"- {pct(metrics)} on {metrics['n_test']} utterances",
    ]
    if "training_norm" in metrics:
        lines.append(f"- without enrollment audio (the training speakers' statistics): {pct(metrics['training_norm'])}")
    if "model" in metrics:
        lines.append(f"- the model alone, with the speaker's statistics: {pct(metrics['model'])}")
    if "training_norm_model" in metrics:
        lines.append(f"- the model alone, without enrollment audio: {pct(metrics['training_norm_model'])}")
    alone = " (the model alone)" if a.model.functionals_late else ""  # only these two levels are fused
    if "utterance_norm" in metrics:
        lines.append(f"- with each clip's own statistics{alone}: {pct(metrics['utterance_norm'])}")
    for k in ENROLLMENT_CLIPS:
        if f"enroll{k}_norm" in metrics:
            lines.append(
                f"- with {k} random other clip{'s' if k > 1 else ''} of the speaker as enrollment{alone}: "
                f"{pct(metrics[f'enroll{k}_norm'])}"
            )
    lines.append(
        f"- chance: UA {100 / len(run.classes):.1f}%"
        + (
            ""
            if a.data.corpus == "synthetic"
            else f"; the classic baseline on the same folds: `python -m fastser.baseline --corpus {a.data.corpus} "
            f"--data-dir ... --split {run.split}` (openSMILE functionals + SVM)"
        )
    )
    lines += [
        "",
        "## At prediction time",
        "",
        f"- input statistics (`--normalize {run.normalize}`): {NORMALIZE_NEEDS[run.normalize]}",
        f"- mono audio, resampled to {run.spec.features.sr} Hz; clips up to {run.spec.max_seconds:g} s are "
        f"scored whole, longer ones in {run.spec.train_seconds:g} s windows",
        "",
        "## Never trained on",
        "",
    ]
    if a.data.corpus == "synthetic":
        lines.append(
            "- real speech: the synthetic corpus is generated voiced tones; this model's predictions on "
            "recordings mean nothing"
        )
    else:
        lines.append(
            f"- speech other than {a.data.corpus}'s: other languages, speakers, microphones, rooms, noise and "
            f"spontaneous (not acted) emotion; emotions other than {', '.join(run.classes)}"
        )
    return "\n".join(lines) + "\n"


def write_predictions(path: Path, fold_results: list, corpus, classes: list) -> None:
    """One line per test utterance: its fold, id, speaker, label, prediction and class probabilities."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "uid", "speaker", "label", "predicted", *[f"p_{c}" for c in classes]])
        for r in fold_results:
            for row, y, pred, prob in zip(r["test_rows"], r["y_true"], r["y_pred"], r.get("probs", [])):
                u = corpus.utterances[row]
                w.writerow([r["name"], u.uid, u.speaker, classes[y], classes[pred], *[f"{p:.6f}" for p in prob]])


def seed_ensemble(fold_results_per_seed: list, classes: list) -> dict:
    """The seeds' models averaged at prediction time: each test utterance's class probabilities
    averaged over the seeds (a soft vote), pooled over folds into WA/UA/macro-F1. Empty when the
    seeds did not test the same utterances or stored no probabilities (runs of older versions)."""
    per_seed = []
    for results in fold_results_per_seed:
        if not results or not all("probs" in r for r in results):
            return {}
        rows = np.concatenate([r["test_rows"] for r in results])
        order = np.argsort(rows)
        per_seed.append(
            (
                rows[order],
                np.concatenate([r["y_true"] for r in results])[order],
                np.concatenate([np.asarray(r["probs"]) for r in results])[order],
            )
        )
    rows, y_true, _ = per_seed[0]
    if len(per_seed) < 2 or any(not np.array_equal(r, rows) for r, _, _ in per_seed):
        return {}
    mean_probs = np.mean([p for _, _, p in per_seed], axis=0)
    m = summarize(y_true, mean_probs.argmax(1), classes)
    return {"wa": m["wa"], "ua": m["ua"], "macro_f1": m["macro_f1"], "n_seeds": len(per_seed)}


def write_ablation(out: Path, results: dict, config) -> None:
    rows = {
        name: {k: m[k] for k in ("wa", "ua", "macro_f1", "n_test", "lambda_center", "lambda_recon")}
        for name, m in results.items()
    }
    (out / "ablation.json").write_text(
        json.dumps({"corpus": config.data.corpus, "seed": config.optim.seed, "results": rows}, indent=2) + "\n"
    )
    lines = ["| objective | lambda_center | lambda_recon | WA | UA | macro-F1 |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['lambda_center']} | {r['lambda_recon']} | {r['wa']:.1%} | {r['ua']:.1%} | "
            f"{r['macro_f1']:.1%} |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    result("\n" + "\n".join(lines))
