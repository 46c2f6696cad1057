"""The model zoo benchmark (`benchmarks/zoo.py`): its smoke run, noise and linear reference.

The zoo itself is a measurement, not a test; these check that its `--quick` run
produces its table and bars, and that the noise and the reference it compares
GEX against are what its docstring says.
"""

import doctest

import numpy as np
import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def zoo():
    return import_benchmark("zoo")


def test_doctests_pass(zoo):
    result = doctest.testmod(zoo)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_quick_run_writes_table_with_its_rows_and_the_bars(zoo, tmp_path, capsys):
    out = tmp_path / "zoo.md"
    assert zoo.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.strip() in capsys.readouterr().out
    quick = [name for name, case in zoo.CASES.items() if case.quick]
    assert 2 <= len(quick) <= 3
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for name in quick:
        row = next(line for line in table if line.startswith(f"| {name} |"))
        cells = row.split(" | ")
        assert len(cells) == 12 and "error" not in row
        assert 4 <= int(cells[-2]) <= 8  # members, one seed
        early_auc, early_ap = (float(v) for v in cells[-1].rstrip(" |").split(" / "))
        assert 0.5 < early_auc <= 1 and 0 < early_ap <= 1  # brief retraining ranks the noise
    assert "Bars per row" in text
    assert "Bars met on " in text and f" of {len(quick)} rows." in text
    assert (tmp_path / "zoo.csv").exists()
    # The quick run trains every θ*; a θ* loaded from a cache is said to carry its own seconds.
    rows = zoo._read_rows(tmp_path / "zoo.csv")
    assert "loaded from `--model-cache`" not in text
    rows[0]["theta_loaded"] = "True"  # as read back from a cached run's csv
    assert f"θ* of 1 of the {len(rows)} runs was loaded from `--model-cache`" in zoo.markdown(rows)


def test_cases_cover_issue_setups(zoo):
    assert len(zoo.CASES) >= 18
    assert sum(c.quick for c in zoo.CASES.values()) in (2, 3)
    for case in zoo.CASES.values():
        if case.quick:  # the smoke run needs scikit-learn's data only
            assert "scikit-learn" in case.data


def test_held_out_cases_are_apart_from_the_zoo(zoo):
    """`--held-out` runs models no default was designed on, never a zoo row again."""
    assert len(zoo.HELD_OUT) >= 6 and not set(zoo.HELD_OUT) & set(zoo.CASES)
    assert not any(case.quick for case in zoo.HELD_OUT.values())
    table = zoo.cases_table(list(zoo.HELD_OUT))
    assert all(f"| {name} |" in table for name in zoo.HELD_OUT)


def test_sigmoid_probabilities_are_read_as_probabilities(zoo):
    """A sigmoid unit's output is p(1) when the case says `outputs="probs"`, a logit otherwise."""
    labels = np.array([1, 0, 1])
    probs = zoo.ALL_CASES["sgd-sigmoid"]
    logits = zoo.CASES["sigmoid-binary"]
    out = np.array([[0.9], [0.2], [0.4]])
    np.testing.assert_allclose(zoo.given_label_probability(probs, out, labels), [0.9, 0.8, 0.4])
    expected = 1.0 / (1.0 + np.exp(-out[:, 0]))
    np.testing.assert_allclose(
        zoo.given_label_probability(logits, out, labels), np.where(labels, expected, 1 - expected)
    )


@pytest.mark.parametrize("num_classes", [2, 10])
def test_noise_flips_exactly_the_stated_fraction_to_another_class(zoo, num_classes):
    case = zoo.CASES["string-loss"]
    y = np.arange(1000) % num_classes
    data = zoo._zoo_cases.Data(np.zeros((1000, 1)), y, np.zeros((1000, 1)), num_classes)
    given, noisy = zoo.add_noise(case, data, seed=3)
    assert noisy.sum() == round(zoo.NOISE * len(y)) == 100
    assert np.all(given[noisy] != y[noisy]) and np.all(given[~noisy] == y[~noisy])
    assert set(np.unique(given)) <= set(range(num_classes))
    again, _ = zoo.add_noise(case, data, seed=3)
    assert np.array_equal(given, again)


def test_imbalanced_noise_flips_the_fraction_of_each_class(zoo):
    case = zoo.CASES["imbalance-90-10"]
    y = np.repeat([0, 1], [900, 100])
    data = zoo._zoo_cases.Data(np.zeros((1000, 1)), y, np.zeros((1000, 1)), 2)
    given, noisy = zoo.add_noise(case, data, seed=0)
    assert noisy[y == 0].sum() == 90 and noisy[y == 1].sum() == 10
    assert np.all(given[noisy] == 1 - y[noisy]) and np.all(given[~noisy] == y[~noisy])


def test_regression_noise_shifts_the_fraction_by_several_std(zoo):
    case = zoo.CASES["regression-mse"]
    y = np.random.default_rng(0).normal(size=500).astype("float32")
    data = zoo._zoo_cases.Data(np.zeros((500, 1)), y, np.zeros((500, 1)), 0)
    given, noisy = zoo.add_noise(case, data, seed=0)
    assert noisy.sum() == 50
    shift = np.abs(given - y)
    np.testing.assert_allclose(shift[noisy], zoo.SHIFT_STD * np.std(y), rtol=1e-5)
    assert np.all(shift[~noisy] == 0)


def test_linear_reference_ranks_flipped_rows_above_clean_ones(zoo):
    from sklearn.datasets import make_blobs

    x, y = make_blobs(600, centers=3, n_features=5, cluster_std=1.0, random_state=0)
    case = zoo.CASES["string-loss"]
    data = zoo._zoo_cases.Data(x, y, x, 3)
    given, noisy = zoo.add_noise(case, data, seed=0)
    scores = zoo.linear_reference(case, data, given)
    assert scores.shape == (600,)
    assert np.mean(scores[noisy]) > np.mean(scores[~noisy])
    assert zoo.quality._ranking(noisy, scores)["auc"] > 0.95


def _synthetic(zoo, case, n=160, seed=0):
    """`(Data, labels)` of a case's input kind and shape, without its data files."""
    rng = np.random.default_rng(seed)
    shapes = {
        "gru-text": ((n, 20), 50),
        "attention-text": ((n, 16), 50),
        "resnet-cnn": ((n, 28, 28, 1), 0),
        "spatial-dropout-cnn": ((n, 8, 8, 1), 0),
        "lstm-rows": ((n, 8, 8), 0),
    }
    shape, vocab = shapes.get(case.name, ((n, 12), 0))
    classes = 2 if case.target == "binary" else 4
    labels = rng.integers(0, classes, n)
    if vocab:  # word ids; 0 pads; the builders read the vocabulary from the bag's width
        x = rng.integers(classes + 1, vocab, shape).astype("int64")
        x[:, 0] = labels + 1  # a token that tells the label
        features = np.zeros((n, vocab + 2), dtype="float32")
    else:
        x = rng.normal(size=shape).astype("float32")
        x.reshape(n, -1)[:, :4] += 3.0 * labels[:, None]  # something to learn
        features = x.reshape(n, -1)
    return zoo._zoo_cases.Data(x, labels, features, classes), labels


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "gru-text",
        "attention-text",
        "bn-l2-tabular",
        "sgd-sigmoid",
        "normalization-layer",
        "resnet-cnn",
        "dropout-mlp",
        "spatial-dropout-cnn",
        "early-stopped-mlp",
        "lstm-rows",
    ],
)
def test_held_out_models_run_with_default_arguments(zoo, name):
    """Each held-out model (GRU with masking, attention, BN + L2, sigmoid probabilities,
    an adapted Normalization layer, a residual BN CNN, dropout, a small MLP, an LSTM) trains
    briefly on data of its inputs' kind and `detect_noisy` runs on it with default arguments."""
    import keras

    import keras_gex

    case = zoo.HELD_OUT[name]
    data, labels = _synthetic(zoo, case)
    keras.utils.set_random_seed(0)
    model = case.build(data)
    targets = zoo.targets(case, labels, data.num_classes)
    model.fit(data.x, targets, epochs=8, batch_size=32, verbose=0)
    report = keras_gex.detect_noisy((data.x, targets), model, seed=0, verbose=0)
    assert report.scores.shape == (len(labels),) and np.all(np.isfinite(report.scores))
    assert 4 <= report.ensemble.num_members <= 8
