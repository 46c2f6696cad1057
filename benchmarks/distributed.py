"""GEX on `tf.distribute`: scores and time on 1, 2 and 4 replicas and on 1 vs 2 workers.

Two measurements, each configuration in a fresh process (device layouts are
fixed when TensorFlow starts, and every process gets the same seeded work):

* **Scoring.** An MLP (64-512-512-10) with M=8 perturbed members scores N
  synthetic examples (`ensemble.loss_deviations(..., strategy=...)`). For
  each configuration: seconds (warm: traced once first; the faster of two
  passes), examples/s,
  examples/s per replica, and the largest absolute difference of the
  self-influence scores from the single-device scores computed in the same
  process (the bound the tests enforce is 1e-5).
* **Collection on digits** (10% flipped labels, an MLP trained once and
  shared): 4 members, 100 steps each, step size calibrated (`"auto"`), then
  detection AUC of self-influence against the known flips. Sequential (one device),
  data-parallel (`strategy=`), one member per replica
  (`per_replica_members=True`), and the same on 2 worker processes
  (`MultiWorkerMirroredStrategy` on 127.0.0.1, one replica each).

Replicas are GPUs when the machine has enough of them (then the table's
examples/s per replica is the number to look at; one GPU is split into
logical GPUs, which share it); otherwise the CPU is split into logical
devices, which share the same cores: on CPU the table shows that scores and
members agree and what the distribution costs, not a speed-up. Workers get
one GPU each when there are enough, else they run on the CPU.

Usage::

    python benchmarks/distributed.py            # N = 200k scored examples
    python benchmarks/distributed.py --quick    # N = 20k, no 4-replica collection
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _models

FEATURES = 64
CLASSES = 10
HIDDEN = 512
MEMBERS = 8
BATCH = 1024
COLLECT = dict(num_members=4, steps=100, seed=0)  # learning_rate="auto", the default
WORKER_TIMEOUT_S = 900


# -- child processes ---------------------------------------------------------------------


def _devices(replicas: int):
    """`replicas` device names and what they are.

    GPUs when there are enough; one GPU split into `replicas` logical GPUs
    when there is only one (then the replicas share it: overhead, not
    scaling); otherwise the CPU split into logical devices.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= replicas:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        return [f"/gpu:{i}" for i in range(replicas)], "GPU"
    if gpus:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=8192)] * replicas
        )
        return [f"/gpu:{i}" for i in range(replicas)], "GPU (logical, 1 physical)"
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * max(replicas, 1)
    )
    return [f"/cpu:{i}" for i in range(replicas)], "CPU (logical)"


def _strategy(kind: str, replicas: int, worker: int = 0):
    """(strategy or None, device description) for `single`, `mirrored` or `workers`."""
    import tensorflow as tf

    if kind == "mirrored":
        devices, what = _devices(replicas)
        return tf.distribute.MirroredStrategy(devices), what
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "workers":
        # one GPU per worker when there are enough, else CPU workers (never two on one GPU)
        if len(gpus) >= replicas:
            tf.config.set_visible_devices(gpus[worker], "GPU")
            tf.config.experimental.set_memory_growth(gpus[worker], True)
            what = "GPU"
        else:
            tf.config.set_visible_devices([], "GPU")
            what = "CPU"
        return tf.distribute.MultiWorkerMirroredStrategy(), what
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return None, "GPU" if gpus else "CPU"


def _score_job(strategy, n: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_gex
    from keras_gex.losses import resolve_loss
    from keras_gex.weights import WeightSet

    keras.utils.set_random_seed(0)
    model = _models.compiled(_models.mlp(FEATURES, CLASSES, "sequential", width=HIDDEN))
    reference = WeightSet.from_model(model)
    rng = np.random.default_rng(0)
    members = [
        WeightSet(
            [w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in reference.trainable], []
        )
        for _ in range(MEMBERS)
    ]
    ensemble = keras_gex.GeometricEnsemble(model, reference, members, resolve_loss(model))
    x = tf.random.stateless_normal([n, FEATURES], seed=[1, 2]).numpy()
    y = (np.arange(n) % CLASSES).astype("int64")
    single = ensemble.self_influence((x[:BATCH], y[:BATCH]), batch_size=BATCH, verbose=0)
    ensemble.self_influence((x[:BATCH], y[:BATCH]), batch_size=BATCH, verbose=0, strategy=strategy)
    seconds = float("inf")
    for _ in range(2):  # the faster of two passes: less noise from other processes
        start = time.perf_counter()
        scores = ensemble.self_influence((x, y), batch_size=BATCH, verbose=0, strategy=strategy)
        seconds = min(seconds, time.perf_counter() - start)
    if strategy is not None:
        single = ensemble.self_influence((x, y), batch_size=BATCH, verbose=0)
    else:
        single = scores
    return {"seconds": seconds, "max_abs_diff": float(np.max(np.abs(scores - single)))}


def _collect_job(strategy, mode: str, weights_path: str) -> dict:
    import keras
    from sklearn.metrics import roc_auc_score

    import keras_gex
    from keras_gex.datasets import noisy_digits

    digits = noisy_digits(noise=0.1, seed=0)
    model = _digits_model(keras)
    model.load_weights(weights_path)
    data = (digits.x_train, digits.y_train)
    start = time.perf_counter()
    ensemble = keras_gex.GeometricEnsemble.collect(
        model,
        data,
        verbose=0,
        strategy=strategy,
        per_replica_members=mode == "per_replica",
        **COLLECT,
    )
    seconds = time.perf_counter() - start
    scores = ensemble.self_influence(data, verbose=0)  # one device: only the members differ
    return {"seconds": seconds, "auc": float(roc_auc_score(digits.is_noisy, scores))}


def _digits_model(keras):
    keras.utils.set_random_seed(0)
    return _models.compiled(_models.mlp(name="sequential"))


def _prepare(weights_path: str) -> dict:
    import keras

    from keras_gex.datasets import noisy_digits

    digits = noisy_digits(noise=0.1, seed=0)
    model = _digits_model(keras)
    model.fit(digits.x_train, digits.y_train, epochs=100, batch_size=64, verbose=0)
    model.save_weights(weights_path)
    return {}


def _child(argv) -> int:
    """`child JOB KIND REPLICAS ARG MODE [worker INDEX PORTS]`: prints one JSON line."""
    job, kind, replicas, arg, mode = argv[:5]
    index = 0
    if kind == "workers":
        index, ports = int(argv[6]), argv[7].split(",")
        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            }
        )
    if job == "prepare":
        result = _prepare(arg)
    else:
        strategy, device = _strategy(kind, int(replicas), index)
        if job == "score":
            result = _score_job(strategy, int(arg))
        else:
            result = _collect_job(strategy, mode, arg)
        result["device"] = device
        if strategy is not None:
            result["replicas"] = int(strategy.num_replicas_in_sync)
    print(json.dumps(result), flush=True)
    return 0


# -- parent ----------------------------------------------------------------------------


def _free_ports(count: int) -> list:
    """`count` distinct free loopback ports (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run(job: str, kind: str, replicas: int, arg, mode: str = "-") -> dict:
    """Runs one job in a fresh process (`replicas` processes for `workers`)."""
    cmd = [sys.executable, __file__, "child", job, kind, str(replicas), str(arg), mode]
    if kind != "workers":
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{job} {kind} {replicas} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    ports = ",".join(map(str, _free_ports(replicas)))
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    procs = [
        subprocess.Popen(
            ["timeout", "-k", "10", str(WORKER_TIMEOUT_S), *cmd, "worker", str(i), ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(replicas)
    ]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{job} on {replicas} workers failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N, fewer configurations")
    parser.add_argument("--n", type=int, default=None, help="examples to score")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    configs = [
        ("single device", "single", 1),
        ("MirroredStrategy, 1 replica", "mirrored", 1),
        ("MirroredStrategy, 2 replicas", "mirrored", 2),
        ("MirroredStrategy, 4 replicas", "mirrored", 4),
        ("MultiWorkerMirroredStrategy, 2 workers × 1", "workers", 2),
    ]
    print(f"### Scoring: N = {n:,} examples, M = {MEMBERS} members, batch {BATCH}\n")
    print(
        "| configuration | device | replicas | seconds | examples/s "
        "| examples/s per replica | max abs diff vs single device |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, kind, replicas in configs:
        log(f"scoring: {label}")
        r = _run("score", kind, replicas, n)
        reps = r.get("replicas", 1)
        rate = n / r["seconds"]
        print(
            f"| {label} | {r['device']} | {reps} | {r['seconds']:.2f} | {rate:,.0f} "
            f"| {rate / reps:,.0f} | {r['max_abs_diff']:.1e} |",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "digits_mlp.weights.h5")
        log("training the digits MLP")
        _run("prepare", "single", 1, weights)
        collect_configs = [
            ("sequential, single device", "single", 1, "sequential"),
            ("data-parallel, 2 replicas", "mirrored", 2, "data"),
            ("one member per replica, 2 replicas", "mirrored", 2, "per_replica"),
        ]
        if not args.quick:
            collect_configs += [
                ("data-parallel, 4 replicas", "mirrored", 4, "data"),
                ("one member per replica, 4 replicas", "mirrored", 4, "per_replica"),
            ]
        collect_configs += [
            ("data-parallel, 2 workers × 1", "workers", 2, "data"),
            ("one member per replica, 2 workers × 1", "workers", 2, "per_replica"),
        ]
        print(
            f"\n### Collection on digits (10% flipped): {COLLECT['num_members']} members × "
            f"{COLLECT['steps']} steps, learning_rate 'auto'\n"
        )
        print("| configuration | device | seconds | AUC | AUC − sequential |")
        print("|---|---|---:|---:|---:|")
        base = None
        for label, kind, replicas, mode in collect_configs:
            log(f"collection: {label}")
            r = _run("collect", kind, replicas, weights, mode)
            base = r["auc"] if base is None else base
            print(
                f"| {label} | {r['device']} | {r['seconds']:.2f} | {r['auc']:.4f} "
                f"| {r['auc'] - base:+.4f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
