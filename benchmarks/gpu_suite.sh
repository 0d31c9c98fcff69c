#!/usr/bin/env bash
# One command for the GPU: the verdict on the Pallas kernels (the Triton decode kernel on
# 16-bit, float32 and 8-bit pages, the Mosaic GPU ragged kernel on decode and prefill
# chunks; checks against a float64 reference) and their timing against the XLA path,
# JAX's Pallas paged attention and cuDNN dense attention (see benchmarks/gpu_check.py and
# benchmarks/gpu_mosaic.py). Needs only python3 with jax and numpy
# and this repository: no Flax, no package registry.
# Finishes within ~8 minutes: the checks run first, no timed shape or tuning point starts
# after --budget-s, and this wrapper stops it at 470 s; every result is written to $OUT
# (else benchmarks/results/) as it finishes.
# Usage: benchmarks/gpu_suite.sh [gpu_check.py options, e.g. --no-tune]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let the kernel's working set, not a preallocated 75%, decide what fits.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout --kill-after=10 470 python3 benchmarks/gpu_check.py --budget-s 380 "$@"
status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_suite: timed out; partial results were written as they finished" >&2
fi
exit "$status"
