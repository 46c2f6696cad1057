"""`detect_noisy`: GE loss scores, an Otsu threshold, flagged examples."""

from __future__ import annotations

import keras
import numpy as np

from keras_gex import _validation
from keras_gex.ensemble import GeometricEnsemble
from keras_gex.report import NoisyLabelReport, score_terms
from keras_gex.thresholding import TRANSFORMS, threshold_scores

#: What `detect_noisy(score=...)` ranks by. Both come from the same members.
SCORES = ("self_influence", "member_loss")
#: The threshold rule `threshold="auto"` uses for each score.
DEFAULT_THRESHOLDS = {"self_influence": "otsu_sqrt", "member_loss": "otsu"}


def detect_noisy(
    train_data,
    ensemble,
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
        train_data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches,
            in the order the scores should have (a dataset that reshuffles on
            every iteration is refused).
        ensemble: A `GeometricEnsemble` (e.g. `collector.ensemble`), or a
            trained `keras.Model`, in which case the ensemble is collected
            post hoc from `train_data` with `collect_kwargs`.
        threshold: How to cut the scores: "otsu_sqrt" (Otsu on the root-mean-
            square deviation sqrt(score)), "otsu" (Otsu on raw scores, the
            paper's rule; measured on digits it misses ~30% of the flips),
            "otsu_cbrt" / "otsu_root4" (Otsu on the cube / fourth root),
            "otsu_log", or a number (a cut on raw scores). "auto" is "otsu"
            for "member_loss" (a loss, not a squared deviation) and
            "otsu_sqrt" for self-influence. Measured by `benchmarks/quality.py`
            (7 cases, seeds 0-2), mean F1 of the flagged set on the member
            loss: otsu 0.936, otsu_sqrt 0.911, otsu_cbrt 0.877, otsu_root4
            0.851, otsu_log 0.687; on self-influence (an earlier run): otsu
            0.79, otsu_sqrt 0.93, otsu_cbrt 0.93, otsu_root4 0.91, otsu_log
            0.65. `report.threshold_method` holds the rule used. Defaults to
            `"auto"`.
        score: What to rank by; both come from the same members at the same
            cost. "member_loss": the members' mean loss mean_m ℓ(z, θ_m) on
            the given label. "self_influence": GEX self-influence
            mean_m (ℓ(z, θ_m) − ℓ(z, θ*))², the paper's score; subtracting
            θ*'s loss hurts when θ* has not fitted every label (a flipped
            label θ* never fitted keeps a large ℓ(z, θ*) and a small
            deviation). Measured from the same default members, the 7 cases
            of `benchmarks/quality.py`, seeds 0-2, mean AUC / AP,
            self_influence → member_loss: Fashion-MNIST CNN 30% flips 0.954 / 0.908 →
            0.989 / 0.977; Fashion 10% 0.990 / 0.941 → 0.991 / 0.951; digits
            MLP 30% 0.993 / 0.976 → 0.997 / 0.992; digits MLP 10% 0.9986 /
            0.987 → 0.9990 / 0.990; digits BN-CNN 10% / 30% and sigmoid
            equal within 0.0003 AUC. Defaults to `"member_loss"`.
        batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        reference_floor: Clamp for ℓ(z, θ*) (see
            `GeometricEnsemble.deviations`). Defaults to `0.0`.
        verbose: 0, or 1 / "auto" for progress. Defaults to `"auto"`.
        strategy: A `tf.distribute.Strategy` to collect (when `ensemble` is a
            model) and score under; by default the active strategy or the
            model's, else one device. Defaults to `None`.
        **collect_kwargs: Arguments of `GeometricEnsemble.collect` when
            `ensemble` is a model (`num_members`, `steps`, `learning_rate`, ...).

    Returns:
        A `NoisyLabelReport`; `report.scores` is higher for more suspect rows
        and `report.ensemble` is the ensemble used (the collected one when
        `ensemble` was a model).

    Raises:
        TypeError: If `ensemble` is neither a `GeometricEnsemble` nor a model.
        ValueError: For invalid data or arguments (see messages).
    """
    if isinstance(ensemble, keras.Model):
        ensemble = GeometricEnsemble.collect(
            ensemble, train_data, verbose=verbose, strategy=strategy, **collect_kwargs
        )
    elif not isinstance(ensemble, GeometricEnsemble):
        raise TypeError(
            "Argument `ensemble` must be a `keras_gex.GeometricEnsemble` or a trained "
            f"`keras.Model`. Received: ensemble of type {type(ensemble).__name__}"
        )
    elif collect_kwargs:
        raise TypeError(
            f"Collection arguments {sorted(collect_kwargs)} only apply when "
            "`ensemble` is a model; this ensemble is already collected."
        )
    _validation.one_of("score", score, SCORES)
    if isinstance(threshold, str):
        _validation.one_of("threshold", threshold, ("auto", *TRANSFORMS))
        if threshold == "auto":
            threshold = DEFAULT_THRESHOLDS[score]
    dev = ensemble.deviations(
        train_data,
        batch_size=batch_size,
        reference_floor=reference_floor,
        with_predictions=True,
        verbose=verbose,
        strategy=strategy,
    )
    scores = _compute_scores(dev, score)
    cut = threshold_scores(scores, threshold)
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
        info=ensemble.info,
        loss_kind=ensemble.loss.kind,
        from_logits=ensemble.loss.from_logits,
        ensemble=ensemble,
        _ensemble_probs_fn=(
            (lambda: ensemble.predict(train_data, batch_size=batch_size, verbose=0))
            if ensemble.loss.is_classification
            else None
        ),
    )


def _compute_scores(dev, score: str) -> np.ndarray:
    """`(N,)` float64 scores of a `Deviations`; higher = more suspect."""
    return np.mean(score_terms(score, dev.deviations, dev.member_losses), axis=1)


__all__ = ["SCORES", "detect_noisy"]
