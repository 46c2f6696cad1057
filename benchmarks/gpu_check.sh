#!/usr/bin/env bash
# keras_gex on a GPU (issue #29): install as the README says, run the fast test suite,
# then print one table (benchmarks/gpu_check.py): scoring vs the (M+1) compiled-forward
# limit, GE collection vs the same compiled training steps (ResNet-BN CNN and digits
# MLP, batch 1,024, jit_compile off and on), mixed_float16 and MirroredStrategy bars.
# Budget: at most 8 minutes on one GPU. The table is also written to
# benchmarks/results/gpu_check.md.
#
#   benchmarks/gpu_check.sh                  # install into .venv, tests, GPU table
#   benchmarks/gpu_check.sh --skip-install   # the current environment's python
#   benchmarks/gpu_check.sh --cpu            # toy sizes on the CPU, no install, no
#                                            # tests (CI has done both); ~40 s
#
# Exit status: non-zero when the install, the tests or any section fails, a bar is not
# met, or the table does not finish within its time limit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cpu=0
install=1
for arg in "$@"; do
    case "$arg" in
        --cpu) cpu=1 ;;
        --skip-install) install=0 ;;
        -h | --help)
            sed -n '2,15p' "$0"
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument: $arg (use --cpu, --skip-install)" >&2
            exit 2
            ;;
    esac
done

PYTHON="${PYTHON:-python}"
start=$SECONDS

if [[ $cpu == 1 ]]; then
    limit="${GPU_CHECK_TIMEOUT_S:-120}"
    timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/gpu_check.py --cpu || status=$?
    status="${status:-0}"
    if [[ $status == 124 || $status == 137 ]]; then
        echo "gpu_check.sh: benchmarks/gpu_check.py --cpu did not finish in ${limit} s" >&2
    fi
    echo "gpu_check.sh: --cpu finished in $((SECONDS - start)) s (exit $status)" >&2
    exit "$status"
fi

if [[ $install == 1 ]]; then
    echo "== install (.venv) ==" >&2
    python -m venv .venv && . .venv/bin/activate && pip install ".[test,docs]"
    PYTHON=python
fi

echo "== fast test suite ==" >&2
"$PYTHON" -m pytest -m "not slow" -q

echo "== GPU table ==" >&2
# Fashion-MNIST for the CNN when a tensorflow_datasets directory holds it (CI keeps
# one in ../shared/tfds beside the clone); otherwise the CNN runs on synthetic images.
if [[ -z "${TFDS_DATA_DIR:-}" ]]; then
    for dir in ../shared/tfds shared/tfds; do
        if [[ -d "$dir/fashion_mnist" ]]; then
            export TFDS_DATA_DIR="$PWD/$dir"
            break
        fi
    done
fi
mkdir -p benchmarks/results
limit="${GPU_CHECK_TIMEOUT_S:-480}"
status=0
timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/gpu_check.py |
    tee benchmarks/results/gpu_check.md || status=$?
if [[ $status == 124 || $status == 137 ]]; then
    echo "gpu_check.sh: benchmarks/gpu_check.py did not finish in ${limit} s" >&2
fi
echo "gpu_check.sh: finished in $((SECONDS - start)) s (exit $status);" \
    "table in benchmarks/results/gpu_check.md" >&2
exit "$status"
