import numpy as np
import pytest

import keras_gex
from keras_gex.analysis.thresholding import capped_threshold, threshold_scores


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


def test_every_transform_orders_its_flags_by_power_on_skewed_scores():
    """Lower powers (raw → sqrt → cbrt → 4th root → log) loosen the cut on a
    heavy right tail: each flags at least as many rows as the previous one."""
    from keras_gex.analysis.thresholding import TRANSFORMS

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.exponential(0.01, 900), rng.exponential(2.0, 100)])
    order = ("otsu", "otsu_sqrt", "otsu_cbrt", "otsu_root4", "otsu_log")
    assert set(order) == set(TRANSFORMS)
    flagged = [int(np.sum(scores > threshold_scores(scores, m))) for m in order]
    assert flagged == sorted(flagged) and 0 < flagged[0] < len(scores)
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
