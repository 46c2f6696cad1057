import doctest
import importlib

import pytest

MODULES = [
    "keras_gex._tracing",
    "keras_gex.analysis.relabel",
    "keras_gex.analysis.report",
    "keras_gex.analysis.scores",
    "keras_gex.analysis.thresholding",
    "keras_gex.datasets",
    "keras_gex.io.export",
    "keras_gex.analysis.prune",
    "keras_gex.collection.budget",
    "keras_gex.collection.step_size",
    "keras_gex.collection.tuner",
    "keras_gex.collection.driver",
    "keras_gex.collection.frozen",
    "keras_gex.config",
    "keras_gex.data",
    "keras_gex.losses",
    "keras_gex.weights",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
