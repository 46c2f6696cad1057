"""Every bad input gets a clear error, never a silently wrong score."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import keras_gex


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype("float32")
    y = rng.integers(0, 10, size=40)
    model = make_mlp(seed=0, hidden=8)
    model.fit(x, y, epochs=1, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=2, steps=3, learning_rate=0.01, verbose=0
    )
    return model, ens, x, y


def test_unbatched_dataset(tiny):
    _, ens, x, y = tiny
    with pytest.raises(ValueError, match="unbatched"):
        ens.self_influence(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0)


def test_infinite_dataset(tiny):
    _, ens, x, y = tiny
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(ValueError, match="infinite"):
        ens.self_influence(ds, verbose=0)


def test_dataset_without_labels(tiny):
    _, ens, x, _ = tiny
    with pytest.raises(ValueError, match="labels are required"):
        ens.self_influence(tf.data.Dataset.from_tensor_slices(x).batch(8), verbose=0)


def test_empty_inputs(tiny):
    _, ens, x, y = tiny
    with pytest.raises(ValueError, match="empty"):
        ens.self_influence((x[:0], y[:0]), verbose=0)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).take(0)
    with pytest.raises(ValueError, match="empty"):
        ens.self_influence(empty, verbose=0)


def test_mismatched_lengths_and_bad_types(tiny):
    _, ens, x, y = tiny
    with pytest.raises(ValueError, match="same number of examples"):
        ens.self_influence((x, y[:-1]), verbose=0)
    with pytest.raises(ValueError, match="pair"):
        ens.self_influence((x, y, y, y), verbose=0)
    with pytest.raises(TypeError, match="tuple"):
        ens.self_influence(x, verbose=0)


def test_sample_weights_refused_with_what_to_pass(tiny):
    """`(x, y, sample_weight)`, as `model.fit` takes it, is refused at entry,
    saying how to drop the weights, for arrays and for datasets."""
    _, ens, x, y = tiny
    w = np.ones(len(y), "float32")
    with pytest.raises(ValueError, match=r"sample weights.*Pass `\(x, y\)`"):
        ens.self_influence((x, y, w), verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    with pytest.raises(ValueError, match=r"sample weights.*ds\.map\(lambda x, y, sample_weight"):
        ens.self_influence(ds, verbose=0)


def test_nan_in_inputs(tiny):
    _, ens, x, y = tiny
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ens.self_influence((bad, y), verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((bad, y)).batch(8)
    with pytest.raises(ValueError, match="NaN"):
        ens.self_influence(ds, verbose=0)


def test_nan_in_later_batch_of_dataset(tiny):
    _, ens, x, y = tiny
    bad = x.copy()
    bad[35, 0] = np.inf
    ds = tf.data.Dataset.from_tensor_slices((bad, y)).batch(8)
    with pytest.raises(ValueError, match="NaN or inf"):
        ens.self_influence(ds, verbose=0)


def test_unbuilt_and_uncompiled_models(small_data):
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not been built"):
        keras_gex.GeometricEnsemble.collect(unbuilt, small_data, verbose=0)
    uncompiled = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="not compiled"):
        keras_gex.GeometricEnsemble.collect(uncompiled, small_data, verbose=0)
    with pytest.raises(TypeError, match=r"keras\.Model"):
        keras_gex.GeometricEnsemble.collect("model", small_data, verbose=0)


def test_multi_output_model_refused(small_data):
    inp = keras.Input((64,))
    model = keras.Model(inp, [keras.layers.Dense(10)(inp), keras.layers.Dense(1)(inp)])
    model.compile(loss=["sparse_categorical_crossentropy", "mse"])
    with pytest.raises(ValueError, match="single-output"):
        keras_gex.GeometricEnsemble.collect(model, small_data, verbose=0)


def test_reduced_loss_refused(small_data):
    model = make_mlp(seed=0, hidden=8)

    def mean_loss(y_true, y_pred):
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        )

    ens = keras_gex.GeometricEnsemble.collect(
        model, small_data, num_members=1, steps=2, learning_rate=0.01, verbose=0
    )
    ens.loss = keras_gex.losses.resolve_loss(model, mean_loss)
    ens._scorer = None
    with pytest.raises(ValueError, match="one value per example"):
        ens.self_influence(small_data, verbose=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_members": 0}, "num_members=0"),
        ({"steps": 0}, "steps=0"),
        ({"steps": "many"}, "steps='many'"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"bn_batches": -1}, "bn_batches=-1"),
        ({"seed": -2}, "seed=-2"),
        ({"chain": 1}, "chain=1"),
    ],
)
def test_collect_arguments(kwargs, message, tiny):
    model, _, x, y = tiny
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.collect(model, (x, y), verbose=0, **kwargs)


def test_ensemble_applied_to_a_different_model_shape(tiny):
    _, ens, _, _ = tiny
    rng = np.random.default_rng(1)
    wrong = rng.normal(size=(10, 32)).astype("float32")
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        ens.self_influence((wrong, np.zeros(10, int)), verbose=0)


@pytest.mark.filterwarnings("ignore:Step-size calibration")
@pytest.mark.parametrize("kind", ["categorical", "binary_multilabel", "mse", "custom"])
def test_other_losses_end_to_end(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    if kind == "categorical":
        y = np.eye(3)[rng.integers(0, 3, 64)].astype("float32")
        units, loss = 3, keras.losses.CategoricalCrossentropy(from_logits=True)
    elif kind == "binary_multilabel":
        y = (rng.random((64, 4)) > 0.5).astype("float32")
        units, loss = 4, keras.losses.BinaryCrossentropy(from_logits=True)
    elif kind == "mse":
        y = x[:, :2] * 2
        units, loss = 2, "mse"
    else:
        y = x[:, :1]
        units = 1

        def loss(y_true, y_pred):
            return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(units)])
    model.compile(loss=loss)
    lr = "auto" if kind in ("categorical", "binary_multilabel") else 0.05
    ens = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=2, steps=5, learning_rate=lr, verbose=0
    )
    dev = ens.deviations((x, y), verbose=0)
    assert dev.deviations.shape == (64, 2) and np.all(np.isfinite(dev.deviations))
    report = keras_gex.detect_noisy((x, y), ens, verbose=0)
    if kind == "binary_multilabel":
        targets = report.relabeled_targets(source="model")
        assert targets.shape == (64, 4)
        probs = 1 / (1 + np.exp(-report.predictions))
        np.testing.assert_allclose(targets[report.noisy_mask], probs[report.noisy_mask], rtol=1e-6)
        from_members = report.relabeled_targets()
        member_probs = report.ensemble_probs()
        assert member_probs.shape == (64, 4)
        assert np.all((member_probs > 0) & (member_probs < 1))
        np.testing.assert_allclose(
            from_members[report.noisy_mask], member_probs[report.noisy_mask], rtol=1e-6
        )
    if kind == "mse":
        with pytest.raises(ValueError, match="classification loss"):
            report.relabeled_targets()
        # a regression's fit is the share of the mean target's loss explained, said so
        members = r"members: .*, loss explained -?[\d.]+ \(θ\*: -?[\d.]+\)"
        assert re.search(members, report.summary(None))


def test_auto_learning_rate_refuses_to_calibrate_on_a_model_at_chance():
    """An untrained regression model explains none of the mean-prediction loss:
    there is no fit to keep, so the fixed step size is used and a warning says why."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    with pytest.warns(UserWarning, match="no better than chance"):
        ens = keras_gex.GeometricEnsemble.collect(
            model, (x, 5.0 + x[:, :1]), num_members=1, steps=2, verbose=0
        )
    assert ens.record.chance_fit == 0.0 and not ens.record.calibration


def test_labels_that_do_not_fit_the_loss(tiny):
    _, ens, x, y = tiny
    with pytest.raises(ValueError, match="One-hot labels need categorical"):
        ens.self_influence((x, np.eye(10)[y]), verbose=0)
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        ens.self_influence((x, y + 20), verbose=0)
    with pytest.raises(ValueError, match="fractional"):
        ens.self_influence((x, y + 0.5), verbose=0)


def test_categorical_loss_refuses_integer_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    ens = keras_gex.GeometricEnsemble(
        model,
        keras_gex.weights.WeightSet.from_model(model),
        [keras_gex.weights.WeightSet.from_model(model)],
        keras_gex.losses.resolve_loss(model),
    )
    with pytest.raises(ValueError, match="Integer class ids need sparse"):
        ens.self_influence((x, rng.integers(0, 3, 16)), verbose=0)


def test_ensemble_members_must_fit_the_model(tiny):
    _, ens, _, _ = tiny
    other = make_mlp(seed=0, hidden=16)
    with pytest.raises(ValueError, match="do not fit the model"):
        keras_gex.GeometricEnsemble(other, ens.reference, ens.members, ens.loss)


def test_numpy_scalars_accepted_and_zero_batch_size_refused(tiny):
    model, ens, x, y = tiny
    with pytest.raises(ValueError, match="batch_size=0"):
        ens.self_influence((x, y), batch_size=0, verbose=0)
    dev = ens.deviations((x, y), reference_floor=np.float32(0.01), verbose=0)
    assert dev.deviations.shape == (40, 2)
    report = keras_gex.detect_noisy((x, y), ens, threshold=np.float32(0.5), verbose=0)
    assert report.threshold == 0.5
    again = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=1, steps=2, learning_rate=np.float32(0.01),
        momentum=np.float32(0.5), verbose=0,
    )  # fmt: skip
    assert again.info["momentum"] == 0.5


def test_inf_input_refused_by_predict_and_loss_baseline(tiny):
    """A compiled forward pass can map an `inf` input to finite outputs (TF 2.21 on
    an AVX-512 CPU): predictions and baseline scores must refuse the row, not
    return a finite, meaningless value for it."""
    from keras_gex import baselines

    model, ens, x, y = tiny
    bad = x.copy()
    bad[35, 0] = np.inf
    ds = tf.data.Dataset.from_tensor_slices((bad, y)).batch(8)
    with pytest.raises(ValueError, match=r"NaN or inf on 1 example\(s\) \(first indices \[35\]\)"):
        ens.predict(bad, verbose=0)
    with pytest.raises(ValueError, match=r"NaN or inf on 1 example\(s\) \(first indices \[35\]\)"):
        ens.predict(ds, verbose=0)
    with pytest.raises(ValueError, match=r"NaN or inf on 1 example\(s\) \(first indices \[35\]\)"):
        baselines.loss_scores(model, ds, verbose=0)


def test_a_bad_label_past_the_first_batch_is_refused_before_any_work(tiny):
    """Every label held in memory (arrays, or a dataset read into them for fine-tuning)
    is checked at entry, not only the first batch's: a class id out of range at row 35
    failed inside the compiled fine-tuning or scoring loop with TensorFlow's graph error."""
    model, ens, x, y = tiny
    bad = y.copy()
    bad[35] = 12
    message = re.escape("Received labels in [0, 12], on 1 example(s) (first indices [35])")
    ds = tf.data.Dataset.from_tensor_slices((x, bad)).batch(8)
    for data in ((x, bad), ds):
        with pytest.raises(ValueError, match=message):
            keras_gex.GeometricEnsemble.collect(
                model, data, num_members=1, steps=2, learning_rate=0.01, verbose=0
            )
    with pytest.raises(ValueError, match=message):
        ens.self_influence((x, bad), verbose=0)
    # Scoring streams a dataset: its batch is named, with TensorFlow's reason.
    streamed = re.escape("the batch from example 32 on cannot be scored. Received from ")
    with pytest.raises(ValueError, match=streamed + ".*label value of 12"):
        ens.self_influence(ds, verbose=0)


def test_nan_past_the_first_batch_is_refused_before_fine_tuning(tiny):
    """A dataset read into memory is refused as arrays are, naming the rows; it used to
    run until fine-tuning diverged six times and then advise a smaller step size."""
    model, _, x, y = tiny
    bad = x.copy()
    bad[35, 0] = np.nan
    ds = tf.data.Dataset.from_tensor_slices((bad, y)).batch(8)
    message = re.escape("`x` contains NaN or inf values, on 1 example(s) (first indices [35])")
    with pytest.raises(ValueError, match=message):
        keras_gex.GeometricEnsemble.collect(
            model, ds, num_members=1, steps=2, learning_rate=0.01, verbose=0
        )


def test_binary_cross_entropy_labels_must_be_probabilities():
    """Labels of -1 and 1 (or class ids) under binary cross-entropy, which Keras trains
    on towards a loss without a minimum, are refused with the fix; soft labels pass."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 2, size=40)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile("sgd", keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)

    def collect(labels):
        return keras_gex.GeometricEnsemble.collect(
            model, (x, labels), num_members=1, steps=2, learning_rate=0.01, verbose=0
        )

    with pytest.raises(ValueError, match=re.escape("to 0 and 1 first: `(y + 1) // 2`")):
        collect(2 * y - 1)
    late = y.copy()
    late[30] = 2
    with pytest.raises(ValueError, match=re.escape("labels in [0, 2], on 1 example(s)")):
        collect(late)
    assert collect(0.1 + 0.8 * y).num_members == 1
