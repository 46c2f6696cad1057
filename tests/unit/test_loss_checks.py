"""Entry checks without a collection: loss/output agreement, label and input shapes,
`relabel`'s probabilities and a damaged manifest (issue #28, items 4 and 5)."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gex
from keras_gex import _validation
from keras_gex.io import persistence
from keras_gex.loss_checks import (
    check_label_values,
    check_labels,
    check_outputs,
    output_activation,
    read_as_classifier,
)
from keras_gex.losses import PerExampleLoss, resolve_loss

SCE = keras.losses.SparseCategoricalCrossentropy
BCE = keras.losses.BinaryCrossentropy


def _model(loss, activation=None, units=3, input_shape=(6,)):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input(input_shape), keras.layers.Dense(units, activation=activation)]
    )
    model.compile(loss=loss)
    return model


def _logits(rows=8, k=3):
    return tf.constant(np.random.default_rng(0).normal(scale=3, size=(rows, k)), tf.float32)


# -- item 4: outputs against `from_logits` -------------------------------------------------------
@pytest.mark.parametrize(
    "loss, fix",
    [
        ("sparse_categorical_crossentropy", r"SparseCategoricalCrossentropy\(from_logits=True\)"),
        (keras.losses.CategoricalCrossentropy(), r"CategoricalCrossentropy\(from_logits=True\)"),
        (BCE(), r"BinaryCrossentropy\(from_logits=True\)"),
        # Keras's other classification losses: the model's own class is named, or
        # where it takes no `from_logits` (KL divergence) its kind's.
        (keras.losses.BinaryFocalCrossentropy(), r"BinaryFocalCrossentropy\(from_logits=True\)"),
        ("categorical_focal_crossentropy", r"CategoricalFocalCrossentropy\(from_logits=True\)"),
        ("kl_divergence", r"CategoricalCrossentropy\(from_logits=True\)"),
    ],
)
def test_logits_under_from_logits_false_refused(loss, fix):
    model = _model(loss)
    with pytest.raises(
        ValueError, match=r"not probabilities \(values in \[.*from_logits=False"
    ) as e:
        check_outputs(resolve_loss(model), _logits(), model)
    assert re.search(fix, str(e.value))


def test_rows_not_summing_to_one_refused_for_softmax_losses_only():
    sigmoid = tf.constant([[0.9, 0.8, 0.1], [0.2, 0.3, 0.6]])
    model = _model("categorical_crossentropy", "sigmoid")
    with pytest.raises(ValueError, match=r"rows summing to values in .*not 1.*from_logits=False"):
        check_outputs(resolve_loss(model), sigmoid)
    check_outputs(resolve_loss(_model("binary_crossentropy", "sigmoid")), sigmoid)  # multi-label


def test_probabilities_under_from_logits_false_pass():
    probs = tf.nn.softmax(_logits())
    check_outputs(resolve_loss(_model("sparse_categorical_crossentropy", "softmax")), probs)
    half = tf.cast(tf.nn.softmax(_logits(64, 10)), tf.float16)  # rows sum to 1 within ~1e-3
    check_outputs(resolve_loss(_model("sparse_categorical_crossentropy", "softmax", 10)), half)


def test_output_layer_activation_read_through_nested_models():
    inner = _model("mse", "softmax")
    outer = keras.Sequential([keras.Input((6,)), inner])
    assert output_activation(inner)[0] == "softmax"
    assert output_activation(outer)[0] == "softmax"
    assert output_activation(_model("mse"))[0] == "linear"
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), keras.layers.Softmax()])
    assert output_activation(head)[0] == "softmax"


def test_linear_output_with_from_logits_false_refused_without_data():
    model = _model("sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"has no activation.*from_logits=False"):
        check_outputs(resolve_loss(model), None, model)


def test_sigmoid_output_with_binary_from_logits_true_refused():
    model = _model(BCE(from_logits=True), "sigmoid", units=1)
    with pytest.raises(ValueError, match=r"applies a sigmoid.*from_logits=True"):
        check_outputs(resolve_loss(model), None, model)


def test_softmax_output_with_from_logits_true_warns():
    model = _model(SCE(from_logits=True), "softmax")
    with pytest.warns(UserWarning, match="applies a softmax.*from_logits=True"):
        check_outputs(resolve_loss(model), None, model)
    plain = _model(SCE(from_logits=True))  # e.g. a subclassed model's softmax: seen in the values
    with pytest.warns(UserWarning, match="sums to 1.*from_logits=True"):
        check_outputs(resolve_loss(plain), tf.nn.softmax(_logits()))


def test_user_callables_are_not_judged():
    def my_loss(y_true, y_pred):  # takes logits, and says nothing about it
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    model = _model(my_loss)
    check_outputs(resolve_loss(model), _logits(), model)


# -- item 5: labels under a regression loss -----------------------------------------------------
def test_class_ids_under_mse_refused():
    model = _model("mse", "softmax")
    loss = resolve_loss(model)
    pred = tf.nn.softmax(_logits())
    for y in (np.arange(8) % 3, (np.arange(8) % 3)[:, None].astype("float32")):
        with pytest.raises(
            ValueError, match=r"shape \(batch, 3\). Received: y with shape .*sparse"
        ):
            check_labels(loss, y, pred, name="train_data")
    check_labels(loss, np.eye(3)[np.arange(8) % 3], pred)  # one-hot: a Brier-score fit, allowed
    regression = resolve_loss(_model("mse", units=1))
    check_labels(regression, np.zeros(8), tf.zeros((8, 1)))  # (batch,) against (batch, 1)


def test_binary_labels_need_the_outputs_shape():
    loss = resolve_loss(_model(BCE(from_logits=True), units=1))
    with pytest.raises(ValueError, match=r"Received: y with shape \(batch,\)\. Binary labels"):
        check_labels(loss, np.zeros(8), tf.zeros((8, 1)))


# -- item 5: inputs of the wrong width -----------------------------------------------------------
def test_inputs_fit_model():
    check = _validation.check_inputs_fit_model
    dense = _model("mse", input_shape=(6,))
    with pytest.raises(
        ValueError, match=r"last axis has size 6.*Received: inputs of shape \(batch, 4\)"
    ):
        check(dense, tf.TensorSpec([None, 4]), name="train_data")
    with pytest.raises(ValueError, match="rank 3, the model expects rank 2"):
        check(dense, (None, 2, 3))
    check(dense, (None, 6))
    check(dense, (None, 6, 1))  # Keras squeezes a trailing axis of 1
    check(_model("mse", input_shape=(1,)), (None,))  # ... or adds one
    inp = keras.Input((8, 8, 3))
    conv = keras.Model(inp, keras.layers.Conv2D(2, 3)(inp))
    with pytest.raises(ValueError, match=r"input shape \(batch, 8, 8, 3\).*\(batch, 16, 16, 3\)"):
        check(conv, (None, 16, 16, 3))
    # a Sequential model takes other sizes of its Input's axes (fully convolutional)
    seq_conv = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    check(seq_conv, (None, 16, 16, 3))


def test_inputs_check_skips_what_it_cannot_judge():
    check = _validation.check_inputs_fit_model
    dense = _model("mse", input_shape=(6,))
    check(dense, {"a": tf.TensorSpec([None, 4])})
    check(dense, (tf.TensorSpec([None, 4]), tf.TensorSpec([None, 2])))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x, training=False):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 6), "float32"))
    check(sub, (None, 4))
    a, b = keras.Input((3,)), keras.Input((2,))
    two = keras.Model([a, b], keras.layers.Concatenate()([a, b]))
    check(two, (None, 7))


# -- item 5: relabel's pred_probs ----------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, message",
    [
        ([[-0.5, 1.5, 0.0], [0.2, 0.3, 0.5]], r"Received: values in \[-0.5, 1.5\]"),
        ([[0.9, 0.9, 0.9], [0.2, 0.3, 0.5]], r"Received: rows summing to values in \[1, 2.7\]"),
        ([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]], r"finite probabilities. Received: 1 NaN"),
    ],
)
def test_relabel_refuses_non_probabilities(pred, message):
    # Only the second row is flagged: the first one's values were never looked at.
    with pytest.raises(ValueError, match=message):
        keras_gex.relabel([0, 1], pred, np.array([False, True]))


def test_relabel_takes_logits_with_from_logits():
    targets = keras_gex.relabel([0], [[3.0, -1.0, 0.5]], np.array([True]), from_logits=True)
    assert targets.shape == (1, 3) and targets[0, 0] == 0
    with pytest.raises(ValueError, match="finite logits"):
        keras_gex.relabel([0], [[np.inf, -1.0, 0.5]], np.array([False]), from_logits=True)


# -- item 5: a damaged manifest ------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"damaged.*Received: invalid JSON \(Expecting property name"),
        ("", "invalid JSON"),
        ("[1, 2]", "Received: a JSON list"),
        (json.dumps({"format": "something else"}), "expected format="),
        (
            json.dumps({"format": persistence.FORMAT, "format_version": 1}),
            "Received: no such entry where a str `architecture_fingerprint` is expected",
        ),
    ],
)
def test_damaged_manifest(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        persistence.read_manifest(str(tmp_path))


def test_manifest_of_invalid_utf8(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        persistence.read_manifest(str(tmp_path))


def test_probability_problem():
    problem = _validation.probability_problem
    assert problem(np.array([[0.2, 0.8]]), rows_sum_to_one=True) is None
    assert problem(np.array([[0.5, 0.9]]), rows_sum_to_one=False) is None
    assert problem(np.array([[-1.5, 2.0]]), rows_sum_to_one=True) == "values in [-1.5, 2]"
    assert "not 1" in problem(np.array([[0.5, 0.9]]), rows_sum_to_one=True)


@pytest.mark.parametrize(
    "kind, labels, probs, expected",
    [
        ("sparse_categorical_crossentropy", [0, 2, 1], [[0.6, 0.3, 0.1]] * 3, [1, 0, 0]),
        ("sparse_categorical_crossentropy", [[0], [1]], [[0.6, 0.4], [0.7, 0.3]], [1, 0]),
        ("categorical_crossentropy", [[0.9, 0.1], [0.05, 0.95]], [[0.6, 0.4]] * 2, [1, 0]),
        ("binary_crossentropy", [[1], [0], [1]], [[0.7], [0.7], [0.2]], [1, 0, 0]),
        ("binary_crossentropy", [[1, 0], [1, 1]], [[0.8, 0.1], [0.8, 0.1]], [1, 0]),
        # A tagger's labels per position: an example counts when every position is right.
        (
            "sparse_categorical_crossentropy",
            [[0, 1], [0, 0]],
            [[[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.2, 0.8]]],
            [1, 0],
        ),
        (
            "categorical_crossentropy",
            [[[1, 0], [0, 1]], [[1, 0], [1, 0]]],
            [[[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.2, 0.8]]],
            [1, 0],
        ),
    ],
)
def test_predicts_label_is_fit_mask_on_probabilities(kind, labels, probs, expected):
    loss = PerExampleLoss(lambda y, p: p, kind, False, kind)
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float32)
    got = loss.predicts_label(labels, probs)
    np.testing.assert_array_equal(got, np.asarray(expected, dtype=bool))
    # The same test as the members' fit during calibration (two routes agree).
    np.testing.assert_array_equal(got, loss.fit_mask(labels, probs).numpy() == 1.0)


@pytest.mark.parametrize(
    "loss, kind, from_logits",
    [
        (keras.losses.BinaryFocalCrossentropy(from_logits=True), "binary_crossentropy", True),
        ("binary_focal_crossentropy", "binary_crossentropy", False),
        (keras.losses.CategoricalFocalCrossentropy(), "categorical_crossentropy", False),
        (keras.losses.KLDivergence(), "categorical_crossentropy", False),
        ("kld", "categorical_crossentropy", False),
        (keras.losses.Hinge(), "other", False),
    ],
)
def test_focal_and_kl_losses_are_read_as_the_cross_entropy_they_reweight(loss, kind, from_logits):
    """Their fit, class ids and relabeling are the cross-entropy kind's, not a
    regression's (before: "other", so no relabeling and a fit read as R²)."""
    per_example = resolve_loss(_model(loss))
    assert (per_example.kind, per_example.from_logits) == (kind, from_logits)


# -- user code read as the classifier its outputs and labels imply --------------------------------
def _sparse_ce_logits(y, p):
    return keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)


def _logistic(y, p):
    return tf.reduce_mean(tf.nn.softplus(p) - tf.cast(y, p.dtype) * p, axis=-1)


def _softmax_ce_logits(y, p):
    return -tf.reduce_sum(tf.cast(y, p.dtype) * tf.nn.log_softmax(p), axis=-1)


def _squared(y, p):
    return tf.reduce_mean((p - tf.cast(y, p.dtype)) ** 2, axis=-1)


_IDS = np.arange(8) % 3
_PROBS = tf.nn.softmax(_logits())
_BINARY = (np.arange(8) % 2).astype("float32")[:, None]


@pytest.mark.parametrize(
    "fn, activation, labels, outputs, expected",
    [
        (_squared, "softmax", _IDS, _PROBS, ("sparse_categorical_crossentropy", False)),
        (_squared, None, _IDS[:, None], _PROBS, ("sparse_categorical_crossentropy", False)),
        (_squared, "softmax", np.eye(3)[_IDS], _PROBS, ("categorical_crossentropy", False)),
        (_squared, "sigmoid", _BINARY, tf.sigmoid(_logits(k=1)), ("binary_crossentropy", False)),
        (
            _squared,
            "sigmoid",
            _BINARY[:, 0],
            tf.sigmoid(_logits(k=1)),
            ("binary_crossentropy", False),
        ),
        (_squared, None, np.eye(3)[_IDS], tf.sigmoid(_logits()), ("binary_crossentropy", False)),
        (_sparse_ce_logits, "linear", _IDS, _logits(), ("sparse_categorical_crossentropy", True)),
        (_logistic, "linear", _BINARY, _logits(k=1), ("binary_crossentropy", True)),
        (_softmax_ce_logits, None, np.eye(3)[_IDS], _logits(), ("categorical_crossentropy", True)),
        # A distance is lowest at the labels: a regression onto 0/1 or one-hot targets.
        (_squared, "linear", _BINARY, _logits(k=1), ("other", False)),
        (_squared, "linear", np.eye(3)[_IDS], _logits(), ("other", False)),
        # Targets that are not classes, or classes the outputs do not have.
        (_squared, "linear", _BINARY + 0.5, _logits(k=1), ("other", False)),
        (_squared, "softmax", _IDS + 1, _PROBS, ("other", False)),
    ],
)
def test_user_losses_are_read_as_the_classifier_their_outputs_and_labels_imply(
    fn, activation, labels, outputs, expected
):
    user = PerExampleLoss(fn, "other", False, fn.__name__)
    read = read_as_classifier(user, labels, outputs, activation)
    assert (read.kind, read.from_logits) == expected
    assert read.inferred == (expected[0] != "other")
    assert read.fn is fn and read.name == fn.__name__  # the loss values stay the user's


@pytest.mark.parametrize("loss", ["mse", keras.losses.Hinge(), "sparse_categorical_crossentropy"])
def test_losses_keras_knows_are_read_by_name_only(loss):
    """Keras' own losses keep the kind their name gives, whatever the data."""
    per_example = resolve_loss(_model(loss, "softmax"))
    assert read_as_classifier(per_example, _IDS, _PROBS, "softmax") == per_example


def test_categorical_labels_may_be_unnormalised_but_not_negative():
    """Kong et al.'s relabeled targets need not sum to one (`SoftTargetCrossentropy`):
    they pass; a negative label, towards which the loss has no minimum, is refused."""
    loss = resolve_loss(None, keras.losses.CategoricalCrossentropy(from_logits=True))
    check_label_values(loss, np.array([[0.0, 0.7, 0.6], [1.0, 0.0, 0.0]]), 3)
    with pytest.raises(ValueError, match=r"non-negative labels.*first indices \[1\]"):
        check_label_values(loss, np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]]), 3)
    sparse = resolve_loss(None, SCE(from_logits=True))
    with pytest.raises(ValueError, match=r"\[0, 3\) for the model's 3 outputs"):
        check_label_values(sparse, np.array([0, 2, 3]), 3)
