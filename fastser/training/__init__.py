"""Training, in five parts: batches (normaliser, batcher, augmentation), step (one optimizer step),
loop (one fold, an experiment), checkpoints (the model spec, save, load, old formats) and reports (metrics, plots,
ablation). The command line is fastser.train."""
from fastser.training.batches import Batch, Batcher, Mix, Normalizer, mixup, spec_augment, tempo_crop, valid_mask
from fastser.training.checkpoints import ModelSpec, build_model, finished_model, load_checkpoint
from fastser.training.loop import EpochTotals, Run
from fastser.training.step import step_body, train_step

__all__ = ["Batch", "Batcher", "EpochTotals", "Mix", "ModelSpec", "Normalizer", "Run", "build_model", "finished_model",
           "load_checkpoint", "mixup", "spec_augment", "step_body", "tempo_crop", "train_step",
           "valid_mask"]
