import torch

from fastser.models import Mix, SERObjective, SERResult, masked_mse
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


def _mix_case():
    torch.manual_seed(1)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    partner = torch.tensor([1, 1, 0, 2, 0, 2])
    lam = torch.tensor([0.5, 1.0, 0.7, 0.9, 0.55, 0.8])
    out = SERResult(logits, torch.randn(6, 8), {})
    return out, labels, Mix(partner, lam)


def test_mixup_cross_entropy_is_pytorchs_soft_label_cross_entropy():
    """Unweighted, the mixed CE is the cross-entropy against the mixed one-hot targets (PyTorch's
    probability-target cross_entropy); the center loss takes the dominant labels."""
    out, labels, mix = _mix_case()
    obj = SERObjective(3, 8, lambda_recon=0.0)
    centers = obj.center_loss.centers.clone()
    terms = obj(out, labels, {}, torch.ones(6, dtype=torch.long), mix)
    onehot = torch.nn.functional.one_hot
    targets = mix.lam[:, None] * onehot(labels, 3) + (1 - mix.lam[:, None]) * onehot(mix.partner, 3)
    torch.testing.assert_close(terms.ce, torch.nn.functional.cross_entropy(out.logits, targets.float()))
    reference = CenterLoss(3, 8)
    reference.centers.copy_(centers)
    torch.testing.assert_close(terms.center, reference(out.embedding, labels))


def test_mixup_cross_entropy_with_class_weights():
    """Class-weighted: each label's NLL weighted by its class weight and its mixing weight, divided
    by the mixed weights (a plain computation here); with every lam = 1 it is exactly the objective
    without mixup, whatever the partners."""
    out, labels, mix = _mix_case()
    w = torch.tensor([0.5, 1.0, 2.0])
    obj = SERObjective(3, 8, lambda_center=0.0, lambda_recon=0.0, class_weights=w)
    frames = torch.ones(6, dtype=torch.long)
    nll = -out.logits.log_softmax(1)
    own, other = nll[torch.arange(6), labels], nll[torch.arange(6), mix.partner]
    expected = (mix.lam * w[labels] * own + (1 - mix.lam) * w[mix.partner] * other).sum() / (
        mix.lam * w[labels] + (1 - mix.lam) * w[mix.partner]
    ).sum()
    torch.testing.assert_close(obj(out, labels, {}, frames, mix).ce, expected)
    plain = obj(out, labels, {}, frames).ce
    unmixed = Mix(mix.partner, torch.ones(6))
    torch.testing.assert_close(obj(out, labels, {}, frames, unmixed).ce, plain)
    smoothed = SERObjective(3, 8, lambda_center=0.0, lambda_recon=0.0, class_weights=w, label_smoothing=0.1)
    torch.testing.assert_close(smoothed(out, labels, {}, frames, unmixed).ce, smoothed(out, labels, {}, frames).ce)
