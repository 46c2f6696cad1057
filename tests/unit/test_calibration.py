"""The member rule (`collection/step_size.py`): the search, the gate, the signal."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp
from sklearn.metrics import roc_auc_score

import keras_gex
from keras_gex.collection import budget, step_size
from keras_gex.collection.step_size import FIT_WINDOW, LR_FACTOR, calibrate, relative_fit
from keras_gex.collection.tuner import sgd_update
from keras_gex.config import MemberStats, Probe

REF = MemberStats(0.0, float("nan"), 1.0, 0.01)


def _fake_member(fit_of_lr, calls, midway_of_lr=None, late_of_lr=None):
    """A `run_probe` (40 steps) whose members keep `fit_of_lr(lr)` of θ*'s fit (chance 0).

    Halfway they keep `midway_of_lr(lr)`, at three quarters `late_of_lr(lr)`
    (by default their final fit).
    """
    midway_of_lr = midway_of_lr or fit_of_lr
    late_of_lr = late_of_lr or fit_of_lr

    def run_probe(lr, weight_decay, abandon):
        calls.append(lr)
        midway = midway_of_lr(lr)
        for fit, run in ((midway, 20), (late_of_lr(lr), 30)):
            if abandon(fit):
                return [(None, MemberStats(lr, 0.2, fit, 0.3))], midway, run
        return [(f"weights@{lr:.4g}", MemberStats(lr, 0.1, fit_of_lr(lr), 0.5))], midway, 40

    return run_probe


def _calibrate(run_probe, record, max_probes=6, steps=400, **kwargs):
    """`calibrate` from λ 0.1, chance 0, members of 400 steps by default (the
    decay's time constant does not bind); the fake probes report 40."""
    return calibrate(
        run_probe,
        lambda stats: relative_fit(stats, REF, chance=0.0),
        record,
        lambda msg: None,
        steps=steps,
        weight_decay=0.1,
        max_probes=max_probes,
        **kwargs,
    )


def nearest_stats(probe):
    """The stats `_fake_member` gives a probe that ran whole."""
    return MemberStats(probe.learning_rate, 0.1, probe.relative_fit, 0.5)


def _calibrate_fake(fit_of_lr, max_probes=6, midway_of_lr=None, late_of_lr=None):
    calls, record = [], []
    run_probe = _fake_member(fit_of_lr, calls, midway_of_lr, late_of_lr)
    lr, _, accepted = _calibrate(run_probe, record, max_probes)
    return lr, accepted or [], record, calls


def test_first_probe_in_window_is_kept_as_a_member():
    lr, accepted, record, calls = _calibrate_fake(lambda lr: 0.8)
    assert calls == [0.1] and lr == 0.1
    assert accepted == [(0, [("weights@0.1", MemberStats(0.1, 0.1, 0.8, 0.5))])]
    assert record[0].accepted is True and record[0].seconds >= 0.0


def test_search_goes_up_by_the_factor_then_bisects_in_log():
    """Fit 1.0 below lr 0.15 (memorising basin), 0.85 just above, 0.1 from 0.18
    (collapse): up by the grid factor past the window, then back in log."""

    def fit(lr):
        return 1.0 if lr < 0.15 else (0.85 if lr < 0.18 else 0.1)

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert 0.15 <= lr < 0.18 and len(accepted) == 1
    up = 0.1 * LR_FACTOR
    assert calls[:3] == [0.1, up, pytest.approx(math.sqrt(0.1 * up))]
    assert [r.accepted for r in record] == [False] * (len(record) - 1) + [True]


def test_members_keeping_a_quarter_of_the_fit_above_chance_are_accepted():
    """On hard tasks the data supports about a third of θ*'s fit above chance:
    a member keeping a quarter is accepted; one keeping a tenth is too close to chance."""
    lr, accepted, _, calls = _calibrate_fake(lambda lr: 0.25)
    assert calls == [0.1] and lr == 0.1 and len(accepted) == 1
    lr, _, _, calls = _calibrate_fake(lambda lr: 0.25 if lr < 0.09 else 0.1)
    assert calls == [0.1, 0.1 / LR_FACTOR] and lr == 0.1 / LR_FACTOR


def test_search_goes_down_when_the_first_probe_is_below_the_window():
    lr, _, _, calls = _calibrate_fake(lambda lr: 0.8 if lr < 0.09 else 0.1)
    assert calls == [0.1, 0.1 / LR_FACTOR] and lr == 0.1 / LR_FACTOR


def test_probe_still_above_the_window_halfway_is_abandoned():
    """Halfway above the window: recorded as abandoned (half the steps), not kept,
    and the step size goes up; halfway inside it, the probe runs on, to three
    quarters where it is above the window again, to its end where it is not."""

    def fit(lr):
        return 1.0 if lr < 0.15 else 0.8

    lr, accepted, record, calls = _calibrate_fake(fit)
    assert calls == [0.1, 0.1 * LR_FACTOR] and lr == 0.1 * LR_FACTOR and len(accepted) == 1
    assert record[0].abandoned is True and record[0].accepted is False
    assert record[0].steps == 20 and record[1].steps == 40
    inside = FIT_WINDOW[1] - 0.01
    _, _, record, _ = _calibrate_fake(fit, midway_of_lr=lambda lr: inside)
    assert record[0].abandoned is True and record[0].steps == 30
    assert record[0].relative_fit == 1.0 and record[0].midway_fit == inside
    _, _, record, _ = _calibrate_fake(
        fit, midway_of_lr=lambda lr: inside, late_of_lr=lambda lr: inside
    )
    assert record[0].abandoned is False and record[0].steps == 40 and record[0].relative_fit == 1.0


def test_probe_at_chance_halfway_is_abandoned_as_too_large_a_step():
    """Halfway at chance: the member collapsed; stopped there (half the steps),
    recorded at its halfway fit, and the step size goes down."""
    lr, accepted, record, calls = _calibrate_fake(
        lambda lr: 0.7 if lr < 0.15 else 0.3, midway_of_lr=lambda lr: 0.0 if lr > 0.05 else 0.6
    )
    assert calls == [0.1, 0.1 / LR_FACTOR] and lr == 0.1 / LR_FACTOR and len(accepted) == 1
    assert record[0].abandoned is True and record[0].relative_fit == 0.0
    assert record[0].steps == 20 and not record[0].accepted


def test_no_step_size_in_the_window_warns_and_takes_the_nearest_probe():
    def fit(lr):  # a cliff: from the basin straight to collapse
        return 0.95 if lr < 0.2 else 0.1

    with pytest.warns(UserWarning, match="found no learning rate") as caught:
        lr, accepted, record, _ = _calibrate_fake(fit, max_probes=4, midway_of_lr=lambda lr: 0.6)
    # 0.1 regained its fit in the tail; the decay at its ceiling (0.4) kept it too.
    assert accepted == [] and len(record) == 2 and record[-1].weight_decay == 0.4
    assert lr < 0.2  # 0.95 is nearer the window than a collapse at 0.1
    assert f"the closest, learning_rate={lr:.4g} with weight_decay=0.1" in str(caught[0].message)


@pytest.mark.parametrize("forget_by_decay", [False, True])
def test_a_probe_that_fits_more_than_theta_ends_the_search(forget_by_decay):
    """A θ* that had not finished training: its probe fits 1.5× θ*'s fit, more at
    every step size. No step size forgets what it memorised, so the search stops
    at the first probe's settings with a warning instead of climbing (λ 12.8 on
    an under-trained regression, before)."""
    with pytest.warns(UserWarning, match="θ\\* has not finished training") as caught:
        record, calls = [], []
        run_probe = _fake_member(lambda lr: 1.5, calls)
        lr, decay, accepted = _calibrate(run_probe, record, forget_by_decay=forget_by_decay)
    assert calls == [0.1] and (lr, decay) == (0.1, 0.1) and accepted == []
    assert record[0].abandoned and "stopped at learning_rate=0.1" in str(caught[0].message)


def test_a_trained_theta_fitting_a_little_more_is_searched_as_before():
    """Members of a trained θ* fit up to 1.04× its fit at small steps (the zoo's
    highest): above the window, not beyond θ*, so the search goes on."""
    lr, accepted, _, calls = _calibrate_fake(lambda lr: 1.04 if lr < 0.3 else 0.5)
    assert calls == [0.1, 0.2, 0.4] and lr == 0.4 and accepted


def test_a_diverged_probe_is_never_the_fallback():
    record = [Probe(0.4, 0.0, float("nan")), Probe(0.1, 0.99, 0.1)]
    assert step_size.closest_to_window(record).learning_rate == 0.1


def test_at_the_stability_edge_the_decay_is_raised_at_a_stable_step_size():
    """The fit jumps from above the window to chance (SGD's stability edge, a
    regression measured in the zoo): the search holds the largest step size
    that kept the fit and raises the weight decay until members forget."""
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        if lr > 0.12:  # diverges
            return [(None, MemberStats(lr, float("nan"), 0.0, float("nan"), False))], None, 40
        fit = 0.97 if weight_decay < 0.3 else (0.7 if weight_decay < 3 else 0.1)
        return [(f"w@{lr:.3g},{weight_decay:.3g}", MemberStats(lr, 0.1, fit, 0.5))], None, 40

    lr, decay, accepted = _calibrate(run_probe, record)
    assert calls[:3] == [(0.1, 0.1), (0.2, 0.1), (pytest.approx(0.1414, abs=1e-4), 0.1)]
    # 0.1 kept 97%, 0.2 and 0.141 diverged: the edge; λ goes up ×4 at lr 0.1.
    assert calls[3] == (0.1, pytest.approx(0.1 * LR_FACTOR**2))
    assert (lr, decay) == (0.1, pytest.approx(0.4)) and accepted is not None
    assert [p.weight_decay for p in record] == [0.1, 0.1, 0.1, pytest.approx(0.4)]
    assert record[-1].accepted


def test_a_probe_that_regains_the_fit_in_the_tail_turns_the_search_to_the_decay():
    """Inside the window halfway, above it at three quarters: the step size left
    θ*'s basin and the schedule's smaller late steps re-memorised; λ goes up ×4
    at that step size, with no probe spent on a larger one."""
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        if lr < 0.15:  # still in the basin halfway: abandoned there
            return [(None, MemberStats(lr, 0.2, 0.97, 0.3))], 0.97, 20
        if weight_decay < 0.2:  # above the window again at three quarters
            return [(None, MemberStats(lr, 0.2, 0.93, 0.3))], 0.8, 30
        return [(f"weights@{lr}", MemberStats(lr, 0.1, 0.7, 0.5))], 0.65, 40

    lr, decay, accepted = _calibrate(run_probe, record)
    assert calls == [(0.1, 0.1), (0.2, 0.1), (0.2, pytest.approx(0.1 * LR_FACTOR**2))]
    assert (lr, decay) == (0.2, pytest.approx(0.4)) and accepted is not None
    assert [p.accepted for p in record] == [False, False, True]
    assert [p.steps for p in record] == [20, 30, 40]


def test_a_probe_that_regained_its_fit_and_ran_whole_is_kept_as_a_member():
    """A probe inside the window at three quarters that ends just above it ran a
    whole member's steps: the member gate keeps members above the window, so it
    is kept as a member (after member 0, the accepted probe), not discarded;
    probes stopped early or below the floor are not."""
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        if lr < 0.15:  # still in the basin halfway: abandoned there
            return [(None, MemberStats(lr, 0.2, 0.97, 0.3))], 0.97, 20
        if weight_decay < 0.2:  # inside the window to three quarters, above it at the end
            return [(f"regained@{lr}", MemberStats(lr, 0.1, 0.93, 0.4))], 0.8, 40
        return [(f"weights@{lr}", MemberStats(lr, 0.1, 0.7, 0.5))], 0.65, 40

    lr, decay, kept = _calibrate(run_probe, record)
    assert calls == [(0.1, 0.1), (0.2, 0.1), (0.2, pytest.approx(0.4))]
    assert (lr, decay) == (0.2, pytest.approx(0.4))  # every other member's settings
    assert [index for index, _ in kept] == [2, 1]  # member 0 first
    assert [round_[0][0] for _, round_ in kept] == ["weights@0.2", "regained@0.2"]
    assert [p.accepted for p in record] == [False, True, True]
    assert budget.rejected_steps(record) == 20
    # A probe above the window whose fit was never read on the way (a round of
    # several replicas runs whole) may never have left θ*'s basin: not kept.
    unread = []

    def run_unread(lr, weight_decay, abandon):
        fit = 0.97 if lr < 0.15 else 0.7
        return [(f"w@{lr}", MemberStats(lr, 0.1, fit, 0.5))], None, 40

    _, _, kept = _calibrate(run_unread, unread)
    assert [index for index, _ in kept] == [1] and not unread[0].accepted


@pytest.mark.parametrize(
    "fit_at_lambda0, expected_calls",
    [
        # 0.1 collapses, 0.05 lands in the window at λ 0.1: a draw of the batch
        # order at the edge, not accepted; λ goes up ×4 there.
        (lambda lr: 0.0 if lr > 0.07 else 0.72, [(0.1, 0.1), (0.05, 0.1), (0.05, 0.4)]),
        # 0.1 keeps θ*'s fit: a stable step size at once.
        (lambda lr: 0.97, [(0.1, 0.1), (0.1, 0.4)]),
    ],
)
def test_a_regression_forgets_through_the_decay_at_a_stable_step_size(
    fit_at_lambda0, expected_calls
):
    """`forget_by_decay`: the step size halves until a probe keeps at least the
    window's floor, and only the decay is searched into the window from there."""
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, pytest.approx(weight_decay)))
        fit = fit_at_lambda0(lr) if weight_decay < 0.2 else 0.55
        return [(f"w@{lr:.3g},{weight_decay:.3g}", MemberStats(lr, 0.1, fit, 0.5))], None, 40

    lr, decay, accepted = _calibrate(run_probe, record, forget_by_decay=True)
    assert calls == expected_calls
    assert (lr, decay) == (expected_calls[-1][0], pytest.approx(0.4)) and accepted is not None
    assert [p.accepted for p in record] == [False] * (len(calls) - 1) + [True]


@pytest.mark.parametrize("steps, lr, expected", [(400, 0.1, 0.4), (50, 0.05, 0.8), (50, 0.1, 0.4)])
def test_the_decay_search_starts_at_one_time_constant_of_the_schedule(steps, lr, expected):
    """The first raised decay is ×4 the starting one and at least `2 / (lr · steps)`:
    over a cosine schedule (Σ lr_t ≈ lr · steps / 2) the decay then shrinks an
    unrestored weight by e⁻¹ or more. Fewer steps or a smaller step size ask more."""
    calls, record = [], []

    def run_probe(probe_lr, weight_decay, abandon):
        calls.append((probe_lr, weight_decay))
        fit = 0.97 if probe_lr > lr or weight_decay < 0.2 else 0.5
        fit = 0.0 if probe_lr > lr else fit  # collapses above `lr`
        return [(f"w@{probe_lr},{weight_decay}", MemberStats(probe_lr, 0.1, fit, 0.5))], None, 40

    _calibrate(run_probe, record, steps=steps, forget_by_decay=True)
    assert calls[-1] == (lr, pytest.approx(expected))
    assert record[-1].accepted


def test_where_no_probe_lands_in_the_window_the_nearest_whole_one_is_member_0():
    """Every probe replays member 0's batches, so the nearest probe, where it ran
    its whole schedule, is the member 0 of the settings every member then uses;
    it is kept (no step spent again), and the record still shows the miss."""
    from keras_gex.analysis.report import calibration_miss
    from keras_gex.config import CollectionRecord

    calls, record = [], []
    # Inside the window halfway and at three quarters, above it at the end, at
    # every setting: each probe runs whole and none is accepted.
    run_probe = _fake_member(lambda lr: 0.95, calls, lambda lr: 0.6, lambda lr: 0.6)
    with pytest.warns(UserWarning, match="found no learning rate"):
        lr, decay, accepted = _calibrate(run_probe, record)
    nearest = step_size.closest_to_window(record)
    assert nearest.relative_fit > FIT_WINDOW[1] and nearest.accepted
    # Member 0 first; every other probe ran whole above the floor and is kept too.
    assert accepted[0][1] == [(f"weights@{nearest.learning_rate:.4g}", nearest_stats(nearest))]
    assert sorted(i for i, _ in accepted) == list(range(len(record)))
    assert all(p.accepted for p in record)
    assert (lr, decay) == (nearest.learning_rate, nearest.weight_decay)
    summary = CollectionRecord.from_dict(
        {"learning_rate_requested": "auto", "fit_window": FIT_WINDOW, "weight_decay": 0.1}
    )
    summary.calibration = record
    assert "no step size put members in the fit window" in calibration_miss(summary)


def test_a_classifier_decay_search_raises_the_decay_once_at_most():
    """Above `LR_FACTOR`² × the starting decay a classifier's members fit what the
    penalty allows, not what the data supports: the search stops at that ceiling
    where a probe there still keeps more than the window, and says so. (A
    regression forgets through the decay and is searched past it.)"""
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        fit = 0.0 if lr > 0.15 else (0.5 if weight_decay > 1.0 else 0.95)
        return [(f"w@{lr:.3g},{weight_decay:.3g}", MemberStats(lr, 0.1, fit, 0.5))], None, 40

    with pytest.warns(UserWarning, match=r"The decay at its ceiling \(0.4\) still kept more"):
        lr, decay, kept = _calibrate(run_probe, record)
    assert max(wd for _, wd in calls) == pytest.approx(0.4)
    assert calls[-1] == (pytest.approx(0.1414, abs=1e-4), pytest.approx(0.4))  # the edge
    # Every probe kept 95%: the first, nearest of equals and run whole, is member 0.
    assert (lr, decay) == (0.1, 0.1) and record[0].accepted and kept
    calls.clear()
    _calibrate(run_probe, [], forget_by_decay=True)  # a regression: λ 1.6 lands
    assert calls[-1] == (0.1, pytest.approx(1.6))


def _shrink_bound_member(calls, edge=1.0, rises_from=0.7):
    """A `run_probe` whose members forget by shrinking at λ 0.1 (their fit falls in
    the tail below lr `rises_from`), and whose fit rises with the step size at the
    same shrink `lr·λ` up to the stability edge at lr `edge`, where they collapse."""

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        if lr < 0.15:  # still in the basin halfway: abandoned there
            return [(None, MemberStats(lr, 0.2, 0.96, 0.3))], 0.96, 20
        if lr > edge:  # collapsed: below the probe it steps up from at once
            fit = 0.0
            if abandon(fit):
                return [(None, MemberStats(lr, 0.2, fit, 0.3))], fit, 20
        end = min(0.5 + 0.1 * math.log2(lr / 0.2), 0.88)
        midway = end + 0.07 if lr < rises_from else end - 0.02  # falls in the tail below it
        if abandon(midway):
            return [(None, MemberStats(lr, 0.2, midway, 0.3))], midway, 20
        return [(f"weights@{lr:.4g}", MemberStats(lr, 0.1, end, 0.5))], midway, 40

    return run_probe


def test_members_that_forget_by_shrinking_take_larger_steps_at_the_same_shrink():
    """The accepted probe's fit fell in its tail: lr ×4 at λ ÷4 while the fit
    rises; the step up whose fit came back in its tail is the last tried. The
    probe it replaced ran whole inside the window: a member after member 0, at
    its own settings, and none of the budget's rejected steps."""
    calls, record = [], []
    lr, decay, kept = _calibrate(_shrink_bound_member(calls), record)
    assert calls == [(0.1, 0.1), (0.2, 0.1), (0.8, pytest.approx(0.025))]
    assert (lr, decay) == (0.8, pytest.approx(0.025))
    assert [index for index, _ in kept] == [2, 1]
    assert [round_[0][0] for _, round_ in kept] == ["weights@0.8", "weights@0.2"]
    assert [p.accepted for p in record] == [False, True, True]
    assert budget.rejected_steps(record) == 20  # only the probe stopped halfway


def test_the_step_up_repeats_while_the_probe_taken_still_falls_in_its_tail():
    calls, record = [], []
    lr, decay, kept = _calibrate(_shrink_bound_member(calls, edge=4.0, rises_from=1.0), record)
    assert calls == [
        (0.1, 0.1), (0.2, 0.1), (0.8, pytest.approx(0.025)), (3.2, pytest.approx(0.00625))
    ]  # fmt: skip
    assert (lr, decay) == (3.2, pytest.approx(0.00625))
    assert [index for index, _ in kept] == [3, 1, 2]  # the replaced, in the order they ran
    assert [p.accepted for p in record] == [False, True, True, True]
    assert budget.rejected_steps(record) == 20


def test_a_step_up_that_keeps_less_is_stopped_and_not_taken():
    """At the stability edge the larger step collapses: abandoned at its first
    checkpoint, the accepted probe stays member 0."""
    calls, record = [], []
    lr, decay, kept = _calibrate(_shrink_bound_member(calls, edge=0.3), record)
    assert calls == [(0.1, 0.1), (0.2, 0.1), (0.8, pytest.approx(0.025))]
    assert (lr, decay) == (0.2, 0.1) and [index for index, _ in kept] == [1]
    assert record[-1].abandoned and record[-1].steps == 20
    assert [p.accepted for p in record] == [False, True, False]


def test_no_step_up_where_the_fit_came_back_in_the_tail_or_for_a_regression():
    # Accepted at once, its fit rose from 0.7 halfway to 0.8: no step up.
    lr, _, _, calls = _calibrate_fake(lambda lr: 0.8, midway_of_lr=lambda lr: 0.7)
    assert calls == [0.1] and lr == 0.1
    assert not step_size.shrink_bound(0.8, 0.8)  # unchanged: not a fall
    # A regression forgets through the decay by design: never stepped up.
    calls, record = [], []

    def run_probe(lr, weight_decay, abandon):
        calls.append((lr, weight_decay))
        fit = 0.95 if weight_decay < 0.2 else 0.6
        return [(f"w@{lr}", MemberStats(lr, 0.1, fit, 0.5))], fit + 0.1, 40

    _calibrate(run_probe, record, forget_by_decay=True)
    assert calls == [(0.1, 0.1), (0.1, pytest.approx(0.4))]


def test_a_nearest_probe_stopped_early_is_not_member_0():
    calls, record = [], []
    run_probe = _fake_member(lambda lr: 0.95, calls)  # above the window halfway: stopped
    with pytest.warns(UserWarning, match="found no learning rate"):
        _, _, accepted = _calibrate(run_probe, record)
    assert accepted == [] and not any(p.accepted for p in record)


@pytest.mark.slow
def test_an_early_stopped_model_is_not_pushed_off_what_the_data_supports():
    """A digits MLP stopped after 30 epochs (where early stopping on a validation
    split stops it) fits its clean rows and none of its flipped labels: nothing is
    memorised. Its probe at lr 0.8 regains its fit in the tail; before the
    decay's ceiling the search went on to λ 1.6, members fit a third of θ*'s fit
    and ranked the flips at AUC 0.870 against θ*'s loss at 0.999, flagging 617
    rows for 180 flips (docs/design.md#the-decays-ceiling)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    given, noisy = keras_gex.datasets.flip_labels(y, 0.1, 10, seed=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, given, epochs=30, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # θ* fits 89%: warned; the window is missed: warned
        report = keras_gex.detect_noisy((x, given), model, seed=0, verbose=0)
    assert max(p.weight_decay for p in report.record.calibration) <= 0.4 + 1e-9
    theta_auc = roc_auc_score(noisy, report.reference_losses)
    assert theta_auc > 0.99  # θ* fitted none of the flips
    assert roc_auc_score(noisy, report.scores) >= theta_auc - 0.005
    assert report.num_flagged < 2 * noisy.sum()


def test_a_collapse_is_run_again_at_the_same_step_size_until_collapses_outnumber():
    """Near the stability edge a collapse is a draw of the batch order: the step
    size drops only once collapses outnumber kept members or come twice in a row."""
    gate = step_size.MemberGate(adaptive=True, stacklevel=1, log=lambda msg: None)
    kept, collapsed = MemberStats(0.2, 0.1, 0.8, 0.5), MemberStats(0.2, 0.1, 0.1, 2.3)
    assert gate.abandon() is step_size.at_chance
    assert gate.reject(kept, 0.6, 0.2, 0, "it") is None
    assert gate.reject(collapsed, 0.0, 0.2, 1, "it") == 0.2  # one each: same step size
    assert gate.reject(kept, 0.6, 0.2, 1, "it") is None
    assert gate.reject(collapsed, 0.0, 0.2, 2, "it") == 0.2  # two collapsed, two kept
    lowered = gate.reject(collapsed, 0.0, 0.2, 2, "it")  # twice in a row
    assert lowered == pytest.approx(0.2 / math.sqrt(LR_FACTOR))
    # At the new step size nothing is kept yet: the first collapse lowers it again.
    assert gate.reject(collapsed, 0.0, lowered, 2, "it") == pytest.approx(0.1)
    assert gate.counts() == {"collapsed": 4, "diverged": 0}
    fixed = step_size.MemberGate(adaptive=False, stacklevel=1, log=lambda msg: None)
    assert fixed.abandon() is None and fixed.reject(collapsed, 0.0, 0.2, 0, "it") is None


def test_relative_fit_is_measured_from_chance():
    """A binary member that answers the majority class "fits" its share of the
    rows: relative to chance it knows nothing."""
    ref = MemberStats(0.0, 0.0, 1.0, 0.0)
    labels = np.array([0] * 60 + [1] * 40)
    chance = step_size.chance_fit(labels)
    assert chance == 0.6
    one_class = MemberStats(0.1, 0.7, 0.6, 0.7)
    assert relative_fit(one_class, ref, chance) == 0.0
    assert relative_fit(MemberStats(0.1, 0.1, 0.8, 0.3), ref, chance) == pytest.approx(0.5)
    assert relative_fit(MemberStats(0.1, 0.1, 0.8, float("nan"), finite=False), ref, 0.6) == 0


def test_sgd_update_equals_keras_sgd_with_decoupled_weight_decay():
    """Two routes agree: our traced update and `keras.optimizers.SGD`."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2)).astype("float32")
    grads = [rng.normal(size=(3, 2)).astype("float32") for _ in range(3)]
    ours, velocity = tf.Variable(w0), [tf.Variable(tf.zeros_like(w0))]
    keras_var = keras.Variable(w0)
    optimizer = keras.optimizers.SGD(learning_rate=0.3, momentum=0.9, weight_decay=0.1)
    for g in grads:
        sgd_update([ours], [tf.constant(g)], velocity, 0.9, tf.constant(0.3), 0.1)
        optimizer.apply_gradients([(tf.constant(g), keras_var)])
    np.testing.assert_allclose(ours.numpy(), keras_var.numpy(), rtol=1e-6, atol=1e-6)


def test_sgd_update_applies_weight_constraints_as_keras_sgd_does():
    """Two routes agree: a constrained weight under our update and under
    `keras.optimizers.SGD`, which applies `variable.constraint` after each step."""
    rng = np.random.default_rng(2)
    w0 = np.abs(rng.normal(size=(4, 3))).astype("float32")
    grads = [rng.normal(size=(4, 3)).astype("float32") * 3 for _ in range(4)]
    for constraint in (keras.constraints.NonNeg(), keras.constraints.MaxNorm(1.0)):
        ours, velocity = tf.Variable(w0), [tf.Variable(tf.zeros_like(w0))]
        keras_var = keras.Variable(w0)
        keras_var.constraint = constraint
        optimizer = keras.optimizers.SGD(learning_rate=0.3, momentum=0.9, weight_decay=0.1)
        for g in grads:
            sgd_update([ours], [tf.constant(g)], velocity, 0.9, tf.constant(0.3), 0.1, [constraint])
            optimizer.apply_gradients([(tf.constant(g), keras_var)])
        np.testing.assert_allclose(ours.numpy(), keras_var.numpy(), rtol=1e-6, atol=1e-6)
    unconstrained = tf.Variable(w0)
    velocity = [tf.Variable(tf.zeros_like(w0))]
    for g in grads:
        sgd_update([unconstrained], [tf.constant(g)], velocity, 0.9, tf.constant(0.3), 0.1)
    assert unconstrained.numpy().min() < 0  # the steps above do leave the constraint


def test_sgd_update_takes_an_embedding_sparse_gradient_as_its_dense_equal():
    """An `IndexedSlices` gradient (an Embedding's) moves the weights exactly as
    the same gradient given dense; rows it does not touch still decay and keep
    their momentum."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(6, 3)).astype("float32")
    values = rng.normal(size=(4, 3)).astype("float32")
    rows = np.array([0, 2, 2, 5])
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([6, 3]))
    dense = tf.convert_to_tensor(sparse)
    results = []
    for grad in (sparse, dense):
        var, velocity = tf.Variable(w0), [tf.Variable(tf.ones_like(w0))]
        for _ in range(2):
            sgd_update([var], [grad], velocity, 0.9, tf.constant(0.3), 0.1)
        results.append((var.numpy(), velocity[0].numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    untouched = [1, 3, 4]
    assert not np.allclose(results[0][0][untouched], w0[untouched])


def test_auto_picks_a_sane_step_size_where_a_fixed_one_fails(trained_mlp, digits_ensemble, digits):
    """The memorising digits MLP of conftest: a small fixed step never leaves
    θ*'s basin (members keep fitting every given label); "auto" (the session's
    `digits_ensemble`, collected with the default settings) lands every member
    in the window."""
    data = (digits.x_train, digits.y_train)
    fixed = keras_gex.GeometricEnsemble.collect(
        trained_mlp,
        data,
        num_members=2,
        steps=100,
        learning_rate=0.01,
        weight_decay=0.0,
        seed=0,
        verbose=0,
    )
    auto = digits_ensemble  # num_members=4, steps=100, seed=0, learning_rate="auto"
    record = auto.record
    assert record.reference_stats.fit > 0.98  # θ* memorised its noisy labels
    assert record.weight_decay == step_size.WEIGHT_DECAY
    assert 0.05 < record.chance_fit < 0.2  # ten digits, the most common one's share
    probes = record.calibration
    assert probes[-1].accepted and all(p.seconds >= 0 for p in probes)
    assert FIT_WINDOW[0] <= probes[-1].relative_fit <= FIT_WINDOW[1]
    used = [s.learning_rate for s in record.member_stats]
    # Members share the accepted step size; one run again (below the window,
    # near the edge of stability) passes a smaller one on.
    accepted = probes[-1].learning_rate
    assert used[0] == accepted and all(u <= accepted for u in used)
    assert len(set(used)) <= 1 + sum(record.redone_members.values())
    assert record.learning_rate == float(np.median(used))
    ref, chance = record.reference_stats, record.chance_fit
    fits = [relative_fit(s, ref, chance) for s in record.member_stats]
    assert min(fits) >= FIT_WINDOW[0] and max(fits) < 1.0
    assert min(relative_fit(s, ref, chance) for s in fixed.record.member_stats) > FIT_WINDOW[1]
    auc_auto = roc_auc_score(digits.is_noisy, auto.self_influence(data, verbose=0))
    auc_fixed = roc_auc_score(digits.is_noisy, fixed.self_influence(data, verbose=0))
    assert auc_auto > 0.97 and auc_auto > auc_fixed + 0.03
    # Every probe ran whole or (abandoned) half of the steps; the summary lists them.
    assert all(p.steps == (50 if p.abandoned else 100) for p in probes)
    summary = keras_gex.detect_noisy(data, auto, verbose=0).summary(print_fn=None)
    assert "calibration probes (lr → share of θ*'s fit above chance kept): " in summary
    assert "(kept)" in summary and "weight decay 0.1" in summary


def test_sigmoid_members_are_judged_on_whole_examples():
    """With one-hot targets a member that says "no" to every label agrees on
    9 of 10 outputs; calibration must read that as no fit at all."""
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
    # Chance is the share of the most common whole label row.
    assert step_size.chance_fit(loss.label_classes(np.eye(10)[[0, 0, 3, 5]])) == 0.5


@pytest.fixture(scope="module")
def small_trained_mlp(digits):
    """300 digits rows and an MLP fit to them for 30 epochs (no collection yet).

    Shared: collection leaves the model and its optimizer untouched
    (test_collect.py::test_collection_leaves_model_and_optimizer_untouched)."""
    x, y = digits.x_train[:300], digits.y_train[:300]
    model = make_mlp(seed=0)
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    return x, y, model


def test_members_below_the_window_are_run_again_smaller(small_trained_mlp, monkeypatch):
    """A calibrated step size that wrecks every member: each is run again
    √LR_FACTOR × smaller until it lands, and `record` / the summary count them."""

    def fake_calibrate(run_probe, rel_of, record, *args, **kwargs):
        record.append(Probe(3.0, 0.8, 1.0, accepted=True))
        return 3.0, kwargs["weight_decay"], None

    monkeypatch.setattr(step_size, "calibrate", fake_calibrate)
    x, y, model = small_trained_mlp
    kwargs = dict(num_members=2, steps=20, batch_size=32, seed=0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    redone = ens.record.redone_members
    assert redone["collapsed"] + redone["diverged"] >= 1
    rates = [s.learning_rate for s in ens.record.member_stats]
    assert max(rates) < 3.0
    summary = keras_gex.detect_noisy((x, y), ens, verbose=0).summary(print_fn=None)
    assert "members run again: " in summary and "on another batch order" in summary


def test_probes_kept_by_calibration_are_the_first_members(small_trained_mlp, monkeypatch):
    """The rounds `calibrate` keeps are the ensemble's first members, each with the
    decay it ran at; beyond the members asked for a kept probe is not a member
    and its steps count as rejected."""
    rounds = {}

    def fake_calibrate(run_probe, rel_of, record, log, *, steps, weight_decay, **kwargs):
        for decay in (0.1, 0.4):  # a probe above the window, then the accepted one
            rounds[decay], _, run = run_probe(0.05, decay, lambda rel: False)
            record.append(Probe(0.05, 0.8, 1.0, accepted=True, steps=run, weight_decay=decay))
        return 0.05, 0.4, [(1, rounds[0.4]), (0, rounds[0.1])]

    monkeypatch.setattr(step_size, "calibrate", fake_calibrate)
    x, y, model = small_trained_mlp
    kwargs = dict(steps=20, batch_size=32, seed=0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = keras_gex.GeometricEnsemble.collect(model, (x, y), num_members=3, **kwargs)
    for member, decay in zip(ens.members, (0.4, 0.1)):
        for a, b in zip(member.trainable, rounds[decay][0][0].trainable):
            np.testing.assert_array_equal(a, b)
    assert ens.members[0].distance(ens.members[1]) > 0
    decays = [s.weight_decay for s in ens.record.member_stats]
    assert decays == [0.4, 0.1, 0.4] and ens.record.weight_decay == 0.4
    assert all(p.accepted for p in ens.record.calibration)
    summary = keras_gex.detect_noisy((x, y), ens, verbose=0).summary(print_fn=None)
    assert "weight decay 0.4 (members 0.1-0.4: probes kept at their own)" in summary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = keras_gex.GeometricEnsemble.collect(model, (x, y), num_members=1, **kwargs)
    assert one.num_members == 1 and one.record.member_stats[0].weight_decay == 0.4
    assert [p.accepted for p in one.record.calibration] == [False, True]
    assert budget.rejected_steps(one.record.calibration) == 20


def test_a_member_run_again_draws_another_batch_order(small_trained_mlp, monkeypatch):
    """A member rejected once and run at the same step size is another member;
    the members before and after it are those of a collection with no rerun."""
    x, y, model = small_trained_mlp
    kwargs = dict(num_members=3, steps=20, batch_size=32, learning_rate=0.05, seed=0, verbose=0)
    plain = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    reject = step_size.MemberGate.reject
    calls = []

    def reject_member_1_once(self, member_stats, rel, lr, index, what):
        calls.append(index)
        if calls.count(1) == 1 and index == 1:
            self.redone["collapsed"] += 1
            return lr
        return reject(self, member_stats, rel, lr, index, what)

    monkeypatch.setattr(step_size.MemberGate, "reject", reject_member_1_once)
    rerun = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    assert rerun.record.redone_members["collapsed"] == 1
    for i in (0, 2):
        for a, b in zip(plain.members[i].trainable, rerun.members[i].trainable):
            np.testing.assert_array_equal(a, b)
    differs = [
        not np.array_equal(a, b)
        for a, b in zip(plain.members[1].trainable, rerun.members[1].trainable)
    ]
    assert all(differs)


@pytest.mark.slow
def test_regression_calibrates_on_the_share_of_loss_explained():
    """Squared error: the fit is the share of the loss of predicting the mean
    that a model explains (R²), chance 0; the same search lands members in
    the window. (With 10% of the targets corrupted: members forget them. On
    clean targets the fit stays whole up to divergence: nothing to forget.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype("float32")
    y = x @ rng.normal(size=8) + 0.1 * rng.normal(size=400)
    wrong = rng.random(400) < 0.1
    y = np.where(wrong, y + rng.choice([-3.0, 3.0], 400) * y.std(), y).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    model.fit(x, y, epochs=60, batch_size=32, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot calibrate" warning
        ens = keras_gex.GeometricEnsemble.collect(
            model, (x, y), num_members=2, steps=60, seed=0, verbose=0
        )
    record = ens.record
    assert record.chance_fit == 0.0 and record.reference_stats.fit > 0.5
    mse = float(np.mean((model.predict(x, verbose=0)[:, 0] - y) ** 2))
    r2 = 1 - mse / float(np.var(y))
    assert record.reference_stats.fit == pytest.approx(r2, abs=5e-3)  # on 3 batches of 128 rows
    assert record.calibration and record.calibration[-1].accepted
    fits = [relative_fit(s, record.reference_stats, 0.0) for s in record.member_stats]
    assert all(FIT_WINDOW[0] <= f <= 1.0 for f in fits)
    # Members forget through the decay: the accepted probe raised it, and the
    # summary says why a probe in the window at the first decay was not kept.
    assert record.weight_decay > step_size.WEIGHT_DECAY
    summary = keras_gex.detect_noisy((x, y), ens, verbose=0).summary(None)
    assert "the step size probed for stability, the decay for the window" in summary


@pytest.mark.parametrize(
    "loss, exact",
    [("mse", True), ("mae", True), (keras.losses.Huber(), True), ("poisson", False)],
)
def test_non_classification_losses_are_measured_above_the_targets_own_loss(loss, exact):
    """A regression loss is read as a unit deviance, `loss(y, ŷ) − loss(y, y)`: a
    distance unchanged to the bit, Poisson's `ŷ − y log ŷ` shifted per row."""
    rng = np.random.default_rng(0)
    y = tf.constant(rng.poisson(3.0, size=(16, 1)).astype("float32"))
    pred = tf.constant(rng.uniform(0.5, 6.0, size=(16, 1)).astype("float32"))
    per_example = keras_gex.losses.resolve_loss(
        make_mlp(hidden=4, num_classes=1, input_dim=2, loss=loss)
    )
    raw = keras.losses.get(loss) if isinstance(loss, str) else loss
    raw = np.asarray(raw.fn(y, pred) if hasattr(raw, "fn") else raw(y, pred))
    got = np.asarray(per_example(y, pred))
    if exact:
        np.testing.assert_array_equal(got, raw)
    else:
        at_targets = np.asarray(keras.losses.poisson(y, y))
        np.testing.assert_allclose(got, raw - at_targets, rtol=1e-6, atol=1e-6)
        assert np.all(got >= -1e-6) and np.any(raw < 0)  # a deviance: never below 0


@pytest.mark.parametrize(
    "loss, labels", [("hinge", 1), (keras.losses.SquaredHinge(), 1), ("categorical_hinge", 2)]
)
def test_a_margin_loss_is_measured_as_it_is(loss, labels):
    """A hinge is 0 at any margin of at least 1 and reads labels 0 / 1 as −1 / 1:
    `hinge(0, 0)` is 1, so the labels are not its minimum and nothing is taken off
    (before: every label-0 row scored 1 lower)."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 2, 16)
    y = classes[:, None] if labels == 1 else np.eye(2)[classes]
    y = tf.constant(y.astype("float32"))
    pred = tf.constant(rng.uniform(-2.0, 2.0, size=(16, labels)).astype("float32"))
    per_example = keras_gex.losses.resolve_loss(
        make_mlp(hidden=4, num_classes=labels, input_dim=2, loss=loss)
    )
    raw = keras.losses.get(loss) if isinstance(loss, str) else loss.fn
    np.testing.assert_array_equal(np.asarray(per_example(y, pred)), np.asarray(raw(y, pred)))


@pytest.mark.slow
def test_a_hinge_model_flags_the_wrong_labels_of_both_classes():
    """One raw-score output trained with the hinge on 0 / 1 labels, 10% flipped
    (before: the labels' own hinge, 1 on every label-0 row, was taken off every
    label-0 score, and this test ranked at AUC 0.89)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype("float32")
    wrong = np.random.default_rng(0).random(len(x)) < 0.1
    y = np.where(wrong, 1 - data.target, data.target).astype("float32")[:, None]
    model = make_mlp(hidden=128, num_classes=1, input_dim=30, loss="hinge")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="hinge")
    model.fit(x, y, epochs=200, batch_size=32, verbose=0)
    report = keras_gex.detect_noisy((x, y), model, seed=0, verbose=0)
    assert roc_auc_score(wrong, report.scores) > 0.9
    assert report.noisy_mask.sum() <= 2 * wrong.sum()
    label_0 = y[:, 0] == 0
    assert (report.noisy_mask & wrong & label_0).sum() >= 0.5 * (wrong & label_0).sum()


@pytest.mark.slow
def test_poisson_regression_ranks_corrupted_counts_by_their_deviance():
    """Poisson's loss is lowest at ŷ = y with a value that falls as y grows, so
    its raw value ranked the inflated counts last (AUC 0.07) and found no
    baseline to calibrate on; as a deviance both work (measured 0.99)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype("float32")
    rate = np.exp(0.4 * x @ rng.normal(size=8) + 1.0)
    y = rng.poisson(rate).astype("float32")
    wrong = rng.random(400) < 0.1
    y[wrong] = rng.poisson(rate[wrong] * 4 + 5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(1, activation="softplus"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="poisson")
    model.fit(x, y, epochs=150, batch_size=32, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no "cannot calibrate" warning
        report = keras_gex.detect_noisy((x, y), model, num_members=2, seed=0, verbose=0)
    assert report.ensemble.record.calibration[-1].accepted
    assert roc_auc_score(wrong, report.scores) > 0.95
    assert 0 < report.num_flagged <= 2 * wrong.sum()


@pytest.mark.slow
def test_regression_in_raw_units_is_fine_tuned_in_units_of_the_null_loss():
    """Targets in raw units (×100, +300: a price, a count) make squared error 10⁴
    times larger; SGD at any step size calibration tries diverged ("diverged
    repeatedly", or AUC 0.50 after six runs redone). In units of the null
    model's loss the same search lands (measured AUC 1.000)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype("float32")
    signal = x @ rng.normal(size=8) + 0.3 * rng.normal(size=400)
    wrong = rng.random(400) < 0.1
    signal[wrong] += rng.choice([-3.0, 3.0], wrong.sum()) * signal.std()
    y = (100 * signal + 300).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    model.fit(x, y, epochs=100, batch_size=32, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence, no missed window
        report = keras_gex.detect_noisy((x, y), model, num_members=2, seed=0, verbose=0)
    assert not any(report.ensemble.record.redone_members.values())
    assert roc_auc_score(wrong, report.scores) > 0.95


def test_a_loss_without_a_constant_baseline_keeps_a_fixed_step_size(small_trained_mlp):
    """A custom loss that cannot score the mean target: no fit to judge, so the
    fixed step size is used, with a warning that says why."""
    x, y, model = small_trained_mlp

    def odd_loss(y_true, y_pred):  # labels 10-19, no class of the (B, 10) outputs: not read
        y_true = tf.cast(tf.reshape(y_true, [-1]), tf.int32) - 10  # as a classifier's
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y_true, y_pred)

    with pytest.warns(
        UserWarning, match="cannot calibrate the step size: the loss 'odd_loss' cannot score"
    ):
        ens = keras_gex.GeometricEnsemble.collect(
            model, (x, y + 10), loss=odd_loss, num_members=1, steps=20, seed=0, verbose=0
        )
    assert ens.loss.kind == "other"
    assert ens.record.learning_rate == step_size.INITIAL_LR and not ens.record.calibration
    summary = keras_gex.detect_noisy((x, y + 10), ens, verbose=0).summary(print_fn=None)
    assert "(fixed: the loss cannot score a constant prediction of the mean target)" in summary


def test_an_unfinished_theta_is_said_so_not_searched(digits):
    """θ* after two epochs of plain SGD predicts a fraction of its labels, and
    members at lr 0.1 go on training it: one probe, every member at its settings,
    and the report says θ* had not finished training, not that members "barely
    left θ*", missed the window or that θ* did not memorise."""
    model = make_mlp(seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=64, verbose=0)
    data = (digits.x_train, digits.y_train)
    with pytest.warns(UserWarning, match="has not finished training"):
        report = keras_gex.detect_noisy(data, model, num_members=2, seed=0, verbose=0)
    record = report.ensemble.record
    assert len(record.calibration) == 1 and record.learning_rate == step_size.INITIAL_LR
    assert record.calibration[0].relative_fit > 1.5
    diagnostics = report.diagnostics()
    assert diagnostics[0].startswith("θ* has not finished training: its members")
    assert "Train the model until its training loss stops falling" in diagnostics[0]
    said = ("barely left", "fit window", "predicts only", "landed far apart")
    assert not any(words in text for text in diagnostics for words in said)


def test_a_missed_window_is_explained_with_what_to_do():
    """The report says why calibration missed the window and which setting helps."""
    from keras_gex.analysis.report import calibration_miss
    from keras_gex.config import CollectionRecord

    def fit(lr):  # a cliff: the basin, then divergence
        return 0.97 if lr < 0.15 else 0.0

    with pytest.warns(UserWarning, match="found no learning rate"):
        _, _, probes, _ = _calibrate_fake(fit, max_probes=4, midway_of_lr=lambda lr: 0.6)
    probes[-1].loss = float("nan")  # the last probe diverged
    record = CollectionRecord.from_dict(
        {"learning_rate_requested": "auto", "fit_window": FIT_WINDOW, "weight_decay": 0.1}
    )
    record.calibration = probes
    text = calibration_miss(record)
    # The decay search at lr 0.1 diverged: the two decays are named, not lr 0.1 twice.
    assert "at lr 0.1 they kept 97% with weight decay 0.1 and diverged with 0.4" in text
    assert "between the two decays" in text and "`weight_decay` in between" in text
    record.calibration = [Probe(0.1, 0.97, 1.0), Probe(0.2, 0.0, float("nan"))]
    text = calibration_miss(record)  # the step-size search alone
    assert "kept 97% at lr 0.1 and diverged at 0.2" in text and "larger `weight_decay`" in text
    assert "(20%-90% of θ*'s fit above chance)" in text
    record.chance_fit = 0.0  # a regression: a share of the loss θ* explains
    assert "(20%-90% of θ*'s loss explained)" in calibration_miss(record)
    record.chance_fit = None
    assert calibration_miss(CollectionRecord.from_dict({"learning_rate_requested": 0.1})) is None
    below = [Probe(0.1, 0.2, 1.0), Probe(0.05, 0.3, 1.0)]
    record.calibration = below
    assert "Pass a smaller `learning_rate`" in calibration_miss(record)
    # The nearest probe kept as member 0 outside the window is still a miss.
    record.calibration = [Probe(0.1, 0.97, 1.0), Probe(0.2, 0.93, 1.0, accepted=True)]
    assert "even lr 0.2 kept 93%" in calibration_miss(record)
    record.calibration = [Probe(0.1, 0.97, 1.0), Probe(0.2, 0.7, 1.0, accepted=True)]
    assert calibration_miss(record) is None
