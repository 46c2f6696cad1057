"""`benchmarks/gpu_check.sh --cpu`: the GPU check (issue #29) at toy size, end to end.

The GPU run itself needs a GPU; this keeps its script alive on CPU-only CI: every
section must run and appear in the table, and the bars (mixed_float16, Mirrored-
Strategy) must pass. A failed section must be listed and fail the exit status.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    """`benchmarks/gpu_check.py` as a module (it imports TensorFlow only when run)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a 25 s subprocess: the whole GPU check at toy size
def test_cpu_run_prints_every_section_and_passes_its_bars():
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT_S="240")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr[-4000:]}"
    assert re.search(r"^## keras_gex GPU check: CPU ", out, re.M), out
    assert "| section | model | setting | keras_gex | baseline | ratio | check |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(row.count("|") == 8 for row in rows), "a cell holds a '|'"
    sections = [row.split("|")[1].strip() for row in rows[1:]]
    # Two models x jit_compile off / on, two models x two ensemble sizes, two bars.
    assert sections.count("collection") == 4, out
    assert sections.count("scoring") == 4, out
    for model in ("ResNet-BN CNN", "digits MLP"):
        for jit in (False, True):
            assert any(
                r.startswith("| collection |") and model in r and f"jit_compile={jit}" in r
                for r in rows
            ), (model, jit, out)
    for section in ("mixed_float16", "MirroredStrategy"):
        (row,) = [r for r in rows if r.startswith(f"| {section} |")]
        assert row.rstrip().endswith("| PASS |"), row
    assert "FAIL" not in out and "Sections that failed" not in out
    assert "All sections ran; all bars met." in out


def test_a_failed_section_is_listed_and_fails_the_run():
    gpu_check = _module()
    check = gpu_check.Check(gpu_check.SIZES["cpu"], {"replicas": [], "gpus": 0}, cpu=True)

    def broken():
        raise ValueError("first line of the error\nsecond line")

    check.run("scoring", "digits MLP, M=8", broken)
    check.bars_failed.append("MirroredStrategy")
    meta = dict(device="CPU", mode="test", tf="-", keras="-", keras_gex="-", seconds=0.0)
    text = gpu_check.render(check, meta)
    assert "| scoring | digits MLP, M=8 |" in text
    assert "FAIL: ValueError: first line of the error |" in text
    assert "**Sections that failed:**" in text
    assert "- scoring (digits MLP, M=8): ValueError: first line of the error" in text
    assert "**Bars not met:** MirroredStrategy" in text
    assert "all bars met" not in text
