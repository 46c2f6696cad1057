"""What `fit` reads, GEX reads: a `keras.utils.PyDataset` gives the scores of its arrays, and
data that can be read only once is refused with what to pass instead."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import keras_gex

SETTINGS = dict(num_members=2, steps=10, learning_rate=0.1, seed=0, verbose=0)


class Batches(keras.utils.PyDataset):
    """`(x, y)` arrays served as `fit` reads a `PyDataset`: batch `i` by index."""

    def __init__(self, x, y, batch_size=64, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


@pytest.fixture(scope="module")
def data(digits):
    # float64 inputs, as a loader would serve them: read as float32, as arrays are
    return digits.x_train[:256].astype("float64"), digits.y_train[:256]


@pytest.fixture(scope="module")
def model(data):
    model = make_mlp(hidden=16)
    model.fit(Batches(*data), epochs=3, verbose=0)
    return model


def test_py_dataset_scores_as_its_arrays(data, model):
    """Two routes agree: the batches of a `PyDataset` in index order, and the arrays."""
    x, y = data
    expected = keras_gex.detect_noisy((x, y), model, **SETTINGS)
    report = keras_gex.detect_noisy(Batches(x, y), model, **SETTINGS)
    np.testing.assert_array_equal(report.reference_losses, expected.reference_losses)
    np.testing.assert_array_equal(report.member_losses, expected.member_losses)
    ensemble = report.ensemble
    np.testing.assert_array_equal(
        ensemble.predict(Batches(x, y), verbose=0), ensemble.predict(x, verbose=0)
    )
    kept = keras_gex.prune(Batches(x, y), ensemble, fraction=0.25, verbose=0)
    assert len(kept.kept_indices) == 192
    cleaned = keras_gex.clean(Batches(x, y), report, action="drop", shuffle=False)
    assert sum(len(batch[1]) for batch in cleaned) == len(x) - report.noisy_mask.sum()


def test_collector_takes_the_py_dataset_fit_reads(data):
    x, y = data
    model = make_mlp(hidden=16)
    collector = keras_gex.GEXCollector(Batches(x, y), **SETTINGS)
    model.fit(Batches(x, y), epochs=2, verbose=0, callbacks=[collector])
    deviations = collector.ensemble.deviations(Batches(x, y), verbose=0)
    assert deviations.member_losses.shape == (len(x), 2)


def test_py_dataset_without_labels_or_length_refused(data):
    x, y = data

    class Inputs(Batches):
        def __getitem__(self, i):
            return super().__getitem__(i)[0]

    class Endless(Batches):
        @property
        def num_batches(self):
            return None

    model = make_mlp(hidden=16)
    with pytest.raises(ValueError, match=r"`__getitem__` must return `\(x, y\)` batches"):
        keras_gex.detect_noisy(Inputs(x, y), model, **SETTINGS)
    with pytest.raises(ValueError, match=r"a `PyDataset` without a length"):
        keras_gex.detect_noisy(Endless(x, y), model, **SETTINGS)


@pytest.mark.parametrize("kind", ["generator", "iterator"])
def test_data_read_once_refused_with_what_to_pass(data, kind):
    x, y = data
    once = ((x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64))
    if kind == "iterator":
        once = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(64))
    with pytest.raises(TypeError, match=r"can be read only once; .* `keras\.utils\.PyDataset`"):
        keras_gex.detect_noisy(once, make_mlp(hidden=16), **SETTINGS)


@pytest.mark.parametrize("kind", ["scipy", "tf"])
def test_sparse_inputs_score_as_their_dense_arrays(data, model, kind):
    """A TF-IDF or bag of words as `fit` takes it (a SciPy sparse matrix or a
    `tf.SparseTensor`) is read densified: the scores of the dense arrays."""
    import scipy.sparse

    x, y = data
    x = x.astype("float32")
    sparse = scipy.sparse.csr_matrix(x) if kind == "scipy" else tf.sparse.from_dense(x)
    expected = keras_gex.detect_noisy((x, y), model, **SETTINGS)
    report = keras_gex.detect_noisy((sparse, y), model, **SETTINGS)
    np.testing.assert_array_equal(report.member_losses, expected.member_losses)
    np.testing.assert_array_equal(
        report.ensemble.predict(sparse, verbose=0), expected.ensemble.predict(x, verbose=0)
    )


@pytest.mark.slow
def test_a_pipeline_of_sparse_or_ragged_batches_scores_as_the_model_reads_it(data, tmp_path):
    """A `tf.data` pipeline that serves `tf.SparseTensor` or `tf.RaggedTensor` batches to a
    model whose `Input` takes them (fit trains on it) is scored in order: θ*'s losses are
    Keras' own on `model.predict`, sparse batches score as their dense twin, and the cache
    key does not depend on where the tensors live."""
    x, y = data
    x = x.astype("float32")
    rows = [np.flatnonzero(row > 0.3).astype("int32") + 1 for row in x]  # a bag of ids
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def pipeline(kind):
        inputs = tf.sparse.from_dense(x) if kind == "sparse" else tf.ragged.constant(rows)
        return tf.data.Dataset.from_tensor_slices((inputs, y)).batch(64)

    def model_for(kind):
        keras.utils.set_random_seed(0)
        if kind == "sparse":
            inputs = keras.Input((64,), sparse=True)
            features = inputs
        else:
            inputs = keras.Input((None,), ragged=True, dtype="int32")
            embedded = keras.layers.Embedding(70, 8)(inputs)
            features = keras.layers.Lambda(lambda r: tf.reduce_sum(r, axis=1))(embedded)
        hidden = keras.layers.Dense(16, activation="relu")(features)
        model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    for kind in ("sparse", "ragged"):
        served = pipeline(kind)
        model = model_for(kind)
        model.fit(served, epochs=2, verbose=0)
        report = keras_gex.detect_noisy(served, model, **SETTINGS)
        assert report.member_losses.shape == (len(y), 2)
        assert np.isfinite(report.member_losses).all()
        keras_losses = per_example(y, model.predict(served, verbose=0)).numpy()
        np.testing.assert_allclose(
            report.reference_losses, keras_losses, rtol=1e-5, atol=1e-6, err_msg=kind
        )
        if kind == "sparse":
            dense = report.ensemble.scored_losses(
                tf.data.Dataset.from_tensor_slices((x, y)).batch(64), verbose=0
            )
            np.testing.assert_allclose(report.member_losses, dense.members, rtol=1e-4, atol=1e-5)
        cache = str(tmp_path / f"{kind}.npy")
        first = np.array(report.ensemble.loss_deviations(served, cache=cache, verbose=0))
        assert first.shape == (len(y), 2)
        np.save(cache, np.zeros_like(first))  # a hit returns the file, not a new scoring
        hit = report.ensemble.loss_deviations(pipeline(kind), cache=cache, verbose=0)
        np.testing.assert_array_equal(hit, np.zeros_like(first), err_msg=kind)
        _check_cleaned_batches(served, report)


def _check_cleaned_batches(data, report):
    """`clean` and `prune` re-batch a pipeline's examples as it batched them (ragged
    again, or padded to each batch's longest), and the model reads what they give."""
    model = report.ensemble.model
    kept = ~report.noisy_mask
    dropped = keras_gex.clean(data, report, action="drop", shuffle=False)
    assert sum(len(y) for _, y in dropped) == kept.sum()
    relabeled = keras_gex.clean(data, report, action="relabel", shuffle=False)
    assert sum(len(y) for _, y in relabeled) == len(kept)
    model.predict(relabeled.map(lambda x, y: x), verbose=0)
    pruned = keras_gex.prune(data, report.ensemble, fraction=0.25, verbose=0)
    assert sum(len(y) for _, y in pruned.apply(data)) == len(pruned.kept_indices)


def test_a_cache_key_reads_strings_and_dict_inputs_by_value():
    """Two copies of the same examples have one fingerprint: strings by their bytes (not
    where NumPy keeps them) and a pipeline's dict inputs leaf by leaf."""
    from keras_gex.data import DataSource

    words = np.array(["a wrong label", "a right one"], dtype=object)
    labels = np.array([0, 1])
    copy = np.array([str(w) for w in words], dtype=object)
    assert DataSource((words, labels)).fingerprint() == DataSource((copy, labels)).fingerprint()
    other = np.array(["a wrong label", "a right two"], dtype=object)
    assert DataSource((words, labels)).fingerprint() != DataSource((other, labels)).fingerprint()

    def pipeline():
        inputs = {"ids": np.arange(6).reshape(3, 2), "size": np.ones((3, 1), "float32")}
        return tf.data.Dataset.from_tensor_slices((inputs, np.arange(3))).batch(2)

    assert DataSource(pipeline()).fingerprint() == DataSource(pipeline()).fingerprint()


def test_sparse_inputs_too_large_to_densify_refused_with_what_to_pass(data, monkeypatch):
    import scipy.sparse

    from keras_gex import data as data_module

    x, y = data
    monkeypatch.setattr(data_module, "_SPARSE_DENSE_BYTES", 1024)
    with pytest.raises(
        ValueError, match=r"sparse matrix of shape \(256, 64\).* `keras\.utils\.PyDataset`"
    ):
        keras_gex.detect_noisy((scipy.sparse.csr_matrix(x), y), make_mlp(hidden=16), **SETTINGS)


def test_an_object_for_inputs_is_named_not_dumped(data):
    _, y = data
    with pytest.raises(ValueError, match=r"Received: x=an object of type set$"):
        keras_gex.detect_noisy(({1, 2}, y), make_mlp(hidden=16), **SETTINGS)


def test_a_dataset_that_repeats_its_examples_refused_for_scoring(data, model):
    """`repeat(2)` yields every example twice: scores would not line up with the examples."""
    x, y = data
    twice = tf.data.Dataset.from_tensor_slices((x, y)).repeat(2).batch(64)
    with pytest.raises(ValueError, match=r"repeats its examples \(`repeat\(\)`, 2 times in all\)"):
        keras_gex.detect_noisy(twice, model, **SETTINGS)
    once = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    report = keras_gex.detect_noisy(once, model, **SETTINGS)
    with pytest.raises(ValueError, match=r"repeats its examples"):
        report.ensemble.deviations(twice, verbose=0)


def test_a_dataset_that_drops_its_last_partial_batch_refused_for_scoring(data, model):
    """`batch(..., drop_remainder=True)` never yields the last rows: they would get no
    score (before: scores for 192 of the 250 rows, without a word)."""
    x, y = data
    rows = tf.data.Dataset.from_tensor_slices((x[:250], y[:250]))
    with pytest.raises(ValueError, match=r"drops the 58 rows of its last, partial batch"):
        keras_gex.detect_noisy(rows.batch(64, drop_remainder=True), model, **SETTINGS)
    filtered = rows.filter(lambda *_: True).batch(64, drop_remainder=True)  # rows unknown
    with pytest.raises(ValueError, match=r"drops the rows of its last"):
        keras_gex.detect_noisy(filtered, model, **SETTINGS)
    whole = tf.data.Dataset.from_tensor_slices((x, y)).batch(64, drop_remainder=True)
    report = keras_gex.detect_noisy(whole, model, **SETTINGS)  # 256 rows: nothing dropped
    assert report.scores.shape == (256,)
    with pytest.raises(ValueError, match=r"drops the 58 rows"):
        report.ensemble.deviations(rows.batch(64, drop_remainder=True), verbose=0)


@pytest.mark.slow
def test_a_dataset_that_may_yield_out_of_order_is_refused_naming_the_transformation(data, model):
    """`deterministic=False` lets parallel calls yield in the order they finish: scores
    would follow one iteration's order, not the dataset's. Refused from the pipeline,
    whether or not this iteration came out in order (before: only a first batch that
    changed between two passes was caught, as a "shuffle")."""
    x, y = data
    rows = tf.data.Dataset.from_tensor_slices((x, y))
    identity = lambda a, b: (a, b)  # noqa: E731
    unordered = {
        "map": rows.batch(64).map(identity, num_parallel_calls=2, deterministic=False),
        "batch": rows.batch(64, num_parallel_calls=2, deterministic=False),
        "interleave": tf.data.Dataset.range(4).interleave(
            lambda i: rows.skip(64 * i).take(64).batch(64),
            num_parallel_calls=2,
            deterministic=False,
        ),
        "tf.data.Options.deterministic": rows.batch(64)
        .map(identity, num_parallel_calls=2)
        .with_options(_options(deterministic=False)),
    }
    for name, ds in unordered.items():
        with pytest.raises(ValueError, match=rf"another order.*`{name}"):
            keras_gex.detect_noisy(ds, model, **SETTINGS)
    with pytest.raises(ValueError, match=r"another order.*\(`map\(.*predictions would not"):
        model_inputs = unordered["map"].map(lambda a, b: a)
        keras_gex.detect_noisy((x, y), model, **SETTINGS).ensemble.predict(model_inputs)
    # Parallel calls in order (the default): the arrays' scores.
    in_order = rows.batch(64).map(identity, num_parallel_calls=2)
    expected = keras_gex.detect_noisy((x, y), model, **SETTINGS).reference_losses
    report = keras_gex.detect_noisy(in_order, model, **SETTINGS)
    np.testing.assert_array_equal(report.reference_losses, expected)


def _options(**values) -> tf.data.Options:
    options = tf.data.Options()
    for name, value in values.items():
        setattr(options, name, value)
    return options


def test_a_keras_loader_shuffling_by_default_is_refused_naming_its_switch(model, tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} {i}")
    shuffled = keras.utils.text_dataset_from_directory(tmp_path, batch_size=2, verbose=False)
    with pytest.raises(ValueError, match=r"reshuffles on every iteration.*`shuffle=False`"):
        keras_gex.detect_noisy(shuffled, model, **SETTINGS)


class PaddedBatches(Batches):
    """Token-id sequences, each batch padded with 0 to its longest (a text loader)."""

    def __getitem__(self, i):
        sequences, y = super().__getitem__(i)
        return keras.utils.pad_sequences(sequences, padding="post"), y


@pytest.mark.slow
def test_batches_padded_to_their_longest_sequence_are_read_as_fit_reads_them():
    """Sequence lengths that differ between batches: the `PyDataset` read as `fit`
    reads it (an unknown length where its first two batches differ), the members'
    mini-batches padded again (before: "generator yielded an element of shape
    (32, 28) where (None, 27) was expected", and for a `padded_batch` dataset
    "Cannot batch tensors with different shapes")."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    sequences = [list(rng.integers(1 + 20 * c, 21 + 20 * c, rng.integers(3, 30))) for c in y]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(41, 8, mask_zero=True),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(PaddedBatches(sequences, y, batch_size=32), epochs=2, verbose=0)
    from_py = keras_gex.detect_noisy(PaddedBatches(sequences, y, batch_size=32), model, **SETTINGS)
    assert from_py.scores.shape == (200,) and np.all(np.isfinite(from_py.scores))
    ragged = tf.data.Dataset.from_generator(
        lambda: ((np.asarray(s, "int32"), c) for s, c in zip(sequences, y)),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)),
    )
    padded = ragged.padded_batch(32)
    from_tf_data = keras_gex.detect_noisy(padded, model, **SETTINGS)
    # The same batches scored (each padded to its longest): the same θ* losses.
    np.testing.assert_allclose(
        from_tf_data.reference_losses, from_py.reference_losses, rtol=1e-5, atol=1e-6
    )
    _check_cleaned_batches(padded, from_tf_data)


def test_members_batches_pad_only_dense_examples_of_varying_length():
    """The members' stream re-pads dense examples of varying length; ragged components
    and fixed shapes batch as they are."""
    from keras_gex.data import DataSource

    lengths = [3, 5, 2, 4, 6, 1, 2, 3]
    ids = [np.arange(1, n + 1, dtype="int32") for n in lengths]
    labels = np.arange(8) % 2
    dense = tf.data.Dataset.from_generator(
        lambda: zip(ids, labels),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)),
    ).padded_batch(4)
    x, _ = next(iter(DataSource(dense).shuffled(4, seed=0)))
    assert isinstance(x, tf.Tensor) and x.shape[0] == 4
    ragged = tf.data.Dataset.from_tensor_slices((tf.ragged.constant(ids), labels)).batch(4)
    x, _ = next(iter(DataSource(ragged).shuffled(4, seed=0)))
    assert isinstance(x, tf.RaggedTensor) and x.shape[0] == 4
    fixed = tf.data.Dataset.from_tensor_slices((np.zeros((8, 3)), labels)).batch(4)
    x, _ = next(iter(DataSource(fixed).shuffled(4, seed=0)))
    assert x.shape == (4, 3)


def test_py_dataset_labels_keep_their_dtype_as_array_labels_do(data, model):
    """Only inputs are read as float32: float64 labels stay as they are, as from arrays."""
    x, y = data
    float_labels = y.astype("float64")
    expected = keras_gex.detect_noisy((x, float_labels), model, **SETTINGS)
    report = keras_gex.detect_noisy(Batches(x, float_labels), model, **SETTINGS)
    assert report.labels.dtype == expected.labels.dtype == np.float64
    np.testing.assert_array_equal(report.member_losses, expected.member_losses)
