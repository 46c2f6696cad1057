"""Argument checks shared by every public entry point.

Every user-facing check lives here so messages read the same everywhere:
``Argument `num_members` must be a positive integer. Received: num_members=0``.
Checks run in Python at the entry point, never inside a ``tf.function``.
"""

from __future__ import annotations

import numbers

import numpy as np


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


def positive_float(name: str, value) -> float:
    """Returns `value` as a float, or raises `ValueError` if not finite and > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"Argument `{name}` must be a positive finite number. Received: {name}={value!r}"
        )
    return float(value)


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


def check_model(model, *, need_loss: bool, loss=None) -> None:
    """Refuses models the library cannot score with a clear message."""
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            "Argument `model` must be a `keras.Model`. "
            f"Received: model of type {type(model).__name__}"
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
