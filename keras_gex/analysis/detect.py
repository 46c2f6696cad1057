"""`detect_noisy`: GE loss scores, a threshold, flagged examples."""

from __future__ import annotations

import keras
import numpy as np

from keras_gex import _validation
from keras_gex.analysis.report import NoisyLabelReport, score_terms
from keras_gex.analysis.thresholding import METHODS, threshold_scores
from keras_gex.config import CollectionConfig
from keras_gex.data import DataSource
from keras_gex.ensemble import GeometricEnsemble, check_floor

#: What `detect_noisy(score=...)` ranks by. Both come from the same members.
SCORES = ("self_influence", "member_loss")
#: The threshold rule `threshold="auto"` uses for each score.
DEFAULT_THRESHOLDS = {"self_influence": "otsu_sqrt", "member_loss": "min_error"}


def detect_noisy(
    train_data,
    ensemble,
    config: CollectionConfig | None = None,
    *,
    threshold="auto",
    score: str = "member_loss",
    batch_size: int | None = None,
    reference_floor: float = 0.0,
    verbose="auto",
    strategy=None,
    **collect_kwargs,
) -> NoisyLabelReport:
    """Scores every training example by its GE members' losses and flags outliers.

    Args:
        train_data: `(x, y)` arrays, a `tf.data.Dataset` of `(x, y)` batches or a
            `keras.utils.PyDataset`, in the order the scores should have (a
            dataset that reshuffles on every iteration, repeats its examples
            or drops a last, partial batch is refused).
        ensemble: A `GeometricEnsemble` (e.g. `collector.ensemble`), or a
            trained `keras.Model`, in which case the ensemble is collected
            post hoc from `train_data` with `config` and `collect_kwargs`.
        config: The `CollectionConfig` of a post-hoc collection. Defaults to
            `None` (the defaults).
        threshold: How to cut the scores: "min_error" (the minimum-error cut of
            two equal-variance groups, each weighed by its share), "otsu"
            (Otsu on raw scores, the paper's rule: the same cut for groups of
            equal size), either followed by "_sqrt" (on sqrt(score), the
            root-mean-square deviation), "_cbrt" / "_root4" (cube / fourth
            root) or "_log", or a number (a cut on raw scores). "auto" is
            "min_error" for "member_loss" (a loss, not a squared deviation: wrong
            labels are a small group, and Otsu's cut falls into the correct
            labels' tail where they are few) and "otsu_sqrt" for self-influence
            (docs/design.md#default-threshold). `report.threshold_method` holds
            the rule used. Defaults to `"auto"`.
        score: What to rank by; both come from the same members at the same
            cost. "member_loss": the members' mean loss mean_m ℓ(z, θ_m) on
            the given label. "self_influence": GEX self-influence
            mean_m (ℓ(z, θ_m) − ℓ(z, θ*))², the paper's score; subtracting
            θ*'s loss hurts when θ* has not fitted every label (a flipped
            label θ* never fitted keeps a large ℓ(z, θ*) and a small
            deviation), so the member loss is the default
            (docs/design.md#default-score). Defaults to `"member_loss"`.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        reference_floor: Clamp for ℓ(z, θ*) (see
            `GeometricEnsemble.deviations`). Defaults to `0.0`.
        verbose: 0, or 1 / "auto" for progress. Defaults to `"auto"`.
        strategy: A `tf.distribute.Strategy` to collect (when `ensemble` is a
            model) and score under; by default the active strategy or the
            model's, else one device. Defaults to `None`.
        **collect_kwargs: When `ensemble` is a model, keywords of
            `GeometricEnsemble.collect`: `CollectionConfig` fields that override
            `config`'s (`num_members`, `steps`, `learning_rate`, ...) and
            `loss`, `directory`, `per_replica_members`.

    Returns:
        A `NoisyLabelReport`; `report.scores` is higher for more suspect rows
        and `report.ensemble` is the ensemble used (the collected one when
        `ensemble` was a model).

    Raises:
        TypeError: If `ensemble` is neither a `GeometricEnsemble` nor a model.
        ValueError: For invalid data or arguments (see messages).
    """
    # Every check before any fine-tuning: a collection can take minutes.
    _validation.one_of("score", score, SCORES)
    if isinstance(threshold, str):
        _validation.one_of("threshold", threshold, ("auto", *METHODS))
        if threshold == "auto":
            threshold = DEFAULT_THRESHOLDS[score]
    check_floor(reference_floor)
    if isinstance(ensemble, keras.Model):  # the model first: its errors explain the data's
        _validation.check_model(ensemble, need_loss=True, loss=collect_kwargs.get("loss"))
    DataSource(train_data, batch_size=batch_size, name="train_data").check_ordered()
    if isinstance(ensemble, keras.Model):
        ensemble = GeometricEnsemble.collect(
            ensemble, train_data, config, verbose=verbose, strategy=strategy, **collect_kwargs
        )
    elif not isinstance(ensemble, GeometricEnsemble):
        raise TypeError(
            "Argument `ensemble` must be a `keras_gex.GeometricEnsemble` or a trained "
            f"`keras.Model`. Received: ensemble of type {type(ensemble).__name__}"
        )
    elif collect_kwargs or config is not None:
        given = sorted(collect_kwargs) + (["config"] if config is not None else [])
        raise TypeError(
            f"Collection arguments {given} only apply when "
            "`ensemble` is a model; this ensemble is already collected."
        )
    scoring = dict(batch_size=batch_size, verbose=verbose, strategy=strategy)
    dev = ensemble.deviations(
        train_data, reference_floor=reference_floor, with_predictions=True, **scoring
    )
    scores = _compute_scores(dev, score)
    contradicted = _contradicted(ensemble.loss, dev)
    cap = None if contradicted is None else int(contradicted.sum())
    cut = threshold_scores(scores, threshold, max_flagged=cap)
    return NoisyLabelReport(
        scores=scores,
        threshold=cut,
        noisy_mask=scores > cut,
        deviations=dev.deviations,
        reference_losses=dev.reference_losses,
        labels=dev.labels,
        predictions=dev.predictions,
        threshold_method=threshold,
        score_method=score,
        member_losses=dev.member_losses if score == "member_loss" else None,
        contradicted=contradicted,
        record=ensemble.record,
        loss_kind=ensemble.loss.kind,
        from_logits=ensemble.loss.from_logits,
        ensemble=ensemble,
        _ensemble_probs=dev.member_probabilities if ensemble.loss.is_classification else None,
    )


def _contradicted(loss, dev) -> np.ndarray | None:
    """`(N,)` bool: rows whose members' mean prediction is not the given label.

    None for a loss that is not classification. A named threshold never
    flags more rows than this (docs/design.md#default-threshold): the
    members then predict the given label of every other flagged row.
    """
    if not loss.is_classification or dev.member_probabilities is None:
        return None
    return ~loss.predicts_label(dev.labels, dev.member_probabilities)


def _compute_scores(dev, score: str) -> np.ndarray:
    """`(N,)` float64 scores of a `Deviations`; higher = more suspect."""
    return np.mean(score_terms(score, dev.deviations, dev.member_losses), axis=1)


__all__ = ["SCORES", "detect_noisy"]
