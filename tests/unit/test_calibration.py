"""Step-size calibration (`learning_rate="auto"`): the search and a tiny model."""

import math
import warnings

import numpy as np
import pytest
from conftest import make_bn_model, make_mlp
from sklearn.metrics import roc_auc_score

import keras_gex
from keras_gex.collection import step_size
from keras_gex.collection.step_size import (
    COLLAPSE_FIT,
    FIT_TARGET,
    FIT_WINDOW,
    LR_FACTOR,
    STEEP_DROP,
    WHOLE_FIT,
    StepSizeController,
    calibrate,
    fit_falls_steeply,
    nothing_to_forget,
)
from keras_gex.config import MemberStats, Probe

REF = MemberStats(0.0, float("nan"), 1.0, 0.01)


def _fake_member(fit_of_lr, calls, midway_of_lr=None):
    """A `run_member` whose members keep `fit_of_lr(lr)` of θ*'s fit.

    Halfway they keep `midway_of_lr(lr)` (by default their final fit).
    """
    midway_of_lr = midway_of_lr or fit_of_lr

    def run_probe(lr, abandon_above=None, abandon_below=None):
        calls.append(lr)
        midway = midway_of_lr(lr)
        above = abandon_above is not None and midway > abandon_above
        if above or (abandon_below is not None and midway < abandon_below):
            return [(None, MemberStats(lr, 0.2, midway, 0.3))], midway
        return [(f"weights@{lr:.4g}", MemberStats(lr, 0.1, fit_of_lr(lr), 0.5))], midway

    return run_probe


def _calibrate_fake(fit_of_lr, max_probes=6, midway_of_lr=None, abandon_below=None):
    calls, record = [], []
    lr, accepted = calibrate(
        _fake_member(fit_of_lr, calls, midway_of_lr),
        REF,
        record,
        lambda msg: None,
        steps=40,
        abandon_below=abandon_below,
        max_probes=max_probes,
    )
    return lr, accepted or [], record, calls


def test_first_probe_in_window_is_kept_as_a_member():
    lr, accepted, record, calls = _calibrate_fake(lambda lr: 0.8)
    assert calls == [0.1] and lr == 0.1
    assert accepted == [("weights@0.1", MemberStats(0.1, 0.1, 0.8, 0.5))]
    assert record[0].accepted is True and record[0].seconds >= 0.0


def test_search_brackets_the_edge_of_the_basin():
    """Fit 1.0 below lr 0.15 (memorising basin), 0.1 above 0.3 (collapse)."""

    def fit(lr):
        return 1.0 if lr < 0.15 else (0.85 if lr < 0.3 else 0.1)

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert 0.15 <= lr < 0.3
    assert len(accepted) == 1
    assert calls[:2] == [0.1, 0.4]  # up by the factor, then back by bisection in log
    assert calls[2] == pytest.approx(math.sqrt(0.1 * 0.4))
    assert [r.accepted for r in record] == [False] * (len(record) - 1) + [True]


def test_probe_that_has_not_moved_halfway_is_abandoned_as_too_small():
    """Halfway fit above `WHOLE_FIT`: recorded, not kept, the step size goes up."""

    def fit(lr):
        return 1.0 if lr < 0.15 else 0.8

    lr, accepted, record, calls = _calibrate_fake(fit, midway_of_lr=fit)
    assert calls == [0.1, 0.4] and lr == 0.4 and len(accepted) == 1
    assert record[0].abandoned is True and record[0].accepted is False
    assert record[0].midway_fit == 1.0 and record[1].abandoned is False
    # Halfway below the bar: the probe runs to its end and is judged there.
    lr, _, record, calls = _calibrate_fake(fit, midway_of_lr=lambda lr: WHOLE_FIT - 0.01)
    assert record[0].abandoned is False and record[0].relative_fit == 1.0


def test_probe_that_collapsed_halfway_is_abandoned_as_too_large():
    """Halfway fit below `abandon_below`: recorded as abandoned, the step size goes
    down exactly as if the probe had run to its (collapsed) end."""

    def fit(lr):
        return 1.0 if lr < 0.15 else (0.85 if lr < 0.3 else 0.1)

    whole = _calibrate_fake(fit)
    lr, accepted, record, calls = _calibrate_fake(fit, abandon_below=COLLAPSE_FIT)
    assert calls == whole[3] and lr == whole[0] and accepted == whole[1]
    assert record[1].learning_rate == 0.4 and record[1].abandoned is True
    assert record[1].relative_fit == 0.1 and record[1].accepted is False
    assert not whole[2][1].abandoned
    # Halfway above the bar (a probe that may still recover): it runs to its end.
    _, _, record, _ = _calibrate_fake(
        fit, midway_of_lr=lambda lr: COLLAPSE_FIT + 0.01, abandon_below=COLLAPSE_FIT
    )
    assert not any(r.abandoned for r in record)


def test_the_plateau_past_a_cliff_is_in_the_window():
    """A memorising Fashion-MNIST CNN at 30% flips (seed 0, measured): the fit
    falls off a cliff between lr 0.025 and 0.05 onto a plateau at 0.54-0.6,
    where members have forgotten the flips. The first probe lands on the
    plateau and is kept; with the window's floor at 0.60 the search went on to
    lr 0.035, on the cliff (members there kept 0.6-1.0), AUC 0.952 vs 0.988."""
    curve = {0.025: 1.0, 0.05: 0.597, 0.1: 0.542}

    def fit(lr):
        return curve.get(round(lr, 4), 0.895)

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert FIT_WINDOW[0] <= 0.542 and calls == [0.1] and lr == 0.1
    assert accepted == [("weights@0.1", MemberStats(0.1, 0.1, 0.542, 0.5))]
    assert not fit_falls_steeply(record) and not nothing_to_forget(record)


def test_a_whole_factor_past_the_target_is_refined_halfway():
    """Above the window at 0.1, below the target at 0.4: 0.2 is probed and kept."""

    def fit(lr):
        return {0.1: 1.0, 0.4: 0.69}.get(lr, 0.9)

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert calls == [0.1, 0.4, pytest.approx(0.2)] and lr == pytest.approx(0.2)
    assert accepted == [("weights@0.2", MemberStats(lr, 0.1, 0.9, 0.5))]
    assert [r.accepted for r in record] == [False, False, True]
    assert fit_falls_steeply(record)  # 0.4 forgot more than the target: hold 0.2


def test_refinement_keeps_the_larger_step_size_when_halfway_stays_in_the_basin():
    def fit(lr):
        return {0.1: 1.0, 0.4: 0.69}.get(lr, 0.95)

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert calls == [0.1, 0.4, pytest.approx(0.2)] and lr == 0.4
    assert accepted == [("weights@0.4", MemberStats(0.4, 0.1, 0.69, 0.5))]
    assert [r.accepted for r in record] == [False, True, False]
    assert not fit_falls_steeply(record)  # nothing rejected above 0.4


@pytest.mark.parametrize("kept", [FIT_TARGET + 0.05, None])
def test_no_refinement_at_or_above_the_target_or_on_a_first_probe(kept):
    """Only a whole-factor jump that lands below the target is refined."""

    def fit(lr):
        if kept is None:  # the first probe lands below the target (30% flips)
            return 0.68
        return 1.0 if lr < 0.2 else kept

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert calls == ([0.1] if kept is None else [0.1, 0.4]) and len(accepted) == 1
    assert lr == calls[-1]
    assert not fit_falls_steeply(record)


def test_clean_labels_cliff_steps_back_from_the_edge():
    def fit(lr):  # a cliff: from the basin straight to collapse
        return 1.0 if lr < 0.2 else 0.1

    with pytest.warns(UserWarning, match="found no learning rate") as caught:
        lr, accepted, record, _ = _calibrate_fake(fit, max_probes=4)
    assert accepted == [] and len(record) == 4
    # Fit 100% right up to a collapse is what clean labels look like: say so,
    # and hold a step size one grid factor below the largest that kept the fit.
    edge = max(r.learning_rate for r in record if r.relative_fit > FIT_WINDOW[1])
    assert lr == pytest.approx(edge / LR_FACTOR)
    assert nothing_to_forget(record)
    message = str(caught[0].message)
    assert "few or no errors" in message and f"learning_rate={lr:.4g}" in message


def test_no_step_size_in_window_warns_and_takes_the_closest():
    def fit(lr):  # forgets some labels, then a cliff past the window
        return 0.95 if lr < 0.2 else 0.1

    with pytest.warns(UserWarning, match="found no learning rate") as caught:
        lr, accepted, record, _ = _calibrate_fake(fit, max_probes=4)
    assert accepted == [] and not nothing_to_forget(record)
    assert lr < 0.2  # fit 0.95 is closer to the target than a collapse
    assert "few or no errors" not in str(caught[0].message)
    assert f"using the closest, learning_rate={lr:.4g}" in str(caught[0].message)


def test_controller_holds_one_step_size_when_nothing_needs_forgetting():
    controller = StepSizeController(hold=True)
    for fit in (1.0, FIT_TARGET + 0.05, FIT_TARGET - 0.05, COLLAPSE_FIT - 0.1):
        assert controller.next(0.3, fit) == 0.3
    assert StepSizeController().next(0.3, 1.0) > 0.3  # without `hold` it nudges up


def test_controller_nudges_outside_the_window_then_holds():
    low, high = FIT_WINDOW
    controller = StepSizeController()
    assert controller.next(1.0, high + 0.01) > 1.0
    # Once it had to correct, it no longer walks, even above the target.
    assert controller.next(1.0, (FIT_TARGET + high) / 2) == 1.0
    assert StepSizeController().next(1.0, low - 0.01) < 1.0
    assert StepSizeController().next(1.0, (low + FIT_TARGET) / 2) == 1.0
    assert COLLAPSE_FIT < low


def test_controller_walks_up_while_members_keep_more_than_the_target():
    controller = StepSizeController()
    fits = [FIT_TARGET + 0.04, FIT_TARGET + 0.03, FIT_TARGET + 0.01, FIT_TARGET - 0.01]
    lrs = [0.1]
    for fit in fits:
        lrs.append(controller.next(lrs[-1], fit))
    assert lrs[1] > lrs[0] and lrs[2] > lrs[1] and lrs[3] > lrs[2]
    # The member at or below the target stops the walk; later ones hold.
    assert lrs[4] == lrs[3]
    assert controller.next(lrs[4], FIT_TARGET + 0.1) == lrs[4]


def test_controller_returns_to_the_first_step_size_on_a_steep_drop():
    controller = StepSizeController()
    first_fit = FIT_TARGET + 0.1
    walked = controller.next(0.2, first_fit)
    assert walked > 0.2
    # Still above the target, but a drop this large means a steep fit curve.
    assert controller.next(walked, first_fit - STEEP_DROP - 0.01) == 0.2
    assert controller.next(0.2, first_fit) == 0.2


def test_controller_replay_matches_running_the_members():
    ref = MemberStats(0.0, 0.01, 1.0, 0.01)
    history = [(0.1, 0.88), (0.115, 0.86), (0.1323, 0.75), (0.1323, 0.9)]
    stats = [MemberStats(lr, 0.1, fit, 0.5) for lr, fit in history]
    live = StepSizeController()
    for lr, fit in history:
        expected = live.next(lr, fit)
    assert StepSizeController().replay(None, stats, ref) == expected
    assert StepSizeController().replay(0.3, [], ref) == 0.3


def test_auto_picks_a_sane_step_size_where_a_fixed_one_fails(trained_mlp, digits_ensemble, digits):
    """The memorising digits MLP of conftest: a small fixed step never leaves
    θ*'s basin (members keep fitting every given label); "auto" (the session's
    `digits_ensemble`, collected with the default step size) lands its members
    in the window without collapsing any of them."""
    data = (digits.x_train, digits.y_train)
    fixed = keras_gex.GeometricEnsemble.collect(
        trained_mlp, data, num_members=2, steps=100, learning_rate=0.01, seed=0, verbose=0
    )
    auto = digits_ensemble  # num_members=4, steps=100, seed=0, learning_rate="auto"
    ref_fit = auto.info["reference_stats"]["fit"]
    assert ref_fit > 0.98  # θ* memorised its noisy labels
    probes = auto.info["calibration"]
    assert probes[-1]["accepted"] and all("seconds" in p for p in probes)
    assert auto.info["learning_rate"] > 0.01
    assert FIT_WINDOW[0] <= probes[-1]["relative_fit"] <= FIT_WINDOW[1]
    # The accepted probe is member 0; later members may be nudged by the controller.
    assert auto.info["member_stats"][0]["learning_rate"] == probes[-1]["learning_rate"]
    # The recorded step size is what the members used, not the controller's next proposal.
    used = [s["learning_rate"] for s in auto.info["member_stats"]]
    assert auto.info["learning_rate"] == float(np.median(used))
    fits = [s["fit"] / ref_fit for s in auto.info["member_stats"]]
    assert min(fits) >= COLLAPSE_FIT and np.mean(fits) <= FIT_WINDOW[1]
    fixed_fits = [s["fit"] / ref_fit for s in fixed.info["member_stats"]]
    assert min(fixed_fits) > FIT_WINDOW[1]  # never left the memorising basin
    auc_auto = roc_auc_score(digits.is_noisy, auto.self_influence(data, verbose=0))
    auc_fixed = roc_auc_score(digits.is_noisy, fixed.self_influence(data, verbose=0))
    assert auc_auto > 0.97
    assert auc_auto > auc_fixed + 0.03
    # Every probe ran whole or (abandoned) half of the steps; the summary lists them.
    assert all(p["steps"] == (50 if p["abandoned"] else 100) for p in probes)
    summary = keras_gex.detect_noisy(data, auto, verbose=0).summary(print_fn=None)
    assert "calibration probes (lr → share of θ*'s fit kept): " in summary and "(kept)" in summary


def test_sigmoid_members_are_judged_on_whole_examples():
    """With one-hot targets a member that says "no" to every label agrees on
    9 of 10 outputs; calibration must read that as no fit at all."""
    import keras

    from keras_gex.losses import resolve_loss

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10)])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    loss = resolve_loss(model)
    y = np.eye(10, dtype="float32")[[0, 3]]
    all_no = np.full((2, 10), -5.0, dtype="float32")
    right = np.where(y > 0, 5.0, -5.0).astype("float32")
    one_wrong = right.copy()
    one_wrong[1, 7] = 5.0
    np.testing.assert_allclose(loss.fit_mask(y, all_no).numpy(), [0.0, 0.0])
    np.testing.assert_allclose(loss.fit_mask(y, right).numpy(), [1.0, 1.0])
    np.testing.assert_allclose(loss.fit_mask(y, one_wrong).numpy(), [1.0, 0.0])


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
def test_collapse_is_judged_halfway_only_without_batchnorm(
    kind, digits, small_trained_mlp, monkeypatch
):
    """A first probe at a step size that wrecks the model: on an MLP it is
    abandoned halfway as collapsed; with BatchNorm (whose halfway fit reads low
    before the statistics are re-estimated) it runs to its end and is judged there."""
    if kind == "mlp":
        x, y, model = small_trained_mlp
    else:
        x, y = digits.x_train[:300], digits.y_train[:300]
        model = make_bn_model(seed=0)
        model.fit(x, y, epochs=5, batch_size=32, verbose=0)  # lr 3.0 wrecks it all the same
    monkeypatch.setattr(step_size, "INITIAL_LR", 3.0)
    kwargs = dict(num_members=1, steps=40, batch_size=32, seed=0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    first = ens.record.calibration[0]
    assert first.learning_rate == 3.0 and first.midway_fit < COLLAPSE_FIT
    assert first.abandoned is (kind == "mlp")
    assert first.steps == (20 if kind == "mlp" else 40)
    assert not first.accepted


@pytest.fixture(scope="module")
def small_trained_mlp(digits):
    """300 digits rows and an MLP fit to them for 30 epochs (no collection yet).

    Shared: collection leaves the model and its optimizer untouched
    (test_collect.py::test_collection_leaves_model_and_optimizer_untouched)."""
    x, y = digits.x_train[:300], digits.y_train[:300]
    model = make_mlp(seed=0)
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    return x, y, model


RECORDS = {  # (step size, relative fit, accepted) of the calibration's probes
    "clean": [(0.0025, 1.0, False), (0.04, 0.1, False)],  # nothing to forget
    "steep": [(0.005, 1.0, False), (0.02, 0.3, False), (0.01, 0.9, True)],
    "forgetting": [(0.0025, 0.95, False), (0.04, 0.1, False)],  # steer as usual
}


@pytest.mark.parametrize("records", sorted(RECORDS))
def test_collection_holds_the_step_size_when_the_probes_say_so(
    records, small_trained_mlp, monkeypatch
):
    """Wiring: the probe records decide whether later members are steered."""
    held = records != "forgetting"

    def fake_calibrate(run_probe, ref_stats, record, *args, **kwargs):
        for lr, fit, accepted in RECORDS[records]:
            record.append(Probe(lr, fit, 1.0, accepted=accepted))
        return 0.01, None

    monkeypatch.setattr(step_size, "calibrate", fake_calibrate)
    x, y, model = small_trained_mlp
    kwargs = dict(num_members=3, steps=20, batch_size=32, seed=0, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    rates = [s["learning_rate"] for s in ens.info["member_stats"]]
    fits = [s["fit"] / ens.info["reference_stats"]["fit"] for s in ens.info["member_stats"]]
    assert min(fits) > FIT_WINDOW[1]  # members at lr 0.01 keep their fit: outside the window
    summary = keras_gex.detect_noisy((x, y), ens, verbose=0).summary(print_fn=None)
    reason = {"clean": "nothing to forget", "steep": "the fit falls steeply past it"}
    if held:
        assert rates == [0.01, 0.01, 0.01]
        assert f"lr=0.01 (calibrated; held for every member: {reason[records]})" in summary
    else:  # the controller nudges members that kept too much up
        assert rates[0] == 0.01 and rates[1] > rates[0] and rates[2] > rates[1]
        assert "held" not in summary


def test_members_run_again_are_counted_and_summarised(small_trained_mlp, monkeypatch):
    """A calibrated step size that collapses every member: each is refitted at
    0.7× (at most M times), and `info` / the summary say how many were run again."""

    def fake_calibrate(run_probe, ref_stats, record, *args, **kwargs):
        record.append(Probe(3.0, 0.8, 1.0, accepted=True))
        return 3.0, None

    monkeypatch.setattr(step_size, "calibrate", fake_calibrate)
    x, y, model = small_trained_mlp
    kwargs = dict(num_members=2, steps=20, batch_size=32, seed=0, verbose=0)
    with pytest.warns(UserWarning, match="2 GE members collapsed and were refitted"):
        ens = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    assert ens.info["redone_members"] == {"collapsed": 2, "diverged": 0}
    # Member 0 kept its second refit (3.0 → 2.1 → 1.47); the controller then
    # steered member 1 on from there.
    assert ens.info["member_stats"][0]["learning_rate"] == pytest.approx(3.0 * 0.7**2)
    summary = keras_gex.detect_noisy((x, y), ens, verbose=0).summary(print_fn=None)
    assert (
        "members run again: 2 after collapsing (refitted at 0.7× the step size), 0 "
        "after diverging (retried at 0.25× it)" in summary
    )
