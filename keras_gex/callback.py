"""`GEXCollector`: collect the geometric ensemble right after `model.fit`."""

from __future__ import annotations

import keras

from keras_gex import _validation, distribute
from keras_gex.config import CollectionConfig
from keras_gex.ensemble import GeometricEnsemble


class GEXCollector(keras.callbacks.Callback):
    """Fine-tunes M copies of the final model after training (GEX's cache).

    When `model.fit` ends, the collector fine-tunes copies of the trained
    weights θ* with SGD (momentum, cosine-decayed step size) and stores the
    resulting `GeometricEnsemble` in `collector.ensemble`. The model itself,
    its weights and its optimizer state are left exactly as `fit` made them.
    Every argument is checked here, before `fit` starts.

    Example:

    ```python
    collector = keras_gex.GEXCollector((x, y), num_members=8)
    model.fit(x, y, epochs=20, callbacks=[collector])
    report = keras_gex.detect_noisy((x, y), collector.ensemble)
    ```

    Args:
        train_data: The training data, as `(x, y)` arrays or a
            `tf.data.Dataset` of `(x, y)` batches (the same data given to fit).
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

    def on_train_begin(self, logs=None):
        self.ensemble = None

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
