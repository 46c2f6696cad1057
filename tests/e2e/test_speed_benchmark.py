"""`benchmarks/speed.py`'s GE-collection section on a tiny model.

Section (b) reads the steps the collection ran from its record
(`record.steps_run`); a section that fails is listed, never silently dropped.
This runs it for real, at a tiny size.
"""

import keras
import pytest
from conftest import import_benchmark
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def speed():
    return import_benchmark("speed")


@pytest.mark.slow
def test_collection_row_counts_every_step_the_collection_runs(speed):
    x, y = load_digits(return_X_y=True)
    x, y = (x[:256] / 16.0).astype("float32"), y[:256].astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, "relu"), keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, batch_size=64, verbose=0)

    row = speed.collection_row("tiny MLP", model, x, y, train_seconds=1.0, without_xla=False)

    # 30 epochs of 4 batches: 120 steps of θ*, fewer than 8 members of 50 steps.
    assert row["members"] == 4 and row["probes"] >= 1
    # The steps counted as they ran agree with the probes and members recorded:
    # every probe (an abandoned one ran half its steps; an accepted one is
    # member 0), the other members and the members run again; the warm-up's
    # one step at lr 0 is not counted.
    redone = sum(row["redone_members"].values())
    members_run = row["members"] - row["probe_kept"] + redone
    assert row["steps"] == row["probe_steps"] + members_run * row["steps_per_member"]
    assert 0.0 <= row["calibration_s"] <= row["ge_s"]
    assert row["ge_over_fit"] > 0 and row["fit_steps_noxla_s"] is None
