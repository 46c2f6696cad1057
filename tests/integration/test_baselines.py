"""Tests of the paper's baselines (`keras_gex.baselines`).

Loss at θ*, EL2N, GEX-lin, TracInRP with GE checkpoints and RandProj.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import user_sparse_ce
from tolerances import SCORE_ATOL, SCORE_RTOL

from keras_gex.baselines import (
    el2n_scores,
    gex_lin_scores,
    gradients,
    loss_scores,
    randproj_scores,
    tracin_scores,
)
from keras_gex.baselines import loss as loss_module
from keras_gex.baselines.gradients import _linearized_deviations, _projection_matrix
from keras_gex.ensemble import GeometricEnsemble
from keras_gex.losses import resolve_loss
from keras_gex.weights import WeightSet


def _data(n=20, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, size=n).astype(np.int64)
    return x, y


def _dense_model(d=5, k=3, seed=0, loss="sparse_ce", lr=1e-2, zeros=False, activation=None):
    if seed is not None:
        keras.utils.set_random_seed(seed)
    init = "zeros" if zeros else "glorot_uniform"
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(k, activation=activation, kernel_initializer=init)]
    )
    losses = {
        "sparse_ce": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "ce": keras.losses.CategoricalCrossentropy(from_logits=True),
        "ce_probs": keras.losses.CategoricalCrossentropy(from_logits=False),
        "bce": keras.losses.BinaryCrossentropy(from_logits=True),
    }
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=losses[loss])
    return model


# -- loss_scores -----------------------------------------------------------------------


def test_loss_scores_match_manual_per_example_loss():
    x, y = _data(n=10)
    model = _dense_model()
    expected = keras.losses.sparse_categorical_crossentropy(
        y, model(x, training=False), from_logits=True
    )
    # batch_size=3 checks the order across batches and the short last batch.
    got = loss_scores(model, (x, y), batch_size=3)
    assert got.shape == (10,)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_loss_scores_accept_dataset_and_explicit_loss():
    x, y = _data(n=12)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])  # not compiled
    one_hot = keras.utils.to_categorical(y, 3)
    ds = tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(5)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    got = loss_scores(model, ds, loss=loss)
    expected = keras.losses.categorical_crossentropy(one_hot, model(x), from_logits=True)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_loss_scores_refuse_bad_arguments():
    x, y = _data()
    model = _dense_model()
    with pytest.raises(
        ValueError,
        match=re.escape("Argument `batch_size` must be a positive integer. Received: batch_size=0"),
    ):
        loss_scores(model, (x, y), batch_size=0)
    with pytest.raises(TypeError, match=re.escape("must be a `keras.Model`")):
        loss_scores("model", (x, y))
    with pytest.raises(ValueError, match="not compiled with a loss"):
        loss_scores(keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]), (x, y))
    with pytest.raises(ValueError, match="same number of examples"):
        loss_scores(model, (x, y[:-1]))
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(20).batch(4)
    with pytest.raises(ValueError, match="reshuffles on every iteration"):
        loss_scores(model, shuffled)
    # Finite inputs whose squared outputs overflow float32, in the third batch of 3.
    big = x.copy()
    big[7] = 1e25

    def squared_output(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_pred), axis=-1)

    message = "The model's loss is NaN or inf on 1 example(s) (first indices [7])"
    with pytest.raises(ValueError, match=re.escape(message)):
        loss_scores(model, (big, y), loss=squared_output, batch_size=3, verbose=0)


# -- el2n_scores: hand-computable cases -------------------------------------------------


def test_el2n_shape_finite_non_negative():
    x, y = _data(n=30)
    scores = el2n_scores(lambda: _dense_model(), x, y, epochs=2, repeats=2, batch_size=8)
    assert scores.shape == (30,)
    assert scores.dtype == np.float64
    assert np.all(np.isfinite(scores))
    assert np.all(scores >= 0)
    # ||p − e_y||₂ ≤ √2 for any probability vector p.
    assert np.all(scores <= np.sqrt(2) + 1e-6)


@pytest.mark.parametrize("labels", ["sparse", "one_hot"])
def test_el2n_of_a_uniform_model_is_known(labels):
    # Zero weights and a zero step size: every run predicts the uniform
    # distribution, so ||p − e_y||² = (1 − 1/K)² + (K − 1)/K² = (K − 1)/K.
    k = 4
    x, y = _data(n=11, k=k)
    loss = "sparse_ce" if labels == "sparse" else "ce"
    targets = y if labels == "sparse" else keras.utils.to_categorical(y, k)

    def model_fn():
        return _dense_model(k=k, loss=loss, lr=0.0, zeros=True)

    scores = el2n_scores(model_fn, x, targets, epochs=1, repeats=2, batch_size=4)
    np.testing.assert_allclose(scores, np.full(11, np.sqrt((k - 1) / k)), rtol=1e-6)


def test_el2n_uses_probabilities_as_given_and_sigmoid_for_binary():
    x, y = _data(n=9, k=3)

    def softmax_model():
        return _dense_model(k=3, loss="ce_probs", lr=0.0, zeros=True, activation="softmax")

    one_hot = keras.utils.to_categorical(y, 3)
    scores = el2n_scores(softmax_model, x, one_hot, epochs=1, repeats=1, batch_size=4)
    np.testing.assert_allclose(scores, np.full(9, np.sqrt(2 / 3)), rtol=1e-6)

    # One sigmoid logit at 0: p = 0.5, so |p − y| = 0.5 whatever the label.
    binary = (y > 0).astype(np.float32)[:, None]

    def sigmoid_model():
        return _dense_model(k=1, loss="bce", lr=0.0, zeros=True)

    scores = el2n_scores(sigmoid_model, x, binary, epochs=1, repeats=1, batch_size=4)
    np.testing.assert_allclose(scores, np.full(9, 0.5), rtol=1e-6)


def test_el2n_averages_repeats_of_the_same_seeds():
    x, y = _data(n=16)

    def model_fn():
        return _dense_model(seed=None, lr=0.1)  # seeded by el2n_scores

    one = el2n_scores(model_fn, x, y, epochs=2, repeats=1, batch_size=4, seed=5)
    again = el2n_scores(model_fn, x, y, epochs=2, repeats=1, batch_size=4, seed=5)
    np.testing.assert_allclose(one, again, rtol=1e-6)
    other = el2n_scores(model_fn, x, y, epochs=2, repeats=1, batch_size=4, seed=6)
    assert not np.allclose(one, other)
    both = el2n_scores(model_fn, x, y, epochs=2, repeats=2, batch_size=4, seed=5)
    np.testing.assert_allclose(both, (one + other) / 2, rtol=1e-5)


def test_el2n_takes_a_dataset_of_fixed_shapes_as_its_arrays():
    """A `tf.data.Dataset` (`y` None, as `fit` takes it) of fixed-shape examples is
    read into arrays once: the same scores as the arrays, to the bit."""
    x, y = _data(n=24)

    def model_fn():
        return _dense_model(seed=None, lr=0.1)

    from_arrays = el2n_scores(model_fn, x, y, epochs=2, repeats=2, batch_size=4, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    from_ds = el2n_scores(model_fn, ds, epochs=2, repeats=2, batch_size=4, verbose=0)
    np.testing.assert_array_equal(from_ds, from_arrays)


def test_el2n_scores_a_padded_text_pipeline_in_its_order():
    """Examples of varying length, streamed: each trains in mini-batches padded to
    their longest and is scored in the pipeline's order. With a step size of 0
    every repeat keeps its initial weights, and a masked model reads a row alike
    at any padding, so the stream's scores equal those of the rows padded once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=30)
    ids = [rng.integers(1, 20, size=n).astype("int32") for n in lengths]
    y = rng.integers(0, 3, size=30)

    def model_fn():
        model = keras.Sequential(
            [
                keras.Input((None,), dtype="int32"),
                keras.layers.Embedding(20, 4, mask_zero=True),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(3),
            ]
        )
        model.compile(
            keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        return model

    padded = tf.data.Dataset.from_generator(
        lambda: zip(ids, y),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)),
    ).padded_batch(7)
    streamed = el2n_scores(model_fn, padded, epochs=1, repeats=2, batch_size=8, verbose=0)
    rows = keras.utils.pad_sequences(ids, padding="post")
    arrays = el2n_scores(model_fn, rows, y, epochs=1, repeats=2, batch_size=8, verbose=0)
    np.testing.assert_allclose(streamed, arrays, rtol=1e-6, atol=1e-7)
    assert np.ptp(streamed) > 0.01  # rows differ: an order mix-up would show


def test_el2n_wants_labels_with_arrays_and_none_with_a_dataset():
    x, y = _data(n=8)
    with pytest.raises(ValueError, match="Argument `y` is required when `x` holds arrays"):
        el2n_scores(lambda: _dense_model(), x)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(ValueError, match="Argument `y` must be None when `x` is a dataset"):
        el2n_scores(lambda: _dense_model(), ds, y)
    with pytest.raises(ValueError, match="reshuffles"):
        el2n_scores(lambda: _dense_model(), ds.shuffle(8).batch(1).unbatch())


# -- el2n_scores: BatchNorm statistics ------------------------------------------------


def _bn_data(n=32):
    rng = np.random.default_rng(1)
    # Far from zero mean / unit variance, so stale moving statistics are wrong.
    x = rng.normal(5.0, 3.0, size=(n, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return x, y


def _bn_model_fn(store):
    def model_fn():
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, name="d1"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(3, name="d2"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        store.append(model)
        return model

    return model_fn


def _el2n_by_hand(model, x, y, mean=None, var=None):
    """EL2N in float64 from the model's weights, with the given BN statistics."""
    w1, b1 = (np.asarray(v, np.float64) for v in model.get_layer("d1").weights)
    bn = model.get_layer("bn")
    w2, b2 = (np.asarray(v, np.float64) for v in model.get_layer("d2").weights)
    h = x.astype(np.float64) @ w1 + b1
    if mean is None:
        mean, var = h.mean(axis=0), h.var(axis=0)
    gamma, beta = np.asarray(bn.gamma, np.float64), np.asarray(bn.beta, np.float64)
    z = (h - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
    logits = z @ w2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.linalg.norm(p - np.eye(3)[y], axis=1)


def test_el2n_reestimates_batchnorm_statistics():
    x, y = _bn_data()
    models = []
    # batch_size == N: every re-estimation batch is the whole (shuffled) data
    # set, so the re-estimated statistics are exactly the population ones.
    scores = el2n_scores(
        _bn_model_fn(models), x, y, epochs=1, repeats=1, batch_size=32, bn_batches=3
    )
    model = models[0]
    np.testing.assert_allclose(scores, _el2n_by_hand(model, x, y), rtol=1e-4, atol=1e-5)

    bn = model.get_layer("bn")
    stale = _el2n_by_hand(
        model,
        x,
        y,
        mean=np.asarray(bn.moving_mean, np.float64),
        var=np.asarray(bn.moving_variance, np.float64),
    )
    assert np.max(np.abs(scores - stale)) > 0.05
    # The model's own moving statistics were left as training made them.
    logits = np.asarray(model(x, training=False), np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(p - np.eye(3)[y], axis=1), stale, atol=1e-4)


def test_el2n_without_reestimation_uses_training_statistics():
    x, y = _bn_data()
    models = []
    scores = el2n_scores(
        _bn_model_fn(models), x, y, epochs=1, repeats=1, batch_size=32, bn_batches=0
    )
    bn = models[0].get_layer("bn")
    stale = _el2n_by_hand(
        models[0],
        x,
        y,
        mean=np.asarray(bn.moving_mean, np.float64),
        var=np.asarray(bn.moving_variance, np.float64),
    )
    np.testing.assert_allclose(scores, stale, rtol=1e-4, atol=1e-5)


# -- el2n_scores: the trained model, cloned -------------------------------------------


def _mlp():
    """A new compiled MLP, initialised from Keras' global seed."""
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_el2n_of_the_trained_model_equals_the_model_built_afresh():
    """Two routes agree: a clone of the trained model draws the weights a new build
    draws under the same seed, and trains with a new optimizer like the model's."""
    x, y = _data(n=40)
    keras.utils.set_random_seed(0)
    trained = _mlp()
    trained.fit(x, y, epochs=3, batch_size=8, verbose=0)
    weights = [w.copy() for w in trained.get_weights()]
    iterations = int(trained.optimizer.iterations.numpy())

    cloned = el2n_scores(trained, x, y, epochs=2, repeats=2, batch_size=8, seed=5, verbose=0)
    built = el2n_scores(_mlp, x, y, epochs=2, repeats=2, batch_size=8, seed=5, verbose=0)
    np.testing.assert_allclose(cloned, built, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    # The trained model is left as it was.
    for before, after in zip(weights, trained.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert int(trained.optimizer.iterations.numpy()) == iterations


def test_el2n_clone_keeps_the_variables_the_model_does_not_train():
    """A frozen (pretrained) layer and BatchNorm statistics keep the trained model's
    values; trainable weights start afresh; the optimizer is new, configured alike."""
    x, y = _data(n=40)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, name="backbone"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model.get_layer("backbone").trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    fresh = loss_module._fresh_copy(model)
    for old, new in zip(model.weights, fresh.weights):
        same = np.array_equal(old.numpy(), new.numpy())
        assert same == (not old.trainable), old.path
    assert fresh.optimizer is not model.optimizer
    assert isinstance(fresh.optimizer, keras.optimizers.Adam)
    assert float(fresh.optimizer.learning_rate) == pytest.approx(3e-3)
    assert int(fresh.optimizer.iterations.numpy()) == 0


def _adapted(kind):
    """`(layer adapted to its data, inputs)` of one preprocessing kind."""
    if kind == "text":
        texts = np.array([["a b c"], ["b c d e"], ["f g a"]], dtype=object)
        layer = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=5)
        layer.adapt(texts[:, 0])
        return layer, texts
    if kind == "lookup":
        ids = np.array([[1], [2], [3], [3], [7]])
        layer = keras.layers.IntegerLookup()
        layer.adapt(ids)
        return layer, ids
    x, _ = _data(n=40)
    x = x[:, :1] * 1000.0 + 500.0  # a column in its own units (~1,000)
    layer = (
        keras.layers.Normalization()
        if kind == "normalization"
        else keras.layers.Discretization(num_bins=4)
    )
    layer.adapt(x)
    return layer, x


@pytest.mark.parametrize("kind", ["normalization", "discretization", "lookup", "text"])
def test_el2n_clone_preprocesses_as_the_adapted_model_does(kind):
    """An adapted preprocessing layer's state (statistics, bin boundaries, lookup
    tables) reaches the clone's call: the fresh copy sees the inputs as the model does."""
    layer, inputs = _adapted(kind)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(inputs.shape[1:], dtype="string" if kind == "text" else inputs.dtype),
            layer,
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    fresh = loss_module._fresh_copy(model)
    np.testing.assert_array_equal(np.asarray(fresh.layers[0](inputs)), np.asarray(layer(inputs)))
    assert not np.array_equal(fresh.layers[-1].get_weights()[0], model.layers[-1].get_weights()[0])


def test_el2n_clone_preprocesses_as_a_nested_adapted_model_does():
    """An adapted layer inside a nested preprocessing model is shared too."""
    layer, ids = _adapted("lookup")
    preprocess = keras.Sequential([keras.Input((1,), dtype="int64"), layer])
    inputs = keras.Input((1,), dtype="int64")
    hidden = keras.layers.Flatten()(keras.layers.Embedding(10, 2)(preprocess(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    fresh = loss_module._fresh_copy(model)
    np.testing.assert_array_equal(np.asarray(fresh.layers[1](ids)), np.asarray(layer(ids)))


def test_el2n_of_a_model_that_reads_raw_strings():
    """`el2n_scores(model, ...)` on a text model with `TextVectorization` inside: the
    copies read the strings through the model's vocabulary."""
    texts = np.array(["good fine nice", "bad awful poor", "nice good", "poor bad"] * 10, object)
    y = np.array([1, 0, 1, 0] * 10)
    vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    vectorize.adapt(texts)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((), dtype="string"),
            vectorize,
            keras.layers.Embedding(20, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    scores = el2n_scores(model, texts, y, epochs=3, repeats=1, batch_size=8, seed=0, verbose=0)
    assert scores.shape == (40,) and np.all(np.isfinite(scores))
    assert scores.max() < 0.5  # the copies learned the words, so none is far off


def test_el2n_rebuilds_a_subclassed_model_from_its_config():
    """A subclassed model with `get_config` is cloned from its config (sharing
    adapted layers is for graph models: `clone_function` refuses the others)."""

    @keras.saving.register_keras_serializable(package="test_baselines")
    class Net(keras.Model):
        def __init__(self, units=16, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    x, y = _data()
    keras.utils.set_random_seed(0)
    model = Net()
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=2, verbose=0)
    scores = el2n_scores(model, x, y, epochs=2, repeats=1, seed=0, verbose=0)
    assert scores.shape == (len(y),) and np.all(np.isfinite(scores))


def test_el2n_refuses_a_model_it_cannot_clone():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    x, y = _data()
    model = Opaque()
    model(x[:2])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match="Pass a zero-argument callable"):
        el2n_scores(model, x, y, epochs=1, repeats=1)


# -- el2n_scores: argument checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "Argument `repeats` must be a positive integer. Received: repeats=0"),
        ({"epochs": -1}, "Argument `epochs` must be a positive integer. Received: epochs=-1"),
        ({"epochs": 1.5}, "Argument `epochs` must be a positive integer. Received: epochs=1.5"),
        ({"batch_size": 0}, "Argument `batch_size` must be a positive integer."),
        ({"seed": -1}, "Argument `seed` must be a non-negative integer. Received: seed=-1"),
        ({"bn_batches": -2}, "Argument `bn_batches` must be a non-negative integer."),
    ],
)
def test_el2n_refuses_bad_arguments(kwargs, message):
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(message)):
        el2n_scores(lambda: _dense_model(), x, y, **kwargs)


def test_el2n_refuses_bad_data_and_models():
    x, y = _data()
    with pytest.raises(TypeError, match="`model_fn` must be a callable"):
        el2n_scores(None, x, y)
    uncompiled_model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="must be a compiled model"):
        el2n_scores(uncompiled_model, x, y, epochs=1, repeats=1)
    with pytest.raises(ValueError, match="same number of examples"):
        el2n_scores(lambda: _dense_model(), x, y[:-1])
    bad_x = x.copy()
    bad_x[0, 0] = np.nan
    with pytest.raises(ValueError, match="`x` contains NaN"):
        el2n_scores(lambda: _dense_model(), bad_x, y)

    def uncompiled():
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])

    with pytest.raises(ValueError, match="must return a compiled model"):
        el2n_scores(uncompiled, x, y, epochs=1, repeats=1)
    with pytest.raises(TypeError, match=re.escape("must return a `keras.Model`")):
        el2n_scores(lambda: "model", x, y, epochs=1, repeats=1)

    def mse_model():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    # One float target per row broadcasts in the loss, but is no EL2N target
    # for 3 outputs.
    column = y[:, None].astype(np.float32)
    with pytest.raises(ValueError, match="shaped like the model's outputs"):
        el2n_scores(mse_model, x, column, epochs=1, repeats=1)


# -- gradient baselines: GEX-lin, TracInRP, RandProj -----------------------------------


def _grad_model(bn=False, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1")]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers.append(keras.layers.Dense(3, name="d2"))
    model = keras.Sequential(layers)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    if bn:
        bn_layer = model.get_layer("bn")
        bn_layer.moving_mean.assign(np.array([0.3, -0.2, 0.1, 0.0], np.float32))
        bn_layer.moving_variance.assign(np.array([0.5, 2.0, 1.5, 0.8], np.float32))
    return model


def _tiny_ensemble(scale=0.3, num_members=3, bn=False, seed=0):
    """A GE of hand-perturbed copies of θ* (members' BN statistics differ too)."""
    model = _grad_model(bn=bn, seed=seed)
    ref = WeightSet.from_model(model)
    rng = np.random.default_rng(seed + 1)

    def jitter(w, s):
        return (w + s * rng.normal(size=w.shape)).astype(w.dtype)

    members = [
        WeightSet(
            [jitter(w, scale) for w in ref.trainable],
            [
                np.abs(jitter(w, 0.2)) if w.dtype.kind == "f" else np.array(w)
                for w in ref.non_trainable
            ],
        )
        for _ in range(num_members)
    ]
    return GeometricEnsemble(model, ref, members, resolve_loss(model))


def _flat(arrays):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _per_example_gradients(model, weights, x, y):
    """`(N, P)` gradients of the per-example loss, one GradientTape per example."""
    loss = resolve_loss(model)
    tv = [tf.convert_to_tensor(w) for w in weights.trainable]
    ntv = [tf.convert_to_tensor(w) for w in weights.non_trainable]
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            tape.watch(tv)
            pred, _ = model.stateless_call(tv, ntv, x[i : i + 1], training=False)
            value = tf.reduce_sum(loss(y[i : i + 1], pred))
        rows.append(_flat(tape.gradient(value, tv)))
    return np.stack(rows)


def _weights_of(model):
    return [np.array(v.numpy()) for v in model.variables]


@pytest.mark.parametrize("bn", [False, True])
def test_gex_lin_matches_explicit_gradient_dot_products(bn):
    ens = _tiny_ensemble(bn=bn)
    x, y = _data(n=10)
    before = _weights_of(ens.model)
    grads = _per_example_gradients(ens.model, ens.reference, x, y)
    steps = np.stack([_flat(m.trainable) - _flat(ens.reference.trainable) for m in ens.members])
    expected = grads @ steps.T  # (N, M)
    # batch_size=3 checks the order across batches and the short last batch.
    deviations = _linearized_deviations(ens, (x, y), batch_size=3)
    np.testing.assert_allclose(deviations, expected, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    scores = gex_lin_scores(ens, (x, y), batch_size=3)
    assert scores.shape == (10,)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, np.mean(expected**2, axis=1), rtol=1e-4, atol=SCORE_ATOL)
    for a, b in zip(before, _weights_of(ens.model)):
        np.testing.assert_array_equal(a, b)


def test_gex_lin_approaches_gex_for_members_close_to_theta_star():
    # Δ(z, m) − Δ_lin(z, m) is second order in the step θ_m − θ*: at a step of
    # 1e-3 per weight it is about 1e-5, against deviations of about 1e-3. The
    # members' BN statistics are kept equal to θ*'s so that only the trainable
    # weights move.
    ens = _tiny_ensemble(scale=1e-3, bn=True)
    for member in ens.members:
        member.non_trainable = [np.array(w) for w in ens.reference.non_trainable]
    x, y = _data(n=16)
    exact = ens.deviations((x, y), verbose=0).deviations.astype(np.float64)
    linear = _linearized_deviations(ens, (x, y))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(linear, exact, rtol=2e-2, atol=2e-2 * scale)
    gex = ens.self_influence((x, y), verbose=0)
    np.testing.assert_allclose(gex_lin_scores(ens, (x, y)), gex, rtol=5e-2, atol=5e-2 * gex.max())
    # Far from θ* the linearisation no longer describes the deviations.
    far = _tiny_ensemble(scale=1.0, bn=True)
    far_exact = far.deviations((x, y), verbose=0).deviations
    assert np.abs(_linearized_deviations(far, (x, y)) - far_exact).max() > 0.1


@pytest.mark.parametrize("include_reference", [False, True])
def test_tracin_exact_is_the_mean_squared_gradient_norm(include_reference):
    ens = _tiny_ensemble(bn=True)
    x, y = _data(n=9)
    checkpoints = ([ens.reference] if include_reference else []) + ens.members
    expected = np.mean(
        [np.sum(_per_example_gradients(ens.model, c, x, y) ** 2, axis=1) for c in checkpoints],
        axis=0,
    )
    got = tracin_scores(
        ens, (x, y), projection_dim=None, include_reference=include_reference, batch_size=4
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=SCORE_ATOL)


@pytest.mark.slow
def test_tracin_projection_matches_brute_force_and_is_unbiased():
    ens = _tiny_ensemble(bn=True)
    x, y = _data(n=8)
    grads = [_per_example_gradients(ens.model, m, x, y) for m in ens.members]
    q = _projection_matrix(ens.reference, 16, seed=3)
    assert q.shape == (sum(w.size for w in ens.reference.trainable), 16)
    expected = np.mean([np.sum((g @ q) ** 2, axis=1) for g in grads], axis=0)
    got = tracin_scores(ens, (x, y), projection_dim=16, seed=3, batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=SCORE_ATOL)
    # Same seed, same projection (at another batch size: equal within float32
    # rounding of the batched product); another seed, another one.
    np.testing.assert_allclose(
        got, tracin_scores(ens, (x, y), projection_dim=16, seed=3), rtol=SCORE_RTOL
    )
    assert not np.allclose(got, tracin_scores(ens, (x, y), projection_dim=16, seed=4))
    # E[Q Qᵀ] = I: with many projections the estimate nears the exact norm
    # (relative standard deviation about sqrt(2 / R) ≈ 0.04 per example).
    exact = tracin_scores(ens, (x, y), projection_dim=None)
    many = tracin_scores(ens, (x, y), projection_dim=1024)
    np.testing.assert_allclose(many, exact, rtol=0.2)
    assert abs(np.mean(many / exact) - 1) < 0.05


@pytest.mark.parametrize(
    "budget, projected_chunks, exact_chunks",
    # In units of one row's gradient (4 × P bytes); Q_R (R = 8) takes 8 of them.
    [
        (16, 2, 1),
        pytest.param(15, 0, 1, marks=pytest.mark.slow),
        pytest.param(2, 0, 6, marks=pytest.mark.slow),
    ],
)
def test_projection_routes_agree(monkeypatch, budget, projected_chunks, exact_chunks):
    """Per-example gradients × materialised Q_R (while Q_R fits half the memory
    budget) and R forward-mode JVPs (larger models) give the same scores, in one
    chunk or several."""

    ens = _tiny_ensemble(bn=True)
    x, y = _data(n=11)

    def scores():
        return (
            tracin_scores(ens, (x, y), projection_dim=8, seed=1),
            randproj_scores(ens, (x, y), projection_dim=8, seed=1, curvature="fisher"),
            tracin_scores(ens, (x, y), projection_dim=None),
        )

    default = scores()  # Q_R fits the default budget: per-example, one chunk
    row = 4 * sum(w.size for w in ens.reference.trainable)
    monkeypatch.setattr(gradients, "_PER_EXAMPLE_BYTES", budget * row)
    pieces = []
    chunks = gradients._chunks

    def counted(*args):
        out = list(chunks(*args))
        pieces.append(len(out))
        return out

    monkeypatch.setattr(gradients, "_chunks", counted)
    tracin, fisher, exact = scores()
    # The one batch of 11 rows, once per checkpoint: TracInRP's 3 members and
    # RandProj's θ* (per-example route only), then the exact norms' 3 members.
    projected = [projected_chunks] * 4 if projected_chunks else []
    assert pieces == projected + [exact_chunks] * 3
    for got, want in zip((tracin, fisher, exact), default):
        np.testing.assert_allclose(got, want, rtol=SCORE_RTOL, atol=SCORE_ATOL)


def test_convolutional_model_takes_the_per_example_route_quietly(monkeypatch):
    """TracInRP / RandProj on a CNN take per-example gradients (whose
    convolution filter gradients `tf.vectorized_map` computes in a loop): same
    scores as brute force, and TensorFlow's "uses a while_loop. Fix that!"
    notice is not shown."""
    import logging

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=7)
    ref = WeightSet.from_model(model)
    routes = []
    per_example = gradients._per_example_fn
    monkeypatch.setattr(
        gradients, "_per_example_fn", lambda *a, **k: routes.append(k) or per_example(*a, **k)
    )
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf.get_logger().addHandler(handler)
    try:
        got = randproj_scores(model, (x, y), projection_dim=8, batch_size=4)
        exact = randproj_scores(model, (x, y), projection_dim=None)
    finally:
        tf.get_logger().removeHandler(handler)
    assert routes == [{"projected": True}, {"projected": False}]
    assert not [m for m in messages if "Fix that" in m]
    g = _per_example_gradients(model, ref, x, y)
    q = _projection_matrix(ref, 8, seed=0)
    np.testing.assert_allclose(got, np.sum((g @ q) ** 2, axis=1), rtol=1e-4, atol=SCORE_ATOL)
    np.testing.assert_allclose(exact, np.sum(g**2, axis=1), rtol=1e-4, atol=SCORE_ATOL)


def test_randproj_identity_matches_brute_force_at_theta_star():
    model = _grad_model(bn=True)
    x, y = _data(n=11)
    ref = WeightSet.from_model(model)
    g = _per_example_gradients(model, ref, x, y)
    q = _projection_matrix(ref, 8, seed=0)
    got = randproj_scores(model, (x, y), projection_dim=8, batch_size=4)
    np.testing.assert_allclose(got, np.sum((g @ q) ** 2, axis=1), rtol=1e-4, atol=SCORE_ATOL)
    exact = randproj_scores(model, (x, y), projection_dim=None)
    np.testing.assert_allclose(exact, np.sum(g**2, axis=1), rtol=1e-4, atol=SCORE_ATOL)
    # A GeometricEnsemble is scored at its θ* as scored: RandProj is TracInRP
    # with θ* as the only checkpoint.
    ens = _tiny_ensemble(bn=True)
    np.testing.assert_allclose(
        randproj_scores(ens, (x, y), projection_dim=8),
        np.sum((_per_example_gradients(ens.model, ens.reference, x, y) @ q) ** 2, axis=1),
        rtol=1e-4,
        atol=SCORE_ATOL,
    )


def test_randproj_fisher_matches_brute_force_influence_sketch():
    model = _grad_model()
    x, y = _data(n=30)
    ref = WeightSet.from_model(model)
    gp = _per_example_gradients(model, ref, x, y) @ _projection_matrix(ref, 6, seed=2)
    fisher = gp.T @ gp / len(gp)
    damped = fisher + 0.1 * np.trace(fisher) / 6 * np.eye(6)
    expected = np.einsum("nr,rs,ns->n", gp, np.linalg.inv(damped), gp)
    got = randproj_scores(
        model, (x, y), projection_dim=6, seed=2, curvature="fisher", damping=0.1, batch_size=7
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=SCORE_ATOL)


@pytest.mark.slow
def test_gradient_baselines_keep_dataset_order():
    ens = _tiny_ensemble(bn=True)
    x, y = _data(n=13)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    perm = np.random.default_rng(0).permutation(13)
    calls = {
        "gex_lin": lambda d, **kw: gex_lin_scores(ens, d, **kw),
        "tracin": lambda d, **kw: tracin_scores(ens, d, projection_dim=4, **kw),
        "randproj": lambda d, **kw: randproj_scores(ens, d, projection_dim=4, **kw),
        "fisher": lambda d, **kw: randproj_scores(
            ens, d, projection_dim=4, curvature="fisher", **kw
        ),
    }
    for name, fn in calls.items():
        arrays = fn((x, y), batch_size=5)
        np.testing.assert_allclose(fn(ds), arrays, rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=name)
        permuted = fn((x[perm], y[perm]))
        np.testing.assert_allclose(
            permuted, arrays[perm], rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=name
        )
        assert arrays.shape == (13,) and np.all(arrays >= 0), name


@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (
            "tracin",
            {"projection_dim": 0},
            "Argument `projection_dim` must be a positive integer. Received: projection_dim=0",
        ),
        ("tracin", {"projection_dim": 2.5}, "Received: projection_dim=2.5"),
        ("tracin", {"seed": -1}, "Argument `seed` must be a non-negative integer."),
        ("tracin", {"include_reference": "yes"}, "Argument `include_reference` must be a"),
        ("tracin", {"batch_size": 0}, "Argument `batch_size` must be a positive integer."),
        ("gex_lin", {"batch_size": -3}, "Received: batch_size=-3"),
        ("randproj", {"projection_dim": -1}, "Received: projection_dim=-1"),
        ("randproj", {"curvature": "hessian"}, "Argument `curvature` must be one of"),
        ("randproj", {"damping": 0.0}, "Argument `damping` must be a positive finite number."),
        (
            "randproj",
            {"curvature": "fisher", "projection_dim": None},
            "Received: projection_dim=None",
        ),
        ("randproj", {"loss": "mse"}, "Argument `loss` applies to a `keras.Model` only"),
    ],
)
def test_gradient_baselines_refuse_bad_arguments(fn, kwargs, message):
    ens = _tiny_ensemble()
    x, y = _data()
    call = {"tracin": tracin_scores, "gex_lin": gex_lin_scores, "randproj": randproj_scores}[fn]
    with pytest.raises(ValueError, match=re.escape(message)):
        call(ens, (x, y), **kwargs)


def test_gradient_baselines_refuse_bad_inputs():
    ens = _tiny_ensemble()
    x, y = _data()
    with pytest.raises(TypeError, match=re.escape("must be a `GeometricEnsemble`")):
        gex_lin_scores(ens.model, (x, y))
    with pytest.raises(TypeError, match=re.escape("must be a `GeometricEnsemble`")):
        tracin_scores("ensemble", (x, y))
    with pytest.raises(TypeError, match=re.escape("must be a `keras.Model`")):
        randproj_scores("model", (x, y))
    with pytest.raises(ValueError, match="same number of examples"):
        tracin_scores(ens, (x, y[:-1]))
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(20).batch(4)
    with pytest.raises(ValueError, match="reshuffles on every iteration"):
        gex_lin_scores(ens, shuffled)
    with pytest.raises(ValueError, match=r"Labels must be class ids in \[0, 3\)"):
        randproj_scores(ens.model, (x, y + 5))


def test_gradient_baselines_rank_flipped_digits_labels(digits_ensemble, digits):
    from sklearn.metrics import roc_auc_score

    data = (digits.x_train, digits.y_train)
    for name, scores in [
        ("gex_lin", gex_lin_scores(digits_ensemble, data)),
        ("tracin", tracin_scores(digits_ensemble, data, projection_dim=32)),
        ("randproj", randproj_scores(digits_ensemble, data, projection_dim=32)),
    ]:
        assert roc_auc_score(digits.is_noisy, scores) > 0.5, name


@pytest.mark.slow
def test_baselines_show_progress_unless_silenced(capsys):
    ens = _tiny_ensemble()
    x, y = _data(n=9)
    calls = {
        "loss": lambda **kw: loss_scores(ens.model, (x, y), batch_size=4, **kw),
        "gex_lin": lambda **kw: gex_lin_scores(ens, (x, y), batch_size=4, **kw),
        "tracin": lambda **kw: tracin_scores(ens, (x, y), projection_dim=4, batch_size=4, **kw),
        "randproj": lambda **kw: randproj_scores(ens, (x, y), projection_dim=4, **kw),
    }
    calls["el2n"] = lambda **kw: el2n_scores(
        lambda: _dense_model(), x, y, epochs=1, repeats=2, batch_size=4, **kw
    )
    for name, fn in calls.items():
        quiet = fn(verbose=0)
        assert capsys.readouterr().out == "", name
        np.testing.assert_array_equal(fn(verbose=1), quiet)
        assert ("2/2" if name == "el2n" else "9/9") in capsys.readouterr().out, name
        with pytest.raises(ValueError, match="Argument `verbose`"):
            fn(verbose=3)


def test_a_dataset_pass_counts_its_batches_before_its_examples_are_known(capsys):
    """On a dataset's first pass the bar counts batches of a known cardinality
    (before, it counted examples out of "Unknown")."""
    ens = _tiny_ensemble()
    x, y = _data(n=9)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    calls = {
        "loss_scores": lambda v: loss_scores(ens.model, ds, verbose=v),
        "deviations": lambda v: ens.deviations(ds, verbose=v).deviations,
        "predict": lambda v: ens.predict(ds, verbose=v),
    }
    for name, fn in calls.items():
        quiet = fn(0)
        assert capsys.readouterr().out == "", name
        np.testing.assert_array_equal(fn(1), quiet)
        out = capsys.readouterr().out
        assert "3/3" in out and "Unknown" not in out, (name, out)


def test_baselines_read_a_user_loss_as_the_cross_entropy_it_computes():
    """Two routes agree: a user function computing the compiled loss gives the
    compiled loss's scores (before, EL2N read its logits as probabilities)."""
    x, y = _data(n=40)

    def build(user):
        model = _dense_model()
        if user:
            model.compile(optimizer=keras.optimizers.SGD(1e-2), loss=user_sparse_ce)
        return model

    compiled, user = (
        el2n_scores(
            lambda u=u: build(u), x, y, epochs=2, repeats=2, batch_size=8, seed=5, verbose=0
        )
        for u in (False, True)
    )
    np.testing.assert_allclose(user, compiled, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    model = build(True)
    np.testing.assert_allclose(
        loss_scores(model, (x, y), verbose=0),
        loss_scores(build(False), (x, y), verbose=0),
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
    )
