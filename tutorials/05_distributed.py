"""
Title: Distributed GEX with tf.distribute
Author: keras_gex contributors
Date created: 2026/11/23
Last modified: 2026/11/23
Description: GEX collection and scoring on several replicas with MirroredStrategy.
"""

# ruff: noqa: E402

"""
## Introduction

GEX has two costs: fine-tuning M copies of the trained model (the *geometric ensemble*)
and scoring every training example with M+1 forward passes. Both run on TensorFlow's own
distribution engine, `tf.distribute`, so going from one GPU to all the GPUs of a machine
(`MirroredStrategy`) or to several machines (`MultiWorkerMirroredStrategy`) is a two-line
change:

```python
strategy = tf.distribute.MirroredStrategy()      # every local GPU
with strategy.scope():                           # GEX picks the strategy up
    report = keras_gex.detect_noisy((x_train, y_train), model)
```

Under a strategy:

* **scoring** splits every batch into one contiguous chunk per replica and gathers the
  results back in dataset order, so scores on 1, 2 or 4 replicas equal the single-device
  scores (to float32 rounding, ≤ 1e-5);
* **collection** fine-tunes each member *data-parallel*: a global batch is split across
  the replicas, gradients are all-reduced, and BatchNorm statistics are re-estimated from
  all replicas' batches, so every replica holds identical weights and statistics;
* with `per_replica_members=True`, every replica fine-tunes **its own member** instead,
  with no gradient synchronisation (the official GEX code's `--ft_local`): M members in
  about M / replicas rounds. With a fixed `learning_rate` each member equals the one
  sequential collection gives for the same member index.

This tutorial has no GPU requirement: it splits the CPU into two logical devices, which
`MirroredStrategy` treats as two replicas (they share the same cores, so expect
correctness here, not a speed-up). On a GPU machine it uses the GPUs instead.

Set `KERAS_GEX_TUTORIAL_FAST=1` for a reduced run of well under a minute.
"""

"""
## Setup

Logical devices have to be configured before TensorFlow runs its first operation, so
this comes right after the imports (importing TensorFlow and Keras does not start the
devices).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import keras_gex
from keras_gex.datasets import noisy_digits

REPLICAS = 2
gpus = tf.config.list_physical_devices("GPU")
if len(gpus) >= REPLICAS:
    devices = [f"/gpu:{i}" for i in range(REPLICAS)]
else:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
    )
    devices = [f"/cpu:{i}" for i in range(REPLICAS)]

FAST = os.environ.get("KERAS_GEX_TUTORIAL_FAST") == "1"
SEED = 0
EPOCHS = 60 if FAST else 150
NUM_MEMBERS = 4 if FAST else 8
STEPS = 100 if FAST else 200

start_time = time.perf_counter()

"""
## Data and model

scikit-learn's digits (bundled, no download) with 10% of the training labels flipped to
another class; `digits.is_noisy` marks the flips so we can measure detection. The model
is trained the usual way, on one device.
"""

digits = noisy_digits(noise=0.1, seed=SEED)
x_train, y_train = digits.x_train, digits.y_train
print(f"{len(x_train)} training images, {digits.is_noisy.sum()} flipped labels")

keras.utils.set_random_seed(SEED)
model = keras.Sequential(
    [
        keras.Input((64,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),
    ]
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(x_train, y_train, epochs=EPOCHS, batch_size=64, verbose=0)

"""
## The two-line change

`MirroredStrategy` over our two devices. Inside its `scope()`, `detect_noisy` collects the
ensemble data-parallel and scores it on both replicas; nothing else changes. (A model
*built and compiled* under `strategy.scope()` is picked up the same way, without the
`with` around GEX, and every GEX entry point also takes `strategy=` explicitly.)
"""

strategy = tf.distribute.MirroredStrategy(devices)
print(f"replicas in sync: {strategy.num_replicas_in_sync}")

start = time.perf_counter()
with strategy.scope():
    report = keras_gex.detect_noisy(
        (x_train, y_train), model, num_members=NUM_MEMBERS, steps=STEPS, seed=SEED, verbose=0
    )
data_parallel_seconds = time.perf_counter() - start
report.summary()
auc_data_parallel = roc_auc_score(digits.is_noisy, report.scores)
print(f"data-parallel collection: AUC {auc_data_parallel:.4f} ({data_parallel_seconds:.0f} s)")

"""
## One member per replica

`per_replica_members=True` trains independent members side by side, one per replica, with
no communication between replicas at all. Each member sees its own mini-batch stream (a
function of the seed and the member index only), so the result does not depend on how
many replicas there are. With `learning_rate="auto"` the members of a round share one
step size, which the calibration sets and a per-round controller nudges.
"""

start = time.perf_counter()
parallel = keras_gex.GeometricEnsemble.collect(
    model,
    (x_train, y_train),
    num_members=NUM_MEMBERS,
    steps=STEPS,
    seed=SEED,
    verbose=0,
    strategy=strategy,
    per_replica_members=True,
)
per_replica_seconds = time.perf_counter() - start
scores = parallel.self_influence((x_train, y_train), verbose=0, strategy=strategy)
auc_per_replica = roc_auc_score(digits.is_noisy, scores)
print(f"one member per replica: AUC {auc_per_replica:.4f} ({per_replica_seconds:.0f} s)")
print(f"ensemble info: {parallel.info['strategy']}")

"""
## Scores do not depend on the number of replicas

Scoring splits each batch into contiguous per-replica chunks — the last, partial batch
too, and replicas that get no example at all compute on an empty chunk — and gathers
them back in order. The same ensemble scored on one device gives the same numbers
(`scores` above came from the two replicas). Pass TensorFlow's default strategy
(`tf.distribute.get_strategy()` outside any scope) to score on one device.
"""

on_one_device = parallel.self_influence(
    (x_train, y_train), verbose=0, strategy=tf.distribute.get_strategy()
)
difference = np.max(np.abs(scores - on_one_device))
print(f"max |score difference|, 2 replicas vs one device: {difference:.2e}")

"""
## Many machines: MultiWorkerMirroredStrategy

Every worker runs the same program with its own `TF_CONFIG`; GEX's fine-tuning and scoring
are custom `strategy.run` loops, which is what multi-worker training needs (in Keras 3.15,
`model.fit` itself fails under `MultiWorkerMirroredStrategy`, see
tensorflow/tensorflow#72388, so train the model with a custom loop or load its weights).
Each worker reads the whole dataset and keeps its own replicas' chunks, so give every
worker the same data in the same order, and the same `seed`:

```python
strategy = tf.distribute.MultiWorkerMirroredStrategy()   # reads TF_CONFIG
model = keras.models.load_model("trained.keras")
ensemble = keras_gex.GeometricEnsemble.collect(
    model, (x_train, y_train), seed=0, strategy=strategy, per_replica_members=True
)
scores = ensemble.self_influence((x_train, y_train), strategy=strategy)  # on every worker
```

Every worker ends with the whole ensemble and all the scores; write files from one of
them (`directory=` and `cache=` paths should be per worker unless they are on a shared
file system).

## Results
"""

print(
    f"AUC against the flipped labels: data-parallel (member margin) "
    f"{auc_data_parallel:.4f}, one member per replica (self-influence) {auc_per_replica:.4f}"
)
print(f"done in {time.perf_counter() - start_time:.0f} s")
