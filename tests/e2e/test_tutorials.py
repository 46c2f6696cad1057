"""The tutorials run end to end (fast mode) and print their key results.

Every `tutorials/NN_*.py` is run in a subprocess with `KERAS_GEX_TUTORIAL_FAST=1`, in a
temporary working directory (tutorials write their PNGs and outputs into the cwd). Each
must exit 0 and end by printing `done in N s`; the tutorials listed in `EXPECTED` must also
print their key result lines.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
SHARED_TFDS = ROOT.parent / "shared" / "tfds"

#: Per tutorial: regular expressions its output must match. Numbers are checked loosely
#: (fast mode is a smoke run), to catch a tutorial that runs but prints nonsense.
EXPECTED = {
    "01_fashion_mnist_noisy_labels.py": [
        r"detection vs known flips: AUC (?P<auc>\d\.\d+)\s+AP (?P<ap>\d\.\d+)",
        r"flagged \d+ examples: precision \d\.\d+\s+recall \d\.\d+",
        r"suggested label equals the original label on (?P<suggested>\d+\.\d)% of flagged flips",
        r"test accuracy: noisy (?P<noisy>\d\.\d+) -> relabeled (?P<relabeled>\d\.\d+)",
        r"test accuracy: noisy \d\.\d+ -> dropped \d\.\d+",
    ],
    "02_post_hoc_saved_model.py": [
        r"post-hoc detection: AUC (?P<auc>\d\.\d+)",
        r"loaded ensemble: max \|score difference\| (?P<loaded>\S+) ",
        r"refused: .*different trained weights",
        r"gate on \d+ new rows: flags (?P<gate_flipped>\d+)% of the flipped labels and "
        r"(?P<gate_other>\d+)% of the others",
        r"gate on the training rows = the report's flags: True",
        r"resumed ensemble vs uninterrupted: max \|score difference\| (?P<resumed>\S+)",
    ],
    "03_explain_predictions.py": [
        r"raw influence: proponents sharing the predicted label \d\.\d+",
        r"normalized influence: proponents sharing the predicted label (?P<share>\d\.\d+) "
        r"\(opponents \d\.\d+, chance (?P<chance>\d\.\d+)\)",
        r"wrote fashion_proponents_0\.png",
    ],
    "05_distributed.py": [
        r"replicas in sync: 2",
        r"data-parallel collection: AUC (?P<auc_dp>\d\.\d+)",
        r"one member per replica: AUC (?P<auc_pr>\d\.\d+)",
        r"max \|score difference\|, 2 replicas vs one device: (?P<diff>\S+)",
    ],
    "04_prune_dataset.py": [
        r"test accuracy after pruning",
        r"30%\s+\d+\s+(?P<gex>\d\.\d+)\s+(?P<random>\d\.\d+)",
    ],
}

#: Loose checks of the numbers captured above.
CHECKS = {
    "01_fashion_mnist_noisy_labels.py": lambda f: float(f["auc"]) > 0.8,
    # Bit-identical on CPU (README, Reproducibility); allow float-level noise elsewhere.
    "02_post_hoc_saved_model.py": lambda f: (
        float(f["auc"]) > 0.8
        and float(f["loaded"]) < 1e-4
        and float(f["resumed"]) < 1e-4
        and int(f["gate_flipped"]) > int(f["gate_other"])
    ),
    "03_explain_predictions.py": lambda f: float(f["share"]) > float(f["chance"]),
    "05_distributed.py": lambda f: (
        float(f["auc_dp"]) > 0.8 and float(f["auc_pr"]) > 0.8 and float(f["diff"]) < 1e-5
    ),
}

PNGS = {
    "01_fashion_mnist_noisy_labels.py": [
        "fashion_scores.png",
        "fashion_suspects.png",
        "fashion_suspects_truth.png",
    ],
    "03_explain_predictions.py": ["fashion_proponents_0.png"],
}


NAMES = sorted(p.name for p in TUTORIALS.glob("[0-9]*.py"))


def test_tutorials_are_found():
    assert set(EXPECTED) <= set(NAMES), sorted(set(EXPECTED) - set(NAMES))


def _tfds_dir(name):
    """TFDS_DATA_DIR for the subprocess; skips if the tutorial needs data we lack."""
    if os.environ.get("TFDS_DATA_DIR"):
        return os.environ["TFDS_DATA_DIR"]
    if SHARED_TFDS.is_dir():
        return str(SHARED_TFDS)
    if "tensorflow_datasets" not in (TUTORIALS / name).read_text():
        return None
    pytest.skip(
        f"Fashion-MNIST is not available offline: {SHARED_TFDS} is missing and "
        "TFDS_DATA_DIR is unset (set TFDS_DATA_DIR to a tensorflow-datasets data dir "
        "holding fashion_mnist)."
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs(name, tmp_path):
    env = dict(os.environ, KERAS_GEX_TUTORIAL_FAST="1", TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    tfds_dir = _tfds_dir(name)
    if tfds_dir is not None:
        env["TFDS_DATA_DIR"] = tfds_dir
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / name)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}\n{proc.stderr[-5000:]}"
    found = {}
    for pattern in [r"done in \d+ s", *EXPECTED.get(name, [])]:
        match = re.search(pattern, out)
        assert match, f"{name} did not print a line matching {pattern!r}:\n{out[-3000:]}"
        found.update(match.groupdict())
    for png in PNGS.get(name, []):
        assert (tmp_path / png).stat().st_size > 5000, png
    if name in CHECKS:
        assert CHECKS[name](found), f"{name}: implausible results {found}:\n{out[-3000:]}"
