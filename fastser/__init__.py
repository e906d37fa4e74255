"""fastser: fast speech emotion recognition (Tripathi et al., 2020) on the GPU, end to end.

from fastser import Predictor, CenterLoss   # a trained model's predictions; the fused center loss
"""

__version__ = "0.1.0"

_LAZY = {"Predictor": "fastser.predictor", "CenterLoss": "fastser.nn"}  # imported on first use: torch is heavy


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastser' has no attribute {name!r}")
