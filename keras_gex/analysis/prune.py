"""Dataset pruning (paper §5.3): drop the least self-influential examples first.

Low GEX self-influence marks examples the model fits whatever the perturbation:
typical, redundant examples whose removal costs little accuracy. One ranking
over all rows prunes easy classes first; `per_class=True` prunes the same share
of every class instead. Neither is better on every data set
(docs/benchmarks.md#pruningpy): on digits half the rows pruned by one ranking
kept 4 of 140 sevens, on Fashion-MNIST the hard classes' typical rows mattered more.
So `prune` counts what each class kept (`PruneResult.kept_per_class()`) and says
which class kept the smallest share.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.data import (
    DataSource,
    as_inputs,
    batch_like,
    num_rows,
    sole_label,
    standardize_data,
)
from keras_gex.losses import class_ids


@dataclasses.dataclass
class PruneResult:
    """Which examples to keep.

    Attributes:
        kept_indices: Indices of kept examples, in dataset order.
        pruned_indices: Indices of pruned examples, lowest score first.
        scores: The self-influence used (higher = kept first).
        classes: `(N,)` class id of every example, or None where the labels
            are not one class per row (regression targets, several labels
            per row).
    """

    kept_indices: np.ndarray
    pruned_indices: np.ndarray
    scores: np.ndarray
    classes: np.ndarray | None = None

    def kept_per_class(self) -> dict:
        """`{class id: (kept, total)}`, in class order: what pruning left of each class.

        One ranking over all rows can leave an easy class a handful of rows;
        look here before training on the kept rows.

        >>> r = PruneResult(np.array([0, 2]), np.array([1, 3]), np.zeros(4), np.array([0, 0, 1, 1]))
        >>> r.kept_per_class()
        {0: (1, 2), 1: (1, 2)}
        """
        if self.classes is None:
            raise ValueError(
                "These labels are not one class per row (regression targets or several "
                "labels per row), so there are no classes to count."
            )
        labels, totals = np.unique(self.classes, return_counts=True)
        kept = np.unique(self.classes[self.kept_indices], return_counts=True)
        kept = dict(zip(kept[0].tolist(), kept[1].tolist()))
        return {c: (kept.get(c, 0), int(t)) for c, t in zip(labels.tolist(), totals)}

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


def prune(
    train_data, ensemble_or_scores, *, fraction: float, per_class: bool = False, verbose="auto"
) -> PruneResult:
    """Prunes `fraction` of the training set, lowest self-influence first.

    Args:
        train_data: The training `(x, y)` arrays or dataset, in scoring order.
        ensemble_or_scores: A `GeometricEnsemble` (scores are computed), or
            precomputed `(N,)` self-influence scores.
        fraction: Fraction of examples to remove, in [0, 1).
        per_class: Prune `fraction` of each class, lowest scores first within
            it, instead of the lowest scores of all rows (the paper's rule).
            Scores rank examples within a class, not across classes: one
            ranking can leave an easy class a handful of rows (on digits, half
            pruned kept 4-5 rows of three classes and lost 4 points of test
            accuracy against pruning per class); per class, the hard classes
            lose their typical rows (on Fashion-MNIST, 2.5 points lost at half
            pruned). Needs one class per row: the ensemble's classification
            loss, or for bare scores whole-number labels or rows that sum to 1
            (one-hot). Defaults to `False`.
        verbose: 0 for silence; 1 / "auto" shows a progress bar while an
            ensemble scores the data and prints one line: the rows pruned and,
            where the labels are one class per row, the class with the
            smallest share kept (`PruneResult.kept_per_class()` has them all).
            Defaults to `"auto"`.

    Returns:
        A `PruneResult`; `result.apply(train_data)` gives the kept data.

    >>> data = (np.zeros((4, 1)), np.array([0, 0, 1, 1]))
    >>> r = prune(data, np.array([3.0, 1.0, 4.0, 2.0]), fraction=0.5)
    [keras_gex] pruned 2 of 4 rows (50%); smallest share kept: class 0, 1 of 2 rows (50%)
    >>> r.kept_indices.tolist(), r.pruned_indices.tolist()
    ([0, 2], [1, 3])
    >>> scores = np.array([1.0, 2.0, 3.0, 4.0])
    >>> r = prune(data, scores, fraction=0.5, verbose=0)  # class 1 alone is kept
    >>> r.kept_indices.tolist(), r.kept_per_class()
    ([2, 3], {0: (0, 2), 1: (2, 2)})
    >>> prune(data, scores, fraction=0.5, per_class=True, verbose=0).kept_indices.tolist()
    [1, 3]
    """
    fraction = _validation.fraction("fraction", fraction)
    if not isinstance(per_class, bool | np.bool_):
        raise ValueError(
            f"Argument `per_class` must be True or False. Received: per_class={per_class!r}"
        )
    verbose = _validation.verbose_level(verbose)
    ensemble = None
    if isinstance(ensemble_or_scores, np.ndarray | list):
        scores = _validation.finite_1d("scores", ensemble_or_scores)
    else:
        ensemble = ensemble_or_scores
    kind = None if ensemble is None else ensemble.loss.kind
    labels = classes = None
    if per_class or ensemble is None:
        # Read first, so that labels without classes are refused before any scoring.
        labels = _labels(train_data)
        classes = None if labels is None else _one_class_per_row(labels, kind)
        if per_class and classes is None:
            raise ValueError(
                "Argument `per_class=True` needs one class per row; these labels are "
                "regression targets or several labels per row. Pass `per_class=False`."
            )
    if ensemble is not None:
        scored = ensemble.deviations(train_data, verbose=verbose)
        scores = scored.self_influence
        if labels is None:  # the scoring pass read them: no second pass over the data
            labels = scored.labels
            classes = _one_class_per_row(labels, kind)
    if labels is not None and len(labels) != len(scores):
        raise ValueError(f"The data has {len(labels)} examples but the scores have {len(scores)}.")
    pruned = _compute_pruned(scores, fraction, classes if per_class else None)
    keep = np.ones(len(scores), dtype=bool)
    keep[pruned] = False
    result = PruneResult(np.flatnonzero(keep), pruned, scores, classes)
    if verbose:
        print(f"[keras_gex] {_summary(result)}", flush=True)
    return result


def _summary(result: PruneResult) -> str:
    """One line: how many rows were pruned, and the class with the smallest share kept.

    >>> r = PruneResult(np.array([0, 1, 2]), np.array([3]), np.zeros(4), np.array([0, 0, 1, 1]))
    >>> _summary(r)
    'pruned 1 of 4 rows (25%); smallest share kept: class 1, 1 of 2 rows (50%)'
    """
    n = len(result.scores)
    text = f"pruned {len(result.pruned_indices)} of {n} rows ({len(result.pruned_indices) / n:.0%})"
    if result.classes is None:
        return text
    counts = result.kept_per_class()
    label, (kept, total) = min(counts.items(), key=lambda item: item[1][0] / item[1][1])
    return (
        f"{text}; smallest share kept: class {label}, {kept} of {total} rows ({kept / total:.0%})"
    )


def _labels(train_data) -> np.ndarray | None:
    """The labels of `train_data` (arrays, a dataset or a `PyDataset`), one row per
    example; None for labels of several named outputs."""
    data = standardize_data(train_data)
    if isinstance(data, tuple | list) and len(data) == 2:
        batches = [sole_label(data[1])]
    else:
        batches = [sole_label(y) for _, y in DataSource(train_data, name="train_data").ordered()]
    if batches and isinstance(batches[0], dict):
        return None  # several named outputs: not one label per row
    if len(batches) == 1:
        return np.asarray(batches[0])  # arrays: no copy
    return np.concatenate([np.asarray(y) for y in batches])


def _one_class_per_row(labels: np.ndarray, kind: str | None) -> np.ndarray | None:
    """`(N,)` class ids where `labels` name one class per row, else None.

    `kind` is the loss kind of the ensemble (None for bare scores).

    >>> _one_class_per_row(np.array([[0.0, 1.0], [1.0, 0.0]]), None).tolist()
    [1, 0]
    >>> _one_class_per_row(np.array([2.0, 0.0]), None).tolist()  # ids as floats
    [2, 0]
    >>> _one_class_per_row(np.array([0.3, 1.7]), None) is None  # regression targets
    True
    >>> _one_class_per_row(np.array([[1, 0, 1]]), "binary_crossentropy") is None  # multi-label
    True
    >>> _one_class_per_row(np.array(["cat", "dog"]), None) is None
    True
    """
    n = len(labels)
    if labels.dtype.kind not in "biuf":  # names or other objects: not read as classes
        return None
    if kind is not None:
        try:
            ids = class_ids(kind, labels)
        except ValueError:  # not a classification loss
            return None
        return ids.reshape(n) if ids.shape[1:] == (1,) else None
    rows = labels.reshape(n, -1)
    if rows.shape[1] == 1:
        values = rows[:, 0]
        if values.dtype.kind in "biu" or np.all(values == np.round(values)):
            return values.astype(np.int64)  # class ids, as `fit` takes them as floats too
        return None
    if labels.ndim == 2 and np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0):
        return np.argmax(rows, axis=1)
    return None


def _compute_pruned(scores: np.ndarray, fraction: float, classes) -> np.ndarray:
    """Indices to prune, lowest score first: `round(fraction · N)` of them, split over
    `classes` in proportion to their sizes (largest remainders) where given.

    >>> scores, classes = np.array([5.0, 1.0, 2.0, 6.0, 7.0]), np.array([0, 0, 0, 1, 1])
    >>> _compute_pruned(scores, 0.4, None).tolist(), _compute_pruned(scores, 0.4, classes).tolist()
    ([1, 2], [1, 3])
    """
    n_prune = round(fraction * len(scores))
    order = np.argsort(scores, kind="stable")
    if classes is None:
        return order[:n_prune]
    labels, sizes = np.unique(classes, return_counts=True)
    quotas = fraction * sizes
    counts = np.floor(quotas).astype(int)
    remainder = n_prune - counts.sum()
    counts[np.argsort(-(quotas - counts), kind="stable")[:remainder]] += 1
    ranked = classes[order]
    pruned = [order[ranked == label][:count] for label, count in zip(labels, counts)]
    return order[np.isin(order, np.concatenate(pruned))]
