import librosa
import numpy as np
import pytest
import torch

from fastser.features import MFCC, MelSpectrogram, Spectrogram
from fastser.features import functional as F
from tests.features.signals import SR, make_signals, pad_batch

SIGNALS = make_signals(1)
KW = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40)


def test_modules_equal_functional():
    x = torch.from_numpy(SIGNALS["chirp"])
    assert torch.equal(Spectrogram(n_fft=512, hop_length=160)(x), F.spectrogram(x, n_fft=512, hop_length=160))
    assert torch.equal(MelSpectrogram(**KW)(x), F.melspectrogram(x, **KW))
    assert torch.equal(MelSpectrogram(**KW, to_db=True, top_db=60)(x), F.log_melspectrogram(x, **KW, top_db=60))
    assert torch.equal(MFCC(n_mfcc=13, lifter=22, **KW)(x), F.mfcc(x, n_mfcc=13, lifter=22, **KW))


def test_module_batch_with_lengths_and_frame_count():
    batch, lengths = pad_batch([SIGNALS["odd"], SIGNALS["short"], SIGNALS["tones"]])
    mfcc = MFCC(n_mfcc=20, **KW)
    out, frames = mfcc(torch.from_numpy(batch), torch.from_numpy(lengths))
    assert out.shape == (3, 20, int(frames.max()))
    assert torch.equal(frames, mfcc.frames(torch.from_numpy(lengths)))
    ref = librosa.feature.mfcc(y=SIGNALS["odd"], n_mfcc=20, **KW)
    assert np.abs(out[0, :, : frames[0]].numpy() - ref).max() <= 1e-3 * np.ptp(ref)


def test_buffers_move_with_the_module_and_are_not_in_the_state_dict():
    m = MFCC(**KW)
    names = {n for n, _ in m.named_buffers()}
    assert names == {"window", "fb", "dct", "lift"}
    assert m.state_dict() == {}  # derived from the config; a checkpoint need not carry them
    m = m.to(torch.float64)
    assert m.fb.dtype == torch.float64


def test_usable_as_the_first_layer_of_a_model():
    model = torch.nn.Sequential(MelSpectrogram(**KW, to_db=True), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.from_numpy(np.stack([SIGNALS["white"], SIGNALS["pink"]]))
    assert model(x).shape == (2, 3)
    assert "n_mels=40" in repr(model[0])


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_triton_backend_module(kind):
    mod = MelSpectrogram(**KW, to_db=True, backend="triton") if kind == "logmel" else MFCC(**KW, backend="triton")
    ref = MelSpectrogram(**KW, to_db=True, backend="librosa") if kind == "logmel" else MFCC(**KW, backend="librosa")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernel runs interpreted
    x = torch.from_numpy(SIGNALS["tones"])
    torch.testing.assert_close(mod.to(device)(x.to(device)).cpu(), ref(x), atol=1e-3, rtol=1e-5)


def test_autograd_through_the_torch_backend_and_auto():
    """As a model's first layer: gradients flow (float64 gradcheck), and "auto" picks the torch path."""
    x = torch.from_numpy(SIGNALS["white"][:2000]).double().requires_grad_()  # energy in every bin: no log near amin
    for module in (MelSpectrogram(**KW, to_db=True, top_db=None), MFCC(n_mfcc=13, **KW, top_db=None)):
        module = module.double()
        assert torch.autograd.gradcheck(lambda y: module(y).sum(0)[:3], (x,), eps=1e-6, atol=1e-3, rtol=1e-3)
    y = torch.from_numpy(SIGNALS["tones"]).requires_grad_()
    MFCC(**KW)(y).square().sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpp", "triton", "librosa"])
def test_backends_without_autograd_refuse_audio_that_requires_grad(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    module = MelSpectrogram(**KW, to_db=True, backend=backend).to(device)
    y = torch.from_numpy(SIGNALS["tones"]).to(device).requires_grad_()
    with pytest.raises(ValueError, match="does not propagate gradients"):
        module(y)
    assert module(y.detach()).requires_grad is False
