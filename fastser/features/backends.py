"""Whole-chain backends that do not share fastser's STFT: librosa (the reference) and NVIDIA DALI.

Both take what `functional.extract_many` hands a backend — padded (B, T) signals, lengths, frame counts and a
FeatureConfig — and return (B, bins, max_frames) tensors with padded frames zeroed, so they are
interchangeable with the torch/Triton/CuPy paths behind the same API.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fastser.features.post import clamp_top_db, project


def _stack(items, frames: torch.Tensor, n_bins: int, like: torch.Tensor) -> torch.Tensor:
    dtype = torch.from_numpy(np.asarray(items[0][:0])).dtype if items else torch.float32
    out = torch.zeros(len(items), n_bins, int(frames.max()) if len(items) else 0, dtype=dtype)
    for b, item in enumerate(items):
        out[b, :, : item.shape[-1]] = torch.from_numpy(np.ascontiguousarray(item))
    return out.to(like.device)


def librosa_features(y: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor, cfg) -> torch.Tensor:
    """One librosa call per utterance, the way users run it today."""
    import librosa

    signals = y.detach().cpu().numpy()
    items = []
    for b in range(signals.shape[0]):
        x = signals[b, : int(lengths[b])]
        stft = dict(
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=cfg.window,
            center=cfg.center,
            pad_mode=cfg.pad_mode,
        )
        if cfg.kind == "spectrogram":
            S = librosa.stft(x, **stft)
            items.append(S if cfg.power is None else np.abs(S) ** cfg.power)
            continue
        M = librosa.feature.melspectrogram(
            y=x,
            sr=cfg.sr,
            power=cfg.power,
            n_mels=cfg.n_mels,
            fmin=cfg.fmin,
            fmax=cfg.fmax,
            htk=cfg.htk,
            norm=cfg.mel_norm,
            **stft,
        )
        if cfg.kind == "mel":
            items.append(M)
            continue
        D = librosa.power_to_db(M, ref=np.max if cfg.ref == "max" else cfg.ref, amin=cfg.amin, top_db=cfg.top_db)
        if cfg.kind == "logmel":
            items.append(D)
            continue
        items.append(
            librosa.feature.mfcc(S=D, n_mfcc=cfg.n_mfcc, dct_type=cfg.dct_type, norm=cfg.dct_norm, lifter=cfg.lifter)
        )
    return _stack(items, frames, cfg.n_bins, y)


# ----------------------------------------------------------------------------- DALI
# Differences from librosa, and what this backend does about them:
#  * padding: DALI pads centred windows with zeros (reflect_padding=False) or by reflection; the
#    "edge", "wrap" and "symmetric" pad modes have no DALI equivalent and raise.
#  * amin: DALI's to_decibels takes a cut-off in dB; cutoff_db = 10*log10(amin) is the same clamp.
#  * top_db: DALI has none; the clamp (per utterance, over its valid frames) and, when top_db is
#    set, the DCT run in torch on DALI's dB output. Without top_db, fn.mfcc does the DCT.
#  * the window is passed as samples (window_fn), so any scipy window works; DALI computes in fp32.
# Measured parity on CPU: within the tolerances of tests/features/test_functional.py (those of librosa).


@functools.lru_cache(maxsize=16)
def _dali_pipeline(cfg, batch_size: int, dct_in_dali: bool):
    from nvidia.dali import fn, pipeline_def, types
    from fastser.features.filters import analysis_window

    window = analysis_window(cfg.window, cfg.win_length, cfg.n_fft, torch.float64).tolist()

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, min(4, torch.get_num_threads())),
        device_id=None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipe():
        audio = fn.external_source(name="audio", dtype=types.FLOAT, ndim=1)
        out = fn.spectrogram(
            audio,
            nfft=cfg.n_fft,
            window_length=cfg.n_fft,
            window_step=cfg.hop_length,
            window_fn=window,
            center_windows=cfg.center,
            reflect_padding=cfg.pad_mode == "reflect",
            power=int(cfg.power),
            layout="ft",
        )
        if cfg.kind != "spectrogram":
            out = fn.mel_filter_bank(
                out,
                sample_rate=float(cfg.sr),
                nfilter=cfg.n_mels,
                freq_low=float(cfg.fmin),
                freq_high=float(cfg.fmax if cfg.fmax is not None else cfg.sr / 2),
                mel_formula="htk" if cfg.htk else "slaney",
                normalize=cfg.mel_norm == "slaney",
            )
        if cfg.kind in ("logmel", "mfcc"):
            # without `reference`, DALI uses the maximum of each utterance: librosa's ref=np.max
            ref = {} if cfg.ref == "max" else dict(reference=max(cfg.amin, abs(float(cfg.ref))))
            out = fn.to_decibels(out, multiplier=10.0, cutoff_db=10.0 * float(np.log10(cfg.amin)), **ref)
        if dct_in_dali:
            out = fn.mfcc(
                out,
                n_mfcc=cfg.n_mfcc,
                dct_type=cfg.dct_type,
                normalize=cfg.dct_norm == "ortho",
                axis=0,
                lifter=float(cfg.lifter),
            )
        return out

    p = pipe()
    p.build()
    return p


def dali_features(y: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor, cfg) -> torch.Tensor:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise RuntimeError("backend 'dali' needs NVIDIA DALI: pip install 'fastser[dali]'") from e
    if cfg.pad_mode not in ("constant", "reflect"):
        raise ValueError(f"backend 'dali' pads with zeros or by reflection only, not pad_mode={cfg.pad_mode!r}")
    if cfg.power not in (1.0, 2.0):
        raise ValueError(f"backend 'dali' supports power 1 or 2, got {cfg.power}")
    if cfg.mel_norm not in ("slaney", None):
        raise ValueError(f"backend 'dali' supports mel norm 'slaney' or None, got {cfg.mel_norm!r}")
    if cfg.kind == "mfcc" and cfg.dct_norm not in ("ortho", None):
        raise ValueError(f"backend 'dali' supports DCT norm 'ortho' or None, got {cfg.dct_norm!r}")

    dct_in_dali = cfg.kind == "mfcc" and cfg.top_db is None
    signals = y.detach().to("cpu", torch.float32).numpy()
    batch = [np.ascontiguousarray(signals[b, : int(lengths[b])]) for b in range(signals.shape[0])]
    pipe = _dali_pipeline(cfg, len(batch), dct_in_dali)
    pipe.feed_input("audio", batch)
    (out,) = pipe.run()
    out = _stack(
        [np.asarray(out[b]) for b in range(len(batch))],
        frames,
        cfg.n_mels if cfg.kind == "mfcc" and not dct_in_dali else cfg.n_bins,
        torch.empty(0),
    )
    f = frames.cpu()
    if cfg.kind in ("logmel", "mfcc") and cfg.top_db is not None:
        out = clamp_top_db(out, f, cfg.top_db)  # DALI already applied ref and amin
    if cfg.kind == "mfcc" and not dct_in_dali:
        from fastser.features.filters import dct_matrix, lifter_weights

        out = project(dct_matrix(cfg.n_mfcc, cfg.n_mels, cfg.dct_type, cfg.dct_norm), out)
        out = out * lifter_weights(cfg.n_mfcc, cfg.lifter)[:, None]
        out = out.masked_fill(torch.arange(out.shape[-1])[None, None, :] >= f[:, None, None], 0.0)
    return out.to(y.device)
