"""One collection loop for every device set-up: rounds of members.

A round fine-tunes `tuner.width` members at once from θ*: one on a single
device or data-parallel, one per replica with `per_replica_members=True`.
Member `i`'s mini-batches depend only on `(seed, i)`, so a collection resumed
from its store equals an uninterrupted one, and with a fixed step size a
per-replica member equals the sequential member of the same index. Every
member passes the same gate (`step_size.MemberGate`) and, with a calibrated
step size, steers the next round's (`step_size.StepSizeController`, from the
round's mean relative fit).
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
from keras_gex.collection import step_size
from keras_gex.collection.local import FineTuner
from keras_gex.collection.replicated import ReplicaFineTuner
from keras_gex.collection.tuner import flatten_layers, halfway, resolve_steps
from keras_gex.config import CollectionConfig, CollectionRecord, MemberStats, Probe
from keras_gex.data import DataSource, take_rows
from keras_gex.io import persistence
from keras_gex.losses import PerExampleLoss
from keras_gex.weights import WeightSet

#: Evaluation (the fit a member keeps) uses this many training examples.
_EVAL_EXAMPLES = 2048
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


def stream_seed(seed: int, index) -> int:
    """Seed of one member's mini-batch stream, independent of other members.

    >>> stream_seed(0, 1) == stream_seed(0, 1) != stream_seed(0, 2)
    True
    """
    key = index if isinstance(index, int) else sum(map(ord, str(index))) + 10**6
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0] % (2**31))


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


def _open_store(directory, model, config: CollectionConfig, steps: int, loss: PerExampleLoss):
    if directory is None:
        return None
    settings = {
        "steps": steps,
        "batch_size": config.batch_size,
        "momentum": config.momentum,
        "chain": config.chain,
        "bn_batches": config.bn_batches,
        "loss": loss.name,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
    }
    return persistence.MemberStore(os.fspath(directory), model, settings)


def _resume(store, num_members: int, log):
    """`(members, stats, calibration, lr)` from `store` (lr None if not calibrated)."""
    members, stats, calibration, lr = [], [], [], None
    if store is None:
        return members, stats, calibration, lr
    for weights, saved in store.saved_members()[:num_members]:
        members.append(weights)
        stats.append(MemberStats(**saved))
    if members:
        log(f"resumed {len(members)} member(s) from {store.directory}")
    if store.calibrated:
        lr = store.manifest["calibrated_learning_rate"]
        calibration = [Probe(**p) for p in store.manifest["calibration"]]
        if stats:
            lr = stats[-1].learning_rate  # a divergence retry may have lowered it
    return members, stats, calibration, lr


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
    """Fine-tunes `config.num_members` copies of θ* (validated arguments only).

    With a `directory`, every finished member is written there at once and
    members already there are loaded instead of recomputed. With a `strategy`,
    each member is fine-tuned data-parallel across its replicas, or with
    `per_replica_members=True` one member per replica. `config.jit_compile`
    applies to array inputs on one device only.
    """
    start = time.perf_counter()
    log = _logger(verbose)
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

    if strategy is None:
        xla = source.has_arrays and resolve_jit_compile(config.jit_compile, model)
        tuner = FineTuner(model, loss, config.momentum, jit_compile=xla)
    else:
        tuner = ReplicaFineTuner(
            model,
            loss,
            config.momentum,
            strategy,
            synchronized=not per_replica_members,
            global_batch_size=batch_size,
        )
    width = tuner.width

    def stream(keys):
        return tuner.open_stream(source, batch_size, [stream_seed(seed, k) for k in keys])

    theta_star = tuner.snapshots()[0]
    tuner.load(theta_star)
    tuner.refresh_batchnorm(stream(["reference"] * width), config.bn_batches)
    reference = tuner.snapshots()[0]
    ref_loss, ref_fit = tuner.evaluate(eval_batches)[0]
    ref_stats = MemberStats(0.0, float("nan"), ref_fit, ref_loss)
    step_size.warn_unless_memorised(ref_fit, stacklevel=3)

    steps_run = 0  # SGD steps of every member run, probes and runs redone included

    def run_round(lr: float, first: int, start_weights: WeightSet, abandon=None):
        """Members `first .. first+width-1` at `lr`: `([(weights, stats)], midway)`.

        With `abandon=(above, below)` (rounds of one member), the fit is also
        measured halfway (relative to θ*'s, BatchNorm statistics as they are)
        and the member is abandoned there, weights None and stats finite, if
        it keeps more than `above` (the decaying second half cannot move it
        out of the basin) or less than `below` (collapsed). Not abandoning
        gives the same member as an uninterrupted run.
        """
        nonlocal steps_run
        batches = stream([first + r for r in range(width)])
        tuner.load(start_weights)
        midway = None
        if abandon is not None and width == 1:
            above, below = abandon
            trained = tuner.train(batches, steps, lr, stop=halfway(steps))
            steps_run += halfway(steps)
            if trained[0][1]:
                mid_loss, mid_fit = tuner.evaluate(eval_batches)[0]
                mid = MemberStats(lr, trained[0][0], mid_fit, mid_loss)
                midway = step_size.relative_fit(mid, ref_stats)
                if midway > above or (below is not None and midway < below):
                    return [(None, mid)], midway
                trained = tuner.train(batches, steps, lr, start=halfway(steps))
                steps_run += steps - halfway(steps)
        else:
            trained = tuner.train(batches, steps, lr)
            steps_run += width * steps
        tuner.refresh_batchnorm(batches, config.bn_batches)
        out = []
        evaluated = tuner.evaluate(eval_batches)
        for (train_loss, finite), weights, (mean_loss, fit) in zip(
            trained, tuner.snapshots(), evaluated
        ):
            if not (finite and weights.is_finite()):
                weights, finite = None, False
                mean_loss, fit = float("nan"), 0.0 if loss.is_classification else None
            out.append((weights, MemberStats(lr, train_loss, fit, mean_loss, finite)))
        return out, midway

    members, stats, calibration, lr = _resume(store, config.num_members, log)
    warmup_seconds = 0.0
    if len(members) < config.num_members:
        # Trace (and under XLA compile) the loop with one step of zero size, so
        # its one-time cost is paid, and timed, here rather than in a probe.
        warm_start = time.perf_counter()
        tuner.load(theta_star)
        tuner.train(stream(["warm-up"] * width), steps, 0.0, stop=1)
        warmup_seconds = time.perf_counter() - warm_start

    pending = None  # the accepted calibration round, taken as the first round
    auto = config.learning_rate == "auto"
    if lr is None and auto and not loss.is_classification:
        lr = step_size.fallback_learning_rate(loss.name, stacklevel=3)
    elif lr is None and auto:
        lr, pending = step_size.calibrate(
            lambda probe_lr, *abandon: run_round(probe_lr, 0, theta_star, abandon),
            ref_stats,
            calibration,
            log,
            steps=steps,
            abandon_below=None if tuner.has_batchnorm else step_size.COLLAPSE_FIT,
        )
    elif lr is None:
        lr = float(config.learning_rate)
    if store is not None and not store.calibrated:
        store.save_calibration(lr, [dataclasses.asdict(p) for p in calibration])

    adaptive = auto and loss.is_classification
    held = step_size.held_reason(calibration)
    controller = step_size.StepSizeController(hold=held is not None)
    if stats and adaptive:  # resumed members: replay the controller
        lr = controller.replay(lr, stats, ref_stats)
    gate = step_size.MemberGate(adaptive, config.num_members, stacklevel=3, log=log)
    what = "it" if width == 1 else "it and the rest of its round"
    previous = members[-1] if (config.chain and members) else theta_star
    rounds = 0
    while len(members) < config.num_members:
        first = len(members)
        if pending is None:
            pending, _ = run_round(lr, first, previous if config.chain else theta_star)
        results, pending = pending, None
        rounds += 1
        fits, failed = [], False
        for offset, (weights, member_stats) in enumerate(results):
            index = first + offset
            if index >= config.num_members:
                break
            rel = step_size.relative_fit(member_stats, ref_stats)
            retry_lr = gate.reject(member_stats, rel, lr, index, what)
            if retry_lr is not None:
                lr, failed = retry_lr, True
                break
            members.append(weights)
            stats.append(member_stats)
            fits.append(rel)
            if store is not None:
                store.save_member(index, weights, dataclasses.asdict(member_stats))
            if config.chain:
                previous = weights
            # The same scale as the calibration lines: the share of θ*'s fit kept.
            fit = "" if member_stats.fit is None else f", keeps {rel:.1%} of θ*'s fit"
            replica = "" if width == 1 else f" (replica {offset})"
            log(
                f"member {index + 1}/{config.num_members}{replica}: lr "
                f"{member_stats.learning_rate:.4g}, loss {member_stats.loss:.4f}{fit}"
            )
        if adaptive and fits and not failed:
            lr = controller.next(lr, float(np.mean(fits)))
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
        num_members=config.num_members,
        steps=steps,
        steps_requested=config.steps,
        # The step size the members used (their median), not the controller's next one.
        learning_rate=float(np.median([s.learning_rate for s in stats])) if stats else lr,
        learning_rate_requested=config.learning_rate,
        batch_size=batch_size,
        momentum=config.momentum,
        seed=seed,
        chain=config.chain,
        bn_batches=config.bn_batches,
        loss=loss.name,
        calibration=calibration,
        jit_compile=getattr(tuner, "jit_compile", False),
        reference_stats=ref_stats,
        member_stats=stats,
        fit_window=step_size.FIT_WINDOW,
        seconds=time.perf_counter() - start,
        warmup_seconds=warmup_seconds,
        redone_members=gate.counts(),
        steps_run=steps_run,
        step_size_held=held,
        strategy=None
        if strategy is None
        else {**distribute.describe(strategy), "per_replica_members": per_replica_members},
    )
    if store is not None:
        store.finalize(reference, record.to_dict(), loss)
    return CollectionResult(reference, members, record)
