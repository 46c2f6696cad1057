"""How the library builds its `tf.function`s.

Every compiled function in keras_gex belongs to one object (a `Scorer`, a
`FineTuner`, an ensemble's prediction cache, a baseline's repeat) and is traced
once per input signature. TensorFlow counts traces per Python *code object*,
across every `tf.function` built from it, so a user who collects or scores five
ensembles in one process was told "5 out of the last 5 calls to <function
Scorer._step> triggered tf.function retracing": five first traces of five
functions, not one function retracing. `compiled` builds the function with that
cross-object warning off; genuine retracing is what the tests measure instead,
by each function's own tracing count (`tests/test_scoring.py`).

`compiled` also builds without AutoGraph, as Keras' own `fit` runs a train step
(`tf.autograph.experimental.do_not_convert`): the user's model and loss run
exactly as they run in training, loops are written as `tf.while_loop`, and no
trace pays for converting every layer's source (0.2-0.4 s a call on the zoo).
"""

from __future__ import annotations

import contextlib
import logging

import tensorflow as tf


def compiled(python_function, **kwargs):
    """`tf.function(python_function, autograph=False, **kwargs)` without the cross-object warning.

    Args:
        python_function: The Python callable to compile. Its control flow on
            tensors must be TensorFlow's own (`tf.while_loop`, `tf.cond`).
        **kwargs: Passed to `tf.function` (`input_signature`, `jit_compile`).

    Returns:
        The `tf.function`.

    >>> fns = [compiled(lambda v: v + 1) for _ in range(6)]
    >>> [int(f(tf.constant(1))) for f in fns]
    [2, 2, 2, 2, 2, 2]
    >>> fns[0].experimental_get_tracing_count()
    1
    >>> try:  # a Python `if` on a tensor: AutoGraph would have converted it
    ...     compiled(lambda v: 1 if v > 0 else 0)(tf.constant(1))
    ... except TypeError:
    ...     print("not converted")
    not converted
    """
    kwargs.setdefault("autograph", False)
    function = tf.function(python_function, **kwargs)
    # TensorFlow's own switch for the same warning (set on every function a
    # SavedModel restores); absent in a future release, the warning returns.
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


def free_batch(spec):
    """`spec` with a free batch dimension, so every batch size shares one trace.

    Args:
        spec: A `tf.TensorSpec` or a nest of them (a dataset's `element_spec`).

    Returns:
        The same nest, each ranked `tf.TensorSpec` with its first dimension
        `None`; other entries unchanged.

    >>> spec = (tf.TensorSpec([32, 8]), tf.TensorSpec([32], tf.int64))
    >>> [s.shape.as_list() for s in free_batch(spec)]
    [[None, 8], [None]]
    """

    def relax(s):
        if isinstance(s, tf.TensorSpec) and s.shape.rank:
            return tf.TensorSpec([None, *s.shape[1:]], s.dtype)
        return s

    return tf.nest.map_structure(relax, spec)


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def _dropping(fragment: str):
    """Drops TensorFlow's log messages that contain `fragment`, inside the block only."""
    logger = tf.get_logger()
    drop = _DropMessages(fragment)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def quiet_loop_fallback():
    """Drops TensorFlow's "<Op> uses a while_loop. Fix that!" while tracing.

    `tf.vectorized_map` prints it once per op it cannot vectorise (e.g.
    `Conv2DBackpropFilter` for per-example convolution gradients) and then
    computes that op in a loop, correctly; the message is addressed to
    TensorFlow's developers. Only that message is dropped, only inside the
    block.
    """
    return _dropping("uses a while_loop. Fix that!")


def forward_flops(model) -> int | None:
    """Float operations of one example's inference pass through `model`, or None.

    Counted by TensorFlow's profiler on the traced graph (a multiply-add is
    two), so the count is the same on every machine. None where the model's
    single input has a free dimension besides the batch, or where the graph
    cannot be traced or counted.

    >>> import keras
    >>> dense = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, use_bias=False)])
    >>> forward_flops(dense)  # 2 · 64 · 32
    4096
    >>> forward_flops(keras.Sequential([keras.Input((None, 8)), keras.layers.Dense(4)]))  # None
    """
    if len(model.inputs) != 1:
        return None
    shape = model.inputs[0].shape[1:]
    if None in shape:
        return None
    spec = tf.TensorSpec([1, *shape], model.inputs[0].dtype)
    profiler = tf.compat.v1.profiler
    options = profiler.ProfileOptionBuilder(
        profiler.ProfileOptionBuilder.float_operation()
    ).with_empty_output()
    try:
        with _dropping("is deprecated"):  # the profiler's own use of a v1 helper
            graph = (
                tf.function(lambda x: model(x, training=False), autograph=False)
                .get_concrete_function(spec)
                .graph
            )
            flops = profiler.profile(graph=graph, options=options.build()).total_float_ops
    except Exception:  # an estimate, never a reason to stop: unknown
        return None
    return int(flops) or None
