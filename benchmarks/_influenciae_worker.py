"""deel-ai influenciae on the digits MLP: self-influence of every training example.

Runs inside the separate virtualenv that `benchmarks/speed.py` creates
(influenciae is written for Keras 2: `tf-keras` with `TF_USE_LEGACY_KERAS=1`),
as a subprocess, never imported by keras_gex. Reads the model weights, the
TracIn checkpoints and the data from an `.npz` written by `speed.py`, rebuilds
the same 64-256-256-10 MLP in `tf.keras`, and times, per method, the
self-influence of all N training examples end to end (building the
calculator included), then writes one JSON line per method:

* `if_exact`: `FirstOrderInfluenceCalculator` with `ExactIHVP` on the last
  layer, the Hessian computed by influenciae itself over the training set in
  batches of `--hessian-batch` (its per-example Hessians are
  batch x P x P floats, so the batch is memory-bound).
* `if_given_hessian`: the same calculator given the last layer's mean Hessian
  (computed here with one `tf.GradientTape.jacobian` of the mean gradient,
  timed separately and reported as `hessian_seconds`).
* `tracin`: `TracIn` over the training checkpoints on the last layer.
* `arnoldi`: `ArnoldiInfluenceCalculator` on the last layer.

Usage (normally only from speed.py)::

    TF_USE_LEGACY_KERAS=1 python _influenciae_worker.py IN.npz OUT.jsonl \
        [--methods if_exact if_given_hessian tracin arnoldi] [--hessian-batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from deel.influenciae.common import ExactIHVP, InfluenceModel
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
from deel.influenciae.trac_in import TracIn

BATCH = 128  # influence-value batches (not the Hessian batches)


def _model(weights):
    keras = tf.keras
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.set_weights(list(weights))
    return model


def _loss():
    return tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )


def _values(calculator, dataset) -> np.ndarray:
    out = [np.asarray(v) for _, v in calculator.compute_influence_values(dataset)]
    return np.concatenate(out).reshape(-1)


def _auc(is_noisy, scores) -> tuple[float, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=1e300)
    return float(roc_auc_score(is_noisy, scores)), float(average_precision_score(is_noisy, scores))


def _mean_hessian(influence_model, x, y) -> tf.Tensor:
    """Mean Hessian of the loss w.r.t. the watched weights, flattened as influenciae does."""
    weights = influence_model.weights
    loss = _loss()
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = tf.reduce_mean(loss(y, influence_model.model(x)))
        grads = inner.gradient(value, weights)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    blocks = outer.jacobian(flat, weights)
    return tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz")
    parser.add_argument("out")
    parser.add_argument(
        "--methods", nargs="+", default=["if_exact", "if_given_hessian", "tracin", "arnoldi"]
    )
    parser.add_argument("--hessian-batch", type=int, default=4)
    args = parser.parse_args(argv)
    data = np.load(args.npz)
    x, y, is_noisy = data["x"], data["y"], data["is_noisy"]
    weights = [data[f"w{i}"] for i in range(int(data["num_weights"]))]
    checkpoints = [
        [data[f"c{k}_w{i}"] for i in range(int(data["num_weights"]))]
        for k in range(int(data["num_checkpoints"]))
    ]
    learning_rate = float(data["learning_rate"])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

    def emit(row):
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for method in args.methods:
        row = {"method": method, "n": len(x)}
        try:
            tf.keras.backend.clear_session()
            start = time.perf_counter()
            if method == "tracin":
                models = [
                    InfluenceModel(_model(c), start_layer=-1, loss_function=_loss())
                    for c in checkpoints
                ]
                calculator = TracIn(models, learning_rate)
                row["checkpoints"] = len(models)
            else:
                influence_model = InfluenceModel(
                    _model(weights), start_layer=-1, loss_function=_loss()
                )
                row["params"] = int(influence_model.nb_params)
                if method == "if_exact":
                    hessian_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
                        args.hessian_batch
                    )
                    ihvp = ExactIHVP(influence_model, hessian_ds)
                    calculator = FirstOrderInfluenceCalculator(influence_model, dataset, ihvp)
                    row["hessian_batch"] = args.hessian_batch
                elif method == "if_given_hessian":
                    h_start = time.perf_counter()
                    hessian = _mean_hessian(influence_model, tf.constant(x), tf.constant(y))
                    row["hessian_seconds"] = time.perf_counter() - h_start
                    ihvp = ExactIHVP(influence_model, train_hessian=hessian)
                    calculator = FirstOrderInfluenceCalculator(influence_model, dataset, ihvp)
                elif method == "arnoldi":
                    calculator = ArnoldiInfluenceCalculator(
                        influence_model,
                        dataset,
                        subspace_dim=100,
                        force_hermitian=False,
                        k_largest_eig_vals=50,
                    )
                else:
                    raise ValueError(f"unknown method {method!r}")
            scores = _values(calculator, dataset)
            row["seconds"] = time.perf_counter() - start
            row["auc"], row["ap"] = _auc(is_noisy, scores)
            row["ok"] = True
        except Exception as error:  # reported in the table, never fatal
            row["ok"] = False
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
