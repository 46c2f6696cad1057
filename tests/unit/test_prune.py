"""`prune`: the lowest self-influence first, of all rows or of every class (`per_class=True`)."""

import numpy as np
import pytest
import tensorflow as tf

import keras_gex


def _pruned_per_class(result, y):
    return np.bincount(y[result.pruned_indices], minlength=y.max() + 1).tolist()


def test_an_easy_class_is_not_emptied():
    """Every row of class 0 scores below every row of class 1: one ranking over
    all rows prunes class 0 alone, per class each loses half."""
    y = np.repeat([0, 1], 10)
    scores = np.concatenate([np.linspace(0, 1, 10), np.linspace(2, 3, 10)])
    data = (np.zeros((20, 3)), y)
    by_class = keras_gex.prune(data, scores, fraction=0.5, per_class=True)
    assert _pruned_per_class(by_class, y) == [5, 5]
    assert _pruned_per_class(keras_gex.prune(data, scores, fraction=0.5), y) == [10, 0]


def test_the_count_is_the_fraction_of_all_rows_split_by_class_size():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [7, 11, 3, 19])
    scores = rng.random(len(y))
    for fraction in (0.1, 0.25, 0.5, 0.9):
        data = (np.zeros((len(y), 2)), y)
        result = keras_gex.prune(data, scores, fraction=fraction, per_class=True)
        assert len(result.pruned_indices) == round(fraction * len(y))
        sizes = np.bincount(y)
        assert np.all(np.abs(np.array(_pruned_per_class(result, y)) - fraction * sizes) < 1)
        pruned = scores[result.pruned_indices]
        assert np.all(np.diff(pruned) >= 0)  # lowest score first
        assert len(np.intersect1d(result.kept_indices, result.pruned_indices)) == 0
        assert len(result.kept_indices) + len(result.pruned_indices) == len(y)


def test_classes_of_one_hot_and_0_1_labels_and_none_for_regression_or_multi_label():
    scores = np.concatenate([np.linspace(0, 1, 6), np.linspace(2, 3, 6)])
    y = np.repeat([0, 1], 6)
    x = np.zeros((12, 1))
    for labels in (np.eye(2)[y], y.astype("float32"), y.astype(bool), y[:, None] + 3.0):
        kept = keras_gex.prune((x, labels), scores, fraction=0.5, per_class=True).kept_indices
        assert np.bincount(y[kept]).tolist() == [3, 3], labels
    for labels in (np.linspace(0.1, 5.3, 12), np.ones((12, 3))):  # regression, multi-label
        with pytest.raises(ValueError, match=r"per_class=True.*Pass `per_class=False`"):
            keras_gex.prune((x, labels), scores, fraction=0.5, per_class=True)
        kept = keras_gex.prune((x, labels), scores, fraction=0.5).kept_indices
        assert kept.tolist() == list(range(6, 12))
    with pytest.raises(ValueError, match=r"Argument `per_class` must be True or False"):
        keras_gex.prune((x, y), scores, fraction=0.5, per_class="auto")


def test_a_dataset_prunes_as_its_arrays():
    rng = np.random.default_rng(1)
    x, y = rng.random((50, 4)).astype("float32"), rng.integers(0, 3, 50)
    scores = rng.random(50)
    arrays = keras_gex.prune((x, y), scores, fraction=0.3, per_class=True)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    batches = keras_gex.prune(ds, scores, fraction=0.3, per_class=True)
    np.testing.assert_array_equal(batches.kept_indices, arrays.kept_indices)
    np.testing.assert_array_equal(batches.pruned_indices, arrays.pruned_indices)
    with pytest.raises(ValueError, match="50 examples but the scores have 49"):
        keras_gex.prune((x, y), scores[:49], fraction=0.3, per_class=True)


def test_what_each_class_kept_is_counted_and_the_smallest_share_printed(capsys):
    """One ranking over all rows can empty an easy class: the result counts what every
    class kept, and the printed line names the class with the smallest share."""
    y = np.repeat([0, 1, 2], [10, 10, 20])
    scores = np.concatenate([np.linspace(0, 1, 10), np.linspace(2, 3, 10), np.linspace(4, 5, 20)])
    result = keras_gex.prune((np.zeros((40, 2)), y), scores, fraction=0.3)
    assert result.kept_per_class() == {0: (0, 10), 1: (8, 10), 2: (20, 20)}
    assert capsys.readouterr().out == (
        "[keras_gex] pruned 12 of 40 rows (30%); smallest share kept: class 0, 0 of 10 rows (0%)\n"
    )
    by_class = keras_gex.prune((np.zeros((40, 2)), y), scores, fraction=0.3, per_class=True)
    assert by_class.kept_per_class() == {0: (7, 10), 1: (7, 10), 2: (14, 20)}
    assert "class 0, 7 of 10 rows (70%)" in capsys.readouterr().out
    one_hot = keras_gex.prune((np.zeros((40, 2)), np.eye(3)[y]), scores, fraction=0.3, verbose=0)
    assert one_hot.kept_per_class() == result.kept_per_class()
    assert capsys.readouterr().out == ""


def test_labels_without_classes_are_pruned_and_not_counted(capsys):
    scores = np.arange(6.0)
    for labels in (np.linspace(0.1, 5.3, 6), np.array(["cat", "dog"] * 3)):
        result = keras_gex.prune((np.zeros((6, 1)), labels), scores, fraction=0.5)
        assert result.kept_indices.tolist() == [3, 4, 5]
        assert result.classes is None
        with pytest.raises(ValueError, match="not one class per row"):
            result.kept_per_class()
        assert capsys.readouterr().out == "[keras_gex] pruned 3 of 6 rows (50%)\n"


def test_labels_of_one_named_output_are_read_and_of_several_not(capsys):
    x, y, scores = np.zeros((6, 1)), np.array([0, 0, 0, 1, 1, 1]), np.arange(6.0)
    one = keras_gex.prune((x, {"out": y}), scores, fraction=0.5)
    assert one.kept_per_class() == {0: (0, 3), 1: (3, 3)}
    in_a_list = keras_gex.prune((x, [y]), scores, fraction=0.5, verbose=0)
    assert in_a_list.kept_per_class() == one.kept_per_class()
    two = keras_gex.prune((x, {"a": y, "b": y}), scores, fraction=0.5, verbose=0)
    assert two.classes is None and two.kept_indices.tolist() == [3, 4, 5]
    assert "class 0, 0 of 3 rows (0%)" in capsys.readouterr().out


def test_scores_that_do_not_match_the_data_are_refused():
    """Misaligned scores would prune the wrong rows: refused, with or without classes."""
    x, y = np.zeros((10, 2)), np.arange(10) % 2
    for labels in (y, np.linspace(0, 1, 10)):
        with pytest.raises(ValueError, match="10 examples but the scores have 9"):
            keras_gex.prune((x, labels), np.arange(9.0), fraction=0.5)
