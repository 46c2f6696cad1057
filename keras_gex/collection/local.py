"""`FineTuner`: fine-tuning on one device, one member at a time."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex._tracing import compiled
from keras_gex.collection import tuner as core
from keras_gex.data import ArrayStream, DataSource, spec_of, take_rows
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet, stateless_call


class FineTuner:
    """Private working copy of the model's weights with an SGD-momentum step.

    A round of one member: `train`, `evaluate` and `snapshots` return one entry
    each, like `ReplicaFineTuner`'s one per replica.

    Args:
        model: The trained model (θ* is read from it once).
        loss: Per-example loss.
        momentum: SGD momentum. Defaults to `0.9`.
        jit_compile: Compile the loop over an `ArrayStream` with XLA. If XLA
            cannot compile the model, the tuner restores its state, records
            why in `xla_error` and goes on without XLA. Defaults to `False`.
        weight_decay: Decoupled weight decay λ of the SGD step; `set_weight_decay`
            changes it between runs. Defaults to `0.0`.
        loss_scale: Factor on the objective the SGD step differentiates
            (`tuner.in_units`); the loss values it returns are not scaled.
            Defaults to `1.0`.
    """

    width = 1  # members per round

    def __init__(
        self,
        model,
        loss: PerExampleLoss,
        momentum: float = 0.9,
        jit_compile=False,
        weight_decay: float = 0.0,
        loss_scale: float = 1.0,
    ):
        self.model = model
        self.loss = loss
        self.momentum = float(momentum)
        self.loss_scale = float(loss_scale)
        self._decay = tf.Variable(float(weight_decay), dtype=tf.float32, trainable=False)
        self.jit_compile = bool(jit_compile)
        self._jit_proven = False  # an XLA call has succeeded
        self.xla_error = None  # why XLA was given up, if it was
        self.tv = [tf.Variable(v.numpy(), trainable=True) for v in model.trainable_variables]
        self.ntv = [tf.Variable(v.numpy(), trainable=False) for v in model.non_trainable_variables]
        self.velocity = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.tv]
        self._constraints = core.weight_constraints(model)
        self._bn = core.batchnorm_layers(model)
        self._bn_index = core.batchnorm_index(model, self._bn)
        self._seed_positions = core.seed_state_positions(model)
        self._step_fn = None
        self._indexed_fn = None
        self._stats_fn = None
        self._eval_fn = None

    # -- state ------------------------------------------------------------------
    def set_weight_decay(self, weight_decay: float) -> None:
        """The decay λ of the following runs (a variable: nothing is traced again)."""
        self._decay.assign(float(weight_decay))

    def load(self, weights: WeightSet, layer_seeds=None) -> None:
        """Starts from `weights` with zero momentum; random layers from `layer_seeds[0]`."""
        if layer_seeds is not None:
            weights = core.with_layer_seeds(weights, self._seed_positions, layer_seeds[0])
        core.assign_all(self.tv, weights.trainable)
        core.assign_all(self.ntv, weights.non_trainable)
        for var in self.velocity:
            var.assign(tf.zeros_like(var))

    def snapshots(self) -> list:
        """`[WeightSet]` of the working copy."""
        return [WeightSet.from_variables(self.tv, self.ntv)]

    @property
    def has_batchnorm(self) -> bool:
        return bool(self._bn)

    def open_stream(self, source: DataSource, batch_size: int, seeds: list):
        """The member's shuffled batches: an `ArrayStream` for arrays, else tf.data."""
        if source.has_arrays:
            return source.array_stream(batch_size, seeds[0])
        return iter(source.shuffled(batch_size, seeds[0]))

    # -- compiled pieces -----------------------------------------------------------
    def _step(self, x, y, lr):
        with tf.GradientTape() as tape:
            pred, new_ntv, reg = stateless_call(
                self.model, self.tv, self.ntv, x, training=True, return_losses=True
            )
            objective = core.regularised(tf.reduce_mean(self.loss(y, pred)), reg)
            scaled = core.in_units(objective, self.loss_scale)
        grads = tape.gradient(scaled, self.tv)
        core.sgd_update(
            self.tv, grads, self.velocity, self.momentum, lr, self._decay, self._constraints
        )
        core.assign_all(self.ntv, new_ntv)
        return objective

    def _train_loop(self, iterator, steps, learning_rate, start, total):
        return core.schedule_loop(self._step, iterator, steps, learning_rate, start, total)

    def _batch_stats(self, x):
        _, new_ntv = stateless_call(self.model, self.tv, self.ntv, x, training=True)
        return [(new_ntv[i], new_ntv[j]) for i, j in self._bn_index]

    def _eval(self, x, y):
        pred, _ = stateless_call(self.model, self.tv, self.ntv, x, training=False)
        losses = self.loss(y, pred)
        fit = self.loss.fit_mask(y, pred) if self.loss.is_classification else losses
        return losses, fit

    def _train_indexed(self, x_all, y_all, indices, count, learning_rate, start, total):
        """`_train_loop` for an `ArrayStream`: batch `t` is `x_all[indices[t]]`.

        Runs the first `count` rows of `indices`; `train` pads `indices` to the
        schedule's full length, so that XLA, which compiles once per shape,
        compiles one executable for every segment and member of that length.
        """
        total_f = tf.cast(total, tf.float32)

        def body(t, values):
            rows = indices[t]
            x, y = take_rows(x_all, rows), tf.gather(y_all, rows)
            lr = core.cosine(learning_rate, t + start, total_f)
            step_loss = tf.cast(self._step(x, y, lr), tf.float32)
            return t + 1, tf.tensor_scatter_nd_update(values, [[t]], [step_loss])

        values = tf.zeros(tf.shape(indices)[:1], tf.float32)
        _, values = tf.while_loop(lambda t, _: t < count, body, (tf.constant(0), values))
        return values

    # -- operations -------------------------------------------------------------------
    def train(self, iterator, steps: int, learning_rate: float, *, start: int = 0, stop=None):
        """Runs SGD steps with cosine decay; returns `[(late loss, finite)]`.

        `iterator` is a `tf.data` iterator or an `ArrayStream` (arrays: the
        loop gathers batches itself, no pipeline per member). The late loss is
        the mean objective over the last 10% of `steps`. `start` / `stop` run
        only steps `start .. stop` of the `steps`-step schedule: the segments
        of one schedule, run in order on one iterator, give the same weights as
        running it whole.
        """
        stop = steps if stop is None else stop
        lr = tf.constant(learning_rate, tf.float32)
        where = (tf.constant(start, tf.int32), tf.constant(steps, tf.int32))
        if isinstance(iterator, ArrayStream):
            rows = iterator.take_indices(stop - start)
            padded = np.zeros((max(steps, len(rows)), rows.shape[1]), rows.dtype)
            padded[: len(rows)] = rows
            count = tf.constant(len(rows), tf.int32)
            values = self._run_indexed(iterator, tf.constant(padded), count, lr, where)
            values = values[: len(rows)]
        else:
            if self._step_fn is None:
                self._step_fn = compiled(self._train_loop)
            values = self._step_fn(iterator, tf.constant(stop - start, tf.int32), lr, *where)
            values = values.numpy()
        return [core.late_loss(values, steps)]

    def _run_indexed(self, stream: ArrayStream, indices, count, lr, where) -> np.ndarray:
        if self._indexed_fn is None:  # one trace for any N, steps and batch size
            scalar = tf.TensorSpec([], tf.int32)
            self._indexed_fn = compiled(
                self._train_indexed,
                input_signature=[
                    spec_of(stream.x),
                    spec_of(stream.y),
                    tf.TensorSpec([None, None], tf.int64),
                    scalar,
                    tf.TensorSpec([], tf.float32),
                    scalar,
                    scalar,
                ],
                jit_compile=self.jit_compile,
            )
        args = (stream.x, stream.y, indices, count, lr, *where)
        if not self.jit_compile or self._jit_proven:
            return self._indexed_fn(*args).numpy()
        state = [v.numpy() for v in (*self.tv, *self.ntv, *self.velocity)]
        try:
            values = self._indexed_fn(*args).numpy()
        except tf.errors.OpError as error:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            self.xla_error = f"{type(error).__name__}: {first}"
            core.assign_all((*self.tv, *self.ntv, *self.velocity), state)
            self.jit_compile = False
            self._indexed_fn = None
            return self._run_indexed(stream, indices, count, lr, where)
        self._jit_proven = True
        return values

    def refresh_batchnorm(self, batches, num_batches: int) -> None:
        """Sets BN moving statistics to population statistics over `num_batches`."""
        if not self._bn or num_batches <= 0:
            return
        if self._stats_fn is None:
            self._stats_fn = compiled(self._batch_stats)
        sums = core.MomentSums()
        with core.batch_statistics(self._bn):
            for _ in range(num_batches):
                x, _ = next(batches)  # works for Python and tf.data iterators
                sums.add([(m.numpy(), v.numpy()) for m, v in self._stats_fn(x)])
        for (i, j), (mean, var) in zip(self._bn_index, sums.result()):
            self.ntv[i].assign(mean.astype(self.ntv[i].dtype.as_numpy_dtype))
            self.ntv[j].assign(var.astype(self.ntv[j].dtype.as_numpy_dtype))

    def evaluate_refreshed(self, eval_batches, batches, num_batches: int) -> list:
        """`evaluate` as after training, with BN statistics re-estimated over
        `batches`, then put back: the run goes on as if it was not measured."""
        if not self._bn or num_batches <= 0:
            return self.evaluate(eval_batches)
        positions = [k for pair in self._bn_index for k in pair]
        saved = [self.ntv[k].numpy() for k in positions]
        self.refresh_batchnorm(batches, num_batches)
        result = self.evaluate(eval_batches)
        core.assign_all([self.ntv[k] for k in positions], saved)
        return result

    def evaluate(self, eval_batches) -> list:
        """`[(mean loss, fit)]` on fixed evaluation batches (fit None unless classification)."""
        if self._eval_fn is None:
            self._eval_fn = compiled(self._eval)
        losses, fits = [], []
        for x, y in eval_batches:
            loss, fit = self._eval_fn(x, y)
            losses.append(loss.numpy())
            fits.append(fit.numpy())
        return [core.summarise_evaluation(losses, fits, self.loss.is_classification)]
