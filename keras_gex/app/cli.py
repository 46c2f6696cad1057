"""Command line: `keras-gex demo`, `keras-gex detect` (also `python -m keras_gex`).

The `keras-gex` entry point imports this module before it parses anything, so the
module imports nothing heavy: TensorFlow starts only when a command runs, with its
C++ start-up log silenced (unless `TF_CPP_MIN_LOG_LEVEL` asks for it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
import warnings

# NumPy only; `keras_gex.analysis.detect` would start TensorFlow.
from keras_gex.analysis.thresholding import METHODS

#: `keras_gex.analysis.scores.SCORES` and `DEFAULT_THRESHOLDS`, restated so that
#: `--help` needs no TensorFlow; tests/integration/test_cli.py checks they agree.
SCORES = ("member_margin", "member_loss", "self_influence")
DEFAULT_THRESHOLDS = {
    "member_margin": "min_error",
    "member_loss": "min_error",
    "self_influence": "otsu_sqrt",
}

#: For each command, the library argument each flag sets: warnings and errors
#: written for Python callers are reworded with the flags.
FLAGS = {
    "demo": {
        "noise": "--noise",
        "seed": "--seed",
        "epochs": "--epochs",
        "num_members": "--members",
        "plot_path": "--plot",
    },
    "detect": {
        "num_members": "--members",
        "steps": "--steps",
        "learning_rate": "--learning-rate",
        "weight_decay": "--weight-decay",
        "batch_size": "--batch-size",
        "threshold": "--threshold",
        "score": "--score",
        "seed": "--seed",
    },
}

MEMBERS_HELP = (
    "GE members M, or 'auto' (default: 8, and at least 4 where 8 would take more SGD "
    "steps than the model's training did)"
)

#: Python-only references in library messages, as a command line user reads them.
_PHRASES = (
    ("`detect_noisy`'s default", "the default"),
    (" (`report.reference_losses`)", ""),
    ("`report.summary()`", "the report's summary"),
)


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
            "Flip a fraction of the digits training labels (--noise, 10% by default), "
            "train an MLP with GEXCollector, detect the flips, relabel and retrain."
        ),
    )
    demo.add_argument(
        "--noise", type=float, default=0.1, help="fraction of labels flipped (default 0.1)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--epochs", type=int, default=150, help="training epochs (default 150)")
    demo.add_argument("--members", default="auto", help=MEMBERS_HELP)
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
            "scores.csv, scores.npy, flagged.txt, scores.png, report.html, summary.json "
            "and the ensemble (reused by later runs) into --out."
        ),
        epilog=(
            "DATA is an .npz file with arrays `x` and `y` (inputs exactly as the model "
            "takes them; for several inputs `x.NAME` arrays by input name, or `x.0`, "
            "`x.1`, ...), or a TensorFlow Datasets name such as `fashion_mnist` or "
            "`fashion_mnist:train[:10%]` (as_supervised (image, label) pairs). "
            "Exit status: 0 success, 2 bad arguments or input, 1 unexpected error."
        ),
    )
    detect.add_argument("model", help="trained model saved with model.save('model.keras')")
    detect.add_argument("data", help="x/y .npz file or tfds name[:split]")
    detect.add_argument("--out", default="gex_report", help="output directory (default gex_report)")
    detect.add_argument("--members", default="auto", help=MEMBERS_HELP)
    detect.add_argument(
        "--steps",
        default="auto",
        help="SGD steps per member, or 'auto' (default: ~10 epochs, 50-800 steps)",
    )
    detect.add_argument(
        "--learning-rate", default="auto", help="peak fine-tuning step size or 'auto' (default)"
    )
    detect.add_argument(
        "--weight-decay",
        default="auto",
        help="members' decoupled weight decay, or 'auto' (default: 0.1)",
    )
    detect.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    rules = ", ".join(f"{rule} for {score}" for score, rule in DEFAULT_THRESHOLDS.items())
    transforms = ", ".join(METHODS)
    threshold_help = f"auto (default: the score's rule, {rules}), {transforms}, or a number"
    detect.add_argument("--threshold", default="auto", help=threshold_help)
    detect.add_argument(
        "--score",
        default="auto",
        choices=("auto", *SCORES),
        help="what to rank by (default auto: member_margin for labels of exclusive classes, "
        "else member_loss; self_influence is the paper's score)",
    )
    detect.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    detect.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "recollect the ensemble in --out/ensemble, replacing one saved for another "
            "model or other settings (default: reuse or resume it)"
        ),
    )
    detect.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help=(
            "a module (name, or .py file) to import before loading MODEL: where its custom "
            "layers or model classes are defined and registered; may be repeated"
        ),
    )
    detect.add_argument(
        "--export",
        action="store_true",
        help=(
            "also write --out/scorer: a TensorFlow SavedModel whose score(x, y) scores new "
            "batches as this run did and whose flag(x, y) applies its threshold "
            "(keras_gex.export_scorer with report=)"
        ),
    )
    detect.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    flags = FLAGS[args.command]
    try:
        with _warnings_as_messages(flags):
            _start_tensorflow()
            import matplotlib

            matplotlib.use("Agg")
            if args.command == "demo":
                _demo(args)
            else:
                _detect(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"keras-gex: error: {cli_message(str(err), flags)}", file=sys.stderr)
        return 2
    return 0


def cli_message(message: str, flags: dict) -> str:
    """`message`, written for Python callers, with the command line's flags.

    `learning_rate=0.2` reads `--learning-rate 0.2`, `` `score="member_loss"` ``
    reads `` `--score member_loss` ``, `` `learning_rate=` `` and
    `` `learning_rate` `` read `` `--learning-rate` ``, for the arguments in
    `flags`; other arguments are left as they are.

    Args:
        message: A warning or error message of the library.
        flags: Library argument name -> flag, e.g. `FLAGS["detect"]`.

    Returns:
        The reworded message.
    """
    for phrase, replacement in _PHRASES:
        capital = replacement[:1].upper() + replacement[1:]
        sentence_start = rf"(?:^|(?<=[.!?] )){re.escape(phrase)}"
        message = re.sub(sentence_start, lambda _, c=capital: c, message)
        message = message.replace(phrase, replacement)
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    assignment = re.compile(rf"(?<![\w.])({names})=(?:(['\"])([^'\"]*)\2|([\w.+-]*\w))?(?![\w(])")

    def with_flag(match: re.Match) -> str:
        value = match.group(3) if match.group(2) else match.group(4)
        flag = flags[match.group(1)]
        return f"{flag} {value}" if value else flag

    message = assignment.sub(with_flag, message)
    return re.sub(rf"`({names})`", lambda m: f"`{flags[m.group(1)]}`", message)


@contextlib.contextmanager
def _warnings_as_messages(flags: dict):
    """Shows warnings as `keras-gex: warning: ...` lines on stderr, with CLI flags."""

    def show(message, category, filename, lineno, file=None, line=None):
        text = cli_message(str(message).strip(), flags)
        print(f"keras-gex: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _start_tensorflow() -> None:
    """Imports TensorFlow and Keras with TensorFlow's C++ log silenced.

    `TF_CPP_MIN_LOG_LEVEL` defaults to 3 (fatal only; no cuInit error on machines
    without a GPU). TensorFlow also writes a few lines to stderr before its log
    level applies; unless `TF_CPP_MIN_LOG_LEVEL` is set below 2, they are held
    back and shown only if the import fails.
    """
    if "tensorflow" in sys.modules:
        return
    # The command runs in a process of its own: Keras on the backend keras_gex needs,
    # whatever KERAS_BACKEND the shell exports for other work.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    quiet = level.strip() in ("2", "3")  # else the user asked for TensorFlow's log
    with _native_stderr_held() if quiet else contextlib.nullcontext():
        import keras  # noqa: F401


@contextlib.contextmanager
def _native_stderr_held():
    """Holds back what C/C++ code writes to file descriptor 2; writes it out on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _demo(args) -> None:
    from keras_gex.app.demo import result_lines, run_demo

    result = run_demo(
        noise=args.noise,
        seed=args.seed,
        epochs=args.epochs,
        num_members=_auto_or(args.members, int, "--members", "a positive integer"),
        plot_path=args.plot or None,
        verbose=0 if args.quiet else 1,
    )
    if args.quiet:
        print("\n".join(result_lines(result)))


def _load_data(spec: str):
    import numpy as np

    if spec.endswith(".npz") or os.path.exists(spec):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"DATA file {spec!r} does not exist.")
        with np.load(spec) as archive:
            return (*_npz_inputs(spec, archive), None)
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


def _npz_inputs(spec: str, archive) -> tuple:
    """`(x, y)` of an .npz: `x`, or `x.NAME` arrays (dict inputs) / `x.0`, `x.1`, ... (tuple)."""
    parts = {key[2:]: archive[key] for key in archive.files if key.startswith("x.")}
    if "y" not in archive.files or not ("x" in archive.files or parts):
        raise ValueError(
            f"DATA file {spec!r} must contain the labels 'y' and the inputs 'x' (or, for a "
            "model with several inputs, 'x.NAME' arrays named by its inputs, or 'x.0', "
            f"'x.1', ... in its input order). Received: arrays {sorted(archive.files)}."
        )
    if "x" in archive.files:
        return archive["x"], archive["y"]
    if all(key.isdigit() for key in parts):
        return tuple(parts[key] for key in sorted(parts, key=int)), archive["y"]
    return parts, archive["y"]


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


def _collect(model, data, directory: str, *, overwrite: bool, **collect_kwargs):
    """The ensemble saved (or resumed) in `directory`; collected anew with `overwrite`."""
    import shutil

    from keras_gex.ensemble import GeometricEnsemble

    if overwrite and os.path.exists(os.path.join(directory, "manifest.json")):
        shutil.rmtree(directory)
    try:
        return GeometricEnsemble.collect(model, data, directory=directory, **collect_kwargs)
    except ValueError as err:
        if directory not in str(err):
            raise
        raise ValueError(
            f"{err} Run again with `--overwrite` to replace it with a new one, or pass "
            "another `--out`."
        ) from None


def _import_module(name: str) -> None:
    """Imports `--import`'s module: a `.py` file by path, else a module name (the
    working directory first on the path, as `python -m` has it)."""
    import importlib
    import importlib.util

    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"`--import` file {name!r} does not exist.")
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, os.path.abspath(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"`--import {name}`: no module {err.name!r} here. Pass a module name importable "
            "from the working directory, or the path of a .py file."
        ) from None


def _load_model(path: str):
    """`keras.models.load_model(path)`; a class Keras does not know is named with
    the flag that imports it, instead of Keras' dump of the whole config."""
    import keras

    try:
        return keras.models.load_model(path)
    except (TypeError, ValueError) as err:
        unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", str(err))
        if unknown is None:
            raise
        name = unknown.group(1)
        where = re.search(rf"'module': '([^']+)', 'class_name': '{re.escape(name)}'", str(err))
        module = where.group(1) if where else None
        hint = (
            f"`--import {module}` (or the path of its .py file)"
            if module and module not in ("__main__", "builtins")
            else "`--import MODULE` (a module name or the path of a .py file; a class "
            "defined in a script's `__main__` must move to a module first)"
        )
        raise ValueError(
            f"MODEL {path!r} uses {name!r}, which Keras cannot find in this process. Import "
            f"the module that defines it with {hint}; its custom classes must be decorated "
            "with `@keras.saving.register_keras_serializable()`."
        ) from None


def _detect(args) -> None:
    import csv
    import json

    import numpy as np

    import keras_gex.losses  # noqa: F401  (registers the library's loss for loading)
    from keras_gex.analysis.detect import detect_noisy
    from keras_gex.io.html_report import write_html_report

    if not os.path.exists(args.model):
        raise FileNotFoundError(f"MODEL file {args.model!r} does not exist.")
    threshold = args.threshold
    if threshold != "auto" and threshold not in METHODS:
        try:
            threshold = float(threshold)
        except ValueError:
            raise ValueError(
                f"Argument `--threshold` must be auto, one of {', '.join(METHODS)} or a number. "
                f"Received: {args.threshold!r}"
            ) from None
    learning_rate = _auto_or(args.learning_rate, float, "--learning-rate", "a number")
    weight_decay = _auto_or(args.weight_decay, float, "--weight-decay", "a number")
    steps = _auto_or(args.steps, int, "--steps", "a positive integer")
    num_members = _auto_or(args.members, int, "--members", "a positive integer")
    for module in args.imports:
        _import_module(module)
    model = _load_model(args.model)
    x, y, class_names = _load_data(args.data)
    verbose = 0 if args.quiet else 1
    # Keras' progress bar redraws itself with ANSI codes: on a terminal only.
    progress_bar = verbose and sys.stdout.isatty()
    os.makedirs(args.out, exist_ok=True)
    ensemble = _collect(
        model,
        (x, y),
        os.path.join(args.out, "ensemble"),
        overwrite=args.overwrite,
        num_members=num_members,
        steps=steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        verbose=verbose,
    )
    if verbose and not progress_bar:
        print(f"scoring {len(y)} examples with {ensemble.num_members} members ...", flush=True)
    start = time.perf_counter()
    report = detect_noisy(
        (x, y), ensemble, threshold=threshold, score=args.score, verbose=int(progress_bar)
    )
    if verbose and not progress_bar:
        print(f"scored in {time.perf_counter() - start:.0f} s", flush=True)
    if verbose:
        report.summary()
    np.save(os.path.join(args.out, "scores.npy"), report.scores)
    labels = _label_columns(report)
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", report.score_method, "flagged", *labels])
        for i, score in enumerate(report.scores):
            columns = [values[i] for values in labels.values()]
            writer.writerow([i, f"{score:.6g}", int(report.noisy_mask[i]), *columns])
    with open(os.path.join(args.out, "flagged.txt"), "w") as handle:
        handle.writelines(f"{i}\n" for i in report.noisy_indices)
    report.plot(path=os.path.join(args.out, "scores.png"))
    write_html_report(
        report,
        os.path.join(args.out, "report.html"),
        images=x if isinstance(x, np.ndarray) else None,  # no gallery for several inputs
        class_names=class_names,
    )
    summary = {  # the run's outcome for scripts: what stdout's summary says in prose
        "rows": len(report.scores),
        "flagged": report.num_flagged,
        "score": report.score_method,
        "threshold": float(report.threshold),
        "threshold_rule": report.threshold_method,
        "members": ensemble.num_members,
        "diagnostics": report.diagnostics(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    written = "scores.csv, scores.npy, flagged.txt, scores.png, report.html, summary.json"
    if args.export:
        import tensorflow as tf

        from keras_gex.io.export import export_scorer

        # The model's own input specs where it has them (a subclassed model: the data's).
        spec = None
        if not getattr(model, "inputs", None):
            spec = tf.nest.map_structure(lambda a: tf.TensorSpec([None, *a.shape[1:]], a.dtype), x)
        export_scorer(ensemble, os.path.join(args.out, "scorer"), input_spec=spec, report=report)
        written += ", scorer/"
    flagged = f"{report.num_flagged} of {len(report.scores)} examples flagged"
    print(f"{flagged}; results in {args.out}/ ({written})")


def _label_columns(report) -> dict:
    """`scores.csv`'s label columns: class ids where every row has one class.

    A regression or a multi-label model has no class per row: its CSV holds
    the scores and flags only.
    """
    try:
        return {
            "given_label": report.given_labels(),
            "predicted_label": report.predicted_labels(),
            "suggested_label": report.suggested_labels(),
        }
    except ValueError:
        return {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
