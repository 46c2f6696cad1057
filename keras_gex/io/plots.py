"""Plots a user looks at: the score histogram with its threshold."""

from __future__ import annotations

import numpy as np

#: How each score (`NoisyLabelReport.score_method`) is named on plots and pages:
#: (name, formula).
SCORE_LABELS = {
    "member_margin": ("GE member margin", "mean_m ℓ(z,θ_m) + ½ log max_{k≠y} p̄_k"),
    "member_loss": ("GE members' mean loss", "mean_m ℓ(z,θ_m)"),
    "self_influence": ("GEX self-influence", "mean_m (ℓ(z,θ_m) − ℓ(z,θ*))²"),
}


def plot_self_influence(
    scores,
    threshold: float | None = None,
    *,
    noisy_mask=None,
    known_noisy=None,
    log_x: bool = True,
    bins: int = 60,
    ax=None,
    title: str | None = None,
    xlabel: str | None = None,
    score: str = "self_influence",
):
    """Histogram of scores (self-influence by default), flagged/kept, with the threshold.

    Args:
        scores: `(N,)` scores, higher = more suspect (e.g. self-influence).
        threshold: Vertical line position. Defaults to `None`.
        noisy_mask: Flagged rows; drawn in a second colour. Defaults to `None`.
        known_noisy: Ground-truth noisy rows (when known); drawn as an outline.
            Defaults to `None`.
        log_x: Log-spaced bins and axis (scores span decades). Defaults to `True`.
        bins: Number of bins. Defaults to `60`.
        ax: A matplotlib axes to draw on. Defaults to `None` (new figure).
        title: Axes title. Defaults to `None` (the name of `score`).
        xlabel: Score axis label. Defaults to `None` (name and formula of `score`).
        score: Which score `scores` are, a key of `SCORE_LABELS`; it names the
            axes. Defaults to `"self_influence"`.

    Returns:
        The matplotlib `Figure`.
    """
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    s = np.asarray(scores, dtype=np.float64)
    if log_x and s.size and s.min() < 0:  # a margin below zero has no place on a log axis
        log_x = False
    if log_x:
        positive = s[s > 0]
        low = positive.min() if positive.size else 1e-12
        high = max(s.max(), low * 10)
        edges = np.geomspace(low, high, bins + 1)
        s_plot = np.maximum(s, low)
        ax.set_xscale("log")
    else:
        edges = np.linspace(s.min(), s.max() if s.max() > s.min() else s.min() + 1, bins + 1)
        s_plot = s
    if noisy_mask is not None:
        mask = np.asarray(noisy_mask, dtype=bool)
        ax.hist(
            [s_plot[~mask], s_plot[mask]],
            bins=edges,
            stacked=True,
            color=["tab:blue", "tab:red"],
            label=[f"kept ({int((~mask).sum())})", f"flagged ({int(mask.sum())})"],
        )
    else:
        ax.hist(s_plot, bins=edges, color="tab:blue", label="examples")
    if known_noisy is not None:
        truth = np.asarray(known_noisy, dtype=bool)
        ax.hist(
            s_plot[truth],
            bins=edges,
            histtype="step",
            color="black",
            linewidth=1.5,
            label=f"known noisy ({int(truth.sum())})",
        )
    if threshold is not None:
        ax.axvline(max(threshold, edges[0]), color="black", linestyle="--", label="threshold")
    name, formula = SCORE_LABELS[score]
    ax.set_xlabel(xlabel or f"{name}  {formula}")
    ax.set_ylabel("examples")
    ax.set_title(title or name)
    ax.legend()
    fig.tight_layout()
    return fig


def _as_images(images, image_shape):
    arr = np.asarray(images)
    if image_shape is not None:
        arr = arr.reshape((len(arr), *image_shape))
    if arr.ndim == 2:  # flat vectors: try a square
        side = round(float(np.sqrt(arr.shape[1])))
        if side * side != arr.shape[1]:
            raise ValueError(
                f"Cannot display flat inputs of size {arr.shape[1]} as images; pass `image_shape=`."
            )
        arr = arr.reshape(len(arr), side, side)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _name(label, class_names):
    if label is None:
        return "?"
    label = int(label)
    return class_names[label] if class_names is not None else str(label)


def plot_gallery(
    images,
    scores,
    labels=None,
    predicted=None,
    *,
    k: int = 16,
    most: bool = True,
    class_names=None,
    image_shape=None,
    cols: int = 8,
    title: str | None = None,
    score: str = "self_influence",
):
    """The `k` images with the highest (or lowest) scores, with given/predicted labels.

    Args:
        images: `(N, H, W[, C])` images, or flat `(N, D)` with `image_shape`.
        scores: `(N,)` scores; the gallery is sorted by them.
        labels: `(N,)` given labels (class ids). Defaults to `None`.
        predicted: `(N,)` predicted class ids. Defaults to `None`.
        k: Number of images. Defaults to `16`.
        most: Highest scores first (True) or lowest (False). Defaults to `True`.
        class_names: Names indexed by class id. Defaults to `None`.
        image_shape: Shape to reshape flat inputs to. Defaults to `None`.
        cols: Images per row. Defaults to `8`.
        title: Figure title. Defaults to `None` (names `score`, e.g. "the 16
            examples with the highest GEX self-influence").
        score: Which score `scores` are, a key of `SCORE_LABELS`; it names the
            default title. Defaults to `"self_influence"`.

    Returns:
        The matplotlib `Figure`. Captions read "#index" and "given → predicted";
        a red caption marks a disagreement.
    """
    from matplotlib.figure import Figure

    if score not in SCORE_LABELS:
        raise ValueError(
            f"Argument `score` must be one of {sorted(SCORE_LABELS)}. Received: score={score!r}"
        )
    imgs = _as_images(images, image_shape)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s if most else s, kind="stable")[: min(k, len(s))]
    cols = max(1, min(cols, len(order)))
    rows = int(np.ceil(len(order) / cols))
    # Constrained layout keeps each caption (two lines above its image) clear of
    # the row above and the title clear of the first row.
    fig = Figure(figsize=(1.6 * cols, 2.1 * rows + 0.4), layout="constrained")
    for pos, idx in enumerate(order):
        ax = fig.add_subplot(rows, cols, pos + 1)
        ax.imshow(imgs[idx], cmap="gray" if imgs[idx].ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        given = None if labels is None else labels[idx]
        pred = None if predicted is None else predicted[idx]
        text = f"#{idx}\n{_name(given, class_names)}"
        if pred is not None:
            text += f" → {_name(pred, class_names)}"
        wrong = given is not None and pred is not None and int(given) != int(pred)
        ax.set_title(text, fontsize=9, color="red" if wrong else "black")
    if title is None:
        title = (
            f"the {len(order)} examples with the {'highest' if most else 'lowest'} "
            f"{SCORE_LABELS[score][0]}"
        )
    fig.suptitle(title)
    return fig


def plot_proponents(
    query_image,
    train_images,
    proponents,
    proponent_scores,
    opponents,
    opponent_scores,
    *,
    train_labels=None,
    query_label=None,
    class_names=None,
    image_shape=None,
):
    """A query image beside its top proponents (top row) and opponents (bottom).

    Args:
        query_image: The query input `(H, W[, C])` or flat with `image_shape`.
        train_images: All training images.
        proponents: `(k,)` training indices (e.g. `top.proponents[j]`).
        proponent_scores: `(k,)` their influence.
        opponents: `(k,)` training indices.
        opponent_scores: `(k,)` their influence.
        train_labels: Training labels for captions. Defaults to `None`.
        query_label: The query's label for the caption. Defaults to `None`.
        class_names: Names indexed by class id. Defaults to `None`.
        image_shape: Shape of flat inputs. Defaults to `None`.

    Returns:
        The matplotlib `Figure`.
    """
    from matplotlib.figure import Figure

    imgs = _as_images(train_images, image_shape)
    query = _as_images(np.asarray(query_image)[None], image_shape)[0]
    k = len(proponents)
    fig = Figure(figsize=(1.7 * (k + 1), 4.0))
    ax = fig.add_subplot(2, k + 1, 1)
    ax.imshow(query, cmap="gray" if query.ndim == 2 else None)
    ax.set_title(f"query\n{_name(query_label, class_names)}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for row, (indices, values, kind) in enumerate(
        ((proponents, proponent_scores, "proponent"), (opponents, opponent_scores, "opponent"))
    ):
        for col, (idx, value) in enumerate(zip(indices, values)):
            ax = fig.add_subplot(2, k + 1, row * (k + 1) + col + 2)
            ax.imshow(imgs[idx], cmap="gray" if imgs[idx].ndim == 2 else None)
            label = None if train_labels is None else train_labels[idx]
            ax.set_title(f"{kind} #{idx}\n{_name(label, class_names)}  {value:+.2g}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig
