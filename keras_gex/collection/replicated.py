"""`ReplicaFineTuner`: fine-tuning under a `tf.distribute` strategy."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_gex import distribute
from keras_gex._tracing import compiled
from keras_gex.collection import tuner as core
from keras_gex.data import DataSource
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet, stateless_call

_REPLICA_LOCAL = dict(
    trainable=False,
    synchronization=tf.VariableSynchronization.ON_READ,
    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
)


class ReplicaFineTuner:
    """`FineTuner` under a `tf.distribute` strategy: one working copy per replica.

    Every replica holds its own copy of the weights and of the momentum
    (replica-local `ON_READ` variables) and applies `FineTuner`'s SGD update.

    * `synchronized=True` (data-parallel, one member at a time): each global
      batch is split across the replicas, the objective is
      `tf.nn.compute_average_loss` over the global batch, gradients are
      all-reduced (sum) before the update, so every replica applies the same
      update and the copies stay identical. BatchNorm moving statistics are
      all-reduced (example-weighted) during training, and the re-estimation
      combines every replica's batch moments into the global batch's, so every
      replica ends with the same statistics.
    * `synchronized=False` (one member per replica): replica `r` trains on its
      own stream with no communication; it computes exactly what `FineTuner`
      computes for that member.

    A round holds `width` members: one when synchronized, else one per
    replica; `train`, `evaluate` and `snapshots` return one entry per member.

    Args:
        model: The trained model (θ* is read from it once).
        loss: Per-example loss.
        momentum: SGD momentum.
        strategy: A validated `tf.distribute.Strategy`.
        synchronized: Data-parallel (True) or one member per replica (False).
        global_batch_size: Fine-tuning batch size across all replicas.
        weight_decay: Decoupled weight decay λ of the SGD step; `set_weight_decay`
            changes it between runs. Defaults to `0.0`.
        loss_scale: Factor on the objective the SGD step differentiates
            (`tuner.in_units`). Defaults to `1.0`.
    """

    def __init__(
        self,
        model,
        loss: PerExampleLoss,
        momentum: float,
        strategy,
        *,
        synchronized: bool,
        global_batch_size: int,
        weight_decay: float = 0.0,
        loss_scale: float = 1.0,
    ):
        self.model = model
        self.loss = loss
        self.momentum = float(momentum)
        self.loss_scale = float(loss_scale)
        self.strategy = strategy
        self.synchronized = bool(synchronized)
        self.global_batch_size = int(global_batch_size)
        self.num_replicas = int(strategy.num_replicas_in_sync)
        self.width = 1 if self.synchronized else self.num_replicas
        distribute.check_replica_order(strategy)
        trainable = [np.array(v.numpy()) for v in model.trainable_variables]
        non_trainable = [np.array(v.numpy()) for v in model.non_trainable_variables]
        with strategy.scope():
            self.tv = [tf.Variable(w, **_REPLICA_LOCAL) for w in trainable]
            self.ntv = [tf.Variable(w, **_REPLICA_LOCAL) for w in non_trainable]
            self.velocity = [tf.Variable(np.zeros_like(w), **_REPLICA_LOCAL) for w in trainable]
            self._decay = tf.Variable(float(weight_decay), dtype=tf.float32, trainable=False)
        self._constraints = core.weight_constraints(model)
        self._bn = core.batchnorm_layers(model)
        self._bn_index = core.batchnorm_index(model, self._bn)
        self._bn_positions = {i for pair in self._bn_index for i in pair}
        self._seed_positions = core.seed_state_positions(model)
        self._fns = {}

    def _fn(self, name, python_fn):
        if name not in self._fns:
            self._fns[name] = compiled(python_fn)
        return self._fns[name]

    @property
    def has_batchnorm(self) -> bool:
        return bool(self._bn)

    # -- input --------------------------------------------------------------------------
    def open_stream(self, source: DataSource, batch_size: int, seeds: list):
        """The round's batches: member `r`'s stream shuffled with `seeds[r]`.

        Synchronized: the global batches of one stream, split across the
        replicas. Created on first use: a distributed iterator costs a
        noticeable setup (one prefetching pipeline per device), wasted when the
        model has no BatchNorm and the stream is only there for the re-estimation.
        """
        if self.synchronized:
            dataset = source.shuffled(batch_size, seeds[0])
            return _LazyIterator(lambda: distribute.distribute_batches(self.strategy, dataset))
        return _LazyIterator(
            lambda: distribute.distribute_per_replica(
                self.strategy, lambda r: source.shuffled(batch_size, seeds[r])
            )
        )

    # -- state --------------------------------------------------------------------------
    def set_weight_decay(self, weight_decay: float) -> None:
        """The decay λ of the following rounds (a mirrored variable: nothing is traced again)."""
        self._decay.assign(float(weight_decay))

    def load(self, weights: WeightSet, layer_seeds=None) -> None:
        """Every replica starts from `weights` with zero momentum; random layers
        from `layer_seeds[r]` on replica `r` (`layer_seeds[0]` when synchronized)."""
        positions = self._seed_positions
        if layer_seeds is not None and self.synchronized:
            weights = core.with_layer_seeds(weights, positions, layer_seeds[0])
        # A cross-replica assign of an ON_READ variable sets every copy.
        core.assign_all(self.tv, weights.trainable)
        core.assign_all(self.ntv, weights.non_trainable)
        for var in self.velocity:
            var.assign(np.zeros(var.shape, var.dtype.as_numpy_dtype))
        if layer_seeds is not None and not self.synchronized and positions:
            per_replica = [
                core.with_layer_seeds(weights, positions, s).non_trainable for s in layer_seeds
            ]
            self._assign_per_replica(
                [self.ntv[i] for i in positions], [[nt[i] for i in positions] for nt in per_replica]
            )

    def _local_state(self):
        return [tf.expand_dims(tf.identity(v), 0) for v in self.tv + self.ntv]

    def _replica_arrays(self) -> list:
        """Every trainable then non-trainable variable, one row per replica (NumPy)."""
        fn = self._fn(
            "state",
            lambda: distribute.gather(self.strategy, self.strategy.run(self._local_state)),
        )
        return [a.numpy() for a in fn()]

    def snapshots(self) -> list:
        """One `WeightSet` per member of the round."""
        arrays = self._replica_arrays()
        n = len(self.tv)
        return [
            WeightSet([np.array(a[r]) for a in arrays[:n]], [np.array(a[r]) for a in arrays[n:]])
            for r in range(self.width)
        ]

    def _assign_per_replica(self, variables, values) -> None:
        """Replica `r` assigns `values[r]` (a list aligned with `variables`)."""

        def assign(*local):
            core.assign_all(variables, local)
            return tf.constant(0)

        def run(*per_replica):
            return self.strategy.run(assign, args=per_replica)

        columns = [
            distribute.per_replica_values(
                self.strategy, [tf.constant(values[r][k]) for r in range(self.num_replicas)]
            )
            for k in range(len(variables))
        ]
        self._fn(("assign", tuple(id(v) for v in variables)), run)(*columns)

    # -- compiled pieces ----------------------------------------------------------------
    def _replica_step(self, x, y, lr):
        trainable = [tf.convert_to_tensor(v) for v in self.tv]
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            pred, new_ntv, reg = stateless_call(
                self.model, trainable, self.ntv, x, training=True, return_losses=True
            )
            per_example = self.loss(y, pred)
            if self.synchronized:
                objective = tf.nn.compute_average_loss(
                    per_example, global_batch_size=self.global_batch_size
                )
                if reg:
                    objective = objective + tf.nn.scale_regularization_loss(
                        tf.cast(tf.add_n(reg), objective.dtype)
                    )
            else:
                objective = core.regularised(tf.reduce_mean(per_example), reg)
            scaled = core.in_units(objective, self.loss_scale)
        grads = tape.gradient(scaled, trainable)
        if self.synchronized:
            context = tf.distribute.get_replica_context()
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            grads = list(grads)
            for i, g in zip(present, reduced):
                grads[i] = g
            new_ntv = self._mean_batchnorm_state(new_ntv, tf.shape(per_example)[0])
        core.sgd_update(
            self.tv, grads, self.velocity, self.momentum, lr, self._decay, self._constraints
        )
        core.assign_all(self.ntv, new_ntv)
        return tf.reshape(objective, [1])

    def _mean_batchnorm_state(self, new_ntv, count):
        """Example-weighted mean over replicas of the BN moving statistics."""
        if not self._bn_positions:
            return new_ntv
        context = tf.distribute.get_replica_context()
        n = tf.cast(count, tf.float32)
        positions = sorted(self._bn_positions)
        weighted = [
            tf.where(n > 0, new_ntv[i] * tf.cast(n, new_ntv[i].dtype), tf.zeros_like(new_ntv[i]))
            for i in positions
        ]
        total, *sums = context.all_reduce(tf.distribute.ReduceOp.SUM, [n, *weighted])
        out = list(new_ntv)
        for i, value in zip(positions, sums):
            out[i] = value / tf.cast(total, value.dtype)
        return out

    def _distributed_step(self, x, y, lr):
        objective = self.strategy.run(self._replica_step, args=(x, y, lr))
        return distribute.gather(self.strategy, objective)

    def _train_loop(self, iterator, steps, learning_rate, start, total):
        """`(steps, replicas)` objectives of `FineTuner`'s loop run on every replica."""
        return core.schedule_loop(
            self._distributed_step, iterator, steps, learning_rate, start, total
        )

    def _replica_moments(self, x):
        _, new_ntv = stateless_call(self.model, self.tv, self.ntv, x, training=True)
        stats = [(new_ntv[i], new_ntv[j]) for i, j in self._bn_index]
        if self.synchronized:
            # Σ n_r·mean_r and Σ n_r·E_r[x²] over replicas give the global batch's moments.
            context = tf.distribute.get_replica_context()
            n = tf.cast(distribute._batch_size(x), tf.float32)
            parts = []
            for m, v in stats:
                w = tf.cast(n, m.dtype)
                parts.append(tf.where(n > 0, w * m, tf.zeros_like(m)))
                parts.append(tf.where(n > 0, w * (v + m * m), tf.zeros_like(v)))
            total, *sums = context.all_reduce(tf.distribute.ReduceOp.SUM, [n, *parts])
            stats = []
            for k in range(0, len(sums), 2):
                mean = sums[k] / tf.cast(total, sums[k].dtype)
                stats.append((mean, sums[k + 1] / tf.cast(total, mean.dtype) - mean * mean))
        return [(tf.expand_dims(m, 0), tf.expand_dims(v, 0)) for m, v in stats]

    def _replica_eval(self, x, y):
        if self.synchronized:
            context = tf.distribute.get_replica_context()
            x, y = distribute.chunk(
                (x, y), context.replica_id_in_sync_group, context.num_replicas_in_sync
            )
        pred, _ = stateless_call(self.model, self.tv, self.ntv, x, training=False)
        losses = self.loss(y, pred)
        fit = self.loss.fit_mask(y, pred) if self.loss.is_classification else losses
        if self.synchronized:
            return losses, fit  # chunks, gathered back into the batch in order
        return tf.expand_dims(losses, 0), tf.expand_dims(fit, 0)  # one row per replica

    # -- operations ---------------------------------------------------------------------
    def train(self, iterator, steps: int, learning_rate: float, *, start: int = 0, stop=None):
        """`FineTuner.train` on every replica: `[(late loss, finite)]` per member."""
        stop = steps if stop is None else stop
        fn = self._fn("train", self._train_loop)
        values = fn(
            _LazyIterator.unwrap(iterator),
            tf.constant(stop - start, tf.int32),
            tf.constant(learning_rate, tf.float32),
            tf.constant(start, tf.int32),
            tf.constant(steps, tf.int32),
        ).numpy()
        if self.synchronized:
            values = values.sum(axis=1, keepdims=True)  # compute_average_loss parts
        return [core.late_loss(column, steps) for column in values.T]

    def refresh_batchnorm(self, batches, num_batches: int) -> None:
        """Population BN statistics over `num_batches`, per replica (or global)."""
        if not self._bn or num_batches <= 0:
            return
        fn = self._fn(
            "moments",
            lambda x: distribute.gather(
                self.strategy, self.strategy.run(self._replica_moments, args=(x,))
            ),
        )
        sums = [core.MomentSums() for _ in range(self.width)]
        with core.batch_statistics(self._bn):
            for _ in range(num_batches):
                x, _ = next(batches)
                stats = [(m.numpy(), v.numpy()) for m, v in fn(x)]
                for r, member_sums in enumerate(sums):
                    member_sums.add([(m[r], v[r]) for m, v in stats])
        results = [member_sums.result() for member_sums in sums]
        variables, values = [], [[] for _ in range(self.num_replicas)]
        for k, (i, j) in enumerate(self._bn_index):
            variables += [self.ntv[i], self.ntv[j]]
            for r in range(self.num_replicas):
                mean, var = results[0 if self.synchronized else r][k]
                values[r] += [
                    mean.astype(self.ntv[i].dtype.as_numpy_dtype),
                    var.astype(self.ntv[j].dtype.as_numpy_dtype),
                ]
        if self.synchronized:
            core.assign_all(variables, values[0])  # the same statistics on every replica
        else:
            self._assign_per_replica(variables, values)

    def evaluate_refreshed(self, eval_batches, batches, num_batches: int) -> list:
        """`evaluate` as after training, with BN statistics re-estimated over
        `batches`, then put back on every replica: the run goes on as if it
        was not measured."""
        if not self._bn or num_batches <= 0:
            return self.evaluate(eval_batches)
        positions = [k for pair in self._bn_index for k in pair]
        arrays = self._replica_arrays()
        n = len(self.tv)
        saved = [[arrays[n + k][r] for k in positions] for r in range(self.num_replicas)]
        self.refresh_batchnorm(batches, num_batches)
        result = self.evaluate(eval_batches)
        self._assign_per_replica([self.ntv[k] for k in positions], saved)
        return result

    def evaluate(self, eval_batches) -> list:
        """`[(mean loss, fit)]` per member on fixed batches."""
        fn = self._fn(
            "eval",
            lambda x, y: distribute.gather(
                self.strategy, self.strategy.run(self._replica_eval, args=(x, y))
            ),
        )
        losses, fits = [], []
        for x, y in eval_batches:
            loss, fit = fn(x, y)
            losses.append(loss.numpy())
            fits.append(fit.numpy())
        if self.synchronized:
            return [core.summarise_evaluation(losses, fits, self.loss.is_classification)]
        return [
            core.summarise_evaluation(
                [a[r] for a in losses], [a[r] for a in fits], self.loss.is_classification
            )
            for r in range(self.width)
        ]


class _LazyIterator:
    """An iterator over `make_dataset()` that is only created when first needed."""

    def __init__(self, make_dataset):
        self._make_dataset = make_dataset
        self._iterator = None

    @staticmethod
    def unwrap(iterator):
        if isinstance(iterator, _LazyIterator):
            if iterator._iterator is None:
                iterator._iterator = iter(iterator._make_dataset())
            return iterator._iterator
        return iterator

    def __iter__(self):
        return self

    def __next__(self):
        return next(_LazyIterator.unwrap(self))
