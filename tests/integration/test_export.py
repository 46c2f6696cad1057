import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras_gex
from keras_gex.io.export import export_scorer


@pytest.mark.slow
def test_exported_scorer_reproduces_scores_in_a_fresh_process(digits_ensemble, digits, tmp_path):
    x, y = digits.x_train[:300], digits.y_train[:300]
    report = keras_gex.detect_noisy((x, y), digits_ensemble, verbose=0)
    path = export_scorer(digits_ensemble, tmp_path / "scorer", report=report)
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    script = textwrap.dedent(
        """
        import sys, numpy as np, tensorflow as tf
        assert "keras_gex" not in sys.modules
        scorer = tf.saved_model.load(sys.argv[1])
        data = np.load(sys.argv[2])
        out = scorer.score(tf.constant(data["x"]), tf.constant(data["y"], tf.int64))
        np.save(sys.argv[3], out["self_influence"].numpy())
        np.save(sys.argv[5], out["member_margin"].numpy())
        np.save(sys.argv[6], scorer.flag(tf.constant(data["x"]), tf.constant(data["y"])))
        sig = scorer.signatures["serving_default"]
        np.save(sys.argv[4], sig(x=tf.constant(data["x"]), y=tf.constant(data["y"]))["deviations"])
        assert "keras_gex" not in sys.modules
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", script, path, str(tmp_path / "batch.npz"),
         str(tmp_path / "si.npy"), str(tmp_path / "dev.npy"), str(tmp_path / "margin.npy"),
         str(tmp_path / "flag.npy")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = digits_ensemble.deviations((x, y), verbose=0)
    np.testing.assert_allclose(
        np.load(tmp_path / "si.npy"), expected.self_influence, atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "dev.npy"), expected.deviations, atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(np.load(tmp_path / "margin.npy"), report.scores, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "flag.npy"), report.noisy_mask)


def test_exported_scores_are_detect_noisys(digits_ensemble, digits, tmp_path):
    """The member loss and margin of the artifact and of `detect_noisy` agree."""
    scorer = tf.saved_model.load(export_scorer(digits_ensemble, tmp_path / "scorer"))
    x, y = digits.x_train[:400], digits.y_train[:400]
    out = scorer.score(tf.constant(x), tf.constant(y, tf.int64))
    report = keras_gex.detect_noisy((x, y), digits_ensemble, verbose=0)
    assert report.score_method == "member_margin"
    np.testing.assert_allclose(out["member_margin"].numpy(), report.scores, atol=1e-5)
    loss = keras_gex.detect_noisy((x, y), digits_ensemble, score="member_loss", verbose=0)
    np.testing.assert_allclose(out["member_loss"].numpy(), loss.scores, atol=1e-5)
    assert out["member_margin"].dtype == tf.float64
    # The margin is the loss less half a log-probability (≤ 0): never above it.
    assert np.all(out["member_margin"].numpy() <= out["member_loss"].numpy() + 1e-12)


def test_exported_report_flags_the_rows_the_report_flags(digits_ensemble, digits, tmp_path):
    """With `report=`, `flag(x, y)` is the report's cut on its own score, for every score."""
    data = (digits.x_train, digits.y_train)
    x, y = tf.constant(digits.x_train), tf.constant(digits.y_train, tf.int64)
    for score in ("auto", "member_loss", "self_influence"):
        report = keras_gex.detect_noisy(data, digits_ensemble, score=score, verbose=0)
        path = export_scorer(digits_ensemble, tmp_path / report.score_method, report=report)
        scorer = tf.saved_model.load(path)
        assert scorer.score_method.numpy().decode() == report.score_method
        # Midway between the highest score not flagged and the lowest flagged.
        kept, flagged = report.scores[~report.noisy_mask], report.scores[report.noisy_mask]
        assert report.threshold == kept.max() < scorer.threshold.numpy() < flagged.min()
        np.testing.assert_array_equal(scorer.flag(x, y).numpy(), report.noisy_mask)
        served = scorer.signatures["flag"](x=x, y=y)["output_0"]  # also a signature
        np.testing.assert_array_equal(served.numpy(), report.noisy_mask)


def test_export_refuses_a_report_it_cannot_carry(digits_ensemble, digits, tmp_path):
    margin = keras_gex.detect_noisy((digits.x_train, digits.y_train), digits_ensemble, verbose=0)
    with pytest.raises(TypeError, match="Argument `report` must be a `NoisyLabelReport`"):
        export_scorer(digits_ensemble, tmp_path / "a", report=margin.threshold)
    elsewhere = dataclasses.replace(margin, ensemble=None)  # not this ensemble's cut
    with pytest.raises(ValueError, match="scored with the ensemble being exported"):
        export_scorer(digits_ensemble, tmp_path / "b", report=elsewhere)
    several = tf.TensorSpec([None, 3], tf.int64)  # labels per position: no margin
    with pytest.raises(ValueError, match="member_margin"):
        export_scorer(digits_ensemble, tmp_path / "c", label_spec=several, report=margin)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["dict", "list"])
def test_exported_scorer_of_several_inputs_takes_them_as_the_model_does(
    digits, tmp_path, structure
):
    """A model of several inputs: the default spec is its own structure; the
    artifact's scores and flags are `detect_noisy`'s, also through the signature."""
    import keras

    x, y = digits.x_train[:300], digits.y_train[:300]
    keras.utils.set_random_seed(0)
    a, b = keras.Input((40,), name="a"), keras.Input((24,), name="b")
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([a, b]))
    inputs = {"a": a, "b": b} if structure == "dict" else [a, b]
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = {"a": x[:, :40], "b": x[:, 40:]}
    if structure == "list":
        data = [data["a"], data["b"]]
    model.fit(data, y, epochs=20, verbose=0)
    ensemble = keras_gex.GeometricEnsemble.collect(
        model, (data, y), num_members=2, steps=20, learning_rate=0.5, seed=0, verbose=0
    )
    report = keras_gex.detect_noisy((data, y), ensemble, verbose=0)
    assert report.num_flagged > 0
    scorer = tf.saved_model.load(export_scorer(ensemble, tmp_path / structure, report=report))
    out = scorer.score(tf.nest.map_structure(tf.constant, data), tf.constant(y, tf.int64))
    np.testing.assert_allclose(out["member_margin"].numpy(), report.scores, atol=1e-5)
    flags = scorer.flag(tf.nest.map_structure(tf.constant, data), tf.constant(y, tf.int64))
    np.testing.assert_array_equal(flags.numpy(), report.noisy_mask)
    named = dict(zip(("a", "b"), data)) if structure == "list" else data
    keys = {"a": "a", "b": "b"} if structure == "dict" else {"a": "x0", "b": "x1"}
    served = scorer.signatures["flag"](
        **{keys[k]: tf.constant(v) for k, v in named.items()}, y=tf.constant(y, tf.int64)
    )
    np.testing.assert_array_equal(served["output_0"].numpy(), report.noisy_mask)


def test_export_validates_specs(digits_ensemble, tmp_path):
    with pytest.raises(TypeError, match="input_spec"):
        export_scorer(digits_ensemble, tmp_path / "s", input_spec=(None, 64))
    clash = tf.TensorSpec([None, 64], tf.float32, name="y")  # the label's name
    with pytest.raises(ValueError, match="distinct names"):
        export_scorer(digits_ensemble, tmp_path / "s1", input_spec=clash)
    assert keras_gex.export_scorer is export_scorer
    spec = tf.TensorSpec([None, 64], tf.float32)
    export_scorer(digits_ensemble, tmp_path / "s2", input_spec=spec)
    assert (tmp_path / "s2" / "saved_model.pb").exists()


def test_exported_scorer_of_one_sigmoid_unit_takes_labels_as_fit_does(digits, tmp_path):
    """(N,) and (N, 1) labels both score, to the ensemble's own deviations."""
    import keras

    x, parity = digits.x_train[:200], (digits.y_train[:200] % 2).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, parity, epochs=5, verbose=0)
    ensemble = keras_gex.GeometricEnsemble.collect(
        model, (x, parity), num_members=2, steps=10, learning_rate=0.1, seed=0, verbose=0
    )
    scorer = tf.saved_model.load(export_scorer(ensemble, tmp_path / "scorer"))
    expected = ensemble.deviations((x, parity), verbose=0).deviations
    margin = keras_gex.detect_noisy((x, parity), ensemble, verbose=0)
    assert margin.score_method == "member_margin"
    for labels in (parity, parity[:, None]):
        out = scorer.score(tf.constant(x), tf.constant(labels))
        np.testing.assert_allclose(out["deviations"].numpy(), expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out["member_margin"].numpy(), margin.scores, atol=1e-5)


def test_exported_scorer_has_no_margin_without_one_class_per_row(digits, tmp_path):
    """Several sigmoid labels per row, or a regression: the member loss, no margin."""
    import keras

    x = digits.x_train[:200]
    labels = {
        "binary_crossentropy": np.eye(10, dtype="float32")[digits.y_train[:200]],
        "mean_squared_error": digits.y_train[:200, None].astype("float32"),
    }
    for loss, y in labels.items():
        keras.utils.set_random_seed(0)
        link = "sigmoid" if loss == "binary_crossentropy" else None
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(y.shape[1], link)])
        model.compile("adam", loss)
        model.fit(x, y, epochs=2, verbose=0)
        ensemble = keras_gex.GeometricEnsemble.collect(
            model, (x, y), num_members=2, steps=10, learning_rate=0.01, seed=0, verbose=0
        )
        scorer = tf.saved_model.load(export_scorer(ensemble, tmp_path / loss))
        out = scorer.score(x, y)
        assert "member_margin" not in out, loss
        if loss == "binary_crossentropy":
            # A label width the spec leaves open may hold several labels per row: no margin.
            spec = tf.TensorSpec([None, None], tf.float32)
            path = export_scorer(ensemble, tmp_path / f"{loss}-open", label_spec=spec)
            assert "member_margin" not in tf.saved_model.load(path).score(x, y)
        report = keras_gex.detect_noisy((x, y), ensemble, verbose=0)
        assert report.score_method == "member_loss", loss
        np.testing.assert_allclose(out["member_loss"].numpy(), report.scores, atol=1e-5)
