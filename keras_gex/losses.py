"""Per-example losses: turn whatever the user compiled into ``loss(y, y_pred) -> (B,)``.

GEX needs the model's own training loss evaluated per example (reduction none).
`resolve_loss` accepts a Keras `Loss` instance, a loss name, or any callable
and returns a `PerExampleLoss` whose call always yields one value per example
(non-batch axes are averaged, as Keras does for the reduction it replaces).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_gex.weights import sole_output

_SPARSE_CE = "sparse_categorical_crossentropy"
_CE = "categorical_crossentropy"
_BCE = "binary_crossentropy"
#: The loss kinds with classes (`PerExampleLoss.kind`).
CLASSIFICATION_KINDS = (_SPARSE_CE, _CE, _BCE)


@dataclasses.dataclass(frozen=True)
class PerExampleLoss:
    """A loss evaluated per example, plus what kind of task it implies.

    Attributes:
        fn: Callable `(y_true, y_pred) -> tensor` with no reduction.
        kind: One of "sparse_categorical_crossentropy", "categorical_crossentropy",
            "binary_crossentropy" or "other". Decides how "still fit" is measured
            during calibration and which relabeling applies.
        from_logits: Whether predictions are logits (classification kinds only).
        name: A readable name, recorded in ensemble metadata.
        inferred: Whether `kind` was read from the model's outputs and labels
            (`loss_checks.read_as_classifier`: user code that keras_gex does not
            know by name) rather than from the loss itself.
    """

    fn: Callable
    kind: str
    from_logits: bool
    name: str
    inferred: bool = False

    def __call__(self, y_true, y_pred):
        values = self._per_example(self.fn(y_true, y_pred))
        if self.kind == "other":
            values -= self.saturated(y_true, y_pred)
        return values

    def saturated(self, y_true, y_pred):
        """`(B,)` (or 0): the loss of predicting every target exactly, `loss(y, y)`.

        A non-classification loss is measured above it, as a unit deviance:
        0 for a distance (squared or absolute error, Huber), so nothing
        changes there, but a likelihood such as Poisson's (`ŷ − y log ŷ`) is
        lowest at `ŷ = y` with a value that depends on `y`, and its raw value
        ranks rows by the size of their target rather than by how badly they
        are fitted (docs/design.md#regression-losses). 0 where the labels are not
        of the outputs' shape, and for a margin loss (hinge), whose minimum is
        0 at any margin of at least 1 and whose labels are not a prediction:
        `hinge(0, 0)` is 1, as a label 0 is read as −1. (A classification
        loss's is 0 for hard labels.)
        """
        if _is_margin_loss(self.name):
            return 0.0
        y_pred = tf.convert_to_tensor(y_pred)
        targets = tf.cast(y_true, y_pred.dtype)
        if not targets.shape.is_compatible_with(y_pred.shape) or (
            targets.shape.rank != y_pred.shape.rank
        ):
            return 0.0
        return self._per_example(self.fn(y_true, targets))

    @staticmethod
    def _per_example(values):
        values = tf.convert_to_tensor(values)
        rank = values.shape.rank
        if rank is not None and rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, rank)))
        return tf.cast(values, "float32")

    @property
    def is_classification(self) -> bool:
        return self.kind in CLASSIFICATION_KINDS

    def probabilities(self, y_pred):
        """Model outputs through the loss's link, float32 (traced or eager).

        Logits go through sigmoid (binary cross-entropy) or softmax; outputs
        that are probabilities already, and any other loss's, pass unchanged.
        """
        y_pred = tf.cast(y_pred, "float32")
        if not self.from_logits:
            return y_pred
        return tf.sigmoid(y_pred) if self.kind == _BCE else tf.nn.softmax(y_pred)

    def label_classes(self, y_true) -> np.ndarray:
        """The given labels as class ids, one row per example (`class_ids`)."""
        return class_ids(self.kind, y_true)

    def predicts_label(self, y_true, probabilities) -> np.ndarray:
        """`(N,)` bool: whether `probabilities` predict the given label.

        `fit_mask`'s test (the arg-max class, or every sigmoid label on the
        right side of 0.5), read on probabilities rather than model outputs.
        """
        on_probabilities = dataclasses.replace(self, from_logits=False)
        return on_probabilities.fit_mask(y_true, np.asarray(probabilities)).numpy() == 1.0

    def fit_mask(self, y_true, y_pred):
        """Per-example 1.0 if the prediction gets the label(s) right, else 0.0 (float32, (B,)).

        For multi-label (binary cross-entropy) outputs and for labels per
        position (a tagger's `(B, T)` ids or `(B, T, K)` one-hot rows against
        `(B, T, K)` outputs) an example counts only when every one of its labels
        is right.

        Only defined for classification losses; used to judge how far a
        fine-tuned member has left the memorising basin.
        """
        if self.kind == _SPARSE_CE:
            pred = tf.argmax(y_pred, axis=-1)
            y = tf.reshape(tf.cast(y_true, "int64"), tf.shape(pred))
            return _whole_examples(tf.cast(tf.equal(pred, y), "float32"))
        if self.kind == _CE:
            pred = tf.argmax(y_pred, axis=-1)
            return _whole_examples(tf.cast(tf.equal(pred, tf.argmax(y_true, axis=-1)), "float32"))
        if self.kind == _BCE:
            cut = 0.0 if self.from_logits else 0.5
            pred = tf.cast(y_pred > cut, "float32")
            y = tf.cast(tf.cast(y_true, "float32") > 0.5, "float32")
            # Whole examples (subset accuracy): with one-hot targets over K
            # outputs a member answering "no" to every label still agrees on
            # (K-1)/K of them, and per-label agreement read such a collapsed
            # member as fitting (docs/design.md#relative-fit).
            return _whole_examples(tf.cast(tf.equal(pred, y), "float32"))
        raise ValueError(f"fit_mask is undefined for loss kind {self.kind!r}")


def class_ids(kind: str, y_true) -> np.ndarray:
    """The labels `y_true` of a loss of `kind` as int64 class ids, one row per example.

    Sparse labels as integers (`fit` takes them as floats or booleans too),
    one-hot (soft) targets as their arg-max, sigmoid targets as 0/1 per output:
    the rows `fit_mask` compares to.

    >>> class_ids("sparse_categorical_crossentropy", [2.0, 0.0]).tolist()
    [[2], [0]]
    >>> class_ids("binary_crossentropy", [[0.9, 0.2]]).tolist()
    [[1, 0]]
    """
    y = np.asarray(y_true)
    if kind == _SPARSE_CE:
        return y.reshape(len(y), -1).astype(np.int64)  # (N, 1), or one per position
    if kind == _CE:
        return np.argmax(y, axis=-1).reshape(len(y), -1)
    if kind == _BCE:
        return (y.astype(np.float64) > 0.5).reshape(len(y), -1).astype(np.int64)
    raise ValueError(f"Class ids are undefined for loss kind {kind!r}")


def _whole_examples(same):
    """`(B,)`: 1.0 where every label of an example is right (`same` is `(B, ...)`)."""
    rank = same.shape.rank
    if rank is not None and rank > 1:
        return tf.reduce_min(same, axis=list(range(1, rank)))
    return same


#: Keras's other classification losses, by the kind whose outputs, labels and
#: fit they share: focal cross-entropy reweights the same cross-entropy per
#: example, and the KL divergence to a target distribution is categorical
#: cross-entropy less the targets' entropy (a constant per example).
_SAME_KIND = {
    "binary_focal_crossentropy": _BCE,
    "categorical_focal_crossentropy": _CE,
    "kl_divergence": _CE,
    "kld": _CE,
    "kullback_leibler_divergence": _CE,
}


#: Keras's margin losses: 0 at any margin of at least 1, labels read as ±1.
_MARGIN_LOSSES = ("hinge", "squared_hinge", "categorical_hinge")


def _is_margin_loss(name: str) -> bool:
    """Whether `name` is a Keras margin loss's function or class name.

    >>> _is_margin_loss("Hinge"), _is_margin_loss("squared_hinge"), _is_margin_loss("mse")
    (True, True, False)
    """
    return any(_names(name, snake) for snake in _MARGIN_LOSSES)


def _class_name(snake: str) -> str:
    """A Keras loss function's name as its class's: `"binary_crossentropy"` ->
    `"BinaryCrossentropy"`."""
    return "".join(part.capitalize() for part in snake.split("_"))


def _names(name: str, snake: str) -> bool:
    """Whether `name` is the Keras loss function `snake` or its class, in any case."""
    return name.lower() in (snake, _class_name(snake).lower())


def _kind_of(name: str) -> str:
    """The loss kind of a Keras loss function or class name, "other" if none.

    >>> _kind_of("SparseCategoricalCrossentropy"), _kind_of("binary_focal_crossentropy")
    ('sparse_categorical_crossentropy', 'binary_crossentropy')
    >>> _kind_of("KLDivergence"), _kind_of("mean_squared_error")
    ('categorical_crossentropy', 'other')
    """
    for snake, kind in [*((k, k) for k in CLASSIFICATION_KINDS), *_SAME_KIND.items()]:
        if _names(name, snake):
            return kind
    return "other"


def resolve_loss(model: keras.Model, loss=None) -> PerExampleLoss:
    """Returns the per-example version of `loss`, or of the model's compiled loss.

    Args:
        model: The trained model. Its compiled loss is used when `loss` is None.
        loss: A `keras.losses.Loss`, a loss name, or a callable
            `(y_true, y_pred) -> per-example values`; a dict or list of one
            such loss (a named output's) is that loss. Defaults to `None`.

    Returns:
        A `PerExampleLoss`.

    Raises:
        ValueError: If no loss is available, or the loss is a dict/list of
            several (multi-output models are not supported).
    """
    if loss is None:
        loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(
            "The model is not compiled with a loss and no `loss=` was given. "
            "Call `model.compile(loss=...)` or pass `loss=` explicitly."
        )
    loss = sole_output(loss)  # `compile(loss={"label": ...})` (or `[...]`): that output's loss
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "keras_gex supports a single loss for a single-output model. Received "
            f"{len(loss)} losses: loss={loss!r}"
        )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
        if loss is None:
            raise ValueError(f"Unknown loss name. Received: loss={loss!r}")

    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        config["reduction"] = None
        try:
            unreduced = loss.__class__.from_config(config)
        except Exception as err:
            raise ValueError(
                f"Could not rebuild loss {loss.__class__.__name__} with "
                "`reduction=None`; pass a per-example `loss=` callable instead."
            ) from err
        if isinstance(loss, SoftTargetCrossentropy):
            return PerExampleLoss(unreduced, _CE, loss.from_logits, loss.__class__.__name__)
        fn_name = getattr(getattr(loss, "fn", None), "__name__", "")
        kind = _kind_of(fn_name) if fn_name else _kind_of(loss.__class__.__name__)
        if kind == "other":
            kind = _kind_of(loss.__class__.__name__)
        from_logits = bool(config.get("from_logits", False))
        return PerExampleLoss(unreduced, kind, from_logits, loss.__class__.__name__)

    if callable(loss):
        name = getattr(loss, "__name__", loss.__class__.__name__)
        return PerExampleLoss(loss, _kind_of(name), False, name)

    raise ValueError(
        f"Argument `loss` must be a Keras loss, a loss name or a callable. Received: loss={loss!r}"
    )


#: Keras's built-in losses that compare labels and outputs element by element
#: (after `squeeze_or_expand_to_same_rank`): a label shape that differs from
#: the outputs' is broadcast silently or fails inside a traced function.


@keras.saving.register_keras_serializable(package="keras_gex")
class SoftTargetCrossentropy(keras.losses.Loss):
    """Cross-entropy ``−Σ_k y_k log φ_k`` that is exact for unnormalised targets.

    Kong et al.'s relabeled targets do not sum to one. TensorFlow's fused
    softmax cross-entropy (used by `keras.losses.CategoricalCrossentropy`
    with `from_logits=True`) back-propagates `softmax − y`, the gradient only
    when `Σ_k y_k = 1`; on unnormalised rows it pushes every logit down at
    each step and training diverges (docs/design.md#relabeling-from-the-members).
    This loss differentiates the formula
    itself, giving `(Σ_k y_k) φ − y`.

    Args:
        from_logits: Whether predictions are logits. Defaults to `True`.
        reduction: Keras reduction. Defaults to `"sum_over_batch_size"`.
        name: Loss name. Defaults to `"soft_target_crossentropy"`.
    """

    def __init__(
        self,
        from_logits: bool = True,
        reduction="sum_over_batch_size",
        name: str = "soft_target_crossentropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        if self.from_logits:
            log_p = keras.ops.log_softmax(y_pred, axis=-1)
        else:
            log_p = keras.ops.log(keras.ops.clip(y_pred, 1e-7, 1.0))
        return -keras.ops.sum(y_true * log_p, axis=-1)

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config
