"""Feature extraction throughput: clips of 3 s at 16 kHz, n_fft 512, hop 160, 40 mels / 40 MFCCs.

Cases (the group): "mfcc"/"logmel", 256 clips of equal length; "...-lengths", the same 256 clips
with lengths from 1.5 to 3 s (fastser frames each clip from its own samples; librosa's loop gets each
clip trimmed, torchaudio, which has no lengths, the padded batch); on a GPU "...-2048", 2048 clips.

Baseline: librosa one utterance at a time (how users run it); at 2048 clips on a GPU, torchaudio's
GPU transforms (the loop would take minutes and is not the comparison that matters there). Also
measured: librosa given the whole batch as one 2-D array; fastser's default backend ("fastser": on
the CPU torch's FFT + the fused C++ post kernel, on a GPU torch.stft + the fused Triton kernels),
its plain-torch backend (the one with autograd), and on a GPU the explicit Triton and CuPy backends.
Targets, on "fastser": CPU >= 2x the loop and faster than librosa-batch; GPU >= 1000x
the loop and >= 1.5x torchaudio at 256 and 2048 clips, peak extra memory no more than torchaudio's.
"""

import numpy as np
import pytest
import torch

from benchmarks import _harness
from fastser.features import functional as F

N_CLIPS, SR, SECONDS = 256, 16000, 3.0
KW = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40)
CASES = {"": (N_CLIPS, False), "-lengths": (N_CLIPS, True), "-2048": (2048, False)}


def make_clips(n):
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * SECONDS)) / SR
    f0 = rng.uniform(100, 300, (n, 1))
    voiced = np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    clips = (0.3 * voiced + 0.05 * rng.standard_normal((n, t.size))).astype(np.float32)
    return clips, rng.integers(int(SR * SECONDS / 2), t.size + 1, n)


@pytest.fixture(scope="module")
def clip_sets():
    return {n: make_clips(n) for n in {n for n, _ in CASES.values()}}


def _impl_fn(impl, kind, clips, lengths, device):
    import librosa

    def librosa_one(x):
        if kind == "mfcc":
            return librosa.feature.mfcc(y=x, n_mfcc=40, **KW)
        return librosa.power_to_db(librosa.feature.melspectrogram(y=x, **KW))

    if impl == "librosa-loop":
        items = [x[:n] for x, n in zip(clips, lengths)] if lengths is not None else list(clips)
        return lambda: [librosa_one(x) for x in items]
    if impl == "librosa-batch":
        return lambda: librosa_one(clips)
    x = torch.from_numpy(clips).to(device)
    lens = torch.from_numpy(lengths).to(device) if lengths is not None else None
    if impl == "torchaudio":
        import torchaudio

        mel_kw = dict(n_fft=512, hop_length=160, n_mels=40, norm="slaney", mel_scale="slaney")
        if kind == "mfcc":
            tf = torchaudio.transforms.MFCC(SR, n_mfcc=40, melkwargs=mel_kw).to(device)
        else:
            tf = torch.nn.Sequential(
                torchaudio.transforms.MelSpectrogram(SR, **mel_kw),
                torchaudio.transforms.AmplitudeToDB("power", top_db=80),
            ).to(device)
        return lambda: tf(x)
    backend = {"fastser": "auto", "fastser-torch": "torch", "fastser-triton": "triton", "fastser-cupy": "cupy"}[impl]
    if kind == "mfcc":
        return lambda: F.mfcc(x, n_mfcc=40, backend=backend, lengths=lens, **KW)
    return lambda: F.log_melspectrogram(x, backend=backend, lengths=lens, **KW)


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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["mfcc", "logmel"])
@pytest.mark.parametrize(
    "impl",
    ["librosa-loop", "librosa-batch", "fastser", "fastser-torch", "fastser-triton", "fastser-cupy", "torchaudio"],
)
def test_feature_throughput(benchmark, device, clip_sets, impl, kind, case):
    n_clips, with_lengths = CASES[case]
    large = n_clips > N_CLIPS
    if not _available(impl, device):
        pytest.skip(f"{impl} does not run on {device} here")
    if large and (device.type != "cuda" or impl.startswith("librosa")):
        pytest.skip("2048 clips: GPU implementations only (the librosa loop would take minutes)")
    if with_lengths and impl == "librosa-batch":
        pytest.skip("librosa given a 2-D array has no per-clip lengths")
    clips, lengths = clip_sets[n_clips]
    fn = _impl_fn(impl, kind, clips, lengths if with_lengths else None, device)
    on_gpu = device.type == "cuda" and not impl.startswith("librosa")
    baseline = "torchaudio" if large else "librosa-loop"
    target, also = None, ()
    if impl == "fastser" and on_gpu:
        target = 1.5 if large else 1000.0
        also = () if large else (("torchaudio",) if with_lengths else ("librosa-batch", "torchaudio"))
    elif impl == "fastser":
        target, also = 2.0, (() if with_lengths else ("librosa-batch",))
    _harness.run(
        benchmark,
        fn,
        device if on_gpu else torch.device("cpu"),
        suite="features",
        group=kind + case,
        impl=impl,
        baseline=baseline,
        target=target,
        also_vs=also,
        extra={"utterances": n_clips, "clip_seconds": SECONDS, "lengths": with_lengths},
        budget_s=2.0,
    )
