#!/usr/bin/env bash
# The accelerator run in one go (issue 15, point 5), meant to finish within 8 minutes on one
# GPU: the machine, the CUDA tests, then benchmarks/gpu.py (the demo bundle trained, exported
# and checked in float16 there; images/s by batch and precision; decode throughput), one table.
# Arguments go to gpu.py (--quick: a smoke run on a CPU, as the tests run it).
# PYTHON=... runs it under another interpreter that already holds the packages (a GPU machine's
# own CUDA build of torch, say, with the rest installed beside it); by default the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ "$PYTHON" != .venv/bin/python ] || [ -x .venv/bin/python ] || scripts/setup --test
started=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: none (no NVIDIA GPU here)"
echo "== CUDA tests"
# A failed test does not stop the benchmarks (a GPU lease is short); the run fails at the end.
tests=0
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/workers/test_cuda.py || tests=$?
echo "== benchmarks/gpu.py $*"
benchmarks=0
"$PYTHON" benchmarks/gpu.py "$@" || benchmarks=$?
echo "gpu.sh: $(( $(date +%s) - started )) s"
[ "$tests" = 0 ] && [ "$benchmarks" = 0 ]
