"""The member rule: which step size each member is fine-tuned with, and which members count.

Members must leave θ*'s memorising basin (forget what only memorisation
holds) without collapsing (keep what the data supports). The signal is the
*relative fit*: the fraction of evaluation examples whose given label a member
predicts, over θ*'s. The rule, in order:

1. Calibrate (`learning_rate="auto"`, classification losses): a geometric
   search from `INITIAL_LR` for a step size whose member lands in `FIT_WINDOW`;
   every probe is a full member, and the accepted one is member 0.
2. Steer: after each member, `StepSizeController` nudges the step size back
   into the window or walks it up towards `FIT_TARGET`; it holds one step size
   when calibration found nothing to forget or a steep fall past it.
3. Gate: a member that collapsed is refitted smaller, one that diverged is
   retried smaller (`MemberGate`); none is averaged in silently.

Other losses (no fit to judge) use `INITIAL_LR` with a warning.
The measurements behind each constant are in docs/design.md.
"""

from __future__ import annotations

import math
import time
import warnings

from keras_gex.collection.tuner import halfway
from keras_gex.config import MemberStats, Probe

# -- The tuned constants, each with its reason (docs/design.md#step-size) --------
#: Relative fit calibration accepts: below, members collapsed towards chance;
#: above, they still sit in θ*'s basin and see no deviation on memorised rows.
FIT_WINDOW = (0.50, 0.92)
#: Relative fit the search and the controller aim for inside the window.
FIT_TARGET = 0.78
#: Below this relative fit a member has collapsed: refitted, and a probe below
#: it halfway (no BatchNorm) is abandoned there.
COLLAPSE_FIT = 0.45
#: "Kept θ*'s whole fit": a probe above it halfway is abandoned as too small;
#: probes above it up to a collapse mean nothing to forget.
WHOLE_FIT = 0.99
#: First probe, and the grid factor between probes until bracketed.
INITIAL_LR = 0.1
LR_FACTOR = 4.0
#: Step-size cut for a member that collapsed / diverged before it is run again.
REFIT_FACTOR = 0.7
RETRY_FACTOR = 0.25
#: The controller's per-member factors outside the window and on its walk up.
NUDGE_UP, NUDGE_DOWN = 1.15, 0.85
#: A walked member this far below the first in-window member's fit means a
#: steep curve: the controller returns to the first member's step size.
STEEP_DROP = 0.05
#: A rejected probe within this factor above the accepted step size that fell
#: below `FIT_TARGET` means the fit falls steeply: one step size for all.
STEEP_SPAN = 2.0
#: Probes calibration may run, and retries of diverged members before giving up.
MAX_PROBES = 6
MAX_RETRIES = 6
#: θ* fitting less than this of its labels has not memorised: warn.
MEMORISED_FIT = 0.95


def relative_fit(stats: MemberStats, ref: MemberStats) -> float:
    """A member's fit as a fraction of θ*'s; 0 for a diverged member."""
    if not stats.finite or stats.fit is None or not math.isfinite(stats.loss):
        return 0.0
    return stats.fit / max(ref.fit, 1e-12)


def warn_unless_memorised(ref_fit, stacklevel: int) -> None:
    if ref_fit is not None and ref_fit < MEMORISED_FIT:
        warnings.warn(
            f"The trained model predicts only {ref_fit:.1%} of its training labels. GEX "
            "self-influence assumes a model that fits (memorises) its training set; on "
            "one that does not, it can rank mislabeled examples below chance. "
            '`detect_noisy`\'s default `score="member_loss"` suffers less; train longer '
            "for self-influence, and look at the loss of θ* (`report.reference_losses`).",
            stacklevel=stacklevel + 1,
        )


def fallback_learning_rate(loss_name: str, stacklevel: int) -> float:
    """The fixed step size "auto" uses for losses it cannot judge, with a warning."""
    warnings.warn(
        f"learning_rate='auto' calibrates on classification fit; the loss "
        f"{loss_name!r} is not a recognised classification loss, so the "
        f"fixed step size {INITIAL_LR} is used. Check `report.summary()` "
        "and pass `learning_rate=` if members did not move.",
        stacklevel=stacklevel + 1,
    )
    return INITIAL_LR


class MemberGate:
    """The checks every finished member passes, with their retry budgets.

    Under a calibrated step size (`adaptive`), a member that collapsed (kept
    less than `COLLAPSE_FIT` of θ*'s fit) is refitted at `REFIT_FACTOR` × the
    step size, at most `num_members` times; a diverged member is always
    dropped and retried at `RETRY_FACTOR` × it, at most `MAX_RETRIES` times.
    """

    def __init__(self, adaptive: bool, num_members: int, stacklevel: int, log):
        self.adaptive = adaptive
        self.num_members = num_members
        self.stacklevel = stacklevel
        self.log = log
        self.retries = 0
        self.refits = 0

    def reject(self, member_stats: MemberStats, rel: float, lr: float, index: int, what: str):
        """None if the member is kept, else the step size to redo it with."""
        if (
            self.adaptive
            and member_stats.finite
            and rel < COLLAPSE_FIT
            and self.refits < self.num_members
        ):
            self.refits += 1
            self.log(
                f"member {index + 1}: lr {lr:.4g} collapsed it (keeps {rel:.1%} of θ*'s "
                f"fit); refitting {what} at a smaller step size"
            )
            return lr * REFIT_FACTOR
        if not member_stats.finite:
            self.retries += 1
            warnings.warn(
                f"GE member {index} diverged (non-finite loss or weights) at "
                f"learning_rate={lr:.4g}; it was dropped and retried at "
                f"{RETRY_FACTOR:g}× the step size.",
                stacklevel=self.stacklevel + 1,
            )
            if self.retries > MAX_RETRIES:
                raise RuntimeError(
                    "Fine-tuning diverged repeatedly; the model's loss may be "
                    "non-finite on the training data. Pass a smaller `learning_rate`."
                )
            return lr * RETRY_FACTOR
        return None

    def counts(self) -> dict:
        """How many members were run again, by reason."""
        return {"collapsed": self.refits, "diverged": self.retries}

    def finish(self) -> None:
        if self.refits >= self.num_members:
            warnings.warn(
                f"{self.refits} GE members collapsed and were refitted; the step size could "
                "not be held in the useful window. Scores may be unreliable; see "
                "`report.summary()`.",
                stacklevel=self.stacklevel + 1,
            )


class StepSizeController:
    """The step size of each member after the first, from the members' fits.

    Outside `FIT_WINDOW` it nudges the step size back (×`NUDGE_UP` when a
    member kept too much of θ*'s fit, ×`NUDGE_DOWN` when it kept too little)
    and stays where it lands. Inside, members still keeping more than
    `FIT_TARGET` walk the step size up by ×`NUDGE_UP` per member until one lands
    at or below the target; if a step drops a member's fit more than
    `STEEP_DROP` below the first in-window member's, it returns to that
    member's step size. Either way it then holds. With `hold=True` it returns
    every step size unchanged (see `held_reason`).

    >>> c = StepSizeController()
    >>> [round(c.next(lr, fit), 4) for lr, fit in [(0.1, 0.82), (0.115, 0.8), (0.1323, 0.775)]]
    [0.115, 0.1323, 0.1323]
    >>> c = StepSizeController()
    >>> [round(c.next(lr, fit), 4) for lr, fit in [(0.2, 0.87), (0.23, 0.72), (0.2, 0.9)]]
    [0.23, 0.2, 0.2]
    >>> StepSizeController().next(1.0, 0.99), StepSizeController().next(1.0, 0.4)
    (1.15, 0.85)
    """

    def __init__(self, hold: bool = False):
        self.first = None  # (step size, relative fit) of the first in-window member
        self.holding = False
        self.hold = hold

    def next(self, lr: float, rel: float) -> float:
        """The step size for the next member, after one at `lr` kept `rel` of θ*'s fit."""
        low, high = FIT_WINDOW
        if self.hold:
            return lr
        if not low <= rel <= high:
            self.holding = True
            return lr * (NUDGE_UP if rel > high else NUDGE_DOWN)
        if self.first is None:
            self.first = (lr, rel)
        if self.holding:
            return lr
        if rel < self.first[1] - STEEP_DROP:
            self.holding = True
            return self.first[0]
        if rel <= FIT_TARGET:
            self.holding = True
            return lr
        return lr * NUDGE_UP

    def replay(self, lr, stats: list, ref_stats: MemberStats) -> float:
        """The step size after the (resumed) members `stats`, as if just run."""
        for member_stats in stats:
            lr = self.next(member_stats.learning_rate, relative_fit(member_stats, ref_stats))
        return lr


def calibrate(
    run_probe,
    ref_stats: MemberStats,
    record: list,
    log,
    *,
    steps: int,
    abandon_below,
    max_probes: int = MAX_PROBES,
):
    """Geometric search for the step size whose members land in `FIT_WINDOW`.

    `run_probe(lr, abandon_above, abandon_below)` fine-tunes one round from θ*
    on member 0's stream and returns `(results, midway)`: `[(weights, stats)]`
    per member of the round (weights None if abandoned or diverged) and member
    0's relative fit halfway (None where not measured). The round is judged by
    its member 0. A probe keeping more than `WHOLE_FIT` halfway, or less than
    `abandon_below`, is abandoned there (half the cost). Each probe is
    appended to `record` as a `Probe`. When a whole grid factor takes the fit
    from above the window to below `FIT_TARGET`, one more probe halfway (in
    log) is run and, if it lands in the window, its smaller step size is kept.

    Returns:
        `(learning_rate, accepted)`: the step size, and the accepted probe's
        round (None when no probe landed in the window; then a warning says
        which step size is used).
    """
    low, high = FIT_WINDOW
    too_small, too_large = None, None  # step sizes known to be too small / large
    lr = INITIAL_LR
    best = None

    def probe(lr):
        probe_start = time.perf_counter()
        results, midway = run_probe(lr, WHOLE_FIT, abandon_below)
        weights, stats = results[0]
        rel = relative_fit(stats, ref_stats)
        abandoned = weights is None and stats.finite
        record.append(
            Probe(
                learning_rate=lr,
                relative_fit=rel,
                loss=stats.loss,
                seconds=time.perf_counter() - probe_start,
                accepted=bool(low <= rel <= high) and not abandoned,
                midway_fit=midway,
                abandoned=abandoned,
                steps=halfway(steps) if abandoned else steps,
            )
        )
        where = "halfway (abandoned)" if abandoned else ""
        log(f"calibration: lr {lr:.4g} -> members keep {rel:.1%} of θ*'s fit {where}".rstrip())
        return results, rel, record[-1].accepted

    for probes in range(1, max_probes + 1):
        results, rel, ok = probe(lr)
        if best is None or abs(rel - FIT_TARGET) < abs(best[1] - FIT_TARGET):
            best = (lr, rel)
        if ok:
            # A whole grid factor (0.99: float tolerance) from a step size that
            # kept more than the window to one that forgets more than the
            # target: the curve may be steep there. Probe halfway (in log) and
            # keep the smaller step size if it lands in the window too.
            if (
                rel < FIT_TARGET
                and too_large is None
                and too_small is not None
                and lr >= 0.99 * LR_FACTOR * too_small
                and probes < max_probes
            ):
                mid = math.sqrt(too_small * lr)
                mid_results, _, mid_ok = probe(mid)
                if mid_ok:
                    record[-2].accepted = False
                    return mid, mid_results
            return lr, results
        if rel > high:
            too_small = lr if too_small is None else max(too_small, lr)
        else:
            too_large = lr if too_large is None else min(too_large, lr)
        if too_small is not None and too_large is not None:
            lr = math.sqrt(too_small * too_large)
        elif too_large is None:
            lr = lr * LR_FACTOR
        else:
            lr = lr / LR_FACTOR
    if nothing_to_forget(record):
        # Clean labels: the step size nearest the target sits at the cliff's
        # edge, where members collapse halfway; step back a grid factor.
        lr = too_small / LR_FACTOR
        warnings.warn(
            f"Step-size calibration found no learning rate whose members keep "
            f"{low:.0%}-{high:.0%} of θ*'s training fit in {max_probes} probes: members "
            f"kept more than {high:.0%} of the fit up to learning_rate={too_small:.4g} and "
            f"collapsed from {too_large:.4g}. That is typical of training labels with few "
            "or no errors (nothing needs forgetting), where noisy-label scores matter "
            f"little. Every member uses learning_rate={lr:.4g}, a factor "
            f"{LR_FACTOR:g} below that edge, for pruning and explanations; see "
            "`report.summary()`.",
            stacklevel=4,
        )
        return lr, None
    warnings.warn(
        f"Step-size calibration found no learning rate whose members keep "
        f"{low:.0%}-{high:.0%} of θ*'s training fit in {max_probes} probes; "
        f"using the closest, learning_rate={best[0]:.4g} (fit {best[1]:.1%}). "
        f"Scores may be unreliable; see `report.summary()`.",
        stacklevel=4,
    )
    return best[0], None


def fit_falls_steeply(record: list) -> bool:
    """Whether the probes saw θ*'s fit fall fast just past the accepted step size.

    True when a rejected probe at most `STEEP_SPAN` × the accepted step size
    kept less than `FIT_TARGET` of the fit: walking members up would land them
    anywhere on a steep curve, so every member keeps the accepted step size.

    >>> fit_falls_steeply([Probe(0.1, 0.99, 1.0), Probe(0.4, 0.32, 1.0),
    ...                    Probe(0.2, 0.89, 1.0, accepted=True)])
    True
    >>> fit_falls_steeply([Probe(0.1, 0.99, 1.0), Probe(0.4, 0.85, 1.0, accepted=True)])
    False
    >>> fit_falls_steeply([Probe(0.1, 0.7, 1.0, accepted=True)])  # the accepted probe itself
    False
    """
    accepted = [p.learning_rate for p in record if p.accepted]
    if not accepted:
        return False
    lr = accepted[0]
    return any(
        not p.accepted
        and lr < p.learning_rate <= STEEP_SPAN * lr * (1 + 1e-9)
        and p.relative_fit < FIT_TARGET
        for p in record
    )


def nothing_to_forget(record: list) -> bool:
    """Whether calibration probes kept θ*'s whole fit right up to a collapse.

    True when no probe was accepted, some probes kept more than the window
    (none of them less than `WHOLE_FIT`) and another fell below it: the sign of
    training labels with few or no errors.

    >>> nothing_to_forget([Probe(0.1, 1.0, 1.0), Probe(0.4, 0.1, 1.0)])
    True
    >>> nothing_to_forget([Probe(0.1, 0.95, 1.0), Probe(0.4, 0.1, 1.0)])  # forgot some labels
    False
    >>> nothing_to_forget([Probe(0.1, 1.0, 1.0), Probe(0.4, 1.0, 1.0)])  # no collapse seen
    False
    """
    low, high = FIT_WINDOW
    if not record or any(p.accepted for p in record):
        return False
    kept = [p.relative_fit for p in record if p.relative_fit > high]
    fell = [p for p in record if p.relative_fit < low]
    return bool(kept and fell) and min(kept) >= WHOLE_FIT


def held_reason(record: list) -> str | None:
    """Why every member keeps the calibrated step size (no per-member steering), or None.

    >>> held_reason([Probe(0.1, 1.0, 1.0), Probe(0.4, 0.1, 1.0)])
    'nothing to forget'
    >>> held_reason([Probe(0.1, 0.8, 1.0, accepted=True)]) is None
    True
    """
    if nothing_to_forget(record):
        return "nothing to forget"
    if fit_falls_steeply(record):
        return "the fit falls steeply past it"
    return None
