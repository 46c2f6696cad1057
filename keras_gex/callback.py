"""`GEXCollector`: collect the geometric ensemble right after `model.fit`."""

from __future__ import annotations

import keras

from keras_gex import _validation, distribute
from keras_gex.ensemble import DEFAULTS, GeometricEnsemble


class GEXCollector(keras.callbacks.Callback):
    """Fine-tunes M copies of the final model after training (GEX's cache).

    When `model.fit` ends, the collector fine-tunes copies of the trained
    weights θ* with SGD (momentum, cosine-decayed step size) and stores the
    resulting `GeometricEnsemble` in `collector.ensemble`. The model itself,
    its weights and its optimizer state are left exactly as `fit` made them.

    Example:

    ```python
    collector = keras_gex.GEXCollector((x, y), num_members=8)
    model.fit(x, y, epochs=20, callbacks=[collector])
    report = keras_gex.detect_noisy((x, y), collector.ensemble)
    ```

    Args:
        train_data: The training data, as `(x, y)` arrays or a
            `tf.data.Dataset` of `(x, y)` batches (the same data given to fit).
        num_members: Number of members M. Defaults to `8`.
        steps: SGD steps T per member, or `"auto"`: about 10 epochs of the
            training data, within 50-800 steps. Defaults to `"auto"`.
        learning_rate: Peak step size, or `"auto"` to calibrate it so members
            leave the memorising basin without collapsing. Defaults to `"auto"`.
        batch_size: Fine-tuning batch size. Defaults to `128`.
        momentum: SGD momentum. Defaults to `0.9`.
        seed: Shuffling seed for reproducible members. Defaults to `None`.
        chain: Start each member from the previous member. Defaults to `False`.
        bn_batches: Batches used to re-estimate BatchNorm statistics per
            member. Defaults to `20`.
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
        jit_compile: Compile the fine-tuning loop with XLA (arrays, one
            device); `"auto"`: on an accelerator, for models without
            convolution or pooling layers; never on CPU. Defaults to `"auto"`.
    """

    def __init__(
        self,
        train_data,
        num_members: int = DEFAULTS["num_members"],
        steps=DEFAULTS["steps"],
        learning_rate="auto",
        batch_size: int = DEFAULTS["batch_size"],
        momentum: float = DEFAULTS["momentum"],
        seed: int | None = None,
        chain: bool = False,
        bn_batches: int = DEFAULTS["bn_batches"],
        loss=None,
        directory=None,
        verbose="auto",
        strategy=None,
        per_replica_members: bool = False,
        jit_compile="auto",
    ):
        super().__init__()
        if train_data is None:
            raise ValueError(
                "Argument `train_data` is required: a callback cannot see the data "
                "given to `fit`. Pass the same `(x, y)` or dataset."
            )
        self.train_data = train_data
        args = _validation.collection_args(
            num_members=num_members,
            steps=steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            momentum=momentum,
            seed=seed,
            chain=chain,
            bn_batches=bn_batches,
            verbose=verbose,
            jit_compile=jit_compile,
        )
        self.num_members = args.num_members
        self.steps = args.steps
        self.learning_rate = args.learning_rate
        self.batch_size = args.batch_size
        self.momentum = args.momentum
        self.seed = args.seed
        self.chain = args.chain
        self.bn_batches = args.bn_batches
        self.verbose = args.verbose
        self.jit_compile = args.jit_compile
        self.loss = loss
        self.directory = directory
        if strategy is not None:
            distribute.check_strategy(strategy)
        self.strategy = strategy
        # Whether a strategy exists is known when `fit` ends (the model's own counts).
        self.per_replica_members = distribute.check_per_replica_members(
            per_replica_members, strategy, chain, require_strategy=False
        )
        self.ensemble = None

    def on_train_begin(self, logs=None):
        self.ensemble = None

    def on_train_end(self, logs=None):
        self.ensemble = GeometricEnsemble.collect(
            self.model,
            self.train_data,
            num_members=self.num_members,
            steps=self.steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            momentum=self.momentum,
            seed=self.seed,
            chain=self.chain,
            bn_batches=self.bn_batches,
            loss=self.loss,
            directory=self.directory,
            verbose=self.verbose,
            strategy=self.strategy,
            per_replica_members=self.per_replica_members,
            jit_compile=self.jit_compile,
        )
