"""`NoisyLabelReport`: scores, threshold and flags, with a summary and a plot."""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_gex import _validation
from keras_gex.analysis.relabel import distillation_targets, relabel
from keras_gex.analysis.scores import (
    DEFAULT_THRESHOLDS,
    cut_scores,
    exclusive_classes,
    other_class_log_probs,
    score_terms,
)
from keras_gex.analysis.thresholding import METHODS, otsu_separability
from keras_gex.collection.frozen import layer_list
from keras_gex.collection.step_size import (
    LR_FACTOR,
    MEMORISED_FIT,
    beyond_theta,
    closest_to_window,
    relative_fit,
    why_uncalibrated,
)
from keras_gex.config import CollectionRecord, Probe
from keras_gex.io.plots import plot_gallery, plot_self_influence
from keras_gex.losses import CLASSIFICATION_KINDS, class_ids


def _probe_text(probe: Probe, weight_decay=None, steps=None) -> str:
    """One calibration probe for `summary()`; `steps`: a member's SGD steps.

    Its decay is named when it differs from `weight_decay` (the first probe's).

    >>> _probe_text(Probe(0.1, 0.908, 0.3, abandoned=True, steps=293), steps=391)
    '0.1 → 91% (abandoned at 75%)'
    >>> _probe_text(Probe(0.1, 0.84, 0.3, accepted=True, weight_decay=0.4), weight_decay=0.1)
    '0.1 with weight decay 0.4 → 84% (kept)'
    """
    text = f"{probe.learning_rate:.3g}"
    if probe.weight_decay is not None and probe.weight_decay != weight_decay:
        text += f" with weight decay {probe.weight_decay:.3g}"
    text += f" → {probe.relative_fit:.0%}"
    if probe.abandoned:
        if probe.steps and steps:
            return text + f" (abandoned at {probe.steps / steps:.0%})"
        return text + " (abandoned early)"
    return text + (" (kept)" if probe.accepted else "")


def _decay_spread(record: CollectionRecord) -> str:
    """The members' decays where they differ (probes kept at their own settings).

    >>> record = CollectionRecord.from_dict({"weight_decay": 0.4, "member_stats": [
    ...     {"learning_rate": 0.2, "weight_decay": 0.4},
    ...     {"learning_rate": 0.2, "weight_decay": 0.1}]})
    >>> _decay_spread(record)
    ' (members 0.1-0.4: probes kept at their own)'
    """
    decays = [s.weight_decay for s in record.member_stats if s.weight_decay is not None]
    if not decays or min(decays) == max(decays):
        return ""
    return f" (members {min(decays):g}-{max(decays):g}: probes kept at their own)"


def _member_fits(stats, ref, chance: float | None, kept: str) -> str | None:
    """Each member's relative fit for `summary()`, grouped by its step size and decay
    where they differ (members run again smaller, probes kept at their own
    settings); None where the relative fit is undefined (θ* at chance).

    >>> from keras_gex.config import MemberStats
    >>> members = [MemberStats(0.1, 0.3, 0.76, 0.5, True, 0.1),
    ...            MemberStats(0.1, 0.3, 0.9, 0.5, True, 0.1),
    ...            MemberStats(0.0707, 0.1, 1.0, 0.2, True, 0.1)]
    >>> ref = MemberStats(0.0, 0.0, 1.0, 0.0)
    >>> _member_fits(members, ref, 0.5, "share of θ*'s fit above chance kept")
    "  members' share of θ*'s fit above chance kept: 52%, 80% at lr 0.1; 100% at lr 0.0707"
    >>> _member_fits(members[:2], ref, 0.5, "share kept")
    "  members' share kept: 52%, 80%"
    """
    if ref is None or chance is None or why_uncalibrated(ref.fit, chance) is not None:
        return None
    groups = {}  # (step size, decay): relative fits, in member order
    for member in stats:
        if member.fit is not None:
            setting = (member.learning_rate, member.weight_decay)
            groups.setdefault(setting, []).append(relative_fit(member, ref, chance))
    if not groups:
        return None
    decays = {decay for _, decay in groups}
    parts = []
    for (lr, decay), fits in groups.items():
        part = ", ".join(f"{fit:.0%}" for fit in fits)
        if len(groups) > 1:
            part += f" at lr {lr:.3g}"
            if len(decays) > 1 and decay is not None:
                part += f" with weight decay {decay:.3g}"
        parts.append(part)
    return f"  members' {kept}: " + "; ".join(parts)


def _uncalibrated(record) -> str | None:
    """The summary's "fixed: <why>" where `learning_rate="auto"` ran no probe and
    kept its fixed step size (`step_size.why_uncalibrated`), or None."""
    ref = record.reference_stats
    why = None if ref is None else why_uncalibrated(ref.fit, record.chance_fit)
    return f"fixed: {why}" if why else None


def member_scatter(stats, ref, chance: float, window) -> tuple | None:
    """`(lowest lr, highest lr, lowest, highest)` relative fit of members that landed far apart.

    Members fine-tuned alike normally land close together (within half the
    fit window on 55 of the zoo's 57 classification runs); farther apart, some
    kept memorised labels and others did not (docs/design.md#known-weaknesses).
    Alike: one decay, step sizes within `LR_FACTOR` of each other, so that
    the members the gate ran again √`LR_FACTOR` × smaller count with those
    before them (one step down is often θ*'s basin on a cliff). Probes kept as
    members at another decay form their own group. None when no group spreads
    that far.

    >>> from keras_gex.config import MemberStats
    >>> ref = MemberStats(0.1, 0.0, 1.0, 0.0)
    >>> fits = [0.58, 1.0, 0.99, 0.6]  # chance 0.5: relative fits 0.16, 1.0, 0.98, 0.2
    >>> member_scatter([MemberStats(0.07, 0.3, f, 0.5) for f in fits], ref, 0.5, (0.2, 0.9))
    (0.07, 0.07, 0.16, 1.0)
    >>> member_scatter([MemberStats(0.07, 0.3, f, 0.5) for f in (0.8, 0.9)], ref, 0.5, (0.2, 0.9))
    >>> dropped = [MemberStats(0.1, 0.3, 0.76, 0.5), MemberStats(0.071, 0.3, 1.0, 0.5)]
    >>> member_scatter(dropped, ref, 0.5, (0.2, 0.9))  # the gate's step down: still alike
    (0.071, 0.1, 0.52, 1.0)
    >>> member_scatter([*dropped[:1], MemberStats(0.04, 0.3, 1.0, 0.5)], ref, 0.5, (0.2, 0.9))
    >>> kept = [MemberStats(0.2, 0.3, 0.6, 0.5, True, 0.4),
    ...         MemberStats(0.2, 0.3, 0.97, 0.5, True, 0.1)]
    >>> member_scatter(kept, ref, 0.5, (0.2, 0.9))  # two decays: not fine-tuned alike
    """
    by_decay = {}
    for member in stats:
        if member.fit is not None:
            rel = round(relative_fit(member, ref, chance), 6)
            by_decay.setdefault(member.weight_decay, []).append((member.learning_rate, rel))
    widest = (0.0, None, None, None, None)  # (spread, lr, lr, lowest, highest)
    for members in by_decay.values():
        for lr_a, rel_a in members:
            for lr_b, rel_b in members:
                alike = max(lr_a, lr_b) <= LR_FACTOR * min(lr_a, lr_b) * (1 + 1e-9)
                if alike and rel_b - rel_a > widest[0]:
                    widest = (rel_b - rel_a, lr_a, lr_b, rel_a, rel_b)
    if widest[0] <= (window[1] - window[0]) / 2:
        return None
    _, lr_a, lr_b, lowest, highest = widest
    return min(lr_a, lr_b), max(lr_a, lr_b), lowest, highest


def calibration_miss(record: CollectionRecord) -> str | None:
    """Why a calibrated step size missed the fit window, and what to do; None if it did not.

    >>> record = CollectionRecord.from_dict({"learning_rate_requested": "auto",
    ...     "fit_window": [0.5, 0.9], "weight_decay": 0.1, "calibration": [
    ...     {"learning_rate": 0.1, "relative_fit": 0.95, "loss": 0.1},
    ...     {"learning_rate": 0.2, "relative_fit": 0.0, "loss": float("nan")}]})
    >>> print(calibration_miss(record))  # doctest: +NORMALIZE_WHITESPACE
    no step size put members in the fit window (50%-90% of θ*'s fit above chance):
    they kept 95% at lr 0.1 and diverged at 0.2. The fit jumps past the window there;
    every member uses the nearest probe's step size. Pass a larger `weight_decay` (more
    forgetting at a stable step size) than 0.1, or a `learning_rate` in between.
    """
    probes = record.calibration
    if record.learning_rate_requested != "auto" or not probes or len(record.fit_window) != 2:
        return None
    low, high = record.fit_window
    if any(p.accepted and low <= p.relative_fit <= high for p in probes):
        return None  # (a probe kept outside the window is the nearest one: a miss)
    of = "θ*'s loss explained" if record.chance_fit == 0.0 else "θ*'s fit above chance"
    window = f"{low:.0%}-{high:.0%} of {of}"
    above = [p for p in probes if p.relative_fit > high and np.isfinite(p.loss)]
    below = [p for p in probes if p not in above]
    if above and below:
        kept = max(above, key=lambda p: p.learning_rate)
        # The decay search (at the stability edge, or a regression's) fell at kept's step size.
        by_decay = [
            p
            for p in below
            if p.learning_rate == kept.learning_rate
            and None not in (p.weight_decay, kept.weight_decay)
            and p.weight_decay > kept.weight_decay
        ]
        if by_decay:
            fell = min(by_decay, key=lambda p: p.weight_decay)
        else:
            fell = min(below, key=lambda p: p.learning_rate)
        what = "diverged" if not np.isfinite(fell.loss) else f"kept {fell.relative_fit:.0%}"
        if by_decay:
            return (
                f"no setting put members in the fit window ({window}): at lr "
                f"{kept.learning_rate:.3g} they kept {kept.relative_fit:.0%} with weight decay "
                f"{kept.weight_decay:.3g} and {what} with {fell.weight_decay:.3g}. The fit "
                "jumps past the window between the two decays; every member uses the nearest "
                "probe's settings. Pass a `weight_decay` in between, or a smaller "
                "`learning_rate` with a larger decay."
            )
        return (
            f"no step size put members in the fit window ({window}): they kept "
            f"{kept.relative_fit:.0%} at lr {kept.learning_rate:.3g} and {what} at "
            f"{fell.learning_rate:.3g}. The fit jumps past the window there; every member "
            "uses the nearest probe's step size. Pass a larger `weight_decay` (more "
            f"forgetting at a stable step size) than {record.weight_decay:g}, or a "
            "`learning_rate` in between."
        )
    if above:
        largest = max(above, key=lambda p: p.learning_rate)
        return (
            f"no step size put members in the fit window ({window}): even lr "
            f"{largest.learning_rate:.3g} kept {largest.relative_fit:.0%}. Few labels to "
            "forget, or a model that holds them firmly: pass a larger `learning_rate` or "
            "`weight_decay` if you expect wrong labels."
        )
    smallest = min(below, key=lambda p: p.learning_rate)
    return (
        f"no step size put members in the fit window ({window}): even lr "
        f"{smallest.learning_rate:.3g} left {smallest.relative_fit:.0%}. Pass a smaller "
        "`learning_rate`."
    )


def _saved(fig, path):
    """`fig`, written to `path` as a PNG first when a path is given."""
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


@dataclasses.dataclass
class Uncertainty:
    """How much the scores and the flagged set depend on the finite ensemble.

    Computed by resampling the M members with replacement (bootstrap).

    Attributes:
        score_stderr: `(N,)` bootstrap standard error of each score.
        flag_frequency: `(N,)` fraction of resamples in which each row is flagged
            (threshold recomputed each time); near 0 or 1 means a stable decision.
        stability: Mean Jaccard similarity between the flagged set of a resample
            and the reported flagged set (1.0 = identical every time).
        stability_by_members: `{m: mean Jaccard}` for resamples of m members,
            m <= M, showing how stability grows with ensemble size.
        suggested_members: Smallest ensemble size predicted to reach a
            stability of `target` (from a 1 − c/m fit), at least the current M
            when the current stability is below target.
        target: The stability target used. Defaults to 0.95 in `uncertainty`.
    """

    score_stderr: np.ndarray
    flag_frequency: np.ndarray
    stability: float
    stability_by_members: dict
    suggested_members: int
    target: float


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The share of the `k` highest of `a` that are among the `k` highest of `b`.

    >>> _top_overlap(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0, 4.0]), 2)
    0.5
    """
    top_a = np.argsort(-np.asarray(a), kind="stable")[:k]
    top_b = np.argsort(-np.asarray(b), kind="stable")[:k]
    return len(np.intersect1d(top_a, top_b)) / k


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclasses.dataclass
class NoisyLabelReport:
    """The result of `detect_noisy`, in dataset order.

    Attributes:
        scores: `(N,)` the score of `score_method` (see `detect_noisy`);
            **higher = more likely mislabeled**.
        threshold: Cut on `scores`; rows strictly above it are flagged.
        noisy_mask: `(N,)` bool, True for flagged rows.
        deviations: `(N, M)` loss deviations Δ(z, m).
        reference_losses: `(N,)` loss of the trained model ℓ(z, θ*).
        labels: Labels in dataset order.
        predictions: θ*'s outputs in dataset order (logits or probabilities,
            as the model returns them).
        threshold_method: How `threshold` was chosen.
        record: The ensemble's `CollectionRecord` (None for one built by hand).
        loss_kind: Kind of loss ("sparse_categorical_crossentropy", ...).
        from_logits: Whether `predictions` are logits.
        ensemble: The `GeometricEnsemble` that produced the scores (also when
            `detect_noisy` collected it from a model), or None.
        score_method: "member_margin", "member_loss" or "self_influence" (see
            `detect_noisy`).
        member_losses: `(N, M)` ℓ(z, θ_m) when `score_method` is
            "member_margin" or "member_loss", else None.
        contradicted: `(N,)` bool, True where the members' mean prediction
            is not the given label (`ensemble_probs`); a named threshold never
            flags more rows than it holds. None for a loss that is not
            classification.
    """

    scores: np.ndarray
    threshold: float
    noisy_mask: np.ndarray
    deviations: np.ndarray
    reference_losses: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray | None
    threshold_method: object
    record: CollectionRecord | None
    loss_kind: str = "other"
    from_logits: bool = False
    score_method: str = "self_influence"
    member_losses: np.ndarray | None = dataclasses.field(default=None, repr=False)
    contradicted: np.ndarray | None = dataclasses.field(default=None, repr=False)
    ensemble: object = dataclasses.field(default=None, repr=False, compare=False)
    _ensemble_probs: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def info(self) -> dict:
        """`record` as a plain dict (empty without a record)."""
        return self.record.to_dict() if self.record is not None else {}

    @property
    def num_flagged(self) -> int:
        return int(self.noisy_mask.sum())

    @property
    def noisy_indices(self) -> np.ndarray:
        """Flagged row indices, highest score (most suspect) first."""
        idx = np.flatnonzero(self.noisy_mask)
        return idx[np.argsort(-self.scores[idx], kind="stable")]

    def ranking(self) -> np.ndarray:
        """All row indices, highest score (most suspect) first."""
        return np.argsort(-self.scores, kind="stable")

    def pred_probs(self) -> np.ndarray:
        """θ*'s predicted probabilities `(N, K)` (softmax/sigmoid applied if logits)."""
        if self.predictions is None:
            raise ValueError("This report holds no predictions.")
        p = np.asarray(self.predictions, dtype=np.float64)
        if not self.from_logits:
            return p
        if self.loss_kind == "binary_crossentropy":
            return 1.0 / (1.0 + np.exp(-p))
        return _softmax(p)

    def ensemble_probs(self) -> np.ndarray:
        """The GE members' mean predicted probabilities `(N, K)`, in dataset order.

        Computed while scoring, from the same forward passes as the members'
        losses. On a memorising θ* the model's own prediction on a
        mislabeled row is the given label; the fine-tuned members have partly
        forgotten it, so their mean points to the class the input looks like
        (docs/design.md#relabeling-from-the-members).

        Raises:
            ValueError: If the report holds no members' predictions (built by
                hand, or for a loss that is not classification).
        """
        if self._ensemble_probs is None:
            raise ValueError(
                "This report holds no ensemble predictions; build it with "
                "`keras_gex.detect_noisy` on a classification loss."
            )
        return np.asarray(self._ensemble_probs, dtype=np.float64)

    def _uses_ensemble(self, source: str) -> bool:
        """Whether `source` ("auto", "ensemble" or "model") picks the members' probabilities."""
        _validation.one_of("source", source, ("auto", "ensemble", "model"))
        return source == "ensemble" or (source == "auto" and self._has_ensemble_probs())

    def _has_ensemble_probs(self) -> bool:
        return self._ensemble_probs is not None

    def relabeled_targets(self, source: str = "auto") -> np.ndarray:
        """Training targets with flagged rows relabeled.

        Kong et al.'s function for softmax cross-entropy models; distillation
        targets for binary cross-entropy / multi-label. Train on the targets
        with `keras_gex.SoftTargetCrossentropy` (Kong's rows are not
        normalised).

        Args:
            source: Whose probabilities drive the new targets: "ensemble" (the
                GE members' mean, `ensemble_probs`), "model" (θ*, the paper's
                choice, which on a memorising θ* still favours the given label)
                or "auto" (the ensemble when the report has one; see
                docs/design.md#relabeling-from-the-members). Defaults to `"auto"`.

        Returns:
            `(N, K)` float64 targets; unflagged rows keep their one-hot label.
        """
        from_members = self._uses_ensemble(source)
        if self.loss_kind == "binary_crossentropy":
            probs = self.ensemble_probs() if from_members else self.pred_probs()
            return distillation_targets(self.labels, probs, self.noisy_mask)
        if self.loss_kind in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
            if from_members:
                return relabel(self.labels, self.ensemble_probs(), self.noisy_mask)
            if self.predictions is None:
                raise ValueError("This report holds no predictions to relabel with.")
            return relabel(
                self.labels, self.predictions, self.noisy_mask, from_logits=self.from_logits
            )
        raise ValueError(
            f"Relabeling needs a classification loss; this model's loss kind is "
            f"{self.loss_kind!r}. Drop the flagged rows instead "
            "(`~report.noisy_mask`)."
        )

    def suggested_labels(self) -> np.ndarray:
        """A corrected class id per row: the given label, or for flagged rows the
        class the ensemble finds most likely among the others.

        Uses `ensemble_probs` when available, else θ*'s predictions.
        """
        given = self.given_labels()
        probs = self._class_probs(
            self.ensemble_probs() if self._uses_ensemble("auto") else self.pred_probs()
        )
        out = given.astype(np.int64).copy()
        rows = np.flatnonzero(self.noisy_mask)
        probs[rows, given[rows]] = -np.inf
        out[rows] = np.argmax(probs[rows], axis=1)
        return out

    def summary(self, print_fn=print) -> str | None:
        """A readable summary with ensemble diagnostics, printed as Keras'
        `model.summary()` prints.

        Args:
            print_fn: Called with the text. Defaults to `print`; None returns
                the text instead.

        Returns:
            The text when `print_fn` is None, else None (so a notebook cell
            ending in `report.summary()` shows it once).
        """
        n = len(self.scores)
        q = np.quantile(self.scores, [0.5, 0.9, 0.99])
        lines = [
            "GEX noisy-label report",
            f"  examples: {n}   flagged: {self.num_flagged} ({self.num_flagged / n:.1%})",
            f"  threshold: {self.threshold:.4g} ({self._threshold_text()})",
            f"  {self.score_method.replace('_', ' ')}: median {q[0]:.3g}, p90 {q[1]:.3g}, "
            f"p99 {q[2]:.3g}, "
            f"max {self.scores.max():.3g}",
            f"  separability: Otsu η {otsu_separability(self.scores):.3f} (share of the "
            "scores' variance between two groups; higher is a cleaner split)",
        ]
        record = self.record
        if record is not None:
            how = "calibrated" if record.learning_rate_requested == "auto" else "given"
            if how == "calibrated" and not record.calibration:
                how = _uncalibrated(record) or how
            member_lrs = [s.learning_rate for s in record.member_stats]
            kept = [p for p in record.calibration if p.accepted]
            # The probe every member's settings come from (member 1): the nearest kept.
            kept_lr = closest_to_window(kept).learning_rate if kept else None
            if kept_lr is not None and kept_lr != record.learning_rate:
                how += f" at {kept_lr:.4g}"
            if member_lrs and max(member_lrs) > min(member_lrs):
                # Members were run again smaller: `lr` is their median.
                lo, hi = min(member_lrs), max(member_lrs)
                how += f"; members {lo:.4g}-{hi:.4g}, lr is their median"
            steps_how = " (auto)" if record.steps_requested == "auto" else ""
            members_how = ""
            if record.num_members_requested == "auto":
                members_how = " (auto"
                if record.trained_steps is not None:
                    members_how += f", θ* trained {record.trained_steps} steps"
                members_how += ")"
            lines.append(
                f"  ensemble: M={record.num_members} members{members_how}, T={record.steps} "
                f"steps{steps_how}, lr={record.learning_rate:.4g} ({how}), "
                f"weight decay {record.weight_decay:g}{_decay_spread(record)}, "
                f"batch {record.batch_size}"
            )
            loss = getattr(self.ensemble, "loss", None)
            if loss is not None and loss.inferred:
                on = "logits" if loss.from_logits else "probabilities"
                lines.append(
                    f"  loss: {loss.name!r}, user code read from its outputs and labels as "
                    f"{loss.kind.replace('_', ' ')} on {on}"
                )
            if record.frozen_layers:
                lines.append(
                    f"  frozen layers computed once for every member: "
                    f"{layer_list(record.frozen_layers)}"
                )
            # What a member's relative fit is a share of (`step_size.relative_fit`).
            share = (
                "share of θ*'s fit above chance kept"
                if self.loss_kind in CLASSIFICATION_KINDS
                else "share of θ*'s loss explained kept"
            )
            if record.calibration:
                # A regression's step size is probed for stability, its decay for the
                # window (`step_size.calibrate(..., forget_by_decay=True)`).
                kept = share
                if self.loss_kind not in CLASSIFICATION_KINDS:
                    kept += "; the step size probed for stability, the decay for the window"
                lines.append(
                    f"  calibration probes (lr → {kept}): "
                    + ", ".join(
                        _probe_text(p, record.calibration[0].weight_decay, record.steps)
                        for p in record.calibration
                    )
                )
            ref = record.reference_stats
            if record.member_stats:
                fits = [s.fit for s in record.member_stats if s.fit is not None]
                losses = [s.loss for s in record.member_stats]
                text = f"  members: mean loss {np.mean(losses):.4f}"
                if ref is not None:
                    text += f" (θ*: {ref.loss:.4f})"
                if fits and ref is not None and ref.fit:
                    # Regression: the share of the mean target's loss explained (R²).
                    fit = "fit" if self.loss_kind in CLASSIFICATION_KINDS else "loss explained"
                    text += f", {fit} {np.mean(fits):.3f} (θ*: {ref.fit:.3f})"
                lines.append(text)
                each = _member_fits(record.member_stats, ref, record.chance_fit, share)
                if each is not None:
                    lines.append(each)
            redone = record.redone_members
            if any(redone.values()):
                lines.append(
                    f"  members run again: {redone.get('collapsed', 0)} after falling below "
                    f"the fit window (on another batch order), {redone.get('diverged', 0)} "
                    "after diverging (at a smaller step size); the discarded runs are not in "
                    "the ensemble"
                )
            for warning in self.diagnostics():
                lines.append(f"  WARNING: {warning}")
        text = "\n".join(lines)
        if print_fn is None:
            return text
        print_fn(text)
        return None

    def with_threshold(self, threshold="auto", *, capped: bool = True) -> NoisyLabelReport:
        """This report cut at another threshold, on the same scores.

        Nothing is fine-tuned or scored again: the new report shares every
        array but `noisy_mask` with this one.

        Args:
            threshold: A named rule of `detect_noisy`'s `threshold`
                ("min_error", "otsu", either followed by "_sqrt", "_cbrt",
                "_root4" or "_log"), "auto" (the rule `detect_noisy` uses for
                this report's `score_method`) or a number (a cut on `scores`).
                As in `detect_noisy`, a named rule on the member margin cuts
                the member loss and flags as many rows from the top of the
                margin. Defaults to `"auto"`.
            capped: Whether a named rule flags at most the rows whose label
                the members' mean prediction contradicts (`contradicted`), as
                `detect_noisy` does. Defaults to `True`.

        Returns:
            A `NoisyLabelReport` with the new `threshold`, `noisy_mask` and
            `threshold_method`.

        Raises:
            ValueError: For an unknown rule, a threshold that is not a finite
                number, or a named rule on a member-margin report without
                `member_losses` (one built by hand).
            TypeError: If `capped` is not a bool.
        """
        if not isinstance(capped, bool):
            raise TypeError(f"Argument `capped` must be a bool. Received: capped={capped!r}")
        count_scores = None  # a number cuts `scores` itself
        if isinstance(threshold, str):
            _validation.one_of("threshold", threshold, ("auto", *METHODS))
            if threshold == "auto":
                threshold = DEFAULT_THRESHOLDS[self.score_method]
            if self.score_method == "member_margin" and self.member_losses is None:
                raise ValueError(
                    f"A named threshold ({threshold!r}) on the member margin counts the "
                    "flagged rows on the member loss, and this report holds no "
                    "`member_losses`. Pass a number (a cut on `scores`)."
                )
            count_scores = self._count_scores()
        cut = cut_scores(
            self.scores,
            threshold,
            max_flagged=self._max_flagged if capped else None,
            count_scores=count_scores,
        )
        return dataclasses.replace(
            self,
            threshold=cut,
            noisy_mask=np.asarray(self.scores) > cut,
            threshold_method=threshold,
        )

    def _uncapped_cut(self):
        """The named threshold method's cut without the contradicted-label cap, or None."""
        method = self.threshold_method
        if not isinstance(method, str) or not len(self.scores):
            return None
        if self.score_method == "member_margin" and self.member_losses is None:
            return None  # built by hand without what the rule counts
        return cut_scores(self.scores, method, count_scores=self._count_scores())

    def _count_scores(self):
        """`(N,)` what a named rule cuts to count the flagged rows, where not `scores`.

        For "member_margin", the member loss (`scores.cut_scores`).
        """
        if self.score_method != "member_margin":
            return None
        return np.mean(self._member_losses(), axis=1)

    def _member_losses(self) -> np.ndarray:
        if self.member_losses is None:
            raise ValueError(f'A "{self.score_method}" report must hold `member_losses`.')
        return np.asarray(self.member_losses, dtype=np.float64)

    def _threshold_text(self) -> str:
        """How the threshold was chosen, and whether the contradicted-label cap raised it."""
        method = self.threshold_method
        uncapped = self._uncapped_cut()
        if uncapped is not None and self.score_method == "member_margin":
            method = f"{method} on the member loss, as many from the top of the margin"
        if uncapped is None or self._max_flagged is None:
            return str(method)
        if self.threshold <= uncapped:
            return method
        return (
            f"{method}, raised from {uncapped:.4g}, which flagged "
            f"{int(np.sum(self.scores > uncapped))}: the members' mean prediction "
            f"contradicts only {self._max_flagged} given labels"
        )

    def diagnostics(self) -> list:
        """Warnings about the ensemble that make scores less trustworthy."""
        out = []
        record = self.record
        stats = record.member_stats if record is not None else []
        ref = record.reference_stats if record is not None else None
        window = record.fit_window if record is not None else None
        chance = record.chance_fit if record is not None else None
        ref_fit = ref.fit if ref is not None else None
        unfinished = False  # members fit θ*'s data better than θ*: it had not finished training
        stale = record.stale_batchnorm() if record is not None else None
        if stale is not None:  # the saved model is not the one scored
            out.append(stale)
        # Relative fit is a share of what θ* fits above chance: undefined where θ*
        # fits no better than chance (calibration says so and keeps a fixed step).
        if stats and window and chance is not None and why_uncalibrated(ref_fit, chance) is None:
            regression = chance == 0.0  # the fit is the share of the loss explained
            wrong = "corrupted targets" if regression else "wrong labels"

            def share(verb: str, amount: str) -> str:
                """`verb amount` of what a relative fit is a share of, for this loss."""
                if regression:
                    return f"{'keep' if verb == 'fit' else verb} {amount} of θ*'s loss explained"
                return f"{verb} {amount} of what θ* fits above chance"

            rel = [relative_fit(s, ref, chance) for s in stats if s.fit is not None]
            unfinished = bool(rel) and beyond_theta(float(np.mean(rel)))
            if unfinished:
                out.append(self._unfinished_text(share("fit", f"{np.mean(rel):.0%}"), regression))
            elif rel and np.mean(rel) > window[1]:
                out.append(
                    f"members still {share('fit', f'{np.mean(rel):.1%}')}: "
                    "they barely left θ*, so their scores rank rows much like θ*'s own loss "
                    f"(`report.reference_losses`). With few {wrong} that is expected; "
                    "otherwise increase `learning_rate` or `weight_decay`."
                )
            if rel and np.mean(rel) < window[0]:
                out.append(
                    f"members {share('fit', f'only {np.mean(rel):.1%}')}: fine-tuning moved "
                    f"them towards {'the mean target' if regression else 'chance'}, so their "
                    "scores rank rows close to at random; decrease `learning_rate`."
                )
            scatter = None if unfinished else member_scatter(stats, ref, chance, window)
            if scatter is not None:
                lr_low, lr_high, lowest, highest = scatter
                at, decide = f"{lr_low:.3g}", "decides"
                if lr_low != lr_high:  # a member run again at a smaller step size among them
                    at = f"{lr_low:.3g} to {lr_high:.3g}"
                    decide = "(and the smaller step size of a member run again) decide"
                out.append(
                    f"members fine-tuned alike landed far apart: at lr {at} they "
                    f"{share('kept', f'{lowest:.0%} to {highest:.0%}')}. The fit "
                    "falls steeply near this step size and each member's batch order "
                    f"{decide} "
                    "how much it forgets, so the scores mix members that still hold memorised "
                    "labels with members that do not (as on models that memorise through a "
                    "learned embedding table, text models among them). Check the flagged set's "
                    "stability with `report.uncertainty()`, and compare the ranking with "
                    "models trained briefly from scratch: `keras_gex.baselines.el2n_scores("
                    "model, x, y, epochs=...)` (or `(model, dataset, epochs=...)`) with about "
                    "a tenth of the epochs it trained for."
                )
        if chance == 0.0 or unfinished:  # the share of loss explained; or said above
            ref_fit = None
        if (
            ref_fit is not None
            and ref_fit < MEMORISED_FIT
            and self.score_method == "self_influence"
        ):
            out.append(
                f"θ* predicts only {ref_fit:.1%} of its training labels: it has not memorised "
                "its training set, which GEX self-influence assumes (on such a model it can "
                "rank mislabeled rows below chance while their loss ranks them well). Rank by "
                'the default `score="auto"` (the member loss or margin), train longer, or rank by '
                "`report.reference_losses` as well."
            )
        elif ref_fit is not None and ref_fit < MEMORISED_FIT:
            k = max(self.num_flagged, 1)
            shared = _top_overlap(self.scores, self.reference_losses, k)
            out.append(
                f"θ* predicts only {ref_fit:.1%} of its training labels: labels it never "
                "fitted rank high by their loss alone, mislabeled or merely hard. Where "
                "dropout, augmentation or weight decay kept θ* from fitting its wrong labels, "
                "θ*'s own loss (`report.reference_losses`) can rank them as well as the "
                "members or better (docs/design.md#fit-window); where it stopped before "
                "fitting hard correct labels, the members rank better. The two rankings "
                f"share {shared:.0%} of their top {k} rows; compare the rows they disagree on."
            )
        flagged = float(np.mean(self.noisy_mask)) if len(self.noisy_mask) else 0.0
        # The cut before the cap to the contradicted labels: a majority above it means
        # the scores have no minority group of high scores, whatever the cap kept.
        uncapped = self._uncapped_cut()
        cut = flagged if uncapped is None else max(flagged, float(np.mean(self.scores > uncapped)))
        if cut > 0.5:
            where = (
                f"the threshold flags {flagged:.0%} of the rows"
                if flagged > 0.5
                else f"the {self.threshold_method} cut flags {cut:.0%} of the rows (the "
                "threshold, capped at the labels the members' mean prediction contradicts, "
                f"{flagged:.0%})"
            )
            out.append(
                f"{where}: wrong labels cannot be the majority, so the scores hold no "
                "separate group of wrong labels here: most rows score high. Either the inputs "
                "barely predict the labels (members that keep what the data supports "
                "contradict many correct labels) or the labels are mostly wrong. The flagged "
                "set is mostly correct labels; review `report.ranking()` from the top instead, "
                "compare with `report.reference_losses`, and where the inputs predict the "
                "labels poorly, rank by models trained briefly from scratch, which fit what the "
                "data supports before they memorise the rest: `keras_gex.baselines."
                "el2n_scores(model, x, y, epochs=...)` (or `(model, dataset, epochs=...)`; "
                "fresh copies of the model) with about a tenth of the epochs it trained for, or "
                "by a cross-validated model's loss of the given label."
            )
        # A search that found no window around an unfinished θ* is said above.
        miss = calibration_miss(record) if record is not None and not unfinished else None
        if miss is not None:
            out.append(miss)
        spread = np.std(self.deviations)
        if spread == 0:
            out.append("all loss deviations are zero: the members equal θ*.")
        return out

    def _unfinished_text(self, relative: str, regression: bool) -> str:
        """The diagnostic for members that fit θ*'s data better than θ* (`beyond_theta`);
        `relative` says their relative fit in words ("fit 1479% of ...")."""
        record = self.record
        fits = [s.fit for s in record.member_stats if s.fit is not None]
        if regression:
            how = (
                f"explain {np.mean(fits):.1%} of the loss of predicting the mean target "
                f"where θ* explains {record.reference_stats.fit:.1%}"
            )
        else:
            how = (
                f"predict {np.mean(fits):.1%} of its training labels where θ* predicts "
                f"{record.reference_stats.fit:.1%}"
            )
        return (
            f"θ* has not finished training: its members, fine-tuned from it at lr "
            f"{record.learning_rate:.3g}, {how} (they {relative}). GEX explains "
            "the final model of a finished training run, whose members "
            "forget what it memorised; members of this θ* went on training it instead, so "
            "their scores are those of models that kept training, not a measure of what θ* "
            "memorised, and no step size changes that. Train the model until its training "
            "loss stops falling, then run GEX again."
        )

    def plot(self, *, log_x: bool = True, known_noisy=None, ax=None, path=None):
        """Histogram of the scores with the threshold; saves a PNG if `path`.

        Args:
            log_x: Log-scaled score axis. Defaults to `True`.
            known_noisy: Optional ground-truth mask to outline. Defaults to `None`.
            ax: Matplotlib axes to draw on. Defaults to `None`.
            path: File to save the figure to. Defaults to `None`.

        Returns:
            The matplotlib `Figure`.
        """
        fig = plot_self_influence(
            self.scores,
            self.threshold,
            noisy_mask=self.noisy_mask,
            known_noisy=known_noisy,
            log_x=log_x,
            ax=ax,
            score=self.score_method,
        )
        return _saved(fig, path)

    def uncertainty(
        self, *, num_resamples: int = 200, target: float = 0.95, seed: int = 0
    ) -> Uncertainty:
        """Bootstrap over members: score standard errors and flagged-set stability.

        Tells whether M was large enough: if `stability` is low, the flagged set
        would change with another ensemble of the same size;
        `suggested_members` estimates the M that would make it stable. Each
        resample is cut by `threshold_method`, capped at the full ensemble's
        count of `contradicted` labels (for "member_margin", the resample's
        member loss is cut and as many rows flagged from the top of its margin).

        Args:
            num_resamples: Bootstrap resamples. Defaults to `200`.
            target: Stability (mean Jaccard) to aim for. Defaults to `0.95`.
            seed: Seed of the resampling. Defaults to `0`.

        Returns:
            An `Uncertainty`.
        """
        num_resamples = _validation.positive_int("num_resamples", num_resamples)
        target = _validation.fraction("target", target, inclusive_low=False)
        per_member = self._per_member_scores()
        counting = None if self.score_method != "member_margin" else self._member_losses()
        m = per_member.shape[1]
        rng = np.random.default_rng(seed)
        method = self.threshold_method

        def resample(size):
            cols = rng.integers(0, m, size=size)
            scores = per_member[:, cols].mean(axis=1)
            counted = None if counting is None else counting[:, cols].mean(axis=1)
            cut = cut_scores(scores, method, max_flagged=self._max_flagged, count_scores=counted)
            return scores, scores > cut

        samples, flags = [], []
        for _ in range(num_resamples):
            scores, flagged = resample(m)
            samples.append(scores)
            flags.append(flagged)
        samples = np.array(samples)
        flags = np.array(flags)
        by_size = {}
        for size in sorted({max(1, m // 4), max(1, m // 2), m}):
            reps = min(num_resamples, 100)
            by_size[size] = float(
                np.mean([_jaccard(resample(size)[1], self.noisy_mask) for _ in range(reps)])
            )
        stability = float(np.mean([_jaccard(f, self.noisy_mask) for f in flags]))
        # Fit J(m) = 1 - c / m through the measured points; solve for the target.
        sizes = np.array(list(by_size))
        gaps = 1.0 - np.array(list(by_size.values()))
        c = float(np.sum(gaps * (1.0 / sizes)) / np.sum((1.0 / sizes) ** 2))
        needed = m if c <= 0 else int(np.ceil(c / (1.0 - target)))
        suggested = max(needed, m) if stability < target else min(max(needed, 1), m)
        return Uncertainty(
            samples.std(axis=0, ddof=1),
            flags.mean(axis=0),
            stability,
            by_size,
            suggested,
            target,
        )

    @property
    def _max_flagged(self) -> int | None:
        """The cap on a named threshold's flagged rows: the contradicted labels."""
        return None if self.contradicted is None else int(self.contradicted.sum())

    def _per_member_scores(self) -> np.ndarray:
        """`(N, M)` float64 terms whose mean over members is `scores`.

        For "member_margin" the likeliest other class is read from the full
        ensemble's mean prediction, the same for every resample.
        """
        if self.score_method == "self_influence":
            return score_terms(self.score_method, self.deviations, None)
        other = None
        if self.score_method == "member_margin":
            other = other_class_log_probs(self.loss_kind, self.labels, self.ensemble_probs())
        return score_terms(self.score_method, None, self._member_losses(), other)

    def predicted_labels(self) -> np.ndarray:
        """θ*'s predicted class per row (the most likely class; 0/1 for one sigmoid output)."""
        if self.predictions is None:
            raise ValueError("This report holds no predictions.")
        return np.argmax(self._class_probs(self.pred_probs()), axis=-1)

    def given_labels(self) -> np.ndarray:
        """Given labels as class ids (int64): sparse ids as integers (`fit` takes them
        as floats or booleans too), the arg-max of one-hot labels, 0/1 for one
        sigmoid output.

        Raises:
            ValueError: Where a row has no single class (a regression, a
                multi-label sigmoid output, a tagger's labels per position).
        """
        labels = np.asarray(self.labels)
        self._one_class_per_row(labels)
        return class_ids(self.loss_kind, labels).reshape(len(labels))

    def _one_class_per_row(self, labels) -> None:
        """Refuses class ids where a row of `labels` has none or several."""
        if self.loss_kind not in CLASSIFICATION_KINDS:
            raise ValueError(
                f"Class ids need a classification loss; this model's loss kind is "
                f"{self.loss_kind!r}."
            )
        if not exclusive_classes(self.loss_kind, labels):
            raise ValueError(
                f"Class ids need one class per row; these labels have shape {labels.shape} "
                "(several labels per row: multi-label sigmoid outputs or labels per "
                "position). Use the scores and `noisy_mask`, or `relabeled_targets()`."
            )

    def _class_probs(self, probs) -> np.ndarray:
        """`(N, K)` class probabilities: one sigmoid output `p` as the two classes `(1 − p, p)`."""
        self._one_class_per_row(np.asarray(self.labels))
        probs = np.asarray(probs, dtype=np.float64)
        if self.loss_kind == "binary_crossentropy":
            p = probs.reshape(len(probs), 1)
            return np.concatenate([1.0 - p, p], axis=1)
        return probs.reshape(len(probs), -1).copy()

    def plot_gallery(self, images, *, k=16, class_names=None, image_shape=None, path=None):
        """The `k` most suspect images, captioned "given → suggested".

        The suggestion is `suggested_labels()` for flagged rows (the class the
        ensemble prefers besides the given one); unflagged rows show the given
        label on both sides.

        Args:
            images: The training inputs, in the scored order.
            k: Number of images. Defaults to `16`.
            class_names: Names indexed by class id. Defaults to `None`.
            image_shape: Shape to reshape flat inputs to. Defaults to `None`.
            path: File to save the PNG to. Defaults to `None`.

        Returns:
            The matplotlib `Figure`.
        """
        labels = (self.given_labels(), self.suggested_labels())
        options = dict(class_names=class_names, image_shape=image_shape, score=self.score_method)
        return _saved(plot_gallery(images, self.scores, *labels, k=k, **options), path)
