"""Dataset pruning (paper §5.3): drop the least self-influential examples first.

Low GEX self-influence marks examples the model fits whatever the perturbation:
typical, redundant examples whose removal costs little accuracy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.data import as_inputs, batch_like, num_rows, standardize_data


@dataclasses.dataclass
class PruneResult:
    """Which examples to keep.

    Attributes:
        kept_indices: Indices of kept examples, in dataset order.
        pruned_indices: Indices of pruned examples, lowest score first.
        scores: The self-influence used (higher = kept first).
    """

    kept_indices: np.ndarray
    pruned_indices: np.ndarray
    scores: np.ndarray

    @property
    def keep_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.scores), dtype=bool)
        mask[self.kept_indices] = True
        return mask

    def apply(self, data, *, batch_size: int | None = None):
        """The kept examples of `data` (the data that was scored).

        Args:
            data: `(x, y)` arrays, or a `tf.data.Dataset` of `(x, y)` batches.
            batch_size: Batch size of the returned dataset (datasets only).
                Defaults to `None` (the first batch's size).

        Returns:
            `(x_kept, y_kept)` arrays for array input; a batched
            `tf.data.Dataset` of the kept examples for dataset input.
        """
        return select(data, self.keep_mask, batch_size=batch_size)


def select(data, mask: np.ndarray, *, batch_size: int | None = None):
    """Rows of `data` where `mask` is True (arrays or a batched dataset)."""
    mask = np.asarray(mask, dtype=bool)
    data = standardize_data(data)
    if isinstance(data, (tuple, list)):
        x, y = as_inputs(data[0]), data[1]
        y = {k: np.asarray(v) for k, v in y.items()} if isinstance(y, dict) else np.asarray(y)
        if num_rows(x) != len(mask):
            raise ValueError(f"The data has {num_rows(x)} examples but the mask has {len(mask)}.")
        return tf.nest.map_structure(lambda a: a[mask], (x, y))
    if not isinstance(data, tf.data.Dataset):
        raise TypeError(
            "Argument `data` must be a tuple `(x, y)`, a `tf.data.Dataset` or a "
            f"`keras.utils.PyDataset`. Received: {type(data).__name__}"
        )
    if batch_size is None:
        for x, _ in data.take(1):
            batch_size = int(tf.shape(tf.nest.flatten(x)[0])[0])
    keep = tf.constant(mask)
    rows = data.unbatch().enumerate()
    rows = rows.filter(lambda i, example: tf.gather(keep, tf.minimum(i, len(mask) - 1)))
    rows = rows.map(lambda i, example: example)
    # `filter` forgets the size; Keras progress bars and `steps_per_epoch` want it.
    rows = rows.apply(tf.data.experimental.assert_cardinality(int(mask.sum())))
    return batch_like(rows, batch_size, data.element_spec)


def prune(train_data, ensemble_or_scores, *, fraction: float, verbose="auto") -> PruneResult:
    """Prunes `fraction` of the training set, lowest self-influence first.

    Args:
        train_data: The training `(x, y)` arrays or dataset, in scoring order.
        ensemble_or_scores: A `GeometricEnsemble` (scores are computed), or
            precomputed `(N,)` self-influence scores.
        fraction: Fraction of examples to remove, in [0, 1).
        verbose: 0, or 1 / "auto". Defaults to `"auto"`.

    Returns:
        A `PruneResult`; `result.apply(train_data)` gives the kept data.

    >>> r = prune((np.zeros((4, 1)), np.zeros(4)), np.array([3.0, 1.0, 4.0, 2.0]), fraction=0.5)
    >>> r.kept_indices.tolist(), r.pruned_indices.tolist()
    ([0, 2], [1, 3])
    """
    fraction = _validation.fraction("fraction", fraction)
    if isinstance(ensemble_or_scores, np.ndarray | list):
        scores = _validation.finite_1d("scores", ensemble_or_scores)
    else:
        scores = ensemble_or_scores.self_influence(train_data, verbose=verbose)
    n = len(scores)
    n_prune = round(fraction * n)
    order = np.argsort(scores, kind="stable")
    pruned = order[:n_prune]
    kept = np.sort(order[n_prune:])
    return PruneResult(kept, pruned, scores)
