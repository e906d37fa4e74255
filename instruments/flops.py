"""Floating-point work of one training step, counted: `python -m instruments.flops [--batch-size B] [--width W] ...`.

    training_step_flops(settings)   # a run's flat settings (config.json, an accuracy row's "settings")

The model a run's settings build, its forward and backward on one training batch (batch_size crops
of train_seconds), counted by torch.utils.flop_counter on the `meta` device: nothing is computed,
so it costs milliseconds and needs no data. Counted are the matrix products and convolutions (what
FlopCounterMode knows; the element-wise passes, pooling and normalisation move bytes rather than
FLOPs). The inputs need no gradient, so the first convolutions' input gradient is not counted, as it
is not computed in training. The accuracy table shows it beside each row's time, so a change that
makes training cheaper says by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastser.config import ModelConfig, ObjectiveConfig, OptimConfig, crop_frames, migrated
from fastser.features.featureset import FeatureSet
from fastser.checkpoints import ModelSpec, build_model
from fastser.functionals import CLIP_KINDS

# a stage: a CNN's stem or block, a contour encoder, a decoder, the embedding, the classifier
STAGE = re.compile(r"encoders\.\w+\.(stem|blocks\.\d+)|encoders\.(prosody|functionals)|decoders\.\w+|embed|classifier")
DEFAULTS = {f.name: f.default for cls in (ModelConfig, ObjectiveConfig, OptimConfig) for f in dataclasses.fields(cls)}


def _kinds(features: str, prosody: bool) -> list:
    return (["logmel", "mfcc"] if features == "both" else [features]) + (["prosody"] if prosody else [])


def training_step_flops(settings: dict, num_classes: int = 8) -> int:
    """FLOPs of one training step (forward and backward) of the model `settings` describe. Settings
    a run never recorded take what fastser did before recording them (fastser.config.migrated), the
    others today's default; num_classes only sizes the classifier (a few kFLOP)."""
    return _counted(settings, num_classes, backward=True).get_total_flops()


def forward_flops_by_layer(settings: dict, num_classes: int = 8) -> dict:
    """{layer: forward FLOPs of one training batch} for the model `settings` describe, per stage
    ("encoders.logmel.stem", "encoders.logmel.blocks.0", "decoders.mfcc", "embed", ...). A layer's
    backward costs twice its forward (input and weight gradients), a first layer's once (its input,
    the features, needs no gradient): where the training step's FLOPs go."""
    counts = _counted(settings, num_classes, backward=False).get_flop_counts()
    names = {name.removeprefix("SERModel."): sum(ops.values()) for name, ops in counts.items()}
    return {name: flops for name, flops in names.items() if STAGE.fullmatch(name)}


def _counted(settings: dict, num_classes: int, backward: bool) -> FlopCounterMode:
    s = {**DEFAULTS, **migrated({k: v for k, v in settings.items() if v is not None})}
    kinds = _kinds(s["features"], s["prosody"])
    features = FeatureSet.paper(kinds, sr=s["sample_rate"], n_mels=s["n_mels"], hop_ms=s["hop_ms"])
    branch = ModelConfig(functionals=s["functionals"], functionals_fusion=s["functionals_fusion"]).functionals_input
    spec = ModelSpec(
        features,
        tuple(range(num_classes)),
        width=s["width"],
        embed_dim=s["embed_dim"],
        reconstruct=s["lambda_recon"] > 0,
        bin_stats=s["bin_stats"],
        pooling=s["pooling"],
        downsample=s["downsample"],
        functionals_input=branch,
    )
    model = build_model(spec).to("meta")
    batch, frames = s["batch_size"], crop_frames(s["train_seconds"], s["hop_ms"])
    feats = {
        k: torch.empty(batch, n, 1 if k in CLIP_KINDS else frames, device="meta") for k, n in spec.input_bins.items()
    }
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        result = model(feats, torch.full((batch,), frames, device="meta"))
        if backward:
            loss = F.cross_entropy(result.logits, labels) + sum(
                F.mse_loss(r, feats[k]) for k, r in result.reconstruction.items()
            )
            loss.backward()
    return counter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instruments.flops", description=__doc__.splitlines()[0])
    for name in ("batch_size", "width", "embed_dim", "hop_ms"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=DEFAULTS[name])
    parser.add_argument("--train-seconds", type=float, default=DEFAULTS["train_seconds"])
    parser.add_argument("--features", default=ModelConfig.features)
    parser.add_argument("--no-prosody", action="store_true")
    parser.add_argument("--pooling", default=ModelConfig.pooling)
    parser.add_argument("--downsample", default=ModelConfig.downsample)
    parser.add_argument("--by-layer", action="store_true", help="also each stage's forward FLOPs")
    args = parser.parse_args(argv)
    settings = {**vars(args), "prosody": not args.no_prosody}
    for flag in ("no_prosody", "by_layer"):
        settings.pop(flag)
    print(f"{training_step_flops(settings) / 1e9:.2f} GFLOP per training step (forward + backward)")
    if args.by_layer:
        layers = forward_flops_by_layer(settings)
        total = sum(layers.values())
        print(f"forward, {total / 1e9:.2f} GFLOP:")
        for name, flops in sorted(layers.items(), key=lambda kv: -kv[1]):
            print(f"  {name:28s} {flops / 1e9:6.2f} GFLOP  {100 * flops / total:4.1f} %")


if __name__ == "__main__":
    main()
