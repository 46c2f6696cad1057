"""
Title: GEX for a model you already trained and saved
Author: keras_gex contributors
Date created: 2026/11/23
Last modified: 2026/12/07
Description: Post-hoc GEX on a saved `.keras` model; save, load, resume; a production gate.
"""

# Keras-guide layout: prose strings come before the imports.
# ruff: noqa: E402

"""
## Introduction

GEX needs only the *final* weights of a model. You do not have to retrain anything, or
to have used `keras_gex.GEXCollector` during training: load the saved model, point
`keras_gex.detect_noisy` at it together with its training data, and the geometric
ensemble is collected post hoc.

The ensemble is the expensive part (M fine-tuned copies of the model); the scores are
cheap forward passes. This tutorial shows how to keep the ensemble on disk:

* `detect_noisy(data, model, directory=...)` writes every member as soon as it is done;
* `GeometricEnsemble.load(directory, model)` gives the ensemble back, with the same
  scores, in a later session;
* `ensemble.save(directory)` stores any ensemble you hold;
* a collection that was interrupted resumes at the first missing member when you run the
  same call again — with the same result as an uninterrupted run.

Set `KERAS_GEX_TUTORIAL_FAST=1` for a reduced run of about a minute.
"""

"""
## Setup
"""

import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow_datasets as tfds
from sklearn.metrics import roc_auc_score

import keras_gex
from keras_gex.datasets import flip_labels

FAST = os.environ.get("KERAS_GEX_TUTORIAL_FAST") == "1"

SEED = 0
NUM_TRAIN = 1_000 if FAST else 10_000
EPOCHS = 30 if FAST else 40
NUM_MEMBERS = 4 if FAST else 8
# Fast mode also shortens the fine-tuning of each member (default: about 10 epochs,
# at most 800 SGD steps).
GEX_ARGS = dict(steps=100) if FAST else {}
MODEL_PATH = "fashion_cnn.keras"
ENSEMBLE_DIR = "fashion_gex_ensemble"

start_time = time.perf_counter()

"""
## Session 1: train a model and save it

This part stands for whatever you did before: the small CNN of the first tutorial,
trained on Fashion-MNIST with 10% of the labels flipped so that we can check what GEX
finds. The model is saved in the native Keras format, which keeps its compiled loss —
GEX reuses that loss per example.
"""

images, labels = tfds.as_numpy(
    tfds.load("fashion_mnist", split=f"train[:{NUM_TRAIN}]", as_supervised=True, batch_size=-1)
)
x_train = images.astype("float32") / 255.0
y_train, is_flipped = flip_labels(labels, 0.1, num_classes=10, seed=SEED)

keras.utils.set_random_seed(SEED)
model = keras.Sequential(
    [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ],
    name="fashion_cnn",
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
model.fit(x_train, y_train, epochs=EPOCHS, batch_size=128, verbose=0)
model.save(MODEL_PATH)
del model
print(f"saved model: {MODEL_PATH}")

"""
## Session 2: reload the model and run GEX post hoc

`keras.models.load_model` restores the architecture, the weights θ* and the compiled
loss. (If you load with `compile=False`, pass the training loss to GEX with `loss=`.)

Passing a model instead of an ensemble to `detect_noisy` collects the ensemble first,
with the same arguments `GEXCollector` takes. We add `directory=`, so every member is
written to disk as soon as it is finished, and a `seed`, so the collection is
reproducible.
"""

model = keras.models.load_model(MODEL_PATH)
shutil.rmtree(ENSEMBLE_DIR, ignore_errors=True)  # start this tutorial from scratch

tic = time.perf_counter()
report = keras_gex.detect_noisy(
    (x_train, y_train),
    model,
    num_members=NUM_MEMBERS,
    seed=SEED,
    directory=ENSEMBLE_DIR,
    **GEX_ARGS,
)
collect_seconds = time.perf_counter() - tic
report.summary()
auc = roc_auc_score(is_flipped, report.scores)
print(f"post-hoc detection: AUC {auc:.4f}, {report.num_flagged} flagged")
print(f"collection and scoring took {collect_seconds:.1f} s")
print("ensemble directory:", sorted(os.listdir(ENSEMBLE_DIR)))

"""
The directory holds one Keras `.weights.h5` file per member, θ* as scored (BatchNorm
statistics re-estimated the same way as the members'), and a `manifest.json` with the
hyperparameters, the calibrated step size and fingerprints of the architecture and of θ*.

## Session 3: load the ensemble and get the same scores

Loading needs the model the ensemble belongs to. A model with another architecture, or
the same architecture with different weights (say, after you retrained it), is refused
with a message naming the mismatch, instead of silently producing meaningless scores.
"""

ensemble = keras_gex.GeometricEnsemble.load(ENSEMBLE_DIR, model)
print(ensemble)
tic = time.perf_counter()
reloaded = keras_gex.detect_noisy((x_train, y_train), ensemble)
score_seconds = time.perf_counter() - tic
max_diff = float(np.max(np.abs(reloaded.scores - report.scores)))
print(
    f"loaded ensemble: max |score difference| {max_diff:.3g} (scoring took {score_seconds:.1f} s)"
)
print("same flagged examples:", bool(np.array_equal(reloaded.noisy_mask, report.noisy_mask)))

"""
Scoring with a stored ensemble costs only forward passes. `ensemble.save` writes any
ensemble you hold — for example `collector.ensemble` after training with `GEXCollector`
— in the same format:
"""

ensemble.save("fashion_gex_copy")
copy = keras_gex.GeometricEnsemble.load("fashion_gex_copy", model)
print("copy has", copy.num_members, "members")

"""
A model that is not θ* cannot load it. Here we perturb one weight:
"""

other = keras.models.load_model(MODEL_PATH)
other.layers[-1].kernel.assign(other.layers[-1].kernel * 1.01)
try:
    keras_gex.GeometricEnsemble.load(ENSEMBLE_DIR, other)
except ValueError as error:
    print("refused:", str(error).split(". ")[0])

"""
## A production gate: check new data without keras_gex

The same ensemble can screen data that arrives after training. `export_scorer` writes a
TensorFlow SavedModel that runs θ* and every member; exported with a report, its
`flag(x, y)` applies that report's threshold, so a new row is flagged exactly when the
report's rule would have flagged it among the training rows. Loading it needs TensorFlow
only: no keras_gex, no model code.

Here the "new data" are test images with 10% of their labels flipped.
"""

import tensorflow as tf

SCORER_DIR = "fashion_gex_scorer"
keras_gex.export_scorer(ensemble, SCORER_DIR, report=reloaded)

new_images, new_labels = tfds.as_numpy(
    tfds.load("fashion_mnist", split="test[:2000]", as_supervised=True, batch_size=-1)
)
x_new = new_images.astype("float32") / 255.0
y_new, new_flipped = flip_labels(new_labels, 0.1, num_classes=10, seed=SEED + 1)

scorer = tf.saved_model.load(SCORER_DIR)  # anywhere with TensorFlow
flagged_new = scorer.flag(tf.constant(x_new), tf.constant(y_new, tf.int64)).numpy()
print(
    f"gate on {len(y_new)} new rows: flags {flagged_new[new_flipped].mean():.0%} of the "
    f"flipped labels and {flagged_new[~new_flipped].mean():.0%} of the others"
)
same_gate = scorer.flag(tf.constant(x_train), tf.constant(y_train, tf.int64)).numpy()
print(
    "gate on the training rows = the report's flags:",
    bool(np.array_equal(same_gate, reloaded.noisy_mask)),
)

"""
`scorer.score(x, y)` returns the scores themselves (the member margin here, the member
loss, self-influence, θ*'s loss and predictions), and both functions are also the
SavedModel's signatures ("serving_default" and "flag") for TensorFlow Serving. The
command line does the same with `keras-gex detect MODEL DATA --export`.

## Resuming an interrupted collection

Collections of large ensembles on large models take a while, and jobs get killed. With
`directory=`, re-running the *same* call picks up where it stopped. To simulate a job
that died after two members, we first ask for two members only, then run the full call.
"""

RESUME_DIR = "fashion_gex_resumable"
shutil.rmtree(RESUME_DIR, ignore_errors=True)
collect_args = dict(seed=SEED, directory=RESUME_DIR, **GEX_ARGS)
keras_gex.GeometricEnsemble.collect(model, (x_train, y_train), num_members=2, **collect_args)
print("the interrupted run left:", sorted(os.listdir(RESUME_DIR)))

resumed = keras_gex.GeometricEnsemble.collect(
    model, (x_train, y_train), num_members=NUM_MEMBERS, **collect_args
)
resumed_scores = keras_gex.detect_noisy((x_train, y_train), resumed, verbose=0).scores
resume_diff = float(np.max(np.abs(resumed_scores - report.scores)))
print(f"resumed ensemble vs uninterrupted: max |score difference| {resume_diff:.3g}")

"""
The resumed ensemble reproduces the uninterrupted one: every member's mini-batches are a
function of `(seed, member index)` only, and the calibrated step size is stored in the
manifest before the first member. Running the call once more finds every member on disk
and fine-tunes nothing:
"""

tic = time.perf_counter()
keras_gex.GeometricEnsemble.collect(
    model, (x_train, y_train), num_members=NUM_MEMBERS, **collect_args
)
print(f"re-running the finished collection took {time.perf_counter() - tic:.1f} s")

print(f"done in {time.perf_counter() - start_time:.0f} s")
