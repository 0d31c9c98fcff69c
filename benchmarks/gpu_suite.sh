#!/usr/bin/env bash
# One command for the GPU: the verdict on the Pallas kernels (the Triton decode kernel on
# 16-bit, float32 and 8-bit pages, pools past the 32-bit limits included; the Mosaic GPU
# ragged kernel over its variants, decode and prefill; every check against a float64
# reference), then their timing beside the XLA path, JAX's Pallas paged attention and
# cuDNN dense attention (see benchmarks/gpu_check.py). Needs only python3 with jax and
# numpy and this repository: no Flax, no package registry.
# Time: the plan (printed first; `--plan` prints it without a device) puts the checks and
# a short sweep of every kernel in the first minutes; no item starts unless its estimate
# fits what is left of --budget-s (420 s), and this wrapper sends SIGTERM at 480 s (kill
# 10 s later). The verdict is written to $OUT (else benchmarks/results/) as soon as the
# checks end and rewritten after every item, so a stop keeps it.
# Usage: benchmarks/gpu_suite.sh [gpu_check.py options, e.g. --no-tune or --budget-s 300]
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Let the kernel's working set, not a preallocated 75%, decide what fits.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout --kill-after=10 "${GPU_SUITE_TIMEOUT_S:-480}" \
  python3 benchmarks/gpu_check.py --budget-s 420 "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu_suite: stopped by the time limit; the report holds what finished" >&2
fi
exit "$status"
