"""Scoring at scale: time linear in N and M, peak memory flat in N.

Scores N synthetic examples (generated on the fly by `tf.data`, never held in
memory) with a small MLP and an M-member ensemble, streaming the (N, M)
deviation matrix into a `.npy` cache with `ensemble.loss_deviations(data,
cache=...)`. Each configuration runs in a fresh subprocess so its peak RSS is
its own. Prints a Markdown table with throughput and the ratios that must stay
constant (seconds per example per member) and flat (peak RSS).

Usage::

    python benchmarks/scale.py                 # N = 10k, 100k, 1M; M = 4, 8, 16
    python benchmarks/scale.py --quick         # N = 2k, 20k; M = 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _models

FEATURES = 32
CLASSES = 10
BATCH = 1024


def _worker(n: int, m: int) -> dict:
    import resource

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_gex
    from keras_gex.losses import resolve_loss
    from keras_gex.weights import WeightSet

    keras.utils.set_random_seed(0)
    model = _models.compiled(_models.mlp(FEATURES, CLASSES, "sequential"))
    reference = WeightSet.from_model(model)
    rng = np.random.default_rng(0)
    members = [
        WeightSet(
            [w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in reference.trainable],
            list(reference.non_trainable),
        )
        for _ in range(m)
    ]
    ensemble = keras_gex.GeometricEnsemble(model, reference, members, resolve_loss(model))

    def make(batch_start):
        idx = tf.range(batch_start, tf.minimum(batch_start + BATCH, n))
        x = tf.random.stateless_normal(
            [tf.size(idx), FEATURES], seed=tf.stack([tf.cast(batch_start, tf.int32), 7])
        )
        return x, idx % CLASSES

    ds = tf.data.Dataset.range(0, n, BATCH).map(make).prefetch(2)
    ensemble.loss_deviations(ds.take(1), verbose=0)  # trace once; timing below is warm
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from keras_gex.data import DataSource

    start = time.perf_counter()
    DataSource(ds).fingerprint()  # the data pass the cache makes before scoring
    fingerprint = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dev = ensemble.loss_deviations(ds, cache=os.path.join(tmp, "dev.npy"), verbose=0)
        seconds = time.perf_counter() - start
        assert dev.shape == (n, m) and np.isfinite(dev[-1]).all()
        start = time.perf_counter()
        ensemble.loss_deviations(ds, cache=os.path.join(tmp, "dev.npy"), verbose=0)
        reuse = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "N": n,
        "M": m,
        "seconds": seconds,
        "fingerprint_seconds": fingerprint,
        "reuse_seconds": reuse,
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--worker", nargs=2, type=int, metavar=("N", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return 0
    if args.quick:
        configs = [(2_000, 8), (20_000, 8)]
    else:
        configs = [(10_000, 8), (100_000, 8), (1_000_000, 8), (100_000, 4), (100_000, 16)]
    rows = []
    for n, m in configs:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(n), str(m)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  N={n:>9,} M={m:>2}: {row['seconds']:.2f} s", file=sys.stderr, flush=True)
    ref = max(rows, key=lambda r: r["N"] * (r["M"] + 1))

    def scoring(r):
        return r["seconds"] - r["fingerprint_seconds"]

    unit = scoring(ref) / (ref["N"] * (ref["M"] + 1))
    print(
        "| N | M | total s | data pass s | scoring s | forward passes/s "
        "| scoring s per N·(M+1), vs largest | cache reuse s | peak RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        passes = r["N"] * (r["M"] + 1)
        print(
            f"| {r['N']:,} | {r['M']} | {r['seconds']:.2f} | {r['fingerprint_seconds']:.2f} | "
            f"{scoring(r):.2f} | {passes / scoring(r):,.0f} | "
            f"{scoring(r) / passes / unit:.2f}x | {r['reuse_seconds']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    same_m = sorted((r for r in rows if r["M"] == rows[0]["M"]), key=lambda r: r["N"])
    growth = same_m[-1]["peak_rss_mib"] / same_m[0]["peak_rss_mib"]
    print(
        f"\npeak RSS at N={same_m[-1]['N']:,} / N={same_m[0]['N']:,}: {growth:.2f}x "
        f"(data grew {same_m[-1]['N'] / same_m[0]['N']:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
