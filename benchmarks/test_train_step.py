"""End-to-end training step, raw audio batch -> optimizer step: fastser vs fastser.reference.

Batches of 64 and 256 x 3 s at 16 kHz, the paper's two-branch model with the reconstruction head,
the joint objective. fastser: audio to the device once, batched features there (fused post kernels),
the model in channels-last, the fused center loss updating its centers inside backward. Reference,
run as its users run it: librosa per utterance in DataLoader workers (one per core, persistent,
pinned memory on a GPU), the same model in fp32 on the same device as fastser's (`model_device` in
the results), the usual center-loss module with its second SGD optimizer, the loss read back every
step. One timed call is STEPS steps for both (so the workers' prefetching overlaps with training as
in an epoch). Targets at batch 64, ratios from one run: CPU >= 2x; GPU >= 10x. Batch 256 shows what
a larger batch buys on a GPU (where a step of 64 is mostly launch overhead).
"""

import numpy as np
import pytest
import torch

from benchmarks import _harness
from fastser.features.featureset import FeatureSet
from fastser.models import SERModel, SERObjective
from fastser.reference.pipeline import LibrosaDataset, ReferenceTrainer, reference_loader
from fastser.training import train_step
from fastser.training.graphed import GraphedTrainStep

SR, SECONDS, CLASSES, STEPS = 16000, 3.0, 4, 4
BATCHES = (64, 256)  # the targets are set at 64
FEATURES = FeatureSet.paper()
BINS = FEATURES.n_bins  # {"logmel": 64, "mfcc": 40}


@pytest.fixture(scope="module", params=BATCHES, ids=lambda b: f"B{b}")
def audio_batch(request):
    batch, rng = request.param, np.random.default_rng(0)
    t = np.arange(int(SR * SECONDS)) / SR
    f0 = rng.uniform(100, 300, (batch, 1))
    y = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal((batch, t.size))
    return y.astype(np.float32), rng.integers(0, CLASSES, batch)


def fastser_step(audio, labels, device, amp=False, graph=False):
    torch.manual_seed(0)
    model = SERModel(BINS, CLASSES).to(device, memory_format=torch.channels_last)
    objective = SERObjective(CLASSES, model.embed_dim).to(device)
    # as the loop: fused AdamW on CUDA; in the graph the capturable form (fastser.training.fold)
    flags = {"capturable": True, "foreach": False} if graph else {"fused": True if device.type == "cuda" else None}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **flags)
    host = torch.from_numpy(audio)
    host = host.pin_memory() if device.type == "cuda" else host
    y = torch.from_numpy(labels).to(device)
    lengths = torch.full((len(audio),), audio.shape[1], device=device)
    stats = {k: (torch.zeros(b, 1, device=device), torch.ones(b, 1, device=device)) for k, b in BINS.items()}
    graphed = None
    if graph:  # the features are computed outside the graph (their NaN check reads the host) and copied in
        first, frames0 = FEATURES.extract(host.to(device), lengths)
        inputs = {**{k: v.clone() for k, v in first.items()}, "frames": frames0.clone(), "labels": y.clone()}

        def build(i):
            feats = {k: i[k] for k in first}
            return feats, feats, i["frames"], i["labels"], None

        graphed = GraphedTrainStep(model, objective, opt, inputs, build, amp=amp)  # warms up in the first calls

    def steps():
        for _ in range(STEPS):
            batch = host.to(device, non_blocking=True)
            feats, frames = FEATURES.extract(batch, lengths)
            feats = {k: (v - stats[k][0]) / stats[k][1] for k, v in feats.items()}
            if graphed is not None:
                graphed(**feats, frames=frames, labels=y)
            else:
                train_step(model, objective, opt, feats, feats, frames, y, amp=amp)

    return steps


def reference_step(audio, labels, device):
    torch.manual_seed(0)
    trainer = ReferenceTrainer(BINS, CLASSES, device=device)
    dataset = LibrosaDataset(list(audio) * STEPS, np.tile(labels, STEPS), list(BINS))
    loader = reference_loader(dataset, len(audio), device)

    def steps():
        for feats, frames, y in loader:  # STEPS batches; the workers compute librosa features per utterance
            trainer.step(feats, frames, y)

    return steps


@pytest.mark.parametrize("impl", ["reference", "fastser", "fastser-amp", "fastser-graph", "fastser-graph-amp"])
def test_train_step(benchmark, device, audio_batch, impl):
    """fastser: fp32 like the reference (the target applies to it); -amp: with --amp (bf16 autocast);
    -graph: the training loop's default on one GPU (the step replayed from a CUDA graph; GPU only)."""
    audio, labels = audio_batch
    batch = len(audio)
    if "graph" in impl and device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if batch != BATCHES[0] and device.type != "cuda":
        pytest.skip(f"batch {batch} is a GPU figure (on a few CPU cores one call of the reference takes minutes)")
    fn = (
        reference_step(audio, labels, device)
        if impl == "reference"
        else fastser_step(audio, labels, device, amp=impl.endswith("amp"), graph="graph" in impl)
    )
    target = (10.0 if device.type == "cuda" else 2.0) if impl == "fastser" and batch == BATCHES[0] else None
    _harness.run(
        benchmark,
        fn,
        device,
        suite="train_step",
        group=f"B{batch}_{SECONDS:g}s",
        impl=impl,
        baseline="reference",
        target=target,
        budget_s=8.0,
        extra={"utterances": batch * STEPS, "steps_per_call": STEPS, "model_device": str(device)},
    )
