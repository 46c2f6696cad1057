"""`WeightSet`: one point in weight space (θ* or a GE member) as NumPy arrays."""

from __future__ import annotations

import dataclasses

import numpy as np


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
