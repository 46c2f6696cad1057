"""The embedded default job: find and fix flipped labels in scikit-learn's digits.

Runs offline on real data: 10% of the training labels are flipped (seeded),
a small MLP is trained to zero loss with `GEXCollector`, `detect_noisy` flags
suspect labels, Kong relabeling fixes them, and the model is retrained.
Prints detection quality against the known flips and test accuracy of the
noisy, relabeled and clean models; writes the score histogram.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np


@dataclasses.dataclass
class DemoResult:
    """Numbers printed by `run_demo`."""

    auc: float
    ap: float
    precision: float
    recall: float
    num_flagged: int
    accuracy_noisy: float
    accuracy_relabeled: float
    accuracy_clean: float
    plot_path: str | None
    seconds: float


def _mlp(num_classes: int, seed: int):
    import keras

    from keras_gex.losses import SoftTargetCrossentropy

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="digits_mlp",
    )
    # SoftTargetCrossentropy equals categorical cross-entropy on one-hot
    # targets and stays exact on Kong's unnormalised relabeled targets.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=SoftTargetCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _progress(label: str, epochs: int, say):
    """A Keras callback that says `label`'s epochs done, about five times per fit.

    Plain lines, no progress bar: they read the same on a terminal, in a pipe or
    in a log file.
    """
    import keras

    every = max(1, -(-epochs // 5))

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            done = epoch + 1
            if done % every and done != epochs:
                return
            loss = (logs or {}).get("loss")
            loss_text = "" if loss is None else f", loss {float(loss):.4f}"
            seconds = time.perf_counter() - self.start
            say(f"  {label}: epoch {done}/{epochs}{loss_text} ({seconds:.0f} s)")

    return EpochProgress()


def _test_accuracy(model, x, y) -> float:
    logits = model(x, training=False)
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == y))


def run_demo(
    *,
    noise: float = 0.1,
    seed: int = 0,
    epochs: int = 150,
    num_members: int | str = "auto",
    plot_path: str | None = "gex_scores.png",
    verbose: int = 1,
) -> DemoResult:
    """Runs the digits demo end to end and returns its numbers.

    Args:
        noise: Fraction of training labels flipped. Defaults to `0.1`.
        seed: Seed for the split, flips, initialisation and GE. Defaults to `0`.
        epochs: Training epochs (the model must memorise). Defaults to `150`.
        num_members: GE members, or `"auto"` (`CollectionConfig.num_members`).
            Defaults to `"auto"`.
        plot_path: Where to write the histogram PNG, or None. Defaults to
            `"gex_scores.png"`.
        verbose: 1 prints progress (plain lines, about five per training) and
            the results; 0 prints nothing. Defaults to `1`.

    Returns:
        A `DemoResult`.
    """
    if isinstance(verbose, bool) or verbose not in (0, 1):
        raise ValueError(f"Argument `verbose` must be 0 or 1. Received: verbose={verbose!r}")
    import keras
    from sklearn.metrics import average_precision_score, roc_auc_score

    from keras_gex.analysis.detect import detect_noisy
    from keras_gex.callback import GEXCollector
    from keras_gex.datasets import noisy_digits

    start = time.perf_counter()
    say = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    data = noisy_digits(noise=noise, seed=seed)
    k = data.num_classes
    one_hot = keras.utils.to_categorical
    say(
        f"digits: {len(data.x_train)} training examples, {int(data.is_noisy.sum())} "
        f"labels flipped ({noise:.0%}), {len(data.x_test)} clean test examples"
    )

    def fit(model, targets, label, *callbacks):
        """Trains on `targets`, saying the epochs done under `label`."""
        progress = [_progress(label, epochs, say)] if verbose else []
        model.fit(
            data.x_train,
            targets,
            epochs=epochs,
            batch_size=64,
            verbose=0,
            callbacks=[*progress, *callbacks],
        )

    model = _mlp(k, seed)
    y_noisy = one_hot(data.y_train, k)
    collector = GEXCollector(
        (data.x_train, y_noisy), num_members=num_members, seed=seed, verbose=verbose
    )
    say(f"training a 64-256-256-{k} MLP for {epochs} epochs, then collecting the GE ...")
    fit(model, y_noisy, "noisy labels", collector)
    acc_noisy = _test_accuracy(model, data.x_test, data.y_test)

    say(f"scoring {len(data.x_train)} examples with {collector.ensemble.num_members} members ...")
    report = detect_noisy((data.x_train, y_noisy), collector.ensemble, verbose=0)
    if verbose:
        report.summary()
    auc = roc_auc_score(data.is_noisy, report.scores)
    ap = average_precision_score(data.is_noisy, report.scores)
    flagged = report.noisy_mask
    true_pos = int(np.sum(flagged & data.is_noisy))
    precision = true_pos / max(int(flagged.sum()), 1)
    recall = true_pos / max(int(data.is_noisy.sum()), 1)

    targets = report.relabeled_targets()
    say(f"retraining on the relabeled targets ({int(flagged.sum())} flagged rows relabeled) ...")
    relabeled = _mlp(k, seed)
    fit(relabeled, targets, "relabeled")
    acc_relabeled = _test_accuracy(relabeled, data.x_test, data.y_test)
    say("training on the clean labels, for comparison ...")
    clean = _mlp(k, seed)
    fit(clean, one_hot(data.y_train_clean, k), "clean labels")
    acc_clean = _test_accuracy(clean, data.x_test, data.y_test)

    if plot_path:
        report.plot(known_noisy=data.is_noisy, path=plot_path)
    result = DemoResult(
        auc,
        ap,
        precision,
        recall,
        int(flagged.sum()),
        acc_noisy,
        acc_relabeled,
        acc_clean,
        plot_path,
        time.perf_counter() - start,
    )
    say("")
    for line in result_lines(result):
        say(line)
    return result


def result_lines(result: DemoResult) -> list[str]:
    """The lines `run_demo` ends with: detection quality, accuracies, where the plot is.

    Args:
        result: What `run_demo` returned.

    Returns:
        The lines, without line breaks.
    """
    lines = [
        f"detection vs known flips:  AUC {result.auc:.4f}   AP {result.ap:.4f}",
        f"the threshold flags {result.num_flagged}: precision {result.precision:.3f}   "
        f"recall {result.recall:.3f}",
        f"test accuracy:  noisy {result.accuracy_noisy:.4f}  ->  relabeled "
        f"{result.accuracy_relabeled:.4f}   (clean labels {result.accuracy_clean:.4f})",
    ]
    if result.plot_path:
        lines.append(f"histogram written to {result.plot_path}")
    lines.append(f"done in {result.seconds:.0f} s")
    return lines
