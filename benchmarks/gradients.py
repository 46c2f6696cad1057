"""Projected-gradient baselines: per-example route vs forward-mode JVPs.

TracInRP and RandProj (`keras_gex.baselines`) need ``Q_Rᵀ ∇_θ ℓ(z, θ)`` for
every example z and checkpoint θ. Two routes compute it, with the same Q_R:

* **per-example**: each example's gradient, vectorised over the batch
  (`tf.vectorized_map`), times the materialised Q_R (P × R floats);
* **JVP**: R forward-mode JVPs per batch along directions generated on the
  fly (memory O(P + batch × R)).

The library takes the per-example route while Q_R fits half of
`baselines.gradients._PER_EXAMPLE_BYTES` (512 MiB), else JVPs. Here each route is forced
in turn (the budget set to 0 forces JVPs).

For the θ* of `benchmarks/quality.py`'s cases (seed 0, 10% flips, trained or
read from `--model-cache`) and its default GE (8 members), the script times
TracInRP (R = 64, the 8 members as checkpoints) and RandProj (R = 64, θ*)
by both routes on the same rows, interleaved, best of `--reps`, and prints
their ratio, the largest difference between the routes relative to the
largest score, and the AUC of each against the known flips. The exact
squared gradient norm (TracIn without projection, per-example route only) is
timed beside them. The Fashion-MNIST case uses its first `--rows` rows
(the JVP route took 36 s per 1,000 rows there, the per-example one 5 s).

Run::

    TFDS_DATA_DIR=/path/to/tfds python benchmarks/gradients.py [--model-cache DIR]

Prints one Markdown table and writes it to `benchmarks/results/gradients.md`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "TFDS_DATA_DIR" not in os.environ and pathlib.Path("/work/shared/tfds").exists():
    os.environ["TFDS_DATA_DIR"] = "/work/shared/tfds"

import quality  # noqa: E402  (the benchmark's cases, data and θ* training)

CASES = ("digits MLP 10%", "digits BN-CNN 10%", "Fashion CNN 10%")


def _timed(fn):
    start = time.perf_counter()
    values = fn()
    return time.perf_counter() - start, values


def _auc(noisy, scores) -> float:
    return float(quality._ranking(noisy, scores)["auc"])


def case_rows(case: str, rows: int, reps: int, cache) -> list:
    import keras_gex
    from keras_gex import baselines

    data_fn, image, model_fn, epochs, batch_size, noise, sigmoid = quality.CASES[case]
    x, y, noisy, _, _ = data_fn(noise, 0, image)
    targets = quality._targets(y, sigmoid)
    model = quality._theta_star(case, model_fn, x, targets, epochs, batch_size, 0, sigmoid, cache)
    ensemble = keras_gex.GeometricEnsemble.collect(model, (x, targets), seed=0, verbose=0)
    x, targets, noisy = x[:rows], targets[:rows], noisy[:rows]
    weights = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    methods = {
        "TracInRP (R=64)": lambda: baselines.tracin_scores(ensemble, (x, targets), verbose=0),
        "RandProj (R=64)": lambda: baselines.randproj_scores(model, (x, targets), verbose=0),
    }
    budget = baselines.gradients._PER_EXAMPLE_BYTES
    out = []
    for method, fn in methods.items():
        best = {"per-example": np.inf, "jvp": np.inf}
        values = {}
        for _ in range(reps):
            for route, bytes_ in (("per-example", budget), ("jvp", 0)):
                baselines.gradients._PER_EXAMPLE_BYTES = bytes_
                try:
                    seconds, values[route] = _timed(fn)
                finally:
                    baselines.gradients._PER_EXAMPLE_BYTES = budget
                best[route] = min(best[route], seconds)
        scale = np.abs(values["jvp"]).max()
        out.append(
            {
                "case": case,
                "rows": len(x),
                "weights": weights,
                "method": method,
                "per_example_s": best["per-example"],
                "jvp_s": best["jvp"],
                "speedup": best["jvp"] / best["per-example"],
                "max_rel_diff": float(np.abs(values["per-example"] - values["jvp"]).max() / scale),
                "auc_per_example": _auc(noisy, values["per-example"]),
                "auc_jvp": _auc(noisy, values["jvp"]),
            }
        )
        print(out[-1], flush=True)
    exact = lambda: baselines.tracin_scores(ensemble, (x, targets), projection_dim=None, verbose=0)  # noqa: E731
    exact()
    seconds = min(_timed(exact)[0] for _ in range(reps))
    out.append(
        {
            "case": case,
            "rows": len(x),
            "weights": weights,
            "method": "TracIn exact norm",
            "per_example_s": seconds,
            "auc_per_example": _auc(noisy, exact()),
        }
    )
    print(out[-1], flush=True)
    return out


def render(rows) -> str:
    def f(row, key, fmt):
        return fmt.format(row[key]) if key in row else "—"

    lines = [
        "| Case | Rows | Weights | Method | Per-example (s) | JVP (s) | JVP / per-example "
        "| Max rel. diff | AUC per-example | AUC JVP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['rows']:,} | {r['weights']:,} | {r['method']} "
            f"| {f(r, 'per_example_s', '{:.2f}')} | {f(r, 'jvp_s', '{:.2f}')} "
            f"| {f(r, 'speedup', '{:.1f}x')} | {f(r, 'max_rel_diff', '{:.1e}')} "
            f"| {f(r, 'auc_per_example', '{:.4f}')} | {f(r, 'auc_jvp', '{:.4f}')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="rows scored per case")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per route")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(quality.CASES))
    parser.add_argument("--model-cache", default=None, help="folder of cached θ* (quality.py)")
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        rows += case_rows(case, args.rows, args.reps, args.model_cache)
    table = render(rows)
    print(table)
    quality.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (quality.RESULTS_DIR / "gradients.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
