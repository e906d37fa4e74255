"""The fused post-FFT chain — |X|^p -> mel -> dB (amin, ref) -> per-utterance top_db -> DCT -> lifter —
and the one place that calls its kernels: Triton on CUDA (mel_chain_triton.py: two launches, no
host synchronisation), C++ on the CPU (csrc/mel_chain_cpu.cpp through _native). Both compute
what fastser.features.post computes in plain torch ops, reading the spectrum once. No autograd:
fastser.features.functional refuses audio that requires grad on these backends.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastser.ops import _native


def _to_db(cfg) -> bool:
    return cfg.kind in ("logmel", "mfcc")


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels compute in float32 (a transform moved to float64 keeps float64 buffers); a no-op,
    no launch, for the usual float32 constants."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()


def triton_launches(spec: torch.Tensor, frames: torch.Tensor, cfg, const: dict, hann_fold: bool = False):
    """spec (B, F, T) complex STFT, frames (B,), a mel/logmel/mfcc FeatureConfig and its float32 "fb",
    "dct", "lift" -> (the TritonLaunches in order, their output (B, bins, T) float32). hann_fold:
    spec was taken without a window; the kernel applies the periodic Hann window of n_fft samples.
    The GPU compile gate compiles exactly these launches."""
    from fastser.ops import mel_chain_triton

    B, _, T = spec.shape
    spec = spec.to(torch.complex64)
    if spec.stride(1) != 1:  # the kernel reads each frame's bins as one row (torch.stft's layout)
        spec = spec.transpose(1, 2).contiguous().transpose(1, 2)
    mel = torch.empty(B, cfg.n_mels, T, dtype=torch.float32, device=spec.device)
    mfcc_out = torch.empty(B, cfg.n_mfcc, T, dtype=torch.float32, device=spec.device) if cfg.kind == "mfcc" else None
    tile_max = torch.empty(B, mel_chain_triton.n_tiles(T), dtype=torch.float32, device=spec.device)
    launches = mel_chain_triton.mel_chain_launches(
        torch.view_as_real(spec),
        _f32(const["fb"]),
        frames.to(torch.int32),
        mel,
        tile_max,
        power=cfg.power,
        to_db=_to_db(cfg),
        amin=cfg.amin,
        log_ref=cfg.log_ref,
        ref_max=_to_db(cfg) and cfg.ref == "max",
        top_db=cfg.top_db if _to_db(cfg) else None,
        dct=_f32(const["dct"]) if mfcc_out is not None else None,
        lift=_f32(const["lift"]) if mfcc_out is not None else None,
        mfcc_out=mfcc_out,
        hann_fold=hann_fold,
    )
    return launches, (mfcc_out if mfcc_out is not None else mel)


def triton(spec: torch.Tensor, frames: torch.Tensor, cfg, const: dict, hann_fold: bool = False) -> torch.Tensor:
    launches, out = triton_launches(spec, frames, cfg, const, hann_fold)
    for launch in launches:
        launch.launch()
    return out


def cpp(
    spec: torch.Tensor,
    frames: torch.Tensor,
    cfg,
    const_f32: dict,
    *,
    mel_out: torch.Tensor,
    mfcc_out: Optional[torch.Tensor],
) -> None:
    """spec (B, T, F) frame-major complex64 on the CPU; writes mel_out (B, n_mels, T) and, for MFCCs,
    mfcc_out (B, n_mfcc, T). const_f32: the config's float32 "fb" (and "dct", "lift")."""
    _native.mel_chain_cpu(
        spec,
        frames,
        const_f32["fb"],
        power=float(cfg.power),
        to_db=_to_db(cfg),
        amin=cfg.amin,
        log_ref=cfg.log_ref,
        ref_max=_to_db(cfg) and cfg.ref == "max",
        top_db=cfg.top_db if _to_db(cfg) else None,
        dct=const_f32.get("dct"),
        lift=const_f32.get("lift"),
        mel_out=mel_out,
        mfcc_out=mfcc_out,
    )
