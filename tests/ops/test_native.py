"""The typed layer over the compiled kernels: a wrong tensor is an error naming it, never a wild pointer."""

import pytest
import torch

from fastser.ops import _native

pytestmark = pytest.mark.skipif(_native.cpu is None, reason="fastser._C is not built")


def args(B=4, C=3, D=5):
    return dict(
        x=torch.randn(B, D),
        labels=torch.randint(0, C, (B,)),
        centers=torch.randn(C, D),
        row_loss=torch.empty(B),
        diff=torch.empty(B, D),
    )


@pytest.mark.parametrize(
    "name,bad,exc,match",
    [
        ("x", torch.randn(5, 4).t(), ValueError, "'x' must be contiguous"),
        ("labels", torch.zeros(4, dtype=torch.int32), TypeError, "'labels' must be torch.int64"),
        ("centers", torch.randn(3, 6), ValueError, r"'centers' must have shape \(3, 5\)"),
        ("diff", torch.empty(4, 5, dtype=torch.float64), TypeError, "'diff' must be torch.float32"),
        ("row_loss", torch.empty(4, device="meta"), ValueError, "'row_loss' must be on cpu"),
    ],
)
def test_forward_checks_every_tensor(name, bad, exc, match):
    a = args()
    a[name] = bad
    with pytest.raises(exc, match=match):
        _native.center_loss_forward_cpu(**a)


def test_forward_matches_torch_when_the_arguments_are_right():
    a = args()
    assert _native.center_loss_forward_cpu(**a) == -1
    torch.testing.assert_close(a["diff"], a["x"] - a["centers"][a["labels"]])
    torch.testing.assert_close(a["row_loss"], a["diff"].square().sum(1))


def test_backward_and_mel_chain_check_their_combinations():
    diff, labels = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="not both"):
        _native.center_loss_backward_cpu(
            diff, labels, 3, torch.ones(1), None, torch.zeros(3, 5), 0.5, torch.zeros(3, 5)
        )
    with pytest.raises(ValueError, match="row_scale must hold 1 or 4 values"):
        _native.center_loss_backward_cpu(diff, labels, 3, torch.ones(3), torch.empty(4, 5), None, 0.0, None)
    spec = torch.zeros(1, 7, 257, dtype=torch.complex64)
    with pytest.raises(ValueError, match="dct, lift and mfcc_out go together"):
        _native.mel_chain_cpu(
            spec,
            torch.tensor([7]),
            torch.zeros(40, 257),
            power=2.0,
            to_db=True,
            amin=1e-10,
            log_ref=0.0,
            ref_max=False,
            top_db=None,
            dct=torch.zeros(13, 40),
            lift=None,
            mel_out=torch.empty(1, 40, 7),
            mfcc_out=None,
        )


def test_cpu_kernels_run_with_torchs_thread_count_and_give_the_same_bits_at_any(monkeypatch):
    """The compiled CPU kernels take torch.get_num_threads() on every call (one team size for the
    process, set by torch.set_num_threads or --threads), and their results do not depend on it: the
    center loss sums each class in a fixed order, the mel chain computes each utterance alone."""
    from fastser.features import functional as F
    from fastser.nn import CenterLoss

    teams = []
    real = _native.cpu

    class Recorder:
        def __getattr__(self, name):
            kernel = getattr(real, name)
            return lambda *a: (teams.append((name, a[-1])), kernel(*a))[1]

    monkeypatch.setattr(_native, "cpu", Recorder())
    before = torch.get_num_threads()
    results = []
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(1024, 512, generator=gen), torch.randint(0, 100, (1024,), generator=gen)
    audio = torch.randn(4, 16000, generator=gen)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            teams.clear()
            torch.manual_seed(0)
            loss_fn = CenterLoss(100, 512, backend="cpp", validate=False)
            xi = x.clone().requires_grad_()
            loss = loss_fn(xi, labels)
            loss.backward()
            feats = F.mfcc(audio, sr=16000, n_fft=512, hop_length=160, n_mels=40, n_mfcc=13, backend="cpp")
            results.append((loss.detach(), xi.grad, loss_fn.centers.clone(), feats))
            assert {name for name, _ in teams} == {"center_loss_forward", "center_loss_backward", "mel_chain"}
            assert all(team == threads for _, team in teams), teams
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)
