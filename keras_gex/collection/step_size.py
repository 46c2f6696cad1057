"""The member rule: how every member is fine-tuned, and which members count.

Members must forget what only memorisation holds, keep what the data
supports, and never sit at chance. Two mechanisms, one signal:

* **Decoupled weight decay** (`WEIGHT_DECAY`) in every member's SGD: each step
  shrinks the weights by `lr × λ` and the data's gradient restores what the
  data as a whole supports, so what only a few examples hold fades. Without
  it, members kept θ*'s memorised labels up to a step size where they
  collapsed (a cliff); with it the fit falls smoothly with the step size.
* **Chance-corrected relative fit** (`relative_fit`), the signal: a member's
  fit above chance as a share of θ*'s, `(fit − chance) / (fit* − chance)`.
  Classification: the fit is the share of given labels predicted, chance the
  share of the most common label (a binary member that answers one class
  "fits" that much and scores 0). Other losses: the fit is the share of the
  loss of predicting the mean target that a member explains (R² for squared
  error), chance 0. 1 keeps θ*'s whole fit, 0 knows nothing.
* **Calibration** (`learning_rate="auto"`): a geometric search from
  `INITIAL_LR` by `LR_FACTOR`, then bisection in log, for a step size whose
  member lands in `FIT_WINDOW`, at most `MAX_PROBES` probes. Where the fit
  jumps from above the window to chance (SGD's stability edge), or a probe
  inside the window halfway ends above it, the search holds the largest stable
  step size and raises the decay instead, for a classifier once at most (to
  `LR_FACTOR`² × the starting decay); a regression is always searched so
  (its members forget through the decay at a stable step size). Every
  probe is a full member, stopped halfway or at three quarters if it is
  above the window or at chance there; the accepted one (or, where none lands
  in the window, the nearest if it ran whole) is member 0 and every member uses
  its step size and decay. A probe that ran whole and that the member gate
  would keep (not below the window) is a finished member, kept as one at its
  own settings, not run for nothing: one whose fit was regained in the tail
  (above the window only at its end), and one a step up replaced. Where
  the accepted probe's fit still fell in the schedule's last, smallest steps
  (`shrink_bound`), its members forget by being shrunk, not moved: calibration
  tries `LR_FACTOR`² × its step size at 1/`LR_FACTOR`² its decay (the same
  shrink per step) and takes it while the fit rises and stays in the window,
  so members take the larger steps that keep what the data supports (a
  shrink-bound member is far below SGD's stability edge, so the step up
  strides as the decay search does; one that overshoots is stopped halfway). A
  probe that fits θ*'s data better than θ* does (`beyond_theta`) ends the
  search at its settings: θ* had not finished training. A member that
  diverged is run again `LR_FACTOR` × smaller; one that fell below the window
  is run again on another batch order, and the step size drops
  √`LR_FACTOR` × only once more members collapsed at it than kept it; at most
  `MAX_PROBES` runs again.

The measurements behind each constant are in docs/design.md#member-rule.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np

from keras_gex.config import MemberStats, Probe

# -- The tuned constants, each with its reason (docs/design.md#member-rule) -------
#: Decoupled weight decay λ of the members' SGD: forgetting that grows smoothly
#: with the step size (0.01 left bag-of-words and binary members memorising).
WEIGHT_DECAY = 0.1
#: Chance-corrected relative fit calibration accepts: above, members still sit
#: in θ*'s basin and see no deviation on memorised rows; the floor keeps them off
#: chance yet below the share the data supports on hard tasks (about a third).
FIT_WINDOW = (0.2, 0.9)
#: First probe, and the grid factor between probes until bracketed (also the
#: cut for a member that diverged): from above the window to collapse often
#: takes less than ×4, so ×2 lands in the window a probe sooner.
INITIAL_LR = 0.1
LR_FACTOR = 2.0
#: Probes calibration may run, and members that may be run again.
MAX_PROBES = 6

#: θ* fitting less than this of its labels has not memorised: warn. (A
#: diagnostic, not part of the member rule.)
MEMORISED_FIT = 0.95


def chance_fit(classes: np.ndarray) -> float:
    """The fit of always answering the most common label: its share of the rows.

    `classes` holds one row per example (`(N,)` or `(N, K)` for multi-label).

    >>> chance_fit(np.array([0, 1, 1, 1]))
    0.75
    >>> chance_fit(np.array([[1, 0], [1, 0], [0, 1]]))  # multi-label rows
    0.6666666666666666
    """
    classes = np.asarray(classes).reshape(len(classes), -1)
    _, counts = np.unique(classes, axis=0, return_counts=True)
    return float(counts.max() / len(classes))


def relative_fit(stats: MemberStats, ref: MemberStats, chance: float) -> float:
    """`(fit − chance) / (θ*'s fit − chance)`; 0 for a diverged member.

    >>> ref = MemberStats(0.0, 0.0, 1.0, 0.0)
    >>> relative_fit(MemberStats(0.1, 0.1, 0.5, 0.7), ref, chance=0.5)  # one class
    0.0
    >>> relative_fit(MemberStats(0.1, 0.1, 0.9, 0.3), ref, chance=0.5)
    0.8
    """
    if not stats.finite or stats.fit is None or not math.isfinite(stats.loss):
        return 0.0
    return (stats.fit - chance) / max(ref.fit - chance, 1e-12)


def at_chance(rel: float) -> bool:
    """Whether a member with the relative fit `rel` at a checkpoint has collapsed.

    At chance (≤ 0) halfway, the second half's smaller steps did not bring a
    probe on the zoo back into the window (docs/design.md#calibration), so a
    member there is abandoned and run again at half the cost.

    >>> at_chance(0.0), at_chance(0.3)
    (True, False)
    """
    return rel <= 0.0


def hopeless(rel: float) -> bool:
    """Whether a probe with the relative fit `rel` at a checkpoint is abandoned there.

    Read halfway and at three quarters of its steps (`tuner.checkpoints`).
    Still above the window: the rest of the cosine schedule takes smaller
    steps, which only restore fit. At chance: collapsed (`at_chance`).

    >>> hopeless(0.95), hopeless(0.0), hopeless(0.6)
    (True, True, False)
    """
    return rel > FIT_WINDOW[1] or at_chance(rel)


def beyond_theta(rel: float) -> bool:
    """Whether a member with the relative fit `rel` fits θ*'s data better than θ* does.

    Better by more than the window's top lies below θ*'s fit (1 −
    `FIT_WINDOW[1]`): fine-tuning went on training a θ* that had not finished
    training, so no step size makes its members forget what it memorised. No
    probe or member of a trained θ* on the zoo or its held-out rows passed
    1.04 (docs/design.md#calibration).

    >>> beyond_theta(1.04), beyond_theta(1.5)
    (False, True)
    """
    return rel > 2.0 - FIT_WINDOW[1]


def restored_in_tail(midway, rel: float) -> bool:
    """Whether a probe inside the window halfway (`midway`) is above it later (`rel`).

    Its step size moved it out of θ*'s basin, and the schedule's smaller late
    steps brought the memorised labels back: what is missing is decay, not a
    larger step (docs/design.md#calibration).

    >>> restored_in_tail(0.83, 0.93), restored_in_tail(0.95, 0.97), restored_in_tail(None, 0.97)
    (True, False, False)
    """
    return midway is not None and midway <= FIT_WINDOW[1] < rel


def shrink_bound(midway, rel: float) -> bool:
    """Whether a probe's fit fell from halfway (`midway`) to its end (`rel`).

    In the cosine schedule's last, smallest steps SGD's noise fades and a
    member regains what the data supports; a fit that still falls there is
    the decay shrinking it, not its steps moving it (docs/design.md#calibration).

    >>> shrink_bound(0.57, 0.50), shrink_bound(0.73, 0.76), shrink_bound(None, 0.5)
    (True, False, False)
    """
    return midway is not None and rel < midway


def warn_unless_memorised(ref_fit, stacklevel: int) -> None:
    if ref_fit is not None and ref_fit < MEMORISED_FIT:
        warnings.warn(
            f"The trained model predicts only {ref_fit:.1%} of its training labels. GEX "
            "self-influence assumes a model that fits (memorises) its training set; on "
            "one that does not, it can rank mislabeled examples below chance. "
            '`detect_noisy`\'s default `score="auto"` (the member loss or margin) suffers '
            "less; train longer for self-influence, and look at the loss of θ* "
            "(`report.reference_losses`).",
            stacklevel=stacklevel + 1,
        )


def why_uncalibrated(reference_fit, chance, loss_name=None) -> str | None:
    """Why no step size can be calibrated from θ*'s fit, or None where one can.

    Calibration judges members by their share of θ*'s fit above chance
    (`relative_fit`): undefined where the loss cannot score a constant
    prediction (`reference_fit` None) or θ* fits no better than chance.

    >>> why_uncalibrated(0.9, 0.5) is None
    True
    >>> why_uncalibrated(0.4, 0.5)
    'θ* fits its training labels no better than chance (50.0%)'
    """
    if reference_fit is None:
        loss = f"the loss {loss_name!r}" if loss_name else "the loss"
        return f"{loss} cannot score a constant prediction of the mean target"
    if chance is not None and reference_fit <= chance:
        return f"θ* fits its training labels no better than chance ({chance:.1%})"
    return None


def uncalibrated_learning_rate(why: str, stacklevel: int) -> float:
    """The fixed step size "auto" uses when no fit can be judged, with a warning."""
    warnings.warn(
        f"learning_rate='auto' cannot calibrate the step size: {why}. The fixed step "
        f"size {INITIAL_LR} is used. Check `report.summary()` and pass `learning_rate=` "
        "if members did not move.",
        stacklevel=stacklevel + 1,
    )
    return INITIAL_LR


class MemberGate:
    """The checks every finished member passes, with one budget of reruns.

    A diverged member is always dropped and run again `LR_FACTOR` × smaller.
    Under a calibrated step size (`adaptive`) a member below `FIT_WINDOW` is
    run again on a fresh batch order: near SGD's stability edge whether a
    member collapses depends on its batch order, not only on the step size (on
    the zoo's cliff rows a quarter to three quarters of the members at the
    accepted step size collapsed). The step size drops √`LR_FACTOR` × only
    once more members collapsed at it than were kept, or two in a row, since
    every member at a smaller one can fall back into θ*'s basin. At most
    `MAX_PROBES` reruns in all; every rerun draws a batch order no member used.
    """

    def __init__(self, adaptive: bool, stacklevel: int, log):
        self.adaptive = adaptive
        self.stacklevel = stacklevel
        self.log = log
        self.redone = {"collapsed": 0, "diverged": 0}
        self._new_step_size()

    def _new_step_size(self) -> None:
        self.kept = 0  # members kept at the current step size
        self.collapsed = 0  # members collapsed at it
        self.in_a_row = 0  # collapses since the last member kept

    def reject(self, member_stats: MemberStats, rel: float, lr: float, index: int, what: str):
        """None if the member is kept, else the step size to redo it with."""
        collapsed = self.adaptive and member_stats.finite and rel < FIT_WINDOW[0]
        if member_stats.finite and not collapsed:
            self.kept += 1
            self.in_a_row = 0
            return None
        if sum(self.redone.values()) >= MAX_PROBES:
            if not member_stats.finite:
                raise RuntimeError(
                    "Fine-tuning diverged repeatedly; the model's loss may be "
                    "non-finite on the training data. Pass a smaller `learning_rate`."
                )
            return None  # kept; `finish` warns
        if not member_stats.finite:
            self.redone["diverged"] += 1
            warnings.warn(
                f"GE member {index} diverged (non-finite loss or weights) at "
                f"learning_rate={lr:.4g}; it was dropped and run again at "
                f"1/{LR_FACTOR:g} of the step size.",
                stacklevel=self.stacklevel + 1,
            )
            self._new_step_size()
            return lr / LR_FACTOR
        self.redone["collapsed"] += 1
        self.collapsed += 1
        self.in_a_row += 1
        retry_lr = lr
        if self.collapsed > self.kept or self.in_a_row >= 2:
            retry_lr = lr / math.sqrt(LR_FACTOR)
            self._new_step_size()
        self.log(
            f"member {index + 1}: lr {lr:.4g} left it {rel:.1%} of θ*'s fit above chance; "
            f"running {what} again at lr {retry_lr:.4g} on another batch order"
        )
        return retry_lr

    def abandon(self):
        """The halfway check for the next member: collapsed, while reruns are left."""
        if self.adaptive and sum(self.redone.values()) < MAX_PROBES:
            return at_chance
        return None

    def counts(self) -> dict:
        """How many members were run again, by reason."""
        return dict(self.redone)

    def finish(self) -> None:
        if sum(self.redone.values()) >= MAX_PROBES:
            warnings.warn(
                f"{sum(self.redone.values())} GE members were run again after collapsing "
                "or diverging; the step size could not be held in the useful window. "
                "Scores may be unreliable; see `report.summary()`.",
                stacklevel=self.stacklevel + 1,
            )


def calibrate(
    run_probe,
    rel_of,
    record: list,
    log,
    *,
    steps: int,
    weight_decay: float,
    max_probes: int = MAX_PROBES,
    forget_by_decay: bool = False,
):
    """Search for the step size (and decay) whose members land in `FIT_WINDOW`.

    `run_probe(lr, weight_decay, abandon)` fine-tunes one round from θ* on
    member 0's stream and returns `(results, midway, run)`: `[(weights,
    stats)]` per member of the round (weights None if abandoned or diverged),
    member 0's relative fit halfway (None where not measured) and the steps it
    ran. A probe is stopped at the first checkpoint (halfway, three quarters)
    where `abandon(fit)` (`hopeless`: above the window or at chance), its stats
    those of that point. `rel_of(stats)` is a member's relative fit. Each
    probe is appended to `record` as a `Probe`.

    The step size is searched first. When every probe so far kept more than
    the window or fell to chance, and the bracket is down to √`LR_FACTOR`, the
    fit jumps past the window at SGD's stability edge; the search then holds
    the largest step size that kept the fit and raises the decay λ by
    `LR_FACTOR`² per probe, first to at least one time constant of the
    schedule (`raised_decay`; bisecting in log once bracketed), so that members
    forget at a stable step size. A probe that was inside the window halfway
    and is above it later (`restored_in_tail`) turns the search to the decay
    at its own step size at once. A classifier's decay is raised once at most,
    to `LR_FACTOR`² × `weight_decay`: above it the penalty, not the data,
    decides what members fit (a θ* that memorised nothing has only correct
    labels to lose; docs/design.md#the-decays-ceiling). Where the probe there
    still keeps more than the window, the search stops.

    With `forget_by_decay` (regression) the step size is searched only for
    stability: from `INITIAL_LR` it halves until a probe keeps at least the
    window's floor, and the decay is searched from there (a probe at the
    starting decay is never accepted). A regression's squared-error gradient
    grows with the residual, so its step size forgets at SGD's stability edge,
    where members scatter by batch order; the decay pulls every member
    towards the same regularised fit (docs/design.md#regression-members).

    A probe that fits θ*'s data better than θ* does (`beyond_theta`) ends the
    search: θ* had not finished training, and every member uses that probe's
    settings, with a warning.

    An accepted classifier probe whose fit fell in its tail (`shrink_bound`)
    is followed by a step up (`_step_up`): `LR_FACTOR`² × its step size at
    1/`LR_FACTOR`² its decay, taken while the fit rises inside the window.

    A probe that ran its whole schedule inside the window at its checkpoints
    and ended inside or above it is a finished member the member gate would
    keep: where it is not member 0 (its fit regained in the tail, or a step
    up replaced it) it is kept as a member at its own settings too
    (`Probe.accepted`), not discarded after a whole member's steps. A regression's probes at the
    starting decay are not (its members forget through the decay), nor are
    probes whose fit was not read on the way (rounds of several replicas).

    Returns:
        `(learning_rate, weight_decay, kept)`: the step size and decay, and
        `[(probe index, round)]` of the probes kept as members, member 0 first:
        the accepted probe or, when no probe landed in the window, the nearest
        if it ran its whole schedule (a warning says which settings every
        member uses), then the probes a step up replaced and those that
        regained their fit in the tail and ran whole, each in the order they
        ran. Empty when none is kept.
    """
    low, high = FIT_WINDOW
    ceiling = weight_decay * LR_FACTOR**2  # a classifier's decay is raised once at most
    nearest_round = None  # (index, round) of the nearest probe that ran its whole schedule
    whole = []  # (index, round) of the probes that regained their fit in the tail, ran whole
    at_ceiling = False
    too_small, too_large = None, None  # values known to be too small / large
    lr, decay = INITIAL_LR, weight_decay
    searching = "lr"
    for _ in range(max_probes):
        probe_start = time.perf_counter()
        results, midway, run = run_probe(lr, decay, hopeless)
        weights, stats = results[0]
        rel = rel_of(stats)
        abandoned = weights is None and stats.finite
        stability_only = forget_by_decay and searching == "lr"
        accepted = bool(low <= rel <= high) and not abandoned and not stability_only
        _record_probe(
            record,
            probe_start,
            stats,
            learning_rate=lr,
            weight_decay=decay,
            relative_fit=rel,
            accepted=accepted,
            midway_fit=midway,
            abandoned=abandoned,
            steps=run,
        )
        where = f" after {run / max(steps, 1):.0%} of its steps (abandoned)" if abandoned else ""
        log(
            f"calibration: lr {lr:.4g}, weight decay {decay:.3g} -> keeps {rel:.1%} of "
            f"θ*'s fit above chance{where}"
        )
        if stats.finite and beyond_theta(rel):
            ran_whole = (len(record) - 1, results) if weights is not None else None
            return _stop_unfinished(record, ran_whole, whole)
        if accepted:
            first = (len(record) - 1, results)
            replaced = []
            if not forget_by_decay:
                lr, decay, first, replaced = _step_up(
                    run_probe, rel_of, record, log, (lr, decay, first, rel, midway), max_probes
                )
            return lr, decay, _kept(record, [first, *replaced, *whole])
        restored = restored_in_tail(midway, rel)
        if weights is not None and stats.finite and closest_to_window(record) is record[-1]:
            nearest_round = (len(record) - 1, results)
        if weights is not None and stats.finite and restored and not stability_only:
            whole.append((len(record) - 1, results))
        if stability_only:  # kept its fit: forget through the decay from here
            if rel >= low:
                searching, too_small = "decay", decay
                decay = raised_decay(decay, lr, steps)
            else:
                lr /= LR_FACTOR
            continue
        value = lr if searching == "lr" else decay
        if rel > high:
            too_small = value if too_small is None else max(too_small, value)
        else:
            too_large = value if too_large is None else min(too_large, value)
        if searching == "lr" and (restored or stability_edge(record, too_small, too_large)):
            searching, lr = "decay", too_small  # the probe's own step size if `restored`
            too_small, too_large = decay, None
        if too_small is not None and too_large is not None:
            value = math.sqrt(too_small * too_large)
        elif searching == "lr":
            value = lr * LR_FACTOR if too_large is None else lr / LR_FACTOR
        else:
            value = raised_decay(decay, lr, steps) if too_large is None else decay / LR_FACTOR**2
            if not forget_by_decay and value > ceiling * (1 + 1e-9):
                if too_small >= ceiling * (1 - 1e-9):
                    at_ceiling = True  # the probe at the ceiling kept too much
                    break
                value = ceiling
        lr, decay = (value, decay) if searching == "lr" else (lr, value)
    best = closest_to_window(record)
    first = []
    if nearest_round is not None and record[nearest_round[0]] is best:
        # It ran member 0's stream whole at the settings every member uses: it is member 0.
        first = [nearest_round]
    kept = _kept(record, first + [w for w in whole if w[0] not in {i for i, _ in first}])
    warnings.warn(
        f"Step-size calibration found no learning rate whose members keep "
        f"{low:.0%}-{high:.0%} of θ*'s training fit above chance in {len(record)} probes "
        f"({', '.join(f'{p.learning_rate:.3g} → {p.relative_fit:.0%}' for p in record)}); "
        f"every member uses the closest, learning_rate={best.learning_rate:.4g} with "
        f"weight_decay={best.weight_decay:.3g}. "
        + (
            f"The decay at its ceiling ({ceiling:.3g}) still kept more: θ* may have "
            "memorised few of its labels"
            if at_ceiling
            else "Few labels to forget, or a fit that jumps past the window"
        )
        + "; see `report.summary()`.",
        stacklevel=4,
    )
    return best.learning_rate, best.weight_decay, kept


def _stop_unfinished(record: list, last_round, whole: list):
    """Ends a search whose last probe fit θ*'s data better than θ* (`beyond_theta`).

    Every member uses that probe's settings, with a warning that θ* had not
    finished training. The probe is member 0 where it ran its whole schedule
    (`last_round`, its `(index, round)`, else None); the probes of `whole`
    stay members too.
    """
    probe = record[-1]
    kept = _kept(record, ([last_round] if last_round else []) + whole)
    warnings.warn(
        f"Step-size calibration stopped at learning_rate={probe.learning_rate:.4g} (weight "
        f"decay {probe.weight_decay:.3g}): its member fit θ*'s training data better than "
        f"θ* does ({probe.relative_fit:.0%} of θ*'s fit above chance). θ* has not finished "
        "training, so members go on training it instead of forgetting what it memorised, "
        "at any step size. Every member uses these settings. Train the model until its "
        "training loss stops falling, then run GEX again; see `report.summary()`.",
        stacklevel=5,  # one frame below `calibrate`, whose own warning takes 4
    )
    return probe.learning_rate, probe.weight_decay, kept


def _step_up(run_probe, rel_of, record: list, log, accepted: tuple, max_probes: int):
    """From an accepted probe whose fit fell in its tail, larger steps at the same shrink.

    `accepted` is `(lr, decay, (index, round), rel, midway)`. While the probe
    taken is `shrink_bound` and probes remain, one probe at `LR_FACTOR`² × its
    step size and 1/`LR_FACTOR`² its decay runs, abandoned at a checkpoint where
    it keeps less than the taken probe did halfway (or is `hopeless`); it is
    taken where it ends inside the window keeping at least as much as the
    taken probe. Returns `(lr, decay, (index, round), replaced)`: the probe
    taken, and `[(index, round)]` of the probes it replaced as member 0. Each
    of those ran its whole schedule inside the window, a finished member the
    member gate keeps, so it stays a member at its own settings.

    The stride is the decay search's, `LR_FACTOR`²: one that overshoots is
    stopped at its first checkpoint, so a long stride costs less (on the zoo's
    `many-classes` one probe instead of two for the same members,
    docs/design.md#calibration).
    """
    lr, decay, taken, rel, midway = accepted
    replaced = []
    stride = LR_FACTOR**2
    while shrink_bound(midway, rel) and len(record) < max_probes:
        up_lr, up_decay, floor = lr * stride, decay / stride, midway
        probe_start = time.perf_counter()
        results, up_midway, run = run_probe(
            up_lr, up_decay, lambda fit, floor=floor: hopeless(fit) or fit < floor
        )
        weights, stats = results[0]
        up_rel = rel_of(stats)
        better = weights is not None and stats.finite and rel <= up_rel <= FIT_WINDOW[1]
        _record_probe(
            record,
            probe_start,
            stats,
            learning_rate=up_lr,
            weight_decay=up_decay,
            relative_fit=up_rel,
            accepted=better,
            midway_fit=up_midway,
            abandoned=weights is None and stats.finite,
            steps=run,
        )
        log(
            f"calibration: a step up to lr {up_lr:.4g}, weight decay {up_decay:.3g} -> keeps "
            f"{up_rel:.1%} of θ*'s fit above chance ({'taken' if better else 'not taken'})"
        )
        if not better:
            break
        replaced.append(taken)
        taken = (len(record) - 1, results)
        lr, decay, rel, midway = up_lr, up_decay, up_rel, up_midway
    return lr, decay, taken, replaced


def _record_probe(record: list, start: float, stats: MemberStats, **fields) -> None:
    """Appends one calibration probe (`Probe` `fields`) to `record`, timed from `start`."""
    record.append(Probe(loss=stats.loss, seconds=time.perf_counter() - start, **fields))


def _kept(record: list, kept: list) -> list:
    """Marks the probes of `kept` (`[(index, round)]`) as kept in `record`; returns `kept`."""
    for index, _ in kept:
        record[index] = dataclasses.replace(record[index], accepted=True)
    return kept


def raised_decay(decay: float, lr: float, steps: int) -> float:
    """The next decay a decay search tries above `decay`: `LR_FACTOR`² × it, and
    at least one time constant of the schedule, `λ · Σ_t lr_t ≥ 1` (a cosine's
    `Σ_t lr_t ≈ lr · steps / 2`). Where the decay acts for less, a member is θ*
    shrunk a little, not near the decay's fixed point (docs/design.md#regression-members).

    >>> raised_decay(0.1, 0.1, 229)  # the zoo's regression: ×4
    0.4
    >>> raised_decay(0.1, 0.05, 50)  # 50 steps at 0.05: one time constant
    0.8
    """
    return max(decay * LR_FACTOR**2, 2.0 / (lr * steps))


def stability_edge(record: list, too_small, too_large) -> bool:
    """Whether the step-size probes show the fit jumping from above the window to chance.

    Every probe kept more than the window or fell to chance (diverged or
    collapsed), and the bracket between them is at most √`LR_FACTOR` wide.

    >>> edge = [Probe(0.1, 0.97, 1.0), Probe(0.2, 0.0, 1.0), Probe(0.15, 0.96, 1.0)]
    >>> stability_edge(edge, 0.15, 0.2)
    True
    >>> stability_edge([Probe(0.1, 0.97, 1.0), Probe(0.2, 0.3, 1.0)], 0.1, 0.2)
    False
    """
    if too_small is None or too_large is None:
        return False
    if too_large > math.sqrt(LR_FACTOR) * too_small * (1 + 1e-9):
        return False
    return all(p.relative_fit > FIT_WINDOW[1] or p.relative_fit <= 0 for p in record)


def closest_to_window(record: list) -> Probe:
    """The probe nearest `FIT_WINDOW` (a diverged one never).

    >>> closest_to_window([Probe(0.1, 0.97, 1.0), Probe(0.4, 0.45, 1.0)]).learning_rate
    0.4
    >>> closest_to_window([Probe(0.1, 0.97, 1.0), Probe(0.4, 0.0, float("nan"))]).learning_rate
    0.1
    """
    low, high = FIT_WINDOW
    finite = [p for p in record if math.isfinite(p.loss)] or record
    return min(finite, key=lambda p: max(low - p.relative_fit, p.relative_fit - high))
