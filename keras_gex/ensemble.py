"""`GeometricEnsemble`: θ* plus M fine-tuned members, and the loss deviations.

The ensemble is the cache of GEX: every score is computed from the per-example
loss deviations Δ(z, m) = ℓ(z, θ_m) − ℓ(z, θ*). Self-influence is
``mean_m Δ(z, m)²``; cross-influence of z and z' is ``mean_m Δ(z, m) Δ(z', m)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_gex import _validation, collection, distribute
from keras_gex.config import CollectionConfig, CollectionRecord
from keras_gex.data import (
    DEFAULT_BATCH_SIZE,
    DataSource,
    Progress,
    as_inputs,
    changing_order,
    known_batches,
    num_rows,
    standardize_data,
)
from keras_gex.io import persistence
from keras_gex.loss_checks import check_all_labels, check_first_batch
from keras_gex.losses import PerExampleLoss, resolve_loss
from keras_gex.scoring import ScoredLosses, Scorer


@dataclasses.dataclass
class Deviations:
    """Loss deviations of a data set, in dataset order.

    Attributes:
        deviations: `(N, M)` Δ(z, m) = ℓ(z, θ_m) − ℓ(z, θ*).
        reference_losses: `(N,)` ℓ(z, θ*) (before any `reference_floor`).
        member_losses: `(N, M)` ℓ(z, θ_m).
        labels: The labels in scored order.
        predictions: θ*'s outputs in scored order (or None).
        member_probabilities: The members' mean predicted probabilities in
            scored order (their mean output through the loss's link), or None
            without predictions.
    """

    deviations: np.ndarray
    reference_losses: np.ndarray
    member_losses: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray | None
    member_probabilities: np.ndarray | None = None

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
        info: What the collection did: a `CollectionRecord`, or its dict as
            saved in a manifest. Defaults to `None`.

    Attributes:
        record: The `CollectionRecord`, typed (None for an ensemble built from
            weights without a collection).
        info: The same record as a plain dict.
    """

    def __init__(self, model, reference, members, loss: PerExampleLoss, info=None):
        if not members:
            raise ValueError("A GeometricEnsemble needs at least one member.")
        _check_weights_fit(model, [reference, *members])
        self.model = model
        self.reference = reference
        self.members = list(members)
        self.loss = loss
        if isinstance(info, CollectionRecord):
            self.record, self.info = info, info.to_dict()
        else:
            self.info = dict(info or {})
            collected = "member_stats" in self.info
            self.record = CollectionRecord.from_dict(self.info) if collected else None
        self._scorer = None
        self._distributed_scorers = {}

    @property
    def num_members(self) -> int:
        return len(self.members)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def collect(
        cls,
        model: keras.Model,
        train_data,
        config: CollectionConfig | None = None,
        *,
        loss=None,
        directory: str | None = None,
        verbose="auto",
        strategy=None,
        per_replica_members: bool = False,
        **settings,
    ) -> GeometricEnsemble:
        """Fine-tunes copies of the trained `model` (post hoc GEX).

        Args:
            model: A trained, built Keras model.
            train_data: Its training data: `(x, y)` arrays, a `tf.data.Dataset`
                of `(x, y)` batches or a `keras.utils.PyDataset`.
            config: A `CollectionConfig` (the fine-tuning settings). Defaults
                to `None` (the defaults).
            loss: Loss to use instead of the compiled one. Defaults to `None`.
            directory: If given, every member is written there as soon as it is
                finished, and a re-run of the same call resumes at the first
                missing member (same result as an uninterrupted run). The
                finished directory loads with `GeometricEnsemble.load`.
                Defaults to `None`.
            verbose: 0 (silent) or 1 / "auto" (progress). Defaults to `"auto"`.
            strategy: A `tf.distribute.Strategy` (e.g. `MirroredStrategy`,
                `MultiWorkerMirroredStrategy`) to fine-tune under; by default
                the strategy whose scope is active or that the model was built
                under, else one device. Each member is fine-tuned
                data-parallel: every global batch of `batch_size` is split
                across the replicas and gradients and BatchNorm statistics are
                all-reduced. Defaults to `None`.
            per_replica_members: With a strategy, fine-tune one member per
                replica instead, independently and without gradient
                synchronisation (the official code's `--ft_local`): M members
                in about M / replicas rounds. With a fixed `learning_rate`
                each member equals the sequential member of the same index;
                with `"auto"` the members of a round share one step size.
                Defaults to `False`.
            **settings: `CollectionConfig` fields that override `config`'s
                (e.g. `num_members=4, seed=0`).

        Returns:
            A `GeometricEnsemble`; `ensemble.record` says what the collection did.
        """
        _validation.check_model(model, need_loss=True, loss=loss)
        _validation.check_trainable(model)
        _validation.warn_custom_objective(model, loss)
        config = CollectionConfig.resolve(config, **settings)
        verbose = _validation.verbose_level(verbose)
        strategy = distribute.resolve_strategy(strategy, model)
        per_replica_members = distribute.check_per_replica_members(
            per_replica_members, strategy, config.chain
        )
        per_example = resolve_loss(model, loss)
        source = DataSource(train_data, name="train_data")
        source.check_against_model(model)
        per_example = check_first_batch(model, per_example, source)
        result = collection.collect(
            model,
            source,
            per_example,
            config,
            directory=directory,
            verbose=verbose,
            strategy=strategy,
            per_replica_members=per_replica_members,
        )
        return cls(model, result.reference, result.members, per_example, result.record)

    # -- persistence ---------------------------------------------------------------
    def save(self, directory) -> None:
        """Writes the ensemble to `directory` (Keras `.weights.h5` + manifest).

        Args:
            directory: Target directory; created if missing. An existing
                ensemble there is overwritten file by file, atomically.
        """
        persistence.save_ensemble(
            os.fspath(directory), self.model, self.reference, self.members, self.loss, self.info
        )

    @classmethod
    def load(cls, directory, model: keras.Model, *, loss=None) -> GeometricEnsemble:
        """Loads an ensemble saved by `save` or by a collection with `directory=`.

        Args:
            directory: The ensemble directory.
            model: The trained model the ensemble was collected from (same
                architecture and the same weights θ*).
            loss: Loss to use instead of the model's compiled one; it must be
                the loss the ensemble was collected with. Defaults to `None`.

        Returns:
            A `GeometricEnsemble`.

        Raises:
            FileNotFoundError: If `directory` holds no ensemble.
            ValueError: If the model's architecture, θ* or loss differ from
                the saved ones, or the collection there is incomplete.
        """
        directory = os.fspath(directory)
        _validation.check_model(model, need_loss=True, loss=loss)
        per_example = resolve_loss(model, loss)
        reference, members, info, per_example = persistence.load_ensemble(
            directory, model, per_example
        )
        return cls(model, reference, members, per_example, info)

    # -- scoring ---------------------------------------------------------------------
    def _warn_if_theta_moved(self) -> None:
        """Warns when the model's trainable weights are no longer the θ* collected from.

        Scores always describe the collected θ* and its members; a model that
        changed since (a callback listed after `GEXCollector` that restores
        other weights when `fit` ends, or more training) is not what they explain.
        """
        if self.record is None:  # built from given weights: no collected θ* to compare
            return
        current = self.model.trainable_variables
        if len(current) == len(self.reference.trainable) and all(
            np.array_equal(np.asarray(v), w) for v, w in zip(current, self.reference.trainable)
        ):
            return
        warnings.warn(
            "The model's weights have changed since this ensemble was collected: its scores "
            "describe the weights it was collected from (θ*), not the model's weights now. "
            "A callback that sets the weights when `fit` ends "
            "(`EarlyStopping(restore_best_weights=True)`) must come before `GEXCollector` in "
            "`callbacks` (they run in list order); after more training, collect again.",
            stacklevel=_validation.user_stacklevel(),
        )

    def _get_scorer(self, strategy=None) -> Scorer:
        """The scorer for a resolved strategy (None: one device), built once each."""
        self._warn_if_theta_moved()
        if strategy is None:
            if self._scorer is None:
                self._scorer = Scorer(self.model, self.loss, self.reference, self.members)
            return self._scorer
        key = id(strategy)  # the strategy is kept alive next to its scorer
        if key not in self._distributed_scorers:
            scorer = Scorer(self.model, self.loss, self.reference, self.members, strategy)
            self._distributed_scorers[key] = (strategy, scorer)
        return self._distributed_scorers[key][1]

    def scored_losses(
        self, data, *, batch_size=None, with_predictions=False, verbose="auto", strategy=None
    ) -> ScoredLosses:
        """Per-example losses of θ* and every member, in dataset order.

        `strategy` (a `tf.distribute.Strategy`) scores data-parallel; by
        default the active strategy or the model's is used, else one device.
        """
        verbose = _validation.verbose_level(verbose)
        strategy = distribute.resolve_strategy(strategy, self.model)
        source = DataSource(data, batch_size=batch_size)
        source.check_against_model(self.model)
        check_all_labels(self.loss, source, self.model)
        return self._get_scorer(strategy).score(
            source, with_predictions=with_predictions, verbose=verbose
        )

    def deviations(
        self,
        data,
        *,
        batch_size: int | None = None,
        reference_floor: float = 0.0,
        with_predictions: bool = False,
        verbose="auto",
        strategy=None,
    ) -> Deviations:
        """Loss deviations Δ(z, m) of every example of `data`.

        Args:
            data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches,
                in the order the results should have. A dataset that
                reshuffles on each iteration is refused.
            batch_size: Scoring batch size for arrays. Defaults to `256`.
            reference_floor: Clamp ℓ(z, θ*) from below at this value before
                subtracting (the official code uses 0.05); off, because it can
                invert the ranking when members stay close to θ*
                (docs/design.md#reference-floor). Defaults to `0.0`.
            with_predictions: Also return θ*'s outputs and the members' mean
                probabilities (from the same forward passes). Defaults to `False`.
            verbose: 0 or 1 / "auto" (progress bar). Defaults to `"auto"`.
            strategy: A `tf.distribute.Strategy` to score under: every batch
                is split across the replicas and the results come back in
                dataset order. By default the strategy whose scope is active
                or that the model was built under, else one device.
                Defaults to `None`.

        Returns:
            A `Deviations`.
        """
        check_floor(reference_floor)
        scored = self.scored_losses(
            data,
            batch_size=batch_size,
            with_predictions=with_predictions,
            verbose=verbose,
            strategy=strategy,
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
            scored.member_probabilities,
        )

    def loss_deviations(
        self,
        data,
        *,
        cache=None,
        batch_size: int | None = None,
        reference_floor: float = 0.0,
        verbose="auto",
        strategy=None,
    ) -> np.ndarray:
        """The `(N, M)` matrix Δ(z, m), optionally streamed to a disk cache.

        Args:
            data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches.
            cache: Path of a `.npy` file. If given, Δ is streamed batch by batch
                into it (bounded memory, for data far larger than RAM) and a
                read-only memory map is returned; a later call with the same
                data (same content and order) and the same ensemble reuses
                the file instead of scoring again. Defaults to `None`.
            batch_size: Scoring batch size for arrays. Defaults to `None` (256).
            reference_floor: See `deviations`. Defaults to `0.0`.
            verbose: 0, or 1 / "auto" for a progress bar. Defaults to `"auto"`.
            strategy: See `deviations`. Defaults to `None`.

        Returns:
            A float32 array (a `np.memmap` when `cache` is given).
        """
        if cache is None:
            return self.deviations(
                data,
                batch_size=batch_size,
                reference_floor=reference_floor,
                verbose=verbose,
                strategy=strategy,
            ).deviations
        check_floor(reference_floor)
        verbose = _validation.verbose_level(verbose)
        strategy = distribute.resolve_strategy(strategy, self.model)
        path = os.fspath(cache)
        if not path.endswith(".npy"):
            raise ValueError(
                f"Argument `cache` must be a path ending in '.npy'. Received: cache={path!r}"
            )
        source = DataSource(data, batch_size=batch_size)
        source.check_against_model(self.model)
        source.check_ordered()
        key = {
            "data": source.fingerprint(),
            "ensemble": self.fingerprint(),
            "reference_floor": float(reference_floor),
        }
        meta_path = path + ".json"
        if os.path.exists(path) and os.path.exists(meta_path):
            with open(meta_path) as handle:
                if json.load(handle) == key:
                    return np.load(path, mmap_mode="r")
        tmp = f"{path}.partial-{os.getpid()}.npy"
        try:
            self._get_scorer(strategy).deviations_to_file(
                source, tmp, reference_floor=float(reference_floor), verbose=verbose
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        persistence._atomic_write_text(meta_path, json.dumps(key))
        return np.load(path, mmap_mode="r")

    def predict(self, data, *, batch_size: int | None = None, verbose="auto") -> np.ndarray:
        """The members' mean predicted probabilities, in dataset order.

        The fine-tuned members have partly forgotten labels that θ* only
        memorised, so on a mislabeled example they spread probability back to
        the class the input looks like, while θ* still predicts the given
        label. This is what `NoisyLabelReport.relabeled_targets` and
        `suggested_labels` use.

        Args:
            data: Inputs `x` (array or a dataset of batches), `(x, y)` arrays or
                a `tf.data.Dataset` of `(x, y)` batches; labels are ignored.
            batch_size: Batch size for arrays. Defaults to `None` (256).
            verbose: 0, or 1 / "auto" for a progress bar. Defaults to `"auto"`.

        Returns:
            `(N, K)` float64 probabilities: softmax (or sigmoid for binary
            cross-entropy) of each member's logits, averaged over members; the
            outputs themselves, averaged, when the model outputs probabilities.

        Raises:
            ValueError: If the ensemble's loss is not a classification loss, or a
                prediction is NaN or inf (e.g. a NaN or inf input value).
        """
        if not self.loss.is_classification:
            raise ValueError(
                "`predict` returns class probabilities and needs a classification "
                f"loss; this ensemble's loss kind is {self.loss.kind!r}."
            )
        verbose = _validation.verbose_level(verbose)
        data = standardize_data(data)
        x = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            inputs = x.map(lambda *e: e[0]) if isinstance(spec, tuple) else x
            changing = changing_order(inputs)
            if changing is not None:
                why, fix = changing
                raise ValueError(
                    f"Argument `data` {why}, so predictions would not line up with its order. {fix}"
                )
        else:
            arrays = as_inputs(x)
            if any(np.ndim(a) == 0 for a in tf.nest.flatten(arrays)) or not num_rows(arrays):
                raise ValueError("Argument `data` must hold at least one example.")
            size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
            size = _validation.positive_int("batch_size", size)
            inputs = tf.data.Dataset.from_tensor_slices(arrays).batch(size)
        fn = self._get_scorer().mean_probabilities_for(inputs.element_spec)
        if isinstance(x, tf.data.Dataset):
            bar = Progress(None, known_batches(inputs), verbose)
        else:
            bar = Progress(num_rows(arrays), None, verbose)
        out = []
        for batch in inputs:
            out.append(fn(batch).numpy())
            bar.advance(len(out[-1]))
        if not out:
            raise ValueError("Argument `data` is empty: it has no examples.")
        probs = np.concatenate(out).astype(np.float64)
        bad = ~np.isfinite(probs.reshape(len(probs), -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"The members' predictions are NaN or inf on {int(bad.sum())} example(s) "
                f"(first indices {np.flatnonzero(bad)[:5].tolist()}). Check those inputs."
            )
        return probs

    def fingerprint(self) -> str:
        """Hash of θ*, every member's weights and the loss: identifies scores."""
        import hashlib

        digest = hashlib.sha256(f"{self.loss.name}|{self.loss.kind}".encode())
        for weights in [self.reference, *self.members]:
            digest.update(persistence.weights_fingerprint(weights).encode())
        return digest.hexdigest()[:16]

    def self_influence(self, data, **kwargs) -> np.ndarray:
        """`(N,)` self-influence mean_m Δ(z, m)²; higher = more influential.

        Keyword arguments (`batch_size`, `reference_floor`, `strategy`, ...)
        are those of `deviations`.
        """
        return self.deviations(data, **kwargs).self_influence

    def __repr__(self) -> str:
        lr = self.info.get("learning_rate")
        lr_text = f", learning_rate={lr:.4g}" if isinstance(lr, float) else ""
        return (
            f"<GeometricEnsemble model={self.model.name!r} num_members={self.num_members}{lr_text}>"
        )


def check_floor(reference_floor) -> None:
    """Refuses a `reference_floor` that is not a non-negative finite number."""
    _validation.non_negative_float("reference_floor", reference_floor)


def _check_weights_fit(model, weight_sets) -> None:
    want = [tuple(v.shape) for v in model.trainable_variables] + [
        tuple(v.shape) for v in model.non_trainable_variables
    ]
    for index, weights in enumerate(weight_sets):
        got = [tuple(np.shape(w)) for w in weights.trainable + weights.non_trainable]
        if got != want or len(weights.trainable) != len(model.trainable_variables):
            what = "θ*" if index == 0 else f"member {index - 1}"
            raise ValueError(
                f"The weights of {what} do not fit the model: the ensemble belongs to a "
                "different architecture. Use the model the ensemble was collected from."
            )
