"""The README's Usage block, run verbatim in two fresh processes under
`keras.utils.set_random_seed`: bit-identical scores and no keras_gex warning."""

import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

PRELUDE = textwrap.dedent(
    """
    import os, warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.simplefilter("always")
    import keras, keras_gex
    keras.utils.set_random_seed(0)
    digits = keras_gex.datasets.noisy_digits(noise=0.1, seed=0)
    x_train, y_train = digits.x_train, digits.y_train
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),
    ])
    """
)


def _usage_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_usage_is_reproducible_and_warns_nothing(tmp_path):
    script = tmp_path / "usage.py"
    epilogue = f"\nimport numpy as np\nnp.save({str(tmp_path)!r} + '/scores.npy', report.scores)\n"
    script.write_text(PRELUDE + _usage_block() + epilogue)
    scores = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        warned = [line for line in proc.stderr.splitlines() if "UserWarning" in line]
        assert not warned, warned
        scores.append(np.load(tmp_path / "scores.npy"))
    np.testing.assert_array_equal(scores[0], scores[1])
