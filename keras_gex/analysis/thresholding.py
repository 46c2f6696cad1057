"""Cuts of a 1-D score distribution into a low and a high group (pure NumPy).

GEX scores are bimodal on noisy data: a mass of typical examples and a
separate mode of memorised (often mislabeled) examples. Otsu's method picks
the cut that maximises the between-class variance; the minimum-error cut
keeps Otsu's model of two equal-variance groups and weighs each by its share,
so that a small group of wrong labels is not cut into the large group's tail.
Both are computed exactly over the splits of the sorted values (no histogram
bins).
"""

from __future__ import annotations

import numbers

import numpy as np

from keras_gex import _validation

#: Transforms applied to scores before a cut is chosen (the cut is mapped back).
#: Self-influence is a mean of squared loss deviations, heavy-tailed to the right;
#: powers between 1 (raw, the paper's rule) and 0 (log) trade the raw cut's
#: conservatism (missed flips) against the log cut's looseness (false flags).
_TRANSFORMS = {
    "": lambda v: v,
    "_sqrt": np.sqrt,
    "_cbrt": np.cbrt,
    "_root4": lambda v: np.sqrt(np.sqrt(v)),
    "_log": lambda v: np.log(np.maximum(v, np.finfo(np.float64).tiny)),
}


#: Transforms defined on non-negative scores only (the member margin can be negative).
_NON_NEGATIVE = ("_sqrt", "_root4", "_log")

#: The top share of scores winsorised (set to the score at that quantile) before
#: Otsu's cut is chosen, so that a handful of extreme scores (a member confidently
#: wrong on a binary row, a squared residual of 30) cannot decide where the other
#: rows are split (docs/design.md#default-threshold).
TAIL_SHARE = 0.01


def _between_class_variance(v: np.ndarray) -> np.ndarray:
    """Between-class variance of every split of sorted `v` after its first k values."""
    n = v.size
    csum = np.cumsum(v)
    k = np.arange(1, n, dtype=np.float64)
    mean_low = csum[:-1] / k
    mean_high = (csum[-1] - csum[:-1]) / (n - k)
    between = (k / n) * (1.0 - k / n) * (mean_low - mean_high) ** 2
    between[v[:-1] == v[1:]] = -np.inf  # a cut must separate distinct values
    return between


def otsu_threshold(values) -> float:
    """Exact Otsu threshold: values strictly above it form the upper class.

    Args:
        values: 1-D array-like of finite numbers.

    Returns:
        The largest value of the lower class (a float). If all values are
        equal, that value (so nothing is above it).

    >>> otsu_threshold([0.1, 0.2, 0.15, 5.0, 5.2, 4.9])
    0.2
    >>> otsu_threshold([3.0, 3.0])
    3.0
    """
    v = np.sort(_validation.finite_1d("values", values))
    if v[0] == v[-1]:
        return float(v[0])
    return float(v[int(np.argmax(_between_class_variance(v)))])


def min_error_threshold(values) -> float:
    """The minimum-error cut of two equal-variance groups, each weighed by its share.

    Otsu's cut lies midway between the means of the two groups it makes: the
    cut between two equal-variance Gaussian groups that are equally likely.
    Where one group is small (a few percent of wrong labels), that midpoint
    lies in the large group's tail and flags many of its rows. This cut keeps
    the model and weighs each group by its share `w`: from Otsu's split, it
    moves to `(m0 + m1) / 2 + σ² ln(w0 / w1) / (m1 − m0)`, where an example
    is as likely in either group (`σ²` the pooled variance within the groups),
    and again from the split that makes, until the split holds.

    Args:
        values: 1-D array-like of finite numbers.

    Returns:
        The largest value of the lower group (a float); the largest value
        where the cut passes every value (no group of high values), and that
        value if all are equal.

    >>> large = np.round(-np.log(1 - np.linspace(0.0, 0.97, 194)), 2)  # a long tail
    >>> scores = np.r_[large, 6.0, 6.5, 7.0]
    >>> int(np.sum(scores > otsu_threshold(scores)))  # cuts into the large group's tail
    37
    >>> min_error_threshold(scores)  # keeps it whole: the 3 high scores above
    3.51
    >>> min_error_threshold([3.0, 3.0])
    3.0
    """
    v = np.sort(_validation.finite_1d("values", values))
    if v[0] == v[-1]:
        return float(v[0])
    n = v.size
    csum, csq = np.cumsum(v), np.cumsum(v * v)
    k = int(np.argmax(_between_class_variance(v))) + 1  # values in the lower group
    seen = set()
    while 0 < k < n and k not in seen:
        seen.add(k)
        m0, m1 = csum[k - 1] / k, (csum[-1] - csum[k - 1]) / (n - k)
        within = (csq[-1] - k * m0 * m0 - (n - k) * m1 * m1) / n
        cut = (m0 + m1) / 2 + within * np.log(k / (n - k)) / (m1 - m0)
        k = int(np.searchsorted(v, cut, side="right"))
    return float(v[min(max(k, 1), n) - 1])


#: Named threshold methods: the cut rule and the transform it is chosen on.
#: `detect_noisy` cuts the members' mean loss (which also counts the rows its
#: default margin flags) with "min_error" and self-influence with "otsu_sqrt";
#: `benchmarks/quality.py`
#: and `benchmarks/zoo.py --scores-dir` measure the F1 of each.
METHODS = {
    f"{name}{suffix}": (cut, transform)
    for name, cut in (("otsu", otsu_threshold), ("min_error", min_error_threshold))
    for suffix, transform in _TRANSFORMS.items()
}


def otsu_separability(values) -> float:
    """Otsu's separability η: the share of the variance between the two classes.

    The between-class variance at Otsu's threshold over the total variance,
    in [0, 1]: 1 when the values form two tight groups, lower the more they
    overlap or form one group. Higher is a cleaner split. It needs no labels
    of which examples are wrong, and on GEX scores it tracks detection
    quality across ensembles of one model (docs/design.md#otsu-separability).
    Its absolute value is not comparable across models: compare it between
    ensembles of one model.

    Args:
        values: 1-D array-like of finite numbers.

    Returns:
        η as a float; 0.0 if all values are equal.

    >>> otsu_separability([0.1, 0.2, 0.15, 5.0, 5.2, 4.9]) > 0.99
    True
    >>> round(otsu_separability([1.0, 2.0, 3.0, 4.0]), 3)
    0.8
    >>> otsu_separability([3.0, 3.0])
    0.0
    """
    v = np.sort(_validation.finite_1d("values", values))
    if v[0] == v[-1]:
        return 0.0
    return float(np.max(_between_class_variance(v)) / np.var(v))


def capped_threshold(scores, cut: float, count: int) -> float:
    """`cut`, raised where needed so that at most `count` scores lie above it.

    >>> capped_threshold([0.1, 0.9, 0.5, 0.7], 0.2, 2)  # 3 above 0.2: keep the top 2
    0.5
    >>> capped_threshold([0.1, 0.9, 0.5, 0.7], 0.6, 2)  # 2 above 0.6 already
    0.6
    >>> capped_threshold([0.1, 0.9], 0.0, 0)
    0.9
    """
    if count < 0:
        raise ValueError(f"Argument `count` must be >= 0. Received: count={count}")
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if count >= values.size:
        return float(cut)
    return float(max(cut, values[count]))


def threshold_scores(scores: np.ndarray, method, max_flagged: int | None = None) -> float:
    """Threshold for `scores` by `method` (a name in `METHODS` or a number).

    A named method chooses its cut (Otsu's or the minimum-error cut) on the
    transformed scores with the top `TAIL_SHARE` winsorised; every score above
    the cut is flagged, those top scores included. With `max_flagged`, a named
    method's cut is raised until at most that many scores lie above it
    (`capped_threshold`); a number is the caller's cut and is kept.

    >>> scores = np.r_[np.linspace(0.0, 0.2, 90), np.linspace(2.0, 3.0, 9), 60.0]
    >>> threshold_scores(scores, "otsu") == 0.2  # the 10 high scores, not just 60
    True
    >>> int(np.sum(scores > threshold_scores(scores, "otsu", max_flagged=4)))
    4
    """
    if isinstance(method, str) and max_flagged is not None:
        return capped_threshold(scores, threshold_scores(scores, method), max_flagged)
    if isinstance(method, str):
        _validation.one_of("threshold", method, METHODS)
        choose, transform = METHODS[method]
        values = np.asarray(scores, dtype=np.float64)
        if method.endswith(_NON_NEGATIVE) and values.size and np.min(values) < 0:
            raise ValueError(
                f"Argument `threshold={method!r}` cuts a root or log of the scores, and "
                f"{int(np.sum(values < 0))} scores are below zero (min {np.min(values):.4g}). "
                "Use a rule without a transform or with '_cbrt'; on a member-margin report, "
                "`report.with_threshold(...)` counts the flagged rows on the member loss."
            )
        transformed = transform(values)
        # Every transform is monotone: winsorising after it cuts the same values.
        cap = transform(np.quantile(values, 1.0 - TAIL_SHARE))
        cut = choose(np.minimum(transformed, cap))
        # Map back: the largest original score whose transform is <= cut.
        below = scores[transformed <= cut]
        return float(below.max()) if below.size else float(np.min(scores))
    if isinstance(method, bool) or not isinstance(method, numbers.Real) or not np.isfinite(method):
        raise ValueError(
            f"Argument `threshold` must be one of {sorted(METHODS)} or a finite "
            f"number. Received: threshold={method!r}"
        )
    return float(method)
