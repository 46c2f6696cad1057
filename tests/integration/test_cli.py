import os
import re
import subprocess
import sys

import pytest

from keras_gex.app.cli import main


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_help_reads_well():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0


def test_bad_demo_argument_gives_clear_error(capsys):
    assert main(["demo", "--noise", "1.5", "--quiet", "--plot", ""]) == 2
    assert "Argument `noise`" in capsys.readouterr().err


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


def _run_cli(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
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
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("scores.csv", "scores.npy", "flagged.txt", "scores.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    scores = np.load(out / "scores.npy")
    assert scores.shape == (len(digits.x_train),)
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(scores) and int(rows[5]["given_label"]) == digits.y_train[5]
    assert float(rows[5]["member_loss"]) == pytest.approx(scores[5], rel=1e-5)  # the default
    flagged = [int(line) for line in (out / "flagged.txt").read_text().split()]
    assert flagged and set(flagged) == {i for i, r in enumerate(rows) if r["flagged"] == "1"}
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(digits.is_noisy, scores) > 0.97
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Flagged examples" in page
    assert "mean_m ℓ(z,θ_m)" in page
    assert "flagged; results in out/" in proc.stdout
    # A second run reuses the saved ensemble: same scores.
    again = _run_cli(
        ["detect", "model.keras", "data.npz", "--out", "out", "--members", "3", "--quiet"],
        tmp_path,
    )
    assert again.returncode == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), scores)
    # The paper's score from the same ensemble: its own column name.
    args = ["detect", "model.keras", "data.npz", "--out", "out", "--members", "3", "--quiet"]
    paper = _run_cli([*args, "--score", "self_influence"], tmp_path)
    assert paper.returncode == 0, paper.stderr[-3000:]
    with open(out / "scores.csv") as handle:
        assert "self_influence" in next(csv.DictReader(handle))
    assert roc_auc_score(digits.is_noisy, np.load(out / "scores.npy")) > 0.97


def test_detect_bad_inputs_exit_2(tmp_path):
    import numpy as np

    proc = _run_cli(["detect", "missing.keras", "data.npz"], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    from conftest import make_mlp

    make_mlp(hidden=4).save(tmp_path / "m.keras")
    proc = _run_cli(["detect", "m.keras", "bad.npz"], tmp_path)
    assert proc.returncode == 2 and "must contain arrays 'x' and 'y'" in proc.stderr
    proc = _run_cli(["detect", "m.keras"], tmp_path)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_auto_or_number_arguments():
    from keras_gex.app.cli import _auto_or

    assert _auto_or("auto", int, "--steps", "a positive integer") == "auto"
    assert _auto_or("80", int, "--steps", "a positive integer") == 80
    assert _auto_or("0.2", float, "--learning-rate", "a number") == 0.2
    with pytest.raises(ValueError, match="`--steps` must be 'auto' or a positive integer"):
        _auto_or("many", int, "--steps", "a positive integer")
