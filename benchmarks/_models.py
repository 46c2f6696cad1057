"""Models the benchmarks share, so a table's "digits MLP" is the same network everywhere.

Imported by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this
folder on `sys.path`).
"""

from __future__ import annotations


def compiled(model, sigmoid: bool = False):
    """`model` compiled with Adam 1e-3 and from-logits (sparse / binary) cross-entropy."""
    import keras

    loss = (
        keras.losses.BinaryCrossentropy(from_logits=True)
        if sigmoid
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def logits(model, x, batch_size: int = 1024):
    """`model`'s outputs on `x` in inference mode, batch by batch, as a NumPy array.

    Eager calls instead of `model.predict`: the benchmarks build a fresh model per
    seed and run, and each `predict` traced a new function, so TensorFlow warned
    about retracing; these arrays are small enough that tracing buys nothing.
    """
    import numpy as np

    chunks = [model(x[i : i + batch_size], training=False) for i in range(0, len(x), batch_size)]
    return np.concatenate([np.asarray(c) for c in chunks])


def accuracy(model, x, y) -> float:
    """Share of rows of `x` whose arg-max output is `y`."""
    import numpy as np

    return float(np.mean(np.argmax(logits(model, x), axis=1) == y))


def mlp(input_dim: int = 64, classes: int = 10, name: str = "mlp", width: int = 256):
    """The digits MLP: input-width-width-classes, ReLU, logits out (uncompiled)."""
    import keras

    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(classes),
        ],
        name=name,
    )


def digits_bn_cnn():
    """BN-CNN on 8×8×1 digits: (Conv-BN-ReLU)×2, MaxPool, Conv-BN-ReLU, GAP, Dense10."""
    import keras

    def block(filters):
        return [
            keras.layers.Conv2D(filters, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            *block(32),
            *block(64),
            keras.layers.MaxPooling2D(),
            *block(64),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="bn_cnn",
    )


def rejected_probes(record) -> list:
    """The calibration probes an ensemble did not keep: what calibrating cost.

    The accepted probe is member 0, so it is fine-tuning the ensemble needed anyway.
    """
    return [p for p in record.calibration if not p.accepted]


def resnet_bn(width: int = 16):
    """Stem Conv-BN-ReLU-MaxPool, two residual blocks (width, 2 x width, strided), GAP,
    Dense(10) logits in float32 (also under a mixed-precision policy); not compiled."""
    import keras

    layers = keras.layers

    def block(x, channels, stride):
        y = layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        y = layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
        y = layers.BatchNormalization()(y)
        if stride != 1 or x.shape[-1] != channels:
            x = layers.Conv2D(channels, 1, strides=stride, use_bias=False)(x)
            x = layers.BatchNormalization()(x)
        return layers.ReLU()(layers.Add()([x, y]))

    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.MaxPooling2D()(x)
    x = block(x, width, 1)
    x = block(x, 2 * width, 2)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, dtype="float32")(x), name="resnet_bn")
