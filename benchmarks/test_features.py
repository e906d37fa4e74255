"""Feature extraction throughput: 256 clips of 3 s at 16 kHz, n_fft 512, hop 160, 40 mels / 40 MFCCs.

Baseline: librosa one utterance at a time (how users run it). Also measured: librosa given the whole
batch as one 2-D array; fastser's default backend ("fastser": on the CPU torch's FFT + the fused C++
post kernel, on a GPU torch.stft + the fused Triton kernel), its plain-torch backend (the one with
autograd), and on a GPU the explicit Triton and CuPy backends and torchaudio's GPU transforms.
Targets (issue 4), on "fastser": CPU >= 2x the loop and faster than librosa-batch; GPU >= 1000x
the loop and >= 1.5x torchaudio.
"""
import numpy as np
import pytest
import torch

from benchmarks import _harness
from fastser.features import functional as F

N_CLIPS, SR, SECONDS = 256, 16000, 3.0
KW = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * SECONDS)) / SR
    f0 = rng.uniform(100, 300, (N_CLIPS, 1))
    voiced = np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * voiced + 0.05 * rng.standard_normal((N_CLIPS, t.size))).astype(np.float32)


def _impl_fn(impl, kind, clips, device):
    import librosa

    def librosa_one(x):
        if kind == "mfcc":
            return librosa.feature.mfcc(y=x, n_mfcc=40, **KW)
        return librosa.power_to_db(librosa.feature.melspectrogram(y=x, **KW))

    if impl == "librosa-loop":
        return lambda: [librosa_one(x) for x in clips]
    if impl == "librosa-batch":
        return lambda: librosa_one(clips)
    x = torch.from_numpy(clips).to(device)
    if impl == "torchaudio":
        import torchaudio
        mel_kw = dict(n_fft=512, hop_length=160, n_mels=40, norm="slaney", mel_scale="slaney")
        if kind == "mfcc":
            tf = torchaudio.transforms.MFCC(SR, n_mfcc=40, melkwargs=mel_kw).to(device)
        else:
            tf = torch.nn.Sequential(torchaudio.transforms.MelSpectrogram(SR, **mel_kw),
                                     torchaudio.transforms.AmplitudeToDB("power", top_db=80)).to(device)
        return lambda: tf(x)
    backend = {"fastser": "auto", "fastser-torch": "torch", "fastser-triton": "triton", "fastser-cupy": "cupy"}[impl]
    if kind == "mfcc":
        return lambda: F.mfcc(x, n_mfcc=40, backend=backend, **KW)
    return lambda: F.log_melspectrogram(x, backend=backend, **KW)


def _available(impl, device):
    if impl.startswith("librosa") or impl in ("fastser", "fastser-torch"):
        return True
    if device.type != "cuda":
        return False
    module = {"fastser-triton": "triton", "fastser-cupy": "cupy", "torchaudio": "torchaudio"}[impl]
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("kind", ["mfcc", "logmel"])
@pytest.mark.parametrize("impl", ["librosa-loop", "librosa-batch", "fastser", "fastser-torch", "fastser-triton",
                                  "fastser-cupy", "torchaudio"])
def test_feature_throughput(benchmark, device, clips, impl, kind):
    if not _available(impl, device):
        pytest.skip(f"{impl} does not run on {device} here")
    fn = _impl_fn(impl, kind, clips, device)
    on_gpu = device.type == "cuda" and not impl.startswith("librosa")
    target = None
    also = ()
    if impl == "fastser":
        target = 1000.0 if on_gpu else 2.0
        also = ("librosa-batch", "torchaudio") if on_gpu else ("librosa-batch",)
    _harness.run(benchmark, fn, device if on_gpu else torch.device("cpu"), suite="features", group=kind,
                 impl=impl, baseline="librosa-loop", target=target, also_vs=also,
                 extra={"utterances": N_CLIPS, "clip_seconds": SECONDS}, budget_s=2.0)
