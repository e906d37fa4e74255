"""The fused post-FFT Triton kernels against the plain-torch chain (fastser.features.post), flag by
flag and at tile edges, under the CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1)
and compiled on a GPU. Parity with librosa itself is tests/features/test_functional.py's job."""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from fastser.features import extraction  # noqa: E402
from fastser.features import functional as F  # noqa: E402
from fastser.features import post  # noqa: E402
from fastser.ops import mel_chain, mel_chain_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = dict(sr=16000, n_fft=512, hop_length=160)


def spectrum(frames, T, seed=0, garbage=1e6):
    """A (B, 257, T) complex STFT with a 60 dB spread of levels over frames and bins, and `garbage`
    in every padded frame: a kernel that reads past frames[b] gets a wrong maximum and wrong values."""
    g = torch.Generator().manual_seed(seed)
    B = len(frames)
    level = 10 ** (torch.rand(B, 257, T, generator=g) * 6 - 3)
    spec = torch.polar(level.sqrt(), torch.rand(B, 257, T, generator=g) * 6.283)
    padded = torch.arange(T)[None, None, :] >= torch.as_tensor(frames)[:, None, None]
    spec = torch.where(padded, torch.full_like(spec, garbage), spec)
    return spec.to(DEVICE), torch.as_tensor(frames, device=DEVICE)


def assert_chain_close(ours, ref, kind):
    """The kernels' bounds against the exact chain. power: relative error, dB: absolute, MFCCs:
    relative to their range."""
    if kind == "mel":
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-12)
    elif kind == "logmel":
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4)
    else:
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


def check(cfg, frames, T, seed=0):
    spec, frames = spectrum(frames, T, seed)
    const = F.constants(cfg, torch.device(DEVICE))
    ours = mel_chain.triton(spec, frames, cfg, const)
    ref = post.post_chain(spec, frames, cfg, const).float()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert_chain_close(ours, ref, cfg.kind)
    padded = torch.arange(T, device=DEVICE)[None, None, :] >= frames[:, None, None]
    assert not ours.masked_select(padded).any(), "padded frames must be zero"
    return ours


# every flag combination at the paper's size (ref and top_db do not apply to a mel power spectrogram);
# one utterance shorter than a tile, one ending mid-tile, one filling the batch
FLAGS = [("mel", power, 1.0, None) for power in (2.0, 1.0, 1.5)] + list(
    itertools.product(("logmel", "mfcc"), (2.0, 1.0, 1.5), (1.0, "max"), (80.0, None))
)


@pytest.mark.parametrize("kind,power,ref,top_db", FLAGS)
def test_fused_chain_matches_the_torch_chain(kind, power, ref, top_db):
    cfg = F.FeatureConfig(kind, **BASE, n_mels=40, n_mfcc=20, power=power, ref=ref, top_db=top_db)
    check(cfg, frames=[7, 37, 45], T=45)


# tile edges: n_mels around the 16/32/64 tiles, n_mfcc around the 32-row DCT step, T around the
# 16-frame tile and below it
@pytest.mark.parametrize("n_mels,n_mfcc,T", [(16, 1, 16), (40, 13, 17), (65, 33, 31), (128, 64, 48), (256, 97, 9)])
def test_fused_chain_at_tile_edges(n_mels, n_mfcc, T):
    for kind in ("logmel", "mfcc"):
        cfg = F.FeatureConfig(kind, **BASE, n_mels=n_mels, n_mfcc=n_mfcc, ref="max", top_db=60.0)
        check(cfg, frames=[T, max(1, T - 5)], T=T, seed=n_mels)


def test_top_db_uses_each_utterances_own_maximum_across_tiles():
    """The loudest frame of the first utterance sits in its last tile, the second utterance is 50 dB
    quieter: the clamp must follow each one's own maximum, gathered across the tiles."""
    cfg = F.FeatureConfig("logmel", **BASE, n_mels=40, ref=1.0, top_db=30.0)
    spec, frames = spectrum([60, 60], 60, garbage=0.0)
    spec[1] *= 10 ** (-50 / 20)
    spec[0, :, 55] *= 100.0
    out = mel_chain.triton(spec, frames, cfg, F.constants(cfg, torch.device(DEVICE)))
    for b in range(2):
        top = out[b].max()
        assert torch.isclose(out[b].min(), top - 30.0, atol=1e-4), (b, float(top), float(out[b].min()))
    assert out[0].max() > out[1].max() + 40.0


def test_the_launches_are_two_at_most_and_the_first_alone_when_nothing_needs_the_maximum():
    spec, frames = spectrum([20], 20)
    const = F.constants(F.FeatureConfig("mfcc", **BASE, n_mels=40), torch.device(DEVICE))
    count = {}
    for kind, ref, top_db in (
        ("mel", 1.0, None),
        ("logmel", 1.0, None),
        ("logmel", "max", None),
        ("logmel", 1.0, 80.0),
        ("mfcc", 1.0, None),
    ):
        cfg = F.FeatureConfig(kind, **BASE, n_mels=40, ref=ref, top_db=top_db)
        launches, _ = mel_chain.triton_launches(spec, frames, cfg, const)
        count[(kind, ref, top_db)] = [launch.name for launch in launches]
    assert count[("mel", 1.0, None)] == count[("logmel", 1.0, None)] == ["_mel_db_kernel"]
    assert all(
        names == ["_mel_db_kernel", "_db_finish_kernel"]
        for key, names in count.items()
        if key not in (("mel", 1.0, None), ("logmel", 1.0, None))
    )


def test_too_many_mels_is_a_clear_error():
    cfg = F.FeatureConfig("logmel", **BASE, n_mels=mel_chain_triton.MAX_MELS + 1)
    spec, frames = spectrum([5], 5)
    with pytest.raises(ValueError, match="n_mels <= 256"):
        mel_chain.triton(spec, frames, cfg, F.constants(cfg, torch.device(DEVICE)))


# ---- the precision of the kernels' products, emulated (the CPU interpreter computes tl.dot in
# fp32 whatever input_precision says, so the parity tests above cannot see it)


def _tf32_nearest(x):
    """fp32 -> TF32 (10 mantissa bits), rounded to nearest, ties away (cvt.rna.tf32.f32)."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _tf32_inputs(x):
    """What a TF32 tensor-core instruction reads of an fp32 register: its low 13 mantissa bits dropped."""
    return (x.view(torch.int32) & -0x2000).view(torch.float32)


def tf32x3_matmul(a, b):
    """a @ b as Triton computes tl.dot(..., input_precision="tf32x3"): each operand split into its
    TF32 rounding and the remainder, the three products that matter taken on tensor cores (TF32
    inputs) and summed in fp32; the remainder x remainder product is left out."""
    a, b = a.float(), b.float()
    a_big, b_big = _tf32_nearest(a), _tf32_nearest(b)
    a_small, b_small = a - a_big, b - b_big

    def mma(x, y):
        return torch.matmul(_tf32_inputs(x), _tf32_inputs(y))

    return mma(a_small, b_big) + mma(a_big, b_small) + mma(a_big, b_big)


def tf32_matmul(a, b):
    return torch.matmul(_tf32_nearest(a.float()), _tf32_nearest(b.float()))


def chain_with_products(monkeypatch, spec, frames, cfg, const, mel_product, dct_product):
    """The torch chain with its mel and DCT products computed by the given functions."""
    exact = post.project

    def project(matrix, S):
        if matrix is const["fb"]:
            return mel_product(matrix, S)
        return dct_product(matrix, S) if dct_product is not None else exact(matrix, S)

    with monkeypatch.context() as m:
        m.setattr(post, "project", project)
        return post.post_chain(spec, frames, cfg, const).float()


def kernel_dct_product(cfg):
    """The DCT product the finish kernel uses for this filterbank (mel_chain_triton.dct_precision)."""
    precision = mel_chain_triton.dct_precision(mel_chain_triton._pow2(cfg.n_mels))
    return tf32x3_matmul if precision == "tf32x3" else None


EDGES = [(16, 1, 16), (40, 13, 17), (65, 33, 31), (128, 64, 48), (256, 97, 9)]


@pytest.mark.parametrize(
    "kind,power,ref,top_db,n_mels,n_mfcc,T",
    [(*flags, 40, 20, 45) for flags in FLAGS]
    + [(kind, 2.0, "max", 60.0, m, k, t) for kind in ("logmel", "mfcc") for m, k, t in EDGES],
)
def test_the_kernels_tensor_core_products_keep_the_chain_within_its_bounds(
    monkeypatch, kind, power, ref, top_db, n_mels, n_mfcc, T
):
    """The mel product (and the DCT up to 64 mels) runs on tensor cores as tf32x3: emulated bit for
    bit in its rounding, the chain stays within the bounds the kernels are held to; plain TF32
    (what input_precision="tf32" would do) does not, which is why the split is paid for."""
    cfg = F.FeatureConfig(kind, **BASE, n_mels=n_mels, n_mfcc=n_mfcc, power=power, ref=ref, top_db=top_db)
    spec, frames = spectrum([T, max(1, T - 5), 7], T, seed=n_mels)
    spec, frames = spec.cpu(), frames.cpu()
    const = F.constants(cfg, torch.device("cpu"))
    exact = post.post_chain(spec, frames, cfg, const).float()
    emulated = chain_with_products(monkeypatch, spec, frames, cfg, const, tf32x3_matmul, kernel_dct_product(cfg))
    assert_chain_close(emulated, exact, kind)
    if (n_mels, n_mfcc) == (40, 20) and power == 2.0:
        plain = chain_with_products(monkeypatch, spec, frames, cfg, const, tf32_matmul, tf32_matmul)
        with pytest.raises(AssertionError):
            assert_chain_close(plain, exact, kind)


def test_tensor_core_mfccs_match_librosa(monkeypatch):
    """The same emulated products in the feature functions, against librosa's bounds on the parity
    signals (looser than the chain's above: plain TF32 would meet these too)."""
    librosa = pytest.importorskip("librosa")
    import warnings

    import numpy as np

    from tests.features.signals import SR, make_signals

    monkeypatch.setattr(post, "project", tf32x3_matmul)  # at 40 mels both products are tf32x3
    for name, x in make_signals().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = librosa.feature.mfcc(y=x, sr=SR, n_fft=512, hop_length=160, n_mels=40, n_mfcc=40)
        ours = F.mfcc(torch.from_numpy(x), sr=SR, n_fft=512, hop_length=160, n_mels=40, n_mfcc=40, backend="torch")
        assert np.abs(ours.numpy() - ref).max() <= 1e-3 * np.ptp(ref), name


def test_a_spectrum_that_is_not_frame_major_is_refused_by_the_launcher_and_transposed_by_its_caller():
    """The kernel reads each frame's bins as one row; the launcher says so in one line for any other
    layout, and `mel_chain.triton` (the caller every feature function uses) lays a hand-built
    spectrum out that way first, with the same result."""
    cfg = F.FeatureConfig("logmel", **BASE, n_mels=40)
    spec, frames = spectrum([20, 13], 20)  # (B, F, T) contiguous: bins 20 complex apart
    const = F.constants(cfg, torch.device(DEVICE))
    B, n_bins, T = spec.shape
    out = torch.empty(B, 40, T, device=DEVICE)
    with pytest.raises(ValueError, match="frame-major"):
        mel_chain_triton.mel_chain_launches(
            torch.view_as_real(spec), const["fb"].float(), frames.int(), out, torch.empty(B, 2, device=DEVICE),
            power=2.0, to_db=True, amin=1e-10, log_ref=0.0, ref_max=False, top_db=None,
        )  # fmt: skip
    frame_major = spec.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(mel_chain.triton(spec, frames, cfg, const), mel_chain.triton(frame_major, frames, cfg, const))


# ---- the periodic Hann window applied in the frequency domain (the Triton feature path's STFT
# is taken without a window, so the windowed frames are never written)


def hann_windowed(spec):
    """X_w[k] = X[k]/2 - (X[k-1] + X[k+1])/4 over the bins of a (B, F, T) spectrum of real frames,
    in float64: the DFT of the frames times the periodic Hann window of 2 (F - 1) samples."""
    x = spec.to(torch.complex128)
    below = torch.cat([x[:, 1:2].conj(), x[:, :-1]], dim=1)
    above = torch.cat([x[:, 1:], x[:, -2:-1].conj()], dim=1)
    return (0.5 * x - 0.25 * (below + above)).to(torch.complex64)


@pytest.mark.parametrize("kind", ["mel", "logmel", "mfcc"])
@pytest.mark.parametrize("frames,T", [([7, 37, 45], 45), ([16, 11], 16), ([9], 9)])
def test_the_kernels_hann_window_matches_the_chain_on_the_windowed_spectrum(kind, frames, T):
    cfg = F.FeatureConfig(kind, **BASE, n_mels=40, n_mfcc=20, ref="max", top_db=80.0 if kind != "mel" else None)
    spec, frames = spectrum(frames, T)  # garbage in the padded frames, which the kernel must not read
    const = F.constants(cfg, torch.device(DEVICE))
    ours = mel_chain.triton(spec, frames, cfg, const, hann_fold=True)
    ref = post.post_chain(hann_windowed(spec), frames, cfg, const).float()
    assert_chain_close(ours, ref, kind)
    # the window is really applied: without it the result is far off
    assert (mel_chain.triton(spec, frames, cfg, const) - ref).abs().max() > 100 * (ours - ref).abs().max()


@pytest.mark.parametrize("n_frames,lengths", [(301, None), (301, [48000, 30000, 1]), (188, [30000, 29999, 160])])
def test_the_unwindowed_stft_is_torch_stft_without_a_window_read_in_place(n_frames, lengths):
    """The STFT of the padded items laid out one row each, frames of one stride: the same as
    torch.stft on each item's zero-padded samples, with no window."""
    y = torch.randn(3, 48000)
    lens = torch.tensor(lengths) if lengths is not None else None
    cfg = F.FeatureConfig("mfcc", **BASE, n_mels=40)
    ours = extraction._unwindowed_stft(y, lens, n_frames, cfg)
    for b in range(3):
        item = y[b, : lens[b]] if lens is not None else y[b]
        item = torch.nn.functional.pad(item, (256, 256 + 160 * n_frames))[: (n_frames - 1) * 160 + 512]
        ref = torch.stft(item, 512, 160, window=torch.ones(512), center=False, return_complex=True)
        torch.testing.assert_close(ours[b], ref, rtol=1e-5, atol=1e-4)
    assert ours.stride(1) == 1  # frame-major, as the kernels read it
