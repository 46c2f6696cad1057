"""Argument checks shared by every public entry point.

Every user-facing check lives here so messages read the same everywhere:
``Argument `num_members` must be a positive integer. Received: num_members=0``.
Checks run in Python at the entry point, never inside a ``tf.function``.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings

import numpy as np

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first caller outside keras_gex, as
    seen from the function that calls this one."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        frame, level = frame.f_back, level + 1
    return level


def _integer_at_least(name: str, value, minimum: int, what: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (numbers.Integral, np.integer))
        or value < minimum
    ):
        raise ValueError(f"Argument `{name}` must be a {what} integer. Received: {name}={value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    """Returns `value` as an int, or raises `ValueError` if it is not > 0."""
    return _integer_at_least(name, value, 1, "positive")


def non_negative_int(name: str, value) -> int:
    """Returns `value` as an int, or raises `ValueError` if it is not >= 0."""
    return _integer_at_least(name, value, 0, "non-negative")


def _finite_number(name: str, value, *, strict: bool) -> float:
    """`value` as a float if it is a finite real number above 0 (`strict`) or at least 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value < 0
        or (strict and value == 0)
    ):
        what = "positive" if strict else "non-negative"
        raise ValueError(
            f"Argument `{name}` must be a {what} finite number. Received: {name}={value!r}"
        )
    return float(value)


def non_negative_float(name: str, value) -> float:
    """Returns `value` as a float, or raises `ValueError` if not finite and >= 0."""
    return _finite_number(name, value, strict=False)


def positive_float(name: str, value) -> float:
    """Returns `value` as a float, or raises `ValueError` if not finite and > 0."""
    return _finite_number(name, value, strict=True)


def fraction(name: str, value, *, inclusive_low: bool = True) -> float:
    """Returns `value` as a float in [0, 1) (or (0, 1) if not `inclusive_low`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and value < 1
    ok = ok and (value >= 0 if inclusive_low else value > 0)
    if not ok:
        low = "[0, 1)" if inclusive_low else "(0, 1)"
        raise ValueError(f"Argument `{name}` must be a number in {low}. Received: {name}={value!r}")
    return float(value)


def one_of(name: str, value, choices) -> str:
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"Argument `{name}` must be one of {sorted(choices)}. Received: {name}={value!r}"
        )
    return value


def verbose_level(value) -> int:
    """Maps Keras-style `verbose` ("auto", 0, 1) to 0 or 1."""
    if value == "auto":
        return 1
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise ValueError(
            f"Argument `verbose` must be one of 'auto', 0, 1 or 2. Received: verbose={value!r}"
        )
    return int(value)


def seed_value(value) -> int | None:
    """Returns a valid seed or None."""
    if value is None:
        return None
    return non_negative_int("seed", value)


def finite_1d(name: str, values) -> np.ndarray:
    """Returns `values` as a finite float64 1-D array with at least one entry."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"Argument `{name}` must be 1-D. Received: {name} with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"Argument `{name}` must not be empty.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(
            f"Argument `{name}` must contain only finite values. "
            f"Received: {bad} non-finite value(s)."
        )
    return arr


def check_backend() -> None:
    """Refuses a Keras running on another backend than TensorFlow, which keras_gex needs
    (its fine-tuning and scoring loops are TensorFlow functions)."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"keras_gex runs on Keras' TensorFlow backend; this process runs Keras on "
            f"{backend!r}. Set the environment variable `KERAS_BACKEND=tensorflow` before "
            "Keras is first imported."
        )


def check_trainable(model) -> None:
    """Refuses to fine-tune a model with no trainable weights: no member could move."""
    if not model.trainable_weights:
        raise ValueError(
            "The model has no trainable weights (`model.trainable = False`, or every layer "
            "frozen), so no GE member could move from θ*: members fine-tune the trainable "
            "weights. Set `trainable = True` on the layers to fine-tune (at least the head) "
            "before collecting; the model's own weights are left as they are."
        )


def warn_custom_objective(model, loss=None) -> None:
    """Warns when the model trains on its own code and GEX on its compiled loss.

    A model that overrides `train_step` or `compute_loss` (distillation, mixup,
    an extra term) was trained on that code's objective; the members fine-tune
    and every example is scored on the compiled loss (plus the layers'
    regularisation losses) alone, which is right only where the two agree.
    Nothing to say when `loss=` is given: the caller chose the objective.
    """
    import keras

    if loss is not None:
        return
    overridden = [
        name
        for name in ("train_step", "compute_loss")
        if getattr(type(model), name, None) is not getattr(keras.Model, name, None)
    ]
    if overridden:
        names = " and ".join(f"`{name}`" for name in overridden)
        warnings.warn(
            f"The model's class {type(model).__name__} overrides {names}, so it was "
            f"trained on that code's objective, but GE members fine-tune and examples are "
            f"scored on its compiled loss {getattr(model, 'loss', None)!r} (and the layers' "
            "regularisation losses) only. If the objective differs, pass the per-example "
            "loss to score as `loss=`.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def check_model(model, *, need_loss: bool, loss=None) -> None:
    """Refuses models the library cannot score with a clear message."""
    import keras

    check_backend()
    if not isinstance(model, keras.Model):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        legacy = (
            " (a Keras 2 model, from `tf_keras` or a `tf.keras` with TF_USE_LEGACY_KERAS: "
            "keras_gex needs a Keras 3 model)"
            if kind.startswith(("tf_keras.", "tensorflow.python.keras.", "keras.engine."))
            else ""
        )
        raise TypeError(
            f"Argument `model` must be a `keras.Model`. Received: model of type {kind}{legacy}"
        )
    if not model.built:
        raise ValueError(
            "The model has not been built yet: call it on a batch of data, fit it, "
            "or give it an `Input` layer before computing GEX scores."
        )
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) > 1:
        raise ValueError(
            "keras_gex supports single-output models only. The model has "
            f"{len(outputs)} outputs; wrap it in a model that returns the output "
            "whose loss you want to explain."
        )
    if need_loss and loss is None and getattr(model, "loss", None) is None:
        raise ValueError(
            "The model is not compiled with a loss and no `loss=` was given. "
            "Call `model.compile(loss=...)` or pass `loss=` explicitly."
        )


#: How far a row of probabilities may sum from 1 (and values stray outside
#: [0, 1]) before it is not read as probabilities; half-precision outputs get
#: `HALF_PROBABILITY_ATOL`.
PROBABILITY_ATOL = 1e-3
HALF_PROBABILITY_ATOL = 1e-2


def probability_problem(values, *, rows_sum_to_one: bool, atol: float = PROBABILITY_ATOL):
    """What keeps finite `values` from being probabilities, in words, or None.

    Values must lie in [0, 1] (within `atol`) and, with `rows_sum_to_one`,
    every row (last axis) must sum to 1 within `atol`.

    >>> probability_problem(np.array([[0.2, 0.8]]), rows_sum_to_one=True) is None
    True
    >>> probability_problem(np.array([[-1.5, 2.0]]), rows_sum_to_one=True)
    'values in [-1.5, 2]'
    >>> probability_problem(np.array([[0.5, 0.9]]), rows_sum_to_one=True)
    'rows summing to values in [1.4, 1.4], not 1'
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    low, high = float(arr.min()), float(arr.max())
    if low < -atol or high > 1 + atol:
        return f"values in [{low:.4g}, {high:.4g}]"
    if rows_sum_to_one and arr.ndim >= 1:
        sums = arr.sum(axis=-1)
        if np.any(np.abs(sums - 1) > atol):
            return f"rows summing to values in [{sums.min():.4g}, {sums.max():.4g}], not 1"
    return None


def _static_dims(shape):
    """`shape` as a tuple of ints / None, or None when it is not a plain shape."""
    import tensorflow as tf

    if isinstance(shape, tf.TensorSpec):
        shape = shape.shape
    if isinstance(shape, tf.TensorShape):
        return None if shape.rank is None else tuple(shape.as_list())
    if isinstance(shape, (tuple, list)) and all(
        d is None or (isinstance(d, (numbers.Integral, np.integer)) and not isinstance(d, bool))
        for d in shape
    ):
        return tuple(None if d is None else int(d) for d in shape)
    return None


def shape_text(dims) -> str:
    """A batch-first shape for messages.

    >>> shape_text((None, 64)), shape_text((32,))
    ('(batch, 64)', '(batch,)')
    """
    parts = ["batch" if i == 0 else str(d) for i, d in enumerate(dims)]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _dims_conflict(got, want) -> bool:
    """Keras's `InputSpec` shape test with `allow_last_axis_squeeze` (functional models)."""
    if got and got[-1] == 1:
        got = got[:-1]
    if want and want[-1] == 1:
        want = want[:-1]
    return any(g is not None and w is not None and g != w for g, w in zip(got, want))


def check_inputs_fit_model(model, x_spec_or_shape, *, name: str = "data") -> None:
    """Refuses inputs whose static shape the model cannot take, before any work.

    `x_spec_or_shape` is the inputs' `tf.TensorSpec`, `tf.TensorShape` or a
    shape tuple, batch axis first (e.g. `DataSource.element_spec[0]`). Only
    what Keras itself would refuse is refused, with the received and expected
    shapes named instead of a traceback from inside a traced function:

    * a functional model (`keras.Model(inputs, outputs)`) checks the inputs
      against its `Input` shape, allowing the one-axis rank adjustments Keras
      makes (a trailing axis of size 1 squeezed or added);
    * a `Sequential` model accepts other sizes of `Input` axes (e.g. a
      fully-convolutional model on larger images), so only the rank is
      checked against its `Input` and the sizes against what its first layer
      requires (e.g. a `Dense` layer's input width).

    Skipped, never refused: nested inputs (dicts, tuples or lists of
    tensors), models with several inputs, and models without a static
    `inputs` list (subclassed models).

    Raises:
        ValueError: If the inputs cannot fit the model.
    """
    import keras

    got = _static_dims(x_spec_or_shape)
    if got is None or len(got) == 0:
        return
    try:
        inputs = model.inputs
    except Exception:  # subclassed models have no `inputs`; never refuse on introspection
        return
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 1:
        return
    want = _static_dims(tuple(getattr(inputs[0], "shape", None) or ()))
    if not want:
        return
    # The rank adjustments of Keras's functional call (`_adjust_input_rank`).
    adjusted = got
    if len(got) == len(want) + 1 and got[-1] == 1:
        adjusted = got[:-1]
    elif len(got) == len(want) - 1 and want[-1] == 1:
        adjusted = (*got, 1)
    expected = shape_text(want)
    if len(adjusted) != len(want):
        raise ValueError(
            f"Argument `{name}` must hold inputs of the model's input shape {expected}. "
            f"Received: inputs of shape {shape_text(got)} (rank {len(got)}, the model "
            f"expects rank {len(want)})."
        )
    if isinstance(model, keras.Sequential):
        layers = model.layers
        spec = getattr(layers[0], "input_spec", None) if layers else None
        axes = getattr(spec, "axes", None) if isinstance(spec, keras.InputSpec) else None
        for axis, size in (axes or {}).items():
            try:
                have = adjusted[axis]
            except (IndexError, TypeError):
                continue
            if size is not None and have is not None and have != size:
                where = "last axis" if axis == -1 else f"axis {axis}"
                raise ValueError(
                    f"Argument `{name}` must hold inputs whose {where} has size {size} "
                    f"(what the model's first layer `{layers[0].name}` takes; model input "
                    f"shape {expected}). Received: inputs of shape {shape_text(got)}."
                )
        return
    if _dims_conflict(adjusted, want):
        raise ValueError(
            f"Argument `{name}` must hold inputs of the model's input shape {expected}. "
            f"Received: inputs of shape {shape_text(got)}."
        )
