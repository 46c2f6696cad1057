import doctest
import importlib

import pytest

MODULES = [
    "keras_gex.relabel",
    "keras_gex.thresholding",
    "keras_gex.datasets",
    "keras_gex.prune",
    "keras_gex.collect",
    "keras_gex.data",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
