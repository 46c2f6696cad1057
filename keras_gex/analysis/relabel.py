"""Acting on flagged examples: Kong et al.'s relabeling and distillation targets.

Kong, Shen & Huang (ICLR 2021), as used by GEX (paper eq. 16): for a flagged
example with given class m and predicted probabilities φ,

    ỹ_m = 0,   ỹ_k = log_{φ_k} (1 − φ_m)^{1/(K−1)} = log(1 − φ_m) / ((K − 1) log φ_k).

The target masks the given (suspect) label and spreads mass over the other
classes by how likely the model finds them; it satisfies
``−Σ_k ỹ_k log φ_k = −log(1 − φ_m)``. Each ỹ_k lies in [0, 1/(K−1)], so the
targets are **not normalised** (rows sum to at most 1; about 0.5 is typical).
Unflagged rows keep their one-hot label.

Everything is computed in float64 in the log domain, from logits when given:
with ``a_k = logsumexp_{j≠k} z_j − z_k``, ``log φ_k = −softplus(a_k)`` and
``log(1 − φ_m) = −softplus(−a_m)``, which stays exact where φ saturates to 1
in float32 (the naive formula then returns 1 for every class).
"""

from __future__ import annotations

import numpy as np

from keras_gex import _validation


def _as_class_labels(labels, num_classes: int) -> tuple[np.ndarray, bool]:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == num_classes:
        return np.argmax(arr, axis=1).astype(np.int64), True
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            "Argument `labels` must be integer class ids of shape (N,) or one-hot "
            f"of shape (N, {num_classes}). Received: shape {np.asarray(labels).shape}"
        )
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise ValueError("Argument `labels` must hold integer class ids.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"Argument `labels` has class ids outside [0, {num_classes}). "
            f"Received: min={arr.min()}, max={arr.max()}"
        )
    return arr, False


def _check_mask(noisy_mask, n: int) -> np.ndarray:
    mask = np.asarray(noisy_mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(
            f"Argument `noisy_mask` must be a boolean array of shape ({n},). "
            f"Received: dtype {mask.dtype}, shape {mask.shape}"
        )
    return mask


def _check_pred_probs(pred: np.ndarray, from_logits: bool) -> None:
    """Refuses non-finite values, and with `from_logits=False` rows that are not probabilities."""
    if not np.all(np.isfinite(pred)):
        bad = int(np.sum(~np.isfinite(pred)))
        what = "logits" if from_logits else "probabilities"
        raise ValueError(
            f"Argument `pred_probs` must hold finite {what}. Received: {bad} NaN or inf value(s)."
        )
    if from_logits:
        return
    problem = _validation.probability_problem(pred, rows_sum_to_one=True)
    if problem is not None:
        raise ValueError(
            "Argument `pred_probs` must hold probabilities: rows of values in [0, 1] summing "
            "to 1 (softmax outputs); pass `from_logits=True` for logits. "
            f"Received: {problem}."
        )


def _log_probs_and_a(pred, from_logits: bool):
    """Returns a_k = log((1 − φ_k) / φ_k) computed stably, shape (N, K)."""
    z = np.asarray(pred, dtype=np.float64)
    if not from_logits:
        z = np.log(np.maximum(z, 1e-300))  # log-probs act as logits
    k = z.shape[1]
    others = np.empty_like(z)
    for c in range(k):  # logsumexp over j != c, column by column (K is small)
        rest = np.delete(z, c, axis=1)
        top = rest.max(axis=1)
        others[:, c] = top + np.log(np.sum(np.exp(rest - top[:, None]), axis=1))
    return others - z


def _softplus(x):
    return np.logaddexp(0.0, x)


def relabel(labels, pred_probs, noisy_mask, *, from_logits: bool = False) -> np.ndarray:
    """Kong et al. soft targets for flagged rows, one-hot labels elsewhere.

    Args:
        labels: Given labels: integer ids `(N,)` or one-hot `(N, K)`.
        pred_probs: `(N, K)` predicted probabilities of θ*: finite, in [0, 1],
            each row summing to 1 within `1e-3` (softmax outputs); or logits
            with `from_logits=True`, which is more accurate.
        noisy_mask: Boolean `(N,)`, True for rows to relabel.
        from_logits: Whether `pred_probs` are logits. Defaults to `False`.

    Returns:
        `(N, K)` float64 targets. Flagged rows are not normalised (see module
        docstring); train on them with categorical cross-entropy.

    Raises:
        ValueError: If `pred_probs` holds NaN or inf, or with
            `from_logits=False` values outside [0, 1] or rows not summing to
            1 (e.g. logits passed as probabilities, or sigmoid outputs), or
            `labels` / `noisy_mask` do not fit it.

    >>> t = relabel([0], [[0.5, 0.3, 0.2]], np.array([True]))
    >>> float(t[0, 0]), bool(np.isclose(-(t[0] * np.log([0.5, 0.3, 0.2])).sum(), -np.log(0.5)))
    (0.0, True)
    """
    pred = np.asarray(pred_probs, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] < 2:
        raise ValueError(
            "Argument `pred_probs` must have shape (N, K) with K >= 2: one class "
            "distribution per example (per-position outputs, as a tagger's (N, T, K), are "
            f"not relabeled). Received: shape {pred.shape}"
        )
    _check_pred_probs(pred, from_logits)
    n, k = pred.shape
    y, _ = _as_class_labels(labels, k)
    if len(y) != n:
        raise ValueError(f"Arguments `labels` and `pred_probs` disagree on N: {len(y)} vs {n}.")
    mask = _check_mask(noisy_mask, n)
    targets = np.zeros((n, k), dtype=np.float64)
    targets[np.arange(n), y] = 1.0
    if not mask.any():
        return targets
    a = _log_probs_and_a(pred[mask], from_logits)
    rows = np.arange(a.shape[0])
    ym = y[mask]
    log_rest = -_softplus(-a[rows, ym])  # log(1 − φ_m), (F,)
    log_phi = -_softplus(a)  # log φ_k, (F, K)
    tiny = np.finfo(np.float64).tiny
    soft = log_rest[:, None] / ((k - 1) * np.minimum(log_phi, -tiny))
    soft = np.clip(soft, 0.0, 1.0 / (k - 1))
    soft[rows, ym] = 0.0
    targets[mask] = soft
    return targets


def distillation_targets(labels, pred_probs, noisy_mask) -> np.ndarray:
    """Replace flagged rows' labels by θ*'s predicted probabilities.

    The variant of GEX App. F.7 for sigmoid / multi-label losses, where Kong's
    function does not apply: flagged examples are trained towards the model's
    own (softer) predictions instead of their hard labels.

    Args:
        labels: `(N, K)` multi-hot (or one-hot) labels, or `(N,)` class ids;
            with one sigmoid output (`K = 1`), `(N,)` or `(N, 1)` 0/1 labels.
        pred_probs: `(N, K)` probabilities (sigmoid or softmax outputs).
        noisy_mask: Boolean `(N,)`.

    Returns:
        `(N, K)` float64 targets.

    >>> distillation_targets([[1, 0]], [[0.3, 0.6]], np.array([True])).tolist()
    [[0.3, 0.6]]
    >>> flagged = np.array([False, False, True])
    >>> distillation_targets([0, 1, 0], [[0.2], [0.9], [0.7]], flagged).tolist()  # one output
    [[0.0], [1.0], [0.7]]
    """
    pred = np.asarray(pred_probs, dtype=np.float64)
    if pred.ndim != 2:
        raise ValueError(
            f"Argument `pred_probs` must have shape (N, K). Received: shape {pred.shape}"
        )
    if np.any(pred < 0) or np.any(pred > 1) or not np.all(np.isfinite(pred)):
        raise ValueError("Argument `pred_probs` must hold probabilities in [0, 1].")
    n, k = pred.shape
    lab = np.asarray(labels)
    if lab.shape == (n, k) or (k == 1 and lab.shape == (n,)):
        # Labels of the outputs' shape; with one sigmoid output, `(N,)` 0/1
        # labels too (never class ids: a single output has no class 1).
        targets = lab.reshape(n, k).astype(np.float64).copy()
    elif lab.ndim == 1 or (lab.ndim == 2 and lab.shape[1] == 1):
        ids, _ = _as_class_labels(lab, k)
        targets = np.zeros((n, k))
        targets[np.arange(n), ids] = 1.0
    else:
        raise ValueError(
            f"Argument `labels` must have shape (N,) or ({n}, {k}). Received: {lab.shape}"
        )
    mask = _check_mask(noisy_mask, n)
    targets[mask] = pred[mask]
    return targets
