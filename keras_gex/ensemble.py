"""`GeometricEnsemble`: θ* plus M fine-tuned members, and the loss deviations.

The ensemble is the cache of GEX: every score is computed from the per-example
loss deviations Δ(z, m) = ℓ(z, θ_m) − ℓ(z, θ*). Self-influence is
``mean_m Δ(z, m)²``; cross-influence of z and z' is ``mean_m Δ(z, m) Δ(z', m)``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os

import keras
import numpy as np
import tensorflow as tf

from keras_gex import _validation, distribute, persistence
from keras_gex._tracing import compiled, free_batch
from keras_gex.collect import (
    FIT_WINDOW,
    CollectionResult,
    collect_members,
    resolve_steps,
)
from keras_gex.data import (
    DEFAULT_BATCH_SIZE,
    DataSource,
    nan_where_not_finite,
    reshuffles_each_iteration,
)
from keras_gex.losses import PerExampleLoss, resolve_loss
from keras_gex.scoring import ScoredLosses, Scorer
from keras_gex.version import __version__
from keras_gex.weights import WeightSet

#: Defaults of the fine-tuning (see `GEXCollector` for their meaning).
DEFAULTS = dict(
    num_members=8,
    steps="auto",
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
        _check_weights_fit(model, [reference, *members])
        self.model = model
        self.reference = reference
        self.members = list(members)
        self.loss = loss
        self.info = dict(info or {})
        self._scorer = None
        self._distributed_scorers = {}
        self._predict_fns = {}

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
        steps=DEFAULTS["steps"],
        learning_rate="auto",
        batch_size: int = DEFAULTS["batch_size"],
        momentum: float = DEFAULTS["momentum"],
        seed: int | None = None,
        chain: bool = False,
        bn_batches: int = DEFAULTS["bn_batches"],
        loss=None,
        directory: str | None = None,
        verbose="auto",
        strategy=None,
        per_replica_members: bool = False,
        jit_compile="auto",
    ) -> GeometricEnsemble:
        """Fine-tunes `num_members` copies of the trained `model` (post hoc GEX).

        Args:
            model: A trained, built Keras model.
            train_data: Its training data: `(x, y)` arrays or a `tf.data.Dataset`
                of `(x, y)` batches.
            num_members: Number of GE members M. More members cost
                proportionally more and gained little in `benchmarks/quality.py`
                (digits, seeds 0-2, AUC / AP of the default score): 32 instead
                of 8 took the MLP at 30% flips from 0.9965 / 0.9918 to
                0.9974 / 0.9943 and left the BN-CNN at 30% unchanged (0.9990 /
                0.9978 and 0.9991 / 0.9978). `report.uncertainty()` says whether
                the flagged set needs more. Defaults to `8`.
            steps: SGD steps T per member, or `"auto"`: about 10 epochs of
                the training data, at least 50 and at most 800 steps (800 from
                10,240 examples at batch 128). The number used is recorded in
                `info["steps"]`. Defaults to `"auto"`.
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
            jit_compile: Compile the fine-tuning loop with XLA when the data
                are arrays and no strategy is used. `"auto"` does so on an
                accelerator for models without convolution or pooling layers,
                and never on CPU (where XLA's compile time cancelled its
                faster steps for an MLP and small CNNs were 7-10x slower with
                it). If XLA cannot compile the model, the members are
                fine-tuned without it and a warning says so. The flag used is
                recorded in `info["jit_compile"]`. Defaults to `"auto"`.

        Returns:
            A `GeometricEnsemble`.
        """
        _validation.check_model(model, need_loss=True, loss=loss)
        args = _validation.collection_args(
            num_members=num_members,
            steps=steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            momentum=momentum,
            seed=seed,
            chain=chain,
            bn_batches=bn_batches,
            verbose=verbose,
            jit_compile=jit_compile,
        )
        num_members, steps, learning_rate = args.num_members, args.steps, args.learning_rate
        batch_size, momentum, seed = args.batch_size, args.momentum, args.seed
        chain, bn_batches, verbose = args.chain, args.bn_batches, args.verbose
        strategy = distribute.resolve_strategy(strategy, model)
        per_replica_members = distribute.check_per_replica_members(
            per_replica_members, strategy, chain
        )
        per_example = resolve_loss(model, loss)
        source = DataSource(train_data, name="train_data")
        source.check_against_model(model)
        steps_requested = steps
        steps = resolve_steps(steps, source.count_examples(), batch_size)
        store = None
        if directory is not None:
            store = persistence.MemberStore(
                os.fspath(directory),
                model,
                {
                    "steps": steps,
                    "batch_size": batch_size,
                    "momentum": float(momentum),
                    "chain": bool(chain),
                    "bn_batches": bn_batches,
                    "loss": per_example.name,
                    "learning_rate": learning_rate,
                    "seed": seed,
                },
            )
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
            store=store,
            strategy=strategy,
            per_replica_members=per_replica_members,
            jit_compile=args.jit_compile,
        )
        info = {
            "num_members": num_members,
            "steps": steps,
            "steps_requested": steps_requested,
            # The step size the members were fine-tuned with (their median: the
            # per-member controller nudges it), not the controller's next proposal.
            "learning_rate": float(np.median([s.learning_rate for s in result.member_stats]))
            if result.member_stats
            else result.learning_rate,
            "learning_rate_requested": learning_rate,
            "batch_size": batch_size,
            "momentum": float(momentum),
            "seed": result.seed,
            "chain": bool(chain),
            "bn_batches": bn_batches,
            "loss": per_example.name,
            "calibration": result.calibration,
            "jit_compile": result.jit_compile,
            "reference_stats": dataclasses.asdict(result.reference_stats),
            "member_stats": [dataclasses.asdict(s) for s in result.member_stats],
            "fit_window": FIT_WINDOW,
            "seconds": result.seconds,
            # One-time tracing of the fine-tuning loop, part of `seconds`.
            "warmup_seconds": result.warmup_seconds,
            # Members run again in this call (a resumed collection counts only
            # its own): collapsed ones refitted, diverged ones retried.
            "redone_members": result.redone,
        }
        if strategy is not None:
            info["strategy"] = {
                **distribute.describe(strategy),
                "per_replica_members": per_replica_members,
            }
        if store is not None:
            store.finalize(result.reference, info, per_example)
        return cls(model, result.reference, result.members, per_example, info)

    # -- persistence ---------------------------------------------------------------
    def save(self, directory) -> None:
        """Writes the ensemble to `directory` (Keras `.weights.h5` + manifest).

        Args:
            directory: Target directory; created if missing. An existing
                ensemble there is overwritten file by file, atomically.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        theta = WeightSet.from_model(self.model)
        for index, member in enumerate(self.members):
            persistence.write_weights(
                self.model, member, os.path.join(directory, persistence.member_file(index))
            )
        persistence.write_weights(
            self.model, self.reference, os.path.join(directory, persistence.REFERENCE_FILE)
        )
        manifest = {
            "format": persistence.FORMAT,
            "format_version": persistence.FORMAT_VERSION,
            "library_version": __version__,
            "architecture_fingerprint": persistence.architecture_fingerprint(self.model),
            "theta_fingerprint": persistence.weights_fingerprint(theta),
            "config": {k: self.info.get(k) for k in persistence.RESUME_KEYS},
            "calibrated_learning_rate": self.info.get("learning_rate"),
            "calibration": self.info.get("calibration", []),
            "members": [
                {"file": persistence.member_file(i), "stats": s}
                for i, s in enumerate(self.info.get("member_stats") or [{}] * self.num_members)
            ],
            "info": self.info,
            "loss": {
                "name": self.loss.name,
                "kind": self.loss.kind,
                "from_logits": self.loss.from_logits,
            },
            "num_members": self.num_members,
            "complete": True,
        }
        persistence._atomic_write_text(
            os.path.join(directory, persistence.MANIFEST),
            json.dumps(persistence._jsonable(manifest), indent=2),
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
        manifest = persistence.read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(
                f"No keras_gex ensemble in {directory!r} ({persistence.MANIFEST} missing)."
            )
        if not manifest.get("complete"):
            done = len(manifest.get("members", []))
            raise ValueError(
                f"The collection in {directory!r} is incomplete ({done} member(s) "
                "written). Re-run the same collection with `directory=` to resume it."
            )
        persistence.check_compatible(manifest, model, WeightSet.from_model(model), directory)
        per_example = resolve_loss(model, loss)
        saved_loss = manifest["loss"]
        if (per_example.kind, per_example.from_logits) != (
            saved_loss["kind"],
            saved_loss["from_logits"],
        ) or (per_example.kind == "other" and per_example.name != saved_loss["name"]):
            raise ValueError(
                f"The ensemble in {directory!r} was collected with loss "
                f"{saved_loss['name']!r} (from_logits={saved_loss['from_logits']}), but "
                f"the model's loss is {per_example.name!r} "
                f"(from_logits={per_example.from_logits}). Pass the original `loss=`."
            )
        members = [
            persistence.read_weights(model, os.path.join(directory, entry["file"]))
            for entry in manifest["members"]
        ]
        reference = persistence.read_weights(
            model, os.path.join(directory, persistence.REFERENCE_FILE)
        )
        return cls(model, reference, members, per_example, manifest.get("info"))

    # -- scoring ---------------------------------------------------------------------
    def _get_scorer(self, strategy=None) -> Scorer:
        """The scorer for a resolved strategy (None: one device), built once each."""
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
                subtracting (the official code uses 0.05). Measured on digits it
                inverts the ranking when members stay close to θ*, so it is off.
                Defaults to `0.0`.
            with_predictions: Also return θ*'s outputs. Defaults to `False`.
            verbose: 0 or 1 / "auto" (progress bar). Defaults to `"auto"`.
            strategy: A `tf.distribute.Strategy` to score under: every batch
                is split across the replicas and the results come back in
                dataset order. By default the strategy whose scope is active
                or that the model was built under, else one device.
                Defaults to `None`.

        Returns:
            A `Deviations`.
        """
        _check_floor(reference_floor)
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
        _check_floor(reference_floor)
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
        x = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            inputs = x.map(lambda *e: e[0]) if isinstance(spec, tuple) else x
            if reshuffles_each_iteration(inputs):
                raise ValueError(
                    "Argument `data` reshuffles on every iteration, so predictions "
                    "would not line up with its order. Pass an ordered dataset."
                )
        else:
            arrays = np.asarray(x)
            if arrays.ndim == 0 or len(arrays) == 0:
                raise ValueError("Argument `data` must hold at least one example.")
            size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
            size = _validation.positive_int("batch_size", size)
            inputs = tf.data.Dataset.from_tensor_slices(arrays).batch(size)
        fn = self._predict_fn(inputs.element_spec)
        bar = keras.utils.Progbar(None, unit_name="example") if verbose else None
        out, seen = [], 0
        for batch in inputs:
            out.append(fn(batch).numpy())
            seen += len(out[-1])
            if bar is not None:
                bar.update(seen)
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

    def _predict_fn(self, spec):
        """Compiled mean-of-members probabilities for an input spec (traced once)."""
        key = str(spec)
        cache = self._predict_fns
        if key in cache:
            return cache[key]
        scorer = self._get_scorer()
        activation = None
        if self.loss.from_logits:
            activation = tf.sigmoid if self.loss.kind == "binary_crossentropy" else tf.nn.softmax
        members = scorer._members

        def mean_probs(x):
            total = 0.0
            for tv, ntv in members:
                out, _ = self.model.stateless_call(tv, ntv, x, training=False)
                out = tf.cast(out, "float32")
                total += activation(out) if activation is not None else out
            return nan_where_not_finite(x, total / len(members))

        cache[key] = compiled(mean_probs, input_signature=[free_batch(spec)])
        return cache[key]

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


def _check_floor(reference_floor) -> None:
    if (
        isinstance(reference_floor, bool)
        or not isinstance(reference_floor, numbers.Real)
        or not np.isfinite(reference_floor)
        or reference_floor < 0
    ):
        raise ValueError(
            "Argument `reference_floor` must be a non-negative number. "
            f"Received: reference_floor={reference_floor!r}"
        )


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
