"""Command line: `keras-gex demo` (also `python -m keras_gex demo`)."""

from __future__ import annotations

import argparse
import os
import sys


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
        default="gex_self_influence.png",
        help="histogram PNG path, or '' for none (default gex_self_influence.png)",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the results")
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
    from keras_gex.demo import run_demo

    try:
        run_demo(
            noise=args.noise,
            seed=args.seed,
            epochs=args.epochs,
            num_members=args.members,
            plot_path=args.plot or None,
            verbose=0 if args.quiet else 1,
        )
    except (ValueError, TypeError) as err:
        print(f"keras-gex: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
