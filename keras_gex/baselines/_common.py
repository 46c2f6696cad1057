"""What the baselines share: argument checks and the ordered collection of scores."""

from __future__ import annotations

import numpy as np

from keras_gex import _validation
from keras_gex.data import DataSource, nan_where_not_finite

#: Docstring parts the scoring functions share, filled into their `{name}` fields
#: by `_shared_doc` (so `help()` and the API docs show the whole text).
_DOC_PARTS = {
    "data": """data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches, in
            the order the scores should have. A dataset that reshuffles on
            every iteration is refused.""",
    "scoring_args": """batch_size: Scoring batch size for arrays. Defaults to `None` (256).
        verbose: 0 (silent) or 1 / "auto" (a progress bar over the
            examples). Defaults to `"auto"`.""",
    "scores": """Returns:
        `(N,)` float64 scores in dataset order; higher = more suspect.""",
    "ensemble_errors": """Raises:
        TypeError: If `ensemble` is not a `GeometricEnsemble` or `data` has
            the wrong type.
        ValueError: For invalid data or arguments, or non-finite values.""",
}


def _shared_doc(fn):
    """Decorator: fills the `{name}` fields of `fn`'s docstring from `_DOC_PARTS`."""
    if fn.__doc__:  # None under `python -OO`
        fn.__doc__ = fn.__doc__.format(**_DOC_PARTS)
    return fn


def _scoring_args(batch_size, verbose) -> tuple[int | None, int]:
    """Validated scoring `batch_size` (None keeps the data's default) and `verbose` level."""
    if batch_size is not None:
        batch_size = _validation.positive_int("batch_size", batch_size)
    return batch_size, _validation.verbose_level(verbose)


def _collect(source: DataSource, batch_fn, what: str, verbose: int = 0) -> np.ndarray:
    """Concatenates `batch_fn(x, y)` over the ordered batches; refuses NaN or inf.

    With `verbose`, a Keras progress bar counts the examples done (the batches
    of a pipeline whose examples are not counted yet: `DataSource.progress`).
    """
    bar = source.progress(verbose)
    out = []
    for x, y in source.ordered():
        out.append(np.asarray(nan_where_not_finite(x, batch_fn(x, y)), np.float64))
        bar.advance(len(out[-1]))
    if not out:
        raise ValueError(f"Argument `{source.name}` is empty: it has no examples.")
    values = np.concatenate(out)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"The {what} is NaN or inf on {int(bad.sum())} example(s) "
            f"(first indices {idx}). Check those inputs and labels."
        )
    return values
