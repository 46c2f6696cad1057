"""Noisy-label detection on digits: GEX against the baselines of paper §5.1.

What is measured, per model and seed, on scikit-learn's digits with 10% of
the training labels flipped to another class (`keras_gex.datasets.noisy_digits`,
1,347 training rows, 135 flips, all offline):

* **GEX (default)**: `GeometricEnsemble.collect(model, (x, y), seed=s)` with
  every other argument at its default, then `detect_noisy` with its default
  score (the members' mean loss) and threshold. AUC and AP of the scores
  against the known flips, precision / recall / F1 of the rows the threshold
  flags, and wall time (collection + scoring).
* **GEX (floor 0.05)**: the same ensemble's self-influence (the paper's score)
  with `reference_floor=0.05`, the clamp of ℓ(z, θ*) in the official code
  (AUC / AP only).
* **Loss at θ***: `keras_gex.baselines.loss_scores` of the trained model.
* **EL2N**: `keras_gex.baselines.el2n_scores`, scaled as in the paper's App. E
  (20 of 200 epochs, 5 repeats): 10% of the model's training epochs × 5
  repeats, BatchNorm statistics re-estimated before scoring. Wall time too.

Models (both trained from scratch per seed with Adam 1e-3, batch 64 and
integer labels with from-logits sparse cross-entropy):

* MLP 64-256-256-10, 150 epochs (trains to ~zero loss); EL2N 15 epochs × 5.
* BN-CNN on 8×8×1 images: Conv32-BN-ReLU, Conv64-BN-ReLU, MaxPool,
  Conv64-BN-ReLU, global average pooling, Dense10; 60 epochs; EL2N 6 epochs × 5.

Run (3.2 minutes on 2 CPU cores when last measured; `--quick` is a ~1-2 minute smoke
run with seed 0, a fifth of the epochs and 2 EL2N repeats, not for reporting):

    python benchmarks/detection.py [--seeds 0 1 2] [--quick]

Prints a Markdown table of mean ± std over seeds per (model, method) and the
GEX / EL2N wall-time ratio, and writes the table (`detection.md`) and the
per-seed rows (`detection.csv`) under `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _models
import numpy as np

NOISE = 0.1
BATCH_SIZE = 64
EL2N_FRACTION = 0.1
EL2N_REPEATS = 5
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("GEX (default)", "GEX (floor 0.05)", "Loss at θ*", "EL2N")
FIELDS = (
    "model",
    "seed",
    "method",
    "auc",
    "ap",
    "precision",
    "recall",
    "f1",
    "flagged",
    "seconds",
    "test_accuracy",
    "gex_learning_rate",
)


def _mlp():
    return _models.compiled(_models.mlp())


def _bn_cnn():
    return _models.compiled(_models.digits_bn_cnn())


#: name -> (model_fn, image inputs, training epochs)
MODELS = {
    "MLP": (_mlp, False, 150),
    "BN-CNN": (_bn_cnn, True, 60),
}


def _ranking(is_noisy, scores) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auc": roc_auc_score(is_noisy, scores),
        "ap": average_precision_score(is_noisy, scores),
    }


def _flags(is_noisy, flagged) -> dict:
    true_pos = int(np.sum(flagged & is_noisy))
    precision = true_pos / max(int(flagged.sum()), 1)
    recall = true_pos / max(int(is_noisy.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum())}


def run_one(name: str, seed: int, *, epoch_scale: float = 1.0, repeats: int = EL2N_REPEATS):
    """Trains one model on one seed and returns a row per method."""
    import keras

    import keras_gex
    from keras_gex.baselines import el2n_scores, loss_scores
    from keras_gex.datasets import noisy_digits

    model_fn, image, epochs = MODELS[name]
    epochs = max(1, round(epochs * epoch_scale))
    el2n_epochs = max(1, round(EL2N_FRACTION * epochs))
    data = noisy_digits(NOISE, seed=seed, image=image)
    x, y, noisy = data.x_train, data.y_train, data.is_noisy

    keras.utils.set_random_seed(seed)
    model = model_fn()
    start = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
    train_seconds = time.perf_counter() - start
    logits = model(data.x_test, training=False)
    test_acc = float(np.mean(np.argmax(np.asarray(logits), axis=1) == data.y_test))
    common = {"model": name, "seed": seed, "test_accuracy": test_acc}

    rows = []
    start = time.perf_counter()
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), seed=seed, verbose=0)
    report = keras_gex.detect_noisy((x, y), ens, verbose=0)
    gex_seconds = time.perf_counter() - start
    lr = float(ens.info["learning_rate"])
    rows.append(
        {
            **common,
            "method": METHODS[0],
            **_ranking(noisy, report.scores),
            **_flags(noisy, report.noisy_mask),
            "seconds": gex_seconds,
            "gex_learning_rate": lr,
        }
    )
    floored = ens.deviations((x, y), reference_floor=0.05, verbose=0).self_influence
    rows.append(
        {**common, "method": METHODS[1], **_ranking(noisy, floored), "gex_learning_rate": lr}
    )

    start = time.perf_counter()
    losses = loss_scores(model, (x, y), verbose=0)
    rows.append(
        {
            **common,
            "method": METHODS[2],
            **_ranking(noisy, losses),
            "seconds": time.perf_counter() - start,
        }
    )

    start = time.perf_counter()
    el2n = el2n_scores(
        model_fn,
        x,
        y,
        epochs=el2n_epochs,
        repeats=repeats,
        batch_size=BATCH_SIZE,
        seed=seed,
        verbose=0,
    )
    rows.append(
        {
            **common,
            "method": f"{METHODS[3]} ({el2n_epochs} ep × {repeats})",
            **_ranking(noisy, el2n),
            "seconds": time.perf_counter() - start,
        }
    )
    print(
        f"{name} seed {seed}: trained {epochs} epochs in {train_seconds:.0f} s "
        f"(test acc {test_acc:.3f}); "
        + ", ".join(f"{r['method']} AUC {r['auc']:.3f}" for r in rows)
        + f"; GEX {gex_seconds:.0f} s (lr {lr:.3g}), EL2N {rows[-1]['seconds']:.0f} s",
        flush=True,
    )
    return rows


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _seconds(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def markdown_table(rows, seeds) -> str:
    """Mean ± std over seeds per (model, method), plus the GEX / EL2N time ratio."""
    header = (
        "| Model | Method | AUC | AP | Precision | Recall | F1 | Time (s) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    ratios = []
    for model in MODELS:
        model_rows = [r for r in rows if r["model"] == model]
        methods = list(dict.fromkeys(r["method"] for r in model_rows))
        for method in methods:
            group = [r for r in model_rows if r["method"] == method]
            cells = [_mean_std([r.get(k) for r in group]) for k in ("auc", "ap")]
            cells += [_mean_std([r.get(k) for r in group]) for k in ("precision", "recall", "f1")]
            cells.append(_seconds([r.get("seconds") for r in group]))
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        gex = [r["seconds"] for r in model_rows if r["method"] == METHODS[0]]
        el2n = [r["seconds"] for r in model_rows if r["method"].startswith(METHODS[3])]
        if gex and el2n:
            acc = np.mean([r["test_accuracy"] for r in model_rows if r["method"] == METHODS[0]])
            ratios.append(
                f"{model} {np.mean(gex) / np.mean(el2n):.2f}× (θ* test accuracy {acc:.3f})"
            )
    seeds_text = ", ".join(str(s) for s in seeds)
    footer = [
        "",
        f"digits, {NOISE:.0%} flipped labels, seeds {seeds_text}; mean ± std over seeds. "
        "Precision / recall / F1: rows flagged by `detect_noisy`'s default threshold.",
        "GEX wall time / EL2N wall time: " + "; ".join(ratios),
    ]
    return "\n".join(lines + footer)


def _write(rows, table: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "detection.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    (RESULTS_DIR / "detection.md").write_text(table + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: seed 0 only, a fifth of the epochs, 2 EL2N repeats",
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run"
    )
    args = parser.parse_args(argv)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    scale, repeats = (0.2, 2) if args.quick else (1.0, EL2N_REPEATS)

    start = time.perf_counter()
    rows = []
    for name in args.models:
        for seed in seeds:
            rows.extend(run_one(name, seed, epoch_scale=scale, repeats=repeats))
    table = markdown_table(rows, seeds)
    print()
    print(table)
    _write(rows, table)
    print(
        f"\nwrote {RESULTS_DIR / 'detection.md'} and detection.csv "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
