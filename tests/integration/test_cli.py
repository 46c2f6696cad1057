import os
import re
import subprocess
import sys

import pytest

from keras_gex.app.cli import main


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "10%" in out and "%%" not in out  # argparse does not %-format descriptions
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    out = capsys.readouterr().out
    assert "--overwrite" in out and "train[:10%]" in out and "%%" not in out


def test_help_does_not_start_tensorflow():
    """`keras-gex --help` imports the CLI and parses: no TensorFlow, so no start-up log."""
    code = (
        "import sys\n"
        "from keras_gex.app.cli import main\n"
        "assert main([]) == 2\n"
        "try:\n"
        "    main(['detect', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted({'tensorflow', 'keras'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert "usage: keras-gex detect" in proc.stdout


def test_choices_match_the_library():
    """The CLI restates detect's tables (importing them starts TensorFlow)."""
    from keras_gex.analysis import detect
    from keras_gex.app import cli

    assert cli.SCORES == detect.SCORES
    assert cli.DEFAULT_THRESHOLDS == detect.DEFAULT_THRESHOLDS


def test_library_messages_read_with_flags():
    from keras_gex.app.cli import FLAGS, cli_message

    message = (
        "The trained model predicts only 13.2% of its training labels. "
        '`detect_noisy`\'s default `score="auto"` (the member loss or margin) suffers less; '
        "train longer, "
        "and look at the loss of θ* (`report.reference_losses`). Check `report.summary()` "
        "and pass `learning_rate=` if members did not move: learning_rate='auto' gave "
        "learning_rate=0.198. Pass `jit_compile=False` to skip it."
    )
    assert cli_message(message, FLAGS["detect"]) == (
        "The trained model predicts only 13.2% of its training labels. "
        "The default `--score auto` (the member loss or margin) suffers less; train longer, "
        "and look at the loss of θ*. Check the report's summary "
        "and pass `--learning-rate` if members did not move: --learning-rate auto gave "
        "--learning-rate 0.198. Pass `jit_compile=False` to skip it."
    )
    error = "Argument `num_members` must be at least 1. Received: num_members=0"
    assert cli_message(error, FLAGS["detect"]) == (
        "Argument `--members` must be at least 1. Received: --members 0"
    )
    assert cli_message("Received: plot_path='x'", FLAGS["demo"]) == "Received: --plot x"


def test_warnings_are_cli_messages(monkeypatch, capsys):
    import warnings

    from keras_gex.app import cli

    def fake_detect(args):
        warnings.warn('Try `score="self_influence"` or `learning_rate=`.', stacklevel=2)

    monkeypatch.setattr(cli, "_detect", fake_detect)
    assert cli.main(["detect", "m.keras", "d.npz"]) == 0
    err = capsys.readouterr().err
    assert err == "keras-gex: warning: Try `--score self_influence` or `--learning-rate`.\n"


def test_bad_demo_argument_gives_clear_error(capsys):
    assert main(["demo", "--noise", "1.5", "--quiet", "--plot", ""]) == 2
    err = capsys.readouterr().err  # the library's message, with the flag
    assert err.startswith("keras-gex: error: Argument `--noise` must be")
    assert err.rstrip().endswith("Received: --noise 1.5")
    assert main(["demo", "--members", "many", "--quiet", "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert "Argument `--members` must be 'auto' or a positive integer. Received: 'many'" in err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The README's main job: AUC >= 0.99 and relabeling beats the noisy model."""
    plot = tmp_path / "hist.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_gex", "demo", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    auc = float(re.search(r"AUC (\d\.\d+)", out).group(1))
    accs = re.search(r"noisy (\d\.\d+)\s+->\s+relabeled (\d\.\d+)", out)
    assert auc >= 0.99, out
    assert float(accs.group(2)) > float(accs.group(1)), out
    assert plot.stat().st_size > 5000


def _run_cli(args, cwd, **environ):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **environ)
    return subprocess.run(
        [sys.executable, "-m", "keras_gex", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


@pytest.mark.slow
def test_detect_end_to_end_on_a_saved_digits_model(tmp_path, digits):
    import csv

    import numpy as np
    from conftest import make_mlp

    model = make_mlp(seed=0)
    model.fit(digits.x_train, digits.y_train, epochs=60, batch_size=64, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=digits.x_train, y=digits.y_train)
    proc = _run_cli(
        ["detect", "model.keras", "data.npz", "--out", "out", "--members", "3", "--quiet"],
        tmp_path,
        KERAS_BACKEND="jax",  # a shell set up for other work: the command runs TensorFlow
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    outputs = ("scores.csv", "scores.npy", "flagged.txt", "scores.png", "report.html")
    for name in (*outputs, "summary.json"):
        assert (out / name).stat().st_size > 0, name
    scores = np.load(out / "scores.npy")
    assert scores.shape == (len(digits.x_train),)
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(scores) and int(rows[5]["given_label"]) == digits.y_train[5]
    assert float(rows[5]["member_margin"]) == pytest.approx(scores[5], rel=1e-5)  # the default
    flagged = [int(line) for line in (out / "flagged.txt").read_text().split()]
    assert flagged and set(flagged) == {i for i, r in enumerate(rows) if r["flagged"] == "1"}
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(digits.is_noisy, scores) > 0.97
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Flagged examples" in page
    assert "mean_m ℓ(z,θ_m)" in page
    assert "flagged; results in out/" in proc.stdout
    # A second run reuses the saved ensemble: same scores; `--export` adds its scorer,
    # whose `flag` applies the run's threshold to the rows it flagged.
    again = _run_cli(
        ["detect", "model.keras", "data.npz", "--out", "out", "--members", "3", "--quiet",
         "--export"],
        tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out / "scores.npy"), scores)
    assert "scorer/" in again.stdout
    import tensorflow as tf

    scorer = tf.saved_model.load(str(out / "scorer"))
    flags = scorer.flag(tf.constant(digits.x_train), tf.constant(digits.y_train, tf.int64))
    assert scorer.score_method.numpy() == b"member_margin"
    assert set(np.flatnonzero(flags.numpy())) == set(flagged)
    # The paper's score from the same ensemble: its own column name.
    args = ["detect", "model.keras", "data.npz", "--out", "out", "--members", "3", "--quiet"]
    paper = _run_cli([*args, "--score", "self_influence"], tmp_path)
    assert paper.returncode == 0, paper.stderr[-3000:]
    with open(out / "scores.csv") as handle:
        assert "self_influence" in next(csv.DictReader(handle))
    assert roc_auc_score(digits.is_noisy, np.load(out / "scores.npy")) > 0.97


@pytest.mark.slow
def test_detect_output_and_a_stale_ensemble(tmp_path, digits):
    """Piped output is plain text, TensorFlow's start-up log and Python's warning
    format stay out of stderr, and a retrained model needs `--overwrite`."""
    import numpy as np
    from conftest import make_mlp

    model = make_mlp(seed=0, hidden=32)
    model.fit(digits.x_train, digits.y_train, epochs=1, batch_size=64, verbose=0)
    model.save(tmp_path / "model.keras")  # predicts few labels: warns
    np.savez(tmp_path / "data.npz", x=digits.x_train, y=digits.y_train)
    args = ["detect", "model.keras", "data.npz", "--out", "out", "--members", "2"]
    args += ["--steps", "50"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run(
        [sys.executable, "-m", "keras_gex", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scoring" in run.stdout and "GEX noisy-label report" in run.stdout
    assert not re.search("[\x1b\r\b]", run.stdout), run.stdout[-2000:]
    for line in run.stderr.splitlines():
        assert line.startswith("keras-gex: warning: "), run.stderr[-3000:]
    assert "keras-gex: warning: The trained model predicts only" in run.stderr
    assert "`--score auto`" in run.stderr and 'score="' not in run.stderr

    model.fit(digits.x_train, digits.y_train, epochs=1, batch_size=64, verbose=0)
    model.save(tmp_path / "model.keras")  # retrained: the saved ensemble is stale
    stale = _run_cli([*args, "--quiet"], tmp_path)
    assert stale.returncode == 2 and "different trained weights" in stale.stderr
    assert "`--overwrite`" in stale.stderr and "Traceback" not in stale.stderr
    fresh = _run_cli([*args, "--quiet", "--overwrite"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert len(fresh.stdout.splitlines()) == 1 and "flagged; results in out/" in fresh.stdout


def test_detect_bad_inputs_exit_2(tmp_path, monkeypatch, capsys):
    """In-process: the same `main` the console script runs (the real process is
    exercised by the slow end-to-end tests)."""
    import numpy as np
    from conftest import make_mlp

    monkeypatch.chdir(tmp_path)
    assert main(["detect", "missing.keras", "data.npz"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    make_mlp(hidden=4).save(tmp_path / "m.keras")
    assert main(["detect", "m.keras", "bad.npz"]) == 2
    assert "must contain the labels 'y' and the inputs 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", "m.keras"])
    assert exit_info.value.code == 2 and "usage" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_reads_several_inputs_from_npz(tmp_path, monkeypatch, digits):
    """`x.NAME` arrays feed a model with dict inputs; no image gallery for them."""
    import keras
    import numpy as np

    monkeypatch.chdir(tmp_path)
    x, y = digits.x_train[:200], digits.y_train[:200]
    keras.utils.set_random_seed(0)
    a, b = keras.Input((40,), name="a"), keras.Input((24,), name="b")
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(10)(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit({"a": x[:, :40], "b": x[:, 40:]}, y, epochs=20, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", **{"x.a": x[:, :40], "x.b": x[:, 40:]}, y=y)
    args = ["detect", "model.keras", "data.npz", "--members", "2", "--steps", "20", "--quiet"]
    assert main([*args, "--learning-rate", "0.5", "--export"]) == 0
    scores = np.load(tmp_path / "gex_report" / "scores.npy")
    assert scores.shape == (200,) and np.all(np.isfinite(scores))
    assert (tmp_path / "gex_report" / "report.html").read_text().count("data:image/png") == 1
    import json  # the outcome for scripts agrees with the other files

    summary = json.loads((tmp_path / "gex_report" / "summary.json").read_text())
    flagged = np.loadtxt(tmp_path / "gex_report" / "flagged.txt", dtype=int, ndmin=1)
    assert summary["rows"] == 200 and summary["flagged"] == len(flagged) > 0
    assert summary["score"] == "member_margin" and summary["members"] == 2
    assert summary["threshold_rule"] == "min_error" and isinstance(summary["diagnostics"], list)
    above = np.flatnonzero(scores > summary["threshold"])
    assert set(above) == set(flagged)
    import tensorflow as tf  # the scorer takes the inputs by name, as the model does

    scorer = tf.saved_model.load(str(tmp_path / "gex_report" / "scorer"))
    inputs = {"a": tf.constant(x[:, :40]), "b": tf.constant(x[:, 40:])}
    gate = scorer.flag(inputs, tf.constant(y, tf.int64)).numpy()
    assert set(np.flatnonzero(gate)) == set(flagged)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sigmoid", "regression"])
def test_detect_on_a_sigmoid_classifier_and_a_regression(tmp_path, monkeypatch, digits, task):
    """One sigmoid unit and 1-D labels: class ids 0/1 in scores.csv, a flagged row's suggestion
    the other class. A regression has no class per row: scores and flags only."""
    import csv

    import keras
    import numpy as np

    monkeypatch.chdir(tmp_path)
    x = digits.x_train[:300]
    y = (digits.y_train[:300] % 2).astype("float32")
    loss = keras.losses.BinaryCrossentropy(from_logits=True) if task == "sigmoid" else "mse"
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", loss)
    model.fit(x, y, epochs=30, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    args = ["detect", "model.keras", "data.npz", "--members", "2", "--steps", "20", "--quiet"]
    assert main([*args, "--export"]) == 0
    with open(tmp_path / "gex_report" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300
    # The exported gate flags the rows the run flagged, labels as `fit` takes them.
    import tensorflow as tf

    scorer = tf.saved_model.load(str(tmp_path / "gex_report" / "scorer"))
    gate = scorer.flag(tf.constant(x), tf.constant(y)).numpy()
    np.testing.assert_array_equal(gate, [r["flagged"] == "1" for r in rows])
    if task == "regression":
        assert set(rows[0]) == {"index", "member_loss", "flagged"}
        return
    given = np.array([int(r["given_label"]) for r in rows])
    predicted = np.array([int(r["predicted_label"]) for r in rows])
    suggested = np.array([int(r["suggested_label"]) for r in rows])
    flagged = np.array([r["flagged"] == "1" for r in rows])
    np.testing.assert_array_equal(given, y.astype(int))
    logits = model.predict(x, verbose=0)[:, 0]
    np.testing.assert_array_equal(predicted, (logits > 0).astype(int))  # two routes agree
    assert flagged.any()
    np.testing.assert_array_equal(suggested, np.where(flagged, 1 - given, given))


def test_auto_or_number_arguments():
    from keras_gex.app.cli import _auto_or

    assert _auto_or("auto", int, "--steps", "a positive integer") == "auto"
    assert _auto_or("80", int, "--steps", "a positive integer") == 80
    assert _auto_or("0.2", float, "--learning-rate", "a number") == 0.2
    with pytest.raises(ValueError, match="`--steps` must be 'auto' or a positive integer"):
        _auto_or("many", int, "--steps", "a positive integer")


@pytest.mark.slow
def test_detect_imports_the_module_of_a_custom_layer(tmp_path, monkeypatch, capsys, digits):
    """A model with a registered custom layer loads once `--import` names its module (a name
    importable from the working directory, or a .py file); without it the error names the
    class and the flag, not Keras' dump of the whole config."""
    import importlib.util
    import uuid

    import keras
    import numpy as np

    package = f"gex_test_{uuid.uuid4().hex[:8]}"  # a registry name no other test holds
    source = (
        "import keras\n"
        f"@keras.saving.register_keras_serializable(package={package!r})\n"
        "class Halve(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x * 0.5\n"
    )
    (tmp_path / f"{package}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location(package, tmp_path / f"{package}.py")
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    x, y = digits.x_train[:200], digits.y_train[:200]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), layers.Halve(), keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    keras.saving.get_custom_objects().pop(f"{package}>Halve")  # as in a fresh process
    args = ["detect", "model.keras", "data.npz", "--members", "1", "--steps", "5", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "uses 'Halve', which Keras cannot find" in err and f"`--import {package}`" in err
    assert "config=" not in err
    assert main([*args, "--import", "missing_module"]) == 2
    assert "no module 'missing_module' here" in capsys.readouterr().err
    for module in (package, f"{package}.py"):
        keras.saving.get_custom_objects().pop(f"{package}>Halve", None)
        sys.modules.pop(package, None)
        assert main([*args, "--import", module, "--overwrite"]) == 0, capsys.readouterr().err
        assert np.load(tmp_path / "gex_report" / "scores.npy").shape == (200,)
