"""The typed layer over the compiled kernels: a wrong tensor is an error naming it, never a wild pointer."""
import pytest
import torch

from fastser.ops import _native

pytestmark = pytest.mark.skipif(_native.cpu is None, reason="fastser._C is not built")


def args(B=4, C=3, D=5):
    return dict(x=torch.randn(B, D), labels=torch.randint(0, C, (B,)), centers=torch.randn(C, D),
                row_loss=torch.empty(B), diff=torch.empty(B, D))


@pytest.mark.parametrize("name,bad,exc,match", [
    ("x", torch.randn(5, 4).t(), ValueError, "'x' must be contiguous"),
    ("labels", torch.zeros(4, dtype=torch.int32), TypeError, "'labels' must be torch.int64"),
    ("centers", torch.randn(3, 6), ValueError, r"'centers' must have shape \(3, 5\)"),
    ("diff", torch.empty(4, 5, dtype=torch.float64), TypeError, "'diff' must be torch.float32"),
    ("row_loss", torch.empty(4, device="meta"), ValueError, "'row_loss' must be on cpu"),
])
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
        _native.center_loss_backward_cpu(diff, labels, 3, torch.ones(1), None, torch.zeros(3, 5), 0.5,
                                         torch.zeros(3, 5))
    with pytest.raises(ValueError, match="row_scale must hold 1 or 4 values"):
        _native.center_loss_backward_cpu(diff, labels, 3, torch.ones(3), torch.empty(4, 5), None, 0.0, None)
    spec = torch.zeros(1, 7, 257, dtype=torch.complex64)
    with pytest.raises(ValueError, match="dct, lift and mfcc_out go together"):
        _native.mel_chain_cpu(spec, torch.tensor([7]), torch.zeros(40, 257), power=2.0, to_db=True, amin=1e-10,
                              log_ref=0.0, ref_max=False, top_db=None, dct=torch.zeros(13, 40), lift=None,
                              mel_out=torch.empty(1, 40, 7), mfcc_out=None)
