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

from keras_gex._tracing import compiled, forward_flops
from keras_gex.collection.tuner import is_seed_state
from keras_gex.data import DataSource
from keras_gex.weights import WeightSet, stateless_call

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
    def at(cls, model, graph, cut: tuple) -> ModelSplit:
        """The split at `cut`, a `(layers, tensor)` of `_cuts`."""
        layers, tensor = cut
        prefix = keras.Model(graph.inputs[0], tensor)
        head = keras.Model(tensor, graph.output)
        positions = _index_of(model)
        return cls(
            prefix,
            head,
            [layer.name for layer in layers],
            _index(head, positions),
            _index(prefix, positions),
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
        return f"{layer_list(self.names)} (frozen), computed once: features of shape {shape}"

    def step_cost(self) -> float:
        """The share of one of θ*'s training steps that a member's step costs.

        θ*'s step ran the frozen prefix forward and the head forward and
        backward; a member's step on the features runs only the head. With
        the forward float operations `F` of the prefix and `H` of the head
        (a backward pass about twice its forward), `3H / (F + 3H)`; 1 where
        either count is unknown. A prefix that was trained with θ* cost more
        than `F`: the share is then an upper bound.
        """
        prefix, head = forward_flops(self.prefix), forward_flops(self.head)
        if not prefix or not head:
            return 1.0
        return step_cost_share(prefix, head)


def step_cost_share(prefix_flops: int, head_flops: int) -> float:
    """`3H / (F + 3H)`: a head step's share of a step through prefix and head.

    >>> step_cost_share(prefix_flops=0, head_flops=10)
    1.0
    >>> step_cost_share(prefix_flops=300, head_flops=100)
    0.5
    """
    return 3 * head_flops / (prefix_flops + 3 * head_flops)


def layer_list(names: list) -> str:
    """Layer names for a log line: all of up to three, else the first and last.

    >>> layer_list(["backbone"]), layer_list(["conv1", "bn1", "relu1", "pool"])
    ('backbone', 'conv1 ... pool (4 layers)')
    """
    if len(names) > 3:
        return f"{names[0]} ... {names[-1]} ({len(names)} layers)"
    return ", ".join(names)


def frozen_layers(model, source: DataSource, max_bytes: int) -> ModelSplit | None:
    """The largest frozen part of `model` from its input worth computing once, or None.

    A layer is frozen when it holds no trainable weight and no random
    generator; the part is cut at the last tensor every path to the output
    passes through (`_cuts`) whose part also passes `_is_constant` on the
    first batch of `source`. None for subclassed models (no graph to cut),
    several inputs, a part that holds no weights (nothing costly to save) or
    features of more than `max_bytes`.
    """
    if not source.has_arrays or len(tf.nest.flatten(source.arrays[0])) != 1:
        return None
    graph = _graph(model)
    if graph is None:
        return None

    def frozen(layer):
        return not layer.trainable_weights and not any(map(is_seed_state, layer.variables))

    cuts = _cuts(graph, frozen)
    x = tf.nest.flatten(source.first_batch()[0])[0]
    while cuts and not _is_constant(keras.Model(graph.inputs[0], cuts[-1][1]), x):
        cuts.pop()
    if not cuts or not _holds_weights(cuts[-1][0]):
        return None  # nothing costly to save
    tensor = cuts[-1][1]
    if not tensor.shape[1:] or None in tensor.shape[1:]:
        return None
    example_bytes = np.dtype(tensor.dtype).itemsize * math.prod(tensor.shape[1:])
    if example_bytes * source.count_examples() > max_bytes:
        return None
    return ModelSplit.at(model, graph, cuts[-1])


def shared_layers(model, weight_sets: list) -> ModelSplit | None:
    """The largest part of `model` from its input with the same weights in every set.

    In inference mode such layers compute the same for every weight set (a
    random layer draws nothing there, whatever its generator state), so the
    scorer runs them once per batch. None for subclassed models, several
    inputs, or a part that holds no weights.
    """
    graph = _graph(model)
    if graph is None or len(weight_sets) < 2:
        return None
    positions = _index_of(model)

    def shared(layer):
        # Random layers draw nothing in inference: their generator states may differ.
        variables = [v for v in layer.variables if not is_seed_state(v)]
        for kind, i in (positions[id(v)] for v in variables if id(v) in positions):
            first = getattr(weight_sets[0], kind)[i]
            if any(not np.array_equal(getattr(w, kind)[i], first) for w in weight_sets[1:]):
                return False
        return True

    cuts = _cuts(graph, shared)
    if not cuts or not _holds_weights(cuts[-1][0]):
        return None
    return ModelSplit.at(model, graph, cuts[-1])


def _holds_weights(layers: list) -> bool:
    """Whether `layers` hold weights (a random layer's generator state is none)."""
    return any(not is_seed_state(v) for layer in layers for v in layer.variables)


def layer_graph(model):
    """The graph of layers of a functional model, or of a built Sequential's; None otherwise.

    A subclassed model has none: Keras can neither cut nor clone it layer by layer.
    """
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    return graph if hasattr(graph, "_nodes_by_depth") else None


def _graph(model):
    """The model's functional graph with a single input, or None."""
    graph = layer_graph(model)
    if graph is None or len(graph.inputs) != 1:
        return None
    return graph


def _cuts(graph, keep) -> list:
    """`[(layers, tensor)]`: every tensor the graph can be cut at, nearest the input first.

    Layers are taken in topological order while `keep(layer)`; after each, the
    tensors of the part taken that layers outside it still read (or that are
    the model's output) are its frontier. A frontier of one tensor that is not
    the output is a cut: every path from the input to the output passes
    through it (after a whole residual block, not inside one), and the head
    keeps at least the output layer.
    """
    nodes = [
        node
        for depth in sorted(graph._nodes_by_depth, reverse=True)  # inputs first
        for node in graph._nodes_by_depth[depth]
        if node.operation is not None and not node.is_input
    ]
    outputs = {id(t) for t in graph.outputs}
    readers = {}  # tensor id: the nodes not yet taken that read it
    for node in nodes:
        for t in node.input_tensors:
            readers.setdefault(id(t), set()).add(id(node))
    frontier = {id(graph.inputs[0]): graph.inputs[0]}  # by id: the part's tensors read outside
    layers, cuts = [], []
    for node in nodes:
        if not keep(node.operation):
            break
        layers.append(node.operation)
        for t in node.input_tensors:
            readers[id(t)].discard(id(node))
            if not readers[id(t)] and id(t) not in outputs:
                frontier.pop(id(t), None)
        for t in node.outputs:
            if readers.get(id(t)) or id(t) in outputs:
                frontier[id(t)] = t
        if len(frontier) == 1 and next(iter(frontier)) not in outputs:
            cuts.append((list(layers), next(iter(frontier.values()))))
    return cuts


def _is_constant(prefix: keras.Model, x) -> bool:
    """Whether the prefix computes the same in training, changes no state, adds no loss.

    Checked on one batch: catches layers that act differently when training
    (a BatchNorm without scale and offset, custom layers) which the
    structural test cannot see.
    """
    ntv = [v.value for v in prefix.non_trainable_variables]
    trained, new_ntv, losses = stateless_call(prefix, [], ntv, x, training=True, return_losses=True)
    inferred, _ = stateless_call(prefix, [], ntv, x, training=False)
    same = np.allclose(np.asarray(trained), np.asarray(inferred), rtol=1e-5, atol=1e-6)
    kept = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ntv, new_ntv))
    return bool(same and kept and not losses)


def _index_of(model) -> dict:
    """`{id(variable): ("trainable" | "non_trainable", position)}` in `model`."""
    out = {id(v): ("trainable", i) for i, v in enumerate(model.trainable_variables)}
    out.update({id(v): ("non_trainable", i) for i, v in enumerate(model.non_trainable_variables)})
    return out


def _index(part: keras.Model, positions: dict) -> tuple:
    """`(trainable, non_trainable)` positions of `part`'s variables, from `_index_of`."""
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
