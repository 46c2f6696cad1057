import numpy as np
import pytest

import keras_gex
from keras_gex.analysis.thresholding import (
    METHODS,
    capped_threshold,
    min_error_threshold,
    threshold_scores,
)


def _brute_force_otsu(values, separability=False):
    v = np.sort(np.asarray(values, dtype=np.float64))
    best, cut = -1.0, None
    for i in range(1, len(v)):
        if v[i - 1] == v[i]:
            continue
        low, high = v[:i], v[i:]
        w0, w1 = len(low) / len(v), len(high) / len(v)
        between = w0 * w1 * (low.mean() - high.mean()) ** 2
        if between > best:
            best, cut = between, v[i - 1]
    return best / v.var() if separability else cut


def test_otsu_separates_known_bimodal_data():
    rng = np.random.default_rng(0)
    low = rng.normal(0.0, 0.3, size=900)
    high = rng.normal(6.0, 0.5, size=100)
    values = np.concatenate([low, high])
    cut = keras_gex.otsu_threshold(values)
    assert low.max() <= cut < high.min()
    assert np.sum(values > cut) == 100


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        values = np.concatenate([rng.exponential(1.0, 60), rng.normal(5, 2, 15)])
        assert keras_gex.otsu_threshold(values) == _brute_force_otsu(values)


def test_otsu_constant_values_flag_nothing():
    assert keras_gex.otsu_threshold([2.0, 2.0, 2.0]) == 2.0


def test_otsu_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        keras_gex.otsu_threshold([1.0, np.nan])
    with pytest.raises(ValueError, match="empty"):
        keras_gex.otsu_threshold([])
    with pytest.raises(ValueError, match="1-D"):
        keras_gex.otsu_threshold(np.ones((2, 2)))


def test_transformed_thresholds_cut_raw_scores():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.exponential(0.01, 500), rng.exponential(5.0, 50)])
    for method in ("otsu", "otsu_sqrt", "otsu_log"):
        cut = threshold_scores(scores, method)
        assert cut in scores  # a cut is an actual score: the largest kept one
    # sqrt and log thresholds flag at least as many as raw Otsu on skewed data.
    n_raw = np.sum(scores > threshold_scores(scores, "otsu"))
    assert np.sum(scores > threshold_scores(scores, "otsu_log")) >= n_raw
    assert threshold_scores(scores, 0.5) == 0.5
    with pytest.raises(ValueError, match="threshold"):
        threshold_scores(scores, "median")


def test_root_and_log_rules_refuse_scores_below_zero_with_the_reason():
    """The member margin can be negative: a root or log of it is undefined, so say so."""
    rng = np.random.default_rng(3)
    margin = np.concatenate([rng.normal(-2.0, 0.5, 300), rng.normal(3.0, 0.5, 30)])
    for method in ("otsu_sqrt", "min_error_root4", "otsu_log"):
        with pytest.raises(ValueError, match=f"{np.sum(margin < 0)} scores are below zero"):
            threshold_scores(margin, method)
    for method in ("otsu", "min_error", "otsu_cbrt"):  # defined on every real number
        assert np.sum(margin > threshold_scores(margin, method)) == 30
    assert threshold_scores(np.zeros(3), "otsu_log") == 0.0  # zero is not below zero


def test_every_transform_orders_its_flags_by_power_on_skewed_scores():
    """Lower powers (raw → sqrt → cbrt → 4th root → log) loosen the cut on a
    heavy right tail: each flags at least as many rows as the previous one."""
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.exponential(0.01, 900), rng.exponential(2.0, 100)])
    for cut in ("otsu", "min_error"):
        order = (cut, f"{cut}_sqrt", f"{cut}_cbrt", f"{cut}_root4", f"{cut}_log")
        assert set(order) <= set(METHODS)
        flagged = [int(np.sum(scores > threshold_scores(scores, m))) for m in order]
        assert flagged == sorted(flagged) and 0 < flagged[0] < len(scores), (cut, flagged)
    assert len(METHODS) == 10
    with pytest.raises(ValueError, match="otsu_cbrt"):
        threshold_scores(scores, "otsu_cube")


def test_separability_matches_brute_force_and_ignores_scale():
    rng = np.random.default_rng(3)
    for _ in range(5):
        values = np.concatenate([rng.exponential(1.0, 60), rng.normal(5, 2, 15)])
        eta = keras_gex.otsu_separability(values)
        np.testing.assert_allclose(eta, _brute_force_otsu(values, separability=True), rtol=1e-12)
        np.testing.assert_allclose(keras_gex.otsu_separability(3.0 * values + 7.0), eta, rtol=1e-9)


def test_separability_is_higher_for_two_groups_than_for_one():
    rng = np.random.default_rng(4)
    one = rng.normal(0.0, 1.0, 1000)
    two = np.concatenate([rng.normal(0.0, 0.3, 900), rng.normal(6.0, 0.5, 100)])
    assert keras_gex.otsu_separability(two) > 0.9 > keras_gex.otsu_separability(one) > 0.5
    assert keras_gex.otsu_separability([2.0, 2.0]) == 0.0


def test_separability_refuses_bad_input():
    with pytest.raises(ValueError, match="finite"):
        keras_gex.otsu_separability([1.0, np.inf])
    with pytest.raises(ValueError, match="empty"):
        keras_gex.otsu_separability([])


def test_a_capped_cut_keeps_the_top_scores_and_never_lowers_the_cut():
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=500)
    cut = threshold_scores(scores, "otsu")
    above = int(np.sum(scores > cut))
    for count in (0, 1, above // 2, above, above + 10, 500, 10**6):
        capped = threshold_scores(scores, "otsu", max_flagged=count)
        flagged = scores > capped
        assert flagged.sum() == min(count, above) and capped >= cut
        assert np.all(scores[flagged] > scores[~flagged].max())
    assert threshold_scores(scores, 0.5, max_flagged=0) == 0.5  # a number is the caller's cut
    with pytest.raises(ValueError, match="count"):
        capped_threshold(scores, cut, -1)


def _gaussian_groups(share, n=20_000, gap=6.0, seed=0):
    """A large group N(0, 1) and a share of N(gap, 1), and which rows are high."""
    rng = np.random.default_rng(seed)
    high = rng.random(n) < share
    return rng.normal(0.0, 1.0, n) + gap * high, high


@pytest.mark.parametrize("share", [0.03, 0.1, 0.3])
def test_min_error_cut_lies_near_the_bayes_cut_of_two_gaussian_groups(share):
    """Where an example is as likely in either group, (μ0 + μ1)/2 + σ² ln(w0/w1)/(μ1 − μ0):
    within 0.15 and at least 4× nearer than Otsu's cut, which stays near the midpoint 3.0
    at every share (the groups' truncated means move it a little)."""
    values, _ = _gaussian_groups(share)
    bayes = 3.0 + np.log((1 - share) / share) / 6.0
    ours, otsus = min_error_threshold(values), keras_gex.otsu_threshold(values)
    assert abs(ours - bayes) < 0.15 and 4 * abs(ours - bayes) < abs(otsus - bayes)
    assert abs(otsus - 3.0) < 0.2


@pytest.mark.parametrize("share", [0.03, 0.1, 0.3])
def test_min_error_cut_misclassifies_fewer_rows_than_otsus(share):
    values, high = _gaussian_groups(share, gap=3.0, seed=1)

    def errors(cut):
        return int(np.sum((values > cut) != high))

    assert errors(min_error_threshold(values)) <= errors(keras_gex.otsu_threshold(values))


def test_min_error_cut_is_a_fixed_point_and_ignores_scale():
    """Two routes agree: the returned split gives itself back when its cut is
    recomputed by the formula; an affine map of the values moves the cut along."""
    rng = np.random.default_rng(5)
    for _ in range(5):
        values = np.concatenate([rng.exponential(1.0, 300), rng.normal(7.0, 1.0, 12)])
        cut = min_error_threshold(values)
        low, high = values[values <= cut], values[values > cut]
        w0, w1 = len(low) / len(values), len(high) / len(values)
        within = (np.sum((low - low.mean()) ** 2) + np.sum((high - high.mean()) ** 2)) / len(values)
        again = (low.mean() + high.mean()) / 2 + within * np.log(w0 / w1) / (
            high.mean() - low.mean()
        )
        assert low.max() <= again < high.min()
        np.testing.assert_allclose(min_error_threshold(4.0 * values - 2.0), 4.0 * cut - 2.0)


def test_min_error_cut_refuses_bad_input_and_keeps_constant_values():
    assert min_error_threshold([2.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        min_error_threshold([1.0, np.nan])
    with pytest.raises(ValueError):
        min_error_threshold([])
