"""What a run saves and how anything loads it back: the model's spec, checkpoints, old formats.

spec = ModelSpec(features, classes, width=16, embed_dim=128, reconstruct=True)
model = build_model(spec)                         # train, predict and the reference build it so
save_checkpoint(payload, path)                    # atomic; payload["spec"] = spec.to_dict()
ckpt = load_checkpoint(path_or_run_folder)        # a finished run, or a UserError naming the problem
spec, final = finished_model(ckpt)                # the first checkpoint format (no "spec") too
run_setting(ckpt["config"], "pooling")            # a setting, also from runs made before it was recorded
saved_settings(run_folder_or_checkpoint)          # the settings a run was started with (resume)
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Optional

import torch

from fastser._io import atomic_torch_save, atomic_write
from fastser.errors import UserError
from fastser.config import migrated
from fastser.features.featureset import ALIASES, FeatureSet
from fastser.functionals import INPUT_KIND, SIZES
from fastser.models import SERModel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a trained model and feed it: its inputs, classes and size."""

    features: FeatureSet
    classes: tuple
    width: int = 16
    embed_dim: int = 128
    reconstruct: bool = True
    train_seconds: float = 3.0  # the training crop (predict's window)
    max_seconds: float = 8.0  # longer utterances were cut (predict scores up to this length whole)
    normalize: str = "corpus"  # input statistics: "corpus" (the training fold's), "speaker" or "utterance"
    bin_stats: bool = False  # spectral bins' utterance mean/std beside the CNN's pooled features
    pooling: str = "global"  # CNN maps pooled over time and frequency ("global") or time only ("time");
    #                             the default is what a checkpoint written before the field holds
    downsample: str = "pool"  # where the CNNs' 2x2 downsamplings sit (fastser.models.cnn.DOWNSAMPLINGS)
    functionals_input: Optional[str] = None  # the openSMILE set the network reads as a branch, if any

    @property
    def input_bins(self) -> dict:
        """{kind: bins} of every model input: the feature set's kinds, then the functionals'."""
        extra = {INPUT_KIND: SIZES[self.functionals_input]} if self.functionals_input else {}
        return {**self.features.n_bins, **extra}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(features=self.features.to_dict(), classes=list(self.classes))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{**d, "features": FeatureSet.from_dict(d["features"]), "classes": tuple(d["classes"])})


def build_model(spec: ModelSpec) -> SERModel:
    return SERModel(
        spec.input_bins,
        len(spec.classes),
        width=spec.width,
        embed_dim=spec.embed_dim,
        reconstruct=spec.reconstruct,
        bin_stats=spec.bin_stats,
        pooling=spec.pooling,
        downsample=spec.downsample,
    )


def cpu_state(module) -> dict:
    """A copy of module's state on the CPU (a checkpoint must not alias weights that train on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(payload: dict, path: Path) -> None:
    atomic_torch_save(payload, path)


def load_checkpoint(path, *, finished: bool = True) -> dict:
    """A fastser checkpoint (a run folder or its checkpoint.pt), or a UserError saying what the file
    is instead. Loads with weights_only=True only: a checkpoint never runs code."""
    p = Path(path)
    if p.is_dir():
        if not (p / "checkpoint.pt").exists():
            raise UserError(
                f"{path}: a folder without checkpoint.pt, so not a fastser run folder (a training "
                f"run writes its checkpoint.pt there at the end of its first epoch)"
            )
        p = p / "checkpoint.pt"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not a fastser checkpoint (not a PyTorch checkpoint file, or a truncated one)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise UserError(
            f"{p}: not a fastser checkpoint (damaged, or it holds Python objects rather than "
            f"fastser's tensors and metadata)"
        ) from None
    if not isinstance(ckpt, dict) or not {"config", "version"} <= set(ckpt):
        raise UserError(f"{p}: a PyTorch file, but not a fastser checkpoint (no fastser metadata)")
    if finished and "final" not in ckpt:
        raise UserError(
            f"{p}: the run stopped before its first fold finished, so there is no model yet; "
            f"continue it with: python -m fastser.train --resume {p.parent}"
        )
    return ckpt


def finished_model(ckpt: dict) -> tuple[ModelSpec, dict]:
    """(spec, {"model", "objective", "norm"}) of a finished checkpoint, whichever fastser wrote it."""
    final = ckpt["final"]
    if "spec" in ckpt:
        return ModelSpec.from_dict(ckpt["spec"]), final
    # the first format: the spec lives in the run's config, the log-mel branch is called "spectrogram"
    cfg = ckpt["config"]
    spec = ModelSpec(
        FeatureSet.from_dict(cfg["feature_configs"]),
        tuple(cfg["classes_list"]),
        width=cfg["width"],
        embed_dim=cfg["embed_dim"],
        reconstruct=cfg["lambda_recon"] > 0,
        train_seconds=cfg.get("train_seconds", 3.0),
        max_seconds=cfg["max_seconds"],
        pooling=run_setting(cfg, "pooling"),
    )  # that format had no choice: global
    return spec, {
        **final,
        "model": _renamed(final["model"]),
        "norm": {s: _renamed_keys(v) for s, v in final["norm"].items()},
    }


def run_setting(config: dict, key: str):
    """The setting `key` a run was made with, from its config (checkpoint or config.json), read
    through fastser.config.migrated (a run made before the setting was recorded, lists as tuples)."""
    return migrated(config).get(key)


def _renamed_keys(d: dict) -> dict:
    return {ALIASES.get(k, k): v for k, v in d.items()}


def _renamed(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in ALIASES.items():
            key = key.replace(f".{old}.", f".{new}.")
        out[key] = value
    return out


SETTINGS_FILE = "settings.json"  # a run folder's start-up settings, written before its first epoch


def write_settings(folder: Path, settings: dict) -> None:
    """The settings a run starts with, so `--resume FOLDER` alone can continue it (tuples as lists)."""
    text = json.dumps(settings, indent=2, default=str) + "\n"
    atomic_write(Path(folder) / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text))


def saved_settings(path) -> "tuple[dict, bool] | None":
    """(settings, complete) of the run at `path` (its folder or a checkpoint.pt), or None if it has none.

    complete=True: the run's own start-up settings (settings.json, or a checkpoint's "settings").
    complete=False: a run made before those were saved; its checkpoint's config stands in, which
    holds the parsed settings too, except that an --ablation run's config holds each part's own
    center and reconstruction weights (the caller leaves those out). Lists read back as tuples."""
    p = Path(path)
    if p.is_dir() and (p / SETTINGS_FILE).is_file():
        try:
            found, complete = json.loads((p / SETTINGS_FILE).read_text()), True
        except (OSError, ValueError) as e:
            raise UserError(f"{p / SETTINGS_FILE}: unreadable run settings ({e})") from None
    else:
        ckpt_path = p / "checkpoint.pt" if p.is_dir() else p
        if not ckpt_path.is_file():
            return None
        ckpt = load_checkpoint(ckpt_path, finished=False)
        complete = "settings" in ckpt
        found = ckpt["settings"] if complete else ckpt["config"]
    if not isinstance(found, dict):
        raise UserError(f"{p}: unreadable run settings")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in found.items()}, complete
