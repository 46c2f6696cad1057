"""A mismatch between model, loss and data is refused at entry, before any fine-tuning,
with a message naming what was received and what was expected (issue #28, items 4, 5)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp
from tolerances import PROB_ATOL, SCORE_ATOL, SCORE_RTOL

import keras_gex
from keras_gex import ensemble as ensemble_module

SCE = keras.losses.SparseCategoricalCrossentropy
SETTINGS = dict(num_members=1, steps=2, learning_rate=0.01, verbose=0)


@pytest.fixture()
def no_fine_tuning(monkeypatch):
    """Fails the test if a collection gets as far as fine-tuning."""

    def fine_tune(*args, **kwargs):
        raise AssertionError("fine-tuning started: the entry checks let the mismatch through")

    monkeypatch.setattr(ensemble_module.collection, "collect", fine_tune)


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_train[:128], digits.y_train[:128]


def _mlp(loss, activation=None, hidden=16, input_dim=64):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10, activation=activation),
        ]
    )
    model.compile(optimizer="adam", loss=loss)
    return model


# -- item 4 -------------------------------------------------------------------------------------
LOGITS_MESSAGE = (
    r"The model's outputs are not probabilities \(values in \[.*\] on the first batch\) but "
    r"its loss `sparse_categorical_crossentropy` has from_logits=False, which expects softmax "
    r"probabilities\. Compile with `keras\.losses\.SparseCategoricalCrossentropy"
    r"\(from_logits=True\)` or add a softmax output\."
)


def test_logits_model_with_probability_loss_refused_by_collect(data, no_fine_tuning):
    model = _mlp("sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=LOGITS_MESSAGE):
        keras_gex.GeometricEnsemble.collect(model, data, **SETTINGS)


def test_logits_model_with_probability_loss_refused_by_detect_noisy(data, no_fine_tuning):
    model = _mlp("sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=LOGITS_MESSAGE):
        keras_gex.detect_noisy(data, model, **SETTINGS)


def test_collector_refuses_before_training(data):
    model = _mlp("sparse_categorical_crossentropy")
    before = [v.numpy().copy() for v in model.trainable_variables]
    collector = keras_gex.GEXCollector(data, **SETTINGS)
    with pytest.raises(ValueError, match=LOGITS_MESSAGE):
        model.fit(*data, epochs=3, verbose=0, callbacks=[collector])
    for a, v in zip(before, model.trainable_variables):  # not one step was taken
        np.testing.assert_array_equal(a, v.numpy())


def test_collector_checks_a_model_fit_builds_after_its_first_step(data):
    collector = keras_gex.GEXCollector(data, **SETTINGS)  # built before the model
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    model.compile(loss="sparse_categorical_crossentropy")  # built by fit's first step
    batches = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: batches.append(1))
    with pytest.raises(ValueError, match=LOGITS_MESSAGE):
        model.fit(*data, epochs=5, batch_size=16, verbose=0, callbacks=[collector, counter])
    assert len(batches) == 1  # refused after the step that built the model, not after fit


def test_collector_on_reshuffling_dataset_checks_the_output_layer(data):
    ds = tf.data.Dataset.from_tensor_slices(data).shuffle(128, seed=0).batch(32)
    collector = keras_gex.GEXCollector(ds, **SETTINGS)
    with pytest.raises(ValueError, match=r"no activation.*from_logits=False"):
        _mlp("sparse_categorical_crossentropy").fit(ds, epochs=1, verbose=0, callbacks=[collector])


def test_sigmoid_output_with_binary_logits_loss_refused(data, no_fine_tuning):
    x, y = data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"applies a sigmoid\) but its loss .*from_logits=True"):
        keras_gex.GeometricEnsemble.collect(
            model, (x, (y[:, None] % 2).astype("float32")), **SETTINGS
        )


def test_softmax_output_with_logits_loss_warns_and_collects(data):
    model = _mlp(SCE(from_logits=True), activation="softmax")
    with pytest.warns(UserWarning, match=r"applies a softmax\) but its loss .*from_logits=True"):
        ens = keras_gex.GeometricEnsemble.collect(model, data, **SETTINGS)
    assert ens.num_members == 1


# -- item 5 -------------------------------------------------------------------------------------
def test_one_hot_labels_with_sparse_loss_refused(data, no_fine_tuning):
    x, y = data
    with pytest.raises(
        ValueError,
        match=r"Argument `train_data`: .*integer class ids of shape \(batch,\) or \(batch, 1\).*"
        r"Received: y with shape \(batch, 10\)\. One-hot labels need categorical",
    ):
        keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), (x, np.eye(10)[y]), **SETTINGS)


@pytest.mark.parametrize("shape", ["(batch,)", "(batch, 1)"])
def test_class_ids_under_mse_refused(data, shape, no_fine_tuning):
    x, y = data
    labels = y.astype("float32") if shape == "(batch,)" else y[:, None].astype("float32")
    model = _mlp("mse", activation="softmax")
    with pytest.raises(
        ValueError,
        match=r"`mean_squared_error` compares labels `y` with the model's outputs element by "
        rf"element, so `y` must have the outputs' shape \(batch, 10\)\. Received: y with shape "
        rf"{re.escape(shape)}\. Integer class ids .*`sparse_categorical_crossentropy`",
    ):
        keras_gex.GeometricEnsemble.collect(model, (x, labels), **SETTINGS)


def test_inputs_of_the_wrong_width_refused(data, no_fine_tuning):
    x, y = data
    message = (
        r"Argument `train_data` must hold inputs whose last axis has size 64 .*"
        r"Received: inputs of shape \(batch, 32\)\."
    )
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), (x[:, :32], y), **SETTINGS)
    ds = tf.data.Dataset.from_tensor_slices((x[:, :32], y)).batch(32)
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), ds, **SETTINGS)


def test_corrupt_manifest_refused_by_load_and_resume(tmp_path, data):
    (tmp_path / "manifest.json").write_text('{"format": "keras_gex.geometric_ensemble", ')
    model = make_mlp(hidden=8)
    message = r"manifest .* is damaged: .* Received: invalid JSON \(Expecting"
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.load(tmp_path, model)
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.collect(model, data, directory=tmp_path, **SETTINGS)


def test_valid_setups_still_collect(data):
    """Multi-label sigmoid + BCE, one-hot under mse, a (batch, 64, 1) input: no refusal."""
    x, y = data
    keras.utils.set_random_seed(0)
    sigmoid = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="sigmoid")])
    sigmoid.compile(loss="binary_crossentropy")
    one_hot = np.eye(10, dtype="float32")[y]
    keras_gex.GeometricEnsemble.collect(sigmoid, (x, one_hot), **SETTINGS)
    keras_gex.GeometricEnsemble.collect(_mlp("mse", "softmax"), (x, one_hot), **SETTINGS)
    keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), (x[:, :, None], y), **SETTINGS)


def _two_output_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(10)(hidden), keras.layers.Dense(1)(hidden)])
    model.compile("sgd", [SCE(from_logits=True), keras.losses.BinaryCrossentropy(from_logits=True)])
    return model


def test_multi_output_model_and_labels_refused(data, no_fine_tuning):
    x, y = data
    parity = (y % 2).astype("float32")
    with pytest.raises(
        ValueError, match=re.escape("single-output models only. The model has 2 outputs")
    ):
        keras_gex.detect_noisy((x, [y, parity]), _two_output_model(), verbose=0)


def test_labels_per_output_named_as_such(data):
    # Wherever the data is read: not reported as a length mismatch.
    x, y = data
    parity = (y % 2).astype("float32")
    ensemble = keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), (x, y), **SETTINGS)
    for labels in ([y, parity], {"digit": y, "parity": parity}):
        with pytest.raises(ValueError, match="`y` holds 2 label arrays, one per model output"):
            ensemble.deviations((x, labels), verbose=0)
        per_output = labels if isinstance(labels, dict) else tuple(labels)  # a list would stack
        dataset = tf.data.Dataset.from_tensor_slices((x, per_output)).batch(32)
        with pytest.raises(ValueError, match="`y` holds 2 label arrays, one per model output"):
            ensemble.deviations(dataset, verbose=0)


class TwoLayers(keras.Model):
    """A subclassed model: one hidden layer, then `units` outputs."""

    def __init__(self, hidden=16, units=1):
        super().__init__()
        self.hidden = keras.layers.Dense(hidden, activation="relu")
        self.out = keras.layers.Dense(units)

    def call(self, x):
        return self.out(self.hidden(x))


def _sigmoid_mlp(subclassed=False):
    keras.utils.set_random_seed(0)
    if subclassed:
        model = TwoLayers()  # one sigmoid output
    else:
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
    model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize(
    "subclassed",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["sequential", "subclassed"],
)
def test_binary_labels_without_last_axis_read_as_keras_reads_them(data, subclassed):
    """`(batch,)` 0/1 labels against a `(batch, 1)` output, as `fit` takes them: the same
    scores as `(batch, 1)` labels, from arrays and from a dataset."""
    x, y = data
    parity = (y % 2).astype("float32")
    model = _sigmoid_mlp(subclassed)
    model.fit(x, parity, epochs=2, verbose=0)
    settings = dict(num_members=2, steps=4, learning_rate=0.05, seed=0, verbose=0)
    column = keras_gex.detect_noisy((x, parity[:, None]), model, **settings)
    flat = keras_gex.detect_noisy((x, parity), model, **settings)
    streamed = keras_gex.detect_noisy(
        tf.data.Dataset.from_tensor_slices((x, parity)).batch(32), model, **settings
    )
    np.testing.assert_array_equal(flat.member_losses, column.member_losses)
    # Streamed in batches of 32: the same members, scored by matmuls of another shape,
    # which on some CPUs (AVX2) round a few rows differently in the last float32 bit.
    np.testing.assert_allclose(
        streamed.member_losses, column.member_losses, rtol=SCORE_RTOL, atol=SCORE_ATOL
    )
    for report in (flat, streamed):
        np.testing.assert_array_equal(report.noisy_mask, column.noisy_mask)
        assert report.labels.shape == (len(x), 1)


def test_string_labels_refused(data, no_fine_tuning):
    x, y = data
    with pytest.raises(ValueError, match=r"`y` must hold numbers .* Received: y of dtype <U1"):
        keras_gex.GeometricEnsemble.collect(
            _sigmoid_mlp(), (x, np.where(y % 2 == 1, "a", "b")), **SETTINGS
        )


class _Twin(keras.Model):
    """Dense - BatchNorm - Dropout - Dense; `call` with or without `training`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.3)
        self.out = keras.layers.Dense(10)


class DeclaresTraining(_Twin):
    def call(self, x, training=None):
        return self.out(self.drop(self.norm(self.hidden(x), training=training), training=training))


class OmitsTraining(_Twin):
    def call(self, x):  # training reaches the layers through Keras' call context
        return self.out(self.drop(self.norm(self.hidden(x))))


@pytest.mark.slow
def test_call_without_training_fine_tunes_as_fit_trains_it(data):
    """Two routes agree: a `call()` without `training` gives the members, BatchNorm statistics
    and dropout of the same model written with it."""
    x, y = data
    keras.utils.set_random_seed(0)
    trained = DeclaresTraining()
    trained.compile("adam", SCE(from_logits=True))
    trained.fit(x, y, epochs=3, verbose=0)
    twin = OmitsTraining()
    twin(x[:1])
    twin.set_weights(trained.get_weights())
    twin.compile("adam", SCE(from_logits=True))
    reports = []
    for model in (trained, twin):
        reports.append(
            keras_gex.detect_noisy(
                (x, y), model, num_members=2, steps=10, learning_rate=0.1, seed=0, verbose=0
            )
        )
    np.testing.assert_array_equal(reports[1].reference_losses, reports[0].reference_losses)
    np.testing.assert_array_equal(reports[1].member_losses, reports[0].member_losses)
    assert not np.array_equal(reports[0].member_losses[:, 0], reports[0].reference_losses)


def _named_output_twins(data):
    """One trained network as a plain model and as one that returns `{"digit": logits}`
    (compiled with `{"digit": loss}`), sharing every layer."""
    x, y = data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    logits = keras.layers.Dense(10)(keras.layers.Dense(16, activation="relu")(inputs))
    plain = keras.Model(inputs, logits)
    plain.compile("adam", SCE(from_logits=True))
    plain.fit(x, y, epochs=3, verbose=0)
    named = keras.Model(inputs, {"digit": logits})
    named.compile("adam", {"digit": SCE(from_logits=True)})
    return plain, named


@pytest.mark.slow
def test_one_named_output_scores_as_the_plain_output(data):
    """A model built `keras.Model(x, {"digit": logits})` is a single-output model: with its
    labels as `fit` takes them (`{"digit": y}`, `[y]` or `y`, arrays or a dataset) it gets the
    members and scores of the same network returning the logits themselves."""
    x, y = data
    plain, named = _named_output_twins(data)
    settings = dict(num_members=2, steps=10, learning_rate=0.1, seed=0, verbose=0)
    expected = keras_gex.detect_noisy((x, y), plain, **settings)
    for labels in ({"digit": y}, [y], y):
        report = keras_gex.detect_noisy((x, labels), named, **settings)
        np.testing.assert_array_equal(report.reference_losses, expected.reference_losses)
        np.testing.assert_array_equal(report.member_losses, expected.member_losses)
    streamed = tf.data.Dataset.from_tensor_slices((x, {"digit": y})).batch(32)
    report = keras_gex.detect_noisy(streamed, named, **settings)
    # Batches of 32 round a few rows differently on some CPUs (AVX2): float32 level.
    np.testing.assert_allclose(
        report.member_losses, expected.member_losses, rtol=SCORE_RTOL, atol=SCORE_ATOL
    )
    np.testing.assert_allclose(
        report.ensemble.predict(x), expected.ensemble.predict(x), atol=PROB_ATOL
    )
    np.testing.assert_array_equal(
        keras_gex.baselines.loss_scores(named, (x, {"digit": y}), verbose=0),
        keras_gex.baselines.loss_scores(plain, (x, y), verbose=0),
    )
    named_table = keras_gex.compare_models({"m": named}, (x, {"digit": y}), print_fn=None)
    assert named_table == keras_gex.compare_models({"m": plain}, (x, y), print_fn=None)


def test_labels_of_no_example_refused_as_such(data, no_fine_tuning):
    x, _ = data
    with pytest.raises(ValueError, match=r"`y` must be an array with one row per example"):
        keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), (x, {"a": 1, "b": 2}), **SETTINGS)


def test_a_model_with_nothing_trainable_refused(data, no_fine_tuning):
    """`model.trainable = False` (a model kept as a feature extractor): no member could move,
    so collecting is refused at entry, not run to six probes that all keep θ*'s fit."""
    model = make_mlp(hidden=8)
    model.trainable = False
    with pytest.raises(ValueError, match=r"no trainable weights \(`model\.trainable = False`"):
        keras_gex.detect_noisy(data, model, **SETTINGS)
    # its own loss needs no fine-tuning: still scored
    assert keras_gex.baselines.loss_scores(model, data, verbose=0).shape == (len(data[1]),)


class MixupModel(TwoLayers):
    """Trains on its own objective: a `compute_loss` that is not the compiled loss."""

    def __init__(self):
        super().__init__(hidden=8, units=10)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return 0.5 * super().compute_loss(x, y, y_pred, sample_weight, training)


def test_a_model_training_on_its_own_objective_is_told_what_gex_fine_tunes(data):
    """A `compute_loss` / `train_step` override: the members and scores use the compiled
    loss only, which the warning says, with `loss=` as the way to choose; no warning for
    a plain model or when `loss=` is given."""
    import warnings

    model = MixupModel()
    model.compile(loss=SCE(from_logits=True))
    model(data[0][:1])
    with pytest.warns(UserWarning, match=r"MixupModel overrides `compute_loss`.* `loss=`"):
        keras_gex.GeometricEnsemble.collect(model, data, **SETTINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_gex.GeometricEnsemble.collect(model, data, loss=SCE(from_logits=True), **SETTINGS)
        keras_gex.GeometricEnsemble.collect(make_mlp(hidden=8), data, **SETTINGS)
    assert not [w for w in caught if "overrides" in str(w.message)]
    collector = keras_gex.GEXCollector(data, **SETTINGS)
    model.compile(optimizer="adam", loss=SCE(from_logits=True))
    with pytest.warns(UserWarning, match=r"overrides `compute_loss`"):
        model.fit(*data, epochs=1, verbose=0, callbacks=[collector])
