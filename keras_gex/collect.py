"""Collecting the geometric ensemble: SGD fine-tuning of copies of θ*.

Each member starts from θ* (or, with `chain=True`, from the previous member)
and takes `steps` steps of SGD with momentum and a cosine-decayed step size on
shuffled mini-batches of the training data. All updates go to private
variables through `model.stateless_call`: the user's model, its weights and
its optimizer state are never modified.

After fine-tuning, BatchNormalization moving statistics are re-estimated for
the member on training data (population mean and variance over
`bn_batches` batches); otherwise a member's inference-mode predictions are
meaningless.

The step size decides whether the ensemble is informative: members that stay
in the memorising basin of θ* see no loss deviation on mislabeled examples,
diverged members see noise. With `learning_rate="auto"` the step size is
calibrated from the members' own training fit, without any knowledge of which
labels are noisy (see `calibrate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_gex.data import DataSource
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet

#: Calibration aims for members that still fit this fraction of the training
#: examples θ* fits (measured on digits: 0.85-0.97 gave AUC 0.999, members
#: that kept fitting everything or collapsed were useless).
FIT_WINDOW = (0.80, 0.97)
FIT_TARGET = 0.90
#: Members below this relative fit have collapsed (measured: one member at
#: chance-level fit next to a well-placed one took AUC from 0.99 to 0.64) and
#: are refitted at a smaller step size when the step size is calibrated.
COLLAPSE_FIT = 0.60
_INITIAL_LR = 0.1
_LR_FACTOR = 4.0
_EVAL_EXAMPLES = 2048


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
    """

    learning_rate: float
    train_loss: float
    fit: float | None
    loss: float
    finite: bool = True


def _flatten_layers(model):
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except Exception:
        out, stack = [], list(model.layers)
        while stack:
            layer = stack.pop()
            out.append(layer)
            stack.extend(getattr(layer, "layers", []))
        return out


def batchnorm_layers(model) -> list:
    """The model's BatchNormalization layers (nested models included)."""
    return [
        layer
        for layer in _flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@contextlib.contextmanager
def _zero_bn_momentum(layers):
    """Makes BN report the current batch's statistics as its moving statistics."""
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


class FineTuner:
    """Private working copy of the model's weights with an SGD-momentum step.

    Args:
        model: The trained model (θ* is read from it once).
        loss: Per-example loss.
        momentum: SGD momentum. Defaults to `0.9`.
    """

    def __init__(self, model: keras.Model, loss: PerExampleLoss, momentum: float = 0.9):
        self.model = model
        self.loss = loss
        self.momentum = float(momentum)
        self.tv = [tf.Variable(v.numpy(), trainable=True) for v in model.trainable_variables]
        self.ntv = [tf.Variable(v.numpy(), trainable=False) for v in model.non_trainable_variables]
        self.velocity = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.tv]
        self._bn = batchnorm_layers(model)
        ids = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self._bn_index = [
            (ids[id(layer.moving_mean)], ids[id(layer.moving_variance)]) for layer in self._bn
        ]
        self._step_fn = None
        self._stats_fn = None
        self._eval_fn = None

    # -- state ------------------------------------------------------------------
    def load(self, weights: WeightSet) -> None:
        for var, value in zip(self.tv, weights.trainable):
            var.assign(value)
        for var, value in zip(self.ntv, weights.non_trainable):
            var.assign(value)
        for var in self.velocity:
            var.assign(tf.zeros_like(var))

    def snapshot(self) -> WeightSet:
        return WeightSet.from_variables(self.tv, self.ntv)

    @property
    def has_batchnorm(self) -> bool:
        return bool(self._bn)

    # -- compiled pieces -----------------------------------------------------------
    def _step(self, x, y, lr):
        with tf.GradientTape() as tape:
            pred, new_ntv, reg = self.model.stateless_call(
                self.tv, self.ntv, x, training=True, return_losses=True
            )
            objective = tf.reduce_mean(self.loss(y, pred))
            if reg:
                objective = objective + tf.cast(tf.add_n(reg), objective.dtype)
        grads = tape.gradient(objective, self.tv)
        for var, grad, vel in zip(self.tv, grads, self.velocity):
            if grad is None:
                continue
            vel.assign(self.momentum * vel - lr * tf.cast(grad, vel.dtype))
            var.assign_add(vel)
        for var, value in zip(self.ntv, new_ntv):
            var.assign(value)
        return objective

    def _batch_stats(self, x):
        _, new_ntv = self.model.stateless_call(self.tv, self.ntv, x, training=True)
        return [(new_ntv[i], new_ntv[j]) for i, j in self._bn_index]

    def _eval(self, x, y):
        pred, _ = self.model.stateless_call(self.tv, self.ntv, x, training=False)
        losses = self.loss(y, pred)
        fit = self.loss.fit_mask(y, pred) if self.loss.is_classification else losses
        return losses, fit

    # -- operations -------------------------------------------------------------------
    def _train_loop(self, iterator, steps, learning_rate):
        """`steps` SGD steps in one compiled loop; returns per-step objectives."""
        steps_f = tf.cast(steps, tf.float32)
        values = tf.TensorArray(tf.float32, size=steps)
        for t in tf.range(steps):
            x, y = iterator.get_next()
            progress = tf.cast(t, tf.float32) / steps_f
            lr = learning_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
            values = values.write(t, tf.cast(self._step(x, y, lr), tf.float32))
        return values.stack()

    def train(self, iterator, steps: int, learning_rate: float) -> tuple[float, bool]:
        """Runs `steps` SGD steps with cosine decay; returns (late loss, finite).

        The late loss is the mean objective over the last 10% of steps.
        """
        if self._step_fn is None:
            self._step_fn = tf.function(self._train_loop)
        values = self._step_fn(
            iterator, tf.constant(steps, tf.int32), tf.constant(learning_rate, tf.float32)
        ).numpy()
        if not np.all(np.isfinite(values)):
            return float("nan"), False
        tail = max(1, steps // 10)
        return float(np.mean(values[-tail:])), True

    def refresh_batchnorm(self, batches, num_batches: int) -> None:
        """Sets BN moving statistics to population statistics over `num_batches`."""
        if not self._bn or num_batches <= 0:
            return
        if self._stats_fn is None:
            self._stats_fn = tf.function(self._batch_stats)
        sums = None
        count = 0
        with _zero_bn_momentum(self._bn):
            for _ in range(num_batches):
                x, _ = next(batches)  # works for Python and tf.data iterators
                stats = self._stats_fn(x)
                n = 1.0
                moments = [
                    (m.numpy().astype(np.float64), v.numpy().astype(np.float64) + m.numpy() ** 2)
                    for m, v in stats
                ]
                if sums is None:
                    sums = [[a * n, b * n] for a, b in moments]
                else:
                    for acc, (a, b) in zip(sums, moments):
                        acc[0] += a * n
                        acc[1] += b * n
                count += n
        for (i, j), (s1, s2) in zip(self._bn_index, sums):
            mean = s1 / count
            var = np.maximum(s2 / count - mean**2, 0.0)
            self.ntv[i].assign(mean.astype(self.ntv[i].dtype.as_numpy_dtype))
            self.ntv[j].assign(var.astype(self.ntv[j].dtype.as_numpy_dtype))

    def evaluate(self, eval_batches) -> tuple[float, float | None]:
        """Mean loss and fit (classification) on fixed evaluation batches."""
        if self._eval_fn is None:
            self._eval_fn = tf.function(self._eval)
        losses, fits = [], []
        for x, y in eval_batches:
            loss, fit = self._eval_fn(x, y)
            losses.append(loss.numpy())
            fits.append(fit.numpy())
        losses = np.concatenate(losses)
        fit = float(np.mean(np.concatenate(fits))) if self.loss.is_classification else None
        mean_loss = float(np.mean(losses)) if np.all(np.isfinite(losses)) else float("nan")
        return mean_loss, fit


@dataclasses.dataclass
class CollectionResult:
    """What `collect_members` returns."""

    reference: WeightSet
    members: list
    reference_stats: MemberStats
    member_stats: list
    learning_rate: float
    calibration: list
    seconds: float
    seed: int


def stream_seed(seed: int, index) -> int:
    """Seed of one member's mini-batch stream, independent of other members.

    >>> stream_seed(0, 1) == stream_seed(0, 1) != stream_seed(0, 2)
    True
    """
    key = index if isinstance(index, int) else sum(map(ord, str(index))) + 10**6
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0] % (2**31))


def _relative_fit(stats: MemberStats, ref: MemberStats) -> float:
    if not stats.finite or stats.fit is None or not math.isfinite(stats.loss):
        return 0.0
    return stats.fit / max(ref.fit, 1e-12)


def collect_members(
    model: keras.Model,
    source: DataSource,
    loss: PerExampleLoss,
    *,
    num_members: int,
    steps: int,
    learning_rate,
    batch_size: int,
    momentum: float,
    seed: int | None,
    chain: bool,
    bn_batches: int,
    max_probes: int = 6,
    verbose: int = 1,
    store=None,
) -> CollectionResult:
    """Fine-tunes `num_members` copies of θ* (validated arguments only).

    With a `persistence.MemberStore`, every finished member is written to disk
    at once and members already on disk are loaded instead of recomputed.
    Each member's mini-batches depend only on (seed, member index), so a
    resumed collection equals an uninterrupted one member by member.
    """
    start = time.perf_counter()
    n = source.count_examples()
    batch_size = min(batch_size, n)
    if seed is None and store is not None and store.seed is not None:
        seed = store.seed
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    if store is not None and store.seed is None:
        store.set_seed(seed)
    eval_count = max(1, min(n, _EVAL_EXAMPLES) // batch_size)
    eval_stream = source.shuffled(batch_size, stream_seed(seed, "eval")).take(eval_count)
    eval_batches = [batch for batch in eval_stream]  # list() would ask len() of it

    def stream(index):
        return iter(source.shuffled(batch_size, stream_seed(seed, index)))

    tuner = FineTuner(model, loss, momentum)
    theta_star = tuner.snapshot()
    tuner.refresh_batchnorm(stream("reference"), bn_batches)
    reference = tuner.snapshot()
    ref_loss, ref_fit = tuner.evaluate(eval_batches)
    ref_stats = MemberStats(0.0, float("nan"), ref_fit, ref_loss)
    if ref_fit is not None and ref_fit < 0.95:
        warnings.warn(
            f"The trained model predicts only {ref_fit:.1%} of its training labels. GEX "
            "self-influence assumes a model that fits (memorises) its training set; on "
            "one that does not, it can rank mislabeled examples below chance. Train "
            "longer, or also look at the loss of θ* (`report.reference_losses`).",
            stacklevel=3,
        )

    def log(msg):
        if verbose:
            print(f"[keras_gex] {msg}", flush=True)

    def run_member(start_weights: WeightSet, lr: float, index: int):
        """Fine-tunes one member; its mini-batches depend only on (seed, index)."""
        batches = stream(index)
        tuner.load(start_weights)
        train_loss, finite = tuner.train(batches, steps, lr)
        weights = None
        if finite:
            tuner.refresh_batchnorm(batches, bn_batches)
            weights = tuner.snapshot()
            finite = weights.is_finite()
        if finite:
            mean_loss, fit = tuner.evaluate(eval_batches)
        else:
            mean_loss, fit = float("nan"), 0.0 if loss.is_classification else None
        return weights, MemberStats(lr, train_loss, fit, mean_loss, finite)

    members, stats, calibration = [], [], []
    saved_members = store.saved_members() if store is not None else []
    if saved_members:
        for weights, saved in saved_members[:num_members]:
            members.append(weights)
            stats.append(MemberStats(**saved))
        log(f"resumed {len(members)} member(s) from {store.directory}")
    if store is not None and store.calibrated:
        lr = store.manifest["calibrated_learning_rate"]
        calibration = list(store.manifest["calibration"])
        if stats:
            lr = stats[-1].learning_rate  # a divergence retry may have lowered it
    elif learning_rate == "auto":
        if not loss.is_classification:
            warnings.warn(
                f"learning_rate='auto' calibrates on classification fit; the loss "
                f"{loss.name!r} is not a recognised classification loss, so the "
                f"fixed step size {_INITIAL_LR} is used. Check `report.summary()` "
                "and pass `learning_rate=` if members did not move.",
                stacklevel=3,
            )
            lr = _INITIAL_LR
        else:
            lr, accepted = _calibrate(
                run_member, theta_star, ref_stats, calibration, max_probes, log
            )
            if store is not None:
                store.save_calibration(lr, calibration)  # before members: see resume
            for weights, member_stats in accepted[:num_members]:
                members.append(weights)
                stats.append(member_stats)
                if store is not None:
                    store.save_member(len(members) - 1, weights, dataclasses.asdict(member_stats))
    else:
        lr = float(learning_rate)
    if store is not None and not store.calibrated:
        store.save_calibration(lr, calibration)

    adaptive = learning_rate == "auto" and loss.is_classification
    if stats and adaptive:  # resumed: replay the controller's last decision
        lr = _next_learning_rate(stats[-1].learning_rate, _relative_fit(stats[-1], ref_stats))
    previous = members[-1] if (chain and members) else theta_star
    retries = 0
    refits = 0
    while len(members) < num_members:
        index = len(members)
        weights, member_stats = run_member(previous if chain else theta_star, lr, index)
        rel = _relative_fit(member_stats, ref_stats)
        if adaptive and member_stats.finite and rel < COLLAPSE_FIT and refits < num_members:
            refits += 1
            log(
                f"member {index + 1}: lr {lr:.4g} collapsed it (keeps {rel:.1%} of θ*'s "
                "fit); refitting at a smaller step size"
            )
            lr *= 0.7
            continue
        if not member_stats.finite:
            retries += 1
            warnings.warn(
                f"GE member {index} diverged (non-finite loss or weights) at "
                f"learning_rate={lr:.4g}; it was dropped and retried at a quarter "
                "of the step size.",
                stacklevel=3,
            )
            if retries > 6:
                raise RuntimeError(
                    "Fine-tuning diverged repeatedly; the model's loss may be "
                    "non-finite on the training data. Pass a smaller `learning_rate`."
                )
            lr /= 4.0
            continue
        members.append(weights)
        stats.append(member_stats)
        if store is not None:
            store.save_member(index, weights, dataclasses.asdict(member_stats))
        if chain:
            previous = weights
        fit = "" if member_stats.fit is None else f", fit {member_stats.fit:.3f}"
        log(f"member {index + 1}/{num_members}: lr {lr:.4g}, loss {member_stats.loss:.4f}{fit}")
        if adaptive:
            lr = _next_learning_rate(lr, rel)
    if refits >= num_members:
        warnings.warn(
            f"{refits} GE members collapsed and were refitted; the step size could not be "
            "held in the useful window. Scores may be unreliable; see `report.summary()`.",
            stacklevel=3,
        )
    return CollectionResult(
        reference,
        members,
        ref_stats,
        stats,
        lr,
        calibration,
        time.perf_counter() - start,
        seed,
    )


def _next_learning_rate(lr: float, relative_fit: float) -> float:
    """Nudges the step size after each member towards `FIT_WINDOW`.

    Near the edge where members escape θ*'s basin, members at one step size
    vary widely; a gentle per-member correction keeps the ensemble in the
    window without another search.

    >>> _next_learning_rate(1.0, 0.99), _next_learning_rate(1.0, 0.9), _next_learning_rate(1.0, 0.7)
    (1.15, 1.0, 0.85)
    """
    if relative_fit > FIT_WINDOW[1]:
        return lr * 1.15
    if relative_fit < FIT_WINDOW[0]:
        return lr * 0.85
    return lr


def _calibrate(run_member, theta_star, ref_stats, record, max_probes, log):
    """Geometric search for the step size whose members land in `FIT_WINDOW`.

    Probes are full-length members; every probe whose relative fit lies in the
    window is kept as a GE member, so a well-placed first guess costs nothing.
    """
    low, high = FIT_WINDOW
    too_small, too_large = None, None  # step sizes known to be too small / large
    lr = _INITIAL_LR
    accepted = []
    best = None
    for _ in range(max_probes):
        # Every probe replays member 0's stream, so an accepted probe *is* member 0.
        weights, stats = run_member(theta_star, lr, 0)
        rel = _relative_fit(stats, ref_stats)
        record.append({"learning_rate": lr, "relative_fit": rel, "loss": stats.loss})
        log(f"calibration: lr {lr:.4g} -> members keep {rel:.1%} of θ*'s fit")
        if best is None or abs(rel - FIT_TARGET) < abs(best[1] - FIT_TARGET):
            best = (lr, rel)
        if low <= rel <= high:
            accepted.append((weights, stats))
            return lr, accepted
        if rel > high:
            too_small = lr if too_small is None else max(too_small, lr)
        else:
            too_large = lr if too_large is None else min(too_large, lr)
        if too_small is not None and too_large is not None:
            lr = math.sqrt(too_small * too_large)
        elif too_large is None:
            lr = lr * _LR_FACTOR
        else:
            lr = lr / _LR_FACTOR
    warnings.warn(
        f"Step-size calibration found no learning rate whose members keep "
        f"{low:.0%}-{high:.0%} of θ*'s training fit in {max_probes} probes; "
        f"using the closest, learning_rate={best[0]:.4g} (fit {best[1]:.1%}). "
        "Scores may be unreliable; see `report.summary()`.",
        stacklevel=4,
    )
    return best[0], accepted
