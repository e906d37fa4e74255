"""The usual pipeline (fastser.reference): librosa per utterance in a DataLoader, the usual center
loss with its second optimizer — the baseline of the end-to-end benchmark."""

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastser.data.synthetic import make_corpus
from fastser.features.featureset import FeatureSet
from fastser.reference.pipeline import LibrosaDataset, ReferenceTrainer, collate, fit_stats, librosa_features


def test_librosa_features_are_fastsers_features_computed_by_librosa():
    y = make_corpus(seed=1, n_speakers=1, per_class=1).utterances[0].audio
    ours, _ = FeatureSet.paper().extract(torch.from_numpy(y))
    theirs = librosa_features(y)
    assert list(theirs) == ["logmel", "mfcc"]
    for kind, v in theirs.items():
        assert v.shape == tuple(ours[kind][0].shape)
        assert np.median(np.abs(v - ours[kind][0].numpy())) < 0.01


def test_reference_trainer_steps_and_predicts():
    corpus = make_corpus(seed=2, n_speakers=2, per_class=2, seconds=1.0)
    audio, labels = [u.audio for u in corpus.utterances], corpus.labels
    kinds = FeatureSet.paper().kinds
    norm = fit_stats(LibrosaDataset(audio, labels, kinds))
    trainer = ReferenceTrainer(FeatureSet.paper().n_bins, len(corpus.classes), width=4, embed_dim=16, norm=norm)
    before = trainer.center_loss.centers.detach().clone()
    loader = DataLoader(LibrosaDataset(audio, labels, kinds, crop_frames=50), batch_size=8, collate_fn=collate)
    losses = [trainer.step(*batch) for batch in loader]
    assert all(np.isfinite(losses)) and not torch.equal(before, trainer.center_loss.centers.detach())
    y, p = trainer.predict(DataLoader(LibrosaDataset(audio, labels, kinds), batch_size=8, collate_fn=collate))
    assert y.shape == p.shape == (len(audio),)


def test_reference_loader_runs_as_users_run_it():
    """One worker per core by default, persistent, pinned only for a GPU model; worker processes
    give the same batches as the main process."""
    from fastser.reference.pipeline import reference_loader

    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(4000).astype(np.float32) * 0.1 for _ in range(6)]
    data = LibrosaDataset(audio, np.arange(6) % 3, ["mfcc"])
    loader = reference_loader(data, 4, "cpu")
    assert loader.num_workers == (os.cpu_count() or 1) and loader.persistent_workers and not loader.pin_memory
    inline = list(reference_loader(data, 4, "cpu", workers=0))
    for (f, fr, y), (g, gr, z) in zip(loader, inline):
        torch.testing.assert_close(f["mfcc"], g["mfcc"])
        assert fr.tolist() == gr.tolist() and y.tolist() == z.tolist()
