"""GEX on a θ* trained with `class_weight`, against one trained without (the members never
see the weights). The zoo's 90/10 churn task (`imbalance-90-10`), 10% of each class flipped,
default collection; AUC of the members' loss over all rows and per given class.

    python benchmarks/class_weight.py [--seeds 0 1 2]

Prints a markdown table (docs/design.md#class-weights).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _aucs(noisy, given, scores) -> str:
    from sklearn.metrics import roc_auc_score

    parts = [roc_auc_score(noisy, scores)]
    parts += [roc_auc_score(noisy[given == c], scores[given == c]) for c in (0, 1)]
    return " / ".join(f"{a:.3f}" for a in parts)


def run(seed: int) -> dict:
    import keras
    import numpy as np
    import zoo
    from _zoo_cases import CASES

    import keras_gex

    case = CASES["imbalance-90-10"]
    data = case.load(False)
    given, noisy = zoo.add_noise(case, data, seed)
    given = np.asarray(given).reshape(-1) > 0.5
    targets = zoo.targets(case, np.asarray(given, dtype="float32"), data.num_classes)
    rare = float(np.mean(given))
    row = {}
    for name, weights in (("without", None), ("with", {0: 1.0, 1: (1 - rare) / rare})):
        keras.utils.set_random_seed(seed)
        model = case.build(data)
        model.fit(
            data.x,
            targets,
            epochs=case.epochs,
            batch_size=case.batch_size,
            verbose=0,
            class_weight=weights,
        )
        report = keras_gex.detect_noisy((data.x, targets), model, seed=seed, verbose=0)
        row[name] = _aucs(noisy, given, report.scores)
        row[f"{name} θ*"] = _aucs(noisy, given, report.reference_losses)
        row[f"{name} flagged"] = int(report.noisy_mask.sum())
    row["noisy"] = int(noisy.sum())
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    print("| seed | without class weights | with | θ*'s loss, without / with | flagged |")
    print("| --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        r = run(seed)
        print(
            f"| {seed} | {r['without']} | {r['with']} | {r['without θ*'].split(' / ')[0]} / "
            f"{r['with θ*'].split(' / ')[0]} | {r['without flagged']} / {r['with flagged']} "
            f"of {r['noisy']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
