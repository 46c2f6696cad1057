"""Small real data sets with known label noise, available offline.

`noisy_digits` loads scikit-learn's bundled 8×8 digits (1,797 images, no
download), splits them, and flips a seeded fraction of the training labels to
a different class, returning which rows were flipped so detection quality can
be measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_gex import _validation


@dataclasses.dataclass
class NoisyDataset:
    """A train/test split with seeded label noise on the training part.

    Attributes:
        x_train: Training inputs, float32.
        y_train: Training labels after flipping (int64).
        y_train_clean: Original training labels.
        is_noisy: Bool mask of flipped training rows.
        x_test: Test inputs.
        y_test: Clean test labels.
        num_classes: Number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_clean: np.ndarray
    is_noisy: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def flip_labels(
    labels: np.ndarray, noise: float, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flips `noise` of `labels` to a uniformly drawn *different* class.

    >>> y, mask = flip_labels(np.arange(10) % 2, 0.2, 2, seed=0)
    >>> int(mask.sum()), bool(np.all(y[mask] != (np.arange(10) % 2)[mask]))
    (2, True)
    """
    noise = _validation.fraction("noise", noise)
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_flip = round(noise * len(labels))
    idx = rng.choice(len(labels), size=n_flip, replace=False)
    shift = rng.integers(1, num_classes, size=n_flip)
    noisy = labels.copy()
    noisy[idx] = (labels[idx] + shift) % num_classes
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx] = True
    return noisy, mask


def noisy_digits(
    noise: float = 0.1, seed: int = 0, test_fraction: float = 0.25, image: bool = False
) -> NoisyDataset:
    """scikit-learn's digits with `noise` of the training labels flipped.

    Args:
        noise: Fraction of training labels flipped. Defaults to `0.1`.
        seed: Seed of the split and of the flips. Defaults to `0`.
        test_fraction: Fraction held out as a clean test set. Defaults to `0.25`.
        image: Return inputs as `(8, 8, 1)` images instead of 64-vectors.
            Defaults to `False`.

    Returns:
        A `NoisyDataset` with pixel values scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    test_fraction = _validation.fraction("test_fraction", test_fraction, inclusive_low=False)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    y_noisy, mask = flip_labels(y[train], noise, 10, seed=seed + 1)
    if image:
        x = x.reshape(-1, 8, 8, 1)
    return NoisyDataset(x[train], y_noisy, y[train], mask, x[test], y[test], 10)
