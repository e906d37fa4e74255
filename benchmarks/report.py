"""Build the README's performance table from benchmarks/results/*.json (never typed by hand).

    python -m benchmarks.report            # print the markdown
    python -m benchmarks.report --write    # replace the table between the markers in README.md

For each (suite, device) the newest results file is used; every figure in a row comes from that
one run, ratios included.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUITE_TITLES = {
    "center_loss": "Center loss, one training step (forward + backward + center update), B x C x D",
    "features": "Features, 256 clips x 3 s at 16 kHz (n_fft 512, hop 160, 40 mels / 40 MFCCs)",
    "train_step": "End-to-end training step from raw audio, batch 64 x 3 s",
    "center_sync": "Center sync across 2 ranks (gloo), D = 512, B = 256 per rank",
}


def latest_runs() -> list[dict]:
    newest = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        env = data["environment"]
        for suite in {r["suite"] for r in data["results"]}:
            key = (suite, env["device_name"])
            if key not in newest or env["date"] >= newest[key]["environment"]["date"]:
                newest[key] = {"environment": env, "file": path.name,
                               "results": [r for r in data["results"] if r["suite"] == suite]}
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
        lines += [f"**{SUITE_TITLES.get(suite, suite)}** — {env['device_name']}{cpu}, torch {env['torch']}, "
                  f"{env['date'][:10]} (`benchmarks/results/{run['file']}`)", "",
                  "| case | implementation | median time | peak extra memory | speed-up vs baseline |",
                  "|---|---|---:|---:|---|"]
        groups = list(dict.fromkeys(r["group"] for r in run["results"]))
        for r in sorted(run["results"], key=lambda r: groups.index(r["group"])):  # stable: impl order kept
            extra = ""
            if "utterances" in r:
                extra = f" ({r['utterances'] / r['median_s']:,.0f} utt/s)"
            if "sync_bytes_per_step" in r:
                extra = f" ({r['sync_bytes_per_step'] / 2**20:.2f} MiB all-reduced)"
            lines.append(f"| {r['group']} | {r['impl']} | {r['median_s'] * 1e3:,.2f} ms{extra} | "
                         f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB | {_ratio(r)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update README.md in place")
    args = ap.parse_args(argv)
    text = table()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}{END}{tail}")


if __name__ == "__main__":
    main()
