"""The GPU suite's CPU dry run: it passes for the kernels as they are and fails for kernels
broken on purpose, so its verdict cannot rot into a check that passes anything; its plan
fits the device time; its verdict survives the budget and a SIGTERM.

The breakages are injected into ``jpaged.pallas_kernels.paged_decode`` (the Triton kernel, its
8-bit read included), ``jpaged.pallas_kernels.ragged_attention`` (the ragged Mosaic kernel) and
``jpaged.pallas_kernels.online_softmax`` (the decode tile's softmax, shared) with
monkeypatch (the kernels look their helpers up at trace time); jax's caches are cleared around each so no
trace of the healthy kernel is reused.

Cost (CI runs ``-m "not slow"`` on 2 cores): the not-slow tests share one small dry run
(one check, one decode shape timed through the decode tile and the XLA path, jax's caches
kept between the healthy tests) and break the Mosaic kernel once; the whole tiny dry run
and the other breakages are ``slow``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jpaged.pallas_kernels import online_softmax
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_mosaic  # noqa: E402

# The first device call must fit in the first minutes of a lease: setup, the verdict's
# checks and the short timing sweep within 6 minutes by the plan's H200 estimates.
FIRST_STAGES_S = 360


@pytest.fixture
def fresh_jax():
    jax.clear_caches()
    yield
    jax.clear_caches()


def dry_run(out_dir, monkeypatch, *extra):
    monkeypatch.setenv("OUT", str(out_dir))
    status = gpu_check.main(["--interpret", "--tiny", "--no-tune", *extra])
    report = json.loads((out_dir / "gpu_check.json").read_text())
    assert (out_dir / "gpu_check.md").exists()
    return status, report


@pytest.fixture(scope="module")
def small_dry_run(tmp_path_factory):
    """The tiny run cut to one check and one decode shape timed through the decode tile
    ("mosaic") and the XLA path. The ceilings and the profiler (3 s to start, n/a on a
    CPU) are the full dry run's to try (slow): here their CPU answers."""
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as monkeypatch:
        small_plan(monkeypatch)
        monkeypatch.setattr(gpu_check, "kernel_seconds", lambda *args, **kwargs: dict(
            kernel_s=None, kernel_note="the profiler wrote no trace"))
        monkeypatch.setattr(gpu_check, "DECODE_IMPLS", SMALL_IMPLS)
        out_dir = tmp_path_factory.mktemp("small_dry_run")
        result = dry_run(out_dir, monkeypatch)
    yield result  # jax's caches stay: the healthy tests below reuse the compiled check


SMALL_CHECK = gpu_check.TINY_CHECKS[0]   # the Triton kernel: the cheapest to interpret
SMALL_IMPLS = ("mosaic", "xla")          # the full dry run (slow) times every kernel


def test_small_dry_run_checks_and_times(small_dry_run):
    """A PASS from a real check; the short sweep's decode shape timed through the decode
    tile ("mosaic", profiled: n/a on a CPU, with why) and the XLA path."""
    status, report = small_dry_run
    assert status == 0 and report["ok"] and report["verdict"] == "PASS"
    assert report["verdict_checks"] == [SMALL_CHECK.name]
    [check] = report["checks"]
    assert check["rel_errors"] and not check["nan"]
    timed = [(r["impl"], r["phase"]) for r in report["timings"]]
    assert timed == [(impl, "decode") for impl in SMALL_IMPLS]
    assert all(r["seconds"] > 0 and "errors" not in r for r in report["timings"])
    profiled = [r["impl"] for r in report["timings"] if "kernel_s" in r]
    assert profiled == ["mosaic"]
    assert all(r["kernel_s"] is None and r["kernel_note"] for r in report["timings"]
               if "kernel_s" in r)
    assert not report["skipped"] and not report["item_errors"]


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    """One whole tiny dry run, shared by the tests that read its report."""
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as monkeypatch:
        out_dir = tmp_path_factory.mktemp("dry_run")
        yield dry_run(out_dir, monkeypatch)
    jax.clear_caches()


@pytest.mark.slow
def test_dry_run_passes(full_dry_run):
    status, report = full_dry_run
    assert status == 0 and report["ok"] and report["verdict"] == "PASS"
    names = [c["case"] for c in report["checks"]]
    expected = [c.name for c in gpu_check.TINY_CHECKS
                if c.dtype != "fp8" or "fp8" in gpu_check.FORMATS_8BIT]
    assert names == expected + ["2x128"]
    assert report["verdict_checks"] == expected
    assert {"int8", "window-softcap-stacked", "mosaic-decode", "mosaic-decode-tile",
            "mosaic-prefill"} <= set(names)
    assert all(c["rel_errors"] and not c["nan"] for c in report["checks"])
    assert not report["skipped"] and not report.get("stopped")


@pytest.mark.slow
def test_dry_run_times_every_kernel_early(full_dry_run):
    """Mosaic decode and prefill and 8-bit pages are timed in the short sweep, before the
    long one; one row per kernel tries a kernel-only time (n/a on a CPU, with why)."""
    _, report = full_dry_run
    stages = [i["stage"] for i in report["items"]]
    assert stages == sorted(stages, key=gpu_check.STAGES.index)
    short = {(r["phase"], r["impl"], r["dtype"]) for r, item in zip(
        report["timings"], [i for i in report["items"] if i["label"].startswith("time")])
        if item["stage"] == "short"}
    assert {("decode", "ours", "bfloat16"), ("decode", "mosaic", "bfloat16"),
            ("decode", "mosaic-ragged", "bfloat16"), ("decode", "mosaic", "int8"),
            ("decode", "xla", "bfloat16"), ("prefill", "mosaic", "bfloat16"),
            ("prefill", "xla", "bfloat16")} <= short
    assert ("decode", "ours", "int8") in short
    assert all(r["seconds"] > 0 and "errors" not in r for r in report["timings"])
    profiled = [(r["impl"], r["phase"], r["dtype"]) for r in report["timings"]
                if "kernel_s" in r]
    assert {("ours", "decode", "bfloat16"), ("ours", "decode", "int8"),
            ("mosaic", "decode", "bfloat16"), ("mosaic-ragged", "decode", "bfloat16"),
            ("mosaic", "decode", "int8"),
            ("mosaic", "prefill", "bfloat16")} <= set(profiled)
    assert len(profiled) == len(set(profiled))
    assert all(r["kernel_s"] is None and r["kernel_note"] for r in report["timings"]
               if "kernel_s" in r)
    assert report["read_bytes_per_s"] > 0


def test_plan_fits_the_first_minutes():
    settings = gpu_check.Settings(interpret=False, tiny=False, deadline=float("inf"))
    items = gpu_check.build_plan(settings, {})
    first = sum(i.estimate_s for i in items if i.stage in ("setup", "checks", "short"))
    assert first <= FIRST_STAGES_S, gpu_check.plan_markdown(items, settings.rates)
    labels = [i.label for i in items]
    stages = [i.stage for i in items]
    assert stages == sorted(stages, key=gpu_check.STAGES.index)
    # The verdict's checks: both pools past the 32-bit limits, every Mosaic variant.
    checks = [i.label.removeprefix("check ") for i in items if i.verdict]
    assert {"pool>4GiB", "int8-pool-3GiB", "mosaic-int8-pool-3GiB",
            "mosaic-decode-tile-int8-pool-3GiB"} <= set(checks)
    assert {c["name"] for c in gpu_mosaic.variants()} <= set(checks)
    int8_3gib = next(c for c in gpu_check.CHECKS if c.name == "int8-pool-3GiB")
    elements = 2 * int8_3gib.batch * int8_3gib.context * 8 * 128 // 2
    assert 2**31 < elements and elements <= 2**32  # codes in the window jax gets wrong
    short = [label for label, stage in zip(labels, stages) if stage == "short"]
    assert any("decode" in s and "mosaic" in s for s in short)
    assert any("prefill" in s and "mosaic" in s for s in short)
    assert any("int8 ours" in s for s in short) and any("fp8 ours" in s for s in short)
    assert any(label.startswith("tune") for label in labels[-5:])


def test_plan_prints_without_a_device(capsys):
    assert gpu_check.main(["--plan"]) == 0
    printed = capsys.readouterr().out
    assert "| checks |" in printed and "| short |" in printed and "| long |" in printed


def small_plan(monkeypatch):
    """The tiny run cut to the small dry run's check and one timed shape."""
    monkeypatch.setattr(gpu_check, "TINY_CHECKS", [SMALL_CHECK])
    monkeypatch.setattr(gpu_check, "TINY_SHORT", gpu_check.TINY_SHORT[:1])
    monkeypatch.setattr(gpu_check, "TINY_LONG", [])
    monkeypatch.setattr(gpu_check, "measure_ceilings",
                        lambda settings: dict(read_bytes_per_s=1e9, matmul_flop_per_s=1e9))


def test_sigterm_keeps_the_verdict(tmp_path, monkeypatch):
    """A SIGTERM during timing ends the run: the checks' verdict stands, the rest is listed
    as stopped, both files are written."""
    small_plan(monkeypatch)

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(gpu_check, "time_item", terminated)
    status, report = dry_run(tmp_path, monkeypatch)
    assert status == 0 and report["verdict"] == "PASS", report
    assert report["stopped"].startswith("SIGTERM during time decode")
    assert report["skipped"] and all(s["reason"] == "stopped" for s in report["skipped"])
    assert "Verdict: **PASS**" in (tmp_path / "gpu_check.md").read_text()
    assert signal.getsignal(signal.SIGTERM) is not gpu_check._stop


def test_an_item_that_raises_does_not_end_the_run(tmp_path, monkeypatch):
    small_plan(monkeypatch)

    def broken(*args):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gpu_check, "time_item", broken)
    status, report = dry_run(tmp_path, monkeypatch)
    assert status == 0 and report["verdict"] == "PASS"
    timed = [i for i in report["items"] if i["label"].startswith("time")]
    assert timed and len(report["item_errors"]) == len(timed)
    assert "out of memory, say" in (tmp_path / "gpu_check.md").read_text()


def test_budget_is_checked_before_every_item(tmp_path, monkeypatch):
    """With no budget nothing starts and the verdict says INCOMPLETE, not PASS; with a
    budget for the checks only, they run and the timing items are skipped one by one."""
    small_plan(monkeypatch)
    status, report = dry_run(tmp_path, monkeypatch, "--budget-s", "0")
    assert status == 1 and report["verdict"] == "INCOMPLETE" and not report["checks"]
    assert all(s["reason"].startswith("budget") for s in report["skipped"])
    check_s = SMALL_CHECK.estimate(gpu_check.TINY, gpu_check.H200)
    monkeypatch.setattr(gpu_check, "time_estimate", lambda *args: 1e6)
    status, report = dry_run(tmp_path, monkeypatch, "--budget-s", str(check_s + 60))
    assert status == 0 and report["verdict"] == "PASS"
    timed = [s for s in report["skipped"] if s["label"].startswith("time")]
    assert len(timed) == len(gpu_check.Settings(True, True, 0).impls(gpu_check.TINY_SHORT[0]))
    assert not report["timings"]


def test_mosaic_bounds_are_committed_for_every_variant():
    """Each variant's bound is 3x its committed interpret-mode error, for exactly its
    fields; the variants cover groups 1/4/8, pages 16/64, head_dims 64/128, decode and
    prefill, a window, a soft cap, a stacked pool, split-K decode and 8-bit pages."""
    variants = gpu_mosaic.variants()
    assert {v["group"] for v in variants} == {1, 4, 8}
    assert {v["page_size"] for v in variants} == {16, 64}
    assert {v["head_dim"] for v in variants} == {64, 128}
    for key in ("group", "page_size", "head_dim"):
        for value in {v[key] for v in variants}:
            assert {v["chunk"] > 1 for v in variants if v[key] == value} == {False, True}
    assert any(v.get("sliding_window") for v in variants)
    assert any(v.get("soft_cap") for v in variants)
    assert any(v.get("num_layers") for v in variants)
    assert any((v.get("num_splits") or 1) > 1 for v in variants)
    assert set(gpu_check.FORMATS_8BIT) <= {v.get("dtype") for v in variants}
    tile = [v for v in variants if v["kernel"] == "mosaic_decode"]
    assert {(v["group"], v["page_size"], v["head_dim"]) for v in tile} == {
        (g, p, d) for g in (1, 4, 8) for p in (16, 64) for d in (64, 128)}
    assert {v.get("dtype") for v in tile} >= set(gpu_check.FORMATS_8BIT)
    committed = gpu_mosaic.load_bounds()["cases"]
    for case in gpu_mosaic.variant_cases():
        entry = committed[case["name"]]
        assert 0 < entry["interpret_rel_error"] < 1e-2
        assert case["bound"] == pytest.approx(3 * entry["interpret_rel_error"])
    assert all(c["bound"] > 0 for c in gpu_mosaic.large_cases())
    assert gpu_mosaic.bound_warnings() == []


@pytest.mark.slow
def test_mosaic_bound_reproduces_in_interpret_mode(fresh_jax):
    """One variant rerun here gives the committed interpret-mode error."""
    fields = next(v for v in gpu_mosaic.variants() if v["name"].startswith("mosaic-g8-p64"))
    case = gpu_check.Case(**fields)
    settings = gpu_check.Settings(interpret=True, tiny=False, deadline=float("inf"))
    result = gpu_check.run_check(case, settings, gpu_check.case_seed(case))
    committed = gpu_mosaic.load_bounds()["cases"][case.name]
    assert max(result["rel_errors"]) == pytest.approx(committed["interpret_rel_error"],
                                                      rel=1e-3)


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


def window_ignored(split, length, *, split_tokens, sliding_window):
    return ORIGINAL_RANGE(split, length, split_tokens=split_tokens, sliding_window=None)


def unrescaled_step(s, visible, m_i, l_i, acc, *, key_axis):
    """The shared online softmax with the accumulator left at its old maximum."""
    probs, m_new, l_new, _ = ORIGINAL_STEP(s, visible, m_i, l_i, acc, key_axis=key_axis)
    return probs, m_new, l_new, acc


ORIGINAL_RANGE = pd._visible_range
ORIGINAL_MATMUL = ra._interpreted_matmul
ORIGINAL_STEP = online_softmax.step
# name: (module, attribute, replacement, the check case it must fail)
BREAKAGES = {
    "dropped-split": (pd, "_visible_range", dropped_last_split, "odd-splits"),
    "unweighted-merge": (pd, "merge_splits", unweighted_merge, "odd-splits"),
    "unmasked-v": (pd, "_mask_values", lambda v, visible: v, "odd-splits"),
    "scales-ignored": (pd, "dequantize", lambda codes, scales: codes.astype(jnp.float32),
                       "int8"),
    "window-ignored": (pd, "_visible_range", window_ignored, "window-softcap-stacked"),
    "mosaic-halved-values": (ra, "_interpreted_matmul", halved_values, "mosaic-prefill"),
    "tile-unrescaled": (online_softmax, "step", unrescaled_step, "mosaic-decode-tile"),
}


# Not slow: one breakage (each costs a fresh interpret-mode compile, 4-7 s of CPU); the
# rest are slow.
NOT_SLOW_BREAKAGES = ("mosaic-halved-values",)


@pytest.mark.parametrize("breakage", [
    pytest.param(name, marks=() if name in NOT_SLOW_BREAKAGES else pytest.mark.slow)
    for name in BREAKAGES])
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
    """The GPU machine has no package registry: the suite imports jax, numpy and the
    kernels only (``jpaged`` itself is lazy: importing ``jpaged.pallas_kernels`` loads no
    other layer, and no Flax)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flax', 'models', 'torch', 'orbax') or (m.startswith('jpaged.') and not "
            "m.startswith('jpaged.pallas_kernels'))); print(bad); "
            "sys.exit(1 if bad or 'jpaged.pallas_kernels.paged_decode' not in sys.modules "
            "else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
