"""What `detect_noisy` ranks by, and how many rows a named threshold flags (pure NumPy).

Every score is a mean over members of per-member terms (`score_terms`), so the
bootstrap of `NoisyLabelReport.uncertainty` resamples the same terms the
scores average.
"""

from __future__ import annotations

import numpy as np

from keras_gex.analysis.thresholding import capped_threshold, threshold_scores
from keras_gex.losses import class_ids

#: What `detect_noisy(score=...)` ranks by; its "auto" picks the margin where
#: `exclusive_classes` holds, else the member loss.
SCORES = ("member_margin", "member_loss", "self_influence")

#: The named rule `threshold="auto"` uses for each score: the minimum-error cut
#: for a loss (wrong labels are a small group, and Otsu's cut falls into the
#: correct labels' tail where they are few), Otsu on the square root for
#: self-influence (docs/design.md#default-threshold).
DEFAULT_THRESHOLDS = {
    "member_margin": "min_error",
    "member_loss": "min_error",
    "self_influence": "otsu_sqrt",
}

#: How much the loss of the likeliest other class counts against the given
#: label's in "member_margin". At 0 the score is the member loss, and a hard
#: correct row that the members find unlikely under every class ranks with a
#: wrong label (the zoo's 60-class `many-classes`: AP 0.509 against a bar of
#: 0.542). At 1 a second class the members half believe (a look-alike)
#: lowers a wrong label's score as much as a likely one (quality.py's
#: Fashion-MNIST CNN at 10% flips loses 1.5 seed std of AP). Every bar of the
#: zoo and of quality.py held at 0.25, 0.5 and 0.75; ½ is the middle
#: (docs/design.md#the-member-margin).
OTHER_CLASS_WEIGHT = 0.5


def exclusive_classes(kind: str, labels) -> bool:
    """Whether each row's label is one of mutually exclusive classes.

    True for sparse ids of one class per row, one-hot rows and one sigmoid
    output (two classes); False for a regression, multi-label sigmoid outputs,
    labels per position and no rows, where no row has one "other class".

    >>> exclusive_classes("sparse_categorical_crossentropy", np.zeros((4, 1)))
    True
    >>> exclusive_classes("binary_crossentropy", np.zeros((4, 3)))  # three labels per row
    False
    >>> exclusive_classes("mean_squared_error", np.zeros(4))
    False
    """
    labels = np.asarray(labels)
    if kind == "categorical_crossentropy":
        return labels.ndim == 2
    if kind in ("sparse_categorical_crossentropy", "binary_crossentropy"):
        return labels.ndim >= 1 and len(labels) > 0 and labels[0].size == 1
    return False


def other_class_log_probs(kind: str, labels, probabilities) -> np.ndarray:
    """`(N,)` float64 log of the likeliest class other than the given label.

    Args:
        kind: The loss kind (`exclusive_classes` must hold for `labels`).
        labels: The given labels, as the loss takes them.
        probabilities: `(N, K)` class probabilities (the members' mean
            prediction); `(N, 1)` for one sigmoid output, read as the two
            classes `(1 − p, p)`.

    >>> other_class_log_probs("sparse_categorical_crossentropy", [0, 2],
    ...                       [[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]).round(3).tolist()
    [-0.916, -1.609]
    >>> np.exp(other_class_log_probs("binary_crossentropy", [[1.0]], [[0.9]])).round(3).tolist()
    [0.1]
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1)
    if kind == "binary_crossentropy":
        p = np.concatenate([1.0 - p, p], axis=1)
    given = class_ids(kind, labels).reshape(len(p))
    others = p.copy()
    others[np.arange(len(p)), given] = -np.inf
    # The smallest positive float: a class the members rule out is a finite, low score.
    return np.log(np.maximum(others.max(axis=1), np.finfo(np.float64).tiny))


def score_terms(score: str, deviations, member_losses, other_log_probs=None) -> np.ndarray:
    """`(N, M)` float64 per-member terms of a score; their member mean is the score.

    "self_influence": Δ(z, m)²; "member_loss": ℓ(z, θ_m); "member_margin":
    ℓ(z, θ_m) + `OTHER_CLASS_WEIGHT` · log max_{k≠y} p̄_k(z), the given label's
    loss less a weighted loss of the likeliest other class under the members'
    mean prediction p̄ (`other_class_log_probs`).

    >>> score_terms("member_margin", None, [[2.0, 4.0]], np.log([0.25])).tolist()
    [[1.3068528194400546, 3.3068528194400546]]
    """
    if score == "self_influence":
        return np.square(np.asarray(deviations, dtype=np.float64))
    terms = np.asarray(member_losses, dtype=np.float64)
    if score == "member_margin":
        terms = terms + OTHER_CLASS_WEIGHT * np.asarray(other_log_probs)[:, None]
    return terms


def top_cut(scores, count: int) -> float:
    """The cut on `scores` above which lie their `count` largest (fewer where tied).

    >>> top_cut([0.1, 0.9, 0.5, 0.7], 2)
    0.5
    >>> top_cut([0.1, 0.9], 2) < 0.1  # all of them
    True
    """
    values = np.asarray(scores, dtype=np.float64)
    if count >= values.size:
        return float(np.nextafter(values.min(), -np.inf)) if values.size else 0.0
    return capped_threshold(values, -np.inf, count)


def cut_scores(scores, method, *, max_flagged=None, count_scores=None) -> float:
    """The threshold on `scores` by `method` (a named rule or a number).

    With `count_scores` (the member loss, for "member_margin") a named rule
    cuts those, capped at `max_flagged`, and the cut on `scores` flags as many
    rows from the top: the member loss says how many labels are wrong, the
    margin which (docs/design.md#default-threshold). A number cuts `scores`.

    >>> loss = np.r_[np.zeros(8), 5.0, 6.0]  # two high member losses
    >>> margin = np.r_[np.zeros(7), 9.0, 5.0, 1.0]  # the margin ranks another row first
    >>> np.flatnonzero(margin > cut_scores(margin, "otsu", count_scores=loss)).tolist()
    [7, 8]
    """
    if count_scores is None or not isinstance(method, str):
        return threshold_scores(scores, method, max_flagged=max_flagged)
    count_scores = np.asarray(count_scores)
    count = int(np.sum(count_scores > threshold_scores(count_scores, method, max_flagged)))
    return top_cut(scores, count)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "OTHER_CLASS_WEIGHT",
    "SCORES",
    "cut_scores",
    "exclusive_classes",
    "other_class_log_probs",
    "score_terms",
    "top_cut",
]
