"""Shared tiny fixtures: seeded digits with known flips, a memorising MLP, a BN-CNN."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib

matplotlib.use("Agg")

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gex.datasets import noisy_digits

#: Logical CPU devices for the `tf.distribute` tests (1, 2 and 4 replicas). They
#: must be configured before TensorFlow initialises its devices, hence here, at
#: import; every other test keeps running on the first one as before.
NUM_LOGICAL_CPUS = 4


def _split_cpu(count: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:  # TensorFlow was initialised first (e.g. by a plugin)
        pass


_split_cpu(NUM_LOGICAL_CPUS)


def make_mlp(seed=0, hidden=128, num_classes=10, input_dim=64, loss=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def user_sparse_ce(y_true, y_pred):
    """A user's loss function: the sparse cross-entropy on logits, under a name
    keras_gex does not know (it is read from the outputs and labels)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def make_bn_model(seed=0, num_classes=10):
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((64,)),
            layers.Dense(32),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dropout(0.2),
            layers.Dense(num_classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def import_benchmark(name: str):
    """Imports `benchmarks/NAME.py` as a module (the benchmarks are scripts, not a package)."""
    import importlib
    import pathlib
    import sys

    folder = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture(scope="session")
def digits():
    return noisy_digits(noise=0.1, seed=0)


@pytest.fixture(scope="session")
def trained_mlp(digits):
    model = make_mlp(seed=0)
    model.fit(digits.x_train, digits.y_train, epochs=60, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="session")
def digits_ensemble(trained_mlp, digits):
    import keras_gex

    return keras_gex.GeometricEnsemble.collect(
        trained_mlp,
        (digits.x_train, digits.y_train),
        num_members=4,
        steps=100,
        seed=0,
        verbose=0,
    )


@pytest.fixture()
def small_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 64)).astype("float32")
    y = rng.integers(0, 10, size=50)
    return x, y
