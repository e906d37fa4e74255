"""How fastser.features.functional computes: framing each item from its own samples, the STFT,
the post-FFT chain (power, mel, dB, top_db, DCT) and one dispatch point for every backend,
`extract_many`.

Backends (one dispatch point, `extract_many`):
    "torch"   torch.stft and torch ops after it, any device; the only one that keeps gradients
    "cpp"     CPU: torch's FFT, then power -> mel -> dB -> top_db -> DCT in one fused C++ kernel
    "triton"  CUDA: cuFFT, then the same chain in two fused Triton kernels (no host sync); with a
              periodic Hann window over the whole frame the FFT reads the padded signal in place and
              the kernel applies the window (_unwindowed_stft), otherwise torch.stft
              (CPU tensors only under TRITON_INTERPRET=1, for the tests)
    "cupy"    CUDA: cupy.fft, shared with torch by DLPack, then the Triton kernel
    "dali"    an NVIDIA DALI pipeline;  "librosa": the reference, one utterance at a time
    "auto"    "triton" on CUDA, "cpp" on the CPU (where available), "torch" when the audio requires grad
Every backend but "torch" raises when the audio requires grad rather than silently drop the gradient.

NaN/Inf audio (`check_finite`): None (the default) checks on the CPU, where it is free and raises
before any work, and not on a GPU, where reading the answer would stall the stream: there NaN/Inf
samples give NaN features, as torchaudio's do (fastser's own readers reject such files when they
load them, fastser.audio). True checks everywhere (on a GPU one host read, after every kernel is
queued); False never checks.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from fastser.features import post
from fastser.features.feature_config import FeatureConfig, frame_count
from fastser.features.filters import analysis_window, dct_matrix, lifter_weights, mel_filterbank
from fastser.ops import mel_chain, registry

BACKENDS = ("auto", "torch", "cpp", "triton", "cupy", "dali", "librosa")


# ----------------------------------------------------------------------------- framing


def _frames_of(y: torch.Tensor, lengths: torch.Tensor, cfg: "FeatureConfig", uniform: bool, span_padding: bool = False):
    """(frame counts (B,), the output's frame count). `uniform`: every item has the padded length
    (no `lengths` given), so both come from the shape without reading the device — on a GPU a host
    synchronisation costs more than the fused kernels. `span_padding`: the output spans the padded
    length (its frames past the longest item are zeros), also without a device read — what a graph
    traced for any batch and length (torch.export, ONNX) needs."""
    if uniform or span_padding:
        n = frame_count(y.shape[-1], cfg.n_fft, cfg.hop_length, cfg.center)
        if uniform:
            return torch.full((y.shape[0],), n, dtype=torch.int64, device=y.device), n
        return frame_count(lengths, cfg.n_fft, cfg.hop_length, cfg.center), n
    frames = frame_count(lengths, cfg.n_fft, cfg.hop_length, cfg.center)
    return frames, int(frames.max()) if len(frames) else 0


def _source_index(pos: torch.Tensor, L: torch.Tensor, pad_mode: str):
    """The sample that padded position `pos` (relative to the item's start) reads, and whether it is
    read at all (False: a zero of constant padding). pos (B, n), L (B, 1)."""
    inside = (pos >= 0) & (pos < L)
    if pad_mode == "constant":
        idx = pos
    elif pad_mode == "edge":
        idx = pos.clamp(min=0).minimum(L - 1)
    elif pad_mode == "wrap":
        idx = torch.remainder(pos, L)
    elif pad_mode == "reflect":  # numpy's reflect, repeated for pads longer than the signal
        period = (2 * (L - 1)).clamp(min=1)
        m = torch.remainder(pos, period)
        idx = torch.where(L == 1, torch.zeros_like(m), torch.where(m < L, m, period - m))
    else:  # symmetric
        m = torch.remainder(pos, 2 * L)
        idx = torch.where(m < L, m, 2 * L - 1 - m)
    keep = inside if pad_mode == "constant" else torch.ones_like(inside)
    return idx.clamp(min=0), keep


def _zero_past_lengths(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """y (B, T) with each item's samples at or past lengths[b] set to zero."""
    return torch.where(torch.arange(y.shape[1], device=y.device)[None, :] < lengths[:, None], y, y.new_zeros(()))


def _padded_signal(y: torch.Tensor, lengths: Optional[torch.Tensor], max_frames: Optional[int], cfg: FeatureConfig):
    """(B, (max_frames - 1) * hop + n_fft) signals, each padded from its own samples only (lengths
    None: every item fills the batch's length);
    max_frames None (centred frames only): the padded batch with `pad` more samples on each side,
    its length a function of the input's alone (no slicing a traced graph would have to prove).

    Valid frames of item b read padded positions [0, L_b + 2 * pad): its left pad, its samples and
    its right pad. Zero padding masks the samples past each length; the other modes write only
    those two pads (B x pad values): whatever lies further right (another length's padding,
    garbage) only reaches frames that are zeroed afterwards."""
    B, T = y.shape
    pad = cfg.n_fft // 2 if cfg.center else 0
    if pad and cfg.pad_mode == "constant":
        # zero padding: mask each item's samples past its length, then pad the batch with zeros — the
        # same signal as writing the two pads, in three small ops instead of two gather/scatter chains.
        # lengths None: every item has the padded length, nothing to mask (a pass over the batch saved)
        if lengths is not None:
            y = _zero_past_lengths(y, lengths)
        if max_frames is None:
            return torch.nn.functional.pad(y, (pad, pad))
        n_out = (max_frames - 1) * cfg.hop_length + cfg.n_fft
        return torch.nn.functional.pad(y, (pad, max(pad, n_out - pad - T)))[:, :n_out]
    if max_frames is None:
        out = torch.nn.functional.pad(y, (pad, pad))
    else:
        n_out = (max_frames - 1) * cfg.hop_length + cfg.n_fft
        out = torch.nn.functional.pad(y, (pad, max(0, n_out + pad - T - pad)))[:, : n_out + pad]
        if pad == 0:
            return out[:, :n_out]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=y.device)
    L = lengths[:, None]
    j = torch.arange(pad, device=y.device)[None, :]
    for pos, dest in ((j - pad, j.expand(B, pad)), (L + j, L + pad + j)):
        idx, keep = _source_index(pos.expand(B, pad), L, cfg.pad_mode)
        values = torch.where(keep, y.gather(1, idx.clamp(max=T - 1)), y.new_zeros(()))
        out.scatter_(1, dest, values)
    return out if max_frames is None else out[:, :n_out]


# ----------------------------------------------------------------------------- constant tensors


@functools.lru_cache(maxsize=64)
def _constants_cpu(cfg: FeatureConfig):
    # float64 window: cast to the signal's dtype at use, so float64 audio gets a float64 STFT
    const = {"window": analysis_window(cfg.window, cfg.win_length, cfg.n_fft, torch.float64)}
    if cfg.kind != "spectrogram":
        const["fb"] = mel_filterbank(cfg.sr, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.htk, cfg.mel_norm)
    if cfg.kind == "mfcc":
        const["dct"] = dct_matrix(cfg.n_mfcc, cfg.n_mels, cfg.dct_type, cfg.dct_norm)
        const["lift"] = lifter_weights(cfg.n_mfcc, cfg.lifter)
    return const


@functools.lru_cache(maxsize=64)
def constants(cfg: FeatureConfig, device: torch.device) -> dict:
    """The config's window, filters and DCT on `device`, copied there once (a host-to-device copy per
    call would cost more than the fused kernels on a GPU). Shared: callers must not modify them."""
    return {k: v.to(device) for k, v in _constants_cpu(cfg).items()}


@functools.lru_cache(maxsize=64)
def window_in(cfg: FeatureConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The analysis window in the signal's dtype, cast once (not a cast kernel on every call)."""
    return constants(cfg, device)["window"].to(dtype)


# ----------------------------------------------------------------------------- STFT backends


def _stft_torch(signal: torch.Tensor, window: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    return torch.stft(signal, cfg.n_fft, cfg.hop_length, window=window, center=False, return_complex=True)


def _hann_folds(cfg: FeatureConfig) -> bool:
    """Whether the fused kernels can apply the window in the frequency domain: a periodic Hann
    window over the whole frame, and padding that is zeros (or none)."""
    return cfg.window == "hann" and cfg.win_length == cfg.n_fft and (cfg.pad_mode == "constant" or not cfg.center)


def _unwindowed_stft(y: torch.Tensor, lengths: Optional[torch.Tensor], n_frames: int, cfg: FeatureConfig):
    """(B, F, n_frames) complex STFT of the zero-padded frames without a window, frame-major, taken
    straight from the padded signal: no (B, frames, n_fft) copy of the overlapping frames is ever
    written (the window multiply and a reshape of the framed view would each write one).

    Each item's padded signal is laid out in a row of `rows * hop` samples, so that frame t of item b
    starts at (b * rows + t) * hop: the framed view then has one batch dimension of stride hop, which
    the FFT (cuFFT's advanced layout, pocketfft alike) reads in place. The rows' spare frames (the
    last ones of a row run into the next row; a spare zero row follows the last item) are dropped."""
    B = y.shape[0]
    n_fft, hop = cfg.n_fft, cfg.hop_length
    pad = n_fft // 2 if cfg.center else 0
    need = (n_frames - 1) * hop + n_fft  # padded samples the output's frames read
    rows = n_frames - 1 - (-n_fft // hop)  # frames per row (n_frames - 1 + ceil(n_fft / hop)): a row holds `need`
    if lengths is not None:
        y = _zero_past_lengths(y, lengths)
    y = y[:, : need - pad]
    signal = torch.nn.functional.pad(y, (pad, rows * hop - pad - y.shape[1], 0, 1))  # (B + 1, rows * hop)
    frames = signal.as_strided((B, rows, n_fft), (rows * hop, hop, 1))
    return torch.fft.rfft(frames)[:, :n_frames].transpose(1, 2)


def _stft_cupy(signal: torch.Tensor, window: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("backend 'cupy' needs CuPy: pip install 'fastser[cupy]'") from e
    if not signal.is_cuda:
        raise ValueError("backend 'cupy' needs CUDA tensors")
    frames = signal.unfold(1, cfg.n_fft, cfg.hop_length) * window  # (B, T, n_fft), a view then one product
    spec = cupy.fft.rfft(cupy.from_dlpack(frames.contiguous()), axis=-1)
    return torch.from_dlpack(spec).transpose(1, 2)  # zero-copy back to torch: (B, F, T)


# ----------------------------------------------------------------------------- post-processing


def _post_torch(spec: torch.Tensor, frames: torch.Tensor, cfg: FeatureConfig, const: dict) -> torch.Tensor:
    return post.post_chain(spec, frames, cfg, const)


def _post_triton(spec: torch.Tensor, frames: torch.Tensor, cfg: FeatureConfig, const: dict) -> torch.Tensor:
    if cfg.kind == "spectrogram":  # nothing to fuse: one elementwise op
        return post.post_chain(spec, frames, cfg, const)
    from fastser.ops import mel_chain

    return mel_chain.triton(spec, frames, cfg, const)


# ----------------------------------------------------------------------------- dispatch


def resolve_backend(backend: str, device: torch.device, requires_grad: bool = False) -> str:
    """The feature backend that `backend` means on `device`: "torch", "cpp" and "triton" are the
    post-FFT chain's implementations, chosen by fastser.ops.registry ("auto": with autograd "torch",
    else the device's fused kernel where it is usable); "cupy", "dali" and "librosa" are whole
    pipelines of their own, never chosen by "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cupy", "dali", "librosa"):
        if requires_grad:
            raise ValueError(
                f"backend {backend!r} does not propagate gradients; the audio requires grad, so use "
                f"backend='torch' (or 'auto', which picks it)"
            )
        return backend
    return registry.choose("mel_chain", backend, device, requires_grad=requires_grad)


STFT_FIELDS = ("n_fft", "hop_length", "win_length", "window", "center", "pad_mode")


def extract(
    y: torch.Tensor,
    lengths: torch.Tensor,
    cfg: FeatureConfig,
    backend: str,
    const: Optional[dict] = None,
    uniform: bool = False,
):
    """(B, T) float signals + lengths -> ((B, bins, frames) features, frames (B,)). The one dispatch point."""
    outs, frames = extract_many(y, lengths, [cfg], backend, [const] if const is not None else None, uniform)
    return outs[0], frames


def extract_many(
    y: torch.Tensor,
    lengths: torch.Tensor,
    cfgs: list,
    backend: str = "auto",
    consts: Optional[list] = None,
    uniform: bool = False,
    span_padding: bool = False,
):
    """Several features of the same audio; configs that share the STFT settings share one STFT.
    uniform: every length is the padded length (the caller passed none), known without a device read.
    span_padding: the output spans the padded length rather than the longest item (see _frames_of)."""
    stft = {tuple(getattr(c, f) for f in STFT_FIELDS) for c in cfgs}
    if len(stft) != 1:
        raise ValueError(
            "extract_many needs configs with the same STFT settings "
            f"({', '.join(STFT_FIELDS)}); call it once per setting"
        )
    cfg0 = cfgs[0]
    frames, max_frames = _frames_of(y, lengths, cfg0, uniform, span_padding)
    if lengths.device != y.device:  # host-side lengths, counted there for free: the device gets copies
        lengths, frames = lengths.to(y.device, non_blocking=True), frames.to(y.device, non_blocking=True)
    backend = resolve_backend(backend, y.device, y.requires_grad)
    if backend in ("librosa", "dali"):
        from fastser.features import backends

        fn = backends.librosa_features if backend == "librosa" else backends.dali_features
        return [fn(y, lengths, frames, c) for c in cfgs], frames
    window = consts[0]["window"].to(y.dtype) if consts is not None else window_in(cfg0, y.device, y.dtype)
    consts = consts if consts is not None else [constants(c, y.device) for c in cfgs]
    if backend == "cpp" and all(_cpu_fused_ok(y, c) for c in cfgs):
        return _extract_cpu_fused(y, lengths, frames, max_frames, cfgs, consts, window), frames
    if backend == "triton" and _hann_folds(cfg0) and all(c.kind != "spectrogram" for c in cfgs):
        spec = _unwindowed_stft(y, None if uniform else lengths, max_frames, cfg0)
        return [mel_chain.triton(spec, frames, c, k, hann_fold=True) for c, k in zip(cfgs, consts)], frames
    signal = _padded_signal(y, None if uniform else lengths, None if span_padding and cfg0.center else max_frames, cfg0)
    spec = (_stft_cupy if backend == "cupy" else _stft_torch)(signal, window, cfg0)
    post = _post_triton if backend == "triton" or (backend == "cupy" and registry.triton_importable()) else _post_torch
    return [post(spec, frames, c, k) for c, k in zip(cfgs, consts)], frames


def _cpu_fused_ok(signal: torch.Tensor, cfg: FeatureConfig) -> bool:
    """What the C++ kernel covers: the mel chain on float32 audio (a plain spectrogram is one
    elementwise op and float64 audio stays float64: those run on torch's ops under 'cpp' too)."""
    return cfg.kind != "spectrogram" and cfg.power is not None and signal.dtype == torch.float32


def _extract_cpu_fused(
    y: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor, T: int, cfgs: list, consts: list, window: torch.Tensor
):
    """CPU: pad -> frames -> rfft -> the fused C++ post kernel (once per config), a few utterances at a
    time, so that a chunk's signal and complex spectrum stay in cache and no batch-sized temporary is
    ever built. T: the batch's largest frame count (the output's length); window: float32."""
    B = y.shape[0]
    cfg0 = cfgs[0]
    # the C++ kernel computes in float32 (a module moved to float64 keeps float64 buffers)
    consts_f32 = [{k: v.to(torch.float32).contiguous() for k, v in c.items() if k != "window"} for c in consts]
    frames = frames.contiguous()
    outs = []
    for cfg in cfgs:
        mel = torch.empty(B, cfg.n_mels, T)
        outs.append((mel, torch.empty(B, cfg.n_mfcc, T) if cfg.kind == "mfcc" else None))
    chunk = max(1, (1 << 21) // (T * cfg0.n_fft))
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        # every chunk is padded to the batch's frame count, so its frames line up with the output
        signal = _padded_signal(y[b0:b1], lengths[b0:b1], T, cfg0)
        spec = torch.fft.rfft(signal.unfold(1, cfg0.n_fft, cfg0.hop_length) * window)
        for cfg, f32, (mel, ceps) in zip(cfgs, consts_f32, outs):
            mel_chain.cpp(
                spec, frames[b0:b1], cfg, f32, mel_out=mel[b0:b1], mfcc_out=ceps[b0:b1] if ceps is not None else None
            )
    return [ceps if ceps is not None else mel for mel, ceps in outs]


def prepare(y, lengths=None, check_finite: Optional[bool] = None):
    """-> (float (B, T) tensor, lengths (B,) int64 tensor, restore) where restore(out) undoes the
    batching/NumPy conversion on an output (…, bins, frames).

    check_finite (see the module's docstring): on the CPU the check raises here; on a GPU (True)
    it is read back in `restore`, so the host queues every kernel before it waits (same error,
    raised before any output is returned). The caller must then call `restore`."""
    was_numpy = isinstance(y, np.ndarray)
    if not isinstance(y, (torch.Tensor, np.ndarray)):
        raise TypeError(f"audio must be a torch tensor or a NumPy array, got {type(y).__name__}")
    t = torch.from_numpy(np.ascontiguousarray(y)) if was_numpy else y
    if not t.is_floating_point():
        raise TypeError(f"audio must be floating point (convert integer PCM first), got {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"audio must be 1-D (samples,) or 2-D (batch, samples), got shape {tuple(t.shape)}")
    single = t.dim() == 1
    if single:
        t = t[None]
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    B, T = t.shape
    if lengths is None:  # checked on the host: no device read for the usual fixed-length batch
        if B and T < 1:
            raise ValueError("empty signal: item 0 has length 0")
        lengths = torch.full((B,), T, dtype=torch.int64, device=t.device)
    else:
        # kept where they are: on the host (a list, an array, a CPU tensor) the checks and the frame
        # counts read nothing from the device; lengths on a GPU cost one read here
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B and not bool(((lengths >= 1) & (lengths <= T)).all()):  # one read for both checks
            if (lengths > T).any():
                raise ValueError(f"lengths exceed the padded length {T}: {lengths.max().item()}")
            raise ValueError(f"empty signal: item {int((lengths < 1).nonzero()[0, 0])} has length 0")
    check = t.device.type == "cpu" if check_finite is None else bool(check_finite)
    finite_sum = torch.isfinite(t.sum()) if check else None  # one pass, no temporary; the full scan only if it fails

    def check_finite_now():
        if not finite_sum and not torch.isfinite(t).all():
            raise ValueError("audio contains NaN or Inf")

    deferred = check and t.device.type != "cpu"
    if check and not deferred:
        check_finite_now()

    def restore(out: torch.Tensor):
        if deferred:
            check_finite_now()
        out = out[0] if single else out
        return out.cpu().numpy() if was_numpy else out

    return t, lengths, restore


def compute(y, lengths, cfg: FeatureConfig, backend: str, check_finite: Optional[bool]):
    """One feature of audio as the public functions take it (1-D or (B, T), NumPy or torch, with or
    without lengths) and return it (the input's kind; with lengths, also the frame counts)."""
    t, lens, restore = prepare(y, lengths, check_finite)
    out, frames = extract(t, lens, cfg, backend, uniform=lengths is None)
    if lengths is None:
        return restore(out)
    return restore(out), (frames.cpu().numpy() if isinstance(y, np.ndarray) else frames)
