"""`keras-gex demo` says what it is doing while it trains, in plain lines."""

import re

import pytest

from keras_gex.app import demo


def test_progress_callback_prints_about_five_plain_lines():
    lines = []
    callback = demo._progress("noisy labels", 12, lines.append)
    callback.on_train_begin()
    for epoch in range(12):
        callback.on_epoch_end(epoch, {"loss": 0.5})
    assert [line.split(",")[0] for line in lines] == [
        f"  noisy labels: epoch {done}/12" for done in (3, 6, 9, 12)
    ]
    assert all(", loss 0.5000 (" in line and line.endswith(" s)") for line in lines)


def test_run_demo_rejects_a_bad_verbose():
    with pytest.raises(ValueError, match=r"`verbose` must be 0 or 1\. Received: verbose=2"):
        demo.run_demo(verbose=2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Step-size calibration found no learning rate")
def test_demo_reports_each_phase(capsys):
    """Every training (noisy, relabeled, clean) prints its epochs; no progress bar."""
    result = demo.run_demo(epochs=10, num_members=2, plot_path=None, verbose=1)
    out = capsys.readouterr().out
    assert not re.search("[\x1b\r\b]", out)
    phases = ["noisy labels", "relabeled", "clean labels"]
    for phase in phases:
        assert f"  {phase}: epoch 10/10, loss " in out, out
    positions = [out.index(f"{phase}: epoch 10/10") for phase in phases]
    assert positions == sorted(positions)
    assert out.index("scoring 1348 examples with 2 members") < positions[1]
    assert out.rstrip().endswith(demo.result_lines(result)[-1])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Step-size calibration found no learning rate")
def test_quiet_demo_prints_only_the_results(capsys):
    from keras_gex.app.cli import main

    assert main(["demo", "--quiet", "--epochs", "5", "--members", "2", "--plot", ""]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("detection vs known flips:  AUC ")
    assert out[-1].startswith("done in ") and len(out) == 4
