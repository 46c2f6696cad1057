import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerances import SCORE_ATOL, SCORE_RTOL

import keras_gex
from keras_gex.data import DataSource
from keras_gex.losses import resolve_loss
from keras_gex.weights import WeightSet


def _linear_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _ce(x, y, kernel, bias):
    z = x.astype(np.float64) @ kernel + bias
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


@pytest.fixture()
def two_member_ensemble():
    model = _linear_model()
    rng = np.random.default_rng(0)
    kernel, bias = (w.numpy() for w in model.trainable_variables)
    members = [
        WeightSet([kernel + rng.normal(0, 0.3, kernel.shape).astype("float32"), bias + 0.1], [])
        for _ in range(2)
    ]
    ensemble = keras_gex.GeometricEnsemble(
        model, WeightSet.from_model(model), members, resolve_loss(model)
    )
    x = rng.normal(size=(23, 4)).astype("float32")
    y = rng.integers(0, 3, size=23)
    return ensemble, members, (kernel, bias), x, y


def test_hand_computed_deviations_two_members(two_member_ensemble):
    ensemble, members, (kernel, bias), x, y = two_member_ensemble
    ref = _ce(x, y, kernel, bias)
    expected = np.stack([_ce(x, y, *m.trainable) - ref for m in members], axis=1)
    dev = ensemble.deviations((x, y), batch_size=5, verbose=0)
    np.testing.assert_allclose(dev.deviations, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dev.reference_losses, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        dev.self_influence, np.mean(expected**2, axis=1), rtol=1e-4, atol=1e-6
    )
    # cross-influence from the exposed matrix: mean_m Δ(z,m) Δ(z',m)
    cross = dev.deviations @ dev.deviations.T / 2
    np.testing.assert_allclose(np.diag(cross), dev.self_influence, rtol=1e-5)


def test_reference_floor_clamps_reference_loss(two_member_ensemble):
    ensemble, members, (kernel, bias), x, y = two_member_ensemble
    ref = np.maximum(_ce(x, y, kernel, bias), 5.0)
    expected = np.stack([_ce(x, y, *m.trainable) - ref for m in members], axis=1)
    dev = ensemble.deviations((x, y), reference_floor=5.0, verbose=0)
    np.testing.assert_allclose(dev.deviations, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reference_floor"):
        ensemble.deviations((x, y), reference_floor=-1.0, verbose=0)


def test_batch_size_invariance(digits_ensemble, digits):
    data = (digits.x_train, digits.y_train)
    a = digits_ensemble.loss_deviations(data, batch_size=7, verbose=0)
    b = digits_ensemble.loss_deviations(data, batch_size=512, verbose=0)
    np.testing.assert_allclose(a, b, rtol=SCORE_RTOL, atol=SCORE_ATOL)


def test_dataset_and_arrays_give_identical_scores(digits_ensemble, digits):
    arrays = (digits.x_train, digits.y_train)
    ds = tf.data.Dataset.from_tensor_slices(arrays).batch(100)
    np.testing.assert_allclose(
        digits_ensemble.self_influence(arrays, verbose=0),
        digits_ensemble.self_influence(ds, verbose=0),
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
    )


def test_eager_and_compiled_agree(digits_ensemble, digits):
    scorer = digits_ensemble._get_scorer()
    source = DataSource((digits.x_train[:300], digits.y_train[:300]), batch_size=64)
    compiled = scorer.score(source, eager=False)
    eager = scorer.score(source, eager=True)
    np.testing.assert_allclose(compiled.members, eager.members, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(
        compiled.reference, eager.reference, rtol=SCORE_RTOL, atol=SCORE_ATOL
    )


def test_one_trace_across_batches_and_calls(digits_ensemble, digits):
    data = (digits.x_train[:250], digits.y_train[:250])  # last batch is partial
    digits_ensemble.loss_deviations(data, batch_size=64, verbose=0)
    digits_ensemble.loss_deviations(data, batch_size=64, verbose=0)
    source = DataSource(data, batch_size=64)
    fn = digits_ensemble._get_scorer().function_for(source.ordered().element_spec)
    assert fn.experimental_get_tracing_count() == 1


def test_scores_follow_dataset_order(digits_ensemble, digits):
    x, y = digits.x_train[:200], digits.y_train[:200]
    perm = np.random.default_rng(0).permutation(200)
    base = digits_ensemble.self_influence((x, y), verbose=0)
    permuted = digits_ensemble.self_influence((x[perm], y[perm]), verbose=0)
    np.testing.assert_allclose(permuted, base[perm], rtol=SCORE_RTOL, atol=SCORE_ATOL)


def test_reshuffling_dataset_is_refused(digits_ensemble, digits):
    ds = tf.data.Dataset.from_tensor_slices((digits.x_train, digits.y_train))
    with pytest.raises(ValueError, match="reshuffles"):
        digits_ensemble.self_influence(ds.shuffle(100).batch(32), verbose=0)
    # A fixed shuffle is fine: same order on every pass.
    fixed = ds.shuffle(100, seed=1, reshuffle_each_iteration=False).batch(32)
    assert digits_ensemble.self_influence(fixed, verbose=0).shape == (len(digits.x_train),)


def test_order_changing_dataset_without_shuffle_op_is_refused(digits_ensemble, digits):
    state = {"calls": 0}
    x, y = digits.x_train[:64], digits.y_train[:64]

    def gen():
        state["calls"] += 1
        order = np.random.default_rng(state["calls"]).permutation(64)
        yield x[order], y[order]

    ds = tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec((None, 64), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        ),
    )
    with pytest.raises(ValueError, match="different order"):
        digits_ensemble.self_influence(ds, verbose=0)


def test_user_model_is_untouched_by_scoring(digits_ensemble, digits):
    before = [v.numpy().copy() for v in digits_ensemble.model.variables]
    digits_ensemble.self_influence((digits.x_train[:100], digits.y_train[:100]), verbose=0)
    for a, v in zip(before, digits_ensemble.model.variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_no_retracing_across_batch_sizes_calls_and_input_kinds(digits_ensemble, digits):
    """One trace of the step (all members inside it) for every batch and call."""
    x, y = digits.x_train[:300], digits.y_train[:300]
    scorer = keras_gex.GeometricEnsemble(
        digits_ensemble.model,
        digits_ensemble.reference,
        digits_ensemble.members * 3,  # 12 members: still one trace
        digits_ensemble.loss,
    )._get_scorer()
    for batch_size in (7, 64, 300, 512):
        scorer.score(DataSource((x, y), batch_size=batch_size))
    scorer.score(DataSource(tf.data.Dataset.from_tensor_slices((x, y)).batch(50)))
    spec = DataSource((x, y)).ordered().element_spec
    assert scorer.function_for(spec).experimental_get_tracing_count() == 1
    assert scorer.forward_for(spec[0]).experimental_get_tracing_count() == 1
    assert len([k for k in scorer._fns if k[0] != "forward"]) == 1


def test_array_fast_path_matches_dataset_path_and_still_checks_the_loss(digits_ensemble, digits):
    x, y = digits.x_train[:130], digits.y_train[:130]
    scorer = digits_ensemble._get_scorer()
    fast = scorer.score(DataSource((x, y), batch_size=32), with_predictions=True)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    slow = scorer.score(DataSource(ds), with_predictions=True)
    np.testing.assert_array_equal(fast.labels, slow.labels)
    np.testing.assert_allclose(fast.members, slow.members, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(fast.predictions, slow.predictions, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    # the first-batch label check runs on every call, also once the step is traced
    bad = y.copy()
    bad[0] = 99
    with pytest.raises(ValueError, match="class ids"):
        scorer.score(DataSource((x, bad), batch_size=32))


def test_jit_compiled_scorer_agrees(digits_ensemble, digits):
    from keras_gex.scoring import Scorer

    x, y = digits.x_train[:100], digits.y_train[:100]
    plain = digits_ensemble._get_scorer().score(DataSource((x, y)))
    xla = Scorer(
        digits_ensemble.model,
        digits_ensemble.loss,
        digits_ensemble.reference,
        digits_ensemble.members,
        jit_compile=True,
    ).score(DataSource((x, y)))
    np.testing.assert_allclose(xla.members, plain.members, rtol=1e-4, atol=1e-5)


def test_fine_tuning_loop_traced_once_across_members(trained_mlp, digits):
    """The compiled T-step loop is reused for every member, stream and step size."""
    from keras_gex.collection.local import FineTuner

    source = DataSource((digits.x_train, digits.y_train))
    tuner = FineTuner(trained_mlp, resolve_loss(trained_mlp))
    theta = tuner.snapshots()[0]
    eval_batches = list(source.shuffled(64, 9).take(2))
    for index, lr in enumerate((0.01, 0.02, 0.05)):
        tuner.load(theta)
        tuner.train(iter(source.shuffled(64, index)), 5 + index, lr)
        tuner.evaluate(eval_batches)
    assert tuner._step_fn.experimental_get_tracing_count() == 1
    assert tuner._eval_fn.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_many_ensembles_in_one_process_trace_once_and_do_not_warn(trained_mlp, digits):
    """Six ensembles collected and scored in one process: no function retraces,
    and TensorFlow's warning, which counts first traces across objects, stays quiet."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf.get_logger().addHandler(handler)
    data = (digits.x_train[:256], digits.y_train[:256])
    ensembles = []
    try:
        for seed in range(6):
            ensemble = keras_gex.GeometricEnsemble.collect(
                trained_mlp, data, num_members=2, learning_rate=0.2, steps=4, seed=seed, verbose=0
            )
            ensemble.deviations(data, verbose=0)
            ensemble.predict(data[0], verbose=0)
            ensembles.append(ensemble)
    finally:
        tf.get_logger().removeHandler(handler)
    assert [m for m in messages if "retracing" in m] == []
    for ensemble in ensembles:
        functions = list(ensemble._scorer._fns.values())
        assert functions and all(f.experimental_get_tracing_count() == 1 for f in functions)


@pytest.mark.parametrize(
    "data",
    [
        (np.zeros((5, 3), np.float64), np.arange(5)),
        (np.zeros((5, 2, 2), np.uint8), np.zeros((5, 3), np.float32)),
        "dataset",
    ],
)
def test_source_element_spec_equals_the_ordered_batches(data):
    # Baselines trace from `element_spec` without building a dataset from arrays.
    if data == "dataset":
        pairs = (np.zeros((5, 3), np.float32), np.arange(5, dtype=np.int32))
        data = tf.data.Dataset.from_tensor_slices(pairs).batch(2)
    source = DataSource(data, batch_size=2)
    assert source.element_spec == source.ordered().element_spec
    x, y = next(iter(source.ordered()))
    assert source.element_spec[0].is_compatible_with(x)
    assert source.element_spec[1].is_compatible_with(y)
