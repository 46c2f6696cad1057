"""The fine-tuning settings of a collection, and the typed record of what it did.

`CollectionConfig` is validated once, where it is built, so the callback fails
at construction (before hours of `fit`) for exactly what a post-hoc collection
would refuse. `CollectionRecord` is what a collection did; it is saved in the
ensemble's manifest as a plain dict (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import numbers

from keras_gex import _validation


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """How the geometric ensemble is fine-tuned from θ*.

    Example:

    ```python
    config = keras_gex.CollectionConfig(num_members=16, seed=0)
    collector = keras_gex.GEXCollector((x, y), config)
    ensemble = keras_gex.GeometricEnsemble.collect(model, (x, y), config, num_members=4)
    ```

    Args:
        num_members: Number of GE members M, or `"auto"`: 8, and fewer (at
            least 4) where 8 members, the step-size calibration and the members
            run again (collapsed or diverged) would take more SGD steps than
            θ*'s training did (`model.optimizer.iterations`), so that
            collection costs about one training run; the steps per member are
            never cut for it (a step on frozen layers' features computed once
            counts as the head's share of a training step). More members cost proportionally more;
            `report.uncertainty()` says whether the flagged set needs more.
            Defaults to `"auto"`.
        steps: SGD steps T per member, or `"auto"`: about 10 epochs of the
            training data, at least 50 and at most 800 steps. Defaults to `"auto"`.
        learning_rate: Peak step size of the cosine schedule, or `"auto"` to
            calibrate it from the members' own training fit so that they leave
            θ*'s memorising basin without collapsing. Defaults to `"auto"`.
        batch_size: Fine-tuning mini-batch size (global, across replicas).
            Defaults to `128`.
        momentum: SGD momentum, in [0, 1). Defaults to `0.9`.
        weight_decay: Decoupled weight decay λ of the members' SGD: every
            step shrinks the weights by `learning_rate × λ`, so what only a
            few examples hold is forgotten while the rest of the data restores
            what it supports. `"auto"` starts at 0.1 and, with
            `learning_rate="auto"`, calibration raises it where the step size
            cannot forget: at SGD's stability edge, and for every regression;
            where members forget by being shrunk (their fit still falls in the
            schedule's tail) it quarters it at four times the step size
            (docs/design.md#member-rule). Defaults to `"auto"`.
        seed: Seed of the members' mini-batch shuffling; `None` draws one
            from NumPy's global generator (which `keras.utils.set_random_seed`
            seeds, so a seeded script gives the same members every run) and
            records it in `ensemble.record.seed`. Defaults to `None`.
        chain: Start each member from the previous one instead of θ*.
            Defaults to `False`.
        bn_batches: Batches used to re-estimate the BatchNorm statistics of
            every member (and of θ* as scored). Defaults to `20`.
        jit_compile: Compile the fine-tuning loop with XLA (array inputs, one
            device): `True`, `False` or `"auto"` (on an accelerator, for models
            without convolution or pooling layers; never on CPU). If XLA cannot
            compile the model the members are fine-tuned without it and a
            warning says so. Defaults to `"auto"`.
        frozen_features: Compute the model's leading frozen layers (e.g. a
            backbone with `trainable=False`) once and fine-tune the members
            on their outputs: the same members up to float rounding, in a
            fraction of the time where those layers dominate a step. `False`
            runs them at every step. Defaults to `True`.
    """

    num_members: int | str = "auto"
    steps: int | str = "auto"
    learning_rate: float | str = "auto"
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float | str = "auto"
    seed: int | None = None
    chain: bool = False
    bn_batches: int = 20
    jit_compile: bool | str = "auto"
    frozen_features: bool = True

    def __post_init__(self):
        learning_rate = self.learning_rate
        if learning_rate != "auto":
            learning_rate = _validation.positive_float("learning_rate", learning_rate)
        momentum = self.momentum
        if isinstance(momentum, bool) or not (
            isinstance(momentum, numbers.Real) and 0 <= momentum < 1
        ):
            raise ValueError(
                f"Argument `momentum` must be a number in [0, 1). Received: momentum={momentum!r}"
            )
        if not isinstance(self.chain, bool):
            raise ValueError(f"Argument `chain` must be a bool. Received: chain={self.chain!r}")
        if not isinstance(self.frozen_features, bool):
            raise ValueError(
                "Argument `frozen_features` must be a bool. "
                f"Received: frozen_features={self.frozen_features!r}"
            )
        if not (isinstance(self.jit_compile, bool) or self.jit_compile == "auto"):
            raise ValueError(
                'Argument `jit_compile` must be True, False or "auto". '
                f"Received: jit_compile={self.jit_compile!r}"
            )
        normalised = dict(
            num_members=_auto_or_positive_int("num_members", self.num_members),
            steps=_auto_or_positive_int("steps", self.steps),
            learning_rate=learning_rate,
            batch_size=_validation.positive_int("batch_size", self.batch_size),
            momentum=float(momentum),
            weight_decay=_weight_decay_value(self.weight_decay),
            seed=_validation.seed_value(self.seed),
            bn_batches=_validation.non_negative_int("bn_batches", self.bn_batches),
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(cls, config: CollectionConfig | None = None, **overrides) -> CollectionConfig:
        """`config` (or the defaults) with keyword `overrides` applied, validated.

        >>> CollectionConfig.resolve(None, num_members=4).num_members
        4
        >>> CollectionConfig.resolve(CollectionConfig(seed=1), steps=20).seed
        1
        """
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(
                "Argument `config` must be a `keras_gex.CollectionConfig` or None. "
                f"Received: config of type {type(config).__name__}"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"Unknown collection setting(s) {unknown}. The settings are {sorted(names)}."
            )
        return dataclasses.replace(config, **overrides) if overrides else config


def _weight_decay_value(weight_decay) -> float | str:
    """`weight_decay` as a non-negative float, or `"auto"`."""
    if isinstance(weight_decay, str) and weight_decay == "auto":
        return "auto"
    try:
        return _validation.non_negative_float("weight_decay", weight_decay)
    except ValueError:
        raise ValueError(
            'Argument `weight_decay` must be a non-negative number or "auto". '
            f"Received: weight_decay={weight_decay!r}"
        ) from None


def _auto_or_positive_int(name: str, value) -> int | str:
    """`value` as a positive int, or `"auto"`."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, str):
        raise ValueError(
            f'Argument `{name}` must be a positive integer or "auto". Received: {name}={value!r}'
        )
    return _validation.positive_int(name, value)


@dataclasses.dataclass
class MemberStats:
    """Diagnostics of one fine-tuned member (or of θ*).

    Attributes:
        learning_rate: Peak step size used.
        train_loss: Mean training objective over the last 10% of steps.
        fit: Fraction of evaluation examples whose given label the member
            predicts (classification losses), or None.
        loss: Mean per-example loss on the evaluation examples (inference mode).
        finite: Whether every fine-tuning loss and weight was finite.
        weight_decay: Decoupled weight decay λ it was fine-tuned with (None for
            θ* and in records written before members could differ in it).
    """

    learning_rate: float
    train_loss: float
    fit: float | None
    loss: float
    finite: bool = True
    weight_decay: float | None = None


@dataclasses.dataclass
class Probe:
    """One calibration probe: a member fine-tuned at a trial step size.

    Attributes:
        learning_rate: The trial step size.
        relative_fit: The fit it kept above chance, as a fraction of θ*'s (0 if
            it diverged).
        loss: Its mean evaluation loss.
        seconds: Wall time of the probe.
        accepted: Whether it was kept as a member. The probe that landed in
            the fit window (or, where none did, the one nearest it if it ran
            its whole schedule) is member 0, every member using its step size
            and decay; another probe that ran whole and that the member gate
            would keep (it ended inside or above the window: a step up
            replaced it, or its fit was regained in the tail) is kept as a
            member at its own settings.
        midway_fit: Relative fit halfway through its steps, where measured.
        abandoned: Whether it was stopped early (halfway or at three quarters)
            as hopeless; `relative_fit` is then the fit there.
        steps: SGD steps it ran.
        weight_decay: The decay λ it ran with (None in records written before
            calibration could raise it).
    """

    learning_rate: float
    relative_fit: float
    loss: float
    seconds: float = 0.0
    accepted: bool = False
    midway_fit: float | None = None
    abandoned: bool = False
    steps: int | None = None
    weight_decay: float | None = None


@dataclasses.dataclass
class CollectionRecord:
    """What a collection did: settings used, calibration probes, member diagnostics.

    `ensemble.record` gives it typed; `ensemble.info` is the same as a plain
    dict (`to_dict`), as written to the manifest.

    Attributes:
        num_members: Members collected; `num_members_requested` what was asked
            ("auto" or a number).
        trained_steps: θ*'s optimizer steps (`model.optimizer.iterations`), the
            budget of `num_members="auto"`; None where the model did not say.
        steps: SGD steps per member; `steps_requested` what was asked ("auto" or a number).
        learning_rate: The members' median step size; `learning_rate_requested`
            what was asked ("auto" or a number).
        batch_size, momentum, seed, chain, bn_batches: The settings used
            (`seed` is the one drawn when none was given).
        loss: Name of the per-example loss.
        calibration: The step-size calibration's probes (`Probe`), in order.
        jit_compile: Whether the fine-tuning loop ran under XLA.
        reference_stats: `MemberStats` of θ* as scored.
        member_stats: `MemberStats` of every member, in order.
        fit_window: The relative-fit window calibration aims members into.
        chance_fit: The fit of chance the relative fits are measured from (the
            most common label's share; 0 for other losses), None when no fit
            was measured.
        seconds: Wall time of the collection; `warmup_seconds` of it traced the loop.
        redone_members: Members run again in this call: `{"collapsed": n, "diverged": n}`.
        steps_run: SGD steps this call ran, summed over members, probes and
            runs redone (the warm-up's one step at step size 0 excluded).
        strategy: The `tf.distribute` set-up, or None on one device.
        weight_decay: The members' decoupled weight decay λ.
        frozen_layers: The leading frozen layers computed once for every
            member (`CollectionConfig.frozen_features`), or None.
        reference_moving_fit: θ*'s fit with its own BatchNorm moving statistics,
            as `model.predict` runs it (`reference_stats` is with statistics
            re-estimated on the training data); None without BatchNorm.
    """

    num_members: int
    steps: int
    steps_requested: int | str
    learning_rate: float
    learning_rate_requested: float | str
    batch_size: int
    momentum: float
    seed: int | None
    chain: bool
    bn_batches: int
    loss: str
    calibration: list = dataclasses.field(default_factory=list)
    jit_compile: bool = False
    reference_stats: MemberStats | None = None
    member_stats: list = dataclasses.field(default_factory=list)
    fit_window: tuple = ()
    chance_fit: float | None = None
    seconds: float = 0.0
    warmup_seconds: float = 0.0
    redone_members: dict = dataclasses.field(default_factory=dict)
    steps_run: int = 0
    strategy: dict | None = None
    weight_decay: float = 0.0
    frozen_layers: list | None = None
    num_members_requested: int | str | None = None
    trained_steps: int | None = None
    reference_moving_fit: float | None = None

    def to_dict(self) -> dict:
        """The record as plain JSON-able values (`ensemble.info`, the manifest)."""
        out = dataclasses.asdict(self)
        if self.strategy is None:
            del out["strategy"]
        return out

    def stale_batchnorm(self) -> str | None:
        """Why θ* as saved predicts far worse than as scored, or None
        (`stale_batchnorm`).

        >>> record = CollectionRecord.from_dict({"reference_stats": {"fit": 0.914,
        ...     "loss": 0.27}, "chance_fit": 0.1, "fit_window": (0.2, 0.9),
        ...     "reference_moving_fit": 0.091})
        >>> record.stale_batchnorm().startswith("θ*'s BatchNorm moving statistics do not")
        True
        """
        ref = self.reference_stats
        if ref is None or not self.fit_window:
            return None
        return stale_batchnorm(
            self.reference_moving_fit, ref.fit, self.chance_fit, self.fit_window[0]
        )

    @classmethod
    def from_dict(cls, info: dict) -> CollectionRecord:
        """The record of a saved `info` dict (manifests of earlier versions too).

        >>> record = CollectionRecord.from_dict({"steps": 50, "calibration": [
        ...     {"learning_rate": 0.1, "relative_fit": 0.8, "loss": 1.0, "accepted": True}]})
        >>> record.calibration[0].accepted, record.member_stats
        (True, [])
        """
        names = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in info.items() if k in names}
        probe_names = {field.name for field in dataclasses.fields(Probe)}
        values["calibration"] = [
            Probe(**{k: v for k, v in p.items() if k in probe_names})
            for p in info.get("calibration") or []
        ]
        values["member_stats"] = [_stats(s) for s in info.get("member_stats") or []]
        values["reference_stats"] = (
            _stats(info["reference_stats"]) if info.get("reference_stats") else None
        )
        values["fit_window"] = tuple(info.get("fit_window") or ())
        for name in ("num_members", "steps", "batch_size", "bn_batches"):
            values.setdefault(name, None)
        for name in ("steps_requested", "learning_rate_requested", "learning_rate"):
            values.setdefault(name, None)
        values.setdefault("momentum", None)
        values.setdefault("seed", None)
        values.setdefault("chain", False)
        values.setdefault("loss", "")
        return cls(**values)


def stale_batchnorm(moving_fit, fit, chance, floor: float) -> str | None:
    """Why θ* as saved predicts far worse than as scored, or None.

    θ* is scored with BatchNorm statistics re-estimated on the training data
    (docs/design.md#batchnorm-re-estimation). Where its own moving statistics
    keep less of that `fit` above `chance` than the fit window's `floor` (what
    a collapsed member keeps), they do not describe the data: the report is
    about a model that predicts well, and the saved one does not.

    >>> stale_batchnorm(0.85, 0.914, 0.1, 0.2) is None
    True
    >>> print(stale_batchnorm(0.091, 0.914, 0.1, 0.2).split(": ")[1])
    with them (as `model.predict` runs it) θ* predicts 9.1% of its training labels, with \
statistics re-estimated on that data 91.4%. GEX scores θ* and its members with re-estimated \
statistics, so the report describes the model that predicts well; the saved model does not. \
Re-estimate its statistics on the training data, or train with a smaller BatchNorm `momentum` \
(statistics of momentum 0.999 need thousands of steps), before using its predictions.
    """
    if moving_fit is None or fit is None or chance is None or fit <= chance:
        return None
    if (moving_fit - chance) / (fit - chance) >= floor:
        return None
    if chance == 0.0:  # a regression: the share of the mean target's loss explained
        what = "explains {:.1%} of the loss of predicting the mean target"
    else:
        what = "predicts {:.1%} of its training labels"
    return (
        "θ*'s BatchNorm moving statistics do not describe its training data: with them (as "
        f"`model.predict` runs it) θ* {what.format(moving_fit)}, with statistics re-estimated "
        f"on that data {fit:.1%}. GEX scores θ* and its members with re-estimated statistics, "
        "so the report describes the model that predicts well; the saved model does not. "
        "Re-estimate its statistics on the training data, or train with a smaller BatchNorm "
        "`momentum` (statistics of momentum 0.999 need thousands of steps), before using its "
        "predictions."
    )


def _stats(saved: dict) -> MemberStats:
    """`MemberStats` from a manifest, where non-finite floats were saved as None."""
    nan = float("nan")
    return MemberStats(
        learning_rate=saved.get("learning_rate", nan),
        train_loss=nan if saved.get("train_loss") is None else saved["train_loss"],
        fit=saved.get("fit"),
        loss=nan if saved.get("loss") is None else saved["loss"],
        finite=saved.get("finite", True),
        weight_decay=saved.get("weight_decay"),
    )
