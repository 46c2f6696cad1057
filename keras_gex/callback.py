"""`GEXCollector`: collect the geometric ensemble right after `model.fit`."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_gex import _validation, distribute
from keras_gex.config import CollectionConfig
from keras_gex.data import DataSource, reshuffles_each_iteration
from keras_gex.ensemble import GeometricEnsemble
from keras_gex.loss_checks import check_first_batch, check_outputs
from keras_gex.losses import resolve_loss


class GEXCollector(keras.callbacks.Callback):
    """Fine-tunes M copies of the final model after training (GEX's cache).

    When `model.fit` ends, the collector fine-tunes copies of the trained
    weights θ* with SGD (momentum, cosine-decayed step size) and stores the
    resulting `GeometricEnsemble` in `collector.ensemble`. The model itself,
    its weights and its optimizer state are left exactly as `fit` made them.
    Every argument is checked here, before `fit` starts, and the model, its
    loss and `train_data` are checked against each other when `fit` begins
    (labels, outputs against `from_logits`, input shapes). Callbacks end in
    list order: put the collector after one that sets the weights when `fit`
    ends (`EarlyStopping(restore_best_weights=True)`), or it collects from the
    last epoch's weights (scoring then warns that the model has changed).

    Example:

    ```python
    collector = keras_gex.GEXCollector((x, y), num_members=8)
    model.fit(x, y, epochs=20, callbacks=[collector])
    report = keras_gex.detect_noisy((x, y), collector.ensemble)
    ```

    Args:
        train_data: The training data, as `(x, y)` arrays, a `tf.data.Dataset`
            of `(x, y)` batches or a `keras.utils.PyDataset` (the same data
            given to fit).
        config: A `CollectionConfig` (the fine-tuning settings). Defaults to
            `None` (the defaults).
        loss: Loss to use instead of the compiled one. Defaults to `None`.
        directory: Write every member there as soon as it is finished; a
            re-run after a crash resumes at the first missing member.
            Defaults to `None`.
        verbose: 0, or 1 / "auto" for progress messages. Defaults to `"auto"`.
        strategy: A `tf.distribute.Strategy` to fine-tune under (data-parallel
            per member). By default the strategy the model was built under, if
            any. Defaults to `None`.
        per_replica_members: Fine-tune one member per replica, without
            gradient synchronisation (needs a strategy). Defaults to `False`.
        **settings: `CollectionConfig` fields that override `config`'s
            (e.g. `num_members=4, seed=0`).
    """

    def __init__(
        self,
        train_data,
        config: CollectionConfig | None = None,
        *,
        loss=None,
        directory=None,
        verbose="auto",
        strategy=None,
        per_replica_members: bool = False,
        **settings,
    ):
        super().__init__()
        _validation.check_backend()
        if train_data is None:
            raise ValueError(
                "Argument `train_data` is required: a callback cannot see the data "
                "given to `fit`. Pass the same `(x, y)` or dataset."
            )
        self.train_data = train_data
        self.config = CollectionConfig.resolve(config, **settings)
        self.verbose = _validation.verbose_level(verbose)
        self.loss = loss
        self.directory = directory
        if strategy is not None:
            distribute.check_strategy(strategy)
        self.strategy = strategy
        # Whether a strategy exists is known when `fit` ends (the model's own counts).
        self.per_replica_members = distribute.check_per_replica_members(
            per_replica_members, strategy, self.config.chain, require_strategy=False
        )
        self.ensemble = None
        self._check_pending = False

    def on_train_begin(self, logs=None):
        self.ensemble = None
        self._check_pending = True
        self._check_model_and_data()

    def on_train_batch_begin(self, batch, logs=None):
        if self._check_pending:  # a model built by `fit`'s first step
            self._check_model_and_data()

    def _check_model_and_data(self) -> None:
        """The entry checks of `GeometricEnsemble.collect`, before `fit` trains on.

        A mismatch between the model, its loss and `train_data` (labels the
        loss cannot take, outputs that contradict `from_logits`, inputs of
        the wrong shape) is refused when `fit` begins rather than after the
        whole of training; `collect` repeats the checks when `fit` ends. A
        model without an `Input` is only built by `fit`'s first step, so it is
        checked at the start of the second batch (building it here would
        move its weight initialisation out of `fit`). The model is run on the
        first batch of `train_data`, except for a dataset that reshuffles on
        every iteration: drawing a batch would move its shuffle on and change
        the order `fit` sees, so only the checks that need no data run for it.
        """
        model = self.model
        if model is None or not model.built:
            return
        self._check_pending = False
        _validation.check_model(model, need_loss=True, loss=self.loss)
        per_example = resolve_loss(model, self.loss)
        source = DataSource(self.train_data, name="train_data")
        source.check_against_model(model)
        if isinstance(self.train_data, tf.data.Dataset) and reshuffles_each_iteration(
            self.train_data
        ):
            check_outputs(per_example, None, model)
        else:
            check_first_batch(model, per_example, source)

    def on_train_end(self, logs=None):
        self.ensemble = GeometricEnsemble.collect(
            self.model,
            self.train_data,
            self.config,
            loss=self.loss,
            directory=self.directory,
            verbose=self.verbose,
            strategy=self.strategy,
            per_replica_members=self.per_replica_members,
        )
