import re

import numpy as np
import pytest
from conftest import make_mlp

import keras_gex


def test_collector_builds_ensemble_after_fit_and_leaves_fit_result(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    model = make_mlp(seed=0, hidden=32)
    collector = keras_gex.GEXCollector(
        (x, y), num_members=2, steps=10, learning_rate=0.05, seed=0, verbose=0
    )
    reference = make_mlp(seed=0, hidden=32)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False, callbacks=[collector])
    reference.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    assert isinstance(collector.ensemble, keras_gex.GeometricEnsemble)
    assert collector.ensemble.num_members == 2
    for a, b in zip(model.variables, reference.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # θ* of the ensemble is the trained model
    for a, b in zip(collector.ensemble.reference.trainable, model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_state_resets_on_train_begin(digits):
    collector = keras_gex.GEXCollector((digits.x_train, digits.y_train), verbose=0)
    collector.ensemble = "stale"
    collector.on_train_begin()
    assert collector.ensemble is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_members": 0},
            "Argument `num_members` must be a positive integer. Received: num_members=0",
        ),
        ({"steps": -3}, "Argument `steps` must be a positive integer"),
        ({"learning_rate": 0.0}, "Argument `learning_rate` must be a positive finite number"),
        ({"learning_rate": "fast"}, "Argument `learning_rate`"),
        ({"batch_size": 1.5}, "Argument `batch_size` must be a positive integer"),
        ({"verbose": 5}, "Argument `verbose`"),
        # Refused at construction, before `fit`, not only when collection starts.
        ({"momentum": 1.0}, "Argument `momentum` must be a number in [0, 1)"),
        ({"chain": "yes"}, "Argument `chain` must be a bool"),
    ],
)
def test_collector_validates_arguments(kwargs, message, small_data):
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_gex.GEXCollector(small_data, **kwargs)


def test_collector_requires_train_data():
    with pytest.raises(ValueError, match="train_data"):
        keras_gex.GEXCollector(None)


@pytest.mark.slow
def test_weights_restored_after_collection_are_named(digits):
    """`EarlyStopping(restore_best_weights=True)` listed after the collector restores other
    weights once the ensemble is collected: scoring says so and what to do; listed before
    it, the ensemble's θ* is the restored model and nothing is said."""
    import warnings

    import keras

    x, y = digits.x_train[:300], digits.y_train[:300]
    # validation labels the training contradicts: the validation loss rises from the first
    # epoch on, so the best weights are the first epoch's and training stops at the second
    val = digits.x_train[300:400], (digits.y_train[300:400] + 1) % 10
    settings = dict(num_members=2, steps=10, learning_rate=0.05, seed=0, verbose=0)
    for late in (True, False):
        model = make_mlp(seed=0, hidden=32)
        collector = keras_gex.GEXCollector((x, y), **settings)
        stop = keras.callbacks.EarlyStopping(patience=0, restore_best_weights=True)
        callbacks = [collector, stop] if late else [stop, collector]
        model.fit(x, y, epochs=3, validation_data=val, verbose=0, callbacks=callbacks)
        assert stop.best_epoch == 0 and stop.stopped_epoch == 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collector.ensemble.deviations((x, y), verbose=0)
        said = [str(w.message) for w in caught if "weights have changed" in str(w.message)]
        assert bool(said) == late
        if late:
            assert "must come before `GEXCollector`" in said[0]
            assert caught[0].filename == __file__


def test_another_keras_backend_refused_at_entry(monkeypatch, digits):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match=r"on 'jax'\. Set the environment variable `KERAS"):
        keras_gex.GEXCollector((digits.x_train, digits.y_train))
    with pytest.raises(RuntimeError, match=r"runs on Keras' TensorFlow backend"):
        keras_gex.detect_noisy((digits.x_train, digits.y_train), make_mlp(hidden=4))


def test_a_keras_2_model_named_as_such(digits):
    """A `tf_keras` model (its classes share Keras 3's names) is named by its module."""
    Sequential = type("Sequential", (), {"__module__": "tf_keras.src.engine.sequential"})
    with pytest.raises(
        TypeError,
        match=r"type tf_keras\.src\.engine\.sequential\.Sequential "
        r"\(a Keras 2 model",
    ):
        keras_gex.GeometricEnsemble.collect(Sequential(), (digits.x_train, digits.y_train))
