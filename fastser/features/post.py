"""Everything after the FFT, in plain torch ops (the "torch" backend, the one with autograd):
power -> mel -> dB (per-utterance ref/top_db) -> DCT -> lifter, each utterance over its own frames.
The fused kernels (fastser.ops.mel_chain) compute the same chain in one pass; the DALI backend
borrows clamp_top_db and project. Shapes: spec (B, F, T) complex, frames (B,), outputs (B, bins, T)
with the frames past each item's own set to 0.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch


def valid_mask(frames: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B,) frame counts -> (B, 1, n_frames) bool, True on each item's valid frames."""
    return (torch.arange(n_frames, device=frames.device)[None, :] < frames[:, None])[:, None, :]


def log_reference(ref: float, amin: float) -> float:
    """10 log10(max(amin, |ref|)): librosa's constant reference in dB."""
    return 10.0 * math.log10(max(amin, abs(float(ref))))


def clamp_top_db(db: torch.Tensor, frames: torch.Tensor, top_db: float) -> torch.Tensor:
    """max(db, item max - top_db), the max of each item over its valid frames; padded frames -> 0."""
    valid = valid_mask(frames, db.shape[-1])
    item_max = db.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    return torch.maximum(db, item_max - top_db).masked_fill(~valid, 0.0)


def to_db(
    S: torch.Tensor, frames: torch.Tensor, ref: Union[float, str], amin: float, top_db: Optional[float]
) -> torch.Tensor:
    """power_to_db per utterance over its valid frames; S (B, bins, T) power; ref a number or "max"."""
    db = 10.0 * torch.log10(S.clamp(min=amin))
    if ref == "max":
        valid = valid_mask(frames, S.shape[-1])
        db = db - db.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    else:
        db = db - log_reference(ref, amin)
    if top_db is not None:
        return clamp_top_db(db, frames, top_db)
    return db.masked_fill(~valid_mask(frames, S.shape[-1]), 0.0)


def project(matrix: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """matrix @ S. On the CPU in float64, rounded back: CPU GEMM kernels change their summation order
    with the number of frames, and this keeps a batched call bit-identical to per-item calls."""
    if S.device.type != "cpu":
        return torch.matmul(matrix, S)
    return torch.matmul(matrix.double(), S.double()).to(S.dtype)


def post_chain(spec: torch.Tensor, frames: torch.Tensor, cfg, const: dict) -> torch.Tensor:
    """The whole chain for one FeatureConfig; const holds its "fb", "dct", "lift" tensors."""
    valid = valid_mask(frames, spec.shape[-1])
    if cfg.power is None:
        return spec.masked_fill(~valid, 0)
    if cfg.power == 2.0:
        S = torch.view_as_real(spec).square().sum(-1)
    else:
        S = spec.abs().pow(cfg.power)
    if cfg.kind == "spectrogram":
        return S.masked_fill(~valid, 0.0)
    S = project(const["fb"], S)
    if cfg.kind == "mel":
        return S.masked_fill(~valid, 0.0)
    S = to_db(S, frames, cfg.ref, cfg.amin, cfg.top_db)
    if cfg.kind == "logmel":
        return S
    return (project(const["dct"], S) * const["lift"][:, None]).masked_fill(~valid, 0.0)
