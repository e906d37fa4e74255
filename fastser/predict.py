"""Predict emotions: `python -m fastser.predict FILE.wav [FILE ...] --checkpoint runs/<ts>/checkpoint.pt [--json]`.

Uses the model a training run kept last (the best epoch of its last fold), with that run's
feature configuration and normalisation.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fastser.audio import AudioError, load
from fastser.features.functional import FeatureConfig, _extract, prepare
from fastser.models import SERModel


class Predictor:
    def __init__(self, checkpoint: str, device: str = "cpu"):
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(f"{checkpoint}: not a fastser checkpoint ({e})") from e
        if "final" not in ckpt:
            raise ValueError(f"{checkpoint}: holds no finished model yet (the run stopped before its first fold ended)")
        cfg = ckpt["config"]
        self.classes = cfg["classes_list"]
        self.kinds = cfg["kinds"]
        self.configs = {k: FeatureConfig(**v) for k, v in cfg["feature_configs"].items()}
        self.max_seconds = cfg["max_seconds"]
        self.device = torch.device(device)
        bins = {k: c.n_bins for k, c in self.configs.items()}
        self.model = SERModel(bins, len(self.classes), width=cfg["width"], embed_dim=cfg["embed_dim"],
                              reconstruct=cfg["lambda_recon"] > 0)
        self.model.load_state_dict(ckpt["final"]["model"])
        self.model.to(self.device).eval()
        norm = ckpt["final"]["norm"]
        self.mean = {k: v.to(self.device)[None, :, None] for k, v in norm["mean"].items()}
        self.std = {k: v.to(self.device)[None, :, None] for k, v in norm["std"].items()}
        self.sr = next(iter(self.configs.values())).sr

    @torch.no_grad()
    def probabilities(self, waveform) -> torch.Tensor:
        y, lengths, _ = prepare(torch.as_tensor(waveform[: int(self.max_seconds * self.sr)]).to(self.device))
        feats = {}
        for kind, cfg in self.configs.items():
            out, frames = _extract(y, lengths, cfg, "auto")
            feats[kind] = (out - self.mean[kind]) / self.std[kind]
        return torch.softmax(self.model(feats, frames).logits, dim=1)[0].cpu()

    def predict_file(self, path: str) -> dict:
        y, _ = load(path, sr=self.sr)
        p = self.probabilities(y)
        return {"file": path, "emotion": self.classes[int(p.argmax())],
                "probabilities": {c: round(float(v), 4) for c, v in zip(self.classes, p)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastser.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = ap.parse_args(argv)
    try:
        predictor = Predictor(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, status = [], 0
    for path in args.files:
        try:
            results.append(predictor.predict_file(path))
        except AudioError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        if not args.json:
            r = results[-1]
            probs = "  ".join(f"{c} {p:.2f}" for c, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"{path}: {r['emotion']}  ({probs})")
    if args.json:
        print(json.dumps(results, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
