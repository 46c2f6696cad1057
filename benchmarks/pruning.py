"""Dataset pruning and data-source separation with GEX (paper §5.3 and §5.4).

**Pruning.** Clean labels; a model is trained, its geometric ensemble collected
with default arguments, and the training set pruned by 10 %, 30 % and 50 %:

* GEX: lowest self-influence first (`keras_gex.prune`), of all rows (the paper's
  rule) and of each class (`per_class=True`);
* EL2N: lowest EL2N score first (`keras_gex.baselines.el2n_scores`, 10 % of the
  training epochs × 3 repeats), the pruning method of Paul et al. (2021);
* random.

A fresh model is retrained on each kept subset with the same recipe, and its
test accuracy is reported (mean ± std over seeds). Cases: scikit-learn digits
with the 64-256-256-10 MLP (offline), and a Fashion-MNIST subset with a small
CNN via tensorflow-datasets (`TFDS_DATA_DIR=../shared/tfds` works offline and is
used automatically when that folder exists).

**Data-source separation.** A mixture of digits (8×8) and Fashion-MNIST images
downscaled to 8×8, labelled with 20 classes (digit classes 0-9, fashion classes
10-19); one MLP is trained on the mixture and the self-influence of every
example is summarised per source with `keras_gex.source_separation` (AUC of
"the score separates fashion from digits") for every seed, with loss-at-θ* for
contrast, and the full per-source table of the first seed.

Usage::

    python benchmarks/pruning.py [--seeds 0 1 2] [--quick] [--skip-fashion]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _models

_SHARED_TFDS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tfds"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)

import numpy as np  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FRACTIONS = (0.1, 0.3, 0.5)


def _mlp(input_dim, classes, seed):
    import keras

    keras.utils.set_random_seed(seed)
    return _models.compiled(_models.mlp(input_dim, classes, name="sequential"))


def _cnn(seed):
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _digits(seed):
    from keras_gex.datasets import noisy_digits

    d = noisy_digits(noise=0.0, seed=seed)
    return d.x_train, d.y_train_clean, d.x_test, d.y_test


def _fashion(seed, n_train, n_test):
    import tensorflow_datasets as tfds

    def load(split, n):
        ds = tfds.load("fashion_mnist", split=split, as_supervised=True)
        x, y = next(iter(tfds.as_numpy(ds.batch(100_000))))
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(x), size=n, replace=False)
        return (x[idx].astype("float32") / 255.0), y[idx].astype("int64")

    x_train, y_train = load("train", n_train)
    x_test, y_test = load("test", n_test)
    return x_train, y_train, x_test, y_test


def prune_case(name, make, data, epochs, seed, el2n_epochs, members, log):
    import keras_gex
    from keras_gex.baselines import el2n_scores

    x, y, x_test, y_test = data
    model = make(seed)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    rows = [(name, "full data", 0.0, seed, _models.accuracy(model, x_test, y_test), 1.0)]
    start = time.perf_counter()
    ens = keras_gex.GeometricEnsemble.collect(
        model, (x, y), num_members=members, seed=seed, verbose=0
    )
    gex = ens.self_influence((x, y), verbose=0)
    log(f"{name} seed {seed}: GEX {time.perf_counter() - start:.0f} s")
    el2n = el2n_scores(
        lambda: make(seed), x, y, epochs=el2n_epochs, repeats=3, seed=seed, verbose=0
    )
    rng = np.random.default_rng(seed)
    random_scores = rng.random(len(x))
    for fraction in FRACTIONS:
        for method, scores, per_class in (
            ("GEX", gex, False),
            ("GEX per class", gex, True),
            ("EL2N", el2n, False),
            ("random", random_scores, False),
        ):
            pruned = keras_gex.prune(
                (x, y), scores, fraction=fraction, per_class=per_class, verbose=0
            )
            kept = pruned.kept_indices
            retrained = make(seed)
            retrained.fit(x[kept], y[kept], epochs=epochs, batch_size=64, verbose=0)
            accuracy = _models.accuracy(retrained, x_test, y_test)
            smallest = min(k / total for k, total in pruned.kept_per_class().values())
            rows.append((name, method, fraction, seed, accuracy, smallest))
        log(f"{name} seed {seed}: pruned {fraction:.0%}")
    return rows


def separation_case(seed, log):
    import tensorflow as tf
    from sklearn.datasets import load_digits

    import keras_gex
    from keras_gex.baselines import loss_scores

    digits = load_digits()
    xd = (digits.data / 16.0).astype("float32")
    yd = digits.target.astype("int64")
    xf, yf, _, _ = _fashion(seed, len(xd), 10)
    xf = tf.image.resize(xf, (8, 8), antialias=True).numpy().reshape(len(xf), 64)
    xf = (xf - xf.min()) / (xf.max() - xf.min())
    x = np.concatenate([xd, xf]).astype("float32")
    y = np.concatenate([yd, yf + 10])
    source = np.array(["digits"] * len(xd) + ["fashion (8×8)"] * len(xf))
    model = _mlp(64, 20, seed)
    model.fit(x, y, epochs=150, batch_size=64, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(model, (x, y), seed=seed, verbose=0)
    gex = keras_gex.source_separation(ens.self_influence((x, y), verbose=0), source)
    loss = keras_gex.source_separation(loss_scores(model, (x, y), verbose=0), source)
    log(f"separation seed {seed} done")
    return gex, loss


def _separation_table(seeds, separations) -> str:
    """Per seed, the AUC of "the score ranks Fashion-MNIST above digits"."""

    def fashion_auc(separation):
        return float(separation.auc[list(separation.sources).index("fashion (8×8)")])

    aucs = [(fashion_auc(gex), fashion_auc(loss)) for gex, loss in separations]
    lines = ["| seed | GEX self-influence AUC | loss at θ* AUC |", "|---|---:|---:|"]
    lines += [f"| {seed} | {g:.3f} | {v:.3f} |" for seed, (g, v) in zip(seeds, aucs)]
    g, v = np.array(aucs).T
    lines.append(
        f"| mean ± std | {g.mean():.3f} ± {g.std():.3f} | {v.mean():.3f} ± {v.std():.3f} |"
    )
    return "\n".join(lines)


def _table(rows):
    import collections

    groups = collections.defaultdict(list)
    smallest = collections.defaultdict(list)
    full = collections.defaultdict(list)
    for case, method, fraction, _, acc, share in rows:
        if method == "full data":
            full[case].append(acc)
        else:
            groups[(case, fraction, method)].append(acc)
            smallest[(case, fraction, method)].append(share)
    methods = ("GEX", "GEX per class", "EL2N", "random")
    lines = [
        "| case | pruned | " + " | ".join(methods) + " | GEX: smallest share kept of a class |",
        "|---|---:|" + "---:|" * (len(methods) + 1),
    ]
    for case in dict.fromkeys(c for c, *_ in rows):
        blank = " |" * len(methods)
        lines.append(
            f"| {case} | 0% (full) | {np.mean(full[case]):.4f} ± {np.std(full[case]):.4f} |{blank}"
        )
        for fraction in FRACTIONS:
            cells = []
            for method in methods:
                acc = groups[(case, fraction, method)]
                cells.append(f"{np.mean(acc):.4f} ± {np.std(acc):.4f}")
            cells.append(" / ".join(f"{v:.0%}" for v in smallest[(case, fraction, "GEX")]))
            lines.append(f"| {case} | {fraction:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="seed 0, small settings (smoke run)")
    parser.add_argument("--skip-fashion", action="store_true", help="digits only (no tfds)")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else args.seeds

    def log(msg):
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows = []
    for seed in seeds:
        rows += prune_case(
            "digits MLP", lambda s: _mlp(64, 10, s), _digits(seed),
            20 if args.quick else 60, seed, 3 if args.quick else 6, 4 if args.quick else 8, log,
        )  # fmt: skip
        if not args.skip_fashion:
            n = 2000 if args.quick else 5000
            rows += prune_case(
                f"Fashion-MNIST CNN ({n} ex.)", _cnn, _fashion(seed, n, 2000),
                3 if args.quick else 10, seed, 1, 4 if args.quick else 8, log,
            )  # fmt: skip
    table = _table(rows)
    out = [
        "## Pruning: test accuracy after retraining on the kept examples",
        "",
        table,
        "",
        f"Seeds {seeds}; mean ± std over seeds. The last column: for the GEX ranking of all "
        "rows, the smallest share of a class's rows kept (`PruneResult.kept_per_class()`), "
        "by seed.",
    ]
    if not args.skip_fashion:
        separations = [separation_case(seed, log) for seed in seeds]
        gex, loss = separations[0]
        out += [
            "",
            "## Data-source separation: digits vs Fashion-MNIST downscaled to 8×8",
            "",
            _separation_table(seeds, separations),
            "",
            f"Seed {seeds[0]}, GEX self-influence:",
            "",
            gex.table(),
            "",
            f"Seed {seeds[0]}, loss at θ*:",
            "",
            loss.table(),
        ]
    text = "\n".join(out)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pruning.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
