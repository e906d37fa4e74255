"""The model's launch budget: the ATen ops (about one GPU launch each) of the default model's
forward, joint loss and backward at batch 64, on a batch with padding (the masked path a GPU
always takes). Budgets fail when a change adds launches."""

import torch

from fastser.checkpoints import ModelSpec, build_model
from fastser.features.featureset import FeatureSet
from fastser.models import SERObjective
from instruments.ledger import Ledger

# forward: 18 convolutions with their pooling, batch norm, ReLU and masks, the pooled vectors, the
# embedding and classifier, the decoders; objective: cross-entropy, the fused center loss (its C++
# kernel here, Triton's on a GPU), the masked reconstruction error; backward into gradients that
# are None, as train_step leaves them. Before BatchNorm's batch counters went: forward 166.
BUDGET = {"forward": 149, "objective": 36, "backward": 133}


def test_a_training_forward_and_backward_fit_their_launch_budget():
    fs = FeatureSet.paper(["logmel", "mfcc", "prosody"])
    model = build_model(ModelSpec(fs, tuple("abcd"), pooling="time")).to(memory_format=torch.channels_last)
    objective = SERObjective(
        4, 128, lambda_center=0.003, lambda_recon=0.1, center_alpha=0.5, class_weights=torch.ones(4)
    )
    B, T = 64, 301
    feats = {k: torch.randn(B, n, T) for k, n in fs.n_bins.items()}
    frames = torch.full((B,), T)
    frames[0] = 250  # padding: the masks are applied
    labels = torch.randint(0, 4, (B,))
    model.train()
    objective.train()
    counts = {}
    for _ in range(2):  # the second step is the steady one
        model.zero_grad(set_to_none=True)  # as train_step does: the backward writes, never accumulates
        ledger = Ledger()
        with ledger:
            out = model(feats, frames)
        counts["forward"] = len(ledger.launches)
        masks = ledger.launches.count("arange")
        assert "add_" not in ledger.launches  # no BatchNorm counts its batches (nothing reads the counts)
        with ledger:
            terms = objective(out, labels, feats, frames, None)
        counts["objective"] = len(ledger.launches) - counts["forward"]
        with ledger:
            terms.total.backward()
        counts["backward"] = len(ledger.launches) - counts["forward"] - counts["objective"]
        # the CPU's own, none on a GPU: each CNN branch's no-padding check (a free read on the CPU,
        # skipped on a GPU) and the center loss's eager check (deferred on a GPU)
        assert ledger.host_reads == 3
    assert masks == 4  # one valid-frame mask per time stride (1, 2, 4, 8), shared by every branch
    assert all(counts[k] <= BUDGET[k] for k in BUDGET), counts
