"""Acting on a noisy-label report: a cleaned dataset ready for `model.fit`."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.analysis.prune import select
from keras_gex.data import (
    as_inputs,
    batch_like,
    lacks_output_axis,
    num_rows,
    sole_label,
    standardize_data,
)
from keras_gex.weights import sole_output


def clean(
    train_data,
    report,
    *,
    action: str = "relabel",
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    source: str = "auto",
):
    """Relabels (Kong et al.) or drops the examples `report` flags.

    Args:
        train_data: The training data that `report` scored, `(x, y)` arrays or
            a `tf.data.Dataset` of `(x, y)` batches in the same order.
        report: A `NoisyLabelReport` from `detect_noisy`.
        action: "relabel" (soft targets for flagged rows, one-hot elsewhere;
            train with `keras_gex.SoftTargetCrossentropy`) or "drop".
            Defaults to `"relabel"`.
        batch_size: Batch size of the returned dataset. Defaults to `None`
            (256 for arrays, the input's batch size for datasets).
        shuffle: Reshuffle the examples on every epoch, as `model.fit` does
            for arrays. Defaults to `True`.
        seed: Seed of the shuffle. Defaults to `None`.
        source: Whose probabilities drive relabeling (see
            `NoisyLabelReport.relabeled_targets`). Defaults to `"auto"`.

    Returns:
        A batched `tf.data.Dataset` of `(x, target)` ("relabel") or of the kept
        `(x, y)` ("drop"), with a known cardinality (`len(ds)` works).

    Raises:
        ValueError: If the data and the report disagree on the number of rows,
            or for invalid arguments.
    """
    _validation.one_of("action", action, ("relabel", "drop"))
    if batch_size is not None:
        batch_size = _validation.positive_int("batch_size", batch_size)
    if not isinstance(shuffle, bool):
        raise ValueError(f"Argument `shuffle` must be a bool. Received: shuffle={shuffle!r}")
    n = len(report.scores)
    train_data = standardize_data(train_data, "train_data")
    if isinstance(train_data, (tuple, list)):
        size = num_rows(as_inputs(train_data[0]))
        if size != n:
            raise ValueError(f"The data has {size} examples but the report scored {n}.")
    elif batch_size is None:
        for x, _ in train_data.take(1):
            batch_size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    batch_size = batch_size or 256

    if action == "drop":
        kept = select(train_data, ~report.noisy_mask, batch_size=batch_size)
        rows = (
            tf.data.Dataset.from_tensor_slices(kept)
            if isinstance(kept, tuple)
            else kept.unbatch().apply(
                tf.data.experimental.assert_cardinality(int((~report.noisy_mask).sum()))
            )
        )
        count = int((~report.noisy_mask).sum())
    else:
        targets = report.relabeled_targets(source=source).astype(np.float32)
        if isinstance(train_data, (tuple, list)):
            rows = tf.data.Dataset.from_tensor_slices((as_inputs(train_data[0]), targets))
        else:
            table = tf.constant(targets)
            rows = train_data.unbatch().enumerate()
            rows = rows.map(lambda i, example: (example[0], tf.gather(table, i)))
            rows = rows.apply(tf.data.experimental.assert_cardinality(n))
        count = n
    if shuffle and count > 1:
        rows = rows.shuffle(min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
    if isinstance(train_data, (tuple, list)):
        return rows.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return batch_like(rows, batch_size, train_data.element_spec).prefetch(tf.data.AUTOTUNE)


def compare_models(models: dict, test_data, *, print_fn=print) -> dict:
    """Before/after report: test accuracy and loss of models trained on cleaned data.

    Args:
        models: `{name: model}`, e.g. `{"noisy": before, "relabeled": after}`.
            Each model is evaluated with its own compiled loss on its outputs.
        test_data: `(x, y)` test arrays with integer class ids or one-hot labels.
        print_fn: Where the Markdown table goes (None: nowhere). Defaults to `print`.

    Returns:
        `{name: {"accuracy": float, "loss": float}}`; accuracy is the share of rows
        whose every label the model predicts (0/1 at ½ for sigmoid outputs), None
        for a loss that is not classification.
    """
    from keras_gex.losses import resolve_loss

    if not isinstance(models, dict) or not models:
        raise ValueError("Argument `models` must be a non-empty dict {name: model}.")
    x, y = as_inputs(test_data[0]), np.asarray(sole_label(test_data[1]))
    results = {}
    for name, model in models.items():
        outputs = np.asarray(sole_output(model(x, training=False)))
        loss = resolve_loss(model)
        labels = _labels_for(loss, y, outputs)
        value = float(np.mean(np.asarray(loss(labels, outputs))))
        accuracy = None
        if loss.is_classification:  # the members' fit test: every label of a row right
            accuracy = float(np.mean(np.asarray(loss.fit_mask(labels, outputs)), dtype=np.float64))
        results[name] = {"accuracy": accuracy, "loss": value}
    if print_fn is not None:
        lines = ["| model | test accuracy | test loss |", "|---|---:|---:|"]
        lines += [
            f"| {k} | {'—' if v['accuracy'] is None else format(v['accuracy'], '.4f')} "
            f"| {v['loss']:.4f} |"
            for k, v in results.items()
        ]
        print_fn("\n".join(lines))
    return results


def _labels_for(loss, y, outputs) -> np.ndarray:
    """`y` as the model's loss takes it: class ids for sparse cross-entropy, one-hot rows
    for categorical, a last axis for `(N,)` labels against `(N, 1)` outputs."""
    one_hot = y.ndim == outputs.ndim and y.shape[-1] == outputs.shape[-1] > 1
    if loss.kind == "sparse_categorical_crossentropy":
        return np.argmax(y, axis=-1) if one_hot else y
    if loss.kind == "categorical_crossentropy" and not one_hot:
        return np.eye(outputs.shape[-1], dtype=np.float32)[y.reshape(len(y)).astype(int)]
    return y[..., None] if lacks_output_axis(y.ndim, outputs.shape) else y
