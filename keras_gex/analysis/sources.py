"""Data-source separation (paper §5.4): do the scores tell data sets apart?"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SourceSeparation:
    """Per-source score distributions and one-vs-rest AUCs.

    Attributes:
        sources: Source names, in order.
        counts: Examples per source.
        medians: Median score per source.
        quantiles: `(S, 3)` 10th / 50th / 90th percentiles per source.
        auc: One-vs-rest ROC AUC of the score for each source (> 0.5 means
            that source scores higher than the rest).
    """

    sources: list
    counts: np.ndarray
    medians: np.ndarray
    quantiles: np.ndarray
    auc: np.ndarray

    def table(self) -> str:
        """A Markdown table of the separation."""
        lines = [
            "| source | n | p10 | median | p90 | AUC (vs rest) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i, name in enumerate(self.sources):
            q = self.quantiles[i]
            lines.append(
                f"| {name} | {self.counts[i]} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} | "
                f"{self.auc[i]:.3f} |"
            )
        return "\n".join(lines)


def source_separation(scores, source_labels) -> SourceSeparation:
    """Summarises how `scores` differ between data sources.

    Args:
        scores: `(N,)` scores (e.g. self-influence of a mixed training set).
        source_labels: `(N,)` source of each example (any hashable labels).

    Returns:
        A `SourceSeparation`.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(source_labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(
            "Arguments `scores` and `source_labels` must be 1-D of the same length. "
            f"Received shapes {scores.shape} and {labels.shape}."
        )
    names = list(dict.fromkeys(labels.tolist()))
    if len(names) < 2:
        raise ValueError("Source separation needs at least two sources.")
    counts, medians, quantiles, aucs = [], [], [], []
    for name in names:
        mask = labels == name
        counts.append(int(mask.sum()))
        q = np.quantile(scores[mask], [0.1, 0.5, 0.9])
        quantiles.append(q)
        medians.append(q[1])
        aucs.append(roc_auc_score(mask, scores))
    return SourceSeparation(
        [str(n) for n in names],
        np.array(counts),
        np.array(medians),
        np.array(quantiles),
        np.array(aucs),
    )
