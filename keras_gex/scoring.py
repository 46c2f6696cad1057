"""The compiled scorer: per-example losses of θ* and every GE member, batched.

One `tf.function` per input signature evaluates the reference and all M
members on a batch with `model.stateless_call` (no weight assignment, the
user's model variables are never touched), so scoring costs M+1 forward
passes; leading layers whose weights every set shares (a frozen backbone)
run once per batch instead (`collection/frozen.py`). Results are
concatenated in dataset order.

The hot path is kept at the cost of those M+1 compiled forward passes
(`benchmarks/speed.py` measures it against them): one trace per input
signature (the batch dimension is free, so the last partial batch and later
calls reuse it), array inputs are sliced directly instead of going through
`tf.data`, and the first-batch loss check uses a compiled forward pass of θ*
instead of an eager one. `jit_compile=True` compiles the step with XLA.

Under a `tf.distribute` strategy the reference and member variables are
replicated (created under `strategy.scope()`), every batch is split into one
contiguous chunk per replica (`distribute.distribute_batches`; the last
partial batch and replicas that get zero rows included), the step runs with
`strategy.run`, and the chunks are gathered back in replica order, i.e. in
dataset order, before any check sees them.
"""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
import tensorflow as tf

from keras_gex import distribute
from keras_gex._tracing import compiled, free_batch
from keras_gex.collection.frozen import shared_layers
from keras_gex.data import DataSource, nan_where_not_finite, spec_of
from keras_gex.loss_checks import check_per_example
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet, stateless_call


@dataclasses.dataclass
class ScoredLosses:
    """Per-example losses in dataset order.

    Attributes:
        reference: `(N,)` losses at θ*.
        members: `(N, M)` losses at each GE member.
        labels: The labels as they were scored, stacked (`(N, ...)`).
        predictions: `(N, ...)` outputs of θ* (logits or probabilities, as the
            model returns them), or None when not requested.
        member_probabilities: `(N, ...)` the members' mean output through the
            loss's link (their mean predicted probabilities for a
            classification loss), or None when predictions were not requested.
    """

    reference: np.ndarray
    members: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray | None
    member_probabilities: np.ndarray | None = None


def _variables(weight_set: WeightSet, prefix: str):
    tv = [
        tf.Variable(w, trainable=False, name=f"{prefix}_t{i}")
        for i, w in enumerate(weight_set.trainable)
    ]
    ntv = [
        tf.Variable(w, trainable=False, name=f"{prefix}_n{i}")
        for i, w in enumerate(weight_set.non_trainable)
    ]
    return tv, ntv


class Scorer:
    """Evaluates θ* and M members batch by batch.

    Args:
        model: The model whose architecture the weight sets belong to.
        loss: The per-example loss.
        reference: θ*'s weights.
        members: The GE members' weights.
        strategy: A validated `tf.distribute.Strategy` to score under, or
            None (one device). Defaults to `None`.
        jit_compile: Compile the one-device step with XLA; off, since it was
            not faster on CPU for small dense or convolutional models
            (docs/design.md#scoring). Defaults to `False`.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: PerExampleLoss,
        reference: WeightSet,
        members: list,
        strategy=None,
        jit_compile: bool = False,
    ):
        self.model = model
        self.loss = loss
        self.strategy = strategy
        self.jit_compile = bool(jit_compile)
        if strategy is None:
            self._ref = _variables(reference, "ref")
            self._members = [_variables(m, f"m{i}") for i, m in enumerate(members)]
        else:
            distribute.check_replica_order(strategy)
            with strategy.scope():
                self._ref = _variables(reference, "ref")
                self._members = [_variables(m, f"m{i}") for i, m in enumerate(members)]
        self._fns = {}
        # Leading layers equal in every weight set run once per batch, not M+1 times.
        self._split = shared_layers(model, [reference, *members])

    def _outputs(self, x, members_only: bool = False) -> list:
        """Inference outputs of θ* then of each member (only the members' if `members_only`)."""
        sets = self._members if members_only else [self._ref, *self._members]
        split = self._split
        if split is None:
            return [stateless_call(self.model, tv, ntv, x, training=False)[0] for tv, ntv in sets]
        shared = split.to_prefix(self._ref)
        features, _ = stateless_call(
            split.prefix, shared.trainable, shared.non_trainable, x, training=False
        )
        outputs = []
        for weights in sets:
            head = split.to_head(weights)
            outputs.append(
                stateless_call(
                    split.head, head.trainable, head.non_trainable, features, training=False
                )[0]
            )
        return outputs

    def _step(self, x, y, with_predictions: bool = False):
        """`(ref_loss, member_losses)`, then with predictions θ*'s output and the
        members' mean probabilities (from the same forward passes)."""
        ref_pred, *member_preds = self._outputs(x)
        losses = [self.loss(y, ref_pred)]  # θ*'s, then each member's
        total = 0.0
        for pred in member_preds:
            losses.append(self.loss(y, pred))
            if with_predictions:
                total += self.loss.probabilities(pred)
        # Rows of non-finite inputs are NaN here and refused by `_check_finite`.
        losses = nan_where_not_finite(x, tf.stack(losses, axis=1))
        if not with_predictions:
            return losses[:, 0], losses[:, 1:]
        mean = nan_where_not_finite(x, total / len(self._members))
        return losses[:, 0], losses[:, 1:], ref_pred, mean

    def function_for(
        self, element_spec, jit_compile: bool | None = None, with_predictions: bool = False
    ):
        """The traced step for `element_spec`, traced at most once."""
        jit_compile = self.jit_compile if jit_compile is None else bool(jit_compile)
        sig = free_batch(element_spec)
        key = (str(sig), jit_compile, bool(with_predictions))
        if key not in self._fns:
            self._fns[key] = compiled(
                lambda x, y: self._step(x, y, with_predictions),
                input_signature=list(sig),
                jit_compile=jit_compile,
            )
        return self._fns[key]

    def forward_for(self, x_spec):
        """θ*'s compiled inference-mode forward pass for inputs of `x_spec`."""
        sig = free_batch(x_spec)
        key = ("forward", str(sig))
        if key not in self._fns:
            self._fns[key] = compiled(
                lambda x: stateless_call(self.model, *self._ref, x, training=False)[0],
                input_signature=[sig],
            )
        return self._fns[key]

    def mean_probabilities_for(self, x_spec):
        """Compiled mean over members of their probabilities, for inputs of `x_spec`.

        Logits go through the loss's link (sigmoid or softmax); probabilities
        are averaged as they are. Rows of non-finite inputs come back NaN.
        """
        sig = free_batch(x_spec)
        key = ("probabilities", str(sig))
        if key not in self._fns:

            def mean_probs(x):
                total = 0.0
                for out in self._outputs(x, members_only=True):
                    total += self.loss.probabilities(out)
                return nan_where_not_finite(x, total / len(self._members))

            self._fns[key] = compiled(mean_probs, input_signature=[sig])
        return self._fns[key]

    def _check_loss(self, first, eager: bool) -> None:
        """`check_per_example` on the first batch, before the step is compiled."""
        x, y = first
        if eager or self.strategy is not None:
            pred = stateless_call(self.model, *self._ref, x)[0]
        else:
            pred = self.forward_for(spec_of(x))(x)
        check_per_example(self.loss, y, pred)

    def _distributed_step(self, x, y, with_predictions: bool):
        """`_step` on every replica's chunk, with the labels; gathered in dataset order."""
        out = self.strategy.run(self._step, args=(x, y, with_predictions))
        return distribute.gather(self.strategy, (out[0], out[1], y, *out[2:]))

    def distributed_function_for(self, element_spec, with_predictions: bool = False):
        """The traced distributed step for a distributed dataset's `element_spec`."""
        key = ("distributed", str(element_spec), bool(with_predictions))
        if key not in self._fns:
            self._fns[key] = compiled(
                lambda x, y: self._distributed_step(x, y, with_predictions),
                input_signature=list(element_spec),
            )
        return self._fns[key]

    def _batches(self, source: DataSource, with_predictions: bool, eager: bool):
        """Yields `(ref (B,), members (B, M), y, predictions)` numpy batches in order.

        `predictions` is `(θ*'s outputs, the members' mean probabilities)` or None.
        """
        if self.strategy is None:
            batches, spec = _ordered_batches(source)
            if eager:
                fn = lambda x, y: self._step(x, y, with_predictions)  # noqa: E731
            else:
                fn = self.function_for(spec, with_predictions=with_predictions)
            for x, y in batches:
                ref_loss, member_losses, *pred = fn(x, y)
                yield ref_loss.numpy(), member_losses.numpy(), np.asarray(y), _numpy(pred)
            return
        dist = distribute.distribute_batches(self.strategy, source.ordered())
        if eager:
            fn = lambda x, y: self._distributed_step(x, y, with_predictions)  # noqa: E731
        else:
            fn = self.distributed_function_for(dist.element_spec, with_predictions)
        for x, y in dist:
            ref_loss, member_losses, labels, *pred = fn(x, y)
            labels = tf.nest.map_structure(np.asarray, labels)
            yield ref_loss.numpy(), member_losses.numpy(), labels, _numpy(pred)

    def iter_batches(
        self,
        source: DataSource,
        *,
        with_predictions: bool = False,
        verbose: int = 0,
        eager: bool = False,
    ):
        """Yields `(offset, reference (B,), members (B, M), y, predictions)` in order.

        `predictions` is `(θ*'s outputs, the members' mean probabilities)` with
        `with_predictions`, else None.

        Checks the loss on the first batch before anything is compiled, every
        batch for non-finite losses, and after the pass that the dataset
        yields the same first batch again (order stable across passes).
        """
        source.check_ordered()
        first = source.first_batch()
        self._check_loss(first, eager)
        bar = source.progress(verbose)
        seen = 0
        batches = self._batches(source, with_predictions, eager)
        while True:
            try:
                ref_loss, member_losses, y, ref_pred = next(batches)
            except StopIteration:
                break
            except tf.errors.InvalidArgumentError as err:
                # A streamed dataset's labels are checked on its first batch only.
                raise ValueError(
                    f"Argument `{source.name}`: the batch from example {seen} on cannot be "
                    f"scored. Received from TensorFlow: {_tf_gist(err)}"
                ) from err
            if seen == 0 and self.strategy is not None:
                _check_gathered_labels(source, first, y)
            _check_finite(ref_loss, member_losses, seen)
            yield seen, ref_loss, member_losses, y, ref_pred
            seen += len(ref_loss)
            bar.advance(len(ref_loss))
        if seen == 0:
            raise ValueError(f"Argument `{source.name}` is empty: it has no examples.")
        if source.num_examples is None:
            source.num_examples = seen
        elif seen != source.num_examples:
            raise ValueError(
                f"Argument `{source.name}` yielded {seen} examples, expected "
                f"{source.num_examples}; the dataset changed between passes."
            )
        if not source.has_arrays:  # arrays cannot change order between passes
            _check_same_first_batch(source, first)

    def score(self, source: DataSource, **options) -> ScoredLosses:
        """Scores every example of `source` once, in order, in memory.

        `options` (`with_predictions`, `verbose`, `eager`) are `iter_batches`'.
        """
        refs, mems, labels, preds, probs = [], [], [], [], []
        for _, ref, members, y, pred in self.iter_batches(source, **options):
            refs.append(ref)
            mems.append(members)
            labels.append(y)
            if pred is not None:
                preds.append(pred[0])
                probs.append(pred[1])
        return ScoredLosses(
            np.concatenate(refs),
            np.concatenate(mems),
            np.concatenate(labels),
            np.concatenate(preds) if preds else None,
            np.concatenate(probs) if probs else None,
        )

    def deviations_to_file(
        self, source: DataSource, path: str, *, reference_floor: float, verbose: int = 0
    ) -> None:
        """Streams Δ into an `(N, M)` float32 `.npy` at `path` with bounded memory."""
        n = source.count_examples()
        m = len(self._members)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, m))
        try:
            for offset, ref, members, _, _ in self.iter_batches(source, verbose=verbose):
                if offset + len(ref) > n:
                    raise ValueError(
                        f"Argument `{source.name}` yielded more than the {n} examples "
                        "counted; the dataset changed between passes."
                    )
                if reference_floor > 0:
                    ref = np.maximum(ref, reference_floor)
                out[offset : offset + len(ref)] = members - ref[:, None]
            out.flush()
        finally:
            del out


def _numpy(pred: list):
    """`(θ*'s outputs, members' mean probabilities)` as numpy, or None when not asked for."""
    return (pred[0].numpy(), pred[1].numpy()) if pred else None


def _ordered_batches(source: DataSource):
    """`(batches, element_spec)`: every example once, in order.

    Arrays are sliced directly (no `tf.data` pipeline to build and iterate:
    that costs more than the forward passes on small data); a dataset is
    iterated as given, prefetched.
    """
    if source.has_arrays:
        return source.array_batches(), source.element_spec
    ds = source.ordered()
    return ds, ds.element_spec


def _check_same_first_batch(source: DataSource, first) -> None:
    """Catches datasets whose order differs between passes (e.g. shuffles)."""
    again = source.first_batch()
    same = all(
        _same(np.asarray(a), np.asarray(b))
        for a, b in zip(*(tf.nest.flatten(t, expand_composites=True) for t in (first, again)))
    )
    if not same:
        raise ValueError(
            f"Argument `{source.name}` yields its examples in a different order on "
            "each iteration, so scores could not be matched to examples. Remove "
            "any shuffling (or use `reshuffle_each_iteration=False`) and any "
            "`deterministic=False`."
        )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays, NaN equal to NaN (a NaN input is reported by the loss check)."""
    floating = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
    return np.array_equal(a, b, equal_nan=floating)


def _check_gathered_labels(source: DataSource, first, gathered) -> None:
    """The first distributed batch must come back as the first batch, in order."""
    if not np.array_equal(np.asarray(first[1]), np.asarray(gathered)):
        raise ValueError(
            f"Argument `{source.name}`: the labels gathered from the replicas differ "
            "from the dataset's first batch, so scores could not be matched to "
            "examples. Pass a dataset whose order is fixed, without a "
            "`tf.data.Options` that allows non-deterministic order."
        )


def _tf_gist(err: Exception) -> str:
    """The first line of a TensorFlow op error, without its function-node prefix.

    >>> _tf_gist(ValueError("{{function_node __f_1}} Received a label value of 12.\\n[[node]]"))
    'Received a label value of 12.'
    """
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)


def _check_finite(reference: np.ndarray, members: np.ndarray, offset: int) -> None:
    bad_ref = ~np.isfinite(reference)
    if bad_ref.any():
        idx = (np.flatnonzero(bad_ref)[:5] + offset).tolist()
        raise ValueError(
            f"The trained model's loss is NaN or inf on {int(bad_ref.sum())} "
            f"example(s) of a batch (dataset indices {idx}). Check those inputs and labels."
        )
    bad = ~np.isfinite(members)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0)).tolist()
        raise ValueError(
            f"Geometric-ensemble member(s) {cols} produce NaN or inf losses; "
            "their fine-tuning diverged. Collect the ensemble again with a "
            "smaller `learning_rate` (or the default 'auto')."
        )
