"""Start-up of the command line: `keras-gex --help` against `import tensorflow`.

`keras-gex --help` needs no TensorFlow: the entry point imports the argparse
front-end only, and TensorFlow starts when a command runs. The script times
each command in a fresh process, alternating them, `--reps` times (median
reported), and counts the lines each writes to stderr (TensorFlow's start-up
log: none expected from `--help`). `TF_CPP_MIN_LOG_LEVEL` is left as the
caller set it.

Run::

    python benchmarks/cli_startup.py [--reps 5]

Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _commands() -> dict[str, list[str]]:
    script = shutil.which("keras-gex", path=os.path.dirname(sys.executable)) or shutil.which(
        "keras-gex"
    )
    help_command = [script, "--help"] if script else [sys.executable, "-m", "keras_gex", "--help"]
    return {
        "`keras-gex --help`": help_command,
        '`python -c "import tensorflow"`': [sys.executable, "-c", "import tensorflow"],
    }


def _time(command: list[str]) -> tuple[float, int]:
    """Wall seconds of one run of `command` and the lines it wrote to stderr."""
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds, len(proc.stderr.splitlines())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"Argument `--reps` must be at least 1. Received: --reps {args.reps}")
    commands = _commands()
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.reps):
        for name, command in commands.items():  # alternated: same machine load
            runs[name].append(_time(command))
    print(f"| command | median wall time (s), {args.reps} runs | min-max (s) | stderr lines |")
    print("|---|---:|---:|---:|")
    for name, results in runs.items():
        seconds = [s for s, _ in results]
        lines = max(n for _, n in results)
        print(
            f"| {name} | {statistics.median(seconds):.2f} | "
            f"{min(seconds):.2f}-{max(seconds):.2f} | {lines} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
