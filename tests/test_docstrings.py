"""The public API's docstring examples run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "fastser.features.functional",
    "fastser.features.transforms",
    "fastser.features.featureset",
    "fastser.nn",
    "fastser.ops.center_loss.op",
    "fastser.predictor",
    "fastser.export",
    "fastser.functionals",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "fastser.predictor" and name != "fastser.export":  # their examples need a trained run
        assert result.attempted > 0
