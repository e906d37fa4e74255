"""Predict emotions: `python -m fastser.predict FILE.wav [FILE ...] --checkpoint runs/<ts>/checkpoint.pt [--json]`.

Uses the model a training run kept last (the best epoch of its last fold), with that run's
feature configuration and normalisation.
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import torch

from fastser.audio import AudioError, load
from fastser.cli import UserError, prog_name, run_cli
from fastser.distributed import parse_device
from fastser.features.functional import FeatureConfig, _extract, prepare
from fastser.models import SERModel


def load_checkpoint(path) -> dict:
    """A finished fastser checkpoint (a run folder or its checkpoint.pt), or a UserError saying what
    the file is instead. Loads with weights_only=True only: a checkpoint never runs code."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not a fastser checkpoint (not a PyTorch checkpoint file, or a truncated one)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise UserError(f"{p}: not a fastser checkpoint (damaged, or it holds Python objects rather than "
                        f"fastser's tensors and metadata)") from None
    if not isinstance(ckpt, dict) or not {"config", "version"} <= set(ckpt):
        raise UserError(f"{p}: a PyTorch file, but not a fastser checkpoint (no fastser metadata)")
    if "final" not in ckpt:
        raise UserError(f"{p}: the run stopped before its first fold finished, so there is no model yet; "
                        f"continue it with: python -m fastser.train --resume {p.parent}")
    return ckpt


class Predictor:
    def __init__(self, checkpoint: str, device: str = "cpu"):
        ckpt = load_checkpoint(checkpoint)
        cfg = ckpt["config"]
        self.classes = cfg["classes_list"]
        self.kinds = cfg["kinds"]
        self.configs = {k: FeatureConfig(**v) for k, v in cfg["feature_configs"].items()}
        self.max_seconds = cfg["max_seconds"]
        self.device = parse_device(device)
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
    ap = argparse.ArgumentParser(prog=prog_name("fastser.predict"), description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="audio files (any format soundfile reads)")
    ap.add_argument("--checkpoint", required=True, help="a training run's checkpoint.pt, or its run folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout instead of a line per file")
    args = ap.parse_args(argv)
    predictor = Predictor(args.checkpoint, args.device)
    results, status = [], 0
    for path in args.files:
        try:
            results.append(predictor.predict_file(path))
        except AudioError as e:  # one bad file does not stop the others; the exit status says so
            print(f"{prog_name('fastser.predict')}: error: {e}", file=sys.stderr)
            status = 2
            continue
        if not args.json:
            r = results[-1]
            probs = "  ".join(f"{c} {p:.2f}" for c, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"{path}: {r['emotion']}  ({probs})")
    if args.json:
        print(json.dumps(results, indent=2))
    return status


def cli(argv=None) -> int:
    """`fastser-predict` / `python -m fastser.predict`: exit 0, or 2 with one line naming a bad input."""
    return run_cli(main, "fastser.predict", argv)


if __name__ == "__main__":
    sys.exit(cli())
