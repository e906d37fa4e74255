import torch

from fastser.models import SERObjective, SERResult, masked_mse
from fastser.nn import CenterLoss


def test_masked_mse_ignores_padding():
    target = torch.randn(2, 5, 10)
    pred = target.clone()
    frames = torch.tensor([10, 4])
    pred[1, :, 4:] += 100.0  # error only in item 1's padding
    assert masked_mse(pred, target, frames).item() == 0.0
    pred[1, :, 3] += 1.0  # one valid frame of item 1 off by 1 in every bin
    expected = 5 * 1.0 / ((10 + 4) * 5)
    torch.testing.assert_close(masked_mse(pred, target, frames), torch.tensor(expected))


def test_objective_terms_and_weights():
    torch.manual_seed(0)
    obj = SERObjective(3, 8, lambda_center=0.5, lambda_recon=2.0)
    emb = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    feats = {"mfcc": torch.randn(6, 4, 7)}
    recon = {"mfcc": torch.randn(6, 4, 7)}
    frames = torch.tensor([7, 7, 5, 3, 7, 1])
    out = SERResult(torch.randn(6, 3), emb, recon)
    centers_before = obj.center_loss.centers.clone()
    terms = obj(out, labels, feats, frames)
    ce = torch.nn.functional.cross_entropy(out.logits, labels)
    center = CenterLoss(3, 8)
    center.centers.copy_(centers_before)
    torch.testing.assert_close(terms.ce, ce)
    torch.testing.assert_close(terms.center, center(emb, labels))
    torch.testing.assert_close(terms.recon, masked_mse(recon["mfcc"], feats["mfcc"], frames))
    torch.testing.assert_close(terms.total, terms.ce + 0.5 * terms.center + 2.0 * terms.recon)
    terms.total.backward()
    assert not torch.equal(obj.center_loss.centers, centers_before)  # Wen update inside backward


def test_lambda_zero_drops_terms():
    obj = SERObjective(3, 8, lambda_center=0.0, lambda_recon=0.0)
    assert obj.center_loss is None
    out = SERResult(torch.randn(2, 3), torch.randn(2, 8), {})
    terms = obj(out, torch.tensor([0, 2]), {}, torch.tensor([1, 1]))
    assert terms.center.item() == 0.0 and terms.recon.item() == 0.0
