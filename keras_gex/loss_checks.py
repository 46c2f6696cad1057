"""The model, its loss and its data checked against each other, at entry.

Run before any fine-tuning (`GeometricEnsemble.collect`, `GEXCollector` when
`fit` begins) and on the first scored batch: labels the loss cannot take,
outputs that contradict `from_logits`, a model that cannot run on the data.
Each error names what was received and what was expected.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.data import _output_shape
from keras_gex.losses import _BCE, _CE, _SPARSE_CE, PerExampleLoss, _class_name, _is_margin_loss

_ELEMENTWISE_FNS = frozenset(
    {
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "huber",
        "log_cosh",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
        "poisson",
        "kl_divergence",
        "cosine_similarity",
    }
)
_LINK = {_SPARSE_CE: "softmax", _CE: "softmax", _BCE: "sigmoid"}
_LOSS_CLASS = {
    _SPARSE_CE: "SparseCategoricalCrossentropy",
    _CE: "CategoricalCrossentropy",
    _BCE: "BinaryCrossentropy",
}


def _keras_fn_name(loss: PerExampleLoss) -> str | None:
    """The name of the Keras built-in function behind `loss`, or None for user code."""
    fn = loss.fn
    inner = getattr(fn, "fn", fn) if isinstance(fn, keras.losses.Loss) else fn
    module = getattr(inner, "__module__", None) or ""
    if module.split(".")[0] != "keras":  # not `keras_gex`, nor a user's module
        return None
    return getattr(inner, "__name__", None)


def _from_logits_known(loss: PerExampleLoss) -> bool:
    """Whether `loss.from_logits` is the loss's own setting, not a default we assumed.

    True for `keras.losses.Loss` instances with `from_logits` in their
    config (Keras's cross-entropies, `SoftTargetCrossentropy`) and for Keras's
    built-in loss functions (a loss name such as
    `"sparse_categorical_crossentropy"`, whose `from_logits` is False). A user
    callable may take logits or probabilities: its outputs are not judged.
    """
    if isinstance(loss.fn, keras.losses.Loss):
        try:
            return "from_logits" in loss.fn.get_config()
        except Exception:  # a custom loss without a usable config: not judged
            return False
    return _keras_fn_name(loss) is not None


def _fix_class(loss: PerExampleLoss) -> str:
    """The `keras.losses` class to name in a `from_logits` fix: the model's own
    loss where it takes `from_logits` (a focal loss), else its kind's."""
    for name in (loss.name, _class_name(loss.name)):
        cls = getattr(keras.losses, name, None)
        if isinstance(cls, type) and "from_logits" in inspect.signature(cls).parameters:
            return name
    return _LOSS_CLASS[loss.kind]


def check_labels(loss: PerExampleLoss, y_true, y_pred, *, name: str = "data") -> None:
    """Refuses labels whose shape or values do not fit the loss and the outputs.

    Classification losses: sparse categorical cross-entropy takes integer
    class ids `(batch,)` or `(batch, 1)` in `[0, K)`; categorical and binary
    cross-entropy take labels of the outputs' shape. Keras's element-wise
    losses (`mse`, `mae`, `huber`, ...) take labels of the outputs' shape up to
    a trailing axis of size 1: integer class ids `(batch,)` or `(batch, 1)`
    against a K-wide output under `mse` (a classifier compiled with a
    regression loss) would be broadcast to `(batch, K)` by Keras without a
    word, so they are refused. One-hot labels under `mse` on a softmax output
    (a Brier-score fit) are a legitimate choice and pass. User callables are
    not judged.

    Raises:
        ValueError: Naming the labels' shape and the shape the loss expects.
    """
    y = np.asarray(y_true)
    pred_shape = tuple(y_pred.shape)
    got = f"Received: y with shape {_validation.shape_text(y.shape)}"
    if loss.kind == _SPARSE_CE:
        if not (y.ndim == len(pred_shape) - 1 or (y.ndim == len(pred_shape) and y.shape[-1] == 1)):
            raise ValueError(
                f"Argument `{name}`: the loss `{loss.name}` expects labels `y` of integer "
                f"class ids of shape (batch,) or (batch, 1) for the model's outputs of shape "
                f"{_validation.shape_text(pred_shape)}. {got}. One-hot labels need categorical "
                "cross-entropy (`keras.losses.CategoricalCrossentropy`)."
            )
        check_label_values(loss, y, pred_shape[-1], name=name)
    elif loss.kind in (_CE, _BCE) and y.shape != pred_shape:
        if y.ndim == 1 and pred_shape[1:] == (1,):
            hint = " Binary labels of shape (batch,) need reshaping to (batch, 1)."
        elif y.ndim == 1:
            hint = " Integer class ids need sparse categorical cross-entropy."
        else:
            hint = ""
        raise ValueError(
            f"Argument `{name}`: the loss `{loss.name}` expects labels `y` shaped like the "
            f"model's outputs {_validation.shape_text(pred_shape)}. {got}.{hint}"
        )
    elif loss.kind in (_CE, _BCE):
        check_label_values(loss, y, pred_shape[-1], name=name)
    elif loss.kind == "other" and _keras_fn_name(loss) in _ELEMENTWISE_FNS:
        labels, outputs = y.shape[1:], pred_shape[1:]
        if len(labels) == len(outputs) + 1 and labels[-1:] == (1,):
            labels = labels[:-1]
        elif len(outputs) == len(labels) + 1 and outputs[-1:] == (1,):
            outputs = outputs[:-1]
        if labels != outputs:
            class_ids = (
                y.ndim >= 1
                and labels in ((), (1,))
                and (y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(y == np.round(y))))
                and len(outputs) == 1
                and outputs[0] > 1
            )
            hint = (
                " Integer class ids with a K-wide classifier output need "
                "`sparse_categorical_crossentropy`; Keras would broadcast them across "
                "the K outputs."
                if class_ids
                else ""
            )
            raise ValueError(
                f"Argument `{name}`: the loss `{_keras_fn_name(loss)}` compares labels `y` "
                "with the model's outputs element by element, so `y` must have the outputs' "
                f"shape {_validation.shape_text(pred_shape)}. {got}.{hint}"
            )


def check_label_values(loss: PerExampleLoss, y, num_outputs: int | None, *, name="data") -> None:
    """Refuses label values a cross-entropy cannot take, in however many labels `y` holds.

    Sparse categorical cross-entropy takes integer class ids in
    `[0, num_outputs)`; binary cross-entropy labels in `[0, 1]` (0/1 or soft:
    probabilities of the outputs), so labels of -1 and 1, or class ids, which
    Keras trains on without a word towards a loss with no minimum, are
    refused; categorical cross-entropy non-negative labels (one-hot rows, or
    soft targets such as Kong et al.'s, which need not sum to one). Other
    losses are not judged.
    `check_labels` runs it on the first batch, `check_all_labels` on every label.

    >>> from keras_gex.losses import resolve_loss
    >>> bce = resolve_loss(None, keras.losses.BinaryCrossentropy())
    >>> check_label_values(bce, np.array([0.0, 0.3, 1.0]), 1)
    >>> try:
    ...     check_label_values(bce, np.array([1, -1, 1]), 1)
    ... except ValueError as err:
    ...     print(str(err).split("). ")[-1])
    Map labels of -1 and 1 to 0 and 1 first: `(y + 1) // 2`.
    """
    y = np.asarray(y)
    if not y.size:
        return
    low, high = y.min(), y.max()
    if loss.kind == _SPARSE_CE:
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise ValueError(
                f"Argument `{name}`: the loss `{loss.name}` expects labels `y` of integer "
                "class ids. Received: fractional labels."
            )
        top = num_outputs if num_outputs is not None else np.inf
        if low < 0 or high >= top:
            raise ValueError(
                f"Argument `{name}`: label `y` out of range. Labels must be class ids in "
                f"[0, {num_outputs}) for the model's {num_outputs} outputs. "
                f"Received labels in [{low:g}, {high:g}]{_rows_outside(y, 0, top - 1)}."
            )
    elif loss.kind == _BCE and (low < 0 or high > 1):
        hint = ""
        if y.dtype.kind in "iuf" and set(np.unique(y).tolist()) <= {-1, 1}:
            hint = " Map labels of -1 and 1 to 0 and 1 first: `(y + 1) // 2`."
        raise ValueError(
            f"Argument `{name}`: the loss `{loss.name}` takes labels in [0, 1] (0/1 or soft "
            f"labels: probabilities of the outputs). Received labels in [{low:g}, {high:g}]"
            f"{_rows_outside(y, 0, 1)}.{hint}"
        )
    elif loss.kind == _CE and low < 0:
        raise ValueError(
            f"Argument `{name}`: the loss `{loss.name}` takes non-negative labels (one-hot "
            f"rows or soft targets). Received labels in [{low:g}, {high:g}]"
            f"{_rows_outside(y, 0, np.inf)}."
        )


def _rows_outside(y: np.ndarray, low, high) -> str:
    """`", on k example(s) (first indices [...])"` for the rows of `y` holding a value
    outside `[low, high]`.

    >>> _rows_outside(np.array([0, 3, 1, -1]), 0, 2)
    ', on 2 example(s) (first indices [1, 3])'
    """
    flat = y.reshape(len(y), -1) if y.ndim else y.reshape(1, 1)
    rows = np.flatnonzero(((flat < low) | (flat > high)).any(axis=1))
    return f", on {rows.size} example(s) (first indices {rows[:5].tolist()})"


def check_all_labels(loss: PerExampleLoss, source, model) -> None:
    """`check_label_values` on every label of `source` where they are in memory
    (arrays, or a dataset read into arrays), so that a bad label past the first
    batch is refused before fine-tuning instead of failing inside its compiled
    loop. A streamed dataset is judged on its first batch only."""
    if not source.has_arrays or loss.kind not in (_SPARSE_CE, _CE, _BCE):
        return
    out = _output_shape(model, source.element_spec[0])
    width = out[-1] if out else None
    check_label_values(loss, source.arrays[1], width, name=source.name)


def output_activation(model) -> tuple[str | None, str | None]:
    """`(activation, layer name)` of the layer that produces the model's output.

    The activation is "softmax", "sigmoid", "linear" (a `Dense`,
    `EinsumDense` or convolution layer without activation: unbounded
    outputs) or None when unknown (subclassed models, custom layers, other
    activations). Nested models are followed to their own output layer.
    """
    for _ in range(16):  # nested models, bounded
        try:
            outputs = model.outputs
        except Exception:
            return None, None
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 1:
            return None, None
        history = getattr(outputs[0], "_keras_history", None)
        layer = getattr(history, "operation", None)
        if isinstance(layer, keras.Model):
            model = layer
            continue
        if layer is None:
            return None, None
        if isinstance(layer, keras.layers.Softmax):
            return "softmax", layer.name
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if activation in ("softmax", "sigmoid"):
            return activation, layer.name
        dense_like = (
            keras.layers.Dense,
            keras.layers.EinsumDense,
            keras.layers.Conv1D,
            keras.layers.Conv2D,
            keras.layers.Conv3D,
        )
        if activation == "linear" and type(layer) in dense_like:
            return "linear", layer.name
        return None, None
    return None, None


def check_outputs(loss: PerExampleLoss, y_pred=None, model=None) -> None:
    """Refuses outputs that contradict the loss's `from_logits`, before any work.

    Runs on θ*'s outputs for the first batch (`y_pred`, inference mode)
    and/or on the model's output layer (`model`), for the classification
    losses whose `from_logits` is known (Keras losses and loss names; see
    `_from_logits_known`):

    * `from_logits=False` but the outputs are not probabilities (a value
      outside [0, 1], or for (sparse) categorical cross-entropy a row not
      summing to 1, tolerance `_validation.PROBABILITY_ATOL`), or without
      outputs to look at, an output layer without activation: **refused**.
      Keras then clips the outputs into (0, 1) (or renormalises the rows)
      and trains on the clipped values without a word; the loss, hence every
      deviation, is not the model's real loss (seen: digits detection AUC
      0.999 -> 0.976, with the warnings blaming the step size).
    * `from_logits=True` but the output layer applies a softmax or sigmoid
      (or, for a softmax loss, every output row of the batch is a probability
      row): with binary cross-entropy **refused**, because keras_gex reads
      such outputs as logits where the loss itself cannot tell (a label
      counts as predicted where the output is > 0, which every sigmoid output
      is, so the step-size calibration could not measure fit, and `predict`
      would apply a second sigmoid). With (sparse) categorical cross-entropy
      only **a warning**: Keras's TensorFlow backend recovers the logits of a
      softmax output for the loss, and the fit is measured by argmax, so the
      losses and scores are the model's own (docs/design.md#relative-fit);
      but the class
      probabilities `predict`, `ensemble_probs`, `relabeled_targets` and a
      report's `predictions` apply a second softmax to probabilities and come
      out flattened.

    Non-finite outputs are left to `check_per_example`'s message.

    Raises:
        ValueError: Naming `from_logits`, the outputs received and the outputs expected.
    """
    if not loss.is_classification or not _from_logits_known(loss):
        return
    link = _LINK[loss.kind]
    fix_class = _fix_class(loss)
    rows_sum_to_one = loss.kind != _BCE
    looks_like_probabilities = None
    if y_pred is not None:
        pred = tf.convert_to_tensor(y_pred)
        half = pred.dtype in (tf.float16, tf.bfloat16)
        values = np.asarray(tf.cast(pred, "float32"))
        if values.size == 0 or not np.all(np.isfinite(values)):
            return
        atol = _validation.HALF_PROBABILITY_ATOL if half else _validation.PROBABILITY_ATOL
        problem = _validation.probability_problem(
            values, rows_sum_to_one=rows_sum_to_one, atol=atol
        )
        if not loss.from_logits and problem is not None:
            expected = "softmax probabilities" if rows_sum_to_one else "probabilities in [0, 1]"
            raise ValueError(
                f"The model's outputs are not probabilities ({problem} on the first batch) "
                f"but its loss `{loss.name}` has from_logits=False, which expects {expected}. "
                f"Compile with `keras.losses.{fix_class}(from_logits=True)` or add a "
                f"{link} output."
            )
        looks_like_probabilities = (
            rows_sum_to_one and values.ndim >= 2 and values.shape[-1] > 1 and problem is None
        )
    activation, layer_name = output_activation(model) if model is not None else (None, None)
    if not loss.from_logits:
        if y_pred is None and activation == "linear":
            raise ValueError(
                f"The model's output layer `{layer_name}` has no activation, so its outputs "
                f"are logits, not probabilities, but its loss `{loss.name}` has "
                "from_logits=False, which expects probabilities. Compile with "
                f"`keras.losses.{fix_class}(from_logits=True)` or add a {link} output."
            )
        return
    if activation in ("softmax", "sigmoid"):
        received = f"the output layer `{layer_name}` applies a {activation}"
    elif looks_like_probabilities:
        received = "every output row of the first batch is in [0, 1] and sums to 1"
    else:
        return
    if loss.kind == _BCE:
        raise ValueError(
            f"The model's outputs are probabilities ({received}) but its loss "
            f"`{loss.name}` has from_logits=True, which expects logits. keras_gex would "
            "read every output as a positive prediction and could not measure fit. "
            f"Compile with `keras.losses.{fix_class}(from_logits=False)`, or drop the "
            "output activation and keep from_logits=True."
        )
    warnings.warn(
        f"The model's outputs look like probabilities ({received}) but its loss "
        f"`{loss.name}` has from_logits=True, which expects logits. Keras recovers the "
        "logits for the loss, so the scores are right, but the class probabilities "
        "(`predict`, `ensemble_probs`, `relabeled_targets`) apply a second softmax and "
        f"come out flattened. Compile with `keras.losses.{fix_class}(from_logits=False)`, "
        "or drop the output activation.",
        UserWarning,
        stacklevel=3,
    )


def check_per_example(
    loss: PerExampleLoss, y_true, y_pred, *, model=None, name: str = "data"
) -> None:
    """Evaluates the loss once, eagerly, and refuses reduced or non-finite output.

    Called at the public entry on the first batch so that a loss that
    returns a scalar (already reduced) cannot silently broadcast, and labels
    that do not fit the loss (`check_labels`) or outputs that contradict its
    `from_logits` (`check_outputs`; with `model`, also the output layer's
    activation) are refused before any work is done. `name` is the data
    argument named in messages.
    """
    check_labels(loss, y_true, y_pred, name=name)
    check_outputs(loss, y_pred, model)
    raw = tf.convert_to_tensor(loss.fn(y_true, y_pred))
    batch = int(tf.shape(y_pred)[0])
    if raw.shape.rank == 0 or (raw.shape[0] is not None and raw.shape[0] != batch):
        raise ValueError(
            "The loss must return one value per example (reduction=None), but it "
            f"returned shape {tuple(raw.shape)} for a batch of {batch}. Pass a "
            "`keras.losses.Loss` instance or a per-example callable."
        )
    values = np.asarray(loss(y_true, y_pred))
    if not np.all(np.isfinite(values)):
        raise ValueError(
            "The model's loss is not finite on some examples of the first batch "
            "(NaN or inf in the inputs, labels or predictions). Clean the data "
            "before computing GEX scores."
        )


def _describe_inputs(x) -> str:
    parts = [
        f"{_validation.shape_text(tuple(t.shape))} {getattr(t, 'dtype', '')}".strip()
        for t in tf.nest.flatten(x)
    ]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def _gist(err: Exception) -> str:
    """The line of a Keras error that says what is wrong (not "Exception encountered...")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    useful = []
    for line in lines:
        if line.startswith("Arguments received by"):
            break
        if line and not line.startswith("Exception encountered when calling"):
            useful.append(line)
    return useful[0] if useful else (lines[0] if lines and lines[0] else type(err).__name__)


def read_as_classifier(
    loss: PerExampleLoss, y_true, y_pred, activation: str | None = None
) -> PerExampleLoss:
    """`loss` read as the cross-entropy kind its outputs and labels imply, if user code.

    A loss keras_gex does not know by name (a user's function or `Loss`
    subclass) is "other": members are judged by the share of a constant
    prediction's loss they explain, and no label is a class. On the zoo a
    user function computing the compiled cross-entropy itself ranked the
    wrong labels at AUC 0.72-0.95 where the compiled loss ranked them at
    0.82-0.99 (docs/design.md#loss-kinds). Outputs and labels that can
    only be a classifier's are read as one (`inferred=True`; the loss
    values stay the user's):

    * probabilities over C ≥ 2 classes (a softmax output, or with the
      activation unknown, rows in [0, 1] summing to 1) against one integer
      class id in [0, C) per output row: sparse categorical; against labels
      of the outputs' shape whose rows sum to 1: categorical;
    * probabilities in [0, 1] (a sigmoid output, or values in [0, 1])
      against labels of 0 and 1 of the outputs' shape: binary;
    * other outputs (logits) against one integer class id in [0, C) per
      row (C ≥ 2): sparse categorical on logits; against labels of 0 and 1
      of the outputs' shape, where the loss is lower at confident logits
      (±10 on the labels' side) than at the labels' own values
      (`_rewards_logits`; a distance is lowest there): categorical on logits
      for one-hot rows, binary on logits otherwise.

    Anything else stays "other".

    >>> import numpy as np
    >>> user = PerExampleLoss(lambda y, p: (p - y)[:, 0] ** 2, "other", False, "my_loss")
    >>> probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> read_as_classifier(user, np.array([0, 1]), probs, "softmax").kind
    'sparse_categorical_crossentropy'
    >>> read_as_classifier(user, np.eye(2), probs).kind
    'categorical_crossentropy'
    >>> read_as_classifier(user, np.array([[1.0], [0.0]]), np.array([[0.7], [0.4]]), "sigmoid").kind
    'binary_crossentropy'
    >>> logits = read_as_classifier(user, np.array([1, 0]), np.array([[-2.0, 3.0], [1.0, 0.5]]))
    >>> logits.kind, logits.from_logits
    ('sparse_categorical_crossentropy', True)
    >>> read_as_classifier(user, np.array([[1.0], [0.0]]), np.array([[2.0], [-1.0]]), "linear").kind
    'other'
    """
    if loss.kind != "other" or _keras_fn_name(loss) is not None or _is_margin_loss(loss.name):
        return loss
    y = np.asarray(tf.cast(tf.convert_to_tensor(y_true), "float64"))
    pred = np.asarray(tf.cast(tf.convert_to_tensor(y_pred), "float32"))
    if pred.ndim < 2 or y.ndim < 1 or y.shape[0] != pred.shape[0] or y.size == 0:
        return loss
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(y))):
        return loss
    classes = pred.shape[-1]
    ids = y[..., 0] if y.ndim == pred.ndim and y.shape[-1] == 1 else y
    class_ids = bool(
        classes >= 2
        and ids.shape == pred.shape[:-1]
        and np.all(ids == np.round(ids))
        and ids.min() >= 0
        and ids.max() < classes
    )
    rows = classes >= 2 and y.shape == pred.shape and y.min() >= 0
    rows = bool(rows and np.allclose(y.sum(axis=-1), 1.0, atol=1e-3))
    binary = (y.shape == pred.shape or (classes == 1 and y.shape == pred.shape[:-1])) and bool(
        np.all((y == 0) | (y == 1))
    )
    softmax = activation == "softmax" or (
        activation is None
        and classes >= 2
        and _validation.probability_problem(pred, rows_sum_to_one=True) is None
    )
    sigmoid = activation == "sigmoid" or (
        activation is None
        and not softmax
        and _validation.probability_problem(pred, rows_sum_to_one=False) is None
    )
    as_kind = None
    if softmax:
        as_kind = (_SPARSE_CE, False) if class_ids else (_CE, False) if rows else None
    elif sigmoid:
        as_kind = (_BCE, False) if binary else None
    elif class_ids:
        as_kind = (_SPARSE_CE, True)
    elif binary and _rewards_logits(loss, y.reshape(pred.shape)):
        as_kind = (_CE, True) if rows else (_BCE, True)
    if as_kind is None:
        return loss
    kind, from_logits = as_kind
    return dataclasses.replace(loss, kind=kind, from_logits=from_logits, inferred=True)


def _rewards_logits(loss: PerExampleLoss, labels: np.ndarray) -> bool:
    """Whether `loss` is lower at confident logits for 0/1 `labels` (+10 where
    1, −10 where 0) than at the labels' own values: a loss on logits, not a
    distance (which is lowest, 0, at the labels themselves).

    >>> sq = PerExampleLoss(lambda y, p: tf.reduce_sum((p - y) ** 2, -1), "other", False, "sq")
    >>> _rewards_logits(sq, np.array([[1.0], [0.0]]))
    False
    >>> logistic = lambda y, p: tf.reduce_sum(tf.nn.softplus(p) - y * p, -1)
    >>> bce = PerExampleLoss(logistic, "other", False, "logistic")
    >>> _rewards_logits(bce, np.array([[1.0], [0.0]]))
    True
    """
    y = tf.constant(labels, tf.float32)
    try:
        at_labels = tf.reduce_mean(tf.cast(loss.fn(y, y), tf.float32))
        at_logits = tf.reduce_mean(tf.cast(loss.fn(y, 10.0 * (2.0 * y - 1.0)), tf.float32))
    except Exception:  # a loss that cannot take such predictions
        return False
    return bool(np.isfinite(at_logits.numpy()) and at_logits < at_labels)


def check_first_batch(model: keras.Model, loss: PerExampleLoss, source) -> PerExampleLoss:
    """Runs θ* once, in inference mode, on the first batch of `source` and checks it.

    The entry check of a collection (`GeometricEnsemble.collect`,
    `GEXCollector`), before any fine-tuning: the labels must fit the loss,
    the outputs must agree with its `from_logits`, and the per-example loss
    must be finite (`check_per_example`). A model that cannot be run on the
    batch at all (inputs of a shape or dtype it does not take) is refused
    with the inputs named, chaining Keras's own error. A loss of user code
    is read as the cross-entropy kind the outputs and labels imply
    (`read_as_classifier`).

    Args:
        model: The trained model.
        loss: Its `PerExampleLoss`.
        source: A `DataSource` (its `first_batch()` and `name` are used).

    Returns:
        The `PerExampleLoss` to collect with: `loss`, or its reading as a
        classifier's.

    Raises:
        ValueError: If the first batch shows a mismatch.
    """
    x, y = source.first_batch()
    try:
        pred = model(x, training=False)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
        expected = ""
        try:
            expected = f"; the model's inputs are {[tuple(t.shape) for t in model.inputs]}"
        except Exception:
            pass
        raise ValueError(
            f"Argument `{source.name}`: the model cannot be run on its first batch "
            f"(inputs {_describe_inputs(x)}{expected}). Received from Keras: {_gist(err)}"
        ) from err
    flat = tf.nest.flatten(pred)
    if len(flat) != 1:
        return loss
    loss = read_as_classifier(loss, y, flat[0], output_activation(model)[0])
    check_per_example(loss, y, flat[0], model=model, name=source.name)
    return loss
