"""GEX under `tf.distribute`: scores and members equal the single-device ones.

`conftest.py` splits the CPU into 4 logical devices, so `MirroredStrategy`
runs 1, 2 and 4 replicas here. The multi-worker test starts this file as two
worker processes (`python tests/integration/test_distribute.py worker ...`) talking over
127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tolerances import DATA_PARALLEL_ATOL, DIST_SCORE_ATOL, PER_REPLICA_ATOL, SCORE_RTOL

import keras_gex
from keras_gex import distribute
from keras_gex.collection.local import FineTuner
from keras_gex.collection.replicated import ReplicaFineTuner
from keras_gex.data import DataSource
from keras_gex.losses import resolve_loss
from keras_gex.weights import WeightSet

_STRATEGIES = {}


class _Mirrored(tf.distribute.MirroredStrategy):
    """MirroredStrategy whose collective keys do not collide with the other test strategies'.

    TensorFlow numbers the collective groups of every MirroredStrategy from 1, so two
    strategies over different device sets in one process clash on their first all-reduce.
    """


def mirrored(replicas: int) -> tf.distribute.Strategy:
    if replicas not in _STRATEGIES:
        _Mirrored._collective_key_base = 1000 * replicas
        _STRATEGIES[replicas] = _Mirrored([f"/cpu:{i}" for i in range(replicas)])
    return _STRATEGIES[replicas]


def bn_model(seed=0, width=16):
    """Dense → BatchNorm → ReLU → Dropout → Dense on 64 features, 10 classes."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((64,)),
            layers.Dense(width),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dropout(0.1),
            layers.Dense(10),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def perturbed_ensemble(model, num_members=3, scale=0.2, seed=0):
    """θ* and members θ* + noise, BatchNorm statistics perturbed as well."""
    rng = np.random.default_rng(seed)
    reference = WeightSet.from_model(model)

    def jitter(w):
        if not np.issubdtype(w.dtype, np.floating):
            return w
        noisy = w + rng.normal(0, scale, w.shape).astype(w.dtype)
        return np.abs(noisy) if w.ndim == 1 and np.all(w >= 0) else noisy

    members = [
        WeightSet(
            [jitter(w) for w in reference.trainable], [jitter(w) for w in reference.non_trainable]
        )
        for _ in range(num_members)
    ]
    return keras_gex.GeometricEnsemble(model, reference, members, resolve_loss(model))


def small_data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype("float32")
    y = rng.integers(0, 10, size=n)
    return x, y


def assert_weights_close(a, b, atol):
    for ma, mb in zip(a, b):
        for wa, wb in zip(ma.trainable + ma.non_trainable, mb.trainable + mb.non_trainable):
            np.testing.assert_allclose(wa, wb, rtol=0, atol=atol)


# -- scoring ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_ensemble():
    """Three perturbed members of a BatchNorm/Dropout model; scorers are cached on it."""
    return perturbed_ensemble(bn_model())


@pytest.mark.parametrize("replicas", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_scores_on_replicas_equal_single_device(bn_ensemble, replicas):
    x, y = small_data(23)
    strategy = mirrored(replicas)
    # batch 5 → last batch of 3 rows: with 4 replicas one replica gets zero rows.
    base = bn_ensemble.deviations((x, y), batch_size=5, with_predictions=True, verbose=0)
    dist = bn_ensemble.deviations(
        (x, y), batch_size=5, with_predictions=True, verbose=0, strategy=strategy
    )
    np.testing.assert_allclose(dist.deviations, base.deviations, rtol=0, atol=DIST_SCORE_ATOL)
    np.testing.assert_allclose(
        dist.reference_losses, base.reference_losses, rtol=0, atol=DIST_SCORE_ATOL
    )
    np.testing.assert_allclose(dist.predictions, base.predictions, rtol=0, atol=DIST_SCORE_ATOL)
    np.testing.assert_allclose(
        dist.member_probabilities, base.member_probabilities, rtol=0, atol=DIST_SCORE_ATOL
    )
    np.testing.assert_array_equal(dist.labels, y)
    if replicas == 4:  # a dataset whose batches are smaller than the number of replicas
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
        tiny = bn_ensemble.loss_deviations(ds, verbose=0, strategy=strategy)
        np.testing.assert_allclose(tiny, base.deviations, rtol=0, atol=DIST_SCORE_ATOL)


def test_detect_noisy_scores_under_the_given_strategy(bn_ensemble):
    x, y = small_data(23)
    base = keras_gex.detect_noisy((x, y), bn_ensemble, batch_size=5, verbose=0)
    dist = keras_gex.detect_noisy(
        (x, y), bn_ensemble, batch_size=5, verbose=0, strategy=mirrored(2)
    )
    # Scores are squared deviations: compare relatively (deviations agree to 1e-5 abs).
    np.testing.assert_allclose(dist.scores, base.scores, rtol=SCORE_RTOL, atol=DIST_SCORE_ATOL)
    assert dist.ensemble is bn_ensemble
    with pytest.raises(TypeError, match=r"tf\.distribute\.Strategy"):
        keras_gex.detect_noisy((x, y), bn_ensemble, verbose=0, strategy="mirrored")


@pytest.mark.slow
def test_distributed_scores_follow_dataset_order_and_stream_to_cache(bn_ensemble, tmp_path):
    x, y = small_data(41, seed=1)
    strategy = mirrored(4)
    perm = np.random.default_rng(0).permutation(len(x))
    dev_base = bn_ensemble.loss_deviations((x, y), verbose=0)
    base = np.mean(dev_base.astype(np.float64) ** 2, axis=1)
    permuted = bn_ensemble.self_influence(
        (x[perm], y[perm]), batch_size=6, verbose=0, strategy=strategy
    )
    np.testing.assert_allclose(permuted, base[perm], rtol=0, atol=DIST_SCORE_ATOL)
    cached = bn_ensemble.loss_deviations(
        (x, y), cache=tmp_path / "dev.npy", batch_size=7, verbose=0, strategy=strategy
    )
    np.testing.assert_allclose(cached, dev_base, rtol=0, atol=DIST_SCORE_ATOL)
    scorer = bn_ensemble._get_scorer(strategy)
    assert bn_ensemble._get_scorer(strategy) is scorer
    # one trace for every batch size, array or dataset input: per (element spec, predictions)
    assert len([key for key in scorer._fns if not key[-1]]) == 1
    eager = scorer.score(DataSource((x[:9], y[:9]), batch_size=2), eager=True)
    np.testing.assert_allclose(eager.members - eager.reference[:, None], dev_base[:9], atol=1e-5)
    with pytest.raises(ValueError, match="reshuffles"):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10).batch(4)
        bn_ensemble.self_influence(ds, verbose=0, strategy=strategy)


def test_strategy_is_picked_up_from_scope_and_from_the_model():
    strategy = mirrored(2)
    x, y = small_data(11)
    plain = perturbed_ensemble(bn_model(seed=1), num_members=2)
    base = plain.loss_deviations((x, y), verbose=0)
    with strategy.scope():
        plain.loss_deviations((x, y), verbose=0)
    assert [s for s, _ in plain._distributed_scorers.values()] == [strategy]
    with strategy.scope():
        model = bn_model(seed=1)
    ensemble = perturbed_ensemble(model, num_members=2)
    got = ensemble.loss_deviations((x, y), verbose=0)
    assert [s for s, _ in ensemble._distributed_scorers.values()] == [strategy]
    np.testing.assert_allclose(got, base, rtol=0, atol=DIST_SCORE_ATOL)


def test_invalid_strategy_arguments_are_refused(digits):
    ensemble = perturbed_ensemble(bn_model(), num_members=1)
    x, y = small_data(5)
    with pytest.raises(
        TypeError, match=r"Argument `strategy` must be a `tf\.distribute\.Strategy`"
    ):
        ensemble.deviations((x, y), strategy="mirrored", verbose=0)
    model = bn_model()
    data = (digits.x_train[:64], digits.y_train[:64])
    with pytest.raises(ValueError, match=r"needs a `tf\.distribute` strategy"):
        keras_gex.GeometricEnsemble.collect(model, data, per_replica_members=True, verbose=0)
    with pytest.raises(ValueError, match="incompatible"):
        keras_gex.GeometricEnsemble.collect(
            model, data, strategy=mirrored(2), per_replica_members=True, chain=True, verbose=0
        )
    with pytest.raises(ValueError, match="must be a boolean"):
        keras_gex.GEXCollector(data, per_replica_members="yes")
    with pytest.raises(TypeError, match="Argument `strategy`"):
        keras_gex.GEXCollector(data, strategy=object())
    with pytest.raises(ValueError, match="differs from the strategy"):
        with mirrored(2).scope():
            ensemble.deviations((x, y), strategy=mirrored(1), verbose=0)


# -- fine-tuning ----------------------------------------------------------------------------


# Distributed fine-tuning is never XLA-compiled; the one-device route it is compared
# with must not be either (XLA fuses float32 arithmetic differently).
COLLECT = dict(
    num_members=3,
    steps=8,
    learning_rate=0.05,
    batch_size=32,
    bn_batches=3,
    seed=4,
    jit_compile=False,
)


@pytest.mark.slow
def test_per_replica_members_equal_sequential_members(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    model = bn_model(seed=2)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # 3 members on 2 replicas: two rounds, the second round's extra member discarded.
    collector = keras_gex.GEXCollector(
        (x, y), verbose=0, strategy=mirrored(2), per_replica_members=True, **COLLECT
    )
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[collector])
    parallel = collector.ensemble
    sequential = keras_gex.GeometricEnsemble.collect(model, (x, y), verbose=0, **COLLECT)
    assert parallel.info["strategy"] == {
        "type": "_Mirrored",
        "replicas": 2,
        "workers": 1,
        "per_replica_members": True,
    }
    assert_weights_close([parallel.reference], [sequential.reference], PER_REPLICA_ATOL)
    assert_weights_close(parallel.members, sequential.members, PER_REPLICA_ATOL)
    for a, b in zip(parallel.info["member_stats"], sequential.info["member_stats"]):
        assert a["learning_rate"] == b["learning_rate"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


@pytest.mark.slow
def test_data_parallel_members_match_sequential_members(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kwargs = dict(COLLECT, num_members=1)
    sequential = keras_gex.GeometricEnsemble.collect(model, (x, y), verbose=0, **kwargs)
    parallel = keras_gex.GeometricEnsemble.collect(
        model, (x, y), verbose=0, strategy=mirrored(2), **kwargs
    )
    assert parallel.info["strategy"]["per_replica_members"] is False
    assert_weights_close(parallel.members, sequential.members, DATA_PARALLEL_ATOL)


@pytest.mark.parametrize("per_replica", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_replicas_keep_weight_constraints_as_one_device_does(digits, per_replica):
    x, y = digits.x_train[:256], digits.y_train[:256]
    keras.utils.set_random_seed(0)
    nonneg = keras.constraints.NonNeg()
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu", kernel_constraint=nonneg),
            keras.layers.Dense(10),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    kwargs = dict(COLLECT, learning_rate=0.5, num_members=2)
    sequential = keras_gex.GeometricEnsemble.collect(model, (x, y), verbose=0, **kwargs)
    parallel = keras_gex.GeometricEnsemble.collect(
        model,
        (x, y),
        verbose=0,
        strategy=mirrored(2),
        per_replica_members=per_replica,
        **kwargs,
    )
    tolerance = PER_REPLICA_ATOL if per_replica else DATA_PARALLEL_ATOL
    assert_weights_close(parallel.members, sequential.members, tolerance)
    assert min(member.trainable[0].min() for member in parallel.members) >= 0.0


def test_data_parallel_batchnorm_statistics_identical_on_every_replica(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    model = bn_model(seed=2)
    loss = resolve_loss(model)
    strategy = mirrored(2)
    source = DataSource((x, y))
    single = FineTuner(model, loss)
    tuner = ReplicaFineTuner(model, loss, 0.9, strategy, synchronized=True, global_batch_size=30)
    theta = WeightSet.from_model(model)
    tuner.load(theta)
    tuner.train(tuner.open_stream(source, 30, [1]), 5, 0.05)
    for var in tuner.tv:  # all-reduced gradients: the copies never drift apart
        a, b = (v.numpy() for v in strategy.experimental_local_results(var))
        np.testing.assert_array_equal(a, b)
    # re-estimation on the same global batches as a single-device pass
    tuner.load(theta)
    single.load(theta)
    tuner.refresh_batchnorm(tuner.open_stream(source, 30, [2]), 4)
    single.refresh_batchnorm(iter(source.shuffled(30, 2)), 4)
    for i, j in tuner._bn_index:
        for k in (i, j):
            a, b = (v.numpy() for v in strategy.experimental_local_results(tuner.ntv[k]))
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, single.ntv[k].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_under_a_strategy_leaves_the_run_alone(digits):
    """Data-parallel fine-tuning measured halfway (BN statistics re-estimated,
    then put back on every replica) ends where the unmeasured run ends."""
    x, y = digits.x_train[:256], digits.y_train[:256]
    model = bn_model(seed=2)
    loss = resolve_loss(model)
    source = DataSource((x, y))
    tuner = ReplicaFineTuner(model, loss, 0.9, mirrored(2), synchronized=True, global_batch_size=30)
    theta = WeightSet.from_model(model)
    eval_batches = [(x[:128], y[:128])]
    tuner.load(theta)
    tuner.train(tuner.open_stream(source, 30, [1]), 10, 0.05)
    whole = tuner.snapshots()[0]
    tuner.load(theta)
    batches = tuner.open_stream(source, 30, [1])
    tuner.train(batches, 10, 0.05, stop=5)
    stale = tuner.evaluate(eval_batches)
    measured = tuner.evaluate_refreshed(eval_batches, tuner.open_stream(source, 30, [2]), 3)
    assert measured != stale
    tuner.train(batches, 10, 0.05, start=5)
    for a, b in zip(
        whole.trainable + whole.non_trainable,
        tuner.snapshots()[0].trainable + tuner.snapshots()[0].non_trainable,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_per_replica_members_detect_as_well_as_sequential(trained_mlp, digits, digits_ensemble):
    from sklearn.metrics import roc_auc_score

    data = (digits.x_train, digits.y_train)
    parallel = keras_gex.GeometricEnsemble.collect(
        trained_mlp,
        data,
        num_members=4,
        steps=100,
        seed=0,
        verbose=0,
        strategy=mirrored(2),
        per_replica_members=True,
    )
    auc_parallel = roc_auc_score(digits.is_noisy, parallel.self_influence(data, verbose=0))
    auc_sequential = roc_auc_score(digits.is_noisy, digits_ensemble.self_influence(data, verbose=0))
    assert abs(auc_parallel - auc_sequential) <= 0.005, (auc_parallel, auc_sequential)


# -- multi-worker ---------------------------------------------------------------------------

WORKER_TIMEOUT_S = 240
MW_DATA = 21  # batch 5: the last batch has one row, so worker 0's replica gets zero


def _free_ports(count: int) -> list:
    """`count` distinct free loopback ports (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _mw_setup():
    from keras_gex.datasets import noisy_digits

    digits = noisy_digits(noise=0.1, seed=0)
    x, y = digits.x_train[:96], digits.y_train[:96]
    model = bn_model(seed=5)
    return model, (x, y)


def _mw_results(strategy):
    """What every process computes: scores, data-parallel and per-replica members."""
    model, (x, y) = _mw_setup()
    ensemble = perturbed_ensemble(model, num_members=2)
    dev = ensemble.deviations(
        (x[:MW_DATA], y[:MW_DATA]), batch_size=5, verbose=0, strategy=strategy
    ).deviations
    kwargs = dict(
        num_members=3,
        steps=6,
        learning_rate=0.05,
        batch_size=16,
        bn_batches=2,
        seed=3,
        jit_compile=False,
    )
    per_replica = keras_gex.GeometricEnsemble.collect(
        model,
        (x, y),
        verbose=0,
        strategy=strategy,
        per_replica_members=strategy is not None,
        **kwargs,
    )
    labels_u8 = tf.data.Dataset.from_tensor_slices((x[:MW_DATA], y[:MW_DATA].astype("uint8")))
    dev_u8 = ensemble.loss_deviations(labels_u8.batch(4), verbose=0, strategy=strategy)
    out = {"deviations": dev, "deviations_uint8_labels": dev_u8}
    for m, weights in enumerate(per_replica.members):
        for k, w in enumerate(weights.trainable + weights.non_trainable):
            out[f"member{m}_{k}"] = w
    if strategy is not None:
        parallel = keras_gex.GeometricEnsemble.collect(
            model, (x, y), verbose=0, strategy=strategy, **dict(kwargs, num_members=1)
        )
        out["data_parallel"] = parallel.members[0].trainable[0]
    return out


def _worker_main(index: int, ports: list, out_path: str) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert distribute.num_workers(strategy) == len(ports)
    np.savez(out_path, **_mw_results(strategy))


@pytest.mark.slow
def test_two_workers_equal_single_process(tmp_path):
    ports = _free_ports(2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tolerances.py
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [
                "timeout",
                "-k",
                "10",
                str(WORKER_TIMEOUT_S),
                sys.executable,
                __file__,
                "worker",
                str(i),
                ",".join(map(str, ports)),
                str(tmp_path / f"worker{i}.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=WORKER_TIMEOUT_S + 30)[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{logs[i][-3000:]}"
    single = _mw_results(None)
    results = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    for got in results:
        for key in ("deviations", "deviations_uint8_labels"):
            np.testing.assert_allclose(got[key], single[key], rtol=0, atol=DIST_SCORE_ATOL)
        for key in single:
            if key.startswith("member"):
                np.testing.assert_allclose(got[key], single[key], rtol=0, atol=PER_REPLICA_ATOL)
    np.testing.assert_array_equal(results[0]["data_parallel"], results[1]["data_parallel"])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        _worker_main(int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], sys.argv[4])
    else:
        sys.exit("usage: test_distribute.py worker INDEX PORT,PORT OUT.npz")


@pytest.mark.slow
def test_dict_inputs_under_a_strategy_equal_one_device(digits):
    """A two-input model (dict inputs, BatchNorm): per-replica members and
    distributed scores equal the one-device ones."""
    x, y = digits.x_train[:256], digits.y_train[:256]
    keras.utils.set_random_seed(3)
    a, b = keras.Input((40,), name="a"), keras.Input((24,), name="b")
    hidden = keras.layers.BatchNormalization()(
        keras.layers.Dense(16)(keras.layers.Concatenate()([a, b]))
    )
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(10)(keras.layers.ReLU()(hidden)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = {"a": x[:, :40], "b": x[:, 40:]}
    model.fit(inputs, y, epochs=3, verbose=0)
    data = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(32)
    strategy = mirrored(2)
    parallel = keras_gex.GeometricEnsemble.collect(
        model, data, verbose=0, strategy=strategy, per_replica_members=True, **COLLECT
    )
    single = keras_gex.GeometricEnsemble.collect(model, data, verbose=0, **COLLECT)
    assert_weights_close(parallel.members, single.members, PER_REPLICA_ATOL)
    got = parallel.deviations(data, strategy=strategy, verbose=0).deviations
    want = single.deviations(data, verbose=0).deviations
    np.testing.assert_allclose(got, want, rtol=SCORE_RTOL, atol=DIST_SCORE_ATOL)
