"""Spectrogram, log-mel and MFCC features: `functional` (librosa's API, batched) and nn.Module transforms."""

from fastser.features import functional
from fastser.features.functional import (
    dct_matrix,
    log_melspectrogram,
    mel_filterbank,
    melspectrogram,
    mfcc,
    power_to_db,
    spectrogram,
)
from fastser.features.featureset import FeatureSet
from fastser.features.transforms import MFCC, MelSpectrogram, Spectrogram

__all__ = [
    "functional",
    "spectrogram",
    "melspectrogram",
    "log_melspectrogram",
    "mfcc",
    "power_to_db",
    "mel_filterbank",
    "dct_matrix",
    "Spectrogram",
    "MelSpectrogram",
    "MFCC",
    "FeatureSet",
]
