"""Turn what `model.fit` accepts into ordered, batched, validated streams.

`DataSource` wraps either a tuple of arrays `(x, y)` or a `tf.data.Dataset`
of `(x, y)` batches (a `keras.utils.PyDataset` is read as one) and offers two
views of it. `x` may be one array or, for
a multi-input model, a dict, tuple or list of arrays (as `model.fit` takes it):

* `ordered()`: every example exactly once, in dataset order (for scoring);
* `shuffled(batch_size, seed)`: an endless stream of shuffled mini-batches
  (for fine-tuning the geometric ensemble).

Scores are only meaningful when they line up with the dataset's order, so a
dataset that reshuffles on every iteration, may yield its examples out of order
(`deterministic=False`), repeats its examples or drops the rows of a last,
partial batch is refused for scoring.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from keras_gex import _validation
from keras_gex.weights import sole_output

DEFAULT_BATCH_SIZE = 256
_SHUFFLE_BUFFER = 10_000


def from_py_dataset(data, name: str = "data") -> tf.data.Dataset:
    """A `keras.utils.PyDataset` as a `tf.data.Dataset` of its batches in index order.

    `fit` takes a `PyDataset` (`__len__` batches, `data[i]` the i-th `(x, y)`
    batch); GEX reads it as a dataset of `data[0], data[1], ...`, so scores
    follow that order. Shapes past the batch axis are read as `fit` reads them,
    from the first two batches: an axis whose size differs between them (a
    batch padded to its longest sequence) is unknown, the others must hold in
    every batch. Float64 inputs are read as float32, as array inputs are.
    """
    try:
        count = data.num_batches
    except NotImplementedError:
        count = None
    if count is None:
        raise ValueError(
            f"Argument `{name}` is a `PyDataset` without a length (`num_batches` is None); "
            "GEX scores every example once. Give it a `__len__`."
        )
    if count == 0:
        raise ValueError(f"Argument `{name}` is empty: it has no examples.")

    def batch(i):
        item = data[i]
        if isinstance(item, (tuple, list)) and len(item) == 3:
            raise ValueError(_sample_weight_message(name, "`(x, y)` batches from `__getitem__`"))
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"Argument `{name}`: `__getitem__` must return `(x, y)` batches; labels are "
                f"required to compute losses. Received: {type(item).__name__}"
            )
        x, y = item
        return tf.nest.map_structure(_float32_array, x), tf.nest.map_structure(np.asarray, y)

    # As `fit` reads it: the shapes of the first two batches, an axis whose size
    # differs between them (per-batch padding) left unknown.
    peeked = [batch(i) for i in range(min(count, 2))]
    spec = tf.nest.map_structure(
        lambda *arrays: tf.TensorSpec(
            (None, *(_common_size(sizes) for sizes in zip(*(a.shape[1:] for a in arrays)))),
            tf.as_dtype(arrays[0].dtype),
        ),
        *peeked,
    )
    ds = tf.data.Dataset.from_generator(
        lambda: (batch(i) for i in range(count)), output_signature=spec
    )
    return ds.apply(tf.data.experimental.assert_cardinality(count))


def _common_size(sizes) -> int | None:
    """An axis's size where every batch has the same, else None (unknown)."""
    return sizes[0] if len(set(sizes)) == 1 else None


def _float32_array(value) -> np.ndarray:
    """`value` as an array, float64 as float32 (what Keras layers compute in)."""
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def standardize_data(data, name: str = "data"):
    """`data` as `(x, y)` or a `tf.data.Dataset`: a `PyDataset` becomes a dataset.

    Refuses what can be read only once (a generator or iterator), with what to
    pass instead.
    """
    import keras

    if isinstance(data, keras.utils.PyDataset):
        return from_py_dataset(data, name)
    if isinstance(data, Iterator):
        raise TypeError(
            f"Argument `{name}` is a {type(data).__name__}, which can be read only once; GEX "
            "reads the data several times (fine-tuning, then scoring in order). Pass "
            "`tf.data.Dataset.from_generator(make_batches, output_signature=...)`, a "
            "`keras.utils.PyDataset`, or `(x, y)` arrays."
        )
    return data


def _dataset_nodes(ds: tf.data.Dataset):
    stack, seen = [ds], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        try:
            stack.extend(node._inputs())
        except Exception:
            pass


def as_inputs(x):
    """`x` as NumPy arrays: one array, or a dict / tuple of them (multi-input).

    A list or tuple counts as several inputs when its items are arrays or
    tensors (as Keras reads it); anything else becomes one array.

    >>> as_inputs([[1, 2], [3, 4]]).shape
    (2, 2)
    >>> sorted(as_inputs({"a": [1.0], "b": [[2]]}))
    ['a', 'b']
    >>> [a.shape for a in as_inputs((np.zeros((3, 2)), np.zeros(3)))]
    [(3, 2), (3,)]
    """
    if isinstance(x, dict):
        return {key: _array(value) for key, value in x.items()}
    if (
        isinstance(x, (tuple, list))
        and x
        and all(isinstance(v, (np.ndarray, tf.Tensor, dict)) or _is_sparse(v) for v in x)
    ):
        return tuple(as_inputs(v) if isinstance(v, dict) else _array(v) for v in x)
    return _array(x)


#: Largest dense size a sparse input matrix is read into (bytes).
_SPARSE_DENSE_BYTES = 2**30


def _is_sparse(value) -> bool:
    """A SciPy sparse matrix (array) or a `tf.SparseTensor`."""
    return isinstance(value, tf.SparseTensor) or type(value).__module__.startswith("scipy.sparse")


def _array(value) -> np.ndarray:
    """`value` as a NumPy array; a sparse matrix (a TF-IDF, a bag of words) densified,
    as a model with a dense `Input` reads it, up to `_SPARSE_DENSE_BYTES`.

    >>> import scipy.sparse
    >>> _array(scipy.sparse.csr_matrix(np.eye(2, dtype="float32"))).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if not _is_sparse(value):
        return np.asarray(value)
    shape = tuple(int(d) for d in value.shape)
    dtype = np.dtype(
        value.dtype.as_numpy_dtype if isinstance(value, tf.SparseTensor) else value.dtype
    )
    size = dtype.itemsize * int(np.prod(shape))
    if size > _SPARSE_DENSE_BYTES:
        raise ValueError(
            f"The inputs are a sparse matrix of shape {shape}, {size / 2**30:.1f} GiB dense, "
            "more than keras_gex reads into memory. Serve dense batches instead, e.g. a "
            "`keras.utils.PyDataset` whose `__getitem__(i)` returns "
            "`(x[i * b:(i + 1) * b].toarray(), y[i * b:(i + 1) * b])`."
        )
    if isinstance(value, tf.SparseTensor):
        return tf.sparse.to_dense(value).numpy()
    return value.toarray()


def input_leaves(x) -> list:
    """`[(name, array)]` of every input array of `x`, e.g. `("x['ids']", ...)`.

    >>> [name for name, _ in input_leaves({"ids": np.zeros(2), "mask": np.ones(2)})]
    ["x['ids']", "x['mask']"]
    """
    import keras

    return [
        ("x" + "".join(f"[{key!r}]" for key in path), value)
        for path, value in keras.tree.flatten_with_path(x)
    ]


def num_rows(x) -> int:
    """Examples in `x` (the first dimension of its first input)."""
    return len(tf.nest.flatten(x)[0])


def take_rows(x, rows):
    """`x` (a nest of arrays or tensors) at `rows`: a slice, or indices gathered."""
    if isinstance(rows, slice):
        return tf.nest.map_structure(lambda a: a[rows], x)
    return tf.nest.map_structure(lambda a: tf.gather(a, rows), x)


def spec_of(x):
    """The spec of batches of `x` (a nest), with a free batch dimension.

    A `tf.SparseTensor` or `tf.RaggedTensor` (a `tf.data` pipeline's bag of
    words, say) keeps its kind, as `fit` takes it.

    >>> spec_of(tf.sparse.from_dense(tf.eye(2)))
    SparseTensorSpec(TensorShape([None, 2]), tf.float32)
    """

    def free(a):
        shape = [None, *a.shape[1:]]
        if isinstance(a, tf.SparseTensor):
            return tf.SparseTensorSpec(shape, a.dtype)
        if isinstance(a, tf.RaggedTensor):
            return tf.RaggedTensorSpec(shape, a.dtype, a.ragged_rank, a.row_splits.dtype)
        return tf.TensorSpec(shape, tf.as_dtype(a.dtype))

    return tf.nest.map_structure(free, x)


def batch_like(rows: tf.data.Dataset, batch_size: int, batched_spec) -> tf.data.Dataset:
    """`rows` (single examples) batched as the pipeline of `batched_spec` batched them.

    Ragged inputs become ragged batches again (`ragged_batch`: an example taken
    out of a ragged batch and mapped is a dense tensor of its own length);
    dense examples of varying length (batches padded to their longest) are
    padded again; fixed shapes and sparse inputs batch as they are.
    """
    leaves = tf.nest.flatten(batched_spec)
    if any(isinstance(s, tf.RaggedTensorSpec) for s in leaves):
        return rows.ragged_batch(batch_size)
    if all(type(s) is tf.TensorSpec for s in leaves) and not all(
        s.shape[1:].is_fully_defined() for s in leaves
    ):
        return rows.padded_batch(batch_size)
    return rows.batch(batch_size)


def reshuffles_each_iteration(ds: tf.data.Dataset) -> bool:
    """Whether `ds` contains a `shuffle` that reshuffles on every iteration."""
    for node in _dataset_nodes(ds):
        if type(node).__name__ == "_ShuffleDataset" and bool(
            getattr(node, "_reshuffle_each_iteration", False)
        ):
            return True
    return False


# Parallel transformations that take `deterministic=`, by their dataset class.
_PARALLEL_OPS = {
    "_ParallelMapDataset": "map",
    "_ParallelBatchDataset": "batch",
    "_ParallelInterleaveDataset": "interleave",
    "ParallelInterleaveDataset": "parallel_interleave",
}


def nondeterministic_order(ds: tf.data.Dataset) -> str | None:
    """How `ds` may yield its elements in another order on each iteration
    (`deterministic=False` on a parallel transformation or in its options), or
    None where its order is fixed.

    >>> ds = tf.data.Dataset.range(8)
    >>> nondeterministic_order(ds.map(tf.square, num_parallel_calls=2, deterministic=False))
    '`map(..., deterministic=False)`'
    >>> nondeterministic_order(ds.map(tf.square, num_parallel_calls=2)) is None
    True
    """
    if ds.options().deterministic is False:
        return "`tf.data.Options.deterministic = False`"
    for node in _dataset_nodes(ds):
        name = _PARALLEL_OPS.get(type(node).__name__)
        if name is not None and _op_deterministic(node) == "false":
            return f"`{name}(..., deterministic=False)`"
    return None


def changing_order(ds: tf.data.Dataset) -> tuple[str, str] | None:
    """`(why, what to pass instead)` where `ds` may yield its examples in another
    order on each iteration (a reshuffle, or `deterministic=False`), else None."""
    if reshuffles_each_iteration(ds):
        return (
            "reshuffles on every iteration (`shuffle(..., reshuffle_each_iteration=True)`)",
            "Pass the dataset without `shuffle()` (the members' fine-tuning shuffles on "
            "its own), or with `reshuffle_each_iteration=False`; Keras' loaders "
            "(`keras.utils.image_dataset_from_directory`, ...) take `shuffle=False`.",
        )
    order = nondeterministic_order(ds)
    if order is not None:
        return (
            f"may yield its examples in another order on every iteration ({order})",
            "Pass the dataset with `deterministic=True` or without the argument "
            "(parallel calls stay parallel, their results in order).",
        )
    return None


def _op_deterministic(node) -> str:
    """A parallel dataset op's `deterministic` attribute: "true", "false" or
    "default" (the dataset's options decide)."""
    value = getattr(node, "_deterministic", None)
    if value is not None:
        return str(value)
    # `interleave` keeps it only in its op: read the serialized graph (rare path).
    from tensorflow.core.framework import graph_pb2
    from tensorflow.python.data.ops import options as options_lib

    try:
        graph = node._as_serialized_graph(
            external_state_policy=options_lib.ExternalStatePolicy.IGNORE
        )
        graph_def = graph_pb2.GraphDef.FromString(graph.numpy())
    except Exception:  # an input that cannot be serialized: assume the default
        return "default"
    for op in graph_def.node:
        if op.op.startswith("ParallelInterleaveDataset") and "deterministic" in op.attr:
            if op.attr["deterministic"].s == b"false":
                return "false"
    return "default"


def repetitions(ds: tf.data.Dataset) -> int:
    """How many times `ds` yields each example: the product of its finite `repeat(k)`
    counts (an endless `repeat()` is refused on its own, by its cardinality).

    >>> repetitions(tf.data.Dataset.range(4).repeat(3).batch(2))
    3
    >>> repetitions(tf.data.Dataset.range(4).batch(2))
    1
    """
    times = 1
    for node in _dataset_nodes(ds):
        if type(node).__name__ == "_RepeatDataset":
            count = int(getattr(node, "_count", -1))
            times *= count if count > 0 else 1
    return times


def dropped_rows(ds: tf.data.Dataset) -> int | None:
    """Rows a `batch(..., drop_remainder=True)` in `ds` never yields: 0 where none
    is dropped, None where some may be (the rows before it are not counted).

    >>> dropped_rows(tf.data.Dataset.range(10).batch(4, drop_remainder=True))
    2
    >>> dropped_rows(tf.data.Dataset.range(8).batch(4, drop_remainder=True))
    0
    >>> filtered = tf.data.Dataset.range(10).filter(lambda i: i > 2)  # rows unknown
    >>> dropped_rows(filtered.batch(4, drop_remainder=True)) is None
    True
    """
    dropped = 0
    for node in _dataset_nodes(ds):
        if not bool(tf.get_static_value(getattr(node, "_drop_remainder", False))):
            continue
        size = tf.get_static_value(getattr(node, "_batch_size", None))
        source = getattr(node, "_input_dataset", None)
        rows = -1 if source is None else int(source.cardinality())
        if size is None or rows < 0:
            return None
        dropped += rows % int(size)
    return dropped


class Progress:
    """A Keras progress bar over examples, or over batches where only they are counted.

    A dataset's examples are counted by a pass over it; before one, the bar
    counts batches out of its cardinality, as `model.predict` does, rather
    than examples out of "Unknown". Silent with `verbose=0`.
    """

    def __init__(self, examples: int | None, batches: int | None, verbose) -> None:
        self._by_batch = examples is None and batches is not None and batches > 0
        target, unit = (batches, "batch") if self._by_batch else (examples, "example")
        self._bar = keras.utils.Progbar(target, unit_name=unit) if verbose else None
        self._done = 0

    def advance(self, rows: int) -> None:
        """Moves the bar past one batch of `rows` examples."""
        if self._bar is not None:
            self._done += 1 if self._by_batch else rows
            self._bar.update(self._done)


def known_batches(ds: tf.data.Dataset) -> int | None:
    """The number of batches `ds` yields, or None where tf.data cannot tell."""
    card = int(ds.cardinality())
    return card if card >= 0 else None


def _refuse_non_finite(name: str, leaves) -> None:
    """Refuses NaN or inf in any float array of `leaves` (`(label, array)` pairs),
    naming the first rows that hold them."""
    for label, arr in leaves:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            rows = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
            raise ValueError(
                f"Argument `{name}`: `{label}` contains NaN or inf values, on {rows.size} "
                f"example(s) (first indices {rows[:5].tolist()})."
            )


def _refuse_label_per_output(name: str, y, num_examples: int) -> None:
    """Raises a clear error when array labels `y` hold one array per output of a model."""
    parts = list(y.values()) if isinstance(y, dict) else y
    if not isinstance(parts, (list, tuple)) or len(parts) in (0, 1, num_examples):
        return  # a list with a row per example is labels, not one array per output
    if all(np.ndim(part) >= 1 and len(part) == num_examples for part in parts):
        raise ValueError(_per_output_message(name, len(parts)))


def sole_label(y):
    """The label array of `y` given as a dict or list of one, for one named output.

    `fit` takes `{"label": y}` (or `[y]`) for a model whose one output is
    named (`keras.Model(x, {"label": logits})`); a list holding one example's
    label (`[3]`) stays a list of labels.

    >>> sole_label({"label": [0, 1]}), sole_label([np.zeros(2)]), sole_label([3])
    ([0, 1], array([0., 0.]), [3])
    """
    if isinstance(y, (list, tuple)) and len(y) == 1 and np.ndim(y[0]) < 1:
        return y  # one example's label
    return sole_output(y)


def _sample_weight_message(name: str, instead: str) -> str:
    """Why `(x, y, sample_weight)` is refused, and what to pass instead."""
    return (
        f"Argument `{name}` holds a third element, sample weights, which GEX does not "
        "use: every example is scored by its own loss, and the members fine-tune on "
        f"every example alike. Pass `{instead}`. Received 3 elements."
    )


def _per_output_message(name: str, count: int) -> str:
    return (
        f"Argument `{name}`: `y` holds {count} label arrays, one per model output. "
        "keras_gex supports single-output models only: wrap the model in one that "
        "returns the output whose loss you want to explain (e.g. "
        "`keras.Model(model.input, model.outputs[0])`, compiled with that output's loss) "
        "and pass that output's labels."
    )


def _output_shape(model, input_spec) -> tuple | None:
    """The shape of the model's single output for inputs of `input_spec`, or None.

    Functional models give it from their symbolic outputs; a subclassed model
    by tracing its `call` on symbolic inputs (`compute_output_spec`). None
    for several outputs, or where neither route answers.
    """
    import keras

    try:
        outputs = model.outputs
    except AttributeError:
        try:
            symbolic = tf.nest.map_structure(
                lambda s: keras.KerasTensor(s.shape, s.dtype), input_spec
            )
            outputs = model.compute_output_spec(symbolic)
        except Exception:  # a model that cannot be traced here: the entry checks judge it
            return None
    outputs = tf.nest.flatten(outputs) if outputs is not None else []
    return tuple(outputs[0].shape) if len(outputs) == 1 else None


def lacks_output_axis(label_rank, out_shape) -> bool:
    """Whether labels of rank `label_rank` are one axis short of outputs of shape
    `out_shape` whose last axis has size 1, which Keras' losses read as that axis.

    >>> lacks_output_axis(1, (None, 1)), lacks_output_axis(2, (None, 1))
    (True, False)
    >>> lacks_output_axis(1, (None, 3)), lacks_output_axis(1, None)
    (False, False)
    """
    if out_shape is None or len(out_shape) < 2 or out_shape[-1] != 1:
        return False
    return label_rank == len(out_shape) - 1


class DataSource:
    """A validated `(x, y)` data source.

    Args:
        data: A tuple `(x, y)` of arrays (NumPy or tensors), or a
            `tf.data.Dataset` yielding `(x, y)` batches.
        batch_size: Batch size used to batch arrays for scoring. Ignored for
            datasets, which are already batched. Defaults to `256`.
        name: Argument name used in error messages. Defaults to `"data"`.
    """

    def __init__(self, data, batch_size: int | None = None, name: str = "data"):
        self.name = name
        self.batch_size = DEFAULT_BATCH_SIZE
        if batch_size is not None:
            self.batch_size = _validation.positive_int("batch_size", batch_size)
        self._arrays = None
        self._dataset = None
        data = standardize_data(data, name)
        if isinstance(data, tf.data.Dataset):
            self._init_dataset(data)
        elif isinstance(data, (tuple, list)):
            self._init_arrays(data)
        else:
            raise TypeError(
                f"Argument `{name}` must be a tuple `(x, y)` of arrays, a "
                "`tf.data.Dataset` of `(x, y)` batches or a `keras.utils.PyDataset`. "
                f"Received: {name} of type {type(data).__name__}"
            )

    # -- construction -------------------------------------------------------
    def _init_arrays(self, data):
        if len(data) == 3:
            raise ValueError(_sample_weight_message(self.name, "(x, y)"))
        if len(data) != 2:
            raise ValueError(
                f"Argument `{self.name}` must be a pair `(x, y)`; labels are "
                f"required to compute losses. Received a sequence of {len(data)} items."
            )
        x, y = as_inputs(data[0]), np.asarray(sole_label(data[1]))
        if not tf.nest.flatten(x):
            raise ValueError(f"Argument `{self.name}`: `x` holds no input arrays.")
        leaves = [*input_leaves(x), ("y", y)]
        if np.ndim(leaves[0][1]) > 0:
            _refuse_label_per_output(self.name, data[1], len(leaves[0][1]))
        for label, arr in leaves:
            if arr.ndim == 0:
                got = (
                    repr(arr)
                    if arr.dtype != object
                    else f"an object of type {type(arr.item()).__name__}"
                )
                raise ValueError(
                    f"Argument `{self.name}`: `{label}` must be an array with one row per "
                    f"example (`x` may also be a dict, tuple or list of such arrays). "
                    f"Received: {label}={got}"
                )
        for label, arr in leaves:
            if len(arr) != len(y):
                raise ValueError(
                    f"Argument `{self.name}`: `{label}` and `y` must have the same number of "
                    f"examples. Received: len({label})={len(arr)}, len(y)={len(y)}"
                )
        if len(y) == 0:
            raise ValueError(f"Argument `{self.name}` is empty: it has no examples.")
        if y.dtype.kind not in "biuf":
            raise ValueError(
                f"Argument `{self.name}`: `y` must hold numbers (class ids, 0/1 or one-hot "
                f"labels, or regression targets), as `model.fit` takes them. Received: y "
                f"of dtype {y.dtype}, e.g. {str(y.flat[0])!r}. Encode the labels as integers "
                "first (`np.unique(y, return_inverse=True)[1]`)."
            )
        _refuse_non_finite(self.name, leaves)
        x = tf.nest.map_structure(_float32_array, x)
        self._arrays = (x, y)
        self.num_examples = len(y)

    def _init_dataset(self, ds: tf.data.Dataset):
        spec = ds.element_spec
        if isinstance(spec, tuple) and len(spec) == 3:
            raise ValueError(
                _sample_weight_message(self.name, "ds.map(lambda x, y, sample_weight: (x, y))")
            )
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(
                f"Argument `{self.name}` must yield `(x, y)` pairs; labels are "
                f"required to compute losses. Received element_spec={spec}"
            )
        labels = tf.nest.flatten(spec[1])
        if len(labels) > 1:
            raise ValueError(_per_output_message(self.name, len(labels)))
        if labels and not isinstance(spec[1], tf.TypeSpec):  # {"label": y} or (y,)
            ds = ds.map(lambda x, y: (x, tf.nest.flatten(y)[0]))
        card = int(ds.cardinality())
        if card == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                f"Argument `{self.name}` is infinite (it uses `repeat()`); GEX "
                "scores every example once. Pass the dataset without `repeat()`."
            )
        if card == 0:
            raise ValueError(f"Argument `{self.name}` is empty: it has no examples.")
        self._dataset = ds
        self.num_examples = None  # known after the first ordered pass

    # -- checks that need the model ------------------------------------------
    def check_against_model(self, model) -> None:
        """Refuses unbatched datasets and inputs the model cannot take; reads
        labels one axis short of a width-1 output as Keras does (`_labels_like_outputs`)."""
        self._check_batched(model)
        _validation.check_inputs_fit_model(model, self.element_spec[0], name=self.name)
        self._labels_like_outputs(model)

    def _labels_like_outputs(self, model) -> None:
        """Gives labels of shape `(batch,)` a last axis against one `(batch, 1)` output.

        Keras' losses read such labels (a sigmoid classifier's 0/1 labels, a
        regression's targets) as `(batch, 1)` (`squeeze_or_expand_to_same_rank`),
        so `fit` takes them; every per-example computation here (losses, fit,
        relabeled targets) then sees labels of the outputs' shape.
        """
        out_shape = _output_shape(model, self.element_spec[0])
        if self._arrays is not None:
            x, y = self._arrays
            if lacks_output_axis(y.ndim, out_shape):
                self._arrays = (x, y[..., None])
        else:
            rank = getattr(getattr(self._dataset.element_spec[1], "shape", None), "rank", None)
            if lacks_output_axis(rank, out_shape):
                self._dataset = self._dataset.map(lambda x, y: (x, tf.expand_dims(y, -1)))

    def _check_batched(self, model) -> None:
        """Refuses unbatched datasets by comparing ranks with the model input."""
        inputs = getattr(model, "inputs", None)
        if self._dataset is None or not inputs:
            return
        x_spec = self._dataset.element_spec[0]
        if not isinstance(x_spec, tf.TensorSpec):
            return
        want = len(inputs[0].shape)
        got = x_spec.shape.rank
        if got is not None and got == want - 1:
            raise ValueError(
                f"Argument `{self.name}` looks unbatched: its inputs have rank "
                f"{got} but the model expects batches of rank {want}. "
                "Call `.batch(batch_size)` on the dataset."
            )

    def check_ordered(self) -> None:
        """Refuses datasets whose order changes between iterations (a reshuffle
        or `deterministic=False`), that repeat their examples or that drop the
        rows of a last, partial batch: scores could not be matched to examples
        one to one."""
        if self._dataset is None:
            return
        changing = changing_order(self._dataset)
        if changing is not None:
            why, fix = changing
            raise ValueError(
                f"Argument `{self.name}` {why}, so scores could not be matched to examples. {fix}"
            )
        dropped = dropped_rows(self._dataset)
        if dropped != 0:
            count = "rows" if dropped is None else f"{dropped} rows"
            raise ValueError(
                f"Argument `{self.name}` drops the {count} of its last, partial batch "
                "(`batch(..., drop_remainder=True)`), which would get no score. Pass the "
                "dataset batched without `drop_remainder` (the fine-tuning batches on its "
                "own)."
            )
        times = repetitions(self._dataset)
        if times > 1:
            raise ValueError(
                f"Argument `{self.name}` repeats its examples (`repeat()`, {times} times in "
                "all), so each would be scored that many times and the scores would not "
                "line up with the examples. Pass the dataset without `repeat()` (the "
                "fine-tuning repeats it on its own)."
            )

    @property
    def has_arrays(self) -> bool:
        """Whether the source holds `(x, y)` arrays (rather than a dataset)."""
        return self._arrays is not None

    @property
    def arrays(self):
        """The validated `(x, y)` arrays (float64 inputs as float32), or None."""
        return self._arrays

    @property
    def element_spec(self):
        """The `(x, y)` spec of `ordered()`'s batches, without building it."""
        if self._arrays is None:
            return self._dataset.element_spec
        return spec_of(self._arrays)

    def progress(self, verbose) -> Progress:
        """A progress bar for one ordered pass (`Progress`)."""
        batches = None if self._arrays is not None else known_batches(self._dataset)
        return Progress(self.num_examples, batches, verbose)

    # -- views ------------------------------------------------------------------
    def ordered(self) -> tf.data.Dataset:
        """Every example once, in order, batched."""
        if self._arrays is not None:
            x, y = self._arrays
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(self.batch_size)
        else:
            ds = self._dataset
        return ds.prefetch(tf.data.AUTOTUNE)

    def shuffled(self, batch_size: int, seed: int) -> tf.data.Dataset:
        """An endless stream of shuffled mini-batches of exactly `batch_size`.

        For arrays the order is a stateless function of `seed` alone (one
        `stateless_shuffle` permutation per epoch), independent of TensorFlow's
        global seed, so the same seed gives the same batches in any process.
        For a `tf.data.Dataset` it is `shuffle(seed=seed)` over its examples,
        reproducible under the same global seed (`keras.utils.set_random_seed`);
        examples whose shape varies (a pipeline that pads each batch to its
        longest sequence) are padded with zeros to the longest in each
        mini-batch (`padded_batch`), the padding `padded_batch` and Keras'
        `pad_sequences` use by default.
        """
        if self._arrays is not None:
            x, y = self._arrays
            n = len(y)
            x_t, y_t = tf.nest.map_structure(tf.constant, x), tf.constant(y)
            seed_t = tf.constant(int(seed) % (2**31), tf.int64)

            def permutation(epoch):
                return tf.random.experimental.stateless_shuffle(
                    tf.range(n, dtype=tf.int64), seed=tf.stack([seed_t, epoch])
                )

            ds = tf.data.Dataset.counter().map(permutation).unbatch()
            ds = ds.batch(batch_size, drop_remainder=True)
            ds = ds.map(lambda idx: (take_rows(x_t, idx), tf.gather(y_t, idx)))
            return ds.prefetch(tf.data.AUTOTUNE)
        ds = self._dataset.unbatch()
        n = self.num_examples
        buffer = min(n, _SHUFFLE_BUFFER) if n else _SHUFFLE_BUFFER
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        leaves = tf.nest.flatten(ds.element_spec)
        if all(type(s) is tf.TensorSpec for s in leaves) and not all(
            s.shape.is_fully_defined() for s in leaves
        ):  # dense examples of varying length (batches padded to their longest): pad again
            ds = ds.padded_batch(batch_size, drop_remainder=True)
        else:  # fixed shapes, or ragged / sparse components, which batch as they are
            ds = ds.batch(batch_size, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def in_memory(self, max_bytes: int, *, refuse_non_finite: bool = False) -> DataSource:
        """This source as arrays, read in one pass, if a dataset's examples fit `max_bytes`.

        Fine-tuning reads the training data once per epoch of every member;
        from arrays a batch is a gather, from a dataset it is the dataset's
        whole pipeline (and an unbatch and shuffle) again. Returns `self` for
        arrays, for inputs of varying shape or strings, and for datasets
        larger than `max_bytes` (streamed as they are). A pipeline that draws
        random augmentations is read once: the members see one draw. With
        `refuse_non_finite`, what arrays refuse (NaN or inf values) is refused
        in what was read (fine-tuning data); otherwise the source stays a
        dataset and its consumer marks those rows.
        """
        if self._arrays is not None:
            return self
        leaves = tf.nest.flatten(self._dataset.element_spec)
        if any(
            not isinstance(s, tf.TensorSpec)
            or s.dtype == tf.string
            or not s.shape[1:].is_fully_defined()
            for s in leaves
        ):
            return self
        example_bytes = sum(s.dtype.size * max(1, s.shape[1:].num_elements()) for s in leaves)
        if self.num_examples is not None and example_bytes * self.num_examples > max_bytes:
            return self
        batches, rows = [], 0
        for x, y in self._dataset:
            rows += int(tf.shape(y)[0])
            if example_bytes * rows > max_bytes:
                return self
            batches.append(tf.nest.map_structure(np.asarray, (x, y)))
        if not rows:
            raise ValueError(f"Argument `{self.name}` is empty: it has no examples.")
        self.num_examples = rows
        x, y = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *batches)
        try:
            return DataSource((x, y), batch_size=self.batch_size, name=self.name)
        except ValueError:  # e.g. NaN inputs: refused, or left to the consumer as streamed
            if refuse_non_finite:
                raise
            return self

    def array_stream(self, batch_size: int, seed: int) -> ArrayStream:
        """The batches of `shuffled(batch_size, seed)`, drawn by index (arrays only).

        Same examples in the same order as the `tf.data` stream, without
        building a pipeline per member: the fine-tuning loop gathers each
        batch from the arrays itself.
        """
        if self._arrays is None:
            raise ValueError("`array_stream` needs array inputs; use `shuffled` for datasets.")
        if getattr(self, "_tensors", None) is None:
            self._tensors = tf.nest.map_structure(tf.constant, self._arrays)
        return ArrayStream(*self._tensors, batch_size=batch_size, seed=seed)

    def count_examples(self) -> int:
        """Number of examples (one pass over a dataset's labels, cached)."""
        if self.num_examples is None:
            total = 0
            for _, y in self._dataset:
                total += int(tf.shape(y)[0])
            if total == 0:
                raise ValueError(f"Argument `{self.name}` is empty: it has no examples.")
            self.num_examples = total
        return self.num_examples

    def fingerprint(self) -> str:
        """Hash of every example's inputs and labels, in order (one pass for datasets)."""
        import hashlib

        digest = hashlib.sha256()
        if self._arrays is not None:
            chunks = [self._arrays]
        else:
            chunks = iter(self._dataset)
        total = 0
        for x, y in chunks:
            # Sparse and ragged inputs as their component arrays; dicts by leaf.
            for arr in tf.nest.flatten((x, y), expand_composites=True):
                arr = np.ascontiguousarray(arr)
                digest.update(f"{arr.dtype}{arr.shape[1:]}".encode())
                if arr.dtype == object:  # strings: their bytes, not the pointers
                    for item in arr.ravel():
                        digest.update(item if isinstance(item, bytes) else str(item).encode())
                        digest.update(b"\0")
                else:
                    digest.update(arr.tobytes())
            total += len(y)
        if self.num_examples is None:
            self.num_examples = total
        return f"{total}-{digest.hexdigest()[:16]}"

    def array_batches(self):
        """Every `(x, y)` batch of arrays in order, sliced without a pipeline."""
        return self.array_batches_of(self.batch_size)

    def array_batches_of(self, size: int):
        """Every `(x, y)` batch of `size` rows of the arrays, in order."""
        for start in range(0, self.num_examples, size):
            yield take_rows(self._arrays, slice(start, start + size))

    def first_batch(self):
        """The first `(x, y)` batch of the ordered view."""
        if self._arrays is not None:
            return next(self.array_batches())
        for batch in self.ordered().take(1):
            return batch
        raise ValueError(f"Argument `{self.name}` is empty: it has no examples.")


class ArrayStream:
    """Endless shuffled mini-batches of `(x, y)` tensors, drawn by index.

    Yields exactly the batches of `DataSource.shuffled(batch_size, seed)` for
    arrays: epoch `e` is `stateless_shuffle(range(n), seed=(seed, e))`, epochs
    are concatenated and cut into batches of `batch_size` (a batch may span
    two epochs). `take_indices(k)` hands the next `k` batches' row indices to
    a compiled loop; `next(stream)` gathers one batch eagerly.

    Args:
        x: Input tensor `(N, ...)`, or a nest of them (multi-input).
        y: Label tensor `(N, ...)`.
        batch_size: Examples per batch.
        seed: Seed of the permutations.
    """

    def __init__(self, x, y, *, batch_size: int, seed: int):
        self.x, self.y = x, y
        self.num_examples = int(y.shape[0])
        self.batch_size = int(batch_size)
        self._seed = int(seed) % (2**31)
        self._epoch = 0
        self._pending = np.empty(0, np.int64)

    def take_indices(self, num_batches: int) -> np.ndarray:
        """`(num_batches, batch_size)` int64 row indices of the next batches."""
        need = num_batches * self.batch_size
        chunks = [self._pending]
        have = len(self._pending)
        while have < need:
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(self.num_examples, dtype=tf.int64),
                seed=tf.constant([self._seed, self._epoch], tf.int64),
            ).numpy()
            chunks.append(perm)
            have += len(perm)
            self._epoch += 1
        flat = np.concatenate(chunks)
        self._pending = flat[need:]
        return flat[:need].reshape(num_batches, self.batch_size)

    def __iter__(self):
        return self

    def __next__(self):
        idx = tf.constant(self.take_indices(1)[0])
        return take_rows(self.x, idx), tf.gather(self.y, idx)


def finite_rows(x):
    """`(B,)` bool: whether every floating-point input value of each row is finite.

    None when `x` has no floating-point inputs (e.g. token ids).

    >>> finite_rows(tf.constant([[1.0, 2.0], [float("inf"), 0.0]])).numpy()
    array([ True, False])
    >>> finite_rows(tf.constant([[1, 2]])) is None
    True
    """
    rows = None
    for t in tf.nest.flatten(x):
        if not isinstance(t, (tf.SparseTensor, tf.RaggedTensor)):
            t = tf.convert_to_tensor(t)
        if not t.dtype.is_floating:
            continue
        ok = _finite_per_row(t)
        rows = ok if rows is None else tf.logical_and(rows, ok)
    return rows


def _finite_per_row(t):
    """`(B,)` bool: every value of each row of `t` (dense, sparse or ragged) is finite.

    >>> _finite_per_row(tf.sparse.from_dense([[0.0, 1.0], [float("nan"), 0.0]])).numpy()
    array([ True, False])
    >>> _finite_per_row(tf.ragged.constant([[1.0], [2.0, float("inf")], []])).numpy()
    array([ True, False,  True])
    >>> _finite_per_row(tf.ragged.constant([[], []], dtype=tf.float32)).numpy()  # no values
    array([ True,  True])
    """
    if isinstance(t, tf.SparseTensor):  # a row is finite unless one stored value is not
        bad = tf.cast(tf.logical_not(tf.math.is_finite(t.values)), tf.int32)
        rows = tf.cast(t.indices[:, 0], tf.int32)
        num_rows = tf.cast(t.dense_shape[0], tf.int32)
        return tf.math.unsorted_segment_max(bad, rows, num_rows) <= 0
    if isinstance(t, tf.RaggedTensor):
        bad = tf.logical_not(tf.math.is_finite(t.flat_values))
        if bad.shape.rank > 1:  # uniform inner axes: one flag per flat value
            bad = tf.reduce_any(bad, axis=list(range(1, bad.shape.rank)))
        bad = tf.cast(bad, tf.int32)
        rows = t.nested_value_rowids()
        ids = rows[-1]
        for outer in reversed(rows[:-1]):
            ids = tf.gather(outer, ids)
        return tf.math.unsorted_segment_max(bad, ids, t.nrows(out_type=tf.int32)) <= 0
    return tf.reduce_all(tf.math.is_finite(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1)


def nan_where_not_finite(x, values):
    """`values` (batch-major) with NaN in the rows whose input `x` is not finite.

    A compiled forward pass can map a non-finite input to finite outputs (seen:
    TensorFlow 2.21's CPU kernels turned an `inf` pixel into finite logits where
    the eager pass gave NaN), so every consumer marks those rows itself and then
    refuses them by index. Inputs without floating-point values pass through.

    >>> nan_where_not_finite(tf.constant([[1.0], [float("inf")]]), tf.constant([0.5, 0.7])).numpy()
    array([0.5, nan], dtype=float32)
    """
    values = tf.convert_to_tensor(values)
    finite = finite_rows(x)
    if finite is None:
        return values
    finite = tf.reshape(finite, [-1] + [1] * (values.shape.rank - 1))
    return tf.where(finite, values, tf.constant(float("nan"), values.dtype))
