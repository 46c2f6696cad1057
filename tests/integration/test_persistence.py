import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import make_bn_model, make_mlp
from tolerances import SCORE_ATOL, SCORE_RTOL

import keras_gex


def _assert_same_members(a, b):
    """Floating-point weights bit-identical (integer dropout-seed state is not saved)."""
    assert a.num_members == b.num_members
    for ma, mb in zip(a.members, b.members):
        for wa, wb in zip(ma.trainable + ma.non_trainable, mb.trainable + mb.non_trainable):
            if np.issubdtype(wa.dtype, np.floating):
                np.testing.assert_array_equal(wa, wb)


@pytest.fixture(scope="module")
def bn_setup(digits):
    model = make_bn_model(seed=0)
    data = (digits.x_train[:400], digits.y_train[:400])
    model.fit(*data, epochs=3, batch_size=32, verbose=0)
    ens = keras_gex.GeometricEnsemble.collect(
        model, data, num_members=3, steps=20, learning_rate=0.1, seed=0, verbose=0
    )
    return model, ens, data


def test_save_load_score_equals_in_memory(bn_setup, tmp_path):
    model, ens, data = bn_setup
    ens.save(tmp_path / "ge")
    files = sorted(os.listdir(tmp_path / "ge"))
    assert files == [
        "manifest.json",
        "member_000.weights.h5",
        "member_001.weights.h5",
        "member_002.weights.h5",
        "reference.weights.h5",
    ]
    manifest = json.loads((tmp_path / "ge" / "manifest.json").read_text())
    assert manifest["library_version"] == keras_gex.__version__
    assert manifest["num_members"] == 3 and manifest["info"]["learning_rate"] == 0.1
    loaded = keras_gex.GeometricEnsemble.load(tmp_path / "ge", model)
    _assert_same_members(ens, loaded)
    np.testing.assert_allclose(
        loaded.loss_deviations(data, verbose=0),
        ens.loss_deviations(data, verbose=0),
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
    )
    assert loaded.info["learning_rate"] == 0.1


def test_load_into_a_model_rebuilt_from_a_keras_file(bn_setup, tmp_path):
    model, ens, data = bn_setup
    model.save(tmp_path / "model.keras")
    ens.save(tmp_path / "ge")
    rebuilt = keras.models.load_model(tmp_path / "model.keras")
    loaded = keras_gex.GeometricEnsemble.load(tmp_path / "ge", rebuilt)
    np.testing.assert_allclose(
        loaded.self_influence(data, verbose=0), ens.self_influence(data, verbose=0), rtol=1e-5
    )


def test_load_refuses_other_architecture_weights_or_loss(bn_setup, tmp_path):
    model, ens, _ = bn_setup
    ens.save(tmp_path / "ge")
    with pytest.raises(ValueError, match="different architecture"):
        keras_gex.GeometricEnsemble.load(tmp_path / "ge", make_mlp(hidden=16))
    retrained = make_bn_model(seed=0)  # θ* moved a little, as by further training
    retrained.set_weights([w + 1e-3 if w.dtype.kind == "f" else w for w in model.get_weights()])
    with pytest.raises(ValueError, match="different trained weights"):
        keras_gex.GeometricEnsemble.load(tmp_path / "ge", retrained)
    with pytest.raises(ValueError, match=r"was collected with loss.*Pass the original `loss=`"):
        keras_gex.GeometricEnsemble.load(tmp_path / "ge", model, loss="mse")
    # The same loss read as another kind (a focal loss saved by a version that read it
    # as a regression): named by kind, not as "X, but the model's loss is X".
    manifest_path = tmp_path / "ge" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["loss"]["kind"] = "other"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"kind other.*reads that loss as another kind"):
        keras_gex.GeometricEnsemble.load(tmp_path / "ge", model)
    with pytest.raises(FileNotFoundError, match="No keras_gex ensemble"):
        keras_gex.GeometricEnsemble.load(tmp_path / "nothing", model)


def test_collect_with_directory_equals_plain_collection_and_loads(digits, tmp_path):
    data = (digits.x_train[:300], digits.y_train[:300])
    model = make_mlp(seed=1, hidden=32)
    model.fit(*data, epochs=5, verbose=0)
    kwargs = dict(num_members=3, steps=15, seed=4, verbose=0)
    plain = keras_gex.GeometricEnsemble.collect(model, data, **kwargs)
    stored = keras_gex.GeometricEnsemble.collect(model, data, directory=tmp_path / "ge", **kwargs)
    _assert_same_members(plain, stored)
    _assert_same_members(plain, keras_gex.GeometricEnsemble.load(tmp_path / "ge", model))
    # Re-running the finished call loads every member instead of recomputing.
    again = keras_gex.GeometricEnsemble.collect(model, data, directory=tmp_path / "ge", **kwargs)
    _assert_same_members(plain, again)
    with pytest.raises(ValueError, match="steps=15"):
        keras_gex.GeometricEnsemble.collect(
            model, data, directory=tmp_path / "ge", **{**kwargs, "steps": 16}
        )


@pytest.mark.slow
def test_resume_uses_the_calibrated_weight_decay(digits, tmp_path, monkeypatch):
    """Calibration can raise the decay (at SGD's stability edge); a resumed
    collection reads it from the store, so its members equal an uninterrupted
    run's. A store written before the decay existed (λ = 0) refuses "auto"."""
    from keras_gex.collection import step_size
    from keras_gex.config import Probe

    def fake_calibrate(run_probe, rel_of, record, *args, **kwargs):
        record.append(Probe(0.1, 0.8, 1.0, accepted=True, weight_decay=0.4))
        return 0.1, 0.4, None

    monkeypatch.setattr(step_size, "calibrate", fake_calibrate)
    data = (digits.x_train[:300], digits.y_train[:300])
    model = make_mlp(seed=1, hidden=32)
    model.fit(*data, epochs=5, verbose=0)
    kwargs = dict(steps=15, seed=4, verbose=0)
    plain = keras_gex.GeometricEnsemble.collect(model, data, num_members=3, **kwargs)
    assert plain.record.weight_decay == 0.4
    directory = tmp_path / "ge"
    keras_gex.GeometricEnsemble.collect(model, data, num_members=2, directory=directory, **kwargs)
    resumed = keras_gex.GeometricEnsemble.collect(
        model, data, num_members=3, directory=directory, **kwargs
    )
    _assert_same_members(plain, resumed)
    assert resumed.record.weight_decay == 0.4
    with pytest.raises(ValueError, match="weight_decay"):
        keras_gex.GeometricEnsemble.collect(
            model, data, num_members=3, directory=directory, weight_decay=0.2, **kwargs
        )
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["config"]["weight_decay"]  # as written before the decay existed
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"weight_decay=0\.0"):
        keras_gex.GeometricEnsemble.collect(
            model, data, num_members=3, directory=directory, **kwargs
        )


_CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import keras, numpy as np, keras_gex
    data = np.load(sys.argv[1])
    model = keras.models.load_model(sys.argv[2])
    keras_gex.GeometricEnsemble.collect(
        model, (data["x"], data["y"]), num_members=6, steps=400, seed=7, learning_rate=0.3,
        directory=sys.argv[3], verbose=0)
    """
)


@pytest.mark.slow
def test_kill_and_resume_loses_nothing_and_matches_uninterrupted(digits, tmp_path):
    x, y = digits.x_train, digits.y_train
    model = make_mlp(seed=2, hidden=64)
    model.fit(x, y, epochs=20, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "child.py").write_text(_CHILD)
    directory = tmp_path / "ge"
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "data.npz"),
         str(tmp_path / "model.keras"), str(directory)],
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while not (directory / "member_001.weights.h5").exists():
            assert proc.poll() is None, "child exited before being killed"
            assert time.time() < deadline, "child made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    written = sorted(p.name for p in directory.glob("member_*.weights.h5"))
    assert 2 <= len(written) < 6, written  # killed mid-collection
    manifest = json.loads((directory / "manifest.json").read_text())
    assert not manifest["complete"]
    # A stray partial file of the killed run must never be taken for a member.
    (directory / f"member_{len(written):03d}.weights.h5.partial").write_bytes(b"garbage")

    model = keras.models.load_model(tmp_path / "model.keras")
    with pytest.raises(ValueError, match="incomplete"):
        keras_gex.GeometricEnsemble.load(directory, model)
    kwargs = dict(num_members=6, steps=400, seed=7, learning_rate=0.3, verbose=0)
    resumed = keras_gex.GeometricEnsemble.collect(model, (x, y), directory=directory, **kwargs)
    uninterrupted = keras_gex.GeometricEnsemble.collect(model, (x, y), **kwargs)
    _assert_same_members(resumed, uninterrupted)
    np.testing.assert_array_equal(
        resumed.self_influence((x, y), verbose=0), uninterrupted.self_influence((x, y), verbose=0)
    )


def test_deviation_cache_streams_and_is_reused(digits_ensemble, digits, tmp_path):
    data = (digits.x_train, digits.y_train)
    path = tmp_path / "dev.npy"
    cached = digits_ensemble.loss_deviations(data, cache=path, verbose=0)
    assert isinstance(cached, np.memmap)
    np.testing.assert_allclose(
        cached, digits_ensemble.loss_deviations(data, verbose=0), rtol=SCORE_RTOL, atol=SCORE_ATOL
    )
    stamp = path.stat().st_mtime_ns
    again = digits_ensemble.loss_deviations(data, cache=path, verbose=0)
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(again, cached)
    # Different data (one label changed) or a different clamp invalidates the cache.
    y2 = digits.y_train.copy()
    y2[0] = (y2[0] + 1) % 10
    changed = digits_ensemble.loss_deviations((digits.x_train, y2), cache=path, verbose=0)
    assert path.stat().st_mtime_ns != stamp
    assert changed[0, 0] != cached[0, 0]
    floored = digits_ensemble.loss_deviations(data, cache=path, reference_floor=0.05, verbose=0)
    np.testing.assert_allclose(
        floored,
        digits_ensemble.loss_deviations(data, reference_floor=0.05, verbose=0),
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
    )
    assert not list(tmp_path.glob("*partial*"))
    with pytest.raises(ValueError, match=r"'\.npy'"):
        digits_ensemble.loss_deviations(data, cache=tmp_path / "dev.bin", verbose=0)


def test_deviation_cache_from_dataset(digits_ensemble, digits, tmp_path):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((digits.x_train, digits.y_train)).batch(97)
    cached = digits_ensemble.loss_deviations(ds, cache=tmp_path / "d.npy", verbose=0)
    np.testing.assert_allclose(
        cached,
        digits_ensemble.loss_deviations((digits.x_train, digits.y_train), verbose=0),
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
    )
