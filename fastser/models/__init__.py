"""The paper's CNNs with a reconstruction head, and the joint objective."""

from fastser.models.cnn import SERModel, SERResult, mfcc_cnn, spectrogram_cnn, two_branch_cnn
from fastser.models.objective import LossTerms, Mix, SERObjective, masked_mse

__all__ = [
    "SERModel",
    "SERResult",
    "spectrogram_cnn",
    "mfcc_cnn",
    "two_branch_cnn",
    "SERObjective",
    "LossTerms",
    "Mix",
    "masked_mse",
]
