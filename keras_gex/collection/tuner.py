"""What every fine-tuner shares: the schedule, the SGD update, BatchNorm moments.

A member takes `steps` steps of SGD with momentum and a cosine-decayed step
size from θ*. All updates go to private variables through
`model.stateless_call`: the user's model, its weights and its optimizer state
are never modified. After fine-tuning, BatchNorm moving statistics are
re-estimated as population statistics over a few training batches; otherwise
a member's inference-mode predictions are meaningless.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from keras_gex.weights import WeightSet

#: `steps="auto"`: each member fine-tunes for about `STEP_EPOCHS` passes over
#: the training data (fewer leave memorised examples unforgotten), within
#: [`MIN_STEPS`, `MAX_STEPS`]; the cap is the paper's 800 steps. Measured in
#: docs/design.md#step-epochs.
STEP_EPOCHS = 10
MIN_STEPS = 50
MAX_STEPS = 800


def resolve_steps(steps, num_examples: int, batch_size: int) -> int:
    """SGD steps per member: `steps`, or for `"auto"` about `STEP_EPOCHS` epochs.

    `"auto"` gives `STEP_EPOCHS` passes over `num_examples` at the batch size
    used (`batch_size`, at most `num_examples`), clipped to
    [`MIN_STEPS`, `MAX_STEPS`]: the full `MAX_STEPS` from 10,240 examples at
    batch 128.

    >>> resolve_steps("auto", 1347, 128), resolve_steps("auto", 60000, 128)
    (106, 800)
    >>> resolve_steps("auto", 100, 128), resolve_steps(80, 60000, 128)
    (50, 80)
    """
    if steps != "auto":
        return int(steps)
    batch_size = min(batch_size, num_examples)
    epochs_steps = math.ceil(STEP_EPOCHS * num_examples / batch_size)
    return int(min(MAX_STEPS, max(MIN_STEPS, epochs_steps)))


def halfway(steps: int) -> int:
    """The step at which a member is judged, and abandoned if hopeless.

    >>> halfway(801)
    400
    """
    return steps // 2


def checkpoints(steps: int, late: bool) -> list:
    """Steps at which a member's fit is read: halfway, and with `late` halfway
    through the rest too (the three-quarter mark, for calibration probes).

    >>> checkpoints(801, late=False), checkpoints(801, late=True)
    ([400], [400, 600])
    """
    first = halfway(steps)
    return [first, first + halfway(steps - first)] if late else [first]


def cosine(peak, step, total):
    """Cosine-decayed step size at integer `step` of `total` (a float tensor)."""
    progress = tf.cast(step, tf.float32) / total
    return peak * 0.5 * (1.0 + tf.cos(math.pi * progress))


def schedule_loop(step_fn, iterator, steps, learning_rate, start, total):
    """Steps `start .. start+steps` of a `total`-step cosine schedule (traced).

    `step_fn(x, y, lr)` takes one step on the batch from `iterator` and returns
    its objective; the objectives come back stacked, one row per step.
    """
    total_f = tf.cast(total, tf.float32)

    def body(t, values):
        x, y = iterator.get_next()
        lr = cosine(learning_rate, t + start, total_f)
        return t + 1, values.write(t, tf.cast(step_fn(x, y, lr), tf.float32))

    values = tf.TensorArray(tf.float32, size=steps)
    _, values = tf.while_loop(lambda t, _: t < steps, body, (tf.constant(0), values))
    return values.stack()


def sgd_update(
    variables, grads, velocity, momentum: float, lr, weight_decay=0.0, constraints=None
) -> None:
    """SGD with momentum and decoupled weight decay, in place (traced).

    `v ← μ·v − lr·g`, `w ← w − lr·λ·w + v` with `λ = weight_decay`, a float or
    a scalar variable (Keras' optimizers' decoupled decay; `λ = 0` is plain SGD
    with momentum, to the bit for finite weights). The momentum step is
    TensorFlow's fused `ResourceApplyKerasMomentum` kernel: the same arithmetic
    as four separate ops, in one kernel per variable (docs/design.md#sgd-schedule).
    `constraints` (aligned with `variables`, `None` where a weight has none) are
    applied after the step, as Keras' optimizers apply a layer's
    `kernel_constraint`: members stay in the model class θ* was trained in.
    """
    shrink = lr * weight_decay
    constraints = constraints or [None] * len(variables)
    for var, grad, vel, constraint in zip(variables, grads, velocity, constraints):
        if grad is None:
            continue
        dtype = var.dtype
        var.assign_sub(tf.cast(shrink, dtype) * var)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle,
            accum=vel.handle,
            lr=tf.cast(lr, dtype),
            grad=tf.cast(tf.convert_to_tensor(grad), dtype),  # IndexedSlices: dense
            momentum=tf.cast(momentum, dtype),
        )
        if constraint is not None:
            var.assign(tf.cast(constraint(tf.convert_to_tensor(var)), dtype))


def weight_constraints(model) -> list | None:
    """The constraint of each of `model.trainable_variables` (`None` where a
    weight has none), or `None` where no weight has one."""
    constraints = [getattr(v, "constraint", None) for v in model.trainable_variables]
    return constraints if any(c is not None for c in constraints) else None


def assign_all(variables, values) -> None:
    for var, value in zip(variables, values):
        var.assign(value)


def in_units(objective, loss_scale: float):
    """`objective` × `loss_scale`: what the members' SGD differentiates.

    A regression loss carries its targets' units (squared, for squared error),
    so a step size that suits standardised targets diverges on raw ones; in
    units of the null model's loss (`loss_scale` = 1 / the loss of predicting
    the mean target) a step size means the same in any units. 1 (classification,
    in nats already): the objective as it is.
    """
    return objective if loss_scale == 1.0 else objective * tf.cast(loss_scale, objective.dtype)


def regularised(objective, reg):
    """`objective` plus the model's regularisation losses (`reg`, maybe empty)."""
    if reg:
        return objective + tf.cast(tf.add_n(reg), objective.dtype)
    return objective


def late_loss(values: np.ndarray, steps: int) -> tuple[float, bool]:
    """`(mean objective over the last 10% of a steps-long run, all finite)`."""
    if not np.all(np.isfinite(values)):
        return float("nan"), False
    tail = max(1, steps // 10)
    return float(np.mean(values[-tail:])), True


def summarise_evaluation(losses, fits, is_classification: bool) -> tuple[float, float | None]:
    """`(mean loss or NaN if any is non-finite, mean fit or None)` of one member."""
    losses = np.concatenate(losses)
    fit = float(np.mean(np.concatenate(fits))) if is_classification else None
    mean_loss = float(np.mean(losses)) if np.all(np.isfinite(losses)) else float("nan")
    return mean_loss, fit


class MomentSums:
    """Population BatchNorm moments from per-batch moments, accumulated in float64.

    Every batch contributes its mean `m` and `E[x²] = v + m²` with equal weight;
    `result()` gives each layer's `(mean, variance)`.
    """

    def __init__(self):
        self.sums = None
        self.count = 0

    def add(self, stats) -> None:
        """`stats`: `[(batch mean, batch variance)]` per BatchNorm layer, NumPy."""
        moments = [(m.astype(np.float64), v.astype(np.float64) + m**2) for m, v in stats]
        if self.sums is None:
            self.sums = [[a, b] for a, b in moments]
        else:
            for acc, (a, b) in zip(self.sums, moments):
                acc[0] += a
                acc[1] += b
        self.count += 1

    def result(self) -> list:
        out = []
        for s1, s2 in self.sums:
            mean = s1 / self.count
            out.append((mean, np.maximum(s2 / self.count - mean**2, 0.0)))
        return out


def flatten_layers(model) -> list:
    """Every layer of `model`, nested models included."""
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except Exception:
        out, stack = [], list(model.layers)
        while stack:
            layer = stack.pop()
            out.append(layer)
            stack.extend(getattr(layer, "layers", []))
        return out


def batchnorm_layers(model) -> list:
    """The model's BatchNormalization layers (nested models included)."""
    return [
        layer
        for layer in flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def batchnorm_index(model, layers) -> list:
    """`[(moving mean, moving variance)]` positions in `model.non_trainable_variables`."""
    ids = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    return [(ids[id(layer.moving_mean)], ids[id(layer.moving_variance)]) for layer in layers]


def is_seed_state(variable) -> bool:
    """Whether `variable` is a random layer's generator state, not a weight.

    Dropout, noise and augmentation layers draw from a `keras.random.SeedGenerator`
    whose `[seed, counter]` state is a non-trainable variable.
    """
    return variable.name == "seed_generator_state"


def seed_state_positions(model) -> list:
    """Positions of the random layers' generator states in `model.non_trainable_variables`."""
    return [i for i, v in enumerate(model.non_trainable_variables) if is_seed_state(v)]


def with_layer_seeds(weights: WeightSet, positions: list, seed: int) -> WeightSet:
    """`weights` with every random layer's generator restarted from `seed`.

    A member's dropout masks and augmentations then follow from the
    collection's seed, not from the global state θ* was built or loaded under.

    >>> w = WeightSet([], [np.zeros(3), np.array([5, 9])])  # a state [seed 5, counter 9]
    >>> with_layer_seeds(w, [1], seed=0).non_trainable[1].tolist()
    [821328062, 0]
    """
    if not positions:
        return weights
    non_trainable = list(weights.non_trainable)
    states = np.random.SeedSequence(seed).generate_state(len(positions))
    for position, state in zip(positions, states):
        dtype = non_trainable[position].dtype
        non_trainable[position] = np.array([int(state) % 2**31, 0], dtype=dtype)
    return WeightSet(list(weights.trainable), non_trainable)


@contextlib.contextmanager
def batch_statistics(layers):
    """Makes BN report the current batch's statistics as its moving statistics."""
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
