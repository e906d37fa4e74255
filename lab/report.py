"""Build the README's and docs/accuracy.md's tables from benchmarks/results/ (never typed by hand).

    python -m lab.report            # print the markdown
    python -m lab.report --write    # replace the tables between their markers (README.md, docs/)

Performance: benchmarks/results/*.json (pytest-benchmark runs, `benchmarks/_harness.py`).
Accuracy: benchmarks/results/accuracy/*.json (`python -m lab.accuracy`), one table per
corpus and split, fastser rows and the openSMILE + SVM baselines on the same folds.
Ledger: benchmarks/results/ledger/*.json (`python -m instruments.ledger --record`), the launches, host
syncs and bytes each case issues on a GPU's code path, counted without one.
Kernels: benchmarks/results/kernels/*.json (the GPU compile gate's `--record`), the registers,
shared memory and occupancy of every compiled Triton specialisation, per kernel.

For each (suite, device) the newest results file is used; every figure in a row comes from that
one run, ratios included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from instruments.flops import DEFAULTS, training_step_flops
from fastser.checkpoints import run_setting
from fastser.training.scoring import FALLBACKS

# the fallbacks' column headings: the statistics a speaker-normalised model is scored with
FALLBACK_TEXT = {
    "utterance": "utterance-level statistics",
    "training": "training-fold statistics",
    "enroll1": "1 enrollment clip",
    "enroll3": "3 enrollment clips",
    "enroll10": "10 enrollment clips",
}

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ACC_START, ACC_END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
HEAD_START, HEAD_END = "<!-- headline:start -->", "<!-- headline:end -->"
KERNELS_START, KERNELS_END = "<!-- kernels:start -->", "<!-- kernels:end -->"
LEDGER_START, LEDGER_END = "<!-- ledger:start -->", "<!-- ledger:end -->"
SUMMARY_START, SUMMARY_END = "<!-- speed-summary:start -->", "<!-- speed-summary:end -->"
QUEUE_START, QUEUE_END = "<!-- queue:start -->", "<!-- queue:end -->"
FUSION_START, FUSION_END = "<!-- fusion:start -->", "<!-- fusion:end -->"
WEIGHT_START, WEIGHT_END = "<!-- fusion-weight:start -->", "<!-- fusion-weight:end -->"
ADABN_START, ADABN_END = "<!-- adabn:start -->", "<!-- adabn:end -->"
PLANS = Path(__file__).resolve().parent / "plans"
ACCURACY_DOC = ROOT / "docs" / "accuracy.md"
SPEED_DOC = ROOT / "docs" / "speed.md"
DEVELOPMENT_DOC = ROOT / "docs" / "development.md"
# the README's results: per corpus and split, the default's row and the strongest classic baselines
HEADLINE = {
    ("ravdess", "loso"): (
        "fastser-default-time-pooling-per-frequency-band-24-epochs-speaker-norm-prosody-no-validation-speakers",
        "compare-linear-svm-speaker-znorm",
        "egemaps-linear-svm-speaker-znorm",
    ),
    ("emovo", "loso"): (
        "compare-linear-svm-speaker-znorm",
        "egemaps-linear-svm-speaker-znorm",
        "egemaps-rbf-svm-speaker-znorm",
    ),
}
CORPUS_TITLES = {
    ("ravdess", "loso"): "**RAVDESS actors 1-12** (`ravdess-dev`: English, 720 utterances, 8 classes; "
    "leave-one-actor-out, 12 folds)",
    ("emovo", "loso"): "**EMOVO** (Italian, 6 actors, 588 utterances, 7 classes; leave-one-actor-out, 6 folds)",
}
# the default model's own row where its queue arm has every unit (plan, arm, the settings that made
# the full-run row above differ from it)
HEADLINE_ARMS = {
    ("ravdess", "loso"): (
        "enrollment-dropout",
        "width16-enrollment-dropout-0.5",
        "no enrollment dropout, model alone, 10 ms hops, 24 epochs",
        "fastser, model alone, 10 ms hops, 24 epochs (--functionals none --hop-ms 10 --epochs 24)",
    )
}
# rows above the model alone's, each once its queue arm has every unit: (plan, arm, row name)
HEADLINE_OPTIONS = {
    ("ravdess", "loso"): [
        ("cheaper-hop", "hop20-epochs16", "fastser (defaults: 20 ms hops, 16 epochs, ComParE functionals fused)"),
        ("functionals", "functionals-compare", "fastser, 10 ms hops, 24 epochs (--hop-ms 10 --epochs 24)"),
    ],
    ("emovo", "loso"): [
        (
            "emovo-enrollment-dropout",
            "hop20-epochs16",
            "fastser (defaults: 20 ms hops, 16 epochs, ComParE functionals fused)",
        ),
        ("emovo-enrollment-dropout", "hop20-epochs16-enrollment-dropout-0", "fastser, --enrollment-dropout 0"),
        ("emovo-cheaper-hop", "functionals-compare", "fastser, 10 ms hops, 24 epochs (--hop-ms 10 --epochs 24)"),
    ],
}
SUITE_TITLES = {
    "center_loss": "Center loss, one training step (forward + backward + center update), B x C x D",
    "features": "Features, 256 clips x 3 s at 16 kHz (n_fft 512, hop 160, 40 mels / 40 MFCCs; -lengths: 1.5-3 s "
    "clips with lengths, -2048: 2048 clips)",
    "train_step": "End-to-end training step from raw audio, 3 s clips, the batch size in the case's name "
    "(time per step)",
    "center_sync": "Center sync across 2 ranks (gloo), D = 512, B = 256 per rank",
    "inference": "Inference, audio in, probabilities out: 3 s clips at 16 kHz, the default model, batch 1 and 32 "
    "(predict: fastser.Predictor; the exported files in onnxruntime and torch.export; memory: peak resident); "
    "_fused: the model fused with ComParE functionals, openSMILE inside every implementation's call, beside "
    "the openSMILE + linear SVM baseline; folder: 200 files through Predictor.predict_files, one process "
    "against one per core (memory: the parent process's)",
}


def latest_runs() -> list[dict]:
    newest = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        env = data["environment"]
        for suite in {r["suite"] for r in data["results"]}:
            key = (suite, env["device_name"])
            if key not in newest or env["date"] >= newest[key]["environment"]["date"]:
                newest[key] = {
                    "environment": env,
                    "file": path.name,
                    "results": [r for r in data["results"] if r["suite"] == suite],
                }
    return [newest[k] for k in sorted(newest)]


def _ratio(r) -> str:
    sp = r.get("speedup_vs_baseline")
    if sp is None or r["impl"] == r["baseline"]:
        return "1.00x (baseline)" if r["impl"] == r["baseline"] else ""
    text = f"{sp:.2f}x" if sp >= 1 else f"{1 / sp:.1f}x the baseline's time"
    for other in r.get("also_vs", []):
        v = r.get(f"speedup_vs_{other}")
        if v is not None:
            text += f"; {v:.2f}x vs {other}"
    if r.get("target") is not None:
        text += f" (target {r['target']:g}x: {'met' if r.get('target_met') else 'missed'})"
    return text


def table() -> str:
    lines = []
    for run in latest_runs():
        env = run["environment"]
        suite = run["results"][0]["suite"]
        cpu = f" ({env['cpu_model']}; {', '.join(env['cpu_isa']) or 'no AVX2/AVX-512'})" if env.get("cpu_model") else ""
        lines += [
            f"**{SUITE_TITLES.get(suite, suite)}** — {env['device_name']}{cpu}, torch {env['torch']}, "
            f"{env['date'][:10]} (`benchmarks/results/{run['file']}`)",
            "",
            "| case | implementation | median time | peak extra memory | speed-up vs baseline |",
            "|---|---|---:|---:|---|",
        ]
        groups = list(dict.fromkeys(r["group"] for r in run["results"]))
        for r in sorted(run["results"], key=lambda r: groups.index(r["group"])):  # stable: impl order kept
            extra = ""
            if "utterances" in r:
                extra = f" ({r['utterances'] / r['median_s']:,.0f} utt/s)"
            if "sync_bytes_per_step" in r:
                extra = f" ({r['sync_bytes_per_step'] / 2**20:.2f} MiB all-reduced)"
            if r.get("roofline_pct") is not None:
                extra = f" ({r['achieved_bytes_per_s'] / 1e9:,.0f} GB/s, {r['roofline_pct']:.0f}% of HBM"
                if r.get("roofline_target_pct") is not None:
                    met = "met" if r["roofline_target_met"] else "missed"
                    extra += f"; target {r['roofline_target_pct']:g}%: {met}"
                extra += ")"
            per_step = r["median_s"] / r.get("steps_per_call", 1)  # train_step times several steps per call
            lines.append(
                f"| {r['group']} | {r['impl']} | {per_step * 1e3:,.2f} ms{extra} | "
                f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB | {_ratio(r)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


SUITE_SHORT = {
    "center_loss": "center loss step (B x C x D)",
    "features": "features (256 clips x 3 s)",
    "train_step": "training step from raw audio",
    "inference": "inference, audio in",
}


def speed_summary() -> str:
    """One row per suite of the newest runs: each implementation's speed-up against the suite's
    baseline over its cases (lowest to highest), for the README; docs/speed.md has every case."""
    lines = [
        "| suite | measured on | against | speed-up over its cases (lowest to highest) |",
        "|---|---|---|---|",
    ]
    for run in latest_runs():
        env, results = run["environment"], run["results"]
        if results[0]["suite"] not in SUITE_SHORT:
            continue
        # the cases that time an implementation against the reference (not the launch-floor and
        # host-overhead probes, which time empty calls)
        results = [r for r in results if r["group"] != "launch_floor" and not r["group"].startswith("host_")]
        baselines = sorted({r["baseline"] for r in results if r.get("baseline")})
        by_impl: dict = {}
        for r in results:
            sp = r.get("speedup_vs_baseline")
            if sp is not None and r["impl"] != r["baseline"]:
                by_impl.setdefault(r["impl"], []).append((sp, r["group"]))
        spans = []
        for impl, v in by_impl.items():
            (lo, lo_case), (hi, hi_case) = min(v), max(v)
            spans.append(f"{impl} {lo:.2f}x ({lo_case})" + (f" to {hi:.2f}x ({hi_case})" if len(v) > 1 else ""))
        lines.append(
            f"| {SUITE_SHORT.get(results[0]['suite'], results[0]['suite'])} | {env['device_name']}, "
            f"{env['date'][:10]} | {', '.join(baselines)} | {'; '.join(spans)} |"
        )
    return "\n".join(lines) + "\n"


def queue_tables() -> str:
    """Each plan of the experiment queue compared on the units it has so far (lab/experiments.py)."""
    from lab.experiments import Plan, compare

    tables = [compare(Plan.load(path)) for path in sorted(PLANS.glob("*.json"))]
    return "\n\n".join(tables) + "\n"


def _setting_text(row: dict) -> str:
    s = row["settings"]
    if row["kind"] == "baseline":
        return f"openSMILE {s['features']} functionals, {s['svm']} SVM" + (
            ", per-speaker z-norm" if s["speaker_norm"] else ""
        )
    recorded = {k: v for k, v in s.items() if v is not None}  # a row keeps a setting recorded after its runs as null
    parts = [
        f"features {s['features']}"
        + (" + prosody" if s.get("prosody") else "")
        + (" + bin stats" if s.get("bin_stats") else ""),
        f"pooling {run_setting(recorded, 'pooling')}",
        f"normalize {run_setting(recorded, 'normalize')}",
        f"epochs {s['epochs']} (patience {s['patience']})"
        if s.get("validation") is not False
        else f"epochs {s['epochs']}, last epoch kept (no validation speakers)",
        f"batch {s['batch_size']}, lr {s['lr']:g}",
    ]
    # the size and objective settings only where a row departs from today's default
    for key, text in SIZE_SETTINGS.items():
        if recorded.get(key, DEFAULTS[key]) != DEFAULTS[key]:
            parts.append(text.format(recorded[key]))
    if s.get("specaugment"):
        parts.append("SpecAugment")
    if s.get("tempo"):
        parts.append(f"tempo ±{s['tempo']:g}")
    if s.get("mixup"):
        parts.append(f"mixup alpha {s['mixup']:g}")
    if s.get("speed_perturb"):
        parts.append("speed perturbation " + ",".join(f"{v:g}" for v in s["speed_perturb"]))
    if s.get("noise"):
        parts.append("noise copies at " + ",".join(f"{v:g}" for v in s["noise"]) + " dB SNR")
    if s.get("enrollment_dropout"):
        parts.append(f"enrollment dropout {s['enrollment_dropout']:g}")
    if s.get("ema"):
        parts.append(f"weights {row.get('weights') or 'ema_%g' % s['ema'][0]}")
    return ", ".join(parts)


SIZE_SETTINGS = {
    "downsample": "downsampling {}",
    "hop_ms": "{} ms hops",
    "width": "width {}",
    "embed_dim": "embedding {}",
    "train_seconds": "{:g} s training crops",
    "lambda_center": "center loss weight {:g}",
    "lambda_recon": "reconstruction weight {:g}",
}


def _step_gflop(row: dict) -> str:
    return "" if row["kind"] == "baseline" else f"{training_step_flops(row['settings']) / 1e9:.1f}"


def _minutes(seconds) -> str:
    return "" if seconds is None else f"{seconds / 60:.0f} min"


def accuracy_table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "accuracy").glob("*.json"))]
    lines = []
    for corpus, split in sorted({(r["corpus"], r["split"]) for r in rows}):
        group = [r for r in rows if (r["corpus"], r["split"]) == (corpus, split)]
        group.sort(key=lambda r: (-r["folds"], r["kind"] != "baseline", r["date"]))
        lines += [
            f"**{corpus}, {split}** (mean ± std over seeds; the baselines are deterministic)",
            "",
            "| row | settings | folds | seeds | UA % | WA % | macro-F1 % | "
            + "".join(f"UA %, {FALLBACK_TEXT[level]} | " for level in FALLBACKS)
            + "time per seed | GFLOP per training step | machine, date |",
            "|---|---|---:|---|---:|---:|---:|" + "---:|" * len(FALLBACKS) + "---:|---:|---|",
        ]
        for r in group:
            spread = r["kind"] != "baseline" and len(r["seeds"]) > 1  # a ± only where there are seeds to vary
            pm = lambda k: f"{100 * r[k + '_mean']:.1f}" + (f" ± {100 * r[k + '_std']:.1f}" if spread else "")  # noqa: E731
            alone = " | ".join(pm(f"{level}_norm_ua") if f"{level}_norm_ua_mean" in r else "" for level in FALLBACKS)
            seeds = ", ".join(r["seeds"]) if r["kind"] != "baseline" else "-"
            lines.append(
                f"| {r['name']} | {_setting_text(r)} | {r['folds']} | {seeds} | {pm('ua')} | {pm('wa')} | "
                f"{pm('macro_f1')} | {alone} | {_minutes(r['seconds_per_seed'])} | {_step_gflop(r)} | "
                f"{r['machine']}, {r['date'][:10]} |"
            )
            if r.get("seed_ensemble"):
                e = r["seed_ensemble"]
                voters = ", ".join(e.get("seeds", r["seeds"]))  # a row with seeds added later keeps its first vote
                lines.append(
                    f"| {r['name']}: the {e['n_seeds']} seeds' models averaged (soft vote) | as above | "
                    f"{r['folds']} | {voters} | {100 * e['ua']:.1f} | {100 * e['wa']:.1f} | "
                    f"{100 * e['macro_f1']:.1f}{' |' * (len(FALLBACKS) + 1)} {e['n_seeds']} x the time | "
                    f"{_step_gflop(r)} | "
                    f"{r['machine']}, {r['date'][:10]} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def headline_table() -> str:
    """The README's results, one table per development corpus: the default model fused and alone
    (with and without enrollment audio) beside the classic baselines on the same folds."""
    lines = []
    for (corpus, split), names in HEADLINE.items():
        rows = [json.loads((RESULTS / "accuracy" / f"{corpus}-{split}-{n}.json").read_text()) for n in names]
        lines += [
            CORPUS_TITLES[(corpus, split)],
            "",
            "| model | UA % | WA % | UA % without enrollment audio | model alone: UA % (without enrollment) "
            "| time per seed (2 CPU cores) | folds, seeds |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        plan, arm, before, name = HEADLINE_ARMS.get((corpus, split), (None, None, None, None))
        default = _queue_row(plan, arm, name) if plan else None
        if default is not None:
            rows[0]["headline_name"] = f"fastser, {before}"
            rows.insert(0, default)
        options = [_queue_row(p, a, label) for p, a, label in HEADLINE_OPTIONS.get((corpus, split), [])]
        rows[0:0] = [r for r in options if r is not None]
        for r in rows:
            spread = r["kind"] != "baseline" and len(r["seeds"]) > 1
            pm = lambda k: f"{100 * r[k + '_mean']:.1f}" + (f" ± {100 * r[k + '_std']:.1f}" if spread else "")  # noqa: E731
            name = r.get("headline_name") or ("fastser (defaults)" if r["kind"] != "baseline" else _setting_text(r))
            if "training_norm_ua_mean" in r:
                alone = pm("training_norm_ua")
            elif r["kind"] == "baseline":
                alone = _baseline_without_speaker(corpus, split, r)
            else:
                alone = ""
            model = f"{pm('model_ua')} ({pm('model_training_ua')})" if "model_ua_mean" in r else ""
            seeds = (
                f"{r['folds']} folds, seeds {', '.join(r['seeds'])}"
                if r["kind"] != "baseline"
                else f"{r['folds']} folds"
            )
            time = r.get("time") or _minutes(r["seconds_per_seed"])
            lines.append(f"| {name} | {pm('ua')} | {pm('wa')} | {alone} | {model} | {time} | {seeds} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _baseline_without_speaker(corpus: str, split: str, row: dict) -> str:
    """A speaker-normalised baseline's UA without the speaker: the same SVM on raw functionals, where
    that row was kept (lab.accuracy --baseline of a --no-speaker-norm run)."""
    s = row["settings"]
    path = RESULTS / "accuracy" / f"{corpus}-{split}-{s['features']}-{s['svm']}-svm.json"
    if not path.is_file():
        return "(per-speaker z-norm needs the speaker)"
    return f"{100 * json.loads(path.read_text())['ua_mean']:.1f} (no z-norm)"


def _queue_row(plan: str, arm: str, name: str = "fastser (defaults)"):
    """The headline row of a queue arm with every unit in (None until then): its units' UA and WA
    pooled per seed, and a seed's time as the queue trains it, two 1-thread units at a time."""
    from lab.experiments import Plan, arm_result

    result = arm_result(Plan.load(PLANS / f"{plan}.json"), arm)
    if result is None:
        return None
    minutes = result["unit_seconds_per_seed"] / 60
    time = f"{minutes / 2:.0f} min (two 1-thread units at a time; {minutes:.0f} min of units)"
    return {**result, "kind": "queue", "headline_name": name, "time": time}


def kernel_table() -> str:
    """Per Triton kernel and architecture, over every specialisation the gate compiled: the most
    registers and shared memory per thread block, the lowest occupancy they allow, spills, fenced
    atomics, and how many have tensor-core instructions (HMMA/HGMMA) in their SASS."""
    files = sorted((RESULTS / "kernels").glob("*.json"))
    if not files:
        return "No kernel report recorded yet.\n"
    data = json.loads(files[-1].read_text())
    env = data["environment"]
    lines = [
        f"Compiled by the GPU compile gate without a GPU, Triton {env['triton']}, {env['date'][:10]} "
        f"(`benchmarks/results/kernels/{files[-1].name}`): the worst specialisation of each kernel.",
        "",
        "| kernel | arch | specialisations | registers / thread (max) | shared memory (max) | occupancy (min) "
        "| spills | fenced atomics | with tensor-core products |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in data["reports"]:
        tensor_cores = report.get("tensor_cores", {})  # files recorded before the gate read them have none
        for name, k in report["kernels"].items():
            lines.append(
                f"| `{name}` | sm_{report['arch']} | {k['count']} | {k['registers']} | {k['shared'] / 1024:.1f} KB "
                f"| {k['occupancy']:.0%} | {sum(name in s for s in report['spills'])} "
                f"| {sum(name in f for f in report['fenced'])} | {tensor_cores.get(name, 0)} |"
            )
    return "\n".join(lines) + "\n"


def ledger_table() -> str:
    from instruments.ledger import Row, table as rows_table

    files = sorted((RESULTS / "ledger").glob("*.json"))
    if not files:
        return "No ledger recorded yet.\n"
    data = json.loads(files[-1].read_text())
    head = (
        f"Counted on the CUDA code path without a GPU, torch {data['environment']['torch']}, "
        f"{data['environment']['date'][:10]} (`benchmarks/results/ledger/{files[-1].name}`).\n\n"
    )
    return head + rows_table([Row(**r) for r in data["rows"]])


def _replace(content: str, start: str, end: str, text: str) -> str:
    if start not in content or end not in content:
        raise SystemExit(f"no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{text}{end}{tail}"


def fusion_table() -> str:
    """The kept late-fusion results (lab.fusion --write), one row each."""
    from lab.fusion import kept_results, table_text

    return table_text(kept_results())


def fusion_weight_table() -> str:
    """The kept results of fusion weights chosen on validation speakers (lab.fusion_weight --write)."""
    from lab.fusion_weight import kept_results, table_text

    return table_text(kept_results())


def adabn_table() -> str:
    """The kept results of adapting the batch norms to the enrolled speaker (lab.adabn --write)."""
    from lab.adabn import kept_results, table_text

    return table_text(kept_results())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update README.md and docs/ in place")
    args = ap.parse_args(argv)
    text, accuracy, headline = table(), accuracy_table(), headline_table()
    if not args.write:
        print(headline + "\n" + text + "\n" + ledger_table() + "\n" + accuracy)
        return
    readme = ROOT / "README.md"
    content = _replace(readme.read_text(), SUMMARY_START, SUMMARY_END, speed_summary())
    readme.write_text(_replace(content, HEAD_START, HEAD_END, headline))
    speed = _replace(SPEED_DOC.read_text(), START, END, text)
    SPEED_DOC.write_text(_replace(speed, LEDGER_START, LEDGER_END, ledger_table()))
    accuracy_doc = _replace(ACCURACY_DOC.read_text(), ACC_START, ACC_END, accuracy)
    accuracy_doc = _replace(accuracy_doc, QUEUE_START, QUEUE_END, queue_tables())
    accuracy_doc = _replace(accuracy_doc, FUSION_START, FUSION_END, fusion_table())
    accuracy_doc = _replace(accuracy_doc, WEIGHT_START, WEIGHT_END, fusion_weight_table())
    ACCURACY_DOC.write_text(_replace(accuracy_doc, ADABN_START, ADABN_END, adabn_table()))
    DEVELOPMENT_DOC.write_text(_replace(DEVELOPMENT_DOC.read_text(), KERNELS_START, KERNELS_END, kernel_table()))


if __name__ == "__main__":
    main()
