"""Scores of fixed collections, saved for a bit-identity check between two trees.

A structure-only change must leave every score bit-identical. Run this once per tree
(each from its own copy, since autograph re-reads source) and compare the .npz files:

    PYTHONPATH=/path/to/old python benchmarks/bit_identity.py OUT_OLD demo
    PYTHONPATH=/path/to/old python benchmarks/bit_identity.py OUT_OLD dist 1,2
    PYTHONPATH=/path/to/old python benchmarks/bit_identity.py OUT_OLD dist 4
    (the same for the new tree into OUT_NEW), then
    python benchmarks/bit_identity.py OUT_OLD compare OUT_NEW

"demo": the demo's GEXCollector run and detect_noisy scores, a tf.data collection, a
chain collection and a resumable directory collection. "dist R,...": a BatchNorm MLP
collected with a calibrated and a fixed step size, data-parallel and per replica, on R
logical CPU devices (one process per device count: the logical devices are fixed at
start-up). Public API only.
"""

import glob
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def compare(old: str, new: str) -> bool:
    """Prints one row per saved file; True when every array is bit-identical."""
    same = True
    for path in sorted(glob.glob(os.path.join(old, "*.np[zy]"))):
        a, b = np.load(path), np.load(os.path.join(new, os.path.basename(path)))
        if hasattr(a, "files"):
            equal = all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)
        else:
            equal = np.array_equal(a, b, equal_nan=True)
        same &= equal
        print(f"| {os.path.basename(path)} | {'identical' if equal else 'DIFFERENT'} |")
    return same


def _save(out: str, name: str, ensemble, data) -> None:
    deviations = ensemble.deviations(data, verbose=0)
    # `info` (not `record`): the same script runs on trees from before the typed record.
    rates = [s["learning_rate"] for s in ensemble.info["member_stats"]]
    probes = [p["learning_rate"] for p in ensemble.info["calibration"]] or [0.0]
    np.savez(
        os.path.join(out, name + ".npz"),
        dev=deviations.deviations,
        ref=deviations.reference_losses,
        lrs=np.array(rates),
        cal=np.array(probes),
    )
    print(name, "lrs", np.round(rates, 5), flush=True)


def demo(out: str) -> None:
    import keras
    import tensorflow as tf

    import keras_gex
    from keras_gex.datasets import noisy_digits

    try:
        from keras_gex.app.demo import _mlp
    except ImportError:  # a tree from before keras_gex/app/
        from keras_gex.demo import _mlp

    data = noisy_digits(noise=0.1, seed=0)
    y = keras.utils.to_categorical(data.y_train, data.num_classes)
    arrays = (data.x_train, y)
    model = _mlp(data.num_classes, 0)
    collector = keras_gex.GEXCollector(arrays, num_members=8, seed=0, verbose=0)
    model.fit(data.x_train, y, epochs=150, batch_size=64, verbose=0, callbacks=[collector])
    report = keras_gex.detect_noisy(arrays, collector.ensemble, verbose=0)
    np.save(os.path.join(out, "demo_scores.npy"), report.scores)
    _save(out, "demo", collector.ensemble, arrays)
    collect = keras_gex.GeometricEnsemble.collect
    dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(128)
    _save(out, "demo_ds", collect(model, dataset, num_members=3, seed=1, verbose=0), arrays)
    chain = collect(model, arrays, num_members=3, seed=2, chain=True, learning_rate=0.3, verbose=0)
    _save(out, "demo_chain", chain, arrays)
    stored = collect(model, arrays, num_members=3, seed=3, directory=tempfile.mkdtemp(), verbose=0)
    _save(out, "demo_dir", stored, arrays)


def dist(out: str, replicas: list) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    import keras
    from sklearn.datasets import load_digits

    import keras_gex

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32")[:768], y[:768]
    rng = np.random.default_rng(0)
    flip = rng.random(len(y)) < 0.1
    y = np.where(flip, (y + rng.integers(1, 10, len(y))) % 10, y)
    keras.utils.set_random_seed(0)
    layers = keras.layers
    hidden = [layers.Dense(32), layers.BatchNormalization(), layers.ReLU()]
    model = keras.Sequential([keras.Input((64,)), *hidden, layers.Dense(10)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(x, y, epochs=60, batch_size=64, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    settings = dict(num_members=4, seed=0, verbose=0, steps=60)
    if 1 in replicas:
        ensemble = keras_gex.GeometricEnsemble.collect(model, (x, y), **settings)
        _save(out, "dist_none_auto", ensemble, (x, y))

    class Mirrored(tf.distribute.MirroredStrategy):
        """Collective keys of its own per device count (one process, several strategies)."""

    for count in replicas:
        Mirrored._collective_key_base = 1000 * count
        strategy = Mirrored([f"/cpu:{i}" for i in range(count)])
        for per_replica in (False, True):
            for lr in ("auto", 0.2):
                ensemble = keras_gex.GeometricEnsemble.collect(
                    model,
                    dataset,
                    strategy=strategy,
                    per_replica_members=per_replica,
                    learning_rate=lr,
                    **settings,
                )
                name = f"dist_r{count}_{'pr' if per_replica else 'dp'}_{lr}"
                _save(out, name, ensemble, (x, y))


def main(argv: list) -> int:
    out, what = argv[0], argv[1]
    if what == "compare":
        return 0 if compare(out, argv[2]) else 1
    os.makedirs(out, exist_ok=True)
    if what == "demo":
        demo(out)
    else:
        dist(out, [int(v) for v in argv[2].split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
