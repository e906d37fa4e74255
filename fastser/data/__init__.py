"""Corpora (real and synthetic), speaker-independent folds, and the on-disk feature cache."""

from fastser.data.base import Corpus, CorpusError, Utterance
from fastser.data.corpora import LAYOUTS, load_corpus
from fastser.data.splits import SPLITS, Fold, check_classes, make_folds

__all__ = [
    "Corpus",
    "CorpusError",
    "Utterance",
    "load_corpus",
    "LAYOUTS",
    "SPLITS",
    "Fold",
    "check_classes",
    "make_folds",
]
