"""`WeightSet`: one point in weight space (θ* or a GE member) as NumPy arrays."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np


def stateless_call(model, trainable, non_trainable, *args, training=None, **kwargs):
    """`model.stateless_call` with `training=` as `fit` gives it, whatever `call()` declares.

    `Layer.__call__` passes `training` only to a `call()` that takes it, and
    sets it for the layers inside through Keras' call context, so `fit` trains
    a subclassed model written `call(self, x)` with its dropout and BatchNorm
    in training mode. `stateless_call` hands keyword arguments to `call()` as
    they are, which such a model refuses; it is run through `model(...)` in a
    `keras.StatelessScope` instead, the same state mapping `stateless_call` uses.

    >>> import keras
    >>> class Summing(keras.Model):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.dense = keras.layers.Dense(1, kernel_initializer="ones")
    ...     def call(self, x):  # no `training`
    ...         return self.dense(x)
    >>> model = Summing()
    >>> _ = model(np.ones((1, 2)))
    >>> weights = model.trainable_variables
    >>> out, _ = stateless_call(model, weights, [], np.ones((1, 2)), training=False)
    >>> np.asarray(out).tolist()
    [[2.0]]
    """
    if training is None or _takes_training(model):
        if training is not None:
            kwargs["training"] = training
        outputs, *rest = model.stateless_call(trainable, non_trainable, *args, **kwargs)
        return (sole_output(outputs), *rest)
    import keras

    return_losses = kwargs.pop("return_losses", False)
    mapping = [*zip(model.trainable_variables, trainable)]
    mapping += zip(model.non_trainable_variables, non_trainable)
    with keras.StatelessScope(state_mapping=mapping, collect_losses=return_losses) as scope:
        outputs = model(*args, training=training, **kwargs)
        losses = model.losses if return_losses else None
    new_non_trainable = [scope.get_current_value(v) for v in model.non_trainable_variables]
    outputs = sole_output(outputs)
    if return_losses:
        return outputs, new_non_trainable, losses
    return outputs, new_non_trainable


def sole_output(outputs):
    """The one output of a model that returns it named or in a list of one.

    A functional model built `keras.Model(x, {"label": logits})` (or `[logits]`)
    is a single-output model whose call returns a dict (list) of one tensor;
    every computation here takes the tensor itself. Anything else is returned
    as it is.

    >>> sole_output({"label": 1.0}), sole_output([2.0]), sole_output(3.0)
    (1.0, 2.0, 3.0)
    """
    if isinstance(outputs, (dict, list, tuple)) and len(outputs) == 1:
        return next(iter(outputs.values())) if isinstance(outputs, dict) else outputs[0]
    return outputs


def _takes_training(model) -> bool:
    names = getattr(model, "call_signature_parameters", None)
    if names is None:
        names = list(inspect.signature(model.call).parameters)
    return "training" in names


@dataclasses.dataclass
class WeightSet:
    """The trainable and non-trainable variables of one model state.

    Stored as NumPy arrays in the order of `model.trainable_variables` and
    `model.non_trainable_variables`, so any model of the same architecture can
    evaluate them with `model.stateless_call`.
    """

    trainable: list
    non_trainable: list

    @classmethod
    def from_model(cls, model) -> WeightSet:
        return cls(
            [np.array(v.numpy()) for v in model.trainable_variables],
            [np.array(v.numpy()) for v in model.non_trainable_variables],
        )

    @classmethod
    def from_variables(cls, trainable, non_trainable) -> WeightSet:
        return cls(
            [np.array(v.numpy()) for v in trainable],
            [np.array(v.numpy()) for v in non_trainable],
        )

    def is_finite(self) -> bool:
        return all(
            np.all(np.isfinite(w))
            for w in self.trainable + self.non_trainable
            if np.issubdtype(w.dtype, np.floating)
        )

    def distance(self, other: WeightSet) -> float:
        """Euclidean distance between the trainable parts."""
        sq = sum(
            float(np.sum((a.astype(np.float64) - b) ** 2))
            for a, b in zip(self.trainable, other.trainable)
        )
        return sq**0.5
