import warnings

import librosa
import numpy as np
import pytest
import torch

from fastser.features import functional as F
from tests.features.signals import SR, make_signals, pad_batch

# The settings of the paper's pipeline (and of the benchmark): 32 ms window, 10 ms hop, 40 mels.
KW = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40)
SIGNALS = make_signals()


def installed_backends():
    names = ["torch", "librosa"]
    from fastser.ops import _native

    if _native.cpu_has_mel_chain():
        names.append("cpp")
    try:
        import triton  # noqa: F401

        names.append("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET=1)
    except ImportError:
        pass
    try:
        import nvidia.dali  # noqa: F401

        names.append("dali")
    except ImportError:
        pass
    if torch.cuda.is_available():
        try:
            import cupy  # noqa: F401

            names.append("cupy")
        except ImportError:
            pass
    return names


BACKENDS = installed_backends()


def device_for(backend):
    return "cuda" if backend == "cupy" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def run(fn, x, backend, **kw):
    xt = torch.from_numpy(x).to(device_for(backend))
    out = getattr(F, fn)(xt, backend=backend, **kw)
    if isinstance(out, tuple):
        return out[0].cpu().numpy(), out[1].cpu().numpy()
    return out.cpu().numpy()


def librosa_logmel(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_fft too large" for the short clip
        return librosa.power_to_db(librosa.feature.melspectrogram(y=x, **kw))


def assert_logmel_close(ours, ref):
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    assert np.median(err) <= 0.01, np.median(err)
    assert np.percentile(err, 99.9) <= 0.1, np.percentile(err, 99.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SIGNALS))
def test_log_mel_matches_librosa(backend, name):
    x = SIGNALS[name]
    assert_logmel_close(run("log_melspectrogram", x, backend, **KW), librosa_logmel(x, **KW))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SIGNALS))
def test_mfcc_matches_librosa(backend, name):
    x = SIGNALS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = librosa.feature.mfcc(y=x, n_mfcc=40, **KW)
    ours = run("mfcc", x, backend, n_mfcc=40, **KW)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3 * np.ptp(ref)


def librosa_power(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.abs(librosa.stft(x, n_fft=512, hop_length=160)) ** 2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("dali", "cupy")])
@pytest.mark.parametrize("name", ["chirp", "white", "impulses", "short", "odd"])
def test_power_spectrogram_matches_librosa_float64(backend, name):
    # The criterion verbatim: relative error < 1e-4 wherever power > amin * 1e3 = 1e-7.
    # Bins 90 dB under their frame's peak are below float32 FFT rounding, so this runs in float64
    # (the torch paths keep float64 input in float64, as librosa does).
    x = SIGNALS[name].astype(np.float64)
    ref = librosa_power(x)
    ours = run("spectrogram", x, backend, n_fft=512, hop_length=160)
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    loud = ref > 1e-10 * 1e3
    assert loud.sum() > 100  # the comparison covers real content, not a handful of bins
    assert (np.abs(ours - ref)[loud] / ref[loud]).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["chirp", "white", "impulses", "short", "odd"])
def test_power_spectrogram_matches_librosa_float32(backend, name):
    # float32 (every backend, as librosa on float32 audio), wherever the bin is within 60 dB of the
    # utterance's peak. A float32 FFT's error is ~eps32 of the frame's peak amplitude; 60 dB down
    # (1e-3 in amplitude) that is ~1e3 * eps32 = 1.2e-4 of the bin's amplitude, 2.4e-4 of its power.
    # Measured: 5.9e-5 (pocketfft, CPU), 1.08e-4 (cuFFT, H100): the bound is 2.5e-4 on every device.
    x = SIGNALS[name]
    ref = librosa_power(x)
    ours = run("spectrogram", x, backend, n_fft=512, hop_length=160)
    assert ours.shape == ref.shape
    loud = ref > max(1e-7, 1e-6 * ref.max())
    assert loud.sum() > 100
    assert (np.abs(ours - ref)[loud] / ref[loud]).max() < 2.5e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(n_fft=400, win_length=320, window="hamming"),
        dict(center=False),
        dict(pad_mode="reflect"),
        dict(htk=True, fmin=60.0, fmax=7600.0, norm=None),
        dict(power=1.0, ref=np.max, top_db=60.0),
        dict(ref=10.0, amin=1e-5, top_db=None),
    ],
)
def test_librosa_options(backend, options):
    x = SIGNALS["chirp"] + SIGNALS["white"]
    kw = {**KW, **options}
    db = {k: kw.pop(k) for k in ("ref", "amin", "top_db") if k in kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = librosa.power_to_db(librosa.feature.melspectrogram(y=x, **kw), **db)
    assert_logmel_close(run("log_melspectrogram", x, backend, **kw, **db), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mfcc_lifter_dct_options(backend):
    x = SIGNALS["pink"]
    for opts in (dict(lifter=22), dict(dct_type=3, norm=None, top_db=None), dict(top_db=None, lifter=10)):
        ref = (
            librosa.feature.mfcc(y=x, n_mfcc=13, **KW, **{k: v for k, v in opts.items() if k != "top_db"})
            if "top_db" not in opts
            else librosa.feature.mfcc(
                S=librosa.power_to_db(librosa.feature.melspectrogram(y=x, **KW), top_db=None),
                n_mfcc=13,
                **{k: v for k, v in opts.items() if k != "top_db"},
            )
        )
        if backend == "dali" and opts.get("dct_type") == 3:
            with pytest.raises(Exception):  # DALI's DCT-III is defined differently; fastser refuses or differs
                ours = run("mfcc", x, backend, n_mfcc=13, **KW, **opts)
                assert np.abs(ours - ref).max() <= 1e-3 * np.ptp(ref)
            continue
        ours = run("mfcc", x, backend, n_mfcc=13, **KW, **opts)
        assert np.abs(ours - ref).max() <= 1e-3 * np.ptp(ref), opts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["spectrogram", "log_melspectrogram", "mfcc"])
@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_batch_with_lengths_equals_per_item_calls_exactly(backend, fn, pad_mode):
    items = [SIGNALS["chirp"], SIGNALS["short"], SIGNALS["odd"], SIGNALS["white"][:7001]]
    batch, lengths = pad_batch(items)
    batch[1, lengths[1] :] = 123.0  # garbage in the padding must never reach another item's frames
    kw = dict(n_fft=512, hop_length=160, pad_mode=pad_mode)
    if fn != "spectrogram":
        kw.update(sr=SR, n_mels=40)
    out, frames = run(fn, batch, backend, lengths=lengths, **kw)
    assert out.shape[0] == len(items) and out.shape[-1] == frames.max()
    for i, x in enumerate(items):
        single = run(fn, x, backend, **kw)
        assert frames[i] == single.shape[-1] == 1 + len(x) // 160
        np.testing.assert_array_equal(out[i, :, : frames[i]], single)
        assert not np.any(out[i, :, frames[i] :]), "padded frames must be zero"


@pytest.mark.parametrize("pad_mode", ["edge", "symmetric", "wrap"])
def test_other_pad_modes_pad_each_item_from_its_own_samples(pad_mode):
    items = [SIGNALS["odd"], SIGNALS["short"]]
    batch, lengths = pad_batch(items)
    out, frames = F.spectrogram(batch, n_fft=512, hop_length=160, pad_mode=pad_mode, lengths=lengths)
    for i, x in enumerate(items):
        np.testing.assert_array_equal(
            out[i, :, : frames[i]], F.spectrogram(x, n_fft=512, hop_length=160, pad_mode=pad_mode)
        )
        if pad_mode != "wrap":  # librosa.stft refuses "wrap"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = np.abs(librosa.stft(x, n_fft=512, hop_length=160, pad_mode=pad_mode)) ** 2
            np.testing.assert_allclose(out[i, :, : frames[i]], ref, rtol=1e-4, atol=1e-6)


def test_top_db_and_ref_max_are_per_utterance():
    loud, quiet = SIGNALS["chirp"], 1e-3 * SIGNALS["white"][: len(SIGNALS["chirp"])]
    batch, lengths = pad_batch([loud, quiet])
    out, _ = F.log_melspectrogram(batch, lengths=lengths, ref=np.max, **KW)
    for i, x in enumerate([loud, quiet]):
        ref = librosa.power_to_db(librosa.feature.melspectrogram(y=x, **KW), ref=np.max)
        assert_logmel_close(out[i], ref)
        assert out[i].max() == 0.0 and out[i].min() >= -80.0


def test_power_to_db_matches_librosa():
    S = np.abs(librosa.stft(SIGNALS["tones"], n_fft=512)) ** 2
    for kw in (dict(), dict(ref=np.max), dict(ref=3.0, amin=1e-6, top_db=40.0), dict(top_db=None)):
        np.testing.assert_allclose(F.power_to_db(S, **kw), librosa.power_to_db(S, **kw), atol=1e-4)


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    x = SIGNALS["tones"]
    assert isinstance(F.mfcc(x, **KW), np.ndarray)
    out = F.mfcc(torch.from_numpy(x), **KW)
    assert isinstance(out, torch.Tensor) and out.shape == (20, 1 + len(x) // 160)


def test_librosa_defaults():
    x = SIGNALS["chirp"]
    ours = F.log_melspectrogram(x)
    ref = librosa.power_to_db(librosa.feature.melspectrogram(y=x))  # sr 22050, n_fft 2048, hop 512, 128 mels
    assert_logmel_close(ours, ref)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(y=np.zeros(0, np.float32)), "empty signal"),
        (dict(y=np.zeros((2, 3, 4), np.float32)), "1-D"),
        (dict(y=np.zeros(100, np.int16)), "floating point"),
        (dict(y=np.array([0.0, np.nan, 1.0], np.float32)), "NaN"),
        (dict(y=[0.0, 1.0]), "torch tensor or a NumPy array"),
        (dict(y=np.zeros((2, 100), np.float32), lengths=[100, 101]), "exceed"),
        (dict(y=np.zeros((2, 100), np.float32), lengths=[100]), "lengths must have shape"),
        (dict(y=np.zeros(100, np.float32), pad_mode="bogus"), "pad_mode"),
        (dict(y=np.zeros(100, np.float32), center=False), "at least n_fft"),
        (dict(y=np.zeros(100, np.float32), backend="nope"), "backend"),
        (dict(y=np.zeros(100, np.float32), amin=0.0), "amin"),
        (dict(y=np.zeros(100, np.float32), n_mfcc=200), "n_mfcc"),
    ],
)
def test_bad_input_raises_clear_error(bad, match):
    y = bad.pop("y")
    with pytest.raises((ValueError, TypeError), match=match):
        F.mfcc(y, sr=SR, n_fft=512, **bad)


def test_check_finite_false_skips_the_check_and_nan_audio_gives_nan_features():
    """The CPU checks by default (free there); check_finite=False leaves NaN audio to the features,
    the item's own frames only (a batch's other items are untouched)."""
    y = np.stack([SIGNALS["chirp"][:4000]] * 2).astype(np.float32)
    y[1, 50] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.mfcc(y, sr=SR, n_fft=512, hop_length=160)
    for backend in ("torch", "cpp"):
        out = F.mfcc(y, sr=SR, n_fft=512, hop_length=160, check_finite=False, backend=backend)
        assert np.isfinite(out[0]).all() and np.isnan(out[1]).any(), backend
        again = F.mfcc(y[:1], sr=SR, n_fft=512, hop_length=160, check_finite=False, backend=backend)
        np.testing.assert_array_equal(out[:1], again)


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.mark.parametrize("fn", ["log_melspectrogram", "mfcc"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_features_read_the_device_once_without_lengths(fn, with_lengths, monkeypatch):
    """On a GPU every value read back to the host stalls the stream. A fixed-length batch needs one
        read on the CPU (the NaN/Inf check, which a GPU makes only with check_finite=True); lengths add
        one for their range check and one for the longest frame count, which sizes the output. Counted on
        the torch backend's path, which shares everything but
    the fused kernels (their launchers read shapes only); the GPU test below checks the real stream."""
    x = torch.from_numpy(np.stack([SIGNALS["chirp"][:8000], SIGNALS["white"][:8000]]))
    lengths = torch.tensor([8000, 6001]) if with_lengths else None
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    getattr(F, fn)(x, sr=SR, n_fft=512, hop_length=160, n_mels=40, lengths=lengths, backend="torch")
    monkeypatch.undo()
    assert len(reads) == (3 if with_lengths else 1), reads


@pytest.mark.gpu(reason="CUDA's sync debug mode needs a GPU (the CPU test above counts the reads of the shared path)")
@pytest.mark.parametrize("fn", ["log_melspectrogram", "mfcc"])
@pytest.mark.parametrize("check_finite", [None, True])
def test_gpu_features_do_not_synchronise_unless_asked_to_check(fn, check_finite):
    """The default on a GPU reads nothing back; check_finite=True reads the NaN/Inf check once,
    after every launch."""
    x = torch.from_numpy(np.stack([SIGNALS["chirp"][:8000]] * 4)).cuda()
    kw = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40, check_finite=check_finite)
    getattr(F, fn)(x, **kw)  # warm-up: compilation and caches may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(F, fn)(x, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == (1 if check_finite else 0), [str(w.message) for w in syncs]


@pytest.mark.gpu(reason="a GPU checks only when asked (on the CPU it always does; test_bad_input_raises_clear_error)")
def test_gpu_nan_audio_raises_when_checked_and_gives_nan_features_otherwise():
    x = torch.from_numpy(np.stack([SIGNALS["chirp"][:8000]] * 2)).cuda()
    x[1, 100] = float("nan")
    for fn in (F.log_melspectrogram, F.mfcc):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(x, sr=SR, n_fft=512, hop_length=160, n_mels=40, check_finite=True)
        out = fn(x, sr=SR, n_fft=512, hop_length=160, n_mels=40)
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()
