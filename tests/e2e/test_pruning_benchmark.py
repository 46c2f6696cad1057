"""The pruning benchmark's table, on synthetic rows: no model is trained here
(the benchmark itself is not a test; see `benchmarks/pruning.py`)."""

import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def pruning():
    return import_benchmark("pruning")


def test_the_table_gives_accuracy_by_method_and_the_smallest_class_share_by_seed(pruning):
    rows = []
    for seed, (gex, share) in enumerate([(0.97, 0.25), (0.95, 0.125), (0.96, 0.03)]):
        rows.append(("digits MLP", "full data", 0.0, seed, 0.98, 1.0))
        for fraction in pruning.FRACTIONS:
            rows.append(("digits MLP", "GEX", fraction, seed, gex, share))
            rows.append(("digits MLP", "GEX per class", fraction, seed, 0.97, fraction))
            rows.append(("digits MLP", "EL2N", fraction, seed, 0.96, 0.5))
            rows.append(("digits MLP", "random", fraction, seed, 0.95, 0.5))
    lines = pruning._table(rows).splitlines()
    assert lines[0] == (
        "| case | pruned | GEX | GEX per class | EL2N | random "
        "| GEX: smallest share kept of a class |"
    )
    assert lines[2] == "| digits MLP | 0% (full) | 0.9800 ± 0.0000 | | | | |"
    assert lines[-1] == (
        "| digits MLP | 50% | 0.9600 ± 0.0082 | 0.9700 ± 0.0000 | 0.9600 ± 0.0000 "
        "| 0.9500 ± 0.0000 | 25% / 12% / 3% |"
    )
