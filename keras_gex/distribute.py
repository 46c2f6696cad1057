"""GEX on `tf.distribute`: strategy resolution, ordered per-replica input, gathering.

Scoring and fine-tuning run under any synchronous `tf.distribute` strategy
(`MirroredStrategy` on one host, `MultiWorkerMirroredStrategy` across hosts,
`OneDeviceStrategy`). Everything here is plain TensorFlow distribution:

* `distribute_batches(strategy, ds)` splits every batch of an ordered dataset
  into `num_replicas_in_sync` contiguous chunks, chunk `r` going to global
  replica `r`. A partial last batch is split the same way; when a batch has
  fewer examples than there are replicas, some replicas receive zero
  examples (an empty chunk) for that step. Every worker reads the whole
  dataset and keeps its own replicas' chunks, so all workers take the same
  number of steps and no collective is left waiting.
* `gather(strategy, value)` concatenates per-replica values in global replica
  order (`strategy.gather`, a concat on one host, an all-gather across
  workers), so the chunks of a batch come back as the batch, in order.
* `distribute_per_replica(strategy, dataset_fn)` gives every replica its own
  stream (one GE member per replica).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex._tracing import compiled

#: Strategies that need a `ClusterCoordinator` or fixed shapes; refused.
_UNSUPPORTED = {
    "ParameterServerStrategy": "it needs a `ClusterCoordinator` and has no synchronous `run`",
    "ParameterServerStrategyV2": "it needs a `ClusterCoordinator` and has no synchronous `run`",
    "CentralStorageStrategy": "it keeps variables on one device; use `MirroredStrategy`",
    "TPUStrategy": "scoring splits batches into per-replica chunks of varying size",
    "TPUStrategyV2": "scoring splits batches into per-replica chunks of varying size",
}


def check_strategy(strategy, name: str = "strategy"):
    """Returns `strategy` if it is a supported `tf.distribute.Strategy`, else raises."""
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"Argument `{name}` must be a `tf.distribute.Strategy` (for example "
            "`tf.distribute.MirroredStrategy()`). "
            f"Received: {name}={strategy!r} of type {type(strategy).__name__}"
        )
    why = _UNSUPPORTED.get(type(strategy).__name__)
    if why is not None:
        raise ValueError(
            f"Argument `{name}`: {type(strategy).__name__} is not supported ({why}). "
            "Use `tf.distribute.MirroredStrategy` on one host or "
            "`tf.distribute.MultiWorkerMirroredStrategy` across hosts."
        )
    return strategy


def resolve_strategy(strategy=None, model=None):
    """The strategy to run under, or None for the single-device path.

    An explicit `strategy` wins. Otherwise the strategy whose scope is active,
    or the one the model was built under (Keras records it), is picked up.
    TensorFlow's default (no-op) strategy means single-device.

    Args:
        strategy: A `tf.distribute.Strategy` or None.
        model: The Keras model, consulted when `strategy` is None.

    Returns:
        A `tf.distribute.Strategy`, or None.
    """
    if strategy is not None:
        check_strategy(strategy)
        if tf.distribute.has_strategy() and tf.distribute.get_strategy() is not strategy:
            raise ValueError(
                "Argument `strategy` differs from the strategy whose `scope()` is "
                "active. Call this outside the other strategy's scope, or pass that one."
            )
    elif tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    else:
        strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or strategy is _default_strategy():
        return None
    return check_strategy(strategy)


def _default_strategy():
    if tf.distribute.has_strategy():
        return None
    return tf.distribute.get_strategy()


def check_per_replica_members(
    value, strategy, chain: bool, *, require_strategy: bool = True
) -> bool:
    """Validates `per_replica_members` against the resolved strategy and `chain`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            "Argument `per_replica_members` must be a boolean. "
            f"Received: per_replica_members={value!r}"
        )
    value = bool(value)
    if value and strategy is None and require_strategy:
        raise ValueError(
            "Argument `per_replica_members=True` needs a `tf.distribute` strategy: pass "
            "`strategy=tf.distribute.MirroredStrategy()` (or call inside its `scope()`)."
        )
    if value and chain:
        raise ValueError(
            "Arguments `per_replica_members=True` and `chain=True` are incompatible: a "
            "chain starts each member from the previous one, so members cannot be "
            "fine-tuned in parallel. Pass `chain=False`, or `per_replica_members=False` "
            "for data-parallel fine-tuning of each member in turn."
        )
    return value


def num_workers(strategy) -> int:
    """Number of worker processes the strategy spans (1 on a single host)."""
    return int(getattr(strategy.extended, "_num_workers", 1) or 1)


def worker_index(strategy) -> int:
    """This process' index among the workers (0 on a single host)."""
    return int(getattr(strategy.extended, "_id_in_cluster", 0) or 0)


def describe(strategy) -> dict:
    """JSON-able summary recorded in `ensemble.info["strategy"]`."""
    if strategy is None:
        return {"type": None, "replicas": 1, "workers": 1}
    return {
        "type": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "workers": num_workers(strategy),
    }


def _batch_size(batch):
    return tf.shape(tf.nest.flatten(batch)[-1], out_type=tf.int64)[0]


def chunk(batch, index, count):
    """Rows `[index*b//count, (index+1)*b//count)` of every tensor of `batch`."""
    b = _batch_size(batch)
    index = tf.cast(index, tf.int64)
    count = tf.cast(count, tf.int64)
    lo, hi = (index * b) // count, ((index + 1) * b) // count
    return tf.nest.map_structure(lambda t: t[lo:hi], batch)


def split_batches(ds: tf.data.Dataset, num_replicas: int, first: int, count: int):
    """Each batch of `ds` becomes chunks `first .. first+count-1` of its split."""

    def split(*batch):
        batch = batch[0] if len(batch) == 1 else batch
        ids = tf.data.Dataset.range(first, first + count)
        return ids.map(lambda i: chunk(batch, i, num_replicas))

    return ds.flat_map(split)


def distribute_batches(strategy, ds: tf.data.Dataset):
    """Distributes an ordered, batched dataset: batch → one chunk per replica.

    Global replica `r` receives rows `[r*b//R, (r+1)*b//R)` of every batch of
    `b` rows (R replicas), so `gather` restores each batch in order, the last
    partial batch included; replicas whose chunk is empty compute on zero rows.
    """
    replicas = strategy.num_replicas_in_sync

    def dataset_fn(context):
        local = replicas // context.num_input_pipelines
        return split_batches(ds, replicas, context.input_pipeline_id * local, local)

    return strategy.distribute_datasets_from_function(dataset_fn)


def distribute_per_replica(strategy, dataset_fn):
    """Every global replica `r` reads its own dataset `dataset_fn(r)`."""
    replicas = strategy.num_replicas_in_sync

    def fn(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        datasets = [dataset_fn(first + j) for j in range(local)]
        if local == 1:
            return datasets[0]
        order = tf.data.Dataset.range(local).repeat()
        return tf.data.Dataset.choose_from_datasets(datasets, order, stop_on_empty_dataset=True)

    return strategy.distribute_datasets_from_function(fn)


def _gatherable(dtype: tf.DType) -> tf.DType:
    """A dtype every strategy's all-gather accepts (collectives reject small ints)."""
    if dtype in (tf.float16, tf.float32, tf.float64, tf.int32, tf.int64):
        return dtype
    if dtype.is_floating:
        return tf.float32
    return tf.int64


def gather(strategy, value):
    """Concatenates per-replica `value` (any nest) along axis 0, in replica order.

    On one host the local results are concatenated directly (no collective,
    any dtype); across workers `strategy.gather` all-gathers them, with dtypes
    the collectives reject (bool, small integers) sent as int64 and restored.
    """
    if num_workers(strategy) == 1:
        return tf.nest.map_structure(
            lambda v: tf.concat(strategy.experimental_local_results(v), axis=0), value
        )

    def one(v):
        dtype = strategy.experimental_local_results(v)[0].dtype
        wire = _gatherable(dtype)
        if wire != dtype:
            v = strategy.run(lambda t: tf.cast(t, wire), args=(v,))
        out = strategy.gather(v, axis=0)
        return tf.cast(out, dtype) if wire != dtype else out

    return tf.nest.map_structure(one, value)


def expand(value):
    """`value[None]`, for gathering one row per replica."""
    return tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), value)


def per_replica_values(strategy, values):
    """A per-replica value whose global replica `r` holds `values[r]`."""
    values = list(values)
    return strategy.experimental_distribute_values_from_function(
        lambda context: values[context.replica_id_in_sync_group]
    )


def check_replica_order(strategy) -> None:
    """Verifies that `gather` returns global replicas in order 0, 1, ..., R-1."""

    def replica_id():
        context = tf.distribute.get_replica_context()
        return tf.reshape(tf.cast(context.replica_id_in_sync_group, tf.int32), [1])

    got = compiled(lambda: gather(strategy, strategy.run(replica_id)))().numpy()
    want = np.arange(strategy.num_replicas_in_sync)
    if not np.array_equal(got, want):  # pragma: no cover - depends on TensorFlow internals
        raise RuntimeError(
            f"{type(strategy).__name__} gathered replicas in order {got.tolist()}, not "
            f"{want.tolist()}; scores could not be matched to examples."
        )
