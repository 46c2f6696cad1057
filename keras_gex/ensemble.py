"""`GeometricEnsemble`: θ* plus M fine-tuned members, and the loss deviations.

The ensemble is the cache of GEX: every score is computed from the per-example
loss deviations Δ(z, m) = ℓ(z, θ_m) − ℓ(z, θ*). Self-influence is
``mean_m Δ(z, m)²``; cross-influence of z and z' is ``mean_m Δ(z, m) Δ(z', m)``.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_gex import _validation
from keras_gex.collect import (
    FIT_WINDOW,
    CollectionResult,
    collect_members,
)
from keras_gex.data import DataSource
from keras_gex.losses import PerExampleLoss, resolve_loss
from keras_gex.scoring import ScoredLosses, Scorer

#: Defaults of the fine-tuning (see `GEXCollector` for their meaning).
DEFAULTS = dict(
    num_members=8,
    steps=200,
    learning_rate="auto",
    batch_size=128,
    momentum=0.9,
    seed=None,
    chain=False,
    bn_batches=20,
)


@dataclasses.dataclass
class Deviations:
    """Loss deviations of a data set, in dataset order.

    Attributes:
        deviations: `(N, M)` Δ(z, m) = ℓ(z, θ_m) − ℓ(z, θ*).
        reference_losses: `(N,)` ℓ(z, θ*) (before any `reference_floor`).
        member_losses: `(N, M)` ℓ(z, θ_m).
        labels: The labels in scored order.
        predictions: θ*'s outputs in scored order (or None).
    """

    deviations: np.ndarray
    reference_losses: np.ndarray
    member_losses: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray | None

    @property
    def self_influence(self) -> np.ndarray:
        """`(N,)` mean_m Δ(z, m)², float64; higher = more self-influential."""
        d = self.deviations.astype(np.float64)
        return np.mean(d * d, axis=1)


class GeometricEnsemble:
    """A trained model θ* and M fine-tuned copies of its weights.

    Build one with `GEXCollector` during `model.fit`, or post hoc with
    `GeometricEnsemble.collect(model, train_data)`.

    Args:
        model: The trained Keras model (θ*). Its architecture evaluates every
            member via `stateless_call`; its variables are never modified.
        reference: `WeightSet` of θ* as scored (BatchNorm statistics
            re-estimated the same way as the members').
        members: List of `WeightSet`, one per member.
        loss: `PerExampleLoss` used for all scores.
        info: Dict of hyperparameters and diagnostics. Defaults to `None`.
    """

    def __init__(self, model, reference, members, loss: PerExampleLoss, info=None):
        if not members:
            raise ValueError("A GeometricEnsemble needs at least one member.")
        self.model = model
        self.reference = reference
        self.members = list(members)
        self.loss = loss
        self.info = dict(info or {})
        self._scorer = None

    @property
    def num_members(self) -> int:
        return len(self.members)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def collect(
        cls,
        model: keras.Model,
        train_data,
        *,
        num_members: int = DEFAULTS["num_members"],
        steps: int = DEFAULTS["steps"],
        learning_rate="auto",
        batch_size: int = DEFAULTS["batch_size"],
        momentum: float = DEFAULTS["momentum"],
        seed: int | None = None,
        chain: bool = False,
        bn_batches: int = DEFAULTS["bn_batches"],
        loss=None,
        verbose="auto",
    ) -> GeometricEnsemble:
        """Fine-tunes `num_members` copies of the trained `model` (post hoc GEX).

        Args:
            model: A trained, built Keras model.
            train_data: Its training data: `(x, y)` arrays or a `tf.data.Dataset`
                of `(x, y)` batches.
            num_members: Number of GE members M. Defaults to `8`.
            steps: SGD steps T per member. Defaults to `200`.
            learning_rate: Peak step size of the cosine schedule, or `"auto"` to
                calibrate it (recommended). Defaults to `"auto"`.
            batch_size: Fine-tuning mini-batch size. Defaults to `128`.
            momentum: SGD momentum. Defaults to `0.9`.
            seed: Seed of the mini-batch shuffling. Defaults to `None`.
            chain: Start each member from the previous one instead of θ*
                (measured to be seed-fragile; off by default). Defaults to `False`.
            bn_batches: Batches used to re-estimate BatchNorm statistics of
                every member. Defaults to `20`.
            loss: Loss to use instead of the compiled one. Defaults to `None`.
            verbose: 0 (silent) or 1 / "auto" (progress). Defaults to `"auto"`.

        Returns:
            A `GeometricEnsemble`.
        """
        _validation.check_model(model, need_loss=True, loss=loss)
        num_members = _validation.positive_int("num_members", num_members)
        steps = _validation.positive_int("steps", steps)
        batch_size = _validation.positive_int("batch_size", batch_size)
        bn_batches = _validation.non_negative_int("bn_batches", bn_batches)
        if learning_rate != "auto":
            learning_rate = _validation.positive_float("learning_rate", learning_rate)
        momentum_ok = isinstance(momentum, (int, float)) and 0 <= momentum < 1
        if isinstance(momentum, bool) or not momentum_ok:
            raise ValueError(
                f"Argument `momentum` must be a number in [0, 1). Received: momentum={momentum!r}"
            )
        seed = _validation.seed_value(seed)
        verbose = _validation.verbose_level(verbose)
        per_example = resolve_loss(model, loss)
        source = DataSource(train_data, name="train_data")
        source.check_against_model(model)
        result: CollectionResult = collect_members(
            model,
            source,
            per_example,
            num_members=num_members,
            steps=steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            momentum=float(momentum),
            seed=seed,
            chain=bool(chain),
            bn_batches=bn_batches,
            verbose=verbose,
        )
        info = {
            "num_members": num_members,
            "steps": steps,
            "learning_rate": result.learning_rate,
            "learning_rate_requested": learning_rate,
            "batch_size": batch_size,
            "momentum": float(momentum),
            "seed": result.seed,
            "chain": bool(chain),
            "bn_batches": bn_batches,
            "loss": per_example.name,
            "calibration": result.calibration,
            "reference_stats": dataclasses.asdict(result.reference_stats),
            "member_stats": [dataclasses.asdict(s) for s in result.member_stats],
            "fit_window": FIT_WINDOW,
            "seconds": result.seconds,
        }
        return cls(model, result.reference, result.members, per_example, info)

    # -- scoring ---------------------------------------------------------------------
    def _get_scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.model, self.loss, self.reference, self.members)
        return self._scorer

    def scored_losses(
        self, data, *, batch_size=None, with_predictions=False, verbose="auto"
    ) -> ScoredLosses:
        """Per-example losses of θ* and every member, in dataset order."""
        verbose = _validation.verbose_level(verbose)
        source = DataSource(data, batch_size=batch_size)
        source.check_against_model(self.model)
        return self._get_scorer().score(source, with_predictions=with_predictions, verbose=verbose)

    def deviations(
        self,
        data,
        *,
        batch_size: int | None = None,
        reference_floor: float = 0.0,
        with_predictions: bool = False,
        verbose="auto",
    ) -> Deviations:
        """Loss deviations Δ(z, m) of every example of `data`.

        Args:
            data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches,
                in the order the results should have. A dataset that
                reshuffles on each iteration is refused.
            batch_size: Scoring batch size for arrays. Defaults to `256`.
            reference_floor: Clamp ℓ(z, θ*) from below at this value before
                subtracting (the official code uses 0.05). Measured on digits it
                inverts the ranking when members stay close to θ*, so it is off.
                Defaults to `0.0`.
            with_predictions: Also return θ*'s outputs. Defaults to `False`.
            verbose: 0 or 1 / "auto" (progress bar). Defaults to `"auto"`.

        Returns:
            A `Deviations`.
        """
        if (
            isinstance(reference_floor, bool)
            or not isinstance(reference_floor, (int, float))
            or not np.isfinite(reference_floor)
            or reference_floor < 0
        ):
            raise ValueError(
                "Argument `reference_floor` must be a non-negative number. "
                f"Received: reference_floor={reference_floor!r}"
            )
        scored = self.scored_losses(
            data,
            batch_size=batch_size,
            with_predictions=with_predictions,
            verbose=verbose,
        )
        ref = scored.reference
        if reference_floor > 0:
            ref = np.maximum(ref, reference_floor)
        return Deviations(
            scored.members - ref[:, None],
            scored.reference,
            scored.members,
            scored.labels,
            scored.predictions,
        )

    def loss_deviations(self, data, **kwargs) -> np.ndarray:
        """The `(N, M)` matrix Δ(z, m) (see `deviations` for arguments)."""
        return self.deviations(data, **kwargs).deviations

    def self_influence(self, data, **kwargs) -> np.ndarray:
        """`(N,)` self-influence mean_m Δ(z, m)²; higher = more influential."""
        return self.deviations(data, **kwargs).self_influence

    def __repr__(self) -> str:
        lr = self.info.get("learning_rate")
        lr_text = f", learning_rate={lr:.4g}" if isinstance(lr, float) else ""
        return (
            f"<GeometricEnsemble model={self.model.name!r} num_members={self.num_members}{lr_text}>"
        )
