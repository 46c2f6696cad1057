import os
import re
import subprocess
import sys

import pytest

from keras_gex.cli import main


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
