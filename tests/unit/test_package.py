"""The package as users import it."""

import pytest


@pytest.mark.slow
def test_submodules_used_in_the_docs_are_attributes_after_import():
    """`import keras_gex` is enough for `keras_gex.datasets.noisy_digits` (README)."""
    import subprocess
    import sys

    code = "import keras_gex; keras_gex.datasets.noisy_digits; keras_gex.baselines.el2n_scores"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
