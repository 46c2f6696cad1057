"""Plots a user looks at: the self-influence histogram with its threshold."""

from __future__ import annotations

import numpy as np


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
):
    """Histogram of self-influence, split by flagged/kept, with the threshold.

    Args:
        scores: `(N,)` self-influence scores.
        threshold: Vertical line position. Defaults to `None`.
        noisy_mask: Flagged rows; drawn in a second colour. Defaults to `None`.
        known_noisy: Ground-truth noisy rows (when known); drawn as an outline.
            Defaults to `None`.
        log_x: Log-spaced bins and axis (scores span decades). Defaults to `True`.
        bins: Number of bins. Defaults to `60`.
        ax: A matplotlib axes to draw on. Defaults to `None` (new figure).
        title: Axes title. Defaults to `None`.

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
    ax.set_xlabel("self-influence  mean_m (ℓ(z,θ_m) − ℓ(z,θ*))²")
    ax.set_ylabel("examples")
    ax.set_title(title or "GEX self-influence")
    ax.legend()
    fig.tight_layout()
    return fig
