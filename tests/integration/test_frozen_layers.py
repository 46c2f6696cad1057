"""Leading frozen layers computed once (`CollectionConfig.frozen_features`).

Two routes agree: members fine-tuned on the frozen layers' features equal
members that run those layers at every step; layers that could change the
features between steps are never cached.
"""

import copy

import keras
import numpy as np
import pytest
from test_distribute import assert_weights_close, mirrored
from tolerances import DATA_PARALLEL_ATOL, PER_REPLICA_ATOL, SCORE_ATOL, SCORE_RTOL

import keras_gex
from keras_gex._tracing import forward_flops
from keras_gex.collection.frozen import frozen_layers, shared_layers
from keras_gex.data import DataSource
from keras_gex.scoring import Scorer

layers = keras.layers
COLLECT = dict(num_members=2, steps=12, learning_rate=0.05, seed=0, bn_batches=2, verbose=0)


def backbone(name="backbone"):
    """Dense → BatchNorm → ReLU, frozen after one short fit."""
    return keras.Sequential(
        [layers.Dense(32), layers.BatchNormalization(), layers.ReLU()], name=name
    )


def frozen_head_model(digits, head=None, functional=True, seed=0):
    """A pretrained backbone, frozen, under a trainable head trained on the labels."""
    head = head or (layers.Dense(10),)
    keras.utils.set_random_seed(seed)
    x, y = digits.x_train[:300], digits.y_train[:300]
    base = backbone()
    pre = keras.Sequential([keras.Input((64,)), base, layers.Dense(10)])
    pre.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pre.fit(x, y, epochs=2, verbose=0)
    base.trainable = False
    if functional:
        inputs = keras.Input((64,))
        h = base(inputs, training=False)
        for layer in head:
            h = layer(h)
        model = keras.Model(inputs, h)
    else:
        model = keras.Sequential([keras.Input((64,)), base, *head])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, verbose=0)
    return model, (x, y)


def assert_same_members(a, b, atol):
    """θ* as scored and every member of two ensembles agree to `atol`."""
    assert_weights_close([a.reference, *a.members], [b.reference, *b.members], atol)


@pytest.mark.slow
@pytest.mark.parametrize("functional", [True, False])
def test_members_on_features_equal_members_through_the_frozen_layers(digits, functional):
    head = (layers.Dense(16), layers.BatchNormalization(), layers.Dropout(0.2), layers.Dense(10))
    model, data = frozen_head_model(digits, head, functional)
    cached = keras_gex.GeometricEnsemble.collect(model, data, **COLLECT)
    direct = keras_gex.GeometricEnsemble.collect(model, data, frozen_features=False, **COLLECT)
    assert cached.record.frozen_layers == ["backbone"]
    assert direct.record.frozen_layers is None
    summary = keras_gex.detect_noisy(data, cached, verbose=0).summary(print_fn=None)
    assert "frozen layers computed once for every member: backbone" in summary
    assert_same_members(cached, direct, PER_REPLICA_ATOL)
    # The frozen weights travel with every member, unchanged.
    frozen = {id(v) for v in model.get_layer("backbone").weights}
    for i, v in enumerate(model.non_trainable_variables):
        if id(v) in frozen:
            for member in cached.members:
                np.testing.assert_array_equal(member.non_trainable[i], v.numpy())


@pytest.mark.slow
def test_chain_and_resume_on_features_equal_the_direct_route(digits, tmp_path):
    model, data = frozen_head_model(digits, (layers.Dense(16, activation="relu"), layers.Dense(10)))
    settings = dict(COLLECT, num_members=3, chain=True)
    direct = keras_gex.GeometricEnsemble.collect(model, data, frozen_features=False, **settings)
    # Two members written, then resumed from the store: the chain restarts from member 2.
    keras_gex.GeometricEnsemble.collect(
        model, data, directory=tmp_path, **dict(settings, num_members=2)
    )
    resumed = keras_gex.GeometricEnsemble.collect(model, data, directory=tmp_path, **settings)
    assert_same_members(resumed, direct, PER_REPLICA_ATOL)
    loaded = keras_gex.GeometricEnsemble.load(tmp_path, model)
    assert loaded.record.frozen_layers == ["backbone"]
    assert_same_members(loaded, direct, PER_REPLICA_ATOL)


@pytest.mark.slow
def test_data_parallel_members_on_features_equal_one_device(digits):
    model, data = frozen_head_model(digits)
    single = keras_gex.GeometricEnsemble.collect(model, data, **COLLECT)
    parallel = keras_gex.GeometricEnsemble.collect(model, data, strategy=mirrored(2), **COLLECT)
    assert parallel.record.frozen_layers == ["backbone"]
    assert_same_members(parallel, single, DATA_PARALLEL_ATOL)


def find(model, data):
    return frozen_layers(model, DataSource(data), max_bytes=2**30)


@pytest.mark.slow
def test_a_member_step_on_the_features_costs_the_heads_share_of_a_training_step(digits):
    """θ*'s step ran backbone and head, a member's runs the head: `3H / (F + 3H)`
    of the forward float operations, and `num_members="auto"` counts steps so."""
    model, data = frozen_head_model(digits)  # Dense 64→32, BN, ReLU frozen; Dense 32→10
    split = find(model, data)
    prefix, head = forward_flops(split.prefix), forward_flops(split.head)
    assert prefix >= 2 * 64 * 32 and 2 * 32 * 10 <= head < prefix  # multiply-adds count 2
    assert split.step_cost() == pytest.approx(3 * head / (prefix + 3 * head))
    assert split.step_cost() < 0.5
    # θ*'s 60 steps pay for 5 members of 12 steps through the whole model, and
    # for more than twice as many head steps: the cap of 8.
    model.optimizer.iterations.assign(60)
    auto = dict(COLLECT, num_members="auto")
    direct = keras_gex.GeometricEnsemble.collect(model, data, frozen_features=False, **auto)
    cached = keras_gex.GeometricEnsemble.collect(model, data, **auto)
    assert (direct.num_members, cached.num_members) == (5, 8)


def residual_model(digits):
    """The model's own frozen layers with a residual branch, then a trainable head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    stem = layers.Dense(32, activation="relu", trainable=False)(inputs)
    branch = layers.Dense(32, activation="relu", trainable=False)(stem)
    block = layers.Add()([stem, branch])
    model = keras.Model(inputs, layers.Dense(10)(layers.Dense(16, activation="relu")(block)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = digits.x_train[:300], digits.y_train[:300]
    model.fit(x, y, epochs=3, verbose=0)
    return model, (x, y)


def test_a_residual_block_of_the_models_own_layers_is_cut_after_the_block(digits):
    model, data = residual_model(digits)
    found = find(model, data)
    assert len(found.names) == 3 and found.names[-1].startswith("add")
    assert tuple(found.head.inputs[0].shape) == (None, 32)
    cached = keras_gex.GeometricEnsemble.collect(model, data, **COLLECT)
    direct = keras_gex.GeometricEnsemble.collect(model, data, frozen_features=False, **COLLECT)
    assert_same_members(cached, direct, PER_REPLICA_ATOL)


def test_layers_that_change_between_steps_are_not_cached(digits):
    x, y = digits.x_train[:64], digits.y_train[:64]

    def built(*stack):
        return keras.Sequential([keras.Input((64,)), *stack, layers.Dense(10)])

    def frozen(layer):
        layer.trainable = False
        return layer

    # A random layer ahead of the frozen ones: every step draws another input.
    assert find(built(layers.GaussianNoise(0.1), frozen(layers.Dense(8))), (x, y)) is None
    # BatchNorm without scale or offset holds no trainable weight, yet learns
    # its statistics in training: caught on the first batch, the chain stops before it.
    dense = frozen(layers.Dense(8))
    found = find(built(dense, layers.BatchNormalization(center=False, scale=False)), (x, y))
    assert found.names == [dense.name]
    # Nothing costly to save: layers without weights.
    assert find(built(layers.Flatten(), layers.Dense(8)), (x, y)) is None
    # A trainable first layer.
    assert find(built(layers.Dense(8), frozen(layers.Dense(8))), (x, y)) is None


def test_models_without_a_single_input_chain_are_not_cut(digits):
    x, y = digits.x_train[:64], digits.y_train[:64]

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.base = keras.layers.Dense(8, trainable=False)
            self.head = keras.layers.Dense(10)

        def call(self, inputs):
            return self.head(self.base(inputs))

    subclassed = Subclassed()
    subclassed(x[:2])
    assert find(subclassed, (x, y)) is None
    a, b = keras.Input((64,), name="a"), keras.Input((64,), name="b")
    shared = keras.layers.Dense(8, trainable=False)
    two_inputs = keras.Model({"a": a, "b": b}, layers.Dense(10)(shared(a) + shared(b)))
    assert find(two_inputs, ({"a": x, "b": x}, y)) is None
    # The input feeding two branches: no single tensor to cut at.
    inputs = keras.Input((64,))
    branched = keras.Model(
        inputs, layers.Dense(10)(layers.Concatenate()([shared(inputs), layers.Dense(4)(inputs)]))
    )
    assert find(branched, (x, y)) is None


def test_frozen_features_must_be_a_bool():
    with pytest.raises(ValueError, match="`frozen_features` must be a bool"):
        keras_gex.CollectionConfig(frozen_features="yes")


@pytest.mark.slow
def test_scores_through_shared_layers_equal_full_forward_passes(digits):
    model, data = frozen_head_model(digits, (layers.Dense(16, activation="relu"), layers.Dense(10)))
    ensemble = keras_gex.GeometricEnsemble.collect(model, data, **COLLECT)
    scorer = Scorer(model, ensemble.loss, ensemble.reference, ensemble.members)
    assert scorer._split.names == ["backbone"]
    full = Scorer(model, ensemble.loss, ensemble.reference, ensemble.members)
    full._split = None
    a = scorer.score(DataSource(data), with_predictions=True)
    b = full.score(DataSource(data), with_predictions=True)
    np.testing.assert_allclose(a.reference, b.reference, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(a.members, b.members, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(
        a.member_probabilities, b.member_probabilities, rtol=SCORE_RTOL, atol=SCORE_ATOL
    )


def test_layers_whose_weights_differ_between_members_are_not_shared(digits):
    model, data = frozen_head_model(digits)
    ensemble = keras_gex.GeometricEnsemble.collect(model, data, **COLLECT)
    moved = [copy.deepcopy(m) for m in ensemble.members]
    moved[1].non_trainable[0] = moved[1].non_trainable[0] + 1.0  # a backbone weight
    assert shared_layers(model, [ensemble.reference, *moved]) is None
    assert shared_layers(model, [ensemble.reference, *ensemble.members]).names == ["backbone"]


def test_augmentation_ahead_of_a_frozen_backbone_is_shared_when_scoring(digits):
    """Members fine-tune through the noise layer, but score past it once per batch."""
    keras.utils.set_random_seed(0)
    x, y = digits.x_train[:300], digits.y_train[:300]
    base = backbone()
    inputs = keras.Input((64,))
    base(inputs)
    base.trainable = False
    h = base(layers.GaussianNoise(0.1)(inputs), training=False)
    model = keras.Model(inputs, layers.Dense(10)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    ensemble = keras_gex.GeometricEnsemble.collect(model, (x, y), **COLLECT)
    assert ensemble.record.frozen_layers is None  # the noise differs at every step
    found = shared_layers(model, [ensemble.reference, *ensemble.members])
    assert found is not None and found.names[-1] == "backbone"
