"""Leading layers that every member shares, computed once instead of per member.

A member only moves trainable weights, so layers that hold none, draw nothing
at random and behave the same in training and inference compute the same
features for an example at every step of every member (`frozen_layers`). When
scoring, every weight set runs in inference mode, so layers whose weights are
equal in θ* and every member give them all the same features
(`shared_layers`). On a head over a frozen backbone (transfer learning) those
layers are most of the cost: fine-tuning runs on the backbone's features,
computed once, and scoring runs the backbone once per batch instead of M+1
times.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from keras_gex._tracing import compiled
from keras_gex.data import DataSource
from keras_gex.weights import WeightSet

#: Features are computed this many examples at a time.
_FEATURE_BATCH = 256


@dataclasses.dataclass
class ModelSplit:
    """`model = head ∘ prefix`, cut at one tensor after the model's single input.

    Attributes:
        prefix: `keras.Model` from the model's input to the cut.
        head: `keras.Model` from the cut to the model's output. Both share the
            model's layers (and variables).
        names: The prefix's layers, in order.
        head_index, prefix_index: `(trainable, non_trainable)` positions in
            `model.trainable_variables` / `model.non_trainable_variables` of
            the head's / the prefix's variables, in their own order.
    """

    prefix: keras.Model
    head: keras.Model
    names: list
    head_index: tuple
    prefix_index: tuple

    @classmethod
    def cut(cls, model, graph, chain: list) -> ModelSplit:
        cut = chain[-1][1]
        prefix = keras.Model(graph.inputs[0], cut)
        head = keras.Model(cut, graph.output)
        return cls(
            prefix,
            head,
            [layer.name for layer, _ in chain],
            _index(head, model),
            _index(prefix, model),
        )

    def to_head(self, weights: WeightSet) -> WeightSet:
        """The head's part of a `WeightSet` (or a pair of variable lists) of the model."""
        return _take(weights, self.head_index)

    def to_prefix(self, weights: WeightSet) -> WeightSet:
        """The prefix's part of a `WeightSet` (or a pair of variable lists) of the model."""
        return _take(weights, self.prefix_index)

    def to_model(self, head_weights: WeightSet, model_weights: WeightSet) -> WeightSet:
        """`model_weights` with the head's variables taken from `head_weights`."""
        trainable, non_trainable = list(model_weights.trainable), list(model_weights.non_trainable)
        for i, w in zip(self.head_index[0], head_weights.trainable):
            trainable[i] = w
        for i, w in zip(self.head_index[1], head_weights.non_trainable):
            non_trainable[i] = w
        return WeightSet(trainable, non_trainable)

    def features(self, source: DataSource) -> DataSource:
        """`source` (arrays) with its inputs replaced by the prefix's outputs, in order."""
        x, y = source.arrays
        x = tf.nest.flatten(x)[0]
        spec = tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype))
        forward = compiled(lambda batch: self.prefix(batch, training=False), input_signature=[spec])
        parts = [
            np.asarray(forward(tf.constant(x[start : start + _FEATURE_BATCH])))
            for start in range(0, len(y), _FEATURE_BATCH)
        ]
        features = np.concatenate(parts)
        return DataSource((features, y), batch_size=source.batch_size, name=source.name)

    def describe(self) -> str:
        shape = tuple(self.head.inputs[0].shape[1:])
        return f"{', '.join(self.names)} (frozen), computed once: features of shape {shape}"


def frozen_layers(model, source: DataSource, max_bytes: int) -> ModelSplit | None:
    """The longest chain of frozen layers from the input worth computing once, or None.

    A layer is frozen when it holds no trainable weight and no random
    generator; the chain is cut before the first layer that fails
    `_is_constant` on the first batch of `source`. None for subclassed models
    (no graph to cut), several inputs, a chain that holds no weights (nothing
    costly to save) or features of more than `max_bytes`.
    """
    if not source.has_arrays or len(tf.nest.flatten(source.arrays[0])) != 1:
        return None
    graph = _graph(model)
    if graph is None:
        return None

    def frozen(layer):
        return not layer.trainable_weights and not any(
            v.name == "seed_generator_state" for v in layer.variables
        )

    chain = _chain(graph, frozen)
    x = tf.nest.flatten(source.first_batch()[0])[0]
    while chain and not _is_constant(keras.Model(graph.inputs[0], chain[-1][1]), x):
        chain.pop()
    if not any(layer.weights for layer, _ in chain):
        return None  # nothing costly to save (also: no chain at all)
    cut = chain[-1][1]
    if not cut.shape[1:] or None in cut.shape[1:]:
        return None
    example_bytes = np.dtype(cut.dtype).itemsize * math.prod(cut.shape[1:])
    if example_bytes * source.count_examples() > max_bytes:
        return None
    return ModelSplit.cut(model, graph, chain)


def shared_layers(model, weight_sets: list) -> ModelSplit | None:
    """The longest chain of layers from the input with the same weights in every set.

    In inference mode such layers compute the same for every weight set, so
    the scorer runs them once per batch. None for subclassed models, several
    inputs, or a chain that holds no weights.
    """
    graph = _graph(model)
    if graph is None or len(weight_sets) < 2:
        return None
    positions = _index_of(model)

    def shared(layer):
        for kind, i in (positions[id(v)] for v in layer.variables if id(v) in positions):
            first = getattr(weight_sets[0], kind)[i]
            if any(not np.array_equal(getattr(w, kind)[i], first) for w in weight_sets[1:]):
                return False
        return True

    chain = _chain(graph, shared)
    if not any(layer.weights for layer, _ in chain):
        return None
    return ModelSplit.cut(model, graph, chain)


def _graph(model):
    """The model's functional graph with a single input, or None."""
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if not hasattr(graph, "_nodes_by_depth") or len(graph.inputs) != 1:
        return None
    return graph


def _chain(graph, keep) -> list:
    """`[(layer, its output)]`: the chain of layers from the graph's input that `keep`.

    The chain follows the input while exactly one layer consumes the current
    tensor, with one input and one output that is not the model's, and
    `keep(layer)`: the head keeps at least the output layer.
    """
    nodes = [node for depth in graph._nodes_by_depth.values() for node in depth]
    outputs = {id(t) for t in graph.outputs}
    current, chain = graph.inputs[0], []
    while True:
        consumers = [n for n in nodes if any(t is current for t in n.input_tensors)]
        if len(consumers) != 1:
            break
        node = consumers[0]
        if (
            len(node.input_tensors) != 1
            or len(node.outputs) != 1
            or id(node.outputs[0]) in outputs
            or not keep(node.operation)
        ):
            break
        current = node.outputs[0]
        chain.append((node.operation, current))
    return chain


def _is_constant(prefix: keras.Model, x) -> bool:
    """Whether the prefix computes the same in training, changes no state, adds no loss.

    Checked on one batch: catches layers that act differently when training
    (a BatchNorm without scale and offset, custom layers) which the
    structural test cannot see.
    """
    ntv = [v.value for v in prefix.non_trainable_variables]
    trained, new_ntv, losses = prefix.stateless_call([], ntv, x, training=True, return_losses=True)
    inferred, _ = prefix.stateless_call([], ntv, x, training=False)
    same = np.allclose(np.asarray(trained), np.asarray(inferred), rtol=1e-5, atol=1e-6)
    kept = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ntv, new_ntv))
    return bool(same and kept and not losses)


def _index_of(model) -> dict:
    """`{id(variable): ("trainable" | "non_trainable", position)}` in `model`."""
    out = {id(v): ("trainable", i) for i, v in enumerate(model.trainable_variables)}
    out.update({id(v): ("non_trainable", i) for i, v in enumerate(model.non_trainable_variables)})
    return out


def _index(part: keras.Model, model) -> tuple:
    positions = _index_of(model)
    return (
        [positions[id(v)][1] for v in part.trainable_variables],
        [positions[id(v)][1] for v in part.non_trainable_variables],
    )


def _take(weights, index: tuple) -> WeightSet:
    trainable, non_trainable = (
        weights
        if isinstance(weights, tuple)
        else (
            weights.trainable,
            weights.non_trainable,
        )
    )
    return WeightSet([trainable[i] for i in index[0]], [non_trainable[i] for i in index[1]])
