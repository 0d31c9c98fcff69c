"""The GPU suite's CPU dry run: it passes for the kernel as it is and fails for kernels
broken on purpose, so its verdict cannot rot into a check that passes anything.

The breakages are injected into ``pallas_kernels.paged_decode`` with monkeypatch (the
kernel looks its helpers up at trace time); jax's caches are cleared around each so no
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

from pallas_kernels import paged_decode as pd

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
    assert names == [c.name for c in gpu_check.TINY_CHECKS] + ["2x64"]
    assert all(c["rel_errors"] and not c["nan"] for c in report["checks"])
    assert report["timings"] and report["timings"][0]["ours_s"] > 0


def dropped_last_split(split, length, **options):
    lo, hi = ORIGINAL_RANGE(split, length, **options)
    return lo, jnp.where(split == pl.num_programs(2) - 1, lo, hi)


def unweighted_merge(o, lse):
    seen = jnp.isfinite(lse)[..., None]
    return jnp.sum(jnp.where(seen, o, 0.0), axis=-3) / jnp.maximum(
        jnp.sum(seen, axis=-3), 1)


ORIGINAL_RANGE = pd._visible_range
BREAKAGES = {
    "dropped-split": ("_visible_range", dropped_last_split),
    "unweighted-merge": ("merge_splits", unweighted_merge),
    "unmasked-v": ("_mask_values", lambda v, visible: v),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_dry_run_fails_for_broken_kernel(breakage, tmp_path, monkeypatch, fresh_jax):
    name, broken = BREAKAGES[breakage]
    monkeypatch.setattr(pd, name, broken)
    status, report = dry_run(tmp_path, monkeypatch, "--case", "odd-splits")
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
