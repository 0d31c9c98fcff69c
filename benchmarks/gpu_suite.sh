#!/usr/bin/env bash
# One command for the GPU: check the Pallas decode kernel against the reference and
# benchmark it (see benchmarks/gpu_check.py). Finishes within ~8 minutes on an H200:
# the script starts no autotune point after --budget-s and this wrapper kills it at 470 s, by
# which time every finished configuration is already in $OUT (or benchmarks/results/).
# Usage: benchmarks/gpu_suite.sh [gpu_check.py options, e.g. --no-tune]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let the kernel's working set, not a preallocated 75%, decide what fits.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout --kill-after=10 470 python benchmarks/gpu_check.py --budget-s 400 "$@"
status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_suite: timed out; partial results were written as they finished" >&2
fi
exit "$status"
