"""Frozen layers computed once against run every step, side by side on one θ*.

A MobileNetV2 backbone (pretrained from random initialisation on disjoint
clean rows, then frozen) under a Dense(256)-Dense(10) head trained on Fashion-MNIST rows with
10% flipped labels; `GeometricEnsemble.collect` with `frozen_features=True`
and `False` from the same θ* and seed, then `detect_noisy` on each. Prints a
markdown table: collection and scoring seconds, their ratio to θ*'s training
time, and whether the two routes give the same scores.

    TFDS_DATA_DIR=../shared/tfds python benchmarks/frozen.py [--rows 2000] [--epochs 20]
        [--pretrain-epochs 8]
"""

from __future__ import annotations

import argparse
import subprocess
import time
import warnings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from sklearn.metrics import roc_auc_score

    import keras_gex

    warnings.simplefilter("ignore")

    def rows(split):
        ds = tfds.load("fashion_mnist", split=split, batch_size=-1)
        images = tf.image.grayscale_to_rgb(tf.cast(ds["image"], tf.float32) / 255.0)
        return tf.image.resize(images, (32, 32)).numpy(), ds["label"].numpy()

    x, y = rows(f"train[:{args.rows}]")
    x_pre, y_pre = rows(f"train[{args.rows}:{3 * args.rows}]")
    rng = np.random.default_rng(args.seed)
    flip = rng.random(len(y)) < 0.1
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10

    keras.utils.set_random_seed(args.seed)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    for layer in base.layers:  # MobileNet's 0.999 would leave them near initial after pretraining
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    pretrain = keras.Sequential([base, keras.layers.Dense(10)])
    pretrain.compile("adam", ce)
    pretrain.fit(x_pre, y_pre, epochs=args.pretrain_epochs, verbose=0)
    base.trainable = False
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Dense(256, activation="relu")(base(inputs, training=False))
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile("adam", ce)
    start = time.perf_counter()
    model.fit(x, noisy, epochs=args.epochs, batch_size=64, verbose=0)
    train = time.perf_counter() - start

    table, scores = [], {}
    for frozen in (True, False):
        start = time.perf_counter()
        ensemble = keras_gex.GeometricEnsemble.collect(
            # Eight members on both routes: `"auto"` affords more head steps than
            # steps through the backbone, and the routes must collect the same members.
            model,
            (x, noisy),
            num_members=8,
            seed=args.seed,
            frozen_features=frozen,
            verbose=0,
        )
        collected = time.perf_counter() - start
        report = keras_gex.detect_noisy((x, noisy), ensemble, verbose=0)
        scored = time.perf_counter() - start - collected
        scores[frozen] = report.scores
        table.append(
            f"| {frozen} | {ensemble.record.frozen_layers} | {collected:.1f} | {scored:.1f} | "
            f"{(collected + scored) / train:.2f} | {roc_auc_score(flip, report.scores):.4f} |"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    fit = float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == noisy))
    print(
        f"MobileNetV2 (α 0.35, 32×32) frozen + Dense 256-10, {args.rows} Fashion-MNIST rows, "
        f"10% flipped, θ* {args.epochs} epochs in {train:.1f} s (fits {fit:.1%}), seed "
        f"{args.seed}, at {commit or 'unknown commit'}\n"
    )
    print("| frozen_features | computed once | collection s | scoring s | GE / training | AUC |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(table))
    gap = float(np.max(np.abs(scores[True] - scores[False])))
    print(f"\nLargest score difference between the two routes: {gap:.2e}")


if __name__ == "__main__":
    main()
