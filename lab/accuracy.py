"""Keep a speaker-independent accuracy result for the README's accuracy table.

    python -m lab.accuracy --name "speaker norm + prosody" runs/loso/seed-0 runs/loso/seed-1 ...
    python -m lab.accuracy --name "speaker norm + prosody" runs/loso        # a --seeds run folder
    python -m lab.accuracy --baseline runs/baseline-ravdess                 # fastser.baseline output
    python -m lab.accuracy --name "..." --max-folds 3 RUNS ...              # the first 3 folds only
    python -m lab.accuracy --name "..." --weights trained RUNS ...          # an --ema run's trained weights
    python -m lab.accuracy --add-to benchmarks/results/accuracy/ROW.json runs/loso/seed-2  # a later seed
    python -m lab.accuracy --compare CHANGED.json BASE.json                  # paired, fold by fold

Writes benchmarks/results/accuracy/<corpus>-<split>-<slug>.json: per seed WA/UA/macro-F1 and
run time, mean and std over seeds, the settings that differ between rows, the machine and the
date — small files (no per-utterance predictions) that `python -m lab.report --write`
turns into the table. Seeds run as separate processes (one per core) are collected the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
from pathlib import Path

import numpy as np
from scipy.stats import ttest_rel

from fastser.config import BEFORE_RECORDED
from fastser.training.scoring import FALLBACKS
from fastser.training.reports import run_cost, seed_ensemble

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "accuracy"
SETTINGS = (
    "features",
    "prosody",
    "bin_stats",
    "pooling",
    "downsample",
    "hop_ms",
    "normalize",
    "validation",
    "epochs",
    "patience",
    "batch_size",
    "lr",
    "width",
    "embed_dim",
    "lambda_center",
    "lambda_recon",
    "specaugment",
    "tempo",
    "speed_perturb",
    "train_seconds",
    "ema",
    "mixup",
    "noise",
    "enrollment_dropout",
)


def machine_name() -> str:
    """The processor's name and core count, as results record the machine."""
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model or 'CPU'}, {os.cpu_count()} cores"


def _seed_dirs(paths: list) -> list:
    dirs = []
    for p in map(Path, paths):
        subs = sorted(p.glob("seed-*"))
        dirs += subs if subs else [p]
    return dirs


def _first_folds(d: Path, n: int) -> dict:
    """Pooled metrics of a run's first n folds, from the per-utterance predictions in its checkpoint
    (to compare a run with a shorter one on the same folds)."""
    import torch
    from fastser.metrics import summarize
    from fastser.training.reports import other_scores

    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    folds = sorted(ckpt["fold_results"], key=lambda r: r["fold"])[:n]
    if len(folds) < n:
        raise SystemExit(f"{d}: only {len(folds)} folds finished, asked for {n}")
    y_true = np.concatenate([r["y_true"] for r in folds])
    m = summarize(y_true, np.concatenate([r["y_pred"] for r in folds]), ckpt["classes"])
    out = {
        "wa": m["wa"],
        "ua": m["ua"],
        "macro_f1": m["macro_f1"],
        "n_test": m["n"],
        "folds": [r["name"] for r in folds],
        "fold_ua": [r["ua"] for r in folds],
        "seconds": None,  # the run's time covers all its folds
        **other_scores(folds, ckpt["classes"]),
    }
    return out


def _fold_results(d: Path, max_folds=None) -> list:
    import torch

    results = sorted(torch.load(d / "checkpoint.pt", weights_only=True)["fold_results"], key=lambda r: r["fold"])
    return results[:max_folds] if max_folds is not None else results


def collect_runs(paths: list, name: str, max_folds=None, weights=None) -> dict:
    seeds, config = {}, None
    for d in _seed_dirs(paths):
        if max_folds is not None and not (d / "metrics.json").exists():
            # a run stopped early: its finished folds and its settings are in the checkpoint
            import torch

            m, c = _first_folds(d, max_folds), torch.load(d / "checkpoint.pt", weights_only=True)["config"]
        else:
            m = json.loads((d / "metrics.json").read_text())
            m["seconds"] = run_cost(m)
            m["fold_ua"] = [f["ua"] for f in m["folds"]]  # per test speaker, to pair rows fold by fold
            m["folds"] = [f["name"] for f in m["folds"]]
            if max_folds is not None:
                m = {**m, **_first_folds(d, max_folds)}
            c = json.loads((d / "config.json").read_text())
        # a checkpoint's tuples read as JSON's lists
        c = {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}
        c = {**BEFORE_RECORDED, **c}  # a run made before a setting was recorded
        config = config or c
        differing = [k for k in SETTINGS if c.get(k) != config.get(k)]
        if differing or c["corpus"] != config["corpus"] or c["split"] != config["split"]:
            raise SystemExit(
                f"{d}: not the same experiment as the first folder (differs in {differing or 'corpus/split'})"
            )
        if weights is not None:  # another set of weights of the same run (--ema: "trained", "ema_<d>")
            if weights not in m.get("weights", {}):
                raise SystemExit(
                    f"{d}: no finished scores of weights {weights!r} (have {sorted(m.get('weights', {}))})"
                )
            # (pooled scores only: the per-fold figures and the fallbacks are the kept model's)
            m = {**{k: v for k, v in m.items() if not k.endswith("_norm") and k != "fold_ua"}, **m["weights"][weights]}
        seeds[str(c["seed"])] = {k: m[k] for k in ("wa", "ua", "macro_f1", "seconds", "n_test", "folds")}
        if "fold_ua" in m:
            seeds[str(c["seed"])]["fold_ua"] = m["fold_ua"]
        for level in FALLBACKS:
            if f"{level}_norm" in m:
                seeds[str(c["seed"])][f"{level}_norm"] = m[f"{level}_norm"]
    if not seeds:
        raise SystemExit("no run folders given")
    out = {
        "name": name,
        "kind": "fastser",
        "corpus": config["corpus"],
        "split": config["split"],
        "folds": len(next(iter(seeds.values()))["folds"]),
        "settings": {k: config.get(k) for k in SETTINGS},
        "weights": weights,
        "seeds": seeds,
    }
    if weights is None and len(seeds) > 1:  # the seeds' models averaged, from their stored probabilities
        ensemble = seed_ensemble([_fold_results(d, max_folds) for d in _seed_dirs(paths)], config["classes_list"])
        if ensemble:
            out["seed_ensemble"] = ensemble
    return _summarise(out)


def _summarise(out: dict) -> dict:
    """The row's means and stds, derived from its seeds (out["seeds"]) whether or not it had them before."""
    seeds = out["seeds"]
    for key in ("wa", "ua", "macro_f1"):
        v = np.array([s[key] for s in seeds.values()])
        out[f"{key}_mean"], out[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    for level in FALLBACKS:  # only when every seed has it: a mean over fewer seeds would mislead
        out.pop(f"{level}_norm_ua_mean", None), out.pop(f"{level}_norm_ua_std", None)
        alone = [s[f"{level}_norm"]["ua"] for s in seeds.values() if f"{level}_norm" in s]
        if alone and len(alone) == len(seeds):
            out[f"{level}_norm_ua_mean"] = float(np.mean(alone))
            out[f"{level}_norm_ua_std"] = float(np.std(alone, ddof=1)) if len(alone) > 1 else 0.0
    times = [s["seconds"] for s in seeds.values() if s["seconds"] is not None]
    out["seconds_per_seed"] = float(np.mean(times)) if times else None
    return out


def add_seeds(path, run_paths: list, max_folds=None) -> dict:
    """A kept row with seeds run later added (another session, another machine): the same
    experiment (corpus, split, settings, test folds) is required, a seed already in the row is refused,
    and the means and stds are recomputed over all seeds. The seeds' soft vote cannot be extended (the
    row keeps no probabilities), so an existing one stays what it was and says which seeds it averaged."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such results row (the rows are in {OUT})")
    row = json.loads(Path(path).read_text())
    new = collect_runs(run_paths, row["name"], max_folds, row.get("weights"))
    # a setting the row does not record was added to SETTINGS later, when the row's runs had it off
    differing = [
        k
        for k in SETTINGS
        if new["settings"].get(k) != row["settings"].get(k) and (k in row["settings"] or new["settings"].get(k))
    ]
    if differing or (new["corpus"], new["split"]) != (row["corpus"], row["split"]):
        raise SystemExit(f"{path}: the runs are not the same experiment (differ in {differing or 'corpus/split'})")
    folds = next(iter(row["seeds"].values()))["folds"]
    for seed, s in new["seeds"].items():
        if seed in row["seeds"]:
            raise SystemExit(f"{path}: already has seed {seed}")
        if s["folds"] != folds:
            raise SystemExit(
                f"{path}: seed {seed} was tested on other folds ({len(s['folds'])} instead of {len(folds)})"
            )
    if "seed_ensemble" in row:
        row["seed_ensemble"].setdefault("seeds", sorted(row["seeds"]))
    row["seeds"] = {**row["seeds"], **new["seeds"]}
    if row.get("machine") not in (None, machine_name()):
        row["machine"] = f"{row['machine']}; {machine_name()}"
    return _summarise(row)


def collect_baseline(path: str) -> list:
    m = json.loads((Path(path) / "metrics.json").read_text())
    rows = []
    for name, r in m["baselines"].items():
        rows.append(
            {
                "name": name,
                "kind": "baseline",
                "corpus": r["corpus"],
                "split": r["split"],
                "settings": {"features": r["features"], "svm": r["svm"], "speaker_norm": r["speaker_norm"]},
                "seeds": {"-": {k: r[k] for k in ("wa", "ua", "macro_f1", "n_test")}},
                "folds": len(r["folds"]),
                "wa_mean": r["wa"],
                "ua_mean": r["ua"],
                "macro_f1_mean": r["macro_f1"],
                "wa_std": 0.0,
                "ua_std": 0.0,
                "macro_f1_std": 0.0,  # deterministic: no seed
                "seconds_per_seed": m["seconds"],
            }
        )
    return rows


def write(row: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    row = {"machine": machine_name(), **row, "date": dt.datetime.now().isoformat(timespec="seconds")}
    slug = re.sub(r"[^a-z0-9]+", "-", row["name"].lower()).strip("-")
    path = OUT / f"{row['corpus']}-{row['split']}-{slug}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    return path


def compare(changed: dict, base: dict) -> dict:
    """Two kept rows paired on what they share: the same seed tested on the same speakers (fold
    names). -> the pairs' mean fold UA in each row, the mean difference (changed - base), and how
    many pairs the change made better / worse / left equal, and the paired t-test's two-sided p: on a
    few hundred utterances a paired count says more than two pooled means whose seeds spread by
    several points."""
    pairs = []
    for seed, s in changed["seeds"].items():
        other = base["seeds"].get(seed)
        if other is None or "fold_ua" not in s or "fold_ua" not in other:
            continue
        base_ua = dict(zip(other["folds"], other["fold_ua"]))
        pairs += [(ua, base_ua[fold]) for fold, ua in zip(s["folds"], s["fold_ua"]) if fold in base_ua]
    if not pairs:
        raise SystemExit(f"{changed['name']!r} and {base['name']!r} share no seed tested on the same speakers")
    a, b = np.array(pairs).T * 100
    p = float(ttest_rel(a, b).pvalue) if len(pairs) > 1 and np.any(a != b) else None
    return {
        "pairs": len(pairs),
        "changed_fold_ua": float(a.mean()),
        "base_fold_ua": float(b.mean()),
        "difference": float((a - b).mean()),
        "better": int((a > b).sum()),
        "worse": int((a < b).sum()),
        "equal": int((a == b).sum()),
        "p_paired_t": p,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders (one per seed, or one --seeds folder)")
    ap.add_argument("--name", help="the row's name in the table")
    ap.add_argument("--baseline", action="store_true", help="the paths are fastser.baseline output folders")
    ap.add_argument("--max-folds", type=int, default=None, help="only the first N folds of each run")
    ap.add_argument("--weights", default=None, help="score another set of weights of --ema runs: trained, ema_<decay>")
    ap.add_argument(
        "--add-to", metavar="JSON", help="add the runs' seeds to this kept row (seeds run in another session)"
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="the two paths are kept rows (changed, base): print them paired fold by fold",
    )
    args = ap.parse_args(argv)
    if args.compare:
        if len(args.paths) != 2:
            ap.error("--compare takes two rows: CHANGED.json BASE.json")
        changed, base = (json.loads(Path(p).read_text()) for p in args.paths)
        c = compare(changed, base)
        print(
            f"{c['pairs']} seed-fold pairs: mean fold UA {c['changed_fold_ua']:.1f} against {c['base_fold_ua']:.1f} "
            f"({c['difference']:+.1f}); {c['better']} better, {c['worse']} worse, {c['equal']} equal"
            + ("" if c["p_paired_t"] is None else f"; paired t-test p = {c['p_paired_t']:.2f}")
        )
        return
    if args.add_to:
        rows = [add_seeds(args.add_to, args.paths, args.max_folds)]
    elif args.baseline:
        rows = [r for p in args.paths for r in collect_baseline(p)]
    else:
        rows = [collect_runs(args.paths, args.name, args.max_folds, args.weights)]
    for row in rows:
        print(write(row))


if __name__ == "__main__":
    main()
