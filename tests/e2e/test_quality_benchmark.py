"""The quality benchmark's bookkeeping: its check of issue #3's bars and its tables.

Runs on synthetic rows: no model is trained here (the benchmark itself is not a
test; see `benchmarks/quality.py`).
"""

import doctest

import numpy as np
import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def quality():
    return import_benchmark("quality")


def _rows(quality, case, gex, baselines, seeds=(0, 1, 2)):
    """Per-seed rows: `gex` and each baseline value are lists of (auc, ap), one per seed."""
    rows = []
    for i, seed in enumerate(seeds):
        for method, values in [(quality.GEX, gex), *baselines.items()]:
            auc, ap = values[i]
            rows.append({"case": case, "seed": seed, "method": method, "auc": auc, "ap": ap})
    return rows


def test_doctests_pass(quality):
    result = doctest.testmod(quality)
    assert result.attempted > 0 and result.failed == 0


def test_bars_met_when_gex_is_above_every_baseline(quality):
    rows = _rows(
        quality,
        "digits MLP 10%",
        gex=[(0.999, 0.99)] * 3,
        baselines={"EL2N (15 ep × 5)": [(0.998, 0.98)] * 3},
    )
    check = quality.done_when_check(rows)["digits MLP 10%"]
    assert check["met"] and not check["hard"] and check["short"] == []


def test_easy_case_allows_one_std_below_but_harder_case_needs_strictly_above(quality):
    # GEX's AUC 0.996 ± 0.0016 over seeds, the baseline's 0.997 ± 0: within one std.
    gex = [(0.994, 0.99), (0.996, 0.99), (0.998, 0.99)]
    baseline = {"EL2N (15 ep × 5)": [(0.997, 0.98)] * 3}
    easy = quality.done_when_check(_rows(quality, "digits MLP 10%", gex, baseline))
    assert easy["digits MLP 10%"]["met"]
    hard = quality.done_when_check(_rows(quality, "digits MLP 30%", gex, baseline))
    check = hard["digits MLP 30%"]
    assert check["hard"] and not check["met"]
    assert check["short"] == ["EL2N (15 ep × 5) AUC 0.9970 ≥ 0.9960"]


def test_bars_on_auc_and_ap(quality):
    rows = _rows(quality, "Fashion CNN 10%", gex=[(0.991, 0.946)] * 3, baselines={})
    check = quality.done_when_check(rows)["Fashion CNN 10%"]
    assert check["hard"] and check["short"] == [] and not check["met"]
    rows = _rows(quality, "Fashion CNN 10%", gex=[(0.991, 0.951)] * 3, baselines={})
    assert quality.done_when_check(rows)["Fashion CNN 10%"]["met"]


def test_gex_paper_score_is_not_a_baseline(quality):
    rows = _rows(
        quality,
        "digits MLP 30%",
        gex=[(0.995, 0.99)] * 3,
        baselines={quality.GEX_PAPER: [(0.999, 0.999)] * 3},
    )
    assert quality.done_when_check(rows)["digits MLP 30%"]["met"]


def test_table_names_baselines_not_run_and_counts_cases(quality):
    rows = _rows(
        quality,
        "digits MLP 10%",
        gex=[(0.999, 0.99)] * 3,
        baselines={"EL2N (15 ep × 5)": [(0.9, 0.5)] * 3, "TracInRP (GE)": [(0.9, 0.5)] * 3},
    )
    rows += _rows(
        quality,
        "Fashion CNN 10%",
        gex=[(0.991, 0.946)] * 3,
        baselines={"EL2N (4 ep × 5)": [(0.9, 0.5)] * 3},
    )
    table = quality.markdown_tables(rows, [0, 1, 2])
    assert "Not run on Fashion CNN 10%: TracInRP (GE)." in table
    assert "Not run on digits MLP 10%" not in table  # EL2N's settings differ, not its name
    assert "Bars met on 1 of 2 cases." in table
    assert (
        "| Fashion CNN 10% | yes | 0.9910 | 0.9460 | yes | no | TracInRP (GE) not run | no |"
        in table
    )


def test_case_missing_a_baseline_run_elsewhere_is_not_met(quality):
    # GEX clears every bar on Fashion, but TracInRP, run on digits, was not run there.
    rows = _rows(
        quality,
        "digits MLP 10%",
        gex=[(0.999, 0.99)] * 3,
        baselines={"TracInRP (GE)": [(0.9, 0.5)] * 3},
    )
    rows += _rows(quality, "Fashion CNN 10%", gex=[(0.995, 0.97)] * 3, baselines={})
    check = quality.done_when_check(rows)
    assert check["digits MLP 10%"]["met"] and check["digits MLP 10%"]["not_run"] == []
    fashion = check["Fashion CNN 10%"]
    assert fashion["short"] == [] and fashion["not_run"] == ["TracInRP (GE)"]
    assert not fashion["met"]
    table = quality.done_when_table(rows)
    assert (
        "| Fashion CNN 10% | yes | 0.9950 | 0.9700 | yes | yes | TracInRP (GE) not run | no |"
        in table
    )
    assert "Bars met on 1 of 2 cases." in table


def test_clean_label_oracle_is_a_reference_not_a_baseline(quality):
    # The oracle knows which labels are right: above GEX on a harder case, and
    # run on one case only, it neither fails the bars nor counts as "not run".
    oracle = f"{quality.ORACLE} (5-fold, 15 ep)"
    rows = _rows(
        quality,
        "digits MLP 30%",
        gex=[(0.995, 0.99)] * 3,
        baselines={oracle: [(0.9995, 0.999)] * 3},
    )
    rows += _rows(quality, "digits MLP 10%", gex=[(0.999, 0.99)] * 3, baselines={})
    check = quality.done_when_check(rows)
    assert check["digits MLP 30%"]["met"] and check["digits MLP 10%"]["met"]
    assert check["digits MLP 10%"]["not_run"] == []
    table = quality.markdown_tables(rows, [0, 1, 2])
    assert "| digits MLP 30% | 0.9950 | 0.9995 | -0.0045 | 0.9900 | 0.9990 | -0.0090 |" in table
    assert "| digits MLP 10% | 0.9990 |" not in table.split("How separable")[1]


@pytest.mark.slow
def test_clean_label_oracle_fits_clean_labels_and_scores_flips_higher(quality, monkeypatch):
    # Trains 3 small MLPs (3 folds instead of the benchmark's 5: the bookkeeping
    # below reads `ORACLE_FOLDS`) for 10 epochs each, on 500 rows, for each loss.
    from sklearn.metrics import roc_auc_score

    from keras_gex.datasets import noisy_digits

    d = noisy_digits(0.2, seed=0)
    x, y, y_clean, noisy = d.x_train[:500], d.y_train[:500], d.y_train_clean[:500], d.is_noisy[:500]
    train, fitted = quality._train, []

    def recording_train(model_fn, x, targets, *args):
        fitted.append(targets if targets.ndim == 1 else np.argmax(targets, axis=1))
        return train(model_fn, x, targets, *args)

    monkeypatch.setattr(quality, "_train", recording_train)
    monkeypatch.setattr(quality, "ORACLE_FOLDS", 3)
    for sigmoid in (False, True):
        fitted.clear()
        scores = quality._oracle(quality._mlp, x, y, y_clean, 10, 64, 0, sigmoid)
        assert scores.shape == (500,) and bool(np.all(np.isfinite(scores)))
        assert roc_auc_score(noisy, scores) > 0.95
        # Every row is fit in all folds but its own, with its clean label.
        counts = np.bincount(np.concatenate(fitted), minlength=10)
        assert len(fitted) == quality.ORACLE_FOLDS
        assert np.array_equal(
            counts, (quality.ORACLE_FOLDS - 1) * np.bincount(y_clean, minlength=10)
        )


def test_extra_cases_run_only_when_named_and_stay_out_of_the_bars(quality):
    case = "Fashion wide CNN 30%"
    assert case in quality.EXTRA_CASES and case not in quality.CASES
    assert quality._parser().parse_args([]).cases == list(quality.CASES)
    assert quality._parser().parse_args(["--cases", case]).cases == [case]
    assert quality._is_hard(case)
    rows = _rows(quality, "digits MLP 10%", gex=[(0.999, 0.99)] * 3, baselines={})
    rows += _rows(
        quality, case, gex=[(0.98, 0.96)] * 3, baselines={"EL2N (4 ep × 5)": [(0.99, 0.97)] * 3}
    )
    check = quality.done_when_check(rows)
    assert list(check) == ["digits MLP 10%"]
    table = quality.markdown_tables(rows, [0, 1, 2])
    assert "Bars met on 1 of 1 cases." in table
    assert f"| {case} |" in table.split("Issue #3's bars")[0]  # in the results table
    extra_only = quality.markdown_tables([r for r in rows if r["case"] == case], [0, 1, 2])
    assert "none of its cases was run" in extra_only and "Bars met on" not in extra_only


def test_wide_fashion_cnn_builds_for_both_losses(quality):
    import keras

    _, image, model_fn, *_ = quality.ALL_CASES["Fashion wide CNN 30%"]
    assert image
    for sigmoid in (False, True):
        model = model_fn(sigmoid)
        assert model.output_shape == (None, 10)
        batchnorm = [
            layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert len(batchnorm) == 4
