"""L = CE + lambda_c * CenterLoss(embedding) + lambda_r * masked MSE(reconstruction, input)."""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastser.features.post import valid_mask
from fastser.models.cnn import SERResult
from fastser.nn import CenterLoss


class Mix(NamedTuple):
    """What `fastser.training.mixup` mixed into each item: the objective's cross-entropy needs both labels."""

    partner: torch.Tensor  # (B,) label of the item mixed in, on the device
    lam: torch.Tensor  # (B,) weight of the item's own features and label, in [0.5, 1], on the device


class LossTerms(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    center: torch.Tensor
    recon: torch.Tensor


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    frames: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    n_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared error over each item's valid frames only (padding contributes nothing).
    pred, target (B, bins, T); frames (B,); valid: `valid_mask(frames, T)` and n_valid its sum,
    when the caller has them (feature kinds of one length share them: three launches fewer a kind)."""
    valid = valid_mask(frames, target.shape[-1]) if valid is None else valid
    n_valid = valid.sum() if n_valid is None else n_valid
    sq = (pred.float() - target.float()).square() * valid
    return sq.sum() / (n_valid * target.shape[1]).clamp(min=1)


class SERObjective(nn.Module):
    """The paper's joint loss: CE + lambda_center * CenterLoss(embedding) + lambda_recon * masked MSE.

    forward(out: SERResult (logits (B, C), embedding (B, E), reconstruction {kind: (B, bins, T)}),
            labels (B,), feats {kind: (B, bins, T)} (the reconstruction targets), frames (B,),
            mix: optional Mix (partner (B,), lam (B,)) of a mixup batch)
    -> LossTerms(total, ce, center, recon), scalars. CE is class-weighted (class_weights) in fp32;
    with `mix` it is lam * CE(labels) + (1 - lam) * CE(partner) per item, normalised by the mixed
    class weights (with lam = 1, exactly the plain weighted mean). The center loss is fastser's
    fused one with Wen's update (its centers move inside backward), on `labels` (with `mix`, each
    item's dominant label); the MSE counts only each utterance's valid frames. Autograd through all
    three terms.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        lambda_center: float = 0.003,
        lambda_recon: float = 0.1,
        center_alpha: float = 0.5,
        class_weights: Optional[torch.Tensor] = None,
        label_smoothing: float = 0.0,
        process_group=None,
        deterministic: bool = False,
    ):
        super().__init__()
        self.lambda_center, self.lambda_recon = lambda_center, lambda_recon
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(num_classes))
        # The fused center loss; its centers are a buffer moved by the Wen update inside backward.
        # Its input checks (label range, finite features) read a value back to the host: free on
        # the CPU (eager), a sync per step on a GPU, where they stay on the device (deferred, which
        # a CUDA graph can capture) and the training loop reads their count once per epoch.
        self.center_loss = (
            CenterLoss(
                num_classes,
                embed_dim,
                update="wen",
                alpha=center_alpha,
                process_group=process_group,
                deterministic=deterministic,
                validate={"cpu": "eager", "*": "deferred"},
            )
            if lambda_center > 0
            else None
        )

    def forward(
        self, out: SERResult, labels: torch.Tensor, feats: dict, frames: torch.Tensor, mix: Optional[Mix] = None
    ) -> LossTerms:
        logits = out.logits.float()
        if mix is None:
            ce = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)
        else:  # per item w[y] * nll(y); the weighted mean divides by the (mixed) weights, as F.cross_entropy does
            w = self.class_weights
            per_label = [
                F.cross_entropy(logits, y, weight=w, label_smoothing=self.label_smoothing, reduction="none")
                for y in (labels, mix.partner)
            ]
            ce = (mix.lam * per_label[0] + (1 - mix.lam) * per_label[1]).sum() / (
                mix.lam * w[labels] + (1 - mix.lam) * w[mix.partner]
            ).sum()
        zero = ce.new_zeros(())
        center = self.center_loss(out.embedding.float(), labels) if self.center_loss is not None else zero
        recon = zero
        if self.lambda_recon > 0 and out.reconstruction:
            masks: dict = {}  # one validity mask and its count per length (every kind's in a training batch)
            errors = []
            for k, r in out.reconstruction.items():
                T = feats[k].shape[-1]
                if T not in masks:
                    valid = valid_mask(frames, T)
                    masks[T] = valid, valid.sum()
                errors.append(masked_mse(r, feats[k], frames, *masks[T]))
            recon = functools.reduce(operator.add, errors) / len(errors)  # sum() would add a 0 + first
        return LossTerms(ce + self.lambda_center * center + self.lambda_recon * recon, ce, center, recon)
