import numpy as np
import pytest
from tolerances import EXACT_ATOL

import keras_gex


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_identity_minus_sum_y_log_phi_equals_minus_log_one_minus_phi_m():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 6)) * 3
    probs = _softmax(logits)
    labels = rng.integers(0, 6, size=40)
    mask = np.ones(40, dtype=bool)
    for targets in (
        keras_gex.relabel(labels, probs, mask),
        keras_gex.relabel(labels, logits, mask, from_logits=True),
    ):
        lhs = -np.sum(targets * np.log(probs), axis=1)
        rhs = -np.log1p(-probs[np.arange(40), labels])
        np.testing.assert_allclose(lhs, rhs, atol=1e-9, rtol=1e-9)
        assert np.all(targets[np.arange(40), labels] == 0)
        assert np.all(targets >= 0) and np.all(targets <= 1 / 5 + EXACT_ATOL)


def test_matches_paper_formula_directly():
    probs = np.array([[0.6, 0.3, 0.1]])
    targets = keras_gex.relabel([0], probs, np.array([True]))
    k = 3
    expected = [0.0] + [np.log((1 - 0.6) ** (1 / (k - 1))) / np.log(p) for p in (0.3, 0.1)]
    np.testing.assert_allclose(targets[0], expected, atol=EXACT_ATOL)


def test_unflagged_rows_keep_one_hot_and_one_hot_labels_accepted():
    probs = _softmax(np.random.default_rng(1).normal(size=(5, 4)))
    mask = np.array([False, True, False, False, True])
    ids = np.array([0, 1, 2, 3, 0])
    a = keras_gex.relabel(ids, probs, mask)
    b = keras_gex.relabel(np.eye(4)[ids], probs, mask)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[~mask], np.eye(4)[ids[~mask]])


def test_saturated_predictions_stay_exact_from_logits():
    # phi_m rounds to 1.0 in float32: the naive formula gives 1 for every class.
    logits = np.array([[30.0, 0.0, -2.0, -5.0]])
    targets = keras_gex.relabel([0], logits, np.array([True]), from_logits=True)
    p = _softmax(logits)[0]
    expected = [0.0] + [np.log(p[1:].sum()) / (3 * np.log(pk)) for pk in p[1:]]
    np.testing.assert_allclose(targets[0], expected, rtol=1e-9)
    assert np.all(targets[0, 1:] < 1 / 3)
    # phi_k -> 1 for a wrong class k: its target approaches the bound 1/(K-1).
    logits = np.array([[0.0, 40.0, -1.0, -1.0]])
    targets = keras_gex.relabel([0], logits, np.array([True]), from_logits=True)
    assert 0 < targets[0, 1] <= 1 / 3 and np.all(np.isfinite(targets))


def test_rows_are_not_normalised():
    probs = np.array([[0.5, 0.3, 0.2]])
    targets = keras_gex.relabel([0], probs, np.array([True]))
    assert targets.sum() < 1.0


def test_relabel_refuses_bad_input():
    probs = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="noisy_mask"):
        keras_gex.relabel([0, 1, 2], probs, [1, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        keras_gex.relabel([0, 1, 5], probs, np.zeros(3, bool))
    with pytest.raises(ValueError, match="disagree"):
        keras_gex.relabel([0, 1], probs, np.zeros(3, bool))
    with pytest.raises(ValueError, match="from_logits"):
        keras_gex.relabel([0, 1, 2], -probs, np.ones(3, bool))


def test_distillation_targets():
    labels = np.array([[1, 0, 1], [0, 1, 0]])
    probs = np.array([[0.9, 0.2, 0.4], [0.1, 0.7, 0.3]])
    out = keras_gex.distillation_targets(labels, probs, np.array([True, False]))
    np.testing.assert_array_equal(out[0], probs[0])
    np.testing.assert_array_equal(out[1], labels[1])
    with pytest.raises(ValueError, match="probabilities"):
        keras_gex.distillation_targets(labels, probs * 3, np.array([True, False]))


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_distillation_targets_of_one_sigmoid_output_keep_the_labels(shape):
    """A binary model's one output: 0/1 labels, not class ids (which read every
    label as class 0 of one output, so every unflagged target became 1)."""
    labels = np.array([0, 1, 0, 1]).reshape(shape)
    probs = np.array([[0.2], [0.9], [0.7], [0.4]])
    out = keras_gex.distillation_targets(labels, probs, np.array([False, False, True, True]))
    np.testing.assert_array_equal(out, [[0.0], [1.0], [0.7], [0.4]])


def test_soft_target_crossentropy_is_exact_for_unnormalised_targets():
    import tensorflow as tf

    loss = keras_gex.SoftTargetCrossentropy(from_logits=True, reduction=None)
    z = tf.Variable([[2.0, 1.0, 0.5]])
    y = tf.constant([[0.0, 0.2, 0.1]])
    with tf.GradientTape() as tape:
        value = loss(y, z)
    grad = tape.gradient(value, z).numpy()
    p = _softmax(z.numpy())
    np.testing.assert_allclose(value.numpy(), -(y.numpy() * np.log(p)).sum(1), rtol=1e-6)
    np.testing.assert_allclose(grad, 0.3 * p - y.numpy(), atol=1e-6)
