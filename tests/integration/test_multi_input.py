"""Multi-input models: dict, tuple and list inputs, as arrays and as datasets.

Two routes, one model: a two-input model that concatenates its inputs and a
one-input model on the concatenation, with the same weights, must give the
same members and scores.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerances import SCORE_ATOL

import keras_gex


def _pair(digits):
    """`(single, split)`: one-input and two-input models with the same weights."""
    keras.utils.set_random_seed(0)
    x = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu")
    out = keras.layers.Dense(10)
    single = keras.Model(x, out(hidden(x)))
    a, b = keras.Input((40,), name="a"), keras.Input((24,), name="b")
    split = keras.Model({"a": a, "b": b}, out(hidden(keras.layers.Concatenate()([a, b]))))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for model in (single, split):
        model.compile(optimizer="adam", loss=loss)
    x_train, y_train = digits.x_train[:300], digits.y_train[:300]
    single.fit(x_train, y_train, epochs=20, batch_size=32, verbose=0)
    return single, split, x_train, y_train


@pytest.fixture(scope="module")
def pair(digits):
    return _pair(digits)


def _split(x):
    return {"a": x[:, :40], "b": x[:, 40:]}


@pytest.mark.parametrize("kind", ["arrays", "dataset"])
def test_dict_inputs_score_like_the_same_model_on_one_input(pair, kind):
    single, split, x, y = pair
    if kind == "arrays":
        one, two = (x, y), (_split(x), y)
    else:
        one = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
        two = tf.data.Dataset.from_tensor_slices((_split(x), y)).batch(64)
    kwargs = dict(num_members=2, steps=20, learning_rate=0.1, seed=0, verbose=0)
    reports = [
        keras_gex.detect_noisy(data, model, **kwargs)
        for data, model in ((one, single), (two, split))
    ]
    np.testing.assert_allclose(reports[1].scores, reports[0].scores, rtol=1e-4, atol=SCORE_ATOL)
    np.testing.assert_array_equal(reports[1].labels, y)
    ensemble = reports[1].ensemble
    probs = ensemble.predict(two, verbose=0)
    np.testing.assert_allclose(probs, reports[0].ensemble.predict(one, verbose=0), atol=1e-5)
    assert reports[1].relabeled_targets().shape == (len(y), 10)
    loss = keras_gex.baselines.loss_scores(split, two, verbose=0)
    np.testing.assert_allclose(loss, keras_gex.baselines.loss_scores(single, one, verbose=0))
    kernel = keras_gex.influence(ensemble, two, two, verbose=0)
    assert kernel.shape == (len(y), len(y))
    kept = keras_gex.prune(two, reports[1].scores, fraction=0.5).apply(two)
    cleaned = keras_gex.clean(two, reports[1], action="drop", shuffle=False)
    if kind == "arrays":
        assert kept[0]["a"].shape == (150, 40) and kept[1].shape == (150,)
    else:
        assert sum(int(tf.shape(b[1])[0]) for b in kept) == 150
    assert sum(int(tf.shape(b[1])[0]) for b in cleaned) == len(y) - reports[1].num_flagged
    assert "flagged" in reports[1].summary(print_fn=None)


def test_tuple_and_list_inputs(digits):
    a, b = keras.Input((40,)), keras.Input((24,))
    keras.utils.set_random_seed(1)
    model = keras.Model([a, b], keras.layers.Dense(10)(keras.layers.Concatenate()([a, b])))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = digits.x_train[:200], digits.y_train[:200]
    parts = [x[:, :40], x[:, 40:]]
    model.fit(parts, y, epochs=5, verbose=0)
    kwargs = dict(num_members=2, steps=10, learning_rate=0.05, seed=0, verbose=0)
    as_tuple = keras_gex.detect_noisy((tuple(parts), y), model, **kwargs)
    as_list = keras_gex.detect_noisy((parts, y), model, **kwargs)
    np.testing.assert_array_equal(as_tuple.scores, as_list.scores)

    def fresh():
        clone = keras.models.clone_model(model)
        clone.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return clone

    el2n = keras_gex.baselines.el2n_scores(fresh, parts, y, epochs=1, repeats=1, verbose=0)
    assert el2n.shape == (200,) and np.all(np.isfinite(el2n))


def test_multi_input_errors_name_the_input(digits):
    x, y = digits.x_train[:20], digits.y_train[:20]
    with pytest.raises(ValueError, match=r"`x\['b'\]` and `y` must have the same number"):
        keras_gex.detect_noisy(({"a": x[:, :40], "b": x[:19, 40:]}, y), object())
    bad = {"a": x[:, :40].copy(), "b": x[:, 40:]}
    bad["a"][3, 0] = np.nan
    with pytest.raises(ValueError, match=r"`x\['a'\]` contains NaN"):
        keras_gex.detect_noisy((bad, y), object())
