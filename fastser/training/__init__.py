"""Training, from the bottom up: batches (batcher, augmentation), step (one optimizer step),
table (the feature table as folds read it, evaluation), trainer (a fold's model and one epoch),
scoring (the test speakers), fold (one fold's epochs and test, through a narrow FoldContext),
experiment (every fold of one configuration, the checkpoint), reports (metrics, plots, ablation)
and run (a whole run: its folder, corpus and features, its experiments). What they share with
inference lives outside: fastser.checkpoints (the model spec, save, load, old formats),
fastser.normalization (the input statistics), fastser.config (the settings). The command line is
fastser.train."""

from fastser.features.post import valid_mask
from fastser.training.batches import Batch, Batcher, Mix, Normalizer, mixup, spec_augment, tempo_crop
from fastser.checkpoints import ModelSpec, build_model, finished_model, load_checkpoint
from fastser.training.experiment import Experiment
from fastser.training.fold import train_and_test
from fastser.training.trainer import EpochTotals, FoldTrainer
from fastser.training.step import step_body, train_step

__all__ = [
    "Batch",
    "Batcher",
    "EpochTotals",
    "Experiment",
    "FoldTrainer",
    "Mix",
    "ModelSpec",
    "Normalizer",
    "build_model",
    "finished_model",
    "load_checkpoint",
    "mixup",
    "spec_augment",
    "step_body",
    "tempo_crop",
    "train_and_test",
    "train_step",
    "valid_mask",
]
