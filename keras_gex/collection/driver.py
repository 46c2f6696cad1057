"""One collection loop for every device set-up: rounds of members.

A round fine-tunes `tuner.width` members at once from θ*: one on a single
device or data-parallel, one per replica with `per_replica_members=True`.
Member `i`'s mini-batches depend only on `(seed, i)`, so a collection resumed
from its store equals an uninterrupted one, and with a fixed step size a
per-replica member equals the sequential member of the same index. Every
member passes the same gate (`step_size.MemberGate`); the step size is
calibrated once (`step_size.calibrate`) and shared by every member.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_gex import distribute
from keras_gex.collection import budget, step_size
from keras_gex.collection.frozen import frozen_layers
from keras_gex.collection.local import FineTuner
from keras_gex.collection.replicated import ReplicaFineTuner
from keras_gex.collection.tuner import checkpoints, flatten_layers, resolve_steps
from keras_gex.config import (
    CollectionConfig,
    CollectionRecord,
    MemberStats,
    Probe,
    stale_batchnorm,
)
from keras_gex.data import DataSource, take_rows
from keras_gex.io import persistence
from keras_gex.loss_checks import check_all_labels
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet

#: Evaluation (the fit a member keeps) uses this many training examples.
_EVAL_EXAMPLES = 2048
#: A dataset whose examples fit in this many bytes is read into arrays once
#: before fine-tuning: members then gather batches instead of re-running its
#: pipeline every epoch (about 2x faster on a small image pipeline).
_IN_MEMORY_BYTES = 2**30
#: Evaluation examples whose inputs and labels fit in this many bytes are
#: evaluated in one call instead of one call per batch.
_EVAL_BATCH_BYTES = 32 * 2**20


@dataclasses.dataclass
class CollectionResult:
    """What `collect` returns: θ* as scored, the members, and the record."""

    reference: WeightSet
    members: list
    record: CollectionRecord


def resolve_jit_compile(jit_compile, model) -> bool:
    """Whether the fine-tuning loop on arrays is compiled with XLA.

    `"auto"`: never on CPU, where XLA's compile cost more than its faster steps
    saved; on an accelerator, for models without convolution or pooling layers
    (small CNNs were 7-10x slower with XLA on CPU). Measured in
    docs/design.md#jit-compile. Both routes give the same members up to float rounding.
    """
    if jit_compile == "auto":
        if not tf.config.list_logical_devices("GPU"):
            return False
        convolutional = ("Conv", "Pooling")
        return not any(
            any(word in cls.__name__ for word in convolutional for cls in type(layer).__mro__)
            for layer in flatten_layers(model)
        )
    return bool(jit_compile)


def stream_seed(seed: int, index, rerun: int = 0) -> int:
    """Seed of one member's mini-batch stream, independent of other members.

    `rerun` > 0 gives the stream of the `rerun`-th member run again.

    >>> stream_seed(0, 1) == stream_seed(0, 1) != stream_seed(0, 2)
    True
    >>> stream_seed(0, 1, rerun=1) not in (stream_seed(0, 1), stream_seed(0, 1, rerun=2))
    True
    """
    key = index if isinstance(index, int) else sum(map(ord, str(index))) + 10**6
    entropy = [seed, key] if rerun == 0 else [seed, key, rerun]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31))


def _logger(verbose: int):
    def log(msg):
        if verbose:
            print(f"[keras_gex] {msg}", flush=True)

    return log


def _evaluation_batches(source: DataSource, batch_size: int, seed: int) -> list:
    """The fixed training batches every member's fit is measured on."""
    eval_count = max(1, min(source.count_examples(), _EVAL_EXAMPLES) // batch_size)
    if not source.has_arrays:
        eval_stream = source.shuffled(batch_size, stream_seed(seed, "eval")).take(eval_count)
        return [batch for batch in eval_stream]  # list() would ask len() of it
    # The same examples, without building a tf.data pipeline.
    stream = source.array_stream(batch_size, stream_seed(seed, "eval"))
    rows = stream.take_indices(eval_count)
    tensors = (stream.x, stream.y)
    example_bytes = sum(t.dtype.size * math.prod(t.shape[1:]) for t in tf.nest.flatten(tensors))
    if example_bytes * rows.size <= _EVAL_BATCH_BYTES:  # one call per evaluation
        rows = rows.reshape(1, -1)
    return [take_rows(tensors, idx) for idx in rows]


def _fit_baseline(loss: PerExampleLoss, eval_batches: list) -> tuple[float, float | None]:
    """`(chance, baseline loss)` of the evaluation rows (see `step_size.relative_fit`).

    Classification: the fit of always answering the most common given label,
    no baseline. Other losses: chance 0, and the mean loss of predicting the
    rows' mean target (None where the loss cannot take such a prediction).
    """
    labels = np.concatenate([np.asarray(y) for _, y in eval_batches])
    if loss.is_classification:
        return step_size.chance_fit(loss.label_classes(labels)), None
    try:
        y = tf.constant(labels, tf.float32)
        constant = tf.broadcast_to(tf.reduce_mean(y, axis=0), tf.shape(y))
        baseline = float(tf.reduce_mean(loss(y, constant)))
    except Exception:  # a loss that is not a distance between targets and predictions
        return 0.0, None
    return 0.0, baseline if math.isfinite(baseline) and baseline > 0 else None


def _open_store(directory, model, config: CollectionConfig, steps: int, loss: PerExampleLoss):
    if directory is None:
        return None
    settings = {
        "steps": steps,
        "batch_size": config.batch_size,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "chain": config.chain,
        "bn_batches": config.bn_batches,
        "loss": loss.name,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
    }
    return persistence.MemberStore(os.fspath(directory), model, settings)


def _resume(store, log):
    """`(members, stats, calibration, lr, decay, redone_steps)` from `store`.

    lr and decay are None if not calibrated; `redone_steps` are the steps of
    the member runs redone before the last saved member was kept.
    """
    members, stats, calibration, lr, decay, redone_steps = [], [], [], None, None, 0
    if store is None:
        return members, stats, calibration, lr, decay, redone_steps
    saved_members = store.saved_members()
    for weights, saved, _ in saved_members:
        members.append(weights)
        stats.append(MemberStats(**saved))
    if saved_members:
        redone_steps = saved_members[-1][2]  # cumulative: the last member's
    if members:
        log(f"resumed {len(members)} member(s) from {store.directory}")
    if store.calibrated:
        lr = store.manifest["calibrated_learning_rate"]
        decay = store.manifest.get("calibrated_weight_decay")
        calibration = [Probe(**p) for p in store.manifest["calibration"]]
        if stats:
            lr = stats[-1].learning_rate  # a divergence retry may have lowered it
    return members, stats, calibration, lr, decay, redone_steps


def collect(
    model,
    source: DataSource,
    loss: PerExampleLoss,
    config: CollectionConfig,
    *,
    directory=None,
    verbose: int = 1,
    strategy=None,
    per_replica_members: bool = False,
) -> CollectionResult:
    """Fine-tunes `config.num_members` copies of θ* (validated arguments only);
    `"auto"` is as many as θ*'s training steps pay for (`budget.affordable_members`).

    With a `directory`, every finished member is written there at once and
    members already there are loaded instead of recomputed. With a `strategy`,
    each member is fine-tuned data-parallel across its replicas, or with
    `per_replica_members=True` one member per replica. `config.jit_compile`
    applies to array inputs on one device only.
    """
    start = time.perf_counter()
    log = _logger(verbose)
    source = source.in_memory(_IN_MEMORY_BYTES, refuse_non_finite=True)
    # Every label, where they are in memory: a bad one past the first batch (checked
    # at entry) would otherwise fail inside the compiled loop.
    check_all_labels(loss, source, model)
    frozen = frozen_layers(model, source, _IN_MEMORY_BYTES) if config.frozen_features else None
    tuned, model_weights = model, None
    step_cost = 1.0  # a member step in θ*'s training steps (`budget.affordable_members`)
    if frozen is not None:
        model_weights = WeightSet.from_model(model)
        step_cost = frozen.step_cost()
        log(
            f"layers {frozen.describe()}; a member step on them costs {step_cost:.0%} of "
            "a training step"
        )
        source, tuned = frozen.features(source), frozen.head

    def to_model(weights):
        """A member of the tuned model (the head, with frozen layers) as the whole model's."""
        if frozen is None or weights is None:
            return weights
        return frozen.to_model(weights, model_weights)

    n = source.count_examples()
    batch_size = min(config.batch_size, n)
    steps = resolve_steps(config.steps, n, config.batch_size)
    store = _open_store(directory, model, config, steps, loss)
    seed = config.seed
    if seed is None and store is not None and store.seed is not None:
        seed = store.seed  # resume with the streams the stored members used
    if seed is None:
        # NumPy's global generator: `keras.utils.set_random_seed` seeds it, so a
        # seeded script collects the same members in every run.
        seed = int(np.random.randint(0, 2**31 - 1))  # noqa: NPY002 (the global one, on purpose)
    if store is not None and store.seed is None:
        store.set_seed(seed)
    eval_batches = _evaluation_batches(source, batch_size, seed)

    weight_decay = step_size.WEIGHT_DECAY if config.weight_decay == "auto" else config.weight_decay
    chance, baseline = _fit_baseline(loss, eval_batches)
    # A regression loss is fine-tuned in units of the null model's (`tuner.in_units`).
    loss_scale = 1.0 if baseline is None else 1.0 / baseline
    if strategy is None:
        xla = source.has_arrays and resolve_jit_compile(config.jit_compile, tuned)
        tuner = FineTuner(
            tuned,
            loss,
            config.momentum,
            jit_compile=xla,
            weight_decay=weight_decay,
            loss_scale=loss_scale,
        )
    else:
        tuner = ReplicaFineTuner(
            tuned,
            loss,
            config.momentum,
            strategy,
            synchronized=not per_replica_members,
            global_batch_size=batch_size,
            weight_decay=weight_decay,
            loss_scale=loss_scale,
        )
    width = tuner.width

    def stream(keys, rerun=0):
        seeds = [stream_seed(seed, k, rerun) for k in keys]
        return tuner.open_stream(source, batch_size, seeds)

    def fit_of(fit, mean_loss):
        """The classification fit, or the share of the baseline loss explained."""
        if fit is not None or baseline is None or not math.isfinite(mean_loss):
            return fit
        return 1.0 - mean_loss / baseline

    theta_star = tuner.snapshots()[0]
    # θ*'s BN statistics are re-estimated in training mode, random layers active: their
    # draws follow from `seed`, not from the state θ* was built or loaded under.
    tuner.load(theta_star, [stream_seed(seed, "reference layers")] * width)
    moving_fit = None  # θ*'s fit with its own moving statistics (`record.stale_batchnorm`)
    if tuner.has_batchnorm and config.bn_batches > 0:
        moving_loss, moving = tuner.evaluate(eval_batches)[0]
        moving_fit = fit_of(moving, moving_loss)
    tuner.refresh_batchnorm(stream(["reference"] * width), config.bn_batches)
    reference = to_model(tuner.snapshots()[0])

    ref_loss, ref_fit = tuner.evaluate(eval_batches)[0]
    ref_stats = MemberStats(0.0, float("nan"), fit_of(ref_fit, ref_loss), ref_loss)
    if loss.is_classification:
        step_size.warn_unless_memorised(ref_fit, stacklevel=3)
    stale = stale_batchnorm(moving_fit, ref_stats.fit, chance, step_size.FIT_WINDOW[0])
    if stale is not None:
        warnings.warn(stale, stacklevel=3)

    def rel_of(member_stats: MemberStats) -> float:
        return step_size.relative_fit(member_stats, ref_stats, chance)

    steps_run = 0  # SGD steps of every member run, probes and runs redone included

    def bn_batches():
        """Batches for BN statistics at a checkpoint (None: the model has no BN)."""
        return stream(["checkpoint"] * width) if tuner.has_batchnorm else None

    def run_round(
        lr: float,
        first: int,
        start_weights: WeightSet,
        abandon=None,
        weight_decay=None,
        rerun=0,
        late=False,
    ):
        """Members `first .. first+width-1` at `lr`: `([(weights, stats)], midway, run)`.

        With `abandon` (rounds of one member), the relative fit is also
        measured at `checkpoints(steps, late)` (BatchNorm statistics
        re-estimated for the measurement, then put back) and the member is
        abandoned at the first where `abandon(fit)`: weights None, stats of
        that point, finite. `midway` is the fit halfway (None where not
        measured), `run` the steps member 0 ran. Not abandoning gives the same
        member as an uninterrupted run.
        """
        nonlocal steps_run
        batches = stream([first + r for r in range(width)], rerun)
        # Random layers (dropout, augmentation) restart from a seed of the member's.
        layer_seeds = [
            stream_seed(stream_seed(seed, first + r, rerun), "layers") for r in range(width)
        ]
        tuner.load(start_weights, layer_seeds)
        member_decay = decay if weight_decay is None else weight_decay
        tuner.set_weight_decay(member_decay)
        midway, done = None, 0
        if abandon is not None and width == 1:
            for point in checkpoints(steps, late):
                trained = tuner.train(batches, steps, lr, start=done, stop=point)
                steps_run += point - done
                done = point
                if not trained[0][1]:
                    break  # diverged: judged below without further steps
                # As a finished member is judged: BN statistics re-estimated (on
                # batches of their own, so the member's stream is untouched).
                point_loss, point_fit = tuner.evaluate_refreshed(
                    eval_batches, bn_batches(), config.bn_batches
                )[0]
                stats_there = MemberStats(
                    lr, trained[0][0], fit_of(point_fit, point_loss), point_loss
                )
                rel = rel_of(stats_there)
                midway = rel if midway is None else midway
                if abandon(rel):
                    return [(None, stats_there)], midway, done
            else:
                trained = tuner.train(batches, steps, lr, start=done)
                steps_run += steps - done
                done = steps
        else:
            trained = tuner.train(batches, steps, lr)
            steps_run += width * steps
            done = steps
        tuner.refresh_batchnorm(batches, config.bn_batches)
        out = []
        evaluated = tuner.evaluate(eval_batches)
        for (train_loss, finite), weights, (mean_loss, fit) in zip(
            trained, tuner.snapshots(), evaluated
        ):
            if not (finite and weights.is_finite()):
                weights, finite = None, False
                mean_loss, fit = float("nan"), 0.0 if loss.is_classification else None
            fit = fit_of(fit, mean_loss)
            out.append((weights, MemberStats(lr, train_loss, fit, mean_loss, finite, member_decay)))
        return out, midway, done

    trained = budget.trained_steps(model)

    def member_count() -> int:
        """Members to collect: the number asked for, or what θ*'s steps afford
        after the calibration's rejected probes and the member runs redone."""
        if config.num_members != "auto":
            return config.num_members
        spent = budget.rejected_steps(calibration) + redone_steps
        return budget.affordable_members(trained, steps, spent, width, step_cost)

    members, stats, calibration, lr, decay, redone_steps = _resume(store, log)
    decay = weight_decay if decay is None else decay
    num_members = member_count()  # rejected probes and runs redone are known when resumed
    warmup_seconds = 0.0
    if len(members) < num_members:
        # Trace (and under XLA compile) the loop with one step of zero size, so
        # its one-time cost is paid, and timed, here rather than in a probe.
        warm_start = time.perf_counter()
        tuner.load(theta_star)
        tuner.train(stream(["warm-up"] * width), steps, 0.0, stop=1)
        warmup_seconds = time.perf_counter() - warm_start

    pending = []  # `[(probe index, round)]` of the probes kept as members, taken first
    auto = config.learning_rate == "auto"
    why = step_size.why_uncalibrated(ref_stats.fit, chance, loss.name)
    adaptive = auto and why is None
    if lr is None and auto and not adaptive:
        lr = step_size.uncalibrated_learning_rate(why, stacklevel=3)
    elif lr is None and auto:
        lr, decay, kept_probes = step_size.calibrate(
            lambda probe_lr, probe_decay, abandon: run_round(
                probe_lr, 0, theta_star, abandon, weight_decay=probe_decay, late=True
            ),
            rel_of,
            calibration,
            log,
            steps=steps,
            weight_decay=decay,
            forget_by_decay=baseline is not None,  # a regression
        )
        pending = list(kept_probes or [])
    elif lr is None:
        lr = float(config.learning_rate)
    num_members = member_count()
    while pending and len(pending) > -(-(num_members - len(members)) // width):
        # A kept probe beyond the members asked for is not a member: its steps
        # count as rejected, which may lower what θ*'s steps afford.
        index, _ = pending.pop()
        calibration[index] = dataclasses.replace(calibration[index], accepted=False)
        num_members = member_count()
    if store is not None and not store.calibrated:
        store.save_calibration(lr, decay, [dataclasses.asdict(p) for p in calibration])
    if num_members < len(members):  # resumed from a store that holds more
        members, stats = members[:num_members], stats[:num_members]
    if config.num_members == "auto" and num_members < budget.MAX_MEMBERS:
        log(
            f"{num_members} members: {budget.MAX_MEMBERS} would cost more than θ*'s "
            f"{trained} training steps"
        )

    gate = step_size.MemberGate(adaptive, stacklevel=3, log=log)
    reruns = {}  # member index: how often a round starting there was run again
    what = "it" if width == 1 else "it and the rest of its round"
    previous = theta_star
    if config.chain and members:
        previous = members[-1] if frozen is None else frozen.to_head(members[-1])
    rounds = 0
    while len(members) < num_members:
        first = len(members)
        if not pending:
            start_weights = previous if config.chain else theta_star
            rerun = reruns.get(first, 0)
            results, _, ran = run_round(lr, first, start_weights, gate.abandon(), rerun=rerun)
        else:  # a probe kept as a member, which ran its whole schedule
            (_, results), ran = pending.pop(0), steps
        rounds += 1
        for offset, (weights, member_stats) in enumerate(results):
            index = first + offset
            if index >= num_members:
                break
            rel = rel_of(member_stats)
            retry_lr = gate.reject(member_stats, rel, lr, index, what)
            if retry_lr is not None:
                lr = retry_lr
                reruns[index] = reruns.get(index, 0) + 1  # the next round starts there
                # The round's discarded part is paid from θ*'s steps, as a probe is.
                redone_steps += ran * (width - offset) // width
                affordable = max(member_count(), len(members))
                if affordable < num_members:
                    num_members = affordable
                    log(
                        f"{num_members} members: with the runs redone ({redone_steps} "
                        f"steps), more would cost more than θ*'s {trained} training steps"
                    )
                break
            members.append(to_model(weights))
            stats.append(member_stats)
            if store is not None:
                store.save_member(
                    index, members[-1], dataclasses.asdict(member_stats), redone_steps
                )
            if config.chain:
                previous = weights
            # The same scale as the calibration lines: the share of θ*'s fit kept.
            fit = "" if member_stats.fit is None else f", keeps {rel:.1%} of θ*'s fit above chance"
            replica = "" if width == 1 else f" (replica {offset})"
            log(
                f"member {index + 1}/{num_members}{replica}: lr "
                f"{member_stats.learning_rate:.4g}, loss {member_stats.loss:.4f}{fit}"
            )
    gate.finish()
    if width > 1:
        log(f"{len(members)} members in {rounds} round(s) of {width} replica(s)")
    xla_error = getattr(tuner, "xla_error", None)
    if xla_error is not None:
        warnings.warn(
            f"XLA could not compile the fine-tuning loop ({xla_error}); the members were "
            "fine-tuned without it. Pass `jit_compile=False` to skip the attempt.",
            stacklevel=3,
        )
    record = CollectionRecord(
        num_members=num_members,
        num_members_requested=config.num_members,
        trained_steps=trained,
        steps=steps,
        steps_requested=config.steps,
        # The step size the members used (their median): reruns may have lowered it.
        learning_rate=float(np.median([s.learning_rate for s in stats])) if stats else lr,
        learning_rate_requested=config.learning_rate,
        batch_size=batch_size,
        momentum=config.momentum,
        weight_decay=decay,
        frozen_layers=None if frozen is None else frozen.names,
        reference_moving_fit=moving_fit,
        seed=seed,
        chain=config.chain,
        bn_batches=config.bn_batches,
        loss=loss.name,
        calibration=calibration,
        jit_compile=getattr(tuner, "jit_compile", False),
        reference_stats=ref_stats,
        member_stats=stats,
        fit_window=step_size.FIT_WINDOW,
        chance_fit=chance if ref_stats.fit is not None else None,
        seconds=time.perf_counter() - start,
        warmup_seconds=warmup_seconds,
        redone_members=gate.counts(),
        steps_run=steps_run,
        strategy=None
        if strategy is None
        else {**distribute.describe(strategy), "per_replica_members": per_replica_members},
    )
    if store is not None:
        store.finalize(reference, record.to_dict(), loss)
    return CollectionResult(reference, members, record)
