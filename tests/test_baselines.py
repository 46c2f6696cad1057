"""Tests of the paper's baselines: loss at θ* and EL2N (`keras_gex.baselines`)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gex.baselines import el2n_scores, loss_scores


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
    with pytest.raises(TypeError, match="not a model"):
        el2n_scores(_dense_model(), x, y)
    with pytest.raises(TypeError, match="`model_fn` must be a callable"):
        el2n_scores(None, x, y)
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
