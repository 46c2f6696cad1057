"""`detect_noisy`: GE loss scores, a threshold, flagged examples."""

from __future__ import annotations

import keras
import numpy as np

from keras_gex import _validation
from keras_gex.analysis.report import NoisyLabelReport
from keras_gex.analysis.scores import (
    DEFAULT_THRESHOLDS,
    SCORES,
    exclusive_classes,
    other_class_log_probs,
    score_terms,
)
from keras_gex.analysis.thresholding import METHODS, threshold_scores
from keras_gex.config import CollectionConfig
from keras_gex.data import DataSource
from keras_gex.ensemble import GeometricEnsemble, check_floor
from keras_gex.loss_checks import _keras_fn_name
from keras_gex.losses import resolve_loss


def detect_noisy(
    train_data,
    ensemble,
    config: CollectionConfig | None = None,
    *,
    threshold="auto",
    score: str = "auto",
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
            root) or "_log", or a number (a cut on raw scores). A named rule
            never flags more rows than the members' mean prediction
            contradicts; for "member_margin" it cuts the member loss, and as
            many rows are flagged from the top of the margin. "auto" is
            "min_error" for the member loss and margin (a loss, not a squared
            deviation: wrong labels are a small group, and Otsu's cut falls
            into the correct labels' tail where they are few) and "otsu_sqrt"
            for self-influence (docs/design.md#default-threshold).
            `report.threshold_method` holds the rule used. Defaults to
            `"auto"`.
        score: What to rank by; all come from the same members at the same
            cost, and higher is more suspect. "member_margin": the member loss
            less half the loss of the likeliest other class under the members'
            mean prediction p̄, mean_m ℓ(z, θ_m) + ½ log max_{k≠y} p̄_k(z): a
            wrong label is one the members fit worse than another class they
            find likely, a hard correct one has no likely other class either
            (for labels of mutually exclusive classes). "member_loss": the
            members' mean loss mean_m ℓ(z, θ_m) on the given label.
            "self_influence": GEX self-influence mean_m (ℓ(z, θ_m) − ℓ(z, θ*))²,
            the paper's score; subtracting θ*'s loss hurts when θ* has not
            fitted every label (a flipped label θ* never fitted keeps a large
            ℓ(z, θ*) and a small deviation). "auto" is "member_margin" where
            each row's label is one of mutually exclusive classes (sparse ids,
            one-hot rows, one sigmoid output) and "member_loss" otherwise
            (regression, multi-label outputs, labels per position)
            (docs/design.md#default-score); `report.score_method` holds the
            score used. Defaults to `"auto"`.
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
    _validation.one_of("score", score, ("auto", *SCORES))
    if isinstance(threshold, str):
        _validation.one_of("threshold", threshold, ("auto", *METHODS))
        if threshold == "auto":  # the same rule for each score "auto" may pick
            threshold = DEFAULT_THRESHOLDS["member_loss" if score == "auto" else score]
    else:
        threshold_scores(np.zeros(1), threshold)  # a number: refused now, not after collecting
    check_floor(reference_floor)
    if isinstance(ensemble, keras.Model):  # the model first: its errors explain the data's
        _validation.check_model(ensemble, need_loss=True, loss=collect_kwargs.get("loss"))
    if score == "member_margin":
        _check_margin_loss(ensemble, collect_kwargs.get("loss"))
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
    exclusive = exclusive_classes(ensemble.loss.kind, dev.labels)
    if score == "auto":
        score = "member_margin" if exclusive else "member_loss"
    elif score == "member_margin" and not exclusive:
        raise ValueError(
            'Argument `score="member_margin"` needs one label of mutually exclusive classes '
            f"per row; these labels have shape {np.shape(dev.labels)} (several labels per "
            'row). Use `score="member_loss"`.'
        )
    scores = _compute_scores(ensemble.loss.kind, dev, score)
    uncut = NoisyLabelReport(
        scores=scores,
        threshold=np.inf,  # cut below by the one route `with_threshold` also takes
        noisy_mask=np.zeros(len(scores), bool),
        deviations=dev.deviations,
        reference_losses=dev.reference_losses,
        labels=dev.labels,
        predictions=dev.predictions,
        threshold_method=threshold,
        score_method=score,
        member_losses=dev.member_losses if score != "self_influence" else None,
        contradicted=_contradicted(ensemble.loss, dev),
        record=ensemble.record,
        loss_kind=ensemble.loss.kind,
        from_logits=ensemble.loss.from_logits,
        ensemble=ensemble,
        _ensemble_probs=dev.member_probabilities if ensemble.loss.is_classification else None,
    )
    return uncut.with_threshold(threshold)


def _contradicted(loss, dev) -> np.ndarray | None:
    """`(N,)` bool: rows whose members' mean prediction is not the given label.

    None for a loss that is not classification. A named threshold never
    flags more rows than this (docs/design.md#default-threshold): the
    members then predict the given label of every other flagged row.
    """
    if not loss.is_classification or dev.member_probabilities is None:
        return None
    return ~loss.predicts_label(dev.labels, dev.member_probabilities)


def _check_margin_loss(ensemble, loss) -> None:
    """Refuses `score="member_margin"` for a loss that is not classification.

    User code whose kind is read from the model's outputs while collecting
    (`loss_checks.read_as_classifier`) has its labels checked once scored.
    """
    if isinstance(ensemble, GeometricEnsemble):
        per_example, known = ensemble.loss, True
    elif isinstance(ensemble, keras.Model):
        per_example = resolve_loss(ensemble, loss)
        known = _keras_fn_name(per_example) is not None  # a Keras loss: its kind is final
    else:
        return  # not an ensemble: refused below
    if known and not per_example.is_classification:
        raise ValueError(
            'Argument `score="member_margin"` needs a classification loss (labels of '
            f"mutually exclusive classes); this loss is {per_example.name!r}. Use "
            '`score="member_loss"`.'
        )


def _compute_scores(kind: str, dev, score: str) -> np.ndarray:
    """`(N,)` float64 scores of a `Deviations`; higher = more suspect."""
    other = None
    if score == "member_margin":
        other = other_class_log_probs(kind, dev.labels, dev.member_probabilities)
    return np.mean(score_terms(score, dev.deviations, dev.member_losses, other), axis=1)


__all__ = ["SCORES", "detect_noisy"]
