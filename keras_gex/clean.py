"""Acting on a noisy-label report: a cleaned dataset ready for `model.fit`."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.prune import select


def clean(train_data, report, *, action: str = "relabel", batch_size: int | None = None):
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

    Returns:
        A batched `tf.data.Dataset` of `(x, target)` ("relabel") or of the kept
        `(x, y)` ("drop").
    """
    _validation.one_of("action", action, ("relabel", "drop"))
    if batch_size is not None:
        batch_size = _validation.positive_int("batch_size", batch_size)
    n = len(report.scores)
    if action == "drop":
        kept = select(train_data, ~report.noisy_mask, batch_size=batch_size)
        if isinstance(kept, tuple):
            return tf.data.Dataset.from_tensor_slices(kept).batch(batch_size or 256)
        return kept
    targets = report.relabeled_targets().astype(np.float32)
    if isinstance(train_data, (tuple, list)):
        x = np.asarray(train_data[0])
        if len(x) != n:
            raise ValueError(f"The data has {len(x)} examples but the report scored {n}.")
        return tf.data.Dataset.from_tensor_slices((x, targets)).batch(batch_size or 256)
    if batch_size is None:
        for x, _ in train_data.take(1):
            batch_size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    table = tf.constant(targets)
    rows = train_data.unbatch().enumerate()
    return rows.map(lambda i, example: (example[0], tf.gather(table, i))).batch(batch_size)
