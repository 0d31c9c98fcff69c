"""The GPU suite's CPU dry run: it passes for the kernel as it is and fails for kernels
broken on purpose, so its verdict cannot rot into a check that passes anything.

The breakages are injected into ``jpaged.pallas_kernels.paged_decode`` (the Triton kernel, its
8-bit read included) and ``jpaged.pallas_kernels.ragged_attention`` (the Mosaic kernel) with
monkeypatch (the kernels look their helpers up at trace time); jax's caches are cleared around each so no
trace of the healthy kernel is reused.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture
def fresh_jax():
    jax.clear_caches()
    yield
    jax.clear_caches()


def dry_run(tmp_path, monkeypatch, *extra):
    monkeypatch.setenv("OUT", str(tmp_path))
    status = gpu_check.main(["--interpret", "--tiny", "--no-tune", *extra])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").exists()
    return status, report


def test_dry_run_passes(tmp_path, monkeypatch, fresh_jax):
    status, report = dry_run(tmp_path, monkeypatch)
    assert status == 0 and report["ok"]
    names = [c["case"] for c in report["checks"]]
    expected = [c.name for c in gpu_check.TINY_CHECKS
                if c.dtype != "fp8" or "fp8" in gpu_check.FORMATS_8BIT]
    assert names == expected + ["2x64"]
    assert {"int8", "mosaic-decode", "mosaic-prefill"} <= set(names)
    assert all(c["rel_errors"] and not c["nan"] for c in report["checks"])
    assert report["timings"] and report["timings"][0]["ours_s"] > 0
    timed_8bit = {r.get("dtype") for r in report["timings"] if r["ours_s"]}
    assert set(gpu_check.FORMATS_8BIT) <= timed_8bit
    # The Mosaic kernel beside its peers, decode and prefill, each Mosaic row checked.
    mosaic = {(r["phase"], r["impl"]): r for r in report["mosaic"][1:]}
    assert set(mosaic) == {("decode", "mosaic"), ("decode", "pallas"), ("decode", "xla"),
                           ("prefill", "mosaic"), ("prefill", "xla")}
    assert all(r["seconds"] > 0 and "error" not in r for r in mosaic.values())
    assert mosaic["decode", "mosaic"]["relative_error"] <= gpu_check.MOSAIC_ERROR_BOUND
    assert report["mosaic_ok"]


def dropped_last_split(split, length, **options):
    lo, hi = ORIGINAL_RANGE(split, length, **options)
    return lo, jnp.where(split == pl.num_programs(2) - 1, lo, hi)


def unweighted_merge(o, lse):
    seen = jnp.isfinite(lse)[..., None]
    return jnp.sum(jnp.where(seen, o, 0.0), axis=-3) / jnp.maximum(
        jnp.sum(seen, axis=-3), 1)


def halved_values(a, b_ref, transpose_b=False):
    """The Mosaic kernel's P @ V at half weight (a lost accumulation), Q K^T intact."""
    product = ORIGINAL_MATMUL(a, b_ref, transpose_b)
    return product if transpose_b else 0.5 * product


ORIGINAL_RANGE = pd._visible_range
ORIGINAL_MATMUL = ra._interpreted_matmul
# name: (module, attribute, replacement, the check case it must fail)
BREAKAGES = {
    "dropped-split": (pd, "_visible_range", dropped_last_split, "odd-splits"),
    "unweighted-merge": (pd, "merge_splits", unweighted_merge, "odd-splits"),
    "unmasked-v": (pd, "_mask_values", lambda v, visible: v, "odd-splits"),
    "scales-ignored": (pd, "dequantize", lambda codes, scales: codes.astype(jnp.float32),
                       "int8"),
    "mosaic-halved-values": (ra, "_interpreted_matmul", halved_values, "mosaic-prefill"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_dry_run_fails_for_broken_kernel(breakage, tmp_path, monkeypatch, fresh_jax):
    module, name, broken, case = BREAKAGES[breakage]
    monkeypatch.setattr(module, name, broken)
    status, report = dry_run(tmp_path, monkeypatch, "--case", case)
    [check] = report["checks"]
    assert status == 1 and not report["ok"] and not check["ok"], check
    if breakage == "unmasked-v":
        assert check["nan"]
    else:
        assert max(check["rel_errors"]) > 10 * check["bound"], check


def test_suite_needs_neither_flax_nor_jpaged():
    """The GPU machine has no package registry: the suite imports jax, numpy and
    pallas_kernels only (jpaged's package import pulls Flax)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flax', 'jpaged', 'models', 'torch', 'orbax')); print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
