"""The compiled scorer: per-example losses of θ* and every GE member, batched.

One `tf.function` per input signature evaluates the reference and all M
members on a batch with `model.stateless_call` (no weight assignment, the
user's model variables are never touched), so scoring costs M+1 forward
passes. Results are concatenated in dataset order.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_gex.data import DataSource
from keras_gex.losses import PerExampleLoss, check_per_example
from keras_gex.weights import WeightSet


@dataclasses.dataclass
class ScoredLosses:
    """Per-example losses in dataset order.

    Attributes:
        reference: `(N,)` losses at θ*.
        members: `(N, M)` losses at each GE member.
        labels: The labels as they were scored, stacked (`(N, ...)`).
        predictions: `(N, ...)` outputs of θ* (logits or probabilities, as the
            model returns them), or None when not requested.
    """

    reference: np.ndarray
    members: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray | None


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


def _signature(spec):
    """The element spec with a free batch dimension (one trace per dataset)."""

    def relax(s):
        if isinstance(s, tf.TensorSpec) and s.shape.rank:
            return tf.TensorSpec([None, *s.shape[1:]], s.dtype)
        return s

    return tf.nest.map_structure(relax, spec)


class Scorer:
    """Evaluates θ* and M members batch by batch.

    Args:
        model: The model whose architecture the weight sets belong to.
        loss: The per-example loss.
        reference: θ*'s weights.
        members: The GE members' weights.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: PerExampleLoss,
        reference: WeightSet,
        members: list,
    ):
        self.model = model
        self.loss = loss
        self._ref = _variables(reference, "ref")
        self._members = [_variables(m, f"m{i}") for i, m in enumerate(members)]
        self._fns = {}

    def _step(self, x, y):
        ref_pred, _ = self.model.stateless_call(*self._ref, x, training=False)
        ref_loss = self.loss(y, ref_pred)
        losses = []
        for tv, ntv in self._members:
            pred, _ = self.model.stateless_call(tv, ntv, x, training=False)
            losses.append(self.loss(y, pred))
        return ref_loss, tf.stack(losses, axis=1), ref_pred

    def function_for(self, element_spec, jit_compile: bool = False):
        """The traced step for `element_spec`, traced at most once."""
        sig = _signature(element_spec)
        key = (str(sig), jit_compile)
        if key not in self._fns:
            self._fns[key] = tf.function(
                self._step, input_signature=list(sig), jit_compile=jit_compile
            )
        return self._fns[key]

    def score(
        self,
        source: DataSource,
        *,
        with_predictions: bool = False,
        verbose: int = 0,
        eager: bool = False,
    ) -> ScoredLosses:
        """Scores every example of `source` once, in order."""
        source.check_ordered()
        ds = source.ordered()
        first = source.first_batch()
        check_per_example(self.loss, first[1], self.model.stateless_call(*self._ref, first[0])[0])
        fn = self._step if eager else self.function_for(ds.element_spec)
        total = source.num_examples
        bar = keras.utils.Progbar(total, unit_name="example") if verbose else None
        refs, mems, labels, preds = [], [], [], []
        seen = 0
        for x, y in ds:
            ref_loss, member_losses, ref_pred = fn(x, y)
            refs.append(ref_loss.numpy())
            mems.append(member_losses.numpy())
            labels.append(np.asarray(y))
            if with_predictions:
                preds.append(ref_pred.numpy())
            seen += len(refs[-1])
            if bar is not None:
                bar.update(seen)
        if seen == 0:
            raise ValueError(f"Argument `{source.name}` is empty: it has no examples.")
        if source.num_examples is None:
            source.num_examples = seen
        elif seen != source.num_examples:
            raise ValueError(
                f"Argument `{source.name}` yielded {seen} examples, expected "
                f"{source.num_examples}; the dataset changed between passes."
            )
        _check_same_first_batch(source, first)
        result = ScoredLosses(
            np.concatenate(refs),
            np.concatenate(mems),
            np.concatenate(labels),
            np.concatenate(preds) if with_predictions else None,
        )
        _check_finite(result)
        return result


def _check_same_first_batch(source: DataSource, first) -> None:
    """Catches datasets whose order differs between passes (e.g. shuffles)."""
    again = source.first_batch()
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again))
    )
    if not same:
        raise ValueError(
            f"Argument `{source.name}` yields its examples in a different order on "
            "each iteration, so scores could not be matched to examples. Remove "
            "any shuffling (or use `reshuffle_each_iteration=False`)."
        )


def _check_finite(result: ScoredLosses) -> None:
    bad_ref = ~np.isfinite(result.reference)
    if bad_ref.any():
        idx = np.flatnonzero(bad_ref)[:5].tolist()
        raise ValueError(
            f"The trained model's loss is NaN or inf on {int(bad_ref.sum())} "
            f"example(s) (first indices {idx}). Check those inputs and labels."
        )
    bad = ~np.isfinite(result.members)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0)).tolist()
        raise ValueError(
            f"Geometric-ensemble member(s) {cols} produce NaN or inf losses; "
            "their fine-tuning diverged. Collect the ensemble again with a "
            "smaller `learning_rate` (or the default 'auto')."
        )
