"""Command line: `keras-gex demo` (also `python -m keras_gex demo`)."""

from __future__ import annotations

import argparse
import os
import sys

# `import keras_gex.app.cli` runs the package's `__init__` (TensorFlow) anyway, so
# the choices below come from the library's own tables, not copies.
from keras_gex.analysis.detect import DEFAULT_THRESHOLDS, SCORES
from keras_gex.analysis.thresholding import TRANSFORMS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-gex",
        description=(
            "GEX (Geometric Ensemble for sample eXplanation) for Keras models: "
            "find mislabeled and influential training examples."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits (offline, ~1-2 min)",
        description=(
            "Flip 10%% of the digits training labels, train an MLP with "
            "GEXCollector, detect the flips, relabel and retrain."
        ),
    )
    demo.add_argument(
        "--noise", type=float, default=0.1, help="fraction of labels flipped (default 0.1)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--epochs", type=int, default=150, help="training epochs (default 150)")
    demo.add_argument("--members", type=int, default=8, help="GE members M (default 8)")
    demo.add_argument(
        "--plot",
        default="gex_scores.png",
        help="histogram PNG path, or '' for none (default gex_scores.png)",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the results")

    detect = sub.add_parser(
        "detect",
        help="score the training data of a saved model and flag likely mislabeled examples",
        description=(
            "Collect a geometric ensemble from a saved Keras model, score every example "
            "of DATA by its members' losses and flag likely mislabeled ones. Writes "
            "scores.csv, scores.npy, flagged.txt, scores.png, report.html and "
            "the ensemble (reused by later runs) into --out."
        ),
        epilog=(
            "DATA is an .npz file with arrays `x` and `y` (inputs exactly as the model "
            "takes them), or a TensorFlow Datasets name such as `fashion_mnist` or "
            "`fashion_mnist:train[:10%]` (as_supervised (image, label) pairs). "
            "Exit status: 0 success, 2 bad arguments or input, 1 unexpected error."
        ),
    )
    detect.add_argument("model", help="trained model saved with model.save('model.keras')")
    detect.add_argument("data", help="x/y .npz file or tfds name[:split]")
    detect.add_argument("--out", default="gex_report", help="output directory (default gex_report)")
    detect.add_argument("--members", type=int, default=8, help="GE members M (default 8)")
    detect.add_argument(
        "--steps",
        default="auto",
        help="SGD steps per member, or 'auto' (default: ~10 epochs, 50-800 steps)",
    )
    detect.add_argument(
        "--learning-rate", default="auto", help="peak fine-tuning step size or 'auto' (default)"
    )
    detect.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    detect.add_argument(
        "--threshold",
        default="auto",
        help=(
            "auto (default: the score's rule, "
            + ", ".join(f"{rule} for {score}" for score, rule in DEFAULT_THRESHOLDS.items())
            + f"), {', '.join(TRANSFORMS)}, or a number"
        ),
    )
    detect.add_argument(
        "--score",
        default="member_loss",
        choices=SCORES,
        help="what to rank by (default member_loss; self_influence is the paper's score)",
    )
    detect.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    detect.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import matplotlib

    matplotlib.use("Agg")
    try:
        if args.command == "demo":
            from keras_gex.app.demo import run_demo

            run_demo(
                noise=args.noise,
                seed=args.seed,
                epochs=args.epochs,
                num_members=args.members,
                plot_path=args.plot or None,
                verbose=0 if args.quiet else 1,
            )
        else:
            _detect(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"keras-gex: error: {err}", file=sys.stderr)
        return 2
    return 0


def _load_data(spec: str):
    import numpy as np

    if spec.endswith(".npz") or os.path.exists(spec):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"DATA file {spec!r} does not exist.")
        with np.load(spec) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise ValueError(
                    f"DATA file {spec!r} must contain arrays 'x' and 'y'; missing "
                    f"{sorted(missing)} (has {sorted(archive.files)})."
                )
            return archive["x"], archive["y"], None
    import tensorflow_datasets as tfds

    name, _, split = spec.partition(":")
    try:
        ds, info = tfds.load(name, split=split or "train", as_supervised=True, with_info=True)
    except Exception as err:
        raise ValueError(f"Could not load DATA {spec!r} with tensorflow-datasets: {err}") from err
    x, y = next(iter(tfds.as_numpy(ds.batch(1_000_000).take(1))))
    names = None
    label = info.features.get("label") if hasattr(info.features, "get") else None
    if label is not None and hasattr(label, "names"):
        names = list(label.names)
    return x, y, names


def _auto_or(value: str, convert, flag: str, what: str):
    """`"auto"`, or `value` converted by `convert` (a clear error otherwise)."""
    if value == "auto":
        return value
    try:
        return convert(value)
    except ValueError:
        raise ValueError(
            f"Argument `{flag}` must be 'auto' or {what}. Received: {value!r}"
        ) from None


def _detect(args) -> None:
    import csv

    import keras
    import numpy as np

    import keras_gex
    from keras_gex.io.html_report import write_html_report

    if not os.path.exists(args.model):
        raise FileNotFoundError(f"MODEL file {args.model!r} does not exist.")
    model = keras.models.load_model(args.model)
    x, y, class_names = _load_data(args.data)
    threshold = args.threshold
    if threshold != "auto" and threshold not in TRANSFORMS:
        try:
            threshold = float(threshold)
        except ValueError:
            raise ValueError(
                f"Argument `--threshold` must be auto, one of {', '.join(TRANSFORMS)} or a number. "
                f"Received: {args.threshold!r}"
            ) from None
    lr = _auto_or(args.learning_rate, float, "--learning-rate", "a number")
    steps = _auto_or(args.steps, int, "--steps", "a positive integer")
    verbose = 0 if args.quiet else 1
    os.makedirs(args.out, exist_ok=True)
    ensemble = keras_gex.GeometricEnsemble.collect(
        model,
        (x, y),
        num_members=args.members,
        steps=steps,
        learning_rate=lr,
        batch_size=args.batch_size,
        seed=args.seed,
        directory=os.path.join(args.out, "ensemble"),
        verbose=verbose,
    )
    report = keras_gex.detect_noisy(
        (x, y), ensemble, threshold=threshold, score=args.score, verbose=verbose
    )
    if verbose:
        report.summary()
    np.save(os.path.join(args.out, "scores.npy"), report.scores)
    given = report.given_labels()
    predicted = report.predicted_labels()
    suggested = report.suggested_labels()
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["index", report.score_method, "flagged", "given_label", "predicted_label"]
        writer.writerow([*header, "suggested_label"])
        for i, score in enumerate(report.scores):
            writer.writerow(
                [i, f"{score:.6g}", int(report.noisy_mask[i]), given[i], predicted[i], suggested[i]]
            )
    with open(os.path.join(args.out, "flagged.txt"), "w") as handle:
        handle.writelines(f"{i}\n" for i in report.noisy_indices)
    report.plot(path=os.path.join(args.out, "scores.png"))
    write_html_report(
        report, os.path.join(args.out, "report.html"), images=x, class_names=class_names
    )
    print(
        f"{report.num_flagged} of {len(report.scores)} examples flagged; results in {args.out}/ "
        "(scores.csv, scores.npy, flagged.txt, scores.png, report.html)"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
