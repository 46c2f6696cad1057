"""Loss-based baselines: the loss at θ* and EL2N."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex._tracing import compiled, free_batch
from keras_gex.baselines._common import _collect, _scoring_args, _shared_doc
from keras_gex.collection import driver
from keras_gex.collection.frozen import layer_graph
from keras_gex.collection.local import FineTuner
from keras_gex.data import DataSource
from keras_gex.loss_checks import check_per_example, output_activation, read_as_classifier
from keras_gex.losses import resolve_loss
from keras_gex.weights import sole_output, stateless_call

_SCORE_BATCH_SIZE = 1024


@_shared_doc
def loss_scores(
    model: keras.Model, data, *, loss=None, batch_size: int | None = None, verbose="auto"
) -> np.ndarray:
    """Per-example loss of the trained model θ* (the "loss" baseline).

    The model is evaluated in inference mode (`training=False`) with its own
    weights and BatchNorm statistics, unmodified.

    Args:
        model: The trained, built Keras model.
        {data}
        loss: Loss to use instead of the compiled one (a `keras.losses.Loss`,
            a loss name or a per-example callable). Defaults to `None`.
        {scoring_args}

    Returns:
        `(N,)` float64 losses in dataset order; higher = more suspect.

    Raises:
        TypeError: If `model` is not a `keras.Model` or `data` has the wrong type.
        ValueError: For invalid data or arguments, or non-finite losses.
    """
    _validation.check_model(model, need_loss=True, loss=loss)
    batch_size, verbose = _scoring_args(batch_size, verbose)
    per_example = resolve_loss(model, loss)
    source = DataSource(data, batch_size=batch_size)
    source.check_against_model(model)
    source.check_ordered()
    x0, y0 = source.first_batch()
    pred0 = sole_output(model(x0, training=False))
    per_example = read_as_classifier(per_example, y0, pred0, output_activation(model)[0])
    check_per_example(per_example, y0, pred0)

    def step(x, y):
        return per_example(y, sole_output(model(x, training=False)))

    fn = compiled(step, input_signature=list(free_batch(source.element_spec)))
    return _collect(source, lambda x, y: fn(x, y).numpy(), "model's loss", verbose)


def _is_compiled(model: keras.Model) -> bool:
    """Whether `model` has an optimizer and a loss to train with."""
    return (
        getattr(model, "optimizer", None) is not None and getattr(model, "loss", None) is not None
    )


def _build_model(model_fn: Callable) -> keras.Model:
    model = model_fn()
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Argument `model_fn` must return a `keras.Model`. "
            f"Received: an object of type {type(model).__name__}"
        )
    if not _is_compiled(model):
        raise ValueError(
            "Argument `model_fn` must return a compiled model (with an optimizer and "
            "a loss): EL2N trains a fresh model per repeat. Call "
            "`model.compile(optimizer=..., loss=...)` inside `model_fn`."
        )
    return model


def _rebuilt_unless_adapted(layer):
    """`clone_model`'s default, a new layer from the config, except for a layer with `adapt`."""
    if hasattr(layer, "adapt"):
        return layer
    return layer.__class__.from_config(layer.get_config())


def _fresh_copy(model: keras.Model) -> keras.Model:
    """`model` rebuilt with new trainable weights, compiled with a new optimizer like its own.

    `keras.models.clone_model` draws every weight from the layers' initialisers
    (under the caller's `keras.utils.set_random_seed`); the variables the model
    does not train (a frozen backbone, BatchNorm statistics) get the trained
    model's values back, so that a frozen pretrained part stays pretrained. An
    adapted preprocessing layer (`TextVectorization`, the lookups,
    `Normalization`, `Discretization`: a layer with `adapt`) is the model's
    own, shared: its state is the data's, not learned, and lives partly outside
    its variables (lookup tables, bin boundaries, constants computed from them),
    where a rebuilt layer would start empty; nested Sequential and functional
    models are cloned layer by layer, so one inside them is shared too. A
    subclassed model is rebuilt from its config (`get_config`), every layer anew.
    """
    try:
        if isinstance(model, keras.Sequential) or layer_graph(model) is not None:
            fresh = keras.models.clone_model(
                model, clone_function=_rebuilt_unless_adapted, recursive=True
            )
        else:  # `clone_function` is for graph models only
            fresh = keras.models.clone_model(model)
    except Exception as err:
        raise TypeError(
            f"Argument `model_fn`: the model {model.name!r} could not be cloned ({err}). Pass "
            "a zero-argument callable that builds and compiles a new model instead."
        ) from err
    if [tuple(v.shape) for v in fresh.weights] != [tuple(v.shape) for v in model.weights]:
        raise TypeError(
            f"Argument `model_fn`: the clone of {model.name!r} does not have the model's "
            "weights (a model built in `call`, or with state outside its layers?). Pass a "
            "zero-argument callable that builds and compiles a new model instead."
        )
    for old, new in zip(model.weights, fresh.weights):
        if not old.trainable:
            new.assign(old)
    optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer))
    fresh.compile(optimizer=optimizer, loss=model.loss)
    return fresh


def _el2n_fn(tuner: FineTuner, sparse: bool, activation: str, x_spec, y_spec):
    """Compiled `(x, y) -> ||p(x) − y||₂` in inference mode with the tuner's weights."""

    def step(x, y):
        pred, _ = stateless_call(tuner.model, tuner.tv, tuner.ntv, x, training=False)
        pred = tf.cast(pred, "float32")
        if activation == "softmax":
            pred = tf.nn.softmax(pred, axis=-1)
        elif activation == "sigmoid":
            pred = tf.sigmoid(pred)
        if sparse:
            target = tf.one_hot(tf.reshape(tf.cast(y, "int32"), [-1]), tf.shape(pred)[-1])
        else:
            target = tf.reshape(tf.cast(y, "float32"), tf.shape(pred))
        sq = tf.square(pred - target)
        sq = tf.reshape(sq, [tf.shape(sq)[0], -1])
        return tf.sqrt(tf.reduce_sum(sq, axis=1))

    return compiled(step, input_signature=[x_spec, y_spec])


def _uses_class_ids(y: np.ndarray, kind: str, out_shape: tuple) -> bool:
    """Whether `y` holds class ids (to one-hot) rather than targets shaped like outputs."""
    num_outputs = out_shape[-1] if out_shape else 1
    is_column = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    if kind == "sparse_categorical_crossentropy" or (
        is_column and num_outputs > 1 and y.dtype.kind in "iub"
    ):
        if not is_column:
            raise ValueError(
                "Argument `y` must hold integer class ids of shape (N,) for a sparse "
                f"categorical loss. Received: y with shape {y.shape}"
            )
        return True
    if int(np.prod(y.shape[1:])) != int(np.prod(out_shape)):
        raise ValueError(
            f"Argument `y` must hold class ids of shape (N,) or targets shaped like the "
            f"model's outputs {(None, *out_shape)}. Received: y with shape {y.shape}"
        )
    return False


def _el2n_source(x, y) -> DataSource:
    """`el2n_scores`' data, validated: `(x, y)` arrays, or a dataset (`y` None) in order.

    A dataset of fixed-shape examples within the collection's limit
    (`driver._IN_MEMORY_BYTES`) is read into arrays once, as members read it:
    each repeat's `fit` then shuffles arrays, not a pipeline.
    """
    is_dataset = isinstance(x, (tf.data.Dataset, keras.utils.PyDataset))
    if y is None:
        if not is_dataset:
            raise ValueError(
                "Argument `y` is required when `x` holds arrays: pass the labels, or "
                "`x` as a `tf.data.Dataset` of `(x, y)` batches. Received: y=None"
            )
        source = DataSource(x, name="x")
        source.check_ordered()
        return source.in_memory(driver._IN_MEMORY_BYTES)
    if is_dataset:
        raise ValueError(
            "Argument `y` must be None when `x` is a dataset: its batches hold the "
            f"labels, as for `model.fit`. Received: y of type {type(y).__name__}"
        )
    return DataSource((x, y), name="x")  # validated; `x` may be a dict or tuple of arrays


def el2n_scores(
    model_fn: Callable[[], keras.Model],
    x,
    y=None,
    *,
    epochs: int = 20,
    repeats: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    bn_batches: int = 20,
    verbose="auto",
) -> np.ndarray:
    """EL2N scores (Paul et al., 2021): error norms of briefly trained models.

    For each repeat `r`, seeds Keras with `seed + r`, builds a fresh compiled
    model with `model_fn()` (or clones the model passed as `model_fn`, see
    below), trains it for `epochs` epochs on `(x, y)` and
    scores every example by ``||p(x) − y||₂`` in inference mode, where `p` is
    the softmax (or sigmoid, for binary cross-entropy) of the model's logits,
    or the model's output when the loss does not take logits, and `y` the
    one-hot label. Scores are averaged over repeats.

    A briefly trained model's BatchNorm moving statistics lag far behind its
    weights, so they are re-estimated on `bn_batches` training batches before
    scoring (as for GE members); with stale statistics a BatchNorm CNN's
    EL2N ranks flipped labels barely above chance (docs/benchmarks.md).

    Networks fit the labels the data supports before they memorise the rest,
    so where the inputs barely predict the labels and members fine-tuned from
    θ* keep what it memorised, briefly trained models still rank wrong labels
    (`NoisyLabelReport.diagnostics()` points here; docs/design.md#known-weaknesses).

    Args:
        model_fn: Zero-argument callable returning a new compiled Keras model
            (optimizer and loss) whose compiled loss matches the labels `y`;
            or a compiled model (the trained one): each repeat then trains a
            `keras.models.clone_model` copy with new weights from the layers'
            initialisers, compiled with a new optimizer of the model's own
            configuration and its loss. Variables the model does not train (a
            frozen backbone's weights, BatchNorm statistics) keep their
            values; the model itself is not changed. Models that cannot be
            cloned (most subclassed ones) need the callable.
        x: Training inputs, one row per example; or, as `model.fit` takes
            them, a `tf.data.Dataset` of `(x, y)` batches or a
            `keras.utils.PyDataset` (with `y` left `None`), in the order the
            scores should have. A dataset whose examples vary in length (a
            text pipeline's `padded_batch`) trains on mini-batches padded to
            their longest, as `GEXCollector` members do; one of fixed shapes
            up to 1 GiB is read into arrays once and scores as its arrays.
        y: Training labels: integer class ids `(N,)` or one-hot / target
            rows shaped like the model's outputs. `None` when `x` is a
            dataset. Defaults to `None`.
        epochs: Training epochs per repeat (the paper's App. E uses 20 out
            of 200, about 10% of a full run). Keep it near a tenth of the
            model's full training: models trained a third of the way have
            memorised much of what a full run does (docs/design.md#known-weaknesses).
            Defaults to `20`.
        repeats: Independently initialised runs averaged. Defaults to `5`.
        batch_size: Training batch size. Defaults to `64`.
        seed: Run `r` calls `keras.utils.set_random_seed(seed + r)` before
            `model_fn()`. Defaults to `0`.
        bn_batches: Training batches used to re-estimate BatchNorm moving
            statistics before scoring (0 keeps the statistics of training).
            Defaults to `20`.
        verbose: 0 (silent) or 1 / "auto" (a progress bar over the repeats,
            each one a training run). Defaults to `"auto"`.

    Returns:
        `(N,)` float64 mean EL2N scores in the order of `x` (of the dataset's
        examples); higher = more suspect.

    Raises:
        TypeError: If `model_fn` is a model, is not callable, or does not return a
            model.
        ValueError: For invalid data or arguments (see messages).
    """
    if isinstance(model_fn, keras.Model):
        trained = model_fn
        _validation.check_model(trained, need_loss=False)
        if not _is_compiled(trained):
            raise ValueError(
                "Argument `model_fn` must be a compiled model (with an optimizer and a "
                "loss) when it is a model: EL2N trains a fresh copy of it per repeat, "
                "compiled like it. Call `model.compile(optimizer=..., loss=...)`."
            )

        def model_fn():
            return _fresh_copy(trained)

    elif not callable(model_fn):
        raise TypeError(
            "Argument `model_fn` must be a callable returning a compiled `keras.Model`, "
            f"or a compiled model to clone. Received: model_fn of type {type(model_fn).__name__}"
        )
    epochs = _validation.positive_int("epochs", epochs)
    repeats = _validation.positive_int("repeats", repeats)
    batch_size = _validation.positive_int("batch_size", batch_size)
    seed = _validation.non_negative_int("seed", seed)
    bn_batches = _validation.non_negative_int("bn_batches", bn_batches)
    verbose = _validation.verbose_level(verbose)
    source = _el2n_source(x, y)
    n = source.count_examples()
    x_spec, y_spec = free_batch(source.element_spec)

    x0, y0 = source.first_batch()  # the loss is read on it, as `loss_scores` reads it
    # The labels' layout is judged on every row where there are arrays, else on y0.
    labels = source.arrays[1] if source.has_arrays else np.asarray(y0)
    train_batch = min(batch_size, n)
    total = np.zeros(n, dtype=np.float64)
    bar = keras.utils.Progbar(repeats, unit_name="run") if verbose else None
    for r in range(repeats):
        keras.utils.set_random_seed(seed + r)
        model = _build_model(model_fn)
        if source.has_arrays:
            x, y = source.arrays
            model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
        else:  # an epoch of whole mini-batches drawn from the shuffled examples
            batches = source.shuffled(train_batch, seed + r)
            model.fit(
                batches, epochs=epochs, steps_per_epoch=n // train_batch, shuffle=False, verbose=0
            )
        pred0 = sole_output(model(x0, training=False))
        output_layer = output_activation(model)[0]
        per_example = read_as_classifier(resolve_loss(model), y0, pred0, output_layer)
        tuner = FineTuner(model, per_example)
        if tuner.has_batchnorm and bn_batches > 0:
            batches = iter(source.shuffled(train_batch, seed + r))
            tuner.refresh_batchnorm(batches, bn_batches)
        out_shape = tuple(pred0.shape[1:])
        sparse = _uses_class_ids(labels, per_example.kind, out_shape)
        activation = "identity"
        if per_example.from_logits:
            binary = per_example.kind == "binary_crossentropy"
            activation = "sigmoid" if binary else "softmax"
        fn = _el2n_fn(tuner, sparse, activation, x_spec, y_spec)
        batches = (
            source.array_batches_of(_SCORE_BATCH_SIZE) if source.has_arrays else source.ordered()
        )
        scores = np.concatenate([fn(*batch).numpy() for batch in batches])
        if not np.all(np.isfinite(scores)):
            raise ValueError(
                f"EL2N run {r} produced NaN or inf scores: its training diverged. "
                "Lower the model's learning rate or check the data."
            )
        total += scores
        if bar is not None:
            bar.update(r + 1)
    return total / repeats
