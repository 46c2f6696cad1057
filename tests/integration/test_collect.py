import contextlib
import json
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_bn_model, make_mlp, user_sparse_ce
from tolerances import XLA_WEIGHTS_ATOL

import keras_gex
from keras_gex.collection import driver, step_size
from keras_gex.collection.driver import resolve_jit_compile
from keras_gex.collection.local import FineTuner
from keras_gex.collection.tuner import resolve_steps
from keras_gex.io import persistence
from keras_gex.losses import resolve_loss


def _weights(model):
    return [v.numpy().copy() for v in model.variables]


def test_collection_leaves_model_and_optimizer_untouched(digits):
    model = make_bn_model(seed=1)
    x, y = digits.x_train[:300], digits.y_train[:300]
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    weights = _weights(model)
    optimizer_state = [v.numpy().copy() for v in model.optimizer.variables]
    momenta = [layer.momentum for layer in model.layers if hasattr(layer, "momentum")]
    keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=2, steps=5, learning_rate=0.1, bn_batches=2, verbose=0
    )
    for a, b in zip(weights, _weights(model)):
        np.testing.assert_array_equal(a, b)
    for a, v in zip(optimizer_state, model.optimizer.variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert momenta == [layer.momentum for layer in model.layers if hasattr(layer, "momentum")]


def test_members_differ_from_reference_and_each_other(digits_ensemble):
    ref = digits_ensemble.reference
    dists = [m.distance(ref) for m in digits_ensemble.members]
    assert all(d > 0 for d in dists)
    assert digits_ensemble.members[0].distance(digits_ensemble.members[1]) > 0


def test_members_keep_the_models_weight_constraints(digits):
    """Members are fine-tuned in the model class θ* was trained in: a layer's
    `kernel_constraint` holds after every member step, as under Keras' optimizers."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, "relu", kernel_constraint=keras.constraints.NonNeg()),
            keras.layers.Dense(10, kernel_constraint=keras.constraints.MaxNorm(0.5)),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = digits.x_train[:256], digits.y_train[:256]
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    ensemble = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=2, steps=20, learning_rate=0.5, verbose=0, seed=0
    )
    for member in ensemble.members:
        hidden, _, head, _ = member.trainable
        assert member.distance(ensemble.reference) > 0
        assert hidden.min() >= 0.0
        assert np.sqrt((head**2).sum(axis=0)).max() <= 0.5 + 1e-5


@pytest.fixture(scope="module")
def small_mlp(digits):
    """A small MLP trained briefly on 200 digits: `(model, x, y)`."""
    x, y = digits.x_train[:200], digits.y_train[:200]
    model = make_mlp(seed=2, hidden=32)
    model.fit(x, y, epochs=3, verbose=0)
    return model, x, y


def test_same_seed_same_members(small_mlp):
    model, x, y = small_mlp
    kwargs = dict(num_members=2, steps=10, learning_rate=0.05, seed=5, verbose=0)
    a = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    b = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    for ma, mb in zip(a.members, b.members):
        for wa, wb in zip(ma.trainable, mb.trainable):
            np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow
def test_seed_alone_fixes_random_layers(digits):
    """Dropout and noise layers draw from the collection's seed, not from the generator
    state θ* was built or loaded under (another process holds another one): in the
    members, and where θ*'s BatchNorm statistics are re-estimated behind them."""
    x, y = digits.x_train[:200], digits.y_train[:200]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.GaussianNoise(0.1),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    states = [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]
    assert len(states) == 2
    kwargs = dict(num_members=2, steps=10, learning_rate=0.05, seed=5, verbose=0)
    runs = []
    for global_state in (11, 12):
        for state in states:
            state.assign(np.array([global_state, 3], dtype=state.dtype))
        runs.append(keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs))
        assert [list(v.numpy()) for v in states] == [[global_state, 3]] * 2  # left alone
    for ma, mb in zip(runs[0].members, runs[1].members):
        for wa, wb in zip(ma.trainable, mb.trainable):
            np.testing.assert_array_equal(wa, wb)
    moments = [i for i, v in enumerate(model.non_trainable_variables) if "moving" in v.name]
    assert len(moments) == 2
    for i in moments:  # θ*'s statistics behind the dropout, re-estimated alike
        np.testing.assert_array_equal(
            runs[0].reference.non_trainable[i], runs[1].reference.non_trainable[i]
        )
    np.testing.assert_array_equal(
        runs[0].predict(x[:50], verbose=0), runs[1].predict(x[:50], verbose=0)
    )
    # Each member draws its own masks: its generators started from its own seed.
    position = [v.name for v in model.non_trainable_variables].index("seed_generator_state")
    first, second = (m.non_trainable[position][0] for m in runs[0].members)
    assert first != second


def test_batchnorm_statistics_are_population_statistics():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(2.0, 3.0, (16, 3)).astype("float32"), np.zeros(16, int)) for _ in range(4)
    ]
    tuner = FineTuner(model, resolve_loss(model))
    tuner.refresh_batchnorm(iter(batches), num_batches=4)
    allx = np.concatenate([b[0] for b in batches]).astype(np.float64)
    mean_idx, var_idx = tuner._bn_index[0]
    np.testing.assert_allclose(tuner.ntv[mean_idx].numpy(), allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(tuner.ntv[var_idx].numpy(), allx.var(0), rtol=1e-4)
    # the user's model keeps its own statistics
    np.testing.assert_array_equal(model.layers[0].moving_mean.numpy(), np.zeros(3))


def test_stale_batchnorm_statistics_of_theta_are_said(digits):
    """θ* is scored with re-estimated statistics; where its own moving statistics do not
    describe the data (here moved by 5 standard deviations, as a BatchNorm of momentum
    0.999 leaves them after a short run), the saved model predicts far worse than the one
    scored, and the collection and the report say so. Intact statistics say nothing."""
    x, y = digits.x_train[:400], digits.y_train[:400]
    model = make_bn_model(seed=0)
    model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    kwargs = dict(num_members=1, steps=5, learning_rate=0.01, seed=0, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        intact = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    assert not [w for w in caught if "BatchNorm" in str(w.message)]
    assert intact.record.reference_moving_fit > 0.8
    assert intact.record.stale_batchnorm() is None
    bn = model.layers[1]
    bn.moving_mean.assign(bn.moving_mean + 5.0 * np.sqrt(bn.moving_variance.numpy()))
    with pytest.warns(UserWarning, match="BatchNorm moving statistics do not describe"):
        stale = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    record = stale.record
    assert record.reference_moving_fit < 0.5 < record.reference_stats.fit
    assert record.reference_stats.fit == intact.record.reference_stats.fit
    report = keras_gex.detect_noisy((x, y), stale, verbose=0)
    assert report.diagnostics()[0] == record.stale_batchnorm()
    assert f"θ* predicts {record.reference_moving_fit:.1%}" in report.diagnostics()[0]


def test_warm_up_is_timed_and_leaves_the_members_unchanged(small_mlp):
    """Two routes to member 0: the collection, which first runs its loop once with
    a zero step size, and a bare `FineTuner` on member 0's batch stream."""
    from keras_gex.collection.driver import stream_seed
    from keras_gex.data import DataSource

    model, x, y = small_mlp
    kwargs = dict(num_members=1, steps=20, learning_rate=0.05, batch_size=64, seed=3)
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), verbose=0, **kwargs)
    assert ens.info["warmup_seconds"] > 0
    assert ens.info["warmup_seconds"] < ens.info["seconds"]
    tuner = FineTuner(model, resolve_loss(model), weight_decay=ens.record.weight_decay)
    tuner.train(DataSource((x, y)).array_stream(64, stream_seed(3, 0)), 20, 0.05)
    for a, b in zip(ens.members[0].trainable, tuner.snapshots()[0].trainable):
        np.testing.assert_array_equal(a, b)


def test_chain_option_starts_from_previous_member(small_mlp):
    model, x, y = small_mlp
    ens = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=3, steps=10, learning_rate=0.05, chain=True, seed=0, verbose=0
    )
    ref = ens.reference
    assert ens.info["chain"] is True
    assert ens.members[2].distance(ref) > ens.members[0].distance(ref) * 0.5


def test_diverging_step_size_is_retried_not_averaged():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32") * 3
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    # In units of the null loss (`tuner.in_units`, var(y) = 72) SGD with momentum 0.9
    # is stable below 3.8 / λ_max = 15 on this model; 100 diverges.
    with pytest.warns(UserWarning, match="diverged"):
        ens = keras_gex.GeometricEnsemble.collect(
            model, (x, y), num_members=1, steps=50, learning_rate=100.0, seed=0, verbose=0
        )
    assert all(m.is_finite() for m in ens.members)
    assert ens.info["learning_rate"] < 100.0
    assert np.all(np.isfinite(ens.self_influence((x, y), verbose=0)))


def test_warns_when_theta_star_has_not_memorised(digits):
    import warnings

    x, y = digits.x_train[:200], digits.y_train[:200]
    model = make_mlp(seed=5, hidden=8)  # untrained: fits ~10% of its labels
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.warns(UserWarning, match="predicts only"):
            ens = keras_gex.GeometricEnsemble.collect(
                model, (x, y), num_members=1, steps=5, learning_rate=0.01, verbose=0
            )
    report = keras_gex.detect_noisy((x, y), ens, score="self_influence", verbose=0)
    assert any("has not memorised" in w for w in report.diagnostics())
    report = keras_gex.detect_noisy((x, y), ens, verbose=0)  # member loss
    (text,) = [w for w in report.diagnostics() if "never fitted" in w]
    assert "report.reference_losses" in text
    k = max(report.num_flagged, 1)
    top = set(np.argsort(-report.scores)[:k]) & set(np.argsort(-report.reference_losses)[:k])
    assert f"share {len(top) / k:.0%} of their top {k} rows" in text


def test_array_stream_yields_the_batches_of_the_tf_data_stream(digits):
    """Arrays are fine-tuned from index-drawn batches; they must be the very
    batches `DataSource.shuffled` gives (members depend only on seed and index)."""
    from keras_gex.data import DataSource

    source = DataSource((digits.x_train[:300], digits.y_train[:300]))
    stream = source.array_stream(128, seed=5)
    expected = list(source.shuffled(128, 5).take(9))  # 9 × 128 rows span 4 epochs of 300
    got = [next(stream) for _ in range(3)]
    rows = stream.take_indices(6)
    got += [(source._arrays[0][r], source._arrays[1][r]) for r in rows]
    for (gx, gy), (ex, ey) in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(gx), ex.numpy())
        np.testing.assert_array_equal(np.asarray(gy), ey.numpy())
    with pytest.raises(ValueError, match="array inputs"):
        DataSource(
            tf.data.Dataset.from_tensor_slices((digits.x_train, digits.y_train)).batch(8)
        ).array_stream(8, 0)


def test_fine_tuning_from_array_stream_equals_tf_data_stream(trained_mlp, digits):
    from keras_gex.data import DataSource

    source = DataSource((digits.x_train, digits.y_train))
    tuner = FineTuner(trained_mlp, resolve_loss(trained_mlp))
    theta = tuner.snapshots()[0]
    results = []
    for stream in (iter(source.shuffled(64, 3)), source.array_stream(64, 3)):
        tuner.load(theta)
        ((loss, _),) = tuner.train(stream, 30, 0.05)
        results.append((loss, tuner.snapshots()[0]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1].trainable, results[1][1].trainable):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for steps in (5, 7):  # one trace across members, streams and lengths
        tuner.train(source.array_stream(64, steps), steps, 0.01)
    assert tuner._indexed_fn.experimental_get_tracing_count() == 1


def test_a_dataset_that_fits_in_memory_gives_the_members_of_its_arrays(small_mlp, monkeypatch):
    """A dataset is read into arrays once, so it is fine-tuned by the array route:
    the very members of the same arrays. Over the memory budget it is streamed."""
    model, x, y = small_mlp
    kwargs = dict(num_members=2, steps=10, learning_rate=0.05, seed=5, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(17)
    ref = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    got = keras_gex.GeometricEnsemble.collect(model, dataset, **kwargs)
    for ma, mb in zip(ref.members, got.members):
        for wa, wb in zip(ma.trainable, mb.trainable):
            np.testing.assert_array_equal(wa, wb)
    monkeypatch.setattr(driver, "_IN_MEMORY_BYTES", x[:10].nbytes)
    streamed = keras_gex.GeometricEnsemble.collect(model, dataset, **kwargs)
    assert not np.array_equal(streamed.members[0].trainable[0], ref.members[0].trainable[0])


def test_in_memory_reads_a_dataset_once_or_leaves_it_streamed():
    from keras_gex.data import DataSource

    x = {"a": np.arange(20, dtype=np.float32).reshape(10, 2), "b": np.arange(10)}
    y = np.arange(10) % 3
    source = DataSource(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    arrays = source.in_memory(2**20)
    assert arrays.has_arrays and arrays.count_examples() == 10
    np.testing.assert_array_equal(arrays.arrays[0]["a"], x["a"])
    np.testing.assert_array_equal(arrays.arrays[0]["b"], x["b"])
    np.testing.assert_array_equal(arrays.arrays[1], y)
    assert arrays.in_memory(2**20) is arrays
    assert source.in_memory(100) is source  # 10 rows of 24 bytes
    ragged = tf.data.Dataset.range(1, 4).map(lambda n: (tf.ones((n, 2)), tf.zeros((n,))))
    assert tf.TensorShape([None, 2]) == ragged.element_spec[0].shape
    varying = DataSource(ragged.map(lambda a, b: (tf.reshape(a, (1, -1)), b[:1])))
    assert varying.in_memory(2**20) is varying  # rows of varying width stay streamed


@pytest.mark.parametrize("kind", ["array", "array-xla", "tf.data"])
def test_two_segments_of_a_schedule_equal_the_whole_run(trained_mlp, digits, kind):
    """Two routes: steps 0..12 then 12..30 of a 30-step schedule, or all 30 at once."""
    from keras_gex.data import DataSource

    source = DataSource((digits.x_train, digits.y_train))

    def stream():
        if kind.startswith("array"):
            return source.array_stream(64, 3)
        return iter(source.shuffled(64, 3))

    tuner = FineTuner(trained_mlp, resolve_loss(trained_mlp), jit_compile=kind == "array-xla")
    theta = tuner.snapshots()[0]
    ((whole_loss, _),) = tuner.train(stream(), 30, 0.05)
    whole = tuner.snapshots()[0]
    tuner.load(theta)
    batches = stream()
    tuner.train(batches, 30, 0.05, stop=12)
    halfway = tuner.snapshots()[0]
    ((loss, finite),) = tuner.train(batches, 30, 0.05, start=12)
    assert finite and loss == whole_loss
    for a, b, c in zip(whole.trainable, tuner.snapshots()[0].trainable, halfway.trainable):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_a_checkpoint_measures_the_member_as_finished_and_leaves_its_run_alone(digits):
    """Two routes to one member of a model with a trainable and a frozen BN layer:
    a whole run, or a run measured halfway (BN statistics re-estimated on other
    batches, then put back). The halfway measurement equals evaluating a member
    stopped there with its BN statistics re-estimated the same way."""
    from keras_gex.data import DataSource

    model = make_bn_model(seed=0)
    frozen = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((64,)), frozen, *model.layers])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train[:256], digits.y_train[:256], epochs=2, verbose=0)
    frozen.trainable = False  # inference mode in training: reads its moving statistics
    source = DataSource((digits.x_train, digits.y_train))
    eval_batches = [(digits.x_train[:256], digits.y_train[:256])]
    tuner = FineTuner(model, resolve_loss(model))
    theta = tuner.snapshots()[0]
    tuner.train(source.array_stream(64, 3), 30, 0.05)
    whole = tuner.snapshots()[0]

    tuner.load(theta)
    batches = source.array_stream(64, 3)
    tuner.train(batches, 30, 0.05, stop=15)
    measured = tuner.evaluate_refreshed(eval_batches, source.array_stream(64, 9), 4)
    tuner.train(batches, 30, 0.05, start=15)
    for a, b in zip(whole.trainable, tuner.snapshots()[0].trainable):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(whole.non_trainable, tuner.snapshots()[0].non_trainable):
        np.testing.assert_array_equal(a, b)

    tuner.load(theta)
    batches = source.array_stream(64, 3)
    tuner.train(batches, 30, 0.05, stop=15)
    stale = tuner.evaluate(eval_batches)
    tuner.refresh_batchnorm(source.array_stream(64, 9), 4)
    assert tuner.evaluate(eval_batches) == measured != stale


def test_jit_compile_auto_means_xla_only_on_accelerators_for_models_without_convolutions(
    trained_mlp, monkeypatch
):
    conv = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten()]
    )
    pooled = keras.Sequential(
        [keras.Input((8, 2)), keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)]
    )
    assert resolve_jit_compile(False, trained_mlp) is False
    assert resolve_jit_compile(True, conv) is True
    if not tf.config.list_logical_devices("GPU"):  # CI: XLA did not pay on CPU
        assert resolve_jit_compile("auto", trained_mlp) is False
        monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["gpu:0"])
    assert resolve_jit_compile("auto", trained_mlp) is True
    assert resolve_jit_compile("auto", conv) is False
    assert resolve_jit_compile("auto", make_bn_model()) is True  # Dense + BatchNorm
    assert resolve_jit_compile("auto", pooled) is False


@pytest.mark.slow
def test_xla_fine_tuning_equals_plain_fine_tuning(trained_mlp, digits):
    """Two routes, one SGD: the XLA loop and the plain loop give the same member."""
    from keras_gex.data import DataSource

    source = DataSource((digits.x_train, digits.y_train))
    results = []
    for jit in (False, True):
        tuner = FineTuner(trained_mlp, resolve_loss(trained_mlp), jit_compile=jit)
        ((loss, finite),) = tuner.train(source.array_stream(64, 3), 30, 0.05)
        assert finite
        results.append((loss, tuner.snapshots()[0]))
        for steps in (5, 7):  # still one trace (and one XLA program per shape)
            tuner.train(source.array_stream(64, steps), steps, 0.01)
        assert tuner._indexed_fn.experimental_get_tracing_count() == 1
        assert tuner.xla_error is None and tuner.jit_compile is jit
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    for a, b in zip(results[0][1].trainable, results[1][1].trainable):
        np.testing.assert_allclose(a, b, rtol=0, atol=XLA_WEIGHTS_ATOL)


@pytest.mark.slow
def test_collect_records_xla_and_the_option_is_validated(small_mlp, monkeypatch):
    model, x, y = small_mlp
    kwargs = dict(num_members=1, steps=5, learning_rate=0.05, seed=0, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), jit_compile=True, **kwargs)
    assert ens.info["jit_compile"] is True
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    assert ens.info["jit_compile"] is resolve_jit_compile("auto", model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    ens = keras_gex.GeometricEnsemble.collect(model, dataset, jit_compile=True, **kwargs)
    assert ens.info["jit_compile"] is True  # read into memory: the array route
    monkeypatch.setattr(driver, "_IN_MEMORY_BYTES", 0)
    ens = keras_gex.GeometricEnsemble.collect(model, dataset, jit_compile=True, **kwargs)
    assert ens.info["jit_compile"] is False  # a tf.data stream is never compiled with XLA
    with pytest.raises(ValueError, match="jit_compile"):
        keras_gex.GeometricEnsemble.collect(model, (x, y), jit_compile="yes", **kwargs)
    with pytest.raises(ValueError, match="jit_compile"):
        keras_gex.GEXCollector((x, y), jit_compile=1)


def test_steps_auto_is_about_ten_epochs_and_recorded(small_mlp, tmp_path):
    """200 rows at batch 64: 10 epochs are 32 steps, raised to the minimum of 50;
    the number used reaches the tuner, `info` and the resumable store."""
    model, x, y = small_mlp
    kwargs = dict(num_members=2, batch_size=64, learning_rate=0.05, seed=0, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=tmp_path, **kwargs)
    assert resolve_steps("auto", 200, 64) == 50
    assert ens.record.steps_run == 2 * 50  # 2 members, no probes at a given step size
    assert ens.info["steps"] == 50 and ens.info["steps_requested"] == "auto"
    # The store holds the resolved number: an explicit 50 resumes the same collection.
    again = keras_gex.GeometricEnsemble.collect(
        model, (x, y), directory=tmp_path, steps=50, **kwargs
    )
    np.testing.assert_array_equal(again.members[1].trainable[0], ens.members[1].trainable[0])
    assert resolve_steps("auto", 1347, 128) == 106  # digits: 10 epochs
    assert resolve_steps("auto", 10000, 128) == 782  # Fashion-MNIST subset: 10 epochs
    assert resolve_steps("auto", 60000, 128) == 800  # capped
    with pytest.raises(ValueError, match="steps='fast'"):
        keras_gex.GEXCollector((x, y), steps="fast")


def test_model_that_xla_cannot_compile_falls_back_with_a_warning(digits):
    """A layer calling back into Python cannot be compiled by XLA: collection
    warns, restores the tuner's state and fine-tunes without XLA."""

    class NumpyTanh(keras.layers.Layer):
        def call(self, x):
            out = tf.numpy_function(np.tanh, [x], tf.float32)
            return tf.ensure_shape(out, x.shape)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), NumpyTanh(), keras.layers.Dense(16, "relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = digits.x_train[:200], digits.y_train[:200]
    model.fit(x, y, epochs=2, verbose=0)
    kwargs = dict(num_members=2, steps=5, learning_rate=0.05, seed=0, verbose=0)
    with pytest.warns(UserWarning, match="XLA could not compile"):
        fallback = keras_gex.GeometricEnsemble.collect(model, (x, y), jit_compile=True, **kwargs)
    plain = keras_gex.GeometricEnsemble.collect(model, (x, y), jit_compile=False, **kwargs)
    assert fallback.info["jit_compile"] is False
    for ma, mb in zip(fallback.members, plain.members):
        for wa, wb in zip(ma.trainable, mb.trainable):
            np.testing.assert_array_equal(wa, wb)


def test_seed_none_follows_keras_global_seeding(small_mlp):
    """`seed=None` draws from NumPy's global generator, which
    `keras.utils.set_random_seed` seeds: a seeded script collects the same members."""
    model, x, y = small_mlp
    kwargs = dict(num_members=2, steps=10, learning_rate=0.05, verbose=0)
    runs = []
    for global_seed in (7, 7, 8):
        keras.utils.set_random_seed(global_seed)
        runs.append(keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs))
    assert runs[0].record.seed == runs[1].record.seed != runs[2].record.seed
    for a, b in zip(runs[0].members[1].trainable, runs[1].members[1].trainable):
        np.testing.assert_array_equal(a, b)


def test_member_log_names_every_member_on_the_calibration_scale(small_mlp, capsys):
    """Member lines start at member 1 (the accepted probe) and give the share of
    θ*'s fit kept, the scale of the calibration lines."""
    model, x, y = small_mlp
    keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=2, steps=20, batch_size=32, seed=0, verbose=1
    )
    lines = capsys.readouterr().out.splitlines()
    members = [line for line in lines if re.match(r"\[keras_gex\] member \d+/2: ", line)]
    assert len(members) == 2 and members[0].startswith("[keras_gex] member 1/2: lr ")
    assert all("of θ*'s fit" in line for line in members)


@contextlib.contextmanager
def _trained_for(model, steps: int):
    """`model` as if its optimizer had taken `steps` steps; its own count is put back."""
    before = int(model.optimizer.iterations.numpy())
    model.optimizer.iterations.assign(steps)
    try:
        yield
    finally:
        model.optimizer.iterations.assign(before)


@pytest.mark.slow
def test_num_members_auto_stays_within_the_steps_theta_star_trained(small_mlp, tmp_path):
    """`num_members="auto"`: as many members of `steps` as θ*'s optimizer steps
    hold, within [4, 8]; they are the first members of the 8 the same seed
    gives, the choice is recorded, and a store resumes to the same count."""
    model, x, y = small_mlp
    kwargs = dict(steps=10, learning_rate=0.05, seed=3, verbose=0)
    with _trained_for(model, 65):  # 6 members of 10 steps
        auto = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=tmp_path, **kwargs)
        assert auto.num_members == 6 and auto.record.steps_run == 60
        assert auto.record.num_members_requested == "auto" and auto.record.trained_steps == 65
        summary = keras_gex.detect_noisy((x, y), auto, verbose=0).summary(print_fn=None)
        assert "M=6 members (auto, θ* trained 65 steps)" in summary
        eight = keras_gex.GeometricEnsemble.collect(model, (x, y), num_members=8, **kwargs)
        assert eight.num_members == 8 and eight.record.num_members_requested == 8
        for a, b in zip(auto.members, eight.members[:6]):
            np.testing.assert_array_equal(a.trainable[0], b.trainable[0])
        resumed = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=tmp_path, **kwargs)
        assert resumed.num_members == 6 and resumed.record.steps_run == 0
    with _trained_for(model, 10):  # fewer steps than 4 members: still 4
        assert keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs).num_members == 4
    with _trained_for(model, 1000):
        assert keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs).num_members == 8
    fresh = keras.models.clone_model(model)  # a new optimizer at step 0: unknown, so 8
    fresh.set_weights(model.get_weights())
    fresh.compile(optimizer="sgd", loss=model.loss)
    ens = keras_gex.GeometricEnsemble.collect(fresh, (x, y), **kwargs)
    assert ens.num_members == 8 and ens.record.trained_steps is None
    with pytest.raises(ValueError, match="num_members='many'"):
        keras_gex.CollectionConfig(num_members="many")


def test_num_members_auto_counts_the_rejected_probes(small_mlp, monkeypatch):
    """The calibration's rejected probes spend θ*'s steps before the members do."""
    model, x, y = small_mlp
    monkeypatch.setattr(step_size, "INITIAL_LR", 0.003)  # a first probe that forgets nothing
    # This θ* fits 28% of its labels: the search stops at the first probe that fits more.
    with (
        _trained_for(model, 75),  # 7 members of 10 steps, fewer after probes
        pytest.warns(UserWarning, match="calibration stopped"),
    ):
        ens = keras_gex.GeometricEnsemble.collect(
            model, (x, y), steps=10, batch_size=32, seed=0, verbose=0
        )
    rejected = sum(p.steps for p in ens.record.calibration if not p.accepted)
    assert rejected > 0 and ens.num_members == max(4, min(8, (75 - rejected) // 10))


def test_num_members_auto_counts_the_member_runs_redone(small_mlp, tmp_path, monkeypatch):
    """A member run again spends θ*'s steps as a rejected probe does, and a store
    resumed after it collects the same number of members."""
    model, x, y = small_mlp
    reject = step_size.MemberGate.reject
    redone = set()

    def reject_member_2_once(self, member_stats, rel, lr, index, what):
        if index == 2 and index not in redone:  # as if it had collapsed
            redone.add(index)
            self.redone["collapsed"] += 1
            return lr
        return reject(self, member_stats, rel, lr, index, what)

    monkeypatch.setattr(step_size.MemberGate, "reject", reject_member_2_once)
    kwargs = dict(steps=10, learning_rate=0.05, seed=3, verbose=0)
    with _trained_for(model, 65):  # 6 members of 10 steps; 5 after a run redone
        ens = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=tmp_path, **kwargs)
        assert ens.num_members == 5 and ens.record.steps_run == 60
        assert ens.record.redone_members == {"collapsed": 1, "diverged": 0}
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        del manifest["members"][4]  # as if interrupted before member 5 was saved
        manifest["complete"] = False
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        (tmp_path / persistence.member_file(4)).unlink()
        resumed = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=tmp_path, **kwargs)
        assert resumed.num_members == 5 and resumed.record.steps_run == 10
    for a, b in zip(ens.members, resumed.members):
        np.testing.assert_array_equal(a.trainable[0], b.trainable[0])


@pytest.mark.filterwarnings("ignore:Step-size calibration found no learning rate")
def test_a_user_loss_computing_the_compiled_cross_entropy_collects_the_same_members(
    small_mlp, tmp_path
):
    """Two routes agree: the compiled loss, and a user function computing it, read
    as the sparse cross-entropy on logits its outputs and labels imply (before:
    "other", a fixed step size and a fit read as a share of loss explained)."""
    model, x, y = small_mlp
    kwargs = dict(num_members=2, steps=20, seed=3, verbose=0)
    compiled = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    user = keras_gex.GeometricEnsemble.collect(model, (x, y), loss=user_sparse_ce, **kwargs)
    assert (user.loss.kind, user.loss.from_logits, user.loss.inferred) == (
        "sparse_categorical_crossentropy",
        True,
        True,
    )
    assert user.record.calibration and user.record.learning_rate_requested == "auto"
    assert [p.learning_rate for p in user.record.calibration] == [
        p.learning_rate for p in compiled.record.calibration
    ]
    for a, b in zip(compiled.members, user.members):
        for wa, wb in zip(a.trainable, b.trainable):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    summary = keras_gex.detect_noisy((x, y), user).summary(print_fn=None)
    assert "loss: 'user_sparse_ce', user code read from its outputs and labels as sparse" in summary
    # Saved and loaded with the user's loss, the ensemble keeps the kind it was collected under.
    user.save(tmp_path / "ens")
    loaded = keras_gex.GeometricEnsemble.load(tmp_path / "ens", model, loss=user_sparse_ce)
    assert (loaded.loss.kind, loaded.loss.from_logits) == ("sparse_categorical_crossentropy", True)
